"""Semaphores in the pure core: a key whose rule lets ``max_holders`` runs hold it at once.

``settle`` (from the queue tests) applies a command as the engine commits it: healing, the decision, then the
queue's service.
"""

from __future__ import annotations

from dataclasses import replace

import hypothesis.strategies as st
from hypothesis import given, settings

from taskguard.guard import core
from taskguard.guard.model import (
    RUN_ENDS,
    Abandon,
    Acquire,
    AcquireReply,
    ApproveRetry,
    Claim,
    Command,
    ConflictPolicy,
    Decision,
    Event,
    EventType,
    Expire,
    FailureHandling,
    ForceRelease,
    GuardRecord,
    GuardReply,
    GuardState,
    Heartbeat,
    Instant,
    KeyRule,
    Leave,
    Outcome,
    Policy,
    Rejected,
    Release,
    Renew,
    RunStatus,
)
from taskguard.store import codec
from tests.unit import test_core_queues
from tests.unit.test_core_queues import GRACE, waiting
from tests.unit.test_core_transitions import KEY, acquire, at


def semaphore(holders: int = 3, **rule: object) -> Policy:
    return Policy(
        resume_grace_s=GRACE,
        rules=(KeyRule(name="pool", match="sess-*", max_holders=holders, **rule),),  # type: ignore[arg-type]
    )


POOL = semaphore()


def settle(
    record: GuardRecord | None, command: Command, now: Instant, policy: Policy = POOL
) -> tuple[GuardRecord | None, list[Event], Decision]:
    return test_core_queues.settle(record, command, now, policy)


def run_all(commands: list[tuple[Command, float]], policy: Policy = POOL) -> tuple[GuardRecord | None, list[Event]]:
    record: GuardRecord | None = None
    seen: list[Event] = []
    for command, seconds in commands:
        record, events, _ = settle(record, command, at(seconds), policy)
        seen.extend(events)
    return record, seen


def outcome_of(record: GuardRecord | None, command: Command, seconds: float, policy: Policy = POOL) -> Outcome:
    _, _, decision = settle(record, command, at(seconds), policy)
    assert isinstance(decision.reply, AcquireReply), decision.reply
    return decision.reply.outcome


def test_up_to_max_holders_runs_hold_the_key_each_with_its_own_lease_and_token() -> None:
    record, events = run_all([(acquire("a"), 0), (acquire("b"), 1), (acquire("c"), 2)])

    assert record is not None and record.running
    assert [(run.run_id, run.lease_id, run.fencing_token) for run in record.runs] == [
        ("a", "lease-a", 1),
        ("b", "lease-b", 2),
        ("c", "lease-c", 3),
    ]
    assert [(e.type, e.guard.run_id) for e in events] == [(EventType.ACQUIRED, run) for run in "abc"]
    # Each acquisition's reply is its own run's, with its lease.
    _, _, decision = settle(record, acquire("d"), at(3))
    assert isinstance(decision.reply, AcquireReply) and decision.reply.outcome is Outcome.ALREADY_RUNNING
    # The refusal names every run in the way.
    assert [run.run_id for run in decision.reply.guard.runs] == ["a", "b", "c"]


def test_a_freed_slot_takes_the_next_run_and_tokens_never_repeat() -> None:
    record, _ = run_all(
        [(acquire("a"), 0), (acquire("b"), 1), (acquire("c"), 2), (Release(KEY, "lease-c", RunStatus.SUCCEEDED), 3)]
    )
    # The newest run ended: an older one speaks for the key; the highest token is still counted.
    assert record is not None and record.running and record.run_id == "b"
    assert [run.run_id for run in record.runs] == ["a", "b"]

    record, _, decision = settle(record, acquire("d"), at(4))
    assert isinstance(decision.reply, AcquireReply) and decision.reply.outcome is Outcome.ACQUIRED
    assert decision.reply.lease_id == "lease-d"
    assert record is not None and [(run.run_id, run.fencing_token) for run in record.runs] == [
        ("a", 1),
        ("b", 2),
        ("d", 4),
    ]


def test_each_run_renews_heartbeats_and_releases_by_its_own_lease() -> None:
    record, _ = run_all([(acquire("a"), 0), (acquire("b"), 1)])

    record, _, renewed = settle(record, Renew(KEY, "lease-a", 100.0), at(10))
    assert isinstance(renewed.reply, GuardReply) and renewed.reply.guard is not None
    assert renewed.reply.guard.run_id == "a" and renewed.reply.guard.expires_deadline == at(110).monotonic
    assert record is not None and record.run_with_lease("lease-a") is not None

    record, _, _ = settle(record, Heartbeat(KEY, "lease-b"), at(20))
    held_b = record.run_with_lease("lease-b") if record else None
    assert held_b is not None and held_b.last_seen == at(20).monotonic

    record, events, _ = settle(record, Release(KEY, "lease-a", RunStatus.SUCCEEDED), at(30))
    assert [(e.type, e.guard.run_id, e.guard.state) for e in events] == [
        (EventType.RELEASED, "a", GuardState.SUCCEEDED)
    ]
    assert record is not None and [run.run_id for run in record.runs] == ["b"]
    # The lease is gone with its run; a second release of it says so the way a single run's does.
    _, _, again = settle(record, Renew(KEY, "lease-a"), at(31))
    assert isinstance(again.reply, Rejected) and again.reply.field == "lease_id"


