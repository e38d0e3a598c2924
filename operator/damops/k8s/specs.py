"""Pure builders of the Kubernetes manifests the operator creates.

No API calls here (dask-kubernetes style): each function takes plain values
and returns the dict to send, so the shapes are unit-tested without a cluster.
"""

from __future__ import annotations

import hashlib
import json
import secrets as _secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import TypeAdapter, ValidationError

from damops.config import ConfigError
from damops.k8s import API_VERSION, KIND
from damops.k8s.models import EnvVar, WorkerPoolSpec

SIDECAR_PORT = 7700
HEALTH_PORT = 7701
SOCKET_DIR = "/run/damops"
SOCKET_PATH = f"{SOCKET_DIR}/worker.sock"
SECRET_KEY = "secret"

LABEL_POOL = "damops.dev/workerpool"
LABEL_HASH = "damops.dev/template-hash"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_NAME = "app.kubernetes.io/name"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
ANNOTATION_DRAINING = "damops.dev/draining"
#: honoured by ReplicaSet-style controllers and read by people: lower = deleted first
ANNOTATION_DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
COST_PENDING = "0"
COST_IDLE = "100"
COST_BUSY = "1000"
WORKER_COMPONENT = "worker"
MANAGED_BY = "damops-operator"
DEFAULT_IMAGE = "localhost/damops-worker:dev"
PullPolicy = Literal["Always", "IfNotPresent", "Never"]
PULL_POLICIES: tuple[PullPolicy, ...] = ("Always", "IfNotPresent", "Never")


@dataclass(frozen=True)
class WorkerDefaults:
    """What every WorkerPool gets from the operator's settings: the image and pull policy
    when its spec leaves them out, and environment variables ahead of its spec.env."""

    image: str = DEFAULT_IMAGE
    pull_policy: PullPolicy = "IfNotPresent"
    env: tuple[EnvVar, ...] = ()

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> WorkerDefaults:
        """DAMOPS_WORKER_IMAGE, DAMOPS_WORKER_IMAGE_PULL_POLICY and DAMOPS_WORKER_ENV (a JSON
        list of Pod env entries), as the chart sets them."""
        policy = env.get("DAMOPS_WORKER_IMAGE_PULL_POLICY") or cls.pull_policy
        if policy not in PULL_POLICIES:
            raise ConfigError(f"DAMOPS_WORKER_IMAGE_PULL_POLICY={policy!r}: expected one of {', '.join(PULL_POLICIES)}")
        return cls(
            image=env.get("DAMOPS_WORKER_IMAGE") or DEFAULT_IMAGE,
            pull_policy=policy,
            env=parse_worker_env(env.get("DAMOPS_WORKER_ENV") or "[]"),
        )


_ENV_LIST = TypeAdapter(list[EnvVar])


def parse_worker_env(text: str) -> tuple[EnvVar, ...]:
    """DAMOPS_WORKER_ENV: ``[{"name": ..., "value": ...}, ...]``; anything else raises ConfigError."""
    try:
        entries = _ENV_LIST.validate_json(text)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ConfigError(
            f"DAMOPS_WORKER_ENV: {first['msg']}{f' at {where}' if where else ''}"
            ' (expected a JSON list such as [{"name": "OTEL_SERVICE_NAME", "value": "thumbs"}])'
        ) from None
    return tuple(entries)


def worker_env_of(spec: WorkerPoolSpec, defaults: WorkerDefaults) -> list[dict[str, Any]]:
    """The operator's worker environment, then the pool's own: a name the pool sets is the pool's."""
    own = {e.name for e in spec.env}
    return [e.to_k8s() for e in defaults.env if e.name not in own] + [e.to_k8s() for e in spec.env]


def selector_labels(pool_resource: str) -> dict[str, str]:
    """Labels that select the pods of one WorkerPool (used for the scale subresource)."""
    return {LABEL_POOL: pool_resource, LABEL_COMPONENT: WORKER_COMPONENT}


def selector_string(pool_resource: str) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(selector_labels(pool_resource).items()))


def secret_name(pool_resource: str) -> str:
    return f"{pool_resource}-damops-channel"[:253]


def owner_reference(name: str, uid: str) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def new_channel_secret() -> str:
    return _secrets.token_urlsafe(32)


