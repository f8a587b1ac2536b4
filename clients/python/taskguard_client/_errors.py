"""Every error the client raises, and the one place a gRPC status becomes one of them.

Three refusals are outcomes, not failures, and carry the run in the way:
``AlreadyRunning``, ``RetryRequiresApproval`` and ``LockDelayed``. Everything else is a
``StatusError`` subclass named for its status code, carrying the code and the
sidecar's message (which names the field and the rule it broke). All share
``TaskGuardError``. Like Temporal's single ``ALREADY_EXISTS ->
WorkflowAlreadyStartedError`` translation in ``temporalio/client/_impl.py``,
no other module looks at a status code to pick an exception: what the end of
a watch or Hold stream means, by its status, is decided here too.
"""

from __future__ import annotations

import re
from datetime import datetime

import grpc
from grpc import aio

from taskguard_client._models import Guard, Outcome


class TaskGuardError(Exception):
    """The base of every error this client raises."""


class AlreadyRunning(TaskGuardError):
    """Another run holds the guard; its facts are attributes (``guard`` is the whole snapshot)."""

    def __init__(
        self, task_key: str, run_id: str, started_at: datetime, holder: str, fencing_token: int, guard: Guard
    ) -> None:
        by = f" by {holder}" if holder else ""
        token = f"fencing token {fencing_token}"
        message = f"{task_key} is already running: run {run_id}, started {_iso(started_at)}{by} ({token})"
        if guard.holders:
            runs = ", ".join(f"run {run.run_id} (fencing token {run.fencing_token})" for run in guard.runs)
            message = f"{task_key} is already running as often as it may at once: {runs}"
        super().__init__(message)
        self.task_key = task_key
        self.run_id = run_id
        self.started_at = started_at
        self.holder = holder
        self.fencing_token = fencing_token
        self.guard = guard


class RetryRequiresApproval(TaskGuardError):
    """The last run of the key ended in a way that needs ``approve_retry`` before anyone runs it again."""

    def __init__(self, task_key: str, run_id: str, released_at: datetime | None, detail: str, guard: Guard) -> None:
        when = f" at {_iso(released_at)}" if released_at else ""
        why = f": {detail}" if detail else ""
        super().__init__(f"{task_key}: run {run_id} ended {guard.state.value}{when}{why}; a retry needs approval")
        self.task_key = task_key
        self.run_id = run_id
        self.released_at = released_at
        self.detail = detail
        self.guard = guard


class LockDelayed(TaskGuardError):
    """The key's last run was lost and its lock-delay has not passed: try again at ``until``."""

    def __init__(self, task_key: str, run_id: str, until: datetime | None, guard: Guard) -> None:
        opens = f"; the key opens at {_iso(until)}" if until else ""
        why = f" ({guard.last_detail})" if guard.last_detail else ""
        super().__init__(f"{task_key}: run {run_id} was lost{why} and the key's lock-delay holds it closed{opens}")
        self.task_key = task_key
        self.run_id = run_id
        self.until = until
        self.guard = guard


class QueueFull(TaskGuardError):
    """The key's queue already holds as many waiters as its rule allows (``max_queue``)."""

    def __init__(self, task_key: str, guard: Guard) -> None:
        super().__init__(f"{task_key}: its queue is full ({len(guard.waiters)} waiting behind run {guard.run_id})")
        self.task_key = task_key
        self.guard = guard


class WaitTimedOut(TaskGuardError):
    """The waiter's max_wait passed before its turn came; it is no longer queued."""

    def __init__(self, task_key: str, guard: Guard) -> None:
        super().__init__(f"{task_key}: its wait in the queue ran out before its turn came (behind run {guard.run_id})")
        self.task_key = task_key
        self.guard = guard


class Superseded(TaskGuardError):
    """keep-newest: a newer trigger of the key took this waiter's place (``by`` is its run)."""

    def __init__(self, task_key: str, by: str, guard: Guard) -> None:
        newer = f" by run {by}" if by else ""
        super().__init__(f"{task_key}: superseded{newer}, a newer trigger that waits in its place")
        self.task_key = task_key
        self.by = by
        self.guard = guard


Refusal = AlreadyRunning | RetryRequiresApproval | LockDelayed | QueueFull | WaitTimedOut | Superseded


