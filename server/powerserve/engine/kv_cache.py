"""KV caches of the torch engine: per-sequence snapshots, the LRU prefix cache, and the shared,
left-padded cache in which concurrent sequences advance together (continuous batching).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from powerserve.engine.base import SamplingSpec, TokenStep

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [batch, heads, columns, dim]


@dataclass(slots=True)
class _Sequence:
    """One sequence's own KV cache, holding the keys and values of ``tokens``; the first
    ``reused`` of them came from the prefix cache."""

    cache: DynamicCache
    tokens: list[int] = field(default_factory=list)
    reused: int = 0


@dataclass(frozen=True, slots=True)
class _Snapshot:
    """The keys and values of ``tokens`` per layer, each tensor [1, heads, len(tokens), dim].

    Safe to share: a ``DynamicLayer`` grows by concatenation, never in place, so the tensors
    of a snapshot are not changed by later forwards of the cache they were taken from.
    """

    tokens: tuple[int, ...]
    layers: tuple[tuple[torch.Tensor, torch.Tensor], ...]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class PrefixCache:
    """LRU store of KV snapshots, bounded by the total number of cached tokens."""

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self._entries: OrderedDict[tuple[int, ...], _Snapshot] = OrderedDict()
        self._size = 0

    def __len__(self) -> int:
        return len(self._entries)

    def longest_prefix(self, tokens: Sequence[int]) -> tuple[_Snapshot | None, int]:
        """The snapshot sharing the longest prefix with ``tokens``, and that prefix's length."""
        best, best_len = None, 0
        for key, snap in self._entries.items():
            n = _common_prefix(key, tokens)
            if n > best_len:
                best, best_len = snap, n
        if best is not None:
            self._entries.move_to_end(best.tokens)
        return best, best_len

    def put(self, snap: _Snapshot) -> None:
        if not snap.tokens or len(snap.tokens) > self.max_tokens:
            return
        # An entry that is a prefix of the new one is redundant: the new one serves its hits.
        for key in [k for k in self._entries if snap.tokens[: len(k)] == k]:
            self._remove(key)
        self._entries[snap.tokens] = snap
        self._size += len(snap.tokens)
        while self._size > self.max_tokens:
            self._remove(next(iter(self._entries)))

    def clear(self) -> None:
        self._entries.clear()
        self._size = 0

    def _remove(self, key: tuple[int, ...]) -> None:
        del self._entries[key]
        self._size -= len(key)


def _layers(cache: DynamicCache) -> KV | None:
    """The per-layer tensors of a cache of full-attention layers; None before its first forward."""
    out = []
    for layer in cache.layers:
        if not isinstance(layer, DynamicLayer) or layer.keys is None or layer.values is None:
            return None
        if layer.keys.dim() != 4:  # initialised but never filled
            return None
        out.append((layer.keys, layer.values))
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


# --- continuous batching ----------------------------------------------------------------------


@dataclass(eq=False, slots=True)
class _Row:
    """One ``generate`` call: its sampling state (worker side) and its output queue (caller side).

    In its batch the row's keys and values fill the columns ``start`` .. width - 1, holding
    ``tokens`` at positions 0 .. len(tokens) - 1; ``pending`` is fed at the next step, at
    position len(tokens). The queue receives (step, rows in that step's forward) or the
    exception that ended the row.
    """

    prompt: list[int]
    spec: SamplingSpec
    generator: torch.Generator
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[tuple[TokenStep, int] | BaseException]
    tokens: list[int] = field(default_factory=list)
    pending: int = -1
    start: int = 0
    produced: int = 0
    reused: int = 0
    finished: bool = False  # worker side: its last token is sampled
    closed: bool = False  # caller side: nobody listens any more

    def deliver(self, item: tuple[TokenStep, int] | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the caller's event loop is closed
            self.closed = True


class _Batch:
    """Rows that share one KV cache and advance together, one column per step.

    Layer tensors are [B, heads, width, dim], row b's real tokens in its columns ``start`` ..
    width - 1 and zeros (masked out) before them: rows are left-padded to a common width. Each
    row's tokens are contiguous, so its attention mask row is ``column >= start``. RoPE takes
    each row's own positions (passed explicitly), so where a key sits does not matter.
    """

    def __init__(self, config: Any, row: _Row, seq: _Sequence) -> None:
        """A batch of ``row`` alone, whose own cache ``seq`` holds ``row.tokens``."""
        self.config = config
        self.rows, self.cache, self.width, row.start = [row], seq.cache, len(row.tokens), 0

    def join(self, row: _Row, seq: _Sequence) -> None:
        """Add ``row`` whose own cache ``seq`` holds ``row.tokens`` ([1, h, n, d] per layer)."""
        n = len(row.tokens)
        ours, theirs = _layers(self.cache), _layers(seq.cache)
        like = ours or theirs
        if like is not None:
            width = max(self.width, n)
            ours = _pad_left(ours, like, len(self.rows), width - self.width)
            theirs = _pad_left(theirs, like, 1, width - n)
            kv = [(torch.cat([k, k1]), torch.cat([v, v1])) for (k, v), (k1, v1) in zip(ours, theirs, strict=True)]
            self.cache = DynamicCache(ddp_cache_data=kv, config=self.config)
            for r in self.rows:
                r.start += width - self.width
            self.width = width
        row.start = self.width - n
        self.rows.append(row)

    def step_inputs(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Model inputs for one step: each row's pending token at its own next position."""
        width = self.width
        starts = torch.tensor([r.start for r in self.rows], device=device)
        return {
            "input_ids": torch.tensor([[r.pending] for r in self.rows], device=device),  # [B, 1]
            "position_ids": torch.tensor([[len(r.tokens)] for r in self.rows], device=device),  # [B, 1]
            # [B, width + 1]: 1 on the row's own columns, the new one included.
            "attention_mask": (torch.arange(width + 1, device=device)[None, :] >= starts[:, None]).long(),
        }

    def snapshot(self, b: int) -> _Snapshot | None:
        """Row b's keys and values, copied out of the batch (a view would keep it all alive)."""
        row, kv = self.rows[b], _layers(self.cache)
        if kv is None or self.width - row.start != len(row.tokens):
            return None
        if len(self.rows) == 1 and row.start == 0:  # the cache is the row's own
            return _Snapshot(tuple(row.tokens), tuple(kv))
        layers = tuple((k[b : b + 1, :, row.start :].clone(), v[b : b + 1, :, row.start :].clone()) for k, v in kv)
        return _Snapshot(tuple(row.tokens), layers)

    def drop(self, gone: set[int]) -> None:
        """Remove rows ``gone`` (indices), then the columns no remaining row uses."""
        keep = [b for b in range(len(self.rows)) if b not in gone]
        if not keep:  # the batch is about to be discarded
            self.rows = []
            return
        rows = [self.rows[b] for b in keep]
        unused = min(r.start for r in rows)
        kv = _layers(self.cache)
        if kv is not None:
            index = torch.tensor(keep, device=kv[0][0].device)
            kv = [(k.index_select(0, index)[:, :, unused:], v.index_select(0, index)[:, :, unused:]) for k, v in kv]
            self.cache = DynamicCache(ddp_cache_data=kv, config=self.config)
        for r in rows:
            r.start -= unused
        self.rows, self.width = rows, self.width - unused
