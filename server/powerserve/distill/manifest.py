"""The manifest of a distilled checkpoint, and writing checkpoints atomically.

A checkpoint directory is built in a temporary sibling and renamed into place only when the
model, the tokenizer, the manifest and the completion marker are all written, so a directory
with the marker is always whole. A finished checkpoint is never replaced unless asked.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from powerserve.distill.records import DistillError
from powerserve.model_store import COMPLETE_MARKER, is_complete

MANIFEST_NAME = "powerserve-distill.json"
FORMAT = "powerserve-distilled/1"


class BaseInfo(BaseModel):
    """The model the teacher samples came from."""

    model_config = ConfigDict(extra="allow")

    model: str
    path: str | None = None
    model_type: str | None = None
    architectures: list[str] = []
    vocab_size: int
    tokenizer: str  # tokenizer_fingerprint


class StudentInfo(BaseModel):
    """What a server needs to know about a student: what it is and what it was trained from.

    ``kind`` is ``lora`` for an unmerged adapter (served on the base model's vLLM engine) and
    ``full`` for an ordinary checkpoint. ``base_checkpoint`` is the path of the base the
    student was trained on: a server refuses an adapter whose base is not the served model.
    """

    model_config = ConfigDict(extra="allow")

    kind: Literal["lora", "full"]
    base_checkpoint: str
    alpha: float | None  # the teacher's power exponent
    teacher_decoder: str
    data_sha256: str
    lora_r: int | None = None


class Manifest(BaseModel):
    model_config = ConfigDict(extra="allow")

    format: str = FORMAT
    created: str
    student: StudentInfo | None = None  # None in manifests written before adapters were kept
    base: BaseInfo
    teacher: dict[str, Any]  # decoder, params, max_tokens, source
    data: dict[str, Any]  # path, sha256, samples, prompts, completion_tokens
    training: dict[str, Any]  # trainer, epochs, lr, batch size, LoRA, steps, versions, wall time
    final_loss: float | None
    train_loss: float | None
    loss_history: list[float] = []


def read_manifest(checkpoint: Path) -> Manifest:
    path = checkpoint / MANIFEST_NAME
    if not path.is_file():
        raise DistillError(f"{checkpoint} is not a distilled checkpoint (no {MANIFEST_NAME})")
    try:
        return Manifest.model_validate(json.loads(path.read_text()))
    except (json.JSONDecodeError, ValidationError) as exc:
        raise DistillError(f"{path} is not a valid manifest: {str(exc).splitlines()[0]}") from None


def check_target(out: Path, overwrite: bool) -> None:
    """Refuse to write over a finished checkpoint (unless ``overwrite``) or over a directory
    that is not one of ours."""
    if not out.exists():
        return
    if not out.is_dir():
        raise DistillError(f"{out} exists and is not a directory")
    if overwrite:
        return
    if is_complete(out):
        raise DistillError(f"{out} is a finished checkpoint; choose another --out or pass --overwrite")
    if any(out.iterdir()):
        raise DistillError(f"{out} exists and is not empty; choose another --out or pass --overwrite")


@contextmanager
def atomic_checkpoint(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary directory to fill; on success it becomes ``out`` (with the marker)."""
    check_target(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        (tmp / COMPLETE_MARKER).write_text(json.dumps({"manifest": MANIFEST_NAME}))
        check_target(out, overwrite)  # the training took a while: look again
        if out.exists():
            old = out.with_name(f".{out.name}.old-{tmp.name[-8:]}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