def test_a_run_that_lapses_expires_alone_and_its_fence_with_it() -> None:
    record, _ = run_all([(acquire("a"), 0), (acquire("b"), 20)])
    assert record is not None and core.next_deadline(record) == at(30).monotonic

    record, events, _ = settle(record, Expire(KEY, 1), at(30))

    assert [(e.type, e.guard.run_id) for e in events] == [(EventType.EXPIRED, "a")]
    assert record is not None and [run.run_id for run in record.runs] == ["b"]
    assert not core.fence_is_valid(record, 1, at(30).monotonic)
    assert core.fence_is_valid(record, 2, at(30).monotonic)


def test_a_failed_run_closes_the_key_until_approved_while_the_others_go_on() -> None:
    record, _ = run_all([(acquire("a"), 0), (acquire("b"), 1), (Release(KEY, "lease-a", RunStatus.FAILED), 2)])

    assert record is not None and record.state is GuardState.FAILED and record.run_id == "a"
    assert [run.run_id for run in record.runs] == ["b"]
    assert outcome_of(record, acquire("c"), 3) is Outcome.RETRY_REQUIRES_APPROVAL
    # The run that goes on keeps its lease.
    record, _, renewed = settle(record, Renew(KEY, "lease-b"), at(4))
    assert not isinstance(renewed.reply, Rejected)
    assert record is not None and record.state is GuardState.FAILED

    record, _, _ = settle(record, ApproveRetry(KEY, "ops", "fixed"), at(5))
    record, _, decision = settle(record, acquire("c"), at(6))
    assert isinstance(decision.reply, AcquireReply) and decision.reply.outcome is Outcome.ACQUIRED
    assert record is not None and record.approved_by == "ops"
    assert [run.run_id for run in record.runs] == ["b", "c"]


def test_a_reopening_rule_lets_the_key_go_on_after_a_failure() -> None:
    policy = semaphore(failure=FailureHandling.REOPEN)
    record, _ = run_all([(acquire("a"), 0), (acquire("b"), 1), (Release(KEY, "lease-b", RunStatus.FAILED), 2)], policy)
    assert record is not None and record.running and record.run_id == "a"
    assert outcome_of(record, acquire("c"), 3, policy) is Outcome.ACQUIRED


def test_a_lost_run_closes_the_key_for_its_lock_delay_and_the_others_go_on() -> None:
    policy = semaphore(lock_delay_s=10.0)
    stream = replace(acquire("a", stream_bound=True, ttl_s=None))
    record, _ = run_all([(stream, 0), (acquire("b"), 1), (Abandon(KEY, 1, "stream ended"), 2)], policy)

    assert record is not None and record.running and [run.run_id for run in record.runs] == ["b"]
    assert record.lock_delay_deadline == at(12).monotonic
    assert outcome_of(record, acquire("c"), 5, policy) is Outcome.LOCK_DELAYED
    assert outcome_of(record, acquire("c"), 12, policy) is Outcome.ACQUIRED


def test_a_queue_fills_every_slot_that_opens() -> None:
    policy = semaphore(holders=2)
    record, _ = run_all(
        [(acquire("a"), 0), (acquire("b"), 0), (waiting("w1"), 1), (waiting("w2"), 2), (waiting("w3"), 3)], policy
    )
    assert record is not None and [w.run_id for w in record.waiters] == ["w1", "w2", "w3"]

    record, events, _ = settle(record, ForceRelease(KEY, "ops", "stuck"), at(4), policy)

    assert [(e.type, e.guard.run_id) for e in events] == [
        (EventType.FORCE_RELEASED, "a"),
        (EventType.FORCE_RELEASED, "b"),
        (EventType.ACQUIRED, "w1"),
        (EventType.ACQUIRED, "w2"),
    ]
    assert record is not None and [run.run_id for run in record.runs] == ["w1", "w2"]
    assert [w.run_id for w in record.waiters] == ["w3"]
    # Each admitted waiter's call takes up its own run.
    record, _, claimed = settle(record, Claim(KEY, "lease-w1"), at(5), policy)
    assert not isinstance(claimed.reply, Rejected)
    assert record is not None and all(run.claimed for run in record.runs if run.run_id == "w1")


