"""``temperature``: token-level sampling at temperature 1/alpha.

Per token it draws from p(x_t | x_<t)^alpha / Z_t -- the cheap local approximation of the
power distribution p(x)^alpha / Z. It is *not* the same distribution: the per-token
normalisers Z_t differ between continuations (see research.md).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, ClassVar

from pydantic import Field

from powerserve.decoders.base import Decoder, DecodeRequest, DecoderParams
from powerserve.engine.base import EngineStats, SamplingSpec, TokenStep


class TemperatureParams(DecoderParams):
    alpha: float = Field(4.0, ge=1.0, le=100.0, description="power exponent; samples at temperature 1/alpha")


class TemperatureDecoder(Decoder):
    name = "temperature"
    description = "Token-level sampling at temperature 1/alpha (no truncation); ignores temperature/top_p/top_k."
    params_model = TemperatureParams
    streams_tokens = True
    cheap_params: ClassVar[dict[str, Any]] = {"alpha": 4}

    def decode(self, request: DecodeRequest, stats: EngineStats) -> AsyncIterator[TokenStep]:
        assert isinstance(request.params, TemperatureParams)
        spec = SamplingSpec(max_tokens=request.max_tokens, temperature=1.0 / request.params.alpha, seed=request.seed)
        return self.engine.generate(request.prompt_ids, spec, stats)
