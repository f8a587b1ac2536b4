"""``async with client.hold(...)``: ``_holding``'s state machine driven over a grpc.aio Hold stream."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any

import grpc
from grpc import aio

from taskguard_client import _errors, _holding, _protocol
from taskguard_client._aio import AsyncConnection, AsyncWatch, retried
from taskguard_client._errors import HoldStreamBroke, LeaseLost, StatusError, TaskGuardError
from taskguard_client._holding import Entering, HoldState
from taskguard_client._models import Guard, RunStatus
from taskguard_client._protocol import Conflict, OnConflict, Retrying
from taskguard_client.v1 import taskguard_pb2 as pb


class AsyncHold(HoldState):
    """A guard held over a Hold stream: what ``async with client.hold(...)`` gives.

    Heartbeats and the stream reader are tasks on the loop that entered the
    block; use the hold only from that loop.
    """

    def __init__(self, connection: AsyncConnection, request: pb.AcquireRequest, ttl_s: float | None) -> None:
        super().__init__(request, ttl_s, connection.settings.timeout_s)
        self._connection = connection
        self._call: Any = None
        self._write_lock = asyncio.Lock()
        self._streaming = asyncio.Event()
        self._lost_event = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    async def wait_lost(self) -> LeaseLost:
        """Wait until the guard is taken away; returns the ``LeaseLost`` that leaving the block will raise."""
        await self._lost_event.wait()
        assert self._lost is not None
        return self._lost

    async def release(self, status: RunStatus | str = RunStatus.SUCCEEDED, detail: str = "") -> Guard:
        """End the run now (leaving the block then releases nothing); returns the released guard."""
        plan = self._release_plan(status, detail)
        if isinstance(plan, _protocol.Unary):
            return await self._connection.send(plan)
        if not self._streaming.is_set():
            await _first_of((self._streaming, self._lost_event), plan.window_s)
        self._raise_if_lost()
        answer: asyncio.Future[Guard] = asyncio.get_running_loop().create_future()
        self._release_answer = answer
        guard: Guard | None = None
        try:
            if await self._write(plan.message):
                guard = await asyncio.wait_for(asyncio.shield(answer), self._timeout_s)
        except (HoldStreamBroke, TimeoutError):
            guard = None
        finally:
            if not answer.done():
                answer.cancel()
            elif not answer.cancelled():
                answer.exception()  # retrieved: asyncio would log an unretrieved exception
        if guard is None:
            guard = await self._connection.send(plan.fallback())
        return self._released_as(guard)

    # --- entering and leaving -----------------------------------------------------------

    async def _enter(self, join: bool) -> Conflict | None:
        call, response = await self._open(self._acquiring())
        try:
            while self._queued(response):
                response = await _next_answer(call)
        except BaseException:
            call.cancel()
            raise
        conflict = self._entered(response)
        if conflict is None:
            self._call = call
            self._streaming.set()
            self._spawn(self._read())
            if self._heartbeat_s is not None:
                self._spawn(self._heartbeats(self._heartbeat_s))
            return None
        try:
            if _holding.joins(conflict, join):
                return Conflict(conflict.outcome, await self._wait_for_winner(call, conflict.guard), joined=True)
            return conflict
        finally:
            call.cancel()

    async def _exit(self, error: BaseException | None) -> None:
        try:
            if (ending := self._ending(error)) is not None:
                try:
                    await self.release(*ending)
                except TaskGuardError as failure:
                    self._release_failed(error, ending[0], failure)
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
        connection, timeout_s = self._connection, self._timeout_s
        # A resume waits for the sidecar to come back; a first acquisition fails fast unless told otherwise.
        wait_for_ready = connection.settings.wait_for_ready or deadline is not None

        async def attempt() -> tuple[Any, pb.HoldResponse]:
            call = connection.stub.Hold(metadata=connection.metadata(), wait_for_ready=wait_for_ready)
            try:
                return call, await asyncio.wait_for(_first_answer(call, first), timeout_s)
            except TimeoutError:
                call.cancel()
                raise _errors.hold_timed_out(timeout_s) from None
            except BaseException:
                call.cancel()
                raise

        return await retried(attempt, Retrying(connection.settings.retry, deadline))

    async def _wait_for_winner(self, call: Any, refused: Guard) -> Guard:
        try:
            response = await call.read()
        except aio.AioRpcError as error:
            if not _errors.sidecar_gone(error):
                raise _errors.from_rpc_error(error) from error
            async with AsyncWatch(self._connection, _holding.following(refused)) as events:
                async for event in events:
                    if _holding.ends_run(event.guard, refused):
                        return event.guard
            raise _errors.protocol_error("the watch ended") from error
        return _holding.winner_final(None if response is aio.EOF else response)

    async def _read(self) -> None:
        while True:
            code, message = grpc.StatusCode.OK, ""
            try:
                while (response := await self._call.read()) is not aio.EOF:
                    self._accepted(response)
            except aio.AioRpcError as error:
                code, message = _errors.status_of(error)
            self._streaming.clear()
            ended = self._ended(code, message)
            if isinstance(ended, LeaseLost):
                await self._lose_explained(ended)
                return
            if not ended or self._done or not await self._resume():
                return

    async def _resume(self) -> bool:
        try:
            self._call, response = await self._open(*self._resuming())
        except StatusError as error:
            await self._lose_explained(_errors.resume_failed(error))
            return False
        self._resumed(response)
        self._streaming.set()
        return True

    async def _lose_explained(self, error: LeaseLost) -> None:
        current: Guard | None = None
        if error.guard is None:
            try:
                current = await self._connection.send(_protocol.get(self.task_key))
            except TaskGuardError:
                current = None
        self._lose(error, current)
        self._lost_event.set()

    async def _heartbeats(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            await self._streaming.wait()
            await self._write(_holding.heartbeat())

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
        raise _errors.unanswered(await call.code(), await call.details() or "")
    assert isinstance(response, pb.HoldResponse)
    return response


async def _next_answer(call: Any) -> pb.HoldResponse:
    try:
        response = await call.read()
    except aio.AioRpcError as error:
        raise _errors.from_rpc_error(error) from error
    if response is aio.EOF:
        raise _errors.unanswered(await call.code(), await call.details() or "")
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
        self,
        connection: AsyncConnection,
        request: pb.AcquireRequest,
        ttl_s: float | None,
        on_conflict: OnConflict,
        on_queued: Callable[[int, Guard], None] | None = None,
    ) -> None:
        self._entering = Entering(lambda: AsyncHold(connection, request, ttl_s), on_conflict)
        self._on_queued = on_queued

    async def __aenter__(self) -> AsyncHold | Conflict:
        hold = self._entering.start()
        hold.on_queued = self._on_queued
        return self._entering.entered(hold, await hold._enter(self._entering.join))

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if (hold := self._entering.hold) is not None:
            await hold._exit(exc)
