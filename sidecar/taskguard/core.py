"""The guard state machine: pure rules, no I/O, no clock, no asyncio.

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
and EXPIRED unless the policy says those need approval too. FAILED always
needs an approval. Acquiring a guard that is not free is refused with a
normal outcome (ALREADY_RUNNING or RETRY_REQUIRES_APPROVAL) that names the
run in the way; the refusal is counted on the guard (``duplicate_count``).

``decide(record, command, now, policy)`` is the whole machine. It returns a
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

Stale-lock healing: every command (but ``AwaitResume``) first applies ``heal``,
which turns a RUNNING guard whose TTL deadline has passed into EXPIRED. The lease sweeper
makes that happen promptly; healing makes it exact even when a command arrives
before the sweeper.

A rejection (bad input, a lost lease, a wrong state) never changes the record,
except that healing, which is a separate time-driven transition, may have
happened first and is then committed along with the rejection.
"""

from __future__ import annotations

import enum
import hmac
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

KEY_SEPARATOR = "::"


class GuardState(enum.IntEnum):
    """Values match ``taskguard.v1.GuardState``."""

    RUNNING = 1
    SUCCEEDED = 2
    FAILED = 3
    CANCELLED = 4
    ABANDONED = 5
    EXPIRED = 6
    RETRY_APPROVED = 7


class RunStatus(enum.IntEnum):
    """Values match ``taskguard.v1.RunStatus``."""

    UNSPECIFIED = 0
    SUCCEEDED = 1
    FAILED = 2
    CANCELLED = 3


class Outcome(enum.IntEnum):
    """Values match ``taskguard.v1.AcquireOutcome``."""

    ACQUIRED = 1
    ALREADY_RUNNING = 2
    RETRY_REQUIRES_APPROVAL = 3


class EventType(enum.IntEnum):
    """Values match ``taskguard.v1.GuardEventType``."""

    SNAPSHOT = 1
    ACQUIRED = 2
    DUPLICATE_REFUSED = 3
    RETRY_REFUSED = 4
    RENEWED = 5
    RELEASED = 6
    EXPIRED = 7
    ABANDONED = 8
    RETRY_APPROVED = 9
    FORCE_RELEASED = 10
    RESUMED = 11


class Durability(enum.Enum):
    SYNC = "sync"
    LAZY = "lazy"
    VOLATILE = "volatile"


class RejectionKind(enum.Enum):
    """What went wrong; ``api.py`` maps each kind to one gRPC status code."""

    INVALID_ARGUMENT = "invalid_argument"
    NOT_FOUND = "not_found"
    FAILED_PRECONDITION = "failed_precondition"


_RELEASED_STATE = {
    RunStatus.SUCCEEDED: GuardState.SUCCEEDED,
    RunStatus.FAILED: GuardState.FAILED,
    RunStatus.CANCELLED: GuardState.CANCELLED,
}


@dataclass(frozen=True, slots=True)
class Instant:
    """One reading of both clocks: monotonic seconds decide, UTC wall time is shown."""

    monotonic: float
    wall: datetime

    def after(self, seconds: float) -> tuple[float, datetime]:
        return self.monotonic + seconds, self.wall + timedelta(seconds=seconds)


@dataclass(frozen=True, slots=True)
class Policy:
    default_ttl_s: float = 60.0
    max_ttl_s: float = 24 * 3600.0
    stale_after_s: float = 120.0
    resume_grace_s: float = 15.0
    abandoned_requires_approval: bool = False
    expired_requires_approval: bool = False

    def requires_approval(self, state: GuardState) -> bool:
        if state is GuardState.FAILED:
            return True
        if state is GuardState.ABANDONED:
            return self.abandoned_requires_approval
        if state is GuardState.EXPIRED:
            return self.expired_requires_approval
        return False


Labels = tuple[tuple[str, str], ...]


