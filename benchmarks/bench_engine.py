"""The torch engine against transformers ``generate`` on the same weights (issue 11, item 1).

In one run, on one model:

1. **Engine vs generate**: 128 sampled tokens (temperature 1, no truncation) from the same
   prompt, at batch 1 and 8: the engine's ``generate`` calls (n concurrent calls, no EOS, no
   prefix cache) against ``model.generate(do_sample=True, top_k=0, min_new_tokens=...)`` on a
   batch of n copies of the prompt. Each side runs ``--repeats`` times, alternating; the best
   run counts. tokens/s = n * tokens / wall seconds.
2. **Step-cost curve**: ms per batched decode step of the engine (n concurrent calls of
   ``--curve-tokens`` tokens: wall / decode steps) beside the raw forward's (one decode step
   of the model with a KV cache, no sampling) at batch 1, 2, 4, 8, 16, 32.
3. ``--profile``: cProfile on the engine's worker thread during section 1's runs: the share of
   the worker's busy time inside the model's forward, inside sampling, and in the rest.

The model is a checkpoint (``--model``, default the embedded SmolLM2-135M-Instruct) or random
weights built from a config (``--config`` JSON; ``--tiny`` a 2-layer toy, for tests). Speed does
not depend on weight values. The prompt is token ids (from the tokenizer when there is one),
so no tokenizer is needed. ``--out DIR`` also writes the tables to DIR/engine_<label>.md.

    python benchmarks/bench_engine.py                       # embedded model, CPU: about 6 min
    python benchmarks/bench_engine.py --config benchmarks/configs/smollm2-1.7b.json --device cuda
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import pstats
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

from powerserve.engine.base import EngineStats, SamplingSpec
from powerserve.engine.torch_engine import TorchEngine

EMBEDDED = Path.home() / ".cache/powerserve/SmolLM2-135M-Instruct"
PROMPT_TEXT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
TINY: dict[str, Any] = {
    "model_type": "llama",
    "vocab_size": 256,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
}


# --- the model --------------------------------------------------------------------------------


def build_model(args: argparse.Namespace) -> tuple[Any, list[int], str]:
    """(model on ``args.device`` in eval mode, prompt token ids, label)."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    auto = torch.float32 if device == "cpu" else torch.bfloat16
    dtype = {"auto": auto, "float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model: Any
    if args.tiny or args.config:
        fields: dict[str, Any] = dict(TINY) if args.tiny else json.loads(Path(args.config).read_text())
        fields.pop("architectures", None)
        config: Any = AutoConfig.for_model(str(fields.pop("model_type", "llama")), **fields)
        torch.manual_seed(0)
        with torch.device(device):  # random init on the device: seconds for a 1.7B model on a GPU
            model = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
        model = model.to(dtype)
        label = "tiny" if args.tiny else Path(args.config).stem
        prompt = [(37 * i + 11) % config.vocab_size for i in range(args.prompt_tokens)]
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
        model = model.to(device)
        label = Path(args.model).name
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model)
        chat: Any = tokenizer.apply_chat_template(
            [{"role": "user", "content": PROMPT_TEXT}], add_generation_prompt=True
        )
        prompt = [int(t) for t in (chat["input_ids"] if hasattr(chat, "keys") else chat)]
    model.eval().requires_grad_(False)
    return model, prompt, f"{label} ({device}, {str(dtype).removeprefix('torch.')})"


def make_engine(model: Any, max_len: int) -> TorchEngine:
    """An engine without EOS (every call runs its full length) and without prefix cache."""
    return TorchEngine(
        model,
        None,
        model_name="bench",
        max_model_len=max_len,
        eos_token_ids=frozenset(),
        prefix_cache_tokens=0,
        max_batch_size=64,
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# --- the runs ---------------------------------------------------------------------------------


async def engine_run(engine: TorchEngine, prompt: list[int], n: int, tokens: int, seed: int = 0) -> float:
    """Wall seconds for n concurrent calls of ``tokens`` tokens each."""

    async def one(i: int) -> int:
        spec = SamplingSpec(max_tokens=tokens, seed=seed + i)
        return len([s async for s in engine.generate(prompt, spec, EngineStats())])

    start = time.perf_counter()
    counts = await asyncio.gather(*(one(i) for i in range(n)))
    elapsed = time.perf_counter() - start
    assert counts == [tokens] * n, counts
    return elapsed


@torch.inference_mode()
def generate_run(model: Any, prompt: list[int], n: int, tokens: int) -> float:
    """Wall seconds for ``model.generate`` on a batch of n copies of the prompt."""
    ids = torch.tensor([prompt] * n, device=model.device)
    kw = dict(do_sample=True, top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=tokens, min_new_tokens=tokens)
    pad = model.config.eos_token_id if model.config.pad_token_id is None else model.config.pad_token_id
    pad = pad[0] if isinstance(pad, list) else pad
    sync(model.device)
    start = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pad_token_id=pad or 0, **kw)
    sync(model.device)
    elapsed = time.perf_counter() - start
    assert out.shape[1] == len(prompt) + tokens, out.shape
    return elapsed


