"""The teacher stage survives interruption: stopping a real ``powerserve distill teacher``
process (SIGTERM, handled like Ctrl-C) keeps every line written, a partial last line (a crash
mid-write) is dropped, and a rerun draws exactly the missing samples -- the same ones an
uninterrupted run draws, since seeds derive from (seed, prompt id, sample index)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from powerserve.cli import main
from tests.distill.support import TEACHER_ARGS, read_lines, write_prompts

N_PROMPTS = 16
START_TIMEOUT_S = 240


def _teacher_args(prompts: Path, out: Path, base: Path) -> list[str]:
    return ["distill", "teacher", "--prompts", str(prompts), "--out", str(out), "--model", str(base), *TEACHER_ARGS]


def _slow_teacher(prompts: Path, out: Path, base: Path, log: Path) -> subprocess.Popen[bytes]:
    args = [*_teacher_args(prompts, out, base), "--no-progress"]
    with log.open("wb") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "powerserve.cli", *args],
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def test_interrupted_teacher_resumes_without_duplicates(tiny_base: Path, tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path / "prompts.jsonl", N_PROMPTS)
    reference = tmp_path / "reference.jsonl"
    assert main([*_teacher_args(prompts, reference, tiny_base), "--no-progress"]) == 0

    out, log = tmp_path / "samples.jsonl", tmp_path / "teacher.log"
    proc = _slow_teacher(prompts, out, tiny_base, log)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"the teacher ended before it could be interrupted:\n{log.read_text()}"
    # SIGTERM takes the Ctrl-C path (KeyboardInterrupt); SIGINT itself may be ignored by a
    # process started in the background of a non-interactive shell, as CI may do.
    os.killpg(proc.pid, signal.SIGTERM)
    code = proc.wait(timeout=60)
    written = read_lines(out)
    assert 2 <= len(written) < N_PROMPTS
    assert code == 130, log.read_text()
    assert "rerun the same command" in log.read_text()

    # A crash in the middle of a write leaves a line without its newline.
    with out.open("ab") as fh:
        fh.write(b'{"prompt_id": "arith-7-5", "sample": 0, "prompt_ids": [1, 2')
    assert main([*_teacher_args(prompts, out, tiny_base), "--no-progress"]) == 0

    text = out.read_text()
    assert text.endswith("\n")
    records = [json.loads(line) for line in text.splitlines()]
    keys = [(r["prompt_id"], r["sample"]) for r in records]
    assert len(keys) == len(set(keys)) == N_PROMPTS
    expected = {(r["prompt_id"], r["sample"]): r["completion_ids"] for r in read_lines(reference)}
    assert {(r["prompt_id"], r["sample"]): r["completion_ids"] for r in records} == expected

    # A third run has nothing left to do.
    assert main([*_teacher_args(prompts, out, tiny_base), "--no-progress"]) == 0
    assert out.read_text() == text
