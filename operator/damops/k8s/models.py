"""WorkerPool spec and status as pydantic v2 models.

These models are the one source of truth for the custom resource: the CRD's
OpenAPI schema is generated from them (:mod:`damops.k8s.crdgen`), and the
operator validates every object it handles with them.  Field names are the
Kubernetes camelCase names (aliases); Python code uses snake_case.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, model_validator
from pydantic.alias_generators import to_camel

from damops.config import parse_duration

# --------------------------------------------------------------------------- helpers

#: Any Kubernetes object we pass through untouched (affinity, tolerations, envFrom, ...).
#: The API server keeps its fields; the kubelet validates them when the pod is created.
KubeObject = Annotated[
    dict[str, Any],
    WithJsonSchema({"type": "object", "x-kubernetes-preserve-unknown-fields": True}),
]

#: A resource quantity: ``2``, ``"500m"``, ``"1Gi"``.
Quantity = Annotated[
    int | str,
    WithJsonSchema(
        {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "x-kubernetes-int-or-string": True,
            "pattern": r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$",
        }
    ),
]

#: Same syntax as :func:`damops.config.parse_duration`: seconds, or a number with ms/s/m/h/d.
DURATION_PATTERN = r"^[0-9]+(\.[0-9]+)?(ms|s|m|h|d)?$"
Duration = Annotated[
    str,
    Field(pattern=DURATION_PATTERN, max_length=32),
]

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    def to_k8s(self) -> dict[str, Any]:
        """The camelCase dict the API server stores (None fields left out)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


# --------------------------------------------------------------------------- spec


class SecretKeyRef(_Model):
    """A key of a Secret in the WorkerPool's namespace."""

    name: str = Field(min_length=1, max_length=253, description="Name of the Secret.")
    key: str = Field(default="url", min_length=1, max_length=253, description="Key holding the value.")


class TriggerFunctions(_Model):
    """Which trigger functions the workers offer."""

    preload: list[Annotated[str, Field(min_length=1, max_length=253)]] = Field(
        default_factory=list,
        max_length=256,
        description=(
            "Trigger functions (entry-point names of the group damops.trigger_functions, or module:function "
            "paths) imported when the worker starts, so the first operation does not pay for the import."
        ),
    )
    extra_python_path: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=list,
        max_length=32,
        description="Directories appended to PYTHONPATH in the worker container (e.g. a mounted volume).",
    )


class ResourceRequirements(_Model):
    """Container resources, as in a Pod."""

    requests: dict[str, Quantity] | None = Field(default=None, description="Minimum resources, e.g. cpu: 100m.")
    limits: dict[str, Quantity] | None = Field(default=None, description="Maximum resources, e.g. memory: 512Mi.")


class EnvVar(_Model):
    """An environment variable of the worker container, as in a Pod."""

    name: str = Field(min_length=1, max_length=253)
    value: str | None = None
    value_from: KubeObject | None = Field(default=None, description="secretKeyRef, configMapKeyRef, fieldRef, ...")


class Timings(_Model):
    """The scheduler's timings for this pool; unset ones come from the operator (the Helm values)."""

    scheduler_heartbeat: Duration | None = Field(
        default=None, description="SCHEDULER_HEARTBEAT: how often the scheduler claims operations, e.g. 1s."
    )
    max_operation_processing_time: Duration | None = Field(
        default=None, description="MAX_OPERATION_PROCESSING_TIME: a PROCESSING operation older than this expires."
    )
    max_worker_active_time: Duration | None = Field(
        default=None,
        description="MAX_WORKER_ACTIVE_TIME: an active worker untouched for this long expires; its pod is replaced.",
    )
    operation_wait_interval: Duration | None = Field(
        default=None, description="OPERATION_WAIT_INTERVAL: how long a WAIT operation rests before it is claimable."
    )

    def as_env(self) -> dict[str, str]:
        names = {
            "scheduler_heartbeat": "SCHEDULER_HEARTBEAT",
            "max_operation_processing_time": "MAX_OPERATION_PROCESSING_TIME",
            "max_worker_active_time": "MAX_WORKER_ACTIVE_TIME",
            "operation_wait_interval": "OPERATION_WAIT_INTERVAL",
        }
        return {env: getattr(self, attr) for attr, env in names.items() if getattr(self, attr) is not None}


