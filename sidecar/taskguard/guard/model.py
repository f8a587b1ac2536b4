"""The values of Task Guard: guards, commands, events, replies and decisions.

Plain frozen data, no rules (those are in ``core``): the stores, the wire
format, telemetry and the dashboard import these without importing the state
machine. Enum values match the proto's, so the wire maps them one to one.
Times: ``*_at`` fields are UTC wall time, for people; ``*_deadline`` and
``last_seen`` are monotonic seconds, which is what decides.
"""

from __future__ import annotations

import dataclasses
import enum
import fnmatch
import functools
from dataclasses import dataclass, field
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
    # The last run was lost (abandoned, expired, force-released) and the key's lock-delay has not passed.
    LOCK_DELAYED = 4
    # QUEUE / KEEP_NEWEST: the caller waits its turn (``AcquireReply.position``); not a final answer.
    QUEUED = 5
    # The key's queue already has ``max_queue`` waiters.
    QUEUE_FULL = 6
    # The waiter's max_wait passed before its turn came.
    WAIT_TIMED_OUT = 7
    # KEEP_NEWEST: a newer trigger took this waiter's place.
    SUPERSEDED = 8


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
    LOCK_DELAY_REFUSED = 12
    # A caller joined the key's queue (``Event.waiter_run_id``).
    QUEUED = 13
    # A waiter left the queue without the guard: it gave up, its stream ended, its max_wait passed.
    DEQUEUED = 14
    # KEEP_NEWEST: a waiter was replaced by a newer trigger (``trigger_run_id``).
    SUPERSEDED = 15
    # A trigger refused with QUEUE_FULL.
    QUEUE_FULL_REFUSED = 16
    # SUPERSEDE: the running run was asked to stop for a newer trigger (``trigger_run_id``).
    STOP_REQUESTED = 17


# The events that end a run (its guard stops being held).
RUN_ENDS = frozenset({EventType.RELEASED, EventType.EXPIRED, EventType.ABANDONED, EventType.FORCE_RELEASED})


class Durability(enum.Enum):
    SYNC = "sync"
    LAZY = "lazy"
    VOLATILE = "volatile"


class ConflictPolicy(enum.IntEnum):
    """What an acquisition that finds the key taken asks for; values match ``taskguard.v1.OnConflict``."""

    REJECT = 1
    # Wait for the running run to end and hear how it ended (a Hold stream only).
    JOIN = 2
    # Wait in FIFO order for the key, then hold it.
    QUEUE = 3
    # As QUEUE, but the key keeps at most one such waiter: a newer trigger replaces it (debounce).
    KEEP_NEWEST = 4
    # Cancel-in-progress: the running run is asked to stop (force-released after the key's supersede_grace)
    # and the caller is first in line; only where the key's rule allows it.
    SUPERSEDE = 5


WAITING_POLICIES = frozenset({ConflictPolicy.QUEUE, ConflictPolicy.KEEP_NEWEST, ConflictPolicy.SUPERSEDE})


class RejectionKind(enum.Enum):
    """What went wrong; the gRPC front (``rpc.status_for``) maps each kind to one status code."""

    INVALID_ARGUMENT = "invalid_argument"
    NOT_FOUND = "not_found"
    FAILED_PRECONDITION = "failed_precondition"
    PERMISSION_DENIED = "permission_denied"


@dataclass(frozen=True, slots=True)
class Instant:
    """One reading of both clocks: monotonic seconds decide, UTC wall time is shown."""

    monotonic: float
    wall: datetime

    def after(self, seconds: float) -> tuple[float, datetime]:
        return self.monotonic + seconds, self.wall + timedelta(seconds=seconds)


class FailureHandling(enum.IntEnum):
    """What a FAILED run leaves behind; values match ``taskguard.v1.FailureHandling``."""

    # Nobody acquires the key again until an operator approves a retry (the default: no silent retries).
    REQUIRE_APPROVAL = 1
    # The key is free again at once, as after SUCCEEDED.
    REOPEN = 2


@dataclass(frozen=True, slots=True)
class KeyRule:
    """The part of the policy a key's rule sets: what its guard does on conflicts, failures and losses.

    ``match`` is a glob of task keys (``fnmatch``, case-sensitive: ``*`` also
    spans ``:``), so a prefix is ``"agent:ops:*"``.
    """

    name: str = "default"
    match: str = "*"
    # What an Acquire that does not choose (ON_CONFLICT_UNSPECIFIED) gets.
    on_conflict: ConflictPolicy = ConflictPolicy.REJECT
    failure: FailureHandling = FailureHandling.REQUIRE_APPROVAL
    abandoned_requires_approval: bool = False
    expired_requires_approval: bool = False
    # After an involuntary loss (ABANDONED, EXPIRED, force-released) the key stays closed this long, so a
    # holder that lost its lease without noticing stops before the next run starts (Chubby's lock-delay).
    lock_delay_s: float = 0.0
    # A run ends EXPIRED this long after it started, whatever its renewals and heartbeats.
    max_hold_s: float | None = None
    # QUEUE and KEEP_NEWEST: at most this many waiters; a waiter leaves after max_wait (None: no bound).
    max_queue: int = 64
    max_wait_s: float | None = None
    # SUPERSEDE: whether a caller may ask the running run to stop, and how long that run has to stop by itself
    # before it is force-released (its fence invalidated).
    allow_supersede: bool = False
    supersede_grace_s: float = 30.0
    # A semaphore: up to this many runs hold the key at once, each with its own lease and fencing token.
    max_holders: int = 1

    def matches(self, task_key: str) -> bool:
        return fnmatch.fnmatchcase(task_key, self.match)

    def requires_approval(self, state: GuardState) -> bool:
        if state is GuardState.FAILED:
            return self.failure is FailureHandling.REQUIRE_APPROVAL
        if state is GuardState.ABANDONED:
            return self.abandoned_requires_approval
        if state is GuardState.EXPIRED:
            return self.expired_requires_approval
        return False


