"""KV caches of the torch engine: the cache layer that grows in place, one sequence's cache, its
snapshots, and the LRU prefix cache.

The shared, left-padded cache of a batch of sequences lives in :mod:`powerserve.engine.batch`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedConfig
from transformers.cache_utils import DynamicLayer

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [batch, heads, columns, dim]


class GrowingLayer(DynamicLayer):  # type: ignore[no-untyped-call]
    """A full-attention cache layer whose keys and values fill the front of a buffer with spare
    columns, so a step writes only its new columns.

    ``DynamicLayer`` grows by ``torch.cat``, which copies the whole [B, h, W, d] cache at every
    decode step: at 16 rows of 200 columns on the embedded model that is about a fifth of the
    step. Here the buffer is reallocated (with half as many columns again to spare) only when it
    is full, so each column is copied a bounded number of times. ``keys`` and ``values`` are
    views of the buffer's first columns. Columns once written are never written again (nothing
    crops this layer), so a view handed out earlier (a :class:`Snapshot`) keeps its values.
    """

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = self.get_seq_length()
        end = n + key_states.shape[-2]
        if self._buffers is None or end > self._buffers[0].shape[-2]:
            columns = spare_columns(end)
            k = key_states.new_empty(*key_states.shape[:-2], columns, key_states.shape[-1])
            v = value_states.new_empty(*value_states.shape[:-2], columns, value_states.shape[-1])
            if n and self.keys is not None and self.values is not None:
                k[..., :n, :].copy_(self.keys)
                v[..., :n, :].copy_(self.values)
            self._buffers = (k, v)
        k, v = self._buffers
        k[..., n:end, :].copy_(key_states)
        v[..., n:end, :].copy_(value_states)
        self.keys, self.values = k[..., :end, :], v[..., :end, :]
        return self.keys, self.values

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a GrowingLayer is never cropped: views of its columns are shared")

    def adopt(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
        """Take buffers [B, h, columns, d] whose first ``length`` columns are filled."""
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self._buffers = (keys, values)
        self.keys, self.values = keys[..., :length, :], values[..., :length, :]


def spare_columns(length: int) -> int:
    """Columns a :class:`GrowingLayer` buffer holds for ``length`` used ones."""
    return length + max(32, length // 2)


def new_cache(config: PreTrainedConfig, kv: KV | None = None) -> DynamicCache:
    """A cache for ``config``'s model, filled with ``kv`` (copied); its layers are
    :class:`GrowingLayer` when every layer is full attention (sliding windows keep theirs)."""
    cache = DynamicCache(config=config)
    if all(type(layer) is DynamicLayer for layer in cache.layers):
        cache.layers = [GrowingLayer() for _ in cache.layers]
    for i, (k, v) in enumerate(kv or []):
        cache.update(k, v, i)
    return cache


Piece = tuple[int, KV | None, int]  # (first row, kv [r, h, n, d] per layer or None, n)


def assemble(config: PreTrainedConfig, like: KV, rows: int, width: int, pieces: Sequence[Piece]) -> DynamicCache:
    """A batch cache of ``rows`` rows and ``width`` columns, left-padded: each piece's kv fills
    its rows' last n columns, zeros before them (a None kv: zeros for its r rows, r = 1).
    ``like`` gives the head counts, sizes, dtype and device.

    With :class:`GrowingLayer` layers every piece is copied once, straight into the grown
    buffer; otherwise (sliding-window layers) the padded pieces are concatenated."""
    cache = new_cache(config)
    if not all(isinstance(layer, GrowingLayer) for layer in cache.layers):
        parts = sorted(pieces, key=lambda piece: piece[0])
        padded = [pad_left(kv, like, 1 if kv is None else kv[0][0].shape[0], width - n) for _, kv, n in parts]
        kv_all = [
            (torch.cat([p[i][0] for p in padded]), torch.cat([p[i][1] for p in padded])) for i in range(len(like))
        ]
        return new_cache(config, kv_all)
    columns = spare_columns(width)
    for i, layer in enumerate(cache.layers):
        k_ref, v_ref = like[i]
        k = k_ref.new_empty(rows, k_ref.shape[1], columns, k_ref.shape[3])
        v = v_ref.new_empty(rows, v_ref.shape[1], columns, v_ref.shape[3])
        for first, kv, n in pieces:
            r = 1 if kv is None else kv[i][0].shape[0]
            k[first : first + r, :, : width - n].zero_()
            v[first : first + r, :, : width - n].zero_()
            if kv is not None and n:
                k[first : first + r, :, width - n : width].copy_(kv[i][0])
                v[first : first + r, :, width - n : width].copy_(kv[i][1])
        assert isinstance(layer, GrowingLayer)
        layer.adopt(k, v, width)
    return cache


@dataclass(slots=True)
class CachedSequence:
    """One sequence's own KV cache, holding the keys and values of ``tokens``; the first
    ``reused`` of them came from the prefix cache."""

    cache: DynamicCache
    tokens: list[int] = field(default_factory=list)
    reused: int = 0


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The keys and values of ``tokens`` per layer, each tensor [1, heads, len(tokens), dim].

    Safe to share: a cache layer never rewrites a column it holds (``DynamicLayer`` grows by
    concatenation, :class:`GrowingLayer` writes only beyond its length), so the tensors of a
    snapshot are not changed by later forwards of the cache they were taken from.
    """

    tokens: tuple[int, ...]
    layers: tuple[tuple[torch.Tensor, torch.Tensor], ...]

    @classmethod
    def of(cls, tokens: Sequence[int], layers: KV) -> Snapshot:
        """A snapshot of ``layers`` (whose length is len(tokens)); copied out when they are
        views of a larger buffer, so that the snapshot keeps only its own columns alive."""
        snap = cls(tuple(tokens), tuple(layers))
        if snap.columns > len(snap.tokens):
            snap = cls(snap.tokens, tuple((k.clone(), v.clone()) for k, v in layers))
        return snap

    @property
    def columns(self) -> int:
        """Columns of memory the snapshot keeps alive: len(tokens), or more when its tensors are
        views of a :class:`GrowingLayer`'s buffer with spare columns (a row's own cache)."""
        if not self.layers:
            return len(self.tokens)
        k = self.layers[0][0]
        per_column = k.shape[1] * k.shape[3] * k.element_size()
        return max(len(self.tokens), k.untyped_storage().nbytes() // per_column)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class PrefixCache:
    """LRU store of KV snapshots, bounded by the total number of columns they keep alive
    (:attr:`Snapshot.columns`: their tokens, plus the spare columns of a buffer they share)."""

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self._entries: OrderedDict[tuple[int, ...], Snapshot] = OrderedDict()
        self._size = 0

    def __len__(self) -> int:
        return len(self._entries)

    def longest_prefix(self, tokens: Sequence[int]) -> tuple[Snapshot | None, int]:
        """The snapshot sharing the longest prefix with ``tokens``, and that prefix's length."""
        best, best_len = None, 0
        for key, snap in self._entries.items():
            n = _common_prefix(key, tokens)
            if n > best_len:
                best, best_len = snap, n
        if best is not None:
            self._entries.move_to_end(best.tokens)
        return best, best_len

    def put(self, snap: Snapshot) -> None:
        if not snap.tokens or snap.columns > self.max_tokens:
            return
        # An entry that is a prefix of the new one is redundant: the new one serves its hits.
        for key in [k for k in self._entries if snap.tokens[: len(k)] == k]:
            self._remove(key)
        self._entries[snap.tokens] = snap
        self._size += snap.columns
        while self._size > self.max_tokens:
            self._remove(next(iter(self._entries)))

    def clear(self) -> None:
        self._entries.clear()
        self._size = 0

    def _remove(self, key: tuple[int, ...]) -> None:
        self._size -= self._entries.pop(key).columns


def kv_layers(cache: DynamicCache) -> KV | None:
    """The per-layer tensors of a cache of full-attention layers; None before its first forward."""
    out = []
    for layer in cache.layers:
        if not isinstance(layer, DynamicLayer) or layer.keys is None or layer.values is None:
            return None
        if layer.keys.dim() != 4:  # initialised but never filled
            return None
        out.append((layer.keys, layer.values))
    return out


def pad_left(kv: KV | None, like: KV, rows: int, columns: int) -> KV:
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
