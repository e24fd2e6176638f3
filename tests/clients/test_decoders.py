from __future__ import annotations

import pytest

from powerserve_client import decoder, decoder_label, parse_decoder, power_mcmc, standard, temperature


def test_helpers_send_only_the_parameters_given() -> None:
    assert standard() == {"decoder": "standard"}
    assert temperature() == {"decoder": "temperature"}
    assert temperature(alpha=4) == {"decoder": {"name": "temperature", "alpha": 4}}
    assert power_mcmc(alpha=2, mcmc_steps=3) == {"decoder": {"name": "power_mcmc", "alpha": 2, "mcmc_steps": 3}}


def test_parse_decoder_reads_typed_values() -> None:
    assert parse_decoder("standard") == {"decoder": "standard"}
    assert parse_decoder("power_mcmc:alpha=4.5, block_size=32,flag=true,mode=x") == {
        "decoder": {"name": "power_mcmc", "alpha": 4.5, "block_size": 32, "flag": True, "mode": "x"}
    }
    with pytest.raises(ValueError):
        parse_decoder("power_mcmc:alpha")
    with pytest.raises(ValueError):
        decoder("")


def test_labels_are_short_and_readable() -> None:
    assert decoder_label(standard()) == "standard"
    assert decoder_label(parse_decoder("power_mcmc:alpha=4,block_size=8")) == "power_mcmc(alpha=4,block_size=8)"
