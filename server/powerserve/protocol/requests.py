"""The OpenAI request models (completions, chat completions), in the order of the reference;
powerserve's own fields are fenced in the marked block."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from powerserve.protocol.bounds import (
    MAX_CONTENT_PARTS,
    MAX_LOGIT_BIAS,
    MAX_MESSAGES,
    MAX_N,
    MAX_NAME_CHARS,
    MAX_PROMPT_IDS,
    MAX_PROMPTS,
    MAX_STOP,
    MAX_STOP_CHARS,
    MAX_TEXT_CHARS,
    MAX_TIMEOUT_S,
    MAX_TOKENS,
    MAX_TOP_K,
    at_most,
)
from powerserve.protocol.decoder_choice import DecoderField

# --------------------------------------------------------------------------------------------
# OpenAI request models
# --------------------------------------------------------------------------------------------


StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """Fields shared by completions and chat completions.

    Unsupported fields are refused by field validators, so the 400 names them in ``param``.
    """

    model_config = ConfigDict(extra="forbid")

    model: str = Field(..., max_length=MAX_NAME_CHARS)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="not supported: must be 0")
    logit_bias: Annotated[dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None, at_most(MAX_LOGIT_BIAS)] = (
        Field(None, max_length=MAX_LOGIT_BIAS, description="not supported: must be null")
    )
    n: int = Field(1, ge=1, le=MAX_N, description="choices to return (capped by the server's max_n)")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="not supported: must be 0")
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    stop: Annotated[StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)] | None, at_most(MAX_STOP)] = (
        Field(None, description=f"up to {MAX_STOP} non-empty stop strings of up to {MAX_STOP_CHARS} characters each")
    )
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    user: str | None = Field(None, max_length=MAX_NAME_CHARS)
    # vLLM-style extra sampling field
    top_k: int = Field(0, ge=-1, le=MAX_TOP_K, description="keep the k most likely tokens; 0 or -1: no limit")

    # --- powerserve extension ----------------------------------------------------------------
    decoder: DecoderField = None
    timeout: float | None = Field(
        None,
        gt=0,
        le=MAX_TIMEOUT_S,
        description="powerserve extension: deadline in seconds (queueing included); may only be "
        "tighter than the server's",
    )
    # ------------------------------------------------------------------------------------------

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _no_penalty(cls, v: float) -> float:
        if v != 0:
            raise ValueError("not supported (must be 0)")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v:
            raise ValueError("logit_bias is not supported")
        return v

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


Text = Annotated[str, Field(max_length=MAX_TEXT_CHARS)]
TokenId = Annotated[int, Field(ge=0, lt=2**31)]  # the model's vocabulary bounds it further

PromptField = Annotated[
    Text
    | Annotated[list[Text], Field(max_length=MAX_PROMPTS)]
    | Annotated[list[TokenId], Field(max_length=MAX_PROMPT_IDS)]
    | Annotated[list[Annotated[list[TokenId], Field(max_length=MAX_PROMPT_IDS)]], Field(max_length=MAX_PROMPTS)],
    at_most(MAX_PROMPT_IDS),
    Field(..., description="a string, a list of strings, a list of token ids, or a list of such lists"),
]


class CompletionRequest(SamplingRequest):
    prompt: PromptField
    best_of: int | None = Field(None, ge=0, le=20, description="not supported beyond 1")
    echo: bool = Field(
        False,
        description="return the prompt before the completion; with logprobs, the prompt's tokens with their "
        "log-probabilities under the base model (the first one null) come first",
    )
    logprobs: int | None = Field(
        None, ge=0, le=5, description="log-probabilities of the sampled tokens and the top ones"
    )
    max_tokens: int | None = Field(
        None, ge=0, le=MAX_TOKENS, description="0 only with echo: score the prompt, generate nothing"
    )
    suffix: str | None = Field(None, max_length=MAX_NAME_CHARS, description="not supported")

    @field_validator("prompt", mode="before")
    @classmethod
    def _few_prompts(cls, v: Any) -> Any:
        # A batch of prompts is short (the server caps prompts x n by max_n); refuse a long one
        # before its items are validated against every member of the union.
        if isinstance(v, list) and len(v) > MAX_PROMPTS and not isinstance(v[0], int):
            raise ValueError(f"at most {MAX_PROMPTS} prompts per request")
        return v

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, v: int | None) -> int | None:
        if v not in (None, 1):
            raise ValueError("best_of is not supported")
        return v

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v: str | None) -> str | None:
        if v:
            raise ValueError("suffix is not supported")
        return v


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[
        Text | Annotated[list[TextPart], Field(max_length=MAX_CONTENT_PARTS)], at_most(MAX_CONTENT_PARTS)
    ]
    name: str | None = Field(None, max_length=MAX_NAME_CHARS)

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingRequest):
    messages: Annotated[list[ChatMessage], at_most(MAX_MESSAGES)] = Field(..., min_length=1, max_length=MAX_MESSAGES)
    logprobs: bool = False
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS, description="deprecated alias of max_completion_tokens")
    top_logprobs: int | None = Field(None, ge=0, le=5)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
