"""The HTTP application: routes, authentication, error handlers, start-up and shut-down.

This is the only module that imports FastAPI's app machinery; endpoints delegate to
``powerserve.serving``.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any, ParamSpec, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from powerserve import __version__
from powerserve.engine.base import Engine
from powerserve.errors import AuthenticationError, PowerserveError, RequestCancelled, error_body
from powerserve.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DecoderCard,
    DecoderList,
    ModelCard,
    ModelList,
    StudentCard,
    error_param,
    most_specific_error,
)
from powerserve.serving.chat import create_chat_completion, stream_chat_completion
from powerserve.serving.completions import create_completion, stream_completion
from powerserve.serving.state import ServerState
from powerserve.settings import Settings
from powerserve.tokenizer_routes import install as install_tokenizer_routes

log = logging.getLogger(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DISCONNECT_POLL_S = 0.2
P = ParamSpec("P")
R = TypeVar("R")


def with_cancellation(handler: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Run an endpoint as a task and cancel it, with its engine work, if the client disconnects
    first (checked every ``DISCONNECT_POLL_S``); then raise :class:`RequestCancelled` (499).

    The endpoint must take ``request: Request`` as a keyword (FastAPI passes every parameter
    by name). A streamed response returns at once; its stream is cancelled by Starlette when
    the client goes, which cancels the engine work in ``stream_events``. vLLM's OpenAI server
    does the same with its ``with_cancellation``; here the serving layer stays free of HTTP."""

    @functools.wraps(handler)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        request = kwargs["request"]
        assert isinstance(request, Request), "with_cancellation needs the endpoint's request"
        task = asyncio.ensure_future(handler(*args, **kwargs))
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
                if done:
                    return task.result()
                if await request.is_disconnected():
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                    raise RequestCancelled()
        finally:
            if not task.done():
                task.cancel()

    return wrapper


def create_app(settings: Settings, engine: Engine | None = None) -> FastAPI:
    """Build the app. Without ``engine`` the lifespan starts one from ``settings`` (and shuts it
    down at exit); tests pass a ready engine."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from powerserve.engine.factory import StudentEngines, lora_args, read_students, start_engine, start_students

        owned = engine is None
        # The students (--distilled), checked before the engine starts (an adapter for another
        # base stops the start-up); LoRA adapters size the vLLM engine's LoRA slots.
        specs = read_students(settings)
        eng = engine if engine is not None else await start_engine(settings, **lora_args(specs))
        students = StudentEngines()
        try:
            if specs:
                students = await start_students(specs, settings, eng)
        except BaseException:
            if owned:
                await eng.shutdown()
            raise
        app.state.powerserve = ServerState.build(settings, eng, settings.served_model_name or eng.model_name, students)
        log.info("serving %s on the %s engine", app.state.powerserve.model_name, eng.name)
        try:
            yield
        finally:
            await students.shutdown()
            if owned:
                await eng.shutdown()

    app = FastAPI(
        title="powerserve",
        version=__version__,
        description="OpenAI-compatible inference server for power sampling. Choose a decoder per "
        "request with the `decoder` field or the model alias `<model>:<decoder>`.",
        lifespan=lifespan,
    )
    _install_error_handlers(app)
    _install_routes(app, settings)
    return app


def get_state(request: Request) -> ServerState:
    state: ServerState = request.app.state.powerserve
    return state


State = Annotated[ServerState, Depends(get_state)]


def _check_api_key(settings: Settings) -> Any:
    async def check(request: Request) -> None:
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), settings.api_key):
            raise AuthenticationError(
                "Missing or incorrect API key: send 'Authorization: Bearer <key>'.", code="invalid_api_key"
            )

    return Depends(check)


def _install_routes(app: FastAPI, settings: Settings) -> None:
    auth = [_check_api_key(settings)]

    @app.get("/health", tags=["ops"])
    async def health(state: State) -> JSONResponse:
        """200 ``{"status": "ok"}`` while serving; 503 ``{"status": "draining"}`` after SIGTERM, so a
        load balancer stops sending; 503 ``{"status": "unhealthy"}`` if the engine fails its check."""
        if state.admission.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        try:
            await state.engine.check_health()
        except Exception as exc:
            log.error("engine health check failed: %s", exc)
            return JSONResponse({"status": "unhealthy"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", tags=["ops"])
    async def metrics_endpoint() -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    from powerserve.dashboard import install as install_dashboard

    install_dashboard(app)
    install_tokenizer_routes(app, auth)  # /tokenize, /detokenize, /tokenizer_info

    @app.get("/v1/models", dependencies=auth, response_model=ModelList)
    async def list_models(state: State) -> ModelList:
        names = [state.model_name] + [f"{state.model_name}:{d}" for d in state.decoders]
        cards = [ModelCard(id=n) for n in names]
        for name, decoder in state.decoders.items():  # '<model>:<decoder>:<variant>' aliases (students)
            for variant, card in decoder.variants().items():
                cards.append(ModelCard(id=f"{state.model_name}:{name}:{variant}", student=StudentCard(**card)))
        return ModelList(data=cards)

    @app.get("/v1/decoders", dependencies=auth, response_model=DecoderList)
    async def list_decoders(state: State) -> DecoderList:
        cards = []
        from powerserve.decoders.registry import DECODERS

        for name, cls in DECODERS.items():
            # A served decoder's own parameters model (distilled's lists its students' names).
            served = state.decoders.get(name)
            model = served.params_model if served is not None else cls.params_model
            variants = [StudentCard(**card) for card in served.variants().values()] if served is not None else []
            defaults = {k: f.default for k, f in model.model_fields.items()}
            cards.append(
                DecoderCard(
                    name=name,
                    description=cls.description,
                    streams_tokens=cls.streams_tokens,
                    parameters=model.model_json_schema(),
                    defaults=defaults,
                    available=name in state.decoders,
                    unavailable_reason=state.unavailable.get(name),
                    students=variants or None,
                    cheap_params=cls.cheap_params,
                )
            )
        return DecoderList(data=cards)

    @app.post("/v1/completions", dependencies=auth, response_model=CompletionResponse)
    @with_cancellation
    async def completions(body: CompletionRequest, request: Request, state: State) -> Any:
        if body.stream:
            return StreamingResponse(
                await stream_completion(state, body), media_type="text/event-stream", headers=SSE_HEADERS
            )
        return await create_completion(state, body)

    @app.post("/v1/chat/completions", dependencies=auth, response_model=ChatCompletionResponse)
    @with_cancellation
    async def chat_completions(body: ChatCompletionRequest, request: Request, state: State) -> Any:
        if body.stream:
            return StreamingResponse(
                await stream_chat_completion(state, body), media_type="text/event-stream", headers=SSE_HEADERS
            )
        return await create_chat_completion(state, body)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(PowerserveError)
    async def on_powerserve_error(request: Request, exc: PowerserveError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers or None)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = most_specific_error(exc.errors())
        param = error_param(first.get("loc", ()))
        if first.get("type") == "json_invalid":
            message, param = "The request body is not valid JSON.", None
        else:
            message = f"{param + ': ' if param else ''}{first.get('msg', 'invalid value')}"
        return JSONResponse(error_body(message, "invalid_request_error", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code)

    @app.exception_handler(RequestCancelled)
    async def on_cancelled(request: Request, exc: RequestCancelled) -> Response:
        # The client is gone; nobody reads this. 499 is nginx's "client closed request".
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return JSONResponse(error_body("internal server error", "internal_error"), status_code=500)


def openapi_json(app: FastAPI) -> str:
    return json.dumps(app.openapi(), indent=2)
