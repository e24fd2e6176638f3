"""Long answers (issue 11, item 4): ``power_mcmc`` against a faithful reference-style baseline,
the reference code itself, ``power_smc`` and ``standard`` -- same prompts, model and run.

Rows (torch engine on the embedded model unless ``--model-path``; every row the same weights):
- ``standard`` (temperature 1) and ``power_smc`` (``--particles``), one request at a time;
- ``baseline (reference-style)``: :func:`mcmc_baselines.reference_style_chain`, transformers
  ``generate`` for every proposal from the full prefix (see that module for what it does and
  why it is faithful), one request at a time;
- ``reference (Karan & Du code)`` with ``--reference-repo PATH`` (a checkout of
  github.com/aakaran/reasoning-with-sampling; imported from there, never copied): its own
  ``mcmc_power_samp`` on our model and tokenizer objects; the adaptations are listed in
  :mod:`mcmc_baselines`;
- ``power_mcmc`` with K = ``--proposals`` (default 1 and the decoder's default), with 1 and
  with ``--in-flight`` requests in flight (the latter: batches of that many concurrent
  requests, cycling over the prompts with distinct seeds).

Settings (issue defaults): alpha 4, block 32, 4 MH steps, 128 tokens, MATH500 problems in the
reference's text, in a ChatML user turn without the ``<|im_end|>`` closers (:func:`math_prompts`),
the same for every row. Why not the full chat template: its ``<|im_end|>`` is SmolLM2's EOS, and
the reference's end check (``eos_token_id in gen``, gen = prompt + answer) would cut every answer
at the prompt after one block; why not its plain text: SmolLM2-Instruct then answers with EOS at
once (seen in the smoke: about 5 tokens per answer). ``--chat`` uses the full template (refused
with ``--reference-repo``).
Columns:
- wall s / request: a request's own latency (in flight: inside its batch);
- tokens/s: returned tokens / wall (in flight: of the whole batch);
- engine tokens / request: generated + scored (engine rows, the engine's counters; prefix-cache
  hits are not counted) or generated + prefilled (outside chains: every ``generate`` call's
  whole context is prefilled again);
- self-reward: mean over requests of the base model's mean log p per returned token, scored
  afterwards by the engine for every row alike (untimed);
- acceptance: baseline and reference, the share of MH tests passed (a proposal identical to the
  current suffix counts); ``power_mcmc``, the share of steps that changed the tokens;
- x baseline: tokens/s over the baseline's tokens/s; 8 vs 1: tokens/s over that of the same
  requests one at a time (the row "1 (the 8 in flight's requests)").

After the table: the model's own cost of 1, K, 8, 16 and 8 x K rows side by side (plain
``generate``, same run), and from it what 8 in flight can gain at most over the same requests
alone (:func:`long_answer_table.in_flight_bound`).

Faithfulness check, in the same run: after each baseline completion, plain ``generate`` (no
scores, no MH) replays exactly its calls (same contexts, same numbers of new tokens); the table
notes the baseline's seconds per generated token over plain ``generate``'s (target <= 1.10).

    python benchmarks/bench_power_mcmc.py --reference-repo ../reasoning-with-sampling \\
        --json bench_power_mcmc.json                     # the issue's settings, 4 prompts
    python benchmarks/bench_power_mcmc.py --prompts 2 --max-tokens 16 --block-size 8 \\
        --in-flight 2 --reference-repo ../reasoning-with-sampling   # smoke

Prints a Markdown table; progress goes to stderr. Timings need a quiet machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the server does: 2 cores, worker threads

import torch
from long_answer_table import (  # benchmarks/, beside this script
    Measured,
    in_flight_bound,
    markdown_table,
    tokens_per_second,
)
from mcmc_baselines import (
    load_reference,
    plain_generate,
    reference_style_chain,
    replay_plain_generate,
    run_reference,
)

from powerserve.decoders.base import Decoder, DecodeRequest, DecoderParams, OpenAISampling
from powerserve.decoders.power_mcmc import PowerMcmcDecoder, PowerMcmcParams
from powerserve.decoders.power_smc import PowerSmcDecoder, PowerSmcParams
from powerserve.decoders.standard import StandardDecoder, StandardParams
from powerserve.engine.base import EngineStats
from powerserve.engine.torch_engine import TorchEngine

ROOT = Path(__file__).resolve().parents[1]
MATH500 = ROOT.parent / "shared" / "data" / "MATH500.json"
MODEL = "SmolLM2-135M-Instruct"
BASELINE = "baseline (reference-style)"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def math_prompts(tokenizer: Any, n: int, path: Path = MATH500, chat: bool = False) -> list[list[int]]:
    """The first ``n`` MATH500 problems in the reference's text (its ``PROMPT + question + COT``,
    braces as it sends them) in a user turn: ``<|im_start|>user\\n{text}\\n<|im_start|>assistant\\n``
    (ChatML turn openers without the ``<|im_end|>`` closers, which are SmolLM2's EOS token).
    ``chat``: the model's full chat template instead (system turn, ``<|im_end|>`` closers)."""
    problems = json.loads(path.read_text())[:n]
    out = []
    for p in problems:
        text = (
            "Can you solve the following math problem? "
            + p["prompt"]
            + " Please reason step by step, and put your final answer within \\boxed{{}}."
        )
        if chat:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
            )
        else:
            text = f"<|im_start|>user\n{text}\n<|im_start|>assistant\n"
        out.append(list(tokenizer.encode(text, add_special_tokens=False)))
    return out