def split_task_key(task_key: str) -> tuple[str, str]:
    """``"<session_key>::<task_name>"`` split at the last separator."""
    session_key, sep, task_name = task_key.rpartition(KEY_SEPARATOR)
    if not sep:
        return "", task_key
    return session_key, task_name


@dataclass(frozen=True, slots=True)
class GuardRecord:
    """A guard as stored. ``*_at`` are UTC for display; ``*_deadline``/``last_seen`` are monotonic."""

    task_key: str
    state: GuardState
    run_id: str
    holder: str
    lease_id: str
    fencing_token: int
    attempt: int
    started_at: datetime
    heartbeat_at: datetime
    last_seen: float
    ttl_s: float | None
    expires_at: datetime | None
    expires_deadline: float | None
    stream_bound: bool
    labels: Labels = ()
    last_status: RunStatus = RunStatus.UNSPECIFIED
    last_detail: str = ""
    released_at: datetime | None = None
    released_by: str = ""
    duplicate_count: int = 0
    approved_by: str = ""
    approval_reason: str = ""
    # The winning acquisition's span context (a W3C traceparent), opaque here.
    trace_context: str = ""
    # Who acquired it, as the shell authenticated them ("uid:1000", "cert:CN", ...).
    principal: str = ""
    # What a retry must match besides the principal (see Acquire.retry_key).
    retry_key: str | None = ""
    revision: int = 0

    @property
    def session_key(self) -> str:
        return split_task_key(self.task_key)[0]

    @property
    def task_name(self) -> str:
        return split_task_key(self.task_key)[1]

    @property
    def running(self) -> bool:
        return self.state is GuardState.RUNNING


# --- commands -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Acquire:
    task_key: str
    run_id: str
    holder: str
    ttl_s: float | None
    # Minted by the shell for every attempt; kept only if this attempt wins.
    lease_id: str
    stream_bound: bool
    labels: Labels = ()
    trace_context: str = ""
    # The authenticated caller. Only the same principal gets a run's lease back
    # by its run_id: run ids are shown to everyone, leases are capabilities.
    principal: str = ""
    # For a principal many callers share (a token, or anonymous), the shell's
    # digest of the caller's retry secret, which a retry must match too; None
    # when such a caller sent none (it gets no run back); "" when the
    # principal is the caller's own.
    retry_key: str | None = ""


@dataclass(frozen=True, slots=True)
class Renew:
    task_key: str
    lease_id: str
    ttl_s: float | None = None


@dataclass(frozen=True, slots=True)
class Heartbeat:
    task_key: str
    lease_id: str


@dataclass(frozen=True, slots=True)
class Release:
    task_key: str
    lease_id: str
    status: RunStatus
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Resume:
    task_key: str
    lease_id: str


@dataclass(frozen=True, slots=True)
class AwaitResume:
    """After a restart: a stream-bound run waits for its holder to come back on a new stream.

    Its stored deadline is stale (heartbeats are not durable, and none could
    arrive while the sidecar was down), so the run keeps no deadline but the
    resume grace, which the shell times; a resume starts its TTL afresh.
    """

    task_key: str
    fencing_token: int


@dataclass(frozen=True, slots=True)
class Expire:
    task_key: str
    fencing_token: int


@dataclass(frozen=True, slots=True)
class Abandon:
    task_key: str
    fencing_token: int
    reason: str


@dataclass(frozen=True, slots=True)
class ApproveRetry:
    task_key: str
    approver: str
    reason: str


@dataclass(frozen=True, slots=True)
class ForceRelease:
    task_key: str
    operator: str
    reason: str


Command = Acquire | Renew | Heartbeat | Release | Resume | AwaitResume | Expire | Abandon | ApproveRetry | ForceRelease


# --- events and replies ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Event:
    type: EventType
    guard: GuardRecord
    occurred_at: datetime
    trigger_run_id: str = ""
    trigger_holder: str = ""
    actor: str = ""
    reason: str = ""
    # Stamped by the store when the event is committed.
    revision: int = 0

    @property
    def task_key(self) -> str:
        return self.guard.task_key


