"""Cost of a LoRA student on the vLLM engine (issue 14, item 3).

Two servers on the embedded model, one after the other (one vLLM engine alive at a time):

- ``lora``: ``--distilled bench=ADAPTER``: LoRA enabled. ``standard``, ``scored`` and
  ``distilled`` take turns, round by round, on the same prompts, lengths and seeds, at 1 and 8
  concurrent requests. ``distilled`` pays its scoring pass under the base model (self-reward) as
  served. ``scored`` is ``temperature`` at alpha 1.01: the base model's own sampling (at
  temperature 0.99, so vLLM's log-probabilities are not the raw ones) plus the same scoring
  pass. So ``scored`` over ``standard`` is what the scoring pass costs, and ``distilled`` over
  ``scored`` what decoding through the adapter costs.
- ``plain``: no ``--distilled``: LoRA disabled, ``standard`` alone at 1 and 8 concurrent: what
  enabling LoRA costs ``standard`` (on CPU vLLM also turns graph compilation off with LoRA, so
  run once without ``--enforce-eager`` to see that part).

tokens/s = completion tokens returned / wall time of the batch; the table shows the median over
rounds and each row's ratio to ``standard`` on the LoRA server and on the plain server.
Without ``--adapter`` the script writes a rank-16 adapter on every projection with small random
(non-zero) weights: the cost of a LoRA does not depend on what it learnt, and small weights keep
the answers about as long as the base's (a strongly perturbed model may stop early or ramble).

    VLLM_CPU_KVCACHE_SPACE=2 .venv/bin/python benchmarks/bench_distilled.py --rounds 3 --max-tokens 64
    .venv/bin/python benchmarks/bench_distilled.py --rounds 1 --max-tokens 8 --requests 1   # smoke

Prints a Markdown table (paste it into docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from bench_overhead import PROMPTS  # the same prompts as the serving-overhead benchmark

from powerserve.testing import ServerProcess

CONCURRENCY = (1, 8)


def write_adapter(out: Path, rank: int) -> Path:
    """A LoRA adapter for the embedded model: peft's random A, and B ~ N(0, 1e-4) instead of zeros."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from powerserve.model_store import ensure_embedded_checkpoint

    base = str(ensure_embedded_checkpoint())
    model: Any = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=modules))
    with torch.no_grad():  # non-zero but small B: every LoRA matmul runs, answers stay the base's length
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=1e-4)
    peft_model.save_pretrained(out)
    return out


async def batch(base: str, model: str, decoder: Any, concurrency: int, requests: int, max_tokens: int) -> float:
    """``concurrency`` workers each send ``requests`` chat requests in turn; returns tokens/s."""
    async with httpx.AsyncClient(base_url=base, timeout=600) as client:

        async def worker(w: int) -> int:
            tokens = 0
            for i in range(requests):
                prompt = PROMPTS[(w * requests + i) % len(PROMPTS)]
                body = {
                    "model": model,
                    "messages": [{"role": "user", "content": prompt}],
                    "max_tokens": max_tokens,
                    "seed": w * requests + i,
                    "decoder": decoder,
                }
                resp = await client.post("/v1/chat/completions", json=body)
                resp.raise_for_status()
                tokens += int(resp.json()["usage"]["completion_tokens"])
            return tokens

        started = time.perf_counter()
        counts = await asyncio.gather(*(worker(w) for w in range(concurrency)))
        return sum(counts) / (time.perf_counter() - started)


def run_server(label: str, extra: list[str], decoders: dict[str, Any], ns: argparse.Namespace, work: Path) -> dict:
    """Start one server, warm it up, then ``rounds`` rounds of every decoder at each concurrency."""
    args = ["--max-model-len", "1024", *extra] + (["--enforce-eager"] if ns.enforce_eager else [])
    server = ServerProcess(model=None, engine="vllm", extra_args=args, log_path=work / f"{label}.log")
    results: dict[tuple[str, int], list[float]] = {}
    try:
        started = time.perf_counter()
        server.wait_ready(timeout_s=900)
        print(f"[{label}] ready in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        model = httpx.get(f"{server.base}/v1/models").json()["data"][0]["id"]
        for decoder in decoders.values():  # warm-up: first requests load adapters, fill caches
            asyncio.run(batch(server.base, model, decoder, 2, 1, 4))
        for r in range(ns.rounds):
            for c in CONCURRENCY:
                order = list(decoders.items())
                if r % 2:
                    order.reverse()  # alternate who goes first, so drift hits both alike
                for name, decoder in order:
                    tps = asyncio.run(batch(server.base, model, decoder, c, ns.requests, ns.max_tokens))
                    results.setdefault((name, c), []).append(tps)
                    print(f"[{label}] round {r} c={c} {name}: {tps:.1f} tok/s", file=sys.stderr)
    finally:
        server.kill()
    return {key: statistics.median(values) for key, values in results.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", type=Path, default=None, help="a LoRA adapter dir (default: a random rank-16 one)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=2, help="requests per worker per batch")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=True)
    ns = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-distilled-"))
    adapter = ns.adapter or write_adapter(work / "adapter", ns.rank)
    lora = run_server(
        "lora",
        ["--distilled", f"bench={adapter}"],
        {
            "standard": "standard",
            "scored": {"name": "temperature", "alpha": 1.01},
            "distilled": {"name": "distilled", "student": "bench"},
        },
        ns,
        work,
    )
    plain = run_server("plain", [], {"standard": "standard"}, ns, work)
    print(f"\nvLLM, embedded model, {platform.processor() or platform.machine()}, eager={ns.enforce_eager}, ")
    print(f"max_tokens={ns.max_tokens}, {ns.requests} requests per worker, median of {ns.rounds} rounds\n")
    print("| server | decoder | concurrent | tokens/s | vs standard (same server) | vs standard without LoRA |")
    print("|---|---|---|---|---|---|")
    for c in CONCURRENCY:
        ref, bare = lora[("standard", c)], plain[("standard", c)]
        for name in ("standard", "scored", "distilled"):
            tps = lora[(name, c)]
            print(f"| LoRA enabled | {name} | {c} | {tps:.1f} | {tps / ref:.2f}x | {tps / bare:.2f}x |")
        print(f"| LoRA disabled | standard | {c} | {bare:.1f} | - | 1.00x |")
    print(
        "\n`scored` (temperature, alpha 1.01): the base's sampling plus the scoring pass that `distilled` "
        "also pays; so `distilled` / `scored` is the adapter's share of the cost: "
        + ", ".join(f"{lora[('distilled', c)] / lora[('scored', c)]:.2f}x at {c} concurrent" for c in CONCURRENCY)
    )
    print(f"\nlogs: {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
