"""The long-answer table's arithmetic (``benchmarks/long_answer_table.py``): batches counted once,
ratios against the baseline and against the same row at one request in flight."""

from __future__ import annotations

import pytest
from benchmarks.long_answer_table import Measured, markdown_table, seconds, tokens_per_second


def run(n_out: int, wall: float, batch: float | None = None, reward: float | None = -0.5) -> Measured:
    return Measured([1, 2], list(range(n_out)), wall, generated=n_out, other=3, batch_wall=batch, self_reward=reward)


def test_batches_are_counted_once() -> None:
    # two batches of 2 requests: 4 s and 6 s; each request's own latency is shorter or equal
    runs = [run(10, 3.0, 4.0), run(10, 4.0, 4.0), run(10, 6.0, 6.0), run(10, 5.0, 6.0)]
    assert seconds(runs) == 10.0
    assert tokens_per_second(runs) == pytest.approx(40 / 10)
    assert tokens_per_second([run(10, 2.0), run(20, 3.0)]) == pytest.approx(30 / 5)


def test_table_rows_and_ratios() -> None:
    results = {
        "baseline": [run(10, 5.0), run(10, 5.0)],  # 2 tokens/s
        "chain": [run(10, 1.0), run(10, 1.0)],  # 10 tokens/s
        "chain @2": [run(10, 1.5, 1.5), run(10, 1.5, 1.5)],  # 20 / 1.5 tokens/s
    }
    lines = markdown_table(results, "baseline", 2)
    base, chain, chain8 = (line.split(" | ") for line in lines[2:])
    assert base[:4] == ["| baseline", "1", "5.00", "2.00"]
    assert base[8] == "1.00x"
    assert chain[:2] == ["| chain", "1"] and chain[8] == "5.00x"
    assert chain8[:2] == ["| chain", "2"]
    assert chain8[3] == f"{20 / 1.5:.2f}"
    assert chain8[8] == f"{20 / 1.5 / 2:.2f}x"
    assert chain8[9].strip(" |") == f"{20 / 1.5 / 10:.2f}x"
    assert chain8[4] == f"{1.5 / 20 * 1e3:.1f} ms"  # batch seconds per generated token
    assert chain[5] == "10 + 3" and chain[6] == "-0.500"


def test_missing_values_print_as_dashes() -> None:
    lines = markdown_table({"baseline": [run(0, 1.0, reward=None)]}, "baseline", 8)
    assert "| - |" in lines[2]
    assert "nan" not in lines[2]
