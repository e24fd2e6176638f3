"""Which token ids end a sequence: one rule for every engine.

The end-of-sequence ids are the union of ``eos_token_id`` over the model config and the
generation config (each an int, a list of ints or absent); only when neither names one, the
tokenizer's ``eos_token_id``. Instruction-tuned checkpoints often list their end-of-turn token
(``<|im_end|>``) in the generation config only, and their tokenizer's EOS in the model config:
both end a sequence.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from typing import Any


def eos_token_ids(configs: Iterable[Any], tokenizer: Any) -> frozenset[int]:
    """The rule above over already-loaded ``configs`` (objects with an optional ``eos_token_id``;
    None entries are skipped) and ``tokenizer`` (may be None)."""
    ids: set[int] = set()
    for config in configs:
        ids |= _as_ids(getattr(config, "eos_token_id", None))
    if not ids:
        ids = _as_ids(getattr(tokenizer, "eos_token_id", None))
    return frozenset(ids)


def eos_token_ids_at(path: str, tokenizer: Any) -> frozenset[int]:
    """The rule above for the checkpoint at ``path`` (a directory or hub name), reading its
    ``config.json`` and, if there is one, its ``generation_config.json``."""
    from transformers import AutoConfig, GenerationConfig

    configs: list[Any] = [AutoConfig.from_pretrained(path)]
    with contextlib.suppress(OSError):  # no generation_config.json
        configs.append(GenerationConfig.from_pretrained(path))
    return eos_token_ids(configs, tokenizer)


def _as_ids(value: int | Sequence[int] | None) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, int):
        return {value}
    return {int(v) for v in value}
