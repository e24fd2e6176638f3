"""The students named by ``--distilled [NAME=]PATH``: what each is, checked before the engine starts.

A student is either

- a LoRA adapter (a directory with ``adapter_config.json``, written by ``distill train --lora``):
  served on the base model's own vLLM engine, one ``LoRARequest`` per request, so its requests
  batch with the base model's and it costs no second copy of the weights; or
- a full checkpoint (``config.json``): loaded on the torch engine beside the base, as before.

Loading them is the engines' business (:func:`powerserve.engine.factory.start_students`).

Checks happen at start-up, never at request time:

1. Names are unique and alias-safe (``[A-Za-z0-9_.-]+``: ``<model>:distilled:NAME`` must parse);
   an unnamed student is named after its directory.
2. An adapter must have been trained on the served base: the base path recorded in its
   ``adapter_config.json`` (and in the manifest, when there is one) must be the served model's
   checkpoint, else :class:`StudentError` stops the server with both paths in the message.
3. Adapters may adapt the layers' projections only (not the output head or the embeddings);
   their ranks set the engine's ``max_lora_rank``, their modules its ``lora_target_modules``.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
# Adapted modules vLLM wraps in its LoRA logits processor, whose CPU punica path fails on the
# per-token logits of prompt log-probabilities (vLLM 0.32): refused, and kept out of
# ``lora_target_modules`` so the base scoring pass works with LoRA enabled.
UNSCORABLE_MODULES = frozenset({"lm_head", "embed_tokens"})
# The ranks vLLM accepts for ``max_lora_rank`` (vllm.config.lora.MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class StudentError(RuntimeError):
    """A ``--distilled`` student the server must refuse to start with (the message says why)."""


@dataclass(frozen=True, slots=True)
class StudentSpec:
    """One ``--distilled`` entry, read from disk but not loaded."""

    name: str
    path: Path
    kind: Literal["lora", "full"]
    alpha: float | None = None  # the teacher's power exponent, from the manifest
    teacher: str | None = None  # the teacher decoder, from the manifest
    base: str | None = None  # the base checkpoint the student was trained on
    rank: int | None = None  # LoRA rank
    modules: tuple[str, ...] = ()  # LoRA target modules (peft names, e.g. q_proj)

    def card(self) -> dict[str, Any]:
        """What /v1/decoders and /v1/models show about the student."""
        return {
            "name": self.name,
            "kind": self.kind,
            "alpha": self.alpha,
            "teacher": self.teacher,
            "base": self.base,
            "path": str(self.path),
        }


def parse_spec(entry: str) -> tuple[str | None, Path]:
    """``NAME=PATH`` -> (NAME, PATH); ``PATH`` -> (None, PATH). A ``=`` after a ``/`` belongs to the path."""
    name, sep, rest = entry.partition("=")
    if sep and name and "/" not in name:
        if not NAME_RE.match(name):
            raise StudentError(f"--distilled {entry}: a student name may hold only letters, digits, '_', '.', '-'")
        return name, Path(rest).expanduser()
    return None, Path(entry).expanduser()


def read_specs(entries: list[str], base_path: Callable[[], str]) -> list[StudentSpec]:
    """Every ``--distilled`` entry as a :class:`StudentSpec`; raises :class:`StudentError` for a bad
    name, a duplicate, or an adapter trained on another base than ``base_path()`` (the served
    checkpoint, asked for only when there is an adapter)."""
    specs: list[StudentSpec] = []
    for entry in entries:
        name, path = parse_spec(entry)
        if name is None:
            name = re.sub(r"[^A-Za-z0-9_.-]", "_", path.name) or "student"
        if any(s.name == name for s in specs):
            raise StudentError(f"--distilled: two students are named '{name}'; name them with NAME=PATH")
        specs.append(_read_one(name, path, base_path))
    return specs


def lora_rank(specs: list[StudentSpec]) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that covers every adapter (0: no adapter)."""
    ranks = [s.rank or 0 for s in specs if s.kind == "lora"]
    if not ranks:
        return 0
    need = max(ranks)
    fit = next((r for r in VLLM_LORA_RANKS if r >= need), None)
    if fit is None:
        raise StudentError(f"--distilled: a LoRA rank of {need} is above vLLM's largest ({VLLM_LORA_RANKS[-1]})")
    return fit


def lora_modules(specs: list[StudentSpec]) -> list[str] | None:
    """The union of the adapters' target modules: vLLM's ``lora_target_modules`` (None: no adapter).

    Naming them keeps vLLM from wrapping modules no adapter uses, the output head included.
    """
    modules = sorted({m for s in specs if s.kind == "lora" for m in s.modules})
    return modules or None


def _read_one(name: str, path: Path, base_path: Callable[[], str]) -> StudentSpec:
    from powerserve.distill.manifest import MANIFEST_NAME, read_manifest
    from powerserve.distill.records import DistillError

    manifest = None
    if (path / MANIFEST_NAME).is_file():
        try:
            manifest = read_manifest(path)
        except DistillError as exc:
            raise StudentError(f"--distilled {name}={path}: {exc}") from None
    alpha = manifest.student.alpha if manifest and manifest.student else None
    teacher = manifest.student.teacher_decoder if manifest and manifest.student else None
    if manifest and teacher is None:  # manifests from before the student block
        teacher = manifest.teacher.get("decoder")
        value = manifest.teacher.get("params", {}).get("alpha")
        alpha = float(value) if isinstance(value, int | float) else None
    adapter_config = path / "adapter_config.json"
    if not adapter_config.is_file():
        # A full checkpoint (or a bad path): loaded, or reported unavailable, as before.
        base = manifest.base.path if manifest else None
        return StudentSpec(name, path, "full", alpha, teacher, base)
    try:
        config = json.loads(adapter_config.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise StudentError(f"--distilled {name}={path}: unreadable adapter_config.json ({exc})") from None
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise StudentError(f"--distilled {name}={path}: a {config.get('peft_type')} adapter, not LoRA")
    served = base_path()
    bases = {str(config.get("base_model_name_or_path") or "")}
    if manifest and manifest.student:
        bases.add(manifest.student.base_checkpoint)
    for trained_on in sorted(bases):
        if not same_checkpoint(trained_on, served):
            raise StudentError(
                f"--distilled {name}={path}: the adapter was trained on the base '{trained_on}', but this "
                f"server serves '{served}'. Serve it with --model {trained_on}, or train an adapter on "
                "this model (`powerserve distill train --lora --base ...`)."
            )
    rank = int(config.get("r", 0) or 0)
    targets = config.get("target_modules") or []
    modules = (targets,) if isinstance(targets, str) else tuple(str(t) for t in targets)
    outside = sorted({m.split(".")[-1] for m in modules} & UNSCORABLE_MODULES)
    if outside or isinstance(targets, str) or config.get("modules_to_save"):
        raise StudentError(
            f"--distilled {name}={path}: the adapter adapts {outside or targets or config.get('modules_to_save')}; "
            "only the transformer layers' projections are served (vLLM's LoRA on the output head breaks the "
            "prompt log-probabilities that score self-reward under the base)"
        )
    return StudentSpec(name, path, "lora", alpha, teacher, served, rank, modules)


def same_checkpoint(a: str, b: str) -> bool:
    """Two references name one checkpoint: the same directory (after resolving) or the same hub name."""
    if not a or not b:
        return False
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.is_dir() and pb.is_dir():
        return pa.resolve() == pb.resolve()
    return a == b
