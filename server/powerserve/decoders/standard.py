"""``standard``: ordinary sampling from the model with the request's OpenAI parameters."""

from __future__ import annotations

from collections.abc import AsyncIterator

from powerserve.decoders.base import Decoder, DecodeRequest, DecoderParams
from powerserve.engine.base import EngineStats, TokenStep


class StandardParams(DecoderParams):
    """``standard`` has no parameters of its own: it honours temperature, top_p, top_k."""


class StandardDecoder(Decoder[StandardParams]):
    name = "standard"
    description = "Ordinary sampling from the model; honours temperature, top_p and top_k."
    params_model = StandardParams
    streams_tokens = True

    def decode(self, request: DecodeRequest[StandardParams], stats: EngineStats) -> AsyncIterator[TokenStep]:
        return self.engine.generate(request.prompt_ids, request.openai_spec(), stats)