@dataclass(frozen=True, slots=True)
class AcquireReply:
    """ACQUIRED (``fresh`` when a new run started) or a refusal naming the run in the way."""

    outcome: Outcome
    guard: GuardRecord
    fresh: bool = False

    @property
    def lease_id(self) -> str:
        return self.guard.lease_id if self.outcome is Outcome.ACQUIRED else ""


@dataclass(frozen=True, slots=True)
class GuardReply:
    guard: GuardRecord | None


@dataclass(frozen=True, slots=True)
class Rejected:
    kind: RejectionKind
    field: str
    rule: str

    @property
    def message(self) -> str:
        return f"{self.field}: {self.rule}"


Reply = AcquireReply | GuardReply | Rejected


@dataclass(frozen=True, slots=True)
class Decision:
    record: GuardRecord | None
    events: tuple[Event, ...]
    reply: Reply
    durability: Durability = Durability.SYNC

    @property
    def changes(self) -> bool:
        return self.record is not None


# --- rules -----------------------------------------------------------------------


def is_expired(record: GuardRecord, now: float) -> bool:
    return record.running and record.expires_deadline is not None and now >= record.expires_deadline


def is_stale(record: GuardRecord, now: float, policy: Policy) -> bool:
    if record.state in (GuardState.ABANDONED, GuardState.EXPIRED):
        return True
    if not record.running:
        return False
    return is_expired(record, now) or now - record.last_seen > policy.stale_after_s


def fence_is_valid(record: GuardRecord | None, fencing_token: int, now: float) -> bool:
    return (
        record is not None and record.running and record.fencing_token == fencing_token and not is_expired(record, now)
    )


def heal(record: GuardRecord | None, now: Instant) -> tuple[GuardRecord | None, tuple[Event, ...]]:
    """Turn a RUNNING guard whose TTL lapsed into EXPIRED (stale-lock healing)."""
    if record is None or not is_expired(record, now.monotonic):
        return record, ()
    ttl = _seconds(record.ttl_s or 0.0)
    expired = replace(
        record,
        state=GuardState.EXPIRED,
        last_status=RunStatus.UNSPECIFIED,
        last_detail=f"ttl of {ttl} lapsed without renewal or heartbeat",
        released_at=record.expires_at or now.wall,
        expires_deadline=None,
    )
    return expired, (Event(EventType.EXPIRED, expired, now.wall),)


def decide(record: GuardRecord | None, command: Command, now: Instant, policy: Policy) -> Decision:
    """The one entry point: what ``command`` does to ``record`` at ``now``."""
    if record is not None and record.task_key != command.task_key:
        raise ValueError("record and command name different task keys")
    match command:
        case Acquire():
            return _acquire(record, command, now, policy)
        case Renew():
            return _renew(record, command, now, policy)
        case Heartbeat():
            return _heartbeat(record, command, now)
        case Release():
            return _release(record, command, now)
        case Resume():
            return _resume(record, command, now)
        case AwaitResume():
            return _await_resume(record, command)
        case Expire():
            return _expire(record, command, now)
        case Abandon():
            return _abandon(record, command, now)
        case ApproveRetry():
            return _approve_retry(record, command, now, policy)
        case ForceRelease():
            return _force_release(record, command, now)


def _check_ttl(ttl_s: float | None, policy: Policy) -> Rejected | None:
    if ttl_s is not None and not 0 < ttl_s <= policy.max_ttl_s:
        return Rejected(RejectionKind.INVALID_ARGUMENT, "ttl", f"must be > 0s and <= {_seconds(policy.max_ttl_s)}")
    return None


