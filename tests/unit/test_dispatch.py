"""The dispatch core's transitions, without a database, sockets or processes."""

from __future__ import annotations

from damops.dispatch import Lease, PendingWrites, WorkerState, WorkerTable
from damops.protocol import StatusUpdate


def ready_table(*names: str, now: float = 0.0) -> WorkerTable:
    table = WorkerTable()
    for name in names:
        table.add(name, now)
        table.connected(name, boot=f"boot-{name}", busy=None, undelivered=set(), now=now)
        table.ready(name, pid=100, now=now)
    return table


def lease(op_id: int = 7, attempt: int = 1, worker: str = "w1") -> Lease:
    return Lease(op_id, attempt, worker, "noop", {})


def success(op_id: int = 7, attempt: int = 1) -> StatusUpdate:
    return StatusUpdate(id=op_id, attempt=attempt, outcome="success", result={"ok": True})


def test_a_worker_is_pending_until_its_sidecar_connects_and_it_is_ready():
    table = WorkerTable()
    table.add("w1", 0.0)
    assert table.workers["w1"].state is WorkerState.PENDING and table.claimable() == []
    table.connected("w1", "b", None, set(), 0.0)
    assert table.claimable() == []
    effects = table.ready("w1", 42, 1.0)
    assert effects.wake and table.claimable() == ["w1"] and table.workers["w1"].pid == 42


def test_assign_sends_and_the_status_update_frees_the_worker():
    table = ready_table("w1")
    effects = table.assign(lease(), 1.0)
    assert effects.send == [lease()] and table.workers["w1"].state is WorkerState.ACTIVE
    assert table.claimable() == []
    done = table.status("w1", success(), 2.0)
    assert [c.update.id for c in done.completions] == [7] and done.wake
    assert table.workers["w1"].state is WorkerState.FREE and table.workers["w1"].lease is None


def test_a_claim_for_a_worker_that_went_away_is_released_not_counted():
    table = ready_table("w1")
    table.remove("w1", "gone")
    effects = table.assign(lease(), 1.0)
    assert effects.releases == [lease()] and effects.send == [] and table.stats.released == 1


def test_a_dropped_channel_keeps_the_lease_and_a_reconnect_readopts_it():
    table = ready_table("w1")
    table.assign(lease(), 1.0)
    assert table.channel_lost("w1", 2.0).completions == []  # no second run elsewhere
    assert table.workers["w1"].lease == lease() and table.claimable() == []
    effects = table.connected("w1", "boot-w1", busy=(7, 1), undelivered=set(), now=3.0)
    assert effects.completions == [] and effects.releases == []
    assert table.workers["w1"].lease == lease() and table.stats.readopted == 1
    table.status("w1", success(), 4.0)
    assert table.workers["w1"].lease is None


def test_a_reconnect_with_the_status_update_kept_by_the_sidecar_waits_for_it():
    table = ready_table("w1")
    table.assign(lease(), 1.0)
    table.channel_lost("w1", 2.0)
    effects = table.connected("w1", "boot-w1", busy=None, undelivered={7}, now=3.0)
    assert effects.completions == [] and effects.releases == [] and table.workers["w1"].lease == lease()
    assert [c.update.id for c in table.status("w1", success(), 3.1).completions] == [7]


def test_the_same_sidecar_without_the_operation_never_got_it_so_it_is_released():
    table = ready_table("w1")
    table.assign(lease(), 1.0)
    table.channel_lost("w1", 2.0)
    effects = table.connected("w1", "boot-w1", busy=None, undelivered=set(), now=3.0)
    assert effects.releases == [lease()] and effects.completions == []
    assert table.workers["w1"].state is WorkerState.PENDING  # until it says Ready again


def test_a_restarted_sidecar_without_the_operation_recovers_it_as_a_failure():
    table = ready_table("w1")
    table.assign(lease(), 1.0)
    table.channel_lost("w1", 2.0)
    effects = table.connected("w1", "another-boot", busy=None, undelivered=set(), now=3.0)
    assert effects.releases == []
    [completion] = effects.completions
    assert completion.update.outcome == "failure" and completion.update.retryable
    assert "restarted" in (completion.update.error or "")


def test_a_new_scheduler_adopts_what_a_sidecar_is_running():
    table = WorkerTable()
    table.add("w1", 0.0)
    table.connected("w1", "b", busy=(9, 2), undelivered=set(), now=0.0)
    worker = table.workers["w1"]
    assert worker.state is WorkerState.ACTIVE and worker.lease is not None
    assert (worker.lease.id, worker.lease.attempt) == (9, 2)
    assert table.ready("w1", 1, 0.1).wake is False  # busy: not free before its StatusUpdate


def test_a_refused_hand_over_goes_back_without_an_attempt():
    table = ready_table("w1")
    table.assign(lease(), 1.0)
    refused = StatusUpdate(id=7, attempt=1, outcome="failure", error="busy", executed=False)
    effects = table.status("w1", refused, 2.0)
    assert effects.completions == [] and [r.id for r in effects.releases] == [7]


