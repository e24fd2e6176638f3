"""Choose a distillation schedule on a held-out split of the teacher samples.

    python scripts/distill_schedule.py --samples samples.jsonl --work sched \\
        --candidate lr=2e-4,epochs=1 --candidate lr=5e-4,epochs=1 --candidate lr=5e-4,epochs=2

1. Split: a sample is held out when ``sha256(prompt_id) mod 100 < heldout_pct`` (10 by default),
   so the split is stable while the samples file grows; writes ``train.jsonl``, ``heldout.jsonl``.
2. Each candidate trains a LoRA adapter on ``train.jsonl`` with ``powerserve distill train --lora``
   (every other setting as the CLI's defaults unless the candidate names it: ``lr``, ``epochs``,
   ``warmup``, ``batch``).
3. Each adapter, and the base model without one, is scored by the held-out loss: the mean
   negative log-likelihood of the held-out completion tokens given their prompts (the training
   objective, on samples it never saw), ``sum_i sum_t -log q(c_it | prompt_i, c_i<t) / sum_i |c_i|``.
4. ``schedule.json`` lists every candidate's held-out loss and names the lowest.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any


def split(samples: Path, work: Path, heldout_pct: int) -> tuple[Path, Path, int, int]:
    """Step 1; returns the two files and their sizes."""
    train, held = work / "train.jsonl", work / "heldout.jsonl"
    n_train = n_held = 0
    with samples.open() as src, train.open("w") as tr, held.open("w") as he:
        for line in src:
            if not line.endswith("\n"):
                break  # a partial last line of an interrupted teacher run
            pid = str(json.loads(line)["prompt_id"])
            bucket = int(hashlib.sha256(pid.encode()).hexdigest(), 16) % 100
            if bucket < heldout_pct:
                he.write(line)
                n_held += 1
            else:
                tr.write(line)
                n_train += 1
    return train, held, n_train, n_held


def parse_candidate(spec: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for part in spec.split(","):
        key, _, value = part.partition("=")
        if key not in {"lr", "epochs", "warmup", "batch"}:
            raise SystemExit(f"candidate {spec!r}: unknown key {key!r} (lr, epochs, warmup, batch)")
        out[key] = float(value)
    return out


def train_candidate(train: Path, out: Path, cand: dict[str, float], log: Path) -> None:
    """Step 2 (skipped when ``out`` already holds a finished adapter: the script resumes)."""
    if (out / "adapter_config.json").exists():
        return
    cmd = [sys.executable, "-m", "powerserve.cli", "distill", "train", "--samples", str(train), "--out", str(out)]
    cmd += ["--lora", "--no-progress", "--lr", str(cand.get("lr", 2e-4)), "--epochs", str(cand.get("epochs", 2))]
    cmd += ["--warmup-steps", str(int(cand.get("warmup", 0))), "--batch-size", str(int(cand.get("batch", 8)))]
    with log.open("w") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT)


def heldout_loss(adapter: Path | None, held: Path) -> tuple[float, int]:
    """Step 3: (mean NLL per held-out completion token, number of tokens)."""
    import torch
    from transformers import AutoModelForCausalLM

    from powerserve.distill.records import read_samples
    from powerserve.model_store import resolve_model

    path, _ = resolve_model(None)
    model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    records, _ = read_samples(held)
    total, count = 0.0, 0
    with torch.no_grad():
        for r in records:
            prompt, completion = list(r["prompt_ids"]), list(r["completion_ids"])
            ids = torch.tensor([prompt + completion])  # [1, S]
            logits = model(input_ids=ids).logits[0, :-1]  # [S-1, V]: position t predicts token t+1
            logp = torch.log_softmax(logits.float(), dim=-1)
            picked = logp.gather(1, ids[0, 1:, None])[:, 0][len(prompt) - 1 :]  # the completion's tokens
            total += float(-picked.sum())
            count += len(completion)
    return total / max(count, 1), count


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--heldout-pct", type=int, default=10)
    ap.add_argument("--candidate", action="append", required=True, help="lr=..,epochs=..[,warmup=..,batch=..]")
    ns = ap.parse_args(argv)
    ns.work.mkdir(parents=True, exist_ok=True)
    train, held, n_train, n_held = split(ns.samples, ns.work, ns.heldout_pct)
    print(f"split: {n_train} train, {n_held} held out", flush=True)
    base_loss, tokens = heldout_loss(None, held)
    rows: list[dict[str, Any]] = []
    for spec in ns.candidate:
        cand = parse_candidate(spec)
        name = "cand-" + spec.replace(",", "_").replace("=", "")
        out = ns.work / name
        train_candidate(train, out, cand, ns.work / f"{name}.log")
        loss, _ = heldout_loss(out, held)
        rows.append({"candidate": spec, "adapter": str(out), "heldout_nll": loss, "heldout_ppl": math.exp(loss)})
        print(json.dumps(rows[-1]), flush=True)
    best = min(rows, key=lambda r: float(r["heldout_nll"]))
    report = {
        "samples": str(ns.samples),
        "train": n_train,
        "heldout": n_held,
        "heldout_tokens": tokens,
        "base_heldout_nll": base_loss,
        "candidates": rows,
        "best": best["candidate"],
    }
    (ns.work / "schedule.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({"best": best, "base_heldout_nll": base_loss}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
