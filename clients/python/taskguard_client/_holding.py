"""A held lease's state machine, without I/O: what both holds know, and every decision they make.

Theory of operation
-------------------
``client.hold(...)`` is a context manager over one Hold stream. Entering it
sends ``acquire`` (retried on UNAVAILABLE with the same run_id, which the
sidecar answers with the same lease) and reads the answer:

* ACQUIRED: the block runs while the stream holds the guard. With a ttl,
  heartbeats go out every ttl/3. Leaving the block releases the run:
  SUCCEEDED, FAILED with the exception's text, or CANCELLED when the block
  was cancelled (``asyncio.CancelledError``, ``KeyboardInterrupt``).
* ``on_conflict="queue"`` (or ``"keep-newest"``): the sidecar answers
  QUEUED and the hold waits on the stream, telling ``on_queued(position,
  guard)`` of each change of its place, until its turn comes (ACQUIRED, as
  below) or it must go: ``QueueFull``, ``WaitTimedOut`` (its ``max_wait``),
  ``Superseded`` (a newer keep-newest trigger took its place) are raised.
* A conflict: ``on_conflict="raise"`` raises ``AlreadyRunning`` or
  ``RetryRequiresApproval``; ``"return"`` enters with a ``Conflict`` instead;
  ``"join"`` sends ON_CONFLICT_JOIN and, when refused with ALREADY_RUNNING,
  waits for the winning run to end, then enters with a ``Conflict`` whose
  ``joined`` is true and whose ``guard`` is the winner's final snapshot. (A
  join refused with RETRY_REQUIRES_APPROVAL has nothing to wait for and
  enters with that ``Conflict`` at once.)

While the block runs, a reader task (a thread, for the blocking client)
follows the stream:

* LOST (force-released, expired): the hold records it (``lost``,
  ``lost_reason``, ``wait_lost()``) and leaving the block raises ``LeaseLost``
  unless the block raised already.
* The stream breaks with UNAVAILABLE (the sidecar restarted or is draining):
  the hold sends ``resume`` with its lease_id on a new stream, retrying for
  the sidecar's default resume grace (15 s). If the sidecar refuses, the
  lease is lost.
* A release whose stream broke before its answer is repeated as a unary
  Release, which is idempotent for the same status.

If the process dies, the kernel closes its connection and the sidecar
abandons the run at once: nothing here keeps a guard alive on its own.

``HoldState`` holds all of that but the I/O; ``_aio_hold`` and ``_sync_hold``
drive it over grpc.aio and over blocking gRPC.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

import grpc

from taskguard_client import _errors, _protocol
from taskguard_client._call import RESUME_WINDOW_S
from taskguard_client._errors import HoldStreamBroke, LeaseLost, TaskGuardError
from taskguard_client._models import (
    Guard,
    Lease,
    Outcome,
    RunFacts,
    RunStatus,
    guard_from_pb,
    lease_of,
    outcome_from_pb,
    run_status,
    run_status_pb,
)
from taskguard_client._protocol import Conflict, OnConflict, Unary, WatchPosition
from taskguard_client.v1 import taskguard_pb2 as pb

_H = TypeVar("_H")


class Answer(Protocol):
    """Where the reader puts the answer to a release sent on the stream (an asyncio or a concurrent future)."""

    def done(self) -> bool: ...

    def set_result(self, result: Guard, /) -> None: ...

    def set_exception(self, exception: BaseException, /) -> None: ...


class Releasing:
    """A release of a held run: the message for the stream, and the unary call for when the stream cannot answer."""

    def __init__(self, lease_id: str, status: RunStatus, detail: str, timeout_s: float) -> None:
        self.message = pb.HoldRequest(release=pb.HoldRelease(status=run_status_pb(status), detail=detail))
        # Long enough to wait out a sidecar restart (a resume), then one call's timeout.
        self.window_s = RESUME_WINDOW_S + timeout_s
        self._lease_id, self._status, self._detail = lease_id, status, detail

    def fallback(self) -> Unary[Guard]:
        """The same release as a unary call, retried until the window closes (idempotent for the same status)."""
        return _protocol.release(self._lease_id, self._status, self._detail, time.monotonic() + self.window_s)


class HoldState(RunFacts):
    """What a hold knows about its lease, and what it makes of each message, stream end and exit."""

    def __init__(self, request: pb.AcquireRequest, ttl_s: float | None, timeout_s: float) -> None:
        self._request = request
        self._ttl_s = ttl_s
        self._timeout_s = timeout_s
        self._lease: Lease | None = None
        self._guard: Guard | None = None
        self._lost: LeaseLost | None = None
        self._lost_guard: Guard | None = None
        self._released: Guard | None = None
        # Set once the block called release(): leaving the block then adds nothing, whatever its outcome.
        self._release_tried = False
        self._closed = False
        self._release_answer: Answer | None = None
        #: Told ``(position, guard)`` each time a queued hold's place changes (``on_conflict="queue"``).
        self.on_queued: Callable[[int, Guard], None] | None = None

    @property
    def lease(self) -> Lease:
        if self._lease is None:
            raise RuntimeError("the hold has not acquired its guard")
        return self._lease

    @property
    def _run(self) -> Lease:
        return self.lease

    @property
    def lease_id(self) -> str:
        return self.lease.lease_id

    @property
    def guard(self) -> Guard:
        """The latest snapshot the sidecar sent (acquisition, heartbeat, release or loss)."""
        return self._guard or self.lease.guard

    @property
    def lost(self) -> bool:
        """Whether the guard was taken away (force-released, expired, or not resumable)."""
        return self._lost is not None

    @property
    def lost_reason(self) -> str | None:
        return str(self._lost) if self._lost is not None else None

    @property
    def released(self) -> Guard | None:
        """The released guard once this hold released its run."""
        return self._released

    # --- entering ---------------------------------------------------------------------

    def _acquiring(self) -> pb.HoldRequest:
        return pb.HoldRequest(acquire=self._request)

    def _queued(self, response: pb.HoldResponse) -> bool:
        """Whether ``response`` says the hold waits in the key's queue (its place is passed on)."""
        if outcome_from_pb(response.outcome) is not Outcome.QUEUED:
            return False
        if self.on_queued is not None:
            self.on_queued(response.position, guard_from_pb(response.guard))
        return True

    def _entered(self, response: pb.HoldResponse) -> Conflict | None:
        """Take in the answer to the acquisition: None when it holds the guard, else the conflict."""
        guard = guard_from_pb(response.guard)
        outcome = outcome_from_pb(response.outcome)
        if outcome is Outcome.ACQUIRED:
            self._lease, self._guard = lease_of(response.lease_id, guard), guard
            return None
        return Conflict(outcome, guard, superseded_by=response.superseded_by)

    @property
    def _heartbeat_s(self) -> float | None:
        return self._ttl_s / 3 if self._ttl_s is not None else None

    # --- the stream -------------------------------------------------------------------

    def _resuming(self) -> tuple[pb.HoldRequest, float]:
        """The first message of a resumed stream, and until when (``time.monotonic()``) to retry it."""
        return pb.HoldRequest(resume=pb.ResumeRequest(lease_id=self.lease_id)), time.monotonic() + RESUME_WINDOW_S

    def _resumed(self, response: pb.HoldResponse) -> None:
        self._guard = guard_from_pb(response.guard)

    def _accepted(self, response: pb.HoldResponse) -> None:
        """Take in one message after the first; a RELEASED one answers the release waiting for it."""
        guard = guard_from_pb(response.guard) if response.HasField("guard") else None
        if guard is not None:
            self._guard = guard
        if response.event == pb.HOLD_EVENT_LOST:
            self._lost_guard = guard
        elif response.event == pb.HOLD_EVENT_RELEASED and guard is not None:
            self._released = guard
            answer = self._release_answer
            if answer is not None and not answer.done():
                answer.set_result(guard)

    @property
    def _done(self) -> bool:
        """Nothing more to follow: the run is released, or the block is left."""
        return self._released is not None or self._closed

    def _ended(self, code: grpc.StatusCode, message: str) -> LeaseLost | bool:
        """After the stream ended: the loss to record, or whether to resume it.

        A release waiting for its answer on that stream is told it broke (it is repeated as a unary call).
        """
        if self._done:
            return False
        answer = self._release_answer
        releasing = answer is not None and not answer.done()
        verdict = _errors.hold_ended(code, message, self._lost_guard, releasing)
        if isinstance(verdict, HoldStreamBroke):
            assert answer is not None
            answer.set_exception(verdict)
            return False
        return True if verdict is None else verdict

    def _lose(self, error: LeaseLost, current: Guard | None) -> None:
        """Record the loss, with the run's final snapshot when the stream brought none.

        The sidecar sends LOST with the snapshot before ending the stream, but a
        heartbeat that races the loss is answered with the bare status instead.
        """
        if error.guard is None and current is not None and current.fencing_token == self.fencing_token:
            error.guard = self._guard = current
        self._lost = error
        answer = self._release_answer
        if answer is not None and not answer.done():
            answer.set_exception(error)

    # --- releasing and leaving --------------------------------------------------------

    def _release_plan(self, status: RunStatus | str, detail: str) -> Releasing | Unary[Guard]:
        """How to release: on the stream, or (after the run was released) a unary repeat."""
        status, detail = run_status(status), _protocol.fit_detail(detail)
        if self._released is not None:
            # Idempotent for the same status; the sidecar says so when it is not.
            return _protocol.release(self.lease_id, status, detail)
        self._release_tried = True
        self._raise_if_lost()
        return Releasing(self.lease_id, status, detail, self._timeout_s)

    def _raise_if_lost(self) -> None:
        if self._lost is not None:
            raise self._lost

    def _released_as(self, guard: Guard) -> Guard:
        self._released = guard
        return guard

    def _ending(self, error: BaseException | None) -> tuple[RunStatus, str] | None:
        """What leaving the block releases (None: nothing), or the loss it raises."""
        if self._release_tried:
            return None  # the block released (or heard why it could not): a second release would contradict it
        if self._released is None and self._lost is None:
            return _ending(error)
        if self._lost is not None and error is None:
            raise self._lost
        return None

    def _release_failed(self, error: BaseException | None, status: RunStatus, failure: TaskGuardError) -> None:
        """A failed release on leaving: raised if the block succeeded, else a note on the block's own exception."""
        if error is None:
            raise failure
        error.add_note(f"taskguard: releasing {self.task_key} as {status.value} failed: {failure}")


