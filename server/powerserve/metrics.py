"""Every Prometheus series powerserve exports, defined in one place.

Labels are low-cardinality: ``decoder`` and ``model`` (and ``outcome`` on the request
counter). Series live in prometheus_client's global registry, where vLLM also registers its
own ``vllm:*`` series, so one ``/metrics`` page shows both.

Buckets are dense where decoders differ: self-reward per token in steps of 0.02 from -1.5 to 0
(decoders differ by 0.05-0.1 there), latency and time to first token in steps of about 10%
from 0.5 s to 60 s. Histograms only estimate quantiles; :data:`RECENT` keeps the exact last
observations per decoder for the built-in dashboard (see :func:`observe`).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from prometheus_client import Counter, Gauge, Histogram


def _ladder(low: float, high: float, ratio: float) -> tuple[float, ...]:
    """Bounds low, low*ratio, ... up to high (3 significant digits), then high."""
    out, b = [], low
    while b < high * 0.999:
        out.append(float(f"{b:.3g}"))
        b *= ratio
    return (*dict.fromkeys(out), high)


LABELS = ("decoder", "model")

LATENCY_BUCKETS = (0.05, 0.1, 0.25, *_ladder(0.5, 60, 1.1), 90, 120, 300, 600)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, *_ladder(0.5, 60, 1.1), 120, 300)
SELF_REWARD_BUCKETS = (-8, -6, -4, -3, -2.5, -2, -1.75, *(round(-1.5 + 0.02 * i, 2) for i in range(76)))
MULTIPLIER_BUCKETS = (1, 1.25, 1.5, 2, 3, 5, 8, 12, 20, 30, 50, 100)
RATE_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
FRACTION_BUCKETS = (0.0, *(round(0.1 * i, 1) for i in range(1, 10)), 0.95, 0.99, 1.0)

REQUESTS = Counter(
    "powerserve_requests",
    "Completion requests by outcome (success, error, cancelled, rejected, timeout)",
    (*LABELS, "outcome"),
)
REQUESTS_RUNNING = Gauge("powerserve_requests_running", "Requests being decoded now", LABELS)
REQUESTS_QUEUED = Gauge("powerserve_requests_queued", "Requests admitted to the queue, waiting to run", LABELS)
ADMISSION_REJECTIONS = Counter(
    "powerserve_admission_rejections", "Requests refused with 429 because running and queue were full", LABELS
)
RUNNING_WEIGHT = Gauge(
    "powerserve_running_weight", "Cost weight of the requests running now (admission control's budget)"
)
LATENCY = Histogram(
    "powerserve_request_latency_seconds", "End-to-end latency of a request", LABELS, buckets=LATENCY_BUCKETS
)
TTFT = Histogram(
    "powerserve_time_to_first_token_seconds",
    "Time from arrival to the first output token",
    LABELS,
    buckets=TTFT_BUCKETS,
)
OUTPUT_TOKENS = Counter("powerserve_output_tokens", "Tokens returned to clients", LABELS)
PROMPT_TOKENS = Counter("powerserve_prompt_tokens", "Prompt tokens of served requests", LABELS)
ENGINE_TOKENS_GENERATED = Counter(
    "powerserve_engine_tokens_generated", "Tokens the engine generated, including discarded ones", LABELS
)
ENGINE_TOKENS_SCORED = Counter("powerserve_engine_tokens_scored", "Tokens the engine scored", LABELS)
ENGINE_CALLS = Counter("powerserve_engine_calls", "Engine calls (generate or score)", LABELS)
SELF_REWARD = Histogram(
    "powerserve_self_reward_per_token",
    "Mean base-model log-probability per returned token (self-reward), one observation per choice",
    LABELS,
    buckets=SELF_REWARD_BUCKETS,
)
# prometheus_client exports no _sum for a histogram with negative buckets, so the mean
# self-reward comes from this counter: mean log p per token = -rate(this) / rate(output tokens).
SELF_REWARD_NEG_LOGPROB = Counter(
    "powerserve_self_reward_neg_logprob",
    "Sum of -log p (base model) over returned tokens; divide by output tokens for the mean self-reward",
    LABELS,
)
COST_MULTIPLIER = Histogram(
    "powerserve_cost_multiplier",
    "Engine tokens (generated + scored) per returned token, per request",
    LABELS,
    buckets=MULTIPLIER_BUCKETS,
)
# Fed by every decoder that draws from a proposal (power_mcmc, power_smc, power_lookahead).
TOKENS_PROPOSED = Counter(
    "powerserve_proposal_tokens_proposed",
    "Tokens power decoders drew from their proposal (MCMC candidates, SMC particles, lookahead rollouts)",
    LABELS,
)
TOKENS_ACCEPTED = Counter("powerserve_proposal_tokens_accepted", "Proposed tokens that ended up in the answer", LABELS)
ACCEPTANCE_RATE = Histogram(
    "powerserve_mcmc_acceptance_rate",
    "Share of accepted Metropolis-Hastings proposals, per choice",
    LABELS,
    buckets=RATE_BUCKETS,
)
STREAMED_FRACTION = Histogram(
    "powerserve_streamed_fraction",
    "Share of a choice's output tokens sent before the decoder's last engine token was spent "
    "(0: the answer came at the end; about 1: token by token), one observation per choice",
    LABELS,
    buckets=FRACTION_BUCKETS,
)


# --- exact recent observations, for the built-in dashboard --------------------------------------

RECENT_KEEP = 500  # observations kept per (series, decoder)


class Recent:
    """The last ``keep`` observations of some histograms, per decoder, with their times.

    Prometheus histograms only allow bucket estimates of quantiles; the dashboard computes its
    quantiles from these instead (exact over the observations kept, labelled "exact, last N").
    Observations are ``(unix time, value)`` in arrival order.
    """

    def __init__(self, keep: int = RECENT_KEEP, clock: Callable[[], float] = time.time) -> None:
        self.keep = keep
        self.clock = clock
        self.series: dict[tuple[str, str], deque[tuple[float, float]]] = {}

    def add(self, key: str, decoder: str, value: float) -> None:
        self.series.setdefault((key, decoder), deque(maxlen=self.keep)).append((self.clock(), value))

    def values(self, key: str, decoder: str, since: float | None = None, until: float | None = None) -> list[float]:
        """Kept values of ``key`` for ``decoder`` observed in (since, until]."""
        kept = self.series.get((key, decoder), ())
        return [v for t, v in kept if (since is None or t > since) and (until is None or t <= until)]

    def covers(self, key: str, decoder: str, since: float) -> bool:
        """True when every observation after ``since`` is still kept (none was pushed out)."""
        kept = self.series.get((key, decoder))
        return kept is None or len(kept) < self.keep or kept[0][0] <= since

    def decoders(self) -> set[str]:
        return {decoder for _, decoder in self.series}


RECENT = Recent()

# Short key -> histogram, for the series that ``observe`` also keeps exactly.
EXACT = {
    "latency": LATENCY,
    "ttft": TTFT,
    "self_reward": SELF_REWARD,
    "streamed_fraction": STREAMED_FRACTION,
}


def observe(key: str, labels: tuple[str, str], value: float, recent: Recent = RECENT) -> None:
    """Observe ``value`` in the histogram ``EXACT[key]`` and keep it in ``recent`` (per decoder)."""
    EXACT[key].labels(*labels).observe(value)
    recent.add(key, labels[0], value)
