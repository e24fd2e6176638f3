"""The vLLM engine on the embedded checkpoint, checked against a plain transformers forward.

One engine is started for the whole module (about 45 s on the 2-core build machine, eager
mode); every test shares it on a module-scoped event loop. Agreement tolerances: 1e-3 in
log-probability (measured differences are about 1e-5 in float32).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import prometheus_client
import pytest
import pytest_asyncio
import torch

from powerserve.engine.base import EngineStats, SamplingSpec
from powerserve.engine.vllm_args import ONEDNN_CACHE, scheduler_args, worker_environment
from powerserve.engine.vllm_engine import VllmEngine
from powerserve.model_store import EMBEDDED_NAME, ensure_embedded_checkpoint
from powerserve.testing import process_tree

pytestmark = [pytest.mark.vllm, pytest.mark.asyncio(loop_scope="module")]

TOL = 1e-3
MAX_MODEL_LEN = 256
TEXT = "The history of the printing press begins in"


@pytest.fixture(scope="module")
def checkpoint() -> str:
    return str(ensure_embedded_checkpoint())


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(checkpoint: str) -> AsyncIterator[VllmEngine]:
    eng = await VllmEngine.start(
        checkpoint, model_name=EMBEDDED_NAME, max_model_len=MAX_MODEL_LEN, enforce_eager=True, seed=0
    )
    yield eng
    await eng.shutdown()


@pytest.fixture(scope="module")
def hf_model(checkpoint: str) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


def reference_logits(model: Any, prompt: Sequence[int], tokens: Sequence[int]) -> torch.Tensor:
    """Raw log p over the vocabulary at each position that predicts one of ``tokens``: [T, V]."""
    ids = torch.tensor([[*prompt, *tokens]])
    with torch.no_grad():
        logits = model(ids).logits[0].float()  # [S, V]
    return torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)


def tempered(logp: torch.Tensor, temperature: float, top_k: int = 0) -> torch.Tensor:
    """log q: log softmax(log p / temperature), restricted to the top-k tokens when top_k > 0."""
    scaled = logp / temperature
    if top_k:
        kth = scaled.topk(top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, -math.inf)
    return torch.log_softmax(scaled, dim=-1)


def pick(logprobs: torch.Tensor, tokens: Sequence[int]) -> list[float]:
    return logprobs[torch.arange(len(tokens)), torch.tensor(tokens)].tolist()


def max_diff(a: Sequence[float], b: Sequence[float]) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def text_prompt(engine: VllmEngine) -> list[int]:
    return list(engine.tokenizer.encode(TEXT))


def chat_prompt(engine: VllmEngine, question: str) -> list[int]:
    text = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    return list(engine.tokenizer.encode(text))


async def collect(engine: VllmEngine, prompt: Sequence[int], spec: SamplingSpec) -> tuple[list[int], list[float]]:
    steps = [s async for s in engine.generate(prompt, spec, EngineStats())]
    return [s.token_id for s in steps], [s.logq for s in steps]


async def wait_idle(engine: VllmEngine) -> None:
    """Return once vLLM holds no request; fail if it still holds one after 10 s."""
    for _ in range(500):
        if engine.num_unfinished_requests() == 0:
            return
        await asyncio.sleep(0.02)
    pytest.fail("vLLM still holds the request after 10 s")


async def test_attributes(engine: VllmEngine) -> None:
    assert engine.name == "vllm"
    assert engine.model_name == EMBEDDED_NAME
    assert engine.max_model_len == MAX_MODEL_LEN
    assert engine.tokenizer.convert_tokens_to_ids("<|im_end|>") in engine.eos_token_ids
    await engine.check_health()


def worker_environments() -> list[list[bytes]]:
    """The environment (NAME=VALUE entries) of each vLLM model worker under this process."""
    out = []
    for pid in process_tree(os.getpid()):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"VLLM::Worker"):
                out.append(Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"))
    return out


async def test_the_model_worker_runs_without_onednns_primitive_cache(engine: VllmEngine) -> None:
    """On CPU the spawned model worker has ``ONEDNN_PRIMITIVE_CACHE_CAPACITY=0`` in its own
    environment (read from /proc): without it the worker's memory grows with every new batch
    shape (docs/reliability.md). Elsewhere nothing is set."""
    assert worker_environment(on_cpu=False) == {}
    assert worker_environment(on_cpu=True) == {ONEDNN_CACHE: "0"}
    environments = worker_environments()
    assert environments, "no vLLM model worker process found under this one"
    assert all(f"{ONEDNN_CACHE}=0".encode() in env for env in environments)


async def test_logq_is_tempered_log_softmax(engine: VllmEngine, hf_model: Any) -> None:
    prompt = text_prompt(engine)
    spec = SamplingSpec(max_tokens=32, temperature=0.25, seed=3)
    stats = EngineStats()
    steps = [s async for s in engine.generate(prompt, spec, stats)]
    tokens = [s.token_id for s in steps]
    assert len(tokens) == 32 and all(s.logp is None for s in steps)
    assert (stats.calls, stats.tokens_generated) == (1, 32)
    expected = pick(tempered(reference_logits(hf_model, prompt, tokens), 0.25), tokens)
    diff = max_diff([s.logq for s in steps], expected)
    print(f"logq vs log_softmax(4 log p): max |diff| = {diff:.2e} over 32 tokens")
    assert diff < TOL


async def test_logq_reflects_top_k(engine: VllmEngine, hf_model: Any) -> None:
    prompt = text_prompt(engine)
    spec = SamplingSpec(max_tokens=24, temperature=0.7, top_k=5, seed=11)
    tokens, logq = await collect(engine, prompt, spec)
    expected = pick(tempered(reference_logits(hf_model, prompt, tokens), 0.7, top_k=5), tokens)
    assert max_diff(logq, expected) < TOL


async def test_raw_sampling_gives_logp(engine: VllmEngine, hf_model: Any) -> None:
    prompt = text_prompt(engine)
    steps = [s async for s in engine.generate(prompt, SamplingSpec(max_tokens=16, seed=5), EngineStats())]
    tokens = [s.token_id for s in steps]
    assert all(s.logp == s.logq for s in steps)
    expected = pick(reference_logits(hf_model, prompt, tokens), tokens)
    assert max_diff([s.logq for s in steps], expected) < TOL


async def test_score_matches_transformers(engine: VllmEngine, hf_model: Any) -> None:
    prompt = text_prompt(engine)
    tokens = engine.tokenizer.encode(" Germany, where Johannes Gutenberg built a machine around 1440.")
    stats = EngineStats()
    logp = await engine.score(prompt, tokens, stats)
    assert (stats.calls, stats.tokens_scored) == (1, len(tokens))
    diff = max_diff(logp, pick(reference_logits(hf_model, prompt, tokens), tokens))
    print(f"score vs transformers log p: max |diff| = {diff:.2e} over {len(tokens)} tokens")
    assert diff < TOL
    assert await engine.score(prompt, [], EngineStats()) == []


async def test_score_fills_whole_context(engine: VllmEngine, hf_model: Any) -> None:
    """A sequence of exactly max_model_len tokens (a length-capped sample) can still be scored."""
    base = text_prompt(engine)
    prompt = (base * (MAX_MODEL_LEN // len(base) + 1))[: MAX_MODEL_LEN - 6]
    tokens = engine.tokenizer.encode(" a small town")[:6]
    tokens += [tokens[-1]] * (6 - len(tokens))
    assert len(prompt) + len(tokens) == MAX_MODEL_LEN
    reference = reference_logits(hf_model, prompt, tokens)
    logp = await engine.score(prompt, tokens, EngineStats())
    assert max_diff(logp, pick(reference, tokens)) < TOL
    rows = await engine.top_logprobs(prompt, tokens, 3, EngineStats())
    top = reference[-1].topk(3)
    assert set(rows[-1]) == set(top.indices.tolist())
    assert max_diff([rows[-1][i] for i in top.indices.tolist()], top.values.tolist()) < TOL


async def test_sample_returns_logp_and_logq(engine: VllmEngine, hf_model: Any) -> None:
    prompt = text_prompt(engine)
    stats = EngineStats()
    sample = await engine.sample(prompt, SamplingSpec(max_tokens=20, temperature=0.25, seed=7), stats)
    assert sample.finish_reason == "length" and len(sample.token_ids) == 20
    assert (stats.calls, stats.tokens_generated, stats.tokens_scored) == (2, 20, 20)
    reference = reference_logits(hf_model, prompt, sample.token_ids)
    assert max_diff(sample.logp, pick(reference, sample.token_ids)) < TOL
    assert max_diff(sample.logq, pick(tempered(reference, 0.25), sample.token_ids)) < TOL


async def test_scheduler_args_avoid_chunked_prefill_on_cpu() -> None:
    """On CPU no prompt may be split across steps (a split seeded prompt kills vLLM's engine core,
    issue 12), and a whole max_model_len prompt must fit one step; elsewhere vLLM's defaults."""
    assert scheduler_args(True, 1024) == {"enable_chunked_prefill": False, "max_num_batched_tokens": 2048}
    assert scheduler_args(True, 8192) == {"enable_chunked_prefill": False, "max_num_batched_tokens": 8192}
    assert scheduler_args(False, 8192) == {}
    assert scheduler_args(True, 1024, chunked_prefill=True) == {"enable_chunked_prefill": True}


