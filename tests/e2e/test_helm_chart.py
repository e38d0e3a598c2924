"""`helm lint` and `helm template` of the chart (needs only the helm binary, no cluster)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

CHART = Path(__file__).resolve().parents[2] / "helm" / "damops"

if shutil.which("helm") is None:
    REASON = 'helm is not on PATH (eval "$(hack/local-cluster env)" provides one, or install helm)'
    print(f"\n[helm tests skipped] {REASON}", file=sys.stderr)
    pytest.skip(REASON, allow_module_level=True)

DB = ["--set", "database.url=postgresql://damops:pw@db:5432/damops"]


def helm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["helm", *args], capture_output=True, text=True, timeout=120)


def render(*extra: str) -> list[dict]:
    proc = helm("template", "t", str(CHART), "-n", "ops", *DB, *extra)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def test_helm_lint_passes() -> None:
    proc = helm("lint", str(CHART), "--strict", *DB)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_schema_rejects_unknown_keys_and_bad_values() -> None:
    proc = helm("lint", str(CHART), *DB, "--set", "configuration.digitalAssetManagement.typoKey=1")
    assert proc.returncode != 0 and "typoKey" in proc.stdout + proc.stderr
    proc = helm(
        "template",
        "t",
        str(CHART),
        *DB,
        "--set",
        "configuration.digitalAssetManagement.failedOperationThresholdLimitRecords=-1",
    )
    assert proc.returncode != 0


def test_database_must_be_given_exactly_once() -> None:
    proc = helm("template", "t", str(CHART))
    assert proc.returncode != 0 and "exactly one of" in proc.stderr


def test_template_renders_operator_with_seed_env_vars() -> None:
    docs = render("--set", "configuration.digitalAssetManagement.failedOperationThresholdTimeHours=48")
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert ("Deployment", "t-damops-operator") in kinds
    assert ("ServiceAccount", "t-damops") in kinds
    assert ("NetworkPolicy", "t-damops-workers") in kinds
    [deploy] = [d for d in docs if d["kind"] == "Deployment"]
    assert deploy["spec"]["replicas"] == 1 and deploy["spec"]["strategy"]["type"] == "Recreate"
    container = deploy["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["FAILED_OPERATION_THRESHOLD_TIME_HOURS"] == "48"
    assert env["FAILED_OPERATION_THRESHOLD_LIMIT_RECORDS"] == "20000"
    assert env["POLL_FAILED_OPERATIONS_INTERVAL"] == "1h"
    for name in (
        "SCHEDULER_HEARTBEAT",
        "MAX_OPERATION_PROCESSING_TIME",
        "MAX_WORKER_ACTIVE_TIME",
        "OPERATION_WAIT_INTERVAL",
    ):
        assert env[name], name
    db = [e for e in container["env"] if e["name"] == "DATABASE_URL"][0]
    assert db["valueFrom"]["secretKeyRef"] == {"name": "t-damops-database", "key": "url"}
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"


def _port_rules(np: dict) -> list[tuple[frozenset, list]]:
    """(ports, from) of every ingress rule. A rule without ports opens every port; one without
    ``from`` admits every source: both are kept as they are, so the assertions see them."""
    out = []
    for rule in np["spec"].get("ingress", []):
        ports = frozenset((p.get("protocol", "TCP"), p["port"]) for p in rule.get("ports") or [])
        out.append((ports, rule.get("from") or []))
    return out


def test_network_policy_lets_only_the_operator_reach_the_channel_port() -> None:
    docs = render("--set", "networkPolicy.workerNamespaces={ops,jobs}")
    nps = {d["metadata"]["namespace"]: d for d in docs if d["kind"] == "NetworkPolicy"}
    assert set(nps) == {"ops", "jobs"}
    for namespace, np in nps.items():
        assert np["spec"]["policyTypes"] == ["Ingress"]
        rules = _port_rules(np)
        assert all(ports for ports, _ in rules), f"{namespace}: an ingress rule without ports opens every port"
        assert set().union(*(ports for ports, _ in rules)) == {("TCP", 7700), ("TCP", 7701)}, rules
        channel = [sources for ports, sources in rules if ("TCP", 7700) in ports]
        operator = {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ops"}},
            "podSelector": {
                "matchLabels": {
                    "app.kubernetes.io/name": "damops",
                    "app.kubernetes.io/instance": "t",
                    "app.kubernetes.io/component": "operator",
                }
            },
        }
        assert channel == [[operator]], f"{namespace}: 7700 must admit the operator pod only: {channel}"
        # the health port is open to every source (kubelet probes), and nothing else rides along
        assert [ports for ports, sources in rules if not sources] == [frozenset({("TCP", 7701)})]


def _rules(docs: list[dict], kind: str) -> dict[tuple[str, str], set[str]]:
    """Verbs per (apiGroup, resource), merged over every rule of every ``kind``; a pair granted
    by two rules is a duplicate and fails here rather than hiding one grant behind the other."""
    verbs: dict[tuple[str, str], set[str]] = {}
    for d in docs:
        if d["kind"] != kind:
            continue
        for rule in d["rules"]:
            assert not rule.get("resourceNames") and not rule.get("nonResourceURLs"), rule
            for g in rule["apiGroups"]:
                for r in rule["resources"]:
                    assert (g, r) not in verbs, f"{kind}: ({g!r}, {r!r}) granted by two rules"
                    verbs[(g, r)] = set(rule["verbs"])
    return verbs


LEAST = {
    ("damops.dev", "workerpools"): {"get", "list", "watch", "patch"},
    ("damops.dev", "workerpools/status"): {"get", "patch"},
    ("", "pods"): {"get", "list", "watch", "create", "delete", "patch"},
    ("", "secrets"): {"get", "create"},
    ("", "events"): {"create"},
    ("events.k8s.io", "events"): {"create"},
    ("kopf.dev", "kopfpeerings"): {"get", "list", "watch", "patch"},
}
DISCOVERY = {
    ("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"},
    ("", "namespaces"): {"list", "watch"},
}


def test_rbac_is_least_privilege() -> None:
    docs = render()
    cluster = _rules(docs, "ClusterRole")
    assert cluster == {**LEAST, **DISCOVERY, ("kopf.dev", "clusterkopfpeerings"): {"get", "list", "watch", "patch"}}
    assert not [d for d in docs if d["kind"] == "Role"]


def test_rbac_with_watched_namespaces_grants_the_pool_rights_there_only() -> None:
    docs = render("--set", "operator.watchNamespaces={jobs,batch}")
    by_name = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ClusterRole"}
    assert _rules([by_name["t-damops-workerpools"]], "ClusterRole") == LEAST
    # the namespaced rights are bound in the watched namespaces only, never cluster-wide
    cluster_bound = {d["roleRef"]["name"] for d in docs if d["kind"] == "ClusterRoleBinding"}
    assert cluster_bound == {"t-damops-cluster"}, cluster_bound
    bindings = {d["metadata"]["namespace"]: d["roleRef"]["name"] for d in docs if d["kind"] == "RoleBinding"}
    assert bindings == {"jobs": "t-damops-workerpools", "batch": "t-damops-workerpools"}


def test_existing_secret_and_bundled_postgresql() -> None:
    proc = helm(
        "template",
        "t",
        str(CHART),
        "--set",
        "database.existingSecret.name=mydb",
        "--set",
        "database.existingSecret.key=dsn",
    )
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    [deploy] = [d for d in docs if d["kind"] == "Deployment"]
    db = [e for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"] if e["name"] == "DATABASE_URL"][0]
    assert db["valueFrom"]["secretKeyRef"] == {"name": "mydb", "key": "dsn"}
    proc = helm("template", "t", str(CHART), "--set", "database.postgresql.enabled=true")
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    assert any(d["kind"] == "Deployment" and d["metadata"]["name"] == "t-damops-postgresql" for d in docs)


def test_chart_crds_are_the_generated_ones() -> None:
    from damops.k8s import crdgen

    assert (CHART / "crds" / "workerpools.damops.dev.yaml").read_text() == crdgen.render()
