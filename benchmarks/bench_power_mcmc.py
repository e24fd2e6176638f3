"""What ``power_mcmc`` costs on the embedded model, against a naive baseline, the engine's own
throughput floor and its concurrency, and what it buys in self-reward -- all in one run.

(a) Wall time per completion of ``power_mcmc`` through the :class:`Engine` interface (torch and
    vLLM engines, ``proposals`` K = 1 and more) vs a naive implementation in the style of
    the reference code: every proposal regenerated from the full prefix with transformers
    ``model.generate`` (do_sample, temperature 1/alpha, ``output_scores`` / ``output_logits``
    for log q / log p), no cache reuse across proposals. Same prompts, seeds, alpha, block
    size, steps and token budget. The naive baseline is the K = 1 chain: rows with K > 1 do K
    times the proposals per step (a different chain, which mixes faster), so compare them by
    wall time, not as equal work.
(b) The same runs against the floor set by the engine's single-stream throughput, measured in
    the same rounds: floor = tokens generated / generate rate + tokens scored / score rate.
(c) Aggregate throughput of ``power_mcmc`` through the HTTP server (``powerserve serve`` in a
    subprocess) with 1 and with 8 requests in flight, beside the same for plain sampling at
    temperature 1/alpha (the engine's own gain from batching: the bound for the chain's).
(d) Self-reward (mean log p per returned token) of ``standard``, ``temperature`` and
    ``power_mcmc`` on MATH500 prompts, through the same server.

Every side of a comparison runs in the same rounds, in rotating order, so machine noise hits
them alike; tables show medians over rounds (per completion: medians over prompts x rounds).

    .venv/bin/python benchmarks/bench_power_mcmc.py --max-tokens 64 --block-size 32 --mcmc-steps 4

Prints Markdown tables (paste them into docs/benchmarks.md); progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the server does: 2 cores, worker threads
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout keeps only the tables

import httpx
import numpy as np
import torch

from powerserve.decoders.base import DecodeRequest, OpenAISampling
from powerserve.decoders.power_mcmc import PowerMcmcDecoder, PowerMcmcParams, block_limits, log_acceptance
from powerserve.engine.base import Engine, EngineStats, SamplingSpec
from powerserve.testing import ServerProcess

ROOT = Path(__file__).resolve().parents[1]
MATH500 = ROOT.parent / "shared" / "data" / "MATH500.json"
MODEL = "SmolLM2-135M-Instruct"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def math_prompts(tokenizer: Any, n: int, offset: int = 0) -> list[list[int]]:
    """MATH500 problems in the reference prompt, wrapped in the model's chat template."""
    problems = json.loads(MATH500.read_text())[offset : offset + n]
    out = []
    for p in problems:
        text = (
            "Can you solve the following math problem? "
            + p["prompt"]
            + " Please reason step by step, and put your final answer within \\boxed{}."
        )
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
        out.append(list(tokenizer.encode(rendered, add_special_tokens=False)))
    return out


# --- the naive baseline: the reference code's style -------------------------------------------


@dataclass(slots=True)
class Run:
    """One completion: wall time and the engine work it took."""

    wall: float
    output: list[int]
    generated: int
    scored: int = 0
    extra: dict[str, float] = field(default_factory=dict)


