"""Every power sampler against ``standard`` on the embedded model, in one run (issue 7).

Starts ``powerserve serve`` (torch engine by default) and asks the arithmetic set of the
evaluation harness with each decoder: the same problems, seeds (seed + task index) and token
budget. Decoders take turns chunk by chunk (a chunk of problems per decoder, the order rotating
every chunk) so machine noise falls on all of them alike. One request at a time by default, so
wall times are per answer and clean.

Prints, per decoder: server wall time and engine tokens per answer as multiples of
``standard``'s, self-reward (log p of the answer under the base model) and accuracy; then the
self-reward differences paired by problem, and whether ``power_smc`` meets its target (at most
3x the wall time of ``standard``, at least the self-reward of ``power_mcmc``). Writes the
harness's result.json and plot to ``--out``.

    .venv/bin/python benchmarks/bench_decoders.py --tasks 40 --max-tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import platform
import sys
import time
from pathlib import Path

from tqdm import tqdm

from powerserve.testing import ServerProcess
from powerserve_client.decoders import decoder_label, parse_decoder
from powerserve_client.eval.report import paired_reward, plot, relative_table, summarise, table, write_json
from powerserve_client.eval.run import EvalConfig, Row, evaluate
from powerserve_client.eval.tasks import arithmetic

DECODERS = (
    "standard",
    "temperature:alpha=4",
    "power_mcmc:alpha=4,block_size=16,mcmc_steps=2",
    "power_smc:alpha=4,particles=8",
    "power_smc:alpha=4",
    "power_lookahead:alpha=4,top_k=4,rollouts=4",
)


def label(spec: str) -> str:
    return decoder_label(parse_decoder(spec))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=40, help="arithmetic problems (the harness's set, seed 1234)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--decoders", nargs="+", default=list(DECODERS), help="specs name[:key=value,...]")
    ap.add_argument("--engine", default="torch", choices=["torch", "vllm"])
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--chunk", type=int, default=4, help="problems per decoder per turn")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("bench-results/decoders"))
    args = ap.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    tasks = arithmetic(args.tasks)
    # Admission weighs a request by its worst-case cost multiplier; lift it so that the
    # expensive samplers are measured, not queued behind a budget.
    server = ServerProcess(
        model=None,
        engine=args.engine,
        extra_args=["--max-running-weight", "1000000", "--max-queued-weight", "1000000"],
        log_path=args.out / "server.log",
    )
    rows: list[Row] = []
    started = time.perf_counter()
    try:
        server.wait_ready(900)
        base = EvalConfig(server=server.base, decoders=(), max_tokens={"arithmetic": args.max_tokens})
        for spec in args.decoders:  # warm-up, not counted: first-call costs of every code path
            warm = dataclasses.replace(base, decoders=(spec,), max_tokens={"arithmetic": 8})
            asyncio.run(evaluate(warm, {"arithmetic": tasks[:1]}))
        chunks = [range(i, min(i + args.chunk, len(tasks))) for i in range(0, len(tasks), args.chunk)]
        with tqdm(total=len(tasks) * len(args.decoders), desc="answers", unit="answer", file=sys.stderr) as bar:
            for c, chunk in enumerate(chunks):
                order = args.decoders[c % len(args.decoders) :] + args.decoders[: c % len(args.decoders)]
                for spec in order:
                    cfg = dataclasses.replace(
                        base, decoders=(spec,), seed=args.seed + chunk.start, concurrency=args.concurrency
                    )
                    got, _ = asyncio.run(
                        evaluate(cfg, {"arithmetic": tasks[chunk.start : chunk.stop]}, lambda _r: bar.update(1))
                    )
                    rows += got
    finally:
        server.kill()
    wall = time.perf_counter() - started

    order = {label(spec): i for i, spec in enumerate(args.decoders)}
    rows.sort(key=lambda r: (order.get(r.decoder, len(order)), int(r.task_id.rsplit("-", 1)[-1])))
    summaries = summarise(rows)
    run = {
        "engine": args.engine,
        "tasks": args.tasks,
        "max_tokens": args.max_tokens,
        "decoders": args.decoders,
        "concurrency": args.concurrency,
        "seed": args.seed,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "wall_s": wall,
    }
    write_json(args.out / "result.json", run, summaries, rows)
    plot(summaries, args.out)

    print(
        f"\nmachine: {run['machine']}; engine {args.engine}; {args.tasks} arithmetic problems, max_tokens "
        f"{args.max_tokens}, {args.concurrency} request(s) in flight, seed {args.seed} + task index; "
        f"total {wall:.0f} s\n"
    )
    print(relative_table(summaries, "standard"))
    print()
    print(table(summaries))
    print()
    labels = [label(spec) for spec in args.decoders]
    pairs = [(a, "standard") for a in labels if a != "standard"]
    mcmc = next((x for x in labels if x.startswith("power_mcmc")), None)
    pairs += [(a, mcmc) for a in labels if mcmc and a.startswith(("power_smc", "power_lookahead"))]
    diffs = {(a, b): paired_reward(rows, a, b, "arithmetic") for a, b in pairs}
    for (a, b), diff in diffs.items():
        if diff is not None:
            print(
                f"- {a} minus {b}: self-reward {diff['mean']:+.2f} ± {diff['half_width_95']:.2f} "
                f"(95%, {diff['pairs']} problems)"
            )
    std = next((s for s in summaries if s["decoder"] == "standard"), None)
    for s in summaries:
        if not s["decoder"].startswith("power_smc") or std is None or mcmc is None:
            continue
        ratio = s["server_wall_mean_s"] / std["server_wall_mean_s"]
        diff = diffs[(s["decoder"], mcmc)]
        if diff is None:
            verdict = "no pairs"
        elif diff["mean"] >= 0:
            verdict = "met: mean at or above power_mcmc's"
        elif diff["mean"] + diff["half_width_95"] >= 0:
            verdict = "not met on the mean, though not significantly below power_mcmc at 95%"
        else:
            verdict = "not met: significantly below power_mcmc at 95%"
        shown = "" if diff is None else f"{diff['mean']:+.2f} ± {diff['half_width_95']:.2f}, "
        print(
            f"- target for {s['decoder']}: wall {ratio:.2f}x standard ({'met' if ratio <= 3 else 'not met'}: <= 3x); "
            f"self-reward vs {mcmc}: {shown}{verdict}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
