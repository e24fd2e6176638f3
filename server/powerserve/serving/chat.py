"""``POST /v1/chat/completions``: the model's chat template, then the completion path."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Literal

from powerserve.errors import BadRequestError
from powerserve.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatTokenLogprob,
    DeltaMessage,
    TopLogprob,
)
from powerserve.serving.logprob_stream import HeldRunner, token_pieces
from powerserve.serving.plan import build_plan, encode_text
from powerserve.serving.runner import ChoiceResult, Delta, Outcome, Runner
from powerserve.serving.state import ServerState
from powerserve.serving.streaming import chunk_maker, stream_events


def _prompt_ids(state: ServerState, body: ChatCompletionRequest) -> tuple[int, ...]:
    tok = state.tokenizer
    if tok is None or not getattr(tok, "chat_template", None):
        raise BadRequestError("this model has no chat template; use /v1/completions", param="messages")
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tuple(encode_text(state, text, "messages", add_special_tokens=False))


async def _runner(state: ServerState, body: ChatCompletionRequest) -> Runner:
    if body.top_logprobs and not body.logprobs:
        raise BadRequestError("top_logprobs needs logprobs=true", param="top_logprobs")
    k = (body.top_logprobs or 0) if body.logprobs else None
    # Templating and tokenizing a long conversation takes a good part of a second; the
    # tokenizer releases the GIL, so in a worker thread it leaves the event loop free.
    prompt = await asyncio.to_thread(_prompt_ids, state, body)
    plan = build_plan(state, body, [prompt], body.requested_max_tokens(), k)
    state.admission.precheck(plan.weight, (plan.decoder.metric_label(plan.params), state.model_name))
    held = body.stream and body.logprobs  # text waits for its log-probabilities (serving/logprob_stream.py)
    return (HeldRunner if held else Runner)(state, plan)


async def create_chat_completion(state: ServerState, body: ChatCompletionRequest) -> ChatCompletionResponse:
    runner = await _runner(state, body)
    outcome = await runner.run()
    logprobs = None
    if body.logprobs:  # a detokenising pass per token and top token: off the loop
        logprobs = await asyncio.to_thread(lambda: [_logprobs(state, c) for c in outcome.choices])
    return ChatCompletionResponse(
        model=body.model,
        choices=[
            ChatChoice(
                index=c.index,
                message=AssistantMessage(content=c.text),
                logprobs=logprobs[i] if logprobs is not None else None,
                finish_reason=c.finish_reason,
            )
            for i, c in enumerate(outcome.choices)
        ],
        usage=outcome.usage(),
        powerserve=outcome.info,
    )


async def stream_chat_completion(state: ServerState, body: ChatCompletionRequest) -> AsyncIterator[str]:
    """The SSE lines of a streamed chat completion; awaiting this validates the request first,
    so that its errors surface as an HTTP status before the stream starts."""
    runner = await _runner(state, body)
    chunk = chunk_maker(ChatCompletionChunk, body.model)
    started: set[int] = set()

    def delta(index: int, content: str | None = None) -> DeltaMessage:
        """A choice's first delta names the role; later ones do not."""
        role: Literal["assistant"] | None = None if index in started else "assistant"
        started.add(index)
        return DeltaMessage(role=role, content=content)

    def delta_chunk(d: Delta) -> ChatCompletionChunk:
        return chunk([ChatChunkChoice(index=d.index, delta=delta(d.index, d.text))])

    def token_chunks(outcome: Outcome) -> list[ChatCompletionChunk]:
        out = []
        for c in outcome.choices:
            content = _logprobs(state, c).content or []
            for i, text in enumerate(token_pieces(state, runner.plan.stop, c)):
                logprobs = ChatLogprobs(content=content[i : i + 1])
                out.append(chunk([ChatChunkChoice(index=c.index, delta=delta(c.index, text), logprobs=logprobs)]))
        return out

    def final_chunks(outcome: Outcome, finishes: list[Delta]) -> list[ChatCompletionChunk]:
        out = token_chunks(outcome) if body.logprobs else []
        for d in finishes:
            out.append(chunk([ChatChunkChoice(index=d.index, delta=delta(d.index), finish_reason=d.finish_reason)]))
        return out

    def usage_chunk(outcome: Outcome) -> ChatCompletionChunk:
        return chunk([], usage=outcome.usage(), powerserve=outcome.info)

    include_usage = body.stream_options is not None and body.stream_options.include_usage
    return stream_events(runner, delta_chunk, final_chunks, usage_chunk if include_usage else None)


def _logprobs(state: ServerState, choice: ChoiceResult) -> ChatLogprobs:
    tok = state.tokenizer

    def entry(token_id: int, logprob: float) -> TopLogprob:
        text = tok.decode([token_id])
        return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode()))

    content = []
    for pos, (token_id, logprob) in enumerate(zip(choice.token_ids, choice.logp, strict=True)):
        base = entry(token_id, logprob)
        tops = [entry(t, lp) for t, lp in choice.top[pos].items()] if choice.top is not None else []
        content.append(ChatTokenLogprob(**base.model_dump(), top_logprobs=tops))
    return ChatLogprobs(content=content)
