"""Time to first content and total time of streamed answers, per decoder, against a running server.

For each decoder and seed it streams one chat answer with the OpenAI SDK and records the time
to the first content chunk (TTFC), the time to the last chunk, and the share of the text that
arrived 0.2 s or more before the last chunk. It prints one row per decoder (medians over the
seeds) and, with ``--json``, every run. Run it on a quiet machine; the numbers are wall times.

    python benchmarks/bench_streaming.py --server http://127.0.0.1:8000 --seeds 8 --max-tokens 96
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

from openai import OpenAI

DECODERS: dict[str, dict[str, Any]] = {
    "standard": {"name": "standard"},
    "power_lookahead": {"name": "power_lookahead"},
    "power_smc": {"name": "power_smc"},
    "power_smc_ess1": {"name": "power_smc", "resample_interval": 2, "ess_threshold": 1.0},
    "power_mcmc": {"name": "power_mcmc", "block_size": 16, "mcmc_steps": 2},
}
PROMPT = "Explain in a few sentences why the sky is blue."


def one_run(client: OpenAI, model: str, decoder: dict[str, Any], seed: int, max_tokens: int) -> dict[str, Any]:
    start = time.monotonic()
    arrivals: list[tuple[float, str]] = []
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=max_tokens,
        seed=seed,
        stream=True,
        extra_body={"decoder": decoder},
    )
    for chunk in stream:
        if chunk.choices:
            arrivals.append((time.monotonic() - start, chunk.choices[0].delta.content or ""))
    end = arrivals[-1][0] if arrivals else time.monotonic() - start
    content = [(t, text) for t, text in arrivals if text]
    chars = sum(len(text) for _, text in content)
    early = sum(len(text) for t, text in content if t < end - 0.2)
    return {
        "seed": seed,
        "ttfc_s": content[0][0] if content else None,
        "total_s": end,
        "early_share": early / chars if chars else None,
        "chars": chars,
    }


def fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def median(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.median(kept) if kept else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default="http://127.0.0.1:8000")
    parser.add_argument("--api-key", default="unused")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--decoders", nargs="*", default=list(DECODERS), choices=list(DECODERS))
    parser.add_argument("--json", action="store_true", help="print every run as JSON too")
    args = parser.parse_args()
    client = OpenAI(base_url=f"{args.server}/v1", api_key=args.api_key, max_retries=0, timeout=900)
    model = client.models.list().data[0].id
    print(f"{'decoder':<16} {'TTFC p50 s':>10} {'total p50 s':>11} {'early share p50':>15} runs")
    for name in args.decoders:
        runs = [one_run(client, model, DECODERS[name], seed, args.max_tokens) for seed in range(args.seeds)]
        ttfc, total, early = (median([r[k] for r in runs]) for k in ("ttfc_s", "total_s", "early_share"))
        print(f"{name:<16} {fmt(ttfc):>10} {fmt(total):>11} {fmt(early):>15} {len(runs)}")
        if args.json:
            print(json.dumps({"decoder": name, "runs": runs}))


if __name__ == "__main__":
    main()
