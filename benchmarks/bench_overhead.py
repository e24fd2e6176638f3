"""Overhead of serving: standard decoding through powerserve vs the same vLLM engine driven
directly (offline ``LLM.generate``), same model, prompts, sampling and seeds, in one run.

Both sides stay up for the whole run and take turns, round by round, so machine noise hits
them alike; the table shows medians over rounds. Concurrency 1 is one request at a time;
concurrency 8 is 8 concurrent requests to powerserve vs one ``generate`` call with 8 prompts.

    .venv/bin/python benchmarks/bench_overhead.py --rounds 3 --max-tokens 64

Prints a Markdown table (paste it into docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import httpx

from powerserve.testing import ServerProcess

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain why the sky is blue.",
    "List five uses of a paperclip.",
    "What is the difference between a virus and a bacterium?",
    "Describe a walk through a forest in autumn.",
    "Give three tips for learning a new language.",
    "Why do cats purr?",
    "Summarise the plot of a detective novel you invent.",
]


def chat_ids(tokenizer, text: str) -> list[int]:  # type: ignore[no-untyped-def]
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )
    return list(tokenizer.encode(rendered, add_special_tokens=False))


def start_server(port: int, mem: float, log_path: Path) -> ServerProcess:
    """``powerserve serve`` on the vLLM engine (compiled, as deployed), once ``/health`` is 200."""
    args = ["--gpu-memory-utilization", str(mem), "--max-model-len", "1024"]
    server = ServerProcess(engine="vllm", extra_args=args, port=port, log_path=log_path)
    server.wait_ready(timeout_s=600)
    return server


async def powerserve_round(
    port: int, prompts: list[list[int]], seeds: list[int], max_tokens: int, temperature: float, concurrency: int
) -> tuple[float, int, list[float], list[list[int]]]:
    url = f"http://127.0.0.1:{port}/v1/completions"
    latencies: list[float] = []
    outputs: list[list[int]] = [[] for _ in prompts]
    tokens = 0
    sem = asyncio.Semaphore(concurrency)

    async with httpx.AsyncClient(timeout=600) as http:

        async def one(i: int) -> None:
            nonlocal tokens
            async with sem:
                t0 = time.perf_counter()
                resp = await http.post(
                    url,
                    json={
                        "model": "SmolLM2-135M-Instruct",
                        "prompt": prompts[i],
                        "max_tokens": max_tokens,
                        "temperature": temperature,
                        "seed": seeds[i],
                        "logprobs": 0,
                    },
                )
                latencies.append(time.perf_counter() - t0)
                body = resp.json()
                tokens += body["usage"]["completion_tokens"]
                outputs[i] = body["choices"][0]["logprobs"]["tokens"]

        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(len(prompts))))
        wall = time.perf_counter() - start
    return wall, tokens, latencies, outputs


def direct_round(
    llm,
    prompts: list[list[int]],
    seeds: list[int],
    max_tokens: int,
    temperature: float,  # type: ignore[no-untyped-def]
    concurrency: int,
) -> tuple[float, int, list[float], list[list[int]]]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = [SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=s) for s in seeds]
    latencies: list[float] = []
    outputs: list[list[int]] = []
    tokens = 0
    start = time.perf_counter()
    for lo in range(0, len(prompts), concurrency):
        t0 = time.perf_counter()
        batch = [TokensPrompt(prompt_token_ids=p) for p in prompts[lo : lo + concurrency]]
        results = llm.generate(batch, params[lo : lo + concurrency], use_tqdm=False)
        elapsed = time.perf_counter() - t0
        for r in results:
            latencies.append(elapsed)  # a batch's requests all finish with the call
            ids = list(r.outputs[0].token_ids)
            tokens += len(ids)
            outputs.append(ids)
    return time.perf_counter() - start, tokens, latencies, outputs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--port", type=int, default=8931)
    ap.add_argument("--mem", type=float, default=0.15, help="KV-cache memory share for each of the two engines")
    ap.add_argument("--log", type=Path, default=Path("bench_overhead_server.log"), help="the server's log")
    args = ap.parse_args()

    from transformers import AutoTokenizer
    from vllm import LLM

    from powerserve.model_store import ensure_embedded_checkpoint

    path = str(ensure_embedded_checkpoint())
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts = [chat_ids(tokenizer, p) for p in PROMPTS]
    seeds = list(range(100, 100 + len(prompts)))

    server = start_server(args.port, args.mem, args.log)
    try:
        # The same engine settings powerserve's vLLM engine uses (dtype float32 on CPU, prefix caching).
        llm = LLM(
            model=path,
            dtype="float32",
            gpu_memory_utilization=args.mem,
            enable_prefix_caching=True,
            max_model_len=1024,
            seed=0,
        )
        rows: dict[tuple[str, int], list[tuple[float, int, float]]] = {}
        same_outputs = True
        # warm-up both sides once
        direct_round(llm, prompts[:2], seeds[:2], 8, args.temperature, 1)
        asyncio.run(powerserve_round(args.port, prompts[:2], seeds[:2], 8, args.temperature, 1))
        for r in range(args.rounds):
            for conc in (1, 8):
                wall, tok, lat, out_d = direct_round(llm, prompts, seeds, args.max_tokens, args.temperature, conc)
                rows.setdefault(("vLLM direct", conc), []).append((wall, tok, statistics.mean(lat)))
                wall, tok, lat, out_p = asyncio.run(
                    powerserve_round(args.port, prompts, seeds, args.max_tokens, args.temperature, conc)
                )
                rows.setdefault(("powerserve", conc), []).append((wall, tok, statistics.mean(lat)))
                same_outputs &= [len(o) for o in out_d] == [len(o) for o in out_p]
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    finally:
        server.kill(grace_s=60)

    print(
        f"\nmachine: {platform.machine()}, {os.cpu_count()} cores; model SmolLM2-135M-Instruct (float32); "
        f"{len(prompts)} chat prompts, max_tokens {args.max_tokens}, temperature {args.temperature}, "
        f"{args.rounds} rounds (medians)\n"
    )
    print("| concurrency | path | tokens/s | mean latency (s) | overhead vs direct |")
    print("|---|---|---|---|---|")
    for conc in (1, 8):
        med = {}
        for path_name in ("vLLM direct", "powerserve"):
            samples = rows[(path_name, conc)]
            tps = statistics.median(t / w for w, t, _ in samples)
            lat = statistics.median(mean_lat for _, _, mean_lat in samples)
            med[path_name] = (tps, lat)
        for path_name in ("vLLM direct", "powerserve"):
            tps, lat = med[path_name]
            overhead = med["vLLM direct"][0] / tps - 1
            note = "" if path_name == "vLLM direct" else f"{overhead:+.1%}"
            print(f"| {conc} | {path_name} | {tps:.1f} | {lat:.2f} | {note} |")
    print(f"\nsame output lengths on both paths (same seeds): {'yes' if same_outputs else 'no'}")


if __name__ == "__main__":
    main()
