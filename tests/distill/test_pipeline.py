"""The whole pipeline on a tiny checkpoint: teacher samples (power_mcmc, in-process), a few
steps of fine-tuning (full and LoRA), and the ``distilled`` decoder through the HTTP API with
its self-reward measured under the base model."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from powerserve.app import create_app
from powerserve.cli import main
from powerserve.distill.manifest import MANIFEST_NAME, read_manifest
from powerserve.distill.records import data_sha256
from powerserve.engine.base import EngineStats, SamplingSpec
from powerserve.engine.torch_engine import TorchEngine
from powerserve.model_store import is_complete
from powerserve.settings import Settings
from tests.distill.support import TEACHER_ARGS, read_lines, write_prompts

N_PROMPTS, PER_PROMPT = 4, 2


@pytest.fixture(scope="module")
def samples(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("teacher")
    prompts = write_prompts(work / "prompts.jsonl", N_PROMPTS)
    out = work / "samples.jsonl"
    args = ["distill", "teacher", "--prompts", str(prompts), "--out", str(out), "--model", str(tiny_base)]
    assert main([*args, *TEACHER_ARGS, "--samples-per-prompt", str(PER_PROMPT), "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def student(samples: Path, tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "student"
    args = ["distill", "train", "--samples", str(samples), "--base", str(tiny_base), "--out", str(out)]
    # A high learning rate so that three steps visibly move a tiny model away from its base.
    assert main([*args, "--max-steps", "3", "--batch-size", "4", "--lr", "5e-2", "--no-progress"]) == 0
    return out


def test_teacher_writes_one_complete_record_per_sample(samples: Path, tiny_base: Path) -> None:
    records = read_lines(samples)
    assert len(records) == N_PROMPTS * PER_PROMPT
    assert len({(r["prompt_id"], r["sample"]) for r in records}) == len(records)
    for r in records:
        assert r["decoder"] == "power_mcmc"
        assert r["params"]["alpha"] == 4.0 and r["params"]["block_size"] == 4 and r["params"]["mcmc_steps"] == 2
        assert 1 <= len(r["completion_ids"]) <= 8 and r["prompt_ids"]
        reward = r["self_reward"]
        assert reward["tokens"] == len(r["completion_ids"]) and reward["sum_logprob"] < 0
        assert r["cost"]["tokens_generated"] >= len(r["completion_ids"])
        assert r["base"]["model_type"] == "llama" and r["base"]["path"] == str(tiny_base)


def test_teacher_self_reward_is_the_base_log_probability(samples: Path, tiny_base: Path) -> None:
    engine = TorchEngine.load(str(tiny_base), model_name="tiny", max_model_len=256)
    try:
        for r in read_lines(samples)[:3]:
            logp = asyncio.run(engine.score(r["prompt_ids"], r["completion_ids"], EngineStats()))  # type: ignore[arg-type]
            assert math.isclose(math.fsum(logp), r["self_reward"]["sum_logprob"], abs_tol=1e-4)  # type: ignore[index]
    finally:
        asyncio.run(engine.shutdown())


def test_train_writes_a_complete_checkpoint_with_a_manifest(student: Path, samples: Path, tiny_base: Path) -> None:
    assert is_complete(student)
    assert (student / "config.json").is_file() and (student / "tokenizer.json").is_file()
    manifest = read_manifest(student)
    assert manifest.base.path == str(tiny_base) and manifest.base.model_type == "llama"
    assert manifest.teacher["decoder"] == "power_mcmc" and manifest.teacher["params"]["alpha"] == 4.0
    assert manifest.data["sha256"] == data_sha256(samples) and manifest.data["samples"] == N_PROMPTS * PER_PROMPT
    assert manifest.training["steps"] == 3 and manifest.training["lora"] is False
    assert manifest.final_loss is not None and math.isfinite(manifest.final_loss)
    assert len(manifest.loss_history) == 3
    assert not list(student.parent.glob(".student.*")), "no temporary directory is left behind"


def test_train_refuses_to_overwrite_a_finished_checkpoint(
    student: Path, samples: Path, tiny_base: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = (student / MANIFEST_NAME).read_text()
    args = ["distill", "train", "--samples", str(samples), "--base", str(tiny_base), "--out", str(student)]
    assert main([*args, "--max-steps", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "finished checkpoint" in err and "--overwrite" in err and "Traceback" not in err
    assert (student / MANIFEST_NAME).read_text() == before


def test_lora_training_with_merge_is_a_full_checkpoint(samples: Path, tiny_base: Path, tmp_path: Path) -> None:
    out = tmp_path / "lora"
    args = ["distill", "train", "--samples", str(samples), "--base", str(tiny_base), "--out", str(out), "--lora"]
    assert main([*args, "--merge", "--lora-r", "4", "--max-steps", "2", "--batch-size", "4", "--no-progress"]) == 0
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["training"]["lora"] is True and manifest["training"]["lora_r"] == 4
    assert manifest["student"]["kind"] == "full"
    assert not (out / "adapter_config.json").exists()
    engine = TorchEngine.load(str(out), model_name="lora", max_model_len=64)  # loads as a plain model
    asyncio.run(engine.shutdown())


def _client(base: Path, distilled: Path | None) -> tuple[TestClient, TorchEngine]:
    engine = TorchEngine.load(str(base), model_name="tiny", max_model_len=256)
    settings = Settings(distilled=distilled, default_max_tokens=8, max_tokens_limit=32)
    return TestClient(create_app(settings, engine=engine), raise_server_exceptions=False), engine


def test_distilled_decoder_samples_the_student_and_scores_under_the_base(student: Path, tiny_base: Path) -> None:
    client, base = _client(tiny_base, student)
    prompt = [1, 2, 3, 4]
    with client:
        decoders = {d["name"]: d for d in client.get("/v1/decoders").json()["data"]}
        assert decoders["distilled"]["available"] is True
        resp = client.post(
            "/v1/completions",
            json={"model": "tiny", "prompt": prompt, "max_tokens": 12, "seed": 5, "decoder": "distilled"},
        )
        assert resp.status_code == 200, resp.text
        info: dict[str, Any] = resp.json()["powerserve"]
        student_engine = client.app.state.powerserve.decoders["distilled"].student  # type: ignore[attr-defined]

        async def replay() -> tuple[list[int], list[float], list[float]]:
            steps = [s async for s in student_engine.generate(prompt, SamplingSpec(12, seed=5), EngineStats())]
            ids = [s.token_id for s in steps]
            return ids, await base.score(prompt, ids, EngineStats()), [s.logp for s in steps]

        ids, base_logp, student_logp = asyncio.run(replay())
    n = len(ids)
    assert info["decoder"] == "distilled" and info["self_reward"]["tokens"] == n
    # Standard cost: one student token per answer token; the base scores the answer once.
    assert info["tokens_generated"] == n and info["tokens_scored"] == n
    assert math.isclose(info["self_reward"]["sum_logprob"], math.fsum(base_logp), abs_tol=1e-4)
    assert not math.isclose(math.fsum(base_logp), math.fsum(student_logp), abs_tol=1e-2), "student == base?"


def test_distilled_without_a_checkpoint_is_a_400_saying_how_to_make_one(tiny_base: Path) -> None:
    client, _ = _client(tiny_base, None)
    with client:
        resp = client.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "decoder": "distilled"})
        assert resp.status_code == 400
        message = resp.json()["error"]["message"]
        assert "powerserve distill teacher" in message and "--distilled" in message
        card = next(d for d in client.get("/v1/decoders").json()["data"] if d["name"] == "distilled")
        assert card["available"] is False and "powerserve distill" in card["unavailable_reason"]


def test_distilled_with_a_bad_path_is_unavailable_with_the_reason(tiny_base: Path, tmp_path: Path) -> None:
    client, _ = _client(tiny_base, tmp_path / "nowhere")
    with client:
        resp = client.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "decoder": "distilled"})
        assert resp.status_code == 400 and "not a checkpoint directory" in resp.json()["error"]["message"]
        assert client.post("/v1/completions", json={"model": "tiny", "prompt": "hi"}).status_code == 200