@torch.inference_mode()
def raw_step_ms(model: Any, prompt: list[int], n: int, steps: int) -> float:
    """Median ms of one decode forward at batch n on a KV cache of the prompt (no sampling)."""
    ids = torch.tensor([prompt] * n, device=model.device)
    cache = DynamicCache(config=model.config)
    model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    token = ids[:, -1:]
    times = []
    for i in range(steps):
        sync(model.device)
        start = time.perf_counter()
        pos = torch.full((n, 1), len(prompt) + i, device=model.device)
        model(input_ids=token, position_ids=pos, past_key_values=cache, use_cache=True, logits_to_keep=1)
        sync(model.device)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[1:] if steps > 1 else times)


@contextlib.contextmanager
def worker_profile(engine: TorchEngine) -> Iterator[cProfile.Profile]:
    """cProfile on the engine's worker thread (a profiler only sees the thread that enables it)."""
    prof = cProfile.Profile()
    engine.scheduler.worker.submit(prof.enable).result()
    try:
        yield prof
    finally:
        engine.scheduler.worker.submit(prof.disable).result()


def profile_shares(prof: cProfile.Profile) -> dict[str, float]:
    """Seconds of the worker's jobs (ThreadPoolExecutor work items), and of the model forward
    and the sampling inside them."""
    stats: Any = pstats.Stats(prof).stats  # type: ignore[attr-defined]  # {(file, line, name): (cc, nc, tottime, cumtime, callers)}

    def cum(file_part: str, name: str) -> float:
        return max((v[3] for (f, _, fn), v in stats.items() if file_part in f and fn == name), default=0.0)

    busy = cum("concurrent/futures/thread.py", "run")
    sampling = cum("engine/sampling.py", "sample_rows") or cum("engine/sampling.py", "sample_step")
    return {"busy": busy, "forward": cum("modeling_", "forward"), "sampling": sampling}


# --- the report -------------------------------------------------------------------------------


def table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


async def main_async(args: argparse.Namespace) -> str:
    model, prompt, label = build_model(args)
    T = args.tokens
    engine = make_engine(model, len(prompt) + max(T, args.curve_tokens) + 8)
    out = [
        f"## Torch engine vs transformers generate: {label}",
        "",
        f"prompt {len(prompt)} tokens, {T} sampled tokens, best of {args.repeats}; torch {torch.__version__}",
    ]
    try:
        await engine_run(engine, prompt, 2, 4)  # warm-up both sides
        generate_run(model, prompt, 2, 4)
        rows, profiles = [], []
        for n in args.batches:
            eng, gen = [], []
            for _ in range(args.repeats):
                gen.append(generate_run(model, prompt, n, T))
                if args.profile:
                    with worker_profile(engine) as prof:
                        eng.append(await engine_run(engine, prompt, n, T))
                    profiles.append((n, profile_shares(prof), eng[-1]))
                else:
                    eng.append(await engine_run(engine, prompt, n, T))
            e, g = n * T / min(eng), n * T / min(gen)
            rows.append([str(n), f"{e:.1f}", f"{g:.1f}", f"{e / g:.2f}x"])
        out += ["", table(["batch", "engine tok/s", "generate tok/s", "engine / generate"], rows)]
        if profiles:
            prow = []
            for n, s, wall in profiles:
                busy = s["busy"] or 1e-9
                rest = busy - s["forward"] - s["sampling"]
                shares = [f"{s['forward'] / busy:.0%}", f"{s['sampling'] / busy:.0%}", f"{rest / busy:.0%}"]
                prow.append([str(n), f"{wall:.2f}", f"{busy:.2f}", *shares])
            head = ["batch", "wall s", "worker busy s", "model forward", "sampling", "rest"]
            out += [
                "",
                "cProfile of the worker thread (its overhead inflates the Python parts):",
                "",
                table(head, prow),
            ]
        crow = []
        for n in args.curve:
            before = engine.decode_steps
            wall = await engine_run(engine, prompt, n, args.curve_tokens, seed=100)
            step = 1000 * wall / max(engine.decode_steps - before, 1)
            raw = raw_step_ms(model, prompt, n, args.curve_tokens)
            crow.append([str(n), f"{raw:.1f}", f"{step:.1f}", f"{step / raw:.2f}x", f"{1000 * n / step:.0f}"])
        head = ["batch", "raw forward ms", "engine step ms", "engine / raw", "engine rows/s"]
        note = f"Step cost ({args.curve_tokens}-token calls; engine ms = wall / decode steps, prefill included):"
        out += ["", note, "", table(head, crow)]
    finally:
        await engine.shutdown()
    return "\n".join(out) + "\n"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", default=str(EMBEDDED), help="checkpoint directory")
    src.add_argument("--config", help="config.json of a model to build with random weights")
    src.add_argument("--tiny", action="store_true", help="a 2-layer random toy model (tests)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--curve", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--curve-tokens", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=32, help="prompt length for random models")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--profile", action="store_true", help="cProfile the engine's worker in section 1")
    ap.add_argument("--out", type=Path, help="also write the tables to this folder")
    return ap.parse_args(argv)


def publish(report: str, args: argparse.Namespace, prefix: str) -> None:
    """Print ``report``; with ``--out``, also write it to OUT/<prefix>_<model>.md."""
    print(report, flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        name = "tiny" if args.tiny else Path(args.config or args.model).stem
        (args.out / f"{prefix}_{name}.md").write_text(report)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    publish(asyncio.run(main_async(args)), args, "engine")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
