"""The engine's grouped decode attention (``engine/attention.py``) against attention written out
with every key head repeated per query head, as ``transformers``' SDPA path computes it."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from powerserve.engine.attention import NAME, grouped_attention, use_grouped_attention
from tests.tiny_model import make_tiny_llama


def repeated_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Output [B, q, H, D]: key head h // G serves query head h (G = H / Hkv), masked columns
    (False) get no weight; float64 throughout."""
    groups = query.shape[1] // key.shape[1]
    k = key.double().repeat_interleave(groups, dim=1)
    v = value.double().repeat_interleave(groups, dim=1)
    scores = query.double() @ k.transpose(-1, -2) / query.shape[-1] ** 0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)


@pytest.mark.parametrize(("heads", "kv_heads"), [(9, 3), (4, 1), (2, 2)])
def test_grouped_attention_equals_repeated_heads(heads: int, kv_heads: int) -> None:
    """Four rows of 13 columns, left padding of 0, 3, 7 and 12 columns: every output within 1e-5
    of the float64 reference. Every key head holds different values, so pairing a query head
    with the wrong key head (h % Hkv instead of h // G, say) moves outputs by about 0.1."""
    gen = torch.Generator().manual_seed(0)
    batch, width, dim = 4, 13, 8
    query = torch.randn(batch, heads, 1, dim, generator=gen)
    key = torch.randn(batch, kv_heads, width, dim, generator=gen)
    value = torch.randn(batch, kv_heads, width, dim, generator=gen)
    starts = torch.tensor([0, 3, 7, 12])
    mask = (torch.arange(width)[None, :] >= starts[:, None])[:, None, None, :]  # [B, 1, 1, W]
    out, weights = grouped_attention(torch.nn.Module(), query, key, value, mask)
    assert weights is None
    assert out.shape == (batch, 1, heads, dim)
    torch.testing.assert_close(out.double(), repeated_attention(query, key, value, mask), atol=1e-5, rtol=0)


def test_an_additive_mask_is_added() -> None:
    gen = torch.Generator().manual_seed(1)
    query, key, value = (torch.randn(2, 4, 1, 8, generator=gen), *torch.randn(2, 2, 2, 5, 8, generator=gen))
    mask = torch.tensor([[True] * 5, [False, False, True, True, True]])[:, None, None, :]
    additive = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    out, _ = grouped_attention(torch.nn.Module(), query, key, value, additive)
    torch.testing.assert_close(out.double(), repeated_attention(query, key, value, mask), atol=1e-5, rtol=0)


def test_the_engine_model_runs_it_and_matches_sdpa() -> None:
    """A padded batch's decode logits under the switched model equal SDPA's to 1e-5; a model
    on eager attention is left alone."""
    model = make_tiny_llama(vocab_size=16, seed=3)
    ids = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
    attention_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.inference_mode():
        model.set_attn_implementation("sdpa")
        out = model(input_ids=ids, attention_mask=attention_mask, use_cache=True)
        step = {"input_ids": torch.tensor([[8], [9]]), "attention_mask": torch.ones(2, 6, dtype=torch.long)}
        step["attention_mask"][0, :2] = 0
        want = model(**step, past_key_values=out.past_key_values).logits
        assert use_grouped_attention(model) and model.config._attn_implementation == NAME
        out = model(input_ids=ids, attention_mask=attention_mask, use_cache=True)
        got = model(**step, past_key_values=out.past_key_values).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    eager = AutoModelForCausalLM.from_config(model.config, attn_implementation="eager")
    assert not use_grouped_attention(eager) and eager.config._attn_implementation == "eager"
