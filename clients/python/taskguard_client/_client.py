"""``AsyncClient`` and ``Client``: the same methods over grpc.aio and over blocking gRPC.

Every unary call has a deadline (``timeout``). A Hold stream has one for its
first answer only and then lives as long as its block; a watch lives until it
is closed. Every call carries the caller's OpenTelemetry context when there
is one. Calls that are safe to repeat are retried on UNAVAILABLE
with exponential backoff and jitter (``RetryPolicy``):

* ``acquire`` and ``hold``: the run_id is made (uuid4) before the first
  attempt and sent with every attempt, and the sidecar answers the run that
  holds the guard with its own lease, so a retry never starts a second run
  (it hands the lease back only to the caller that made the run: the same uid
  or certificate, or where it cannot tell, the same ``retry_secret``, which
  this process derives from the key and run_id);
* ``renew`` (it only moves a deadline) and ``release`` (idempotent for the same
  status);
* the reads: ``get``, ``list``, ``check_fence``, and ``watch``, which resumes
  from the last revision it gave by itself.

``approve_retry`` and ``force_release`` are not retried: a repeat after a lost
answer would be refused, and an operator is there to look.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from datetime import timedelta
from typing import Any, Generic, Literal, TypeVar, overload

import grpc
from grpc import aio

from taskguard_client import _protocol
from taskguard_client._aio import AsyncClosing, AsyncConnection, AsyncWatch
from taskguard_client._aio_hold import AsyncHold, AsyncHoldContext
from taskguard_client._call import check_default_socket, default_address, default_holder
from taskguard_client._models import Guard, GuardState, Lease, RunStatus, seconds
from taskguard_client._protocol import (
    DEFAULT_PAGE_SIZE,
    DEFAULT_TIMEOUT_S,
    Conflict,
    OnConflict,
    Pages,
    RetryPolicy,
    Settings,
    WatchPosition,
    acquire_request,
)
from taskguard_client._sync import Closing, Connection, Watch
from taskguard_client._sync_hold import Hold, HoldContext
from taskguard_client.v1 import taskguard_pb2 as pb

_Interceptor = TypeVar("_Interceptor")
_Connection = TypeVar("_Connection")
# What ``hold`` gives: a context manager of the hold (or, with on_conflict "return"/"join", of either).
_Held = TypeVar("_Held")
_HeldOrConflict = TypeVar("_HeldOrConflict")


def _ttl_s(ttl: float | timedelta | None) -> float | None:
    return seconds(ttl) if ttl is not None else None


class _Clients(Generic[_Interceptor, _Connection, _Held, _HeldOrConflict]):
    """What both clients share: the constructor, the holder an acquisition names, and ``hold``."""

    def __init__(
        self,
        address: str | None = None,
        *,
        timeout: float | timedelta = DEFAULT_TIMEOUT_S,
        retry: RetryPolicy | None = None,
        wait_for_ready: bool = False,
        holder: str | None = None,
        token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        interceptors: Sequence[_Interceptor] | None = None,
    ) -> None:
        self.address = address or default_address()
        check_default_socket(self.address)
        settings = Settings(self.address, seconds(timeout), retry or RetryPolicy(), wait_for_ready, token)
        self._holder = default_holder() if holder is None else holder
        self._connection = self._connect(settings, credentials, interceptors)

    # The I/O twin (AsyncConnection or Connection) that makes this client's calls.
    _connect: Callable[[Settings, grpc.ChannelCredentials | None, Sequence[_Interceptor] | None], _Connection]

    def _holder_or(self, holder: str | None) -> str:
        return self._holder if holder is None else holder

    # How a hold is entered: AsyncHoldContext (``async with``) or HoldContext (``with``).
    _hold_context: Callable[
        [_Connection, pb.AcquireRequest, float | None, OnConflict, Callable[[int, Guard], None] | None],
        _HeldOrConflict,
    ]

    @overload
    def hold(
        self,
        task_key: str,
        run_id: str | None = None,
        ttl: float | timedelta | None = None,
        labels: Mapping[str, str] | None = None,
        holder: str | None = None,
        on_conflict: Literal["raise", "queue", "keep-newest", "supersede"] = "raise",
        *,
        max_wait: float | timedelta | None = None,
        on_queued: Callable[[int, Guard], None] | None = None,
    ) -> _Held: ...

    @overload
    def hold(
        self,
        task_key: str,
        run_id: str | None = None,
        ttl: float | timedelta | None = None,
        labels: Mapping[str, str] | None = None,
        holder: str | None = None,
        *,
        on_conflict: Literal["return", "join"],
        max_wait: float | timedelta | None = None,
        on_queued: Callable[[int, Guard], None] | None = None,
    ) -> _HeldOrConflict: ...

    def hold(
        self,
        task_key: str,
        run_id: str | None = None,
        ttl: float | timedelta | None = None,
        labels: Mapping[str, str] | None = None,
        holder: str | None = None,
        on_conflict: OnConflict = "raise",
        *,
        max_wait: float | timedelta | None = None,
        on_queued: Callable[[int, Guard], None] | None = None,
    ) -> _Held | _HeldOrConflict:
        """Hold the guard of ``task_key`` over a Hold stream for the duration of an ``async with`` block
        (``AsyncClient``) or a ``with`` block (``Client``).

        The block's end releases the run: SUCCEEDED; FAILED with the exception's text when it raised;
        CANCELLED when it was cancelled (or, in a ``with`` block, interrupted: ``KeyboardInterrupt``). With
        ``ttl`` the hold sends heartbeats every ttl/3 by itself. If the guard is taken away meanwhile, leaving
        the block raises ``LeaseLost``.

        ``on_conflict``: ``"raise"`` raises ``AlreadyRunning``/``RetryRequiresApproval``; ``"return"`` enters
        with a ``Conflict`` instead of the hold; ``"join"`` waits for the winning run to end and then enters
        with a ``Conflict`` whose ``joined`` is true and whose ``guard`` is the winner's final snapshot;
        ``"queue"`` waits in the key's FIFO queue (``on_queued(position, guard)`` hears each change of its
        place) and enters when its turn comes, or raises ``QueueFull``/``WaitTimedOut`` (after ``max_wait``);
        ``"keep-newest"`` waits the same way, but a newer keep-newest trigger replaces it (``Superseded``);
        ``"supersede"`` asks the running run to stop (where the key's rule allows it) and waits first in line. A
        held run that is superseded learns it from ``hold.stop_requested`` / ``wait_stop_requested()``.
        """
        request = acquire_request(task_key, run_id, ttl, labels, self._holder_or(holder), on_conflict, max_wait)
        return self._hold_context(self._connection, request, _ttl_s(ttl), on_conflict, on_queued)


# --- asyncio ----------------------------------------------------------------------------


_AsyncHeld = AbstractAsyncContextManager[AsyncHold]
_AsyncHeldOrConflict = AbstractAsyncContextManager[AsyncHold | Conflict]


class AsyncClient(_Clients[aio.ClientInterceptor, AsyncConnection, _AsyncHeld, _AsyncHeldOrConflict], AsyncClosing):
    """A Task Guard client on grpc.aio.

    Args:
        address: ``unix:/path/to.sock`` or ``host:port``; default ``$TASKGUARD_ADDR``, else the sidecar's
            default socket (see ``default_address``).
        timeout: the deadline of each call, in seconds or as a ``timedelta``.
        retry: how calls that are safe to repeat are retried on UNAVAILABLE.
        wait_for_ready: let calls wait (up to their deadline) for a sidecar that is not up yet, instead of
            failing fast with UNAVAILABLE and retrying.
        holder: shown to losers of a conflict; default ``<hostname>:<pid>``.
        token: a bearer token sent with every call (``authorization`` metadata), when the sidecar wants one.
        credentials: channel credentials for a TLS listener (``grpc.ssl_channel_credentials(...)``, with a client
            certificate for mTLS); none means a plaintext channel (the unix socket, loopback).
        interceptors: grpc.aio client interceptors for the channel.

    The channel is made on first use and belongs to the event loop that used
    it: use one client per loop. ``close()`` it (or use ``async with``).
    """

    _connect = AsyncConnection
    _hold_context = AsyncHoldContext

    async def close(self) -> None:
        """Close the channel; streams still open end."""
        await self._connection.close()

    # --- leases -------------------------------------------------------------------------

    @overload
    async def acquire(
        self,
        task_key: str,
        run_id: str | None = None,
        ttl: float | timedelta | None = None,
        labels: Mapping[str, str] | None = None,
        holder: str | None = None,
        on_conflict: Literal["raise", "queue", "keep-newest", "supersede"] = "raise",
        *,
        max_wait: float | timedelta | None = None,
    ) -> Lease: ...

    @overload
    async def acquire(
        self,
        task_key: str,
        run_id: str | None = None,
        ttl: float | timedelta | None = None,
        labels: Mapping[str, str] | None = None,
        holder: str | None = None,
        *,
        on_conflict: Literal["return"],
        max_wait: float | timedelta | None = None,
    ) -> Lease | Conflict: ...

    async def acquire(
        self,
        task_key: str,
        run_id: str | None = None,
        ttl: float | timedelta | None = None,
        labels: Mapping[str, str] | None = None,
        holder: str | None = None,
        on_conflict: Literal["raise", "return", "queue", "keep-newest", "supersede"] = "raise",
        *,
        max_wait: float | timedelta | None = None,
    ) -> Lease | Conflict:
        """Acquire a TTL lease (the sidecar's default TTL when ``ttl`` is None); renew and release it by id.

        A conflict raises ``AlreadyRunning``/``RetryRequiresApproval``, or is returned as a ``Conflict``
        with ``on_conflict="return"``. With ``"queue"``, ``"keep-newest"`` or ``"supersede"`` the call waits in
        the key's queue (up to ``max_wait``, else as long as it takes) and returns the lease when its turn comes.
        """
        request = acquire_request(task_key, run_id, ttl, labels, self._holder_or(holder), on_conflict, max_wait)
        return await self._connection.send(_protocol.acquire(request, on_conflict, max_wait))

    async def renew(self, lease_id: str, ttl: float | timedelta | None = None) -> Guard:
        """Extend a TTL lease (by its own TTL, or by ``ttl``)."""
        return await self._connection.send(_protocol.renew(lease_id, ttl))

    async def release(self, lease_id: str, status: RunStatus | str, detail: str = "") -> Guard:
        """End the run that holds ``lease_id`` (idempotent for the same status)."""
        return await self._connection.send(_protocol.release(lease_id, status, detail))

    # --- operators ----------------------------------------------------------------------

    async def approve_retry(self, task_key: str, approver: str, reason: str) -> Guard:
        """Let a FAILED guard (or ABANDONED/EXPIRED, when the policy says so) be acquired once more."""
        return await self._connection.send(_protocol.approve_retry(task_key, approver, reason))

    async def force_release(self, task_key: str, operator: str, reason: str) -> Guard:
        """End a RUNNING guard's run as CANCELLED; its holder loses the lease."""
        return await self._connection.send(_protocol.force_release(task_key, operator, reason))

    # --- reads --------------------------------------------------------------------------

    async def get(self, task_key: str) -> Guard:
        """The guard of ``task_key``; ``NotFoundError`` when there is none."""
        return await self._connection.send(_protocol.get(task_key))

    async def check_fence(self, task_key: str, fencing_token: int) -> bool:
        """True only while the run with ``fencing_token`` still holds the guard of ``task_key``."""
        return await self._connection.send(_protocol.check_fence(task_key, fencing_token))

    def watch(self, prefix: str = "", start_revision: int = 0, include_snapshot: bool = False) -> AsyncWatch:
        """Live guard events under ``prefix`` (see ``AsyncWatch``)."""
        return AsyncWatch(self._connection, WatchPosition(prefix, start_revision, include_snapshot))

    async def list(
        self,
        prefix: str | None = None,
        states: Iterable[GuardState | str] | None = None,
        stale_only: bool = False,
        page_size: int = DEFAULT_PAGE_SIZE,
    ) -> AsyncIterator[Guard]:
        """Every guard under ``prefix`` (in ``states``; only stale ones with ``stale_only``), in key order.

        Pages are fetched as the iteration reaches them, each retried on its own.
        """
        pages = Pages(prefix, states, stale_only, page_size)
        while (page := pages.next()) is not None:
            for guard in await self._connection.send(page):
                yield guard


# --- blocking ---------------------------------------------------------------------------


class Client(_Clients[Any, Connection, AbstractContextManager[Hold], AbstractContextManager[Hold | Conflict]], Closing):
    """A blocking Task Guard client with ``AsyncClient``'s methods, on a plain gRPC channel.

    It is safe to share between threads. ``close()`` it (or use ``with``).
    ``hold`` reads its stream on a thread of its own; nothing here runs an
    event loop.
    """

    _connect = Connection
    _hold_context = HoldContext

    def close(self) -> None:
        self._connection.close()

    # --- leases -------------------------------------------------------------------------

    @overload
    def acquire(
        self,
        task_key: str,
        run_id: str | None = None,
        ttl: float | timedelta | None = None,
        labels: Mapping[str, str] | None = None,
        holder: str | None = None,
        on_conflict: Literal["raise", "queue", "keep-newest", "supersede"] = "raise",
        *,
        max_wait: float | timedelta | None = None,
    ) -> Lease: ...

    @overload
    def acquire(
        self,
        task_key: str,
        run_id: str | None = None,
        ttl: float | timedelta | None = None,
        labels: Mapping[str, str] | None = None,
        holder: str | None = None,
        *,
        on_conflict: Literal["return"],
        max_wait: float | timedelta | None = None,
    ) -> Lease | Conflict: ...

    def acquire(
        self,
        task_key: str,
        run_id: str | None = None,
        ttl: float | timedelta | None = None,
        labels: Mapping[str, str] | None = None,
        holder: str | None = None,
        on_conflict: Literal["raise", "return", "queue", "keep-newest", "supersede"] = "raise",
        *,
        max_wait: float | timedelta | None = None,
    ) -> Lease | Conflict:
        """See ``AsyncClient.acquire``."""
        request = acquire_request(task_key, run_id, ttl, labels, self._holder_or(holder), on_conflict, max_wait)
        return self._connection.send(_protocol.acquire(request, on_conflict, max_wait))

    def renew(self, lease_id: str, ttl: float | timedelta | None = None) -> Guard:
        return self._connection.send(_protocol.renew(lease_id, ttl))

    def release(self, lease_id: str, status: RunStatus | str, detail: str = "") -> Guard:
        return self._connection.send(_protocol.release(lease_id, status, detail))

    # --- operators ----------------------------------------------------------------------

    def approve_retry(self, task_key: str, approver: str, reason: str) -> Guard:
        return self._connection.send(_protocol.approve_retry(task_key, approver, reason))

    def force_release(self, task_key: str, operator: str, reason: str) -> Guard:
        return self._connection.send(_protocol.force_release(task_key, operator, reason))

    # --- reads --------------------------------------------------------------------------

    def get(self, task_key: str) -> Guard:
        return self._connection.send(_protocol.get(task_key))

    def check_fence(self, task_key: str, fencing_token: int) -> bool:
        return self._connection.send(_protocol.check_fence(task_key, fencing_token))

    def watch(self, prefix: str = "", start_revision: int = 0, include_snapshot: bool = False) -> Watch:
        """Live guard events under ``prefix`` (see ``Watch``)."""
        return Watch(self._connection, WatchPosition(prefix, start_revision, include_snapshot))

    def list(
        self,
        prefix: str | None = None,
        states: Iterable[GuardState | str] | None = None,
        stale_only: bool = False,
        page_size: int = DEFAULT_PAGE_SIZE,
    ) -> Iterator[Guard]:
        pages = Pages(prefix, states, stale_only, page_size)
        while (page := pages.next()) is not None:
            yield from self._connection.send(page)
