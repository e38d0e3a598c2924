"""Prefetch (WORKER_PREFETCH) in the dispatch core: a busy worker's sidecar holds the
next operation; it is never counted as executing, and comes back unrun when it cannot run."""

from __future__ import annotations

from damops.dispatch import Lease, WorkerState, WorkerTable
from damops.protocol import StatusUpdate


def ready_table(*names: str, prefetch: bool = True) -> WorkerTable:
    table = WorkerTable(prefetch=prefetch)
    for name in names:
        table.add(name, 0.0)
        table.connected(name, boot=f"boot-{name}", busy=None, undelivered=set(), now=0.0)
        table.ready(name, pid=100, now=0.0)
    return table


def lease(op_id: int, worker: str = "w1", attempt: int = 1) -> Lease:
    return Lease(op_id, attempt, worker, "noop", {})


def keys(leases: list[Lease]) -> list[tuple[int, int, str]]:
    return [(held.id, held.attempt, held.worker) for held in leases]


def success(op_id: int, attempt: int = 1) -> StatusUpdate:
    return StatusUpdate(id=op_id, attempt=attempt, outcome="success")


def handed_back(op_id: int, attempt: int = 1) -> StatusUpdate:
    return StatusUpdate.failure(op_id, attempt, "prefetched operation handed back", executed=False)


def busy_with_one_held() -> WorkerTable:
    table = ready_table("w1")
    assert table.assign(lease(1), 1.0).send == [lease(1)]
    assert table.claimable() == ["w1"]  # busy, nothing held: may hold the next
    effects = table.assign(lease(2), 1.0)
    assert effects.ahead == [lease(2)] and effects.send == []
    return table


def test_without_prefetch_a_busy_worker_is_never_claimed_for():
    table = ready_table("w1", prefetch=False)
    table.assign(lease(1), 1.0)
    assert table.claimable() == []
    assert table.assign(lease(2), 1.0).releases == [lease(2)]


def test_free_workers_come_first_in_claim_order():
    table = ready_table("w1", "w2")
    table.assign(lease(1, "w1"), 1.0)
    # w2's own slot first; then the places ahead, one round per place: w2's (it is
    # sent one ahead with its first) and busy w1's.
    assert table.claimable() == ["w2", "w2", "w1"]


def test_a_held_operation_is_not_executing_and_runs_when_the_first_ends():
    table = busy_with_one_held()
    worker = table.workers["w1"]
    assert worker.lease == lease(1) and worker.next == lease(2)
    assert table.snapshot(1.0).active == 1 and table.snapshot(1.0).workers[0].operation_id == 1
    assert table.claimable() == []  # one held at most
    effects = table.status("w1", success(1), 2.0)
    assert [c.update.id for c in effects.completions] == [1] and effects.send == []  # the sidecar started it
    assert worker.lease == lease(2) and worker.next is None and worker.state is WorkerState.ACTIVE
    table.status("w1", success(2), 3.0)
    assert worker.lease is None and worker.state is WorkerState.FREE


def test_a_handed_back_operation_is_released_and_the_running_one_continues():
    table = busy_with_one_held()
    effects = table.status("w1", handed_back(2), 2.0)
    assert keys(effects.releases) == [(2, 1, "w1")] and effects.completions == []
    assert table.workers["w1"].lease == lease(1) and table.workers["w1"].next is None


def test_drain_withdraws_the_held_operation_and_forgets_the_worker_once_both_are_settled():
    table = busy_with_one_held()
    assert table.drain("w1").withdraw == [lease(2)]
    assert table.claimable() == []
    table.status("w1", handed_back(2), 2.0)
    assert "w1" in table.workers  # still running its operation
    assert table.status("w1", success(1), 3.0).forget == ["w1"]


def test_drain_that_races_the_start_waits_for_the_prefetched_one_to_finish():
    table = busy_with_one_held()
    table.drain("w1")
    table.status("w1", success(1), 2.0)  # the sidecar started 2 before the withdraw reached it
    assert table.workers["w1"].lease == lease(2)
    assert table.status("w1", success(2), 3.0).forget == ["w1"]


def test_a_cancel_of_a_held_operation_withdraws_it_and_cancels_nothing_running():
    table = busy_with_one_held()
    effects = table.cancel_requested([(2, 1, "w1")], 2.0, grace=10.0)
    assert effects.withdraw == [lease(2)] and effects.cancels == [] and effects.restart == []


