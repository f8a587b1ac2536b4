"""The guard state machine: pure rules, no I/O, no clock, no asyncio. The values it works on are in ``model``.

Theory of operation
-------------------
A *guard* exists per task key. At most one *run* holds it at a time; a run is
identified by its ``run_id`` and proven by its ``lease_id`` (a capability the
shell mints) and its ``fencing_token`` (rises with every acquisition of the
key, never repeats).

    (none) --Acquire--> RUNNING --Release(status)--> SUCCEEDED | FAILED | CANCELLED
                        RUNNING --TTL lapsed------> EXPIRED
                        RUNNING --stream dropped--> ABANDONED
                        RUNNING --ForceRelease----> CANCELLED (released_by = operator)
    FAILED --ApproveRetry--> RETRY_APPROVED --Acquire--> RUNNING (exactly once)

A key is *free* in SUCCEEDED, CANCELLED and RETRY_APPROVED, and in ABANDONED
and EXPIRED unless the key's rule says those need approval too. FAILED needs
an approval unless the key's rule reopens failed keys. Acquiring a guard that
is not free is refused with a normal outcome (ALREADY_RUNNING,
RETRY_REQUIRES_APPROVAL or LOCK_DELAYED) that names the run in the way; the
refusal is counted on the guard (``duplicate_count``).

Per-key rules (``Policy.rule_for``, first match wins) set what the sidecar-wide
policy leaves open: the conflict policy a caller gets when it does not choose,
failure handling, which losses need approval, a *lock-delay* (after an
involuntary loss, the key stays closed until ``lock_delay_deadline``, so a
holder that did not notice its loss stops before anyone else starts) and a
*max hold* (a run ends EXPIRED at ``hold_deadline`` whatever its renewals:
every lease deadline is capped by it, so the sweeper and healing need nothing
else to enforce it).

*Queues.* A caller whose conflict policy is QUEUE or KEEP_NEWEST is not
refused but put in the guard's queue (``GuardRecord.waiters``, FIFO, at most
``max_queue``; a KEEP_NEWEST trigger replaces the waiting KEEP_NEWEST one,
which is told SUPERSEDED). Whatever frees the key (a release, an expiry, an
abandonment, a force-release, an approval, a lock-delay's end) is followed by
``serving``: the first waiter's run starts, unclaimed until its waiter's call
takes it up (``Claim``), and ends CANCELLED, as no loss, if no call does within
the resume grace. A waiter leaves when its call ends (``Leave``) or its
``max_wait`` passes (healing). A key that needs an approval or is lock-delayed
keeps its queue waiting; a caller that does not wait cannot jump it.
SUPERSEDE (where the rule allows it) asks the running run to stop
(``stop_requested_by``) and waits first in line; the run is force-released if
it has not released by ``stop_deadline``.

``decide(record, command, now, policy)`` is the whole machine, and ``RULES``
(one table, state x command) says which rule answers each command in each
state. It returns a
``Decision``: the record to store (``None`` = unchanged), the events that
describe the change, the reply for the caller, and how durable the change must
be before the reply may be sent:

* ``SYNC``: a state change. The shell commits it before anyone hears of it.
* ``LAZY``: a refused trigger. Only counters and an event; the shell may
  answer at once and persist it with a later commit, so a storm of duplicates
  never costs one fsync each.
* ``VOLATILE``: a heartbeat. It only moves in-memory deadlines; a restarted
  sidecar gives stream holders the resume grace anyway.

Time is an argument: ``Instant.monotonic`` drives every deadline, and
``Instant.wall`` (UTC) is only copied into fields people read.

Stale-lock healing is a decision of its own (``healing``): before a command
is decided, a RUNNING guard whose TTL deadline has passed becomes EXPIRED
(every command but ``AwaitResume``, and the sweeper's fenced commands only
for their own run). The lease sweeper makes that happen promptly; healing
makes it exact even when a command arrives before the sweeper. The engine
asks for it first and commits it as a transition of its own; ``decide`` on a
record that still needs it folds it into the command's decision, so a pure
caller gets the same answer. The rules themselves only ever see a healed
record.

A rejection (bad input, a lost lease, a wrong state) never changes the record,
except that healing, which is a separate time-driven transition, may have
happened first and is then committed along with the rejection.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from taskguard.guard.model import (
    NO_SUCH_GUARD,
    NO_SUCH_LEASE,
    WAITING_POLICIES,
    Abandon,
    Acquire,
    AcquireReply,
    ApproveRetry,
    AwaitResume,
    Claim,
    Command,
    ConflictPolicy,
    Decision,
    Durability,
    Event,
    EventType,
    Expire,
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
    RejectionKind,
    Release,
    Renew,
    Reply,
    Resume,
    RunStatus,
    Waiter,
)

_RELEASED_STATE = {
    RunStatus.SUCCEEDED: GuardState.SUCCEEDED,
    RunStatus.FAILED: GuardState.FAILED,
    RunStatus.CANCELLED: GuardState.CANCELLED,
}

# --- time ------------------------------------------------------------------------


def is_expired(record: GuardRecord, now: float) -> bool:
    return record.running and record.expires_deadline is not None and now >= record.expires_deadline


def is_stale(record: GuardRecord, now: float, policy: Policy) -> bool:
    if record.state in (GuardState.ABANDONED, GuardState.EXPIRED):
        return True
    return any(is_expired(run, now) or now - run.last_seen > policy.stale_after_s for run in record.runs)


def fence_is_valid(record: GuardRecord | None, fencing_token: int, now: float) -> bool:
    if record is None:
        return False
    run = next((run for run in record.runs if run.fencing_token == fencing_token), None)
    return run is not None and not is_expired(run, now) and not _past_stop(run, now)


def _past_stop(record: GuardRecord, now: float) -> bool:
    """A superseded run whose grace is over: force-released by the next decision, and no longer vouched for."""
    return record.stop_deadline is not None and now >= record.stop_deadline


def heal(record: GuardRecord | None, now: Instant, policy: Policy) -> tuple[GuardRecord | None, tuple[Event, ...]]:
    """What time alone does to a guard: a lapsed TTL (or max hold) ends its run EXPIRED (stale-lock
    healing), a run its waiter never took up ends CANCELLED, waiters whose max_wait passed leave, and a
    key that opened serves its queue."""
    if record is None:
        return record, ()
    events: list[Event] = []
    if is_expired(record, now.monotonic):
        record = _lapsed(record, now, policy)
        lapsed = EventType.EXPIRED if record.state is GuardState.EXPIRED else EventType.RELEASED
        events.append(Event(lapsed, record, now.wall))
    elif record.running and _past_stop(record, now.monotonic):
        record = _not_stopped(record, now, policy)
        events.append(
            Event(EventType.FORCE_RELEASED, record, now.wall, actor=record.released_by, reason=record.last_detail)
        )
    for holder in record.holders:
        if is_expired(holder, now.monotonic):
            ended = _lapsed(record.view_of(holder), now, policy)
            lapsed = EventType.EXPIRED if ended.state is GuardState.EXPIRED else EventType.RELEASED
            events.append(Event(lapsed, ended, now.wall))
            record = _folded(record, holder, ended, policy)
    record = _settled(record, policy)
    record, left = _drop_lapsed_waiters(record, now)
    record, admitted = _serve_queue(record, now, policy)
    return record, (*events, *left, *admitted)


def _not_stopped(record: GuardRecord, now: Instant, policy: Policy) -> GuardRecord:
    """A superseded run that did not stop within its grace: force-released, its fence no longer valid."""
    rule = policy.rule_for(record.task_key)
    why = (
        f"superseded by run {record.stop_requested_by}; it did not stop within the supersede_grace of "
        f"{_seconds(rule.supersede_grace_s)} (rule {rule.name!r})"
    )
    ended = _ended(
        record, GuardState.CANCELLED, RunStatus.CANCELLED, why, now.wall, f"run {record.stop_requested_by} (supersede)"
    )
    return _lost(ended, rule, now)


def _lapsed(record: GuardRecord, now: Instant, policy: Policy) -> GuardRecord:
    ended_at = record.expires_at or now.wall
    if not record.claimed:
        # No one was there to take the turn (its call went with a sidecar that died): not a loss.
        why = f"its waiter did not take up its turn within the resume grace of {_seconds(policy.resume_grace_s)}"
        return _ended(record, GuardState.CANCELLED, RunStatus.CANCELLED, why, ended_at)
    rule = policy.rule_for(record.task_key)
    if record.hold_deadline is not None and now.monotonic >= record.hold_deadline:
        why = f"held for the max_hold of {_seconds(rule.max_hold_s or 0.0)} (rule {rule.name!r})"
    else:
        why = f"ttl of {_seconds(record.ttl_s or 0.0)} lapsed without renewal or heartbeat"
    return _lost(_ended(record, GuardState.EXPIRED, RunStatus.UNSPECIFIED, why, ended_at), rule, now)


def _ended(
    record: GuardRecord, state: GuardState, status: RunStatus, detail: str, at: datetime, released_by: str = ""
) -> GuardRecord:
    """``record``'s run, ended: it holds nothing and no deadline runs for it."""
    return replace(
        record,
        state=state,
        last_status=status,
        last_detail=detail,
        released_at=at,
        released_by=released_by,
        expires_deadline=None,
        hold_deadline=None,
        stop_deadline=None,
        stop_until=None,
    )


