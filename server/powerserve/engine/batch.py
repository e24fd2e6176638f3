"""Continuous batching data: a ``generate`` call's row, and the batch whose left-padded KV cache
its rows share while they advance together, one column per step."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import torch

from powerserve.engine.base import SamplingSpec, TokenStep
from powerserve.engine.batch_cache import Piece, assemble, drop_in_place, join_in_place, spare_rows
from powerserve.engine.kv_cache import CachedSequence, Snapshot, kv_layers

Delivery = tuple[TokenStep, int] | BaseException  # (step, rows in that step's forward) or the error


@dataclass(eq=False, slots=True)
class Row:
    """One ``generate`` call: its sampling state (worker side) and its output queue (caller side).

    In its batch the row's keys and values fill the columns ``start`` .. width - 1, holding
    ``tokens`` at positions 0 .. len(tokens) - 1; ``pending`` is fed at the next step, at
    position len(tokens). The queue receives :data:`Delivery` items.
    """

    prompt: list[int]
    spec: SamplingSpec
    generator: torch.Generator
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Delivery]
    tokens: list[int] = field(default_factory=list)
    pending: int = -1
    start: int = 0
    produced: int = 0
    reused: int = 0
    finished: bool = False  # worker side: its last token is sampled
    closed: bool = False  # caller side: nobody listens any more

    def deliver(self, item: Delivery) -> None:
        deliver_all([(self, item)])


def deliver_all(items: list[tuple[Row, Delivery]]) -> None:
    """Hand items to their callers with one ``call_soon_threadsafe`` per event loop (not one per
    row): a decode step wakes each loop once whatever its batch size."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Row, Delivery]]] = {}
    for row, item in items:
        by_loop.setdefault(row.loop, []).append((row, item))
    for loop, batch in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, batch)
        except RuntimeError:  # the callers' event loop is closed
            for row, _ in batch:
                row.closed = True


def _put_all(items: list[tuple[Row, Delivery]]) -> None:
    for row, item in items:
        row.queue.put_nowait(item)


class Batch:
    """Rows that share one KV cache and advance together, one column per step.

    Layer tensors are [B, heads, width, dim], row b's real tokens in its columns ``start`` ..
    width - 1 and zeros (masked out) before them: rows are left-padded to a common width. Each
    row's tokens are contiguous, so its attention mask row is ``column >= start``. RoPE takes
    each row's own positions (passed explicitly), so where a key sits does not matter.
    """

    def __init__(self, config: Any, row: Row, seq: CachedSequence, max_rows: int) -> None:
        """A batch of ``row`` alone, whose own cache ``seq`` holds ``row.tokens``; ``max_rows``
        (the engine's batch size) bounds the rows its buffers keep to spare."""
        self.config, self.max_rows = config, max_rows
        self.rows, self.cache, self.width, row.start = [row], seq.cache, len(row.tokens), 0

    def join(self, joining: list[tuple[Row, CachedSequence]]) -> None:
        """Add rows, each with its own cache ``seq`` holding ``row.tokens`` ([1, h, n, d] per
        layer): in place when the batch's buffers have the spare rows and left margin
        (:func:`~powerserve.engine.batch_cache.join_in_place`), else in one new cache for all of
        them (copying the batch's rows once per step, not once per joining row)."""
        if not joining:
            return
        lengths = [len(row.tokens) for row, _ in joining]
        width = max(self.width, *lengths)
        ours, theirs = kv_layers(self.cache), [kv_layers(seq.cache) for _, seq in joining]
        like = ours or next((kv for kv in theirs if kv is not None), None)
        if like is not None:
            first = len(self.rows)
            new: list[Piece] = [(first + j, kv, n) for j, (kv, n) in enumerate(zip(theirs, lengths, strict=True))]
            if ours is None or not join_in_place(self.cache, first, self.width, width, new):
                # the batch's rows (all zeros while it holds no column yet), then each joining row
                pieces: list[Piece] = [(0, ours, self.width)] if ours else [(b, None, 0) for b in range(first)]
                rows = first + len(joining)
                self.cache = assemble(self.config, like, rows, width, pieces + new, spare_rows(rows, self.max_rows))
            for r in self.rows:
                r.start += width - self.width
            self.width = width
        for (row, _), n in zip(joining, lengths, strict=True):
            row.start = self.width - n
            self.rows.append(row)

    def step_inputs(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Model inputs for one step: each row's pending token at its own next position.

        A batch without padding (every row starts at column 0: one row, say) needs no mask.
        """
        rows = self.rows
        inputs = {
            "input_ids": torch.tensor([[r.pending] for r in rows], device=device),  # [B, 1]
            "position_ids": torch.tensor([[len(r.tokens)] for r in rows], device=device),  # [B, 1]
        }
        if any(r.start for r in rows):
            starts = torch.tensor([r.start for r in rows], device=device)
            # [B, width + 1]: 1 on the row's own columns, the new one included.
            inputs["attention_mask"] = (torch.arange(self.width + 1, device=device)[None, :] >= starts[:, None]).long()
        return inputs

    def snapshot(self, b: int) -> Snapshot | None:
        """Row b's keys and values, copied out of the batch (a view would keep it all alive)."""
        row, kv = self.rows[b], kv_layers(self.cache)
        if kv is None or self.width - row.start != len(row.tokens):
            return None
        if len(self.rows) == 1 and row.start == 0:  # the cache is the row's own
            return Snapshot.of(row.tokens, kv)
        layers = tuple((k[b : b + 1, :, row.start :].clone(), v[b : b + 1, :, row.start :].clone()) for k, v in kv)
        return Snapshot(tuple(row.tokens), layers)

    def drop(self, gone: set[int]) -> None:
        """Remove rows ``gone`` (indices), then the columns no remaining row uses: in place,
        the last rows moving into the places of those that left
        (:func:`~powerserve.engine.batch_cache.drop_in_place`), or into a new, smaller cache."""
        keep = [b for b in range(len(self.rows)) if b not in gone]
        if not keep:  # the batch is about to be discarded
            self.rows = []
            return
        unused = min(self.rows[b].start for b in keep)
        kv, order = kv_layers(self.cache), keep
        if kv is not None:
            moved = drop_in_place(self.cache, keep, self.width, unused)
            if moved is not None:
                order = moved
            else:  # the kept rows, in runs of consecutive ones: one copy per run and layer
                pieces: list[Piece] = [
                    (first, [(k[lo:hi, :, unused:], v[lo:hi, :, unused:]) for k, v in kv], self.width - unused)
                    for first, lo, hi in _runs(keep)
                ]
                rows = len(keep)
                self.cache = assemble(
                    self.config, kv, rows, self.width - unused, pieces, spare_rows(rows, self.max_rows)
                )
        self.rows = [self.rows[b] for b in order]
        for r in self.rows:
            r.start -= unused
        self.width -= unused


def _runs(keep: list[int]) -> list[tuple[int, int, int]]:
    """Runs of consecutive indices in sorted ``keep``: (position of the run in keep, lo, hi)."""
    out: list[tuple[int, int, int]] = []
    for pos, b in enumerate(keep):
        if out and out[-1][2] == b:
            out[-1] = (out[-1][0], out[-1][1], b + 1)
        else:
            out.append((pos, b, b + 1))
    return out