async def test_engine_runs_without_chunked_prefill(engine: VllmEngine) -> None:
    scheduler = engine.llm.vllm_config.scheduler_config
    assert scheduler.enable_chunked_prefill is False
    assert scheduler.max_num_batched_tokens >= MAX_MODEL_LEN


async def test_seeded_prompts_over_one_step_budget(engine: VllmEngine) -> None:
    """24 seeded requests of 200 prompt tokens at once (4,800 tokens, more than one step's 2,048):
    with chunked prefill vLLM split a seeded prompt and its CPU engine core died (issue 12). All
    finish, the engine stays healthy, and each answer equals the same request run alone."""
    base = engine.tokenizer(TEXT * 60)["input_ids"]
    prompts = [[engine.tokenizer.bos_token_id or 1, i + 10, *base[:198]] for i in range(24)]
    specs = [SamplingSpec(max_tokens=6, temperature=1.0, seed=100 + i) for i in range(24)]
    together = await asyncio.gather(*(collect(engine, p, s) for p, s in zip(prompts, specs, strict=True)))
    await engine.check_health()
    for i in (0, 11, 23):
        alone, _ = await collect(engine, prompts[i], specs[i])
        assert alone == together[i][0]


async def test_seed_reproducible(engine: VllmEngine) -> None:
    prompt = text_prompt(engine)
    spec = SamplingSpec(max_tokens=24, temperature=1.0, seed=1234)
    (a, la), (b, lb), (c, _) = await asyncio.gather(
        collect(engine, prompt, spec),
        collect(engine, prompt, spec),
        collect(engine, prompt, SamplingSpec(max_tokens=24, temperature=1.0, seed=4321)),
    )
    assert a == b and max_diff(la, lb) < 1e-5
    assert a != c


