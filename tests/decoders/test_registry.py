"""Every registered decoder declares valid, cheap smoke parameters and builds from a context."""

from __future__ import annotations

import pytest

from powerserve.decoders.base import Decoder
from powerserve.decoders.registry import DECODERS

MAX_TOKENS = 16
# "Cheap": at most this many engine tokens (generated + scored) per output token, in the
# decoder's own worst-case estimate. Every default of a power decoder is far above it.
CHEAP_MULTIPLIER = 16


@pytest.mark.parametrize("cls", DECODERS.values(), ids=list(DECODERS))
def test_cheap_params_are_valid_and_cheap(cls: type[Decoder]) -> None:
    params = cls.params_model.model_validate(cls.cheap_params)  # unknown or out-of-range names raise
    decoder = cls.__new__(cls)  # expected_cost reads only the parameters, no engine needed
    assert decoder.expected_cost(params, MAX_TOKENS) <= CHEAP_MULTIPLIER * MAX_TOKENS


def test_power_decoders_need_their_cheap_params() -> None:
    """The bound above can fail: the defaults of every power decoder are beyond it."""
    for name in ("power_mcmc", "power_smc", "power_lookahead"):
        cls = DECODERS[name]
        decoder = cls.__new__(cls)
        assert decoder.expected_cost(cls.params_model(), MAX_TOKENS) > CHEAP_MULTIPLIER * MAX_TOKENS
