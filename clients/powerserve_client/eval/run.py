"""Running task sets against a powerserve, once per decoder, and keeping one row per answer.

Requests go through ``httpx`` to the OpenAI routes (chat tasks to ``/v1/chat/completions``,
code tasks to ``/v1/completions``), with the decoder in the ``decoder`` field and a seed per
task (``seed + task index``), so a rerun asks the same questions with the same seeds. Each
row keeps what the ``powerserve`` extension says the answer cost and bought, the client-side
latency, and the verifier's verdict. Grading runs in a worker thread (code runs in a
subprocess), so it does not hold up the requests.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import httpx

from powerserve_client.decoders import decoder_label, parse_decoder
from powerserve_client.eval.tasks import Task


@dataclass(slots=True)
class Row:
    task_set: str
    task_id: str
    decoder: str  # label, e.g. power_mcmc(alpha=4,block_size=16)
    correct: bool
    why: str
    text: str
    finish_reason: str | None
    completion_tokens: int
    tokens_generated: int
    tokens_scored: int
    self_reward_sum: float | None  # log p of the answer under the base model
    self_reward_mean: float | None  # per token
    latency_s: float  # client-side, request sent to response read
    server_wall_s: float | None
    error: str | None = None

    @property
    def engine_tokens(self) -> int:
        return self.tokens_generated + self.tokens_scored

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "engine_tokens": self.engine_tokens}


@dataclass(frozen=True, slots=True)
class EvalConfig:
    server: str
    decoders: tuple[str, ...]  # "name:key=value,..." specs
    api_key: str | None = None
    model: str | None = None  # None: the server's model
    max_tokens: dict[str, int] | None = None  # per task set; None: DEFAULT_MAX_TOKENS
    seed: int = 0
    concurrency: int = 1
    request_timeout_s: float = 1800.0


DEFAULT_MAX_TOKENS = {"arithmetic": 96, "humaneval": 192, "math500": 128}


async def server_info(client: httpx.AsyncClient) -> tuple[str, dict[str, dict[str, Any]]]:
    """(model name, decoder cards by name) from /v1/models and /v1/decoders."""
    models = (await _ok(await client.get("/v1/models"))).json()
    model = next(m["id"] for m in models["data"] if ":" not in m["id"])
    cards = (await _ok(await client.get("/v1/decoders"))).json()["data"]
    return model, {c["name"]: c for c in cards}


async def evaluate(
    cfg: EvalConfig,
    task_sets: dict[str, list[Task]],
    on_row: Callable[[Row], None] | None = None,
) -> tuple[list[Row], dict[str, Any]]:
    """Every task of every set with every decoder; returns the rows and a run description."""
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    timeout = httpx.Timeout(cfg.request_timeout_s, connect=10.0)
    async with httpx.AsyncClient(base_url=cfg.server.rstrip("/"), headers=headers, timeout=timeout) as client:
        model, cards = await server_info(client)
        model = cfg.model or model
        specs = cfg.decoders or tuple(n for n, c in cards.items() if c.get("available", True))
        for spec in specs:
            name = decoder_name(spec)
            if name not in cards:
                raise ValueError(f"the server has no decoder {name!r}; it has {', '.join(cards)}")
            if not cards[name].get("available", True):
                raise ValueError(
                    f"decoder {name!r} is unavailable on the server: {cards[name].get('unavailable_reason')}"
                )
        rows: list[Row] = []
        sem = asyncio.Semaphore(max(1, cfg.concurrency))
        for spec in specs:
            extra = parse_decoder(spec)
            for set_name, tasks in task_sets.items():
                max_tokens = (cfg.max_tokens or DEFAULT_MAX_TOKENS).get(set_name, DEFAULT_MAX_TOKENS.get(set_name, 128))

                async def one(i: int, task: Task, extra: dict[str, Any] = extra, max_tokens: int = max_tokens) -> Row:
                    async with sem:
                        row = await ask(client, model, task, extra, max_tokens, cfg.seed + i)
                    if on_row is not None:
                        on_row(row)
                    return row

                async with asyncio.TaskGroup() as group:
                    futures = [group.create_task(one(i, t)) for i, t in enumerate(tasks)]
                rows.extend(f.result() for f in futures)
        run = {
            "server": cfg.server,
            "model": model,
            "decoders": list(specs),
            "seed": cfg.seed,
            "max_tokens": {s: (cfg.max_tokens or DEFAULT_MAX_TOKENS).get(s) for s in task_sets},
            "concurrency": cfg.concurrency,
            "task_sets": {s: len(t) for s, t in task_sets.items()},
        }
        return rows, run


async def ask(
    client: httpx.AsyncClient, model: str, task: Task, extra: dict[str, Any], max_tokens: int, seed: int
) -> Row:
    """One request for one task with one decoder, graded."""
    label = decoder_label(extra)
    body = {"model": model, "max_tokens": max_tokens, "seed": seed, **task.request_body(), **extra}
    route = "/v1/chat/completions" if task.messages is not None else "/v1/completions"
    started = time.perf_counter()
    try:
        resp = await client.post(route, json=body)
        latency = time.perf_counter() - started
        data = (await _ok(resp)).json()
    except (httpx.HTTPError, RuntimeError) as exc:
        return Row(
            task.task_set,
            task.id,
            label,
            False,
            "request failed",
            "",
            None,
            0,
            0,
            0,
            None,
            None,
            time.perf_counter() - started,
            None,
            error=str(exc)[:300],
        )
    choice = data["choices"][0]
    text = choice["message"]["content"] if "message" in choice else choice["text"]
    info = data.get("powerserve") or {}
    reward = info.get("self_reward") or {}
    correct, why = await asyncio.to_thread(task.grade, text or "")
    return Row(
        task_set=task.task_set,
        task_id=task.id,
        decoder=label,
        correct=correct,
        why=why,
        text=text or "",
        finish_reason=choice.get("finish_reason"),
        completion_tokens=int((data.get("usage") or {}).get("completion_tokens", 0)),
        tokens_generated=int(info.get("tokens_generated", 0)),
        tokens_scored=int(info.get("tokens_scored", 0)),
        self_reward_sum=reward.get("sum_logprob"),
        self_reward_mean=reward.get("mean_logprob"),
        latency_s=latency,
        server_wall_s=info.get("wall_time_s"),
    )


def decoder_name(spec: str) -> str:
    choice = parse_decoder(spec)["decoder"]
    return str(choice["name"] if isinstance(choice, dict) else choice)


async def _ok(resp: httpx.Response) -> httpx.Response:
    if resp.status_code != 200:
        try:
            message = resp.json()["error"]["message"]
        except Exception:
            message = resp.text[:300]
        raise RuntimeError(f"{resp.request.method} {resp.request.url.path} answered {resp.status_code}: {message}")
    return resp
