"""The torch engine against plain full forwards of a tiny random Llama (no tokenizer)."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import torch

from powerserve.engine.base import EngineStats, SamplingSpec, TokenStep
from powerserve.engine.torch_engine import TorchEngine, proposal_logprobs
from tests.tiny_model import make_tiny_llama

VOCAB = 16
PROMPT = [3, 7, 1, 4]


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return make_tiny_llama(vocab_size=VOCAB, eos_token_id=0, seed=1, logit_scale=1.0)


async def make_engine(
    model: torch.nn.Module, eos: frozenset[int] = frozenset(), prefix_cache_tokens: int = 4096
) -> AsyncIterator[TorchEngine]:
    engine = TorchEngine(
        model,
        None,
        model_name="tiny",
        max_model_len=64,
        eos_token_ids=eos,
        prefix_cache_tokens=prefix_cache_tokens,
    )
    yield engine
    await engine.shutdown()


@pytest.fixture
async def engine(model: torch.nn.Module) -> AsyncIterator[TorchEngine]:
    async for e in make_engine(model):
        yield e


@pytest.fixture
async def cold_engine(model: torch.nn.Module) -> AsyncIterator[TorchEngine]:
    async for e in make_engine(model, prefix_cache_tokens=0):
        yield e


def full_logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """Logits [len(ids), V] of one uncached forward over ``ids``."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].double()


async def run(
    engine: TorchEngine, prompt: list[int], spec: SamplingSpec, stats: EngineStats | None = None
) -> list[TokenStep]:
    return [s async for s in engine.generate(prompt, spec, stats or EngineStats())]


def hand_truncated_logq(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> dict[int, float]:
    """q written out directly: the k most likely tokens, then the fewest of those (most likely
    first) whose renormalised mass reaches top_p, renormalised. Assumes no ties."""
    probs = torch.softmax(logits / temperature, -1).tolist()
    ranked = sorted(range(len(probs)), key=lambda i: -probs[i])
    if top_k:
        ranked = ranked[:top_k]
    mass = sum(probs[i] for i in ranked)
    kept, cumulative = [], 0.0
    for i in ranked:
        kept.append(i)
        cumulative += probs[i] / mass
        if cumulative >= top_p:
            break
    kept_mass = sum(probs[i] for i in kept)
    return {i: math.log(probs[i] / kept_mass) for i in kept}


def test_proposal_logprobs_by_hand() -> None:
    logits = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05], dtype=torch.float64).log()
    q = proposal_logprobs(logits, 1.0, 0, 0.75).exp()  # {.5,.2,.15} reach .75
    torch.testing.assert_close(q, torch.tensor([0.5, 0.2, 0.15, 0, 0], dtype=torch.float64) / 0.85)
    q = proposal_logprobs(logits, 1.0, 3, 0.6).exp()  # top-3 renormalised: .588 < .6, so two
    torch.testing.assert_close(q, torch.tensor([0.5, 0.2, 0, 0, 0], dtype=torch.float64) / 0.7)
    q = proposal_logprobs(logits, 0.5, 2, 1.0).exp()  # temperature 1/2 squares, then top-2
    torch.testing.assert_close(q, torch.tensor([0.25, 0.04, 0, 0, 0], dtype=torch.float64) / 0.29)
    q = proposal_logprobs(logits, 1.0, 0, 0.3).exp()  # the top token alone exceeds top_p
    torch.testing.assert_close(q, torch.tensor([1.0, 0, 0, 0, 0], dtype=torch.float64))


@pytest.mark.parametrize("temperature", [1.0, 0.5])
async def test_logp_and_logq_match_a_full_forward(
    engine: TorchEngine, model: torch.nn.Module, temperature: float
) -> None:
    steps = await run(engine, PROMPT, SamplingSpec(max_tokens=12, temperature=temperature, seed=3))
    assert len(steps) == 12
    tokens = [s.token_id for s in steps]
    logits = full_logits(model, PROMPT + tokens)[len(PROMPT) - 1 : -1]
    logp = torch.log_softmax(logits, -1)
    logq = torch.log_softmax(logits / temperature, -1)
    for t, step in enumerate(steps):
        assert step.logp == pytest.approx(float(logp[t, step.token_id]), abs=1e-5)
        assert step.logq == pytest.approx(float(logq[t, step.token_id]), abs=1e-5)


