"""What the client hands back: small frozen dataclasses, converted from protobuf here and nowhere else.

Enums are ``StrEnum``s named like the proto's values without their prefix
(``GuardState.RUNNING`` is ``GUARD_STATE_RUNNING``), so they print, compare
with plain strings and serialise to JSON as they are. Times are aware UTC
``datetime``s; durations are ``timedelta``s.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from taskguard_client.v1 import taskguard_pb2 as pb


class GuardState(enum.StrEnum):
    """The state of a guard (``taskguard.v1.GuardState``)."""

    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    ABANDONED = "ABANDONED"
    EXPIRED = "EXPIRED"
    RETRY_APPROVED = "RETRY_APPROVED"


class RunStatus(enum.StrEnum):
    """How a run ended, as its holder reports it (``taskguard.v1.RunStatus``)."""

    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


class Outcome(enum.StrEnum):
    """The answer to an acquisition (``taskguard.v1.AcquireOutcome``)."""

    ACQUIRED = "ACQUIRED"
    ALREADY_RUNNING = "ALREADY_RUNNING"
    RETRY_REQUIRES_APPROVAL = "RETRY_REQUIRES_APPROVAL"
    #: The key's last run was lost and its rule's lock-delay has not passed (``Guard.lock_delay_until``).
    LOCK_DELAYED = "LOCK_DELAYED"
    #: ``on_conflict="queue"``/``"keep-newest"``: waiting in the key's queue (not a final answer).
    QUEUED = "QUEUED"
    #: The key's queue is full (its rule's ``max_queue``).
    QUEUE_FULL = "QUEUE_FULL"
    #: The waiter's ``max_wait`` passed before its turn came.
    WAIT_TIMED_OUT = "WAIT_TIMED_OUT"
    #: ``keep-newest``: a newer trigger took this waiter's place.
    SUPERSEDED = "SUPERSEDED"


class EventType(enum.StrEnum):
    """What happened to a guard (``taskguard.v1.GuardEventType``)."""

    SNAPSHOT = "SNAPSHOT"
    ACQUIRED = "ACQUIRED"
    DUPLICATE_REFUSED = "DUPLICATE_REFUSED"
    RETRY_REFUSED = "RETRY_REFUSED"
    RENEWED = "RENEWED"
    RELEASED = "RELEASED"
    EXPIRED = "EXPIRED"
    ABANDONED = "ABANDONED"
    RETRY_APPROVED = "RETRY_APPROVED"
    FORCE_RELEASED = "FORCE_RELEASED"
    RESUMED = "RESUMED"
    #: A trigger refused with LOCK_DELAYED.
    LOCK_DELAY_REFUSED = "LOCK_DELAY_REFUSED"
    QUEUED = "QUEUED"
    DEQUEUED = "DEQUEUED"
    SUPERSEDED = "SUPERSEDED"
    QUEUE_FULL_REFUSED = "QUEUE_FULL_REFUSED"
    STOP_REQUESTED = "STOP_REQUESTED"


@dataclass(frozen=True, slots=True)
class Guard:
    """A guard's snapshot, as the sidecar answered it (``taskguard.v1.Guard``)."""

    task_key: str
    session_key: str
    task_name: str
    state: GuardState
    #: The current run (RUNNING) or the last one.
    run_id: str
    holder: str
    started_at: datetime
    #: None when the lease has no TTL.
    expires_at: datetime | None
    fencing_token: int
    attempt: int
    #: None until a holder released a run (expired and abandoned runs have none).
    last_status: RunStatus | None
    last_detail: str
    released_at: datetime | None
    duplicate_count: int
    stream_bound: bool
    labels: Mapping[str, str] = field(hash=False)
    revision: int
    heartbeat_at: datetime | None
    stale: bool
    approved_by: str
    approval_reason: str
    ttl: timedelta | None
    released_by: str
    #: After a lost run, when the key's lock-delay ends (acquisitions get LOCK_DELAYED until then).
    lock_delay_until: datetime | None = None
    #: When the run's max hold ends it, whatever its renewals (the key's rule has a max_hold).
    hold_until: datetime | None = None
    #: The rule the key follows; only ``get_guard`` fills it in.
    policy: KeyPolicy | None = None
    #: Callers waiting for the key, first in line first.
    waiters: tuple[Waiter, ...] = ()
    #: RUNNING and superseded (``on_conflict="supersede"``): the newer run, and when this one is force-released.
    stop_requested_by: str = ""
    stop_at: datetime | None = None
    #: A key several runs may hold at once (``KeyPolicy.max_holders``): its other running runs, oldest first.
    holders: tuple[Holder, ...] = ()

    @property
    def running(self) -> bool:
        return self.state is GuardState.RUNNING

    @property
    def runs(self) -> tuple[Holder, ...]:
        """Every run holding the key now, oldest first: ``holders``, and the guard's own run when RUNNING."""
        if not self.running:
            return self.holders
        own = Holder(
            self.run_id,
            self.holder,
            self.fencing_token,
            self.attempt,
            self.started_at,
            self.expires_at,
            self.heartbeat_at,
            self.stream_bound,
            self.labels,
            self.stale,
        )
        return (*self.holders, own)