def test_a_caller_that_does_not_wait_cannot_take_a_slot_the_queue_is_owed() -> None:
    policy = semaphore(holders=2, failure=FailureHandling.REQUIRE_APPROVAL)
    record, _ = run_all(
        [(acquire("a"), 0), (acquire("b"), 0), (waiting("w1"), 1), (Release(KEY, "lease-a", RunStatus.SUCCEEDED), 2)],
        policy,
    )
    assert record is not None and sorted(run.run_id for run in record.runs) == ["b", "w1"]
    assert outcome_of(record, acquire("rude"), 3, policy) is Outcome.ALREADY_RUNNING


def test_a_run_id_names_one_run_of_the_key() -> None:
    record, _ = run_all([(acquire("a"), 0), (acquire("b"), 1)])
    # The same caller asking again gets its own lease back, whichever run it is.
    _, _, again = settle(record, acquire("a"), at(2))
    assert isinstance(again.reply, AcquireReply) and (again.reply.outcome, again.reply.lease_id) == (
        Outcome.ACQUIRED,
        "lease-a",
    )
    # Another caller naming that run gets no second run by that id.
    impostor = replace(acquire("a"), principal="uid:1234", lease_id="lease-x")
    record, _, refused = settle(record, impostor, at(3))
    assert isinstance(refused.reply, AcquireReply) and refused.reply.outcome is Outcome.ALREADY_RUNNING
    assert record is not None and [run.lease_id for run in record.runs] == ["lease-a", "lease-b"]


def test_supersede_is_refused_for_a_semaphore() -> None:
    policy = semaphore(allow_supersede=True)
    record, _ = run_all([(acquire("a"), 0), (acquire("b"), 0), (acquire("c"), 0)], policy)
    superseding = replace(acquire("s", stream_bound=True, ttl_s=None), on_conflict=ConflictPolicy.SUPERSEDE)
    _, _, decision = settle(record, superseding, at(1), policy)
    assert isinstance(decision.reply, Rejected) and decision.reply.field == "on_conflict"
    assert "3 runs hold it" in decision.reply.rule


def test_a_semaphore_is_stored_as_its_documents_say() -> None:
    record, _ = run_all([(acquire("a"), 0), (acquire("b"), 1), (waiting("w"), 1), (acquire("c"), 2)])
    assert record is not None
    stored = codec.record_from_doc(codec.record_to_doc(record), at(2))
    assert stored.holders == record.holders and stored.tokens_issued == record.tokens_issued
    assert stored == record


# --- properties --------------------------------------------------------------------------

RUNS = [f"r{i}" for i in range(6)]


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[Policy, list[tuple[Command, float]]]:
    rule = KeyRule(
        name="pool",
        match="sess-*",
        max_holders=draw(st.integers(1, 3)),
        max_queue=draw(st.integers(0, 3)),
        failure=draw(st.sampled_from(FailureHandling)),
        abandoned_requires_approval=draw(st.booleans()),
        expired_requires_approval=draw(st.booleans()),
        lock_delay_s=draw(st.sampled_from([0.0, 5.0])),
        max_hold_s=draw(st.sampled_from([None, 25.0])),
        max_wait_s=draw(st.sampled_from([None, 7.0])),
    )
    policy = Policy(resume_grace_s=GRACE, rules=(rule,))
    commands: list[tuple[Command, float]] = []
    now = 0.0
    for _ in range(draw(st.integers(1, 40))):
        now += draw(st.sampled_from([0.0, 1.0, 4.0, 20.0, 40.0]))
        run = draw(st.sampled_from(RUNS))
        lease = f"lease-{run}"
        token = draw(st.integers(0, 10))
        command: Command = draw(
            st.sampled_from(
                [
                    acquire(run),
                    acquire(run, stream_bound=True, ttl_s=None),
                    # Queueing callers, more often than the rest: places must run out for a queue to form.
                    *[replace(acquire(run, stream_bound=True, ttl_s=None), on_conflict=ConflictPolicy.QUEUE)] * 4,
                    replace(acquire(run, stream_bound=True, ttl_s=None), on_conflict=ConflictPolicy.KEEP_NEWEST),
                    Renew(KEY, lease),
                    Heartbeat(KEY, lease),
                    Release(KEY, lease, RunStatus.SUCCEEDED),
                    Release(KEY, lease, RunStatus.FAILED),
                    Leave(KEY, run, lease, "gone"),
                    Claim(KEY, lease),
                    ApproveRetry(KEY, "ops", "ok"),
                    ForceRelease(KEY, "ops", "stuck"),
                    Expire(KEY, token),
                    Abandon(KEY, token, "stream ended"),
                ]
            )
        )
        commands.append((command, now))
    return policy, commands


