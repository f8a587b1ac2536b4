"""The client's sans-I/O core: what each call sends, whether and when it is retried, and what its answer means.

Both clients, asyncio and blocking, are thin I/O around this module (as
httpx's are around its models): they send the ``Unary`` it builds, sleep for
as long as ``Retrying`` says, and hand back what the ``Unary`` makes of the
answer. Nothing here touches a channel, an event loop, a thread or a clock's
sleep, so every decision is the same for both.
"""

from __future__ import annotations

import random
import re
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Generic, Literal, TypeVar

import grpc
from google.protobuf.message import Message

from taskguard_client import _errors
from taskguard_client._call import retry_secret
from taskguard_client._errors import (
    DeadlineExceededError,
    StatusError,
    UnavailableError,
)
from taskguard_client._models import (
    Guard,
    GuardEvent,
    GuardState,
    Lease,
    Outcome,
    RunFacts,
    RunStatus,
    duration_pb,
    event_from_pb,
    guard_from_pb,
    guard_state_pb,
    lease_of,
    outcome_from_pb,
    run_status_pb,
)
from taskguard_client.v1 import taskguard_pb2 as pb

_T = TypeVar("_T")
_Connection = TypeVar("_Connection")

OnConflict = Literal["raise", "return", "join", "queue", "keep-newest", "supersede"]
# What each asks the sidecar for (the rest is what the client does with a refusal).
_ON_CONFLICT_PB = {
    "raise": pb.ON_CONFLICT_REJECT,
    "return": pb.ON_CONFLICT_REJECT,
    "join": pb.ON_CONFLICT_JOIN,
    "queue": pb.ON_CONFLICT_QUEUE,
    "keep-newest": pb.ON_CONFLICT_KEEP_NEWEST,
    "supersede": pb.ON_CONFLICT_SUPERSEDE,
}

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_PAGE_SIZE = 100
# The sidecar keeps at most this much of a release's detail.
MAX_DETAIL_BYTES = 4096
# The sidecar refuses these in a detail (C0, DEL, C1): a terminal would act on them.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_LINE_BREAKS = re.compile(r"[\t\n\v\f\r]+")


