"""KV caches of the torch engine: the cache layer that grows in place, one sequence's cache, its
snapshots, and the LRU prefix cache.

The shared, left-padded cache of a batch of sequences lives in :mod:`powerserve.engine.batch_cache`.
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
    """A full-attention cache layer whose keys and values are a window of a buffer with spare
    rows and columns: ``keys`` is ``buffer[:rows, :, lo : lo + length]``.

    ``DynamicLayer`` grows by ``torch.cat``, which copies the whole [B, h, W, d] cache at every
    decode step: at 16 rows of 200 columns on the embedded model that is about a fifth of the
    step. Here a step writes only its new columns after the window, and the buffer is
    reallocated (with half as many columns again to spare, its spare rows and left margin kept)
    only when it is full, so each column is copied a bounded number of times. A batch's rows join and leave in place too
    (:mod:`powerserve.engine.batch_cache`: into spare rows, the window's left margin, and rows
    moved within the window). A view of a buffer with spare room is copied out before it is
    kept (:meth:`Snapshot.of`), so no later write reaches a view handed out.
    """

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.buffers: tuple[torch.Tensor, torch.Tensor] | None = None
        self.lo = 0  # the window's first column in the buffers

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        rows, n = key_states.shape[0], self.get_seq_length()
        end = n + key_states.shape[-2]
        if self.buffers is None or self.lo + end > self.buffers[0].shape[-2] or rows > self.buffers[0].shape[0]:
            # new buffers keep the spare rows and the left margin (a batch's room to join in place)
            capacity = rows if self.buffers is None else max(rows, self.buffers[0].shape[0])
            shape = (capacity, key_states.shape[1], self.lo + spare_columns(end), key_states.shape[-1])
            k, v = key_states.new_empty(shape), value_states.new_empty(shape)
            if n and self.keys is not None and self.values is not None:
                k[:rows, :, self.lo : self.lo + n].copy_(self.keys)
                v[:rows, :, self.lo : self.lo + n].copy_(self.values)
            self.buffers = (k, v)
        k, v = self.buffers
        k[:rows, :, self.lo + n : self.lo + end].copy_(key_states)
        v[:rows, :, self.lo + n : self.lo + end].copy_(value_states)
        self.window(rows, self.lo, end)
        assert self.keys is not None and self.values is not None
        return self.keys, self.values

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a GrowingLayer is never cropped: views of its columns are shared")

    def window(self, rows: int, lo: int, length: int) -> None:
        """Make the layer's keys and values the buffers' first ``rows`` rows, columns ``lo`` ..
        ``lo + length - 1``."""
        assert self.buffers is not None
        k, v = self.buffers
        self.lo = lo
        self.keys, self.values = k[:rows, :, lo : lo + length], v[:rows, :, lo : lo + length]

    def adopt(self, keys: torch.Tensor, values: torch.Tensor, rows: int, lo: int, length: int) -> None:
        """Take buffers [R, h, columns, d] whose first ``rows`` rows hold ``length`` columns from
        column ``lo`` on."""
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self.buffers = (keys, values)
        self.window(rows, lo, length)


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

    Safe to share: the tensors of a snapshot are not changed by later work on the cache they
    were taken from. ``DynamicLayer`` grows by concatenation; a :class:`GrowingLayer`'s buffers
    always have spare columns and are written in place, so :meth:`of` copies its views out.
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
