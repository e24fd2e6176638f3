"""``/dashboard`` (the page) and ``/dashboard/data`` (its JSON), mounted by ``install``.

Like ``/metrics`` they need no API key: they show the same aggregate series, no request data.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse

from powerserve import metrics
from powerserve.dashboard.history import History
from powerserve.dashboard.page import PAGE


def make_router(history: History) -> APIRouter:
    router = APIRouter(tags=["ops"])

    @router.get("/dashboard", response_class=HTMLResponse, include_in_schema=False)
    async def dashboard_page() -> HTMLResponse:
        return HTMLResponse(PAGE, headers={"Cache-Control": "no-cache"})

    @router.get("/dashboard/data", summary="Per-decoder latency and cost for the built-in dashboard")
    async def dashboard_data(request: Request) -> dict[str, Any]:
        body = history.data()
        state = getattr(request.app.state, "powerserve", None)
        body["model"] = state.model_name if state is not None else None
        body["engine"] = state.engine.name if state is not None else None
        return body

    return router


def install(app: FastAPI, history: History | None = None) -> History:
    """Mount the dashboard on ``app``. Its "since start" totals count from this call; its
    quantiles are exact over the last observations that ``metrics.RECENT`` keeps."""
    history = history if history is not None else History(recent=metrics.RECENT)
    app.include_router(make_router(history))
    return history
