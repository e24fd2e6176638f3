"""With an API key, every ``/v1/*`` route the app has (read from its route table, so a route
added later is covered) refuses a missing or wrong key with an OpenAI-shaped 401; the operational
routes (``/health``, ``/metrics``, the dashboard, the OpenAPI schema) stay open."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.routing import APIRoute

from tests.reliability.support import MODEL, assert_openai_error
from tests.serving.tiny_app import make_client

KEY = "sekret-key"
BAD_HEADERS = [
    {},
    {"Authorization": ""},
    {"Authorization": "Bearer"},
    {"Authorization": "Bearer wrong"},
    {"Authorization": f"Bearer {KEY}x"},
    {"Authorization": f"Bearer {KEY[:-1]}"},
    {"Authorization": KEY},
    {"Authorization": f"Basic {KEY}"},
    {"X-Api-Key": KEY},
]
BODIES = {
    "/v1/completions": {"model": MODEL, "prompt": "a", "max_tokens": 1},
    "/v1/chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": "a"}], "max_tokens": 1},
}


def routes(app: Any) -> list[tuple[str, str]]:
    return sorted((method, r.path) for r in app.routes if isinstance(r, APIRoute) for method in r.methods)


def test_every_v1_route_needs_the_key(engine: Any) -> None:
    with make_client(engine, api_key=KEY) as client:
        v1 = [(m, p) for m, p in routes(client.app) if p.startswith("/v1/")]
        assert {("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions")} <= set(v1)
        for method, path in v1:
            for headers in BAD_HEADERS:
                resp = client.request(method, path, headers=headers, json=BODIES.get(path, {}))
                err = assert_openai_error(resp, 401)  # type: ignore[arg-type]
                assert (err["type"], err["code"]) == ("authentication_error", "invalid_api_key"), (method, path)
            ok = client.request(method, path, headers={"Authorization": f"Bearer {KEY}"}, json=BODIES.get(path))
            assert ok.status_code == 200, (method, path, ok.text)
            # The scheme is case-insensitive, as in RFC 7235.
            ok = client.request(method, path, headers={"Authorization": f"bearer {KEY}"}, json=BODIES.get(path))
            assert ok.status_code == 200, (method, path, ok.text)


@pytest.mark.parametrize("path", ["/health", "/metrics", "/dashboard", "/dashboard/data", "/openapi.json", "/docs"])
def test_operational_routes_stay_open(engine: Any, path: str) -> None:
    with make_client(engine, api_key=KEY) as client:
        assert client.get(path).status_code == 200


# vLLM's tokenizer routes serve the model like /v1 does, so they ask for the key too (README).
TOKENIZER_ROUTES = {"/tokenize", "/detokenize", "/tokenizer_info"}


def test_every_route_outside_v1_is_open(engine: Any) -> None:
    """No route outside /v1 and the tokenizer routes asks for the key (so probes and scrapers
    need none); the tokenizer routes do."""
    with make_client(engine, api_key=KEY) as client:
        seen = set()
        for method, path in routes(client.app):
            if path in TOKENIZER_ROUTES:
                seen.add(path)
                assert client.request(method, path, json={}).status_code == 401, path
            elif not path.startswith("/v1/") and method == "GET":
                assert client.get(path).status_code == 200, path
        assert seen == TOKENIZER_ROUTES
