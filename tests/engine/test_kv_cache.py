"""The torch engine's in-place growing cache layer (``engine/kv_cache.py``) against the
library's ``DynamicLayer``, which grows by concatenation."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from powerserve.engine.kv_cache import GrowingLayer, kv_layers, new_cache
from tests.tiny_model import make_tiny_llama


def test_it_holds_what_concatenation_holds_and_old_views_keep_their_values() -> None:
    """Updates of 5, then 1 at a time up to 120 columns (several reallocations): after each, the
    keys and values equal ``DynamicLayer``'s exactly; a view taken after 40 columns still holds
    those 40 columns at the end. Writing a step anywhere but after the last column (an
    off-by-one, or into a shared buffer) breaks one of the two."""
    gen = torch.Generator().manual_seed(0)
    grow, plain = GrowingLayer(), DynamicLayer()
    kept: tuple[torch.Tensor, torch.Tensor] | None = None
    for n in [5] + [1] * 115:
        k, v = torch.randn(2, 3, n, 4, generator=gen), torch.randn(2, 3, n, 4, generator=gen)
        got, want = grow.update(k, v), plain.update(k, v)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        if grow.get_seq_length() == 40:
            kept = (got[0].clone(), got[1].clone())
            views = got
    assert grow.get_seq_length() == 120 and kept is not None
    assert torch.equal(views[0], kept[0]) and torch.equal(views[1], kept[1])


def test_it_is_never_cropped() -> None:
    layer = GrowingLayer()
    layer.update(torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 3, 2))
    with pytest.raises(NotImplementedError):
        layer.crop(-1)


def test_new_cache_copies_its_input_and_decodes_like_dynamic_cache() -> None:
    """A cache built from given tensors owns copies (writing into it leaves them alone) and a
    model's decode steps on it give the logits they give on ``DynamicCache``."""
    model = make_tiny_llama(vocab_size=16, seed=2)
    with torch.inference_mode():
        prefill = model(input_ids=torch.tensor([[1, 2, 3, 4]]), use_cache=True).past_key_values
        layers = kv_layers(prefill)
        assert layers is not None
        before = [(k.clone(), v.clone()) for k, v in layers]
        ours = new_cache(model.config, layers)
        theirs = DynamicCache(ddp_cache_data=[(k.clone(), v.clone()) for k, v in layers], config=model.config)
        assert all(type(layer) is GrowingLayer for layer in ours.layers)
        for step, token in enumerate([5, 6, 7]):
            position = torch.tensor([[4 + step]])
            a = model(input_ids=torch.tensor([[token]]), position_ids=position, past_key_values=ours).logits
            b = model(input_ids=torch.tensor([[token]]), position_ids=position, past_key_values=theirs).logits
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    for (k, v), (k0, v0) in zip(layers, before, strict=True):
        assert torch.equal(k, k0) and torch.equal(v, v0)
