"""The targets of issue 14, item 4, from ``powerserve eval`` result files: the student against
``temperature`` (self-reward per token and accuracy) and against ``standard`` (cost), paired by
task, per task set.

    python scripts/student_targets.py eval-smc/arithmetic-cheap/result.json eval-smc/math500-cheap/result.json

Per task set, over the tasks both decoders answered without an error:
- self-reward per token: each decoder's mean, and the mean paired difference (student minus
  temperature) with its 95% normal half-width;
- accuracy: both counts, and the discordant pairs (student right and temperature wrong, the
  other way round), with the exact two-sided sign-test p-value on them (McNemar);
- cost: engine tokens per answer (generated + scored) over standard's, and generated tokens
  alone over standard's.
Then the student against every other decoder in the files, on the tasks both answered.
Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any

STUDENT, TEMPERATURE, STANDARD = "distilled", "temperature", "standard"


def by_decoder(rows: list[dict[str, Any]], name: str) -> dict[str, dict[str, Any]]:
    """The rows of the decoder whose label is ``name`` or starts with ``name(``, by task id."""
    return {
        r["task_id"]: r
        for r in rows
        if (r["decoder"] == name or r["decoder"].startswith(name + "(")) and r["error"] is None
    }


def per_token(r: dict[str, Any]) -> float:
    return float(r["self_reward_sum"]) / max(1, int(r["completion_tokens"]))


def sign_test(b: int, c: int) -> float:
    """Exact two-sided p-value of b successes out of b + c at probability 1/2."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def task_set_lines(task_set: str, rows: list[dict[str, Any]]) -> list[str]:
    student, temp, std = (by_decoder(rows, n) for n in (STUDENT, TEMPERATURE, STANDARD))
    paired = sorted(set(student) & set(temp))
    diffs = [per_token(student[t]) - per_token(temp[t]) for t in paired]
    b, c = discordant(student, temp, paired)
    both = sorted(set(student) & set(std))
    eng = statistics.fmean(student[t]["engine_tokens"] for t in both) / statistics.fmean(
        std[t]["engine_tokens"] for t in both
    )
    gen = statistics.fmean(student[t]["tokens_generated"] for t in both) / statistics.fmean(
        std[t]["tokens_generated"] for t in both
    )
    return [
        f"| {task_set} | self-reward per token >= temperature's | "
        f"{statistics.fmean(per_token(student[t]) for t in paired):.3f} vs "
        f"{statistics.fmean(per_token(temp[t]) for t in paired):.3f}; paired {_mean_hw(diffs, 3)} "
        f"({len(paired)} pairs) |",
        f"| {task_set} | accuracy >= temperature's | "
        f"{sum(bool(student[t]['correct']) for t in paired)}/{len(paired)} vs "
        f"{sum(bool(temp[t]['correct']) for t in paired)}/{len(paired)}; discordant {b} / {c}, "
        f"sign test p = {sign_test(b, c):.2f} |",
        f"| {task_set} | engine tokens <= 1.1x standard's | {eng:.2f}x (generated alone {gen:.2f}x; "
        f"{len(both)} pairs) |",
    ]


def versus_lines(task_set: str, rows: list[dict[str, Any]]) -> list[str]:
    """The student against every other decoder, on the tasks both answered: paired differences
    of self-reward per answer and per token (95% half-widths) and the discordant pairs."""
    student = by_decoder(rows, STUDENT)
    out = []
    for label in dict.fromkeys(r["decoder"] for r in rows):
        if label == STUDENT:
            continue
        other = by_decoder(rows, label)
        tasks = sorted(set(student) & set(other))
        if len(tasks) < 2:
            continue
        answer = [student[t]["self_reward_sum"] - other[t]["self_reward_sum"] for t in tasks]
        token = [per_token(student[t]) - per_token(other[t]) for t in tasks]
        b, c = discordant(student, other, tasks)
        out.append(
            f"| {task_set} | {label} | {len(tasks)} | {_mean_hw(answer, 2)} | {_mean_hw(token, 3)} | "
            f"{sum(bool(student[t]['correct']) for t in tasks)} vs {sum(bool(other[t]['correct']) for t in tasks)}"
            f" ({b} / {c}) |"
        )
    return out


def discordant(a: dict[str, dict[str, Any]], b: dict[str, dict[str, Any]], tasks: list[str]) -> tuple[int, int]:
    """Tasks only ``a`` answered correctly, and tasks only ``b`` did."""
    only_a = sum(1 for t in tasks if a[t]["correct"] and not b[t]["correct"])
    only_b = sum(1 for t in tasks if b[t]["correct"] and not a[t]["correct"])
    return only_a, only_b


def _mean_hw(xs: list[float], digits: int) -> str:
    """Mean of ``xs`` with its 95% normal half-width."""
    half = 1.96 * statistics.stdev(xs) / math.sqrt(len(xs))
    return f"{statistics.fmean(xs):+.{digits}f} ± {half:.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", type=Path, nargs="+", help="result.json files of powerserve eval")
    ap.add_argument("--plot", type=Path, default=None, help="also draw every file's decoders together, per task set")
    args = ap.parse_args()
    docs = [json.loads(path.read_text()) for path in args.results]
    rows = [r for doc in docs for r in doc["rows"]]
    if args.plot:
        from powerserve_client.eval.report import plot

        plot([s for doc in docs for s in doc["summary"]], args.plot)
    print("| task set | target | student vs the reference decoder |")
    print("|---|---|---|")
    task_sets = list(dict.fromkeys(r["task_set"] for r in rows))
    for task_set in task_sets:
        print("\n".join(task_set_lines(task_set, [r for r in rows if r["task_set"] == task_set])))
    print("\nThe student minus each decoder, paired by task (accuracy: student vs decoder, discordant pairs):\n")
    print("| task set | decoder | pairs | self-reward per answer | per token | accuracy |")
    print("|---|---|---|---|---|---|")
    for task_set in task_sets:
        print("\n".join(versus_lines(task_set, [r for r in rows if r["task_set"] == task_set])))


if __name__ == "__main__":
    main()
