"""``with client.hold(...)``: ``_holding``'s state machine driven over a blocking Hold stream, on threads."""

from __future__ import annotations

import concurrent.futures
import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any

import grpc

from taskguard_client import _errors, _holding, _protocol
from taskguard_client._errors import HoldStreamBroke, LeaseLost, StatusError, TaskGuardError
from taskguard_client._holding import Entering, HoldState
from taskguard_client._models import Guard, RunStatus
from taskguard_client._protocol import Conflict, OnConflict, Retrying
from taskguard_client._sync import Connection, Watch, retried
from taskguard_client.v1 import taskguard_pb2 as pb

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
                return _holding.heartbeat()
            if item is _END:
                raise StopIteration
            if isinstance(item, pb.HoldRequest):
                return item


class Hold(HoldState):
    """A guard held over a Hold stream: what ``with client.hold(...)`` gives.

    One thread reads the stream (and resumes it after a sidecar restart);
    gRPC's own request thread sends the heartbeats. The hold's methods may be
    called from any thread.
    """

    def __init__(self, connection: Connection, request: pb.AcquireRequest, ttl_s: float | None) -> None:
        super().__init__(request, ttl_s, connection.settings.timeout_s)
        self._connection = connection
        self._call: Any = None
        self._requests: _Requests | None = None
        self._changed = threading.Condition()
        self._streaming = False
        self._reader: threading.Thread | None = None

    def wait_lost(self, timeout: float | None = None) -> LeaseLost | None:
        """Wait until the guard is taken away (or ``timeout`` seconds passed: None)."""
        with self._changed:
            self._changed.wait_for(lambda: self._lost is not None, timeout)
            return self._lost

    def release(self, status: RunStatus | str = RunStatus.SUCCEEDED, detail: str = "") -> Guard:
        """End the run now (leaving the block then releases nothing); returns the released guard."""
        plan = self._release_plan(status, detail)
        if isinstance(plan, _protocol.Unary):
            return self._connection.send(plan)
        with self._changed:
            self._changed.wait_for(lambda: self._streaming or self._lost is not None, plan.window_s)
            self._raise_if_lost()
            answer: concurrent.futures.Future[Guard] = concurrent.futures.Future()
            self._release_answer = answer
            requests = self._requests
        guard: Guard | None = None
        if requests is not None:
            requests.put(plan.message)
            try:
                guard = answer.result(self._timeout_s)
            except (HoldStreamBroke, concurrent.futures.TimeoutError):
                guard = None
        if guard is None:
            guard = self._connection.send(plan.fallback())
        return self._released_as(guard)

    # --- entering and leaving -----------------------------------------------------------

    def _enter(self, join: bool) -> Conflict | None:
        call, requests, response = self._open(self._acquiring())
        try:
            while self._queued(response):
                response = _next_answer(call)
        except BaseException:
            requests.end()
            call.cancel()
            raise
        conflict = self._entered(response)
        if conflict is None:
            self._attach(call, requests)
            self._reader = threading.Thread(target=self._read, name=f"taskguard-hold {self.task_key}", daemon=True)
            self._reader.start()
            return None
        try:
            if _holding.joins(conflict, join):
                return Conflict(conflict.outcome, self._wait_for_winner(call, conflict.guard), joined=True)
            return conflict
        finally:
            requests.end()
            call.cancel()

    def _exit(self, error: BaseException | None) -> None:
        try:
            if (ending := self._ending(error)) is not None:
                try:
                    self.release(*ending)
                except TaskGuardError as failure:
                    self._release_failed(error, ending[0], failure)
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
            self._reader.join(self._timeout_s)

    def _attach(self, call: Any, requests: _Requests) -> None:
        with self._changed:
            self._call, self._requests, self._streaming = call, requests, True
            self._changed.notify_all()
        if self._heartbeat_s is not None:
            requests.heartbeat_every(self._heartbeat_s)

    # --- the stream ---------------------------------------------------------------------

    def _open(self, first: pb.HoldRequest, deadline: float | None = None) -> tuple[Any, _Requests, pb.HoldResponse]:
        connection, timeout_s = self._connection, self._timeout_s
        wait_for_ready = connection.settings.wait_for_ready or deadline is not None

        def attempt() -> tuple[Any, _Requests, pb.HoldResponse]:
            requests = _Requests(first)
            call = connection.stub.Hold(requests, metadata=connection.metadata(), wait_for_ready=wait_for_ready)
            expired = threading.Event()

            def expire() -> None:
                expired.set()
                call.cancel()

            # The stream has no deadline (it lives as long as the block); only its first answer does.
            timer = threading.Timer(timeout_s, expire)
            timer.daemon = True
            timer.start()
            try:
                response = next(call)
            except StopIteration:
                requests.end()
                raise _errors.unanswered(call.code(), call.details() or "") from None
            except BaseException:
                requests.end()
                call.cancel()
                if expired.is_set():
                    raise _errors.hold_timed_out(timeout_s) from None
                raise
            finally:
                timer.cancel()
            return call, requests, response

        return retried(attempt, Retrying(connection.settings.retry, deadline))

    def _wait_for_winner(self, call: Any, refused: Guard) -> Guard:
        try:
            response = next(call)
        except StopIteration:
            response = None
        except grpc.RpcError as error:
            if not _errors.sidecar_gone(error):
                raise _errors.from_rpc_error(error) from error
            with Watch(self._connection, _holding.following(refused)) as events:
                for event in events:
                    if _holding.ends_run(event.guard, refused):
                        return event.guard
            raise _errors.protocol_error("the watch ended") from error
        return _holding.winner_final(response)

    def _read(self) -> None:
        while True:
            code, message = grpc.StatusCode.OK, ""
            try:
                for response in self._call:
                    self._accepted(response)
            except grpc.RpcError as error:
                code, message = _errors.status_of(error)
            with self._changed:
                self._streaming = False
                ended = self._ended(code, message)
                if self._requests is not None:
                    self._requests.end()
            if isinstance(ended, LeaseLost):
                self._lose_explained(ended)
                return
            if not ended or self._done or not self._resume():
                return

    def _resume(self) -> bool:
        try:
            call, requests, response = self._open(*self._resuming())
        except StatusError as error:
            self._lose_explained(_errors.resume_failed(error))
            return False
        self._resumed(response)
        with self._changed:
            if self._closed:
                requests.end()
                call.cancel()
                return False
        self._attach(call, requests)
        return True

    def _lose_explained(self, error: LeaseLost) -> None:
        current: Guard | None = None
        if error.guard is None:
            try:
                current = self._connection.send(_protocol.get(self.task_key))
            except TaskGuardError:
                current = None
        with self._changed:
            self._lose(error, current)
            self._changed.notify_all()


def _next_answer(call: Any) -> pb.HoldResponse:
    try:
        response = next(call)
    except StopIteration:
        raise _errors.unanswered(call.code(), call.details() or "") from None
    except grpc.RpcError as error:
        raise _errors.from_rpc_error(error) from error
    assert isinstance(response, pb.HoldResponse)
    return response


class HoldContext(AbstractContextManager[Any]):
    """``with client.hold(...)``: acquire on enter, release on exit."""

    def __init__(
        self,
        connection: Connection,
        request: pb.AcquireRequest,
        ttl_s: float | None,
        on_conflict: OnConflict,
        on_queued: Callable[[int, Guard], None] | None = None,
    ) -> None:
        self._entering = Entering(lambda: Hold(connection, request, ttl_s), on_conflict)
        self._on_queued = on_queued

    def __enter__(self) -> Hold | Conflict:
        hold = self._entering.start()
        hold.on_queued = self._on_queued
        return self._entering.entered(hold, hold._enter(self._entering.join))

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if (hold := self._entering.hold) is not None:
            hold._exit(exc)