def _blocked_by_approval(record: GuardRecord | None, rule: KeyRule) -> bool:
    return record is not None and not record.running and rule.requires_approval(record.state)


@settings(max_examples=400, deadline=None)
@given(scenarios())
def test_never_more_than_max_holders_and_every_run_accounted_for(
    scenario: tuple[Policy, list[tuple[Command, float]]],
) -> None:
    policy, commands = scenario
    rule = policy.rules[0]
    record: GuardRecord | None = None
    last_token = 0
    # What the events say holds the key: a run starts with ACQUIRED and ends with one of RUN_ENDS.
    live: set[int] = set()
    for command, seconds in commands:
        now = at(seconds)
        before = record
        record, events, decision = settle(record, command, now, policy)
        for event in events:
            if event.type is EventType.ACQUIRED:
                assert event.guard.fencing_token > last_token, "fencing tokens rise strictly"
                last_token = event.guard.fencing_token
                assert not _blocked_by_approval(before, rule) or isinstance(command, ApproveRetry)
                assert before is None or not core.lock_delayed(before, now.monotonic)
                live.add(event.guard.fencing_token)
                if event.waiter_run_id and before is not None:
                    # FIFO, however many places opened: no one queued ahead of the admitted waiter still waits.
                    # (A waiter whose max_wait passed may queue again, at the end: a new place, not its old one.)
                    queued_before = [w.run_id for w in before.waiters]
                    if event.waiter_run_id in queued_before:
                        earlier = before.waiters[: queued_before.index(event.waiter_run_id)]
                        assert record is not None
                        assert not {(w.run_id, w.queued_at) for w in earlier} & {
                            (w.run_id, w.queued_at) for w in record.waiters
                        }
            elif event.type in RUN_ENDS:
                live.discard(event.guard.fencing_token)
        if record is None:
            continue
        runs = record.runs
        assert len(runs) <= rule.max_holders
        assert {run.fencing_token for run in runs} == live, "every start and end of a run has its event"
        assert len({run.run_id for run in runs}) == len(runs)
        assert len({run.lease_id for run in runs}) == len(runs)
        assert all(run.running and not run.waiters and not run.holders for run in record.holders)
        assert len(record.waiters) <= rule.max_queue
        for run in runs:
            if run.hold_deadline is not None:
                assert run.expires_deadline is not None and run.expires_deadline <= run.hold_deadline
            assert core.fence_is_valid(record, run.fencing_token, now.monotonic) or core.is_expired(run, now.monotonic)
        for token in range(1, last_token + 1):
            if token not in live:
                assert not core.fence_is_valid(record, token, now.monotonic)
        if isinstance(decision.reply, AcquireReply) and decision.reply.outcome is Outcome.ACQUIRED:
            assert isinstance(command, Acquire)
            mine = record.run_with_lease(decision.reply.lease_id)
            assert mine is not None and mine.run_id == command.run_id
        assert codec.record_from_doc(codec.record_to_doc(record), now) == record


def test_a_release_of_a_run_that_left_is_answered_by_its_snapshot_whatever_the_others_deadlines() -> None:
    record, events = run_all([(acquire("a", ttl_s=10.0), 0), (acquire("b", ttl_s=100.0), 0)])
    record, events, _ = settle(record, Release(KEY, "lease-b", RunStatus.SUCCEEDED), at(1))
    snapshot = next(e.guard for e in events if e.type is EventType.RELEASED)
    assert snapshot.run_id == "b" and snapshot.holders  # the store keeps it as told: with the key's other run

    # Later, run a's TTL has lapsed (nobody healed it yet): b's holder asks again for its release.
    answer = core.answer_past_run(snapshot, record, Release(KEY, "lease-b", RunStatus.SUCCEEDED), at(50), POOL)

    assert isinstance(answer, GuardReply) and answer.guard is not None
    assert (answer.guard.run_id, answer.guard.state) == ("b", GuardState.SUCCEEDED)


def test_a_release_of_a_run_that_handed_over_to_its_queue_is_answered_whatever_its_waiters_max_wait() -> None:
    policy = semaphore(holders=1, max_wait_s=5.0)
    record, _ = run_all([(acquire("a"), 0), (waiting("w"), 0), (waiting("later"), 0)], policy)
    record, events, _ = settle(record, Release(KEY, "lease-a", RunStatus.SUCCEEDED), at(1), policy)
    snapshot = next(e.guard for e in events if e.type is EventType.RELEASED)
    assert [w.run_id for w in snapshot.waiters] == ["w", "later"]  # told before the queue was served

    # By the time a's holder asks again, the waiters' max_wait has passed in that snapshot.
    answer = core.answer_past_run(snapshot, record, Release(KEY, "lease-a", RunStatus.SUCCEEDED), at(60), policy)

    assert isinstance(answer, GuardReply) and answer.guard is not None and answer.guard.run_id == "a"
