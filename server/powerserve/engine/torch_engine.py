"""``torch``: a plain PyTorch / transformers engine, the exact reference for the other engines.

It samples one sequence at a time with a KV cache, and computes both log-probabilities of
every sampled token exactly from the same logits: ``logp`` from the raw logits, ``logq`` from
the distribution it actually draws from (temperature, then top-k, then top-p, as vLLM does).

A small LRU *prefix cache* keeps the KV caches of recently processed sequences. A later call
whose prompt shares a prefix with one of them runs the model only on the new tokens: this is
what makes Metropolis-Hastings proposals (resample the suffix of a sequence the engine has
just generated) cost one forward per new token instead of a whole prefill.

All model work runs on one dedicated worker thread: model access is serialised, the event
loop stays free, and a cancelled call stops before its next forward.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import secrets
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache
from transformers.cache_utils import DynamicLayer

from powerserve.engine.base import Engine, EngineStats, SamplingSpec, TokenStep

T = TypeVar("T")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --- sampling maths: pure functions on one row of logits -------------------------------------


def proposal_logprobs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Log-probabilities of the distribution q that a token is drawn from.

    logits: [V], float64. Steps (vLLM's order and tie rules):

    1. Temperature: z = logits / temperature.
    2. Top-k (k > 0): drop every token whose z is below the k-th largest z (ties are kept).
    3. Top-p (p < 1): sort the survivors by ascending probability; drop those whose cumulative
       probability is <= 1 - p, always keeping the most likely one. What is left is the
       smallest set of most likely tokens whose probability mass reaches p.
    4. log q = log_softmax(z) over the survivors (-inf elsewhere).
    """
    z = logits / temperature
    vocab = z.shape[-1]
    if (0 < top_k < vocab) or top_p < 1.0:
        z_sorted, order = z.sort(descending=False)
        if 0 < top_k < vocab:
            kth_largest = z_sorted[vocab - top_k]
            z_sorted = z_sorted.masked_fill(z_sorted < kth_largest, -float("inf"))
        if top_p < 1.0:
            cumulative = z_sorted.softmax(-1).cumsum(-1)
            drop = cumulative <= 1.0 - top_p
            drop[-1] = False
            z_sorted = z_sorted.masked_fill(drop, -float("inf"))
        z = torch.empty_like(z).scatter_(0, order, z_sorted)
    return torch.log_softmax(z, dim=-1)


def sample_step(logits: torch.Tensor, spec: SamplingSpec, generator: torch.Generator) -> TokenStep:
    """Draw one token from q (see :func:`proposal_logprobs`); logits: [V] on the CPU.

    log p is the raw model's log_softmax(logits) at the drawn token.
    """
    logits = logits.to(torch.float64)
    logp_all = torch.log_softmax(logits, dim=-1)
    logq_all = logp_all if spec.is_raw else proposal_logprobs(logits, spec.temperature, spec.top_k, spec.top_p)
    token = int(torch.multinomial(logq_all.exp(), 1, generator=generator).item())
    return TokenStep(token_id=token, logq=float(logq_all[token]), logp=float(logp_all[token]))


# --- KV caches --------------------------------------------------------------------------------


@dataclass(slots=True)
class _Sequence:
    """A live KV cache and the tokens whose keys and values it holds.

    ``cache`` is None until the worker opens it; ``reused`` counts the tokens it then took
    from the prefix cache.
    """

    cache: DynamicCache | None = None
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


# --- the engine -------------------------------------------------------------------------------


