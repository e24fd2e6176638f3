"""The batch's shared cache (``engine/batch_cache.py``): rows join into spare rows and leave by
moving the last rows into their places, in place, holding exactly what a cache assembled anew
from the same rows holds."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch

from powerserve.engine import batch
from powerserve.engine.base import EngineStats, SamplingSpec
from powerserve.engine.batch_cache import assemble, drop_in_place, join_in_place
from powerserve.engine.kv_cache import KV, GrowingLayer, kv_layers
from tests.engine.test_torch_engine import PROMPT, VOCAB, alone, assert_same_steps, make_engine, model, run
from tests.tiny_model import make_tiny_llama

__all__ = ["model"]  # the module-scoped fixture, shared with the engine's tests

CONFIG = make_tiny_llama(vocab_size=16, seed=2).config
LAYERS, HEADS, DIM = CONFIG.num_hidden_layers, CONFIG.num_key_value_heads, CONFIG.head_dim
GEN = torch.Generator().manual_seed(3)


def kv(rows: int, n: int) -> KV:
    return [
        (torch.randn(rows, HEADS, n, DIM, generator=GEN), torch.randn(rows, HEADS, n, DIM, generator=GEN))
        for _ in range(LAYERS)
    ]


def padded(piece: KV, i: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer i of a piece, left-padded with zeros to ``width`` columns (by hand)."""
    k, v = piece[i]
    zeros = torch.zeros(k.shape[0], HEADS, width - k.shape[2], DIM)
    return torch.cat([zeros, k], -2), torch.cat([zeros, v], -2)


def assert_holds(cache: object, rows: list[KV], width: int) -> None:
    got = kv_layers(cache)  # type: ignore[arg-type]
    assert got is not None
    for i, (k, v) in enumerate(got):
        want = [padded(r, i, width) for r in rows]
        assert torch.equal(k, torch.cat([w[0] for w in want])) and torch.equal(v, torch.cat([w[1] for w in want]))


def pointers(cache: object) -> list[int]:
    return [layer.buffers[0].data_ptr() for layer in cache.layers]  # type: ignore[attr-defined]


def test_rows_join_in_place_into_spare_rows_and_the_left_margin() -> None:
    """A batch of 3 rows (width 6, buffers of 8 rows) is joined by rows of 4 and 9 columns: the
    batch widens by 3 columns into its left margin, and holds exactly the five rows left-padded
    to 9 columns, in the same buffers. Writing a piece one column off, or leaving the widened
    columns of the old rows unzeroed (the buffers hold stale memory there), breaks the equality.
    Without spare rows for them, the join refuses and writes nothing."""
    a, b, c = kv(2, 6), kv(1, 4), kv(1, 9)
    cache = assemble(CONFIG, a, 2, 6, [(0, a, 6)], capacity=8)
    for layer in cache.layers:  # stale memory everywhere outside the window
        assert isinstance(layer, GrowingLayer) and layer.buffers is not None and layer.lo >= 3
        for buf in layer.buffers:
            buf[:, :, : layer.lo].fill_(float("nan"))
            buf[2:].fill_(float("nan"))
            buf[:, :, layer.lo + 6 :].fill_(float("nan"))
    before = pointers(cache)
    assert join_in_place(cache, 2, 6, 9, [(2, b, 4), (3, c, 9), (4, None, 0)])
    assert pointers(cache) == before
    assert_holds(cache, [a, b, c, [(torch.zeros(1, HEADS, 0, DIM),) * 2] * LAYERS], 9)
    full = assemble(CONFIG, a, 2, 6, [(0, a, 6)], capacity=3)
    assert not join_in_place(full, 2, 6, 9, [(2, b, 4), (3, c, 9)])
    assert_holds(full, [a], 6)


