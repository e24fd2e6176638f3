"""Helpers for the reliability tests (the tests import these; fixtures stay in conftest.py):
the real app on a socket with small caps (``live``), Prometheus samples (``metric``), the
OpenAI error shape and SSE parsing. Every helper here only talks to 127.0.0.1."""

from __future__ import annotations

import json
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from powerserve.testing import LiveServer, ServerProcess
from tests.serving.tiny_app import MODEL

__all__ = ["MODEL", "LiveServer", "ServerProcess"]

# Small caps so that generated and hand-written requests stay cheap on two CPU cores.
SETTINGS: dict[str, Any] = {"max_n": 4, "default_max_tokens": 8, "max_tokens_limit": 64}

# A chain that runs far longer than any deadline in these tests (tens of seconds on the tiny model).
LONG_MCMC = {"name": "power_mcmc", "alpha": 4, "block_size": 16, "mcmc_steps": 64, "proposals": 64}
LONG_MCMC_SETTINGS: dict[str, Any] = {"max_engine_tokens_per_request": 10**9}


def live(torch_engine: Any, **settings: Any) -> LiveServer:
    """The app on a free loopback port with the reliability defaults (overridable)."""
    return LiveServer(torch_engine, **{**SETTINGS, **settings})


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` (the full sample name, e.g. ``..._total``) matching ``labels``."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def assert_openai_error(resp: httpx.Response, status: int, error_type: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text[:500]
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    if error_type is not None:
        assert err["type"] == error_type, err
    return dict(err)


def parse_sse(text: str) -> list[Any]:
    """The ``data:`` payloads of an event stream: parsed JSON, or the string ``[DONE]``."""
    events: list[Any] = []
    for line in text.splitlines():
        if line.startswith("data: "):
            payload = line[len("data: ") :]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events
