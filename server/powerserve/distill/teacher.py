"""Teacher stage: draw power samples for every prompt of a prompt file into a samples file.

The samples come from a decoder of the registry (default ``power_mcmc``, alpha 4), either
in-process (``sources.InProcessSource``: exact token ids) or over HTTP from a running
powerserve (``--server``; ``http_source.HttpSource``: ids re-tokenised and checked).

Resumption: each sample is one line, appended, flushed and fsynced as soon as it is drawn. A
rerun reads the file, cuts off a partial last line (a crash mid-write), and draws only the
(prompt id, sample index) pairs not yet present. Seeds are derived from (seed, prompt id,
sample index), so a rerun draws what an uninterrupted run would have drawn.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from powerserve.distill.http_source import HttpSource
from powerserve.distill.records import (
    DistillError,
    PromptItem,
    SampleWriter,
    read_prompts,
    read_samples,
    sample_key,
)
from powerserve.distill.sources import InProcessSource, Source, resolve_decoder
from powerserve.distill.teacher_config import DEFAULT_PARAMS, TeacherConfig

__all__ = ["DEFAULT_PARAMS", "TeacherConfig", "TeacherSummary", "run_teacher", "sample_seed"]


def sample_seed(seed: int, prompt_id: str, sample: int) -> int:
    """A per-sample seed that does not depend on the order prompts are drawn in."""
    digest = hashlib.sha256(f"{seed}:{prompt_id}:{sample}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % 2**31


@dataclass(slots=True)
class TeacherSummary:
    prompts: int
    already_done: int
    drawn: int
    dropped_partial_line: bool


async def run_teacher(cfg: TeacherConfig, progress: bool = True) -> TeacherSummary:
    """Draw every missing (prompt, sample) pair; see the module docstring for resumption.

    1. Read the prompts (errors name the line) and the existing samples, cutting off a
       partial last line.
    2. Refuse to mix: existing samples drawn with another decoder or parameters are an error.
    3. Open the source, then draw the missing pairs ``concurrency`` at a time, appending each
       as one durable line the moment it is drawn.
    """
    items = read_prompts(cfg.prompts)
    if cfg.limit is not None:
        items = items[: cfg.limit]
    if cfg.samples_per_prompt < 1:
        raise DistillError("--samples-per-prompt must be at least 1")
    existing: list[dict[str, Any]] = []
    dropped = False
    if cfg.out.exists():
        existing, dropped = read_samples(cfg.out, repair=True)
    done = {sample_key(r) for r in existing}
    todo = [(i, item, j) for i, item in enumerate(items) for j in range(cfg.samples_per_prompt)]
    todo = [(i, item, j) for i, item, j in todo if (item.id, j) not in done]
    summary = TeacherSummary(len(items), len(items) * cfg.samples_per_prompt - len(todo), 0, dropped)
    if not todo:
        return summary

    if not cfg.server:  # fail before loading a model when the parameters cannot continue the file
        _check_same_teacher(cfg, existing, resolve_decoder(cfg)[1].model_dump(), None)
    source: Source = await (HttpSource.open(cfg) if cfg.server else InProcessSource.open(cfg))
    try:
        _check_same_teacher(cfg, existing, source.params, source.base)
        writer = SampleWriter(cfg.out)
        try:
            with tqdm(
                total=len(items) * cfg.samples_per_prompt,
                initial=summary.already_done,
                desc=f"teacher {cfg.decoder}",
                unit="sample",
                disable=not progress,
            ) as bar:
                await _draw_all(cfg, source, todo, writer, bar, summary)
        finally:
            writer.close()
    finally:
        await source.close()
    return summary


async def _draw_all(
    cfg: TeacherConfig,
    source: Source,
    todo: list[tuple[int, PromptItem, int]],
    writer: SampleWriter,
    bar: tqdm[Any],
    summary: TeacherSummary,
) -> None:
    sem = asyncio.Semaphore(max(1, cfg.concurrency))
    prompt_ids = {item.id: item.token_ids(source.tokenizer) for _, item, _ in todo}

    async def one(item: PromptItem, j: int) -> None:
        async with sem:
            seed = sample_seed(cfg.seed, item.id, j)
            drawn = await source.draw(prompt_ids[item.id], cfg.max_tokens, seed)
        writer.write(
            {
                "prompt_id": item.id,
                "sample": j,
                "prompt": item.as_json(),
                "prompt_ids": prompt_ids[item.id],
                "completion_ids": drawn.completion_ids,
                "completion": drawn.text,
                "finish_reason": drawn.finish_reason,
                "ids_exact": drawn.ids_exact,
                "decoder": cfg.decoder,
                "params": source.params,
                "max_tokens": cfg.max_tokens,
                "seed": seed,
                "self_reward": drawn.self_reward,
                "cost": drawn.cost,
                "base": source.base,
                "source": cfg.server or "in-process",
            }
        )
        summary.drawn += 1
        bar.update(1)

    try:
        async with asyncio.TaskGroup() as group:
            for _, item, j in todo:
                group.create_task(one(item, j))
    except ExceptionGroup as errors:
        # One failed draw stops the stage (the others are cancelled): report its error.
        raise errors.exceptions[0] from None


def _check_same_teacher(
    cfg: TeacherConfig, existing: list[dict[str, Any]], params: dict[str, Any], base: dict[str, Any] | None
) -> None:
    if not existing:
        return
    first = existing[0]
    if first["decoder"] != cfg.decoder or first["params"] != params:
        raise DistillError(
            f"{cfg.out} holds samples drawn with {first['decoder']} {first['params']}, not "
            f"{cfg.decoder} {params}: use another --out, or the same decoder and parameters to continue"
        )
    if base is not None and first["base"].get("tokenizer") != base["tokenizer"]:
        raise DistillError(
            f"{cfg.out} holds samples of another model ({first['base'].get('model')}): use another --out"
        )
