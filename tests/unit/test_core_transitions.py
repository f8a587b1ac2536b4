"""One table test per transition rule of ``core.decide``.

Every test drives the pure core with explicit times (``at(seconds)``); none reads a clock.
Guards in a given state are reached through real commands (``guard_in``), never built by hand,
so each test starts from a record the machine itself could have produced.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from taskguard.guard.core import decide, fence_is_valid, heals_first, is_stale
from taskguard.guard.model import (
    Abandon,
    Acquire,
    AcquireReply,
    ApproveRetry,
    AwaitResume,
    Command,
    Decision,
    Durability,
    EventType,
    Expire,
    ForceRelease,
    GuardRecord,
    GuardReply,
    GuardState,
    Heartbeat,
    Instant,
    KeyRule,
    Outcome,
    Policy,
    Rejected,
    RejectionKind,
    Release,
    Renew,
    Resume,
    RunStatus,
    split_task_key,
)

KEY = "sess-1::build"
T0 = 1000.0
WALL0 = datetime(2026, 1, 1, tzinfo=UTC)
TTL = 30.0
START = Instant(T0, WALL0)

DEFAULT = Policy()
STRICT = Policy(default_rule=KeyRule(abandoned_requires_approval=True, expired_requires_approval=True))
ABANDONED_NEEDS_APPROVAL = Policy(default_rule=KeyRule(abandoned_requires_approval=True))
EXPIRED_NEEDS_APPROVAL = Policy(default_rule=KeyRule(expired_requires_approval=True))


# --- helpers ---------------------------------------------------------------------


def at(seconds: float = 0.0) -> Instant:
    """``seconds`` after the test's epoch, on both clocks."""
    return Instant(T0 + seconds, WALL0 + timedelta(seconds=seconds))


def acquire(
    run_id: str = "run-1",
    *,
    holder: str | None = None,
    ttl_s: float | None = TTL,
    stream_bound: bool = False,
    lease_id: str | None = None,
    key: str = KEY,
) -> Acquire:
    return Acquire(
        task_key=key,
        run_id=run_id,
        holder=holder if holder is not None else f"host-of-{run_id}",
        ttl_s=ttl_s,
        lease_id=lease_id if lease_id is not None else f"lease-{run_id}",
        stream_bound=stream_bound,
    )


def step(
    record: GuardRecord | None, command: Command, now: Instant = START, policy: Policy = DEFAULT
) -> tuple[GuardRecord | None, Decision]:
    """Decide, then commit like the engine does: the new record if there is one, else the old."""
    decision = decide(record, command, now, policy)
    return (decision.record if decision.record is not None else record), decision


def commit(record: GuardRecord | None, command: Command, now: Instant = START, policy: Policy = DEFAULT) -> GuardRecord:
    """Apply a command that must change the record."""
    decision = decide(record, command, now, policy)
    assert decision.record is not None, decision.reply
    return decision.record


def start(
    run_id: str = "run-1",
    *,
    ttl_s: float | None = TTL,
    stream_bound: bool = False,
    now: Instant = START,
    previous: GuardRecord | None = None,
    policy: Policy = DEFAULT,
) -> GuardRecord:
    record = commit(previous, acquire(run_id, ttl_s=ttl_s, stream_bound=stream_bound), now, policy)
    assert record.running
    return record


def guard_in(state: GuardState, policy: Policy = DEFAULT, run_id: str = "run-1") -> GuardRecord:
    """A guard of run ``run_id`` (lease ``lease-<run_id>``) in ``state``, reached through real commands at t=0..1."""
    lease = f"lease-{run_id}"
    match state:
        case GuardState.RUNNING:
            return start(run_id)
        case GuardState.SUCCEEDED | GuardState.FAILED | GuardState.CANCELLED:
            status = RunStatus[state.name]
            return commit(start(run_id), Release(KEY, lease, status, f"{state.name.lower()} detail"), at(1))
        case GuardState.EXPIRED:
            running = start(run_id, ttl_s=1.0)
            return commit(running, Expire(KEY, running.fencing_token), at(1), policy)
        case GuardState.ABANDONED:
            running = start(run_id, ttl_s=None, stream_bound=True)
            return commit(running, Abandon(KEY, running.fencing_token, "stream dropped"), at(1), policy)
        case GuardState.RETRY_APPROVED:
            return commit(guard_in(GuardState.FAILED, run_id=run_id), ApproveRetry(KEY, "ops-bob", "flake"), at(1))
    raise AssertionError(state)


def force_released(operator: str = "ops-alice") -> GuardRecord:
    return commit(start(), ForceRelease(KEY, operator, "stuck"), at(1))


def event_types(decision: Decision) -> list[EventType]:
    return [event.type for event in decision.events]


def assert_unchanged(decision: Decision) -> None:
    assert decision.record is None
    assert decision.events == ()


# --- acquire -----------------------------------------------------------------------


def test_acquire_on_a_new_key_starts_run_one_holding_fencing_token_one() -> None:
    decision = decide(None, acquire("run-1", holder="host-a", ttl_s=TTL), at(5), DEFAULT)

    record = decision.record
    assert record is not None
    assert record.state is GuardState.RUNNING
    assert (record.task_key, record.run_id, record.holder, record.lease_id) == (KEY, "run-1", "host-a", "lease-run-1")
    assert (record.fencing_token, record.attempt, record.duplicate_count) == (1, 1, 0)
    assert (record.started_at, record.heartbeat_at, record.last_seen) == (at(5).wall, at(5).wall, at(5).monotonic)
    assert (record.ttl_s, record.expires_deadline, record.expires_at) == (TTL, at(5 + TTL).monotonic, at(5 + TTL).wall)
    assert not record.stream_bound
    assert decision.reply == AcquireReply(Outcome.ACQUIRED, record, fresh=True)
    assert decision.reply.lease_id == "lease-run-1"
    assert event_types(decision) == [EventType.ACQUIRED]
    assert decision.events[0].guard == record
    assert decision.durability is Durability.SYNC


