"""The ``math500`` task set: 100 MATH500 problems, graded by ``math-verify``.

Data: the first 100 problems (file order) of MATH500 (Lightman et al., "Let's Verify Step by
Step", a 500-problem subset of Hendrycks et al.'s MATH test set; both released under the MIT
licence), copied into ``data/math500_first100.json`` so the package works offline.

Grading (:func:`grade_math`):

1. Gold: ``math_verify.parse("$" + answer + "$")``.
2. Prediction: the content of the answer's last ``\\boxed{...}`` (braces balanced), parsed as
   ``\\boxed{content}``; without a ``\\boxed{}``, the text after the last "answer is" or
   "answer:" (the final answer, stated), from which math-verify takes its expression. An
   answer with neither has no final answer and is wrong: a small model's cut-off reasoning is
   full of numbers, and taking the last of them would credit guesses (on the first 50 problems,
   2 of standard's 50 answers were "right" that way, neither stating an answer).
3. ``math_verify.verify(gold, prediction)``: symbolic and numeric equivalence, so ``1/2``,
   ``0.5`` and ``\\frac{1}{2}`` all match a gold ``\\frac{1}{2}``.

math-verify bounds each parse and verify with ``signal.alarm``, which only works on a process's
main thread, while the evaluation harness grades in worker threads. So grading runs in one
spawned worker process (in its main thread, with math-verify's own 5 s limits) and waits at most
:data:`GRADE_TIMEOUT_S`; a worker that overruns is killed and the answer counted wrong.
"""

from __future__ import annotations

import json
import re
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from importlib import resources
from multiprocessing import get_context
from typing import Any

from powerserve_client.eval.tasks import Task

DATA_FILE = "math500_first100.json"
MAX_PROBLEMS = 100
GRADE_TIMEOUT_S = 30.0
INSTRUCTION = "\n\nSolve the problem step by step, then put the final answer in \\boxed{}."


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` in ``text`` (nested braces kept), else None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i = start + len("\\boxed{")
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None  # unclosed: the answer was cut off inside the box


_STATED = re.compile(r"answer\s*(?:is|:)", re.IGNORECASE)


def final_statement(text: str) -> str | None:
    """The rest of the line after the last "answer is" / "answer:" in ``text``, else None."""
    matches = list(_STATED.finditer(text))
    if not matches:
        return None
    rest = text[matches[-1].end() :].strip().split("\n", 1)[0]
    return rest or None


def verify_answer(gold: str, text: str) -> tuple[bool, str]:
    """Steps 1-3 of the module docstring, in this process (must be its main thread)."""
    from math_verify import parse, verify

    gold_parsed = parse(f"${gold}$")
    boxed = last_boxed(text)
    stated = final_statement(text)
    if boxed is not None:
        pred = parse(f"\\boxed{{{boxed}}}")
    elif stated is not None:
        pred = parse(stated)
    else:
        return False, f"expected {gold}, found no \\boxed{{}} and no stated final answer"
    if not gold_parsed:
        return False, f"gold {gold!r} did not parse"
    if not pred:
        return False, f"expected {gold}, found no answer"
    ok = bool(verify(gold_parsed, pred))
    return ok, f"expected {gold}, got {pred[-1]}"


class _Worker:
    """One spawned grading process, recreated after a timeout."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None

    def grade(self, gold: str, text: str) -> tuple[bool, str]:
        with self._lock:  # one grade at a time: math-verify is fast, and one worker is enough
            if self._pool is None:
                self._pool = ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn"))
            future = self._pool.submit(verify_answer, gold, text)
            try:
                return future.result(timeout=GRADE_TIMEOUT_S)
            except FutureTimeout:
                self._kill()
                return False, f"grader timed out after {GRADE_TIMEOUT_S:.0f} s"

    def _kill(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        for proc in list(getattr(pool, "_processes", {}).values()):
            proc.kill()
        pool.shutdown(wait=False, cancel_futures=True)


_WORKER = _Worker()


def grade_math(gold: str, text: str) -> tuple[bool, str]:
    """Grade ``text`` against ``gold`` (see the module docstring); safe from any thread."""
    return _WORKER.grade(gold, text)


def load_problems() -> list[dict[str, Any]]:
    raw = resources.files("powerserve_client.eval").joinpath("data", DATA_FILE).read_text(encoding="utf-8")
    problems: list[dict[str, Any]] = json.loads(raw)
    return problems


def math500(n: int | None = None) -> list[Task]:
    """The first ``n`` (default and at most 100) shipped MATH500 problems as chat tasks."""
    n = MAX_PROBLEMS if n is None else n
    if not 1 <= n <= MAX_PROBLEMS:
        raise ValueError(f"math500:{n}: between 1 and {MAX_PROBLEMS} problems ship with powerserve")
    tasks = []
    for p in load_problems()[:n]:

        def grade(text: str, gold: str = p["answer"]) -> tuple[bool, str]:
            return grade_math(gold, text)

        tasks.append(
            Task(
                id=f"math500-{p['id']}",
                task_set="math500",
                messages=[{"role": "user", "content": p["problem"] + INSTRUCTION}],
                prompt=None,
                answer=p["answer"],
                grade=grade,
            )
        )
    return tasks
