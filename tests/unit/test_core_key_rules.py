"""Per-key rules in the pure core: which rule a key follows, failure handling, lock-delay and max hold.

Explicit times throughout (``at(seconds)``); guards are reached through real commands.
"""

from __future__ import annotations

from dataclasses import replace

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from taskguard.guard.core import conflict_policy, decide, fence_is_valid, healing, lock_delayed
from taskguard.guard.model import (
    Abandon,
    AcquireReply,
    ApproveRetry,
    AwaitResume,
    Command,
    ConflictPolicy,
    EventType,
    Expire,
    FailureHandling,
    ForceRelease,
    GuardRecord,
    GuardReply,
    GuardState,
    Heartbeat,
    KeyRule,
    Outcome,
    Policy,
    Release,
    Renew,
    RunStatus,
)
from tests.unit.test_core_transitions import KEY, WALL0, acquire, at, commit, start, step

LOCK_DELAY = 10.0
MAX_HOLD = 100.0


def ruled(**rule: object) -> Policy:
    """A policy whose only rule covers KEY (``sess-*``) and sets ``rule``; other keys get the default."""
    return Policy(rules=(KeyRule(name="sessions", match="sess-*", **rule),))  # type: ignore[arg-type]


# --- which rule --------------------------------------------------------------------


def test_the_first_matching_rule_wins_and_the_default_rule_covers_the_rest() -> None:
    first = KeyRule(name="deploys", match="*::deploy", lock_delay_s=5.0)
    second = KeyRule(name="ops", match="agent:ops:*", failure=FailureHandling.REOPEN)
    policy = Policy(rules=(first, second), default_rule=KeyRule(expired_requires_approval=True))

    assert policy.rule_for("agent:ops::deploy") is first
    assert policy.rule_for("agent:ops::report") is second
    assert policy.rule_for("agent:main::report") is policy.default_rule
    assert policy.rule_for("agent:main::report").name == "default"


def test_a_glob_is_case_sensitive_and_star_spans_separators() -> None:
    rule = KeyRule(match="agent:*::build")

    assert rule.matches("agent:main:discord:c1:s1::build")
    assert not rule.matches("Agent:main::build")
    assert not rule.matches("agent:main::build-2")


# --- failure handling ----------------------------------------------------------------


def _failed(policy: Policy) -> GuardRecord:
    return commit(start(policy=policy), Release(KEY, "lease-run-1", RunStatus.FAILED, "boom"), at(1), policy)


def test_a_failed_key_needs_approval_by_default() -> None:
    policy = ruled()
    _, decision = step(_failed(policy), acquire("run-2"), at(2), policy)

    assert isinstance(decision.reply, AcquireReply)
    assert decision.reply.outcome is Outcome.RETRY_REQUIRES_APPROVAL


def test_a_rule_that_reopens_failed_keys_admits_the_next_run_without_approval() -> None:
    policy = ruled(failure=FailureHandling.REOPEN)
    failed = _failed(policy)
    _, decision = step(failed, acquire("run-2"), at(2), policy)

    assert isinstance(decision.reply, AcquireReply)
    assert decision.reply.outcome is Outcome.ACQUIRED
    assert decision.reply.guard.fencing_token == failed.fencing_token + 1
    # Nothing to approve on such a key.
    _, approval = step(failed, ApproveRetry(KEY, "ops", "why"), at(2), policy)
    assert not approval.changes


def test_only_the_matching_keys_reopen() -> None:
    policy = Policy(rules=(KeyRule(name="flaky", match="flaky::*", failure=FailureHandling.REOPEN),))
    failed = _failed(policy)  # KEY is not flaky::*

    _, decision = step(failed, acquire("run-2"), at(2), policy)
    assert isinstance(decision.reply, AcquireReply)
    assert decision.reply.outcome is Outcome.RETRY_REQUIRES_APPROVAL


def test_a_rule_can_require_approval_after_an_abandoned_run() -> None:
    policy = ruled(abandoned_requires_approval=True)
    running = start(ttl_s=None, stream_bound=True, policy=policy)
    abandoned = commit(running, Abandon(KEY, running.fencing_token, "stream dropped"), at(1), policy)

    _, decision = step(abandoned, acquire("run-2"), at(2), policy)
    assert isinstance(decision.reply, AcquireReply)
    assert decision.reply.outcome is Outcome.RETRY_REQUIRES_APPROVAL
    # The default rule does not.
    _, elsewhere = step(abandoned, acquire("run-2"), at(2), Policy())
    assert isinstance(elsewhere.reply, AcquireReply) and elsewhere.reply.outcome is Outcome.ACQUIRED


