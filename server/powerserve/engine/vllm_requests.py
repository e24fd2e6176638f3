"""One vLLM request each: a sampling stream, and a prefill that reads raw log-probabilities.

Shared by :class:`~powerserve.engine.vllm_engine.VllmEngine` and its LoRA views
(:class:`~powerserve.engine.lora.LoraEngine`): every function takes vLLM's ``AsyncLLM`` and an
optional ``LoRARequest`` (None: the base weights). Nothing here counts work or checks lengths;
the :class:`~powerserve.engine.base.Engine` template methods do that.

- ``logq``: the engine runs with ``logprobs_mode="processed_logprobs"``, so the log-probability
  vLLM reports for each sampled token is under the distribution it was drawn from.
- ``logp``: :func:`prompt_logprobs` sends prompt + tokens as a prompt with ``prompt_logprobs``;
  vLLM computes prompt log-probabilities from the raw logits whatever the logprobs mode.

A dead engine core raises :class:`~powerserve.errors.ServiceUnavailableError` (503, code
``engine_dead``) from every request.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncGenerator
from typing import Any

from powerserve.engine.base import SamplingSpec, TokenStep
from powerserve.errors import ServiceUnavailableError

ENGINE_DEAD_MESSAGE = "The inference engine stopped working; the server is restarting. Retry shortly."


async def sample_steps(
    llm: Any, prompt: list[int], spec: SamplingSpec, stop_token_ids: list[int], lora: Any = None
) -> AsyncGenerator[TokenStep, None]:
    """Sample a continuation of ``prompt``, yielding each token with its log q (and log p when
    ``spec`` is the raw model). Stops on ``stop_token_ids`` (the stop token is yielded).
    Closing the generator before the end aborts the request in vLLM's engine core."""
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    params = SamplingParams(
        max_tokens=spec.max_tokens,
        temperature=spec.temperature,
        top_p=spec.top_p,
        top_k=spec.top_k,  # 0 disables top-k in vLLM as in SamplingSpec
        seed=spec.seed,
        logprobs=0,  # only the sampled token's (processed) log-probability
        # vLLM's own EOS rule (tokenizer + generation config) is switched off for ours, so
        # it stops on exactly the tokens that finish_reason() calls "stop"; a stop token
        # stays in the output token ids.
        ignore_eos=True,
        stop_token_ids=stop_token_ids,
        detokenize=False,
        output_kind=RequestOutputKind.DELTA,
    )
    raw = spec.is_raw
    stream = alive(llm.generate(TokensPrompt(prompt_token_ids=prompt), params, request_id(), lora_request=lora))
    try:
        async for out in stream:
            completion = out.outputs[0]
            # DELTA outputs carry the tokens sampled since the last output (usually one).
            logprobs = completion.logprobs or []
            for token_id, entry in zip(completion.token_ids, logprobs, strict=True):
                logq = float(entry[token_id].logprob)
                yield TokenStep(token_id, logq, logq if raw else None)
    finally:
        # Closing vLLM's stream before it finished aborts the request in the engine core;
        # after a normal finish this is a no-op.
        await stream.aclose()


async def score_tokens(
    llm: Any, prompt: list[int], tokens: list[int], max_model_len: int, lora: Any = None
) -> list[float]:
    """Raw log p of each of ``tokens`` (non-empty) after ``prompt`` and the tokens before it."""
    entries = await prompt_logprobs(llm, prompt, tokens, 0, max_model_len, lora)
    return [float(entry[token].logprob) for entry, token in zip(entries, tokens, strict=True)]


async def top_tokens(
    llm: Any, prompt: list[int], tokens: list[int], k: int, max_model_len: int, lora: Any = None
) -> list[dict[int, float]]:
    """The ``k`` most likely tokens under the raw model at each position of ``tokens``."""
    entries = await prompt_logprobs(llm, prompt, tokens, k, max_model_len, lora)
    top = [sorted(entry.items(), key=lambda item: -item[1].logprob)[:k] for entry in entries]
    return [{token: float(lp.logprob) for token, lp in row} for row in top]


async def prompt_logprobs(
    llm: Any, prompt: list[int], tokens: list[int], top_k: int, max_model_len: int, lora: Any = None
) -> list[dict[int, Any]]:
    """vLLM's log-probability entries (raw model) at each position of ``tokens``.

    One prefill of prompt + tokens with ``prompt_logprobs=top_k``: each entry holds the
    token itself and the ``top_k`` most likely tokens. vLLM refuses a prompt that fills
    the whole context (it must sample at least one token), so a sequence of exactly
    ``max_model_len`` tokens is sent without its last token, whose entry then comes from
    the sampled position (temperature 1, no truncation, so processed = raw): there it
    holds the token itself when ``top_k == 0``, else the ``top_k`` most likely tokens.
    """
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    ids = [*prompt, *tokens]
    last: dict[str, Any] = {}
    whole_context = len(ids) >= max_model_len
    if whole_context:
        ids.pop()
        last = {"logprobs": top_k} if top_k else {"logprob_token_ids": [tokens[-1]]}
    params = SamplingParams(
        max_tokens=1,
        temperature=1.0,
        prompt_logprobs=top_k,
        detokenize=False,
        output_kind=RequestOutputKind.FINAL_ONLY,
        **last,
    )
    final = None
    async for out in alive(llm.generate(TokensPrompt(prompt_token_ids=ids), params, request_id(), lora_request=lora)):
        final = out
    assert final is not None and final.prompt_logprobs is not None
    entries = list(final.prompt_logprobs[len(prompt) :])
    if whole_context:
        entries.append(final.outputs[0].logprobs[0])
    assert len(entries) == len(tokens)
    return entries


async def alive(stream: AsyncGenerator[Any, None]) -> AsyncGenerator[Any, None]:
    """``stream`` (vLLM's request outputs), with vLLM's ``EngineDeadError`` raised as a 503.

    A dead engine core cannot come back in this process: the request fails with an
    OpenAI-shaped 503 (code ``engine_dead``) rather than a 500, and the server's watchdog exits.
    Closing this generator closes ``stream`` (which aborts an unfinished request in vLLM).
    """
    from vllm.v1.engine.exceptions import EngineDeadError

    try:
        async for out in stream:
            yield out
    except EngineDeadError as exc:
        raise ServiceUnavailableError(ENGINE_DEAD_MESSAGE, code="engine_dead") from exc
    finally:
        await stream.aclose()


def request_id() -> str:
    """A fresh vLLM request id."""
    return f"ps-{uuid.uuid4().hex}"
