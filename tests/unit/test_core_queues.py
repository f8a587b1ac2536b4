"""Queues in the pure core: QUEUE and KEEP_NEWEST, decided on explicit times.

``settle`` applies a command the way the engine commits it: healing first, the decision, then the queue's
service (``core.serving``), each a decision of its own.
"""

from __future__ import annotations

import json
from dataclasses import replace

import hypothesis.strategies as st
from hypothesis import given, settings

from taskguard.guard import core
from taskguard.guard.model import (
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
    GuardState,
    Instant,
    KeyRule,
    Leave,
    Outcome,
    Policy,
    Rejected,
    Release,
    RunStatus,
)
from taskguard.store import codec
from tests.unit.test_core_transitions import KEY, acquire, at

GRACE = 15.0


def queue_policy(**rule: object) -> Policy:
    return Policy(resume_grace_s=GRACE, rules=(KeyRule(name="q", match="sess-*", **rule),))  # type: ignore[arg-type]


POLICY = queue_policy(max_queue=3)


def waiting(run_id: str, policy: ConflictPolicy = ConflictPolicy.QUEUE, max_wait_s: float | None = None) -> Acquire:
    return replace(acquire(run_id, stream_bound=True, ttl_s=None), on_conflict=policy, max_wait_s=max_wait_s)


def settle(
    record: GuardRecord | None, command: Command, now: Instant, policy: Policy = POLICY
) -> tuple[GuardRecord | None, list[Event], Decision]:
    """``command`` as the engine commits it: the decision (healing folded in), then the queue's service."""
    decision = core.decide(record, command, now, policy)
    after = decision.record if decision.record is not None else record
    events = list(decision.events)
    served = core.serving(after, now, policy)
    if served is not None:
        after = served.record
        events.extend(served.events)
    return after, events, decision


def run_all(commands: list[tuple[Command, float]], policy: Policy = POLICY) -> tuple[GuardRecord | None, list[Event]]:
    record: GuardRecord | None = None
    seen: list[Event] = []
    for command, seconds in commands:
        record, events, _ = settle(record, command, at(seconds), policy)
        seen.extend(events)
    return record, seen


def test_a_caller_that_queues_behind_a_running_run_is_told_its_place() -> None:
    record, _ = run_all([(acquire("a"), 0), (waiting("b"), 1)])
    record, events, decision = settle(record, waiting("c"), at(2))

    assert isinstance(decision.reply, AcquireReply)
    assert (decision.reply.outcome, decision.reply.position) == (Outcome.QUEUED, 2)
    assert record is not None and [w.run_id for w in record.waiters] == ["b", "c"]
    assert [(e.type, e.waiter_run_id) for e in events] == [(EventType.QUEUED, "c")]
    assert record.duplicate_count == 2  # both triggers found the key taken


def test_a_release_hands_the_key_to_the_first_waiter_in_its_own_commit() -> None:
    record, _ = run_all([(acquire("a"), 0), (waiting("b"), 1), (waiting("c"), 2)])
    record, events, decision = settle(record, Release(KEY, "lease-a", RunStatus.SUCCEEDED), at(3))

    # The release's answer is the released run; the next run is a commit of its own.
    assert isinstance(decision.reply, core.GuardReply) and decision.reply.guard is not None
    assert decision.reply.guard.state is GuardState.SUCCEEDED
    assert [e.type for e in events] == [EventType.RELEASED, EventType.ACQUIRED]
    assert record is not None and record.running
    assert (record.run_id, record.lease_id, record.fencing_token, record.claimed) == ("b", "lease-b", 2, False)
    assert [w.run_id for w in record.waiters] == ["c"]


def test_an_unclaimed_turn_lasts_the_resume_grace_then_ends_cancelled_as_no_loss() -> None:
    policy = queue_policy(lock_delay_s=60.0, expired_requires_approval=True)
    record, _ = run_all(
        [(acquire("a"), 0), (waiting("b"), 1), (Release(KEY, "lease-a", RunStatus.SUCCEEDED), 2)], policy
    )
    assert record is not None and record.expires_deadline == at(2 + GRACE).monotonic

    record, events, _ = settle(record, Expire(KEY, record.fencing_token), at(2 + GRACE), policy)

    assert record is not None and record.state is GuardState.CANCELLED
    assert "did not take up its turn" in record.last_detail
    assert record.lock_delay_deadline is None  # not a loss: no lock-delay, no approval needed
    assert [e.type for e in events] == [EventType.RELEASED]


