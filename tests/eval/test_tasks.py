"""Task sets and verifiers: the generator is seeded and its answers exact; the HumanEval grader
runs the package's unit tests in a limited subprocess."""

from __future__ import annotations

import re

import pytest

from powerserve_client.eval.sandbox import check_program
from powerserve_client.eval.tasks import arithmetic, final_number, humaneval, load_task_sets


def test_arithmetic_is_reproducible_and_its_answers_are_right() -> None:
    tasks = arithmetic(40, seed=3)
    assert [t.messages for t in tasks] == [t.messages for t in arithmetic(40, seed=3)]
    assert [t.messages for t in tasks] != [t.messages for t in arithmetic(40, seed=4)]
    assert len({t.id for t in tasks}) == 40
    for t in tasks:
        assert t.messages is not None
        numbers = [int(x) for x in re.findall(r"\d+", t.messages[0]["content"])]
        text = t.messages[0]["content"]
        if "more and then gives" in text:
            expected = numbers[0] + numbers[1] - numbers[2]
        elif "gets" in text:
            expected = numbers[0] + numbers[1]
        elif "gives away" in text:
            expected = numbers[0] - numbers[1]
        else:
            expected = numbers[0] * numbers[1]
        assert int(t.answer) == expected
        assert t.grade(f"So the answer is {expected}.")[0]
        assert not t.grade(f"So the answer is {expected + 1}.")[0]


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("7 + 5 = 12.", 12.0),
        ("The answer is \\boxed{1,200} apples, not 3.", 1200.0),
        ("She has -3 left", -3.0),
        ("no number here", None),
    ],
)
def test_final_number(text: str, number: float | None) -> None:
    assert final_number(text) == number


def test_humaneval_grades_by_running_the_tests() -> None:
    tasks = humaneval(2)
    assert [t.id for t in tasks] == ["HumanEval/0", "HumanEval/1"]
    for t in tasks:
        assert t.prompt and t.messages is None and "\ndef " in t.stop
        assert t.grade(t.answer) == (True, "passed")
        assert t.grade("    return None\n") == (False, "failed")


def test_sandbox_limits_time_memory_and_destructive_calls(tmp_path: object) -> None:
    assert check_program("while True:\n    pass\n", timeout_s=1).status == "timeout"
    assert check_program("x = bytearray(8 * 2**30)\n", timeout_s=5).status == "failed"
    result = check_program("import os\nos.system('true')\n", timeout_s=5)
    assert result.status == "failed" and "NoneType" in result.detail


def test_task_set_specs() -> None:
    sets = load_task_sets("arithmetic:5,humaneval:1")
    assert {k: len(v) for k, v in sets.items()} == {"arithmetic": 5, "humaneval": 1}
    with pytest.raises(ValueError, match="unknown task set"):
        load_task_sets("gsm8k")
