"""What serving holds for the server's lifetime: settings, the engine, the decoders."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from powerserve.decoders.base import Decoder
from powerserve.decoders.registry import DECODERS
from powerserve.engine.base import Engine
from powerserve.serving.admission import Admission
from powerserve.settings import Settings


@dataclass
class ServerState:
    settings: Settings
    engine: Engine
    model_name: str
    decoders: dict[str, Decoder] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)  # decoder name -> why
    admission: Admission = field(default_factory=lambda: Admission(1, 0))

    @classmethod
    def build(
        cls, settings: Settings, engine: Engine, model_name: str, extra: dict[str, Any] | None = None
    ) -> ServerState:
        admission = Admission(settings.max_running_weight, settings.max_queued_weight)
        state = cls(settings=settings, engine=engine, model_name=model_name, admission=admission)
        for name, decoder_cls in DECODERS.items():
            maker = getattr(decoder_cls, "from_settings", None)
            if maker is None:
                state.decoders[name] = decoder_cls(engine)
                continue
            try:
                state.decoders[name] = maker(engine, settings, **(extra or {}))
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


class UnavailableDecoder(RuntimeError):
    """A decoder that cannot run with this server's configuration (the message says how to fix it)."""
