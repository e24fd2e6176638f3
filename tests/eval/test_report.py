"""Summaries, the table, the JSON result and the plots from hand-made rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from powerserve_client.eval.report import percentile, plot, summarise, table, wilson, write_json
from powerserve_client.eval.run import Row


def _row(decoder: str, correct: bool, reward: float, tokens: int, latency: float) -> Row:
    return Row(
        "arithmetic", "t", decoder, correct, "", "text", "stop", 10, tokens, 0, reward, reward / 10, latency, None
    )


def test_wilson_and_percentile() -> None:
    lo, hi = wilson(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-3) and hi == pytest.approx(0.7634, abs=1e-3)
    assert wilson(0, 0) == (0.0, 1.0)
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([5.0], 95) == 5.0 and percentile([], 50) is None


def test_summary_table_json_and_plot(tmp_path: Path) -> None:
    rows = [_row("standard", i < 2, -10.0 - i, 10, 0.1 * (i + 1)) for i in range(4)]
    rows += [_row("power_mcmc(alpha=4)", True, -5.0, 40, 1.0) for _ in range(4)]
    rows.append(Row("arithmetic", "t", "standard", False, "", "", None, 0, 0, 0, None, None, 0.5, None, error="boom"))
    summaries = summarise(rows)
    std, mcmc = summaries
    assert (std["n"], std["errors"], std["correct"]) == (5, 1, 2) and std["accuracy"] == pytest.approx(0.4)
    assert std["self_reward_mean"] == pytest.approx(-11.5) and std["engine_tokens_mean"] == 10
    assert std["latency_p50_s"] == pytest.approx(0.25)
    assert mcmc["accuracy"] == 1.0 and mcmc["self_reward_sd"] == 0.0
    text = table(summaries)
    assert "| arithmetic | standard | 5 (1 errors) | 0.400" in text and "power_mcmc(alpha=4)" in text
    write_json(tmp_path / "result.json", {"seed": 0}, summaries, rows)
    doc = json.loads((tmp_path / "result.json").read_text())
    assert len(doc["rows"]) == 9 and doc["summary"][1]["decoder"] == "power_mcmc(alpha=4)"
    [png] = plot(summaries, tmp_path)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