@pytest.mark.parametrize(("top_k", "top_p"), [(4, 1.0), (0, 0.7), (6, 0.8)])
async def test_logq_with_truncation(engine: TorchEngine, model: torch.nn.Module, top_k: int, top_p: float) -> None:
    spec = SamplingSpec(max_tokens=16, temperature=0.8, top_k=top_k, top_p=top_p, seed=5)
    steps = await run(engine, PROMPT, spec)
    tokens = [s.token_id for s in steps]
    logits = full_logits(model, PROMPT + tokens)[len(PROMPT) - 1 : -1]
    for t, step in enumerate(steps):
        q = hand_truncated_logq(logits[t], 0.8, top_k, top_p)
        assert step.token_id in q, "sampled a token that truncation removed"
        assert step.logq == pytest.approx(q[step.token_id], abs=1e-5)
        assert step.logp == pytest.approx(float(torch.log_softmax(logits[t], -1)[step.token_id]), abs=1e-5)


async def test_prefix_cache_is_exact_and_hits(engine: TorchEngine, cold_engine: TorchEngine) -> None:
    spec = SamplingSpec(max_tokens=10, temperature=0.7, seed=11)
    first = await run(engine, PROMPT, spec)
    x = [s.token_id for s in first]
    # Metropolis-Hastings-style proposals: resample the suffix from several positions of x.
    for i in (0, 3, 9):
        warm_stats, cold_stats = EngineStats(), EngineStats()
        prompt = PROMPT + x[:i]
        warm = await run(engine, prompt, SamplingSpec(max_tokens=6, temperature=0.7, seed=i), warm_stats)
        cold = await run(cold_engine, prompt, SamplingSpec(max_tokens=6, temperature=0.7, seed=i), cold_stats)
        assert [s.token_id for s in warm] == [s.token_id for s in cold]
        for w, c in zip(warm, cold, strict=True):
            assert w.logp == pytest.approx(c.logp, abs=1e-5)
            assert w.logq == pytest.approx(c.logq, abs=1e-5)
        assert warm_stats.extra["prefix_cache_hit_tokens"] == len(prompt) - 1
        assert cold_stats.extra["prefix_cache_hit_tokens"] == 0
    stats = EngineStats()
    warm_scores = await engine.score(PROMPT, x, stats)
    assert stats.extra["prefix_cache_hit_tokens"] == len(PROMPT) - 1
    cold_scores = await cold_engine.score(PROMPT, x, EngineStats())
    assert warm_scores == pytest.approx(cold_scores, abs=1e-5)
    assert warm_scores == pytest.approx([s.logp for s in first], abs=1e-5)


async def test_prefix_cache_stays_within_its_token_budget(model: torch.nn.Module) -> None:
    async for engine in make_engine(model, prefix_cache_tokens=40):
        for seed in range(6):
            await run(engine, [seed + 1, 2], SamplingSpec(max_tokens=15, seed=seed))
        await engine._on_worker(lambda: None)  # let queued snapshots land
        assert 0 < engine.prefix_cache._size <= 40


async def test_seeds(engine: TorchEngine, cold_engine: TorchEngine) -> None:
    spec = SamplingSpec(max_tokens=20, temperature=1.5, seed=42)
    a = [s.token_id for s in await run(engine, PROMPT, spec)]
    b = [s.token_id for s in await run(engine, PROMPT, spec)]
    c = [s.token_id for s in await run(cold_engine, PROMPT, spec)]
    assert a == b == c
    others = [
        [s.token_id for s in await run(engine, PROMPT, SamplingSpec(max_tokens=20, temperature=1.5, seed=s))]
        for s in (1, 2, 3)
    ]
    assert all(o != a for o in others)
    global_state = torch.random.get_rng_state()
    await run(engine, PROMPT, SamplingSpec(max_tokens=3))  # seed None: drawn from `secrets`
    assert torch.equal(torch.random.get_rng_state(), global_state)


async def test_concurrent_calls_equal_sequential_ones(engine: TorchEngine, cold_engine: TorchEngine) -> None:
    specs = [SamplingSpec(max_tokens=8, temperature=1.2, seed=s) for s in range(4)]
    together = await asyncio.gather(*(run(engine, PROMPT, spec) for spec in specs))
    for spec, steps in zip(specs, together, strict=True):
        alone = await run(cold_engine, PROMPT, spec)
        assert [s.token_id for s in steps] == [s.token_id for s in alone]


