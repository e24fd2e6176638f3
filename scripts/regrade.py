"""Regrade a ``powerserve eval`` result.json with the current graders, without asking the server again.

    python scripts/regrade.py RESULT_JSON [--out NEW_JSON]

A result file keeps every answer's text, so when a grader changes (as the math500 grader did:
it no longer credits the last expression of cut-off reasoning) the answers can be graded again.
Rows are matched to tasks by ``task_id`` within their task set. The tasks come from the run's
own ``task_sets`` counts. ``correct``, ``why`` and the summaries are rewritten, and
``run.regraded`` records that it happened. Everything else (texts, tokens, self-reward,
latencies) is kept.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from powerserve_client.eval.report import relative_table, summarise, table, write_json
from powerserve_client.eval.run import Row
from powerserve_client.eval.tasks import TASK_SETS


def regrade(doc: dict[str, object]) -> tuple[dict[str, object], list[dict[str, object]], list[Row]]:
    run = dict(doc["run"])  # type: ignore[call-overload]
    counts: dict[str, int] = dict(run["task_sets"])
    tasks = {(name, t.id): t for name, n in counts.items() for t in TASK_SETS[name](n)}
    rows = []
    for raw in doc["rows"]:  # type: ignore[attr-defined]
        fields = {k: v for k, v in raw.items() if k != "engine_tokens"}
        row = Row(**fields)
        if row.error is None:
            row.correct, row.why = tasks[(row.task_set, row.task_id)].grade(row.text)
        rows.append(row)
    run["regraded"] = True
    return run, summarise(rows), rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("result", type=Path)
    ap.add_argument("--out", type=Path, default=None, help="default: overwrite RESULT_JSON")
    ns = ap.parse_args(argv)
    run, summaries, rows = regrade(json.loads(ns.result.read_text()))
    write_json(ns.out or ns.result, run, summaries, rows)
    print(table(summaries))
    print()
    print(relative_table(summaries))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
