"""What serving holds for the server's lifetime: settings, the engine, the decoders."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from powerserve.decoders.base import Decoder, DecoderContext, UnavailableDecoder
from powerserve.decoders.registry import DECODERS
from powerserve.engine.base import Engine
from powerserve.engine.factory import StudentEngines
from powerserve.serving.admission import Admission
from powerserve.settings import Settings


@dataclass
class ServerState:
    settings: Settings
    engine: Engine
    model_name: str
    decoders: dict[str, Decoder[Any]] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)  # decoder name -> why
    admission: Admission = field(default_factory=lambda: Admission(1, 0))

    @classmethod
    def build(
        cls, settings: Settings, engine: Engine, model_name: str, students: StudentEngines | None = None
    ) -> ServerState:
        """Every registered decoder built by :meth:`Decoder.build`; one that cannot run here is
        listed in ``unavailable`` with its reason."""
        admission = Admission(settings.max_running_weight, settings.max_queued_weight)
        state = cls(settings=settings, engine=engine, model_name=model_name, admission=admission)
        ctx = DecoderContext(engine, settings, students or StudentEngines())
        for name, decoder_cls in DECODERS.items():
            try:
                state.decoders[name] = decoder_cls.build(ctx)
            except UnavailableDecoder as exc:
                state.unavailable[name] = str(exc)
        return state

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def special_ids(self) -> frozenset[int]:
        ids = set(self.engine.eos_token_ids)
        ids.update(getattr(self.engine.tokenizer, "all_special_ids", []) or [])
        return frozenset(ids)
