"""``temperature``: token-level sampling at temperature 1/alpha.

Per token it draws from p(x_t | x_<t)^alpha / Z_t -- the cheap local approximation of the
power distribution p(x)^alpha / Z. It is *not* the same distribution: the per-token
normalisers Z_t differ between continuations (see research.md).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, ClassVar

from powerserve.decoders.base import Decoder, DecodeRequest
from powerserve.decoders.power_common import PowerParams, proposal_spec
from powerserve.engine.base import EngineStats, TokenStep


class TemperatureParams(PowerParams):
    """``alpha`` only: tokens are drawn at temperature 1/alpha."""


class TemperatureDecoder(Decoder[TemperatureParams]):
    name = "temperature"
    description = "Token-level sampling at temperature 1/alpha (no truncation); ignores temperature/top_p/top_k."
    params_model = TemperatureParams
    streams_tokens = True
    cheap_params: ClassVar[dict[str, Any]] = {"alpha": 4}

    def decode(self, request: DecodeRequest[TemperatureParams], stats: EngineStats) -> AsyncIterator[TokenStep]:
        spec = proposal_spec(request.params.alpha, request.max_tokens, request.seed)
        return self.engine.generate(request.prompt_ids, spec, stats)
