"""Every client-controlled number has an upper bound, in the schemas clients read; planning takes
time independent of the counts a client sends; unsupported fields name themselves in ``param``.

The in-process server is the reliability one (tiny random model, torch engine).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from powerserve.decoders.power_lookahead import PowerLookaheadParams
from powerserve.decoders.power_mcmc import (
    PowerMcmcDecoder,
    PowerMcmcParams,
    block_limits,
    sum_block_limits,
)
from powerserve.decoders.power_smc import PowerSmcParams
from powerserve.decoders.registry import DECODERS
from tests.reliability.support import MODEL, LiveServer, assert_openai_error, live


@pytest.fixture(scope="module")
def server(engine: Any) -> Iterator[LiveServer]:
    with live(engine) as srv:
        yield srv


def _numeric_leaves(schema: dict[str, Any], defs: dict[str, Any], path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(path, sub-schema) of every integer or number in a JSON schema, through anyOf, arrays,
    objects and $ref."""
    if "$ref" in schema:
        yield from _numeric_leaves(defs[schema["$ref"].rsplit("/", 1)[-1]], defs, path)
        return
    for member in schema.get("anyOf", []):
        yield from _numeric_leaves(member, defs, path)
    kind = schema.get("type")
    if kind in ("integer", "number"):
        yield path, schema
    elif kind == "array" and "items" in schema:
        yield from _numeric_leaves(schema["items"], defs, f"{path}[]")
    elif kind == "object":
        for name, sub in schema.get("properties", {}).items():
            yield from _numeric_leaves(sub, defs, f"{path}.{name}")
        if isinstance(schema.get("additionalProperties"), dict):
            yield from _numeric_leaves(schema["additionalProperties"], defs, f"{path}{{}}")


def _unbounded_lists_and_strings(schema: dict[str, Any], defs: dict[str, Any], path: str) -> Iterator[str]:
    if "$ref" in schema:
        yield from _unbounded_lists_and_strings(defs[schema["$ref"].rsplit("/", 1)[-1]], defs, path)
        return
    for member in schema.get("anyOf", []):
        yield from _unbounded_lists_and_strings(member, defs, path)
    kind = schema.get("type")
    if kind == "array":
        if "maxItems" not in schema:
            yield path
        yield from _unbounded_lists_and_strings(schema.get("items", {}), defs, f"{path}[]")
    elif kind == "string" and "maxLength" not in schema and "enum" not in schema and "const" not in schema:
        yield path
    elif kind == "object":
        if isinstance(schema.get("additionalProperties"), dict) and "maxProperties" not in schema:
            yield f"{path}{{}}"
        for name, sub in schema.get("properties", {}).items():
            yield from _unbounded_lists_and_strings(sub, defs, f"{path}.{name}")


def test_every_request_number_string_and_list_is_bounded_in_the_openapi_schema(server: LiveServer) -> None:
    spec = httpx.get(f"{server.base}/openapi.json").json()
    defs = spec["components"]["schemas"]
    for model in ("CompletionRequest", "ChatCompletionRequest"):
        leaves = list(_numeric_leaves(defs[model], defs, model))
        assert len(leaves) >= 10, leaves
        unbounded = [p for p, s in leaves if "maximum" not in s and "exclusiveMaximum" not in s]
        assert not unbounded, unbounded
        assert not list(_unbounded_lists_and_strings(defs[model], defs, model))


def test_every_decoder_parameter_is_bounded_in_v1_decoders(server: LiveServer) -> None:
    cards = httpx.get(f"{server.base}/v1/decoders").json()["data"]
    assert {c["name"] for c in cards} == set(DECODERS)
    counted = 0
    for card in cards:
        schema = card["parameters"]
        for path, leaf in _numeric_leaves(schema, schema.get("$defs", {}), card["name"]):
            assert "maximum" in leaf or "exclusiveMaximum" in leaf, path
            assert "minimum" in leaf or "exclusiveMinimum" in leaf, path
            counted += 1
    assert counted >= 15  # alpha x 4, mcmc 3, smc 4, lookahead 4


def test_sum_block_limits_closed_form_matches_the_loop() -> None:
    for tokens in range(1, 200):
        for block in range(1, 210):
            assert sum_block_limits(tokens, block) == sum(block_limits(tokens, block)), (tokens, block)


