"""Which Prometheus series exist, and which ones a PromQL query names.

powerserve's come from prometheus_client's registry after importing ``powerserve.metrics``;
vLLM's from the names its Prometheus stat logger registers (``vllm/v1/metrics/loggers.py`` of
the installed package, read as text: importing vLLM takes seconds). Both are expanded into the
names Prometheus stores: counters get ``_total``, histograms ``_bucket``/``_sum``/``_count``.
Queries are parsed with ``promql_parser`` (the Rust PromQL parser), so a syntax error fails too.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import promql_parser
from prometheus_client import REGISTRY

import powerserve.metrics  # noqa: F401  (registers the series)


def stored_names(name: str, kind: str) -> set[str]:
    if kind == "counter":
        return {name if name.endswith("_total") else f"{name}_total"}
    if kind == "histogram":
        return {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return {name}


def powerserve_series() -> set[str]:
    names: set[str] = set()
    for family in REGISTRY.collect():
        if family.name.startswith("powerserve_"):
            names |= stored_names(family.name, family.type)
    return names


def vllm_loggers_source() -> Path | None:
    """vllm/v1/metrics/loggers.py of the installed vLLM, found without importing vLLM."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "v1" / "metrics" / "loggers.py"


def vllm_series(source: Path) -> set[str]:
    text = source.read_text()
    names: set[str] = set()
    # self._counter_cls(name="vllm:...", ...), self._histogram_cls(...), self._gauge_cls(...)
    for kind, name in re.findall(r"_(counter|gauge|histogram)_cls\(\s*name=\"(vllm:[\w:]+)\"", text):
        names |= stored_names(name, kind)
    # Info-style gauges whose name is assigned first, e.g. name = "vllm:cache_config_info".
    for name in re.findall(r"\bname = \"(vllm:[\w:]+)\"", text):
        names.add(name)
    return names


def grafana_to_promql(expr: str) -> str:
    """Replace Grafana's variables: interval built-ins by a duration, the dashboard's own
    variables (used only inside label matchers) by a match-all regex."""
    expr = re.sub(r"\$\{?__(rate_interval|interval|range)\}?", "5m", expr)
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


def metric_names(expr: str) -> set[str]:
    """Metric names a Grafana PromQL query selects; a syntax error raises ``ValueError``."""
    names: set[str] = set()

    def visit(node: object) -> bool:
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            names.add(node.name)
        return True

    promql_parser.walk(promql_parser.parse(grafana_to_promql(expr)), visit)
    return names


def label_values_metric(query: str) -> str | None:
    """The metric of a Grafana ``label_values(metric{...}, label)`` variable query."""
    m = re.match(r"\s*label_values\(\s*([a-zA-Z_:][\w:]*)\s*[{,]", query)
    return m.group(1) if m else None
