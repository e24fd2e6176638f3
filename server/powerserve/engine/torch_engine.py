"""``torch``: a plain PyTorch / transformers engine, the exact reference for the other engines.

It computes both log-probabilities of every sampled token exactly from the same logits:
``logp`` from the raw logits, ``logq`` from the distribution it actually draws from
(temperature, then top-k, then top-p, as vLLM does).

Concurrent calls are batched continuously: the live sequences of all ``generate`` calls share
one KV cache and advance together, one forward per step over the batch of their last tokens.
A new call joins at the next step (its prompt is prefilled on its own first); a finished or
abandoned one leaves. Each sequence samples with its own ``torch.Generator``, so a seeded call
draws the same tokens whatever else is in the batch.

A small LRU *prefix cache* keeps the KV caches of recently processed sequences. A later call
whose prompt shares a prefix with one of them runs the model only on the new tokens: this is
what makes Metropolis-Hastings proposals (resample the suffix of a sequence the engine has
just generated) cost one batched step per new token instead of a whole prefill.

All model work runs on one dedicated worker thread: model access is serialised and the event
loop stays free. The engine is three parts, as in nano-vllm: this adapter (the
:class:`~powerserve.engine.base.Engine` interface and loading), the scheduler
(:mod:`powerserve.engine.scheduler`: rows, batches, admit / step / retire) and the model runner
(:mod:`powerserve.engine.model_runner`: forwards and KV caches).
"""

from __future__ import annotations

import asyncio
import functools
import secrets
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from powerserve.engine.base import Engine, EngineStats, SamplingSpec, TokenStep
from powerserve.engine.batch import Row
from powerserve.engine.eos import eos_token_ids
from powerserve.engine.kv_cache import PrefixCache
from powerserve.engine.model_runner import ModelRunner
from powerserve.engine.sampling import proposal_logprobs, sample_rows, sample_step
from powerserve.engine.scheduler import Scheduler

T = TypeVar("T")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

__all__ = ["TorchEngine", "proposal_logprobs", "sample_rows", "sample_step"]