class TorchEngine(Engine):
    """Reference engine on a ``transformers`` causal LM; one sequence per forward.

    ``prefix_cache_tokens`` bounds the prefix cache (total tokens over all entries; 0 turns it
    off). Concurrent calls are interleaved forward by forward, not batched.
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
    ) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.device = next(model.parameters()).device
        self.prefix_cache = PrefixCache(prefix_cache_tokens)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch-engine")
        self._closed = False
        self._keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        # Full-attention layers only: a sliding-window layer drops old keys, so its cache
        # cannot be cut back to an arbitrary prefix.
        probe = DynamicCache(config=model.config)
        self._prefix_reuse = prefix_cache_tokens > 0 and all(type(layer) is DynamicLayer for layer in probe.layers)

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
        )

    # --- Engine interface ---------------------------------------------------------------------

    async def generate(
        self, prompt_ids: Sequence[int], spec: SamplingSpec, stats: EngineStats
    ) -> AsyncIterator[TokenStep]:
        """Sample token by token; see :meth:`Engine.generate`.

        1. Take the longest cached prefix of the prompt (at most len(prompt) - 1 tokens, so
           at least one token is fed) and run the model on the rest of the prompt.
        2. Per token: draw from q with this call's own generator (seeded by ``spec.seed``),
           yield it, feed it back as the next single-token forward.
        3. On exit, however it happens, remember the sequence's KV cache for later calls.
        """
        prompt = list(prompt_ids)
        self._check_lengths(len(prompt), spec.max_tokens)
        stats.calls += 1
        seed = spec.seed if spec.seed is not None else secrets.randbits(63)
        generator = torch.Generator(device="cpu").manual_seed(seed % 2**64)
        seq = _Sequence()
        try:
            pending = prompt
            for i in range(spec.max_tokens):
                step = await self._on_worker(self._decode_step, seq, pending, spec, generator)
                if i == 0:
                    _add_hits(stats, seq.reused)
                stats.tokens_generated += 1
                yield step
                if step.token_id in self.eos_token_ids:
                    return
                pending = [step.token_id]
        finally:
            # Queued behind any forward still running for this sequence, so the snapshot
            # sees a cache that matches ``seq.tokens``. No await: this also runs on close.
            if not self._closed:
                with contextlib.suppress(RuntimeError):  # shut down in the meantime
                    self._worker.submit(self._remember, seq)

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
        self.prefix_cache.clear()

    # --- worker-thread side -------------------------------------------------------------------

    async def _on_worker(self, fn: Callable[..., T], *args: Any) -> T:
        if self._closed:
            raise RuntimeError("the torch engine has been shut down")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._worker, functools.partial(fn, *args))

    def _open(self, seq: _Sequence, tokens: list[int]) -> None:
        """Give ``seq`` a cache for ``tokens`` from their longest cached prefix (< len(tokens))."""
        snap, n = self.prefix_cache.longest_prefix(tokens) if self._prefix_reuse else (None, 0)
        n = min(n, len(tokens) - 1)
        if snap is None or n <= 0:
            seq.cache = DynamicCache(config=self.model.config)
            return
        layers = [(k[..., :n, :], v[..., :n, :]) for k, v in snap.layers]
        seq.cache = DynamicCache(ddp_cache_data=layers, config=self.model.config)
        seq.tokens, seq.reused = list(tokens[:n]), n

    @torch.inference_mode()
    def _forward(self, seq: _Sequence, new_tokens: list[int], all_logits: bool) -> torch.Tensor:
        """Run ``new_tokens`` through the model on top of ``seq``; logits [n, V] (or [1, V])."""
        input_ids = torch.tensor([new_tokens], dtype=torch.long, device=self.device)
        # Only the last position's logits are needed while decoding: skip the rest of the head.
        extra = {"logits_to_keep": 1} if self._keeps_logits and not all_logits else {}
        out = self.model(input_ids=input_ids, past_key_values=seq.cache, use_cache=True, **extra)
        seq.tokens.extend(new_tokens)
        logits: torch.Tensor = out.logits[0]
        return logits

    @torch.inference_mode()
    def _decode_step(
        self, seq: _Sequence, new_tokens: list[int], spec: SamplingSpec, generator: torch.Generator
    ) -> TokenStep:
        """Feed ``new_tokens`` and draw the next token; the first step opens the cache and
        gets the whole prompt (one hop to the worker per token)."""
        if seq.cache is None:
            self._open(seq, new_tokens)
            new_tokens = new_tokens[seq.reused :]
        logits = self._forward(seq, new_tokens, all_logits=False)[-1]
        return sample_step(logits.float().cpu(), spec, generator)

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
        _add_hits(stats, reused)
        return result

    @torch.inference_mode()
    def _raw_on_worker(
        self, prompt: list[int], tokens: list[int], reduce: Callable[[torch.Tensor], list[T]]
    ) -> tuple[list[T], int]:
        full = prompt + tokens
        seq = _Sequence()
        self._open(seq, full[: len(prompt)])
        # logits[i] predicts full[reused + i + 1]; the first scored token is full[len(prompt)].
        logits = self._forward(seq, full[seq.reused :], all_logits=True)[len(prompt) - 1 - seq.reused : -1]
        self._remember(seq)
        return reduce(torch.log_softmax(logits.to(torch.float64), dim=-1)), seq.reused

    def _remember(self, seq: _Sequence) -> None:
        if not self._prefix_reuse or seq.cache is None or not seq.tokens:
            return
        layers = []
        for layer in seq.cache.layers:
            assert isinstance(layer, DynamicLayer)
            if layer.keys is None or layer.values is None or layer.keys.shape[-2] != len(seq.tokens):
                return  # a forward failed half-way: this cache is not worth keeping
            layers.append((layer.keys, layer.values))
        self.prefix_cache.put(_Snapshot(tuple(seq.tokens), tuple(layers)))

    def _check_lengths(self, prompt_len: int, new_tokens: int) -> None:
        if prompt_len < 1:
            raise ValueError("the prompt must hold at least one token")
        if prompt_len + new_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({prompt_len}) + new tokens ({new_tokens}) exceeds max_model_len ({self.max_model_len})"
            )


def _add_hits(stats: EngineStats, reused: int) -> None:
    stats.extra["prefix_cache_hit_tokens"] = stats.extra.get("prefix_cache_hit_tokens", 0.0) + reused
