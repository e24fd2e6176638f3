"""The one place that maps decoder names to their classes."""

from __future__ import annotations

from typing import Any

from powerserve.decoders.base import Decoder
from powerserve.decoders.distilled import DistilledDecoder
from powerserve.decoders.power_lookahead import PowerLookaheadDecoder
from powerserve.decoders.power_mcmc import PowerMcmcDecoder
from powerserve.decoders.power_smc import PowerSmcDecoder
from powerserve.decoders.standard import StandardDecoder
from powerserve.decoders.temperature import TemperatureDecoder

DECODERS: dict[str, type[Decoder[Any]]] = {
    cls.name: cls
    for cls in (
        StandardDecoder,
        PowerMcmcDecoder,
        PowerSmcDecoder,
        PowerLookaheadDecoder,
        TemperatureDecoder,
        DistilledDecoder,
    )
}
