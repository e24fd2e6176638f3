"""Attention for the torch engine's padded decode steps, registered with ``transformers``.

A batch of rows of different lengths is left-padded, so its decode step carries an attention
mask. With a mask, ``transformers``' SDPA path cannot use SDPA's grouped-query mode on CPU and
CUDA and copies every key and value head ``num_attention_heads / num_key_value_heads`` times
(``repeat_kv``) in every layer at every step: at 16 rows of 250 columns on the embedded model
that copy costs more than the rest of the forward's growth with the batch.

:func:`grouped_attention` computes the same attention for one query position without that
copy: the query heads that share a key head are stacked into one matrix, so each (row, key
head) is two small matrix products over the cache as it is. Everything else (prefill, and
decode steps without a mask, where SDPA's grouped mode applies) goes to SDPA unchanged. It is
registered under :data:`NAME`, with SDPA's boolean mask builder, through the library's own
extension points (``AttentionInterface``, ``AttentionMaskInterface``).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "powerserve_grouped"


def grouped_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention output [B, q, H, D] of query [B, H, q, D] over key, value [B, Hkv, W, D].

    For q = 1 with a mask: query head h reads key head h // G (G = H / Hkv, the order of
    ``repeat_kv``), so query [B, Hkv, G, D] @ key^T [B, Hkv, D, W] gives every score without
    copying the cache; masked columns (False in SDPA's boolean mask [B, 1, 1, W]) get -inf,
    the softmax runs in float32 (as ``transformers``' eager attention does) and the result is
    @ value [B, Hkv, W, D]. Otherwise: ``transformers``' SDPA attention.
    """
    batch, heads, q_len, dim = query.shape
    kv_heads, width = key.shape[1], key.shape[2]
    if q_len != 1 or attention_mask is None or dropout or heads % kv_heads:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    scale = scaling if scaling is not None else dim**-0.5
    scores = torch.matmul(query.reshape(batch, kv_heads, heads // kv_heads, dim), key.transpose(-1, -2))
    scores.mul_(scale)  # [B, Hkv, G, W]
    mask = attention_mask[..., -width:]  # [B, 1, 1, W]
    if mask.dtype == torch.bool:
        scores.masked_fill_(~mask, float("-inf"))
    else:
        scores.add_(mask)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    out = torch.matmul(probs, value)  # [B, Hkv, G, D]
    return out.reshape(batch, heads, 1, dim).transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, grouped_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)


def use_grouped_attention(model: Any) -> bool:
    """Switch ``model`` from SDPA to :data:`NAME` (same maths, no key copies in padded decode
    steps); a model on another implementation (eager, flash, ...) is left as it is.
    Returns whether it switched."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    model.set_attn_implementation(NAME)
    return True
