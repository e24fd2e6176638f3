"""Admission control: how many requests run at once, how many wait, and who is turned away.

Requests are weighted by expected cost, so one user's expensive decoders cannot starve the
rest: a sequence weighs its decoder's expected engine tokens per output token (``standard``
and ``temperature``: 1; ``power_mcmc``: its worst-case cost multiplier, capped at the running
limit so that any single request can run on an idle server). A request runs when the running
weight leaves room for it, waits in a FIFO queue while the queued weight leaves room, and
otherwise is refused at once with a 429 and ``Retry-After``. While the server drains for
shutdown it refuses everything with a 503.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from powerserve import metrics
from powerserve.errors import RateLimitError, ServiceUnavailableError


@dataclass(eq=False)
class Ticket:
    """A place in the admission queue, reserved before the response starts."""

    weight: float
    labels: tuple[str, str]
    granted: asyncio.Event = field(default_factory=asyncio.Event)
    done: bool = False


class Admission:
    def __init__(self, max_running: float, max_queued: float, retry_after_s: int = 1) -> None:
        self.max_running = max_running
        self.max_queued = max_queued
        self.retry_after_s = retry_after_s
        self.running: set[Ticket] = set()
        self.running_weight = 0.0
        self.queue: deque[Ticket] = deque()
        self.draining = False
        self.tasks: set[asyncio.Task[object]] = set()

    @property
    def queued_weight(self) -> float:
        return math.fsum(t.weight for t in self.queue)

    def reserve(self, weight: float, labels: tuple[str, str]) -> Ticket:
        """Decide now: admit, queue, or refuse (429; 503 while draining)."""
        ticket = Ticket(self._clamp(weight), labels)
        if self._refusal(ticket.weight) is None and not self.queue and self._fits(ticket.weight):
            self._grant(ticket)
            return ticket
        self.precheck(weight, labels)
        self.queue.append(ticket)
        metrics.REQUESTS_QUEUED.labels(*labels).inc()
        return ticket

    def precheck(self, weight: float, labels: tuple[str, str]) -> None:
        """Raise the error :meth:`reserve` would raise now, without reserving anything (used
        before a stream starts, so that a refusal is an HTTP status, not an event). A refusal
        is final, so it is counted here, whichever of the two calls makes it."""
        refusal = self._refusal(self._clamp(weight))
        if refusal is None:
            return
        metrics.REQUESTS.labels(*labels, "rejected").inc()
        if isinstance(refusal, RateLimitError):
            metrics.ADMISSION_REJECTIONS.labels(*labels).inc()
        raise refusal

    def _clamp(self, weight: float) -> float:
        return min(max(weight, 1.0), self.max_running)

    def _fits(self, weight: float) -> bool:
        return self.running_weight + weight <= self.max_running

    def _refusal(self, weight: float) -> Exception | None:
        if self.draining:
            return ServiceUnavailableError(
                "The server is shutting down; retry on another replica.", code="server_draining"
            )
        if (not self.queue and self._fits(weight)) or self.queued_weight + weight <= self.max_queued:
            return None
        return RateLimitError(
            f"The server is at capacity (running weight {self.running_weight:g} of {self.max_running:g}, "
            f"queued {self.queued_weight:g} of {self.max_queued:g}); retry after {self.retry_after_s} s.",
            code="server_busy",
            headers={"Retry-After": str(self.retry_after_s)},
        )

    @asynccontextmanager
    async def hold(self, ticket: Ticket) -> AsyncIterator[None]:
        """Wait for ``ticket`` to be granted, hold its weight while the body runs, then release.

        The calling task is tracked while it waits and runs, so a draining server can cancel it.
        """
        task = asyncio.current_task()
        if task is not None:
            self.tasks.add(task)  # type: ignore[arg-type]
        try:
            try:
                await ticket.granted.wait()
            except BaseException:
                if ticket in self.queue:  # gave up while waiting (timeout, disconnect, shutdown)
                    self.queue.remove(ticket)
                    metrics.REQUESTS_QUEUED.labels(*ticket.labels).dec()
                raise
            yield
        finally:
            if task is not None:
                self.tasks.discard(task)  # type: ignore[arg-type]
            self.release(ticket)

    def release(self, ticket: Ticket) -> None:
        if ticket.granted.is_set() and not ticket.done:
            ticket.done = True
            self.running.discard(ticket)
            self._sum_running()
        while self.queue and self._fits(self.queue[0].weight):
            nxt = self.queue.popleft()
            metrics.REQUESTS_QUEUED.labels(*nxt.labels).dec()
            self._grant(nxt)

    def _grant(self, ticket: Ticket) -> None:
        self.running.add(ticket)
        self._sum_running()
        ticket.granted.set()

    def _sum_running(self) -> None:
        # Summed afresh, not kept as a running total: adding and subtracting float weights
        # drifts (1 + 2/7, 1 + 15/7, 1 + 29/7, released, leave 2.7e-15), and an idle server whose total
        # is not exactly 0 can never admit a request of the full budget.
        self.running_weight = math.fsum(t.weight for t in self.running)
        metrics.RUNNING_WEIGHT.set(self.running_weight)

    @property
    def idle(self) -> bool:
        return not self.tasks and not self.queue
