"""From a validated OpenAI request to a plan of sequences to decode.

Everything a client can get wrong that pydantic cannot see on its own is checked here, before
any engine work starts: the model name (and its ``<model>:<decoder>`` alias), the decoder and
its parameters, prompt length against the context, ``n`` and ``max_tokens`` caps, and the
engine-token ceiling. Each failure is a :class:`BadRequestError` or :class:`NotFoundError`
naming the offending parameter.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from powerserve.decoders.base import Decoder, DecodeRequest, DecoderParams, OpenAISampling
from powerserve.decoders.registry import DECODERS
from powerserve.errors import BadRequestError, NotFoundError
from powerserve.protocol import DecoderChoice, SamplingRequest
from powerserve.serving.state import ServerState


@dataclass(frozen=True, slots=True)
class Plan:
    decoder: Decoder[Any]
    params: DecoderParams
    prompts: list[tuple[int, ...]]
    n: int
    max_tokens: int
    seed: int | None
    sampling: OpenAISampling
    stop: list[str]
    logprobs: int | None  # None: no logprobs; k: the sampled token's and the top k
    timeout_s: float
    weight: float  # admission weight: sequences x the decoder's expected cost per output token

    def sequences(self) -> list[tuple[int, DecodeRequest[DecoderParams]]]:
        """(choice index, request) for each sequence: prompt-major, n per prompt.

        With a seed, choice i uses seed + i, so each choice is reproducible and distinct.
        """
        out = []
        for p, prompt in enumerate(self.prompts):
            for j in range(self.n):
                index = p * self.n + j
                seed = None if self.seed is None else (self.seed + index) % 2**63
                out.append((index, DecodeRequest(prompt, self.max_tokens, seed, self.sampling, self.params)))
        return out


def resolve_model(state: ServerState, model: str, decoder: str | DecoderChoice | None) -> tuple[str, dict[str, Any]]:
    """Return (decoder name, raw decoder parameters) from the model alias and the decoder field."""
    alias_decoder: str | None = None
    alias_raw: dict[str, Any] = {}
    if model != state.model_name:
        base, sep, suffix = model.rpartition(":")
        variant_base, _, decoder_name = base.rpartition(":")
        variant_param = DECODERS[decoder_name].variant_param if decoder_name in DECODERS else None
        if variant_param is not None and variant_base == state.model_name:  # <model>:<decoder>:<variant>
            base, suffix, alias_raw = variant_base, decoder_name, {variant_param: suffix}
        if not sep or base != state.model_name:
            raise NotFoundError(
                f"The model '{model}' does not exist. Served: '{state.model_name}', or "
                f"'{state.model_name}:<decoder>' with a decoder from /v1/decoders.",
                param="model",
                code="model_not_found",
            )
        alias_decoder = suffix
    if isinstance(decoder, DecoderChoice):
        name, raw = decoder.name, decoder.params()
    else:
        name, raw = (decoder or alias_decoder or "standard"), {}
    if alias_decoder is not None and name != alias_decoder:
        raise BadRequestError(
            f"The model alias selects decoder '{alias_decoder}' but the request's decoder is '{name}'.",
            param="decoder",
        )
    for key, value in alias_raw.items():
        if raw.get(key, value) != value:
            raise BadRequestError(
                f"The model alias selects {key} '{value}' but the request's is '{raw[key]}'.", param=f"decoder.{key}"
            )
    return name, {**alias_raw, **raw}


def resolve_decoder(state: ServerState, name: str, raw: dict[str, Any]) -> tuple[Decoder[Any], DecoderParams]:
    if name in state.unavailable:
        raise BadRequestError(f"Decoder '{name}' is not available: {state.unavailable[name]}", param="decoder")
    decoder = state.decoders.get(name)
    if decoder is None:
        valid = ", ".join(sorted([*state.decoders, *state.unavailable]))
        raise BadRequestError(f"Unknown decoder '{name}'. Valid decoders: {valid}.", param="decoder")
    valid = ", ".join(decoder.params_model.model_fields) or "(none)"
    # Unknown names first, by a set difference: validating them would build one error each.
    unknown = raw.keys() - decoder.params_model.model_fields.keys()
    if unknown:
        field = min(unknown)
        raise BadRequestError(
            f"Invalid parameter '{field[:64]}' for decoder '{name}': unknown parameter. "
            f"Parameters of '{name}': {valid}.",
            param=f"decoder.{field[:64]}",
        )
    try:
        params = decoder.params_model.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "decoder"
        raise BadRequestError(
            f"Invalid parameter '{field}' for decoder '{name}': {err['msg']}. Parameters of '{name}': {valid}.",
            param=f"decoder.{field}",
        ) from None
    return decoder, params


def tokenize_prompts(
    state: ServerState, prompt: str | list[str] | list[int] | list[list[int]]
) -> list[tuple[int, ...]]:
    """Token ids of each prompt. Oversized input is refused before the tokenizer (or a scan of
    its ids) spends time on it: too many prompts, a text or id list that cannot fit the context."""
    vocab = _vocab_size(state)
    # The request model admits only homogeneous lists, so the first item tells which kind.
    if isinstance(prompt, str):
        prompts: list[list[int]] = [encode_text(state, prompt, "prompt")]
    elif not prompt:
        raise BadRequestError("prompt must not be empty", param="prompt")
    elif isinstance(prompt[0], int):
        _check_fits(state, len(prompt), "prompt")
        prompts = [list(prompt)]  # type: ignore[arg-type]
    elif len(prompt) > state.settings.max_n:
        raise BadRequestError(f"at most {state.settings.max_n} prompts per request on this server", param="prompt")
    elif isinstance(prompt[0], str):
        prompts = [encode_text(state, p, "prompt") for p in prompt]  # type: ignore[arg-type]
    else:
        prompts = [list(p) for p in prompt]  # type: ignore[arg-type]
    for ids in prompts:
        if not ids:
            raise BadRequestError("prompt must contain at least one token", param="prompt")
        _check_fits(state, len(ids), "prompt")
        if vocab is not None and any(not 0 <= t < vocab for t in ids):
            raise BadRequestError(f"prompt token ids must lie in [0, {vocab})", param="prompt")
    return [tuple(ids) for ids in prompts]


def encode_text(state: ServerState, text: str, param: str, add_special_tokens: bool = True) -> list[int]:
    """Tokenize one prompt text, refusing first what cannot be encoded or cannot fit.

    1. A lone surrogate (a valid JSON escape such as ``\\ud800``, but not Unicode text) is a 400,
       not a tokenizer crash.
    2. No token spans more than L characters (the longest vocabulary entry), so a text of C
       characters has at least C / L tokens. From C >= 4 * L * context it cannot fit (the factor
       4 covers normalisers that shrink text) and is refused without tokenizing: a 20 MB prompt
       would otherwise hold the event loop for about a minute.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequestError(f"{param} is not valid Unicode (it contains a lone surrogate)", param=param) from None
    context = state.engine.max_model_len
    if len(text) >= 4 * context:
        longest = _longest_token_chars(state.tokenizer)
        if len(text) >= 4 * longest * context:
            raise BadRequestError(
                f"This model's maximum context length is {context} tokens; the {param} has {len(text)} "
                f"characters, at least {len(text) // longest} tokens.",
                param=param,
                code="context_length_exceeded",
            )
    return list(state.tokenizer.encode(text, add_special_tokens=add_special_tokens))