def test_a_claimed_turn_runs_on_its_own_ttl() -> None:
    cmd = replace(waiting("b"), ttl_s=40.0, stream_bound=False)
    record, _ = run_all([(acquire("a"), 0), (cmd, 1), (Release(KEY, "lease-a", RunStatus.SUCCEEDED), 2)])
    assert record is not None and record.expires_deadline == at(2 + GRACE).monotonic

    record, _, decision = settle(record, Claim(KEY, "lease-b"), at(3))

    assert record is not None and record.claimed and record.expires_deadline == at(3 + 40).monotonic
    assert not isinstance(decision.reply, Rejected)


def test_leaving_removes_a_waiter_and_a_missed_turn_passes_to_the_next() -> None:
    record, _ = run_all([(acquire("a"), 0), (waiting("b"), 1), (waiting("c"), 2)])
    left, events, _ = settle(record, Leave(KEY, "c", "lease-c", "gone"), at(3))
    assert left is not None and [w.run_id for w in left.waiters] == ["b"]
    assert [(e.type, e.waiter_run_id, e.reason) for e in events] == [(EventType.DEQUEUED, "c", "gone")]

    record, _ = run_all([(acquire("a"), 0), (waiting("b"), 1), (waiting("c"), 2)])
    record, _, _ = settle(record, Release(KEY, "lease-a", RunStatus.SUCCEEDED), at(3))
    # b's call ended just as its turn came: the run it never heard of ends, and c's turn comes.
    record, events, _ = settle(record, Leave(KEY, "b", "lease-b", "gone"), at(4))
    assert record is not None and (record.run_id, record.running) == ("c", True)
    assert [e.type for e in events] == [EventType.RELEASED, EventType.ACQUIRED]


def test_a_leave_with_another_lease_changes_nothing() -> None:
    record, _ = run_all([(acquire("a"), 0), (waiting("b"), 1)])
    _, events, decision = settle(record, Leave(KEY, "b", "lease-of-someone-else", "gone"), at(2))
    assert events == [] and decision.record is None
    # Nor can anyone end a claimed run by leaving.
    _, events, _ = settle(record, Leave(KEY, "a", "lease-a", "gone"), at(2))
    assert events == []


def test_a_full_queue_refuses_without_queueing() -> None:
    record, _ = run_all([(acquire("a"), 0), *((waiting(f"w{i}"), 1) for i in range(3))])
    _, events, decision = settle(record, waiting("late"), at(2))

    assert isinstance(decision.reply, AcquireReply) and decision.reply.outcome is Outcome.QUEUE_FULL
    assert [e.type for e in events] == [EventType.QUEUE_FULL_REFUSED]
    assert decision.record is not None and len(decision.record.waiters) == 3


def test_a_waiter_leaves_when_its_max_wait_or_its_rules_passes() -> None:
    policy = queue_policy(max_wait_s=50.0)
    record, _ = run_all([(acquire("a"), 0), (waiting("mine", max_wait_s=10.0), 1), (waiting("rule's"), 1)], policy)
    assert record is not None and core.next_deadline(record) == at(11).monotonic

    record, events, _ = settle(record, Expire(KEY, 1), at(11), policy)
    assert record is not None and [w.run_id for w in record.waiters] == ["rule's"]
    assert [(e.type, e.waiter_run_id) for e in events] == [(EventType.DEQUEUED, "mine")]
    assert "max_wait passed" in events[0].reason

    record, events, _ = settle(record, Expire(KEY, 1), at(51), policy)
    assert record is not None and not record.waiters


