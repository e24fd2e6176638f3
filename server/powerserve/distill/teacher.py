"""Teacher stage: draw power samples for every prompt of a prompt file into a samples file.

The samples come from a decoder of the registry (default ``power_mcmc``, alpha 4), either

- in-process: an engine is started from the settings and the decoder driven directly, which
  keeps the exact token ids the decoder chose; or
- over HTTP from a running powerserve (``--server``): the prompt is sent as token ids to
  ``/v1/completions`` and the ``powerserve`` extension read back. The server returns text, not
  ids, so the completion is re-tokenised and checked token by token against the response's
  ``logprobs.tokens``; a record whose ids could not be confirmed says ``"ids_exact": false``.

Resumption: each sample is one line, appended, flushed and fsynced as soon as it is drawn. A
rerun reads the file, cuts off a partial last line (a crash mid-write), and draws only the
(prompt id, sample index) pairs not yet present. Seeds are derived from (seed, prompt id,
sample index), so a rerun draws what an uninterrupted run would have drawn.
"""

from __future__ import annotations

import abc
import asyncio
import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from powerserve.distill.records import (
    DistillError,
    PromptItem,
    SampleWriter,
    read_prompts,
    read_samples,
    sample_key,
    tokenizer_fingerprint,
)
from powerserve.settings import Settings

DEFAULT_PARAMS: dict[str, Any] = {"alpha": 4.0}


@dataclass(frozen=True, slots=True)
class TeacherConfig:
    prompts: Path
    out: Path
    decoder: str = "power_mcmc"
    params: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_PARAMS))
    samples_per_prompt: int = 1
    max_tokens: int = 256
    seed: int = 0
    concurrency: int = 1
    limit: int | None = None  # only the first N prompts
    # in-process: the base model (None: the embedded one) and its engine
    model: str | None = None
    engine: str = "torch"
    max_model_len: int = 2048
    # over HTTP
    server: str | None = None
    api_key: str | None = None
    tokenizer: str | None = None  # local tokenizer for HTTP mode (default: --model, else embedded)


@dataclass(slots=True)
class Drawn:
    completion_ids: list[int]
    text: str
    finish_reason: str
    self_reward: dict[str, Any]
    cost: dict[str, Any]
    ids_exact: bool = True


