"""Summaries, the table, the JSON result and the plots from hand-made rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from powerserve_client.eval.report import (
    paired_reward,
    percentile,
    plot,
    relative_table,
    summarise,
    table,
    wilson,
    write_json,
)
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


def test_relative_table_and_paired_reward() -> None:
    def row(decoder: str, task: str, reward: float, tokens: int, wall: float) -> Row:
        return Row("arithmetic", task, decoder, True, "", "x", "stop", 10, tokens, 0, reward, reward / 10, 9.0, wall)

    rows = [row("standard", f"t{i}", -20.0 - i, 10, 1.0) for i in range(3)]
    rows += [row("power_smc(alpha=4)", f"t{i}", -8.0 - 2 * i, 80, 2.5) for i in range(3)]
    summaries = summarise(rows)
    assert summaries[1]["server_wall_mean_s"] == pytest.approx(2.5)
    text = relative_table(summaries)  # the baseline found by name, wall from the server, not latency
    assert "| arithmetic | power_smc(alpha=4) | 2.50 | 2.50x | 80 | 8.00x | -10.00 | -1.000 | 3/3 |" in text
    assert "| arithmetic | standard | 1.00 | 1.00x | 10 | 1.00x |" in text
    assert "| - | 80 | - |" in relative_table(summaries, baseline="temperature")  # no such baseline
    diff = paired_reward(rows, "power_smc(alpha=4)", "standard", "arithmetic")
    assert diff is not None and diff["pairs"] == 3
    assert diff["mean"] == pytest.approx(11.0) and diff["half_width_95"] == pytest.approx(1.96 * 1.0 / 3**0.5)
    assert paired_reward(rows, "power_smc(alpha=4)", "nope", "arithmetic") is None
