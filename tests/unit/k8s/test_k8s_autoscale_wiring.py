"""The autoscaler's surroundings: pod-deletion-cost, status, Events, the CRD (pure, no cluster)."""

from __future__ import annotations

from damops.dispatch import WorkerState
from damops.k8s import crdgen, events
from damops.k8s.models import AutoscalingStatus, WorkerPoolSpec
from damops.k8s.pods import IDLE_AFTER, cost_patches, pod_info
from damops.k8s.reconcile import PodInfo, plan
from damops.k8s.specs import ANNOTATION_DELETION_COST, COST_BUSY, COST_IDLE, COST_PENDING, build_worker_pod_spec
from damops.k8s.status import Observation, pool_status

NOW = "2026-01-01T00:10:00Z"


def pod(name: str, state: WorkerState | None, cost: str | None, **kw) -> PodInfo:
    return PodInfo(name=name, template_hash="h", phase="Running", worker_state=state, deletion_cost=cost, **kw)


def test_new_worker_pods_start_cheapest_to_delete_and_the_cost_is_read_back() -> None:
    body = build_worker_pod_spec("wp", "ns", "uid", WorkerPoolSpec())
    assert body["metadata"]["annotations"][ANNOTATION_DELETION_COST] == COST_PENDING
    assert pod_info(body).deletion_cost == COST_PENDING


def test_costs_follow_the_state_class_pending_idle_busy() -> None:
    pods = [
        pod("ready", WorkerState.FREE, COST_PENDING),  # became ready: idle at once
        pod("busy", WorkerState.ACTIVE, COST_IDLE),
        pod("same", WorkerState.ACTIVE, COST_BUSY),  # nothing to do
        pod("lost", None, COST_BUSY),  # the scheduler lost it: pending
    ]
    assert cost_patches(pods, {"ready": 0.5}, {}) == [("ready", COST_IDLE), ("busy", COST_BUSY), ("lost", COST_PENDING)]


def test_a_worker_between_operations_stays_busy_until_idle_for_a_while() -> None:
    between = [pod("w", WorkerState.FREE, COST_BUSY)]
    assert cost_patches(between, {"w": 1.0}, {}) == []
    assert cost_patches(between, {"w": IDLE_AFTER}, {}) == [("w", COST_IDLE)]


def test_a_cost_is_not_patched_again_until_the_watch_shows_it() -> None:
    pods = [pod("w", WorkerState.ACTIVE, COST_IDLE)]
    assert cost_patches(pods, {}, {"w": COST_BUSY}) == []


def test_pods_on_their_way_out_are_left_alone() -> None:
    pods = [pod("t", WorkerState.FREE, COST_BUSY, terminating=True), pod("d", None, COST_BUSY, draining=True)]
    assert cost_patches(pods, {"t": 99.0}, {}) == []


def test_status_shows_desired_replicas_and_the_last_decision() -> None:
    last = AutoscalingStatus(
        recommended_replicas=4, last_scale_time=NOW, last_scale_reason="ScaleUp", last_scale_message="1 → 4: ..."
    )
    obs = Observation(desired=4, pool="p", selector="s", template_hash="h", autoscaling=last)
    status = pool_status(plan(4, "h", []), obs, [], NOW)
    assert status["desiredReplicas"] == 4
    assert status["autoscaling"] == {
        "recommendedReplicas": 4,
        "lastScaleTime": NOW,
        "lastScaleReason": "ScaleUp",
        "lastScaleMessage": "1 → 4: ...",
    }


def test_status_of_a_fixed_pool_removes_an_earlier_autoscaler_status() -> None:
    status = pool_status(plan(2, "h", []), Observation(desired=2, pool="p", selector="s", template_hash="h"), [], NOW)
    assert status["desiredReplicas"] == 2 and status["autoscaling"] is None  # null: a merge patch deletes it


def test_an_event_per_decision() -> None:
    e = events.autoscaled("1 → 4: 40 queued, 1 active")
    assert (e.type, e.reason, e.message) == ("Normal", "Autoscaled", "1 → 4: 40 queued, 1 active")


def test_crd_has_autoscaling_with_its_bounds_rule_and_desired_column() -> None:
    version = crdgen.crd()["spec"]["versions"][0]
    auto = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["autoscaling"]
    assert auto["required"] == ["maxReplicas"] and auto["properties"]["minReplicas"]["minimum"] == 0
    assert auto["x-kubernetes-validations"][0]["rule"].endswith("self.minReplicas <= self.maxReplicas")
    up = auto["properties"]["behavior"]["properties"]["scaleUp"]["properties"]
    assert up["policies"]["items"]["properties"]["type"]["enum"] == ["Pods", "Percent"]
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Desired"] == ".status.desiredReplicas"
    # kubectl scale keeps writing spec.replicas: the scale subresource is unchanged
    assert version["subresources"]["scale"]["specReplicasPath"] == ".spec.replicas"