def _lost(ended: GuardRecord, rule: KeyRule, now: Instant) -> GuardRecord:
    """An involuntarily ended run: the key's lock-delay starts now."""
    if rule.lock_delay_s <= 0:
        return ended
    deadline, until = now.after(rule.lock_delay_s)
    return replace(ended, lock_delay_deadline=deadline, lock_delay_until=until)


def lock_delayed(record: GuardRecord, now: float) -> bool:
    """Whether the key is still closed by the lock-delay of a lost run (a semaphore's other runs may go on)."""
    return record.lock_delay_deadline is not None and now < record.lock_delay_deadline


def next_deadline(record: GuardRecord) -> float | None:
    """When time next changes ``record`` by itself (see ``heal``), for the shell's timer; None: never."""
    deadlines = [waiter.wait_deadline for waiter in record.waiters if waiter.wait_deadline is not None]
    deadlines.extend(run.expires_deadline for run in record.runs if run.expires_deadline is not None)
    if record.waiters and record.lock_delay_deadline is not None:
        deadlines.append(record.lock_delay_deadline)
    if record.running and record.stop_deadline is not None:
        deadlines.append(record.stop_deadline)
    return min(deadlines, default=None)


def heals_first(command: Command) -> bool:
    """Whether a lapsed TTL is healed before ``command`` is decided (every command but AwaitResume,
    which exists because a deadline stored before a restart says nothing about the holder)."""
    return not isinstance(command, AwaitResume)


def healing(record: GuardRecord | None, command: Command, now: Instant, policy: Policy) -> Decision | None:
    """The healing due before ``command`` is decided, as a decision of its own; None when there is none.

    The sweeper's Expire and Abandon name a run by its fencing token: they heal
    only that run, never a later one that holds the key by then.
    """
    if record is None or not heals_first(command):
        return None
    if isinstance(command, Expire | Abandon) and not record.names_run(command.fencing_token):
        return None
    healed, events = heal(record, now, policy)
    if not events:
        return None
    return Decision(healed, events, GuardReply(healed))


# --- the table ---------------------------------------------------------------------

# A rule decides one command in one state, on a record that needs no healing.
Rule = Callable[[Any, Any, Instant, Policy], Decision]


@dataclass(frozen=True, slots=True)
class Refusal:
    """A table cell that rejects the command outright; ``{state}`` in ``rule`` names the guard's state."""

    kind: RejectionKind
    field: str
    rule: str

    def given(self, record: GuardRecord | None) -> Rejected:
        state = record.state.name if record is not None else "absent"
        return Rejected(self.kind, self.field, self.rule.format(state=state))


NO_GUARD = None
_ENDED = (
    GuardState.SUCCEEDED,
    GuardState.FAILED,
    GuardState.CANCELLED,
    GuardState.ABANDONED,
    GuardState.EXPIRED,
    GuardState.RETRY_APPROVED,
)
_NO_SUCH_LEASE = Refusal(NO_SUCH_LEASE.kind, NO_SUCH_LEASE.field, NO_SUCH_LEASE.rule)
_NO_GUARD = Refusal(NO_SUCH_GUARD.kind, NO_SUCH_GUARD.field, NO_SUCH_GUARD.rule)
_NOT_RUNNING = Refusal(RejectionKind.FAILED_PRECONDITION, "task_key", "guard is {state}, not RUNNING")
_NOT_AWAITING_APPROVAL = Refusal(
    RejectionKind.FAILED_PRECONDITION, "task_key", "guard is {state}, not waiting for a retry approval"
)


def _unchanged(record: GuardRecord | None, cmd: Command, now: Instant, policy: Policy) -> Decision:
    return Decision(None, (), GuardReply(record))


