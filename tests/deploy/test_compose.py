"""deploy/compose.yaml (and its GPU overlay) against the Compose specification's JSON schema,
and the references between the stack's files: mounted paths exist, Prometheus scrapes the
powerserve service on its port, Grafana reads the Prometheus service."""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import jsonschema
import pytest
import yaml

from tests.deploy.docker_stages import stages
from tests.deploy.paths import DEPLOY, ROOT

COMPOSE = DEPLOY / "compose.yaml"
GPU_OVERLAY = DEPLOY / "compose.gpu.yaml"


def load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(path.read_text())
    return data


def merge(base: Any, overlay: Any) -> Any:
    """Compose's merge of mappings (later files override scalars and lists, merge mappings)."""
    if isinstance(base, dict) and isinstance(overlay, dict):
        return {k: merge(base[k], v) if k in base else v for k, v in overlay.items()} | {
            k: v for k, v in base.items() if k not in overlay
        }
    return overlay


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    # The Compose specification's schema, as vendored by check-jsonschema (a test dependency).
    text = (files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json").read_text()
    data: dict[str, Any] = json.loads(text)
    return data


@pytest.mark.parametrize("path", [COMPOSE, GPU_OVERLAY], ids=lambda p: p.name)
def test_compose_files_follow_the_compose_spec(schema: dict[str, Any], path: Path) -> None:
    jsonschema.validate(load(path), schema)


def test_gpu_overlay_merges_into_a_valid_gpu_service(schema: dict[str, Any]) -> None:
    merged = merge(load(COMPOSE), load(GPU_OVERLAY))
    jsonschema.validate(merged, schema)
    service = merged["services"]["powerserve"]
    assert service["build"]["target"] == "gpu"
    assert service["build"]["context"] == ".."  # kept from the base file
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"]


def test_the_stack_has_powerserve_prometheus_and_grafana() -> None:
    services = load(COMPOSE)["services"]
    assert set(services) == {"powerserve", "prometheus", "grafana"}
    build = services["powerserve"]["build"]
    context = (DEPLOY / build["context"]).resolve()
    assert context == ROOT
    assert build["target"] in stages(context / build["dockerfile"])
    for name, service in services.items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond the loopback address"


def test_bind_mounts_exist_and_named_volumes_are_declared() -> None:
    compose = load(COMPOSE)
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source} is missing"
            else:
                assert source in compose["volumes"], f"{name}: volume {source} is not declared"


def test_prometheus_scrapes_the_powerserve_service_and_grafana_reads_prometheus() -> None:
    compose = load(COMPOSE)
    services = compose["services"]
    prom_service = services["prometheus"]
    config_mount = next(v for v in prom_service["volumes"] if "prometheus.yml" in v)
    source, target = config_mount.split(":")[:2]
    assert f"--config.file={target}" in prom_service["command"]
    config = load(DEPLOY / source)
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    ((target_addr,),) = [c["targets"] for c in job["static_configs"]]
    host, port = target_addr.split(":")
    assert host in services
    container_ports = {p.rsplit(":", 1)[1] for p in services[host]["ports"]}
    assert port in container_ports

    datasource = load(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml")
    url = urlparse(datasource["datasources"][0]["url"])
    assert url.hostname == "prometheus" and url.hostname in services
    assert any(p.endswith(f":{url.port}") for p in prom_service["ports"])
    assert config["global"]["scrape_interval"] == datasource["datasources"][0]["jsonData"]["timeInterval"]


def test_powerserve_is_restarted_after_it_exits() -> None:
    """powerserve exits with status 3 when its engine dies (issue 12); compose must start it again."""
    service = load(COMPOSE)["services"]["powerserve"]
    assert service.get("restart") in {"always", "unless-stopped", "on-failure"}
