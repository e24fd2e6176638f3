"""Sampling maths of the torch engine: pure functions on rows of logits.

``logp`` comes from the raw logits; ``logq`` from the distribution a token is actually drawn
from: temperature, then top-k, then top-p, with vLLM's semantics. :func:`sample_rows` draws one
token for every row of a decode step in a few tensor passes over [B, V] and one host transfer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from powerserve.engine.base import SamplingSpec, TokenStep


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


def _truncates(spec: SamplingSpec, vocab: int) -> bool:
    return 0 < spec.top_k < vocab or spec.top_p < 1.0


def sample_rows(
    logits: torch.Tensor, specs: Sequence[SamplingSpec], generators: Sequence[torch.Generator]
) -> list[TokenStep | Exception]:
    """Draw one token per row from its q; logits: [B, V] on any device, any float dtype.

    In float64, with s = logits - max (per row), in a few passes over [B, V] and without
    materialising a full log-softmax (only the drawn tokens' log p and log q are needed):

    1. log p of a token = s - log sum exp(s): one exp-and-sum pass for the normaliser.
    2. q's unnormalised log-probabilities z: s / T per row (T = 1 for raw rows: z = s, the
       formula of :func:`proposal_logprobs`); a truncated row (top-k/top-p, a sort each) takes
       that function's log q instead.
    3. Inverse CDF on c = cumsum(exp z): u_b ~ U[0, 1) from row b's own (CPU) generator, one
       draw per row and step, so a row's draws never depend on the rest of the batch; the token
       is the first i with c_b[i] > u_b * c_b[-1]. That i has q_b(i) > 0, and P(i) = q_b(i)
       exactly as ``torch.multinomial`` would draw it. log q of it = z - log c_b[-1]; a raw
       row reports log q = log p, the same number.
    4. One host transfer of (token, log q, log p, ok) for all rows. A row whose q has no
       positive finite mass (NaN or infinite logits) gets a RuntimeError instead of a token.
    """
    vocab = logits.shape[-1]
    top = logits.amax(-1, keepdim=True).to(torch.float64)  # [B, 1]
    shifted = logits - top  # [B, V] float64 (type promotion: one pass)
    log_norm_p = shifted.exp().sum(-1).log()  # [B]
    raw = [s.is_raw for s in specs]
    z = shifted
    if not all(raw):
        t = torch.tensor([s.temperature for s in specs], dtype=torch.float64, device=logits.device)
        z = shifted / t[:, None]
        for b, spec in enumerate(specs):
            if _truncates(spec, vocab):
                z[b] = proposal_logprobs(shifted[b], spec.temperature, spec.top_k, spec.top_p)
    cdf = z.exp().cumsum(-1)  # [B, V]
    total = cdf[:, -1]  # [B]
    u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators]).to(logits.device)
    token = torch.searchsorted(cdf, (u * total)[:, None], right=True)[:, 0].clamp_(max=vocab - 1)  # [B]
    logp = shifted.gather(-1, token[:, None])[:, 0] - log_norm_p
    logq = torch.where(torch.tensor(raw, device=logits.device), logp, z.gather(-1, token[:, None])[:, 0] - total.log())
    ok = torch.isfinite(total) & (total > 0)
    picked = torch.stack([token.to(torch.float64), logq, logp, ok.to(torch.float64)])
    out: list[TokenStep | Exception] = []
    for t_id, lq, lp, good in picked.cpu().T.tolist():  # [B, 4]
        if good:
            out.append(TokenStep(token_id=int(t_id), logq=lq, logp=lp))
        else:
            out.append(RuntimeError("probability tensor contains either `inf`, `nan` or element < 0"))
    return out


def sample_step(logits: torch.Tensor, spec: SamplingSpec, generator: torch.Generator) -> TokenStep:
    """One row of :func:`sample_rows`: logits [V]; raises where that returns an error."""
    step = sample_rows(logits[None], [spec], [generator])[0]
    if isinstance(step, Exception):
        raise step
    return step
