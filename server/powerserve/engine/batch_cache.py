"""The shared, left-padded KV cache of a batch (:class:`powerserve.engine.batch.Batch`): built
from pieces, joined by new rows and left by finished ones, in place where its buffers have room.

Each layer of a batch cache of full-attention layers is a :class:`GrowingLayer` whose window is
[rows, heads, width, dim]: row b's keys and values in its last columns, zeros (masked out)
before them. The buffers keep spare rows (for rows that join) and a left margin of spare
columns (for a joining row longer than the batch), so a join writes only the new rows and the
new left columns, and a leave moves only the last rows into the places of the rows that left:
the other rows are not copied. Without room the buffers are built anew (:func:`assemble`),
with room to spare again. Sliding-window layers have no shared batch cache (one row a batch).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache, PreTrainedConfig

from powerserve.engine.kv_cache import KV, GrowingLayer, kv_layers, new_cache, spare_columns

Piece = tuple[int, KV | None, int]  # (first row, kv [r, h, n, d] per layer or None, n)


def spare_rows(rows: int, limit: int) -> int:
    """Rows the buffers of a batch of ``rows`` rows hold: half as many again (at least 4 more),
    but no more than ``limit`` (the engine's batch size) unless ``rows`` is more."""
    return max(rows, min(limit, rows + max(4, rows // 2)))


def assemble(
    config: PreTrainedConfig, like: KV, rows: int, width: int, pieces: Sequence[Piece], capacity: int = 0
) -> DynamicCache:
    """A batch cache of ``rows`` rows and ``width`` columns, left-padded: each piece's kv fills
    its rows' last n columns, zeros before them (a None kv: zeros for its r rows, r = 1).
    ``like`` gives the head counts, sizes, dtype and device.

    With :class:`GrowingLayer` layers every piece is copied once, straight into new buffers of
    ``capacity`` rows (at least ``rows``) with a left margin and spare columns; otherwise
    (sliding-window layers) the padded pieces are concatenated."""
    cache = new_cache(config)
    if not all(isinstance(layer, GrowingLayer) for layer in cache.layers):
        parts = sorted(pieces, key=lambda piece: piece[0])
        padded = [_pad_left(kv, like, 1 if kv is None else kv[0][0].shape[0], width - n) for _, kv, n in parts]
        kv_all = [
            (torch.cat([p[i][0] for p in padded]), torch.cat([p[i][1] for p in padded])) for i in range(len(like))
        ]
        return new_cache(config, kv_all)
    lo = max(32, width // 4)  # the left margin
    for (k_ref, v_ref), layer in zip(like, cache.layers, strict=True):
        shape = (max(rows, capacity), k_ref.shape[1], lo + spare_columns(width), k_ref.shape[3])
        assert isinstance(layer, GrowingLayer)
        layer.adopt(k_ref.new_empty(shape), v_ref.new_empty(shape), rows, lo, width)
    _place(cache, width, pieces)
    return cache


def join_in_place(cache: DynamicCache, rows: int, width: int, new_width: int, pieces: Sequence[Piece]) -> bool:
    """Add rows to the batch cache of ``rows`` rows and ``width`` columns, widened to
    ``new_width``: the new columns of the old rows are zeroed and each piece (rows ``rows`` on)
    written into spare rows. False, with nothing written, when the buffers lack the rows or the
    left margin (the caller then assembles a new cache)."""
    grow = new_width - width
    total = max(first + (1 if kv is None else kv[0][0].shape[0]) for first, kv, _ in pieces)
    layers = _growing(cache)
    if layers is None or any(layer.lo < grow or k.shape[0] < total for layer, k, _ in layers):
        return False
    for layer, k, v in layers:
        lo = layer.lo - grow
        k[:rows, :, lo : layer.lo].zero_()
        v[:rows, :, lo : layer.lo].zero_()
        layer.window(total, lo, new_width)
    _place(cache, new_width, pieces)
    return True


def drop_in_place(cache: DynamicCache, keep: list[int], width: int, unused: int) -> list[int] | None:
    """Keep rows ``keep`` (sorted indices) of the batch cache, and its columns from ``unused``
    on: each kept row beyond the first len(keep) moves into the place of a row that left.
    Returns the kept rows' old indices in their new order, or None, with nothing written,
    when the buffers would be more than three quarters empty (the caller then assembles a
    smaller cache) or are not :class:`GrowingLayer`'s."""
    n = len(keep)
    layers = _growing(cache)
    if layers is None or 4 * n < layers[0][1].shape[0]:
        return None
    kept = set(keep)
    holes = [b for b in range(n) if b not in kept]
    movers = [b for b in keep if b >= n]
    order = list(range(n))
    for hole, mover in zip(holes, movers, strict=True):
        order[hole] = mover
    for layer, k, v in layers:
        columns = slice(layer.lo + unused, layer.lo + width)
        for hole, mover in zip(holes, movers, strict=True):
            k[hole, :, columns].copy_(k[mover, :, columns])
            v[hole, :, columns].copy_(v[mover, :, columns])
        layer.window(n, layer.lo + unused, width - unused)
    return order


def _place(cache: DynamicCache, width: int, pieces: Sequence[Piece]) -> None:
    """Write each piece right-aligned into its rows of the cache's window, zeros before it (the
    buffers are allocated uninitialised: stale memory, NaN say, must not stay in the padding)."""
    window = kv_layers(cache)
    assert window is not None
    for i, (k, v) in enumerate(window):
        for first, kv, n in pieces:
            r = 1 if kv is None else kv[i][0].shape[0]
            k[first : first + r, :, : width - n].zero_()
            v[first : first + r, :, : width - n].zero_()
            if kv is not None and n:
                k[first : first + r, :, width - n : width].copy_(kv[i][0])
                v[first : first + r, :, width - n : width].copy_(kv[i][1])


def _growing(cache: DynamicCache) -> list[tuple[GrowingLayer, torch.Tensor, torch.Tensor]] | None:
    """Each layer with its key and value buffers; None unless every layer is a
    :class:`GrowingLayer` holding buffers."""
    out = []
    for layer in cache.layers:
        if not isinstance(layer, GrowingLayer) or layer.buffers is None:
            return None
        out.append((layer, *layer.buffers))
    return out


def _pad_left(kv: KV | None, like: KV, rows: int, columns: int) -> KV:
    """``kv`` ([rows, h, W, d] per layer, None for W = 0) with ``columns`` zero columns in front;
    ``like`` gives the head counts, sizes, dtype and device."""
    out = []
    for i, (k_ref, v_ref) in enumerate(like):
        k0 = k_ref.new_zeros(rows, k_ref.shape[1], columns, k_ref.shape[3])
        v0 = v_ref.new_zeros(rows, v_ref.shape[1], columns, v_ref.shape[3])
        if kv is None:
            out.append((k0, v0))
        else:
            k, v = kv[i]
            out.append((torch.cat([k0, k], dim=-2), torch.cat([v0, v], dim=-2)) if columns else (k, v))
    return out
