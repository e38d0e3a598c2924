"""A real cluster through kubectl and helm, for the e2e suite and ``bench/k8s.py``.

Everything here shells out to the ``kubectl`` and ``helm`` on PATH and to the
cluster ``KUBECONFIG`` names; nothing is mocked.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "damops"
WORKER_SELECTOR = "app.kubernetes.io/component=worker"
OPERATOR_SELECTOR = "app.kubernetes.io/component=operator"


@dataclass(frozen=True)
class Images:
    """The images under test and how the cluster gets them (DAMOPS_E2E_* variables)."""

    worker: str = "localhost/damops-worker:dev"
    operator: str = "localhost/damops-operator:dev"
    pull_policy: str = "IfNotPresent"

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Images:
        return cls(
            worker=env.get("DAMOPS_E2E_IMAGE_WORKER", cls.worker),
            operator=env.get("DAMOPS_E2E_IMAGE_OPERATOR", cls.operator),
            pull_policy=env.get("DAMOPS_E2E_PULL_POLICY", cls.pull_policy),
        )


def pod_ready(pod: dict[str, Any]) -> bool:
    conds = {c["type"]: c["status"] for c in pod.get("status", {}).get("conditions", [])}
    return conds.get("Ready") == "True"


def condition(wp: dict[str, Any], ctype: str) -> str | None:
    for c in (wp.get("status") or {}).get("conditions", []):
        if c["type"] == ctype:
            return str(c["status"])
    return None


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text format, read by the prometheus client's own parser → {'name{k="v",...}': value}."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = float(sample.value)
    return samples


@dataclass(frozen=True)
class Namespace:
    """One namespace of the cluster: kubectl in it, and waiting on what it shows."""

    name: str

    def kubectl(
        self, *args: str, check: bool = True, timeout: float = 60, stdin: str | None = None
    ) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            ["kubectl", "-n", self.name, *args], capture_output=True, text=True, timeout=timeout, input=stdin
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def kjson(self, *args: str) -> Any:
        return json.loads(self.kubectl(*args, "-o", "json").stdout)

    def wait_for(self, what: str, predicate: Callable[[], Any], timeout: float = 180, interval: float = 1.0) -> Any:
        """Poll ``predicate`` until it returns something truthy; on timeout fail with the pools, pods and events."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            last = predicate()
            if last:
                return last
            time.sleep(interval)
        dump = self.kubectl("get", "workerpools,pods", "-o", "wide", check=False).stdout
        events = self.kubectl("get", "events", "--sort-by=.lastTimestamp", check=False).stdout[-3000:]
        raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})\n{dump}\n{events}")

    def pods(self, pool: str) -> list[dict[str, Any]]:
        return list(self.kjson("get", "pods", "-l", f"damops.dev/workerpool={pool},{WORKER_SELECTOR}")["items"])

    def live_pods(self, pool: str) -> list[dict[str, Any]]:
        return [p for p in self.pods(pool) if not p["metadata"].get("deletionTimestamp")]

    def workerpool(self, name: str) -> dict[str, Any]:
        return dict(self.kjson("get", "workerpool", name))

    def apply(self, body: dict[str, Any]) -> None:
        self.kubectl("apply", "-f", "-", stdin=json.dumps(body))

    def operator_pod(self) -> dict[str, Any] | None:
        """The one Ready operator pod, or None while there is not exactly one."""
        items = self.kjson("get", "pods", "-l", OPERATOR_SELECTOR)["items"]
        ready = [p for p in items if not p["metadata"].get("deletionTimestamp") and pod_ready(p)]
        return ready[0] if len(ready) == 1 else None

    def operator_metrics(self) -> dict[str, float]:
        """The operator's Prometheus samples (through the API server's pod proxy: works wherever kubectl does)."""
        pod = self.operator_pod()
        assert pod is not None, "no single Ready operator pod"
        path = f"/api/v1/namespaces/{self.name}/pods/{pod['metadata']['name']}:9090/proxy/metrics"
        text = subprocess.run(["kubectl", "get", "--raw", path], capture_output=True, text=True, timeout=30, check=True)
        return parse_metrics(text.stdout)


def install_operator(
    ns: Namespace,
    release: str,
    pod_database_url: str,
    images: Images,
    sets: Mapping[str, str] = {},
    strings: Mapping[str, str] = {},
) -> subprocess.CompletedProcess:
    """Create the namespace and ``helm upgrade --install`` the chart watching only it."""
    subprocess.run(["kubectl", "create", "namespace", ns.name], capture_output=True, timeout=30)
    repo, tag = images.operator.rsplit(":", 1)
    wrepo, wtag = images.worker.rsplit(":", 1)
    values = {
        "database.url": pod_database_url,
        "image.operator.repository": repo,
        "image.operator.tag": tag,
        "image.operator.pullPolicy": images.pull_policy,
        "image.worker.repository": wrepo,
        "image.worker.tag": wtag,
        "image.worker.pullPolicy": images.pull_policy,
        "operator.watchNamespaces": f"{{{ns.name}}}",
        "operator.peering.name": release,
        "operator.logFormat": "plain",
        **sets,
    }
    cmd = ["helm", "upgrade", "--install", release, str(CHART), "-n", ns.name, "--wait", "--timeout", "240s"]
    cmd += [a for k, v in values.items() for a in ("--set", f"{k}={v}")]
    cmd += [a for k, v in strings.items() for a in ("--set-string", f"{k}={v}")]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def uninstall_operator(ns: Namespace, release: str) -> None:
    """Delete the pools, stop the operator while its RBAC still exists (it leaves the peering cleanly), uninstall."""
    ns.kubectl("delete", "workerpools", "--all", "--wait=true", "--timeout=120s", check=False, timeout=150)
    ns.kubectl("scale", f"deployment/{release}-operator", "--replicas=0", check=False)
    ns.kubectl("wait", "pod", "-l", OPERATOR_SELECTOR, "--for=delete", "--timeout=120s", check=False, timeout=150)
    subprocess.run(
        ["helm", "uninstall", release, "-n", ns.name, "--wait", "--timeout", "120s"], capture_output=True, timeout=150
    )
    subprocess.run(["kubectl", "delete", "namespace", ns.name, "--wait=false"], capture_output=True, timeout=60)
