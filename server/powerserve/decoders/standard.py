"""``standard``: ordinary sampling from the model with the request's OpenAI parameters."""

from __future__ import annotations

from collections.abc import AsyncIterator

from powerserve.decoders.base import Decoder, DecodeRequest, DecoderParams
from powerserve.engine.base import EngineStats, SamplingSpec, TokenStep

# OpenAI's temperature 0 means greedy; the engines sample, so 0 maps to a temperature low
# enough that the arg-max token wins with overwhelming probability.
GREEDY_TEMPERATURE = 1e-4


class StandardParams(DecoderParams):
    """``standard`` has no parameters of its own: it honours temperature, top_p, top_k."""


class StandardDecoder(Decoder):
    name = "standard"
    description = "Ordinary sampling from the model; honours temperature, top_p and top_k."
    params_model = StandardParams
    streams_tokens = True

    def decode(self, request: DecodeRequest, stats: EngineStats) -> AsyncIterator[TokenStep]:
        return self.engine.generate(request.prompt_ids, openai_spec(request), stats)


def openai_spec(request: DecodeRequest) -> SamplingSpec:
    """The engine sampling spec for a request's OpenAI parameters (temperature 0: greedy)."""
    s = request.sampling
    return SamplingSpec(
        max_tokens=request.max_tokens,
        temperature=s.temperature if s.temperature > 0 else GREEDY_TEMPERATURE,
        top_p=s.top_p,
        top_k=s.top_k,
        seed=request.seed,
    )
