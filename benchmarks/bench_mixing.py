"""How close do the power decoders get to p^alpha, and at what wall time? (issue 11, item 3)

Enumerable cases on a real model (default: the embedded SmolLM2-135M-Instruct, torch engine):
two-token continations of chat prompts (T = 2), alpha 4, where token-level temperature 1/alpha
and the sequence-level p^alpha disagree.

Exact p^alpha. For a first token a (an EOS ends the sequence) and a second token b:
    pi(a, b) = p(a)^alpha p(b|a)^alpha / Z,   pi(a) = p(a)^alpha Z_2(a) / Z,
    Z_2(a) = sum_b p(b|a)^alpha   (exact: one forward per a, a sum over the whole vocabulary).
The first tokens are enumerated by decreasing p up to ``--first-tokens`` M; every other first
token's branch has mass at most p(a)^alpha (as Z_2 <= 1), so the mass left out is at most
sum_{a not enumerated} p(a)^alpha / Z, printed per case. Temperature 1/alpha draws
q(a) = p(a)^alpha / Z_1 and then b from exactly pi(b|a), so the two laws differ only in the
first token: TV(q, pi) = TV of the first-token marginals.

Empirical TV of R seeded draws of a decoder, over whole sequences s:
    TV = 1/2 [ sum_{s drawn} |f(s) - pi(s)| + 1 - sum_{s drawn} pi(s) ]
(f the empirical frequencies). Even exact draws have TV > 0 at finite R: the *floor* column is
the mean TV of R i.i.d. exact draws (``--floor-reps`` repetitions), so a target like 0.10 is
judged against what R samples can show.

Configurations: ``mcmc:K=..,S=..`` (power_mcmc, K proposals a step, S steps), ``smc:N=..``
(power_smc, N particles) and ``pimh:N=..,R=..`` (particle-independent MH over R concurrent
power_smc runs, see :class:`Pimh`; measured beside the shipped multi-proposal step).

Each configuration runs its R draws concurrently (seeds 0..R-1) for the TV -- concurrency does
not change any draw's law -- and separately ``--timing-runs`` requests one at a time for the
wall time per request (median). Wall times need a quiet machine; the TV columns do not, so
the two can run apart: ``--timing-runs 0 --json tv.json`` anywhere, then
``--tv-from tv.json`` on the quiet machine times the requests and prints the whole table.

    python benchmarks/bench_mixing.py                      # the full table (about 40 min, 2 cores)
    python benchmarks/bench_mixing.py --draws 40 --timing-runs 1 --configs mcmc:K=1,S=8 --cases 1

Prints a Markdown table; ``--plot FILE`` also writes TV vs wall time as a PNG.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from powerserve.decoders.base import Decoder, DecodeRequest, DecoderParams, OpenAISampling
from powerserve.decoders.power_mcmc import PowerMcmcDecoder, PowerMcmcParams
from powerserve.decoders.power_smc import PowerSmcDecoder, PowerSmcParams
from powerserve.engine.base import EngineStats, TokenStep
from powerserve.engine.torch_engine import TorchEngine

ALPHA = 4.0
T = 2
DEFAULT_MODEL = Path.home() / ".cache" / "powerserve" / "SmolLM2-135M-Instruct"
# Chat prompts whose first answer token matters for what follows; --cases keeps the first N
# of those whose temperature law is at TV >= 0.5 from p^alpha.
PROMPTS = [
    "Name a color.",
    "Say one word.",
    "What is 7 + 5?",
    "Pick a number between 1 and 10.",
    "Name an animal.",
    "What is the capital of France?",
    "Give me a fruit.",
    "Yes or no?",
    "Write a greeting.",
    "Name a planet.",
    "Tell me a day of the week.",
    "Start a story.",
]
CONFIGS = [
    "mcmc:K=1,S=8",  # the old chain: one sequential proposal per step
    "mcmc:K=1,S=32",
    "mcmc:K=4,S=4",
    "mcmc:K=8,S=2",
    "mcmc:K=8,S=4",
    "mcmc:K=8,S=8",
    "mcmc:K=16,S=4",
    "smc:N=8",
    "smc:N=16",
    "smc:N=32",
    "pimh:N=4,R=4",  # particle-independent MH: R concurrent power_smc runs of N particles
    "pimh:N=8,R=2",
    "pimh:N=4,R=8",
]

Seq = tuple[int, ...]


@dataclass
class Case:
    """The exact law of one prompt's two-token continuations under p^alpha and temperature."""

    prompt: str
    ids: tuple[int, ...]
    first: list[int]  # enumerated first tokens
    log_branch: np.ndarray  # [M] alpha*log p(a) + log Z_2(a)
    log_cond: dict[int, np.ndarray]  # a -> [V] log pi(b|a) (absent for EOS)
    log_z: float  # log Z over the enumerated branches
    left_out: float  # upper bound on the p^alpha mass outside them
    tv_temperature: float

    def log_pi(self, s: Seq) -> float:
        """log pi(s); -inf outside the enumerated first tokens (so a TV errs high, never low)."""
        if s[0] not in self.first:
            return -math.inf
        base = float(self.log_branch[self.first.index(s[0])] - self.log_z)
        if s[0] in self.log_cond:
            return base + float(self.log_cond[s[0]][s[1]]) if len(s) == 2 else -math.inf
        return base if len(s) == 1 else -math.inf

    def sample(self, rng: np.random.Generator, r: int) -> list[Seq]:
        """R i.i.d. exact draws (within the enumerated mass)."""
        w = np.exp(self.log_branch - self.log_z)
        firsts = rng.choice(len(self.first), size=r, p=w / w.sum())
        out: list[Seq] = []
        for f in firsts.tolist():
            a = self.first[f]
            if a not in self.log_cond:
                out.append((a,))
                continue
            c = np.exp(self.log_cond[a])
            out.append((a, int(rng.choice(len(c), p=c / c.sum()))))
        return out

    def tv(self, draws: Sequence[Seq]) -> float:
        freq = Counter(draws)
        n = len(draws)
        seen = {s: math.exp(self.log_pi(s)) for s in freq}
        return 0.5 * (sum(abs(freq[s] / n - seen[s]) for s in freq) + 1.0 - sum(seen.values()))


