"""The files of the distillation pipeline: prompt files in, teacher samples out.

Prompt file (JSONL), one prompt per line::

    {"id": "add-1", "messages": [{"role": "user", "content": "What is 7 + 5?"}]}
    {"id": "lm-2", "prompt": "The capital of France is"}

``messages`` are rendered with the model's chat template (generation prompt added), ``prompt``
is used as raw text; ``id`` is optional (default: the line number) and must be unique.

Samples file (JSONL), one teacher sample per line (:func:`sample_record`). It is written by
appending one complete line at a time, flushed and fsynced, so a crash leaves at most one
partial line at the end -- a line without its newline -- which readers drop.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO


class DistillError(Exception):
    """Bad input or state that the user can fix; the CLI prints the message and exits 2."""


# --- prompts -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PromptItem:
    id: str
    prompt: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None  # (role, content)

    def as_json(self) -> str | list[dict[str, str]]:
        if self.messages is not None:
            return [{"role": r, "content": c} for r, c in self.messages]
        assert self.prompt is not None
        return self.prompt

    def token_ids(self, tokenizer: Any) -> list[int]:
        """The prompt as the server would tokenise it (chat template for messages)."""
        if self.messages is not None:
            if not getattr(tokenizer, "chat_template", None):
                raise DistillError(f"prompt {self.id!r} has messages but the model's tokenizer has no chat template")
            text = tokenizer.apply_chat_template(
                [{"role": r, "content": c} for r, c in self.messages], add_generation_prompt=True, tokenize=False
            )
            return list(tokenizer.encode(text, add_special_tokens=False))
        return list(tokenizer.encode(self.prompt))


def read_prompts(path: Path) -> list[PromptItem]:
    """Parse a prompt file; every problem is a :class:`DistillError` naming the line."""
    items: list[PromptItem] = []
    seen: set[str] = set()
    for lineno, obj in _json_lines(path, what="prompt file"):
        items.append(item := _prompt_item(path, lineno, obj))
        if item.id in seen:
            raise DistillError(f"{path}:{lineno}: duplicate prompt id {item.id!r}")
        seen.add(item.id)
    if not items:
        raise DistillError(f"{path} holds no prompts (expected one JSON object per line)")
    return items


def _prompt_item(path: Path, lineno: int, obj: Any) -> PromptItem:
    where = f"{path}:{lineno}"
    if not isinstance(obj, dict):
        raise DistillError(f"{where}: expected a JSON object with 'prompt' or 'messages'")
    pid = str(obj.get("id", lineno))
    if "messages" in obj:
        msgs = obj["messages"]
        ok = (
            isinstance(msgs, list)
            and msgs
            and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in msgs
            )
        )
        if not ok:
            raise DistillError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} strings")
        return PromptItem(pid, messages=tuple((m["role"], m["content"]) for m in msgs))
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise DistillError(f"{where}: expected a non-empty string 'prompt' or a 'messages' list")
    return PromptItem(pid, prompt=prompt)


# --- samples -------------------------------------------------------------------------------------

SAMPLE_KEYS = ("prompt_id", "sample", "prompt_ids", "completion_ids", "decoder", "params", "base")


def sample_key(record: dict[str, Any]) -> tuple[str, int]:
    return str(record["prompt_id"]), int(record["sample"])


def read_samples(path: Path, *, repair: bool = False) -> tuple[list[dict[str, Any]], bool]:
    """Read a samples file: (records, whether a partial last line was dropped).

    A last line without a newline is what a crash in the middle of a write leaves: it is
    dropped (and with ``repair`` cut off the file, so appending continues cleanly). Any other
    malformed line is a :class:`DistillError` naming it.
    """
    if not path.is_file():
        raise DistillError(f"samples file {path} does not exist")
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    truncated = end < len(data)
    if truncated and repair:
        with path.open("r+b") as fh:
            fh.truncate(end)
            fh.flush()
            os.fsync(fh.fileno())
    records = []
    for lineno, obj in _parse_lines(path, data[:end], what="samples file"):
        records.append(_check_sample(path, lineno, obj))
    return records, truncated


def _check_sample(path: Path, lineno: int, obj: Any) -> dict[str, Any]:
    where = f"{path}:{lineno}"
    if not isinstance(obj, dict):
        raise DistillError(f"{where}: expected a JSON object (a teacher sample)")
    missing = [k for k in SAMPLE_KEYS if k not in obj]
    if missing:
        raise DistillError(f"{where}: not a teacher sample: missing {', '.join(missing)}")
    for key in ("prompt_ids", "completion_ids"):
        ids = obj[key]
        if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and t >= 0 for t in ids):
            raise DistillError(f"{where}: '{key}' must be a non-empty list of token ids")
    return obj


def data_sha256(path: Path) -> str:
    """Hash of the complete lines of a samples file (a partial last line does not count)."""
    data = path.read_bytes()
    return hashlib.sha256(data[: data.rfind(b"\n") + 1]).hexdigest()


class SampleWriter:
    """Appends records, one durable line each: write, flush, fsync."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh: BinaryIO = path.open("ab")

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n"
        self._fh.write(line.encode())
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()


# --- shared helpers --------------------------------------------------------------------------------


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Short hash of the vocabulary: two tokenizers with the same one map text to the same ids."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]


def _json_lines(path: Path, what: str) -> Iterator[tuple[int, Any]]:
    if not path.exists():
        raise DistillError(f"{what} {path} does not exist")
    if not path.is_file():
        raise DistillError(f"{what} {path} is not a file")
    yield from _parse_lines(path, path.read_bytes(), what)


def _parse_lines(path: Path, data: bytes, what: str) -> Iterator[tuple[int, Any]]:
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            yield lineno, json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            msg = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8"
            raise DistillError(f"{path}:{lineno}: malformed line in the {what} ({msg})") from None
