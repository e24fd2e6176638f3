"""Summaries per (task set, decoder): the table, the JSON result and the reward-vs-cost plots.

Per decoder and task set:

- accuracy: share of answers the verifier accepts, with a 95% Wilson interval (n answers);
- self-reward: log p(answer) under the base model, mean and standard deviation over answers,
  both summed over the answer's tokens and per token;
- engine tokens per answer: tokens the engine generated plus tokens it scored, as the server
  reports them (``tokens_generated + tokens_scored``), mean over answers;
- latency p50 / p95: client-side seconds per request; server wall time: the decoder's own
  seconds per answer as the server reports them (``wall_time_s``), mean over answers.

:func:`relative_table` sets every decoder against a baseline decoder (``standard`` by default):
wall time and engine tokens per answer as multiples of the baseline's, next to self-reward and
accuracy; :func:`paired_reward` compares two decoders' self-reward task by task.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from powerserve_client.eval.run import Row


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for k successes in n trials."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in [0, 100])."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(rows: list[Row]) -> list[dict[str, Any]]:
    """One summary per (task set, decoder), in the order they first appear."""
    groups: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        groups.setdefault((r.task_set, r.decoder), []).append(r)
    out = []
    for (task_set, decoder), rs in groups.items():
        ok = [r for r in rs if r.error is None]
        k = sum(r.correct for r in ok)
        lo, hi = wilson(k, len(rs))
        sr_sum, sr_sum_sd = _mean_sd([r.self_reward_sum for r in ok if r.self_reward_sum is not None])
        sr_tok, sr_tok_sd = _mean_sd([r.self_reward_mean for r in ok if r.self_reward_mean is not None])
        latencies = [r.latency_s for r in ok]
        out.append(
            {
                "task_set": task_set,
                "decoder": decoder,
                "n": len(rs),
                "errors": len(rs) - len(ok),
                "correct": k,
                "accuracy": k / len(rs) if rs else None,
                "accuracy_ci95": [lo, hi],
                "self_reward_mean": sr_sum,
                "self_reward_sd": sr_sum_sd,
                "self_reward_per_token_mean": sr_tok,
                "self_reward_per_token_sd": sr_tok_sd,
                "completion_tokens_mean": _mean_sd([float(r.completion_tokens) for r in ok])[0],
                "tokens_generated_mean": _mean_sd([float(r.tokens_generated) for r in ok])[0],
                "tokens_scored_mean": _mean_sd([float(r.tokens_scored) for r in ok])[0],
                "engine_tokens_mean": _mean_sd([float(r.engine_tokens) for r in ok])[0],
                "server_wall_mean_s": _mean_sd([r.server_wall_s for r in ok if r.server_wall_s is not None])[0],
                "latency_p50_s": percentile(latencies, 50),
                "latency_p95_s": percentile(latencies, 95),
            }
        )
    return out


def table(summaries: list[dict[str, Any]]) -> str:
    """A Markdown table (prints well in a terminal and pastes into docs)."""
    head = (
        "| task set | decoder | n | accuracy (95% CI) | self-reward log p (sd) | per token | "
        "engine tokens / answer | answer tokens | latency p50 / p95 s |"
    )
    lines = [head, "|" + "---|" * 9]
    for s in summaries:
        lo, hi = s["accuracy_ci95"]
        errors = f" ({s['errors']} errors)" if s["errors"] else ""
        lines.append(
            f"| {s['task_set']} | {s['decoder']} | {s['n']}{errors} | {_f(s['accuracy'], 3)} ({lo:.2f}-{hi:.2f}) | "
            f"{_f(s['self_reward_mean'], 2)} ({_f(s['self_reward_sd'], 2)}) | "
            f"{_f(s['self_reward_per_token_mean'], 3)} | "
            f"{_f(s['engine_tokens_mean'], 0)} | {_f(s['completion_tokens_mean'], 0)} | "
            f"{_f(s['latency_p50_s'], 2)} / {_f(s['latency_p95_s'], 2)} |"
        )
    return "\n".join(lines)


def relative_table(summaries: list[dict[str, Any]], baseline: str = "standard") -> str:
    """Per task set, every decoder's cost as a multiple of ``baseline``'s (the decoder label,
    or its name before any parameters) next to what it bought. Wall time is the server's
    ``wall_time_s`` (client latency where the server gave none); a task set without the
    baseline gets ``-`` for the multiples."""
    head = (
        "| task set | decoder | wall s / answer | x baseline | engine tokens / answer | x baseline | "
        "self-reward per answer | per token | accuracy |"
    )
    lines = [head, "|" + "---|" * 9]
    for s in summaries:
        base = baseline_summary(summaries, s["task_set"], baseline)
        wall, base_wall = _wall(s), _wall(base) if base else None
        tokens, base_tokens = s["engine_tokens_mean"], base["engine_tokens_mean"] if base else None
        lines.append(
            f"| {s['task_set']} | {s['decoder']} | {_f(wall, 2)} | {_ratio(wall, base_wall)} | {_f(tokens, 0)} | "
            f"{_ratio(tokens, base_tokens)} | {_f(s['self_reward_mean'], 2)} | "
            f"{_f(s['self_reward_per_token_mean'], 3)} | {s['correct']}/{s['n']} |"
        )
    return "\n".join(lines)


def baseline_summary(summaries: list[dict[str, Any]], task_set: str, baseline: str) -> dict[str, Any] | None:
    """The summary of ``baseline`` (a decoder label, or a name before any parameters) in
    ``task_set``; ``None`` if that set has no such decoder."""
    return next(
        (s for s in summaries if s["task_set"] == task_set and baseline in (s["decoder"], s["decoder"].split("(")[0])),
        None,
    )


def _wall(s: dict[str, Any]) -> float | None:
    wall: float | None = s.get("server_wall_mean_s")
    return wall if wall is not None else s["latency_p50_s"]


def _ratio(x: float | None, base: float | None) -> str:
    return "-" if x is None or not base else f"{x / base:.2f}x"


def paired_reward(rows: list[Row], a: str, b: str, task_set: str) -> dict[str, float | int] | None:
    """Self-reward of decoder ``a`` minus decoder ``b`` (labels), paired by task: the mean
    difference of the summed log p, its 95% half-width (normal), and the number of pairs;
    ``None`` with fewer than two pairs."""
    by_task: dict[str, dict[str, float]] = {}
    for r in rows:
        if r.task_set == task_set and r.decoder in (a, b) and r.error is None and r.self_reward_sum is not None:
            by_task.setdefault(r.task_id, {})[r.decoder] = r.self_reward_sum
    diffs = [d[a] - d[b] for d in by_task.values() if a in d and b in d]
    if len(diffs) < 2:
        return None
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    return {"mean": mean, "half_width_95": 1.96 * sd / math.sqrt(len(diffs)), "pairs": len(diffs)}


def _f(v: float | None, digits: int) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def write_json(path: Path, run: dict[str, Any], summaries: list[dict[str, Any]], rows: list[Row]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"run": run, "summary": summaries, "rows": [r.as_dict() for r in rows]}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    tmp.replace(path)


def plot(summaries: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """One PNG per task set: accuracy and self-reward against engine tokens per answer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for task_set in dict.fromkeys(s["task_set"] for s in summaries):
        rows = [s for s in summaries if s["task_set"] == task_set and s["engine_tokens_mean"]]
        if not rows:
            continue
        fig, (ax_acc, ax_sr) = plt.subplots(1, 2, figsize=(11, 4.2))
        ns = sorted({s["n"] for s in rows})  # decoders asked on different numbers of tasks: say so
        for s in rows:
            x = s["engine_tokens_mean"]
            lo, hi = s["accuracy_ci95"]
            acc = s["accuracy"] or 0.0
            label = s["decoder"] if len(ns) == 1 else f"{s['decoder']} (n = {s['n']})"
            ax_acc.errorbar(x, acc, yerr=[[acc - lo], [hi - acc]], fmt="o", capsize=3, label=label)
            if s["self_reward_mean"] is not None:
                se = (s["self_reward_sd"] or 0.0) / math.sqrt(max(1, s["n"] - s["errors"]))
                ax_sr.errorbar(x, s["self_reward_mean"], yerr=se, fmt="o", capsize=3, label=label)
        for ax, ylabel in ((ax_acc, "accuracy (verifier), 95% CI"), (ax_sr, "self-reward: log p(answer), ± s.e.")):
            ax.set_xscale("log")
            ax.set_xlabel("engine tokens per answer (generated + scored)")
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
        ax_acc.set_ylim(-0.02, 1.02)
        ax_sr.legend(fontsize=8, loc="best")
        counts = f"n = {ns[0]} per decoder" if len(ns) == 1 else "n per decoder: " + ", ".join(map(str, ns))
        fig.suptitle(f"{task_set}: reward vs cost per decoder ({counts})")
        fig.tight_layout()
        path = out_dir / f"{task_set}_reward_vs_cost.png"
        out_dir.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
