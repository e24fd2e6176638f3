"""The tokenizer endpoints, in vLLM's shapes: ``POST /tokenize``, ``POST /detokenize``,
``GET /tokenizer_info``.

lm-evaluation-harness's ``tokenizer_backend=remote`` reads them, so an evaluator needs no
local copy of the tokenizer: ``/tokenizer_info`` gives the special tokens and the chat
template, ``/tokenize`` (text, or chat messages through the model's template) the ids that
``/v1/completions`` would see, ``/detokenize`` the text of ids. Inputs are bounded like
prompts: a text must be able to fit the context (checked before tokenizing), an id list
may not exceed the context length, and every id must lie in the vocabulary.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from powerserve.errors import BadRequestError
from powerserve.protocol import ChatMessage
from powerserve.serving.plan import encode_text, resolve_model
from powerserve.serving.state import ServerState

# --- request and response models (vLLM's entrypoints/serve/tokenize/protocol.py) ----------------


class TokenizeCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str
    add_special_tokens: bool = Field(True, description="add the tokenizer's special tokens (e.g. BOS)")
    return_token_strs: bool | None = Field(False, description="also return each token's string")


class TokenizeChatRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    messages: list[ChatMessage] = Field(..., min_length=1)
    add_generation_prompt: bool = Field(True, description="end with the template's assistant header")
    continue_final_message: bool = Field(False, description="leave the last message open (no end token)")
    add_special_tokens: bool = Field(False, description="add special tokens on top of the template's")
    return_token_strs: bool | None = Field(False, description="also return each token's string")


TokenizeRequest = TokenizeCompletionRequest | TokenizeChatRequest


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0, le=2**63 - 1)]]


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfoResponse(BaseModel):
    """The tokenizer's configuration (as in its tokenizer_config.json), its class name and the
    chat template. Further keys vary by tokenizer."""

    model_config = ConfigDict(extra="allow")
    tokenizer_class: str


# --- serving ------------------------------------------------------------------------------------


def tokenize(state: ServerState, body: TokenizeRequest) -> TokenizeResponse:
    _check_model(state, body.model)
    if isinstance(body, TokenizeChatRequest):
        if body.add_generation_prompt and body.continue_final_message:
            raise BadRequestError(
                "add_generation_prompt and continue_final_message cannot both be true", param="continue_final_message"
            )
        tok = state.tokenizer
        if not getattr(tok, "chat_template", None):
            raise BadRequestError("this model has no chat template", param="messages")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        text = tok.apply_chat_template(
            messages,
            add_generation_prompt=body.add_generation_prompt,
            continue_final_message=body.continue_final_message,
            tokenize=False,
        )
        ids = encode_text(state, text, "messages", add_special_tokens=body.add_special_tokens)
    else:
        ids = encode_text(state, body.prompt, "prompt", add_special_tokens=body.add_special_tokens)
    strs = list(state.tokenizer.convert_ids_to_tokens(ids)) if body.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=state.engine.max_model_len, tokens=ids, token_strs=strs)


def detokenize(state: ServerState, body: DetokenizeRequest) -> DetokenizeResponse:
    _check_model(state, body.model)
    context, vocab = state.engine.max_model_len, len(state.tokenizer)
    if len(body.tokens) > context:
        raise BadRequestError(f"at most {context} tokens (the context length)", param="tokens")
    if any(t >= vocab for t in body.tokens):
        raise BadRequestError(f"token ids must lie in [0, {vocab})", param="tokens")
    return DetokenizeResponse(prompt=str(state.tokenizer.decode(body.tokens)))


def tokenizer_info(state: ServerState) -> TokenizerInfoResponse:
    """vLLM's ``TokenizerInfo``: the tokenizer's init kwargs made JSON-safe, without file paths."""
    tok = state.tokenizer
    config = dict(getattr(tok, "init_kwargs", None) or {})
    for key in ("vocab_file", "merges_file", "tokenizer_file", "name_or_path"):
        config.pop(key, None)
    config = _json_safe(config)
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        config.setdefault(key, getattr(tok, key, None))
    config["tokenizer_class"] = type(tok).__name__
    if getattr(tok, "chat_template", None):
        config["chat_template"] = tok.chat_template
    return TokenizerInfoResponse(**config)


def _check_model(state: ServerState, model: str | None) -> None:
    if model is not None:
        resolve_model(state, model, None)  # 404 for a model this server does not serve


def _json_safe(obj: Any) -> Any:
    if hasattr(obj, "content"):  # AddedToken
        return obj.content
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if obj is None or isinstance(obj, str | int | float | bool):
        return obj
    return str(obj)
