"""Helpers for tests that drive the app through a ``TestClient`` (tests import these, never
another test module)."""

from __future__ import annotations

import json
from typing import Any

from fastapi.testclient import TestClient


def post(client: TestClient, path: str, body: Any) -> Any:
    return client.post(path, json=body)


def assert_openai_error(resp: Any, status: int, param: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if param is not None:
        assert err["param"] == param, err
    return dict(err)


def sse_events(resp: Any) -> list[Any]:
    events = []
    for line in resp.iter_lines():
        if line.startswith("data: "):
            payload = line[len("data: ") :]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events