class StatusError(TaskGuardError):
    """A call ended with a gRPC status other than OK; ``str(error)`` is the sidecar's message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message or code.name)
        self.code = code
        self.message = message


class InvalidArgumentError(StatusError):
    """The sidecar refused an argument (INVALID_ARGUMENT); the message names the field and the rule."""


class NotFoundError(StatusError):
    """No guard has this key, or no lease has this id (NOT_FOUND)."""


class LeaseNotFoundError(NotFoundError):
    """No lease has this id (NOT_FOUND on lease_id): it never existed, or its guard's history is gone."""


class FailedPreconditionError(StatusError):
    """The guard is not in a state that allows the call (FAILED_PRECONDITION)."""


class LeaseLost(FailedPreconditionError):
    """The lease no longer holds its guard: force-released, expired, abandoned, or already released.

    ``guard`` is the snapshot that shows how, when the sidecar sent one.
    """

    def __init__(self, code: grpc.StatusCode, message: str, guard: Guard | None = None) -> None:
        super().__init__(code, message)
        self.guard = guard


class PermissionDeniedError(StatusError):
    """PERMISSION_DENIED or UNAUTHENTICATED, or the sidecar's socket refused us (EACCES)."""


class UnavailableError(StatusError):
    """The sidecar is not reachable, shutting down, or its store is unavailable (UNAVAILABLE)."""


class DeadlineExceededError(StatusError):
    """No answer within the client's timeout (DEADLINE_EXCEEDED)."""


class OutOfRangeError(StatusError):
    """A watch asked for revisions the sidecar no longer keeps (OUT_OF_RANGE).

    Re-list the guards (``list``) and watch again from the present (or from
    ``oldest_revision``, accepting the gap).
    """

    def __init__(self, code: grpc.StatusCode, message: str, oldest_revision: int | None = None) -> None:
        super().__init__(code, message)
        self.oldest_revision = oldest_revision

    def __str__(self) -> str:
        return f"{self.message}; the events in between are gone: re-list the guards and watch from the present"


class ResourceExhaustedError(StatusError):
    """Too many watchers, or a watcher fell behind (RESOURCE_EXHAUSTED)."""


class InternalError(StatusError):
    """The sidecar failed unexpectedly (INTERNAL); its log says why."""