def _each_ended(rule: Rule | Refusal) -> dict[GuardState | None, Rule | Refusal]:
    return dict.fromkeys(_ENDED, rule)


def _table() -> Mapping[type, Mapping[GuardState | None, Rule | Refusal]]:
    return {
        Acquire: {NO_GUARD: _start_run, GuardState.RUNNING: _acquire_held, **_each_ended(_acquire_ended)},
        Renew: {NO_GUARD: _NO_SUCH_LEASE, GuardState.RUNNING: _renew, **_each_ended(_lease_lost)},
        Heartbeat: {NO_GUARD: _NO_SUCH_LEASE, GuardState.RUNNING: _heartbeat, **_each_ended(_lease_lost)},
        Resume: {NO_GUARD: _NO_SUCH_LEASE, GuardState.RUNNING: _resume, **_each_ended(_lease_lost)},
        Release: {NO_GUARD: _NO_SUCH_LEASE, GuardState.RUNNING: _release, **_each_ended(_release_again)},
        AwaitResume: {NO_GUARD: _unchanged, GuardState.RUNNING: _await_resume, **_each_ended(_unchanged)},
        # Expiring is healing, decided before this rule: what is left to do is nothing.
        Expire: {NO_GUARD: _unchanged, GuardState.RUNNING: _unchanged, **_each_ended(_unchanged)},
        Abandon: {NO_GUARD: _unchanged, GuardState.RUNNING: _abandon, **_each_ended(_unchanged)},
        Leave: {NO_GUARD: _unchanged, GuardState.RUNNING: _leave, **_each_ended(_leave)},
        Claim: {NO_GUARD: _NO_SUCH_LEASE, GuardState.RUNNING: _claim, **_each_ended(_lease_lost)},
        ApproveRetry: {
            NO_GUARD: _NO_GUARD,
            GuardState.RUNNING: _NOT_AWAITING_APPROVAL,
            GuardState.SUCCEEDED: _NOT_AWAITING_APPROVAL,
            GuardState.CANCELLED: _NOT_AWAITING_APPROVAL,
            GuardState.RETRY_APPROVED: _NOT_AWAITING_APPROVAL,
            GuardState.FAILED: _approve_retry,
            # Per policy: the rule refuses when these need no approval.
            GuardState.ABANDONED: _approve_retry,
            GuardState.EXPIRED: _approve_retry,
        },
        ForceRelease: {NO_GUARD: _NO_GUARD, GuardState.RUNNING: _force_release, **_each_ended(_NOT_RUNNING)},
    }


# --- the machine -------------------------------------------------------------------


def decide(record: GuardRecord | None, command: Command, now: Instant, policy: Policy) -> Decision:
    """The one entry point: what ``command`` does to ``record`` at ``now``."""
    if record is not None and record.task_key != command.task_key:
        raise ValueError("record and command name different task keys")
    if (bad := _invalid_argument(command, policy)) is not None:
        return Decision(None, (), bad)  # a bad argument changes nothing, not even by healing
    healed = healing(record, command, now, policy)
    current = healed.record if healed is not None else record
    decision = _decide_healed(current, command, now, policy)
    return decision if healed is None else _after(healed, decision)


def _decide_healed(current: GuardRecord | None, command: Command, now: Instant, policy: Policy) -> Decision:
    if current is not None and current.holders:
        if (holder := _holder_named(current, command)) is not None:
            return _for_holder(current, holder, command, now, policy)
        if isinstance(command, ForceRelease):
            return _force_release_all(current, command, now, policy)
    cell = RULES[type(command)][current.state if current is not None else NO_GUARD]
    decision = (
        Decision(None, (), cell.given(current)) if isinstance(cell, Refusal) else cell(current, command, now, policy)
    )
    if decision.record is None or not decision.record.holders:
        return decision
    return replace(decision, record=_settled(decision.record, policy))


def _after(healed: Decision, decision: Decision) -> Decision:
    """``decision``, made on the healed record, carrying the healing with it (which makes it durable)."""
    return Decision(decision.record or healed.record, (*healed.events, *decision.events), decision.reply)


def _invalid_argument(command: Command, policy: Policy) -> Rejected | None:
    match command:
        case Acquire():
            return _check_ttl(_acquire_ttl(command, policy), policy) or _check_max_wait(command, policy)
        case Renew():
            return _check_ttl(command.ttl_s, policy)
        case Release() if command.status not in _RELEASED_STATE:
            return Rejected(RejectionKind.INVALID_ARGUMENT, "status", "must be SUCCEEDED, FAILED or CANCELLED")
        case _:
            return None


def _check_ttl(ttl_s: float | None, policy: Policy) -> Rejected | None:
    if ttl_s is not None and not 0 < ttl_s <= policy.max_ttl_s:
        return Rejected(RejectionKind.INVALID_ARGUMENT, "ttl", f"must be > 0s and <= {_seconds(policy.max_ttl_s)}")
    return None


def _check_max_wait(cmd: Acquire, policy: Policy) -> Rejected | None:
    if cmd.max_wait_s is not None and not 0 < cmd.max_wait_s <= policy.max_ttl_s:
        return Rejected(RejectionKind.INVALID_ARGUMENT, "max_wait", f"must be > 0s and <= {_seconds(policy.max_ttl_s)}")
    return None


def _acquire_ttl(cmd: Acquire, policy: Policy) -> float | None:
    """A unary lease without a TTL gets the default one; a stream-bound lease may have none."""
    return cmd.ttl_s if cmd.ttl_s is not None or cmd.stream_bound else policy.default_ttl_s


# --- acquire -----------------------------------------------------------------------


def _start_run(record: GuardRecord | None, cmd: Acquire, now: Instant, policy: Policy) -> Decision:
    started = _new_run(record, cmd, _acquire_ttl(cmd, policy), now, policy.rule_for(cmd.task_key))
    return Decision(
        started, (Event(EventType.ACQUIRED, started, now.wall),), AcquireReply(Outcome.ACQUIRED, started, fresh=True)
    )


def _acquire_held(current: GuardRecord, cmd: Acquire, now: Instant, policy: Policy) -> Decision:
    if current.run_id == cmd.run_id and _same_caller(current, cmd):
        return _acquire_again(current, cmd, _acquire_ttl(cmd, policy), now)
    if lock_delayed(current, now.monotonic):
        # A semaphore that lost one of its runs: the others go on, nobody new starts until the delay is over.
        return _refuse_or_wait(current, cmd, Outcome.LOCK_DELAYED, EventType.LOCK_DELAY_REFUSED, now, policy)
    if _has_free_slot(current, policy) and not _is_a_run_of(current, cmd) and not current.waiters:
        return _start_run(current, cmd, now, policy)
    return _refuse_or_wait(current, cmd, Outcome.ALREADY_RUNNING, EventType.DUPLICATE_REFUSED, now, policy)


