"""Pod and Secret manifests (pure builders)."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from damops.config import ConfigError
from damops.k8s.models import WorkerPoolSpec
from damops.k8s.specs import (
    LABEL_HASH,
    WorkerDefaults,
    build_secret_spec,
    build_worker_pod_spec,
    selector_labels,
    selector_string,
)


def test_worker_pod_has_sidecar_and_worker_sharing_the_socket_dir() -> None:
    pod = build_worker_pod_spec("wp1", "ns1", "uid-1", WorkerPoolSpec(replicas=2, image="img:1"))
    containers = {c["name"]: c for c in pod["spec"]["containers"]}
    assert set(containers) == {"sidecar", "worker"}
    assert containers["sidecar"]["command"] == ["damops", "sidecar"]
    args = containers["sidecar"]["args"]
    assert args[args.index("--listen") + 1] == "0.0.0.0:7700"
    assert args[args.index("--socket") + 1] == "/run/damops/worker.sock"
    assert args[args.index("--health-port") + 1] == "7701"
    assert containers["sidecar"]["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert containers["sidecar"]["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert containers["worker"]["command"] == ["damops", "worker"]
    for c in containers.values():
        assert {"name": "damops-run", "mountPath": "/run/damops"} in c["volumeMounts"]
        sc = c["securityContext"]
        assert sc["runAsNonRoot"] and sc["readOnlyRootFilesystem"] and sc["allowPrivilegeEscalation"] is False
        secret_env = [e for e in c["env"] if e["name"] == "DAMOPS_SECRET"][0]
        assert secret_env["valueFrom"]["secretKeyRef"]["name"] == "wp1-damops-channel"
        assert c["image"] == "img:1"
    assert any(v["name"] == "damops-run" and "emptyDir" in v for v in pod["spec"]["volumes"])
    assert pod["spec"]["automountServiceAccountToken"] is False


def test_pod_is_owned_and_labelled_for_selection() -> None:
    pod = build_worker_pod_spec("wp1", "ns1", "uid-1", WorkerPoolSpec())
    owner = pod["metadata"]["ownerReferences"][0]
    assert owner == {
        "apiVersion": "damops.dev/v1alpha1",
        "kind": "WorkerPool",
        "name": "wp1",
        "uid": "uid-1",
        "controller": True,
        "blockOwnerDeletion": True,
    }
    for k, v in selector_labels("wp1").items():
        assert pod["metadata"]["labels"][k] == v
    assert selector_string("wp1") == "app.kubernetes.io/component=worker,damops.dev/workerpool=wp1"
    assert pod["metadata"]["generateName"] == "wp1-"


def test_template_hash_changes_with_the_template_only() -> None:
    h = lambda s: build_worker_pod_spec("wp", "ns", "u", s)["metadata"]["labels"][LABEL_HASH]  # noqa: E731
    base = h(WorkerPoolSpec(replicas=1))
    assert base == h(WorkerPoolSpec(replicas=7)), "scaling must not replace pods"
    assert base != h(WorkerPoolSpec(replicas=1, image="other:2"))
    assert base != h(WorkerPoolSpec(replicas=1, env=[{"name": "X", "value": "1"}]))


def test_user_settings_reach_the_pod() -> None:
    spec = WorkerPoolSpec.model_validate(
        {
            "pool": "renditions",
            "resources": {"limits": {"cpu": "500m", "memory": "256Mi"}},
            "env": [{"name": "A", "value": "b"}],
            "envFrom": [{"configMapRef": {"name": "cm"}}],
            "nodeSelector": {"disk": "ssd"},
            "tolerations": [{"key": "k", "operator": "Exists"}],
            "triggerFunctions": {"preload": ["render_rendition"]},
            "imagePullPolicy": "Never",
        }
    )
    pod = build_worker_pod_spec("wp", "ns", "u", spec)
    worker = [c for c in pod["spec"]["containers"] if c["name"] == "worker"][0]
    env = {e["name"]: e.get("value") for e in worker["env"]}
    assert env["DAMOPS_POOL"] == "renditions" and env["A"] == "b" and env["DAMOPS_PRELOAD"] == "render_rendition"
    assert worker["resources"] == {"limits": {"cpu": "500m", "memory": "256Mi"}}
    assert worker["envFrom"] == [{"configMapRef": {"name": "cm"}}]
    assert worker["imagePullPolicy"] == "Never"
    assert pod["spec"]["nodeSelector"] == {"disk": "ssd"}
    assert pod["spec"]["tolerations"] == [{"key": "k", "operator": "Exists"}]


def test_channel_secret() -> None:
    s1 = build_secret_spec("wp", "ns", "u")
    s2 = build_secret_spec("wp", "ns", "u")
    assert s1["metadata"]["name"] == "wp-damops-channel"
    assert len(s1["stringData"]["secret"]) >= 32 and s1["stringData"]["secret"] != s2["stringData"]["secret"]
    assert s1["metadata"]["ownerReferences"][0]["uid"] == "u"
    assert build_secret_spec("wp", "ns", "u", "fixed")["stringData"]["secret"] == "fixed"


def test_volumes_security_and_spread_overrides_reach_the_pod() -> None:
    spec = WorkerPoolSpec.model_validate(
        {
            "volumes": [{"name": "code", "configMap": {"name": "trigger-code"}}],
            "volumeMounts": [{"name": "code", "mountPath": "/opt/triggers", "readOnly": True}],
            "triggerFunctions": {"extraPythonPath": ["/opt/triggers"]},
            "podSecurityContext": {},
            "securityContext": {"runAsNonRoot": True, "allowPrivilegeEscalation": False},
            "topologySpreadConstraints": [
                {"maxSkew": 1, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "ScheduleAnyway"}
            ],
        }
    )
    pod = build_worker_pod_spec("wp", "ns", "u", spec)["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    assert {"name": "code", "configMap": {"name": "trigger-code"}} in pod["volumes"]
    assert {"name": "damops-run", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}} in pod["volumes"]
    worker_mounts = containers["worker"]["volumeMounts"]
    assert {"name": "code", "mountPath": "/opt/triggers", "readOnly": True} in worker_mounts
    assert all(m["name"] != "code" for m in containers["sidecar"]["volumeMounts"]), "the sidecar runs no user code"
    assert pod["securityContext"] == {}, "{} leaves the UID to the platform (OpenShift restricted)"
    for c in containers.values():
        assert c["securityContext"] == {"runAsNonRoot": True, "allowPrivilegeEscalation": False}
    assert pod["topologySpreadConstraints"][0]["topologyKey"] == "kubernetes.io/hostname"


def test_default_security_contexts_without_overrides() -> None:
    pod = build_worker_pod_spec("wp", "ns", "u", WorkerPoolSpec())["spec"]
    assert pod["securityContext"]["runAsUser"] == 10001 and pod["securityContext"]["fsGroup"] == 10001
    assert "topologySpreadConstraints" not in pod


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("volumes", [{"name": "tmp", "emptyDir": {}}], "tmp"),
        ("volumeMounts", [{"name": "x", "mountPath": "/run/damops"}], "/run/damops"),
    ],
)
def test_the_pods_own_volumes_cannot_be_replaced(field: str, value: list, named: str) -> None:
    with pytest.raises(ValidationError, match=named):
        WorkerPoolSpec.model_validate({field: value})


def test_pull_policy_defaults_to_the_operators_and_the_spec_wins() -> None:
    defaults = WorkerDefaults.from_env({"DAMOPS_WORKER_IMAGE": "reg/w:1", "DAMOPS_WORKER_IMAGE_PULL_POLICY": "Always"})
    pod = build_worker_pod_spec("wp", "ns", "u", WorkerPoolSpec(), defaults)
    assert {c["imagePullPolicy"] for c in pod["spec"]["containers"]} == {"Always"}
    assert {c["image"] for c in pod["spec"]["containers"]} == {"reg/w:1"}
    pinned = build_worker_pod_spec("wp", "ns", "u", WorkerPoolSpec(imagePullPolicy="Never"), defaults)
    assert {c["imagePullPolicy"] for c in pinned["spec"]["containers"]} == {"Never"}
    assert WorkerDefaults.from_env({}) == WorkerDefaults()


def test_bad_pull_policy_stops_start_up_naming_the_variable() -> None:
    with pytest.raises(ConfigError, match="DAMOPS_WORKER_IMAGE_PULL_POLICY"):
        WorkerDefaults.from_env({"DAMOPS_WORKER_IMAGE_PULL_POLICY": "Sometimes"})


def test_the_operators_worker_env_comes_first_and_a_pool_overrides_it_by_name() -> None:
    defaults = WorkerDefaults.from_env(
        {
            "DAMOPS_WORKER_ENV": json.dumps(
                [
                    {"name": "DAMOPS_TRACING", "value": "1"},
                    {"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": "http://collector:4318"},
                    {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                ]
            )
        }
    )
    spec = WorkerPoolSpec.model_validate({"env": [{"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": "http://own:4318"}]})
    containers = {c["name"]: c for c in build_worker_pod_spec("wp", "ns", "u", spec, defaults)["spec"]["containers"]}
    env = [(e["name"], e.get("value", e.get("valueFrom"))) for e in containers["worker"]["env"]]
    names = [name for name, _ in env]
    assert names.count("OTEL_EXPORTER_OTLP_ENDPOINT") == 1
    assert ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://own:4318") in env
    assert ("DAMOPS_TRACING", "1") in env and ("NODE", {"fieldRef": {"fieldPath": "spec.nodeName"}}) in env
    assert names.index("DAMOPS_TRACING") < names.index("OTEL_EXPORTER_OTLP_ENDPOINT")
    # the sidecar does not trace: it keeps damops's own variables only
    assert "DAMOPS_TRACING" not in {e["name"] for e in containers["sidecar"]["env"]}
    # a change of the operator's worker env is a new pod template: the pools roll their free workers
    plain = build_worker_pod_spec("wp", "ns", "u", spec)
    assert (
        plain["metadata"]["labels"][LABEL_HASH]
        != build_worker_pod_spec("wp", "ns", "u", spec, defaults)["metadata"]["labels"][LABEL_HASH]
    )


@pytest.mark.parametrize(
    ("value", "named"),
    [
        ("{not json", "Invalid JSON"),
        ('{"name": "A", "value": "1"}', "list"),
        ('[{"value": "1"}]', "name"),
        ('[{"name": "A", "value": 1}]', "string"),
    ],
)
def test_bad_worker_env_stops_start_up_naming_the_variable(value: str, named: str) -> None:
    with pytest.raises(ConfigError, match=f"DAMOPS_WORKER_ENV: .*{named}") as raised:
        WorkerDefaults.from_env({"DAMOPS_WORKER_ENV": value})
    assert "\n" not in str(raised.value)