@torch.inference_mode()
def build_case(engine: TorchEngine, prompt: str, m: int) -> Case:
    tok = engine.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    ids = tuple(tok(text, add_special_tokens=False)["input_ids"])
    model = engine.model
    dev = engine.device
    out = model(torch.tensor([ids], device=dev), use_cache=True)
    logp1 = torch.log_softmax(out.logits[0, -1].double(), -1).cpu()  # [V]
    top = torch.argsort(logp1, descending=True)[:m].tolist()
    live = [a for a in top if a not in engine.eos_token_ids]
    cache = out.past_key_values
    cache.batch_repeat_interleave(len(live))  # the prompt's keys and values, once per first token
    step = model(torch.tensor([[a] for a in live], device=dev), past_key_values=cache, use_cache=True)
    logp2 = torch.log_softmax(step.logits[:, -1].double(), -1).cpu()  # [len(live), V]
    log_cond: dict[int, np.ndarray] = {}
    log_z2: dict[int, float] = {a: 0.0 for a in top}
    for row, a in enumerate(live):
        la = ALPHA * logp2[row]
        lz = float(torch.logsumexp(la, -1))
        log_z2[a] = lz
        log_cond[a] = (la - lz).numpy()
    lp1 = logp1.numpy()
    log_branch = np.array([ALPHA * lp1[a] + log_z2[a] for a in top])
    log_z = float(np.logaddexp.reduce(log_branch))
    rest = np.ones(len(lp1), dtype=bool)
    rest[top] = False
    left_out = float(np.exp(np.logaddexp.reduce(ALPHA * lp1[rest]) - log_z)) if rest.any() else 0.0
    # temperature law of the first token vs pi's, over the enumerated first tokens
    lq = ALPHA * lp1 - np.logaddexp.reduce(ALPHA * lp1)
    pi1 = np.exp(log_branch - log_z)
    tv_t = 0.5 * (float(np.abs(np.exp(lq[top]) - pi1).sum()) + float(np.exp(lq[rest]).sum()))
    return Case(prompt, ids, top, log_branch, log_cond, log_z, left_out, tv_t)


