"""powerserve extension: the ``decoder`` request field (a name, or a name with parameters)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from powerserve.protocol.bounds import MAX_DECODER_PARAMS, MAX_NAME_CHARS

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