def _refuse_or_wait(
    current: GuardRecord, cmd: Acquire, outcome: Outcome, event_type: EventType, now: Instant, policy: Policy
) -> Decision:
    """A key ``cmd`` cannot have now: a waiting caller joins its queue (or is already in it), others are refused."""
    if (waiting := _waiting(current, cmd)) is not None:
        return _requeue(current, waiting, cmd, now)
    chosen = conflict_policy(cmd, policy)
    if chosen in WAITING_POLICIES and (taken := _run_id_taken(current, cmd)) is not None:
        return Decision(None, (), taken)
    if chosen is ConflictPolicy.SUPERSEDE:
        return _supersede(current, cmd, now, policy)
    if chosen in WAITING_POLICIES:
        return _enqueue(current, cmd, chosen is ConflictPolicy.KEEP_NEWEST, now, policy)
    return _refuse(current, cmd, outcome, event_type, now, policy)


def _acquire_ended(current: GuardRecord, cmd: Acquire, now: Instant, policy: Policy) -> Decision:
    if policy.rule_for(cmd.task_key).requires_approval(current.state):
        # Waiters keep their places: the queue is served once a retry is approved.
        return _refuse_or_wait(current, cmd, Outcome.RETRY_REQUIRES_APPROVAL, EventType.RETRY_REFUSED, now, policy)
    if lock_delayed(current, now.monotonic):
        # Also after an approval: approving says the task may run again, not that the lost holder stopped.
        return _refuse_or_wait(current, cmd, Outcome.LOCK_DELAYED, EventType.LOCK_DELAY_REFUSED, now, policy)
    if not _has_free_slot(current, policy) or any(run.run_id == cmd.run_id for run in current.holders):
        return _refuse_or_wait(current, cmd, Outcome.ALREADY_RUNNING, EventType.DUPLICATE_REFUSED, now, policy)
    if current.run_id != cmd.run_id:
        return _start_run(current, cmd, now, policy)
    # A free key, asked for by the run that just ended on it: a late retry of
    # that run's request must not start it twice. (Only the last run is known
    # here; run ids are meant to be unique per run.)
    return Decision(
        None,
        (),
        Rejected(
            RejectionKind.FAILED_PRECONDITION,
            "run_id",
            f"run {cmd.run_id} already ended ({current.state.name}); a new run needs a new run_id",
        ),
    )


def _same_caller(current: GuardRecord, cmd: Acquire) -> bool:
    """Did the caller that made ``current`` send ``cmd``?"""
    return _same_identity(current.principal, current.retry_key, cmd)


def _same_caller_as(earlier: Acquire, cmd: Acquire) -> bool:
    return _same_identity(earlier.principal, earlier.retry_key, cmd)


def _same_identity(principal: str, retry_key: str | None, cmd: Acquire) -> bool:
    # Digests compare in constant time.
    if principal != cmd.principal or retry_key is None or cmd.retry_key is None:
        return False
    return hmac.compare_digest(retry_key, cmd.retry_key)


def _new_run(
    previous: GuardRecord | None,
    cmd: Acquire,
    ttl_s: float | None,
    now: Instant,
    rule: KeyRule,
    waiters: tuple[Waiter, ...] = (),
) -> GuardRecord:
    hold_deadline, hold_until = now.after(rule.max_hold_s) if rule.max_hold_s is not None else (None, None)
    deadline, expires_at = _capped(now.after(ttl_s) if ttl_s is not None else (None, None), hold_deadline, hold_until)
    approved = previous is not None and previous.state is GuardState.RETRY_APPROVED
    # A run's attempt and fencing token rise together: both count the key's runs.
    number = _tokens_issued(previous) + 1
    # The runs that go on beside this one (a semaphore's), the previous run too when it still runs.
    holders = () if previous is None else tuple(run.as_holder() for run in previous.runs)
    return GuardRecord(
        task_key=cmd.task_key,
        state=GuardState.RUNNING,
        run_id=cmd.run_id,
        holder=cmd.holder,
        lease_id=cmd.lease_id,
        fencing_token=number,
        attempt=number,
        started_at=now.wall,
        heartbeat_at=now.wall,
        last_seen=now.monotonic,
        ttl_s=ttl_s,
        expires_at=expires_at,
        expires_deadline=deadline,
        stream_bound=cmd.stream_bound,
        labels=cmd.labels,
        approved_by=previous.approved_by if approved and previous else "",
        approval_reason=previous.approval_reason if approved and previous else "",
        trace_context=cmd.trace_context,
        principal=cmd.principal,
        retry_key=cmd.retry_key,
        revision=previous.revision if previous else 0,
        hold_until=hold_until,
        hold_deadline=hold_deadline,
        waiters=waiters,
        holders=holders,
        # Kept once a key has had runs side by side: then the record's own run need not hold the highest token.
        tokens_issued=number if holders or (previous is not None and previous.tokens_issued) else 0,
    )


def _capped(
    lease: tuple[float, datetime] | tuple[None, None], hold_deadline: float | None, hold_until: datetime | None
) -> tuple[float, datetime] | tuple[None, None]:
    """A lease's deadline, no later than its run's max hold: then the sweeper and healing enforce both."""
    if hold_deadline is None or hold_until is None:
        return lease
    deadline, at = lease
    if deadline is None or at is None or hold_deadline < deadline:
        return hold_deadline, hold_until
    return deadline, at


def _acquire_again(current: GuardRecord, cmd: Acquire, ttl_s: float | None, now: Instant) -> Decision:
    """The holding run asks again: hand back its own lease (an idempotent retry).

    From a Hold stream this also binds a TTL lease to the stream, which is how
    a wrapper process takes over a lease its launcher acquired.
    """
    if cmd.stream_bound and not current.stream_bound:
        bound = _touch(replace(current, stream_bound=True, ttl_s=ttl_s), now)
        return Decision(
            bound,
            (Event(EventType.RESUMED, bound, now.wall, trigger_run_id=cmd.run_id, trigger_holder=cmd.holder),),
            AcquireReply(Outcome.ACQUIRED, bound),
        )
    return Decision(None, (), AcquireReply(Outcome.ACQUIRED, current))


