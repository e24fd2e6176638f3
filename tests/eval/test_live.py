"""``powerserve eval`` against a live server: a real ``powerserve serve`` process on a tiny
checkpoint (torch engine) with a ``--distilled`` checkpoint, every decoder, a small arithmetic
set and two HumanEval problems; then the JSON result, the plots and the table."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from powerserve.cli import main
from powerserve.model_store import ensure_embedded_checkpoint
from powerserve.testing import ServerProcess
from tests.tiny_model import save_tiny_checkpoint

DECODERS = ["standard", "temperature:alpha=4", "power_mcmc:alpha=4,block_size=4,mcmc_steps=1", "distilled"]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    work = tmp_path_factory.mktemp("live")
    tokenizer = str(ensure_embedded_checkpoint())
    base = save_tiny_checkpoint(str(work / "base"), tokenizer)
    # Any checkpoint with the base's tokenizer can stand in for a distilled one here; the
    # pipeline that makes real ones is tested in tests/distill.
    student = save_tiny_checkpoint(str(work / "student"), tokenizer, seed=1)
    args = ["--distilled", student, "--max-model-len", "1024"]
    with ServerProcess(engine="torch", model=base, extra_args=args, log_path=work / "server.log") as srv:
        yield srv.base, base


@pytest.fixture(scope="module")
def server(live: tuple[str, str]) -> str:
    return live[0]


def test_eval_compares_every_decoder(server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["eval", "--server", server, "--tasks", "arithmetic:3,humaneval:2", "--max-tokens", "8"]
    args += [a for d in DECODERS for a in ("--decoders", d)]
    assert main([*args, "--out", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    doc = json.loads((tmp_path / "result.json").read_text())
    assert len(doc["rows"]) == len(DECODERS) * 5
    assert all(r["error"] is None for r in doc["rows"])
    labels = {s["decoder"] for s in doc["summary"]}
    assert labels == {"standard", "temperature(alpha=4)", "power_mcmc(alpha=4,block_size=4,mcmc_steps=1)", "distilled"}
    for s in doc["summary"]:
        assert s["n"] in (3, 2) and 0.0 <= s["accuracy"] <= 1.0
        assert s["self_reward_mean"] < 0 and s["engine_tokens_mean"] > 0 and s["latency_p95_s"] >= s["latency_p50_s"]
    mcmc = next(s for s in doc["summary"] if s["decoder"].startswith("power_mcmc") and s["task_set"] == "arithmetic")
    std = next(s for s in doc["summary"] if s["decoder"] == "standard" and s["task_set"] == "arithmetic")
    assert mcmc["engine_tokens_mean"] > std["engine_tokens_mean"]
    for name in ("arithmetic", "humaneval"):
        assert (tmp_path / f"{name}_reward_vs_cost.png").read_bytes()[:4] == b"\x89PNG"
        assert f"| {name} | distilled |" in out
    # the table relative to standard, and each decoder's self-reward paired with standard's
    assert "relative to standard:" in out and "| arithmetic | standard | " in out.split("relative to standard:")[1]
    assert (
        "arithmetic: power_mcmc(alpha=4,block_size=4,mcmc_steps=1) minus standard, self-reward paired by task:" in out
    )


def test_eval_refuses_an_unknown_decoder(server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["eval", "--server", server, "--tasks", "arithmetic:1", "--decoders", "nope", "--out", str(tmp_path)]
    assert main([*args, "--no-progress"]) == 2
    assert "no decoder 'nope'" in capsys.readouterr().err


def test_teacher_over_http(live: tuple[str, str], tmp_path: Path) -> None:
    """``distill teacher --server``: prompts go as token ids, ids come back re-tokenised and
    confirmed against the response's per-token strings; the self-reward is the server's."""
    url, base = live
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "a", "messages": [{"role": "user", "content": "What is 2 + 3?"}]}\n{"prompt": "x"}\n')
    out = tmp_path / "samples.jsonl"
    args = ["distill", "teacher", "--prompts", str(prompts), "--out", str(out), "--server", url, "--tokenizer", base]
    args += ["--param", "block_size=4", "--param", "mcmc_steps=1", "--max-tokens", "6", "--no-progress"]
    assert main(args) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt_id"] for r in sorted(records, key=lambda r: r["prompt_id"])] == ["2", "a"]
    for r in records:
        assert r["source"] == url and r["decoder"] == "power_mcmc" and r["params"]["block_size"] == 4
        assert r["base"]["model"] == "base" and r["self_reward"]["sum_logprob"] < 0
        assert r["cost"]["tokens_generated"] >= 1 and 1 <= len(r["completion_ids"]) <= 6
    assert all(r["ids_exact"] for r in records)
    assert main(args) == 0  # nothing left to draw
    assert len(out.read_text().splitlines()) == 2


def test_teacher_over_http_reports_a_refused_request(
    live: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, base = live
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "x"}\n')
    args = ["distill", "teacher", "--prompts", str(prompts), "--out", str(tmp_path / "s.jsonl"), "--server", url]
    # A budget beyond the server's context: the server answers 400 and the stage says so.
    assert main([*args, "--tokenizer", base, "--max-tokens", "5000", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the server answered 400") and "Traceback" not in err