class Pimh:
    """Particle-independent Metropolis-Hastings (Andrieu, Doucet and Holenstein 2010) over
    ``power_smc`` runs, for the comparison of multi-proposal schemes (issue 11, item 2).

    R runs of N particles start at once (the engine batches their R*N rows); their draws x_r
    and evidence estimates Z-hat_r (``log_evidence``) then feed an independence MH chain:
    start at run 1, move to run r with probability min(1, Z-hat_r / Z-hat_current). The chain
    leaves p^alpha invariant for every N; R = 1 is plain power_smc. Seeds: one generator per
    request seed gives the R run seeds and the R - 1 uniforms.
    """

    def __init__(self, engine: TorchEngine, runs: int) -> None:
        self.smc = PowerSmcDecoder(engine, stream_prefix=False)
        self.runs = runs

    async def decode(self, request: DecodeRequest[PowerSmcParams], stats: EngineStats) -> AsyncIterator[TokenStep]:
        rng = np.random.default_rng([request.seed or 0, 1])
        seeds = rng.integers(2**31, size=self.runs).tolist()

        async def one(seed: int) -> tuple[list[TokenStep], EngineStats]:
            own = EngineStats()
            sub = DecodeRequest(request.prompt_ids, request.max_tokens, seed, request.sampling, request.params)
            return [step async for step in self.smc.decode(sub, own)], own

        results = await asyncio.gather(*(one(seed) for seed in seeds))
        current = 0
        for r in range(1, self.runs):
            log_ratio = results[r][1].extra["log_evidence"] - results[current][1].extra["log_evidence"]
            if math.log(rng.random()) < log_ratio:
                current = r
                stats.add("accepted_proposals", 1)
            stats.add("proposals", 1)
        for _, own in results:
            stats.absorb(own)
        if self.runs > 1:
            stats.extra["acceptance_rate"] = stats.extra.get("accepted_proposals", 0.0) / (self.runs - 1)
        for step in results[current][0]:
            yield step


def make(spec: str, engine: TorchEngine) -> tuple[Decoder | Pimh, DecoderParams]:
    kind, _, rest = spec.partition(":")
    kv = {k: int(v) for k, v in (item.split("=") for item in rest.split(","))}
    if kind == "mcmc":
        return PowerMcmcDecoder(engine), PowerMcmcParams(
            alpha=ALPHA, block_size=T, mcmc_steps=kv["S"], proposals=kv["K"]
        )
    if kind == "smc":
        return PowerSmcDecoder(engine), PowerSmcParams(alpha=ALPHA, particles=kv["N"])
    if kind == "pimh":
        return Pimh(engine, kv["R"]), PowerSmcParams(alpha=ALPHA, particles=kv["N"])
    raise SystemExit(f"unknown config {spec!r}: use mcmc:K=..,S=.., smc:N=.. or pimh:N=..,R=..")


async def draw(decoder: Decoder | Pimh, params: DecoderParams, case: Case, seed: int) -> tuple[Seq, EngineStats]:
    stats = EngineStats()
    req = DecodeRequest(case.ids, T, seed, OpenAISampling(), params)
    out = tuple([s.token_id async for s in decoder.decode(req, stats)])
    return out, stats


