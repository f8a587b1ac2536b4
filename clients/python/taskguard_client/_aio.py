"""The asyncio I/O: a client's grpc.aio channel, its calls with their retries, and watches.

Every decision is ``_protocol``'s; this module only sends, reads and sleeps.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

import grpc
from grpc import aio

from taskguard_client import _errors
from taskguard_client._call import CHANNEL_OPTIONS, metadata
from taskguard_client._errors import StatusError
from taskguard_client._models import GuardEvent
from taskguard_client._protocol import Retrying, Settings, Unary, Watching
from taskguard_client.v1 import taskguard_pb2 as pb
from taskguard_client.v1 import taskguard_pb2_grpc as pb_grpc

_T = TypeVar("_T")


async def retried(attempt: Callable[[], Awaitable[_T]], retrying: Retrying) -> _T:
    """Run ``attempt`` until it succeeds or ``retrying`` gives up; gRPC failures become typed errors."""
    while True:
        try:
            return await attempt()
        except (grpc.RpcError, StatusError) as caught:
            delay = retrying.backoff(caught)
        await asyncio.sleep(delay)


class AsyncClosing:
    """``async with`` for what has ``close()``: leaving the block closes it."""

    async def close(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


class AsyncConnection:
    """An ``AsyncClient``'s channel, made on first use on the loop that uses it, and its calls."""

    def __init__(
        self,
        settings: Settings,
        credentials: grpc.ChannelCredentials | None,
        interceptors: Sequence[aio.ClientInterceptor] | None,
    ) -> None:
        self.settings = settings
        self._credentials = credentials
        self._interceptors = interceptors
        self._channel: aio.Channel | None = None
        self._stub_instance: Any = None

    @property
    def stub(self) -> Any:
        if self._stub_instance is None:
            address, options = self.settings.address, CHANNEL_OPTIONS
            if self._credentials is not None:
                self._channel = aio.secure_channel(
                    address, self._credentials, options=options, interceptors=self._interceptors
                )
            else:
                self._channel = aio.insecure_channel(address, options=options, interceptors=self._interceptors)
            self._stub_instance = pb_grpc.TaskGuardStub(self._channel)
        return self._stub_instance

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return metadata(self.settings.token)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel, self._stub_instance = None, None

    async def send(self, call: Unary[_T]) -> _T:
        """Make a unary call (retried as it says) and hand back what its answer means."""
        settings = self.settings

        async def attempt() -> Any:
            method = getattr(self.stub, call.method)
            timeout_s, ready = call.timeout_s(settings.timeout_s), settings.wait_for_ready
            return await method(call.request, timeout=timeout_s, metadata=self.metadata(), wait_for_ready=ready)

        return call.verdict(await retried(attempt, call.retrying(settings.retry)))


class AsyncWatch(Watching[AsyncConnection], AsyncClosing):
    """Guard events as an async iterator that resumes by itself.

    The first stream is opened after a one-guard ListGuards (retried like any
    read), so an unreachable sidecar fails fast with ``UnavailableError``.
    From then on, when the stream ends (the sidecar restarted or was
    SIGKILLed, drained, or cut off a watcher that fell behind), the watch
    waits for the sidecar with backoff and resumes from the last revision it
    gave + 1, so no revision is given twice or skipped. A start older than the
    sidecar keeps raises ``OutOfRangeError``: re-list and watch again.

    ``close()`` it, or use ``async with``.
    """

    def __aiter__(self) -> AsyncWatch:
        return self

    async def __anext__(self) -> GuardEvent:
        delays = self._connection.settings.retry.delays()
        while not self._closed:
            if (event := self._position.next_event()) is not None:
                return event
            if self._call is None:
                await self._connect()
            try:
                message = await self._call.read()
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if self._closed and not (task and task.cancelling()):
                    break  # close() from another task cancelled the call, not this task
                raise
            except aio.AioRpcError as error:
                self._call = None
                if (failure := _errors.watch_ended(error)) is not None:
                    raise failure from error
                await asyncio.sleep(next(delays))
                continue
            if message is aio.EOF:
                self._call = None
                await asyncio.sleep(next(delays))
                continue
            self._position.arrived(message)
        raise StopAsyncIteration

    async def _connect(self) -> None:
        connection = self._connection
        if (probe := self._position.probe()) is not None:
            await connection.send(probe)
        request: pb.WatchGuardsRequest = self._position.request()
        # Batches: a busy sidecar sends many events a message, which is what lets a watcher keep up.
        self._call = connection.stub.WatchGuardBatches(request, metadata=connection.metadata(), wait_for_ready=True)

    async def aclose(self) -> None:
        await self.close()

    async def close(self) -> None:
        self._closed = True
        if self._call is not None:
            self._call.cancel()
            self._call = None
