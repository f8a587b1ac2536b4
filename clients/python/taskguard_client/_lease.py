"""Leases: what an acquisition gives, and guards held over a Hold stream.

Theory of operation
-------------------
``client.hold(...)`` is a context manager over one Hold stream. Entering it
sends ``acquire`` (retried on UNAVAILABLE with the same run_id, which the
sidecar answers with the same lease) and reads the answer:

* ACQUIRED: the block runs while the stream holds the guard. With a ttl,
  heartbeats go out every ttl/3. Leaving the block releases the run:
  SUCCEEDED, FAILED with the exception's text, or CANCELLED when the block
  was cancelled (``asyncio.CancelledError``, ``KeyboardInterrupt``).
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
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import re
import threading
import time
from collections.abc import Coroutine, Iterator
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

import grpc
from grpc import aio

from taskguard_client import _errors
from taskguard_client._call import RESUME_WINDOW_S, retry_async, retry_sync
from taskguard_client._errors import AlreadyRunning, LeaseLost, RetryRequiresApproval, StatusError, TaskGuardError
from taskguard_client._models import (
    Guard,
    Outcome,
    RunStatus,
    guard_from_pb,
    outcome_from_pb,
    run_status,
    run_status_pb,
)
from taskguard_client.v1 import taskguard_pb2 as pb

if TYPE_CHECKING:
    from taskguard_client._client import AsyncClient, Client

OnConflict = Literal["raise", "return", "join"]

# The sidecar keeps at most this much of a release's detail.
MAX_DETAIL_BYTES = 4096
# The sidecar refuses these in a detail (C0, DEL, C1): a terminal would act on them.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_LINE_BREAKS = re.compile(r"[\t\n\v\f\r]+")


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


@dataclass(frozen=True, slots=True)
class Conflict:
    """A refused acquisition (``on_conflict="return"`` or ``"join"``): the run in the way.

    ``guard`` is the winner's snapshot (``outcome`` ALREADY_RUNNING) or the
    failed run's (RETRY_REQUIRES_APPROVAL). After a join (``joined``) it is
    the winner's final snapshot: its ``state`` says how that run ended.
    """

    outcome: Outcome
    guard: Guard
    joined: bool = False

    @property
    def task_key(self) -> str:
        return self.guard.task_key

    @property
    def run_id(self) -> str:
        return self.guard.run_id

    @property
    def holder(self) -> str:
        return self.guard.holder

    @property
    def started_at(self) -> datetime:
        return self.guard.started_at

    @property
    def fencing_token(self) -> int:
        return self.guard.fencing_token

    def error(self) -> AlreadyRunning | RetryRequiresApproval:
        """The exception ``on_conflict="raise"`` would have raised."""
        return _errors.conflict(self.outcome, self.guard)


def acquired(outcome_value: int, guard_message: pb.Guard, lease_id: str, on_conflict: OnConflict) -> Lease | Conflict:
    """An acquisition's answer as a Lease, a Conflict, or (``on_conflict="raise"``) an exception."""
    guard = guard_from_pb(guard_message)
    outcome = outcome_from_pb(outcome_value)
    if outcome is Outcome.ACQUIRED:
        return _lease(lease_id, guard)
    if on_conflict == "raise":
        raise _errors.conflict(outcome, guard)
    return Conflict(outcome, guard)


def _lease(lease_id: str, guard: Guard) -> Lease:
    return Lease(guard.task_key, guard.run_id, lease_id, guard.fencing_token, guard.started_at, guard.expires_at, guard)


def _ending(error: BaseException | None) -> tuple[RunStatus, str]:
    """How a block ended, as the status and detail of its release."""
    if error is None or (isinstance(error, SystemExit) and error.code in (None, 0)):
        return RunStatus.SUCCEEDED, ""
    text = str(error) or type(error).__name__
    if isinstance(error, asyncio.CancelledError | KeyboardInterrupt | GeneratorExit):
        return RunStatus.CANCELLED, text
    return RunStatus.FAILED, text


