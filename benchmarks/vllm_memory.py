"""Where does the vLLM engine's resident memory grow, and does it stop? (issue 13, item 7)

The soak on vLLM shows the server's process tree growing for its whole 10 minutes. This
script drives the vLLM engine directly (``VllmEngine``, as the server loads it, no HTTP) with
many short seeded requests and reads the resident memory of every process of the tree (the
script itself, vLLM's engine core, its worker) every ``--every`` requests, so growth is pinned
to a process and to the number of requests rather than to wall time.

``--lengths random``: prompts of 1 to ``--max-prompt`` tokens and 1 to 16 new tokens, drawn per
request: every batch has a new shape, as under the soak. ``--lengths fixed``: every request has
the same prompt length and ``--max-tokens`` new tokens, so the engine sees a handful of shapes.
If the growth comes with new shapes (kernels and buffers cached per shape), ``fixed`` stays
flat while ``random`` climbs and then levels off when shapes stop being new.

    VLLM_CPU_KVCACHE_SPACE=2 python benchmarks/vllm_memory.py --requests 3000 --lengths random
    VLLM_CPU_KVCACHE_SPACE=2 python benchmarks/vllm_memory.py --requests 3000 --lengths fixed
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
from pathlib import Path

from soak import rss_kib  # benchmarks/, beside this script

from powerserve.engine.base import EngineStats, SamplingSpec
from powerserve.testing import process_tree


def tree_by_name() -> dict[str, int]:
    """MiB resident per process of this script's tree, by command name."""
    out: dict[str, int] = {}
    for pid in process_tree(os.getpid()):
        try:
            name = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        name = "this script" if pid == os.getpid() else Path(name).name
        out[name] = out.get(name, 0) + rss_kib(pid) // 1024
    return out


async def run(args: argparse.Namespace) -> None:
    from powerserve.engine.vllm_engine import VllmEngine

    engine = await VllmEngine.start(args.model_path, model_name="bench", max_model_len=2048, enforce_eager=True)
    rng = random.Random(args.seed)
    vocab = 10_000
    done = 0
    sem = asyncio.Semaphore(args.concurrency)
    started = time.perf_counter()

    async def one(i: int) -> None:
        nonlocal done
        if args.lengths == "random":
            n, k = rng.randint(1, args.max_prompt), rng.randint(1, 16)
        else:
            n, k = args.max_prompt, args.max_tokens
        prompt = [rng.randrange(100, vocab) for _ in range(n)]
        async with sem:
            async for _ in engine.generate(prompt, SamplingSpec(max_tokens=k, seed=i), EngineStats()):
                pass
        done += 1
        if done % args.every == 0:
            mem = tree_by_name()
            cells = "  ".join(f"{name} {mib}" for name, mib in sorted(mem.items()))
            print(f"{done:6d} requests {time.perf_counter() - started:7.1f} s  MiB: {cells}", flush=True)

    print(f"{0:6d} requests {0.0:7.1f} s  MiB: {tree_by_name()}", flush=True)
    await asyncio.gather(*(one(i) for i in range(args.requests)))
    await engine.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--lengths", choices=["random", "fixed"], default="random")
    ap.add_argument("--max-prompt", type=int, default=600, help="longest prompt (random) or the prompt (fixed)")
    ap.add_argument("--max-tokens", type=int, default=8, help="new tokens per request (fixed)")
    ap.add_argument("--concurrency", type=int, default=6)
    ap.add_argument("--every", type=int, default=100, help="requests between two memory readings")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model-path", default=None, help="default: the embedded model's checkpoint")
    args = ap.parse_args()
    if args.model_path is None:
        from powerserve.model_store import ensure_embedded_checkpoint

        args.model_path = str(ensure_embedded_checkpoint())
    asyncio.run(run(args))
    sys.exit(0)


if __name__ == "__main__":
    main()