def naive_power_mcmc(
    model: Any, prompt: list[int], eos: frozenset[int], max_tokens: int, params: PowerMcmcParams, seed: int
) -> Run:
    """The same chain algorithm (blocks, steps, acceptance with the length term), with each
    proposal regenerated from the full prefix by ``model.generate``, as the reference code does:
    a fresh KV cache per call, the prompt and prefix prefilled again every time."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    eos_ids = sorted(eos)

    def propose(prefix: list[int], limit: int) -> tuple[list[int], list[float], list[float]]:
        ids = torch.tensor([prompt + prefix])
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=limit - len(prefix),
            do_sample=True,
            temperature=1.0 / params.alpha,
            top_k=0,
            top_p=1.0,
            eos_token_id=eos_ids,
            pad_token_id=eos_ids[0],
            return_dict_in_generate=True,
            output_scores=True,
            output_logits=True,
        )
        new = out.sequences[0, ids.shape[1] :]
        idx = new[:, None]  # [n, 1]
        logq = torch.log_softmax(torch.cat(out.scores).double(), -1).gather(-1, idx)[:, 0]  # processed: q
        logp = torch.log_softmax(torch.cat(out.logits).double(), -1).gather(-1, idx)[:, 0]  # raw: p
        return new.tolist(), logp.tolist(), logq.tolist()

    t0 = time.perf_counter()
    x: list[int] = []
    lp: list[float] = []
    lq: list[float] = []
    generated = 0
    for limit in block_limits(max_tokens, params.block_size):
        if not (x and x[-1] in eos) and len(x) < limit:
            new, p, q = propose(x, limit)
            x, lp, lq, generated = x + new, lp + p, lq + q, generated + len(new)
        for _ in range(params.mcmc_steps):
            i = int(rng.integers(len(x)))
            new, p, q = propose(x[:i], limit)
            generated += len(new)
            log_a = log_acceptance(params.alpha, lp[i:], lq[i:], p, q, len(x), i + len(new))
            if log_a >= 0 or rng.random() < math.exp(log_a):
                x, lp, lq = x[:i] + new, lp[:i] + p, lq[:i] + q
        if x and x[-1] in eos:
            break
    return Run(time.perf_counter() - t0, x, generated)


# --- (a) and (b): through the Engine interface ---------------------------------------------


async def engine_power_mcmc(
    engine: Engine, prompt: list[int], max_tokens: int, params: PowerMcmcParams, seed: int
) -> Run:
    stats = EngineStats()
    request = DecodeRequest(tuple(prompt), max_tokens, seed, OpenAISampling(), params)
    t0 = time.perf_counter()
    out = [step.token_id async for step in PowerMcmcDecoder(engine).decode(request, stats)]
    return Run(time.perf_counter() - t0, out, stats.tokens_generated, stats.tokens_scored, dict(stats.extra))


async def engine_rates(
    engine: Engine, prompt: list[int], max_tokens: int, alpha: float, seed: int
) -> tuple[float, float]:
    """Single-stream generate tokens/s (temperature 1/alpha, as the proposals) and score tokens/s."""
    stats = EngineStats()
    spec = SamplingSpec(max_tokens=max_tokens, temperature=1.0 / alpha, seed=seed)
    t0 = time.perf_counter()
    ids = [s.token_id async for s in engine.generate(prompt, spec, stats)]
    gen_rate = len(ids) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    await engine.score(prompt, ids, stats)
    score_rate = len(ids) / (time.perf_counter() - t0)
    return gen_rate, score_rate


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


async def part_ab(args: argparse.Namespace, path: str, prompts: list[list[int]]) -> list[str]:
    from powerserve.engine.torch_engine import TorchEngine
    from powerserve.engine.vllm_engine import VllmEngine

    engines: dict[str, Engine] = {}
    log("loading the torch engine")
    torch_engine = TorchEngine.load(path, model_name=MODEL, max_model_len=1024)
    engines["torch"] = torch_engine
    if "vllm" in args.engines:
        log("starting the vLLM engine")
        engines["vllm"] = await VllmEngine.start(
            path,
            model_name=MODEL,
            max_model_len=1024,
            gpu_memory_utilization=args.mem,
            enforce_eager=args.enforce_eager,
        )
    if "torch" not in args.engines:
        engines.pop("torch")
    eos = torch_engine.eos_token_ids
    model = torch_engine.model  # the naive baseline runs the same weights (never at the same time)
    variants = {p: PowerMcmcParams(**args.mcmc, proposals=p) for p in args.parallel}

    # one warm-up of everything
    naive_power_mcmc(model, prompts[0], eos, 8, PowerMcmcParams(**{**args.mcmc, "block_size": 8}), 0)
    for engine in engines.values():
        await engine_power_mcmc(engine, prompts[0], 8, PowerMcmcParams(**{**args.mcmc, "block_size": 8}), 0)
        await engine_rates(engine, prompts[0], 8, args.alpha, 0)

    runs: dict[str, list[Run]] = {}
    rates: dict[str, list[tuple[float, float]]] = {}
    jobs: list[tuple[str, Callable[[list[int], int], Awaitable[Run]]]] = []

    async def naive(prompt: list[int], seed: int) -> Run:
        return naive_power_mcmc(model, prompt, eos, args.max_tokens, variants[1], seed)

    jobs.append(("naive (HF generate)", naive))

    def chain_job(engine: Engine, params: PowerMcmcParams) -> Callable[[list[int], int], Awaitable[Run]]:
        async def job(prompt: list[int], seed: int) -> Run:
            return await engine_power_mcmc(engine, prompt, args.max_tokens, params, seed)

        return job

    for name, engine in engines.items():
        for p, params in variants.items():
            jobs.append((f"{name}, proposals={p}", chain_job(engine, params)))

    for r in range(args.rounds):
        for j, prompt in enumerate(prompts):
            seed = 1000 * r + j
            shift = (r * len(prompts) + j) % len(jobs)
            for label, run_one in jobs[shift:] + jobs[:shift]:
                runs.setdefault(label, []).append(await run_one(prompt, seed))
            for name, engine in engines.items():
                rates.setdefault(name, []).append(await engine_rates(engine, prompt, args.max_tokens, args.alpha, seed))
        log(f"(a)/(b) round {r + 1}/{args.rounds} done")

    for engine in engines.values():
        await engine.shutdown()

    # the chain with P > 1 is the P = 1 chain: check it on the outputs
    same = {}
    for name in engines:
        base = runs[f"{name}, proposals=1"]
        for p in args.parallel[1:]:
            other = runs[f"{name}, proposals={p}"]
            same[(name, p)] = sum(a.output == b.output for a, b in zip(base, other, strict=True))

    naive_wall = median([run.wall for run in runs["naive (HF generate)"]])
    naive_per_token = median([run.wall / run.generated for run in runs["naive (HF generate)"]])
    floor_rates = {name: (median([g for g, _ in rs]), median([s for _, s in rs])) for name, rs in rates.items()}
    lines = [
        "| implementation | wall s / completion | engine tokens / completion (generated + scored) | "
        "discarded tokens | acceptance | naive / this (wall) | naive / this (s per generated token) | "
        "floor s | wall / floor |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, rs in runs.items():
        wall = median([run.wall for run in rs])
        tokens = median([run.generated + run.scored for run in rs])
        discarded = median([run.extra.get("tokens_discarded", 0.0) for run in rs])
        acc = [run.extra["acceptance_rate"] for run in rs if "acceptance_rate" in run.extra]
        per_token = median([run.wall / run.generated for run in rs])
        floor_txt = ratio_txt = "-"
        engine_name = label.split(",")[0]
        if engine_name in floor_rates:
            g, s = floor_rates[engine_name]
            floors = [run.generated / g + run.scored / s for run in rs]
            floor_txt = f"{median(floors):.2f}"
            ratio_txt = f"{median([run.wall / f for run, f in zip(rs, floors, strict=True)]):.2f}"
        acc_txt = f"{median(acc):.2f}" if acc else "-"
        lines.append(
            f"| {label} | {wall:.2f} | {tokens:.0f} | {discarded:.0f} | {acc_txt} | {naive_wall / wall:.2f}x | "
            f"{naive_per_token / per_token:.2f}x | {floor_txt} | {ratio_txt} |"
        )
    lines.append("")
    lines.append("| engine | single-stream generate tokens/s | score tokens/s |")
    lines.append("|---|---|---|")
    for name, (g, s) in floor_rates.items():
        lines.append(f"| {name} | {g:.1f} | {s:.1f} |")
    lines.append("")
    for (name, p), n_same in same.items():
        lines.append(
            f"{name}: proposals={p} returned the same tokens as proposals=1 "
            f"in {n_same}/{len(runs[f'{name}, proposals=1'])} completions (same seeds)."
        )
    return lines


# --- (c) and (d): through the HTTP server ---------------------------------------------------


def start_server(engine: str, port: int, args: argparse.Namespace, log_dir: Path) -> ServerProcess:
    """``powerserve serve`` on ``engine`` (soak.py's :class:`ServerProcess`), once it answers."""
    extra = ["--max-model-len", "1024"]
    # The default admission limits weigh a power_mcmc request by its worst-case cost multiplier
    # and would run one at a time: lift them, this measures the engine's concurrency.
    extra += ["--max-running-weight", "100000", "--max-queued-weight", "100000"]
    if engine == "vllm":
        extra += ["--gpu-memory-utilization", str(args.mem)]
        extra += ["--enforce-eager"] if args.enforce_eager else []
    server = ServerProcess(model=None, engine=engine, extra_args=extra, log_path=log_dir / f"{engine}.log", port=port)
    server.wait_ready(900)
    return server


async def http_batch(
    port: int, prompts: list[list[int]], seeds: list[int], max_tokens: int, body: dict[str, Any], concurrency: int
) -> tuple[float, list[dict[str, Any]]]:
    """Send one request per prompt, ``concurrency`` at a time; wall time and response bodies."""
    url = f"http://127.0.0.1:{port}/v1/completions"
    sem = asyncio.Semaphore(concurrency)
    out: list[dict[str, Any]] = [{} for _ in prompts]
    async with httpx.AsyncClient(timeout=1800) as http:

        async def one(i: int) -> None:
            async with sem:
                payload = {"model": MODEL, "prompt": prompts[i], "max_tokens": max_tokens, "seed": seeds[i], **body}
                resp = await http.post(url, json=payload)
                resp.raise_for_status()
                out[i] = resp.json()

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(len(prompts))))
        return time.perf_counter() - t0, out