@dataclass(frozen=True, slots=True)
class Policy:
    """The sidecar's policy: limits for every key, and the ordered rules that set the rest per key."""

    default_ttl_s: float = 60.0
    max_ttl_s: float = 24 * 3600.0
    stale_after_s: float = 120.0
    resume_grace_s: float = 15.0
    # First match wins; ``default_rule`` covers the keys no rule matches.
    rules: tuple[KeyRule, ...] = ()
    default_rule: KeyRule = field(default_factory=KeyRule)

    def rule_for(self, task_key: str) -> KeyRule:
        if not self.rules:
            return self.default_rule
        return _first_match(self.rules, self.default_rule, task_key)


@functools.lru_cache(maxsize=4096)
def _first_match(rules: tuple[KeyRule, ...], default: KeyRule, task_key: str) -> KeyRule:
    # Cached: every command asks, and a busy key asks often; globs are slow next to a dict hit.
    return next((rule for rule in rules if rule.matches(task_key)), default)


Labels = tuple[tuple[str, str], ...]


def split_task_key(task_key: str) -> tuple[str, str]:
    """``"<session_key>::<task_name>"`` split at the last separator."""
    session_key, sep, task_name = task_key.rpartition(KEY_SEPARATOR)
    if not sep:
        return "", task_key
    return session_key, task_name


@dataclass(frozen=True, slots=True)
class Waiter:
    """A caller waiting in a key's queue: its acquisition, decided when its turn comes."""

    acquire: Acquire
    queued_at: datetime
    keep_newest: bool = False
    # SUPERSEDE: first in line, for the run it asked to stop.
    superseding: bool = False
    # Its max_wait: it leaves the queue then (UTC for people, monotonic decides).
    wait_until: datetime | None = None
    wait_deadline: float | None = None

    @property
    def run_id(self) -> str:
        return self.acquire.run_id


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
    # The key's lock-delay after this run was lost: closed until then (UTC for people, monotonic decides).
    lock_delay_until: datetime | None = None
    lock_delay_deadline: float | None = None
    # The key's max_hold: the run ends EXPIRED then, whatever its renewals (UTC, and monotonic).
    hold_until: datetime | None = None
    hold_deadline: float | None = None
    # Callers waiting for the key, first in line first (QUEUE, KEEP_NEWEST).
    waiters: tuple[Waiter, ...] = ()
    # False while a run admitted from the queue has not been taken up by its waiter's call: if the call is
    # gone (a sidecar that died with it), the run ends CANCELLED after the resume grace, as no loss.
    claimed: bool = True
    # SUPERSEDE: the run that asked this one to stop, and when it is force-released if it has not (UTC, monotonic).
    stop_requested_by: str = ""
    stop_until: datetime | None = None
    stop_deadline: float | None = None
    # max_holders > 1: the key's other running runs, oldest first, each a record of its own run only
    # (RUNNING, no waiters, no holders of its own). See ``core`` for which run the record itself speaks for.
    holders: tuple[GuardRecord, ...] = ()
    # The highest fencing token the key has issued (0 in records older than semaphores: then the record's
    # own token is). The next run's is one more, whichever of the key's runs are still in the record.
    tokens_issued: int = 0

    def position(self, run_id: str) -> int:
        """``run_id``'s place in the queue, from 1; 0 when it is not waiting."""
        return next((place for place, waiter in enumerate(self.waiters, 1) if waiter.run_id == run_id), 0)

    @property
    def session_key(self) -> str:
        return split_task_key(self.task_key)[0]

    @property
    def task_name(self) -> str:
        return split_task_key(self.task_key)[1]

    @property
    def running(self) -> bool:
        return self.state is GuardState.RUNNING

    @property
    def runs(self) -> tuple[GuardRecord, ...]:
        """Every run that holds the key now, oldest first (the record's own, when it runs, is the newest or
        the one that spoke last)."""
        return (*self.holders, self) if self.running else self.holders

    @property
    def newest_token(self) -> int:
        """The highest fencing token the key has issued (a run's attempt and token rise together)."""
        return max(self.tokens_issued, self.fencing_token, self.attempt)

    def run_with_lease(self, lease_id: str) -> GuardRecord | None:
        """The running run ``lease_id`` holds, as a record of that run; None when no run of the key holds it."""
        return next((run for run in self.runs if run.lease_id == lease_id), None)

    def names_run(self, fencing_token: int) -> bool:
        """Whether ``fencing_token`` is this record's own run's (ended or not) or one of its running runs'."""
        return self.fencing_token == fencing_token or any(run.fencing_token == fencing_token for run in self.holders)

    def run_with_token(self, fencing_token: int) -> GuardRecord | None:
        """The running run that has ``fencing_token``; None when no run of the key holding it has."""
        return next((run for run in self.runs if run.fencing_token == fencing_token), None)

    def as_holder(self) -> GuardRecord:
        """This record's run as one of a record's holders: its run's fields, none of its key's."""
        if not (self.waiters or self.holders or self.duplicate_count or self.tokens_issued or self.lock_delay_deadline):
            return self
        return dataclasses.replace(
            self,
            waiters=(),
            holders=(),
            duplicate_count=0,
            tokens_issued=0,
            lock_delay_until=None,
            lock_delay_deadline=None,
        )

    def alone(self) -> GuardRecord:
        """This record's run without its key's queue and other runs: what a late command of that run is about."""
        return dataclasses.replace(self, waiters=(), holders=()) if self.waiters or self.holders else self

    def view_of(self, run: GuardRecord) -> GuardRecord:
        """``run`` (one of this key's runs) as a record of its own, with the key's queue, counters and other runs:
        how a decision about that run, and its events, see the key."""
        return dataclasses.replace(
            run,
            waiters=self.waiters,
            holders=tuple(other.as_holder() for other in self.runs if other.fencing_token != run.fencing_token),
            duplicate_count=self.duplicate_count,
            revision=self.revision,
            tokens_issued=self.newest_token,
            lock_delay_until=self.lock_delay_until,
            lock_delay_deadline=self.lock_delay_deadline,
        )


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
    # None: the key's rule chooses (``KeyRule.on_conflict``).
    on_conflict: ConflictPolicy | None = None
    # QUEUE / KEEP_NEWEST: the caller's own bound on its wait (the key's max_wait still applies).
    max_wait_s: float | None = None
    # The sidecar the call is on, when several share a store (its host id; "" otherwise): a waiter whose
    # sidecar is gone has no call left to hear its turn.
    host: str = ""


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
    # A resume grace's end: abandon only if nothing was heard of the run since (monotonic), for its holder may
    # have come back on another sidecar of a shared store, which the one that timed the grace cannot see.
    quiet_since: float | None = None