class RollingUpdate(_Model):
    """How free workers are replaced when the pod template changes."""

    max_surge: int = Field(
        default=1, ge=1, le=100, description="Extra pods started ahead of the free workers they replace."
    )


class ScalingPolicy(_Model):
    """At most value pods (or percent of the replicas at the start of the period) per periodSeconds."""

    type: Literal["Pods", "Percent"] = Field(description="Pods: a number of pods; Percent: of the replicas.")
    value: int = Field(ge=1, le=1000, description="How many pods (or percent) may be added or removed per period.")
    period_seconds: int = Field(ge=1, le=1800, description="The period the limit applies to.")


class ScalingRules(_Model):
    """One direction of the autoscaling behavior, as in the HorizontalPodAutoscaler."""

    stabilization_window_seconds: int | None = Field(
        default=None,
        ge=0,
        le=3600,
        description=(
            "Recommendations of this long are considered: scale up to the lowest, down to the highest of them "
            "(default: up 0, down 300)."
        ),
    )
    select_policy: Literal["Max", "Min", "Disabled"] = Field(
        default="Max", description="Max: the policy allowing the biggest change; Min: the smallest; Disabled: none."
    )
    policies: list[ScalingPolicy] | None = Field(
        default=None,
        max_length=10,
        description="Step limits (default: up 4 pods or 100% per 15 s, whichever is more; down 100% per 15 s).",
    )


class AutoscalingBehavior(_Model):
    """How fast the autoscaler may move, as the behavior of a HorizontalPodAutoscaler."""

    scale_up: ScalingRules = Field(default_factory=ScalingRules)
    scale_down: ScalingRules = Field(default_factory=ScalingRules)


