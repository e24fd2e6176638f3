"""Choosing a decoder from the openai SDK.

powerserve reads the decoder from the request's ``decoder`` field, which the SDK sends through
``extra_body``::

    client.chat.completions.create(model=m, messages=msgs, extra_body=power_mcmc(alpha=4))

Parameters left as ``None`` are not sent, so the server's defaults apply
(``GET /v1/decoders`` lists them).
"""

from __future__ import annotations

from typing import Any

Param = float | int | str | bool


def decoder(name: str, **params: Param | None) -> dict[str, Any]:
    """``extra_body`` choosing decoder ``name`` with ``params`` (``None`` values omitted)."""
    if not name:
        raise ValueError("decoder name must not be empty")
    given = {k: v for k, v in params.items() if v is not None}
    return {"decoder": {"name": name, **given} if given else name}


def standard() -> dict[str, Any]:
    """Plain sampling from the model (temperature, top_p and top_k as in the request)."""
    return decoder("standard")


def temperature(alpha: float | None = None) -> dict[str, Any]:
    """Token-level sampling at temperature 1/alpha (the cheap approximation of p^alpha)."""
    return decoder("temperature", alpha=alpha)


def power_mcmc(
    alpha: float | None = None,
    block_size: int | None = None,
    mcmc_steps: int | None = None,
    proposals: int | None = None,
) -> dict[str, Any]:
    """Metropolis-Hastings sampling from p(x)^alpha: ``mcmc_steps`` resampling steps after each
    block of ``block_size`` tokens, each drawing ``proposals`` candidate suffixes together.
    Costs several times the tokens of plain sampling."""
    return decoder("power_mcmc", alpha=alpha, block_size=block_size, mcmc_steps=mcmc_steps, proposals=proposals)


def parse_decoder(spec: str) -> dict[str, Any]:
    """``"power_mcmc:alpha=4,block_size=32"`` -> ``extra_body`` for that decoder. Values are
    read as int, then float, then true/false, else kept as text."""
    name, _, rest = spec.partition(":")
    params: dict[str, Param | None] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"decoder {spec!r}: expected name:key=value,key=value")
        params[key.strip()] = _value(value.strip())
    return decoder(name.strip(), **params)


def decoder_label(extra_body: dict[str, Any]) -> str:
    """A short readable name for a decoder choice, e.g. ``power_mcmc(alpha=4)``."""
    choice = extra_body["decoder"]
    if isinstance(choice, str):
        return choice
    params = ",".join(f"{k}={v}" for k, v in choice.items() if k != "name")
    return f"{choice['name']}({params})" if params else str(choice["name"])


def _value(text: str) -> Param:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text