def _refuse(
    current: GuardRecord, cmd: Acquire, outcome: Outcome, event_type: EventType, now: Instant, policy: Policy
) -> Decision:
    """A refused trigger: counted on the guard, and (the caller's or its key's conflict policy) joined or not."""
    counted = replace(current, duplicate_count=current.duplicate_count + 1)
    event = Event(event_type, counted, now.wall, trigger_run_id=cmd.run_id, trigger_holder=cmd.holder)
    # Only a running run can be waited for: a failed one waits for an approval, not for its end.
    joined = conflict_policy(cmd, policy) is ConflictPolicy.JOIN and outcome is Outcome.ALREADY_RUNNING
    # A bare refusal need not be durable (healing before it makes it so: see _after).
    return Decision(counted, (event,), AcquireReply(outcome, counted, joined=joined), Durability.LAZY)


def conflict_policy(cmd: Acquire, policy: Policy) -> ConflictPolicy:
    """What ``cmd`` does on a conflict: its own choice, else its key's rule's.

    Joining waits on a stream, so a unary caller whose key's rule says JOIN is
    refused as with REJECT (the front refuses a unary call that asks to JOIN).
    """
    if cmd.on_conflict is not None:
        return cmd.on_conflict
    chosen = policy.rule_for(cmd.task_key).on_conflict
    return chosen if cmd.stream_bound or chosen is not ConflictPolicy.JOIN else ConflictPolicy.REJECT


def _touch(record: GuardRecord, now: Instant, ttl_s: float | None = None) -> GuardRecord:
    ttl = ttl_s if ttl_s is not None else record.ttl_s
    deadline, expires_at = _capped(
        now.after(ttl) if ttl is not None else (None, None), record.hold_deadline, record.hold_until
    )
    return replace(
        record,
        ttl_s=ttl,
        heartbeat_at=now.wall,
        last_seen=now.monotonic,
        expires_at=expires_at,
        expires_deadline=deadline,
    )


# --- leases ------------------------------------------------------------------------


def lease_problem(record: GuardRecord | None, lease_id: str) -> Rejected | None:
    """Why ``lease_id`` no longer holds ``record``, or None when it does."""
    if record is None:
        return _NO_SUCH_LEASE.given(record)
    if record.lease_id != lease_id:
        return Rejected(
            RejectionKind.FAILED_PRECONDITION,
            "lease_id",
            f"lease lost: its run ended and run {record.run_id} "
            f"(fencing token {record.fencing_token}) acquired the guard since",
        )
    if record.running:
        return None
    return Rejected(RejectionKind.FAILED_PRECONDITION, "lease_id", f"lease lost: {_ending(record)}")


def answer_past_run(
    run: GuardRecord | None,
    current: GuardRecord | None,
    command: Renew | Heartbeat | Release | Resume,
    now: Instant,
    policy: Policy,
) -> Reply:
    """The answer to a lease command whose run (``run``, its last snapshot) no longer holds the guard.

    The run answers for itself (an idempotent release of it still succeeds),
    and nothing changes. A snapshot that would still let the command change
    something is older than the guard it lost (a shared store's copy can lag):
    the lease is lost all the same, and ``current`` says to whom.
    """
    if run is None:
        return _NO_SUCH_LEASE.given(run)
    # Only the run itself: the key's waiters and other runs in its snapshot are long gone or moved on, and
    # their deadlines passing must not make the answer look like a change.
    decision = decide(run.alone(), command, now, policy)
    if not decision.changes:
        return decision.reply
    return lost_lease(current, command.lease_id)


def lost_lease(current: GuardRecord | None, lease_id: str) -> Rejected:
    """Why ``lease_id`` is lost, given the guard as it is now (which a lost lease may still name, in a lagging copy)."""
    return lease_problem(current, lease_id) or Rejected(RejectionKind.FAILED_PRECONDITION, "lease_id", "lease lost")


def presumed_lost(held: GuardRecord, why: str) -> GuardRecord:
    """What a holder is told when its run's end cannot be read from the store (it cannot be reached).

    Nothing is committed: the store decides later; the holder must stop now.
    """
    return replace(held, state=GuardState.ABANDONED, last_detail=why, released_at=held.heartbeat_at)


def _ending(record: GuardRecord) -> str:
    if record.released_by:
        return f"the guard was force-released by {record.released_by}: {record.last_detail}"
    if record.state is GuardState.EXPIRED:
        return f"the guard expired at {iso_utc(record.released_at)}: {record.last_detail}"
    if record.state is GuardState.ABANDONED:
        return f"the guard was abandoned at {iso_utc(record.released_at)}: {record.last_detail}"
    if record.last_status is RunStatus.UNSPECIFIED:
        # RETRY_APPROVED after an expiry or abandonment: the run was never released, so say how it ended.
        return f"the run ended without a release ({record.last_detail}) and a retry was approved since"
    return f"the lease was already released with {record.last_status.name}"


def _lease_lost(
    current: GuardRecord, cmd: Renew | Heartbeat | Resume | Release | Claim, now: Instant, policy: Policy
) -> Decision:
    problem = lease_problem(current, cmd.lease_id)
    assert problem is not None  # an ended guard is never held
    return Decision(None, (), problem)


def _held(current: GuardRecord, cmd: Renew | Heartbeat | Resume | Release | Claim) -> Decision | None:
    """The rejection when ``cmd``'s lease is not the running run's, else None."""
    problem = lease_problem(current, cmd.lease_id)
    return Decision(None, (), problem) if problem is not None else None


def _renew(current: GuardRecord, cmd: Renew, now: Instant, policy: Policy) -> Decision:
    if (lost := _held(current, cmd)) is not None:
        return lost
    # Without a new ttl the lease keeps its own, and a Hold lease without one keeps having none.
    renewed = _touch(current, now, cmd.ttl_s)
    return Decision(renewed, (Event(EventType.RENEWED, renewed, now.wall),), GuardReply(renewed))


def _heartbeat(current: GuardRecord, cmd: Heartbeat, now: Instant, policy: Policy) -> Decision:
    if (lost := _held(current, cmd)) is not None:
        return lost
    beaten = _touch(current, now)
    return Decision(beaten, (), GuardReply(beaten), Durability.VOLATILE)


def _resume(current: GuardRecord, cmd: Resume, now: Instant, policy: Policy) -> Decision:
    if (lost := _held(current, cmd)) is not None:
        return lost
    resumed = _touch(replace(current, stream_bound=True), now)
    return Decision(
        resumed,
        (Event(EventType.RESUMED, resumed, now.wall, trigger_run_id=resumed.run_id, trigger_holder=resumed.holder),),
        AcquireReply(Outcome.ACQUIRED, resumed),
    )