async def test_eos_and_max_tokens(model: torch.nn.Module) -> None:
    eos = frozenset({0, 1, 2, 3})  # a quarter of the vocabulary: some samples stop early
    async for engine in make_engine(model, eos=eos):
        stats, lengths = EngineStats(), []
        for seed in range(12):
            c = await engine.sample(PROMPT, SamplingSpec(max_tokens=6, temperature=2.0, seed=seed), stats)
            assert all(t not in eos for t in c.token_ids[:-1])
            if c.finish_reason == "stop":
                assert c.token_ids[-1] in eos
            else:
                assert len(c.token_ids) == 6 and c.token_ids[-1] not in eos
            lengths.append(len(c.token_ids))
        assert min(lengths) < 6 and max(lengths) == 6
        assert stats.calls == 12 and stats.tokens_generated == sum(lengths)


@contextlib.contextmanager
def count_forwards(model: torch.nn.Module) -> Iterator[list[int]]:
    calls = [0]
    handle = model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        yield calls
    finally:
        handle.remove()


async def test_closing_the_iterator_stops_the_work(engine: TorchEngine, model: torch.nn.Module) -> None:
    stats = EngineStats()
    with count_forwards(model) as forwards:
        it = engine.generate(PROMPT, SamplingSpec(max_tokens=50, seed=0), stats)
        await anext(it)
        await anext(it)
        await it.aclose()  # type: ignore[attr-defined]
        await engine._on_worker(lambda: None)
    assert forwards[0] == 2 and stats.tokens_generated == 2


async def test_cancelling_the_consumer_stops_the_work(engine: TorchEngine, model: torch.nn.Module) -> None:
    first = asyncio.Event()
    stats = EngineStats()

    async def consume() -> None:
        async for _ in engine.generate(PROMPT, SamplingSpec(max_tokens=50, seed=0), stats):
            first.set()

    with count_forwards(model) as forwards:
        task = asyncio.create_task(consume())
        await first.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await engine._on_worker(lambda: None)
    assert forwards[0] <= stats.tokens_generated + 1 < 50


async def test_score_matches_a_forward(engine: TorchEngine, model: torch.nn.Module) -> None:
    tokens = [5, 9, 0, 2, 15]
    stats = EngineStats()
    scores = await engine.score(PROMPT, tokens, stats)
    logp = torch.log_softmax(full_logits(model, PROMPT + tokens), -1)[len(PROMPT) - 1 : -1]
    assert scores == pytest.approx([float(logp[t, tok]) for t, tok in enumerate(tokens)], abs=1e-5)
    assert (stats.calls, stats.tokens_scored) == (1, 5)
    assert await engine.score(PROMPT, [], stats) == []

    top = await engine.top_logprobs(PROMPT, tokens, 3, stats)
    assert (stats.calls, stats.tokens_scored) == (3, 10)
    for t, row in enumerate(top):
        values, ids = logp[t].topk(3)
        assert list(row) == ids.tolist()
        assert list(row.values()) == pytest.approx(values.tolist(), abs=1e-5)


async def test_length_guard(engine: TorchEngine) -> None:
    with pytest.raises(ValueError, match="max_model_len"):
        await run(engine, PROMPT, SamplingSpec(max_tokens=61))
    with pytest.raises(ValueError, match="max_model_len"):
        await engine.score(PROMPT, [1] * 61, EngineStats())
    assert len(await run(engine, PROMPT, SamplingSpec(max_tokens=60))) == 60


async def test_load_reads_a_checkpoint_dir(tmp_path: Path) -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    model = make_tiny_llama(vocab_size=VOCAB, eos_token_id=0, seed=2)
    model.generation_config = GenerationConfig(eos_token_id=[0, 5])
    model.save_pretrained(tmp_path)
    vocab = {f"t{i}": i for i in range(VOCAB)}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="t1"))).save_pretrained(tmp_path)

    engine = TorchEngine.load(str(tmp_path), model_name="tiny", max_model_len=32)
    try:
        assert engine.eos_token_ids == frozenset({0, 5})
        assert engine.tokenizer is not None and engine.model.dtype == torch.float32
        tokens = [5, 9, 2]
        scores = await engine.score(PROMPT, tokens, EngineStats())
        logp = torch.log_softmax(full_logits(model, PROMPT + tokens), -1)[len(PROMPT) - 1 : -1]
        assert scores == pytest.approx([float(logp[t, tok]) for t, tok in enumerate(tokens)], abs=1e-5)
    finally:
        await engine.shutdown()
    with pytest.raises(ValueError, match="dtype"):
        TorchEngine.load(str(tmp_path), model_name="tiny", max_model_len=32, dtype="int3")