def test_planning_time_is_independent_of_the_counts() -> None:
    """expected_cost on parameter values far past the bounds (built without validation) answers
    at once: closed forms, not loops over the client's counts (the loop took minutes at 1e12)."""
    decoder = PowerMcmcDecoder.__new__(PowerMcmcDecoder)
    huge = PowerMcmcParams.model_construct(alpha=4.0, block_size=1, mcmc_steps=10**12, proposals=10**9)
    t0 = time.perf_counter()
    cost = decoder.expected_cost(huge, 10**9)
    assert time.perf_counter() - t0 < 1.0  # a loop over 1e12 steps would take hours
    assert cost > 10**30
    for cls in (PowerSmcParams, PowerLookaheadParams):
        assert cls.model_json_schema()  # bounded models (checked above); their costs are products


@pytest.mark.parametrize(
    ("decoder", "param"),
    [
        ({"name": "power_mcmc", "mcmc_steps": 1e12}, "decoder.mcmc_steps"),
        ({"name": "power_mcmc", "mcmc_steps": 65}, "decoder.mcmc_steps"),
        ({"name": "power_mcmc", "block_size": 2**31}, "decoder.block_size"),
        ({"name": "power_mcmc", "proposals": 2**63}, "decoder.proposals"),
        ({"name": "power_smc", "particles": 1e12}, "decoder.particles"),
        ({"name": "power_lookahead", "rollouts": 2**31}, "decoder.rollouts"),
        ({"name": "temperature", "alpha": 1e308}, "decoder.alpha"),
    ],
)
def test_the_issue_request_and_its_kin_are_400_naming_the_parameter(
    server: LiveServer, decoder: dict[str, Any], param: str
) -> None:
    """The request of issue 13 froze the server; now it is a 400 within a second."""
    t0 = time.perf_counter()
    resp = httpx.post(
        f"{server.base}/v1/completions",
        json={"model": MODEL, "prompt": "x", "max_tokens": 2, "decoder": decoder},
        timeout=10,
    )
    assert time.perf_counter() - t0 < 1.0
    assert assert_openai_error(resp, 400, "invalid_request_error")["param"] == param


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"echo": True, "stream": True}, "echo"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"suffix": "tail"}, "suffix"),
        ({"best_of": 2}, "best_of"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"presence_penalty": -1}, "presence_penalty"),
        ({"logit_bias": {"1": 5}}, "logit_bias"),
        ({"stop": ""}, "stop"),
        ({"stop": ["a"] * 17}, "stop"),
        ({"stop": "x" * 257}, "stop"),
        ({"prompt": ["a"] * 200}, "prompt"),
        ({"n": 2**63}, "n"),
        ({"timeout": float("inf")}, "timeout"),
        ({"top_k": 10**12}, "top_k"),
        ({"user": "u" * 10**5}, "user"),
        ({"decoder": "d" * 10**5}, "decoder"),
    ],
)
def test_unsupported_and_out_of_range_fields_name_themselves(
    server: LiveServer, extra: dict[str, Any], param: str
) -> None:
    body = {"model": MODEL, "prompt": "x", "max_tokens": 2, **extra}
    resp = httpx.post(
        f"{server.base}/v1/completions",
        content=json.dumps(body),  # NaN and Infinity as Python's json writes them
        headers={"content-type": "application/json"},
        timeout=10,
    )
    assert assert_openai_error(resp, 400, "invalid_request_error")["param"] == param


def test_python_dash_m_powerserve_is_the_console_script() -> None:
    """``python -m powerserve`` runs the same ``main`` as the ``powerserve`` script: same help,
    same exit status for a bad command."""
    installed = Path(sys.executable).parent / "powerserve"
    script = (
        [str(installed)] if installed.exists() else [sys.executable, "-c", "from powerserve.cli import main; main()"]
    )
    module = [sys.executable, "-m", "powerserve"]
    for args in (["--help"], ["serve", "--help"], ["no-such-command"]):
        a = subprocess.run([*script, *args], capture_output=True, text=True, timeout=120)
        b = subprocess.run([*module, *args], capture_output=True, text=True, timeout=120)
        assert (b.returncode, b.stdout, b.stderr) == (a.returncode, a.stdout, a.stderr), args
    assert "usage: powerserve" in b.stderr
