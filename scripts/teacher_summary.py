"""Summarise a teacher samples file: counts, lengths, self-reward, cost and the teacher's accuracy.

    python scripts/teacher_summary.py docs/experiments/distill-smc/samples.jsonl \\
        --prompts docs/experiments/distill-smc/prompts.jsonl

Accuracy uses the prompt file's ``answer`` field (the arithmetic generator writes it) and the
arithmetic grader (last ``\\boxed{}`` number, else the last number). Self-reward is the record's
``log p`` under the base model; cost is its engine tokens (generated + scored).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from powerserve_client.eval.tasks import final_number


def summarise(samples: Path, prompts: Path | None) -> dict[str, float | int]:
    answers: dict[str, str] = {}
    if prompts is not None:
        for line in prompts.open():
            item = json.loads(line)
            if "answer" in item:
                answers[str(item["id"])] = str(item["answer"])
    rows = [json.loads(line) for line in samples.open() if line.endswith("\n")]
    if not rows:
        return {"samples": 0}
    tokens = [r["self_reward"]["tokens"] for r in rows]
    graded = [r for r in rows if r["prompt_id"] in answers]
    right = sum(1 for r in graded if final_number(r["completion"]) == float(answers[r["prompt_id"]]))
    engine = [r["cost"]["tokens_generated"] + r["cost"]["tokens_scored"] for r in rows]
    return {
        "samples": len(rows),
        "finished_eos": sum(1 for r in rows if r["finish_reason"] == "stop"),
        "mean_tokens": statistics.fmean(tokens),
        "self_reward_per_answer": statistics.fmean(r["self_reward"]["sum_logprob"] for r in rows),
        "self_reward_per_token": sum(r["self_reward"]["sum_logprob"] for r in rows) / max(sum(tokens), 1),
        "engine_tokens_per_sample": statistics.fmean(engine),
        "engine_tokens_per_answer_token": sum(engine) / max(sum(tokens), 1),
        "graded": len(graded),
        "teacher_correct": right,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("samples", type=Path)
    ap.add_argument("--prompts", type=Path, default=None)
    ns = ap.parse_args(argv)
    print(json.dumps(summarise(ns.samples, ns.prompts), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
