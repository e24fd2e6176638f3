"""Running the app under uvicorn with a graceful, draining shutdown.

On the first SIGTERM (or Ctrl-C) the server stops admitting work -- new requests get a 503
and ``/health`` reports ``draining`` so a load balancer stops sending -- while it keeps
listening. Running and queued requests get ``drain_timeout_s`` to finish; whatever is still
running then is cancelled (its client gets a 503 ``server_shutdown``). Then uvicorn closes
and the process exits 0. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from types import FrameType

import uvicorn
from fastapi import FastAPI

from powerserve.serving.runner import SHUTDOWN
from powerserve.serving.state import ServerState

log = logging.getLogger(__name__)

FLUSH_S = 0.5  # time for cancelled requests to send their error before the sockets close


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_timeout_s: float) -> None:
        super().__init__(config)
        self.app = app
        self.drain_timeout_s = drain_timeout_s
        self._draining = False
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[object] | None = None) -> None:  # type: ignore[override]
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)  # type: ignore[arg-type]

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        state: ServerState | None = getattr(self.app.state, "powerserve", None)
        if self._draining or state is None or self._loop is None:
            self.should_exit = True
            self.force_exit = self._draining
            return
        self._draining = True
        state.admission.draining = True
        log.warning("signal %d: draining (up to %.0f s), no new requests admitted", sig, self.drain_timeout_s)
        self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._drain(state)))  # type: ignore[union-attr]

    async def _drain(self, state: ServerState) -> None:
        admission = state.admission
        deadline = time.monotonic() + self.drain_timeout_s
        while not admission.idle and time.monotonic() < deadline:  # noqa: ASYNC110 (a deadline, not an event)
            await asyncio.sleep(0.1)
        if not admission.idle:
            log.warning("drain time over: cancelling %d request(s)", len(admission.tasks))
            for task in list(admission.tasks):
                task.cancel(SHUTDOWN)
        await asyncio.sleep(FLUSH_S)
        self.should_exit = True


def run(app: FastAPI, *, host: str, port: int, log_level: str, drain_timeout_s: float) -> None:
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, timeout_keep_alive=30, timeout_graceful_shutdown=5
    )
    DrainingServer(config, app, drain_timeout_s).run()
