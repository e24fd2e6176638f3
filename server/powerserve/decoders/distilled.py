"""``distilled``: sample from a power-self-distilled checkpoint at standard cost.

The student (a checkpoint written by ``powerserve distill train``, served with ``--distilled
PATH``) runs on its own engine beside the base model's; it samples like ``standard`` with the
request's OpenAI parameters (``temperature`` 1 by default, ``top_p``, ``top_k``). Its tokens
carry ``logp=None`` on purpose: the student's log-probabilities are not the base model's, and
serving then scores the returned tokens under the base engine, so the self-reward of every
decoder is measured on one scale. That scoring shows up as ``tokens_scored`` (one scoring
pass over the answer); the decoding itself is one student token per returned token.

The student always runs on the torch engine: a second vLLM engine in the same process
collides with the first one's Prometheus metrics, and a 135M-1B student is cheap on it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from powerserve.decoders.base import Decoder, DecodeRequest, DecoderParams
from powerserve.decoders.standard import openai_spec
from powerserve.engine.base import Engine, EngineStats, TokenStep

log = logging.getLogger(__name__)

HOW_TO_MAKE_ONE = (
    "no distilled checkpoint is configured. Make one with `powerserve distill teacher --prompts P.jsonl "
    "--out samples.jsonl` then `powerserve distill train --samples samples.jsonl --out CKPT`, and start the "
    "server with `--distilled CKPT` (or POWERSERVE_DISTILLED=CKPT)"
)


class DistilledParams(DecoderParams):
    """``distilled`` has no parameters of its own: it honours temperature, top_p, top_k."""


class DistilledDecoder(Decoder):
    name = "distilled"
    description = (
        "Samples from the power-self-distilled checkpoint (--distilled) at standard cost; honours "
        "temperature, top_p and top_k. Self-reward is measured under the base model."
    )
    params_model = DistilledParams
    streams_tokens = True

    def __init__(self, engine: Engine, student: Engine) -> None:
        super().__init__(engine)
        self.student = student

    @classmethod
    def from_settings(cls, engine: Engine, settings: Any, **extra: Any) -> DistilledDecoder:
        """Needs ``extra['distilled_engine']`` (started by :func:`start_student`)."""
        # Imported here: serving imports the registry, which imports this module.
        from powerserve.serving.state import UnavailableDecoder

        if settings.distilled is None:
            raise UnavailableDecoder(HOW_TO_MAKE_ONE)
        student = extra.get("distilled_engine")
        if student is None:
            raise UnavailableDecoder(
                extra.get("distilled_error") or f"the distilled checkpoint {settings.distilled} was not loaded"
            )
        return cls(engine, student)

    async def decode(self, request: DecodeRequest, stats: EngineStats) -> AsyncIterator[TokenStep]:
        async for step in self.student.generate(request.prompt_ids, openai_spec(request), stats):
            yield TokenStep(step.token_id, step.logq, None)  # None: serving scores it under the base


async def start_student(settings: Any, base: Engine) -> tuple[Engine | None, dict[str, Any]]:
    """Load ``settings.distilled`` on the torch engine for :class:`DistilledDecoder`.

    Returns (the engine to shut down at exit or None, the ``extra`` for ``ServerState.build``).
    A checkpoint that is missing, unfinished or made for another tokenizer leaves the decoder
    unavailable with the reason (the server still serves everything else).
    """
    student, reason = await asyncio.to_thread(_load_student, settings, base)
    if student is not None and reason is not None:
        await student.shutdown()
    if reason is not None:
        log.error("the distilled decoder is unavailable: %s", reason)
        return None, {"distilled_error": reason}
    return student, {"distilled_engine": student}


def _load_student(settings: Any, base: Engine) -> tuple[Engine | None, str | None]:
    from powerserve.distill.manifest import MANIFEST_NAME
    from powerserve.distill.records import tokenizer_fingerprint
    from powerserve.engine.torch_engine import TorchEngine
    from powerserve.model_store import is_complete

    path = Path(settings.distilled).expanduser()
    if not (path / "config.json").is_file():
        return None, f"--distilled {path} is not a checkpoint directory (no config.json)"
    if (path / MANIFEST_NAME).is_file() and not is_complete(path):
        return None, f"--distilled {path} is an unfinished checkpoint"
    try:
        student = TorchEngine.load(
            str(path), model_name=path.name, max_model_len=base.max_model_len, dtype=settings.dtype
        )
    except Exception as exc:  # any load failure leaves only this decoder unavailable
        return None, f"cannot load --distilled {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    if base.tokenizer is not None and tokenizer_fingerprint(student.tokenizer) != tokenizer_fingerprint(base.tokenizer):
        return student, f"--distilled {path} has another tokenizer than the served model"
    return student, None
