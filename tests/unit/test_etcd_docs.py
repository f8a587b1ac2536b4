"""The etcd store's documents for keys several runs hold at once (``etcd_docs``): pure conversions, no etcd."""

from __future__ import annotations

from dataclasses import replace

from taskguard.guard import core
from taskguard.guard.model import (
    ConflictPolicy,
    Event,
    EventType,
    ForceRelease,
    GuardRecord,
    Release,
    RunStatus,
)
from taskguard.store import etcd_docs as docs
from tests.unit.test_core_semaphores import semaphore
from tests.unit.test_core_transitions import acquire, at

KEY = "sess-1"
POOL = semaphore(64)
MOD = 77


def _as_read(record: GuardRecord) -> GuardRecord:
    """Localizing as a copy with nothing of its own would (the records as written)."""
    return record


def _acquired(record: GuardRecord | None, run_id: str, seconds: float = 1.0) -> GuardRecord:
    decision = core.decide(record, acquire(run_id, key=KEY), at(seconds), POOL)
    assert decision.record is not None
    return decision.record


def _runs_of(record: GuardRecord | None, count: int) -> GuardRecord:
    assert count > 0
    for i in range(count):
        record = _acquired(record, f"run-{i}")
    assert record is not None
    return record


def _decoded(value: bytes) -> docs.GuardDoc:
    return docs.decode_guard(value, MOD, at(2), lambda meta: _as_read)


def test_an_event_about_another_run_keeps_that_runs_record_through_the_document() -> None:
    record = _runs_of(None, 3)
    decision = core.decide(record, Release(KEY, "lease-run-0", RunStatus.SUCCEEDED, "done"), at(2), POOL)
    assert decision.record is not None
    (released,) = decision.events
    assert released.guard.run_id == "run-0" and decision.record.run_id == "run-2"

    doc = _decoded(docs.encode_guard(decision.record, decision.events, docs.GuardMeta("host-a"), (), 0))

    (event,) = doc.events
    assert (event.guard.run_id, event.guard.state) == ("run-0", released.guard.state)
    assert [run.run_id for run in doc.record.runs] == ["run-1", "run-2"]
    # Stamped alike: every guard of one change has the guard's revision after it.
    assert event.guard.revision == doc.record.revision == docs.encode_revision(MOD, 0)


def test_a_document_names_each_runs_last_deadline_move_and_one_written_before_semaphores_its_writers() -> None:
    record = _runs_of(None, 2)
    meta = docs.GuardMeta("host-b", {1: (40, "host-a"), 2: (0, "host-b")}, lock_delay_s=2.5)
    doc = _decoded(docs.encode_guard(record, (), meta, ("lease-x",), 0))
    assert doc.meta.move_of(1, MOD) == (40, "host-a")
    assert doc.meta.move_of(2, MOD) == (MOD, "host-b")  # 0: the document's own revision
    assert (doc.meta.lock_delay_s, doc.runs, doc.host) == (2.5, ("lease-x",), "host-b")

    old = docs.GuardMeta("host-c")
    assert _decoded(docs.encode_guard(record, (), old, (), 0)).meta.move_of(1, MOD) == (MOD, "host-c")


def test_events_of_a_wide_semaphore_share_their_runs_and_waiters_so_the_document_stays_small() -> None:
    record = _runs_of(None, 64)
    for i in range(64):
        waiting = replace(acquire(f"wait-{i}", key=KEY), on_conflict=ConflictPolicy.QUEUE)
        decided = core.decide(record, waiting, at(2), POOL)
        assert decided.record is not None
        record = decided.record
    freed = core.decide(record, ForceRelease(KEY, "ops", "make room"), at(3), POOL)
    assert freed.record is not None
    served = core.serving(freed.record, at(3), POOL)
    assert served is not None and served.record is not None and len(served.events) == 64

    for decision in (freed, served):
        assert decision.record is not None
        value = docs.encode_guard(decision.record, decision.events, docs.GuardMeta("host-a"), (), 0)
        # etcd takes requests of 1.5 MiB at most; 64 events of 64 runs and 64 waiters each would be 2 MB.
        assert len(value) < 256 * 1024, len(value)
        doc = _decoded(value)
        for read, written in zip(doc.events, decision.events, strict=True):
            assert (read.type, read.guard.run_id, read.guard.state) == (
                written.type,
                written.guard.run_id,
                written.guard.state,
            )
            assert [run.run_id for run in read.guard.runs] == [run.run_id for run in written.guard.runs]
            assert [waiter.run_id for waiter in read.guard.waiters] == [w.run_id for w in written.guard.waiters]


def _refusal(record: GuardRecord, run_id: str) -> Event:
    counted = replace(record, duplicate_count=record.duplicate_count + 1)
    return Event(EventType.DUPLICATE_REFUSED, counted, at(2).wall, trigger_run_id=run_id, trigger_holder="x")


def test_a_refusal_read_after_a_newer_run_started_names_its_run_beside_every_run_still_holding_the_key() -> None:
    two = _runs_of(None, 2)
    value = docs.encode_refusals([_refusal(two, "late")])
    # Run 1 ended and run 3 started before the refusals' put came back.
    decision = core.decide(two, Release(KEY, "lease-run-0", RunStatus.SUCCEEDED, ""), at(3), POOL)
    assert decision.record is not None
    now = _acquired(decision.record, "run-3", seconds=4)
    assert [run.fencing_token for run in now.runs] == [2, 3]

    refusals = docs.decode_refusals(value, MOD, now)

    (event,) = refusals.events
    assert event.guard.fencing_token == 2 and event.guard.run_id == "run-1"
    assert sorted(run.fencing_token for run in event.guard.runs) == [2, 3]  # run 3 did not end
    assert event.guard.newest_token == 3
    assert refusals.counted == 0  # counted while run 2 was the newest: not run 3's


def test_a_refusal_of_the_newest_run_counts() -> None:
    two = _runs_of(None, 2)
    refusals = docs.decode_refusals(docs.encode_refusals([_refusal(two, "dup")]), MOD, two)
    (event,) = refusals.events
    assert (event.guard.fencing_token, event.guard.duplicate_count, refusals.counted) == (2, 1, 1)


def test_a_heartbeat_put_carries_each_run_heartbeated_here_and_one_written_before_semaphores_reads_as_one() -> None:
    record = _runs_of(None, 2)
    beats = docs.decode_heartbeat(docs.encode_heartbeat(list(record.runs), "host-a"))
    assert beats.host == "host-a"
    assert [(beat.fencing_token, beat.heartbeat_at) for beat in beats.beats] == [
        (run.fencing_token, run.heartbeat_at) for run in record.runs
    ]
    single = docs.decode_heartbeat(docs.encode_heartbeat([record], "host-b"))
    assert [beat.fencing_token for beat in single.beats] == [record.fencing_token]
    old = b'{"fencing_token":7,"heartbeat_at":"2026-01-01T00:00:00+00:00","expires_at":null,"host":"h"}'
    assert [(beat.fencing_token, beat.expires_at) for beat in docs.decode_heartbeat(old).beats] == [(7, None)]


def test_an_owner_key_names_its_key_and_run_whatever_the_key_holds() -> None:
    for key in ("a", "a/b", "job#2", "x 1", "é::z"):
        name = docs.owner_name(key, 12)
        assert docs.owner_task_key(name) == key
        assert docs.owner_task_key(name) != docs.owner_task_key(docs.owner_name(key + "1", 2))
    # Written before semaphores: named by the task key alone.
    assert docs.owner_task_key("job#2") == "job#2"