def test_a_lost_worker_recovers_both_since_the_held_one_may_have_started():
    table = busy_with_one_held()
    effects = table.lost("w1", "gone", 2.0)
    assert sorted(c.update.id for c in effects.completions) == [1, 2]
    assert all(c.update.executed and c.update.retryable for c in effects.completions)
    assert table.workers["w1"].lease is None and table.workers["w1"].next is None


def test_expiry_restarts_the_worker_and_recovers_both():
    table = busy_with_one_held()
    effects = table.expire(now=1000.0, limit=600.0)
    assert effects.restart == ["w1"] and sorted(c.update.id for c in effects.completions) == [1, 2]


def test_stop_withdraws_then_releases_both():
    table = busy_with_one_held()
    assert table.withdraw_all().withdraw == [lease(2)]
    assert table.leases() == [lease(1), lease(2)]
    released = table.release_all()
    assert released.releases == [lease(1), lease(2)] and table.leases() == []
    assert table.status("w1", success(1), 2.0).completions == []  # late: not written


def test_a_reconnect_with_the_held_one_handed_back_waits_for_its_status_update():
    table = busy_with_one_held()
    table.channel_lost("w1", 2.0)
    effects = table.connected("w1", "boot-w1", busy=(1, 1), undelivered={2}, now=3.0)
    assert effects.releases == [] and effects.completions == []
    assert keys(table.status("w1", handed_back(2), 3.0).releases) == [(2, 1, "w1")]
    assert table.workers["w1"].lease == lease(1)


def test_a_reconnect_finding_the_held_one_running_makes_it_the_lease():
    table = busy_with_one_held()
    table.channel_lost("w1", 2.0)
    effects = table.connected("w1", "boot-w1", busy=(2, 1), undelivered={1}, now=3.0)
    assert effects.releases == [] and effects.completions == []
    table.status("w1", success(1), 3.0)  # the kept StatusUpdate of the first
    assert table.workers["w1"].lease == lease(2) and table.workers["w1"].next is None


def test_a_reconnect_to_the_same_sidecar_that_never_got_it_releases_it():
    table = busy_with_one_held()
    table.channel_lost("w1", 2.0)
    effects = table.connected("w1", "boot-w1", busy=(1, 1), undelivered=set(), now=3.0)
    assert effects.releases == [lease(2)] and table.workers["w1"].next is None
    assert table.workers["w1"].lease == lease(1)


def test_a_restarted_sidecar_recovers_the_held_one_as_a_failure():
    table = busy_with_one_held()
    table.channel_lost("w1", 2.0)
    effects = table.connected("w1", "another-boot", busy=None, undelivered=set(), now=3.0)
    assert sorted(c.update.id for c in effects.completions) == [1, 2]
    assert table.workers["w1"].lease is None and table.workers["w1"].next is None


# --- deeper prefetch (WORKER_PREFETCH_DEPTH) ------------------------------------


def busy_with_two_held() -> WorkerTable:
    """Depth 2: a free worker is claimed for three slots and sent all three at once."""
    table = WorkerTable(prefetch=2)
    table.add("w1", 0.0)
    table.connected("w1", boot="boot-w1", busy=None, undelivered=set(), now=0.0)
    table.ready("w1", pid=100, now=0.0)
    assert table.claimable() == ["w1", "w1", "w1"]
    assert table.assign(lease(1), 1.0).send == [lease(1)]
    assert table.assign(lease(2), 1.0).ahead == [lease(2)]
    assert table.assign(lease(3), 1.0).ahead == [lease(3)]
    return table


def test_the_room_ahead_is_spread_round_by_round_over_the_workers():
    table = WorkerTable(prefetch=2)
    for name in ("w1", "w2"):
        table.add(name, 0.0)
        table.connected(name, boot=f"boot-{name}", busy=None, undelivered=set(), now=0.0)
        table.ready(name, pid=100, now=0.0)
    table.assign(lease(1, "w1"), 1.0)
    # w2's own slot, then everyone's first place ahead, then everyone's second.
    assert table.claimable() == ["w2", "w2", "w1", "w2", "w1"]


def test_held_operations_start_in_the_order_sent_and_only_one_is_executing():
    table = busy_with_two_held()
    worker = table.workers["w1"]
    assert table.claimable() == [] and table.assign(lease(4), 1.0).releases == [lease(4)]  # full
    assert table.snapshot(1.0).active == 1 and table.leases() == [lease(1), lease(2), lease(3)]
    table.status("w1", success(1), 2.0)
    assert worker.lease == lease(2) and worker.ahead == [lease(3)]
    assert table.claimable() == ["w1"]  # one place ahead again
    table.status("w1", success(2), 3.0)
    table.status("w1", success(3), 4.0)
    assert worker.lease is None and worker.ahead == [] and worker.state is WorkerState.FREE


