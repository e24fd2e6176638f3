"""An exact engine over explicit next-token tables, and enumeration of continuation spaces.

``TabularEngine`` implements :class:`Engine` from a function prefix -> raw next-token
log-probabilities (e.g. read once from a tiny Llama with :func:`model_table`). It samples with
numpy from exactly the tempered distribution and reports exact log p and log q, so statistical
tests of decoders run in milliseconds and their only error is Monte Carlo noise.

``enumerate_continuations`` lists every complete continuation (ending with EOS, or reaching
``max_tokens``) with its log-probability at a given temperature, from the same tables: the
ground truth that decoders are compared with.
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import AsyncIterator, Callable, Sequence

import numpy as np
import torch

from powerserve.engine.base import Engine, EngineStats, SamplingSpec, TokenStep

# prefix (prompt + generated token ids) -> raw next-token log-probabilities, shape [V]
NextLogprobs = Callable[[tuple[int, ...]], np.ndarray]


def tempered(logp: np.ndarray, temperature: float) -> np.ndarray:
    """log softmax(logp / temperature): the untruncated sampling distribution at a temperature."""
    z = logp / temperature
    z = z - z.max()
    return z - np.log(np.exp(z).sum())


def model_table(model: torch.nn.Module) -> NextLogprobs:
    """Raw next-token log-probabilities of a Hugging Face causal LM, memoised per prefix."""
    cache: dict[tuple[int, ...], np.ndarray] = {}

    def next_logprobs(prefix: tuple[int, ...]) -> np.ndarray:
        if prefix not in cache:
            with torch.no_grad():
                logits = model(torch.tensor([prefix])).logits[0, -1].double()  # [V]
            cache[prefix] = torch.log_softmax(logits, -1).numpy()
        return cache[prefix]

    return next_logprobs


def enumerate_continuations(
    next_logprobs: NextLogprobs,
    prompt: Sequence[int],
    eos_token_ids: frozenset[int],
    max_tokens: int,
    temperature: float = 1.0,
) -> dict[tuple[int, ...], float]:
    """Every complete continuation of ``prompt`` with its log-probability at ``temperature``."""
    out: dict[tuple[int, ...], float] = {}

    def walk(seq: tuple[int, ...], logprob: float) -> None:
        lp = tempered(next_logprobs((*prompt, *seq)), temperature)
        for tok, lt in enumerate(lp):
            nxt, total = (*seq, tok), logprob + float(lt)
            if tok in eos_token_ids or len(nxt) == max_tokens:
                out[nxt] = total
            else:
                walk(nxt, total)

    walk((), 0.0)
    return out


def power_distribution(logp: dict[tuple[int, ...], float], alpha: float) -> dict[tuple[int, ...], float]:
    """p(x)^alpha / Z over an enumerated continuation space."""
    keys = list(logp)
    w = alpha * np.array([logp[k] for k in keys])
    w = np.exp(w - w.max())
    return dict(zip(keys, (w / w.sum()).tolist(), strict=True))


def total_variation(a: dict[tuple[int, ...], float], b: dict[tuple[int, ...], float]) -> float:
    return 0.5 * sum(abs(a.get(k, 0.0) - b.get(k, 0.0)) for k in a.keys() | b.keys())


class TabularEngine(Engine):
    """Exact sampling and scoring from ``next_logprobs``; temperature only (no top-k/top-p).

    With ``logp_while_sampling=False`` it yields ``logp=None`` like an engine that only knows
    the sampling distribution, so :meth:`Engine.sample` has to score the tokens afterwards.
    """

    name = "torch"

    def __init__(
        self,
        next_logprobs: NextLogprobs,
        eos_token_ids: frozenset[int],
        max_model_len: int = 64,
        logp_while_sampling: bool = True,
    ) -> None:
        self.next_logprobs = next_logprobs
        self.logp_while_sampling = logp_while_sampling
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.model_name = "tabular"
        self.tokenizer = None
        # (prefix, temperature) -> (raw log p [V], log q [V], cumulative q [V])
        self._rows: dict[tuple[tuple[int, ...], float], tuple[np.ndarray, list[float], list[float]]] = {}

    def _row(self, prefix: tuple[int, ...], temperature: float) -> tuple[np.ndarray, list[float], list[float]]:
        key = (prefix, temperature)
        if key not in self._rows:
            raw = self.next_logprobs(prefix)
            lq = tempered(raw, temperature)
            self._rows[key] = (raw, lq.tolist(), list(itertools.accumulate(np.exp(lq).tolist())))
        return self._rows[key]

    async def generate(
        self, prompt_ids: Sequence[int], spec: SamplingSpec, stats: EngineStats
    ) -> AsyncIterator[TokenStep]:
        assert spec.top_k == 0 and spec.top_p >= 1.0, "TabularEngine does not truncate"
        rng = random.Random(spec.seed)  # None: fresh entropy
        seq = tuple(prompt_ids)
        stats.calls += 1
        for _ in range(spec.max_tokens):
            raw, lq, cdf = self._row(seq, spec.temperature)
            tok = min(bisect.bisect_right(cdf, rng.random() * cdf[-1]), len(lq) - 1)
            stats.tokens_generated += 1
            logp = float(raw[tok]) if self.logp_while_sampling else None
            yield TokenStep(token_id=tok, logq=float(lq[tok]), logp=logp)
            if tok in self.eos_token_ids:
                return
            seq = (*seq, tok)

    async def score(self, prompt_ids: Sequence[int], token_ids: Sequence[int], stats: EngineStats) -> list[float]:
        stats.calls += 1
        stats.tokens_scored += len(token_ids)
        seq, out = tuple(prompt_ids), []
        for tok in token_ids:
            out.append(float(self.next_logprobs(seq)[tok]))
            seq = (*seq, tok)
        return out

    async def shutdown(self) -> None:
        pass
