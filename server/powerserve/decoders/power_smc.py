"""``power_smc``: sequential Monte Carlo power sampling (Power-SMC, Azizi et al., 2026).

N particles are decoded side by side from the proposal q (the model at temperature 1/alpha,
no truncation) and weighted towards the sequence-level target p(x)^alpha / Z; when the
weights degenerate the population is resampled, and the answer is one particle drawn in
proportion to its final weight. The output distribution tends to p^alpha as N grows (the
bias of a finite population is O(1/N)); N = 1 is plain temperature-1/alpha sampling.

The decided prefix streams: particles only grow, and resampling only replaces a particle by a
copy of another, so the tokens that every live particle shares from the start can never change
and are part of whichever particle is finally drawn. They are yielded as soon as they are
shared (typically once the population descends from one ancestor), without touching the
weights or the random stream, so the output law and the tokens for a seed are the same as when
everything is yielded at the end (``stream_prefix=False``).

Every random number comes from one generator seeded with ``request.seed``, including the
seed of each engine call, so a seed reproduces the whole run. Only the :class:`Engine`
interface is used: concurrent ``generate`` iterators (batched by engines that batch), and
``score`` for engines that do not report log p while sampling.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from pydantic import Field

from powerserve.decoders.base import Decoder, DecodeRequest
from powerserve.decoders.power_common import PowerParams, engine_seed, final_steps, proposal_spec, start_counters
from powerserve.decoders.smc_weights import (
    effective_sample_size,
    log_mean_exp,
    normalise,
    ramp_alpha,
    systematic_resample,
)
from powerserve.engine.base import Engine, EngineStats, TokenStep

__all__ = [
    "PowerSmcDecoder",
    "PowerSmcParams",
    "effective_sample_size",
    "normalise",
    "ramp_alpha",
    "systematic_resample",
]


class PowerSmcParams(PowerParams):
    particles: int = Field(16, ge=1, le=64, description="number of particles N decoded together")
    resample_interval: int = Field(
        8, ge=1, le=4096, description="tokens between two checks of the effective sample size"
    )
    ess_threshold: float = Field(
        0.5, ge=0.0, le=1.0, description="resample when ESS < ess_threshold * N (0: never resample)"
    )
    ramp_tokens: int = Field(
        16, ge=0, le=4096, description="alpha is ramped from 1 to alpha over this many tokens (0: no ramp)"
    )


# --- particles ----------------------------------------------------------------------------------


@dataclass(slots=True)
class _Particle:
    """Generated tokens with raw log p (None until scored) and proposal log q.

    ``sum_p`` and ``sum_q`` are the running sums S_p (over the log p known so far) and S_q.
    ``base`` is alpha_r * S_p - S_q at the last resampling r of this particle's lineage (0 at
    the start), so the particle's log-weight at time t is alpha_t * S_p - S_q - base.
    """

    token_ids: list[int] = field(default_factory=list)
    logp: list[float | None] = field(default_factory=list)
    logq: list[float] = field(default_factory=list)
    sum_p: float = 0.0
    sum_q: float = 0.0
    base: float = 0.0
    done: bool = False
    stream: AsyncIterator[TokenStep] | None = None

    def append(self, step: TokenStep) -> None:
        self.token_ids.append(step.token_id)
        self.logq.append(step.logq)
        self.logp.append(step.logp)
        self.sum_q += step.logq
        if step.logp is not None:
            self.sum_p += step.logp

    def copy(self) -> _Particle:
        return _Particle(
            list(self.token_ids), list(self.logp), list(self.logq), self.sum_p, self.sum_q, self.base, self.done
        )

    def target(self, alpha_t: float) -> float:
        """alpha_t * S_p - S_q (once every log p is known)."""
        return alpha_t * self.sum_p - self.sum_q

    async def close(self) -> None:
        stream, self.stream = self.stream, None
        if stream is not None:
            await stream.aclose()  # type: ignore[attr-defined]


def _decided_steps(particles: Sequence[_Particle], start: int) -> list[TokenStep]:
    """Tokens from position ``start`` on that every particle has, with the same id, at the same
    place: the part of the shared prefix not yet decided. Log p and log q are the first
    particle's (copies of one ancestor carry the same values)."""
    first = particles[0]
    end = min(len(p.token_ids) for p in particles)
    k = start
    while k < end and all(p.token_ids[k] == first.token_ids[k] for p in particles):
        k += 1
    return [TokenStep(token_id=first.token_ids[i], logq=first.logq[i], logp=first.logp[i]) for i in range(start, k)]