async def run(args: argparse.Namespace) -> None:
    engine = TorchEngine.load(str(args.model), model_name="bench", max_model_len=512, device=args.device)
    try:
        cases = []
        for prompt in PROMPTS:
            c = build_case(engine, prompt, args.first_tokens)
            print(
                f"case {prompt!r}: TV(temperature, p^alpha) {c.tv_temperature:.3f}, left out <= {c.left_out:.1e}",
                file=sys.stderr,
            )
            if c.tv_temperature >= 0.5:
                cases.append(c)
            if len(cases) == args.cases:
                break
        rng = np.random.default_rng(0)
        rows = []
        print(
            "| config | "
            + " | ".join(f"TV case {k + 1}" for k in range(len(cases)))
            + " | floor | s/request | engine tokens/request | moves/step |"
        )
        print("|---" * (len(cases) + 5) + "|")
        loaded = json.loads(args.tv_from.read_text()) if args.tv_from else None
        if loaded is not None:
            args.draws = loaded["draws"]
            floors = loaded["floors"]
        else:
            floors = [statistics.mean(c.tv(c.sample(rng, args.draws)) for _ in range(args.floor_reps)) for c in cases]
        temp_row = " | ".join(f"{c.tv_temperature:.3f}" for c in cases)
        print(f"| temperature 1/alpha (exact) | {temp_row} | | | | |", flush=True)
        saved: dict[str, dict[str, object]] = {}
        for spec in args.configs:
            decoder, params = make(spec, engine)
            tvs, secs, toks, rates = [], [], [], []
            for c in cases:
                if loaded is None:
                    results = await asyncio.gather(*(draw(decoder, params, c, s) for s in range(args.draws)))
                    tvs.append(c.tv([r[0] for r in results]))
                    toks += [r[1].tokens_generated + r[1].tokens_scored for r in results]
                    rates += [r[1].extra["acceptance_rate"] for r in results if "acceptance_rate" in r[1].extra]
                for s in range(args.timing_runs):
                    t0 = time.perf_counter()
                    await draw(decoder, params, c, 10_000 + s)
                    secs.append(time.perf_counter() - t0)
            if loaded is not None:
                tvs, toks, rates = (
                    loaded["rows"][spec]["tvs"],
                    loaded["rows"][spec]["tokens"],
                    loaded["rows"][spec]["rates"],
                )
            wall = statistics.median(secs) if secs else math.nan
            rate = f"{statistics.mean(rates):.2f}" if rates else ""
            floor = statistics.mean(floors)
            rows.append((spec, tvs, wall))
            saved[spec] = {"tvs": tvs, "tokens": toks, "rates": rates, "wall": wall}
            print(
                f"| {spec} | "
                + " | ".join(f"{v:.3f}" for v in tvs)
                + f" | {floor:.3f} | {wall:.3f} | {statistics.mean(toks):.0f} | {rate} |",
                flush=True,
            )
        if args.json:
            args.json.write_text(json.dumps({"draws": args.draws, "floors": floors, "rows": saved}))
        print(
            f"\nR = {args.draws} draws per case; floor = mean TV of R exact draws ("
            + ", ".join(f"{f:.3f}" for f in floors)
            + "); cases: "
            + "; ".join(f"{k + 1}: {c.prompt!r} (left out <= {c.left_out:.1e})" for k, c in enumerate(cases))
        )
        if args.plot:
            plot(rows, floors, args.plot)
    finally:
        await engine.shutdown()


def plot(rows: list[tuple[str, list[float], float]], floors: list[float], path: Path) -> None:
    """TV vs wall time, one panel per case (the cases can be far apart in difficulty)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(floors), figsize=(6 * len(floors), 4.5), squeeze=False)
    for k, ax in enumerate(axes[0]):
        for spec, tvs, wall in rows:
            ax.scatter(wall, tvs[k], marker="o" if spec.startswith("mcmc") else "s")
            ax.annotate(spec, (wall, tvs[k]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.axhline(0.10, ls="--", c="grey", lw=0.8, label="target 0.10")
        ax.axhline(floors[k], ls=":", c="k", lw=0.8, label="floor (R exact draws)")
        ax.set_title(f"case {k + 1}")
        ax.set_xlabel("wall time per request (s)")
        ax.set_ylabel("TV to exact p^alpha")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="checkpoint directory")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--draws", type=int, default=400, help="R seeded draws per configuration and case")
    ap.add_argument("--cases", type=int, default=2, help="number of cases (prompts with TV >= 0.5)")
    ap.add_argument("--first-tokens", type=int, default=64, help="first tokens enumerated per case")
    ap.add_argument("--timing-runs", type=int, default=5, help="requests timed one at a time per case")
    ap.add_argument("--floor-reps", type=int, default=50)
    ap.add_argument("--configs", nargs="+", default=CONFIGS)
    ap.add_argument("--plot", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None, help="write the TVs, tokens and wall times here")
    ap.add_argument(
        "--tv-from",
        type=Path,
        default=None,
        help="take the TV columns from an earlier --json (run with --timing-runs 0 on a busy machine)"
        " and only time the requests",
    )
    asyncio.run(run(ap.parse_args()))


if __name__ == "__main__":
    main()