def test_the_sweepers_expire_drops_a_lapsed_waiter_of_a_key_that_awaits_approval() -> None:
    policy = queue_policy(max_wait_s=10.0)
    record, _ = run_all([(acquire("a"), 0), (waiting("b"), 1), (Release(KEY, "lease-a", RunStatus.FAILED), 2)], policy)
    assert record is not None and record.state is GuardState.FAILED and core.next_deadline(record) == at(11).monotonic

    # The sweeper names the key's last run, which ended: the waiter's max_wait is healed all the same.
    record, events, _ = settle(record, Expire(KEY, record.fencing_token), at(11), policy)

    assert [(e.type, e.waiter_run_id) for e in events] == [(EventType.DEQUEUED, "b")]
    assert record is not None and not record.waiters


def test_keep_newest_replaces_the_waiting_trigger_and_says_by_whom() -> None:
    keep = ConflictPolicy.KEEP_NEWEST
    record, _ = run_all([(acquire("a"), 0), (waiting("queued"), 1), (waiting("old", keep), 2)])
    record, events, decision = settle(record, waiting("new", keep), at(3))

    assert record is not None and [w.run_id for w in record.waiters] == ["queued", "new"]
    superseded = [e for e in events if e.type is EventType.SUPERSEDED]
    assert [(e.waiter_run_id, e.trigger_run_id) for e in superseded] == [("old", "new")]
    assert isinstance(decision.reply, AcquireReply) and decision.reply.position == 2


def test_a_failed_key_serves_its_queue_only_after_approval() -> None:
    record, _ = run_all([(acquire("a"), 0), (waiting("b"), 1), (Release(KEY, "lease-a", RunStatus.FAILED), 2)])
    assert record is not None and record.state is GuardState.FAILED and [w.run_id for w in record.waiters] == ["b"]

    record, events, _ = settle(record, ApproveRetry(KEY, "ops", "fixed"), at(3))

    assert [e.type for e in events] == [EventType.RETRY_APPROVED, EventType.ACQUIRED]
    assert record is not None and (record.run_id, record.attempt, record.approved_by) == ("b", 2, "ops")


def test_a_reopening_rule_serves_the_queue_after_a_failure_at_once() -> None:
    policy = queue_policy(failure=FailureHandling.REOPEN)
    record, _ = run_all([(acquire("a"), 0), (waiting("b"), 1), (Release(KEY, "lease-a", RunStatus.FAILED), 2)], policy)
    assert record is not None and record.run_id == "b" and record.running


def test_a_lock_delay_holds_the_queue_until_it_ends() -> None:
    policy = queue_policy(lock_delay_s=30.0)
    record, _ = run_all([(acquire("a"), 0), (waiting("b"), 1), (ForceRelease(KEY, "ops", "stuck"), 2)], policy)
    assert record is not None and not record.running and core.next_deadline(record) == at(32).monotonic

    # A caller that does not wait is refused; it cannot jump the queue when the key opens either.
    _, _, refused = settle(record, acquire("rude"), at(10), policy)
    assert isinstance(refused.reply, AcquireReply) and refused.reply.outcome is Outcome.LOCK_DELAYED
    record, events, _ = settle(record, acquire("rude"), at(32), policy)
    assert record is not None and record.run_id == "b"
    assert [e.type for e in events][:1] == [EventType.ACQUIRED]


# --- properties --------------------------------------------------------------------------

RUNS = [f"r{i}" for i in range(6)]


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[Policy, list[tuple[Command, float]]]:
    rule = KeyRule(
        name="q",
        match="sess-*",
        max_queue=draw(st.integers(0, 3)),
        failure=draw(st.sampled_from(FailureHandling)),
        lock_delay_s=draw(st.sampled_from([0.0, 5.0])),
        max_wait_s=draw(st.sampled_from([None, 7.0])),
        allow_supersede=draw(st.booleans()),
        supersede_grace_s=draw(st.sampled_from([0.0, 3.0])),
    )
    policy = Policy(resume_grace_s=GRACE, rules=(rule,))
    commands: list[tuple[Command, float]] = []
    now = 0.0
    for _ in range(draw(st.integers(1, 30))):
        now += draw(st.sampled_from([0.0, 1.0, 4.0, 20.0]))
        run = draw(st.sampled_from(RUNS))
        lease = f"lease-{run}"
        command: Command = draw(
            st.sampled_from(
                [
                    replace(acquire(run, stream_bound=True, ttl_s=None), on_conflict=ConflictPolicy.QUEUE),
                    replace(acquire(run, stream_bound=True, ttl_s=None), on_conflict=ConflictPolicy.KEEP_NEWEST),
                    replace(acquire(run, stream_bound=True, ttl_s=None), on_conflict=ConflictPolicy.SUPERSEDE),
                    acquire(run),
                    Release(KEY, lease, RunStatus.SUCCEEDED),
                    Release(KEY, lease, RunStatus.FAILED),
                    Leave(KEY, run, lease, "gone"),
                    Claim(KEY, lease),
                    ApproveRetry(KEY, "ops", "ok"),
                    ForceRelease(KEY, "ops", "stuck"),
                    Expire(KEY, draw(st.integers(0, 8))),
                ]
            )
        )
        commands.append((command, now))
    return policy, commands