def sample_seed(seed: int, prompt_id: str, sample: int) -> int:
    """A per-sample seed that does not depend on the order prompts are drawn in."""
    digest = hashlib.sha256(f"{seed}:{prompt_id}:{sample}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % 2**31


def self_reward(logp: list[float]) -> dict[str, Any]:
    total = math.fsum(logp)
    return {"sum_logprob": total, "mean_logprob": total / len(logp) if logp else None, "tokens": len(logp)}


# --- sources -------------------------------------------------------------------------------------


class Source(abc.ABC):
    tokenizer: Any
    base: dict[str, Any]  # what the samples were drawn from (checked by the training stage)
    params: dict[str, Any]  # the decoder's parameters with defaults filled in

    @abc.abstractmethod
    async def draw(self, prompt_ids: list[int], max_tokens: int, seed: int) -> Drawn: ...

    async def close(self) -> None:  # noqa: B027 (optional hook)
        pass


class InProcessSource(Source):
    """Drives a decoder on an engine started in this process."""

    def __init__(self, engine: Any, decoder: Any, params: Any, base: dict[str, Any]) -> None:
        self.engine, self.decoder, self._params = engine, decoder, params
        self.tokenizer = engine.tokenizer
        self.base = base
        self.params = params.model_dump()

    @classmethod
    async def open(cls, cfg: TeacherConfig) -> InProcessSource:
        from transformers import AutoConfig

        from powerserve.decoders.base import DecoderContext
        from powerserve.engine.factory import start_engine
        from powerserve.model_store import ModelNotFoundError, resolve_model

        decoder_cls, params = resolve_decoder(cfg)
        settings = Settings(model=cfg.model, engine=cfg.engine, max_model_len=cfg.max_model_len)  # type: ignore[arg-type]
        try:
            path, name = resolve_model(cfg.model, settings.cache_dir)
        except ModelNotFoundError as exc:
            raise DistillError(str(exc)) from None
        engine = await start_engine(settings)
        decoder = decoder_cls.build(DecoderContext(engine, settings))
        config = AutoConfig.from_pretrained(path)
        base = {
            "model": name,
            "path": str(path),
            "model_type": getattr(config, "model_type", None),
            "architectures": list(getattr(config, "architectures", None) or []),
            "vocab_size": len(engine.tokenizer),
            "tokenizer": tokenizer_fingerprint(engine.tokenizer),
        }
        return cls(engine, decoder, params, base)

    async def draw(self, prompt_ids: list[int], max_tokens: int, seed: int) -> Drawn:
        from powerserve.decoders.base import DecodeRequest, OpenAISampling
        from powerserve.engine.base import EngineStats

        stats = EngineStats()
        started = time.perf_counter()
        request = DecodeRequest(tuple(prompt_ids), max_tokens, seed, OpenAISampling(), self._params)
        steps = [s async for s in self.decoder.decode(request, stats)]
        ids = [s.token_id for s in steps]
        known = [s.logp for s in steps]
        if all(v is not None for v in known):
            logp = [float(v) for v in known if v is not None]
        else:
            logp = await self.engine.score(prompt_ids, ids, stats)
        cost = {
            "tokens_generated": stats.tokens_generated,
            "tokens_scored": stats.tokens_scored,
            "engine_calls": stats.calls,
            "wall_time_s": round(time.perf_counter() - started, 4),
            "decoder_stats": dict(stats.extra),
        }
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return Drawn(ids, text, self.engine.finish_reason(ids, max_tokens), self_reward(logp), cost)

    async def close(self) -> None:
        await self.engine.shutdown()


def resolve_decoder(cfg: TeacherConfig) -> tuple[Any, Any]:
    """The decoder class and its validated parameters (in-process mode)."""
    from pydantic import ValidationError

    from powerserve.decoders.registry import DECODERS

    decoder_cls = DECODERS.get(cfg.decoder)
    if decoder_cls is None:
        raise DistillError(f"unknown decoder {cfg.decoder!r}; valid: {', '.join(sorted(DECODERS))}")
    try:
        return decoder_cls, decoder_cls.params_model.model_validate(cfg.params)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise DistillError(f"decoder {cfg.decoder}: parameter {'.'.join(map(str, err['loc']))}: {err['msg']}") from None


class HttpSource(Source):
    """Asks a running powerserve for each sample."""

    def __init__(self, client: httpx.AsyncClient, model: str, decoder: str, params: dict[str, Any], tokenizer: Any):
        self.client, self.model, self.decoder = client, model, decoder
        self.params = params
        self.tokenizer = tokenizer
        self._by_string: dict[str, list[int]] | None = None  # decoded token string -> ids
        self.base = {
            "model": model,
            "path": None,
            "model_type": None,
            "architectures": [],
            "vocab_size": len(tokenizer),
            "tokenizer": tokenizer_fingerprint(tokenizer),
        }

    @classmethod
    async def open(cls, cfg: TeacherConfig) -> HttpSource:
        from transformers import AutoTokenizer

        from powerserve.model_store import ModelNotFoundError, resolve_model

        assert cfg.server is not None
        headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
        client = httpx.AsyncClient(base_url=cfg.server.rstrip("/"), headers=headers, timeout=httpx.Timeout(3600.0))
        try:
            models = await _get(client, "/v1/models")
            decoders = {d["name"]: d for d in (await _get(client, "/v1/decoders"))["data"]}
        except BaseException:
            await client.aclose()
            raise
        model = next(m["id"] for m in models["data"] if ":" not in m["id"])
        card = decoders.get(cfg.decoder)
        if card is None or not card.get("available", True):
            await client.aclose()
            why = card.get("unavailable_reason") if card else f"valid: {', '.join(sorted(decoders))}"
            raise DistillError(f"the server cannot run decoder {cfg.decoder!r}: {why}")
        params = {**card.get("defaults", {}), **cfg.params}
        try:
            path, _ = resolve_model(cfg.tokenizer or cfg.model)
        except ModelNotFoundError as exc:
            await client.aclose()
            raise DistillError(f"HTTP mode needs the served model's tokenizer locally: {exc}") from None
        return cls(client, model, cfg.decoder, params, AutoTokenizer.from_pretrained(path))

    async def draw(self, prompt_ids: list[int], max_tokens: int, seed: int) -> Drawn:
        body = {
            "model": self.model,
            "prompt": prompt_ids,
            "max_tokens": max_tokens,
            "seed": seed,
            "logprobs": 0,
            "decoder": {"name": self.decoder, **self.params},
        }
        started = time.perf_counter()
        resp = await self.client.post("/v1/completions", json=body)
        if resp.status_code != 200:
            raise DistillError(f"the server answered {resp.status_code}: {_error_message(resp)}")
        data = resp.json()
        choice, info = data["choices"][0], data["powerserve"]
        ids, exact = self._token_ids(choice)
        cost = {
            "tokens_generated": info["tokens_generated"],
            "tokens_scored": info["tokens_scored"],
            "engine_calls": info["engine_calls"],
            "wall_time_s": round(time.perf_counter() - started, 4),
            "decoder_stats": info.get("decoder_stats", {}),
        }
        return Drawn(ids, choice["text"], choice["finish_reason"], info["self_reward"], cost, exact)

    def _token_ids(self, choice: dict[str, Any]) -> tuple[list[int], bool]:
        """The completion's token ids, and whether they are surely the ones the server sampled.

        1. Re-tokenise the text (plus the end-of-sequence token when it stopped); exact when
           each id decodes to the server's per-token string.
        2. Else map each per-token string back through the vocabulary; exact when every one
           of them is the decoding of a single id.
        3. Else keep the re-tokenised ids, marked inexact (the training stage skips them).
        """
        tok = self.tokenizer
        tokens: list[str] = (choice.get("logprobs") or {}).get("tokens") or []
        ids = list(tok.encode(choice["text"], add_special_tokens=False))
        if len(tokens) == len(ids) + 1 and choice["finish_reason"] == "stop":
            ids.append(int(tok.convert_tokens_to_ids(tokens[-1])))  # the end-of-sequence token
        if len(ids) == len(tokens) and all(tok.decode([i]) == s for i, s in zip(ids, tokens, strict=True)):
            return ids, True
        if self._by_string is None:
            by_string: dict[str, list[int]] = {}
            for i in range(len(tok)):
                by_string.setdefault(tok.decode([i]), []).append(i)
            self._by_string = by_string
        mapped = [self._by_string.get(s, []) for s in tokens]
        if tokens and all(len(m) == 1 for m in mapped):
            return [m[0] for m in mapped], True
        return ids, False

    async def close(self) -> None:
        await self.client.aclose()


async def _get(client: httpx.AsyncClient, path: str) -> Any:
    try:
        resp = await client.get(path)
    except httpx.HTTPError as exc:
        raise DistillError(f"cannot reach the server at {client.base_url}: {exc}") from None
    if resp.status_code != 200:
        raise DistillError(f"GET {path} answered {resp.status_code}: {_error_message(resp)}")
    return resp.json()


def _error_message(resp: httpx.Response) -> str:
    try:
        return str(resp.json()["error"]["message"])
    except Exception:
        return resp.text[:300]


# --- the stage -------------------------------------------------------------------------------------


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