def test_expiry_recovers_the_lease_and_restarts_the_worker():
    table = ready_table("w1", "w2")
    table.assign(lease(), 0.0)
    assert table.expire(now=5.0, limit=10.0).restart == []
    effects = table.expire(now=10.5, limit=10.0)
    assert effects.restart == ["w1"] and table.stats.expired_workers == 1
    [completion] = effects.completions
    assert completion.update.retryable and "MAX_WORKER_ACTIVE_TIME" in (completion.update.error or "")
    assert table.workers["w1"].lease is None and table.workers["w1"].state is WorkerState.PENDING


def test_progress_refreshes_last_touched_only_for_the_workers_own_lease():
    table = ready_table("w1")
    table.assign(lease(), 0.0)
    assert table.progress("w1", 7, 8.0) and table.workers["w1"].last_touched == 8.0
    assert not table.progress("w1", 99, 9.0) and table.workers["w1"].last_touched == 8.0
    assert table.expire(now=15.0, limit=10.0).restart == []


def test_drain_forgets_an_idle_worker_at_once_and_a_busy_one_after_its_operation():
    table = ready_table("w1", "w2")
    assert table.drain("w2").forget == ["w2"] and "w2" not in table.workers
    table.assign(lease(), 0.0)
    assert table.drain("w1").forget == [] and table.claimable() == []
    assert table.status("w1", success(), 1.0).forget == ["w1"] and table.workers == {}


def test_removing_a_busy_worker_recovers_its_operation_as_a_counted_failure():
    table = ready_table("w1")
    table.assign(lease(), 0.0)
    effects = table.remove("w1", "pod deleted")
    assert effects.forget == ["w1"] and effects.releases == []
    assert [c.update.error for c in effects.completions] == ["pod deleted"]


def test_worker_lost_recovers_and_the_restarted_worker_is_pending():
    table = ready_table("w1")
    table.assign(lease(), 0.0)
    effects = table.lost("w1", "sidecar exited", 1.0)
    assert [c.update.error for c in effects.completions] == ["sidecar exited"]
    assert table.workers["w1"].state is WorkerState.PENDING and not table.workers["w1"].connected


def test_release_all_at_shutdown_and_late_status_updates_are_not_written():
    table = ready_table("w1")
    table.assign(lease(), 0.0)
    assert table.release_all().releases == [lease()]
    assert table.status("w1", success(), 1.0).completions == []


def test_undeliverable_inputs_fail_the_operation_for_good():
    table = ready_table("w1")
    table.assign(lease(), 0.0)
    [completion] = table.undeliverable(lease(), "inputs too deep").completions
    assert completion.update.outcome == "failure" and not completion.update.retryable
    assert table.claimable() == ["w1"]


def test_pending_writes_put_back_keeps_order_and_newer_progress():
    writes = PendingWrites()
    table = ready_table("w1")
    table.assign(lease(), 0.0)
    writes.add(table.status("w1", success(), 1.0))
    writes.progress[7] = ("old", 0.1)
    taken = writes.take()
    assert not writes
    writes.progress[7] = ("new", 0.5)
    writes.put_back(taken)
    assert [c.update.id for c in writes.completions] == [7] and writes.progress[7] == ("new", 0.5)
    assert writes.operation_ids() == {7}


def test_a_worker_that_died_with_its_operation_is_not_free_until_ready_again():
    table = ready_table("w1")
    table.assign(lease(), 0.0)
    table.not_ready("w1", 1.0)  # the sidecar says so before the lost operation's StatusUpdate
    lost = StatusUpdate(id=7, attempt=1, outcome="failure", error="worker process lost")
    table.status("w1", lost, 1.1)
    assert table.claimable() == [] and table.workers["w1"].state is WorkerState.PENDING
    table.ready("w1", 2, 2.0)
    assert table.claimable() == ["w1"]


def test_a_cancel_is_sent_once_and_the_worker_restarted_after_the_grace():
    table = ready_table("w1", "w2")
    table.assign(lease(), 0.0)
    first = table.cancel_requested([(7, 1, "w1"), (99, 1, "w2")], now=1.0, grace=5.0)
    assert first.cancels == [lease()] and first.restart == []  # 99 is not ours
    assert table.cancel_requested([(7, 1, "w1")], now=3.0, grace=5.0).cancels == []  # once
    late = table.cancel_requested([(7, 1, "w1")], now=6.5, grace=5.0)
    assert late.restart == ["w1"] and "CANCEL_GRACE" in (late.completions[0].update.error or "")
    assert table.workers["w1"].lease is None


def test_a_cancel_for_a_lease_that_ended_is_forgotten():
    table = ready_table("w1")
    table.assign(lease(), 0.0)
    table.cancel_requested([(7, 1, "w1")], now=1.0, grace=5.0)
    table.status("w1", success(), 2.0)  # the completion won the race
    assert table.cancel_requested([], now=9.0, grace=5.0).restart == []
    assert not table.cancels_pending()
