"""Routes of the tokenizer endpoints (vLLM's paths, at the server root): the HTTP layer over
``powerserve.serving.tokenize``. They sit behind the same API key as ``/v1/*``."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request

from powerserve.serving.state import ServerState
from powerserve.serving.tokenize import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
    TokenizerInfoResponse,
    detokenize,
    tokenize,
    tokenizer_info,
)


def _state(request: Request) -> ServerState:
    state: ServerState = request.app.state.powerserve
    return state


def install(app: FastAPI, dependencies: list[Any]) -> None:
    """Add ``POST /tokenize``, ``POST /detokenize`` and ``GET /tokenizer_info`` to ``app``."""

    @app.post("/tokenize", dependencies=dependencies, response_model=TokenizeResponse, tags=["tokenizer"])
    async def tokenize_endpoint(body: TokenizeCompletionRequest | TokenizeChatRequest, request: Request) -> Any:
        """Token ids of a text (``prompt``) or of chat ``messages`` through the model's template."""
        return tokenize(_state(request), body)

    @app.post("/detokenize", dependencies=dependencies, response_model=DetokenizeResponse, tags=["tokenizer"])
    async def detokenize_endpoint(body: DetokenizeRequest, request: Request) -> Any:
        """The text of token ids."""
        return detokenize(_state(request), body)

    @app.get("/tokenizer_info", dependencies=dependencies, response_model=TokenizerInfoResponse, tags=["tokenizer"])
    async def tokenizer_info_endpoint(request: Request) -> Any:
        """The tokenizer's configuration: special tokens, class, chat template."""
        return tokenizer_info(_state(request))
