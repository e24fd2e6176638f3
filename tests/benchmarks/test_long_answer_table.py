"""The long-answer table's arithmetic (``benchmarks/long_answer_table.py``): batches counted once,
ratios against the baseline and against the same row at one request in flight."""

from __future__ import annotations

import pytest
from benchmarks.long_answer_table import Measured, in_flight_bound, markdown_table, seconds, tokens_per_second


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


def test_in_flight_ratio_compares_the_same_requests_alone() -> None:
    results = {
        "baseline": [run(10, 5.0)],
        "chain": [run(10, 1.0)],  # 10 tokens/s on the first request alone
        "chain @1": [run(10, 1.0), run(10, 3.0)],  # both requests alone: 5 tokens/s
        "chain @2": [run(10, 2.0, 2.0), run(10, 2.0, 2.0)],  # 10 tokens/s
    }
    lines = markdown_table(results, "baseline", 2)
    same, together = lines[4].split(" | "), lines[5].split(" | ")
    assert same[1] == "1 (the 2 in flight's requests)" and same[9].strip(" |") == ""
    assert together[9].strip(" |") == "2.00x"  # against the same requests alone, not 1.00x


def test_in_flight_bound() -> None:
    # 2 requests of 4 and 2 steps at one row each, a step of 2 rows costing 1.5 one row's:
    # alone 6 steps; together 2 steps of 2 rows and 2 of 1 row = 5 step-costs -> 6 / 5
    cost = {1: 1.0, 2: 1.5}
    assert in_flight_bound([4, 2], 1, cost) == pytest.approx(6 / 5)
    assert in_flight_bound([4, 4], 1, cost) == pytest.approx(8 / 6)
    # K = 2 rows each: 8 and 4 tokens are 4 and 2 steps of 2 rows (c = 1.5), then of 4 / 2 rows
    cost4 = {1: 1.0, 2: 1.5, 4: 2.0}
    assert in_flight_bound([8, 4], 2, cost4) == pytest.approx(6 * 1.5 / (2 * 2.0 + 2 * 1.5))
    assert in_flight_bound([3, 3, 3], 1, {1: 1.0, 4: 2.5}) == pytest.approx(9 / (3 * 2.0))  # interpolated
    with pytest.raises(ValueError):
        in_flight_bound([3, 3, 3], 1, {1: 1.0, 2: 1.5})  # 3 rows: nothing measured around them
