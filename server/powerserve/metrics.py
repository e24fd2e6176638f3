"""Every Prometheus series powerserve exports, defined in one place.

Labels are low-cardinality: ``decoder`` and ``model`` (and ``outcome`` on the request
counter). Series live in prometheus_client's global registry, where vLLM also registers its
own ``vllm:*`` series, so one ``/metrics`` page shows both.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

LABELS = ("decoder", "model")

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)
SELF_REWARD_BUCKETS = (-8, -6, -4, -3, -2, -1.5, -1, -0.75, -0.5, -0.25, -0.1, -0.05, 0)
MULTIPLIER_BUCKETS = (1, 1.25, 1.5, 2, 3, 5, 8, 12, 20, 30, 50, 100)
RATE_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)

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
TOKENS_PROPOSED = Counter("powerserve_mcmc_tokens_proposed", "Tokens proposed by MCMC decoders", LABELS)
TOKENS_ACCEPTED = Counter("powerserve_mcmc_tokens_accepted", "Proposed tokens that MCMC decoders accepted", LABELS)
ACCEPTANCE_RATE = Histogram(
    "powerserve_mcmc_acceptance_rate",
    "Share of accepted Metropolis-Hastings proposals, per choice",
    LABELS,
    buckets=RATE_BUCKETS,
)
