"""``powerserve distill teacher`` and ``powerserve distill train``.

Every user-fixable problem is a :class:`DistillError`: printed as ``error: ...`` on stderr with
exit status 2, no traceback. Ctrl-C exits with 130 and keeps every sample already written.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from powerserve.distill.records import DistillError


def add_parser(sub: Any) -> None:
    p = sub.add_parser("distill", help="power self-distillation: teacher samples, then fine-tuning")
    stages = p.add_subparsers(dest="stage", required=True)

    t = stages.add_parser("teacher", help="draw power samples for a prompt file (resumable)")
    t.add_argument("--prompts", type=Path, required=True, help="JSONL: {'id', 'prompt'} or {'id', 'messages'} a line")
    t.add_argument("--out", type=Path, required=True, help="samples JSONL (appended to; a rerun continues)")
    t.add_argument("--decoder", default="power_mcmc", help="a power decoder from the registry (default power_mcmc)")
    t.add_argument("--alpha", type=float, default=4.0, help="power exponent (default 4)")
    t.add_argument(
        "--param", action="append", default=[], metavar="KEY=VALUE", help="another decoder parameter (repeatable)"
    )
    t.add_argument("--samples-per-prompt", type=int, default=1)
    t.add_argument("--max-tokens", type=int, default=256)
    t.add_argument("--seed", type=int, default=0, help="per-sample seeds derive from it and the prompt id")
    t.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    t.add_argument("--concurrency", type=int, default=1, help="samples drawn at once")
    t.add_argument("--model", default=None, help="in-process: base checkpoint dir (default: the embedded model)")
    t.add_argument("--engine", choices=["torch", "vllm", "auto"], default="torch", help="in-process engine")
    t.add_argument("--max-model-len", type=int, default=2048)
    t.add_argument("--server", default=None, help="draw from a running powerserve at this URL instead")
    t.add_argument("--api-key", default=os.environ.get("POWERSERVE_API_KEY"))
    t.add_argument("--tokenizer", default=None, help="HTTP mode: local checkpoint dir with the served tokenizer")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=run_teacher_cmd)

    r = stages.add_parser("train", help="fine-tune the base model on teacher samples")
    r.add_argument("--samples", type=Path, required=True)
    r.add_argument("--out", type=Path, required=True, help="checkpoint directory to create")
    r.add_argument("--base", default=None, help="base checkpoint dir (default: the embedded model)")
    r.add_argument("--overwrite", action="store_true", help="replace a finished checkpoint at --out")
    r.add_argument("--epochs", type=float, default=2.0)
    r.add_argument("--lr", type=float, default=None, help="learning rate (default 5e-5; 2e-4 with --lora)")
    r.add_argument("--batch-size", type=int, default=8)
    r.add_argument("--grad-accum", type=int, default=1)
    r.add_argument("--max-steps", type=int, default=-1, help="stop after N optimiser steps (overrides --epochs)")
    r.add_argument("--warmup-steps", type=int, default=0)
    r.add_argument("--weight-decay", type=float, default=0.0)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--lora", action="store_true", help="train a LoRA adapter (peft), kept as an adapter")
    r.add_argument("--merge", action="store_true", help="with --lora: merge the adapter into a full checkpoint")
    r.add_argument("--lora-r", type=int, default=16)
    r.add_argument("--lora-alpha", type=int, default=32)
    r.add_argument("--no-progress", action="store_true")
    r.set_defaults(func=run_train_cmd)


def run_teacher_cmd(ns: argparse.Namespace) -> int:
    from powerserve.distill.teacher import TeacherConfig, run_teacher

    def go() -> int:
        params: dict[str, Any] = {"alpha": ns.alpha, **_params(ns.param)}
        cfg = TeacherConfig(
            prompts=ns.prompts,
            out=ns.out,
            decoder=ns.decoder,
            params=params,
            samples_per_prompt=ns.samples_per_prompt,
            max_tokens=ns.max_tokens,
            seed=ns.seed,
            concurrency=ns.concurrency,
            limit=ns.limit,
            model=ns.model,
            engine=ns.engine,
            max_model_len=ns.max_model_len,
            server=ns.server,
            api_key=ns.api_key,
            tokenizer=ns.tokenizer,
        )
        summary = asyncio.run(run_teacher(cfg, progress=not ns.no_progress))
        if summary.dropped_partial_line:
            print(f"dropped a partial last line of {ns.out} (an interrupted run)", file=sys.stderr)
        total = summary.already_done + summary.drawn
        print(f"{ns.out}: {total} samples for {summary.prompts} prompts ({summary.drawn} drawn now)")
        return 0

    return _guard(
        go,
        f"interrupted: the samples already in {ns.out} are kept; rerun the same command to continue",
        not ns.no_progress,
    )


def run_train_cmd(ns: argparse.Namespace) -> int:
    from powerserve.distill.train import TrainConfig, train

    def go() -> int:
        cfg = TrainConfig(
            samples=ns.samples,
            out=ns.out,
            base=ns.base,
            overwrite=ns.overwrite,
            epochs=ns.epochs,
            lr=ns.lr if ns.lr is not None else (2e-4 if ns.lora else 5e-5),
            batch_size=ns.batch_size,
            grad_accum=ns.grad_accum,
            max_steps=ns.max_steps,
            warmup_steps=ns.warmup_steps,
            weight_decay=ns.weight_decay,
            seed=ns.seed,
            lora=ns.lora,
            lora_r=ns.lora_r,
            lora_alpha=ns.lora_alpha,
            merge=ns.merge,
        )
        manifest = train(cfg, progress=not ns.no_progress)
        summary = {"checkpoint": str(ns.out), "final_loss": manifest.final_loss, "steps": manifest.training["steps"]}
        print(json.dumps(summary))
        print(f"serve it with: powerserve serve --distilled {ns.out}")
        return 0

    return _guard(go, f"interrupted: nothing was written to {ns.out}", not ns.no_progress)


def _guard(fn: Any, interrupted: str, progress: bool) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    # SIGTERM (a plain `kill`) stops like Ctrl-C: written samples stay, temporary files go.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        code: int = fn()
        return code
    except DistillError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _params(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise DistillError(f"--param {item!r}: expected KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out
