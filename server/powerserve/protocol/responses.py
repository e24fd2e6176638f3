"""The OpenAI response models (completions, chat completions, stream chunks), with the
``powerserve`` object that says what each response cost and bought."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, Field

# --------------------------------------------------------------------------------------------
# powerserve extension: what each response cost and bought
# --------------------------------------------------------------------------------------------


class SelfReward(BaseModel):
    """Log-probability of the returned tokens under the base model (the 'self-reward')."""

    sum_logprob: float
    mean_logprob: float | None
    tokens: int


class ChoiceCost(BaseModel):
    index: int
    self_reward: SelfReward
    decoder_stats: dict[str, float] = Field(default_factory=dict)


class PowerserveInfo(BaseModel):
    decoder: str
    params: dict[str, Any]
    engine: str
    engine_calls: int
    tokens_generated: int = Field(description="tokens the engine generated, including discarded ones")
    tokens_scored: int = Field(description="tokens the engine scored (log p of given tokens)")
    wall_time_s: float
    cost_multiplier: float | None = Field(description="(tokens_generated + tokens_scored) / completion tokens returned")
    self_reward: SelfReward = Field(description="over all returned choices")
    decoder_stats: dict[str, float] = Field(
        default_factory=dict, description="decoder-specific counters summed over choices"
    )
    choices: list[ChoiceCost]


# --------------------------------------------------------------------------------------------
# OpenAI response models
# --------------------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """Per token: its text, log p under the base model and the top ones. With ``echo`` the
    prompt's tokens come first; the first prompt token has no log-probability (null)."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] | None = None
    text_offset: list[int] = Field(default_factory=list)


FinishReasonOut = Literal["stop", "length"] | None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReasonOut


def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def chat_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def unix_now() -> int:
    return int(time.time())


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=completion_id)
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=unix_now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
    powerserve: PowerserveInfo | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReasonOut


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=chat_id)
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=unix_now)
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
    powerserve: PowerserveInfo | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReasonOut = None


class ChatCompletionChunk(BaseModel):
    id: str = Field(default_factory=chat_id)
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=unix_now)
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    powerserve: PowerserveInfo | None = None