# --- lock-delay -----------------------------------------------------------------------

POLICY_LOCK_DELAY = ruled(lock_delay_s=LOCK_DELAY)


def _lost(how: str, policy: Policy = POLICY_LOCK_DELAY) -> GuardRecord:
    """The guard after its run was lost at t=5 (``how``: abandoned, expired or force-released)."""
    match how:
        case "abandoned":
            running = start(ttl_s=None, stream_bound=True, policy=policy)
            return commit(running, Abandon(KEY, running.fencing_token, "stream dropped"), at(5), policy)
        case "expired":
            running = start(ttl_s=5.0, policy=policy)
            return commit(running, Expire(KEY, running.fencing_token), at(5), policy)
        case "force-released":
            return commit(start(policy=policy), ForceRelease(KEY, "ops-alice", "stuck"), at(5), policy)
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["abandoned", "expired", "force-released"])
def test_after_an_involuntary_loss_the_key_stays_closed_for_its_lock_delay(how: str) -> None:
    lost = _lost(how)
    assert lost.lock_delay_until == WALL0 + (at(5 + LOCK_DELAY).wall - WALL0)

    refused, decision = step(lost, acquire("run-2"), at(5 + LOCK_DELAY - 0.001), POLICY_LOCK_DELAY)
    assert isinstance(decision.reply, AcquireReply)
    assert decision.reply.outcome is Outcome.LOCK_DELAYED
    assert decision.reply.guard.lock_delay_until == at(5 + LOCK_DELAY).wall
    assert [event.type for event in decision.events] == [EventType.LOCK_DELAY_REFUSED]
    assert refused is not None and refused.duplicate_count == lost.duplicate_count + 1 and not refused.running

    _, opened = step(refused, acquire("run-2"), at(5 + LOCK_DELAY), POLICY_LOCK_DELAY)
    assert isinstance(opened.reply, AcquireReply)
    assert opened.reply.outcome is Outcome.ACQUIRED
    # The new run carries no lock-delay of its own.
    assert opened.reply.guard.lock_delay_until is None and opened.reply.guard.lock_delay_deadline is None


@pytest.mark.parametrize("status", [RunStatus.SUCCEEDED, RunStatus.CANCELLED])
def test_a_release_by_the_holder_starts_no_lock_delay(status: RunStatus) -> None:
    released = commit(
        start(policy=POLICY_LOCK_DELAY), Release(KEY, "lease-run-1", status, ""), at(5), POLICY_LOCK_DELAY
    )

    assert released.lock_delay_until is None
    _, decision = step(released, acquire("run-2"), at(5), POLICY_LOCK_DELAY)
    assert isinstance(decision.reply, AcquireReply) and decision.reply.outcome is Outcome.ACQUIRED


def test_a_ttl_lapse_healed_by_the_next_acquire_closes_the_key_too() -> None:
    running = start(ttl_s=5.0, policy=POLICY_LOCK_DELAY)

    _, decision = step(running, acquire("run-2"), at(6), POLICY_LOCK_DELAY)

    assert isinstance(decision.reply, AcquireReply)
    assert decision.reply.outcome is Outcome.LOCK_DELAYED
    # The lapse happened at its deadline (t=5), and the delay runs from when the sidecar saw it (t=6).
    assert decision.reply.guard.lock_delay_until == at(6 + LOCK_DELAY).wall
    assert [event.type for event in decision.events] == [EventType.EXPIRED, EventType.LOCK_DELAY_REFUSED]


def test_an_approved_retry_still_waits_out_the_lock_delay() -> None:
    policy = ruled(lock_delay_s=LOCK_DELAY, abandoned_requires_approval=True)
    lost = _lost("abandoned", policy)
    approved = commit(lost, ApproveRetry(KEY, "ops", "checked the holder is gone"), at(6), policy)

    _, early = step(approved, acquire("run-2"), at(7), policy)
    _, later = step(approved, acquire("run-2"), at(5 + LOCK_DELAY), policy)

    assert isinstance(early.reply, AcquireReply) and early.reply.outcome is Outcome.LOCK_DELAYED
    assert isinstance(later.reply, AcquireReply) and later.reply.outcome is Outcome.ACQUIRED


