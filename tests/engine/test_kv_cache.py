"""The torch engine's in-place growing cache layer (``engine/kv_cache.py``) against the
library's ``DynamicLayer``, which grows by concatenation."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from powerserve.engine.batch_cache import Piece, assemble
from powerserve.engine.kv_cache import GrowingLayer, PrefixCache, Snapshot, kv_layers, new_cache
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


def test_assemble_places_each_piece_right_aligned_after_zeros() -> None:
    """A batch cache of 5 rows and 9 columns from four pieces (two rows of 9 columns, one row of
    4, one empty row, one row of 7) equals the left-padded concatenation built by hand, in every
    layer, and has spare columns to grow into. Shifting a piece by one column or leaving stale
    memory in the padding (the buffer is allocated uninitialised) breaks the equality."""
    model = make_tiny_llama(vocab_size=16, seed=2)
    cfg = model.config
    gen = torch.Generator().manual_seed(1)
    layers, heads, dim = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim

    def kv(rows: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [
            (torch.randn(rows, heads, n, dim, generator=gen), torch.randn(rows, heads, n, dim, generator=gen))
            for _ in range(layers)
        ]

    a, b, d = kv(2, 9), kv(1, 4), kv(1, 7)
    pieces: list[Piece] = [(0, a, 9), (2, b, 4), (3, None, 0), (4, d, 7)]
    for _ in range(3):  # fresh buffers each time: stale memory would show in one of them
        cache = assemble(cfg, a, 5, 9, pieces)
        got = kv_layers(cache)
        assert got is not None
        for i, (k, v) in enumerate(got):
            zeros = torch.zeros(1, heads, 9, dim)
            want_k = torch.cat(
                [
                    a[i][0],
                    torch.cat([zeros[..., :5, :], b[i][0]], -2),
                    zeros,
                    torch.cat([zeros[..., :2, :], d[i][0]], -2),
                ]
            )
            want_v = torch.cat(
                [
                    a[i][1],
                    torch.cat([zeros[..., :5, :], b[i][1]], -2),
                    zeros,
                    torch.cat([zeros[..., :2, :], d[i][1]], -2),
                ]
            )
            assert torch.equal(k, want_k) and torch.equal(v, want_v)
        layer = cache.layers[0]
        assert isinstance(layer, GrowingLayer) and layer.get_seq_length() == 9
        assert layer.keys is not None and layer.keys.untyped_storage().nbytes() > layer.keys.nbytes


def test_snapshots_keep_only_their_own_columns_alive() -> None:
    """A snapshot of a row's own growing cache (a view of a buffer with spare columns) is copied
    out, so the prefix cache's budget counts what it holds: 40 tokens keep 40 columns, not the
    72 of the buffer. A view of the buffer kept as it is counts its 72 columns."""
    grow = GrowingLayer()
    grow.update(torch.ones(1, 2, 40, 4), torch.ones(1, 2, 40, 4))
    assert grow.keys is not None and grow.values is not None
    views = [(grow.keys, grow.values)]
    assert Snapshot(tuple(range(40)), tuple(views)).columns == 72  # 40 + max(32, 40 // 2)
    snap = Snapshot.of(range(40), views)
    assert snap.columns == 40 and torch.equal(snap.layers[0][0], grow.keys)
    cache = PrefixCache(max_tokens=100)
    cache.put(Snapshot(tuple(range(40)), tuple(views)))
    cache.put(Snapshot.of(range(100, 140), views))
    assert len(cache) == 1  # 72 + 40 columns exceed 100: the oldest entry went
