"""deploy/k8s/ checked offline: every manifest against Kubernetes' own schemas (kubernetes-validate,
strict: unknown fields are errors), and the parts that must agree with each other and with the server."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from openelm_server.config import load_settings
from openelm_server.engine.core import EngineStats
from openelm_server.serving.metrics import Metrics

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
# The oldest Kubernetes with preStop's sleep action on by default, and the newest the validator knows.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")


def resources() -> dict[str, dict]:
    found = {}
    for path in sorted(K8S.glob("*.yaml")):
        for resource in yaml.safe_load_all(path.read_text()):
            found[resource["kind"]] = resource
    return found


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", sorted(K8S.glob("*.yaml")), ids=lambda path: path.name)
def test_manifest_is_valid_kubernetes(path, version):
    for resource in yaml.safe_load_all(path.read_text()):
        kubernetes_validate.validate(resource, version, strict=True)


def test_the_validator_refuses_a_wrong_field():
    deployment = resources()["Deployment"]
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


def test_the_pieces_fit_together():
    found = resources()
    assert set(found) == {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "PersistentVolumeClaim",
    }
    deployment, service, hpa, pdb = (
        found[kind] for kind in ("Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget")
    )
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    [container] = pod["spec"]["containers"]
    assert container["command"] == ["python", "api.py"]
    settings = load_settings(container["args"], environ={})  # the flags are api.py's, and valid
    [port] = container["ports"]
    assert port == {"name": "http", "containerPort": settings.port} and settings.host == "0.0.0.0"
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(settings.port)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    claim = found["PersistentVolumeClaim"]["metadata"]["name"]
    assert pod["spec"]["volumes"] == [
        {"name": "models", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
    ]
    assert settings.model_path.startswith(container["volumeMounts"][0]["mountPath"] + "/")


def test_grace_period_covers_prestop_and_shutdown_timeout():
    pod = resources()["Deployment"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    settings = load_settings(container["args"], environ={})
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert settings.shutdown_timeout == 30
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + settings.shutdown_timeout + 5


def test_autoscaling_reads_the_servers_queue_gauge():
    [metric] = resources()["HorizontalPodAutoscaler"]["spec"]["metrics"]
    name = metric["pods"]["metric"]["name"]
    metrics = Metrics(
        lambda: EngineStats(
            3,
            8,
            kv_blocks_used=8,
            kv_blocks_total=32,
            prefix_cache_queries=0,
            prefix_cache_hits=0,
            preemptions=0,
            spec_draft_tokens=0,
            spec_accepted_tokens=0,
        )
    )
    assert f"\n{name} 3.0\n" in metrics.render().decode()