def build_secret_spec(name: str, namespace: str, owner_uid: str, value: str | None = None) -> dict[str, Any]:
    """The per-pool Secret holding the channel's shared secret (DAMOPS_SECRET)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": secret_name(name),
            "namespace": namespace,
            "labels": {LABEL_POOL: name, LABEL_MANAGED_BY: MANAGED_BY, LABEL_NAME: "damops"},
            "ownerReferences": [owner_reference(name, owner_uid)],
        },
        "stringData": {SECRET_KEY: value if value is not None else new_channel_secret()},
    }


def _security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "privileged": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _pod_security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": 10001,
        "runAsGroup": 10001,
        "fsGroup": 10001,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _secret_env(name: str) -> dict[str, Any]:
    return {"name": "DAMOPS_SECRET", "valueFrom": {"secretKeyRef": {"name": secret_name(name), "key": SECRET_KEY}}}


def pod_template(name: str, spec: WorkerPoolSpec, defaults: WorkerDefaults = WorkerDefaults()) -> dict[str, Any]:
    """The pod template (metadata labels/annotations + pod spec) of a WorkerPool, without the hash."""
    image = spec.image or defaults.image
    pull_policy = spec.image_pull_policy or defaults.pull_policy
    container_security = dict(spec.security_context) if spec.security_context is not None else _security_context()
    pool = spec.pool_name(name)
    common_env = [
        _secret_env(name),
        {"name": "DAMOPS_POOL", "value": pool},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": "HOME", "value": "/tmp"},
    ]
    worker_env = list(common_env)
    if spec.trigger_functions.preload:
        worker_env.append({"name": "DAMOPS_PRELOAD", "value": ",".join(spec.trigger_functions.preload)})
    if spec.trigger_functions.extra_python_path:
        worker_env.append({"name": "PYTHONPATH", "value": ":".join(spec.trigger_functions.extra_python_path)})
    worker_env.extend(worker_env_of(spec, defaults))
    mounts = [{"name": "damops-run", "mountPath": SOCKET_DIR}, {"name": "tmp", "mountPath": "/tmp"}]
    sidecar = {
        "name": "sidecar",
        "image": image,
        "imagePullPolicy": pull_policy,
        "command": ["damops", "sidecar"],
        "args": [
            "--name",
            "$(POD_NAME)",
            "--listen",
            f"0.0.0.0:{SIDECAR_PORT}",
            "--socket",
            SOCKET_PATH,
            "--health-port",
            str(HEALTH_PORT),
        ],
        "env": common_env,
        "ports": [
            {"name": "channel", "containerPort": SIDECAR_PORT, "protocol": "TCP"},
            {"name": "health", "containerPort": HEALTH_PORT, "protocol": "TCP"},
        ],
        "readinessProbe": {
            "httpGet": {"path": "/readyz", "port": "health"},
            "periodSeconds": 2,
            "failureThreshold": 1,
        },
        "livenessProbe": {
            "httpGet": {"path": "/livez", "port": "health"},
            "initialDelaySeconds": 5,
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
        "securityContext": container_security,
        "volumeMounts": mounts,
    }
    worker = {
        "name": "worker",
        "image": image,
        "imagePullPolicy": pull_policy,
        "command": ["damops", "worker"],
        "args": ["--name", "$(POD_NAME)", "--socket", SOCKET_PATH],
        "env": worker_env,
        "securityContext": dict(container_security),
        "volumeMounts": [*mounts, *spec.volume_mounts],
    }
    if spec.env_from:
        worker["envFrom"] = list(spec.env_from)
    if spec.resources is not None:
        worker["resources"] = spec.resources.to_k8s()
    if spec.sidecar_resources is not None:
        sidecar["resources"] = spec.sidecar_resources.to_k8s()
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Always",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": spec.termination_grace_period_seconds,
        "securityContext": (
            dict(spec.pod_security_context) if spec.pod_security_context is not None else _pod_security_context()
        ),
        "containers": [sidecar, worker],
        "volumes": [
            {"name": "damops-run", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}},
            {"name": "tmp", "emptyDir": {"sizeLimit": "256Mi"}},
            *spec.volumes,
        ],
    }
    if spec.node_selector:
        pod_spec["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        pod_spec["tolerations"] = list(spec.tolerations)
    if spec.affinity:
        pod_spec["affinity"] = dict(spec.affinity)
    if spec.topology_spread_constraints:
        pod_spec["topologySpreadConstraints"] = list(spec.topology_spread_constraints)
    if spec.service_account_name:
        pod_spec["serviceAccountName"] = spec.service_account_name
    if spec.priority_class_name:
        pod_spec["priorityClassName"] = spec.priority_class_name
    if spec.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": n} for n in spec.image_pull_secrets]
    return {
        "labels": dict(spec.pod_labels),
        "annotations": dict(spec.pod_annotations),
        "spec": pod_spec,
    }


def template_hash(template: dict[str, Any]) -> str:
    """A short stable hash of the pod template: pods of an older template are replaced."""
    blob = json.dumps(template, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:10]


def build_worker_pod_spec(
    name: str,
    namespace: str,
    owner_uid: str,
    spec: WorkerPoolSpec,
    defaults: WorkerDefaults = WorkerDefaults(),
) -> dict[str, Any]:
    """One worker pod of the WorkerPool ``name`` (a generateName'd Pod manifest)."""
    template = pod_template(name, spec, defaults)
    digest = template_hash(template)
    labels = {
        **template["labels"],
        LABEL_NAME: "damops",
        LABEL_MANAGED_BY: MANAGED_BY,
        **selector_labels(name),
        LABEL_HASH: digest,
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": f"{name[:50]}-",
            "namespace": namespace,
            "labels": labels,
            "annotations": {
                **template["annotations"],
                "damops.dev/pool": spec.pool_name(name),
                ANNOTATION_DELETION_COST: COST_PENDING,
            },
            "ownerReferences": [owner_reference(name, owner_uid)],
        },
        "spec": template["spec"],
    }