@settings(max_examples=300, deadline=None)
@given(scenarios())
def test_queues_admit_in_order_within_bounds_and_never_past_an_approval(
    scenario: tuple[Policy, list[tuple[Command, float]]],
) -> None:
    policy, commands = scenario
    rule = policy.rules[0]
    record: GuardRecord | None = None
    last_token = 0
    for command, seconds in commands:
        before = record
        record, events, _ = settle(record, command, at(seconds), policy)
        if record is None:
            continue
        assert len(record.waiters) <= rule.max_queue
        assert len({w.run_id for w in record.waiters}) == len(record.waiters)
        assert sum(1 for w in record.waiters if w.keep_newest) <= 1
        assert sum(1 for w in record.waiters if w.superseding) <= 1
        assert not any(w.superseding for w in record.waiters[1:])  # a superseder is first in line
        for event in events:
            if event.type is EventType.ACQUIRED:
                assert event.guard.fencing_token > last_token
                last_token = event.guard.fencing_token
                if event.waiter_run_id and before is not None:
                    # FIFO: the admitted waiter was first in line among those still waiting.
                    # (A waiter whose max_wait passed may queue again, at the end: a new place, not its old one.)
                    queued_before = [w.run_id for w in before.waiters]
                    if event.waiter_run_id in queued_before:
                        earlier = before.waiters[: queued_before.index(event.waiter_run_id)]
                        assert not {(w.run_id, w.queued_at) for w in earlier} & {
                            (w.run_id, w.queued_at) for w in record.waiters
                        }
        if before is not None and not before.running and rule.requires_approval(before.state):
            # A key waiting for an approval admits no one before it is given.
            if not isinstance(command, ApproveRetry):
                assert not (record.running and record.fencing_token > before.fencing_token)


# --- supersede ---------------------------------------------------------------------------

SUPERSEDING = queue_policy(allow_supersede=True, supersede_grace_s=20.0, lock_delay_s=5.0)


def superseding(run_id: str) -> Acquire:
    return replace(acquire(run_id, stream_bound=True, ttl_s=None), on_conflict=ConflictPolicy.SUPERSEDE)


def test_supersede_is_refused_where_the_rule_does_not_allow_it() -> None:
    record, _ = run_all([(acquire("a"), 0)])
    _, events, decision = settle(record, superseding("b"), at(1))

    assert events == [] and decision.record is None
    assert isinstance(decision.reply, Rejected)
    assert decision.reply.kind.name == "PERMISSION_DENIED" and decision.reply.field == "on_conflict"
    assert "rule 'q' does not set allow_supersede" in decision.reply.rule


