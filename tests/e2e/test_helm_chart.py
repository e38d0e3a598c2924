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


def test_network_policy_lets_only_the_operator_reach_the_channel_port() -> None:
    [np] = [d for d in render() if d["kind"] == "NetworkPolicy"]
    rules = np["spec"]["ingress"]
    channel = [r for r in rules if {"protocol": "TCP", "port": 7700} in r.get("ports", [])]
    assert (
        len(channel) == 1
        and channel[0]["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "operator"
    )
    assert all("from" in r for r in rules if {"protocol": "TCP", "port": 7700} in r.get("ports", []))


def test_rbac_is_least_privilege() -> None:
    roles = [d for d in render() if d["kind"] == "ClusterRole"]
    verbs = {
        (g, r): set(rule["verbs"])
        for d in roles
        for rule in d["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
    }
    assert verbs[("", "secrets")] == {"get", "create"}
    assert verbs[("", "pods")] == {"get", "list", "watch", "create", "delete", "patch"}
    assert "*" not in set().union(*verbs.values())
    assert ("damops.dev", "workerpools/status") in verbs


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