def test_acquire_on_a_running_guard_by_another_run_is_refused_as_already_running() -> None:
    running = start("run-1")

    record, decision = step(running, acquire("run-2", holder="host-b", lease_id="lease-minted"), at(1))

    assert decision.record == replace(running, duplicate_count=1)
    assert isinstance(decision.reply, AcquireReply)
    assert decision.reply.outcome is Outcome.ALREADY_RUNNING
    assert decision.reply.guard.run_id == "run-1"
    assert decision.reply.lease_id == ""  # the winner's lease is never handed to a loser
    assert not decision.reply.fresh
    assert decision.durability is Durability.LAZY
    assert event_types(decision) == [EventType.DUPLICATE_REFUSED]
    event = decision.events[0]
    assert (event.trigger_run_id, event.trigger_holder, event.guard.holder) == ("run-2", "host-b", "host-of-run-1")

    _, again = step(record, acquire("run-3"), at(2))
    assert again.record is not None and again.record.duplicate_count == 2


@pytest.mark.parametrize(
    ("held_from_stream", "asked_from_stream"),
    [(False, False), (True, True), (True, False)],
    ids=["unary-then-unary", "hold-then-hold", "hold-then-unary"],
)
def test_acquire_again_by_the_holding_run_hands_back_its_own_lease_and_changes_nothing(
    held_from_stream: bool, asked_from_stream: bool
) -> None:
    running = start("run-1", stream_bound=held_from_stream, ttl_s=None if held_from_stream else TTL)

    decision = decide(
        running, acquire("run-1", stream_bound=asked_from_stream, lease_id="lease-minted"), at(3), DEFAULT
    )

    assert_unchanged(decision)
    assert decision.reply == AcquireReply(Outcome.ACQUIRED, running, fresh=False)
    assert decision.reply.lease_id == running.lease_id
    assert decision.reply.guard.fencing_token == running.fencing_token


@pytest.mark.parametrize(
    ("hold_ttl_s", "expected_deadline"),
    [(None, None), (45.0, at(3 + 45.0).monotonic)],
    ids=["hold-without-ttl", "hold-with-ttl"],
)
def test_acquire_from_a_hold_by_the_holding_run_binds_its_unary_lease_to_the_stream(
    hold_ttl_s: float | None, expected_deadline: float | None
) -> None:
    running = start("run-1", stream_bound=False)

    decision = decide(running, acquire("run-1", holder="wrapper", ttl_s=hold_ttl_s, stream_bound=True), at(3), DEFAULT)

    bound = decision.record
    assert bound is not None
    assert bound.stream_bound
    assert (bound.lease_id, bound.fencing_token, bound.run_id) == (running.lease_id, running.fencing_token, "run-1")
    assert (bound.ttl_s, bound.expires_deadline) == (hold_ttl_s, expected_deadline)
    assert (bound.last_seen, bound.heartbeat_at) == (at(3).monotonic, at(3).wall)
    assert decision.reply == AcquireReply(Outcome.ACQUIRED, bound, fresh=False)
    assert event_types(decision) == [EventType.RESUMED]
    assert (decision.events[0].trigger_run_id, decision.events[0].trigger_holder) == ("run-1", "wrapper")
    assert decision.durability is Durability.SYNC


@pytest.mark.parametrize(
    ("state", "policy"),
    [
        (GuardState.FAILED, DEFAULT),
        (GuardState.FAILED, STRICT),
        (GuardState.ABANDONED, ABANDONED_NEEDS_APPROVAL),
        (GuardState.EXPIRED, EXPIRED_NEEDS_APPROVAL),
    ],
    ids=["failed", "failed-strict", "abandoned-by-policy", "expired-by-policy"],
)
@pytest.mark.parametrize("run_id", ["run-2", "run-1"], ids=["another-run", "the-ended-run-itself"])
def test_acquire_on_a_guard_that_needs_approval_is_refused_as_retry_requires_approval(
    state: GuardState, policy: Policy, run_id: str
) -> None:
    ended = guard_in(state, policy)

    decision = decide(ended, acquire(run_id, holder="host-b"), at(2), policy)

    assert decision.record == replace(ended, duplicate_count=ended.duplicate_count + 1)
    assert isinstance(decision.reply, AcquireReply)
    assert decision.reply.outcome is Outcome.RETRY_REQUIRES_APPROVAL
    assert decision.reply.guard.state is state
    assert decision.reply.lease_id == ""
    assert decision.durability is Durability.LAZY
    assert event_types(decision) == [EventType.RETRY_REFUSED]
    assert (decision.events[0].trigger_run_id, decision.events[0].trigger_holder) == (run_id, "host-b")


@pytest.mark.parametrize(
    ("ending", "policy"),
    [
        ("succeeded", DEFAULT),
        ("cancelled", DEFAULT),
        ("force-released", DEFAULT),
        ("retry-approved", DEFAULT),
        ("abandoned", DEFAULT),
        ("expired", DEFAULT),
        ("abandoned", EXPIRED_NEEDS_APPROVAL),
        ("expired", ABANDONED_NEEDS_APPROVAL),
    ],
)
def test_acquire_on_a_free_guard_starts_a_new_run_with_the_next_fencing_token(ending: str, policy: Policy) -> None:
    ways: dict[str, Callable[[], GuardRecord]] = {
        "succeeded": lambda: guard_in(GuardState.SUCCEEDED),
        "cancelled": lambda: guard_in(GuardState.CANCELLED),
        "force-released": force_released,
        "retry-approved": lambda: guard_in(GuardState.RETRY_APPROVED),
        "abandoned": lambda: guard_in(GuardState.ABANDONED, policy),
        "expired": lambda: guard_in(GuardState.EXPIRED, policy),
    }
    ended = ways[ending]()
    ended = replace(ended, duplicate_count=3)

    decision = decide(ended, acquire("run-2", holder="host-b"), at(2), policy)

    started = decision.record
    assert started is not None
    assert started.state is GuardState.RUNNING
    assert (started.run_id, started.holder, started.lease_id) == ("run-2", "host-b", "lease-run-2")
    assert started.fencing_token == ended.fencing_token + 1
    assert started.attempt == ended.attempt + 1
    assert started.duplicate_count == 0
    assert (started.last_status, started.last_detail, started.released_at, started.released_by) == (
        RunStatus.UNSPECIFIED,
        "",
        None,
        "",
    )
    assert decision.reply == AcquireReply(Outcome.ACQUIRED, started, fresh=True)
    assert event_types(decision) == [EventType.ACQUIRED]