def test_approval_comes_before_lock_delay_so_the_refusal_says_what_to_do_first() -> None:
    policy = ruled(lock_delay_s=LOCK_DELAY, expired_requires_approval=True)

    _, decision = step(_lost("expired", policy), acquire("run-2"), at(6), policy)

    assert isinstance(decision.reply, AcquireReply)
    assert decision.reply.outcome is Outcome.RETRY_REQUIRES_APPROVAL


def test_keys_without_a_lock_delay_open_at_once() -> None:
    lost = _lost("abandoned", Policy())

    assert not lock_delayed(lost, at(5).monotonic)
    _, decision = step(lost, acquire("run-2"), at(5), Policy())
    assert isinstance(decision.reply, AcquireReply) and decision.reply.outcome is Outcome.ACQUIRED


# --- max hold -----------------------------------------------------------------------------

POLICY_MAX_HOLD = ruled(max_hold_s=MAX_HOLD)


def test_max_hold_caps_every_lease_deadline_however_often_it_is_renewed() -> None:
    running = start(ttl_s=30.0, policy=POLICY_MAX_HOLD)
    assert running.hold_until == at(MAX_HOLD).wall

    renewed = running
    for t in (20.0, 40.0, 60.0, 80.0, 99.0):
        renewed = commit(renewed, Renew(KEY, "lease-run-1", 30.0), at(t), POLICY_MAX_HOLD)
        assert renewed.expires_deadline is not None
        assert renewed.expires_deadline <= at(MAX_HOLD).monotonic
    assert renewed.expires_at == at(MAX_HOLD).wall
    assert fence_is_valid(renewed, renewed.fencing_token, at(MAX_HOLD - 0.001).monotonic)
    assert not fence_is_valid(renewed, renewed.fencing_token, at(MAX_HOLD).monotonic)


def test_a_run_past_its_max_hold_ends_expired_saying_why() -> None:
    running = start(ttl_s=None, stream_bound=True, policy=POLICY_MAX_HOLD)
    beaten = commit(running, Heartbeat(KEY, "lease-run-1"), at(50), POLICY_MAX_HOLD)

    healed = healing(beaten, Heartbeat(KEY, "lease-run-1"), at(MAX_HOLD), POLICY_MAX_HOLD)

    assert healed is not None and healed.record is not None
    assert healed.record.state is GuardState.EXPIRED
    assert healed.record.last_detail == "held for the max_hold of 100s (rule 'sessions')"
    _, decision = step(beaten, acquire("run-2"), at(MAX_HOLD), POLICY_MAX_HOLD)
    assert isinstance(decision.reply, AcquireReply) and decision.reply.outcome is Outcome.ACQUIRED
    assert [event.type for event in decision.events] == [EventType.EXPIRED, EventType.ACQUIRED]


def test_a_stream_lease_waiting_to_resume_after_a_restart_keeps_its_max_hold() -> None:
    running = start(ttl_s=None, stream_bound=True, policy=POLICY_MAX_HOLD)

    waiting = commit(running, AwaitResume(KEY, running.fencing_token), at(10), POLICY_MAX_HOLD)

    assert waiting.expires_deadline == at(MAX_HOLD).monotonic
    assert waiting.expires_at == at(MAX_HOLD).wall


def test_without_max_hold_renewals_keep_a_run_alive_indefinitely() -> None:
    renewed = start(ttl_s=30.0)
    for t in (20.0, 40.0, 60.0, 80.0, 100.0, 120.0):
        renewed = commit(renewed, Renew(KEY, "lease-run-1", 30.0), at(t))
    assert renewed.running and renewed.hold_until is None
    assert renewed.expires_deadline == at(150.0).monotonic


# --- the key's conflict policy ----------------------------------------------------------