_BY_CODE: dict[grpc.StatusCode, type[StatusError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.UNAUTHENTICATED: PermissionDeniedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.OUT_OF_RANGE: OutOfRangeError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.INTERNAL: InternalError,
}

# The sidecar's rejections read "<field>: <rule>"; a lease that lost its guard is reported on lease_id.
_LEASE_LOST = re.compile(r"^lease_id: lease lost")
_LEASE_NOT_FOUND = re.compile(r"^(resume\.)?lease_id: ")
_OLDEST = re.compile(r"oldest available is (\d+)")
# gRPC reports a unix socket we may not open as UNAVAILABLE, with the errno text in the details.
_SOCKET_DENIED = "Permission denied"


def from_status(code: grpc.StatusCode, message: str, guard: Guard | None = None) -> StatusError:
    """The typed error for a status; ``guard`` is attached to ``LeaseLost``."""
    if code is grpc.StatusCode.FAILED_PRECONDITION and _LEASE_LOST.match(message):
        return LeaseLost(code, message, guard)
    if code is grpc.StatusCode.NOT_FOUND and _LEASE_NOT_FOUND.match(message):
        return LeaseNotFoundError(code, message)
    if code is grpc.StatusCode.OUT_OF_RANGE:
        oldest = _OLDEST.search(message)
        return OutOfRangeError(code, message, int(oldest.group(1)) if oldest else None)
    if code is grpc.StatusCode.UNAVAILABLE and _SOCKET_DENIED in message:
        return PermissionDeniedError(code, message)
    return _BY_CODE.get(code, StatusError)(code, message)


def status_of(error: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    if isinstance(error, aio.AioRpcError):
        return error.code(), error.details() or ""
    if isinstance(error, grpc.Call):
        return error.code(), error.details() or ""
    return grpc.StatusCode.UNKNOWN, str(error)


def from_rpc_error(error: grpc.RpcError) -> StatusError:
    """The typed error for a failed gRPC call (sync or asyncio)."""
    return from_status(*status_of(error))


def lease_lost(message: str, guard: Guard | None) -> LeaseLost:
    """A Hold stream was told LOST (the sidecar then ends it with FAILED_PRECONDITION)."""
    return LeaseLost(grpc.StatusCode.FAILED_PRECONDITION, message, guard)


def deadline_exceeded(message: str) -> DeadlineExceededError:
    return DeadlineExceededError(grpc.StatusCode.DEADLINE_EXCEEDED, message)


def protocol_error(message: str) -> StatusError:
    """The sidecar broke the Hold protocol (an answer missing or out of place)."""
    return StatusError(grpc.StatusCode.UNKNOWN, message)


# --- how a stream's end reads ---------------------------------------------------------

# Watch streams end with these when the sidecar restarts, drains, or cuts off a slow or surplus watcher.
_WATCH_RESUMES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)
# A Hold stream the sidecar ends with these has lost its lease (the guard moved on, or the lease is gone).
_HOLD_LOST = frozenset({grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND})


class HoldStreamBroke(Exception):
    """A release's stream ended before its answer; the release is repeated as a unary call."""


def watch_ended(error: grpc.RpcError) -> StatusError | None:
    """The error that ends a watch whose stream failed so, or None when the watch resumes."""
    code, _ = status_of(error)
    return None if code in _WATCH_RESUMES else from_rpc_error(error)


def sidecar_gone(error: grpc.RpcError) -> bool:
    """Whether a stream broke because the sidecar went away (restarted, draining), not because it refused."""
    return status_of(error)[0] is grpc.StatusCode.UNAVAILABLE


def unanswered(code: grpc.StatusCode, details: str) -> StatusError:
    """A Hold stream that ended before answering its first message, with this status."""
    if code is grpc.StatusCode.OK:
        return protocol_error("the sidecar ended the Hold stream without an answer")
    return from_status(code, details)


def hold_timed_out(timeout_s: float) -> DeadlineExceededError:
    return deadline_exceeded(f"the sidecar did not answer the Hold within {timeout_s:g}s")


def hold_ended(
    code: grpc.StatusCode, message: str, lost_guard: Guard | None, releasing: bool
) -> LeaseLost | HoldStreamBroke | None:
    """After a held lease's stream ended: the loss, a broken release, or None to resume."""
    if lost_guard is not None or code in _HOLD_LOST:
        return lease_lost(message or _loss(lost_guard), lost_guard)
    if releasing:
        return HoldStreamBroke(f"{code.name}: {message}")
    if code is grpc.StatusCode.UNAVAILABLE:
        return None
    return lease_lost(
        f"lease lost: the Hold stream ended ({code.name}: {message or 'no message'}) and the sidecar abandons"
        " a run whose stream ends",
        None,
    )


def resume_failed(error: StatusError) -> LeaseLost:
    """Why a lease is lost when its resume was refused or never answered."""
    if isinstance(error, LeaseLost):
        return error
    return lease_lost(f"lease lost: could not resume it after the sidecar went away: {error}", None)


def _loss(guard: Guard | None) -> str:
    if guard is None:
        return "lease lost"
    if guard.released_by:
        return f"lease lost: the guard was force-released by {guard.released_by}: {guard.last_detail}"
    return f"lease lost: the guard is {guard.state.value}: {guard.last_detail}"


def conflict(outcome: Outcome, guard: Guard, superseded_by: str = "") -> Refusal:
    """The exception for a refused acquisition."""
    if outcome is Outcome.QUEUE_FULL:
        return QueueFull(guard.task_key, guard)
    if outcome is Outcome.WAIT_TIMED_OUT:
        return WaitTimedOut(guard.task_key, guard)
    if outcome is Outcome.SUPERSEDED:
        return Superseded(guard.task_key, superseded_by, guard)
    if outcome is Outcome.ALREADY_RUNNING:
        return AlreadyRunning(guard.task_key, guard.run_id, guard.started_at, guard.holder, guard.fencing_token, guard)
    if outcome is Outcome.LOCK_DELAYED:
        return LockDelayed(guard.task_key, guard.run_id, guard.lock_delay_until, guard)
    return RetryRequiresApproval(guard.task_key, guard.run_id, guard.released_at, guard.last_detail, guard)


def _iso(at: datetime) -> str:
    return at.isoformat(timespec="seconds").replace("+00:00", "Z")
