"""The torch engine's model runner: forward passes, per-sequence KV caches and the prefix cache.

It knows nothing of calls, rows or event loops (that is :mod:`powerserve.engine.scheduler`);
every method runs on the engine's worker thread.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from powerserve.engine.attention import use_grouped_attention
from powerserve.engine.kv_cache import CachedSequence, PrefixCache, Snapshot, kv_layers, new_cache


class ModelRunner:
    """A ``transformers`` causal LM with a KV-cache store.

    ``prefix_cache_tokens`` bounds the prefix cache (total KV columns its entries keep alive,
    one per cached token; 0 turns it off). Models with other than full-attention layers (sliding
    windows) cannot share a padded cache or reuse an arbitrary prefix: ``full_attention`` is then
    False and reuse is off.
    ``forward_count`` counts model forwards of any kind. A model on SDPA attention is switched
    to :mod:`powerserve.engine.attention`'s (the same maths without copying keys per query head
    in padded decode steps).
    """

    def __init__(self, model: Any, prefix_cache_tokens: int) -> None:
        self.model = model.eval().requires_grad_(False)
        use_grouped_attention(self.model)
        self.config = model.config
        self.device: torch.device = next(model.parameters()).device
        self.prefix_cache = PrefixCache(prefix_cache_tokens)
        self.forward_count = 0
        self._keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        # A sliding-window layer drops old keys, so its cache can be neither cut back to an
        # arbitrary prefix nor padded into a shared batch.
        probe = DynamicCache(config=model.config)
        self.full_attention = all(type(layer) is DynamicLayer for layer in probe.layers)
        self.prefix_reuse = prefix_cache_tokens > 0 and self.full_attention

    def run(self, inputs: dict[str, torch.Tensor], cache: DynamicCache, all_logits: bool) -> torch.Tensor:
        """One forward on top of ``cache``; logits [B, S, V] (or [B, 1, V] unless ``all_logits``)."""
        # Only the last position's logits are needed while decoding: skip the rest of the head.
        extra = {"logits_to_keep": 1} if self._keeps_logits and not all_logits else {}
        self.forward_count += 1
        out = self.model(**inputs, past_key_values=cache, use_cache=True, **extra)
        logits: torch.Tensor = out.logits
        return logits

    def forward(self, seq: CachedSequence, new_tokens: list[int], all_logits: bool) -> torch.Tensor:
        """Run ``new_tokens`` through the model on top of ``seq``; logits [n, V] (or [1, V])."""
        input_ids = torch.tensor([new_tokens], dtype=torch.long, device=self.device)
        logits = self.run({"input_ids": input_ids}, seq.cache, all_logits)[0]
        seq.tokens.extend(new_tokens)
        return logits

    def open(self, tokens: list[int], limit: int) -> CachedSequence:
        """A cache for the longest cached prefix of ``tokens``, at most ``limit`` tokens long."""
        snap, n = self.prefix_cache.longest_prefix(tokens) if self.prefix_reuse else (None, 0)
        n = min(n, limit)
        if snap is None or n <= 0:
            return CachedSequence(new_cache(self.config))
        layers = [(k[..., :n, :], v[..., :n, :]) for k, v in snap.layers]
        return CachedSequence(new_cache(self.config, layers), list(tokens[:n]), n)

    def prefill(self, prompt: list[int]) -> CachedSequence:
        """A cache of ``prompt[:-1]``, from its longest cached prefix; the last prompt token is
        left for the first batched step. The result is remembered at once, so that concurrent
        calls with the same prompt prefill it only once."""
        seq = self.open(prompt, len(prompt) - 1)
        rest = prompt[len(seq.tokens) : -1]
        if rest:
            self.forward(seq, rest, all_logits=False)
            self.remember(seq)
        return seq

    def raw_logprobs(self, prompt: list[int], tokens: list[int]) -> tuple[torch.Tensor, int]:
        """Raw log p [len(tokens), V] (float64) of each of ``tokens`` after ``prompt`` and the
        tokens before it, and the number of prefix tokens reused from the cache.

        One forward over the part of prompt + tokens that is not in the prefix cache; position
        len(prompt) - 1 is always fed, since its logits give the first token's probability.
        """
        full = prompt + tokens
        seq = self.open(full, len(prompt) - 1)
        # logits[i] predicts full[reused + i + 1]; the first scored token is full[len(prompt)].
        logits = self.forward(seq, full[seq.reused :], all_logits=True)[len(prompt) - 1 - seq.reused : -1]
        self.remember(seq)
        return torch.log_softmax(logits.to(torch.float64), dim=-1), seq.reused

    def remember(self, seq: CachedSequence) -> None:
        if not self.prefix_reuse or not seq.tokens:
            return
        layers = kv_layers(seq.cache)
        if layers is None or layers[0][0].shape[-2] != len(seq.tokens):
            return  # a forward failed half-way: this cache is not worth keeping
        self.prefix_cache.put(Snapshot.of(seq.tokens, layers))

    def keep(self, snap: Snapshot | None) -> None:
        """Remember a finished row's snapshot (taken out of its batch) for later calls."""
        if snap is not None and self.prefix_reuse:
            self.prefix_cache.put(snap)
