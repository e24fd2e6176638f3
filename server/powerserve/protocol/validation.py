"""Which pydantic validation error a 400 reports, and its OpenAI ``param``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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
