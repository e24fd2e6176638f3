"""The math500 task set: shipped data, answer extraction and math-verify grading."""

from __future__ import annotations

import asyncio

import pytest

from powerserve_client.eval.math500 import MAX_PROBLEMS, grade_math, last_boxed, math500
from powerserve_client.eval.tasks import load_task_sets

pytest.importorskip("math_verify", reason="math-verify is a dependency of powerserve (pip install -e .)")


def test_the_task_set_ships_100_distinct_problems_and_refuses_more() -> None:
    tasks = load_task_sets("math500:100")["math500"]
    assert len(tasks) == MAX_PROBLEMS == len({t.id for t in tasks})
    assert tasks[0].messages is not None and "polar coordinates" in tasks[0].messages[0]["content"]
    assert "\\boxed{}" in tasks[0].messages[0]["content"]
    assert [t.id for t in math500(3)] == [t.id for t in tasks[:3]]
    with pytest.raises(ValueError, match="between 1 and 100"):
        math500(101)


@pytest.mark.parametrize(
    ("text", "content"),
    [
        ("so \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
        ("\\boxed{3} first, then \\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("no box: 12", None),
        ("cut off \\boxed{\\frac{1}{", None),
    ],
)
def test_last_boxed_keeps_nested_braces(text: str, content: str | None) -> None:
    assert last_boxed(text) == content


@pytest.mark.parametrize(
    ("gold", "text", "correct"),
    [
        ("9", "196 = 2^2 * 7^2, so it has 3 * 3 = \\boxed{9} divisors.", True),
        ("9", "It has \\boxed{8} divisors.", False),
        # equivalent forms of one half, boxed or as the final answer
        ("\\frac{1}{2}", "The answer is \\boxed{0.5}.", True),
        ("\\frac{1}{2}", "The answer is \\boxed{1/2}.", True),
        ("0.5", "The answer is \\boxed{\\frac{1}{2}}.", True),
        ("\\frac{1}{2}", "So the answer is 1/2.", True),
        ("\\frac{1}{2}", "The final answer: $\\frac{1}{2}$\nThen 7 more.", True),
        # no box and no stated answer: cut-off reasoning is not credited for its last number
        ("12", "First 3 + 4 = 7, then 7 + 5 = 12", False),
        ("\\frac{1}{2}", "The answer is \\boxed{\\frac{1}{3}}.", False),
        # the last box counts, not an earlier one
        ("\\frac{14}{3}", "First \\boxed{14/3}, wait, no: \\boxed{5}.", False),
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "So $(r,\\theta) = \\boxed{(3, \\pi/2)}$.", True),
        ("p - q", "\\boxed{p-q}", True),
        ("9", "I do not know.", False),
    ],
)
def test_grade_math(gold: str, text: str, correct: bool) -> None:
    ok, why = grade_math(gold, text)
    assert ok is correct, why


def test_a_task_grades_from_worker_threads() -> None:
    """The harness grades with ``asyncio.to_thread``: math-verify's signal-based limits need the
    worker process, so grading from a thread must work (it raised ValueError in-thread)."""
    task = math500(4)[3]  # "How many positive whole-number divisors does 196 have?" -> 9
    assert task.answer == "9"

    async def both() -> list[tuple[bool, str]]:
        return list(await asyncio.gather(*(asyncio.to_thread(task.grade, t) for t in ("\\boxed{9}", "\\boxed{7}"))))

    (right, _), (wrong, _) = asyncio.run(both())
    assert right and not wrong