@pytest.mark.parametrize(
    "state",
    [GuardState.SUCCEEDED, GuardState.CANCELLED, GuardState.RETRY_APPROVED, GuardState.ABANDONED, GuardState.EXPIRED],
)
def test_reusing_the_run_id_that_just_ended_on_a_free_guard_is_a_failed_precondition(state: GuardState) -> None:
    ended = guard_in(state, DEFAULT, run_id="run-1")

    decision = decide(ended, acquire("run-1"), at(2), DEFAULT)

    assert_unchanged(decision)
    assert isinstance(decision.reply, Rejected)
    assert (decision.reply.kind, decision.reply.field) == (RejectionKind.FAILED_PRECONDITION, "run_id")
    assert "already ended" in decision.reply.rule


def test_reusing_the_run_id_of_a_run_whose_ttl_lapsed_commits_the_expiry_and_is_refused() -> None:
    running = start("run-1", ttl_s=TTL)

    decision = decide(running, acquire("run-1"), at(TTL), DEFAULT)

    assert decision.record is not None and decision.record.state is GuardState.EXPIRED
    assert event_types(decision) == [EventType.EXPIRED]
    assert isinstance(decision.reply, Rejected)
    assert (decision.reply.kind, decision.reply.field) == (RejectionKind.FAILED_PRECONDITION, "run_id")


BAD_TTLS = [0.0, -1.0, DEFAULT.max_ttl_s + 1, math.inf, math.nan]


@pytest.mark.parametrize("ttl_s", BAD_TTLS, ids=["zero", "negative", "above-max", "inf", "nan"])
@pytest.mark.parametrize(
    "situation",
    ["new-key", "running-other-run", "running-same-run", "lapsed-running", "failed", "renew", "renew-lapsed"],
)
def test_an_out_of_range_ttl_is_an_invalid_argument_naming_ttl_and_changes_nothing(
    situation: str, ttl_s: float
) -> None:
    running = start("run-1", ttl_s=TTL)
    situations: dict[str, tuple[GuardRecord | None, Command, Instant]] = {
        "new-key": (None, acquire("run-1", ttl_s=ttl_s), at()),
        "running-other-run": (running, acquire("run-2", ttl_s=ttl_s), at(1)),
        "running-same-run": (running, acquire("run-1", ttl_s=ttl_s, stream_bound=True), at(1)),
        # Past the deadline: even healing must not happen on a rejected argument.
        "lapsed-running": (running, acquire("run-2", ttl_s=ttl_s), at(TTL + 1)),
        "failed": (guard_in(GuardState.FAILED), acquire("run-2", ttl_s=ttl_s), at(2)),
        "renew": (running, Renew(KEY, running.lease_id, ttl_s), at(1)),
        "renew-lapsed": (running, Renew(KEY, running.lease_id, ttl_s), at(TTL + 1)),
    }
    record, command, now = situations[situation]

    decision = decide(record, command, now, DEFAULT)

    assert_unchanged(decision)
    assert isinstance(decision.reply, Rejected)
    assert (decision.reply.kind, decision.reply.field) == (RejectionKind.INVALID_ARGUMENT, "ttl")
    assert decision.reply.message.startswith("ttl: ")


def test_a_ttl_of_exactly_the_maximum_is_accepted() -> None:
    decision = decide(None, acquire(ttl_s=DEFAULT.max_ttl_s), at(), DEFAULT)

    assert decision.record is not None and decision.record.ttl_s == DEFAULT.max_ttl_s


@pytest.mark.parametrize(
    ("stream_bound", "expected_ttl_s", "expected_deadline"),
    [(False, DEFAULT.default_ttl_s, at(DEFAULT.default_ttl_s).monotonic), (True, None, None)],
    ids=["unary-gets-default-ttl", "hold-has-no-deadline"],
)
def test_an_acquire_without_ttl_gets_the_policy_default_unless_it_comes_from_a_hold(
    stream_bound: bool, expected_ttl_s: float | None, expected_deadline: float | None
) -> None:
    decision = decide(None, acquire(ttl_s=None, stream_bound=stream_bound), at(), DEFAULT)

    assert decision.record is not None
    assert (decision.record.ttl_s, decision.record.expires_deadline) == (expected_ttl_s, expected_deadline)
    assert decision.record.stream_bound is stream_bound


# --- renew and heartbeat -------------------------------------------------------------


@pytest.mark.parametrize(
    ("renew_ttl_s", "expected_ttl_s"), [(None, TTL), (90.0, 90.0)], ids=["keeps-its-ttl", "takes-a-new-ttl"]
)
def test_renew_moves_the_deadline_and_emits_renewed(renew_ttl_s: float | None, expected_ttl_s: float) -> None:
    running = start("run-1", ttl_s=TTL)

    decision = decide(running, Renew(KEY, running.lease_id, renew_ttl_s), at(20), DEFAULT)

    renewed = decision.record
    assert renewed is not None
    assert renewed == replace(
        running,
        ttl_s=expected_ttl_s,
        expires_deadline=at(20 + expected_ttl_s).monotonic,
        expires_at=at(20 + expected_ttl_s).wall,
        heartbeat_at=at(20).wall,
        last_seen=at(20).monotonic,
    )
    assert decision.reply == GuardReply(renewed)
    assert event_types(decision) == [EventType.RENEWED]
    assert decision.durability is Durability.SYNC