def _ending(error: BaseException | None) -> tuple[RunStatus, str]:
    """How a block ended, as the status and detail of its release."""
    if error is None or (isinstance(error, SystemExit) and error.code in (None, 0)):
        return RunStatus.SUCCEEDED, ""
    text = str(error) or type(error).__name__
    if isinstance(error, asyncio.CancelledError | KeyboardInterrupt | GeneratorExit):
        return RunStatus.CANCELLED, text
    return RunStatus.FAILED, text


def heartbeat() -> pb.HoldRequest:
    return pb.HoldRequest(heartbeat=pb.Heartbeat())


# --- joining ------------------------------------------------------------------------------


def joins(conflict: Conflict, join: bool) -> bool:
    """Whether to wait for the winner: a join has nothing to wait for when the refusal was not ALREADY_RUNNING."""
    return join and conflict.outcome is Outcome.ALREADY_RUNNING


def winner_final(response: pb.HoldResponse | None) -> Guard:
    """The winner's final snapshot from a joined stream's next message (None: the stream ended)."""
    if response is None or response.event != pb.HOLD_EVENT_WINNER_FINISHED:
        raise _errors.protocol_error("the sidecar ended a joined Hold without the winner's final guard")
    return guard_from_pb(response.guard)


def following(refused: Guard) -> WatchPosition:
    """Where to watch the winner's run from after the sidecar went away (a watch resumes by itself)."""
    return WatchPosition(refused.task_key, refused.revision + 1, False, probe=False)


def ends_run(current: Guard, winner: Guard) -> bool:
    """Whether ``current`` shows that the run ``winner`` belongs to no longer holds the guard."""
    if current.task_key != winner.task_key:
        return False
    return current.fencing_token > winner.fencing_token or (
        current.fencing_token == winner.fencing_token and not current.running
    )


class Entering(Generic[_H]):
    """A ``client.hold(...)`` context's bookkeeping: it holds once, and a conflict is raised or handed out."""

    def __init__(self, make: Callable[[], _H], on_conflict: OnConflict) -> None:
        self._make = make
        self.join = on_conflict == "join"
        self._on_conflict = on_conflict
        self.hold: _H | None = None

    def start(self) -> _H:
        if self.hold is not None:
            raise RuntimeError("a hold can be entered once")
        return self._make()

    def entered(self, hold: _H, conflict: Conflict | None) -> _H | Conflict:
        if conflict is None:
            self.hold = hold
            return hold
        if self._on_conflict not in ("return", "join"):
            raise conflict.error()  # a queued hold that did not get its turn, too
        return conflict