@dataclass(frozen=True, slots=True)
class Holder:
    """One of the runs holding a key that several may hold at once (``taskguard.v1.Holder``)."""

    run_id: str
    holder: str
    fencing_token: int
    attempt: int
    started_at: datetime
    expires_at: datetime | None
    heartbeat_at: datetime | None
    stream_bound: bool
    labels: Mapping[str, str] = field(hash=False)
    stale: bool = False


@dataclass(frozen=True, slots=True)
class KeyPolicy:
    """The rule a key follows on the sidecar (``taskguard.v1.KeyPolicy``): the first configured match, else default."""

    rule: str
    match: str
    #: What an acquisition that does not choose gets when the key is taken: "reject", "join", "queue",
    #: "keep_newest".
    on_conflict: str
    #: After a FAILED run: "require_approval" or "reopen".
    failure: str
    abandoned_requires_approval: bool
    expired_requires_approval: bool
    lock_delay: timedelta | None
    max_hold: timedelta | None
    max_queue: int = 0
    max_wait: timedelta | None = None
    allow_supersede: bool = False
    supersede_grace: timedelta | None = None
    #: How many runs may hold the key at once (a semaphore).
    max_holders: int = 1


@dataclass(frozen=True, slots=True)
class Waiter:
    """A caller in a key's queue (``taskguard.v1.Waiter``)."""

    run_id: str
    holder: str
    queued_at: datetime | None
    #: When its max_wait ends it; None without one.
    wait_until: datetime | None
    keep_newest: bool
    #: First in line, for the run it asked to stop (``supersede``).
    superseding: bool = False


@dataclass(frozen=True, slots=True)
class GuardEvent:
    """One committed change of a guard (``taskguard.v1.GuardEvent``)."""

    #: Strictly rising; SNAPSHOT events carry the revision the snapshot was taken at.
    revision: int
    type: EventType
    #: The guard after the change.
    guard: Guard
    trigger_run_id: str
    trigger_holder: str
    occurred_at: datetime | None
    actor: str
    reason: str
    #: QUEUED, DEQUEUED, SUPERSEDED, and an ACQUIRED that served the queue: the waiter's run.
    waiter_run_id: str = ""


@dataclass(frozen=True, slots=True)
class Lease:
    """An acquired run: the capability (``lease_id``) and the facts a downstream needs (``fencing_token``)."""

    task_key: str
    run_id: str
    lease_id: str
    fencing_token: int
    started_at: datetime
    #: None when the lease has no TTL.
    expires_at: datetime | None
    #: The guard's snapshot when it was acquired.
    guard: Guard


class RunFacts:
    """The facts of one run that a conflict and a hold both show, read from ``_run`` (a Guard or a Lease)."""

    __slots__ = ()

    @property
    def _run(self) -> Guard | Lease:
        raise NotImplementedError

    @property
    def task_key(self) -> str:
        return self._run.task_key

    @property
    def run_id(self) -> str:
        return self._run.run_id

    @property
    def started_at(self) -> datetime:
        return self._run.started_at

    @property
    def fencing_token(self) -> int:
        return self._run.fencing_token


# --- protobuf -> dataclasses --------------------------------------------------------

_STATE_PB: dict[GuardState, pb.GuardState] = {
    GuardState.RUNNING: pb.GUARD_STATE_RUNNING,
    GuardState.SUCCEEDED: pb.GUARD_STATE_SUCCEEDED,
    GuardState.FAILED: pb.GUARD_STATE_FAILED,
    GuardState.CANCELLED: pb.GUARD_STATE_CANCELLED,
    GuardState.ABANDONED: pb.GUARD_STATE_ABANDONED,
    GuardState.EXPIRED: pb.GUARD_STATE_EXPIRED,
    GuardState.RETRY_APPROVED: pb.GUARD_STATE_RETRY_APPROVED,
}
_STATUS_PB: dict[RunStatus, pb.RunStatus] = {
    RunStatus.SUCCEEDED: pb.RUN_STATUS_SUCCEEDED,
    RunStatus.FAILED: pb.RUN_STATUS_FAILED,
    RunStatus.CANCELLED: pb.RUN_STATUS_CANCELLED,
}
_STATES = {value: state for state, value in _STATE_PB.items()}
_STATUSES = {value: status for status, value in _STATUS_PB.items()}
_OUTCOMES = {pb.AcquireOutcome.Value(f"ACQUIRE_OUTCOME_{outcome.value}"): outcome for outcome in Outcome}
_EVENT_TYPES = {pb.GuardEventType.Value(f"GUARD_EVENT_TYPE_{kind.value}"): kind for kind in EventType}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _time(message: Timestamp) -> datetime:
    return message.ToDatetime(tzinfo=UTC)


