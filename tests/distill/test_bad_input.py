"""Bad input to ``powerserve distill``: a clear one-line message, exit status 2, no traceback,
and nothing overwritten."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from powerserve.cli import main
from tests.distill.support import TEACHER_ARGS, write_prompts


def _fails(args: list[str], capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    assert main([*args, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    return err


def _teacher(prompts: Path, out: Path, base: Path) -> list[str]:
    return ["distill", "teacher", "--prompts", str(prompts), "--out", str(out), "--model", str(base), *TEACHER_ARGS]


def _train(samples: Path, base: Path, out: Path) -> list[str]:
    return ["distill", "train", "--samples", str(samples), "--base", str(base), "--out", str(out), "--max-steps", "1"]


@pytest.fixture(scope="module")
def good_samples(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("good")
    out = work / "samples.jsonl"
    assert main([*_teacher(write_prompts(work / "p.jsonl", 2), out, tiny_base), "--no-progress"]) == 0
    return out


def test_missing_prompt_file(tiny_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fails(_teacher(tmp_path / "nope.jsonl", tmp_path / "s.jsonl", tiny_base), capsys, "nope.jsonl", "does not exist")


def test_malformed_prompt_line_is_named(tiny_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "fine"}\n{"prompt": "broken\n')
    _fails(_teacher(prompts, tmp_path / "s.jsonl", tiny_base), capsys, "p.jsonl:2", "malformed")
    prompts.write_text('{"prompt": "fine"}\n\n{"text": "no prompt field"}\n')
    _fails(_teacher(prompts, tmp_path / "s.jsonl", tiny_base), capsys, "p.jsonl:3", "'prompt'")
    assert not (tmp_path / "s.jsonl").exists()


def test_empty_prompt_set(tiny_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n\n")
    _fails(_teacher(prompts, tmp_path / "s.jsonl", tiny_base), capsys, "holds no prompts")


def test_unknown_decoder_and_bad_parameter(tiny_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prompts = write_prompts(tmp_path / "p.jsonl", 1)
    _fails([*_teacher(prompts, tmp_path / "s.jsonl", tiny_base), "--decoder", "nope"], capsys, "unknown decoder")
    _fails([*_teacher(prompts, tmp_path / "s.jsonl", tiny_base), "--alpha", "0.5"], capsys, "alpha")


def test_rerun_with_other_teacher_parameters_is_refused(
    good_samples: Path, tiny_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompts = write_prompts(tmp_path / "more.jsonl", 3, seed=99)  # new prompts: there is work to do
    _fails([*_teacher(prompts, good_samples, tiny_base), "--alpha", "2"], capsys, "use another --out")


def test_missing_empty_and_malformed_samples(
    good_samples: Path, tiny_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ckpt"
    _fails(_train(tmp_path / "none.jsonl", tiny_base, out), capsys, "does not exist")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    _fails(_train(empty, tiny_base, out), capsys, "holds no samples")
    lines = good_samples.read_text().splitlines()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(lines[0] + "\n{not json}\n" + lines[1] + "\n")
    _fails(_train(bad, tiny_base, out), capsys, "bad.jsonl:2", "malformed")
    record = json.loads(lines[0])
    del record["completion_ids"]
    bad.write_text(lines[0] + "\n" + json.dumps(record) + "\n")
    _fails(_train(bad, tiny_base, out), capsys, "bad.jsonl:2", "completion_ids")
    assert not out.exists()


def test_base_of_another_architecture(
    good_samples: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_base: Path
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=1, n_head=2)).save_pretrained(gpt2)
    tokenizer.save_pretrained(gpt2)
    _fails(_train(good_samples, gpt2, tmp_path / "ckpt"), capsys, "llama model", "gpt2 model")


def test_base_with_another_tokenizer(good_samples: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    record = json.loads(good_samples.read_text().splitlines()[0])
    record["base"]["tokenizer"] = "0123456789abcdef"
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps(record) + "\n")
    _fails(_train(other, Path(record["base"]["path"]), tmp_path / "ckpt"), capsys, "another tokenizer")


def test_not_a_checkpoint(good_samples: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty-dir").mkdir()
    _fails(_train(good_samples, tmp_path / "empty-dir", tmp_path / "ckpt"), capsys, "no config.json")


def test_non_empty_foreign_target_directory(
    good_samples: Path, tiny_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    _fails(_train(good_samples, tiny_base, target), capsys, "not empty")
    assert (target / "notes.txt").read_text() == "mine"