class Autoscaling(_Model):
    """The operator sets the number of workers from the queue depth; spec.replicas is then ignored."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!has(self.minReplicas) || self.minReplicas <= self.maxReplicas",
                    "message": "minReplicas must not exceed maxReplicas",
                }
            ]
        }
    )

    min_replicas: int = Field(
        default=1, ge=0, le=1000, description="Fewest workers; 0: no pods while the queue is empty."
    )
    max_replicas: int = Field(ge=1, le=1000, description="Most workers.")
    target_queued_per_worker: int | None = Field(
        default=None,
        ge=1,
        le=10000,
        description=(
            "Wanted workers = active + ceil(queued / this) (default 1 when no target is set): "
            "one more worker per this many waiting operations."
        ),
    )
    target_utilization: int | None = Field(
        default=None,
        ge=1,
        le=100,
        description="Wanted workers = ceil((active + queued) * 100 / this): percent of the workers kept busy.",
    )
    behavior: AutoscalingBehavior = Field(default_factory=AutoscalingBehavior)

    @model_validator(mode="after")
    def _bounds(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError("minReplicas must not exceed maxReplicas")
        return self


#: volumes and mount paths every worker pod has (the sidecar's socket directory, a writable /tmp)
RESERVED_VOLUMES = frozenset({"damops-run", "tmp"})
RESERVED_MOUNT_PATHS = frozenset({"/run/damops", "/tmp"})


class WorkerPoolSpec(_Model):
    """Desired state of a pool of pre-heated worker pods."""

    replicas: int = Field(default=1, ge=0, le=1000, description="Number of worker pods (workers).")
    pool: str | None = Field(
        default=None,
        min_length=1,
        max_length=63,
        pattern=r"^[A-Za-z0-9]([-_.A-Za-z0-9]*[A-Za-z0-9])?$",
        description="Operations pool this WorkerPool claims from (operations.pool); default: the resource's name.",
    )
    image: str | None = Field(
        default=None,
        min_length=1,
        max_length=512,
        description="Worker image (sidecar + worker runtime + trigger functions); default: the operator's.",
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = Field(
        default=None,
        description="Pull policy of both containers; default: the operator's (Helm image.worker.pullPolicy).",
    )
    image_pull_secrets: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=list, description="Names of Secrets used to pull the image."
    )
    trigger_functions: TriggerFunctions = Field(
        default_factory=TriggerFunctions, description="Trigger-function settings of the workers."
    )
    resources: ResourceRequirements | None = Field(default=None, description="Resources of the worker container.")
    sidecar_resources: ResourceRequirements | None = Field(
        default=None, description="Resources of the sidecar container."
    )
    env: list[EnvVar] = Field(default_factory=list, max_length=256, description="Extra env of the worker container.")
    env_from: list[KubeObject] = Field(
        default_factory=list, max_length=64, description="configMapRef/secretRef sources for the worker container."
    )
    node_selector: dict[str, str] = Field(default_factory=dict, description="Pod nodeSelector.")
    tolerations: list[KubeObject] = Field(default_factory=list, description="Pod tolerations.")
    affinity: KubeObject | None = Field(default=None, description="Pod affinity.")
    topology_spread_constraints: list[KubeObject] = Field(
        default_factory=list, max_length=32, description="Pod topologySpreadConstraints."
    )
    volumes: list[KubeObject] = Field(
        default_factory=list,
        max_length=64,
        description="Extra pod volumes (e.g. a ConfigMap or PVC with trigger-function code for extraPythonPath).",
    )
    volume_mounts: list[KubeObject] = Field(
        default_factory=list, max_length=64, description="Extra volumeMounts of the worker container."
    )
    pod_security_context: KubeObject | None = Field(
        default=None,
        description=(
            "Replaces the pod securityContext (default: runAsNonRoot, UID/GID/fsGroup 10001, RuntimeDefault "
            "seccomp); {} leaves the UID to the platform, as OpenShift's restricted policy wants."
        ),
    )
    security_context: KubeObject | None = Field(
        default=None,
        description=(
            "Replaces the securityContext of both containers (default: non-root, read-only root filesystem, "
            "no privilege escalation, all capabilities dropped, RuntimeDefault seccomp)."
        ),
    )
    pod_labels: dict[str, str] = Field(default_factory=dict, description="Extra labels on the worker pods.")
    pod_annotations: dict[str, str] = Field(default_factory=dict, description="Extra annotations on the worker pods.")
    service_account_name: str | None = Field(
        default=None, max_length=253, description="ServiceAccount of the worker pods (no API token is mounted)."
    )
    priority_class_name: str | None = Field(default=None, max_length=253)
    termination_grace_period_seconds: int = Field(
        default=30, ge=0, le=86400, description="Grace given to a worker pod when it is deleted."
    )
    database_secret_ref: SecretKeyRef | None = Field(
        default=None,
        description=(
            "Secret (in this namespace) whose key holds the PostgreSQL URL the operator uses for this pool; "
            "default: the operator's DATABASE_URL. Worker pods never see it."
        ),
    )
    timings: Timings = Field(default_factory=Timings, description="Scheduler timings; default: the Helm values.")
    worker_prefetch: bool | None = Field(
        default=None,
        description=(
            "WORKER_PREFETCH for this pool: a busy worker is sent the next operation ahead and starts it the "
            "moment the running one ends; leave off for pools of long operations. Default: the Helm value."
        ),
    )
    worker_prefetch_depth: int | None = Field(
        default=None,
        ge=1,
        le=32,
        description=(
            "WORKER_PREFETCH_DEPTH for this pool: with workerPrefetch on, how many operations a worker may "
            "hold ahead (deeper: fewer wake-ups per operation for very short ones). Default: the Helm value."
        ),
    )
    worker_prefetch_max_wait: Duration | None = Field(
        default=None,
        description=(
            "WORKER_PREFETCH_MAX_WAIT for this pool: with workerPrefetch on, how long an operation held ahead "
            "may wait behind a running one before it is handed back for a free worker, e.g. 1s. "
            "Default: the Helm value."
        ),
    )
    rolling_update: RollingUpdate = Field(default_factory=RollingUpdate)
    autoscaling: Autoscaling | None = Field(
        default=None,
        description="Scale on the queue depth between minReplicas and maxReplicas (spec.replicas is then ignored).",
    )

    @model_validator(mode="after")
    def _own_names_kept(self) -> WorkerPoolSpec:
        taken = sorted({str(v.get("name")) for v in self.volumes} & RESERVED_VOLUMES)
        if taken:
            raise ValueError(f"volume name(s) {', '.join(taken)} are the pod's own; pick another name")
        clash = sorted({str(m.get("mountPath")) for m in self.volume_mounts} & RESERVED_MOUNT_PATHS)
        if clash:
            raise ValueError(f"mountPath {', '.join(clash)} is the pod's own; pick another path")
        if self.worker_prefetch_max_wait is not None and parse_duration(self.worker_prefetch_max_wait) <= 0:
            raise ValueError("workerPrefetchMaxWait must be more than 0")
        return self

    def pool_name(self, resource_name: str) -> str:
        return self.pool or resource_name


# --------------------------------------------------------------------------- status

ConditionType = Literal["Ready", "Progressing", "Degraded"]


class Condition(_Model):
    """A standard Kubernetes condition."""

    type: ConditionType
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(default="", max_length=1024)
    message: str = Field(default="", max_length=32768)
    last_transition_time: str | None = Field(default=None, description="RFC 3339 time of the last status change.")
    observed_generation: int | None = None


class AutoscalingStatus(_Model):
    """What the autoscaler decided last."""

    recommended_replicas: int = Field(default=0, ge=0, description="Wanted for the current load (within bounds).")
    last_scale_time: str | None = Field(
        default=None, description="RFC 3339 time of the last change of the desired replicas."
    )
    last_scale_reason: str | None = Field(default=None, description="ScaleUp or ScaleDown: the last change.")
    last_scale_message: str | None = Field(default=None, description="Why: the load and the limits that applied.")
    message: str | None = Field(default=None, description="The decision of the latest round.")


class WorkerPoolStatus(_Model):
    """Observed state, written by the operator."""

    observed_generation: int | None = Field(default=None, description="The .metadata.generation last reconciled.")
    replicas: int = Field(default=0, ge=0, description="Worker pods that exist and are not terminating.")
    ready_replicas: int = Field(default=0, ge=0, description="Workers that have signalled ready (free or active).")
    updated_replicas: int = Field(default=0, ge=0, description="Pods of the current template.")
    pending_workers: int = Field(default=0, ge=0, description="Workers started but not yet ready.")
    free_workers: int = Field(default=0, ge=0, description="Ready workers without an operation.")
    active_workers: int = Field(default=0, ge=0, description="Workers handling one operation each.")
    draining_workers: int = Field(default=0, ge=0, description="Active workers finishing before removal.")
    queued_operations: int = Field(default=0, ge=0, description="Claimable operations (NEW or WAIT) of the pool.")
    pool: str | None = Field(default=None, description="The operations pool served.")
    selector: str | None = Field(default=None, description="Label selector of the pods (for the scale subresource).")
    template_hash: str | None = Field(default=None, description="Hash of the current pod template.")
    desired_replicas: int | None = Field(
        default=None, ge=0, description="Workers wanted now: spec.replicas, or the autoscaler's decision."
    )
    autoscaling: AutoscalingStatus | None = Field(default=None, description="The autoscaler's last decision.")
    conditions: list[Condition] = Field(default_factory=list)
