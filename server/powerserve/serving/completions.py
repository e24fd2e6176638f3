"""``POST /v1/completions`` (with ``echo``: see serving/echo.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

from powerserve.errors import BadRequestError
from powerserve.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
)
from powerserve.serving.echo import PromptScores, add_cost, score_prompts
from powerserve.serving.logprob_stream import HeldRunner, token_pieces
from powerserve.serving.plan import build_plan, tokenize_prompts
from powerserve.serving.runner import ChoiceResult, Delta, Outcome, Runner
from powerserve.serving.state import ServerState
from powerserve.serving.streaming import chunk_maker, stream_events


async def _runner(state: ServerState, body: CompletionRequest) -> Runner:
    if body.stream and body.echo:
        raise BadRequestError("echo is not supported with stream=true", param="echo")
    if body.max_tokens == 0 and not body.echo:
        raise BadRequestError("max_tokens must be at least 1 (0 is allowed only with echo=true)", param="max_tokens")
    # Tokenizing a long prompt takes a good part of a second; the tokenizer releases the GIL,
    # so in a worker thread it leaves the event loop (and every other client) free.
    prompts = await asyncio.to_thread(tokenize_prompts, state, body.prompt)
    plan = build_plan(state, body, prompts, body.max_tokens, body.logprobs)
    state.admission.precheck(plan.weight, (plan.decoder.metric_label(plan.params), state.model_name))
    held = body.stream and body.logprobs is not None  # text waits for its log-probabilities
    return (HeldRunner if held else Runner)(state, plan)


async def create_completion(state: ServerState, body: CompletionRequest) -> CompletionResponse:
    runner = await _runner(state, body)
    outcome = await runner.run()
    scores = None
    if body.echo and body.logprobs is not None:
        scores, stats = await score_prompts(state.engine, runner.plan.prompts, body.logprobs)
        add_cost(outcome, stats, runner.labels)
    n = runner.plan.n
    all_logprobs = None
    if body.logprobs is not None:  # a detokenising pass per token and top token: off the loop
        all_logprobs = await asyncio.to_thread(lambda: [_logprobs(state, c) for c in outcome.choices])
    choices = []
    for i, c in enumerate(outcome.choices):
        logprobs = all_logprobs[i] if all_logprobs is not None else None
        text = c.text
        if body.echo:
            prompt_text = _prompt_text(state, body, runner.plan.prompts, c.index // n)
            text = prompt_text + text
            if logprobs is not None and scores is not None:
                logprobs = _echoed(state, scores[c.index // n], prompt_text, logprobs)
        choices.append(CompletionChoice(index=c.index, text=text, logprobs=logprobs, finish_reason=c.finish_reason))
    return CompletionResponse(model=body.model, choices=choices, usage=outcome.usage(), powerserve=outcome.info)


async def stream_completion(state: ServerState, body: CompletionRequest) -> AsyncIterator[str]:
    """The SSE lines of a streamed completion; awaiting this validates the request first, so
    that its errors surface as an HTTP status before the stream starts."""
    runner = await _runner(state, body)
    chunk = chunk_maker(CompletionResponse, body.model)

    def delta_chunk(d: Delta) -> CompletionResponse:
        return chunk([CompletionChoice(index=d.index, text=d.text, finish_reason=None)])

    def token_chunks(outcome: Outcome) -> list[CompletionResponse]:
        out = []
        for c in outcome.choices:
            lp = _logprobs(state, c)
            for i, text in enumerate(token_pieces(state, runner.plan.stop, c)):
                one = CompletionLogprobs(
                    tokens=lp.tokens[i : i + 1],
                    token_logprobs=lp.token_logprobs[i : i + 1],
                    top_logprobs=None if lp.top_logprobs is None else lp.top_logprobs[i : i + 1],
                    text_offset=lp.text_offset[i : i + 1],
                )
                out.append(chunk([CompletionChoice(index=c.index, text=text, logprobs=one, finish_reason=None)]))
        return out

    def final_chunks(outcome: Outcome, finishes: list[Delta]) -> list[CompletionResponse]:
        out = token_chunks(outcome) if body.logprobs is not None else []
        out += [chunk([CompletionChoice(index=d.index, text="", finish_reason=d.finish_reason)]) for d in finishes]
        return out

    def usage_chunk(outcome: Outcome) -> CompletionResponse:
        return chunk([], usage=outcome.usage(), powerserve=outcome.info)

    include_usage = body.stream_options is not None and body.stream_options.include_usage
    return stream_events(runner, delta_chunk, final_chunks, usage_chunk if include_usage else None)


def _prompt_text(state: ServerState, body: CompletionRequest, prompts: list[tuple[int, ...]], p: int) -> str:
    """The echoed prompt: the client's text as sent, or its token ids decoded."""
    if isinstance(body.prompt, str):
        return body.prompt
    if body.prompt and isinstance(body.prompt[0], str):
        return str(body.prompt[p])
    return str(state.tokenizer.decode(list(prompts[p])))


def _echoed(
    state: ServerState, prompt: PromptScores, prompt_text: str, completion: CompletionLogprobs
) -> CompletionLogprobs:
    """The prompt's entries, then the completion's (its offsets shifted past the prompt text)."""
    tokens, offsets = _pieces(state, prompt.token_ids)
    top = None
    if completion.top_logprobs is not None or prompt.top is not None:
        top = [*_top_texts(state, prompt.top or []), *(completion.top_logprobs or [])]
    return CompletionLogprobs(
        tokens=[*tokens, *completion.tokens],
        token_logprobs=[*prompt.logp, *completion.token_logprobs],
        top_logprobs=top,
        text_offset=[*offsets, *(len(prompt_text) + o for o in completion.text_offset)],
    )


def _logprobs(state: ServerState, choice: ChoiceResult) -> CompletionLogprobs:
    tokens, offsets = _pieces(state, choice.token_ids)
    top = None if choice.top is None else _top_texts(state, choice.top)
    logp: list[float | None] = list(choice.logp)
    return CompletionLogprobs(tokens=tokens, token_logprobs=logp, top_logprobs=top, text_offset=offsets)


def _pieces(state: ServerState, token_ids: Sequence[int]) -> tuple[list[str], list[int]]:
    """Each token's text and its offset into their concatenation (OpenAI's ``text_offset``)."""
    tokens = [state.tokenizer.decode([t]) for t in token_ids]
    offsets, pos = [], 0
    for piece in tokens:
        offsets.append(pos)
        pos += len(piece)
    return tokens, offsets


def _top_texts(state: ServerState, rows: Sequence[dict[int, float] | None]) -> list[dict[str, float] | None]:
    """Top-token rows keyed by token text instead of id (a missing row stays ``None``)."""
    tok: Any = state.tokenizer
    return [None if row is None else {tok.decode([t]): lp for t, lp in row.items()} for row in rows]
