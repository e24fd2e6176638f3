"""deploy/grafana: the dashboard JSON is well formed, every metric its queries name is one that
powerserve or vLLM exports, it covers what users watch, and the provisioning files point at
each other and at the compose stack."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.paths import DEPLOY
from tests.deploy.series import label_values_metric, metric_names, powerserve_series, vllm_loggers_source, vllm_series

DASHBOARD = DEPLOY / "grafana" / "dashboards" / "powerserve.json"
PROVISIONING = DEPLOY / "grafana" / "provisioning"


def load_dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # inside collapsed rows


def queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target."""
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r} target {target['refId']}", target["expr"]


def all_metric_names(dashboard: dict[str, Any]) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for where, expr in queries(dashboard):
        for name in metric_names(expr):
            found.setdefault(name, set()).add(where)
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            name = label_values_metric(var["query"]["query"])
            assert name is not None, f"variable {var['name']}: expected a label_values() query"
            found.setdefault(name, set()).add(f"variable {var['name']}")
    return found


def test_dashboard_json_is_well_formed() -> None:
    d = load_dashboard()
    assert d["uid"] == "powerserve"
    assert isinstance(d["schemaVersion"], int)
    ids = [p["id"] for p in panels(d)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"] for v in d["templating"]["list"]}
    assert {"datasource", "model", "decoder"} <= variables
    for panel in panels(d):
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["title"] and panel.get("description"), "every panel says what it shows"
        assert panel["datasource"]["uid"] == "${datasource}"
        assert panel["targets"], panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]


def test_every_powerserve_metric_in_a_query_is_exported() -> None:
    exported = powerserve_series()
    named = all_metric_names(load_dashboard())
    assert named, "no metric names found"
    unknown = {n: sorted(w) for n, w in named.items() if not n.startswith("vllm:") and n not in exported}
    assert not unknown, f"not exported by powerserve.metrics: {unknown}"


@pytest.mark.vllm
def test_every_vllm_metric_in_a_query_is_exported_by_the_installed_vllm() -> None:
    source = vllm_loggers_source()
    if source is None:
        pytest.fail("vLLM is not installed: run scripts/setup.sh, which installs it")
    exported = vllm_series(source)
    named = {n: sorted(w) for n, w in all_metric_names(load_dashboard()).items() if n.startswith("vllm:")}
    assert named, "the dashboard has vLLM engine panels"
    unknown = {n: w for n, w in named.items() if n not in exported}
    assert not unknown, f"not registered in {source}: {unknown}"


def test_dashboard_covers_latency_cost_quality_and_request_states() -> None:
    named = set(all_metric_names(load_dashboard()))
    required = {
        "powerserve_request_latency_seconds_bucket",  # p50/p95/p99
        "powerserve_time_to_first_token_seconds_bucket",
        "powerserve_output_tokens_total",  # tokens/s and the cost denominator
        "powerserve_engine_tokens_generated_total",
        "powerserve_engine_tokens_scored_total",
        "powerserve_mcmc_acceptance_rate_sum",
        "powerserve_proposal_tokens_proposed_total",  # every power decoder's proposal work
        "powerserve_self_reward_per_token_bucket",
        "powerserve_requests_running",
        "powerserve_requests_total",  # failed / cancelled
        "powerserve_requests_queued",
    }
    assert required <= named, f"missing: {sorted(required - named)}"
    exprs = [e for _, e in queries(load_dashboard())]
    for quantile in ("0.5", "0.95", "0.99"):
        assert any(f"histogram_quantile({quantile}, " in e and "request_latency" in e for e in exprs), quantile
    assert any("error" in e and "cancelled" in e for e in exprs)


def test_every_latency_and_cost_panel_is_per_decoder() -> None:
    for where, expr in queries(load_dashboard()):
        if "powerserve_" in expr and "requests_total" not in expr:
            assert "decoder" in expr and "$decoder" in expr, where


def yaml_file(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(path.read_text())
    return data


def test_provisioning_points_at_the_dashboard_and_a_default_prometheus() -> None:
    sources = yaml_file(PROVISIONING / "datasources" / "prometheus.yaml")["datasources"]
    (prom,) = sources
    assert prom["type"] == "prometheus" and prom["isDefault"] is True
    variable = next(v for v in load_dashboard()["templating"]["list"] if v["name"] == "datasource")
    assert variable["query"] == "prometheus"
    assert variable["current"]["value"] == prom["uid"]

    (provider,) = yaml_file(PROVISIONING / "dashboards" / "powerserve.yaml")["providers"]
    compose = yaml_file(DEPLOY / "compose.yaml")
    mounts = dict(reversed(v.split(":")[:2]) for v in compose["services"]["grafana"]["volumes"])
    # The provider's folder is where compose mounts deploy/grafana/dashboards.
    assert (DEPLOY / mounts[provider["options"]["path"]]).resolve() == DASHBOARD.parent
    assert (DEPLOY / mounts["/etc/grafana/provisioning"]).resolve() == PROVISIONING
    home = compose["services"]["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{DASHBOARD.name}"


def test_streamed_fraction_panel_sits_next_to_time_to_first_token() -> None:
    """Issue 17: the share of each answer streamed before the end, per decoder, beside TTFT."""
    d = load_dashboard()
    by_metric = {
        name: panel for panel in panels(d) for t in panel.get("targets", []) for name in metric_names(t["expr"])
    }
    streamed = by_metric["powerserve_streamed_fraction_sum"]
    ttft = by_metric["powerserve_time_to_first_token_seconds_bucket"]
    assert "powerserve_streamed_fraction_count" in {n for t in streamed["targets"] for n in metric_names(t["expr"])}
    assert streamed["gridPos"]["y"] == ttft["gridPos"]["y"]  # same row
    assert abs(streamed["gridPos"]["x"] - ttft["gridPos"]["x"]) == ttft["gridPos"]["w"]  # adjacent
    assert streamed["fieldConfig"]["defaults"]["unit"] == "percentunit"
