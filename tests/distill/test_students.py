"""Students by name (``--distilled NAME=PATH``): an unmerged LoRA adapter and a full checkpoint
side by side on a tiny base (torch engine), chosen per request by the ``student`` parameter or
the ``<model>:distilled:NAME`` alias; an adapter made for another base stops the start-up.
(The same adapter on the vLLM engine: tests/e2e/test_distilled_lora.py.)"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from powerserve.app import create_app
from powerserve.cli import main
from powerserve.distill.manifest import read_manifest
from powerserve.distill.records import data_sha256
from powerserve.distill.students import StudentError, lora_modules, lora_rank, parse_spec, read_specs
from powerserve.engine.torch_engine import TorchEngine
from powerserve.settings import Settings

TRAIN = ["--max-steps", "2", "--batch-size", "4", "--lr", "5e-2", "--no-progress"]


@pytest.fixture(scope="module")
def adapter(teacher_samples: Path, tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("adapter") / "sharp"
    args = ["distill", "train", "--samples", str(teacher_samples), "--base", str(tiny_base), "--out", str(out)]
    assert main([*args, "--lora", "--lora-r", "4", *TRAIN]) == 0
    return out


@pytest.fixture(scope="module")
def full(teacher_samples: Path, tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("full") / "full"
    args = ["distill", "train", "--samples", str(teacher_samples), "--base", str(tiny_base), "--out", str(out)]
    assert main([*args, *TRAIN]) == 0
    return out


@pytest.fixture(scope="module")
def client(adapter: Path, full: Path, tiny_base: Path) -> Iterator[TestClient]:
    engine = TorchEngine.load(str(tiny_base), model_name="tiny", max_model_len=256)
    settings = Settings(
        model=str(tiny_base), distilled=[f"sharp={adapter}", f"big={full}"], default_max_tokens=6, max_tokens_limit=16
    )
    with TestClient(create_app(settings, engine=engine), raise_server_exceptions=False) as c:
        yield c


def test_lora_training_keeps_the_adapter_with_a_manifest(adapter: Path, tiny_base: Path, teacher_samples: Path) -> None:
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["base_model_name_or_path"] == str(tiny_base)
    assert (adapter / "adapter_model.safetensors").is_file() and not (adapter / "model.safetensors").exists()
    student = read_manifest(adapter).student
    assert student is not None and student.kind == "lora" and student.lora_r == 4
    assert student.base_checkpoint == str(tiny_base) and student.alpha == 4.0
    assert student.teacher_decoder == "power_mcmc" and student.data_sha256 == data_sha256(teacher_samples)


def test_spec_parsing() -> None:
    assert parse_spec("a=/x/y") == ("a", Path("/x/y"))
    assert parse_spec("/x/a=b") == (None, Path("/x/a=b"))
    assert parse_spec("ckpt") == (None, Path("ckpt"))
    with pytest.raises(StudentError, match="letters"):
        parse_spec("a:b=/x")
    with pytest.raises(StudentError, match="two students"):
        read_specs(["s=/x", "s=/y"], lambda: "/base")


def test_decoders_and_models_list_the_students(client: TestClient, tiny_base: Path) -> None:
    card = next(d for d in client.get("/v1/decoders").json()["data"] if d["name"] == "distilled")
    assert card["available"] is True
    students = {s["name"]: s for s in card["students"]}
    assert list(students) == ["sharp", "big"]
    assert students["sharp"]["kind"] == "lora" and students["big"]["kind"] == "full"
    assert all(s["alpha"] == 4.0 and s["teacher"] == "power_mcmc" for s in students.values())
    assert card["parameters"]["properties"]["student"]["anyOf"][0]["enum"] == ["sharp", "big"]
    models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert models["tiny:distilled:sharp"]["student"]["name"] == "sharp"
    assert "tiny:distilled:big" in models


def _labels(student: str) -> dict[str, str]:
    return {"decoder": f"distilled:{student}", "model": "tiny", "outcome": "success"}


def _count(student: str) -> float:
    return REGISTRY.get_sample_value("powerserve_requests_total", _labels(student)) or 0.0


def test_students_answer_by_field_and_alias_each_under_its_own_metric_label(client: TestClient) -> None:
    """Near-greedy answers (temperature 0.01, one seed): the field and the alias pick the same
    student, no choice picks the first one, and the two students answer differently. Each
    request counts under its own student's label."""
    body = {"prompt": [1, 2, 3, 4], "max_tokens": 6, "seed": 3, "temperature": 0.01}

    def ask(**extra: object) -> str:
        resp = client.post("/v1/completions", json={**body, **extra})
        assert resp.status_code == 200, resp.text
        out = resp.json()
        assert out["powerserve"]["self_reward"]["tokens"] == out["usage"]["completion_tokens"]
        return str(out["choices"][0]["text"])

    before = {s: _count(s) for s in ("sharp", "big")}
    sharp = ask(model="tiny", decoder={"name": "distilled", "student": "sharp"})
    big = ask(model="tiny", decoder={"name": "distilled", "student": "big"})
    assert ask(model="tiny:distilled:big") == big
    assert ask(model="tiny:distilled") == sharp
    assert sharp != big, "the LoRA student and the full student answer alike: is the student ignored?"
    assert _count("sharp") == before["sharp"] + 2 and _count("big") == before["big"] + 2


