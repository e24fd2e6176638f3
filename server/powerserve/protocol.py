"""Request and response models, in the order of the OpenAI API reference.

powerserve's own fields are fenced in the marked blocks: ``decoder`` on requests and the
``powerserve`` object on responses. Everything else is OpenAI's.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

# --------------------------------------------------------------------------------------------
# Upper bounds on what a client controls: what a real request could need, and no more. The
# server's own caps (max_n, max_tokens_limit, the context length) are usually tighter; these
# make every field finite in the schema, so no value can make validation or planning slow.
# --------------------------------------------------------------------------------------------

MAX_N = 128  # OpenAI's own limit on n
MAX_TOKENS = 2**20  # beyond any model's context
MAX_TOP_K = 2**20  # beyond any vocabulary
MAX_TIMEOUT_S = 86_400.0  # one day
MAX_STOP = 16
MAX_STOP_CHARS = 256  # each stop string
MAX_PROMPTS = 128  # a batch of prompts (n x prompts is capped by the server's max_n)
MAX_PROMPT_IDS = 2**20  # a token-id prompt (the context length caps it further)
MAX_TEXT_CHARS = 2**23  # a prompt or message text: 8 Mi characters (the context length caps it further)
MAX_MESSAGES = 4096
MAX_CONTENT_PARTS = 4096
MAX_NAME_CHARS = 256  # model, user, message name, decoder name
MAX_LOGIT_BIAS = 300
MAX_DECODER_PARAMS = 64


def at_most(limit: int) -> BeforeValidator:
    """Refuse a list or object longer than ``limit`` before its items are validated.

    ``Field(max_length=...)`` shows the bound in the schema but is checked after every item
    (and, in a union, after every member has failed on every item): 10^5 items cost seconds of
    the event loop. This check costs one ``len``.
    """

    def check(value: Any) -> Any:
        if isinstance(value, list | dict) and len(value) > limit:
            raise ValueError(f"at most {limit} items, not {len(value)}")
        return value

    return BeforeValidator(check)


# --------------------------------------------------------------------------------------------
# powerserve extension: choosing a decoder
# --------------------------------------------------------------------------------------------


class DecoderChoice(BaseModel):
    """A decoder with its parameters, e.g. ``{"name": "power_mcmc", "alpha": 4, "block_size": 64}``.

    The parameters each decoder accepts (and their defaults) are listed by ``GET /v1/decoders``.
    """

    model_config = ConfigDict(extra="allow")

    name: str = Field(
        ..., max_length=MAX_NAME_CHARS, description="decoder name, e.g. standard, temperature, power_mcmc"
    )

    @model_validator(mode="before")
    @classmethod
    def _few_params(cls, data: Any) -> Any:
        if isinstance(data, dict) and len(data) > MAX_DECODER_PARAMS:
            raise ValueError(f"at most {MAX_DECODER_PARAMS} decoder parameters")
        return data

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


DecoderField = Annotated[
    Annotated[str, Field(max_length=MAX_NAME_CHARS)] | DecoderChoice | None,
    Field(
        description=(
            "powerserve extension: the decoding method, either a name ('temperature') or an object "
            "with the name and its parameters ({'name': 'temperature', 'alpha': 4}). Default: "
            "'standard', or the decoder named in the model alias '<model>:<decoder>'. "
            "GET /v1/decoders lists them."
        )
    ),
]


_TYPE_MISMATCH = {"string_type", "int_type", "int_parsing", "float_type", "float_parsing", "list_type", "dict_type"}
_TYPE_MISMATCH |= {"model_type", "model_attributes_type", "bool_type", "bool_parsing", "literal_error", "none_required"}


_MEMBER_TAGS = {"body", "str", "int", "float", "bool", "dict", "list", "none"}


def most_specific_error(errors: Sequence[Any]) -> dict[str, Any]:
    """The validation error to report: for a union field (``stop``, ``prompt``) pydantic reports
    one error per member, and the one that says what is wrong with the value (a bound) is more
    useful than 'should be a valid string' from the member the value was never meant to be."""
    if not errors:
        return {"loc": (), "msg": "invalid request"}
    specific = [e for e in errors if e.get("type") not in _TYPE_MISMATCH]
    return dict((specific or list(errors))[0])


def error_param(loc: Sequence[Any]) -> str | None:
    """``param`` for a validation error's location: field names and list indexes, without
    ``body`` and without pydantic's union-member tags (``list[int]``, ``constrained-str``)."""
    parts = [str(p) for p in loc if isinstance(p, int) or _is_field_name(str(p))]
    return ".".join(parts) or None


def _is_field_name(part: str) -> bool:
    # Field names here are lower-case identifiers; member tags are types ('str', 'DecoderChoice').
    return part.isidentifier() and part[0].islower() and part not in _MEMBER_TAGS


# --------------------------------------------------------------------------------------------
# OpenAI request models
# --------------------------------------------------------------------------------------------


StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _SamplingRequest(BaseModel):
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


class CompletionRequest(_SamplingRequest):
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


class ChatCompletionRequest(_SamplingRequest):
    messages: Annotated[list[ChatMessage], at_most(MAX_MESSAGES)] = Field(..., min_length=1, max_length=MAX_MESSAGES)
    logprobs: bool = False
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS, description="deprecated alias of max_completion_tokens")
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
    id: str = Field(default_factory=_chat_id)
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
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
