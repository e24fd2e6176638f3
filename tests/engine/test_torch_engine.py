"""The torch engine against plain full forwards of a tiny random Llama (no tokenizer), and its
continuous batching against the same calls made one at a time."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

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
    model: torch.nn.Module,
    eos: frozenset[int] = frozenset(),
    prefix_cache_tokens: int = 4096,
    max_model_len: int = 64,
    max_batch_size: int = 64,
) -> AsyncIterator[TorchEngine]:
    engine = TorchEngine(
        model,
        None,
        model_name="tiny",
        max_model_len=max_model_len,
        eos_token_ids=eos,
        prefix_cache_tokens=prefix_cache_tokens,
        max_batch_size=max_batch_size,
    )
    yield engine
    await engine.shutdown()


@pytest.fixture
async def engine(model: torch.nn.Module) -> AsyncIterator[TorchEngine]:
    async for e in make_engine(model):
        yield e


@pytest.fixture
async def long_engine(model: torch.nn.Module) -> AsyncIterator[TorchEngine]:
    """Room for long calls, which the batching tests need to be sure to overlap."""
    async for e in make_engine(model, max_model_len=1024):
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
        await engine.run_on_worker(lambda: None)  # let queued snapshots land
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


async def settle(engine: TorchEngine) -> None:
    """Wait until the worker has run every step queued so far (a step queues the next one)."""
    for _ in range(3):
        await engine.run_on_worker(lambda: None)


async def test_closing_the_iterator_stops_the_work(long_engine: TorchEngine) -> None:
    stats = EngineStats()
    it = long_engine.generate(PROMPT, SamplingSpec(max_tokens=1000, seed=0), stats)
    await anext(it)
    await anext(it)
    await it.aclose()  # type: ignore[attr-defined]
    await settle(long_engine)
    stopped_at = long_engine.forward_count
    await asyncio.sleep(0.05)
    await settle(long_engine)
    # The scheduler runs ahead of its callers, but drops a closed row before its next step.
    assert long_engine.forward_count == stopped_at < 500
    assert stats.tokens_generated == 2 and not long_engine.scheduler.batches


async def test_cancelling_the_consumer_stops_the_work(long_engine: TorchEngine) -> None:
    first = asyncio.Event()
    stats = EngineStats()

    async def consume() -> None:
        async for _ in long_engine.generate(PROMPT, SamplingSpec(max_tokens=1000, seed=0), stats):
            first.set()

    task = asyncio.create_task(consume())
    await first.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await settle(long_engine)
    stopped_at = long_engine.forward_count
    await asyncio.sleep(0.05)
    await settle(long_engine)
    assert long_engine.forward_count == stopped_at < 500
    assert 1 <= stats.tokens_generated < 1000 and not long_engine.scheduler.batches


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


# --- continuous batching ---------------------------------------------------------------------

# Prompts of different lengths (rows are left-padded to a common width), one of a single token
# (a row that joins with no cached columns), two sharing a prefix; specs of every kind.
CALLS = [
    ([3, 7, 1, 4], SamplingSpec(max_tokens=12, seed=1)),
    ([5], SamplingSpec(max_tokens=9, temperature=0.7, seed=2)),
    ([2, 2, 9, 1, 0, 6, 8, 3, 11], SamplingSpec(max_tokens=14, temperature=1.3, top_p=0.9, seed=3)),
    ([3, 7, 1, 4, 9, 9], SamplingSpec(max_tokens=5, temperature=0.8, top_k=4, seed=4)),
    ([12, 1], SamplingSpec(max_tokens=10, temperature=1.1, top_k=6, top_p=0.8, seed=5)),
    ([3, 7, 1, 4], SamplingSpec(max_tokens=12, seed=6)),
]


def assert_same_steps(got: list[TokenStep], want: list[TokenStep]) -> None:
    assert [s.token_id for s in got] == [s.token_id for s in want]
    for g, w in zip(got, want, strict=True):
        assert g.logp == pytest.approx(w.logp, abs=1e-5)
        assert g.logq == pytest.approx(w.logq, abs=1e-5)


async def alone(
    model: torch.nn.Module, calls: list[tuple[list[int], SamplingSpec]], **kw: Any
) -> list[list[TokenStep]]:
    """Each call on its own, one after another, on a fresh engine without a prefix cache."""
    results = []
    async for engine in make_engine(model, prefix_cache_tokens=0, **kw):
        results = [await run(engine, prompt, spec) for prompt, spec in calls]
    return results


async def test_concurrent_calls_equal_the_same_calls_one_at_a_time(model: torch.nn.Module) -> None:
    eos = frozenset({0})  # some rows stop early and leave the batch
    async for engine in make_engine(model, eos=eos):
        stats = [EngineStats() for _ in CALLS]
        together = await asyncio.gather(*(run(engine, p, spec, st) for (p, spec), st in zip(CALLS, stats, strict=True)))
        assert engine.decoded_rows > engine.decode_steps, "the calls were not batched"
        for steps, want in zip(together, await alone(model, CALLS, eos=eos), strict=True):
            assert_same_steps(steps, want)
        # Finished rows are remembered: a proposal from the middle of one reuses its prefix.
        prompt = CALLS[2][0] + [s.token_id for s in together[2][:4]]
        follow_up = EngineStats()
        await run(engine, prompt, SamplingSpec(max_tokens=3, seed=0), follow_up)
        assert follow_up.extra["prefix_cache_hit_tokens"] == len(prompt) - 1


async def test_a_call_joining_mid_way(long_engine: TorchEngine, model: torch.nn.Module) -> None:
    long_prompt = [(5 * i + 1) % VOCAB for i in range(40)]  # wider than the batch: pads the others
    calls = [
        (PROMPT, SamplingSpec(max_tokens=150, temperature=0.9, seed=7)),
        (long_prompt, SamplingSpec(max_tokens=30, seed=8)),
        ([6], SamplingSpec(max_tokens=30, temperature=0.6, top_k=5, seed=9)),
    ]
    first = long_engine.generate(*calls[0], EngineStats())
    head = [await anext(first) for _ in range(5)]
    late_stats = [EngineStats(), EngineStats()]
    late = await asyncio.gather(
        *(run(long_engine, p, spec, st) for (p, spec), st in zip(calls[1:], late_stats, strict=True))
    )
    rest = [s async for s in first]
    for st in late_stats:  # the late calls shared forwards with the first one
        assert st.extra["batched_rows"] >= 2 * st.tokens_generated
    for steps, want in zip([head + rest, *late], await alone(model, calls, max_model_len=1024), strict=True):
        assert_same_steps(steps, want)


async def test_cancelling_one_row_leaves_the_others_intact(long_engine: TorchEngine, model: torch.nn.Module) -> None:
    calls = [(PROMPT, SamplingSpec(max_tokens=100, temperature=1.2, seed=s)) for s in (10, 11, 12)]
    quitter_stats = EngineStats()

    async def quitter() -> list[TokenStep]:
        steps = []
        async for step in long_engine.generate(*calls[1], quitter_stats):
            steps.append(step)
            if len(steps) == 3:
                break
        return steps

    stats = [EngineStats(), EngineStats()]
    a, quit_steps, c = await asyncio.gather(
        run(long_engine, *calls[0], stats[0]), quitter(), run(long_engine, *calls[2], stats[1])
    )
    assert quitter_stats.tokens_generated == 3
    assert all(st.extra["batched_rows"] > st.tokens_generated for st in stats)
    want = await alone(model, calls, max_model_len=1024)
    assert_same_steps(a, want[0])
    assert_same_steps(quit_steps, want[1][:3])
    assert_same_steps(c, want[2])


async def test_a_failed_forward_ends_its_rows_and_the_engine_goes_on(
    engine: TorchEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    def out_of_memory(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("out of memory")

    monkeypatch.setattr(engine.model, "forward", out_of_memory)
    # [5] fails in a batched decode step, PROMPT already in its prefill.
    calls = [([5], 1), ([5], 2), (PROMPT, 3)]
    results = await asyncio.gather(
        *(run(engine, p, SamplingSpec(max_tokens=4, seed=s)) for p, s in calls), return_exceptions=True
    )
    assert all(isinstance(r, RuntimeError) and "out of memory" in str(r) for r in results)
    monkeypatch.undo()
    await settle(engine)
    assert not engine.scheduler.batches
    assert len(await run(engine, PROMPT, SamplingSpec(max_tokens=4, seed=0))) == 4


async def test_concurrent_calls_share_decode_steps(model: torch.nn.Module) -> None:
    """8 concurrent 16-token calls: about 16 batched decode forwards, not 8 x 16 = 128."""
    async for engine in make_engine(model):
        specs = [SamplingSpec(max_tokens=16, seed=s) for s in range(8)]
        await asyncio.gather(*(run(engine, PROMPT, spec) for spec in specs))
        print(f"\n8 x 16 tokens: {engine.decode_steps} decode steps, {engine.forward_count} forwards")
        # Started together on an idle engine, they are admitted together: one prefill, then the
        # prompt's last token once for all 8 (their first tokens), then 15 steps of 8 rows.
        assert engine.decode_steps == 16 and engine.decoded_rows == 1 + 8 * 15
        assert engine.forward_count == 1 + 16
    async for engine in make_engine(model, max_batch_size=1):
        await asyncio.gather(*(run(engine, PROMPT, spec) for spec in specs))
        assert engine.decode_steps == 128


async def test_calls_with_one_prompt_share_their_first_forward(model: torch.nn.Module) -> None:
    """Calls started together with one prompt on an idle engine: the prompt's last token runs
    once (a forward of one row) and every call draws its first token from those logits with its
    own spec and generator. The draws are the same as each call's alone; the first step's rows
    are saved (without sharing, decoded_rows would be the sum of the lengths)."""
    eos = frozenset({0})
    specs = [
        SamplingSpec(max_tokens=1, seed=20),  # ends at the shared forward: never joins a batch
        SamplingSpec(max_tokens=6, temperature=0.7, seed=21),
        SamplingSpec(max_tokens=9, temperature=1.3, top_p=0.9, seed=22),
        SamplingSpec(max_tokens=4, top_k=5, seed=23),
        SamplingSpec(max_tokens=12, seed=24),
    ]
    calls = [(PROMPT, spec) for spec in specs]
    async for engine in make_engine(model, eos=eos):
        together = await asyncio.gather(*(run(engine, p, spec) for p, spec in calls))
        assert engine.decoded_rows == 1 + sum(len(steps) - 1 for steps in together)
        assert sum(len(steps) for steps in together) > engine.decoded_rows
        for steps, want in zip(together, await alone(model, calls, eos=eos), strict=True):
            assert_same_steps(steps, want)
    async for engine in make_engine(model, eos=eos):  # beside a live batch: no shared forward
        first = engine.generate(CALLS[0][0], SamplingSpec(max_tokens=40, seed=1), EngineStats())
        await anext(first)
        rows_before = engine.decoded_rows
        late = await asyncio.gather(*(run(engine, p, spec) for p, spec in calls))
        await first.aclose()
        assert engine.decoded_rows - rows_before >= sum(len(steps) for steps in late)
        for steps, want in zip(late, await alone(model, calls, eos=eos), strict=True):
            assert_same_steps(steps, want)
