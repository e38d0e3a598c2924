"""The Helm chart and the packaging around it, checked without a cluster.

`helm lint --strict` and `helm template` with each option on (overrides, security contexts, probes,
scheduling, monitors, alert rules, dashboard, PodDisruptionBudget, `helm test`), the failure messages,
kubeconform against the Kubernetes 1.34 OpenAPI schemas (read offline from the k8s.io/kubernetes module
source), the chart README against helm-docs, the image Dockerfiles, and a core-only `pip install .`.
A check whose tool (helm, kubeconform, helm-docs, a cluster) is missing skips and says why.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import venv
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "damops"
# `helm template` otherwise assumes the version compiled into helm (1.20 for a `go install`ed one).
KUBE_VERSION = "1.34.0"
DB = ["--set", "database.url=postgresql://damops:pw@db:5432/damops"]
APP_VERSION = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]


def _skip(reason: str) -> None:
    print(f"\n[chart test skipped] {reason}", file=sys.stderr)
    pytest.skip(reason)


def helm(*args: str) -> subprocess.CompletedProcess:
    """Run helm; a test that needs it skips (saying why) where it is missing."""
    if shutil.which("helm") is None:
        _skip('helm is not on PATH (eval "$(hack/local-cluster env)" provides one, or install helm)')
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}  # nothing here talks to a cluster
    return subprocess.run(["helm", *args], capture_output=True, text=True, timeout=120, env=env)


def render_text(*extra: str, db: bool = True) -> str:
    proc = helm("template", "t", str(CHART), "-n", "ops", "--kube-version", KUBE_VERSION, *(DB if db else []), *extra)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def render(*extra: str, db: bool = True) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(render_text(*extra, db=db)) if d]


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{kind} {name}: {[d['metadata']['name'] for d in found]}"
    return found[0]


def operator_pod(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(docs, "Deployment", "t-damops-operator")["spec"]["template"]


ALL_OPTIONS = [
    *("--set", "operator.metrics.serviceMonitor.enabled=true"),
    *("--set", "operator.metrics.podMonitor.enabled=true"),
    *("--set", "operator.metrics.prometheusRule.enabled=true"),
    *("--set", "operator.metrics.grafanaDashboard.enabled=true"),
    *("--set", "operator.metrics.scrapeAnnotations=true"),
    *("--set", "workers.podDisruptionBudget.enabled=true"),
    *("--set", "operator.priorityClassName=damops-critical"),
    *("--set", "imagePullSecrets={regcred}"),
    *("--set", "commonLabels.team=media"),
]


# --------------------------------------------------------------------------- lint, failures, schema


@pytest.mark.parametrize("options", [[], ALL_OPTIONS], ids=["defaults", "all-options"])
def test_helm_lint_strict(options: list[str]) -> None:
    proc = helm("lint", str(CHART), "--strict", *DB, *options)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_no_database_fails_with_a_message_naming_the_three_ways() -> None:
    proc = helm("template", "t", str(CHART), "-n", "ops", "--kube-version", KUBE_VERSION)
    assert proc.returncode != 0
    assert "damops needs a PostgreSQL database and none is configured" in proc.stderr
    for way in (
        "--set database.existingSecret.name=",
        "--set database.url=postgresql://",
        "--set database.postgresql.enabled=true",
    ):
        assert way in proc.stderr, proc.stderr
    assert "exactly one of" in proc.stderr


def test_two_databases_fail_naming_both() -> None:
    proc = helm(
        "template", "t", str(CHART), "--kube-version", KUBE_VERSION, *DB, "--set", "database.postgresql.enabled=true"
    )
    assert proc.returncode != 0
    assert "database.url, database.postgresql.enabled" in proc.stderr, proc.stderr


def test_quick_start_with_the_bundled_postgresql() -> None:
    docs = render("--set", "database.postgresql.enabled=true", db=False)
    pg = one(docs, "Deployment", "t-damops-postgresql")
    secret = one(docs, "Secret", "t-damops-database")
    assert secret["stringData"]["url"].startswith("postgresql://damops:")
    assert "@t-damops-postgresql.ops.svc:5432/damops" in secret["stringData"]["url"]
    service = one(docs, "Service", "t-damops-postgresql")
    assert service["spec"]["selector"].items() <= pg["spec"]["template"]["metadata"]["labels"].items()
    readme = (CHART / "README.md").read_text()
    assert "--set database.postgresql.enabled=true" in readme


def test_schema_describes_every_value_and_accepts_overrides() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    missing: list[str] = []

    def walk(node: dict[str, Any], path: str) -> None:
        for key, sub in node.get("properties", {}).items():
            where = f"{path}.{key}" if path else key
            if not sub.get("description"):
                missing.append(where)
            walk(sub, where)

    walk(schema, "")
    assert not missing, f"values without a description in values.schema.json: {missing}"
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def leaves(node: Any, path: str) -> list[str]:
        if isinstance(node, dict) and node and path.count(".") < 3 and not path.endswith(("Labels", "labels")):
            return [x for k, v in node.items() for x in leaves(v, f"{path}.{k}" if path else k)]
        return [path]

    def in_schema(path: str) -> bool:
        node: dict[str, Any] = schema
        for part in path.split("."):
            if "properties" not in node:
                return True  # a free-form object (resources, securityContext, ...)
            if part not in node["properties"]:
                return False
            node = node["properties"][part]
        return True

    assert [p for p in leaves(values, "") if not in_schema(p)] == []
    # nameOverride used to be refused by the schema; unknown keys still are
    assert helm("lint", str(CHART), *DB, "--set", "nameOverride=ops").returncode == 0
    proc = helm("lint", str(CHART), *DB, "--set", "operator.typoKey=1")
    assert proc.returncode != 0 and "typoKey" in proc.stdout + proc.stderr


# --------------------------------------------------------------------------- names, labels, images


def test_name_overrides_and_common_labels() -> None:
    docs = render("--set", "fullnameOverride=acme-ops", "--set", "commonLabels.team=media")
    for d in docs:
        if d["kind"] in ("ClusterKopfPeering",):
            continue
        assert d["metadata"]["name"].startswith("acme-ops"), (d["kind"], d["metadata"]["name"])
        assert d["metadata"]["labels"]["team"] == "media", d["kind"]
    deploy = one(docs, "Deployment", "acme-ops-operator")
    assert deploy["spec"]["template"]["metadata"]["labels"]["team"] == "media"
    assert "team" not in deploy["spec"]["selector"]["matchLabels"]  # selectors stay stable
    docs = render("--set", "nameOverride=ops")
    names = {d["metadata"]["name"] for d in docs}
    assert "t-ops-operator" in names
    assert one(docs, "Deployment")["metadata"]["labels"]["app.kubernetes.io/name"] == "ops"
    np = one(docs, "NetworkPolicy")
    assert (
        np["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
        == (one(docs, "Deployment")["spec"]["selector"]["matchLabels"])
    )


def test_image_tags_default_to_app_version_and_digests_win() -> None:
    docs = render()
    container = operator_pod(docs)["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert container["image"] == f"ghcr.io/damops/damops-operator:{APP_VERSION}"
    assert env["DAMOPS_WORKER_IMAGE"] == f"ghcr.io/damops/damops-worker:{APP_VERSION}"
    assert env["DAMOPS_WORKER_IMAGE_PULL_POLICY"] == "IfNotPresent"
    digest = "sha256:" + "a" * 64
    docs = render(
        *("--set", f"image.operator.digest={digest}"),
        *("--set", "image.worker.tag=1.2.3"),
        *("--set", "image.worker.pullPolicy=Always"),
    )
    container = operator_pod(docs)["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert container["image"] == f"ghcr.io/damops/damops-operator@{digest}"
    assert env["DAMOPS_WORKER_IMAGE"] == "ghcr.io/damops/damops-worker:1.2.3"
    assert env["DAMOPS_WORKER_IMAGE_PULL_POLICY"] == "Always"
    test_pod = one(docs, "Pod")["spec"]["containers"][0]
    assert (test_pod["image"], test_pod["imagePullPolicy"]) == ("ghcr.io/damops/damops-worker:1.2.3", "Always")
    assert helm("template", "t", str(CHART), *DB, "--set", "image.worker.digest=latest").returncode != 0


# --------------------------------------------------------------------------- the operator pod


def test_operator_security_context_has_no_fixed_uid_and_is_configurable() -> None:
    pod = operator_pod(render())["spec"]
    assert pod["securityContext"] == {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    assert "runAsUser" not in json.dumps(pod)  # OpenShift's restricted SCC assigns the UID
    sc = pod["containers"][0]["securityContext"]
    assert sc["readOnlyRootFilesystem"] and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    pod = operator_pod(
        render(
            *("--set", "operator.podSecurityContext.runAsUser=1000650000"),
            *("--set", "operator.podSecurityContext.fsGroup=1000650000"),
            *("--set", "operator.securityContext.runAsGroup=0"),
        )
    )["spec"]
    assert pod["securityContext"]["runAsUser"] == 1000650000 and pod["securityContext"]["fsGroup"] == 1000650000
    assert pod["containers"][0]["securityContext"]["runAsGroup"] == 0


def test_operator_probes_use_the_kopf_health_endpoint() -> None:
    container = operator_pod(render("--set", "operator.livenessPort=8181"))["spec"]["containers"][0]
    assert "--liveness=http://0.0.0.0:8181/healthz" in container["args"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["health"] == 8181
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}, probe
    assert container["startupProbe"]["failureThreshold"] * container["startupProbe"]["periodSeconds"] >= 60
    container = operator_pod(render("--set", "operator.startupProbe=null"))["spec"]["containers"][0]
    assert "startupProbe" not in container and "readinessProbe" in container


def test_operator_scheduling_volumes_and_env_values() -> None:
    values = {
        "operator": {
            "priorityClassName": "damops-critical",
            "nodeSelector": {"pool": "system"},
            "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops", "effect": "NoSchedule"}],
            "affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}},
            "topologySpreadConstraints": [
                {"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "ScheduleAnyway"}
            ],
            "extraVolumes": [{"name": "ca", "configMap": {"name": "corp-ca"}}],
            "extraVolumeMounts": [{"name": "ca", "mountPath": "/etc/corp-ca", "readOnly": True}],
            "extraEnvFrom": [{"secretRef": {"name": "extra"}}],
            "terminationGracePeriodSeconds": 120,
        }
    }
    docs = render("--set-json", f"operator={json.dumps(values['operator'])}")
    pod = operator_pod(docs)["spec"]
    for key in ("priorityClassName", "nodeSelector", "tolerations", "affinity", "topologySpreadConstraints"):
        assert pod[key] == values["operator"][key], key
    assert pod["terminationGracePeriodSeconds"] == 120
    assert {"name": "ca", "configMap": {"name": "corp-ca"}} in pod["volumes"]
    assert {"name": "tmp", "emptyDir": {}} in pod["volumes"]
    container = pod["containers"][0]
    assert {"name": "ca", "mountPath": "/etc/corp-ca", "readOnly": True} in container["volumeMounts"]
    assert container["envFrom"] == [{"secretRef": {"name": "extra"}}]


def test_tracing_values_reach_the_operator_and_through_it_every_worker_pod() -> None:
    from damops.k8s.models import WorkerPoolSpec
    from damops.k8s.specs import WorkerDefaults, build_worker_pod_spec

    tracing = {"enabled": True, "endpoint": "http://otel-collector.observability:4318", "sampleRatio": 0.25}
    workers_env = [{"name": "OTEL_BSP_SCHEDULE_DELAY", "value": "200"}]
    docs = render(
        "--set-json", f"tracing={json.dumps(tracing)}", "--set-json", f"workers.env={json.dumps(workers_env)}"
    )
    env = {e["name"]: e.get("value") for e in operator_pod(docs)["spec"]["containers"][0]["env"]}
    expected = {
        "DAMOPS_TRACING": "true",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel-collector.observability:4318",
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0.25",
    }
    assert expected.items() <= env.items()
    # the operator reads DAMOPS_WORKER_ENV as the chart writes it, and puts it in every worker container
    pod = build_worker_pod_spec("thumbs", "ops", "u", WorkerPoolSpec(), WorkerDefaults.from_env(env))
    worker = {c["name"]: c for c in pod["spec"]["containers"]}["worker"]
    worker_env = {e["name"]: e.get("value") for e in worker["env"]}
    assert {**expected, "OTEL_BSP_SCHEDULE_DELAY": "200"}.items() <= worker_env.items()
    # off (the default): no tracing variable anywhere, and no DAMOPS_WORKER_ENV without workers.env
    plain = {e["name"] for e in operator_pod(render())["spec"]["containers"][0]["env"]}
    assert not {"DAMOPS_TRACING", "DAMOPS_WORKER_ENV", "OTEL_EXPORTER_OTLP_ENDPOINT"} & plain
    grpc = render(
        "--set", "tracing.enabled=true", "--set", "tracing.endpoint=http://c:4317", "--set", "tracing.protocol=grpc"
    )
    assert {"name": "OTEL_EXPORTER_OTLP_PROTOCOL", "value": "grpc"} in operator_pod(grpc)["spec"]["containers"][0][
        "env"
    ]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--set", "tracing.enabled=true"], "tracing.enabled=true needs tracing.endpoint"),
        (["--set", "tracing.protocol=thrift"], "/tracing/protocol"),
        (["--set-json", "tracing.sampleRatio=2"], "/tracing/sampleRatio"),
        (["--set-json", 'workers.env=[{"value": "1"}]'], "/workers/env/0"),
    ],
)
def test_bad_tracing_and_worker_env_values_stop_the_install(options: list[str], message: str) -> None:
    proc = helm("template", "t", str(CHART), "--kube-version", KUBE_VERSION, *DB, *options)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr


# --------------------------------------------------------------------------- monitoring


def _exported_metric_names() -> set[str]:
    """The sample names the operator's endpoint serves: its own and the engine's (counters end in _total)."""
    pytest.importorskip("prometheus_client", reason="prometheus_client is not installed")
    from prometheus_client.metrics import MetricWrapperBase

    from damops import metrics as engine_metrics
    from damops.k8s import metrics

    names: set[str] = set()
    for obj in [*vars(metrics).values(), *vars(engine_metrics).values()]:
        if isinstance(obj, MetricWrapperBase):
            for family in obj.describe():
                suffixes = {
                    "counter": ["_total"],
                    "gauge": [""],
                    "histogram": ["_bucket", "_sum", "_count"],
                    "summary": ["", "_sum", "_count"],
                }
                names.update(family.name + s for s in suffixes.get(family.type, [""]))
    return names


def _metrics_in(promql: str) -> set[str]:
    return set(re.findall(r"\b(damops_[a-z_]+)", promql))


def test_service_monitor_and_pod_monitor_select_the_operator() -> None:
    docs = render(*ALL_OPTIONS)
    service = one(docs, "Service", "t-damops-metrics")
    sm = one(docs, "ServiceMonitor")
    assert sm["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert sm["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert sm["spec"]["namespaceSelector"] == {"matchNames": ["ops"]}
    pod = operator_pod(docs)
    pm = one(docs, "PodMonitor")
    assert pm["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    ports = {p["name"]: p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]}
    assert pm["spec"]["podMetricsEndpoints"][0]["port"] in ports
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == str(ports["metrics"])
    proc = helm(
        "template",
        "t",
        str(CHART),
        "--kube-version",
        KUBE_VERSION,
        *DB,
        *("--set", "operator.metrics.serviceMonitor.enabled=true", "--set", "operator.metrics.service=false"),
    )
    assert proc.returncode != 0 and "needs operator.metrics.service=true" in proc.stderr
    assert not [d for d in render() if d["kind"] in ("ServiceMonitor", "PodMonitor", "PrometheusRule", "ConfigMap")]


def test_prometheus_rule_alerts_use_metrics_the_operator_exports() -> None:
    docs = render(
        *ALL_OPTIONS,
        *("--set", "operator.metrics.prometheusRule.failureRatio=0.25"),
        *("--set", "operator.metrics.prometheusRule.alertLabels.team=media"),
    )
    rule = one(docs, "PrometheusRule")
    rules = rule["spec"]["groups"][0]["rules"]
    alerts = {r["alert"]: r for r in rules}
    assert {
        "DamopsOperatorDown",
        "DamopsQueueNotDraining",
        "DamopsQueueLatencyHigh",
        "DamopsOperationFailureRateHigh",
        "DamopsWorkersNotReady",
        "DamopsNoReadyWorkers",
        "DamopsWorkerRestartsHigh",
    } <= set(alerts)
    exported = _exported_metric_names()
    for r in rules:
        used = _metrics_in(r["expr"])
        assert used <= exported, f"{r['alert']} uses metrics the operator does not export: {used - exported}"
        assert r["labels"]["severity"] in ("warning", "critical") and r["labels"]["team"] == "media"
        assert r["annotations"]["summary"] and r["annotations"]["description"]
        assert "{{" not in r["expr"]
    assert "> 0.25" in alerts["DamopsOperationFailureRateHigh"]["expr"]
    assert 'job=~"t-damops-metrics|ops/t-damops"' in alerts["DamopsOperatorDown"]["expr"]
    # Prometheus templates survive helm's templating
    assert "{{ $labels.workerpool }}" in alerts["DamopsQueueNotDraining"]["annotations"]["description"]


def test_grafana_dashboard_configmap_matches_docs_and_uses_exported_metrics() -> None:
    docs = render(*ALL_OPTIONS, "--set", "operator.metrics.grafanaDashboard.namespace=grafana")
    cm = one(docs, "ConfigMap", "t-damops-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["namespace"] == "grafana"
    shipped = (CHART / "dashboards" / "damops.json").read_text()
    assert (ROOT / "docs" / "grafana-dashboard.json").read_text() == shipped
    dashboard = json.loads(cm["data"]["damops.json"])
    assert dashboard == json.loads(shipped)
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 8
    exported = _exported_metric_names()
    for expr in exprs:
        assert _metrics_in(expr) and _metrics_in(expr) <= exported, expr
    assert {v["name"] for v in dashboard["templating"]["list"]} == {"datasource", "namespace", "workerpool"}


# --------------------------------------------------------------------------- worker PDB, helm test, NOTES


def test_worker_pdb_selects_the_pods_the_operator_creates() -> None:
    pytest.importorskip("kopf", reason="damops.k8s needs the k8s extra (pip install -e '.[k8s]')")
    from damops.k8s.models import WorkerPoolSpec
    from damops.k8s.specs import build_worker_pod_spec

    pod_labels = build_worker_pod_spec("images", "ops", "uid", WorkerPoolSpec())["metadata"]["labels"]
    docs = render(
        "--set", "workers.podDisruptionBudget.enabled=true", "--set", "networkPolicy.workerNamespaces={media}"
    )
    pdbs = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    assert {p["metadata"]["namespace"] for p in pdbs} == {"ops", "media"}
    for pdb in pdbs:
        assert pdb["spec"]["maxUnavailable"] == 1 and "minAvailable" not in pdb["spec"]
        assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    docs = render(
        *("--set", "workers.podDisruptionBudget.enabled=true", "--set", "workers.podDisruptionBudget.minAvailable=50%"),
        *("--set", "workers.podDisruptionBudget.pools={images,other}"),
    )
    pdbs = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PodDisruptionBudget"}
    assert set(pdbs) == {"t-damops-workers-images", "t-damops-workers-other"}
    images = pdbs["t-damops-workers-images"]["spec"]
    assert images["minAvailable"] == "50%" and "maxUnavailable" not in images
    assert images["selector"]["matchLabels"].items() <= pod_labels.items()
    other = pdbs["t-damops-workers-other"]["spec"]["selector"]["matchLabels"]
    assert not other.items() <= pod_labels.items()


def test_helm_test_objects() -> None:
    docs = render()
    pool = one(docs, "WorkerPool")
    pod = one(docs, "Pod")
    for d in (pool, pod):
        assert d["metadata"]["annotations"]["helm.sh/hook"] == "test"
        assert "hook-succeeded" in d["metadata"]["annotations"]["helm.sh/hook-delete-policy"]
    assert int(pool["metadata"]["annotations"]["helm.sh/hook-weight"]) < int(
        pod["metadata"]["annotations"]["helm.sh/hook-weight"]
    )
    env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
    assert env["POOL"]["value"] == pool["spec"]["pool"] == "t-damops-helm-test"
    assert env["DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {"name": "t-damops-database", "key": "url"}
    assert pod["spec"]["restartPolicy"] == "Never"
    # the pool goes where the operator looks for WorkerPools
    docs = render("--set", "operator.watchNamespaces={media,ops}")
    assert one(docs, "WorkerPool")["metadata"]["namespace"] == "ops"
    docs = render("--set", "operator.watchNamespaces={media}")
    assert one(docs, "WorkerPool")["metadata"]["namespace"] == "media"
    assert not [d for d in render("--set", "tests.enabled=false") if d["kind"] in ("Pod", "WorkerPool")]


def test_helm_test_script_sees_success_with_a_real_scheduler(database_url: str, tmp_path: Path) -> None:
    """Run the test pod's own script against a real database served by `damops run` (local workers).
    Its first `damops status` fails, as one would while the database restarts: the script polls on."""
    pod = one(render("--set", "tests.timeoutSeconds=120"), "Pod")
    container = pod["spec"]["containers"][0]
    assert container["command"] == ["sh", "-ec"]
    script = container["args"][0]
    bindir = str(Path(sys.executable).parent)
    # the injected fault: a `damops` ahead on PATH whose first `status` exits 2, as the real one does
    # when it cannot connect; every other call is the real command
    faulty = tmp_path / "faulty-bin"
    faulty.mkdir()
    (faulty / "damops").write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = status ] && [ ! -e {tmp_path}/failed-once ]; then\n'
        f"  : > {tmp_path}/failed-once\n"
        '  echo "damops: cannot connect to the database (injected)" >&2; exit 2\n'
        "fi\n"
        f'exec {bindir}/damops "$@"\n'
    )
    (faulty / "damops").chmod(0o755)
    env = {
        **os.environ,
        "PATH": os.pathsep.join((str(faulty), bindir, os.environ["PATH"])),
        "DATABASE_URL": database_url,
        "POOL": "chart-helm-test",
        "TIMEOUT": "120",
        "DAMOPS_HOME": str(tmp_path / "home"),
    }
    runner = subprocess.Popen(
        [str(Path(bindir) / "damops"), "run", "--pool", "chart-helm-test", "--workers", "1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "runner.log", "w"),  # noqa: SIM115 - closed with the process
        start_new_session=True,
    )
    try:
        proc = subprocess.run(["sh", "-ec", script], env=env, capture_output=True, text=True, timeout=180)
    finally:
        os.killpg(runner.pid, signal.SIGINT)
        try:
            runner.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(runner.pid, signal.SIGKILL)
            runner.wait()
    assert proc.returncode == 0, proc.stdout + proc.stderr + (tmp_path / "runner.log").read_text()[-3000:]
    assert (tmp_path / "failed-once").exists(), "the fault was not injected"
    assert re.search(r"operation \d+: unknown \(damops status failed\)", proc.stdout), proc.stdout
    assert re.search(r"operation \d+: SUCCESS", proc.stdout), proc.stdout


def test_helm_test_script_fails_when_no_worker_serves_the_pool(database_url: str) -> None:
    script = one(render(), "Pod")["spec"]["containers"][0]["args"][0]
    env = {
        **os.environ,
        "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"],
        "DATABASE_URL": database_url,
        "POOL": "nobody-serves-this",
        "TIMEOUT": "3",
    }
    proc = subprocess.run(["sh", "-ec", script], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "still NEW after 3s" in proc.stdout, proc.stdout


def render_notes(tmp_path: Path, *extra: str) -> str:
    """NOTES.txt as `helm install` prints it (`helm template` skips NOTES; here a copy of the chart
    renders it through `tpl` into a ConfigMap)."""
    chart = tmp_path / "damops"
    shutil.copytree(CHART, chart)
    (chart / "notes.txt").write_text((CHART / "templates" / "NOTES.txt").read_text())
    (chart / "templates" / "zz-notes.yaml").write_text(
        'apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\ndata:\n  notes: {{ tpl (.Files.Get "notes.txt") . | toJson }}\n'
    )
    proc = helm("template", "t", str(chart), "-n", "ops", "--kube-version", KUBE_VERSION, *extra)
    assert proc.returncode == 0, proc.stderr
    [cm] = [d for d in yaml.safe_load_all(proc.stdout) if d and d["metadata"]["name"] == "notes"]
    return cm["data"]["notes"]


@pytest.mark.parametrize(
    "options",
    [DB, ["--set", "database.postgresql.enabled=true", "--set", "operator.watchNamespaces={media}"]],
    ids=["defaults", "namespaced-bundled-postgresql"],
)
def test_notes_pass_the_namespace_and_do_not_point_into_the_repository(options: list[str], tmp_path: Path) -> None:
    notes = render_notes(tmp_path, *options)
    assert "helm/damops" not in notes and "examples/" not in notes
    commands = [line for line in notes.splitlines() if re.search(r"(^|\| )\s*(kubectl|helm (test|upgrade))\b", line)]
    assert len(commands) >= 6, notes
    for line in commands:
        if "/crds/" not in line:  # CRDs are cluster-scoped
            assert re.search(r" -n [a-z]", line), line
    assert "helm test t -n ops" in notes
    assert "kubectl apply --server-side --force-conflicts -f /tmp/damops-new/damops/crds/" in notes
    if "watchNamespaces" in " ".join(options):
        assert "kubectl apply -n media -f -" in notes and "bundled PostgreSQL is for trying damops out" in notes
    else:
        assert "kubectl apply -n ops -f -" in notes and "bundled PostgreSQL" not in notes
    wp = json.loads(re.search(r"echo '(\{.*\})'", notes).group(1))
    assert wp["kind"] == "WorkerPool" and wp["spec"]["replicas"] == 3


# --------------------------------------------------------------------------- CRD upgrades


def _crd_files() -> str:
    """The chart's CRDs as `kubectl apply -f crds/` reads them: each file on its own."""
    return "".join(f"---\n{f.read_text()}\n" for f in sorted((CHART / "crds").glob("*.yaml")))


