"""``power_lookahead``: autoregressive power sampling with rollout lookahead (Ji et al., 2026).

The power distribution factorises exactly into next-step conditionals (their Theorem 3.1):

    p_alpha(b | h) = p(b | h)^alpha * zeta(h, b) / sum_b' p(b' | h)^alpha * zeta(h, b'),
    zeta(h, b)     = sum_f p(f | h, b)^alpha = E_{f ~ p(. | h, b)} [ p(f | h, b)^(alpha - 1) ],

where b is the next token or block after the prefix h and f ranges over the futures that
complete h + b. Sampling b from p_alpha(b | h) block after block therefore draws exactly from
p(x)^alpha / Z; temperature 1/alpha is the special case zeta = 1. This decoder estimates
zeta from M rollouts of the raw model (temperature 1) per candidate.

What is approximated (and where it becomes exact):

1. Candidates. ``block_size = 1``: the ``top_k`` most likely next tokens under p (from
   ``engine.top_logprobs``); the mass of all other tokens is dropped (exact when top_k covers
   every token with non-negligible weight). ``block_size > 1``: ``top_k`` blocks drawn
   independently from q (temperature 1/alpha, no truncation), weighted by the self-normalised
   importance ratio p(b)^alpha / q(b) (identical draws merged, their weights added): a
   sampling-importance-resampling step that tends to the next-block power distribution as
   top_k grows.
2. Horizon. zeta is estimated over futures of at most ``rollout_tokens`` tokens rather than the
   whole remaining budget (exact when rollout_tokens >= the tokens left after the candidate).
   A candidate that ends with EOS or fills the budget has zeta = 1 exactly, without rollouts;
   ``rollout_tokens = 0`` sets zeta = 1 everywhere (temperature 1/alpha over the candidates).
3. Monte Carlo. zeta_hat = mean_m p(f_m)^(alpha-1) is unbiased, but the normalised
   probability, a ratio of such estimates, is biased by O(1/M). The jackknife
   P_jk = M * P_hat - (M - 1) * mean_s P_hat^(-s) (P_hat^(-s): rollout s of every candidate
   left out) removes the O(1/M) term; its rare negative entries are clipped to 0 and the rest
   renormalised.

Each chosen block is final, so tokens stream as they are chosen. All randomness -- the choice
of each block and the seed of every engine call -- comes from one generator seeded with
``request.seed``.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from pydantic import Field

from powerserve.decoders.base import Decoder, DecodeRequest
from powerserve.decoders.power_common import PowerParams, engine_seed, final_steps, proposal_spec, start_counters
from powerserve.engine.base import Continuation, EngineStats, SamplingSpec, TokenStep


class PowerLookaheadParams(PowerParams):
    top_k: int = Field(
        8, ge=1, le=64, description="candidates per step: top tokens (block_size 1) or blocks drawn from q"
    )
    rollouts: int = Field(8, ge=1, le=64, description="rollouts M of the raw model per candidate")
    block_size: int = Field(16, ge=1, le=4096, description="tokens chosen per step (1: token by token)")
    rollout_tokens: int = Field(
        16, ge=0, le=4096, description="lookahead horizon of each rollout in tokens (0: no lookahead)"
    )
    jackknife: bool = Field(True, description="jackknife correction of the O(1/M) ratio bias")


# --- the maths ----------------------------------------------------------------------------------


def _log_mean_exp(x: np.ndarray, axis: int) -> np.ndarray:
    top = np.max(x, axis=axis, keepdims=True)
    return np.asarray(np.log(np.mean(np.exp(x - top), axis=axis)) + np.squeeze(top, axis=axis))


def _softmax(x: np.ndarray) -> np.ndarray:
    w = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return np.asarray(w / w.sum(axis=-1, keepdims=True))


def lookahead_probs(
    log_base: np.ndarray, future_logp: np.ndarray, known: np.ndarray, alpha: float, jackknife: bool
) -> np.ndarray:
    """Probabilities [C] of choosing each of C candidates.

    ``log_base`` [C]: log of the candidate's weight without the future term (alpha * log p(b)
    for top tokens; log count + alpha * log p(b) - log q(b) for sampled blocks).
    ``future_logp`` [C, M]: sum of log p over each rollout after the candidate (rows where
    ``known`` [C] is True are ignored: their zeta is 1).

        log zeta_hat(c) = log mean_m exp((alpha - 1) * future_logp[c, m])
        P_hat(c)        = softmax_c(log_base + log zeta_hat)
        P_jk(c)         = M * P_hat(c) - (M - 1) * mean_s P_hat^(-s)(c), clipped at 0, renormalised
    """
    m = future_logp.shape[1]
    if m == 0 or known.all():
        return _softmax(log_base)
    scaled = (alpha - 1.0) * future_logp  # [C, M]
    log_zeta = np.where(known, 0.0, _log_mean_exp(scaled, axis=1))  # [C]
    p_hat = _softmax(log_base + log_zeta)
    if not jackknife or m < 2:
        return p_hat
    leave_out = np.stack([np.delete(scaled, s, axis=1) for s in range(m)])  # [M, C, M-1]
    log_zeta_loo = np.where(known, 0.0, _log_mean_exp(leave_out, axis=2))  # [M, C]
    p_loo = _softmax(log_base + log_zeta_loo)  # [M, C]
    p_jk = np.clip(m * p_hat - (m - 1) * p_loo.mean(axis=0), 0.0, None)
    total = p_jk.sum()
    return p_jk / total if total > 0 and math.isfinite(total) else p_hat


# --- candidates ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Candidate:
    """A possible next token or block with its per-token log p and log q, and its base weight."""

    token_ids: tuple[int, ...]
    logp: tuple[float, ...]
    logq: tuple[float, ...]
    log_base: float


_COUNTERS = (
    "steps",
    "candidates",
    "candidate_tokens",
    "rollouts",
    "rollout_tokens",
    "tokens_proposed",
    "tokens_accepted",
)


class PowerLookaheadDecoder(Decoder[PowerLookaheadParams]):
    name = "power_lookahead"
    description = (
        "Block-wise sampling of the next-block power distribution p^alpha * zeta, the future term zeta "
        "estimated from raw-model rollouts per candidate with a jackknife; streams each chosen block. "
        "Ignores temperature/top_p/top_k."
    )
    params_model = PowerLookaheadParams
    streams_tokens = True
    cheap_params: ClassVar[dict[str, Any]] = {
        "alpha": 4,
        "top_k": 2,
        "rollouts": 2,
        "block_size": 4,
        "rollout_tokens": 4,
    }

    def expected_cost(self, params: PowerLookaheadParams, max_tokens: int) -> float:
        """Upper bound on engine tokens (generated + scored) for one sequence.

        With T = max_tokens, B, K, M, H the parameters and ceil(T/B) steps: every step runs at
        most K*M rollouts of H tokens; candidates cost one scored token per step for B = 1
        (a top-log-probability call), else K blocks of up to B tokens, generated and (on an
        engine that cannot return log p while sampling) scored again:

            ceil(T/B) * K*M*H + (T if B == 1 else 2*K*T)
        """
        steps = -(-max_tokens // params.block_size)
        rollouts = steps * params.top_k * params.rollouts * params.rollout_tokens
        candidates = max_tokens if params.block_size == 1 else 2 * params.top_k * max_tokens
        return float(rollouts + candidates)

    async def decode(
        self, request: DecodeRequest[PowerLookaheadParams], stats: EngineStats
    ) -> AsyncIterator[TokenStep]:
        """Choose the output block by block, yielding each block once chosen.

        While fewer than T = max_tokens tokens are out and the last is not EOS, with b =
        min(block_size, tokens left) and h the prompt plus the output so far:

        1. Candidates (approximation 1 of the module docstring) with their base log-weights.
        2. Rollouts: for each candidate c that neither ends with EOS nor fills the budget, M
           continuations of h + c from the raw model (temperature 1), of min(rollout_tokens,
           tokens left after c) tokens each, all concurrently; keep each one's sum of log p.
        3. P = :func:`lookahead_probs` (zeta_hat, jackknife); draw one candidate from P, yield
           its tokens.
        """
        params = request.params
        rng = np.random.default_rng(request.seed)
        eos = self.engine.eos_token_ids
        start_counters(stats, _COUNTERS)
        output: list[int] = []
        while len(output) < request.max_tokens and not (output and output[-1] in eos):
            context = [*request.prompt_ids, *output]
            left = request.max_tokens - len(output)
            if params.block_size == 1:
                candidates = await self._top_tokens(context, params, stats)
            else:
                candidates = await self._sampled_blocks(context, min(params.block_size, left), params, rng, stats)
            horizons = [
                0 if c.token_ids[-1] in eos else min(params.rollout_tokens, left - len(c.token_ids)) for c in candidates
            ]
            future = await self._rollouts(context, candidates, horizons, params, rng, stats)
            known = np.array([h == 0 for h in horizons])
            log_base = np.array([c.log_base for c in candidates])
            probs = lookahead_probs(log_base, future, known, params.alpha, params.jackknife)
            index = int(rng.choice(len(candidates), p=probs))
            chosen = candidates[index]
            logq = (math.log(probs[index]),) if params.block_size == 1 else chosen.logq
            stats.add("steps", 1)
            stats.add("candidates", len(candidates))
            stats.add("tokens_accepted", len(chosen.token_ids))
            output.extend(chosen.token_ids)
            for step in final_steps(chosen.token_ids, logq, chosen.logp):
                yield step

    # --- steps of decode ----------------------------------------------------------------------

    async def _top_tokens(
        self, context: Sequence[int], params: PowerLookaheadParams, stats: EngineStats
    ) -> list[_Candidate]:
        """The top_k next tokens under p; base log-weight alpha * log p.

        ``top_logprobs`` reports the distribution at each position of the tokens it is given,
        so one placeholder token (an EOS id; its own log-probability is not used) is appended
        to the context to read the distribution after it. log q is filled in once a token is
        chosen: the log-probability with which it was chosen.
        """
        placeholder = min(self.engine.eos_token_ids) if self.engine.eos_token_ids else 0
        top = (await self.engine.top_logprobs(context, [placeholder], params.top_k, stats))[0]
        return [_Candidate((tok,), (lp,), (math.nan,), params.alpha * lp) for tok, lp in top.items()]

    async def _sampled_blocks(
        self,
        context: Sequence[int],
        length: int,
        params: PowerLookaheadParams,
        rng: np.random.Generator,
        stats: EngineStats,
    ) -> list[_Candidate]:
        """top_k blocks drawn from q; identical ones merged; base log-weight
        log(count) + alpha * S_p - S_q (the importance ratio p^alpha / q)."""
        spec = [proposal_spec(params.alpha, length, engine_seed(rng)) for _ in range(params.top_k)]
        draws = await _gather(self.engine.sample(context, s, stats) for s in spec)
        merged: dict[tuple[int, ...], tuple[Continuation, int]] = {}
        for d in draws:
            key = tuple(d.token_ids)
            merged[key] = (d, merged[key][1] + 1 if key in merged else 1)
        stats.add("candidate_tokens", sum(len(d.token_ids) for d in draws))
        stats.add("tokens_proposed", sum(len(d.token_ids) for d in draws))
        return [
            _Candidate(
                key,
                tuple(d.logp),
                tuple(d.logq),
                math.log(count) + params.alpha * math.fsum(d.logp) - math.fsum(d.logq),
            )
            for key, (d, count) in merged.items()
        ]

    async def _rollouts(
        self,
        context: Sequence[int],
        candidates: list[_Candidate],
        horizons: list[int],
        params: PowerLookaheadParams,
        rng: np.random.Generator,
        stats: EngineStats,
    ) -> np.ndarray:
        """Sum of log p of each of M raw-model rollouts per candidate [C, M] (0 where horizon 0)."""
        m = params.rollouts if any(horizons) else 0
        future = np.zeros((len(candidates), m))
        jobs: list[tuple[int, int, Sequence[int], SamplingSpec]] = []
        for i, (c, h) in enumerate(zip(candidates, horizons, strict=True)):
            if h == 0:
                continue
            prefix = [*context, *c.token_ids]
            for j in range(m):
                jobs.append((i, j, prefix, SamplingSpec(max_tokens=h, seed=engine_seed(rng))))
        results = await _gather(self.engine.sample(prefix, spec, stats) for _, _, prefix, spec in jobs)
        for (i, j, _, _), cont in zip(jobs, results, strict=True):
            future[i, j] = math.fsum(cont.logp)
        tokens = sum(len(cont.token_ids) for cont in results)
        stats.add("rollouts", len(jobs))
        stats.add("rollout_tokens", tokens)
        stats.add("tokens_proposed", tokens)
        return future


async def _gather(calls: Iterable[Coroutine[Any, Any, Continuation]]) -> list[Continuation]:
    """Run engine calls concurrently; on the first failure cancel the rest."""
    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(call) for call in calls]
    return [t.result() for t in tasks]
