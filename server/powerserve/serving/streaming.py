"""Server-sent events shared by the endpoints.

A stream sends text as soon as a choice makes it final, holds the finish chunks until the
request's cost is known (so the last one can carry the ``powerserve`` object), sends a usage
chunk when asked, and always ends with ``data: [DONE]``. An error inside a stream becomes an
OpenAI-shaped error event, then ``[DONE]``.

Progress: while a decoder that does not stream every token (``power_mcmc``, ``power_smc``)
runs, an SSE comment line ``: powerserve.progress {json}`` is sent every ``progress_s``
seconds (``--progress-interval-s``, default 1), with :meth:`Runner.progress`'s object, e.g.

    : powerserve.progress {"elapsed_s": 3.2, "choices": [{"index": 0, "engine_tokens": 812,
      "tokens_out": 0, "blocks_done": 2, "blocks_total": 4, "mh_steps_done": 18, ...}]}

(one line). SSE clients, the OpenAI SDKs included, skip comment lines, so the stream parses as
before; ``curl -N`` and any raw SSE reader see them. They also keep proxies from closing an
idle connection. For decoders that stream every token, ``: keep-alive`` comments are sent
after ``KEEPALIVE_S`` seconds without output, as before.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel

from powerserve.errors import PowerserveError, error_body
from powerserve.protocol import PowerserveInfo
from powerserve.serving.runner import Delta, Outcome, Runner

log = logging.getLogger(__name__)

KEEPALIVE_S = 5.0
PROGRESS_PREFIX = ": powerserve.progress "
M = TypeVar("M", bound=BaseModel)


class Chunk(Protocol):
    """A stream chunk (``CompletionResponse`` or ``ChatCompletionChunk``): the last one sent
    carries the request's ``powerserve`` object."""

    powerserve: PowerserveInfo | None

    def model_dump_json(self) -> str: ...


def chunk_maker(cls: type[M], model: str) -> Callable[..., M]:
    """A constructor ``chunk(choices, **fields)`` for the chunks of one stream. Every chunk
    carries the same ``id`` and ``created``: those the model's own default factories gave the
    first (so a response id is made in one place, ``powerserve.protocol``)."""
    head = cls(model=model, choices=[]).model_dump(include={"id", "created"})
    return lambda choices, **fields: cls(**head, model=model, choices=choices, **fields)


def sse(payload: Chunk | dict[str, Any]) -> str:
    body = _json(payload) if isinstance(payload, dict) else payload.model_dump_json()
    return f"data: {body}\n\n"


def _json(payload: dict[str, Any]) -> str:
    import json

    return json.dumps(payload)


async def stream_events(
    runner: Runner,
    delta_chunk: Callable[[Delta], Chunk],
    final_chunks: Callable[[Outcome, list[Delta]], Sequence[Chunk]],
    usage_chunk: Callable[[Outcome], Chunk] | None,
) -> AsyncIterator[str]:
    """Drive ``runner`` and yield SSE lines. Cancelling the consumer cancels the engine work.

    ``delta_chunk`` turns text made final into a chunk; ``final_chunks`` gives the chunks sent
    once the outcome is known (held token chunks, then the finish chunks, by choice index).
    The tail: ``usage_chunk(outcome)`` when the client asked for usage
    (``stream_options.include_usage``), else the ``powerserve`` object rides on the last chunk."""
    queue: asyncio.Queue[Delta | None] = asyncio.Queue()
    runner.on_delta = queue.put_nowait
    task = asyncio.create_task(runner.run())
    task.add_done_callback(lambda _: queue.put_nowait(None))
    finishes: list[Delta] = []
    progress = not runner.plan.decoder.streams_tokens
    interval = runner.state.settings.progress_interval_s if progress else KEEPALIVE_S
    loop = asyncio.get_running_loop()
    beat = loop.time() + interval
    try:
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), timeout=max(0.0, beat - loop.time()))
            except TimeoutError:
                yield f"{PROGRESS_PREFIX}{_json(runner.progress())}\n\n" if progress else ": keep-alive\n\n"
                beat = loop.time() + interval
                continue
            if not progress:
                beat = loop.time() + interval  # keep-alive only after a silence
            if item is None:
                break
            if item.finish_reason is not None:
                if item.text:
                    yield sse(delta_chunk(Delta(item.index, item.text, item.token_ids)))
                finishes.append(item)
            else:
                yield sse(delta_chunk(item))
        outcome = task.result()
        out = list(final_chunks(outcome, sorted(finishes, key=lambda d: d.index)))
        if usage_chunk is not None:
            out.append(usage_chunk(outcome))
        elif out:
            out[-1].powerserve = outcome.info
        for chunk in out:
            yield sse(chunk)
    except PowerserveError as exc:
        yield sse(exc.body())
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("error inside a stream")
        yield sse(error_body("internal error while decoding", "internal_error"))
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    yield "data: [DONE]\n\n"
