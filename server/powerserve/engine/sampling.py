"""Sampling maths of the torch engine: pure functions on one row of logits.

``logp`` comes from the raw logits; ``logq`` from the distribution a token is actually drawn
from: temperature, then top-k, then top-p, with vLLM's semantics.
"""

from __future__ import annotations

import torch

from powerserve.engine.base import SamplingSpec, TokenStep

# --- sampling maths: pure functions on one row of logits -------------------------------------


def proposal_logprobs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Log-probabilities of the distribution q that a token is drawn from.

    logits: [V], float64. Steps (vLLM's order and tie rules):

    1. Temperature: z = (logits - max logits) / temperature. The shift leaves the softmax as it
       is and keeps a tiny temperature (5e-324 is a valid request) from overflowing to
       inf - inf = NaN: it becomes greedy decoding.
    2. Top-k (k > 0): drop every token whose z is below the k-th largest z (ties are kept).
    3. Top-p (p < 1): sort the survivors by ascending probability; drop those whose cumulative
       probability is <= 1 - p, always keeping the most likely one. What is left is the
       smallest set of most likely tokens whose probability mass reaches p.
    4. log q = log_softmax(z) over the survivors (-inf elsewhere).
    """
    z = (logits - logits.max()) / temperature
    vocab = z.shape[-1]
    if (0 < top_k < vocab) or top_p < 1.0:
        z_sorted, order = z.sort(descending=False)
        if 0 < top_k < vocab:
            kth_largest = z_sorted[vocab - top_k]
            z_sorted = z_sorted.masked_fill(z_sorted < kth_largest, -float("inf"))
        if top_p < 1.0:
            cumulative = z_sorted.softmax(-1).cumsum(-1)
            drop = cumulative <= 1.0 - top_p
            drop[-1] = False
            z_sorted = z_sorted.masked_fill(drop, -float("inf"))
        z = torch.empty_like(z).scatter_(0, order, z_sorted)
    return torch.log_softmax(z, dim=-1)


def sample_step(logits: torch.Tensor, spec: SamplingSpec, generator: torch.Generator) -> TokenStep:
    """Draw one token from q (see :func:`proposal_logprobs`); logits: [V] on the CPU.

    log p is the raw model's log_softmax(logits) at the drawn token.
    """
    logits = logits.to(torch.float64)
    logp_all = torch.log_softmax(logits, dim=-1)
    logq_all = logp_all if spec.is_raw else proposal_logprobs(logits, spec.temperature, spec.top_k, spec.top_p)
    token = int(torch.multinomial(logq_all.exp(), 1, generator=generator).item())
    return TokenStep(token_id=token, logq=float(logq_all[token]), logp=float(logp_all[token]))
