"""Teacher samples over HTTP from a running powerserve (``--server``).

The prompt is sent as token ids to ``/v1/completions`` and the ``powerserve`` extension read
back. The server returns text, not ids, so the completion is re-tokenised and checked token by
token against the response's ``logprobs.tokens``; a record whose ids could not be confirmed
says ``"ids_exact": false``.
"""

from __future__ import annotations

import time
from typing import Any

import httpx

from powerserve.distill.records import (
    DistillError,
    tokenizer_fingerprint,
)
from powerserve.distill.sources import Drawn, Source
from powerserve.distill.teacher_config import TeacherConfig


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