# --- retries ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Retries of calls that are safe to repeat, when the sidecar answers UNAVAILABLE.

    Delays grow exponentially from ``initial_backoff_s`` up to
    ``max_backoff_s``, each drawn uniformly below its cap ("full jitter", from
    the AWS Architecture Blog's "Exponential Backoff and Jitter"), so clients
    that lost the sidecar together do not come back together.
    ``max_attempts`` counts the first attempt. Watches and resuming Hold
    streams use the delays without the attempt limit.
    """

    max_attempts: int = 5
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    multiplier: float = 2.0

    def delays(self) -> Iterator[float]:
        """Endless jittered delays, one before each retry."""
        cap = self.initial_backoff_s
        while True:
            yield random.uniform(0, cap)
            cap = min(cap * self.multiplier, self.max_backoff_s)


class Retrying:
    """One call's retries: which failures are retried, the delay before each, and when to give up.

    With ``deadline`` (a ``time.monotonic()`` value) UNAVAILABLE and
    DEADLINE_EXCEEDED are retried until then instead of ``policy.max_attempts`` times.
    """

    def __init__(self, policy: RetryPolicy, deadline: float | None = None) -> None:
        self._policy = policy
        self._deadline = deadline
        self._delays = policy.delays()
        self._tries = 0

    def backoff(self, caught: grpc.RpcError | StatusError) -> float:
        """The delay before the next attempt, after ``caught``; raises the typed error when the call gives up."""
        self._tries += 1
        error = caught if isinstance(caught, StatusError) else _errors.from_rpc_error(caught)
        delay = next(self._delays)
        if not self._retryable(error) or not self._may_retry(delay):
            if error is caught:
                raise caught
            raise error from caught
        return delay

    def _retryable(self, error: StatusError) -> bool:
        # Not PermissionDeniedError (a socket we may not open), although gRPC says UNAVAILABLE for it.
        # Against a deadline an attempt that timed out (waiting for the sidecar to come back) is retried too.
        deadline_passes = self._deadline is not None and isinstance(error, DeadlineExceededError)
        return isinstance(error, UnavailableError) or deadline_passes

    def _may_retry(self, delay: float) -> bool:
        if self._deadline is not None:
            return time.monotonic() + delay < self._deadline
        return self._tries < self._policy.max_attempts


@dataclass(frozen=True, slots=True)
class Settings:
    """What every call of one client is made with."""

    address: str
    timeout_s: float
    retry: RetryPolicy
    wait_for_ready: bool
    token: str | None


# --- unary calls ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Unary(Generic[_T]):
    """One unary call: its method and request, whether it may be repeated, and what its answer means."""

    method: str
    request: Message
    #: The answer as the client hands it back (or raises it, for a refused acquisition).
    verdict: Callable[[Any], _T]
    retry: bool = True
    #: Retried until then (``time.monotonic()``) instead of by the policy's attempts (see ``Retrying``).
    deadline: float | None = None
    #: How long the sidecar may keep the call before it answers (a queued acquisition), on top of the
    #: client's timeout; None: as long as it takes.
    waits_s: float | None = 0.0

    def timeout_s(self, settings_timeout_s: float) -> float | None:
        return None if self.waits_s is None else settings_timeout_s + self.waits_s

    def retrying(self, policy: RetryPolicy) -> Retrying:
        return Retrying(policy if self.retry else RetryPolicy(max_attempts=1), self.deadline)


def _guard_of(response: Any) -> Guard:
    return guard_from_pb(response.guard)


def acquire_request(
    task_key: str,
    run_id: str | None,
    ttl: float | timedelta | None,
    labels: Mapping[str, str] | None,
    holder: str,
    on_conflict: OnConflict,
    max_wait: float | timedelta | None = None,
) -> pb.AcquireRequest:
    if on_conflict not in _ON_CONFLICT_PB:
        raise ValueError(
            f"on_conflict must be 'raise', 'return', 'join', 'queue', 'keep-newest' or 'supersede', not {on_conflict!r}"
        )
    # Made before the first attempt, so that every retry names the same run.
    run_id = run_id or str(uuid.uuid4())
    request = pb.AcquireRequest(
        task_key=task_key,
        run_id=run_id,
        # Ties the retries to this process where the sidecar cannot tell callers apart (see retry_secret).
        retry_secret=retry_secret(task_key, run_id),
        holder=holder,
        labels=dict(labels or {}),
        on_conflict=_ON_CONFLICT_PB[on_conflict],
    )
    if ttl is not None:
        request.ttl.CopyFrom(duration_pb(ttl))
    if max_wait is not None:
        request.max_wait.CopyFrom(duration_pb(max_wait))
    return request


def acquire(
    request: pb.AcquireRequest, on_conflict: OnConflict, max_wait: float | timedelta | None = None
) -> Unary[Lease | Conflict]:
    def verdict(response: pb.AcquireResponse) -> Lease | Conflict:
        return acquired(response.outcome, response.guard, response.lease_id, on_conflict)

    if on_conflict not in _WAITING:
        return Unary("Acquire", request, verdict)
    waits_s = None if max_wait is None else _seconds(max_wait)
    return Unary("Acquire", request, verdict, waits_s=waits_s)


# What waits in the key's queue, and so may keep a unary call open.
_WAITING = frozenset({"queue", "keep-newest", "supersede"})


def _seconds(value: float | timedelta) -> float:
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


def renew(lease_id: str, ttl: float | timedelta | None) -> Unary[Guard]:
    request = pb.RenewRequest(lease_id=lease_id)
    if ttl is not None:
        request.ttl.CopyFrom(duration_pb(ttl))
    return Unary("Renew", request, _guard_of)


def release(lease_id: str, status: RunStatus | str, detail: str, deadline: float | None = None) -> Unary[Guard]:
    request = pb.ReleaseRequest(lease_id=lease_id, status=run_status_pb(status), detail=fit_detail(detail))
    return Unary("Release", request, _guard_of, deadline=deadline)


# approve_retry and force_release are not retried: a repeat after a lost answer would be refused.
def approve_retry(task_key: str, approver: str, reason: str) -> Unary[Guard]:
    request = pb.ApproveRetryRequest(task_key=task_key, approver=approver, reason=reason)
    return Unary("ApproveRetry", request, _guard_of, retry=False)


def force_release(task_key: str, operator: str, reason: str) -> Unary[Guard]:
    request = pb.ForceReleaseRequest(task_key=task_key, operator=operator, reason=reason)
    return Unary("ForceRelease", request, _guard_of, retry=False)


def get(task_key: str) -> Unary[Guard]:
    return Unary("GetGuard", pb.GetGuardRequest(task_key=task_key), guard_from_pb)


def check_fence(task_key: str, fencing_token: int) -> Unary[bool]:
    request = pb.CheckFenceRequest(task_key=task_key, fencing_token=fencing_token)
    return Unary("CheckFence", request, lambda response: bool(response.valid))


class Pages:
    """A listing, page by page: each page is asked for when the iteration reaches it, and retried on its own."""

    def __init__(
        self, prefix: str | None, states: Iterable[GuardState | str] | None, stale_only: bool, page_size: int
    ) -> None:
        self._request = pb.ListGuardsRequest(
            key_prefix=prefix or "",
            states=[guard_state_pb(state) for state in states or ()],
            stale_only=stale_only,
            page_size=page_size,
        )
        self._done = False

    def next(self) -> Unary[list[Guard]] | None:
        """The call for the next page, or None after the last."""
        return None if self._done else Unary("ListGuards", self._request, self._page)

    def _page(self, page: pb.ListGuardsResponse) -> list[Guard]:
        self._request.page_token = page.next_page_token
        self._done = not page.next_page_token
        return [guard_from_pb(guard) for guard in page.guards]


# --- acquisitions -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Conflict(RunFacts):
    """A refused acquisition (``on_conflict="return"`` or ``"join"``): the run in the way.

    ``guard`` is the winner's snapshot (``outcome`` ALREADY_RUNNING) or the
    failed run's (RETRY_REQUIRES_APPROVAL). After a join (``joined``) it is
    the winner's final snapshot: its ``state`` says how that run ended.
    """

    outcome: Outcome
    guard: Guard
    joined: bool = False
    #: SUPERSEDED: the run of the newer trigger that took this waiter's place.
    superseded_by: str = ""

    @property
    def holder(self) -> str:
        return self.guard.holder

    def error(self) -> _errors.Refusal:
        """The exception ``on_conflict="raise"`` would have raised."""
        return _errors.conflict(self.outcome, self.guard, self.superseded_by)

    @property
    def _run(self) -> Guard:
        return self.guard


def acquired(outcome_value: int, guard_message: pb.Guard, lease_id: str, on_conflict: OnConflict) -> Lease | Conflict:
    """An acquisition's answer as a Lease, a Conflict, or (``on_conflict="raise"``) an exception."""
    guard = guard_from_pb(guard_message)
    outcome = outcome_from_pb(outcome_value)
    if outcome is Outcome.ACQUIRED:
        return lease_of(lease_id, guard)
    if on_conflict != "return":
        raise _errors.conflict(outcome, guard)
    return Conflict(outcome, guard)


def fit_detail(detail: str) -> str:
    """Make a detail what the sidecar accepts: no control characters (line breaks become spaces, the
    rest ``\\xNN``), then cut on a character boundary. An exception's text must not make its release fail."""
    detail = _CONTROL.sub(lambda match: f"\\x{ord(match.group()):02x}", _LINE_BREAKS.sub(" ", detail))
    encoded = detail.encode("utf-8", "surrogatepass")
    if len(encoded) <= MAX_DETAIL_BYTES:
        return detail
    return encoded[: MAX_DETAIL_BYTES - 3].decode("utf-8", "ignore") + "..."


# --- watches ----------------------------------------------------------------------------


class WatchPosition:
    """Where a watch stands, so that a resumed stream neither repeats nor skips a revision.

    Watching "from now" (start_revision 0) the snapshot's revision is where
    the live events begin; watching from a revision, the snapshot comes
    before the history and does not move the position. A stream that breaks
    during its snapshot asks for a new one and hands out only the guards that
    are new or changed since. A stream that breaks before anything arrived
    when watching from now restarts from now: what happened in between is not
    seen.

    With ``probe`` the first stream is opened only after a one-guard
    ListGuards answered, so that an unreachable sidecar fails fast.
    """

    def __init__(self, prefix: str, start_revision: int, include_snapshot: bool, probe: bool = True) -> None:
        self.prefix = prefix
        self.start_revision = start_revision
        self.include_snapshot = include_snapshot
        self.last_revision = 0
        self.received = False
        self._probed = not probe
        self._pending: deque[pb.GuardEvent] = deque()
        self._snapshot_done = not include_snapshot
        self._snapshot_seen: dict[str, int] = {}  # task key -> guard revision already handed out

    def probe(self) -> Unary[None] | None:
        """The call to make before the first stream, if it has not answered yet."""
        if self._probed:
            return None
        return Unary("ListGuards", pb.ListGuardsRequest(key_prefix=self.prefix, page_size=1), self._answered)

    def _answered(self, _: Any) -> None:
        self._probed = True

    def request(self) -> pb.WatchGuardsRequest:
        if not self._snapshot_done:
            # Still in the snapshot: take it again, from where the watch was asked to start.
            return pb.WatchGuardsRequest(
                key_prefix=self.prefix, start_revision=self.start_revision, include_snapshot=True
            )
        start = self.last_revision + 1 if self.last_revision else self.start_revision
        return pb.WatchGuardsRequest(key_prefix=self.prefix, start_revision=start)

    def arrived(self, batch: pb.GuardEventBatch) -> None:
        self._pending.extend(batch.events)

    def next_event(self) -> GuardEvent | None:
        """The next event of the batches that arrived, or None when they are all handed out."""
        while self._pending:
            event = self.take(self._pending.popleft())
            if event is not None:
                return event
        return None

    def take(self, message: pb.GuardEvent) -> GuardEvent | None:
        """The event to hand out, or None for one handed out already."""
        self.received = True
        if message.type == pb.GUARD_EVENT_TYPE_SNAPSHOT:
            if self._snapshot_seen.get(message.guard.task_key) == message.guard.revision:
                return None  # handed out before the stream broke, and unchanged since
            self._snapshot_seen[message.guard.task_key] = message.guard.revision
            if self.start_revision == 0:
                self.last_revision = max(self.last_revision, message.revision)
            return event_from_pb(message)
        if not self._snapshot_done:
            self._snapshot_done = True
            self._snapshot_seen.clear()
        if message.revision <= self.last_revision:
            return None
        self.last_revision = message.revision
        return event_from_pb(message)


class Watching(Generic[_Connection]):
    """What both watches hold: their connection, their position, the current stream, and whether they are closed."""

    def __init__(self, connection: _Connection, position: WatchPosition) -> None:
        self._connection = connection
        self._position = position
        self._call: Any = None
        self._closed = False

    @property
    def last_revision(self) -> int:
        """The revision to resume after (0 until one is known)."""
        return self._position.last_revision