async def test_max_tokens_and_eos_stop(engine: VllmEngine) -> None:
    spec = SamplingSpec(max_tokens=7, temperature=1.0, seed=0)
    tokens, _ = await collect(engine, text_prompt(engine), spec)
    assert len(tokens) == 7

    # The chat model answers this in about 25 tokens and ends its turn with <|im_end|>.
    prompt = chat_prompt(engine, "What is 7 + 5?")
    sample = await engine.sample(prompt, SamplingSpec(max_tokens=96, temperature=0.25, seed=0), EngineStats())
    assert sample.finish_reason == "stop"
    assert sample.token_ids[-1] in engine.eos_token_ids
    assert not engine.eos_token_ids & set(sample.token_ids[:-1])
    assert "12" in engine.tokenizer.decode(sample.token_ids)
    assert math.isfinite(sample.logp[-1]) and math.isfinite(sample.logq[-1])


async def test_closing_early_aborts(engine: VllmEngine) -> None:
    prompt = text_prompt(engine)
    spec = SamplingSpec(max_tokens=200, temperature=1.0, seed=2)  # prompt + 200 fits MAX_MODEL_LEN
    stats = EngineStats()
    async with contextlib.aclosing(engine.generate(prompt, spec, stats)) as stream:
        async for _ in stream:
            if stats.tokens_generated == 3:
                break
        assert engine.num_unfinished_requests() == 1
    await wait_idle(engine)

    # Cancelling the consuming task aborts too.
    started = asyncio.Event()

    async def consume() -> None:
        async for _ in engine.generate(prompt, spec, EngineStats()):
            started.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(started.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_idle(engine)


def requests_in_batch() -> float:
    """vLLM's own gauge of the requests in its model execution batch, at its last step."""
    labels = {"model_name": EMBEDDED_NAME, "engine": "0"}
    value = prometheus_client.REGISTRY.get_sample_value("vllm:num_requests_running", labels)
    assert value is not None, "vLLM exports no vllm:num_requests_running gauge"
    return value


async def test_concurrent_generate_batches_and_keeps_each_request_apart(engine: VllmEngine) -> None:
    """Eight seeded requests run at once are batched together and each gets its own answer.

    1. Each request alone, one after another: the reference tokens and log q.
    2. All eight at once (``asyncio.gather``), while polling vLLM's ``num_requests_running``
       gauge (requests in one execution batch) every 5 ms.
    3. Each concurrent result equals its request alone: tokens exactly, log q within TOL (a
       request that got another's tokens, or a mixed-up stream, fails here; eight different
       seeds give at least two different answers, so a mix-up is visible). The most requests
       seen in one batch is more than one: requests serialised by the engine (one at a time
       through vLLM) would keep the gauge at 1.
    """
    prompt = text_prompt(engine)
    specs = [SamplingSpec(max_tokens=16, temperature=1.0, seed=i) for i in range(8)]
    alone = [await collect(engine, prompt, s) for s in specs]
    assert len({tuple(tokens) for tokens, _ in alone}) > 1

    most = 0.0
    done = asyncio.Event()

    async def watch() -> None:
        nonlocal most
        while not done.is_set():
            most = max(most, requests_in_batch())
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    try:
        together = await asyncio.gather(*(collect(engine, prompt, s) for s in specs))
    finally:
        done.set()
        await watcher
    for (tokens, logq), (want_tokens, want_logq) in zip(together, alone, strict=True):
        assert tokens == want_tokens
        assert max_diff(logq, want_logq) < TOL
    assert most > 1, f"at most {most:.0f} request(s) in one vLLM batch: the requests ran one at a time"


async def test_length_guard(engine: VllmEngine) -> None:
    """The engine refuses what does not fit the context, as the torch engine does."""
    prompt = text_prompt(engine)
    too_many = MAX_MODEL_LEN - len(prompt) + 1
    with pytest.raises(ValueError, match="max_model_len"):
        await collect(engine, prompt, SamplingSpec(max_tokens=too_many))
    with pytest.raises(ValueError, match="max_model_len"):
        await engine.score(prompt, [1] * too_many, EngineStats())
    with pytest.raises(ValueError, match="at least one token"):
        await engine.score([], [1], EngineStats())


async def test_vllm_metrics_exported(engine: VllmEngine) -> None:
    text = prometheus_client.generate_latest().decode()
    assert "vllm:generation_tokens_total" in text
    assert f'model_name="{EMBEDDED_NAME}"' in text


async def test_top_logprobs(engine: VllmEngine, hf_model: Any) -> None:
    prompt = text_prompt(engine)
    tokens = engine.tokenizer.encode(" Germany")
    stats = EngineStats()
    rows = await engine.top_logprobs(prompt, tokens, 5, stats)
    assert (stats.calls, stats.tokens_scored) == (1, len(tokens))
    reference = reference_logits(hf_model, prompt, tokens).topk(5, dim=-1)
    for row, values, ids in zip(rows, reference.values, reference.indices, strict=True):
        assert set(row) == set(ids.tolist())
        assert max_diff([row[i] for i in ids.tolist()], values.tolist()) < TOL


async def test_agrees_with_torch_engine(engine: VllmEngine, checkpoint: str) -> None:
    """Decoders get the same log p and log q from both engines: vLLM's samples are scored by
    the torch engine, and their log q recomputed with the torch engine's proposal maths."""
    from powerserve.engine.torch_engine import TorchEngine, proposal_logprobs

    reference = TorchEngine.load(checkpoint, model_name=EMBEDDED_NAME, max_model_len=MAX_MODEL_LEN)
    try:
        assert reference.eos_token_ids == engine.eos_token_ids
        prompt = text_prompt(engine)
        specs = [
            SamplingSpec(max_tokens=16, temperature=0.25, seed=9),
            SamplingSpec(max_tokens=16, temperature=0.7, top_k=5, seed=9),
            SamplingSpec(max_tokens=16, temperature=0.5, top_p=0.9, seed=9),
        ]
        samples = await asyncio.gather(*(engine.sample(prompt, s, EngineStats()) for s in specs))
        for spec, sample in zip(specs, samples, strict=True):
            logp = await reference.score(prompt, sample.token_ids, EngineStats())
            logits = reference_logits(reference.model, prompt, sample.token_ids).double()
            logq = [
                float(proposal_logprobs(row, spec.temperature, spec.top_k, spec.top_p)[token])
                for row, token in zip(logits, sample.token_ids, strict=True)
            ]
            dp, dq = max_diff(sample.logp, logp), max_diff(sample.logq, logq)
            print(f"vs torch engine {spec}: log p {dp:.2e}, log q {dq:.2e}")
            assert dp < TOL and dq < TOL
    finally:
        await reference.shutdown()