@pytest.mark.parametrize(
    ("ttl_s", "stream_bound", "expected_deadline"),
    [(TTL, False, at(20 + TTL).monotonic), (None, True, None)],
    ids=["ttl-lease", "hold-without-ttl"],
)
def test_heartbeat_moves_the_deadline_in_memory_only_and_emits_no_event(
    ttl_s: float | None, stream_bound: bool, expected_deadline: float | None
) -> None:
    running = start("run-1", ttl_s=ttl_s, stream_bound=stream_bound)

    decision = decide(running, Heartbeat(KEY, running.lease_id), at(20), DEFAULT)

    beaten = decision.record
    assert beaten is not None
    assert beaten.expires_deadline == expected_deadline
    assert (beaten.heartbeat_at, beaten.last_seen) == (at(20).wall, at(20).monotonic)
    assert (beaten.state, beaten.lease_id, beaten.fencing_token) == (GuardState.RUNNING, running.lease_id, 1)
    assert decision.reply == GuardReply(beaten)
    assert decision.events == ()
    assert decision.durability is Durability.VOLATILE


# --- release -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "state"),
    [
        (RunStatus.SUCCEEDED, GuardState.SUCCEEDED),
        (RunStatus.FAILED, GuardState.FAILED),
        (RunStatus.CANCELLED, GuardState.CANCELLED),
    ],
)
def test_release_ends_the_run_in_the_state_its_status_names(status: RunStatus, state: GuardState) -> None:
    running = start("run-1")

    decision = decide(running, Release(KEY, running.lease_id, status, "exit 0"), at(7), DEFAULT)

    released = decision.record
    assert released is not None
    assert (released.state, released.last_status, released.last_detail) == (state, status, "exit 0")
    assert (released.released_at, released.released_by, released.expires_deadline) == (at(7).wall, "", None)
    assert (released.run_id, released.lease_id, released.fencing_token) == ("run-1", running.lease_id, 1)
    assert decision.reply == GuardReply(released)
    assert event_types(decision) == [EventType.RELEASED]
    assert decision.durability is Durability.SYNC


@pytest.mark.parametrize("status", [RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED])
def test_releasing_again_with_the_same_status_is_idempotent(status: RunStatus) -> None:
    running = start("run-1")
    released = commit(running, Release(KEY, running.lease_id, status), at(1))

    decision = decide(released, Release(KEY, running.lease_id, status), at(2), DEFAULT)

    assert_unchanged(decision)
    assert decision.reply == GuardReply(released)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (RunStatus.SUCCEEDED, RunStatus.FAILED),
        (RunStatus.FAILED, RunStatus.SUCCEEDED),
        (RunStatus.CANCELLED, RunStatus.SUCCEEDED),
        (RunStatus.SUCCEEDED, RunStatus.CANCELLED),
    ],
)
def test_releasing_again_with_a_different_status_is_a_failed_precondition_naming_status(
    first: RunStatus, second: RunStatus
) -> None:
    running = start("run-1")
    released = commit(running, Release(KEY, running.lease_id, first), at(1))

    decision = decide(released, Release(KEY, running.lease_id, second), at(2), DEFAULT)

    assert_unchanged(decision)
    assert isinstance(decision.reply, Rejected)
    assert (decision.reply.kind, decision.reply.field) == (RejectionKind.FAILED_PRECONDITION, "status")
    assert first.name in decision.reply.rule and second.name in decision.reply.rule


# --- lease commands after the run ended ----------------------------------------------------


def ended_by(how: str) -> GuardRecord:
    match how:
        case "expired":
            return guard_in(GuardState.EXPIRED)
        case "abandoned":
            return guard_in(GuardState.ABANDONED)
        case "force-released":
            return force_released("ops-alice")
    raise AssertionError(how)


LEASE_COMMANDS: dict[str, Callable[[str], Command]] = {
    "release": lambda lease: Release(KEY, lease, RunStatus.SUCCEEDED),
    "release-cancelled": lambda lease: Release(KEY, lease, RunStatus.CANCELLED),
    "renew": lambda lease: Renew(KEY, lease, None),
    "heartbeat": lambda lease: Heartbeat(KEY, lease),
    "resume": lambda lease: Resume(KEY, lease),
}


@pytest.mark.parametrize("command", sorted(LEASE_COMMANDS))
@pytest.mark.parametrize(
    ("how", "why"),
    [("expired", "expired"), ("abandoned", "abandoned"), ("force-released", "force-released by ops-alice")],
)
def test_lease_commands_after_the_run_ended_are_a_failed_precondition_saying_why(
    how: str, why: str, command: str
) -> None:
    ended = ended_by(how)

    decision = decide(ended, LEASE_COMMANDS[command](ended.lease_id), at(5), DEFAULT)

    assert_unchanged(decision)
    assert isinstance(decision.reply, Rejected)
    assert (decision.reply.kind, decision.reply.field) == (RejectionKind.FAILED_PRECONDITION, "lease_id")
    assert why in decision.reply.rule


@pytest.mark.parametrize("command", sorted(LEASE_COMMANDS))
@pytest.mark.parametrize(
    ("state", "detail"), [(GuardState.EXPIRED, "ttl of 1s lapsed"), (GuardState.ABANDONED, "stream dropped")]
)
def test_lease_commands_after_an_approved_expiry_or_abandonment_say_how_the_run_ended_not_that_it_was_released(
    state: GuardState, detail: str, command: str
) -> None:
    approved = commit(guard_in(state, STRICT), ApproveRetry(KEY, "ops-bob", "host died"), at(2), STRICT)

    decision = decide(approved, LEASE_COMMANDS[command](approved.lease_id), at(3), STRICT)

    assert_unchanged(decision)
    assert isinstance(decision.reply, Rejected)
    assert (decision.reply.kind, decision.reply.field) == (RejectionKind.FAILED_PRECONDITION, "lease_id")
    assert detail in decision.reply.rule and "retry was approved" in decision.reply.rule
    assert "UNSPECIFIED" not in decision.reply.rule


