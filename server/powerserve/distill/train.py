"""Training stage: supervised fine-tuning of the base model on teacher samples.

Maximum likelihood on the teacher's completions, which is what power self-distillation is:
the student is pulled towards p^alpha by imitating samples drawn from it. Training runs in
token ids (the teacher's exact prompt and completion ids; no re-tokenising), with the
prompt tokens' labels set to -100 so the loss is the completion tokens' negative
log-likelihood only. The trainer is transformers' ``Trainer``; ``--lora`` trains a peft LoRA
adapter instead of every weight and keeps it as an adapter directory (``adapter_config.json``,
``adapter_model.safetensors``, the tokenizer, the manifest), which the vLLM engine serves beside
the base model in the same batches; ``--lora --merge`` merges it into an ordinary full
checkpoint that any engine loads.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from powerserve.distill.manifest import (
    MANIFEST_NAME,
    BaseInfo,
    Manifest,
    StudentInfo,
    atomic_checkpoint,
    check_target,
)
from powerserve.distill.records import DistillError, data_sha256, read_samples, tokenizer_fingerprint

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # labels the loss skips (the prompt tokens)


@dataclass(frozen=True, slots=True)
class TrainConfig:
    samples: Path
    out: Path
    base: str | None = None  # checkpoint directory; None: the embedded model
    overwrite: bool = False
    epochs: float = 2.0
    lr: float = 5e-5
    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int = -1  # > 0 overrides epochs
    warmup_steps: int = 0
    weight_decay: float = 0.0
    seed: int = 0
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    merge: bool = False  # with lora: merge the adapter into a full checkpoint


def build_examples(records: list[dict[str, Any]], max_len: int | None) -> list[dict[str, list[int]]]:
    """input_ids = prompt + completion; labels = [-100] * len(prompt) + completion.

    Sequences longer than ``max_len`` lose prompt tokens from the left (the completion is what
    is learned), and are dropped if the completion alone does not fit.
    """
    out = []
    for r in records:
        prompt, completion = list(r["prompt_ids"]), list(r["completion_ids"])
        if max_len is not None and len(prompt) + len(completion) > max_len:
            if len(completion) >= max_len:
                continue
            prompt = prompt[len(prompt) + len(completion) - max_len :]
        out.append(
            {
                "input_ids": prompt + completion,
                "attention_mask": [1] * (len(prompt) + len(completion)),
                "labels": [IGNORE_INDEX] * len(prompt) + completion,
            }
        )
    return out


def check_base(records: list[dict[str, Any]], config: Any, tokenizer: Any, base_ref: str) -> BaseInfo:
    """The samples must come from a model of this architecture with this tokenizer."""
    teachers = {(r["decoder"], repr(sorted(r["params"].items()))) for r in records}
    if len(teachers) > 1:
        raise DistillError(f"the samples were drawn with several decoders or parameter sets: {sorted(teachers)}")
    drawn = BaseInfo.model_validate(records[0]["base"])
    mine = tokenizer_fingerprint(tokenizer)
    if drawn.tokenizer != mine:
        raise DistillError(
            f"the samples were drawn with another tokenizer ({drawn.model}) than the base {base_ref}: "
            "train the model the samples came from"
        )
    model_type = getattr(config, "model_type", None)
    if drawn.model_type is not None and drawn.model_type != model_type:
        raise DistillError(
            f"the samples were drawn from a {drawn.model_type} model ({drawn.model}); the base {base_ref} "
            f"is a {model_type} model"
        )
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    top = max(max(r["prompt_ids"] + r["completion_ids"]) for r in records)
    if vocab and top >= vocab:
        raise DistillError(f"the samples hold token id {top}, beyond the vocabulary ({vocab}) of the base {base_ref}")
    return drawn


def train(cfg: TrainConfig, progress: bool = True) -> Manifest:
    """Fine-tune and write ``cfg.out`` (model, tokenizer, manifest); returns the manifest.

    1. Check the target (a finished checkpoint is not replaced without ``overwrite``) and the
       samples (errors name the line; a partial last line is dropped).
    2. Load the base; check the samples were drawn from a model like it (tokenizer, type).
    3. Train with ``Trainer`` (optionally a LoRA adapter); loss on completion tokens only.
    4. Save (the adapter alone, or merged, or the full model) into a temporary directory with
       the manifest, rename into place. The manifest's ``student`` block records the kind
       (``lora`` or ``full``), the base checkpoint, alpha, the teacher decoder and the data hash.
    """
    check_target(cfg.out, cfg.overwrite)
    records, dropped = read_samples(cfg.samples)
    if dropped:
        log.warning("%s ends with a partial line (an interrupted teacher run); it is ignored", cfg.samples)
    if not records:
        raise DistillError(f"{cfg.samples} holds no samples: run `powerserve distill teacher` first")
    inexact = sum(1 for r in records if r.get("ids_exact") is False)
    if inexact:
        log.warning("skipping %d samples whose token ids could not be recovered exactly (HTTP teacher)", inexact)
        records = [r for r in records if r.get("ids_exact") is not False]
        if not records:
            raise DistillError(f"no sample of {cfg.samples} has exact token ids: draw them in-process")

    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from powerserve.model_store import ModelNotFoundError, resolve_model

    try:
        path, _ = resolve_model(cfg.base)
    except ModelNotFoundError as exc:
        raise DistillError(str(exc)) from None
    base_ref = cfg.base or "(the embedded model)"
    try:
        config = AutoConfig.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise DistillError(f"cannot load the base {base_ref}: {str(exc).splitlines()[0]}") from None
    drawn = check_base(records, config, tokenizer, base_ref)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    max_len = getattr(config, "max_position_embeddings", None)
    examples = build_examples(records, max_len)
    if not examples:
        raise DistillError("no sample fits the base model's context")

    torch.manual_seed(cfg.seed)
    model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if cfg.lora:
        model = _with_lora(model, cfg)

    with atomic_checkpoint(cfg.out, cfg.overwrite) as tmp:
        started = time.perf_counter()
        result, history = _fit(model, tokenizer, examples, cfg, tmp / ".trainer", progress)
        wall = time.perf_counter() - started
        adapter = cfg.lora and not cfg.merge
        if cfg.lora and cfg.merge:
            model = model.merge_and_unload()
        model.save_pretrained(tmp, safe_serialization=True)  # a peft model saves its adapter only
        tokenizer.save_pretrained(tmp)
        first = records[0]
        first = records[0]
        data_hash = data_sha256(cfg.samples)
        manifest = Manifest(
            created=datetime.now(UTC).isoformat(timespec="seconds"),
            student=StudentInfo(
                kind="lora" if adapter else "full",
                base_checkpoint=str(path),
                alpha=_alpha(first["params"]),
                teacher_decoder=str(first["decoder"]),
                data_sha256=data_hash,
                lora_r=cfg.lora_r if adapter else None,
            ),
            base=BaseInfo(**{**drawn.model_dump(), "path": str(path)}),
            teacher={
                "decoder": first["decoder"],
                "params": first["params"],
                "max_tokens": first.get("max_tokens"),
                "source": first.get("source"),
            },
            data={
                "path": str(cfg.samples),
                "sha256": data_hash,
                "samples": len(records) + inexact,
                "skipped_inexact_ids": inexact,
                "used": len(examples),
                "prompts": len({r["prompt_id"] for r in records}),
                "completion_tokens": sum(len(r["completion_ids"]) for r in records),
            },
            training={
                **{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
                "trainer": "transformers.Trainer",
                "steps": result.global_step,
                "loss": "mean NLL of completion tokens (prompt labels -100)",
                "transformers": transformers.__version__,
                "torch": torch.__version__,
                "wall_time_s": round(wall, 2),
            },
            final_loss=history[-1] if history else None,
            train_loss=float(result.training_loss),
            loss_history=history,
        )
        (tmp / MANIFEST_NAME).write_text(manifest.model_dump_json(indent=2))
    return manifest


def _alpha(params: dict[str, Any]) -> float | None:
    value = params.get("alpha")
    return float(value) if isinstance(value, int | float) else None


def _with_lora(model: Any, cfg: TrainConfig) -> Any:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise DistillError("--lora needs the 'peft' package: pip install peft") from None
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def _fit(
    model: Any, tokenizer: Any, examples: list[dict[str, list[int]]], cfg: TrainConfig, work: Path, progress: bool
) -> tuple[Any, list[float]]:
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(work),
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.lr,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        lr_scheduler_type="linear",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=cfg.seed,
        use_cpu=not _cuda(),
        optim="adamw_torch",
        dataloader_pin_memory=False,
        remove_unused_columns=False,
        disable_tqdm=not progress,
    )
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)
    trainer = Trainer(model=model, args=args, train_dataset=_ListDataset(examples), data_collator=collator)
    result = trainer.train()
    history = [float(e["loss"]) for e in trainer.state.log_history if "loss" in e]
    return result, history


def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


class _ListDataset:
    """A map-style dataset over ready examples (what ``Trainer`` needs: len and getitem)."""

    def __init__(self, items: list[dict[str, list[int]]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.items[i]
