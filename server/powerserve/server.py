"""Running the app under uvicorn with a graceful, draining shutdown.

On the first SIGTERM (or Ctrl-C) the server stops admitting work -- new requests get a 503
and ``/health`` reports ``draining`` so a load balancer stops sending -- while it keeps
listening. Running and queued requests get ``drain_timeout_s`` to finish; whatever is still
running then is cancelled (its client gets a 503 ``server_shutdown``). Then uvicorn closes
and the process exits 0. A second signal exits at once.

A dead engine ends the process too, with exit status :data:`ENGINE_DEAD_EXIT_CODE`: a watchdog
calls the engine's ``check_health`` every :data:`ENGINE_CHECK_S` seconds. Once it fails, the
server stops admitting work (503), requests in flight fail with a 503 (the engine raises
``engine_dead``; any still running after :data:`FLUSH_S` are cancelled with
``server_shutdown``), and uvicorn closes. This is what vLLM's own API server does
(``terminate_if_errored``): a dead vLLM engine core cannot be restarted inside the process,
and a process that lives on answering errors is a zombie that no supervisor replaces. The
supervisor (compose ``restart: unless-stopped``, Kubernetes' restart policy) starts a new one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from types import FrameType

import uvicorn
from fastapi import FastAPI

from powerserve.serving.runner import SHUTDOWN
from powerserve.serving.state import ServerState

log = logging.getLogger(__name__)

FLUSH_S = 0.5  # time for cancelled requests to send their error before the sockets close
ENGINE_CHECK_S = 1.0  # how often the watchdog asks the engine whether it is alive
ENGINE_DEAD_EXIT_CODE = 3  # the process's exit status after its engine died


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_timeout_s: float) -> None:
        super().__init__(config)
        self.app = app
        self.drain_timeout_s = drain_timeout_s
        self._draining = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.engine_dead = False

    async def serve(self, sockets: list[object] | None = None) -> None:  # type: ignore[override]
        self._loop = asyncio.get_running_loop()
        watchdog = self._loop.create_task(self._watch_engine())
        try:
            await super().serve(sockets)  # type: ignore[arg-type]
        finally:
            watchdog.cancel()

    async def _watch_engine(self) -> None:
        """Poll the engine's health; on the first failure fail the work in flight and exit."""
        while not self.should_exit:
            await asyncio.sleep(ENGINE_CHECK_S)
            state: ServerState | None = getattr(self.app.state, "powerserve", None)
            if state is None or self._draining:  # not started yet, or already on its way out
                continue
            try:
                await state.engine.check_health()
            except Exception as exc:
                log.critical(
                    "the %s engine is dead (%s): failing the requests in flight, exiting", state.engine.name, exc
                )
                await self._fail_and_exit(state)
                return

    async def _fail_and_exit(self, state: ServerState) -> None:
        self.engine_dead = True
        self._draining = True
        state.admission.draining = True  # new requests: 503, /health: 503
        await asyncio.sleep(FLUSH_S)  # requests on the engine fail by themselves (503 engine_dead)
        for task in list(state.admission.tasks):
            task.cancel(SHUTDOWN)
        await asyncio.sleep(FLUSH_S)
        self.should_exit = True

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


def run(app: FastAPI, *, host: str, port: int, log_level: str, drain_timeout_s: float) -> int:
    """Serve until a signal (exit status 0) or the engine's death (:data:`ENGINE_DEAD_EXIT_CODE`)."""
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, timeout_keep_alive=30, timeout_graceful_shutdown=5
    )
    server = DrainingServer(config, app, drain_timeout_s)
    server.run()
    if server.engine_dead:
        # Every request is answered and the engine is gone. Interpreter teardown can block for
        # ever on a dead vLLM engine's leftovers (seen: the process hung in garbage collection
        # after uvicorn had finished), so leave without it.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(ENGINE_DEAD_EXIT_CODE)
    return 0
