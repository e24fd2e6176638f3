"""Request and response models, in the order of the OpenAI API reference.

powerserve's own fields are fenced in the marked blocks: ``decoder`` on requests and the
``powerserve`` object on responses. Everything else is OpenAI's.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# --------------------------------------------------------------------------------------------
# powerserve extension: choosing a decoder
# --------------------------------------------------------------------------------------------


class DecoderChoice(BaseModel):
    """A decoder with its parameters, e.g. ``{"name": "power_mcmc", "alpha": 4, "block_size": 64}``.

    The parameters each decoder accepts (and their defaults) are listed by ``GET /v1/decoders``.
    """

    model_config = ConfigDict(extra="allow")

    name: str = Field(..., description="decoder name, e.g. standard, temperature, power_mcmc")

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


DecoderField = Annotated[
    str | DecoderChoice | None,
    Field(
        description=(
            "powerserve extension: the decoding method, either a name ('temperature') or an object "
            "with the name and its parameters ({'name': 'temperature', 'alpha': 4}). Default: "
            "'standard', or the decoder named in the model alias '<model>:<decoder>'. "
            "GET /v1/decoders lists them."
        )
    ),
]


# --------------------------------------------------------------------------------------------
# OpenAI request models
# --------------------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _SamplingRequest(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="forbid")

    model: str
    frequency_penalty: float = Field(0.0, description="not supported: must be 0")
    logit_bias: dict[str, float] | None = Field(None, description="not supported: must be null")
    n: int = Field(1, ge=1, description="choices to return (capped by the server's max_n)")
    presence_penalty: float = Field(0.0, description="not supported: must be 0")
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    stop: str | list[str] | None = Field(None, description="up to 16 stop strings")
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    user: str | None = None
    # vLLM-style extra sampling field
    top_k: int = Field(0, ge=-1, description="keep the k most likely tokens; 0 or -1: no limit")

    # --- powerserve extension ----------------------------------------------------------------
    decoder: DecoderField = None
    timeout: float | None = Field(
        None,
        gt=0,
        description="powerserve extension: deadline in seconds (queueing included); may only be "
        "tighter than the server's",
    )
    # ------------------------------------------------------------------------------------------

    @model_validator(mode="after")
    def _check_unsupported(self) -> _SamplingRequest:
        if self.frequency_penalty != 0 or self.presence_penalty != 0:
            raise ValueError("frequency_penalty and presence_penalty are not supported (must be 0)")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported")
        stops = self.stop_list()
        if len(stops) > 16:
            raise ValueError("stop: at most 16 stop strings")
        if any(s == "" for s in stops):
            raise ValueError("stop: stop strings must not be empty")
        return self

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        ..., description="a string, a list of strings, a list of token ids, or a list of such lists"
    )
    best_of: int | None = Field(None, description="not supported beyond 1")
    echo: bool = Field(False, description="not supported: must be false")
    logprobs: int | None = Field(
        None, ge=0, le=5, description="log-probabilities of the sampled tokens and the top ones"
    )
    max_tokens: int | None = Field(None, ge=1)
    suffix: str | None = Field(None, description="not supported")

    @model_validator(mode="after")
    def _check_completion_unsupported(self) -> CompletionRequest:
        if self.best_of not in (None, 1):
            raise ValueError("best_of is not supported")
        if self.echo:
            raise ValueError("echo is not supported")
        if self.suffix:
            raise ValueError("suffix is not supported")
        return self


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(..., min_length=1)
    logprobs: bool = False
    max_completion_tokens: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1, description="deprecated alias of max_completion_tokens")
    top_logprobs: int | None = Field(None, ge=0, le=5)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


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
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] | None = None
    text_offset: list[int] = Field(default_factory=list)


FinishReasonOut = Literal["stop", "length"] | None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReasonOut


def _completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def _chat_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def _now() -> int:
    return int(time.time())


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=_completion_id)
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
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
    id: str = Field(default_factory=_chat_id)
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
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
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    powerserve: PowerserveInfo | None = None


class StudentCard(BaseModel):
    """A student of the ``distilled`` decoder (``--distilled NAME=PATH``), from its manifest."""

    name: str
    kind: Literal["lora", "full"] = Field(description="lora: an adapter on the base engine; full: a checkpoint")
    alpha: float | None = Field(None, description="the teacher's power exponent")
    teacher: str | None = Field(None, description="the decoder that drew the teacher samples")
    base: str | None = Field(None, description="the base checkpoint it was trained on")
    path: str


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "powerserve"
    student: StudentCard | None = Field(None, description="powerserve: the student a '<model>:distilled:NAME' selects")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class DecoderCard(BaseModel):
    name: str
    description: str
    streams_tokens: bool
    parameters: dict[str, Any] = Field(description="JSON schema of the decoder's parameters")
    defaults: dict[str, Any]
    available: bool = True
    unavailable_reason: str | None = None
    students: list[StudentCard] | None = Field(None, description="distilled: the students, the default first")


class DecoderList(BaseModel):
    object: Literal["list"] = "list"
    data: list[DecoderCard]