def test_crd_upgrade_step_applies_exactly_the_chart_crds(tmp_path: Path) -> None:
    """`helm upgrade` never touches crds/; the documented step applies the packaged chart's crds/ first."""
    import tarfile

    proc = helm("package", str(CHART), "--destination", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    [package] = tmp_path.glob("damops-*.tgz")
    with tarfile.open(package) as tar:
        tar.extractall(tmp_path / "untar", filter="data")  # what `helm pull --untar` leaves
    packaged = sorted((tmp_path / "untar" / "damops" / "crds").glob("*.yaml"))
    assert [f.name for f in packaged] == [f.name for f in sorted((CHART / "crds").glob("*.yaml"))]
    crds = [d for f in packaged for d in yaml.safe_load_all(f.read_text()) if d]
    assert all(d["kind"] == "CustomResourceDefinition" for d in crds)
    assert "workerpools.damops.dev" in {d["metadata"]["name"] for d in crds}
    for text in ((CHART / "README.md").read_text(), (CHART / "templates" / "NOTES.txt").read_text()):
        pull = re.search(r"helm pull \S+ --version .+ --untar --untardir (\S+)", text)
        apply = re.search(r"kubectl apply --server-side --force-conflicts -f (\S+)/damops/crds/", text)
        upgrade = re.search(r"helm upgrade .+ --version", text)
        assert pull and apply and upgrade, "the CRD step before helm upgrade is documented"
        assert pull.group(1) == apply.group(1) and pull.start() < apply.start() < upgrade.start()
    assert not [d for d in render() if d["kind"] == "CustomResourceDefinition"]  # not templates: never deleted


def test_crd_upgrade_step_on_the_cluster_as_a_server_side_dry_run() -> None:
    """Where a cluster is reachable: the step's kubectl apply is accepted (dry run, nothing changes)."""
    if not os.environ.get("KUBECONFIG") or shutil.which("kubectl") is None:
        _skip("no KUBECONFIG or no kubectl: the server-side dry run of the CRD step needs a cluster")
    probe = subprocess.run(["kubectl", "version", "-o", "json"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0 or "serverVersion" not in probe.stdout:
        _skip(f"the cluster in KUBECONFIG does not answer: {probe.stderr.strip()[:200]}")
    proc = subprocess.run(
        ["kubectl", "apply", "--server-side", "--force-conflicts", "--dry-run=server", "-f", str(CHART / "crds")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "workerpools.damops.dev" in proc.stdout


# --------------------------------------------------------------------------- kubeconform


def _openapi_spec() -> Path | None:
    env = os.environ.get("DAMOPS_K8S_OPENAPI_SPEC")
    if env:
        return Path(env)
    for base in (
        Path.home() / ".cache" / "damops" / "go" / "pkg" / "mod",
        Path(os.environ.get("GOMODCACHE", Path.home() / "go" / "pkg" / "mod")),
    ):
        p = base / "k8s.io" / "kubernetes@v1.34.4" / "api" / "openapi-spec" / "swagger.json"
        if p.exists():
            return p
    return None


def _strict(node: Any) -> Any:
    """kubeconform's -strict: objects with declared properties take no others."""
    if isinstance(node, dict):
        out = {k: _strict(v) for k, v in node.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(node, list):
        return [_strict(v) for v in node]
    return node


def _write_schemas(spec: Path, out: Path, kinds: set[tuple[str, str]]) -> None:
    """Standalone JSON schemas named like kubeconform's ({kind}-{group}-{version}.json) from the
    Kubernetes OpenAPI v2 spec, for the (apiVersion, kind) pairs rendered."""
    definitions = json.loads(spec.read_text())["definitions"]
    # The v2 spec types these as strings; the API server takes numbers too.
    definitions["io.k8s.apimachinery.pkg.util.intstr.IntOrString"] = {
        "oneOf": [{"type": "string"}, {"type": "integer"}]
    }
    definitions["io.k8s.apimachinery.pkg.api.resource.Quantity"] = {"oneOf": [{"type": "string"}, {"type": "number"}]}
    by_gvk: dict[tuple[str, str], str] = {}
    for name, d in definitions.items():
        for gvk in d.get("x-kubernetes-group-version-kind", []):
            api = f"{gvk['group']}/{gvk['version']}" if gvk["group"] else gvk["version"]
            by_gvk[(api, gvk["kind"])] = name

    def refs(node: Any, seen: set[str]) -> None:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/definitions/"):
                target = ref.removeprefix("#/definitions/")
                if target not in seen:
                    seen.add(target)
                    refs(definitions[target], seen)
            for v in node.values():
                refs(v, seen)
        elif isinstance(node, list):
            for v in node:
                refs(v, seen)

    for api, kind in kinds:
        if (api, kind) not in by_gvk:
            continue
        root = by_gvk[(api, kind)]
        needed: set[str] = set()
        refs(definitions[root], needed)
        schema = {**definitions[root], "definitions": {n: definitions[n] for n in needed}}
        group_version = api.split("/")
        suffix = group_version[0].split(".")[0] + (f"-{group_version[1]}" if len(group_version) > 1 else "")
        (out / f"{kind.lower()}-{suffix.lower()}.json").write_text(json.dumps(_strict(schema)))
    # custom resources of the chart: their CRDs' schemas
    for f in (CHART / "crds").glob("*.yaml"):
        for crd in yaml.safe_load_all(f.read_text()):
            if not crd:
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for v in crd["spec"]["versions"]:
                name = f"{kind.lower()}-{group.split('.')[0]}-{v['name']}.json"
                schema = dict(v["schema"]["openAPIV3Schema"])
                # the API server always takes these at the top of a custom resource
                schema["properties"] = {
                    "apiVersion": {"type": "string"},
                    "kind": {"type": "string"},
                    "metadata": {"type": "object"},
                    **schema.get("properties", {}),
                }
                (out / name).write_text(json.dumps(_strict(schema)))


MONITORING_KINDS = ("ServiceMonitor", "PodMonitor", "PrometheusRule")


@pytest.mark.parametrize(
    "options",
    [
        [],
        ALL_OPTIONS,
        ["--set", "operator.watchNamespaces={a,b}", "--set", "workers.podDisruptionBudget.enabled=true"],
        ["--set", "database.postgresql.enabled=true", "--set", "database.postgresql.persistence.enabled=true"],
    ],
    ids=["defaults", "all-options", "namespaced", "bundled-postgresql"],
)
def test_kubeconform_against_kubernetes_1_34_offline(options: list[str], tmp_path: Path) -> None:
    kubeconform = shutil.which("kubeconform")
    if kubeconform is None:
        _skip("kubeconform is not on PATH (go install github.com/yannh/kubeconform/cmd/kubeconform@v0.8.0)")
    spec = _openapi_spec()
    if spec is None or not spec.exists():
        _skip(
            "no Kubernetes 1.34 OpenAPI spec offline: k8s.io/kubernetes@v1.34.4/api/openapi-spec/swagger.json is not "
            "in the Go module cache (set DAMOPS_K8S_OPENAPI_SPEC to a swagger.json)"
        )
    db = not any(o.startswith("database.") for o in options)
    text = render_text(*options, db=db)
    crds = _crd_files()
    docs = [d for d in yaml.safe_load_all(text + "\n" + crds) if d]
    kinds = {(d["apiVersion"], d["kind"]) for d in docs}
    _write_schemas(spec, tmp_path, kinds)
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(text + "\n" + crds)
    proc = subprocess.run(
        [
            kubeconform,
            "-strict",
            "-summary",
            "-output",
            "json",
            "-kubernetes-version",
            "1.34.4",
            "-schema-location",
            str(tmp_path / "{{ .ResourceKind }}{{ .KindSuffix }}.json"),
            "-skip",
            ",".join(MONITORING_KINDS),  # monitoring.coreos.com schemas are not available offline
            str(manifest),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    report = json.loads(proc.stdout)
    bad = [r for r in report["resources"] if r["status"] not in ("statusValid", "statusSkipped")]
    assert proc.returncode == 0 and not bad, json.dumps(bad or report, indent=1)[:4000]
    summary = report["summary"]
    expected = len([d for d in docs if d["kind"] not in MONITORING_KINDS])
    assert summary["valid"] == expected and summary["invalid"] == summary["errors"] == 0, summary


# --------------------------------------------------------------------------- README, images, packaging


def test_chart_readme_documents_every_value_and_is_up_to_date() -> None:
    readme = (CHART / "README.md").read_text()
    values_text = (CHART / "values.yaml").read_text()
    documented = len(re.findall(r"^\s*# -- ", values_text, flags=re.M))
    rows = [r for r in re.findall(r"^\| ([A-Za-z0-9_.]+) \| ", readme, flags=re.M) if r != "Key"]
    assert len(rows) == documented, "every `# --` value is a row of the README's values table"
    for key in ("nameOverride", "fullnameOverride", "commonLabels", "operator.podSecurityContext", "tests.enabled"):
        assert key in rows
    helm_docs = shutil.which("helm-docs")
    if helm_docs is None:
        _skip("helm-docs is not on PATH (go install github.com/norwoodj/helm-docs/cmd/helm-docs@v1.14.2)")
    proc = subprocess.run(
        [helm_docs, "-c", str(CHART.parent), "-s", "file", "--dry-run", "-l", "error"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == readme.strip(), "README.md is stale: run `helm-docs -c helm -s file`"


def test_dockerfile_targets_and_compat_files() -> None:
    dockerfile = (ROOT / "worker_image" / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", dockerfile, flags=re.M | re.I)
    names = [alias for _, alias in stages]
    assert {"worker", "operator"} <= set(names)
    assert re.search(r"^ARG BASE_IMAGE=\S+:\d+\.\d+\.\d+-slim-\w+", dockerfile, flags=re.M), "a pinned base"
    # Each build stage's name and the first package it pip-installs after its FROM line.
    stage_install = r'^FROM\s+\S+\s+AS\s+(build-\w+)\n(?:.*\n)*?.*pip install --no-compile "(/src\[[^\]]*\])"'
    installs = dict(re.findall(stage_install, dockerfile, flags=re.M))
    # Both images send spans over OTLP once tracing is on; only the operator needs kopf and the client.
    assert installs == {"build-worker": "/src[otel]", "build-operator": "/src[k8s,otel]"}, installs
    for label in ("title", "version", "revision", "source", "licenses", "created"):
        assert f"org.opencontainers.image.{label}=" in dockerfile, label
    for target in ("worker", "operator"):
        compat = (ROOT / "worker_image" / f"Dockerfile.{target}").read_text()
        assert compat.startswith(dockerfile), f"Dockerfile.{target} must be worker_image/Dockerfile plus one stage"
        tail = compat[len(dockerfile) :]
        assert re.findall(r"^FROM\s+(\S+)\s*$", tail, flags=re.M) == [target]


def test_core_install_runs_without_kopf_and_kubernetes(tmp_path: Path) -> None:
    """`pip install .` (no extra) into a fresh venv gives a working `damops` without the Kubernetes stack."""
    if os.environ.get("DAMOPS_SKIP_INSTALL_TEST"):
        _skip("DAMOPS_SKIP_INSTALL_TEST is set")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    started = time.monotonic()
    proc = subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    if proc.returncode != 0 and ("Could not fetch URL" in proc.stderr or "No matching distribution" in proc.stderr):
        _skip(f"the package index is not reachable: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr
    print(f"core install took {time.monotonic() - started:.0f}s", file=sys.stderr)
    check = subprocess.run(
        [
            str(py),
            "-c",
            "import importlib.util as u; missing = [m for m in ('kopf', 'kubernetes') if u.find_spec(m)]; "
            "print(missing); import damops.cli",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert check.returncode == 0 and check.stdout.strip() == "[]", check.stdout + check.stderr
    help_ = subprocess.run(
        [str(env_dir / "bin" / "damops"), "--help"], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert help_.returncode == 0 and "enqueue" in help_.stdout, help_.stderr


# --------------------------------------------------------------------------- lifecycle keys, dashboard


def _operator_env(docs: list[dict[str, Any]]) -> dict[str, str]:
    deployment = one(docs, "Deployment", "t-damops-operator")
    return {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}


def test_lifecycle_settings_reach_the_operator_next_to_the_seeds_keys() -> None:
    env = _operator_env(
        render(
            "--set",
            "configuration.digitalAssetManagement.retryBackoffBase=2m",
            "--set",
            "configuration.digitalAssetManagement.successOperationThresholdLimitRecords=5",
            "--set-json",
            'configuration.digitalAssetManagement.periodic=[{"name":"nightly","cron":"0 3 * * *",'
            '"trigger_function":"noop"}]',
        )
    )
    assert env["RETRY_BACKOFF_BASE"] == "2m" and env["RETRY_BACKOFF_MAX"] == "30m"
    assert env["SUCCESS_OPERATION_THRESHOLD_LIMIT_RECORDS"] == "5" and env["CANCEL_GRACE"] == "10s"
    assert env["CANCELLED_OPERATION_THRESHOLD_TIME_HOURS"] == "24"
    assert json.loads(env["DAMOPS_PERIODIC"]) == [{"name": "nightly", "cron": "0 3 * * *", "trigger_function": "noop"}]
    assert "DAMOPS_PERIODIC" not in _operator_env(render())
    bad = helm("template", "t", str(CHART), *DB, "--set", "configuration.digitalAssetManagement.retryBackoffJitter=2")
    assert bad.returncode != 0 and "retryBackoffJitter" in bad.stderr


def test_the_dashboard_is_off_by_default_and_on_serves_damops_ui_behind_a_service() -> None:
    assert not [d for d in render() if d["metadata"]["name"].endswith("-dashboard")]
    docs = render(
        "--set",
        "dashboard.enabled=true",
        "--set",
        "dashboard.tokenSecret.name=ui-token",
        "--set",
        "dashboard.ingress.enabled=true",
        "--set",
        "dashboard.ingress.host=ops.example",
    )
    container = one(docs, "Deployment", "t-damops-dashboard")["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][:2] == ["damops", "ui"] and "0.0.0.0" in container["command"]
    env = {e["name"]: e for e in container["env"]}
    assert env["DAMOPS_UI_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "ui-token", "key": "token"}
    assert "secretKeyRef" in env["DATABASE_URL"]["valueFrom"]
    service = one(docs, "Service", "t-damops-dashboard")
    assert service["spec"]["type"] == "ClusterIP" and service["spec"]["ports"][0]["port"] == 8765
    ingress = one(docs, "Ingress", "t-damops-dashboard")
    assert ingress["spec"]["rules"][0]["host"] == "ops.example"
    read_only = render("--set", "dashboard.enabled=true")
    ro_env = one(read_only, "Deployment", "t-damops-dashboard")["spec"]["template"]["spec"]["containers"][0]["env"]
    assert "DAMOPS_UI_TOKEN" not in {e["name"] for e in ro_env}


# --------------------------------------------------------------------------- release workflow


def test_release_workflow_builds_both_images_and_the_chart_on_a_tag_and_passes_actionlint(tmp_path: Path) -> None:
    path = ROOT / ".github" / "workflows" / "release.yml"
    workflow = yaml.safe_load(path.read_text())
    assert workflow[True]["push"]["tags"] == ["v*.*.*"]  # YAML reads the key `on` as True
    text = path.read_text()
    assert "target: [worker, operator]" in text and "helm package" in text and "helm push" in text
    actionlint = shutil.which("actionlint")
    if actionlint is None:
        _skip("actionlint is not on PATH (go install github.com/rhysd/actionlint/cmd/actionlint@v1.7.12)")
    proc = subprocess.run([actionlint, "-color=false", str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # the linter really reads it: a job that needs a job that does not exist is an error
    broken = tmp_path / "release.yml"
    broken.write_text(text.replace("runs-on: ubuntu-24.04", "runs-on: ubuntu-24.04\n    needs: [no-such-job]", 1))
    proc = subprocess.run([actionlint, "-color=false", str(broken)], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "no-such-job" in proc.stdout, proc.stdout


def test_worker_prefetch_value_reaches_the_operator_as_a_setting() -> None:
    pytest.importorskip("kopf", reason="damops.k8s needs the k8s extra (pip install -e '.[k8s]')")
    from damops.config import Settings

    for value, expected in (("false", False), ("true", True)):
        pod = operator_pod(render("--set", f"configuration.digitalAssetManagement.workerPrefetch={value}"))
        env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
        assert Settings(WORKER_PREFETCH=env["WORKER_PREFETCH"]).worker_prefetch is expected
    pod = operator_pod(render())
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert Settings(WORKER_PREFETCH_DEPTH=env["WORKER_PREFETCH_DEPTH"]).worker_prefetch_depth == 1
    pod = operator_pod(render("--set", "configuration.digitalAssetManagement.workerPrefetchDepth=6"))
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert Settings(WORKER_PREFETCH_DEPTH=env["WORKER_PREFETCH_DEPTH"]).worker_prefetch_depth == 6
    assert Settings(WORKER_PREFETCH_MAX_WAIT=env["WORKER_PREFETCH_MAX_WAIT"]).worker_prefetch_max_wait == 1.0
    pod = operator_pod(render("--set", "configuration.digitalAssetManagement.workerPrefetchMaxWait=300ms"))
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert Settings(WORKER_PREFETCH_MAX_WAIT=env["WORKER_PREFETCH_MAX_WAIT"]).worker_prefetch_max_wait == 0.3


def test_operation_log_value_turns_the_operators_line_per_run_off() -> None:
    pytest.importorskip("kopf", reason="damops.k8s needs the k8s extra (pip install -e '.[k8s]')")
    from damops.k8s.main import build_parser

    for sets, expected in (((), True), (("--set", "operator.operationLog=false"), False)):
        args = operator_pod(render(*sets))["spec"]["containers"][0]["args"]
        assert build_parser().parse_args(args).operation_log is expected