class TorchEngine(Engine):
    """Reference engine on a ``transformers`` causal LM, with continuous batching.

    ``prefix_cache_tokens`` bounds the prefix cache (total KV columns its entries keep alive,
    one per cached token; 0 turns it off). ``max_batch_size`` bounds the sequences decoded
    together; later calls wait their turn.
    Models with other than full-attention layers (sliding windows) cannot share a padded cache:
    their sequences each get a batch of one.

    Counters of the work done: ``forward_count`` (model forwards of any kind), ``decode_steps``
    (batched decode forwards) and ``decoded_rows`` (sequences over all decode steps).
    """

    name = "torch"

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        model_name: str,
        max_model_len: int,
        eos_token_ids: frozenset[int],
        prefix_cache_tokens: int = 16_384,
        max_batch_size: int = 64,
    ) -> None:
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_batch_size = max_batch_size
        self.runner = ModelRunner(model, prefix_cache_tokens)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch-engine")
        self.scheduler = Scheduler(self.runner, self._worker, max_batch_size, self.eos_token_ids)
        self._closed = False

    @property
    def model(self) -> Any:
        return self.runner.model

    @property
    def device(self) -> torch.device:
        return self.runner.device

    @property
    def prefix_cache(self) -> PrefixCache:
        return self.runner.prefix_cache

    @property
    def forward_count(self) -> int:
        return self.runner.forward_count

    @property
    def decode_steps(self) -> int:
        return self.scheduler.decode_steps

    @property
    def decoded_rows(self) -> int:
        return self.scheduler.decoded_rows

    @classmethod
    def load(
        cls,
        path: str,
        *,
        model_name: str,
        max_model_len: int,
        dtype: str = "auto",
        device: str | None = None,
        prefix_cache_tokens: int = 16_384,
        max_batch_size: int = 64,
    ) -> TorchEngine:
        """Load a Hugging Face checkpoint directory.

        ``dtype="auto"`` is float32 on the CPU and bfloat16 on a GPU. End-of-sequence ids follow
        :mod:`powerserve.engine.eos`.
        """
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dtype == "auto":
            torch_dtype = torch.float32 if device == "cpu" else torch.bfloat16
        elif dtype in _DTYPES:
            torch_dtype = _DTYPES[dtype]
        else:
            raise ValueError(f"unknown dtype {dtype!r}; choose auto or one of {sorted(_DTYPES)}")
        model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
        model.to(device)
        tokenizer = AutoTokenizer.from_pretrained(path)
        return cls(
            model,
            tokenizer,
            model_name=model_name,
            max_model_len=max_model_len,
            eos_token_ids=eos_token_ids((getattr(model, "generation_config", None), model.config), tokenizer),
            prefix_cache_tokens=prefix_cache_tokens,
            max_batch_size=max_batch_size,
        )

    # --- Engine interface ---------------------------------------------------------------------

    async def _generate(
        self, prompt: list[int], spec: SamplingSpec, stats: EngineStats
    ) -> AsyncGenerator[TokenStep, None]:
        """Sample token by token for :meth:`Engine.generate`.

        1. Queue a row for the scheduler, with this call's own generator (seeded by
           ``spec.seed``).
        2. The scheduler prefills the prompt, reusing the longest cached prefix, then samples
           the row's tokens in batched steps and sends each here as soon as it is drawn. It
           does not wait for this caller to consume them; it stops the row itself after an
           end-of-sequence token or ``spec.max_tokens`` tokens.
        3. Closing the iterator (or cancelling its task) marks the row closed; the scheduler
           drops it before its next step and remembers its KV cache for later calls.
        """
        if self._closed:
            raise RuntimeError("the torch engine has been shut down")
        seed = spec.seed if spec.seed is not None else secrets.randbits(63)
        generator = torch.Generator(device="cpu").manual_seed(seed % 2**64)
        row = Row(prompt, spec, generator, asyncio.get_running_loop(), asyncio.Queue())
        self.scheduler.submit(row)
        try:
            for i in range(spec.max_tokens):
                item = await row.queue.get()
                if isinstance(item, BaseException):
                    raise item
                step, batch_rows = item
                if i == 0:
                    stats.add("prefix_cache_hit_tokens", row.reused)
                stats.add("batched_rows", batch_rows)
                yield step
        finally:
            row.closed = True

    async def _score(self, prompt: list[int], tokens: list[int], stats: EngineStats) -> list[float]:
        """Raw log p of each of ``tokens`` after ``prompt`` and the tokens before it
        (see :meth:`ModelRunner.raw_logprobs`)."""

        def pick(logp: torch.Tensor) -> list[float]:  # logp: [n, V]
            picked = logp.gather(-1, torch.tensor(tokens, device=logp.device)[:, None])[:, 0]
            return [float(v) for v in picked.cpu()]

        return await self._raw(prompt, tokens, stats, pick)

    async def _top_logprobs(
        self, prompt: list[int], tokens: list[int], k: int, stats: EngineStats
    ) -> list[dict[int, float]]:
        """The ``k`` most likely tokens under the raw model at each position of ``tokens``."""

        def top(logp: torch.Tensor) -> list[dict[int, float]]:  # logp: [n, V]
            values, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
            rows = zip(ids.tolist(), values.tolist(), strict=True)
            return [dict(zip(i, v, strict=True)) for i, v in rows]

        return await self._raw(prompt, tokens, stats, top)

    async def shutdown(self) -> None:
        self._closed = True
        self.scheduler.closed = True
        await asyncio.to_thread(self._worker.shutdown, wait=True, cancel_futures=True)
        self.scheduler.close(RuntimeError("the torch engine has been shut down"))
        self.prefix_cache.clear()

    # --- single-sequence work (worker thread) -------------------------------------------------

    async def run_on_worker(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the engine's model thread, after the work queued before it."""
        if self._closed:
            raise RuntimeError("the torch engine has been shut down")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._worker, functools.partial(fn, *args))

    async def _raw(
        self, prompt: list[int], tokens: list[int], stats: EngineStats, reduce: Callable[[torch.Tensor], list[T]]
    ) -> list[T]:
        """``reduce`` applied on the worker to the raw log-probabilities [len(tokens), V]."""
        result, reused = await self.run_on_worker(self._raw_on_worker, prompt, tokens, reduce)
        stats.add("prefix_cache_hit_tokens", reused)
        return result

    @torch.inference_mode()
    def _raw_on_worker(
        self, prompt: list[int], tokens: list[int], reduce: Callable[[torch.Tensor], list[T]]
    ) -> tuple[list[T], int]:
        logp, reused = self.runner.raw_logprobs(prompt, tokens)
        return reduce(logp), reused
