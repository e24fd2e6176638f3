"""``GET /v1/models`` and ``GET /v1/decoders``: model, student and decoder cards."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from powerserve.protocol.responses import unix_now


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
    created: int = Field(default_factory=unix_now)
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
    cheap_params: dict[str, Any] = Field(
        default_factory=dict, description="parameters that keep a request cheap (for smoke, soak and fuzz tests)"
    )


class DecoderList(BaseModel):
    object: Literal["list"] = "list"
    data: list[DecoderCard]