def _release(current: GuardRecord, cmd: Release, now: Instant, policy: Policy) -> Decision:
    if (lost := _held(current, cmd)) is not None:
        return lost
    detail = cmd.detail
    if current.stop_requested_by:
        # Whatever the holder said, the run's end names the run it made way for.
        detail = f"superseded by run {current.stop_requested_by}" + (f": {detail}" if detail else "")
    released = _ended(current, _RELEASED_STATE[cmd.status], cmd.status, detail, now.wall)
    return Decision(released, (Event(EventType.RELEASED, released, now.wall),), GuardReply(released))


def _release_again(current: GuardRecord, cmd: Release, now: Instant, policy: Policy) -> Decision:
    """A release of an ended run: the same release again is answered as before; anything else lost its lease."""
    # Released by its holder (not expired, abandoned or force-released), possibly approved for a retry since.
    if (
        current.lease_id == cmd.lease_id
        and current.last_status is not RunStatus.UNSPECIFIED
        and not current.released_by
    ):
        if current.last_status is cmd.status:
            return Decision(None, (), GuardReply(current))
        return Decision(
            None,
            (),
            Rejected(
                RejectionKind.FAILED_PRECONDITION,
                "status",
                f"lease already released with {current.last_status.name}, not {cmd.status.name}",
            ),
        )
    return _lease_lost(current, cmd, now, policy)


# --- the sweeper and restarts ---------------------------------------------------------


def _await_resume(current: GuardRecord, cmd: AwaitResume, now: Instant, policy: Policy) -> Decision:
    if not current.stream_bound or current.fencing_token != cmd.fencing_token:
        return _unchanged(current, cmd, now, policy)
    # Its max hold, if it has one, still runs: a restart must not lengthen a run past it.
    # Heard of now, as far as this process knows (a stored heartbeat time read on a clock that moved since
    # says nothing): the grace's end abandons it unless it is heard of again (see ``Abandon.quiet_since``).
    waiting = replace(
        current, expires_at=current.hold_until, expires_deadline=current.hold_deadline, last_seen=now.monotonic
    )
    # In memory only, like a heartbeat: after another restart the run waits again, from that restart.
    return Decision(waiting, (), GuardReply(waiting), Durability.VOLATILE)


def _abandon(current: GuardRecord, cmd: Abandon, now: Instant, policy: Policy) -> Decision:
    if not current.stream_bound or current.fencing_token != cmd.fencing_token:
        return _unchanged(current, cmd, now, policy)
    if cmd.quiet_since is not None and current.last_seen > cmd.quiet_since:
        return _unchanged(current, cmd, now, policy)  # resumed, or heartbeating, since the grace began
    abandoned = _lost(
        _ended(current, GuardState.ABANDONED, RunStatus.UNSPECIFIED, cmd.reason, now.wall),
        policy.rule_for(cmd.task_key),
        now,
    )
    return Decision(
        abandoned, (Event(EventType.ABANDONED, abandoned, now.wall, reason=cmd.reason),), GuardReply(abandoned)
    )


# --- queues ----------------------------------------------------------------------------


def _waiting(current: GuardRecord, cmd: Acquire) -> Waiter | None:
    """``cmd``'s caller's place in the queue, when it asks again (a retry keeps its place)."""
    return next(
        (waiter for waiter in current.waiters if waiter.run_id == cmd.run_id and _same_caller_as(waiter.acquire, cmd)),
        None,
    )


def _run_id_taken(current: GuardRecord, cmd: Acquire) -> Rejected | None:
    """A waiter's run id must name one call: what a waiter hears is told by run id (the run ids are shown to
    everyone, so another caller could otherwise make a waiter hear that it was dropped)."""
    if _is_a_run_of(current, cmd) or any(waiter.run_id == cmd.run_id for waiter in current.waiters):
        return Rejected(
            RejectionKind.FAILED_PRECONDITION,
            "run_id",
            f"run {cmd.run_id} is already this key's run or waiting in its queue; a new caller needs a new run_id",
        )
    return None


def _queue_event(
    kind: EventType, record: GuardRecord, cmd: Acquire, now: Instant, waiter: str, reason: str = ""
) -> Event:
    """An event of ``cmd``'s trigger in the key's queue, about the waiter ``waiter`` ("" for the running run)."""
    return Event(
        kind,
        record,
        now.wall,
        trigger_run_id=cmd.run_id,
        trigger_holder=cmd.holder,
        reason=reason,
        waiter_run_id=waiter,
    )


def _requeue(current: GuardRecord, waiting: Waiter, cmd: Acquire, now: Instant) -> Decision:
    """The waiter's caller asked again: its newest call takes its place (the older one, if it is still
    there, never gets the turn: the run would start on the lease of the call that asked last)."""
    if waiting.acquire == cmd:
        return Decision(None, (), AcquireReply(Outcome.QUEUED, current, position=current.position(cmd.run_id)))
    moved = replace(waiting, acquire=cmd)
    requeued = replace(current, waiters=tuple(moved if w is waiting else w for w in current.waiters))
    event = _queue_event(EventType.QUEUED, requeued, cmd, now, cmd.run_id)
    return Decision(requeued, (event,), AcquireReply(Outcome.QUEUED, requeued, position=requeued.position(cmd.run_id)))


def _enqueue(current: GuardRecord, cmd: Acquire, keep_newest: bool, now: Instant, policy: Policy) -> Decision:
    rule = policy.rule_for(cmd.task_key)
    # KEEP_NEWEST: the waiting trigger this one replaces makes room for it.
    replaced = tuple(waiter for waiter in current.waiters if keep_newest and waiter.keep_newest)
    staying = tuple(waiter for waiter in current.waiters if waiter not in replaced)
    if len(staying) >= rule.max_queue:
        return _refuse(current, cmd, Outcome.QUEUE_FULL, EventType.QUEUE_FULL_REFUSED, now, policy)
    waiter = Waiter(cmd, now.wall, keep_newest, **_wait_bound(cmd, rule, now))
    queued = replace(current, waiters=(*staying, waiter), duplicate_count=current.duplicate_count + 1)
    why = f"superseded by the newer trigger of run {cmd.run_id}"
    superseded = tuple(_queue_event(EventType.SUPERSEDED, queued, cmd, now, old.run_id, why) for old in replaced)
    joined = _queue_event(EventType.QUEUED, queued, cmd, now, cmd.run_id)
    # Durable before the caller hears it: a release decided by another sidecar of a shared store serves it.
    return Decision(queued, (*superseded, joined), AcquireReply(Outcome.QUEUED, queued, position=len(queued.waiters)))