@pytest.mark.parametrize("command", sorted(LEASE_COMMANDS))
def test_lease_commands_with_the_lease_of_an_earlier_run_name_the_run_that_holds_the_guard_now(command: str) -> None:
    taken_over = start("run-2", previous=guard_in(GuardState.SUCCEEDED), now=at(2))

    decision = decide(taken_over, LEASE_COMMANDS[command]("lease-run-1"), at(3), DEFAULT)

    assert_unchanged(decision)
    assert isinstance(decision.reply, Rejected)
    assert (decision.reply.kind, decision.reply.field) == (RejectionKind.FAILED_PRECONDITION, "lease_id")
    assert "run-2" in decision.reply.rule and "fencing token 2" in decision.reply.rule


@pytest.mark.parametrize("command", sorted(LEASE_COMMANDS))
def test_lease_commands_on_a_key_without_a_guard_are_not_found(command: str) -> None:
    decision = decide(None, LEASE_COMMANDS[command]("lease-x"), at(), DEFAULT)

    assert_unchanged(decision)
    assert isinstance(decision.reply, Rejected)
    assert (decision.reply.kind, decision.reply.field) == (RejectionKind.NOT_FOUND, "lease_id")


# --- stale-lock healing ----------------------------------------------------------------


def test_a_running_guard_is_still_held_just_before_its_deadline_and_expired_at_it() -> None:
    running = start("run-1", ttl_s=TTL)

    before = decide(running, Heartbeat(KEY, running.lease_id), at(TTL - 0.001), DEFAULT)
    on_time = decide(running, Heartbeat(KEY, running.lease_id), at(TTL), DEFAULT)

    assert isinstance(before.reply, GuardReply)
    assert isinstance(on_time.reply, Rejected)


def test_acquire_by_another_run_after_the_ttl_lapsed_heals_the_guard_and_wins_with_the_next_fencing_token() -> None:
    running = start("run-1", ttl_s=TTL)

    decision = decide(running, acquire("run-2"), at(TTL + 5), DEFAULT)

    assert event_types(decision) == [EventType.EXPIRED, EventType.ACQUIRED]
    expired = decision.events[0].guard
    assert (expired.state, expired.run_id, expired.expires_deadline) == (GuardState.EXPIRED, "run-1", None)
    assert expired.released_at == at(TTL).wall  # the lapse happened at the deadline, not when noticed
    assert "30s" in expired.last_detail
    started = decision.record
    assert started is not None
    assert (started.state, started.run_id, started.fencing_token) == (GuardState.RUNNING, "run-2", 2)
    assert decision.reply == AcquireReply(Outcome.ACQUIRED, started, fresh=True)
    assert decision.durability is Durability.SYNC


def test_acquire_after_the_ttl_lapsed_under_an_approval_policy_heals_and_is_refused_durably() -> None:
    running = start("run-1", ttl_s=TTL, policy=EXPIRED_NEEDS_APPROVAL)

    decision = decide(running, acquire("run-2"), at(TTL + 5), EXPIRED_NEEDS_APPROVAL)

    assert event_types(decision) == [EventType.EXPIRED, EventType.RETRY_REFUSED]
    assert decision.record is not None
    assert (decision.record.state, decision.record.duplicate_count) == (GuardState.EXPIRED, 1)
    assert isinstance(decision.reply, AcquireReply)
    assert decision.reply.outcome is Outcome.RETRY_REQUIRES_APPROVAL
    assert decision.durability is Durability.SYNC  # the healing is a real state change


HEALING_COMMANDS: dict[str, tuple[Callable[[GuardRecord], Command], RejectionKind | None]] = {
    "heartbeat": (lambda r: Heartbeat(KEY, r.lease_id), RejectionKind.FAILED_PRECONDITION),
    "renew": (lambda r: Renew(KEY, r.lease_id), RejectionKind.FAILED_PRECONDITION),
    "release": (lambda r: Release(KEY, r.lease_id, RunStatus.SUCCEEDED), RejectionKind.FAILED_PRECONDITION),
    "resume": (lambda r: Resume(KEY, r.lease_id), RejectionKind.FAILED_PRECONDITION),
    "approve-retry": (lambda r: ApproveRetry(KEY, "ops-bob", "why"), RejectionKind.FAILED_PRECONDITION),
    "force-release": (lambda r: ForceRelease(KEY, "ops-alice", "stuck"), RejectionKind.FAILED_PRECONDITION),
    "expire": (lambda r: Expire(KEY, r.fencing_token), None),
    "abandon": (lambda r: Abandon(KEY, r.fencing_token, "stream dropped"), None),
}


@pytest.mark.parametrize("command", sorted(HEALING_COMMANDS))
def test_a_running_guard_past_its_deadline_becomes_expired_on_the_next_command(command: str) -> None:
    running = start("run-1", ttl_s=TTL, stream_bound=True)
    make, rejection = HEALING_COMMANDS[command]

    decision = decide(running, make(running), at(TTL + 1), DEFAULT)

    assert decision.record is not None
    assert (decision.record.state, decision.record.run_id) == (GuardState.EXPIRED, "run-1")
    assert event_types(decision) == [EventType.EXPIRED]
    assert decision.durability is Durability.SYNC
    if rejection is None:
        assert decision.reply == GuardReply(decision.record)
    else:
        assert isinstance(decision.reply, Rejected)
        assert decision.reply.kind is rejection


def test_approve_retry_after_the_ttl_lapsed_under_an_approval_policy_heals_and_approves() -> None:
    running = start("run-1", ttl_s=TTL, policy=EXPIRED_NEEDS_APPROVAL)

    decision = decide(running, ApproveRetry(KEY, "ops-bob", "host died"), at(TTL + 1), EXPIRED_NEEDS_APPROVAL)

    assert event_types(decision) == [EventType.EXPIRED, EventType.RETRY_APPROVED]
    assert decision.record is not None and decision.record.state is GuardState.RETRY_APPROVED


# --- expire and abandon (sent by the lease sweeper) --------------------------------------------


def test_expire_with_the_current_fencing_token_before_the_deadline_changes_nothing() -> None:
    running = start("run-1", ttl_s=TTL)

    decision = decide(running, Expire(KEY, running.fencing_token), at(TTL - 1), DEFAULT)

    assert_unchanged(decision)
    assert decision.reply == GuardReply(running)


