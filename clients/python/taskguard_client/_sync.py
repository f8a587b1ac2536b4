"""The blocking I/O: a client's gRPC channel, its calls with their retries, and watches.

Every decision is ``_protocol``'s; this module only sends, reads and sleeps.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

import grpc

from taskguard_client import _errors
from taskguard_client._call import CHANNEL_OPTIONS, metadata
from taskguard_client._errors import StatusError
from taskguard_client._models import GuardEvent
from taskguard_client._protocol import Retrying, Settings, Unary, Watching
from taskguard_client.v1 import taskguard_pb2 as pb
from taskguard_client.v1 import taskguard_pb2_grpc as pb_grpc

_T = TypeVar("_T")


def retried(attempt: Callable[[], _T], retrying: Retrying) -> _T:
    """``_aio.retried`` for the blocking client."""
    while True:
        try:
            return attempt()
        except (grpc.RpcError, StatusError) as caught:
            delay = retrying.backoff(caught)
        time.sleep(delay)


class Closing:
    """``with`` for what has ``close()``: leaving the block closes it."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class Connection:
    """A ``Client``'s channel (made at once; safe to share between threads) and its calls."""

    def __init__(
        self, settings: Settings, credentials: grpc.ChannelCredentials | None, interceptors: Sequence[Any] | None
    ) -> None:
        self.settings = settings
        self._channel = (
            grpc.secure_channel(settings.address, credentials, options=CHANNEL_OPTIONS)
            if credentials is not None
            else grpc.insecure_channel(settings.address, options=CHANNEL_OPTIONS)
        )
        channel = grpc.intercept_channel(self._channel, *interceptors) if interceptors else self._channel
        self.stub: Any = pb_grpc.TaskGuardStub(channel)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return metadata(self.settings.token)

    def close(self) -> None:
        self._channel.close()

    def send(self, call: Unary[_T]) -> _T:
        """Make a unary call (retried as it says) and hand back what its answer means."""
        settings = self.settings

        def attempt() -> Any:
            method = getattr(self.stub, call.method)
            timeout_s, ready = call.timeout_s(settings.timeout_s), settings.wait_for_ready
            return method(call.request, timeout=timeout_s, metadata=self.metadata(), wait_for_ready=ready)

        return call.verdict(retried(attempt, call.retrying(settings.retry)))


class Watch(Watching[Connection], Closing):
    """``AsyncWatch`` as a blocking iterator."""

    def __iter__(self) -> Watch:
        return self

    def __next__(self) -> GuardEvent:
        delays = self._connection.settings.retry.delays()
        while not self._closed:
            if (event := self._position.next_event()) is not None:
                return event
            if self._call is None:
                self._connect()
            try:
                message = next(self._call)
            except StopIteration:
                self._call = None
                time.sleep(next(delays))
                continue
            except grpc.RpcError as error:
                self._call = None
                if self._closed:
                    break
                if (failure := _errors.watch_ended(error)) is not None:
                    raise failure from error
                time.sleep(next(delays))
                continue
            self._position.arrived(message)
        raise StopIteration

    def _connect(self) -> None:
        connection = self._connection
        if (probe := self._position.probe()) is not None:
            connection.send(probe)
        request: pb.WatchGuardsRequest = self._position.request()
        self._call = connection.stub.WatchGuardBatches(request, metadata=connection.metadata(), wait_for_ready=True)

    def close(self) -> None:
        """Stop watching; may be called from another thread to end a blocked iteration."""
        self._closed = True
        call = self._call
        if call is not None:
            call.cancel()