def _supersede(current: GuardRecord, cmd: Acquire, now: Instant, policy: Policy) -> Decision:
    """Cancel-in-progress: ask the running run to stop and wait first in line (replacing an earlier superseder)."""
    rule = policy.rule_for(cmd.task_key)
    if not rule.allow_supersede or rule.max_holders > 1:
        why = f"SUPERSEDE is not allowed for this key (its rule {rule.name!r} does not set allow_supersede)"
        if rule.max_holders > 1:
            why = f"SUPERSEDE is not allowed for this key (its rule {rule.name!r} lets {rule.max_holders} runs hold it)"
        return Decision(None, (), Rejected(RejectionKind.PERMISSION_DENIED, "on_conflict", why))
    replaced = tuple(waiter for waiter in current.waiters if waiter.superseding)
    staying = tuple(waiter for waiter in current.waiters if not waiter.superseding)
    if len(staying) >= rule.max_queue:
        return _refuse(current, cmd, Outcome.QUEUE_FULL, EventType.QUEUE_FULL_REFUSED, now, policy)
    waiter = Waiter(cmd, now.wall, superseding=True, **_wait_bound(cmd, rule, now))
    queued = replace(current, waiters=(waiter, *staying), duplicate_count=current.duplicate_count + 1)
    why = f"superseded by the newer trigger of run {cmd.run_id}"
    events = [_queue_event(EventType.SUPERSEDED, queued, cmd, now, old.run_id, why) for old in replaced]
    if current.running:
        # An earlier superseder's request already runs: the run's grace does not start again.
        stop = (current.stop_deadline, current.stop_until) if current.stop_deadline is not None else None
        deadline, until = stop or now.after(rule.supersede_grace_s)
        queued = replace(queued, stop_requested_by=cmd.run_id, stop_deadline=deadline, stop_until=until)
        events.append(_queue_event(EventType.STOP_REQUESTED, queued, cmd, now, "", why))
    events.append(_queue_event(EventType.QUEUED, queued, cmd, now, cmd.run_id, why))
    return Decision(queued, tuple(events), AcquireReply(Outcome.QUEUED, queued, position=1))


def _wait_bound(cmd: Acquire, rule: KeyRule, now: Instant) -> dict[str, Any]:
    """When a waiter gives up: the sooner of its own max_wait and its key's."""
    bounds = [bound for bound in (cmd.max_wait_s, rule.max_wait_s) if bound is not None]
    if not bounds:
        return {}
    deadline, until = now.after(min(bounds))
    return {"wait_deadline": deadline, "wait_until": until}


def _drop_lapsed_waiters(record: GuardRecord, now: Instant) -> tuple[GuardRecord, tuple[Event, ...]]:
    lapsed = [w for w in record.waiters if w.wait_deadline is not None and now.monotonic >= w.wait_deadline]
    if not lapsed:
        return record, ()
    left = replace(record, waiters=tuple(waiter for waiter in record.waiters if waiter not in lapsed))
    return left, tuple(
        Event(
            EventType.DEQUEUED,
            left,
            now.wall,
            reason=f"its max_wait passed at {iso_utc(waiter.wait_until)} before its turn came",
            waiter_run_id=waiter.run_id,
        )
        for waiter in lapsed
    )


def _serve_queue(record: GuardRecord, now: Instant, policy: Policy) -> tuple[GuardRecord, tuple[Event, ...]]:
    """A key with a free slot and callers waiting: the first in line starts its run, and so on while a
    semaphore has slots."""
    events: list[Event] = []
    while record.waiters and _has_free_slot(record, policy):
        rule = policy.rule_for(record.task_key)
        if rule.requires_approval(record.state) or lock_delayed(record, now.monotonic):
            break
        record, event = _admit_first(record, now, policy)
        events.append(event)
    return record, tuple(events)


def _admit_first(record: GuardRecord, now: Instant, policy: Policy) -> tuple[GuardRecord, Event]:
    rule = policy.rule_for(record.task_key)
    first, *rest = record.waiters
    cmd = first.acquire
    started = _new_run(record, cmd, _acquire_ttl(cmd, policy), now, rule, waiters=tuple(rest))
    # Until its waiter's call takes it up (Claim), the run lasts no longer than the resume grace.
    grace = _capped(now.after(policy.resume_grace_s), started.expires_deadline, started.expires_at)
    unclaimed = replace(started, claimed=False, expires_deadline=grace[0], expires_at=grace[1])
    event = Event(
        EventType.ACQUIRED,
        unclaimed,
        now.wall,
        trigger_run_id=cmd.run_id,
        trigger_holder=cmd.holder,
        waiter_run_id=cmd.run_id,
    )
    return unclaimed, event


def serving(record: GuardRecord | None, now: Instant, policy: Policy) -> Decision | None:
    """After a command ended a run (or approved a retry): the queue's next run, as a decision of its own."""
    if record is None:
        return None
    served, events = _serve_queue(record, now, policy)
    return Decision(served, events, GuardReply(served)) if events else None


def _leave(current: GuardRecord, cmd: Leave, now: Instant, policy: Policy) -> Decision:
    if current.running and not current.claimed and (current.run_id, current.lease_id) == (cmd.run_id, cmd.lease_id):
        # Its turn came as its call went: the run never started work, which is no loss.
        ended = _ended(current, GuardState.CANCELLED, RunStatus.CANCELLED, cmd.reason, now.wall)
        return Decision(ended, (Event(EventType.RELEASED, ended, now.wall, reason=cmd.reason),), GuardReply(ended))
    waiter = next((w for w in current.waiters if (w.run_id, w.acquire.lease_id) == (cmd.run_id, cmd.lease_id)), None)
    if waiter is None:
        return _unchanged(current, cmd, now, policy)
    left = replace(current, waiters=tuple(w for w in current.waiters if w is not waiter))
    event = Event(EventType.DEQUEUED, left, now.wall, reason=cmd.reason, waiter_run_id=waiter.run_id)
    return Decision(left, (event,), GuardReply(left))


def _claim(current: GuardRecord, cmd: Claim, now: Instant, policy: Policy) -> Decision:
    if (lost := _held(current, cmd)) is not None:
        return lost
    if current.claimed:
        return Decision(None, (), GuardReply(current))
    # From now on the run's own TTL (or none, on a Hold stream) and max hold bound it.
    claimed = _touch(replace(current, claimed=True), now)
    return Decision(claimed, (), GuardReply(claimed))


