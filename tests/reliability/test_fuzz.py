"""Schemathesis against the server's own OpenAPI schema (``/openapi.json``), over a real socket:
bodies that follow the schema and bodies that break it (negative mode), for every operation the
schema lists.

A fifth of the cases are extreme values: a valid body with one integer or number field (of the
request, from the schema, or of a decoder, from ``/v1/decoders``) set to a value drawn from 0,
-1, 2^31, 2^63, 1e12, +-1e308, NaN, +-Infinity, any integer of up to 80 bits or any float, far
beyond the schema's bounds too. These must be answered within 5 s (a 4xx naming the field, or a
correct answer).

Checked for every generated case: no 5xx (a 504 only for a client's own ``timeout``); every error
is OpenAI-shaped JSON; a JSON 200 matches the schema; a stream ends with ``[DONE]`` and every
event before it is JSON. Afterwards the server still answers and nothing is left running.

CI runs it on the tiny model in-process, at most ``POWERSERVE_FUZZ_EXAMPLES`` (100) cases per
operation: about 230 cases, 15 s. The server caps max_tokens and engine tokens low so a valid
request is cheap. ``POWERSERVE_FUZZ_BASE_URL=http://127.0.0.1:PORT`` points the same test at a
running server instead (how the embedded-model run in docs/reliability.md was made; start that
server with the same caps, e.g. ``--max-tokens-limit 8 --max-n 2``).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from benchmarks.soak import decoder_bodies
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import response_schema_conformance

from powerserve_client.loadgen import check_loopback
from tests.reliability.support import live, metric

MAX_EXAMPLES = int(os.environ.get("POWERSERVE_FUZZ_EXAMPLES", "100"))
EXTREME_LIMIT_S = 5.0
EXTREMES: st.SearchStrategy[Any] = st.one_of(
    st.sampled_from([0, -1, 2**31, 2**63, 10**12, 1e12, 1e308, -1e308, math.nan, math.inf, -math.inf]),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True),
)
FUZZ_SETTINGS: dict[str, Any] = {
    "max_n": 2,
    "default_max_tokens": 4,
    "max_tokens_limit": 8,
    "max_engine_tokens_per_request": 1000,
    "request_timeout_s": 60,
}


@pytest.fixture(scope="module")
def base_url(engine: Any) -> Iterator[str]:
    external = os.environ.get("POWERSERVE_FUZZ_BASE_URL")
    if external:
        check_loopback(external)
        yield external.rstrip("/")
        return
    with live(engine, **FUZZ_SETTINGS) as srv:
        yield srv.base


UNSUPPORTED = ("best_of", "frequency_penalty", "presence_penalty", "logit_bias", "suffix")


class Fuzzer:
    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.model = httpx.get(f"{base_url}/v1/models").json()["data"][0]["id"]
        self.decoders = list(decoder_bodies(httpx.get(f"{base_url}/v1/decoders").json()).values())
        self.seen: Counter[str] = Counter()  # "METHOD path status" -> cases
        self.numeric = numeric_fields(
            httpx.get(f"{base_url}/openapi.json").json(), httpx.get(f"{base_url}/v1/decoders").json()
        )

    def cases(self, operation: Any) -> st.SearchStrategy[Any]:
        positive = operation.as_strategy(GenerationMode.POSITIVE)
        return st.one_of(
            positive,
            # Random model names are all 404s: steer a share of the valid bodies to the served
            # model, with the decoder they drew or one the server lists, so that they run.
            positive.map(self.with_model),
            st.tuples(positive, st.sampled_from(self.decoders)).map(lambda pair: self.with_model(*pair)),
            operation.as_strategy(GenerationMode.NEGATIVE),
            st.tuples(positive.map(self.with_model), st.sampled_from(self.numeric), EXTREMES).map(
                lambda t: self.with_extreme(*t)
            ),
        )

    def with_extreme(self, case: Any, field: tuple[str, str | None], value: Any) -> Any:
        """``case`` with one numeric field (``(name, None)``) or decoder parameter
        (``(parameter, decoder)``) set to ``value``; marked so that :meth:`check` times it."""
        if isinstance(case.body, dict):
            name, decoder = field
            if decoder is None:
                case.body[name] = value
            else:
                case.body["decoder"] = {"name": decoder, name: value}
            case.body["max_tokens"] = 2
            case.headers = {**(case.headers or {}), "x-fuzz-extreme": f"{decoder or 'request'}.{name}"}
        return case

    def with_model(self, case: Any, decoder: Any = None) -> Any:
        if isinstance(case.body, dict):
            case.body["model"] = self.model
            # Fields the schema allows in range but the server refuses (OpenAI's fields it does not
            # support, max_tokens 0 without echo): steered bodies leave them out, so that they run.
            for name in UNSUPPORTED:
                case.body.pop(name, None)
            if case.body.get("max_tokens") == 0 and not case.body.get("echo"):
                case.body["max_tokens"] = 1
            if decoder is not None:
                case.body["decoder"] = decoder
        return case

    def check(self, case: Any) -> None:
        if (case.headers or {}).get("x-fuzz-extreme"):
            self.check_extreme(case)
            return
        response = case.call(base_url=self.base_url, timeout=120)
        label = f"{case.method} {case.path} {response.status_code}"
        self.seen[label] += 1
        body = case.body if isinstance(case.body, dict) else {}
        if response.status_code >= 500:
            # The only 5xx a client can cause is the deadline it set itself.
            assert response.status_code == 504 and "timeout" in body, f"{label}: {body}: {response.text[:500]}"
        if response.status_code >= 400:
            err = response.json()["error"]
            assert set(err) == {"message", "type", "param", "code"}, f"{label}: {response.text[:500]}"
            assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
            return
        content_type = str(response.headers.get("content-type", ""))
        if "text/event-stream" in content_type:
            events = [line[len("data: ") :] for line in response.text.splitlines() if line.startswith("data: ")]
            assert events and events[-1] == "[DONE]", f"{label}: {response.text[-500:]}"
            for event in events[:-1]:
                json.loads(event)
        elif "application/json" in content_type:
            case.validate_response(response, checks=[response_schema_conformance])

    def check_extreme(self, case: Any) -> None:
        """Send an extreme-value case as Python's json writes it (NaN and Infinity included,
        which the schemathesis transport refuses to encode); it must be answered within 5 s."""
        t0 = time.perf_counter()
        response = httpx.post(
            f"{self.base_url}{case.path}",
            content=json.dumps(case.body),
            headers={"content-type": "application/json"},
            timeout=60,
        )
        elapsed = time.perf_counter() - t0
        label = f"{case.method} {case.path} {response.status_code}"
        self.seen[label] += 1
        self.seen[f"extreme {response.status_code}"] += 1
        assert elapsed < EXTREME_LIMIT_S, f"{label}: {elapsed:.1f} s for {case.headers['x-fuzz-extreme']}"
        if response.status_code >= 500:
            assert response.status_code == 504 and "timeout" in case.body, f"{label}: {response.text[:500]}"
        if response.status_code >= 400:
            err = response.json()["error"]
            assert set(err) == {"message", "type", "param", "code"}, f"{label}: {response.text[:500]}"
        elif "text/event-stream" in response.headers.get("content-type", ""):
            assert response.text.rstrip().endswith("data: [DONE]"), f"{label}: {response.text[-500:]}"
        else:
            choices = response.json()["choices"]
            assert choices and all(c["finish_reason"] in ("stop", "length") for c in choices), response.text[:500]


def numeric_fields(spec: dict[str, Any], decoders: dict[str, Any]) -> list[tuple[str, str | None]]:
    """(field, None) for every integer/number field of the completion request models and
    (parameter, decoder) for every numeric parameter of every available decoder."""
    defs = spec["components"]["schemas"]

    def numeric(schema: dict[str, Any]) -> bool:
        members = [schema, *schema.get("anyOf", [])]
        return any(m.get("type") in ("integer", "number") for m in members)

    out: list[tuple[str, str | None]] = sorted(
        {
            (f, None)
            for m in ("CompletionRequest", "ChatCompletionRequest")
            for f, sch in defs[m]["properties"].items()
            if numeric(sch)
        }
    )
    for card in decoders["data"]:
        if card["available"]:
            out += [(p, card["name"]) for p, sch in card["parameters"].get("properties", {}).items() if numeric(sch)]
    return out


def test_fuzz_the_openapi_schema(base_url: str) -> None:
    fuzzer = Fuzzer(base_url)
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {(op.method.upper(), op.path) for op in operations} >= {
        ("POST", "/v1/completions"),
        ("POST", "/v1/chat/completions"),
        ("GET", "/v1/models"),
    }
    for operation in operations:

        @given(case=fuzzer.cases(operation))
        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def run(case: Any) -> None:
            fuzzer.check(case)

        run()

    seen = fuzzer.seen
    print(f"{sum(seen.values())} cases: " + ", ".join(f"{k} x{v}" for k, v in sorted(seen.items())))
    assert sum(seen.values()) >= 100, seen
    assert sum(v for k, v in seen.items() if k.startswith("extreme 4")) >= 10, seen
    # Both kinds of input reached the generation endpoints: accepted and refused.
    for path in ("/v1/completions", "/v1/chat/completions"):
        assert seen[f"POST {path} 200"] > 0, seen
        assert seen[f"POST {path} 400"] > 0, seen
    with httpx.Client(base_url=base_url, timeout=60) as client:
        ok = client.post("/v1/completions", json={"model": fuzzer.model, "prompt": "still there?", "max_tokens": 2})
        assert ok.status_code == 200, ok.text
        text = client.get("/metrics").text
    assert metric(text, "powerserve_requests_running") == 0
    assert metric(text, "powerserve_requests_queued") == 0
    assert metric(text, "powerserve_running_weight") == 0