def fit_detail(detail: str) -> str:
    """Make a detail what the sidecar accepts: no control characters (line breaks become spaces, the
    rest ``\\xNN``), then cut on a character boundary. An exception's text must not make its release fail."""
    detail = _CONTROL.sub(lambda match: f"\\x{ord(match.group()):02x}", _LINE_BREAKS.sub(" ", detail))
    encoded = detail.encode("utf-8", "surrogatepass")
    if len(encoded) <= MAX_DETAIL_BYTES:
        return detail
    return encoded[: MAX_DETAIL_BYTES - 3].decode("utf-8", "ignore") + "..."


def _ends_run(current: Guard, winner: Guard) -> bool:
    """Whether ``current`` shows that the run ``winner`` belongs to no longer holds the guard."""
    if current.task_key != winner.task_key:
        return False
    return current.fencing_token > winner.fencing_token or (
        current.fencing_token == winner.fencing_token and not current.running
    )


def _loss(guard: Guard | None) -> str:
    if guard is None:
        return "lease lost"
    if guard.released_by:
        return f"lease lost: the guard was force-released by {guard.released_by}: {guard.last_detail}"
    return f"lease lost: the guard is {guard.state.value}: {guard.last_detail}"


class _StreamBroke(Exception):
    """A release's stream ended before its answer; the release is repeated as a unary call."""


class _HoldState:
    """What both holds know about their lease, and how they read the stream's messages."""

    def __init__(self) -> None:
        self._lease: Lease | None = None
        self._guard: Guard | None = None
        self._lost: LeaseLost | None = None
        self._lost_guard: Guard | None = None
        self._released: Guard | None = None
        # Set once the block called release(): leaving the block then adds nothing, whatever its outcome.
        self._release_tried = False
        self._closed = False

    @property
    def lease(self) -> Lease:
        if self._lease is None:
            raise RuntimeError("the hold has not acquired its guard")
        return self._lease

    @property
    def task_key(self) -> str:
        return self.lease.task_key

    @property
    def run_id(self) -> str:
        return self.lease.run_id

    @property
    def lease_id(self) -> str:
        return self.lease.lease_id

    @property
    def fencing_token(self) -> int:
        return self.lease.fencing_token

    @property
    def started_at(self) -> datetime:
        return self.lease.started_at

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

    def _accepted(self, response: pb.HoldResponse) -> Guard | None:
        """Take in one message after the first; returns the guard of a RELEASED answer."""
        guard = guard_from_pb(response.guard) if response.HasField("guard") else None
        if guard is not None:
            self._guard = guard
        if response.event == pb.HOLD_EVENT_LOST:
            self._lost_guard = guard
        elif response.event == pb.HOLD_EVENT_RELEASED and guard is not None:
            self._released = guard
            return guard
        return None

    def _verdict(self, code: grpc.StatusCode, message: str, releasing: bool) -> LeaseLost | _StreamBroke | None:
        """After the stream ended: the loss, a broken release, or None to resume (or when all is done)."""
        if self._released is not None or self._closed:
            return None
        if self._lost_guard is not None or code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND):
            return _errors.lease_lost(message or _loss(self._lost_guard), self._lost_guard)
        if releasing:
            return _StreamBroke(f"{code.name}: {message}")
        if code is grpc.StatusCode.UNAVAILABLE:
            return None
        return _errors.lease_lost(
            f"lease lost: the Hold stream ended ({code.name}: {message or 'no message'}) and the sidecar abandons"
            " a run whose stream ends",
            None,
        )

    def _resume_failed(self, error: StatusError) -> LeaseLost:
        if isinstance(error, LeaseLost):
            return error
        return _errors.lease_lost(f"lease lost: could not resume it after the sidecar went away: {error}", None)

    def _explained(self, error: LeaseLost, current: Guard | None) -> LeaseLost:
        """Attach the run's final snapshot when the stream brought none.

        The sidecar sends LOST with the snapshot before ending the stream, but a
        heartbeat that races the loss is answered with the bare status instead.
        """
        if error.guard is None and current is not None and current.fencing_token == self.fencing_token:
            error.guard = self._guard = current
        return error