@pytest.mark.parametrize(
    "command",
    [Expire(KEY, 1), Abandon(KEY, 1, "stream dropped"), Expire(KEY, 99), Abandon(KEY, 99, "stream dropped")],
    ids=["expire-older", "abandon-older", "expire-unknown", "abandon-unknown"],
)
def test_expire_and_abandon_with_a_stale_fencing_token_change_nothing(command: Expire | Abandon) -> None:
    # Run 2 holds a stream-bound guard whose deadline has passed: only a stale token stops the change.
    taken_over = start("run-2", ttl_s=TTL, stream_bound=True, previous=guard_in(GuardState.SUCCEEDED), now=at(2))

    decision = decide(taken_over, command, at(2 + TTL + 1), DEFAULT)

    assert_unchanged(decision)
    assert isinstance(decision.reply, GuardReply)


@pytest.mark.parametrize("command", [Expire(KEY, 1), Abandon(KEY, 1, "stream dropped")], ids=["expire", "abandon"])
def test_expire_and_abandon_of_a_key_without_a_guard_change_nothing(command: Expire | Abandon) -> None:
    decision = decide(None, command, at(), DEFAULT)

    assert_unchanged(decision)
    assert decision.reply == GuardReply(None)


def test_abandon_of_a_stream_bound_run_ends_it_as_abandoned_with_the_reason() -> None:
    running = start("run-1", ttl_s=None, stream_bound=True)

    decision = decide(running, Abandon(KEY, running.fencing_token, "stream dropped"), at(4), DEFAULT)

    abandoned = decision.record
    assert abandoned is not None
    assert (abandoned.state, abandoned.last_status, abandoned.last_detail) == (
        GuardState.ABANDONED,
        RunStatus.UNSPECIFIED,
        "stream dropped",
    )
    assert (abandoned.released_at, abandoned.expires_deadline) == (at(4).wall, None)
    assert decision.reply == GuardReply(abandoned)
    assert event_types(decision) == [EventType.ABANDONED]
    assert decision.events[0].reason == "stream dropped"


@pytest.mark.parametrize("state", [GuardState.RUNNING, GuardState.SUCCEEDED, GuardState.FAILED])
def test_abandon_of_a_guard_that_is_not_a_running_stream_bound_lease_changes_nothing(state: GuardState) -> None:
    record = guard_in(state)  # a unary (TTL) lease, running or ended
    assert not record.stream_bound

    decision = decide(record, Abandon(KEY, record.fencing_token, "stream dropped"), at(2), DEFAULT)

    assert_unchanged(decision)
    assert decision.reply == GuardReply(record)


# --- approve retry -----------------------------------------------------------------------


def test_approve_retry_of_a_failed_guard_admits_exactly_one_new_run_carrying_the_approval() -> None:
    failed = guard_in(GuardState.FAILED)

    approval = decide(failed, ApproveRetry(KEY, "ops-bob", "flaky network"), at(2), DEFAULT)

    approved = approval.record
    assert approved is not None
    assert (approved.state, approved.approved_by, approved.approval_reason) == (
        GuardState.RETRY_APPROVED,
        "ops-bob",
        "flaky network",
    )
    assert (approved.run_id, approved.fencing_token) == (failed.run_id, failed.fencing_token)
    assert approval.reply == GuardReply(approved)
    assert event_types(approval) == [EventType.RETRY_APPROVED]
    assert (approval.events[0].actor, approval.events[0].reason) == ("ops-bob", "flaky network")

    retried = start("run-2", previous=approved, now=at(3))
    assert (retried.approved_by, retried.approval_reason, retried.fencing_token) == ("ops-bob", "flaky network", 2)

    failed_again = commit(retried, Release(KEY, retried.lease_id, RunStatus.FAILED), at(4))
    _, refused = step(failed_again, acquire("run-3"), at(5))
    assert isinstance(refused.reply, AcquireReply)
    assert refused.reply.outcome is Outcome.RETRY_REQUIRES_APPROVAL


def test_the_approval_is_not_carried_past_the_run_it_admitted() -> None:
    retried = start("run-2", previous=guard_in(GuardState.RETRY_APPROVED), now=at(2))
    succeeded = commit(retried, Release(KEY, retried.lease_id, RunStatus.SUCCEEDED), at(3))

    next_run = start("run-3", previous=succeeded, now=at(4))

    assert (next_run.approved_by, next_run.approval_reason) == ("", "")


@pytest.mark.parametrize(
    ("state", "policy"),
    [(GuardState.FAILED, DEFAULT), (GuardState.ABANDONED, STRICT), (GuardState.EXPIRED, STRICT)],
)
def test_approve_retry_approves_every_state_the_policy_holds_for_approval(state: GuardState, policy: Policy) -> None:
    decision = decide(guard_in(state, policy), ApproveRetry(KEY, "ops-bob", "ok"), at(2), policy)

    assert decision.record is not None and decision.record.state is GuardState.RETRY_APPROVED


@pytest.mark.parametrize(
    "state",
    [
        GuardState.RUNNING,
        GuardState.SUCCEEDED,
        GuardState.CANCELLED,
        GuardState.RETRY_APPROVED,
        GuardState.ABANDONED,
        GuardState.EXPIRED,
    ],
)
def test_approve_retry_of_a_guard_not_waiting_for_approval_is_a_failed_precondition(state: GuardState) -> None:
    record = guard_in(state, DEFAULT)

    decision = decide(record, ApproveRetry(KEY, "ops-bob", "why"), at(2), DEFAULT)

    assert_unchanged(decision)
    assert isinstance(decision.reply, Rejected)
    assert (decision.reply.kind, decision.reply.field) == (RejectionKind.FAILED_PRECONDITION, "task_key")
    assert state.name in decision.reply.rule


def test_approve_retry_of_a_key_without_a_guard_is_not_found() -> None:
    decision = decide(None, ApproveRetry(KEY, "ops-bob", "why"), at(), DEFAULT)

    assert_unchanged(decision)
    assert decision.reply == Rejected(RejectionKind.NOT_FOUND, "task_key", "no guard has this key")