async def decode(
    engine: TorchEngine, decoder: Decoder, params: DecoderParams, prompt: list[int], max_tokens: int, seed: int
) -> Measured:
    """One request through the decoder interface, as the server runs it (minus HTTP)."""
    stats = EngineStats()
    sampling = OpenAISampling(temperature=1.0)
    request = DecodeRequest(tuple(prompt), max_tokens, seed, sampling, params)
    t0 = time.perf_counter()
    out = [step.token_id async for step in decoder.decode(request, stats)]
    wall = time.perf_counter() - t0
    acc = stats.extra.get("acceptance_rate", float("nan"))
    return Measured(prompt, out, wall, stats.tokens_generated, stats.tokens_scored, acceptance=acc)


async def in_flight(
    engine: TorchEngine,
    decoder: Decoder,
    params: DecoderParams,
    requests: list[tuple[list[int], int]],
    max_tokens: int,
) -> list[Measured]:
    """All ``requests`` (prompt, seed) at once; each result carries the batch wall time."""
    t0 = time.perf_counter()
    runs = await asyncio.gather(*(decode(engine, decoder, params, p, max_tokens, s) for p, s in requests))
    batch = time.perf_counter() - t0
    for run in runs:
        run.batch_wall = batch
    return list(runs)


async def bench(args: argparse.Namespace) -> tuple[list[str], dict[str, list[Measured]]]:
    torch.set_num_threads(max(1, min(args.threads, os.cpu_count() or 1)))
    log(f"loading {args.model_path}")
    engine = TorchEngine.load(args.model_path, model_name=MODEL, max_model_len=2048)
    model, tokenizer = engine.model, engine.tokenizer
    eos = sorted(engine.eos_token_ids)
    prompts = math_prompts(tokenizer, args.prompts, args.math500, args.chat)
    reference = load_reference(args.reference_repo) if args.reference_repo else None
    if reference is not None and tokenizer.eos_token_id in prompts[0]:
        # its EOS check searches prompt + answer: it would cut the answer at the prompt's EOS
        raise SystemExit("the reference cuts at the first EOS of prompt + answer: drop --chat")
    mcmc = {"alpha": args.alpha, "block_size": args.block_size, "mcmc_steps": args.mcmc_steps}
    decoders: dict[str, tuple[Decoder, DecoderParams]] = {
        "standard": (StandardDecoder(engine), StandardParams()),
        f"power_smc, particles={args.particles}": (
            PowerSmcDecoder(engine),
            PowerSmcParams(alpha=args.alpha, particles=args.particles),
        ),
    }
    for k in args.proposals:
        decoders[f"power_mcmc, K={k}"] = (PowerMcmcDecoder(engine), PowerMcmcParams(**mcmc, proposals=k))
    replay_s: list[tuple[float, float]] = []  # (baseline s, plain generate s) per completion

    def engine_job(label: str) -> Callable[[list[int], int, int], Awaitable[Measured]]:
        decoder, params = decoders[label]
        return lambda prompt, seed, n: decode(engine, decoder, params, prompt, n, seed)

    async def baseline(prompt: list[int], seed: int, n: int) -> Measured:
        run = reference_style_chain(model, prompt, eos, n, args.alpha, args.block_size, args.mcmc_steps, seed)
        replay_s.append((run.wall, replay_plain_generate(model, run.calls, args.alpha)))
        return Measured(prompt, run.output, run.wall, run.generated, run.prefilled, acceptance=run.acceptance)

    async def ref(prompt: list[int], seed: int, n: int) -> Measured:
        block = min(args.block_size, n)
        run = run_reference(reference, model, tokenizer, prompt, n, args.alpha, block, args.mcmc_steps, seed)
        return Measured(prompt, run.output, run.wall, run.generated, run.prefilled, acceptance=run.acceptance)

    jobs: dict[str, Callable[[list[int], int, int], Awaitable[Measured]]] = {BASELINE: baseline}
    if reference is not None:
        jobs["reference (Karan & Du code)"] = ref
    jobs.update({label: engine_job(label) for label in decoders})

    log("warm-up")
    for job in jobs.values():
        await job(prompts[0], 0, args.block_size)
    replay_s.clear()

    results: dict[str, list[Measured]] = {label: [] for label in jobs}
    order = list(jobs)
    for r in range(args.rounds):
        for j, prompt in enumerate(prompts):
            seed = 1000 * r + j
            shift = (r * len(prompts) + j) % len(order)
            for label in order[shift:] + order[:shift]:  # rotating order: machine noise hits all alike
                results[label].append(await jobs[label](prompt, seed, args.max_tokens))
                log(f"round {r + 1} prompt {j + 1}: {label} {results[label][-1].wall:.1f} s")
        # n in flight: batches cycling over the prompts, as many requests as prompts (at least n);
        # then those of its requests the rows above did not run alone, one at a time, so that
        # "n vs 1" compares the same requests (a request's chain length depends on its seed).
        n_req = max(args.in_flight, len(prompts))
        requests = [(prompts[j % len(prompts)], 1000 * r + j) for j in range(n_req)]
        for k in args.proposals:
            label = f"power_mcmc, K={k}"
            decoder, params = decoders[label]
            key, same = f"{label} @{args.in_flight}", results.setdefault(f"{label} @1", [])
            same += results[label][r * len(prompts) :]
            for b in range(0, n_req, args.in_flight):
                runs = await in_flight(engine, decoder, params, requests[b : b + args.in_flight], args.max_tokens)
                results.setdefault(key, []).extend(runs)
                log(f"round {r + 1}: {key} batch {runs[0].batch_wall:.1f} s")
            for prompt, seed in requests[len(prompts) :]:
                same.append(await jobs[label](prompt, seed, args.max_tokens))
                log(f"round {r + 1}: {label} alone, seed {seed} {same[-1].wall:.1f} s")

    # What the model itself costs to decode several rows at once: plain `generate` of each row
    # count the rows above use (1, K, --in-flight, --particles, --in-flight x K) on each prompt,
    # the sizes alternating; --max-tokens tokens less 1 token, so that the prefill of the n copies
    # of the prompt cancels out.
    sizes = sorted({1, args.in_flight, args.particles, *args.proposals, *(args.in_flight * k for k in args.proposals)})
    rows_s = {n: 0.0 for n in sizes}
    for prompt in prompts:
        for n in sizes:
            full = plain_generate(model, prompt, args.max_tokens, args.alpha, rows=n)
            rows_s[n] += full - plain_generate(model, prompt, 1, args.alpha, rows=n)
    log("plain generate by rows: " + ", ".join(f"{n}: {s:.1f} s" for n, s in rows_s.items()))

    for runs in results.values():  # self-reward, untimed, scored alike for every row
        for run in runs:
            if run.output:
                logp = await engine.score(run.prompt, run.output, EngineStats())
                run.self_reward = statistics.fmean(logp)
    await engine.shutdown()

    lines = markdown_table(results, BASELINE, args.in_flight)
    base_s, plain_s = sum(b for b, _ in replay_s), sum(p for _, p in replay_s)
    ratio = base_s / plain_s if plain_s else float("nan")
    verdict = "within 10%" if ratio <= 1.10 else "NOT within 10% of plain generate"
    by_rows = ", ".join(f"{n} rows {rows_s[n] / rows_s[1]:.2f}x one row" for n in sizes[1:])
    gen = sum(r.generated for r in results[BASELINE])
    lines += [
        "",
        "Acceptance: baseline and reference count MH tests passed (identical proposals included); "
        "power_mcmc counts steps that changed the tokens.",
        "",
        f"Baseline faithfulness: {base_s / gen * 1e3:.1f} ms per generated token against "
        f"{plain_s / gen * 1e3:.1f} ms for plain `generate` replaying exactly its calls "
        f"({len(results[BASELINE])} completions, {gen} tokens): ratio {ratio:.3f} ({verdict}).",
        "",
        f"The model's own cost of decoding rows side by side (plain `generate`, {args.max_tokens} tokens "
        f"less 1 token on each prompt, same run): {by_rows}. "
        f"So by the model's own cost, `power_smc` with {args.particles} particles needs about "
        f"{rows_s[args.particles] / rows_s[1]:.2f}x `standard` on this machine.",
    ]
    for k in args.proposals:  # n in flight against the same requests alone, and what the model allows
        label = f"power_mcmc, K={k}"
        together, alone = results[f"{label} @{args.in_flight}"], results[f"{label} @1"]
        work = [run.generated + run.other for run in together]
        bound = statistics.fmean(
            in_flight_bound(work[b : b + args.in_flight], k, rows_s) for b in range(0, len(work), args.in_flight)
        )
        gain = tokens_per_second(together) / tokens_per_second(alone)
        kind = "at most" if k == 1 else "(an estimate: long_answer_table.in_flight_bound)"
        lines += [
            "",
            f"{label}: {args.in_flight} in flight give {gain:.2f}x the throughput of the same requests one at "
            f"a time. By the model's own cost of rows side by side, these requests (engine tokens "
            f"{', '.join(str(w) for w in work)}) allow {bound:.2f}x {kind}: the longest one's "
            f"{max(work) // k} steps run one after another, with fewer rows once the others are done.",
        ]
    return lines, results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=4, help="MATH500 problems (the first N)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--mcmc-steps", type=int, default=4)
    ap.add_argument("--alpha", type=float, default=4.0)
    ap.add_argument("--proposals", type=int, nargs="+", default=[1, PowerMcmcParams().proposals])
    ap.add_argument("--particles", type=int, default=16)
    ap.add_argument("--in-flight", type=int, default=8, help="requests in flight for the throughput rows")
    ap.add_argument("--reference-repo", type=Path, default=None, help="a checkout of the reference code")
    ap.add_argument("--model-path", default=None, help="default: the embedded model's checkpoint")
    ap.add_argument("--math500", type=Path, default=MATH500, help="MATH500.json (default: ../shared/data/)")
    ap.add_argument(
        "--chat",
        action="store_true",
        help="chat-template prompts (not with --reference-repo when the template holds the EOS token)",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None, help="also write the rows and every request here")
    args = ap.parse_args()
    if args.reference_repo is not None and args.max_tokens % args.block_size:
        ap.error("--reference-repo needs --max-tokens to be a multiple of --block-size")
    if args.model_path is None:
        from powerserve.model_store import ensure_embedded_checkpoint

        args.model_path = str(ensure_embedded_checkpoint())

    started = time.perf_counter()
    lines, results = asyncio.run(bench(args))
    header = (
        f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; model "
        f"{Path(args.model_path).name}; torch engine; alpha {args.alpha:g}, block {args.block_size}, "
        f"{args.mcmc_steps} MH steps, {args.max_tokens} tokens; {args.prompts} MATH500 prompts x "
        f"{args.rounds} rounds; total {time.perf_counter() - started:.0f} s"
    )
    print(f"\n{header}\n\n" + "\n".join(lines))
    if args.json:
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        rows = {label: [run.record() for run in runs] for label, runs in results.items()}
        args.json.write_text(json.dumps({"settings": settings, "header": header, "table": lines, "requests": rows}))


if __name__ == "__main__":
    main()
