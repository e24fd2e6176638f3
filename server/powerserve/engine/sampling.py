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


def proposal_batch(logits: torch.Tensor, logp: torch.Tensor, specs: Sequence[SamplingSpec]) -> torch.Tensor:
    """log q for every row: [B, V] float64, given logits [B, V] float64 and logp = their log_softmax.

    Raw rows reuse ``logp`` (no pass at all when every row is raw). Rows with a temperature and
    no truncation share one pass, log_softmax((logits - max) / T) with T per row, the formula of
    :func:`proposal_logprobs`. Truncated rows (a sort each) go through that function one by one.
    """
    vocab = logits.shape[-1]
    tempered = [b for b, s in enumerate(specs) if not s.is_raw and not _truncates(s, vocab)]
    truncated = [b for b, s in enumerate(specs) if _truncates(s, vocab)]
    if not tempered and not truncated:
        return logp
    logq = logp.clone()
    if tempered:
        index = torch.tensor(tempered, device=logits.device)
        t = torch.tensor([specs[b].temperature for b in tempered], dtype=logits.dtype, device=logits.device)
        rows = logits.index_select(0, index)  # [b, V]
        z = (rows - rows.amax(-1, keepdim=True)) / t[:, None]
        logq.index_copy_(0, index, torch.log_softmax(z, dim=-1))
    for b in truncated:
        s = specs[b]
        logq[b] = proposal_logprobs(logits[b], s.temperature, s.top_k, s.top_p)
    return logq


def sample_rows(
    logits: torch.Tensor, specs: Sequence[SamplingSpec], generators: Sequence[torch.Generator]
) -> list[TokenStep | Exception]:
    """Draw one token per row from its q; logits: [B, V] on any device, any float dtype.

    1. log p = log_softmax(logits) in float64: one pass over [B, V].
    2. log q by :func:`proposal_batch` (only the rows that are not raw cost a pass).
    3. Inverse CDF: u_b ~ U[0, 1) from row b's own (CPU) generator, one draw per row and step,
       so a row's draws never depend on the rest of the batch; the token is the first i with
       cumsum(q_b)[i] > u_b * sum(q_b). That i has q_b(i) > 0, and P(i) = q_b(i) exactly as
       ``torch.multinomial`` would draw it.
    4. One host transfer of (token, log q, log p, ok) for all rows. A row whose q has no
       positive finite mass (NaN or infinite logits) gets a RuntimeError instead of a token.
    """
    logits = logits.to(torch.float64)
    logp = torch.log_softmax(logits, dim=-1)  # [B, V]
    logq = proposal_batch(logits, logp, specs)  # [B, V]
    cdf = logq.exp().cumsum(-1)  # [B, V]
    total = cdf[:, -1]  # [B]
    u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators]).to(logits.device)
    token = torch.searchsorted(cdf, (u * total)[:, None], right=True)[:, 0].clamp_(max=cdf.shape[-1] - 1)  # [B]
    ok = torch.isfinite(total) & (total > 0)
    picked = torch.stack(
        [
            token.to(torch.float64),
            logq.gather(-1, token[:, None])[:, 0],
            logp.gather(-1, token[:, None])[:, 0],
            ok.to(torch.float64),
        ]
    )
    out: list[TokenStep | Exception] = []
    for t, lq, lp, good in picked.cpu().T.tolist():  # [B, 4]
        if good:
            out.append(TokenStep(token_id=int(t), logq=lq, logp=lp))
        else:
            out.append(RuntimeError("probability tensor contains either `inf`, `nan` or element < 0"))
    return out


def sample_step(logits: torch.Tensor, spec: SamplingSpec, generator: torch.Generator) -> TokenStep:
    """One row of :func:`sample_rows`: logits [V]; raises where that returns an error."""
    step = sample_rows(logits[None], [spec], [generator])[0]
    if isinstance(step, Exception):
        raise step
    return step
