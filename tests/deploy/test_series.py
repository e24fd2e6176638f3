"""The helpers that the Grafana test relies on, checked on known inputs."""

from __future__ import annotations

import pytest

from tests.deploy.series import label_values_metric, metric_names, powerserve_series, vllm_loggers_source, vllm_series


def test_metric_names_skips_functions_labels_and_variables() -> None:
    expr = (
        "histogram_quantile(0.95, sum by (decoder, le) (rate(powerserve_request_latency_seconds_bucket"
        '{model=~"$model", decoder=~"$decoder"}[$__rate_interval])))'
        " / on (decoder) group_left sum without (le) (vllm:num_requests_waiting offset 5m) > bool 2"
    )
    assert metric_names(expr) == {"powerserve_request_latency_seconds_bucket", "vllm:num_requests_waiting"}


def test_metric_names_rejects_invalid_promql() -> None:
    with pytest.raises(ValueError):
        metric_names("sum(rate(powerserve_output_tokens_total[$__rate_interval])")


def test_label_values_metric() -> None:
    assert label_values_metric('label_values(powerserve_requests_total{model=~"$m"}, decoder)') == (
        "powerserve_requests_total"
    )
    assert label_values_metric("label_values(powerserve_requests_total, model)") == "powerserve_requests_total"
    assert label_values_metric("prometheus") is None


def test_powerserve_series_are_expanded_by_type() -> None:
    names = powerserve_series()
    assert "powerserve_requests_total" in names
    assert "powerserve_requests_running" in names
    assert {"powerserve_request_latency_seconds_bucket", "powerserve_request_latency_seconds_count"} <= names
    assert "powerserve_requests" not in names


@pytest.mark.vllm
def test_vllm_series_are_read_from_the_installed_source() -> None:
    source = vllm_loggers_source()
    if source is None:
        pytest.fail("vLLM is not installed: run scripts/setup.sh, which installs it")
    names = vllm_series(source)
    assert {"vllm:num_requests_waiting", "vllm:generation_tokens_total"} <= names
    assert "vllm:time_to_first_token_seconds_bucket" in names
    assert "vllm:kv_cache_usage_perc" in names