def test_a_caller_that_does_not_choose_gets_its_keys_conflict_policy() -> None:
    policy = ruled(on_conflict=ConflictPolicy.JOIN)
    streamed = acquire("run-2", ttl_s=None, stream_bound=True)

    assert conflict_policy(streamed, policy) is ConflictPolicy.JOIN
    assert conflict_policy(replace(streamed, on_conflict=ConflictPolicy.REJECT), policy) is ConflictPolicy.REJECT
    # A unary call cannot wait for the end of the run: JOIN by rule is REJECT for it.
    assert conflict_policy(acquire("run-2"), policy) is ConflictPolicy.REJECT
    _, decision = step(start(policy=policy), streamed, at(1), policy)
    assert isinstance(decision.reply, AcquireReply) and decision.reply.joined


# --- properties ------------------------------------------------------------------------------


RULES = st.builds(
    KeyRule,
    name=st.just("random"),
    match=st.just("sess-*"),
    failure=st.sampled_from(FailureHandling),
    abandoned_requires_approval=st.booleans(),
    expired_requires_approval=st.booleans(),
    lock_delay_s=st.sampled_from([0.0, 3.0, 10.0]),
    max_hold_s=st.sampled_from([None, 4.0, 25.0]),
)

STEP = st.tuples(
    st.sampled_from(
        ["acquire", "acquire-stream", "renew", "heartbeat", "release", "expire", "abandon", "approve", "force"]
    ),
    st.sampled_from(list(RunStatus)[1:]),
    st.floats(min_value=0.0, max_value=8.0),
)


def _command(kind: str, status: RunStatus, record: GuardRecord | None, n: int) -> Command:
    lease = record.lease_id if record is not None else "lease-none"
    token = record.fencing_token if record is not None else 0
    match kind:
        case "acquire":
            return acquire(f"run-{n}", ttl_s=6.0)
        case "acquire-stream":
            return acquire(f"run-{n}", ttl_s=None, stream_bound=True)
        case "renew":
            return Renew(KEY, lease, 6.0)
        case "heartbeat":
            return Heartbeat(KEY, lease)
        case "release":
            return Release(KEY, lease, status, "")
        case "expire":
            return Expire(KEY, token)
        case "abandon":
            return Abandon(KEY, token, "stream dropped")
        case "approve":
            return ApproveRetry(KEY, "ops", "go")
        case _:
            return ForceRelease(KEY, "ops", "stuck")


@settings(max_examples=300, deadline=None)
@given(rule=RULES, steps=st.lists(STEP, max_size=40))
def test_random_histories_respect_the_keys_rule(rule: KeyRule, steps: list[tuple[str, RunStatus, float]]) -> None:
    """Under any rule: no run outlives its max hold, a lost key opens no earlier than its lock-delay,
    a FAILED key admits nobody without approval unless it reopens, and fencing tokens only rise."""
    policy = Policy(rules=(replace(rule, match="sess-*"),))
    record: GuardRecord | None = None
    t = 0.0
    last_token = 0
    approved = False
    for n, (kind, status, dt) in enumerate(steps):
        t += dt
        now = at(t)
        before = record
        command = _command(kind, status, before, n)
        decision = decide(before, command, now, policy)
        record = decision.record or before
        reply = decision.reply
        if isinstance(reply, AcquireReply) and reply.outcome is Outcome.ACQUIRED and reply.fresh:
            healed = healing(before, command, now, policy)
            prior = healed.record if healed is not None and healed.record is not None else before
            if prior is not None:
                assert not lock_delayed(prior, now.monotonic), "admitted during a lock-delay"
                if prior.state is GuardState.FAILED:
                    assert rule.failure is FailureHandling.REOPEN
                if prior.state is GuardState.RETRY_APPROVED:
                    assert approved
            approved = False
            assert reply.guard.fencing_token > last_token
            last_token = reply.guard.fencing_token
        if isinstance(reply, GuardReply) and reply.guard is not None and reply.guard.state is GuardState.RETRY_APPROVED:
            approved = True
        if record is not None and record.running and rule.max_hold_s is not None:
            assert record.hold_until is not None and record.hold_deadline is not None
            assert (record.hold_until - record.started_at).total_seconds() == pytest.approx(rule.max_hold_s)
            assert record.expires_deadline is not None and record.expires_deadline <= record.hold_deadline
            # Still running after a command at ``now``: its hold has not passed (healing ends it first).
            assert now.monotonic < record.hold_deadline
