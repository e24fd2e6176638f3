"""The one interface every decoding method implements.

A decoder turns a prompt (token ids) into output tokens by driving an :class:`Engine`. It
yields only *final* tokens, in order: a decoder that cannot know its answer until the end
(``power_mcmc``) yields everything at the end; one that samples left to right yields as it
goes, which is what makes true token-by-token streaming possible. Stop strings, detokenising,
self-reward scoring, usage and metrics are done once, by serving, for every decoder.

Adding a decoder means adding a file with a subclass and one entry in ``registry.py``; no
other module names a decoder (``tests/test_import_graph.py`` checks it). Serving builds every
decoder through :meth:`Decoder.build` from one :class:`DecoderContext`.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Self, TypeVar

from pydantic import BaseModel, ConfigDict

from powerserve.engine.base import Engine, EngineStats, SamplingSpec, TokenStep
from powerserve.engine.factory import StudentEngines
from powerserve.settings import Settings

# OpenAI's temperature 0 means greedy; the engines sample, so 0 maps to a temperature low
# enough that the arg-max token wins with overwhelming probability.
GREEDY_TEMPERATURE = 1e-4


class UnavailableDecoder(RuntimeError):
    """A decoder that cannot run with this server's configuration (the message says how to fix it)."""


@dataclass(frozen=True, slots=True)
class DecoderContext:
    """Everything a decoder may be built from: the base engine, the settings, and the extra
    engines started beside it (the ``--distilled`` students, with why any failed to load)."""

    engine: Engine
    settings: Settings = field(default_factory=Settings)
    students: StudentEngines = field(default_factory=StudentEngines)


class DecoderParams(BaseModel):
    """Parameters of one decoder, validated at the edge; unknown names are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)


P = TypeVar("P", bound=DecoderParams)


@dataclass(frozen=True, slots=True)
class OpenAISampling:
    """The OpenAI sampling fields of a request (honoured by ``standard``)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0


@dataclass(frozen=True, slots=True)
class DecodeRequest(Generic[P]):
    """One sequence to decode. ``n > 1`` requests become n of these with distinct seeds.

    ``params`` is an instance of the decoder's ``params_model`` (serving validates it with that
    model), so a ``Decoder[P]`` reads ``request.params`` as its own ``P``.
    """

    prompt_ids: tuple[int, ...]
    max_tokens: int
    seed: int | None
    sampling: OpenAISampling
    params: P

    def openai_spec(self) -> SamplingSpec:
        """The engine sampling spec for the request's OpenAI parameters (temperature 0: greedy)."""
        s = self.sampling
        return SamplingSpec(
            max_tokens=self.max_tokens,
            temperature=s.temperature if s.temperature > 0 else GREEDY_TEMPERATURE,
            top_p=s.top_p,
            top_k=s.top_k,
            seed=self.seed,
        )


class Decoder(abc.ABC, Generic[P]):
    """A decoding method with parameters ``P``. Instances are shared by all requests: keep no
    per-request state. Serving, which holds decoders of every kind, sees ``Decoder[Any]``."""

    name: ClassVar[str]
    description: ClassVar[str]
    params_model: type[P]  # set on the class; validates a request's parameters into a P
    streams_tokens: ClassVar[bool]  # True: tokens are yielded as soon as they are sampled
    # The parameter a model alias ``<model>:<decoder>:<variant>`` sets to <variant> (None: no such alias).
    variant_param: ClassVar[str | None] = None
    # Parameters that make a request cheap (a few engine tokens): what soak, fuzz and hostile
    # tests send; published on the decoder's /v1/decoders card.
    cheap_params: ClassVar[dict[str, Any]] = {}

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @classmethod
    def build(cls, ctx: DecoderContext) -> Self:
        """The decoder this server serves; raises :class:`UnavailableDecoder` (with how to fix
        it) when the configuration cannot serve it. The default needs only the engine."""
        return cls(ctx.engine)

    def variants(self) -> dict[str, dict[str, Any]]:
        """Named variants a model alias ``<model>:<decoder>:<variant>`` selects, default first,
        with what their cards show (``distilled``: its students). Most decoders have none."""
        return {}

    def expected_cost(self, params: P, max_tokens: int) -> float:
        """Upper estimate of engine tokens (generated + scored) one sequence may spend.

        Used for the server's per-request ceiling and for cost-weighted admission.
        """
        return float(max_tokens)

    def metric_label(self, params: P) -> str:
        """The ``decoder`` label of this request's metrics (the name, unless a decoder serves
        several fixed variants that deserve their own series)."""
        return self.name

    @abc.abstractmethod
    def decode(self, request: DecodeRequest[P], stats: EngineStats) -> AsyncIterator[TokenStep]:
        """Yield the output tokens of ``request`` in order, each final once yielded.

        Every engine call made on the request's behalf is counted in ``stats``; the last token
        may be an end-of-sequence token. Must stop promptly when the iterator is closed.
        """
