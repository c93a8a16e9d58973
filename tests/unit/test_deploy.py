"""deploy/: the manifests agree with the server they run (flags, ports, health service)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from bertstream.server.options import parse_args

yaml = pytest.importorskip("yaml")

DEPLOY = Path(__file__).parents[2] / "deploy"


def _load(name: str) -> dict:
    return yaml.safe_load((DEPLOY / "k8s" / name).read_text(encoding="utf-8"))


def test_kustomization_lists_every_manifest() -> None:
    listed = set(_load("kustomization.yaml")["resources"])
    assert listed == {p.name for p in (DEPLOY / "k8s").glob("*.yaml")} - {"kustomization.yaml"}


def test_deployment_runs_flags_the_server_accepts_and_probes_its_health_service() -> None:
    deployment = _load("deployment.yaml")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    options = parse_args(container["args"])  # argparse exits on an unknown flag
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": options.port, "http": options.http_port,
                     "metrics": options.metrics_port}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": options.port, "service": ""}
    assert pod["terminationGracePeriodSeconds"] > options.grace_period_s
    mount = container["volumeMounts"][0]
    assert Path(mount["mountPath"]) == options.model_repository and mount["readOnly"]
    claim = pod["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert claim == _load("repository-pvc.yaml")["metadata"]["name"]


def test_service_is_headless_for_client_side_balancing() -> None:
    service, deployment = _load("service.yaml"), _load("deployment.yaml")
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    names = {p["name"] for p in container["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= names


def test_dockerfile_default_command_is_valid() -> None:
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))
    options = parse_args(cmd)
    assert options.port == 8001 and options.metrics_port == 8002 and options.http_port == 8000