@dataclass(frozen=True, slots=True)
class Leave:
    """A waiter's call is gone (its stream ended, it gave up) before it heard its turn had come.

    Named by the lease the shell minted for it: if the run was admitted
    meanwhile, it ends CANCELLED, unheld, and the next waiter's turn comes.
    """

    task_key: str
    run_id: str
    lease_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class Claim:
    """A waiter's call took up the run its turn started (the shell told it ACQUIRED)."""

    task_key: str
    lease_id: str


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


Command = (
    Acquire
    | Renew
    | Heartbeat
    | Release
    | Resume
    | AwaitResume
    | Expire
    | Abandon
    | Leave
    | Claim
    | ApproveRetry
    | ForceRelease
)


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
    # QUEUED, DEQUEUED, SUPERSEDED, and ACQUIRED from the queue: the waiter's run.
    waiter_run_id: str = ""
    # Stamped by the store when the event is committed.
    revision: int = 0

    @property
    def task_key(self) -> str:
        return self.guard.task_key


@dataclass(frozen=True, slots=True)
class AcquireReply:
    """ACQUIRED (``fresh`` when a new run started) or a refusal naming the run in the way.

    ``joined``: the caller asked to JOIN and the run in the way is running; the
    shell waits for its end and reports that, instead of ending the call here.
    QUEUED is not a final answer either: the shell waits for the caller's turn.
    """

    outcome: Outcome
    guard: GuardRecord
    fresh: bool = False
    joined: bool = False
    # QUEUED: the caller's place in line, from 1.
    position: int = 0

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


# Asked about a key that has never had a guard.
NO_SUCH_GUARD = Rejected(RejectionKind.NOT_FOUND, "task_key", "no guard has this key")
# A lease id that no run was ever given.
NO_SUCH_LEASE = Rejected(RejectionKind.NOT_FOUND, "lease_id", "no such lease")


class Rejection(Exception):
    """A ``Rejected`` raised on its way out: the gRPC front turns it into the status its kind names."""

    def __init__(self, rejected: Rejected) -> None:
        super().__init__(rejected.message)
        self.rejection = rejected


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


@dataclass(frozen=True, slots=True)
class GuardQuery:
    """What ListGuards asks for: a key prefix, optionally some states or only stale guards, one page."""

    prefix: str
    after: str
    size: int
    states: frozenset[GuardState] = frozenset()
    stale_only: bool = False
