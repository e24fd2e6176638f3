"""Where teacher samples come from: a :class:`Source` draws one completion of a prompt.

:class:`InProcessSource` starts an engine from the settings and drives a decoder of the
registry directly, which keeps the exact token ids the decoder chose. The HTTP source, which
asks a running powerserve, is in ``http_source.py``.
"""

from __future__ import annotations

import abc
import math
import time
from dataclasses import dataclass
from typing import Any

from powerserve.distill.records import (
    DistillError,
    tokenizer_fingerprint,
)
from powerserve.distill.teacher_config import TeacherConfig
from powerserve.settings import Settings


@dataclass(slots=True)
class Drawn:
    completion_ids: list[int]
    text: str
    finish_reason: str
    self_reward: dict[str, Any]
    cost: dict[str, Any]
    ids_exact: bool = True


def self_reward(logp: list[float]) -> dict[str, Any]:
    total = math.fsum(logp)
    return {"sum_logprob": total, "mean_logprob": total / len(logp) if logp else None, "tokens": len(logp)}


class Source(abc.ABC):
    tokenizer: Any
    base: dict[str, Any]  # what the samples were drawn from (checked by the training stage)
    params: dict[str, Any]  # the decoder's parameters with defaults filled in

    @abc.abstractmethod
    async def draw(self, prompt_ids: list[int], max_tokens: int, seed: int) -> Drawn: ...

    async def close(self) -> None:  # noqa: B027 (optional hook)
        pass


class InProcessSource(Source):
    """Drives a decoder on an engine started in this process."""

    def __init__(self, engine: Any, decoder: Any, params: Any, base: dict[str, Any]) -> None:
        self.engine, self.decoder, self._params = engine, decoder, params
        self.tokenizer = engine.tokenizer
        self.base = base
        self.params = params.model_dump()

    @classmethod
    async def open(cls, cfg: TeacherConfig) -> InProcessSource:
        from transformers import AutoConfig

        from powerserve.decoders.base import DecoderContext
        from powerserve.engine.factory import start_engine
        from powerserve.model_store import ModelNotFoundError, resolve_model

        decoder_cls, params = resolve_decoder(cfg)
        settings = Settings(model=cfg.model, engine=cfg.engine, max_model_len=cfg.max_model_len)  # type: ignore[arg-type]
        try:
            path, name = resolve_model(cfg.model, settings.cache_dir)
        except ModelNotFoundError as exc:
            raise DistillError(str(exc)) from None
        engine = await start_engine(settings)
        decoder = decoder_cls.build(DecoderContext(engine, settings))
        config = AutoConfig.from_pretrained(path)
        base = {
            "model": name,
            "path": str(path),
            "model_type": getattr(config, "model_type", None),
            "architectures": list(getattr(config, "architectures", None) or []),
            "vocab_size": len(engine.tokenizer),
            "tokenizer": tokenizer_fingerprint(engine.tokenizer),
        }
        return cls(engine, decoder, params, base)

    async def draw(self, prompt_ids: list[int], max_tokens: int, seed: int) -> Drawn:
        from powerserve.decoders.base import DecodeRequest, OpenAISampling
        from powerserve.engine.base import EngineStats

        stats = EngineStats()
        started = time.perf_counter()
        request = DecodeRequest(tuple(prompt_ids), max_tokens, seed, OpenAISampling(), self._params)
        steps = [s async for s in self.decoder.decode(request, stats)]
        ids = [s.token_id for s in steps]
        known = [s.logp for s in steps]
        if all(v is not None for v in known):
            logp = [float(v) for v in known if v is not None]
        else:
            logp = await self.engine.score(prompt_ids, ids, stats)
        cost = {
            "tokens_generated": stats.tokens_generated,
            "tokens_scored": stats.tokens_scored,
            "engine_calls": stats.calls,
            "wall_time_s": round(time.perf_counter() - started, 4),
            "decoder_stats": dict(stats.extra),
        }
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return Drawn(ids, text, self.engine.finish_reason(ids, max_tokens), self_reward(logp), cost)

    async def close(self) -> None:
        await self.engine.shutdown()


def resolve_decoder(cfg: TeacherConfig) -> tuple[Any, Any]:
    """The decoder class and its validated parameters (in-process mode)."""
    from pydantic import ValidationError

    from powerserve.decoders.registry import DECODERS

    decoder_cls = DECODERS.get(cfg.decoder)
    if decoder_cls is None:
        raise DistillError(f"unknown decoder {cfg.decoder!r}; valid: {', '.join(sorted(DECODERS))}")
    try:
        return decoder_cls, decoder_cls.params_model.model_validate(cfg.params)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise DistillError(f"decoder {cfg.decoder}: parameter {'.'.join(map(str, err['loc']))}: {err['msg']}") from None
