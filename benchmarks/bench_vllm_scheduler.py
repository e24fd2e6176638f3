"""What switching chunked prefill off costs on CPU (issue 12): throughput of N concurrent requests
on the vLLM engine with vLLM's default scheduler (chunked prefill, 2,048-token step budget) and
with powerserve's CPU setting (no chunked prefill, budget max(max_model_len, 2048)), in one run.

    VLLM_CPU_KVCACHE_SPACE=2 .venv/bin/python benchmarks/bench_vllm_scheduler.py \\
        --concurrency 1 8 40 --prompt-tokens 100 1000 --max-tokens 32 --rounds 3

Requests are unseeded: vLLM's default setting kills its engine core on CPU under concurrent
seeded load, which is what the new setting fixes. Each engine is started in this process
(eager mode), warmed up with one round, measured, and shut down before the next. Per cell:
the median over ``--rounds`` of prompt+generated tokens/s and generated tokens/s, and the
ratio new / old. Smoke: ``--concurrency 2 --prompt-tokens 20 --max-tokens 4 --rounds 1``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from dataclasses import dataclass
from typing import Any

from powerserve.engine.base import EngineStats, SamplingSpec
from powerserve.engine.vllm_engine import VllmEngine
from powerserve.model_store import EMBEDDED_NAME, ensure_embedded_checkpoint

SETTINGS = {"old (chunked prefill)": True, "new (no chunked prefill)": None}
MAX_CONCURRENCY = 256


@dataclass(frozen=True, slots=True)
class Cell:
    setting: str
    concurrency: int
    prompt_tokens: int
    total_tok_s: float  # (prompt + generated) tokens per second of wall time
    gen_tok_s: float  # generated tokens per second


def prompts(engine: VllmEngine, n: int, length: int, salt: int = 0) -> list[list[int]]:
    """``n`` distinct prompts of exactly ``length`` tokens (distinct across requests and salts, so
    the prefix cache cannot share their prefill)."""
    text = "The keeper wrote the weather and the ships in the log. " * (length // 8 + 2)
    out = []
    for i in range(n):
        ids: list[int] = engine.tokenizer(f"Entry {salt}.{i}: {text}")["input_ids"]
        out.append(ids[:length])
    return out


async def one_round(engine: VllmEngine, batch: list[list[int]], max_tokens: int) -> tuple[float, int]:
    """Wall seconds and generated tokens for ``batch`` sent at once (each stops at EOS or max_tokens)."""

    async def run(prompt: list[int]) -> int:
        spec = SamplingSpec(max_tokens=max_tokens, temperature=1.0)
        stats = EngineStats()
        async for _ in engine.generate(prompt, spec, stats):
            pass
        return stats.tokens_generated

    start = time.perf_counter()
    counts = await asyncio.gather(*(run(p) for p in batch))
    return time.perf_counter() - start, sum(counts)


async def measure(setting: str, chunked: bool | None, args: argparse.Namespace) -> list[Cell]:
    engine = await VllmEngine.start(
        str(ensure_embedded_checkpoint()),
        model_name=EMBEDDED_NAME,
        max_model_len=args.max_model_len,
        enforce_eager=True,
        chunked_prefill=chunked,
    )
    cells = []
    try:
        await one_round(engine, prompts(engine, 2, 16), 4)  # warm-up
        for length in args.prompt_tokens:
            for n in args.concurrency:
                rates, gen_rates = [], []
                for r in range(args.rounds):
                    batch = prompts(engine, n, length, salt=r)
                    wall, generated = await one_round(engine, batch, args.max_tokens)
                    rates.append((n * length + generated) / wall)
                    gen_rates.append(generated / wall)
                cells.append(Cell(setting, n, length, statistics.median(rates), statistics.median(gen_rates)))
    finally:
        await engine.shutdown()
    return cells


def table(cells: list[Cell]) -> str:
    old, new = list(SETTINGS)
    by_key: dict[tuple[str, int, int], Cell] = {(c.setting, c.prompt_tokens, c.concurrency): c for c in cells}
    lines = [
        "| prompt tokens | in flight | old total tok/s | new total tok/s | old gen tok/s | new gen tok/s | new/old |",
        "|---|---|---|---|---|---|---|",
    ]
    for length, n in sorted({(c.prompt_tokens, c.concurrency) for c in cells}):
        a, b = by_key[(old, length, n)], by_key[(new, length, n)]
        lines.append(
            f"| {length} | {n} | {a.total_tok_s:.0f} | {b.total_tok_s:.0f} | {a.gen_tok_s:.1f} | {b.gen_tok_s:.1f} "
            f"| {b.total_tok_s / a.total_tok_s:.2f} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="benchmarks/bench_vllm_scheduler.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 40])
    p.add_argument("--prompt-tokens", type=int, nargs="+", default=[100, 1000])
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=3)
    ns = p.parse_args(argv)
    if not all(1 <= n <= MAX_CONCURRENCY for n in ns.concurrency) or not 1 <= ns.rounds <= 20:
        p.error(f"concurrency must be 1..{MAX_CONCURRENCY}, rounds 1..20")
    if any(length < 1 or length + ns.max_tokens > ns.max_model_len for length in ns.prompt_tokens):
        p.error("prompt tokens + max tokens must fit max_model_len")
    return ns


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cells: list[Any] = []
    for setting, chunked in SETTINGS.items():
        cells += asyncio.run(measure(setting, chunked, args))
    print(table(cells))


if __name__ == "__main__":
    main()
