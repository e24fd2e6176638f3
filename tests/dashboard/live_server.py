"""The real app under uvicorn on a free loopback port, for tests that need a socket (a browser,
the load generator)."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import uvicorn

from powerserve.app import create_app
from powerserve.engine.torch_engine import TorchEngine
from powerserve.settings import Settings

SETTINGS: dict[str, Any] = {"max_n": 2, "default_max_tokens": 8, "max_tokens_limit": 32}


class LiveServer:
    """The real app under uvicorn in a background thread, on a free loopback port."""

    def __init__(self, engine: TorchEngine, **settings: Any) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        app = create_app(Settings(**{**SETTINGS, **settings}), engine=engine)
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.base = f"http://127.0.0.1:{port}"
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
