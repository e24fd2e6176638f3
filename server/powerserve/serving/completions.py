"""``POST /v1/completions``."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request

from powerserve.errors import BadRequestError
from powerserve.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
)
from powerserve.serving.plan import build_plan, tokenize_prompts
from powerserve.serving.runner import ChoiceResult, Delta, Outcome, Runner
from powerserve.serving.state import ServerState
from powerserve.serving.streaming import cancel_on_disconnect, stream_events


def _runner(state: ServerState, body: CompletionRequest) -> Runner:
    if body.stream and body.logprobs is not None:
        raise BadRequestError("logprobs are not supported with stream=true", param="logprobs")
    prompts = tokenize_prompts(state, body.prompt)
    plan = build_plan(state, body, prompts, body.max_tokens, body.logprobs)
    state.admission.precheck(plan.weight, (plan.decoder.metric_label(plan.params), state.model_name))
    return Runner(state, plan)


async def create_completion(state: ServerState, body: CompletionRequest, request: Request) -> CompletionResponse:
    runner = _runner(state, body)
    outcome = await cancel_on_disconnect(request, runner.run())
    return CompletionResponse(
        model=body.model,
        choices=[
            CompletionChoice(
                index=c.index,
                text=c.text,
                logprobs=_logprobs(state, c) if body.logprobs is not None else None,
                finish_reason=c.finish_reason,
            )
            for c in outcome.choices
        ],
        usage=outcome.usage(),
        powerserve=outcome.info,
    )


def stream_completion(state: ServerState, body: CompletionRequest) -> AsyncIterator[str]:
    runner = _runner(state, body)  # validation errors surface before the stream starts
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(choices: list[CompletionChoice], **extra: object) -> CompletionResponse:
        return CompletionResponse(id=rid, created=created, model=body.model, choices=choices, **extra)  # type: ignore[arg-type]

    def delta_chunk(d: Delta) -> CompletionResponse:
        return chunk([CompletionChoice(index=d.index, text=d.text, finish_reason=None)])

    def final_chunks(outcome: Outcome, finishes: list[Delta]) -> list[CompletionResponse]:
        out = [chunk([CompletionChoice(index=d.index, text="", finish_reason=d.finish_reason)]) for d in finishes]
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        if include_usage:
            out.append(chunk([], usage=outcome.usage(), powerserve=outcome.info))
        elif out:
            out[-1].powerserve = outcome.info
        return out

    return stream_events(runner, delta_chunk, final_chunks)


def _logprobs(state: ServerState, choice: ChoiceResult) -> CompletionLogprobs:
    tok = state.tokenizer
    tokens = [tok.decode([t]) for t in choice.token_ids]
    offsets, pos = [], 0
    for piece in tokens:
        offsets.append(pos)
        pos += len(piece)
    top = None
    if choice.top is not None:
        top = [{tok.decode([t]): lp for t, lp in row.items()} for row in choice.top]
    return CompletionLogprobs(tokens=tokens, token_logprobs=choice.logp, top_logprobs=top, text_offset=offsets)