def test_supersede_asks_the_running_run_to_stop_and_waits_first_in_line() -> None:
    record, _ = run_all([(acquire("a"), 0), (waiting("queued"), 1)], SUPERSEDING)
    record, events, decision = settle(record, superseding("newer"), at(2), SUPERSEDING)

    assert record is not None and record.running and record.run_id == "a"
    assert (record.stop_requested_by, record.stop_deadline) == ("newer", at(22).monotonic)
    assert [w.run_id for w in record.waiters] == ["newer", "queued"]
    assert [e.type for e in events] == [EventType.STOP_REQUESTED, EventType.QUEUED]
    assert isinstance(decision.reply, AcquireReply) and decision.reply.position == 1
    # The old run's release names the run it made way for, and the superseder's turn comes.
    record, events, _ = settle(record, Release(KEY, "lease-a", RunStatus.CANCELLED, "SIGTERM"), at(3), SUPERSEDING)
    assert [e.type for e in events] == [EventType.RELEASED, EventType.ACQUIRED]
    assert events[0].guard.last_detail == "superseded by run newer: SIGTERM"
    assert record is not None and record.run_id == "newer" and [w.run_id for w in record.waiters] == ["queued"]


def test_a_superseded_run_that_does_not_stop_is_force_released_after_the_grace() -> None:
    record, _ = run_all([(acquire("a", ttl_s=600), 0), (superseding("newer"), 1)], SUPERSEDING)
    assert record is not None and core.next_deadline(record) == at(21).monotonic
    # Its fence stops being vouched for when the grace ends, before any command heals it.
    assert core.fence_is_valid(record, 1, at(20.9).monotonic)
    assert not core.fence_is_valid(record, 1, at(21).monotonic)

    record, events, _ = settle(record, Expire(KEY, 1), at(21), SUPERSEDING)

    assert [e.type for e in events] == [EventType.FORCE_RELEASED]
    assert (
        record is not None
        and record.state is GuardState.CANCELLED
        and not core.fence_is_valid(record, 1, at(21).monotonic)
    )
    assert "did not stop within the supersede_grace of 20s" in record.last_detail
    assert record.released_by == "run newer (supersede)"
    # Its lock-delay holds the key, as after any force-release; then the superseder's turn comes.
    record, events, _ = settle(record, Expire(KEY, 1), at(26), SUPERSEDING)
    assert record is not None and record.run_id == "newer" and record.running


def test_a_newer_superseder_replaces_the_waiting_one_and_the_grace_does_not_start_again() -> None:
    record, _ = run_all([(acquire("a", ttl_s=600), 0), (superseding("first"), 1)], SUPERSEDING)
    record, events, _ = settle(record, superseding("second"), at(10), SUPERSEDING)

    assert record is not None and [w.run_id for w in record.waiters] == ["second"]
    assert (record.stop_requested_by, record.stop_deadline) == ("second", at(21).monotonic)
    assert [(e.type, e.waiter_run_id) for e in events] == [
        (EventType.SUPERSEDED, "first"),
        (EventType.STOP_REQUESTED, ""),
        (EventType.QUEUED, "second"),
    ]


def test_a_waiters_run_id_names_one_caller() -> None:
    record, _ = run_all([(acquire("a"), 0), (waiting("b"), 1)])
    impostor = replace(waiting("b"), principal="uid:666", lease_id="lease-impostor")

    _, events, decision = settle(record, impostor, at(2))

    assert events == [] and isinstance(decision.reply, Rejected) and decision.reply.field == "run_id"
    _, _, as_the_running_run = settle(record, replace(waiting("a"), principal="uid:666"), at(2))
    assert isinstance(as_the_running_run.reply, Rejected)


def test_a_queued_guard_is_stored_as_its_documents_say_with_each_waiter_encoded_once() -> None:
    """The store's encoders splice each waiter's JSON in (kept per waiter); what they write is the document."""
    record, events = run_all([(acquire("a"), 0), (waiting("b", max_wait_s=5.0), 1), (superseding_for_codec(), 2)])
    assert record is not None and len(record.waiters) == 2
    assert json.loads(codec.encode_record(record)) == codec.record_to_doc(record)
    for event in events:
        assert json.loads(codec.encode_event(event)) == codec.event_to_doc(event)
    restored = codec.record_from_doc(json.loads(codec.encode_record(record)), at(3))
    assert [(w.run_id, w.keep_newest, w.wait_until) for w in restored.waiters] == [
        (w.run_id, w.keep_newest, w.wait_until) for w in record.waiters
    ]


def superseding_for_codec() -> Acquire:
    return replace(waiting("c", ConflictPolicy.KEEP_NEWEST), labels=(("k", "v\\u2603\\n"),))