# --- force release -----------------------------------------------------------------------


@pytest.mark.parametrize(("operator", "released_by"), [("ops-alice", "ops-alice"), ("", "an operator")])
def test_force_release_of_a_running_guard_cancels_it_naming_the_operator(operator: str, released_by: str) -> None:
    running = start("run-1")

    decision = decide(running, ForceRelease(KEY, operator, "stuck for hours"), at(9), DEFAULT)

    released = decision.record
    assert released is not None
    assert (released.state, released.last_status, released.last_detail) == (
        GuardState.CANCELLED,
        RunStatus.CANCELLED,
        "stuck for hours",
    )
    assert (released.released_by, released.released_at, released.expires_deadline) == (released_by, at(9).wall, None)
    assert decision.reply == GuardReply(released)
    assert event_types(decision) == [EventType.FORCE_RELEASED]
    assert (decision.events[0].actor, decision.events[0].reason) == (released_by, "stuck for hours")
    assert decision.durability is Durability.SYNC


@pytest.mark.parametrize(
    "state",
    [
        GuardState.SUCCEEDED,
        GuardState.FAILED,
        GuardState.CANCELLED,
        GuardState.ABANDONED,
        GuardState.EXPIRED,
        GuardState.RETRY_APPROVED,
    ],
)
def test_force_release_of_a_guard_that_is_not_running_is_a_failed_precondition(state: GuardState) -> None:
    record = guard_in(state)

    decision = decide(record, ForceRelease(KEY, "ops-alice", "stuck"), at(2), DEFAULT)

    assert_unchanged(decision)
    assert isinstance(decision.reply, Rejected)
    assert (decision.reply.kind, decision.reply.field) == (RejectionKind.FAILED_PRECONDITION, "task_key")


def test_force_release_of_a_key_without_a_guard_is_not_found() -> None:
    decision = decide(None, ForceRelease(KEY, "ops-alice", "stuck"), at(), DEFAULT)

    assert_unchanged(decision)
    assert isinstance(decision.reply, Rejected)
    assert decision.reply.kind is RejectionKind.NOT_FOUND


# --- resume ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ttl_s", "stream_bound", "expected_deadline"),
    [(TTL, False, at(10 + TTL).monotonic), (None, True, None)],
    ids=["unary-lease", "hold-lease"],
)
def test_resume_by_the_holding_lease_binds_it_to_the_new_stream_and_refreshes_it(
    ttl_s: float | None, stream_bound: bool, expected_deadline: float | None
) -> None:
    running = start("run-1", ttl_s=ttl_s, stream_bound=stream_bound)

    decision = decide(running, Resume(KEY, running.lease_id), at(10), DEFAULT)

    resumed = decision.record
    assert resumed is not None
    assert resumed == replace(
        running,
        stream_bound=True,
        heartbeat_at=at(10).wall,
        last_seen=at(10).monotonic,
        expires_deadline=expected_deadline,
        expires_at=at(10 + TTL).wall if ttl_s is not None else None,
    )
    assert decision.reply == AcquireReply(Outcome.ACQUIRED, resumed, fresh=False)
    assert event_types(decision) == [EventType.RESUMED]
    assert (decision.events[0].trigger_run_id, decision.events[0].trigger_holder) == ("run-1", running.holder)


def test_resume_with_a_lease_that_never_held_the_guard_is_a_failed_precondition() -> None:
    running = start("run-1")

    decision = decide(running, Resume(KEY, "lease-forged"), at(1), DEFAULT)

    assert_unchanged(decision)
    assert isinstance(decision.reply, Rejected)
    assert (decision.reply.kind, decision.reply.field) == (RejectionKind.FAILED_PRECONDITION, "lease_id")


# --- task keys, staleness, fencing -------------------------------------------------------------


@pytest.mark.parametrize(
    ("task_key", "session_key", "task_name"),
    [
        ("sess-1::build", "sess-1", "build"),
        ("org::sess::deploy", "org::sess", "deploy"),
        ("nightly", "", "nightly"),
        ("::orphan", "", "orphan"),
        ("sess-1::", "sess-1", ""),
        ("a:b::c:d", "a:b", "c:d"),
        ("x:::y", "x:", "y"),
    ],
)
def test_split_task_key_splits_at_the_last_separator(task_key: str, session_key: str, task_name: str) -> None:
    assert split_task_key(task_key) == (session_key, task_name)
    record = commit(None, acquire(key=task_key))
    assert (record.session_key, record.task_name) == (session_key, task_name)


STALE = Policy(stale_after_s=120.0)


@pytest.mark.parametrize(
    ("situation", "seconds_later", "stale"),
    [
        ("ttl-lease", TTL - 1, False),
        ("ttl-lease", TTL, True),
        ("hold-lease", 120.0, False),
        ("hold-lease", 120.5, True),
        ("expired", 0.0, True),
        ("abandoned", 0.0, True),
        ("succeeded", 1000.0, False),
        ("failed", 1000.0, False),
        ("retry-approved", 1000.0, False),
    ],
)
def test_is_stale_is_true_for_lapsed_silent_expired_and_abandoned_guards_only(
    situation: str, seconds_later: float, stale: bool
) -> None:
    records: dict[str, Callable[[], GuardRecord]] = {
        "ttl-lease": lambda: start(ttl_s=TTL),
        "hold-lease": lambda: start(ttl_s=None, stream_bound=True),
        "expired": lambda: guard_in(GuardState.EXPIRED),
        "abandoned": lambda: guard_in(GuardState.ABANDONED),
        "succeeded": lambda: guard_in(GuardState.SUCCEEDED),
        "failed": lambda: guard_in(GuardState.FAILED),
        "retry-approved": lambda: guard_in(GuardState.RETRY_APPROVED),
    }
    record = records[situation]()

    assert is_stale(record, at(seconds_later).monotonic, STALE) is stale


