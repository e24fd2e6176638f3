"""Reading the ``powerserve`` extension of a response: what the request cost and bought.

Works on the openai SDK's response objects (the SDK keeps unknown fields), on the last chunk of
a stream, and on plain dicts::

    resp = client.completions.create(model=m, prompt=p, extra_body=power_mcmc())
    cost = read_cost(resp)
    cost.cost_multiplier, cost.self_reward.mean_logprob, cost.acceptance_rate
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class SelfReward:
    """Log-probability of the returned tokens under the base model."""

    sum_logprob: float
    mean_logprob: float | None
    tokens: int

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SelfReward:
        mean = d.get("mean_logprob")
        return cls(float(d["sum_logprob"]), None if mean is None else float(mean), int(d["tokens"]))


@dataclass(frozen=True, slots=True)
class ChoiceCost:
    index: int
    self_reward: SelfReward
    decoder_stats: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Cost:
    """The ``powerserve`` object of a response, typed."""

    decoder: str
    params: dict[str, Any]
    engine: str
    engine_calls: int
    tokens_generated: int  # by the engine, including discarded proposals
    tokens_scored: int
    wall_time_s: float
    cost_multiplier: float | None  # (tokens_generated + tokens_scored) / completion tokens
    self_reward: SelfReward
    decoder_stats: dict[str, float]
    choices: list[ChoiceCost]

    @property
    def engine_tokens(self) -> int:
        return self.tokens_generated + self.tokens_scored

    @property
    def acceptance_rate(self) -> float | None:
        """Share of accepted Metropolis-Hastings proposals (MCMC decoders only)."""
        return self.decoder_stats.get("acceptance_rate")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Cost:
        multiplier = d.get("cost_multiplier")
        return cls(
            decoder=str(d["decoder"]),
            params=dict(d.get("params") or {}),
            engine=str(d.get("engine", "")),
            engine_calls=int(d.get("engine_calls", 0)),
            tokens_generated=int(d["tokens_generated"]),
            tokens_scored=int(d["tokens_scored"]),
            wall_time_s=float(d.get("wall_time_s", 0.0)),
            cost_multiplier=None if multiplier is None else float(multiplier),
            self_reward=SelfReward.from_dict(d["self_reward"]),
            decoder_stats={k: float(v) for k, v in (d.get("decoder_stats") or {}).items()},
            choices=[
                ChoiceCost(
                    int(c["index"]),
                    SelfReward.from_dict(c["self_reward"]),
                    {k: float(v) for k, v in (c.get("decoder_stats") or {}).items()},
                )
                for c in d.get("choices") or []
            ],
        )


def read_cost(response: Any) -> Cost | None:
    """The cost extension of an openai SDK response or chunk (or its dict); ``None`` when the
    response has none (a server that is not powerserve, or a stream chunk before the last)."""
    if isinstance(response, Mapping):
        raw = response.get("powerserve")
    else:
        extra = getattr(response, "model_extra", None) or {}
        raw = extra.get("powerserve", getattr(response, "powerserve", None))
    if raw is None:
        return None
    if not isinstance(raw, Mapping):  # an SDK object rather than a dict
        raw = raw.model_dump() if hasattr(raw, "model_dump") else vars(raw)
    return Cost.from_dict(raw)