# --- asyncio ----------------------------------------------------------------------------


class AsyncHold(_HoldState):
    """A guard held over a Hold stream: what ``async with client.hold(...)`` gives.

    Heartbeats and the stream reader are tasks on the loop that entered the
    block; use the hold only from that loop.
    """

    def __init__(self, client: AsyncClient, request: pb.AcquireRequest, ttl_s: float | None) -> None:
        super().__init__()
        self._client = client
        self._request = request
        self._ttl_s = ttl_s
        self._call: Any = None
        self._write_lock = asyncio.Lock()
        self._streaming = asyncio.Event()
        self._lost_event = asyncio.Event()
        self._release_answer: asyncio.Future[Guard] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def wait_lost(self) -> LeaseLost:
        """Wait until the guard is taken away; returns the ``LeaseLost`` that leaving the block will raise."""
        await self._lost_event.wait()
        assert self._lost is not None
        return self._lost

    async def release(self, status: RunStatus | str = RunStatus.SUCCEEDED, detail: str = "") -> Guard:
        """End the run now (leaving the block then releases nothing); returns the released guard."""
        status, detail = run_status(status), fit_detail(detail)
        if self._released is not None:
            # Idempotent for the same status; the sidecar says so when it is not.
            return await self._client.release(self.lease_id, status, detail)
        self._release_tried = True
        if self._lost is not None:
            raise self._lost
        window_s = RESUME_WINDOW_S + self._client._timeout_s
        if not self._streaming.is_set():
            await _first_of((self._streaming, self._lost_event), window_s)
        if self._lost is not None:
            raise self._lost
        answer: asyncio.Future[Guard] = asyncio.get_running_loop().create_future()
        self._release_answer = answer
        request = pb.HoldRequest(release=pb.HoldRelease(status=run_status_pb(status), detail=detail))
        guard: Guard | None = None
        try:
            if await self._write(request):
                guard = await asyncio.wait_for(asyncio.shield(answer), self._client._timeout_s)
        except (_StreamBroke, TimeoutError):
            guard = None
        finally:
            if not answer.done():
                answer.cancel()
            elif not answer.cancelled():
                answer.exception()  # retrieved: asyncio would log an unretrieved exception
        if guard is None:
            guard = await self._client._release(self.lease_id, status, detail, time.monotonic() + window_s)
        self._released = guard
        return guard

    # --- entering and leaving -----------------------------------------------------------

    async def _enter(self, join: bool) -> Conflict | None:
        call, response = await self._open(pb.HoldRequest(acquire=self._request))
        guard = guard_from_pb(response.guard)
        outcome = outcome_from_pb(response.outcome)
        if outcome is Outcome.ACQUIRED:
            self._lease, self._guard, self._call = _lease(response.lease_id, guard), guard, call
            self._streaming.set()
            self._spawn(self._read())
            if self._ttl_s is not None:
                self._spawn(self._heartbeats(self._ttl_s / 3))
            return None
        try:
            if join and outcome is Outcome.ALREADY_RUNNING:
                return Conflict(outcome, await self._wait_for_winner(call, guard), joined=True)
            return Conflict(outcome, guard)
        finally:
            call.cancel()

    async def _exit(self, error: BaseException | None) -> None:
        try:
            if self._release_tried:
                pass  # the block released (or heard why it could not): a second release would contradict it
            elif self._released is None and self._lost is None:
                status, detail = _ending(error)
                try:
                    await self.release(status, detail)
                except TaskGuardError as failure:
                    if error is None:
                        raise
                    error.add_note(f"taskguard: releasing {self.task_key} as {status.value} failed: {failure}")
            elif self._lost is not None and error is None:
                raise self._lost
        finally:
            await self._close()

    async def _close(self) -> None:
        self._closed = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._call is not None:
            self._call.cancel()

    # --- the stream ---------------------------------------------------------------------

    async def _open(self, first: pb.HoldRequest, deadline: float | None = None) -> tuple[Any, pb.HoldResponse]:
        """A new Hold stream and the answer to its first message (retried on UNAVAILABLE)."""
        client = self._client
        # A resume waits for the sidecar to come back; a first acquisition fails fast unless told otherwise.
        wait_for_ready = client._wait_for_ready or deadline is not None

        async def attempt() -> tuple[Any, pb.HoldResponse]:
            call = client._stub.Hold(metadata=client._metadata(), wait_for_ready=wait_for_ready)
            try:
                return call, await asyncio.wait_for(_first_answer(call, first), client._timeout_s)
            except TimeoutError:
                call.cancel()
                raise _errors.deadline_exceeded(
                    f"the sidecar did not answer the Hold within {client._timeout_s:g}s"
                ) from None
            except BaseException:
                call.cancel()
                raise

        return await retry_async(attempt, client._retry, deadline)

    async def _wait_for_winner(self, call: Any, refused: Guard) -> Guard:
        try:
            response = await call.read()
        except aio.AioRpcError as error:
            if error.code() is not grpc.StatusCode.UNAVAILABLE:
                raise _errors.from_rpc_error(error) from error
            # The sidecar went away: follow the winner's run in the event log, which a watch resumes by itself.
            async with self._client._follow(refused.task_key, refused.revision + 1) as events:
                async for event in events:
                    if _ends_run(event.guard, refused):
                        return event.guard
            raise _errors.protocol_error("the watch ended") from error
        if response is aio.EOF or response.event != pb.HOLD_EVENT_WINNER_FINISHED:
            raise _errors.protocol_error("the sidecar ended a joined Hold without the winner's final guard")
        return guard_from_pb(response.guard)

    async def _read(self) -> None:
        while True:
            code, message = grpc.StatusCode.OK, ""
            try:
                while (response := await self._call.read()) is not aio.EOF:
                    answered = self._accepted(response)
                    if answered is not None and self._release_answer and not self._release_answer.done():
                        self._release_answer.set_result(answered)
            except aio.AioRpcError as error:
                code, message = error.code(), error.details() or ""
            self._streaming.clear()
            releasing = self._release_answer is not None and not self._release_answer.done()
            verdict = self._verdict(code, message, releasing)
            if isinstance(verdict, _StreamBroke):
                assert self._release_answer is not None
                self._release_answer.set_exception(verdict)
                return
            if isinstance(verdict, LeaseLost):
                await self._lose(verdict)
                return
            if self._released is not None or self._closed or not await self._resume():
                return

    async def _resume(self) -> bool:
        first = pb.HoldRequest(resume=pb.ResumeRequest(lease_id=self.lease_id))
        try:
            self._call, response = await self._open(first, time.monotonic() + RESUME_WINDOW_S)
        except StatusError as error:
            await self._lose(self._resume_failed(error))
            return False
        self._guard = guard_from_pb(response.guard)
        self._streaming.set()
        return True

    async def _lose(self, error: LeaseLost) -> None:
        if error.guard is None:
            try:
                current: Guard | None = await self._client.get(self.task_key)
            except TaskGuardError:
                current = None
            error = self._explained(error, current)
        self._lost = error
        self._lost_event.set()
        if self._release_answer is not None and not self._release_answer.done():
            self._release_answer.set_exception(error)

    async def _heartbeats(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            await self._streaming.wait()
            await self._write(pb.HoldRequest(heartbeat=pb.Heartbeat()))

    async def _write(self, request: pb.HoldRequest) -> bool:
        """Send on the current stream; False when it has ended (the reader deals with that)."""
        async with self._write_lock:
            try:
                await self._call.write(request)
            except (aio.AioRpcError, asyncio.InvalidStateError):
                return False
            return True

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(work)
        self._tasks.add(task)


async def _first_answer(call: Any, first: pb.HoldRequest) -> pb.HoldResponse:
    await call.write(first)
    response = await call.read()
    if response is aio.EOF:
        code = await call.code()
        if code is grpc.StatusCode.OK:
            raise _errors.protocol_error("the sidecar ended the Hold stream without an answer")
        raise _errors.from_status(code, await call.details() or "")
    assert isinstance(response, pb.HoldResponse)
    return response


async def _first_of(events: tuple[asyncio.Event, ...], timeout_s: float) -> None:
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


class AsyncHoldContext(AbstractAsyncContextManager[Any]):
    """``async with client.hold(...)``: acquire on enter, release on exit."""

    def __init__(
        self, client: AsyncClient, request: pb.AcquireRequest, ttl_s: float | None, on_conflict: OnConflict
    ) -> None:
        self._client = client
        self._request = request
        self._ttl_s = ttl_s
        self._on_conflict = on_conflict
        self._hold: AsyncHold | None = None

    async def __aenter__(self) -> AsyncHold | Conflict:
        if self._hold is not None:
            raise RuntimeError("a hold can be entered once")
        hold = AsyncHold(self._client, self._request, self._ttl_s)
        conflict = await hold._enter(join=self._on_conflict == "join")
        if conflict is not None:
            if self._on_conflict == "raise":
                raise conflict.error()
            return conflict
        self._hold = hold
        return hold

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._hold is not None:
            await self._hold._exit(exc)


# --- threads ----------------------------------------------------------------------------

_END = object()
_WAKE = object()


class _Requests:
    """The request side of one blocking Hold stream, which gRPC pulls on a thread of its own.

    Once the lease is held it sends a heartbeat whenever nothing else was sent
    for ``heartbeat_s``, so heartbeats need no thread of their own.
    """

    def __init__(self, first: pb.HoldRequest) -> None:
        self._queue: queue.Queue[object] = queue.Queue()
        self._queue.put(first)
        self._heartbeat_s: float | None = None

    def heartbeat_every(self, interval_s: float) -> None:
        self._heartbeat_s = interval_s
        self._queue.put(_WAKE)

    def put(self, request: pb.HoldRequest) -> None:
        self._queue.put(request)

    def end(self) -> None:
        self._queue.put(_END)

    def __iter__(self) -> Iterator[pb.HoldRequest]:
        return self

    def __next__(self) -> pb.HoldRequest:
        while True:
            try:
                item = self._queue.get(timeout=self._heartbeat_s)
            except queue.Empty:
                return pb.HoldRequest(heartbeat=pb.Heartbeat())
            if item is _END:
                raise StopIteration
            if isinstance(item, pb.HoldRequest):
                return item


class Hold(_HoldState):
    """A guard held over a Hold stream: what ``with client.hold(...)`` gives.

    One thread reads the stream (and resumes it after a sidecar restart);
    gRPC's own request thread sends the heartbeats. The hold's methods may be
    called from any thread.
    """

    def __init__(self, client: Client, request: pb.AcquireRequest, ttl_s: float | None) -> None:
        super().__init__()
        self._client = client
        self._request = request
        self._ttl_s = ttl_s
        self._call: Any = None
        self._requests: _Requests | None = None
        self._changed = threading.Condition()
        self._streaming = False
        self._release_answer: concurrent.futures.Future[Guard] | None = None
        self._reader: threading.Thread | None = None

    def wait_lost(self, timeout: float | None = None) -> LeaseLost | None:
        """Wait until the guard is taken away (or ``timeout`` seconds passed: None)."""
        with self._changed:
            self._changed.wait_for(lambda: self._lost is not None, timeout)
            return self._lost

    def release(self, status: RunStatus | str = RunStatus.SUCCEEDED, detail: str = "") -> Guard:
        """End the run now (leaving the block then releases nothing); returns the released guard."""
        status, detail = run_status(status), fit_detail(detail)
        if self._released is not None:
            return self._client.release(self.lease_id, status, detail)
        self._release_tried = True
        window_s = RESUME_WINDOW_S + self._client._timeout_s
        with self._changed:
            self._changed.wait_for(lambda: self._streaming or self._lost is not None, window_s)
            if self._lost is not None:
                raise self._lost
            answer: concurrent.futures.Future[Guard] = concurrent.futures.Future()
            self._release_answer = answer
            requests = self._requests
        guard: Guard | None = None
        if requests is not None:
            requests.put(pb.HoldRequest(release=pb.HoldRelease(status=run_status_pb(status), detail=detail)))
            try:
                guard = answer.result(self._client._timeout_s)
            except (_StreamBroke, concurrent.futures.TimeoutError):
                guard = None
        if guard is None:
            guard = self._client._release(self.lease_id, status, detail, time.monotonic() + window_s)
        self._released = guard
        return guard

    # --- entering and leaving -----------------------------------------------------------

    def _enter(self, join: bool) -> Conflict | None:
        call, requests, response = self._open(pb.HoldRequest(acquire=self._request))
        guard = guard_from_pb(response.guard)
        outcome = outcome_from_pb(response.outcome)
        if outcome is Outcome.ACQUIRED:
            self._lease, self._guard = _lease(response.lease_id, guard), guard
            self._attach(call, requests)
            self._reader = threading.Thread(target=self._read, name=f"taskguard-hold {guard.task_key}", daemon=True)
            self._reader.start()
            return None
        try:
            if join and outcome is Outcome.ALREADY_RUNNING:
                return Conflict(outcome, self._wait_for_winner(call, guard), joined=True)
            return Conflict(outcome, guard)
        finally:
            requests.end()
            call.cancel()

    def _exit(self, error: BaseException | None) -> None:
        try:
            if self._release_tried:
                pass  # the block released (or heard why it could not): a second release would contradict it
            elif self._released is None and self._lost is None:
                status, detail = _ending(error)
                try:
                    self.release(status, detail)
                except TaskGuardError as failure:
                    if error is None:
                        raise
                    error.add_note(f"taskguard: releasing {self.task_key} as {status.value} failed: {failure}")
            elif self._lost is not None and error is None:
                raise self._lost
        finally:
            self._close()

    def _close(self) -> None:
        with self._changed:
            self._closed = True
            call, requests = self._call, self._requests
        if requests is not None:
            requests.end()
        if call is not None:
            call.cancel()
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(self._client._timeout_s)

    def _attach(self, call: Any, requests: _Requests) -> None:
        with self._changed:
            self._call, self._requests, self._streaming = call, requests, True
            self._changed.notify_all()
        if self._ttl_s is not None:
            requests.heartbeat_every(self._ttl_s / 3)

    # --- the stream ---------------------------------------------------------------------

    def _open(self, first: pb.HoldRequest, deadline: float | None = None) -> tuple[Any, _Requests, pb.HoldResponse]:
        client = self._client
        wait_for_ready = client._wait_for_ready or deadline is not None

        def attempt() -> tuple[Any, _Requests, pb.HoldResponse]:
            requests = _Requests(first)
            call = client._stub.Hold(requests, metadata=client._metadata(), wait_for_ready=wait_for_ready)
            expired = threading.Event()

            def expire() -> None:
                expired.set()
                call.cancel()

            # The stream has no deadline (it lives as long as the block); only its first answer does.
            timer = threading.Timer(client._timeout_s, expire)
            timer.daemon = True
            timer.start()
            try:
                response = next(call)
            except StopIteration:
                requests.end()
                raise _status_of_ended(call) from None
            except BaseException:
                requests.end()
                call.cancel()
                if expired.is_set():
                    raise _errors.deadline_exceeded(
                        f"the sidecar did not answer the Hold within {client._timeout_s:g}s"
                    ) from None
                raise
            finally:
                timer.cancel()
            return call, requests, response

        return retry_sync(attempt, client._retry, deadline)

    def _wait_for_winner(self, call: Any, refused: Guard) -> Guard:
        try:
            response = next(call)
        except StopIteration:
            raise _errors.protocol_error("the sidecar ended a joined Hold without the winner's final guard") from None
        except grpc.RpcError as error:
            code, _ = _errors.status_of(error)
            if code is not grpc.StatusCode.UNAVAILABLE:
                raise _errors.from_rpc_error(error) from error
            with self._client._follow(refused.task_key, refused.revision + 1) as events:
                for event in events:
                    if _ends_run(event.guard, refused):
                        return event.guard
            raise _errors.protocol_error("the watch ended") from error
        if response.event != pb.HOLD_EVENT_WINNER_FINISHED:
            raise _errors.protocol_error("the sidecar ended a joined Hold without the winner's final guard")
        return guard_from_pb(response.guard)

    def _read(self) -> None:
        while True:
            code, message = grpc.StatusCode.OK, ""
            try:
                for response in self._call:
                    answered = self._accepted(response)
                    answer = self._release_answer
                    if answered is not None and answer is not None and not answer.done():
                        answer.set_result(answered)
            except grpc.RpcError as error:
                code, message = _errors.status_of(error)
            with self._changed:
                self._streaming = False
                answer = self._release_answer
                releasing = answer is not None and not answer.done()
                verdict = self._verdict(code, message, releasing)
                if self._requests is not None:
                    self._requests.end()
            if isinstance(verdict, _StreamBroke):
                assert answer is not None
                answer.set_exception(verdict)
                return
            if isinstance(verdict, LeaseLost):
                self._lose(verdict)
                return
            if self._released is not None or self._closed or not self._resume():
                return

    def _resume(self) -> bool:
        first = pb.HoldRequest(resume=pb.ResumeRequest(lease_id=self.lease_id))
        try:
            call, requests, response = self._open(first, time.monotonic() + RESUME_WINDOW_S)
        except StatusError as error:
            self._lose(self._resume_failed(error))
            return False
        self._guard = guard_from_pb(response.guard)
        with self._changed:
            if self._closed:
                requests.end()
                call.cancel()
                return False
        self._attach(call, requests)
        return True

    def _lose(self, error: LeaseLost) -> None:
        if error.guard is None:
            try:
                current: Guard | None = self._client.get(self.task_key)
            except TaskGuardError:
                current = None
            error = self._explained(error, current)
        with self._changed:
            self._lost = error
            answer = self._release_answer
            self._changed.notify_all()
        if answer is not None and not answer.done():
            answer.set_exception(error)


def _status_of_ended(call: Any) -> StatusError:
    code: grpc.StatusCode = call.code()
    if code is grpc.StatusCode.OK:
        return _errors.protocol_error("the sidecar ended the Hold stream without an answer")
    return _errors.from_status(code, call.details() or "")


class HoldContext(AbstractContextManager[Any]):
    """``with client.hold(...)``: acquire on enter, release on exit."""

    def __init__(
        self, client: Client, request: pb.AcquireRequest, ttl_s: float | None, on_conflict: OnConflict
    ) -> None:
        self._client = client
        self._request = request
        self._ttl_s = ttl_s
        self._on_conflict = on_conflict
        self._hold: Hold | None = None

    def __enter__(self) -> Hold | Conflict:
        if self._hold is not None:
            raise RuntimeError("a hold can be entered once")
        hold = Hold(self._client, self._request, self._ttl_s)
        conflict = hold._enter(join=self._on_conflict == "join")
        if conflict is not None:
            if self._on_conflict == "raise":
                raise conflict.error()
            return conflict
        self._hold = hold
        return hold

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._hold is not None:
            self._hold._exit(exc)
