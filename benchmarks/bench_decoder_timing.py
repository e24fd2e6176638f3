"""Wall time of the power decoders through the torch engine's Python API (timing only).

For the GPU check (issue 11, item 5): on random weights built from a config (or the embedded
checkpoint), one request per decoder configuration, ``--tokens`` tokens, no EOS. Reports wall
seconds, engine tokens (generated + scored) and their ratio to ``standard``. Fidelity to p^alpha
is measured on CPU on the real model (bench_mixing); on random weights only the cost means
anything. A decoder that fails (say its constructor changed) gets its error in the table.

    python benchmarks/bench_decoder_timing.py --config benchmarks/configs/smollm2-135m.json
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

from bench_engine import EMBEDDED, build_model, make_engine, publish, table

from powerserve.decoders.base import DecodeRequest, OpenAISampling
from powerserve.decoders.registry import DECODERS
from powerserve.engine.base import EngineStats

# (label, decoder name, parameters)
CONFIGS: list[tuple[str, str, dict[str, Any]]] = [
    ("standard", "standard", {}),
    ("power_mcmc defaults", "power_mcmc", {}),
    ("power_mcmc alpha 4, block 32, 4 steps", "power_mcmc", {"alpha": 4.0, "block_size": 32, "mcmc_steps": 4}),
    ("power_smc defaults", "power_smc", {}),
    ("power_smc 32 particles", "power_smc", {"particles": 32}),
]


async def run_one(engine: Any, name: str, params: dict[str, Any], prompt: list[int], tokens: int) -> list[str]:
    """[wall s, engine tokens] of one request (seed 0)."""
    cls = DECODERS[name]
    decoder = cls(engine)  # type: ignore[call-arg]
    request = DecodeRequest(tuple(prompt), tokens, 0, OpenAISampling(), cls.params_model(**params))
    stats = EngineStats()
    start = time.perf_counter()
    out = [step async for step in decoder.decode(request, stats)]
    wall = time.perf_counter() - start
    work = stats.tokens_generated + stats.tokens_scored
    return [f"{wall:.2f}", str(work), str(len(out))]


async def main_async(args: argparse.Namespace) -> str:
    model, prompt, label = build_model(args)
    engine = make_engine(model, len(prompt) + args.tokens + 8)
    rows = []
    try:
        await run_one(engine, "standard", {}, prompt, 4)  # warm-up
        base = None
        for title, name, params in CONFIGS:
            try:
                wall, work, n = await run_one(engine, name, params, prompt, args.tokens)
            except Exception as error:  # record it, time the others
                rows.append([title, "error", "-", "-", "-", f"{type(error).__name__}: {error}"[:120]])
                continue
            base = base or float(wall)
            rows.append([title, wall, work, n, f"{float(wall) / base:.2f}x", ""])
    finally:
        await engine.shutdown()
    head = ["decoder", "wall s", "engine tokens", "output tokens", "wall / standard", "note"]
    return f"## Decoder wall time: {label}, {args.tokens} tokens, one request\n\n" + table(head, rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", default=str(EMBEDDED))
    src.add_argument("--config")
    src.add_argument("--tiny", action="store_true")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    publish(asyncio.run(main_async(args)), args, "decoders")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