def part_c(args: argparse.Namespace, ports: dict[str, int], prompts: list[list[int]]) -> tuple[list[str], str]:
    """Rounds over the engines' servers and ``proposals`` values, each with 1 and 8
    requests in flight; the table and the engine with the higher returned throughput at 8."""

    def body(p: int) -> dict[str, Any]:
        # p = 0: the reference row, plain sampling at 1/alpha (the chain's proposal) with the same
        # budget: how far the engine itself gains from 8 sequences in flight
        if p == 0:
            return {"decoder": {"name": "temperature", "alpha": args.alpha}}
        return {"decoder": {"name": "power_mcmc", **args.mcmc, "proposals": p}}

    for port in ports.values():
        asyncio.run(http_batch(port, prompts[:2], [0, 1], 8, body(1), 2))  # warm-up
    rows: dict[tuple[str, int, int], list[tuple[float, float, float]]] = {}
    variants = [0, *args.http_parallel]
    for r in range(args.rounds):
        for engine, port in ports.items():
            for p in variants:
                for conc in (1, 8) if r % 2 == 0 else (8, 1):
                    seeds = [1000 * r + j for j in range(len(prompts))]
                    wall, bodies = asyncio.run(http_batch(port, prompts, seeds, args.max_tokens, body(p), conc))
                    returned = sum(b["usage"]["completion_tokens"] for b in bodies)
                    work = sum(b["powerserve"]["tokens_generated"] + b["powerserve"]["tokens_scored"] for b in bodies)
                    lat = statistics.mean(b["powerserve"]["wall_time_s"] for b in bodies)
                    rows.setdefault((engine, p, conc), []).append((returned / wall, work / wall, lat))
        log(f"(c) round {r + 1}/{args.rounds} done")
    lines = [
        "| engine | decoder | requests in flight | returned tokens/s | engine tokens/s | "
        "mean latency s | 8 vs 1 in flight |",
        "|---|---|---|---|---|---|---|",
    ]
    best: dict[str, float] = {}
    for engine in ports:
        for p in variants:
            name = f"temperature (1/{args.alpha:g}), reference" if p == 0 else f"power_mcmc, proposals={p}"
            base = median([t for t, _, _ in rows[(engine, p, 1)]])
            for conc in (1, 8):
                ret = median([t for t, _, _ in rows[(engine, p, conc)]])
                work = median([w for _, w, _ in rows[(engine, p, conc)]])
                lat = median([x for _, _, x in rows[(engine, p, conc)]])
                gain = f"{ret / base:.2f}x" if conc == 8 else ""
                lines.append(f"| {engine} | {name} | {conc} | {ret:.1f} | {work:.1f} | {lat:.2f} | {gain} |")
            if p:
                best[engine] = max(best.get(engine, 0.0), median([t for t, _, _ in rows[(engine, p, 8)]]))
    return lines, max(best, key=lambda k: best[k])


