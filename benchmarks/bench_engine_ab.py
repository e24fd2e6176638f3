"""The torch engine's decode-step changes, each switched off and on in one process (issue 11).

Three changes of the engine are measured against what they replace, on the same loaded
model, the variants interleaved (every workload runs every variant once per round; the median
of ``--rounds`` rounds counts):

- ``grow``: the KV cache layer that grows in place (``engine/kv_cache.py: GrowingLayer``,
  rows joining and leaving with one copy) instead of ``transformers``' ``DynamicLayer`` (a
  ``torch.cat`` of the whole cache per step);
- ``grouped``: grouped decode attention (``engine/attention.py``) instead of SDPA, which
  copies every key head per query head (``repeat_kv``) in padded decode steps;
- ``sampler``: the sampler that computes log p and log q of the drawn token only
  (``engine/sampling.py``) instead of the earlier one, which built full-vocabulary
  log-softmaxes of p and q per row (:func:`full_softmax_sampler`, kept here as the baseline).

``base`` has none of them, ``shipped`` all three; each ``no ...`` column leaves one out of
the shipped engine, so its gap to ``shipped`` is what that change is worth. Workloads, each through the
decoders' Python API with ``--tokens`` tokens on MATH500 prompts: one ``standard`` request; 8
concurrent ``standard`` requests on different prompts (a padded batch); ``power_smc`` with 16
particles; ``power_mcmc`` with 8 candidates per step (block 16, 2 steps), one request and 4 in
flight (candidates of different requests have different lengths: padded).

    python benchmarks/bench_engine_ab.py                 # about 12 minutes on 2 quiet cores
    python benchmarks/bench_engine_ab.py --tokens 8 --rounds 1          # smoke: about 2 minutes
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from bench_power_mcmc import MATH500, math_prompts  # benchmarks/, beside this script
from transformers import DynamicCache, PreTrainedConfig

from powerserve.decoders.base import Decoder, DecodeRequest, DecoderParams, OpenAISampling
from powerserve.decoders.power_mcmc import PowerMcmcDecoder, PowerMcmcParams
from powerserve.decoders.power_smc import PowerSmcDecoder, PowerSmcParams
from powerserve.decoders.standard import StandardDecoder, StandardParams
from powerserve.engine import attention, kv_cache, model_runner, sampling, scheduler
from powerserve.engine.base import EngineStats, SamplingSpec, TokenStep
from powerserve.engine.torch_engine import TorchEngine

VARIANTS = {
    "base": (False, False, False),
    "no grow": (False, True, True),
    "no grouped": (True, False, True),
    "no sampler": (True, True, False),
    "shipped": (True, True, True),
}


def library_cache(config: PreTrainedConfig, kv: kv_cache.KV | None = None) -> DynamicCache:
    """What the engine built before: ``DynamicCache``, which grows by concatenation."""
    return DynamicCache(ddp_cache_data=kv, config=config) if kv else DynamicCache(config=config)


SHIPPED_NEW_CACHE = kv_cache.new_cache


def full_softmax_sampler(
    logits: torch.Tensor, specs: Sequence[SamplingSpec], generators: Sequence[torch.Generator]
) -> list[TokenStep | Exception]:
    """The sampler before issue 11's last change (untruncated rows): log_softmax of p and of q
    over the whole vocabulary for every row, then the same inverse CDF."""
    logits = logits.to(torch.float64)
    logp = torch.log_softmax(logits, dim=-1)  # [B, V]
    t = torch.tensor([s.temperature for s in specs], dtype=torch.float64)[:, None]
    logq = logp.clone()
    logq.copy_(torch.log_softmax((logits - logits.amax(-1, keepdim=True)) / t, dim=-1))
    cdf = logq.exp().cumsum(-1)
    total = cdf[:, -1]
    u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators])
    token = torch.searchsorted(cdf, (u * total)[:, None], right=True)[:, 0].clamp_(max=cdf.shape[-1] - 1)
    picked = torch.stack(
        [token.to(torch.float64), logq.gather(-1, token[:, None])[:, 0], logp.gather(-1, token[:, None])[:, 0]]
    )
    return [TokenStep(token_id=int(a), logq=lq, logp=lp) for a, lq, lp in picked.T.tolist()]


def set_variant(engine: TorchEngine, grow: bool, grouped: bool, sampler: bool) -> None:
    make = SHIPPED_NEW_CACHE if grow else library_cache
    kv_cache.new_cache = model_runner.new_cache = make  # type: ignore[assignment]
    scheduler.sample_rows = sampling.sample_rows if sampler else full_softmax_sampler  # type: ignore[assignment]
    engine.runner.model.set_attn_implementation(attention.NAME if grouped else "sdpa")
    engine.prefix_cache.clear()


async def decode(decoder: Decoder, params: DecoderParams, prompt: list[int], tokens: int, seed: int) -> None:
    request = DecodeRequest(tuple(prompt), tokens, seed, OpenAISampling(temperature=1.0), params)
    async for _ in decoder.decode(request, EngineStats()):
        pass


def workloads(engine: TorchEngine, prompts: list[list[int]], tokens: int) -> dict[str, Callable[[], Awaitable[Any]]]:
    standard, smc, mcmc = StandardDecoder(engine), PowerSmcDecoder(engine), PowerMcmcDecoder(engine)
    std, smc16 = StandardParams(), PowerSmcParams(alpha=4, particles=16)
    k8 = PowerMcmcParams(alpha=4, block_size=16, mcmc_steps=2, proposals=8)
    return {
        "standard, 1 request": lambda: decode(standard, std, prompts[0], tokens, 1),
        "standard, 8 prompts at once": lambda: asyncio.gather(
            *(decode(standard, std, p, tokens, i) for i, p in enumerate(prompts[:8]))
        ),
        "power_smc 16 particles": lambda: decode(smc, smc16, prompts[1], tokens, 2),
        "power_mcmc K=8, 1 request": lambda: decode(mcmc, k8, prompts[2], tokens, 3),
        "power_mcmc K=8, 4 in flight": lambda: asyncio.gather(
            *(decode(mcmc, k8, p, tokens, 10 + i) for i, p in enumerate(prompts[4:8]))
        ),
    }


async def run(args: argparse.Namespace) -> str:
    torch.set_num_threads(args.threads)
    engine = TorchEngine.load(args.model_path, model_name="bench", max_model_len=2048)
    prompts = math_prompts(engine.tokenizer, 8, args.math500)
    jobs = workloads(engine, prompts, args.tokens)
    seconds: dict[tuple[str, str], list[float]] = {(w, v): [] for w in jobs for v in VARIANTS}
    for r in range(args.rounds):
        for w, job in jobs.items():
            for v, switches in VARIANTS.items():
                set_variant(engine, *switches)
                start = time.perf_counter()
                await job()
                seconds[w, v].append(time.perf_counter() - start)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    await engine.shutdown()
    lines = [
        f"{args.tokens} tokens per request; wall seconds, median of {args.rounds} rounds (x base)",
        "",
        "| workload | " + " | ".join(VARIANTS) + " |",
        "|---|" + "---|" * len(VARIANTS),
    ]
    for w in jobs:
        base = statistics.median(seconds[w, "base"])
        cells = [
            f"{statistics.median(seconds[w, v]):.2f} ({statistics.median(seconds[w, v]) / base:.2f}x)" for v in VARIANTS
        ]
        lines.append(f"| {w} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model-path", default=None, help="default: the embedded model's checkpoint")
    ap.add_argument("--math500", type=Path, default=MATH500)
    args = ap.parse_args()
    if args.model_path is None:
        from powerserve.model_store import ensure_embedded_checkpoint

        args.model_path = str(ensure_embedded_checkpoint())
    print(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