def _acquire(record: GuardRecord | None, cmd: Acquire, now: Instant, policy: Policy) -> Decision:
    ttl_s = cmd.ttl_s if cmd.ttl_s is not None or cmd.stream_bound else policy.default_ttl_s
    if (bad := _check_ttl(ttl_s, policy)) is not None:
        return _reject(bad)
    current, healed = heal(record, now)

    if current is None or (
        not current.running and not policy.requires_approval(current.state) and current.run_id != cmd.run_id
    ):
        started = _new_run(current, cmd, ttl_s, now)
        return Decision(
            started,
            (*healed, Event(EventType.ACQUIRED, started, now.wall)),
            AcquireReply(Outcome.ACQUIRED, started, fresh=True),
        )

    if current.running:
        if current.run_id == cmd.run_id and _same_caller(current, cmd):
            return _acquire_again(current, cmd, ttl_s, now)
        return _refuse(current, cmd, Outcome.ALREADY_RUNNING, EventType.DUPLICATE_REFUSED, healed, now)

    if policy.requires_approval(current.state):
        return _refuse(current, cmd, Outcome.RETRY_REQUIRES_APPROVAL, EventType.RETRY_REFUSED, healed, now)

    # A free key, asked for by the run that just ended on it: a late retry of
    # that run's request must not start it twice. (Only the last run is known
    # here; run ids are meant to be unique per run.)
    return _reject(
        Rejected(
            RejectionKind.FAILED_PRECONDITION,
            "run_id",
            f"run {cmd.run_id} already ended ({current.state.name}); a new run needs a new run_id",
        ),
        current if healed else None,
        healed,
    )


def _same_caller(current: GuardRecord, cmd: Acquire) -> bool:
    """Did the caller that made ``current`` send ``cmd``? Digests compare in constant time."""
    if current.principal != cmd.principal or current.retry_key is None or cmd.retry_key is None:
        return False
    return hmac.compare_digest(current.retry_key, cmd.retry_key)


def _new_run(previous: GuardRecord | None, cmd: Acquire, ttl_s: float | None, now: Instant) -> GuardRecord:
    deadline, expires_at = now.after(ttl_s) if ttl_s is not None else (None, None)
    approved = previous is not None and previous.state is GuardState.RETRY_APPROVED
    return GuardRecord(
        task_key=cmd.task_key,
        state=GuardState.RUNNING,
        run_id=cmd.run_id,
        holder=cmd.holder,
        lease_id=cmd.lease_id,
        fencing_token=(previous.fencing_token if previous else 0) + 1,
        attempt=(previous.attempt if previous else 0) + 1,
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
    )


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
    current: GuardRecord,
    cmd: Acquire,
    outcome: Outcome,
    event_type: EventType,
    healed: tuple[Event, ...],
    now: Instant,
) -> Decision:
    counted = replace(current, duplicate_count=current.duplicate_count + 1)
    event = Event(event_type, counted, now.wall, trigger_run_id=cmd.run_id, trigger_holder=cmd.holder)
    # Healing is a real state change and must be durable; a bare refusal is not.
    durability = Durability.SYNC if healed else Durability.LAZY
    return Decision(counted, (*healed, event), AcquireReply(outcome, counted), durability)


def _touch(record: GuardRecord, now: Instant, ttl_s: float | None = None) -> GuardRecord:
    ttl = ttl_s if ttl_s is not None else record.ttl_s
    deadline, expires_at = now.after(ttl) if ttl is not None else (None, None)
    return replace(
        record,
        ttl_s=ttl,
        heartbeat_at=now.wall,
        last_seen=now.monotonic,
        expires_at=expires_at,
        expires_deadline=deadline,
    )


def lease_problem(record: GuardRecord | None, lease_id: str) -> Rejected | None:
    """Why ``lease_id`` no longer holds ``record``, or None when it does."""
    if record is None:
        return Rejected(RejectionKind.NOT_FOUND, "lease_id", "no such lease")
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
        return Rejected(RejectionKind.NOT_FOUND, "lease_id", "no such lease")
    decision = decide(run, command, now, policy)
    if not decision.changes:
        return decision.reply
    return lease_problem(current, command.lease_id) or Rejected(
        RejectionKind.FAILED_PRECONDITION, "lease_id", "lease lost"
    )