class PowerSmcDecoder(Decoder[PowerSmcParams]):
    name = "power_smc"
    description = (
        "Sequential Monte Carlo power sampling of p(x)^alpha: N particles from temperature 1/alpha, "
        "weighted and resampled; streams the prefix all particles share, the rest at the end. "
        "Ignores temperature/top_p/top_k."
    )
    params_model = PowerSmcParams
    streams_tokens = False  # only the decided prefix streams, not every sampled token
    cheap_params: ClassVar[dict[str, Any]] = {"alpha": 4, "particles": 4, "resample_interval": 4, "ramp_tokens": 4}

    def __init__(self, engine: Engine, stream_prefix: bool = True) -> None:
        """``stream_prefix=False`` holds every token back to the end (the same tokens, later)."""
        super().__init__(engine)
        self.stream_prefix = stream_prefix

    def expected_cost(self, params: PowerSmcParams, max_tokens: int) -> float:
        """Upper bound on engine tokens (generated + scored): 2 * N * max_tokens.

        Each particle generates at most max_tokens tokens over its lineage: a particle that
        copies an ancestor continues from the ancestor's length, so resampling adds no
        generated tokens (only the re-fed prefix, which the engine's prefix cache serves and
        which is not counted as generated). An engine that cannot return log p while sampling
        scores every generated token once more, hence the factor 2.
        """
        return 2.0 * params.particles * max_tokens

    async def decode(self, request: DecodeRequest[PowerSmcParams], stats: EngineStats) -> AsyncIterator[TokenStep]:
        """Run the particle system, yielding the decided prefix as it grows and the rest of the
        chosen particle's tokens at the end.

        With T = max_tokens, R = min(ramp_tokens, T) and alpha_t = 1 + (alpha-1)*min(1, t/R):

        1. Start N particles, each an engine stream from the prompt with q (temperature 1/alpha,
           no truncation), log-weight 0.
        2. Advance every unfinished particle by ``resample_interval`` tokens (fewer at EOS or at
           T), all streams concurrently. Finished particles (EOS) are not extended.
        3. Reweight: the log-weight of a particle is alpha_t*S_p - S_q - base, i.e. per new token
           it gains alpha_t*log p - log q, and per step of the ramp every particle, finished or
           not, gains (alpha_t - alpha_{t-1})*S_p -- the correction that makes the target at
           time t exactly p(x_{1:t})^alpha_t, hence p(x)^alpha once the ramp is over.
        4. If ESS = (sum w)^2 / sum w^2 < ess_threshold * N (and decoding goes on), resample
           systematically: each new particle copies an ancestor's tokens; all weights reset to
           equal (base = alpha_t*S_p - S_q). An ancestor kept once keeps its stream; one copied
           several times has its stream closed and every copy restarts from its tokens, which
           the engine serves from its prefix cache (shared KV on torch, prefix caching on vLLM).
        5. After each advance (and its scoring), yield the decided prefix: the longest run of
           tokens that all N particles share, beyond what was yielded before (with
           ``stream_prefix``; otherwise nothing is yielded before the end).
        6. Repeat 2-5 until every particle has ended (EOS or T tokens). Then every log-weight is
           taken at alpha (alpha*S_p - S_q - base, also when all ended before the ramp did),
           one particle is drawn with probability proportional to its weight, and its tokens
           beyond the decided prefix are yielded.

        ``log_evidence`` is log Z-hat, the unbiased SMC estimate of Z = sum_x p(x)^alpha: the sum
        over the epochs (each ends in a resampling or the draw) of log of the mean weight.
        """
        params = request.params
        rng = np.random.default_rng(request.seed)
        n, limit = params.particles, request.max_tokens
        ramp = min(params.ramp_tokens, limit)
        start_counters(stats, ("particles", "resamples", "restarts", "ess_checks", "tokens_proposed"))
        stats.add("particles", n)
        ess_min = 1.0
        log_evidence = 0.0  # log Z-hat: the product of the mean weights of every resampling epoch

        particles = [_Particle() for _ in range(n)]
        decided: list[TokenStep] = []  # the shared prefix, yielded (or held back) so far
        try:
            for p in particles:
                self._start(p, request, rng, stats)
            t = 0
            while t < limit and not all(p.done for p in particles):
                k = min(params.resample_interval, limit - t)
                async with asyncio.TaskGroup() as group:
                    for p in particles:
                        if not p.done:
                            group.create_task(self._advance(p, k, stats))
                t += k
                await self._score_missing(particles, request.prompt_ids, stats)
                new = _decided_steps(particles, len(decided))
                decided += new
                stats.extra["tokens_decided"] = len(decided)
                if self.stream_prefix:
                    for step in new:
                        yield step
                if t >= limit or all(p.done for p in particles):
                    break  # the final draw below weighs the particles: no point resampling now
                alpha_t = ramp_alpha(t, params.alpha, ramp)
                logw = np.array([p.target(alpha_t) - p.base for p in particles])
                ess = effective_sample_size(logw)
                ess_min = min(ess_min, ess / n)
                stats.add("ess_checks", 1)
                if ess < params.ess_threshold * n:
                    log_evidence += log_mean_exp(logw)
                    particles = await self._resample(particles, normalise(logw), alpha_t, request, rng, stats)

            logw = np.array([p.target(params.alpha) - p.base for p in particles])
            log_evidence += log_mean_exp(logw)
            chosen = particles[int(rng.choice(n, p=normalise(logw)))]
        finally:
            for p in particles:
                with contextlib.suppress(Exception):
                    await p.close()
        stats.extra["ess_min"] = ess_min
        stats.extra["log_evidence"] = log_evidence
        stats.add("tokens_accepted", len(chosen.token_ids))
        assert chosen.token_ids[: len(decided)] == [s.token_id for s in decided], "a decided token changed"
        start = len(decided) if self.stream_prefix else 0  # off: the chosen particle's own steps
        for step in final_steps(chosen.token_ids[start:], chosen.logq[start:], chosen.logp[start:]):
            yield step

    # --- steps of decode ----------------------------------------------------------------------

    def _start(
        self, p: _Particle, request: DecodeRequest[PowerSmcParams], rng: np.random.Generator, stats: EngineStats
    ) -> None:
        """Open p's engine stream from prompt + p's tokens, for the rest of the budget."""
        spec = proposal_spec(request.params.alpha, request.max_tokens - len(p.token_ids), engine_seed(rng))
        p.stream = self.engine.generate([*request.prompt_ids, *p.token_ids], spec, stats)

    async def _advance(self, p: _Particle, k: int, stats: EngineStats) -> None:
        """Pull up to k tokens from p's stream; at EOS mark p done and close its stream."""
        assert p.stream is not None
        for _ in range(k):
            try:
                step = await anext(p.stream)
            except StopAsyncIteration:  # the stream ended at its max_tokens: the budget is used up
                p.done = True
                break
            p.append(step)
            stats.add("tokens_proposed", 1)
            if step.token_id in self.engine.eos_token_ids:
                p.done = True
                break
        if p.done:
            await p.close()  # lets the engine keep the sequence's KV for copies of it

    async def _score_missing(self, particles: list[_Particle], prompt: Sequence[int], stats: EngineStats) -> None:
        """Fill in log p where the engine did not report it: one score call per particle."""

        async def fill(p: _Particle) -> None:
            first = next(i for i, v in enumerate(p.logp) if v is None)
            scored = await self.engine.score([*prompt, *p.token_ids[:first]], p.token_ids[first:], stats)
            p.logp[first:] = scored
            p.sum_p += math.fsum(scored)

        async with asyncio.TaskGroup() as group:
            for p in particles:
                if any(v is None for v in p.logp):
                    group.create_task(fill(p))

    async def _resample(
        self,
        particles: list[_Particle],
        probs: np.ndarray,
        alpha_t: float,
        request: DecodeRequest[PowerSmcParams],
        rng: np.random.Generator,
        stats: EngineStats,
    ) -> list[_Particle]:
        """Systematic resampling (step 4 of :meth:`decode`); returns the new population."""
        ancestors = systematic_resample(probs, float(rng.random()))
        copies = np.bincount(ancestors, minlength=len(particles))
        # Close first, so the engine has the ancestors' KV by the time their copies start.
        for p, c in zip(particles, copies, strict=True):
            if c != 1:
                await p.close()
        population: list[_Particle] = []
        for a in ancestors.tolist():
            p = particles[a]
            if copies[a] == 1:
                population.append(p)  # the one survivor keeps its stream
                continue
            child = p.copy()
            if not child.done:
                self._start(child, request, rng, stats)
                stats.add("restarts", 1)
            population.append(child)
        for p in population:
            p.base = p.target(alpha_t)
        stats.add("resamples", 1)
        return population
