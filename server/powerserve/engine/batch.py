"""Continuous batching data: a ``generate`` call's row, and the batch whose left-padded KV cache
its rows share while they advance together, one column per step."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import torch

from powerserve.engine.base import SamplingSpec, TokenStep
from powerserve.engine.kv_cache import CachedSequence, Piece, Snapshot, assemble, kv_layers

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

    def __init__(self, config: Any, row: Row, seq: CachedSequence) -> None:
        """A batch of ``row`` alone, whose own cache ``seq`` holds ``row.tokens``."""
        self.config = config
        self.rows, self.cache, self.width, row.start = [row], seq.cache, len(row.tokens), 0

    def join(self, joining: list[tuple[Row, CachedSequence]]) -> None:
        """Add rows, each with its own cache ``seq`` holding ``row.tokens`` ([1, h, n, d] per
        layer), in one concatenation per layer however many join (copying the batch's cache
        once per step, not once per row)."""
        if not joining:
            return
        lengths = [len(row.tokens) for row, _ in joining]
        width = max(self.width, *lengths)
        ours, theirs = kv_layers(self.cache), [kv_layers(seq.cache) for _, seq in joining]
        like = ours or next((kv for kv in theirs if kv is not None), None)
        if like is not None:
            # the batch's rows (all zeros while it holds no column yet), then each joining row
            pieces: list[Piece] = (
                [(0, ours, self.width)] if ours is not None else [(b, None, 0) for b in range(len(self.rows))]
            )
            first = len(self.rows)
            pieces += [(first + j, kv, n) for j, (kv, n) in enumerate(zip(theirs, lengths, strict=True))]
            self.cache = assemble(self.config, like, first + len(joining), width, pieces)
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
        """Remove rows ``gone`` (indices), then the columns no remaining row uses."""
        keep = [b for b in range(len(self.rows)) if b not in gone]
        if not keep:  # the batch is about to be discarded
            self.rows = []
            return
        rows = [self.rows[b] for b in keep]
        unused = min(r.start for r in rows)
        kv = kv_layers(self.cache)
        if kv is not None:  # the kept rows, in runs of consecutive ones: one copy per run and layer
            pieces: list[Piece] = [
                (first, [(k[lo:hi, :, unused:], v[lo:hi, :, unused:]) for k, v in kv], self.width - unused)
                for first, lo, hi in _runs(keep)
            ]
            self.cache = assemble(self.config, kv, len(keep), self.width - unused, pieces)
        for r in rows:
            r.start -= unused
        self.rows, self.width = rows, self.width - unused


def _runs(keep: list[int]) -> list[tuple[int, int, int]]:
    """Runs of consecutive indices in sorted ``keep``: (position of the run in keep, lo, hi)."""
    out: list[tuple[int, int, int]] = []
    for pos, b in enumerate(keep):
        if out and out[-1][2] == b:
            out[-1] = (out[-1][0], out[-1][1], b + 1)
        else:
            out.append((pos, b, b + 1))
    return out