def _ending(record: GuardRecord) -> str:
    if record.released_by:
        return f"the guard was force-released by {record.released_by}: {record.last_detail}"
    if record.state is GuardState.EXPIRED:
        return f"the guard expired at {_iso(record.released_at)}: {record.last_detail}"
    if record.state is GuardState.ABANDONED:
        return f"the guard was abandoned at {_iso(record.released_at)}: {record.last_detail}"
    if record.last_status is RunStatus.UNSPECIFIED:
        # RETRY_APPROVED after an expiry or abandonment: the run was never released, so say how it ended.
        return f"the run ended without a release ({record.last_detail}) and a retry was approved since"
    return f"the lease was already released with {record.last_status.name}"


def _renew(record: GuardRecord | None, cmd: Renew, now: Instant, policy: Policy) -> Decision:
    if (bad := _check_ttl(cmd.ttl_s, policy)) is not None:
        return _reject(bad)
    current, healed = heal(record, now)
    if (problem := lease_problem(current, cmd.lease_id)) is not None:
        return _reject(problem, current if healed else None, healed)
    assert current is not None
    # Without a new ttl the lease keeps its own, and a Hold lease without one keeps having none.
    renewed = _touch(current, now, cmd.ttl_s)
    return Decision(renewed, (Event(EventType.RENEWED, renewed, now.wall),), GuardReply(renewed))


def _heartbeat(record: GuardRecord | None, cmd: Heartbeat, now: Instant) -> Decision:
    current, healed = heal(record, now)
    if (problem := lease_problem(current, cmd.lease_id)) is not None:
        return _reject(problem, current if healed else None, healed)
    assert current is not None
    beaten = _touch(current, now)
    return Decision(beaten, (), GuardReply(beaten), Durability.VOLATILE)


def _release(record: GuardRecord | None, cmd: Release, now: Instant) -> Decision:
    if cmd.status not in _RELEASED_STATE:
        return _reject(Rejected(RejectionKind.INVALID_ARGUMENT, "status", "must be SUCCEEDED, FAILED or CANCELLED"))
    current, healed = heal(record, now)
    # Released by its holder (not expired, abandoned or force-released), possibly approved for a retry since.
    if (
        current is not None
        and current.lease_id == cmd.lease_id
        and not current.running
        and current.last_status is not RunStatus.UNSPECIFIED
        and not current.released_by
    ):
        if current.last_status is cmd.status:
            return Decision(None, (), GuardReply(current))
        return _reject(
            Rejected(
                RejectionKind.FAILED_PRECONDITION,
                "status",
                f"lease already released with {current.last_status.name}, not {cmd.status.name}",
            )
        )
    if (problem := lease_problem(current, cmd.lease_id)) is not None:
        return _reject(problem, current if healed else None, healed)
    assert current is not None
    released = replace(
        current,
        state=_RELEASED_STATE[cmd.status],
        last_status=cmd.status,
        last_detail=cmd.detail,
        released_at=now.wall,
        expires_deadline=None,
    )
    return Decision(released, (Event(EventType.RELEASED, released, now.wall),), GuardReply(released))


def _resume(record: GuardRecord | None, cmd: Resume, now: Instant) -> Decision:
    current, healed = heal(record, now)
    if (problem := lease_problem(current, cmd.lease_id)) is not None:
        return _reject(problem, current if healed else None, healed)
    assert current is not None
    resumed = _touch(replace(current, stream_bound=True), now)
    return Decision(
        resumed,
        (Event(EventType.RESUMED, resumed, now.wall, trigger_run_id=resumed.run_id, trigger_holder=resumed.holder),),
        AcquireReply(Outcome.ACQUIRED, resumed),
    )


