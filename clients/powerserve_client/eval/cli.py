"""``powerserve eval`` (also ``python -m powerserve_client.eval``)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", default="http://127.0.0.1:8000", help="base URL of a running powerserve")
    p.add_argument("--api-key", default=os.environ.get("POWERSERVE_API_KEY"))
    p.add_argument(
        "--tasks",
        default="arithmetic:50",
        help="task sets, e.g. arithmetic:50,humaneval:20,math500:100 (name[:first N])",
    )
    p.add_argument(
        "--decoders",
        default=None,
        help="a decoder spec name[:key=value,...]; repeat the flag or separate specs with ';'; default: every "
        "available decoder with its defaults",
        action="append",
    )
    p.add_argument("--max-tokens", type=int, default=None, help="max_tokens for every task set (default per set)")
    p.add_argument("--seed", type=int, default=0, help="task i is asked with seed + i")
    p.add_argument("--concurrency", type=int, default=1, help="requests in flight (1 keeps latencies clean)")
    p.add_argument("--out", type=Path, default=Path("eval-results"), help="directory for result.json and plots")
    p.add_argument(
        "--baseline",
        default="standard",
        help="decoder the relative table divides by (a label or a decoder name; default: standard)",
    )
    p.add_argument("--no-progress", action="store_true")


def add_parser(sub: Any) -> None:
    p = sub.add_parser("eval", help="compare decoders on task sets against a running server")
    _arguments(p)
    p.set_defaults(func=run_eval_cmd)


def _decoder_specs(values: list[str] | None) -> tuple[str, ...]:
    specs: list[str] = []
    for value in values or []:
        specs.extend(s.strip() for s in value.split(";") if s.strip())
    return tuple(specs)


def run_eval_cmd(ns: argparse.Namespace) -> int:
    from powerserve_client.eval.report import (
        baseline_summary,
        paired_reward,
        plot,
        relative_table,
        summarise,
        table,
        write_json,
    )
    from powerserve_client.eval.run import DEFAULT_MAX_TOKENS, EvalConfig, evaluate
    from powerserve_client.eval.tasks import load_task_sets

    try:
        task_sets = load_task_sets(ns.tasks)
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    max_tokens = {s: ns.max_tokens for s in task_sets} if ns.max_tokens else dict(DEFAULT_MAX_TOKENS)
    cfg = EvalConfig(
        server=ns.server,
        decoders=_decoder_specs(ns.decoders),
        api_key=ns.api_key,
        max_tokens=max_tokens,
        seed=ns.seed,
        concurrency=ns.concurrency,
    )
    total = sum(len(t) for t in task_sets.values()) * max(1, len(cfg.decoders))
    with tqdm(total=total if cfg.decoders else None, desc="eval", unit="answer", disable=ns.no_progress) as bar:
        try:
            rows, run = asyncio.run(evaluate(cfg, task_sets, on_row=lambda _r: bar.update(1)))
        except (ValueError, RuntimeError, OSError, httpx.HTTPError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted: no result written", file=sys.stderr)
            return 130
    summaries = summarise(rows)
    write_json(ns.out / "result.json", run, summaries, rows)
    plots = plot(summaries, ns.out)
    print(table(summaries))
    print()
    print(f"relative to {ns.baseline}:")
    print(relative_table(summaries, ns.baseline))
    for s in summaries:
        found = baseline_summary(summaries, s["task_set"], ns.baseline)
        if found is None or s["decoder"] == found["decoder"]:
            continue
        base = found["decoder"]
        diff = paired_reward(rows, s["decoder"], base, s["task_set"])
        if diff is not None:
            print(
                f"{s['task_set']}: {s['decoder']} minus {base}, self-reward paired by task: "
                f"{diff['mean']:+.2f} ± {diff['half_width_95']:.2f} (95%, {diff['pairs']} pairs)"
            )
    print(json.dumps({"result": str(ns.out / "result.json"), "plots": [str(p) for p in plots]}))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="powerserve-eval", description=__doc__)
    _arguments(parser)
    return run_eval_cmd(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