def test_a_handed_back_one_in_the_middle_leaves_the_others_in_order():
    table = busy_with_two_held()
    effects = table.status("w1", handed_back(2), 2.0)
    assert keys(effects.releases) == [(2, 1, "w1")] and effects.completions == []
    assert table.workers["w1"].lease == lease(1) and table.workers["w1"].ahead == [lease(3)]


def test_a_held_one_that_ran_ends_every_lease_sent_before_it():
    table = busy_with_two_held()
    effects = table.status("w1", success(3), 2.0)  # 1's and 2's StatusUpdates were lost
    ended = {c.update.id: c.update for c in effects.completions}
    assert set(ended) == {1, 2, 3} and ended[1].retryable and ended[2].retryable and ended[3].outcome == "success"
    assert table.workers["w1"].lease is None and table.workers["w1"].state is WorkerState.FREE


def test_drain_and_stop_withdraw_every_held_one():
    table = busy_with_two_held()
    assert table.withdraw_all().withdraw == [lease(2), lease(3)]
    assert table.drain("w1").withdraw == [lease(2), lease(3)]


def test_a_lost_worker_recovers_the_running_one_and_every_held_one():
    table = busy_with_two_held()
    effects = table.lost("w1", "gone", 2.0)
    assert sorted(c.update.id for c in effects.completions) == [1, 2, 3]


def test_a_reconnect_finding_a_later_held_one_running_ends_those_whose_update_was_lost():
    table = busy_with_two_held()
    table.channel_lost("w1", 2.0)
    # The worker ran 1 and 2 and started 3 while we were away; only 2's StatusUpdate was kept.
    effects = table.connected("w1", "boot-w1", busy=(3, 1), undelivered={2}, now=3.0)
    assert [c.update.id for c in effects.completions] == [1] and effects.releases == []
    worker = table.workers["w1"]
    assert worker.lease == lease(2) and worker.ahead == [lease(3)]
    table.status("w1", success(2), 3.0)  # the kept one
    assert worker.lease == lease(3) and worker.ahead == [] and worker.state is WorkerState.ACTIVE


def test_a_reconnect_to_the_same_sidecar_releases_the_held_ones_it_never_got():
    table = busy_with_two_held()
    table.channel_lost("w1", 2.0)
    effects = table.connected("w1", "boot-w1", busy=(1, 1), undelivered={2}, now=3.0)
    assert effects.releases == [lease(3)] and effects.completions == []
    assert table.workers["w1"].lease == lease(1) and table.workers["w1"].ahead == [lease(2)]


def test_a_held_operation_is_handed_back_once_the_running_one_outlasts_the_max_wait():
    table = busy_with_one_held()  # lease 1 started at 1.0, lease 2 held behind it
    assert table.hand_back_overdue(1.9, max_wait=1.0).withdraw == []  # 0.9 s: not yet
    effects = table.hand_back_overdue(2.1, max_wait=1.0)
    assert effects.withdraw == [lease(2)]
    assert table.hand_back_overdue(5.0, max_wait=1.0).withdraw == []  # once per running lease
    assert table.claimable() == []  # nothing more ahead of an overdue worker
    effects = table.status("w1", handed_back(2), 2.2)
    assert keys(effects.releases) == [(2, 1, "w1")]  # back to NEW, its attempt given back
    assert table.workers["w1"].lease == lease(1) and table.stats.overdue_handed_back == 1


def test_an_overdue_worker_takes_operations_ahead_again_once_its_long_one_ends():
    table = ready_table("w1", "w2")
    table.assign(lease(1, "w1"), 1.0)
    table.assign(lease(2, "w2"), 1.0)
    assert table.claimable() == ["w1", "w2"]
    table.hand_back_overdue(2.5, max_wait=1.0)  # both running for 1.5 s
    assert table.claimable() == []
    table.status("w1", success(1), 3.0)
    assert table.claimable() == ["w1", "w1"]  # free again: its own slot and one ahead
    table.assign(lease(3, "w1"), 3.0)
    assert table.claimable() == ["w1"]  # a new running lease, young: room ahead again
    assert table.hand_back_overdue(3.5, max_wait=1.0).withdraw == []


def test_the_next_held_one_starting_restarts_the_clock():
    table = busy_with_one_held()
    table.status("w1", success(1), 1.8)  # lease 2 starts at 1.8
    assert table.hand_back_overdue(2.5, max_wait=1.0).withdraw == []
    table.assign(lease(3), 2.5)
    assert table.hand_back_overdue(2.9, max_wait=1.0).withdraw == [lease(3)]
