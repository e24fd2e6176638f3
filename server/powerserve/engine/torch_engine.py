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
loop stays free.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import secrets
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache
from transformers.cache_utils import DynamicLayer

from powerserve.engine.base import Engine, EngineStats, SamplingSpec, TokenStep
from powerserve.engine.kv_cache import PrefixCache, _Batch, _layers, _Row, _Sequence, _Snapshot
from powerserve.engine.sampling import proposal_logprobs, sample_step

T = TypeVar("T")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

__all__ = ["TorchEngine", "proposal_logprobs", "sample_step"]


class TorchEngine(Engine):
    """Reference engine on a ``transformers`` causal LM, with continuous batching.

    ``prefix_cache_tokens`` bounds the prefix cache (total tokens over all entries; 0 turns it
    off). ``max_batch_size`` bounds the sequences decoded together; later calls wait their turn.
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
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_batch_size = max_batch_size
        self.device = next(model.parameters()).device
        self.prefix_cache = PrefixCache(prefix_cache_tokens)
        self.forward_count = self.decode_steps = self.decoded_rows = 0
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch-engine")
        self._closed = False
        self._keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        # Full-attention layers only: a sliding-window layer drops old keys, so its cache can be
        # neither cut back to an arbitrary prefix nor padded into a shared batch.
        probe = DynamicCache(config=model.config)
        self._full_attention = all(type(layer) is DynamicLayer for layer in probe.layers)
        self._prefix_reuse = prefix_cache_tokens > 0 and self._full_attention
        # The scheduler: calls queue in ``_joining`` (appended on the event loop, taken on the
        # worker); ``_batches`` lives on the worker; one ``_step`` at a time is queued.
        self._joining: deque[_Row] = deque()
        self._batches: list[_Batch] = []
        self._lock = threading.Lock()
        self._scheduled = False

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

        ``dtype="auto"`` is float32 on the CPU and bfloat16 on a GPU. End-of-sequence ids are
        the union of those in the generation config and the model config (an int or a list),
        else the tokenizer's.
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
        eos: set[int] = set()
        for source in (getattr(model, "generation_config", None), model.config):
            value = getattr(source, "eos_token_id", None)
            eos.update([value] if isinstance(value, int) else (value or []))
        if not eos and tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        return cls(
            model,
            tokenizer,
            model_name=model_name,
            max_model_len=max_model_len,
            eos_token_ids=frozenset(eos),
            prefix_cache_tokens=prefix_cache_tokens,
            max_batch_size=max_batch_size,
        )

    # --- Engine interface ---------------------------------------------------------------------

    async def generate(
        self, prompt_ids: Sequence[int], spec: SamplingSpec, stats: EngineStats
    ) -> AsyncIterator[TokenStep]:
        """Sample token by token; see :meth:`Engine.generate`.

        1. Queue a row for the scheduler (:meth:`_step`), with this call's own generator
           (seeded by ``spec.seed``).
        2. The scheduler prefills the prompt, reusing the longest cached prefix, then samples
           the row's tokens in batched steps and sends each here as soon as it is drawn. It
           does not wait for this caller to consume them.
        3. Closing the iterator (or cancelling its task) marks the row closed; the scheduler
           drops it before its next step and remembers its KV cache for later calls.
        """
        prompt = list(prompt_ids)
        self._check_lengths(len(prompt), spec.max_tokens)
        if self._closed:
            raise RuntimeError("the torch engine has been shut down")
        stats.calls += 1
        seed = spec.seed if spec.seed is not None else secrets.randbits(63)
        generator = torch.Generator(device="cpu").manual_seed(seed % 2**64)
        row = _Row(prompt, spec, generator, asyncio.get_running_loop(), asyncio.Queue())
        self._joining.append(row)
        self._wake()
        try:
            for i in range(spec.max_tokens):
                item = await row.queue.get()
                if isinstance(item, BaseException):
                    raise item
                step, batch_rows = item
                if i == 0:
                    _add(stats, "prefix_cache_hit_tokens", row.reused)
                _add(stats, "batched_rows", batch_rows)
                stats.tokens_generated += 1
                yield step
                if step.token_id in self.eos_token_ids:
                    return
        finally:
            row.closed = True

    async def score(self, prompt_ids: Sequence[int], token_ids: Sequence[int], stats: EngineStats) -> list[float]:
        """Raw log p of each of ``token_ids`` after ``prompt_ids`` and the tokens before it.

        One forward over the part of prompt + tokens that is not in the prefix cache; position
        len(prompt) - 1 is always fed, since its logits give the first token's probability.
        """
        tokens = list(token_ids)

        def pick(logp: torch.Tensor) -> list[float]:  # logp: [n, V]
            picked = logp.gather(-1, torch.tensor(tokens, device=logp.device)[:, None])[:, 0]
            return [float(v) for v in picked.cpu()]

        return await self._raw(prompt_ids, tokens, stats, pick)

    async def top_logprobs(
        self, prompt_ids: Sequence[int], token_ids: Sequence[int], k: int, stats: EngineStats
    ) -> list[dict[int, float]]:
        """The ``k`` most likely tokens under the raw model at each position of ``token_ids``."""

        def top(logp: torch.Tensor) -> list[dict[int, float]]:  # logp: [n, V]
            values, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
            rows = zip(ids.tolist(), values.tolist(), strict=True)
            return [dict(zip(i, v, strict=True)) for i, v in rows]

        return await self._raw(prompt_ids, list(token_ids), stats, top)

    async def shutdown(self) -> None:
        self._closed = True
        await asyncio.to_thread(self._worker.shutdown, wait=True, cancel_futures=True)
        for row in [*self._joining, *(r for batch in self._batches for r in batch.rows)]:
            row.deliver(RuntimeError("the torch engine has been shut down"))
        self._joining.clear()
        self._batches.clear()
        self.prefix_cache.clear()

    # --- the scheduler (worker thread) --------------------------------------------------------

    def _wake(self) -> None:
        """Queue one :meth:`_step` on the worker unless one is queued already."""
        with self._lock:
            if self._scheduled or self._closed:
                return
            self._scheduled = True
        with contextlib.suppress(RuntimeError):  # shut down in the meantime
            self._worker.submit(self._step)

    @torch.inference_mode()
    def _step(self) -> None:
        """One scheduler step; it queues the next one while there is work.

        1. Drop the rows whose callers stopped listening (remembering their caches).
        2. Admit waiting calls up to ``max_batch_size`` rows: prefill each, join a batch.
        3. Per batch: one forward over every row's pending token; each row samples its next
           token with its own spec and generator and sends it to its caller.
        4. Drop the finished rows (remembering their caches).

        Other worker jobs (:meth:`score`, ...) queued meanwhile run between two steps.
        """
        with self._lock:
            self._scheduled = False
        try:
            if self._closed:
                return
            self._retire()
            self._admit()
            for batch in list(self._batches):
                self._decode(batch)
            self._retire()
        finally:
            if self._joining or self._batches:
                self._wake()

    def _admit(self) -> None:
        live = sum(len(batch.rows) for batch in self._batches)
        while self._joining and live < self.max_batch_size:
            row = self._joining.popleft()
            if row.closed:
                continue
            try:
                seq = self._prefill(row.prompt)
            except Exception as error:
                row.deliver(error)
                continue
            row.tokens, row.pending, row.reused = seq.tokens, row.prompt[-1], seq.reused
            if self._batches and self._full_attention:
                self._batches[0].join(row, seq)
            else:
                self._batches.append(_Batch(self.model.config, row, seq))
            live += 1

    def _prefill(self, prompt: list[int]) -> _Sequence:
        """A cache of ``prompt[:-1]``, from its longest cached prefix; the last prompt token is
        left for the first batched step. The result is remembered at once, so that concurrent
        calls with the same prompt prefill it only once."""
        seq = self._open(prompt, len(prompt) - 1)
        rest = prompt[len(seq.tokens) : -1]
        if rest:
            self._forward(seq, rest, all_logits=False)
            self._remember(seq)
        return seq

    def _decode(self, batch: _Batch) -> None:
        rows = batch.rows
        try:
            logits = self._run(batch.step_inputs(self.device), batch.cache, all_logits=False)[:, -1]  # [B, V]
            logits = logits.float().cpu()
        except Exception as error:  # the batch's cache is no longer consistent: end its rows
            self._batches.remove(batch)
            for row in rows:
                row.deliver(error)
            return
        batch.width += 1
        self.decode_steps += 1
        self.decoded_rows += len(rows)
        for b, row in enumerate(rows):
            row.tokens.append(row.pending)
            if row.closed:
                continue
            try:
                step = sample_step(logits[b], row.spec, row.generator)
            except Exception as error:  # e.g. NaN logits: end this row, not every row after it
                row.finished = True
                row.deliver(error)
                continue
            row.pending = step.token_id
            row.produced += 1
            row.finished = step.token_id in self.eos_token_ids or row.produced == row.spec.max_tokens
            row.deliver((step, len(rows)))

    def _retire(self) -> None:
        for batch in list(self._batches):
            gone = {b for b, row in enumerate(batch.rows) if row.finished or row.closed}
            if not gone:
                continue
            if self._prefix_reuse:
                for b in gone:
                    snap = batch.snapshot(b)
                    if snap is not None:
                        self.prefix_cache.put(snap)
            batch.drop(gone)
            if not batch.rows:
                self._batches.remove(batch)

    # --- single-sequence work (worker thread) -------------------------------------------------

    async def _on_worker(self, fn: Callable[..., T], *args: Any) -> T:
        if self._closed:
            raise RuntimeError("the torch engine has been shut down")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._worker, functools.partial(fn, *args))

    def _open(self, tokens: list[int], limit: int) -> _Sequence:
        """A cache for the longest cached prefix of ``tokens``, at most ``limit`` tokens long."""
        snap, n = self.prefix_cache.longest_prefix(tokens) if self._prefix_reuse else (None, 0)
        n = min(n, limit)
        if snap is None or n <= 0:
            return _Sequence(DynamicCache(config=self.model.config))
        layers = [(k[..., :n, :], v[..., :n, :]) for k, v in snap.layers]
        return _Sequence(DynamicCache(ddp_cache_data=layers, config=self.model.config), list(tokens[:n]), n)

    def _run(self, inputs: dict[str, torch.Tensor], cache: DynamicCache, all_logits: bool) -> torch.Tensor:
        """One forward on top of ``cache``; logits [B, S, V] (or [B, 1, V] unless ``all_logits``)."""
        # Only the last position's logits are needed while decoding: skip the rest of the head.
        extra = {"logits_to_keep": 1} if self._keeps_logits and not all_logits else {}
        self.forward_count += 1
        out = self.model(**inputs, past_key_values=cache, use_cache=True, **extra)
        logits: torch.Tensor = out.logits
        return logits

    def _forward(self, seq: _Sequence, new_tokens: list[int], all_logits: bool) -> torch.Tensor:
        """Run ``new_tokens`` through the model on top of ``seq``; logits [n, V] (or [1, V])."""
        input_ids = torch.tensor([new_tokens], dtype=torch.long, device=self.device)
        logits = self._run({"input_ids": input_ids}, seq.cache, all_logits)[0]
        seq.tokens.extend(new_tokens)
        return logits

    async def _raw(
        self,
        prompt_ids: Sequence[int],
        tokens: list[int],
        stats: EngineStats,
        reduce: Callable[[torch.Tensor], list[T]],
    ) -> list[T]:
        """``reduce`` applied on the worker to the raw log-probabilities [len(tokens), V]."""
        prompt = list(prompt_ids)
        self._check_lengths(len(prompt), len(tokens))
        stats.calls += 1
        stats.tokens_scored += len(tokens)
        if not tokens:
            return []
        result, reused = await self._on_worker(self._raw_on_worker, prompt, tokens, reduce)
        _add(stats, "prefix_cache_hit_tokens", reused)
        return result

    @torch.inference_mode()
    def _raw_on_worker(
        self, prompt: list[int], tokens: list[int], reduce: Callable[[torch.Tensor], list[T]]
    ) -> tuple[list[T], int]:
        full = prompt + tokens
        seq = self._open(full, len(prompt) - 1)
        # logits[i] predicts full[reused + i + 1]; the first scored token is full[len(prompt)].
        logits = self._forward(seq, full[seq.reused :], all_logits=True)[len(prompt) - 1 - seq.reused : -1]
        self._remember(seq)
        return reduce(torch.log_softmax(logits.to(torch.float64), dim=-1)), seq.reused

    def _remember(self, seq: _Sequence) -> None:
        if not self._prefix_reuse or not seq.tokens:
            return
        layers = _layers(seq.cache)
        if layers is None or layers[0][0].shape[-2] != len(seq.tokens):
            return  # a forward failed half-way: this cache is not worth keeping
        self.prefix_cache.put(_Snapshot(tuple(seq.tokens), tuple(layers)))

    def _check_lengths(self, prompt_len: int, new_tokens: int) -> None:
        if prompt_len < 1:
            raise ValueError("the prompt must hold at least one token")
        if prompt_len + new_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({prompt_len}) + new tokens ({new_tokens}) exceeds max_model_len ({self.max_model_len})"
            )


def _add(stats: EngineStats, key: str, value: float) -> None:
    stats.extra[key] = stats.extra.get(key, 0.0) + value