def _check_fits(state: ServerState, length: int, param: str) -> None:
    context = state.engine.max_model_len
    if length >= context:
        raise BadRequestError(
            f"This model's maximum context length is {context} tokens; the prompt has {length}.",
            param=param,
            code="context_length_exceeded",
        )


@functools.lru_cache(maxsize=4)
def _longest_token_chars(tokenizer: Any) -> int:
    return max((len(token) for token in tokenizer.get_vocab()), default=1)


def _vocab_size(state: ServerState) -> int | None:
    tok = state.tokenizer
    return len(tok) if tok is not None else None


def build_plan(
    state: ServerState,
    request: SamplingRequest,
    prompts: list[tuple[int, ...]],
    requested_max_tokens: int | None,
    logprobs: int | None,
) -> Plan:
    settings = state.settings
    name, raw = resolve_model(state, request.model, request.decoder)
    decoder, params = resolve_decoder(state, name, raw)
    if request.n > settings.max_n:
        raise BadRequestError(f"n must be at most {settings.max_n} on this server", param="n")
    if len(prompts) * request.n > settings.max_n:
        raise BadRequestError(f"prompts x n must be at most {settings.max_n} on this server", param="n")
    context = state.engine.max_model_len
    longest = max(len(p) for p in prompts)
    _check_fits(state, longest, "prompt")
    if requested_max_tokens is None:
        max_tokens = min(settings.default_max_tokens, context - longest)
    else:
        max_tokens = requested_max_tokens
        if max_tokens > settings.max_tokens_limit:
            raise BadRequestError(
                f"max_tokens must be at most {settings.max_tokens_limit} on this server", param="max_tokens"
            )
        if longest + max_tokens > context:
            raise BadRequestError(
                f"This model's maximum context length is {context} tokens; the prompt ({longest}) plus "
                f"max_tokens ({max_tokens}) exceeds it.",
                param="max_tokens",
                code="context_length_exceeded",
            )
    sequences = len(prompts) * request.n
    expected = decoder.expected_cost(params, max_tokens) * sequences
    if expected > settings.max_engine_tokens_per_request:
        raise BadRequestError(
            f"This request may cost up to {expected:.0f} engine tokens with decoder '{name}'; the server "
            f"allows {settings.max_engine_tokens_per_request} per request. Lower max_tokens, n or the "
            "decoder's step parameters.",
            param="max_tokens",
            code="engine_token_limit",
        )
    timeout_s = settings.request_timeout_s
    if request.timeout is not None:
        timeout_s = min(timeout_s, request.timeout)
    top_k = 0 if request.top_k in (0, -1) else request.top_k
    return Plan(
        decoder=decoder,
        params=params,
        prompts=prompts,
        n=request.n,
        max_tokens=max_tokens,
        seed=request.seed,
        sampling=OpenAISampling(temperature=request.temperature, top_p=request.top_p, top_k=top_k),
        stop=request.stop_list(),
        logprobs=logprobs,
        timeout_s=timeout_s,
        weight=expected / max(max_tokens, 1),  # max_tokens 0: echo scores only
    )