def test_an_unknown_student_is_a_400_listing_the_valid_ones(client: TestClient) -> None:
    for body in (
        {"model": "tiny", "prompt": "hi", "decoder": {"name": "distilled", "student": "nope"}},
        {"model": "tiny:distilled:nope", "prompt": "hi"},
    ):
        resp = client.post("/v1/completions", json=body)
        assert resp.status_code == 400, resp.text
        error = resp.json()["error"]
        assert "'sharp'" in error["message"] and "'big'" in error["message"]
        assert error["param"] == "decoder.student"
    resp = client.post(
        "/v1/completions",
        json={"model": "tiny:distilled:sharp", "prompt": "hi", "decoder": {"name": "distilled", "student": "big"}},
    )
    assert resp.status_code == 400 and "alias selects student 'sharp'" in resp.json()["error"]["message"]


def test_an_adapter_for_another_base_stops_the_start_up(adapter: Path, tiny_base: Path, tmp_path: Path) -> None:
    moved = tmp_path / "other-base-adapter"
    shutil.copytree(adapter, moved)
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "some-other-base")
    (moved / "adapter_config.json").write_text(json.dumps(config))
    engine = TorchEngine.load(str(tiny_base), model_name="tiny", max_model_len=64)
    settings = Settings(model=str(tiny_base), distilled=[f"x={moved}"])
    try:
        with pytest.raises(StudentError) as info, TestClient(create_app(settings, engine=engine)):
            pass
    finally:
        asyncio.run(engine.shutdown())
    message = str(info.value)
    assert "some-other-base" in message and str(tiny_base) in message and "trained on the base" in message


def test_an_adapter_on_the_output_head_is_refused(adapter: Path, tmp_path: Path) -> None:
    """vLLM's LoRA on the output head breaks the prompt log-probabilities of base scoring."""
    head = tmp_path / "head-adapter"
    shutil.copytree(adapter, head)
    config = json.loads((head / "adapter_config.json").read_text())
    config["target_modules"] = [*config["target_modules"], "lm_head"]
    (head / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(StudentError, match="lm_head"):
        read_specs([f"h={head}"], lambda: str(config["base_model_name_or_path"]))
    specs = read_specs([f"a={adapter}"], lambda: str(config["base_model_name_or_path"]))
    assert specs[0].kind == "lora" and "lm_head" not in (lora_modules(specs) or [])
    assert lora_rank(specs) == 8  # rank 4 rounds up to the smallest rank vLLM accepts