def test_rows_leave_in_place_the_last_rows_taking_their_places() -> None:
    """Rows 1 and 4 of 6 leave and the first 2 columns are no longer used: row 5 moves into row
    1's place, and the cache holds rows 0, 5, 2, 3 from column 2 on, in the same buffers. A batch
    whose buffers would be more than three quarters empty is not kept in place."""
    rows = [kv(1, 8) for _ in range(6)]
    cache = assemble(CONFIG, rows[0], 6, 8, [(b, r, 8) for b, r in enumerate(rows)], capacity=8)
    before = pointers(cache)
    order = drop_in_place(cache, [0, 2, 3, 5], 8, 2)
    assert order == [0, 5, 2, 3] and pointers(cache) == before
    assert_holds(cache, [[(k[..., 2:, :], v[..., 2:, :]) for k, v in rows[b]] for b in order], 6)
    assert drop_in_place(cache, [0], 6, 0) is None  # 1 row of 8: a smaller cache instead


async def test_an_engine_whose_rows_join_and_leave_in_place_decodes_as_each_call_alone(
    model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long call; three calls join it (one wider than the batch) and two of them leave early;
    then a call wider than the batch joins. Joins and leaves happened in place (spied), and
    every call's tokens and log-probabilities equal the same call's alone."""
    joins: list[bool] = []
    drops: list[list[int] | None] = []

    def spy_join(*args: Any) -> bool:
        joins.append(join_in_place(*args))
        return joins[-1]

    def spy_drop(*args: Any) -> list[int] | None:
        drops.append(drop_in_place(*args))
        return drops[-1]

    monkeypatch.setattr(batch, "join_in_place", spy_join)
    monkeypatch.setattr(batch, "drop_in_place", spy_drop)
    wide = [(3 * i + 2) % VOCAB or 1 for i in range(12)]
    wider = [(5 * i + 1) % VOCAB or 2 for i in range(36)]
    calls = [
        (PROMPT, SamplingSpec(max_tokens=60, temperature=0.9, seed=7)),
        (wide, SamplingSpec(max_tokens=5, seed=8)),
        ([6], SamplingSpec(max_tokens=8, temperature=0.6, top_k=5, seed=9)),
        ([9, 2], SamplingSpec(max_tokens=14, top_p=0.8, seed=10)),
        (wider, SamplingSpec(max_tokens=10, seed=11)),
    ]
    async for engine in make_engine(model, max_model_len=1024):
        first = engine.generate(*calls[0], EngineStats())
        head = [await anext(first) for _ in range(3)]
        middle = await asyncio.gather(*(run(engine, p, spec) for p, spec in calls[1:4]))
        head += [await anext(first) for _ in range(3)]
        last = await run(engine, *calls[4])
        rest = [s async for s in first]
    assert True in joins and any(order is not None for order in drops)
    for steps, want in zip([head + rest, *middle, last], await alone(model, calls, max_model_len=1024), strict=True):
        assert_same_steps(steps, want)


def test_a_full_buffer_grows_with_its_spare_rows_and_left_margin() -> None:
    """Decode steps past a batch cache's spare columns reallocate its buffers: the window keeps
    its rows and values, and the buffers keep their spare rows and left margin, so a later
    widening join still fits in place."""
    a = kv(2, 6)
    cache = assemble(CONFIG, a, 2, 6, [(0, a, 6)], capacity=8)
    layer = cache.layers[0]
    assert isinstance(layer, GrowingLayer) and layer.buffers is not None
    lo, first = layer.lo, layer.buffers[0].data_ptr()
    steps = []
    while layer.buffers[0].data_ptr() == first:
        step = kv(2, 1)
        steps.append(step)
        for i, (k, v) in enumerate(step):
            cache.layers[i].update(k, v)
    assert layer.lo == lo and layer.buffers[0].shape[0] == 8
    width = 6 + len(steps)
    whole = [
        (torch.cat([a[i][0], *(s[i][0] for s in steps)], -2), torch.cat([a[i][1], *(s[i][1] for s in steps)], -2))
        for i in range(LAYERS)
    ]
    assert_holds(cache, [whole], width)
    assert join_in_place(cache, 2, width, width + 3, [(2, kv(1, width + 3), width + 3)])
