"""deploy/k8s: every manifest validates against the Kubernetes OpenAPI schemas shipped by
``kubernetes-validate`` (strict: unknown fields fail), for the oldest and newest Kubernetes it
knows; and the manifests agree with each other, with the image and with ``powerserve serve``."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from powerserve.settings import Settings
from tests.deploy.docker_stages import first, stages
from tests.deploy.paths import DEPLOY
from tests.deploy.series import powerserve_series

K8S = DEPLOY / "k8s"
VERSIONS = ["1.25.0", kubernetes_validate.latest_version()]
CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}  # no schema in the core API


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def manifests() -> list[dict[str, Any]]:
    kustomization = documents(K8S / "kustomization.yaml")[0]
    return [doc for name in kustomization["resources"] for doc in documents(K8S / name)]


def one(kind: str) -> dict[str, Any]:
    (doc,) = [d for d in manifests() if d["kind"] == kind]
    return doc


def container() -> dict[str, Any]:
    (c,) = one("Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def test_kustomization_lists_every_manifest() -> None:
    kustomization = documents(K8S / "kustomization.yaml")[0]
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "prometheus-adapter-values.yaml"}
    assert listed == on_disk


@pytest.mark.parametrize("version", VERSIONS)
def test_manifests_validate_against_the_kubernetes_schemas(version: str) -> None:
    checked = 0
    for doc in manifests():
        if (doc["apiVersion"], doc["kind"]) in CRDS:
            continue
        kubernetes_validate.validate(doc, version, strict=True)
        checked += 1
    assert checked >= 4


def test_a_broken_manifest_is_caught() -> None:
    doc = one("Deployment")
    doc["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {"path": "/health"}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, VERSIONS[-1], strict=True)


def test_service_and_service_monitor_select_the_pods_and_name_their_port() -> None:
    deployment, service, monitor = one("Deployment"), one("Service"), one("ServiceMonitor")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert service["spec"]["selector"].items() <= pod_labels.items()
    port_names = {p["name"] for p in container()["ports"]}
    (service_port,) = service["spec"]["ports"]
    assert service_port["targetPort"] in port_names
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == [service_port["name"]]
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"


def test_probes_scrape_annotations_and_user_match_the_image() -> None:
    c = container()
    pod = one("Deployment")["spec"]["template"]
    image = stages()["gpu"]
    port = int(first(image, "EXPOSE").value[0])
    assert [p["containerPort"] for p in c["ports"]] == [port]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == port
    security = pod["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True
    assert str(security["runAsUser"]) == first(image, "USER").value[0].split(":")[0]
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert "/models" in first(image, "VOLUME").value
    claim = volumes[mounts["/models"]]["persistentVolumeClaim"]["claimName"]
    assert claim == one("PersistentVolumeClaim")["metadata"]["name"]


def test_args_are_powerserve_options_and_gpus_match_the_parallelism() -> None:
    values = {}
    for arg in container()["args"]:
        flag, _, value = arg.partition("=")
        assert flag.startswith("--") and value, f"{arg}: use --name=value"
        values[flag[2:].replace("-", "_")] = value
    assert set(values) <= set(Settings.model_fields), "every arg is a `powerserve serve` option"
    settings = Settings(**values)
    gpus = settings.tensor_parallel_size * settings.pipeline_parallel_size
    resources = container()["resources"]
    assert int(resources["requests"]["nvidia.com/gpu"]) == gpus
    assert int(resources["limits"]["nvidia.com/gpu"]) == gpus


def test_autoscaler_scales_the_deployment_on_the_adapted_queue_metric() -> None:
    hpa, deployment = one("HorizontalPodAutoscaler"), one("Deployment")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    adapter = documents(K8S / "prometheus-adapter-values.yaml")[0]
    (rule,) = adapter["rules"]["custom"]
    series = re.match(r"[\w:]+", rule["seriesQuery"])
    assert series is not None
    served = re.sub(rule["name"]["matches"], rule["name"]["as"].replace("${1}", r"\1"), series.group(0))
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == served
    assert series.group(0) == "powerserve_requests_queued"  # the admission queue
    assert series.group(0) in powerserve_series()


def test_a_replica_whose_engine_died_is_restarted() -> None:
    """powerserve exits with status 3 when its engine dies (issue 12): the pod must restart the
    container, and the liveness probe must watch /health (503 once the engine fails its check)."""
    pod = one("Deployment")["spec"]["template"]["spec"]
    assert pod.get("restartPolicy", "Always") == "Always"
    probe = container()["livenessProbe"]
    assert probe["httpGet"]["path"] == "/health"
    assert probe["periodSeconds"] * probe["failureThreshold"] <= 300, "a hung replica must not live for long"