def part_d(args: argparse.Namespace, port: int, prompts: list[list[int]]) -> list[str]:
    from scipy import stats as st

    decoders: dict[str, dict[str, Any]] = {
        "standard (temperature 1)": {"decoder": {"name": "standard"}, "temperature": 1.0},
        f"temperature (1/{args.alpha:g})": {"decoder": {"name": "temperature", "alpha": args.alpha}},
        "power_mcmc": {"decoder": {"name": "power_mcmc", **args.mcmc, "proposals": args.http_parallel[0]}},
    }
    seeds = list(range(len(prompts)))
    rewards: dict[str, list[float]] = {}
    lengths: dict[str, list[int]] = {}
    cost: dict[str, list[float]] = {}
    for label, body in decoders.items():
        t0 = time.perf_counter()
        _, bodies = asyncio.run(http_batch(port, prompts, seeds, args.reward_max_tokens, body, 8))
        rewards[label] = [b["powerserve"]["self_reward"]["mean_logprob"] for b in bodies]
        lengths[label] = [b["usage"]["completion_tokens"] for b in bodies]
        cost[label] = [b["powerserve"]["cost_multiplier"] for b in bodies]
        log(f"(d) {label}: {time.perf_counter() - t0:.0f} s")

    def ci(values: Sequence[float]) -> tuple[float, float, float]:
        n = len(values)
        mean, sd = statistics.mean(values), statistics.stdev(values)
        half = float(st.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
        return mean, sd, half

    lines = [
        "| decoder | prompts | mean self-reward (log p / token) | std | 95% CI of the mean | "
        "mean output tokens | mean cost multiplier |",
        "|---|---|---|---|---|---|---|",
    ]
    for label in decoders:
        mean, sd, half = ci(rewards[label])
        lines.append(
            f"| {label} | {len(rewards[label])} | {mean:.3f} | {sd:.3f} | [{mean - half:.3f}, {mean + half:.3f}] | "
            f"{statistics.mean(lengths[label]):.1f} | {statistics.mean(cost[label]):.2f} |"
        )
    lines.append("")
    labels = list(decoders)
    for other in labels[:2]:
        diff = [a - b for a, b in zip(rewards["power_mcmc"], rewards[other], strict=True)]
        mean, _, half = ci(diff)
        lines.append(
            f"power_mcmc minus {other}, paired by prompt: {mean:+.3f} (95% CI [{mean - half:+.3f}, {mean + half:+.3f}])"
        )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=4, help="prompts for (a)-(c); (c) sends 8 (repeating them)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--mcmc-steps", type=int, default=4)
    ap.add_argument("--alpha", type=float, default=4.0)
    ap.add_argument("--parallel", type=int, nargs="+", default=[1, 8], help="proposals (K) values for (a)")
    ap.add_argument(
        "--http-parallel",
        type=int,
        nargs="+",
        default=None,
        help="proposals values in (c); (d) uses the first; default: the decoder's default",
    )
    ap.add_argument("--engines", nargs="+", default=["torch", "vllm"], choices=["torch", "vllm"])
    ap.add_argument("--http-engines", nargs="*", default=["torch", "vllm"], choices=["torch", "vllm"])
    ap.add_argument("--reward-engine", default=None, choices=["torch", "vllm"], help="default: the faster in (c)")
    ap.add_argument("--reward-prompts", type=int, default=50)
    ap.add_argument("--reward-max-tokens", type=int, default=None, help="default: --max-tokens")
    ap.add_argument("--enforce-eager", action="store_true", help="vLLM without graph compilation")
    ap.add_argument("--mem", type=float, default=0.15, help="vLLM KV-cache share of host memory")
    ap.add_argument("--port", type=int, default=8941)
    ap.add_argument("--skip", nargs="*", default=[], choices=["ab", "c", "d"])
    args = ap.parse_args()
    assert args.parallel[0] == 1, "the first --parallel value must be 1 (the baseline for the same-chain check)"
    args.mcmc = {"alpha": args.alpha, "block_size": args.block_size, "mcmc_steps": args.mcmc_steps}
    if args.http_parallel is None:
        args.http_parallel = [PowerMcmcParams().proposals]
    args.reward_max_tokens = args.reward_max_tokens or args.max_tokens

    from transformers import AutoTokenizer

    from powerserve.model_store import ensure_embedded_checkpoint

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    path = str(ensure_embedded_checkpoint())
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts = math_prompts(tokenizer, args.prompts)
    started = time.perf_counter()
    out: list[str] = []

    if "ab" not in args.skip:
        out += ["### (a) power_mcmc vs the naive baseline, (b) vs the engine's throughput floor", ""]
        out += [*asyncio.run(part_ab(args, path, prompts)), ""]

    servers: dict[str, ServerProcess] = {}
    log_dir = Path(tempfile.mkdtemp(prefix="bench-power-mcmc-"))
    ports: dict[str, int] = {}
    http_engines = list(args.http_engines)
    if "c" in args.skip:
        http_engines = [args.reward_engine or "torch"] if "d" not in args.skip else []
    try:
        for i, engine in enumerate(http_engines):
            log(f"starting powerserve on the {engine} engine")
            servers[engine], ports[engine] = start_server(engine, args.port + i, args, log_dir), args.port + i
        reward_engine = (args.reward_engine or http_engines[0]) if http_engines else None
        if "c" not in args.skip:
            http_prompts = [prompts[j % len(prompts)] for j in range(8)]
            lines, faster = part_c(args, ports, http_prompts)
            reward_engine = args.reward_engine or faster
            out += ["### (c) power_mcmc throughput through the HTTP server", "", *lines, ""]
        if "d" not in args.skip and reward_engine is not None:
            rprompts = math_prompts(tokenizer, args.reward_prompts, offset=100)
            out += [f"### (d) self-reward on {len(rprompts)} MATH500 prompts ({reward_engine} engine)", ""]
            out += [*part_d(args, ports[reward_engine], rprompts), ""]
    finally:
        for server in servers.values():
            server.kill()  # SIGTERM, SIGKILL after 30 s

    print(
        f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; model {MODEL} "
        f"(float32); MATH500 prompts in the reference format, chat template; alpha {args.alpha:g}, "
        f"block_size {args.block_size}, mcmc_steps {args.mcmc_steps}, max_tokens {args.max_tokens}; "
        f"{args.prompts} prompts x {args.rounds} rounds; vLLM {'eager' if args.enforce_eager else 'compiled'}; "
        f"total {time.perf_counter() - started:.0f} s\n"
    )
    print("\n".join(out))


if __name__ == "__main__":
    main()