def guard_from_pb(message: pb.Guard) -> Guard:
    return Guard(
        task_key=message.task_key,
        session_key=message.session_key,
        task_name=message.task_name,
        state=_STATES[message.state],
        run_id=message.run_id,
        holder=message.holder,
        # The sidecar always sets it; the epoch stands in for a message that does not.
        started_at=_time(message.started_at) if message.HasField("started_at") else _EPOCH,
        expires_at=_time(message.expires_at) if message.HasField("expires_at") else None,
        fencing_token=message.fencing_token,
        attempt=message.attempt,
        last_status=_STATUSES.get(message.last_status),
        last_detail=message.last_detail,
        released_at=_time(message.released_at) if message.HasField("released_at") else None,
        duplicate_count=message.duplicate_count,
        stream_bound=message.stream_bound,
        labels=dict(message.labels),
        revision=message.revision,
        heartbeat_at=_time(message.heartbeat_at) if message.HasField("heartbeat_at") else None,
        stale=message.stale,
        approved_by=message.approved_by,
        approval_reason=message.approval_reason,
        ttl=message.ttl.ToTimedelta() if message.HasField("ttl") else None,
        released_by=message.released_by,
        lock_delay_until=_time(message.lock_delay_until) if message.HasField("lock_delay_until") else None,
        hold_until=_time(message.hold_until) if message.HasField("hold_until") else None,
        policy=_key_policy(message.policy) if message.HasField("policy") else None,
        waiters=tuple(_waiter(waiter) for waiter in message.waiters),
        stop_requested_by=message.stop_requested_by,
        stop_at=_time(message.stop_at) if message.HasField("stop_at") else None,
        holders=tuple(_holder(holder) for holder in message.holders),
    )


def _holder(message: pb.Holder) -> Holder:
    return Holder(
        run_id=message.run_id,
        holder=message.holder,
        fencing_token=message.fencing_token,
        attempt=message.attempt,
        started_at=_time(message.started_at) if message.HasField("started_at") else _EPOCH,
        expires_at=_time(message.expires_at) if message.HasField("expires_at") else None,
        heartbeat_at=_time(message.heartbeat_at) if message.HasField("heartbeat_at") else None,
        stream_bound=message.stream_bound,
        labels=dict(message.labels),
        stale=message.stale,
    )


def _waiter(message: pb.Waiter) -> Waiter:
    return Waiter(
        run_id=message.run_id,
        holder=message.holder,
        queued_at=_time(message.queued_at) if message.HasField("queued_at") else None,
        wait_until=_time(message.wait_until) if message.HasField("wait_until") else None,
        keep_newest=message.keep_newest,
        superseding=message.superseding,
    )


def _key_policy(message: pb.KeyPolicy) -> KeyPolicy:
    return KeyPolicy(
        rule=message.rule,
        match=message.match,
        on_conflict=pb.OnConflict.Name(message.on_conflict).removeprefix("ON_CONFLICT_").lower(),
        failure=pb.FailureHandling.Name(message.failure).removeprefix("FAILURE_HANDLING_").lower(),
        abandoned_requires_approval=message.abandoned_requires_approval,
        expired_requires_approval=message.expired_requires_approval,
        lock_delay=message.lock_delay.ToTimedelta() if message.HasField("lock_delay") else None,
        max_hold=message.max_hold.ToTimedelta() if message.HasField("max_hold") else None,
        max_queue=message.max_queue,
        max_wait=message.max_wait.ToTimedelta() if message.HasField("max_wait") else None,
        allow_supersede=message.allow_supersede,
        supersede_grace=message.supersede_grace.ToTimedelta() if message.HasField("supersede_grace") else None,
        # A sidecar older than semaphores leaves it unset: one holder.
        max_holders=message.max_holders or 1,
    )


def event_from_pb(message: pb.GuardEvent) -> GuardEvent:
    return GuardEvent(
        revision=message.revision,
        type=_EVENT_TYPES[message.type],
        guard=guard_from_pb(message.guard),
        trigger_run_id=message.trigger_run_id,
        trigger_holder=message.trigger_holder,
        occurred_at=_time(message.occurred_at) if message.HasField("occurred_at") else None,
        actor=message.actor,
        reason=message.reason,
        waiter_run_id=message.waiter_run_id,
    )


def outcome_from_pb(value: int) -> Outcome:
    return _OUTCOMES[value]


def lease_of(lease_id: str, guard: Guard) -> Lease:
    return Lease(guard.task_key, guard.run_id, lease_id, guard.fencing_token, guard.started_at, guard.expires_at, guard)


# --- arguments -> protobuf ----------------------------------------------------------


def seconds(value: float | timedelta) -> float:
    """A duration argument (seconds or ``timedelta``) in seconds."""
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


def duration_pb(value: float | timedelta) -> Duration:
    message = Duration()
    message.FromNanoseconds(round(seconds(value) * 1e9))
    return message


def run_status(value: RunStatus | str) -> RunStatus:
    """``RunStatus.FAILED``, ``"FAILED"`` or ``"failed"``."""
    return value if isinstance(value, RunStatus) else RunStatus(value.upper())


def guard_state(value: GuardState | str) -> GuardState:
    return value if isinstance(value, GuardState) else GuardState(value.upper())


def run_status_pb(value: RunStatus | str) -> pb.RunStatus:
    return _STATUS_PB[run_status(value)]


def guard_state_pb(value: GuardState | str) -> pb.GuardState:
    return _STATE_PB[guard_state(value)]