def test_fence_is_valid_only_for_the_current_token_of_a_running_unexpired_guard() -> None:
    first = start("run-1", ttl_s=TTL)
    second = start("run-2", ttl_s=TTL, previous=commit(first, ForceRelease(KEY, "ops", "x"), at(1)), now=at(2))

    assert fence_is_valid(second, 2, at(3).monotonic)
    assert not fence_is_valid(second, 1, at(3).monotonic)
    assert not fence_is_valid(second, 3, at(3).monotonic)
    assert not fence_is_valid(second, 2, at(2 + TTL).monotonic)
    assert not fence_is_valid(commit(second, ForceRelease(KEY, "ops", "x"), at(4)), 2, at(5).monotonic)
    assert not fence_is_valid(None, 1, at().monotonic)


def test_decide_refuses_a_record_and_a_command_for_different_task_keys() -> None:
    with pytest.raises(ValueError, match="different task keys"):
        decide(start(), acquire(key="other::job"), at(), DEFAULT)


def test_release_without_a_status_is_rejected_by_the_core_too() -> None:
    decision = decide(start(), Release(KEY, "lease-run-1", RunStatus.UNSPECIFIED), at(1), DEFAULT)
    assert isinstance(decision.reply, Rejected)
    assert (decision.reply.kind, decision.reply.field) == (RejectionKind.INVALID_ARGUMENT, "status")
    assert decision.record is None and decision.events == ()


def test_renewing_a_hold_lease_without_a_ttl_keeps_it_without_a_deadline() -> None:
    held = start(ttl_s=None, stream_bound=True)
    renewed = commit(held, Renew(KEY, "lease-run-1"), at(5))
    assert renewed.expires_deadline is None and renewed.ttl_s is None
    assert renewed.heartbeat_at == at(5).wall


def test_a_repeated_release_after_a_retry_was_approved_is_still_idempotent() -> None:
    failed = commit(start(), Release(KEY, "lease-run-1", RunStatus.FAILED, "exit 3"), at(1))
    approved = commit(failed, ApproveRetry(KEY, "ops", "fixed"), at(2))
    again = decide(approved, Release(KEY, "lease-run-1", RunStatus.FAILED, "exit 3"), at(3), DEFAULT)
    assert again.record is None and again.reply == GuardReply(approved)
    other = decide(approved, Release(KEY, "lease-run-1", RunStatus.SUCCEEDED), at(3), DEFAULT)
    assert isinstance(other.reply, Rejected) and other.reply.field == "status"


def test_only_the_acquiring_principal_gets_a_run_back_by_its_run_id() -> None:
    mine = replace(acquire("run-1"), principal="uid:1000")
    held = commit(None, mine, at(0))
    again = decide(held, replace(mine, lease_id="lease-minted-again"), at(1), DEFAULT)
    assert isinstance(again.reply, AcquireReply) and again.reply.lease_id == "lease-run-1"
    stolen = decide(held, replace(mine, principal="uid:65534", lease_id="lease-thief"), at(1), DEFAULT)
    assert isinstance(stolen.reply, AcquireReply)
    assert stolen.reply.outcome is Outcome.ALREADY_RUNNING and stolen.reply.lease_id == ""


# --- after a restart: waiting for a stream holder to resume ------------------------------


def test_a_stream_run_waiting_to_resume_drops_its_stale_deadline_in_memory_only() -> None:
    running = start(ttl_s=TTL, stream_bound=True)
    # Long after the deadline stored at the acquisition: the sidecar was down, no heartbeat could arrive.
    decision = decide(running, AwaitResume(KEY, running.fencing_token), at(TTL * 10), DEFAULT)
    assert decision.record is not None and decision.record.running
    assert decision.record.expires_deadline is None and decision.record.expires_at is None
    assert decision.record.ttl_s == TTL
    assert decision.events == () and decision.durability is Durability.VOLATILE
    assert not heals_first(AwaitResume(KEY, running.fencing_token))


def test_a_resume_after_waiting_counts_the_ttl_from_the_resume() -> None:
    running = start(ttl_s=TTL, stream_bound=True)
    waiting = commit(running, AwaitResume(KEY, running.fencing_token), at(TTL * 10))
    resumed = commit(waiting, Resume(KEY, running.lease_id), at(TTL * 10 + 1))
    assert resumed.running and resumed.expires_deadline == at(TTL * 11 + 1).monotonic


def test_the_end_of_a_resume_grace_abandons_a_run_only_if_nothing_was_heard_of_it_since() -> None:
    running = start(ttl_s=None, stream_bound=True)
    # Restarted with the wall clock set back: the stored heartbeat reads as later than now. It counts from now.
    waiting = commit(replace(running, last_seen=at(TTL * 100).monotonic), AwaitResume(KEY, 1), at(TTL * 10))
    assert waiting.last_seen == at(TTL * 10).monotonic
    grace_began = at(TTL * 10).monotonic

    quiet = decide(waiting, Abandon(KEY, 1, "did not resume", quiet_since=grace_began), at(TTL * 10 + 15), DEFAULT)
    assert quiet.record is not None and quiet.record.state is GuardState.ABANDONED

    # Its holder came back meanwhile (on another sidecar of a shared store, which the timing one cannot see).
    resumed = commit(waiting, Resume(KEY, running.lease_id), at(TTL * 10 + 3))
    heard = decide(resumed, Abandon(KEY, 1, "did not resume", quiet_since=grace_began), at(TTL * 10 + 15), DEFAULT)
    assert heard.record is None


@pytest.mark.parametrize(
    "record",
    [
        pytest.param(start(ttl_s=TTL), id="a unary run"),
        pytest.param(guard_in(GuardState.SUCCEEDED), id="a finished run"),
        pytest.param(None, id="no guard"),
    ],
)
def test_waiting_to_resume_changes_nothing_but_a_running_stream_run(record: GuardRecord | None) -> None:
    token = record.fencing_token if record is not None else 1
    assert decide(record, AwaitResume(KEY, token), at(TTL * 10), DEFAULT).record is None


def test_waiting_to_resume_for_another_run_changes_nothing() -> None:
    running = start(ttl_s=TTL, stream_bound=True)
    assert decide(running, AwaitResume(KEY, running.fencing_token + 1), at(1), DEFAULT).record is None