def _await_resume(record: GuardRecord | None, cmd: AwaitResume) -> Decision:
    if record is None or not record.running or not record.stream_bound or record.fencing_token != cmd.fencing_token:
        return Decision(None, (), GuardReply(record))
    waiting = replace(record, expires_at=None, expires_deadline=None)
    # In memory only, like a heartbeat: after another restart the run waits again, from that restart.
    return Decision(waiting, (), GuardReply(waiting), Durability.VOLATILE)


def heals_first(command: Command) -> bool:
    """Whether a lapsed TTL is healed before ``command`` is decided (every command but AwaitResume,
    which exists because a deadline stored before a restart says nothing about the holder)."""
    return not isinstance(command, AwaitResume)


def _expire(record: GuardRecord | None, cmd: Expire, now: Instant) -> Decision:
    if record is None or record.fencing_token != cmd.fencing_token:
        return Decision(None, (), GuardReply(record))
    current, healed = heal(record, now)
    return Decision(current if healed else None, healed, GuardReply(current))


def _abandon(record: GuardRecord | None, cmd: Abandon, now: Instant) -> Decision:
    if record is None or record.fencing_token != cmd.fencing_token:
        return Decision(None, (), GuardReply(record))
    current, healed = heal(record, now)
    assert current is not None
    if not current.running or not current.stream_bound:
        return Decision(current if healed else None, healed, GuardReply(current))
    abandoned = replace(
        current,
        state=GuardState.ABANDONED,
        last_status=RunStatus.UNSPECIFIED,
        last_detail=cmd.reason,
        released_at=now.wall,
        expires_deadline=None,
    )
    return Decision(
        abandoned, (Event(EventType.ABANDONED, abandoned, now.wall, reason=cmd.reason),), GuardReply(abandoned)
    )


def _approve_retry(record: GuardRecord | None, cmd: ApproveRetry, now: Instant, policy: Policy) -> Decision:
    current, healed = heal(record, now)
    if current is None:
        return _reject(Rejected(RejectionKind.NOT_FOUND, "task_key", "no guard has this key"))
    if not policy.requires_approval(current.state):
        return _reject(
            Rejected(
                RejectionKind.FAILED_PRECONDITION,
                "task_key",
                f"guard is {current.state.name}, not waiting for a retry approval",
            ),
            current if healed else None,
            healed,
        )
    approved = replace(
        current,
        state=GuardState.RETRY_APPROVED,
        approved_by=cmd.approver,
        approval_reason=cmd.reason,
    )
    event = Event(EventType.RETRY_APPROVED, approved, now.wall, actor=cmd.approver, reason=cmd.reason)
    return Decision(approved, (*healed, event), GuardReply(approved))


def _force_release(record: GuardRecord | None, cmd: ForceRelease, now: Instant) -> Decision:
    current, healed = heal(record, now)
    if current is None:
        return _reject(Rejected(RejectionKind.NOT_FOUND, "task_key", "no guard has this key"))
    if not current.running:
        return _reject(
            Rejected(RejectionKind.FAILED_PRECONDITION, "task_key", f"guard is {current.state.name}, not RUNNING"),
            current if healed else None,
            healed,
        )
    released = replace(
        current,
        state=GuardState.CANCELLED,
        last_status=RunStatus.CANCELLED,
        last_detail=cmd.reason,
        released_at=now.wall,
        released_by=cmd.operator or "an operator",
        expires_deadline=None,
    )
    event = Event(EventType.FORCE_RELEASED, released, now.wall, actor=released.released_by, reason=cmd.reason)
    return Decision(released, (event,), GuardReply(released))


def _reject(rejection: Rejected, healed_record: GuardRecord | None = None, healed: tuple[Event, ...] = ()) -> Decision:
    return Decision(healed_record, healed, rejection)


def _seconds(value: float) -> str:
    return f"{value:g}s"


def _iso(at: datetime | None) -> str:
    return at.isoformat().replace("+00:00", "Z") if at is not None else "an unknown time"
