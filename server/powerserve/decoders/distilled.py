"""``distilled``: sample from a power-self-distilled student at standard cost.

Students are named by ``--distilled [NAME=]PATH`` (see :mod:`powerserve.distill.students`); a
request picks one with ``{"name": "distilled", "student": "NAME"}`` or the model alias
``<model>:distilled:NAME``, else gets the first. A LoRA adapter runs on the base model's vLLM
engine with its ``LoRARequest`` (its requests batch with the base model's); a full checkpoint
runs on the torch engine beside the base (a second vLLM engine in one process collides with the
first one's Prometheus metrics).

The student samples like ``standard`` with the request's OpenAI parameters (``temperature`` 1
by default, ``top_p``, ``top_k``). Its tokens carry ``logp=None`` on purpose: the student's
log-probabilities are not the base model's, and serving then scores the returned tokens under
the base engine (no adapter), so the self-reward of every decoder is measured on one scale.
That scoring shows up as ``tokens_scored`` (one scoring pass over the answer); the decoding
itself is one student token per returned token.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any, Literal, Self

from pydantic import Field, create_model

from powerserve.decoders.base import Decoder, DecoderContext, DecodeRequest, DecoderParams, UnavailableDecoder
from powerserve.distill.students import StudentSpec
from powerserve.engine.base import Engine, EngineStats, TokenStep

log = logging.getLogger(__name__)

HOW_TO_MAKE_ONE = (
    "no distilled checkpoint is configured. Make one with `powerserve distill teacher --prompts P.jsonl "
    "--out samples.jsonl` then `powerserve distill train --samples samples.jsonl --out CKPT [--lora]`, and "
    "start the server with `--distilled [NAME=]CKPT` (or POWERSERVE_DISTILLED=CKPT)"
)


class DistilledParams(DecoderParams):
    """``student`` picks a student by name (default: the first); temperature, top_p and top_k apply."""

    student: str | None = Field(None, description="the student's name (GET /v1/decoders lists them)")


class DistilledDecoder(Decoder[DistilledParams]):
    name = "distilled"
    description = (
        "Samples from a power-self-distilled student (--distilled [NAME=]PATH) at standard cost; honours "
        "temperature, top_p and top_k. Self-reward is measured under the base model."
    )
    params_model = DistilledParams
    streams_tokens = True
    variant_param = "student"

    def __init__(self, engine: Engine, students: dict[str, tuple[StudentSpec, Engine]]) -> None:
        super().__init__(engine)
        assert students, "a distilled decoder needs at least one student"
        self.students = students
        self.default = next(iter(students))

    @property
    def student(self) -> Engine:
        """The default student's engine."""
        return self.students[self.default][1]

    @classmethod
    def build(cls, ctx: DecoderContext) -> Self:
        """Serves the students loaded beside the engine (:func:`~powerserve.engine.factory.start_students`).

        The parameters model is made per server: ``student`` is a ``Literal`` of the loaded
        names, so an unknown one is a 400 that lists the valid ones.
        """
        if not ctx.settings.distilled:
            raise UnavailableDecoder(HOW_TO_MAKE_ONE)
        students = ctx.students.engines
        if not students:
            raise UnavailableDecoder(ctx.students.error or "no distilled student was loaded")
        choice: Any = Literal.__getitem__(tuple(students))
        params = create_model(
            "DistilledParams",
            __base__=DistilledParams,
            student=(choice | None, Field(None, description=DistilledParams.model_fields["student"].description)),
        )
        per_server: type[Self] = type(cls.__name__, (cls,), {"params_model": params})
        return per_server(ctx.engine, dict(students))

    def variants(self) -> dict[str, dict[str, Any]]:
        """The students (``<model>:distilled:NAME``), default first, with their cards."""
        return {name: spec.card() for name, (spec, _) in self.students.items()}

    def student_for(self, params: DistilledParams) -> str:
        return params.student or self.default

    def metric_label(self, params: DistilledParams) -> str:
        """``distilled:NAME``: each student is its own series (bounded by the --distilled list)."""
        return f"{self.name}:{self.student_for(params)}"

    async def decode(self, request: DecodeRequest[DistilledParams], stats: EngineStats) -> AsyncIterator[TokenStep]:
        student = self.students[self.student_for(request.params)][1]
        async for step in student.generate(request.prompt_ids, request.openai_spec(), stats):
            yield TokenStep(step.token_id, step.logq, None)  # None: serving scores it under the base