# --- semaphores (max_holders > 1) ---------------------------------------------------
#
# The record speaks for one run (its own fields) and lists the key's other running runs in ``holders``. Its
# own run is the newest running one, except that an ended run that still decides what the key does next (a
# failure awaiting approval, an approved retry) speaks for the key, its other runs going on as holders. A run
# that ends otherwise while others run leaves the record (its last snapshot is the store's); the newest of the
# rest speaks for the key again. Each run's commands (by lease, by fencing token) are decided on a record of
# that run (``GuardRecord.view_of``) by the same rules as a single run's, then folded back.


def _has_free_slot(record: GuardRecord, policy: Policy) -> bool:
    return len(record.runs) < policy.rule_for(record.task_key).max_holders


def _is_a_run_of(record: GuardRecord, cmd: Acquire) -> bool:
    """Whether ``cmd``'s run id names a run of the key that holds it now (or the record's own)."""
    return cmd.run_id == record.run_id or any(run.run_id == cmd.run_id for run in record.holders)


def _tokens_issued(record: GuardRecord | None) -> int:
    return record.newest_token if record is not None else 0


def _holder_named(record: GuardRecord, command: Command) -> GuardRecord | None:
    """The holder (not the record's own run) that ``command`` is about, if any."""
    match command:
        case Renew() | Heartbeat() | Resume() | Release() | Claim():
            return next((run for run in record.holders if run.lease_id == command.lease_id), None)
        case Expire() | Abandon() | AwaitResume():
            return next((run for run in record.holders if run.fencing_token == command.fencing_token), None)
        case Leave():
            named = (command.run_id, command.lease_id)
            return next((run for run in record.holders if (run.run_id, run.lease_id) == named), None)
        case Acquire():
            return next(
                (run for run in record.holders if run.run_id == command.run_id and _same_caller(run, command)), None
            )
        case _:
            return None


def _for_holder(record: GuardRecord, holder: GuardRecord, command: Command, now: Instant, policy: Policy) -> Decision:
    cell = RULES[type(command)][GuardState.RUNNING]
    assert not isinstance(cell, Refusal)  # every command a holder is named by has a rule for a running run
    decision: Decision = cell(record.view_of(holder), command, now, policy)
    if decision.record is None:
        return decision
    return replace(decision, record=_settled(_folded(record, holder, decision.record, policy), policy))


def _folded(record: GuardRecord, holder: GuardRecord, changed: GuardRecord, policy: Policy) -> GuardRecord:
    """``record`` after ``holder``'s run became ``changed`` (a view: see ``GuardRecord.view_of``)."""
    if changed.running or policy.rule_for(record.task_key).requires_approval(changed.state):
        if not changed.running:
            # An ended run that needs an approval speaks for the key now; the others go on beside it.
            return changed
        others = tuple(run for run in record.holders if run.fencing_token != holder.fencing_token)
        return replace(
            record,
            holders=tuple(sorted((*others, changed.as_holder()), key=lambda run: run.fencing_token)),
            waiters=changed.waiters,
            duplicate_count=changed.duplicate_count,
        )
    # Ended as no blocker: it leaves the record (a loss still closes the key for its lock-delay).
    return replace(
        record,
        holders=tuple(run for run in record.holders if run.fencing_token != holder.fencing_token),
        waiters=changed.waiters,
        duplicate_count=changed.duplicate_count,
        tokens_issued=_tokens_issued(changed),
        lock_delay_until=changed.lock_delay_until,
        lock_delay_deadline=changed.lock_delay_deadline,
    )


def _settled(record: GuardRecord, policy: Policy) -> GuardRecord:
    """A record whose own run ended as no blocker while others run: the newest of those speaks for the key."""
    if record.running or not record.holders:
        return record
    if record.state is GuardState.RETRY_APPROVED or policy.rule_for(record.task_key).requires_approval(record.state):
        return record
    return record.view_of(record.holders[-1])


def _force_release_all(current: GuardRecord, cmd: ForceRelease, now: Instant, policy: Policy) -> Decision:
    """An operator frees a semaphore: every run of it ends CANCELLED, each with an event of its own."""
    operator = cmd.operator or "an operator"
    rule = policy.rule_for(cmd.task_key)
    ended = [
        _lost(
            _ended(
                replace(current.view_of(run), holders=()),
                GuardState.CANCELLED,
                RunStatus.CANCELLED,
                cmd.reason,
                now.wall,
                operator,
            ),
            rule,
            now,
        )
        for run in current.runs
    ]
    events = tuple(Event(EventType.FORCE_RELEASED, run, now.wall, actor=operator, reason=cmd.reason) for run in ended)
    last = ended[-1]
    # A run that needs an approval keeps speaking for the key: the runs went, its failure did not.
    record = replace(
        last if current.running else current,
        holders=(),
        tokens_issued=_tokens_issued(current),
        lock_delay_until=last.lock_delay_until,
        lock_delay_deadline=last.lock_delay_deadline,
    )
    return Decision(record, events, GuardReply(record))


# --- operators -----------------------------------------------------------------------


def _approve_retry(current: GuardRecord, cmd: ApproveRetry, now: Instant, policy: Policy) -> Decision:
    if not policy.rule_for(cmd.task_key).requires_approval(current.state):
        return Decision(None, (), _NOT_AWAITING_APPROVAL.given(current))
    approved = replace(
        current,
        state=GuardState.RETRY_APPROVED,
        approved_by=cmd.approver,
        approval_reason=cmd.reason,
    )
    event = Event(EventType.RETRY_APPROVED, approved, now.wall, actor=cmd.approver, reason=cmd.reason)
    return Decision(approved, (event,), GuardReply(approved))


def _force_release(current: GuardRecord, cmd: ForceRelease, now: Instant, policy: Policy) -> Decision:
    released = _lost(
        _ended(current, GuardState.CANCELLED, RunStatus.CANCELLED, cmd.reason, now.wall, cmd.operator or "an operator"),
        policy.rule_for(cmd.task_key),
        now,
    )
    event = Event(EventType.FORCE_RELEASED, released, now.wall, actor=released.released_by, reason=cmd.reason)
    return Decision(released, (event,), GuardReply(released))


RULES = _table()


def _seconds(value: float) -> str:
    return f"{value:g}s"


def iso_utc(at: datetime | None) -> str:
    """A UTC time as people read it in messages: ISO 8601 with a Z."""
    return at.isoformat().replace("+00:00", "Z") if at is not None else "an unknown time"
