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

import asyncio
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from datetime import timedelta
from types import TracebackType
from typing import Any, Literal, Self, overload

import grpc
from grpc import aio

from taskguard_client import _errors
from taskguard_client._call import (
    CHANNEL_OPTIONS,
    RetryPolicy,
    check_default_socket,
    default_address,
    default_holder,
    metadata,
    retry_async,
    retry_secret,
    retry_sync,
)
from taskguard_client._lease import (
    AsyncHold,
    AsyncHoldContext,
    Conflict,
    Hold,
    HoldContext,
    Lease,
    OnConflict,
    acquired,
    fit_detail,
)
from taskguard_client._models import (
    Guard,
    GuardEvent,
    GuardState,
    RunStatus,
    duration_pb,
    event_from_pb,
    guard_from_pb,
    guard_state_pb,
    run_status_pb,
    seconds,
)
from taskguard_client.v1 import taskguard_pb2 as pb
from taskguard_client.v1 import taskguard_pb2_grpc as pb_grpc

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_PAGE_SIZE = 100

# Watch streams end with these when the sidecar restarts, drains, or cuts off a slow or surplus watcher.
_RESUMABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)


def _acquire_request(
    task_key: str,
    run_id: str | None,
    ttl: float | timedelta | None,
    labels: Mapping[str, str] | None,
    holder: str,
    on_conflict: OnConflict,
) -> pb.AcquireRequest:
    if on_conflict not in ("raise", "return", "join"):
        raise ValueError(f"on_conflict must be 'raise', 'return' or 'join', not {on_conflict!r}")
    # Made before the first attempt, so that every retry names the same run.
    run_id = run_id or str(uuid.uuid4())
    request = pb.AcquireRequest(
        task_key=task_key,
        run_id=run_id,
        # Ties the retries to this process where the sidecar cannot tell callers apart (see retry_secret).
        retry_secret=retry_secret(task_key, run_id),
        holder=holder,
        labels=dict(labels or {}),
        on_conflict=pb.ON_CONFLICT_JOIN if on_conflict == "join" else pb.ON_CONFLICT_REJECT,
    )
    if ttl is not None:
        request.ttl.CopyFrom(duration_pb(ttl))
    return request


def _list_request(
    prefix: str | None, states: Iterable[GuardState | str] | None, stale_only: bool, page_size: int
) -> pb.ListGuardsRequest:
    return pb.ListGuardsRequest(
        key_prefix=prefix or "",
        states=[guard_state_pb(state) for state in states or ()],
        stale_only=stale_only,
        page_size=page_size,
    )


def _ttl_s(ttl: float | timedelta | None) -> float | None:
    return seconds(ttl) if ttl is not None else None


class _WatchPosition:
    """Where a watch stands, so that a resumed stream neither repeats nor skips a revision.

    Watching "from now" (start_revision 0) the snapshot's revision is where
    the live events begin; watching from a revision, the snapshot comes
    before the history and does not move the position. A stream that breaks
    during its snapshot asks for a new one and hands out only the guards that
    are new or changed since. A stream that breaks before anything arrived
    when watching from now restarts from now: what happened in between is not
    seen.
    """

    def __init__(self, prefix: str, start_revision: int, include_snapshot: bool) -> None:
        self.prefix = prefix
        self.start_revision = start_revision
        self.include_snapshot = include_snapshot
        self.last_revision = 0
        self.received = False
        self._snapshot_done = not include_snapshot
        self._snapshot_seen: dict[str, int] = {}  # task key -> guard revision already handed out

    def request(self) -> pb.WatchGuardsRequest:
        if not self._snapshot_done:
            # Still in the snapshot: take it again, from where the watch was asked to start.
            return pb.WatchGuardsRequest(
                key_prefix=self.prefix, start_revision=self.start_revision, include_snapshot=True
            )
        start = self.last_revision + 1 if self.last_revision else self.start_revision
        return pb.WatchGuardsRequest(key_prefix=self.prefix, start_revision=start)

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


# --- asyncio ----------------------------------------------------------------------------


class AsyncClient:
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
        interceptors: Sequence[aio.ClientInterceptor] | None = None,
    ) -> None:
        self.address = address or default_address()
        check_default_socket(self.address)
        self._timeout_s = seconds(timeout)
        self._retry = retry or RetryPolicy()
        self._wait_for_ready = wait_for_ready
        self._holder = default_holder() if holder is None else holder
        self._token = token
        self._credentials = credentials
        self._interceptors = interceptors
        self._channel: aio.Channel | None = None
        self._stub_instance: Any = None

    @property
    def _stub(self) -> Any:
        if self._stub_instance is None:
            if self._credentials is not None:
                self._channel = aio.secure_channel(
                    self.address, self._credentials, options=CHANNEL_OPTIONS, interceptors=self._interceptors
                )
            else:
                self._channel = aio.insecure_channel(
                    self.address, options=CHANNEL_OPTIONS, interceptors=self._interceptors
                )
            self._stub_instance = pb_grpc.TaskGuardStub(self._channel)
        return self._stub_instance

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return metadata(self._token)

    async def close(self) -> None:
        """Close the channel; streams still open end."""
        if self._channel is not None:
            await self._channel.close()
            self._channel, self._stub_instance = None, None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _unary(self, method: str, request: Any, *, retry: bool = True, deadline: float | None = None) -> Any:
        async def attempt() -> Any:
            call = getattr(self._stub, method)
            return await call(
                request, timeout=self._timeout_s, metadata=self._metadata(), wait_for_ready=self._wait_for_ready
            )

        return await retry_async(attempt, self._retry if retry else RetryPolicy(max_attempts=1), deadline)

    # --- leases -------------------------------------------------------------------------

    @overload
    def hold(
        self,
        task_key: str,
        run_id: str | None = None,
        ttl: float | timedelta | None = None,
        labels: Mapping[str, str] | None = None,
        holder: str | None = None,
        on_conflict: Literal["raise"] = "raise",
    ) -> AbstractAsyncContextManager[AsyncHold]: ...

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
    ) -> AbstractAsyncContextManager[AsyncHold | Conflict]: ...

    def hold(
        self,
        task_key: str,
        run_id: str | None = None,
        ttl: float | timedelta | None = None,
        labels: Mapping[str, str] | None = None,
        holder: str | None = None,
        on_conflict: OnConflict = "raise",
    ) -> AbstractAsyncContextManager[AsyncHold | Conflict]:
        """Hold the guard of ``task_key`` over a Hold stream for the duration of an ``async with`` block.

        The block's end releases the run: SUCCEEDED; FAILED with the exception's text when it raised;
        CANCELLED when it was cancelled. With ``ttl`` the hold sends heartbeats every ttl/3 by itself.
        If the guard is taken away meanwhile, leaving the block raises ``LeaseLost``.

        ``on_conflict``: ``"raise"`` raises ``AlreadyRunning``/``RetryRequiresApproval``; ``"return"`` enters
        with a ``Conflict`` instead of the hold; ``"join"`` waits for the winning run to end and then enters
        with a ``Conflict`` whose ``joined`` is true and whose ``guard`` is the winner's final snapshot.
        """
        request = _acquire_request(
            task_key, run_id, ttl, labels, self._holder if holder is None else holder, on_conflict
        )
        return AsyncHoldContext(self, request, _ttl_s(ttl), on_conflict)

    @overload
    async def acquire(
        self,
        task_key: str,
        run_id: str | None = None,
        ttl: float | timedelta | None = None,
        labels: Mapping[str, str] | None = None,
        holder: str | None = None,
        on_conflict: Literal["raise"] = "raise",
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
    ) -> Lease | Conflict: ...

    async def acquire(
        self,
        task_key: str,
        run_id: str | None = None,
        ttl: float | timedelta | None = None,
        labels: Mapping[str, str] | None = None,
        holder: str | None = None,
        on_conflict: Literal["raise", "return"] = "raise",
    ) -> Lease | Conflict:
        """Acquire a TTL lease (the sidecar's default TTL when ``ttl`` is None); renew and release it by id.

        A conflict raises ``AlreadyRunning``/``RetryRequiresApproval``, or is returned as a ``Conflict``
        with ``on_conflict="return"``.
        """
        holder = self._holder if holder is None else holder
        request = _acquire_request(task_key, run_id, ttl, labels, holder, "raise")
        response: pb.AcquireResponse = await self._unary("Acquire", request)
        return acquired(response.outcome, response.guard, response.lease_id, on_conflict)

    async def renew(self, lease_id: str, ttl: float | timedelta | None = None) -> Guard:
        """Extend a TTL lease (by its own TTL, or by ``ttl``)."""
        request = pb.RenewRequest(lease_id=lease_id)
        if ttl is not None:
            request.ttl.CopyFrom(duration_pb(ttl))
        response: pb.RenewResponse = await self._unary("Renew", request)
        return guard_from_pb(response.guard)

    async def release(self, lease_id: str, status: RunStatus | str, detail: str = "") -> Guard:
        """End the run that holds ``lease_id`` (idempotent for the same status)."""
        return await self._release(lease_id, status, detail)

    async def _release(
        self, lease_id: str, status: RunStatus | str, detail: str, deadline: float | None = None
    ) -> Guard:
        request = pb.ReleaseRequest(lease_id=lease_id, status=run_status_pb(status), detail=fit_detail(detail))
        response: pb.ReleaseResponse = await self._unary("Release", request, deadline=deadline)
        return guard_from_pb(response.guard)

    # --- operators ----------------------------------------------------------------------

    async def approve_retry(self, task_key: str, approver: str, reason: str) -> Guard:
        """Let a FAILED guard (or ABANDONED/EXPIRED, when the policy says so) be acquired once more."""
        request = pb.ApproveRetryRequest(task_key=task_key, approver=approver, reason=reason)
        response: pb.ApproveRetryResponse = await self._unary("ApproveRetry", request, retry=False)
        return guard_from_pb(response.guard)

    async def force_release(self, task_key: str, operator: str, reason: str) -> Guard:
        """End a RUNNING guard's run as CANCELLED; its holder loses the lease."""
        request = pb.ForceReleaseRequest(task_key=task_key, operator=operator, reason=reason)
        response: pb.ForceReleaseResponse = await self._unary("ForceRelease", request, retry=False)
        return guard_from_pb(response.guard)

    # --- reads --------------------------------------------------------------------------

    async def get(self, task_key: str) -> Guard:
        """The guard of ``task_key``; ``NotFoundError`` when there is none."""
        response: pb.Guard = await self._unary("GetGuard", pb.GetGuardRequest(task_key=task_key))
        return guard_from_pb(response)

    async def check_fence(self, task_key: str, fencing_token: int) -> bool:
        """True only while the run with ``fencing_token`` still holds the guard of ``task_key``."""
        request = pb.CheckFenceRequest(task_key=task_key, fencing_token=fencing_token)
        response: pb.CheckFenceResponse = await self._unary("CheckFence", request)
        return response.valid

    def watch(self, prefix: str = "", start_revision: int = 0, include_snapshot: bool = False) -> AsyncWatch:
        """Live guard events under ``prefix`` (see ``AsyncWatch``)."""
        return AsyncWatch(self, _WatchPosition(prefix, start_revision, include_snapshot))

    def _follow(self, prefix: str, start_revision: int) -> AsyncWatch:
        """A watch that waits for a sidecar that just went away, instead of failing fast."""
        return AsyncWatch(self, _WatchPosition(prefix, start_revision, False), probe=False)

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
        request = _list_request(prefix, states, stale_only, page_size)
        while True:
            page: pb.ListGuardsResponse = await self._unary("ListGuards", request)
            for guard in page.guards:
                yield guard_from_pb(guard)
            if not page.next_page_token:
                return
            request.page_token = page.next_page_token


class AsyncWatch:
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

    def __init__(self, client: AsyncClient, position: _WatchPosition, probe: bool = True) -> None:
        self._client = client
        self._position = position
        self._call: Any = None
        self._pending: deque[pb.GuardEvent] = deque()
        self._checked = not probe
        self._closed = False

    @property
    def last_revision(self) -> int:
        """The revision to resume after (0 until one is known)."""
        return self._position.last_revision

    def __aiter__(self) -> AsyncWatch:
        return self

    async def __anext__(self) -> GuardEvent:
        delays = self._client._retry.delays()
        while not self._closed:
            while self._pending:
                event = self._position.take(self._pending.popleft())
                if event is not None:
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
                if error.code() not in _RESUMABLE:
                    raise _errors.from_rpc_error(error) from error
                await asyncio.sleep(next(delays))
                continue
            if message is aio.EOF:
                self._call = None
                await asyncio.sleep(next(delays))
                continue
            self._pending.extend(message.events)
        raise StopAsyncIteration

    async def _connect(self) -> None:
        client = self._client
        if not self._checked:
            probe = pb.ListGuardsRequest(key_prefix=self._position.prefix, page_size=1)
            await client._unary("ListGuards", probe)
            self._checked = True
        request = self._position.request()
        # Batches: a busy sidecar sends many events a message, which is what lets a watcher keep up.
        self._call = client._stub.WatchGuardBatches(request, metadata=client._metadata(), wait_for_ready=True)

    async def aclose(self) -> None:
        await self.close()

    async def close(self) -> None:
        self._closed = True
        if self._call is not None:
            self._call.cancel()
            self._call = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


# --- blocking ---------------------------------------------------------------------------


class Client:
    """A blocking Task Guard client with ``AsyncClient``'s methods, on a plain gRPC channel.

    It is safe to share between threads. ``close()`` it (or use ``with``).
    ``hold`` reads its stream on a thread of its own; nothing here runs an
    event loop.
    """

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
        interceptors: Sequence[Any] | None = None,
    ) -> None:
        self.address = address or default_address()
        check_default_socket(self.address)
        self._timeout_s = seconds(timeout)
        self._retry = retry or RetryPolicy()
        self._wait_for_ready = wait_for_ready
        self._holder = default_holder() if holder is None else holder
        self._token = token
        self._channel = (
            grpc.secure_channel(self.address, credentials, options=CHANNEL_OPTIONS)
            if credentials is not None
            else grpc.insecure_channel(self.address, options=CHANNEL_OPTIONS)
        )
        channel = grpc.intercept_channel(self._channel, *interceptors) if interceptors else self._channel
        self._stub: Any = pb_grpc.TaskGuardStub(channel)

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return metadata(self._token)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _unary(self, method: str, request: Any, *, retry: bool = True, deadline: float | None = None) -> Any:
        def attempt() -> Any:
            call = getattr(self._stub, method)
            return call(
                request, timeout=self._timeout_s, metadata=self._metadata(), wait_for_ready=self._wait_for_ready
            )

        return retry_sync(attempt, self._retry if retry else RetryPolicy(max_attempts=1), deadline)

    # --- leases -------------------------------------------------------------------------

    @overload
    def hold(
        self,
        task_key: str,
        run_id: str | None = None,
        ttl: float | timedelta | None = None,
        labels: Mapping[str, str] | None = None,
        holder: str | None = None,
        on_conflict: Literal["raise"] = "raise",
    ) -> AbstractContextManager[Hold]: ...

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
    ) -> AbstractContextManager[Hold | Conflict]: ...

    def hold(
        self,
        task_key: str,
        run_id: str | None = None,
        ttl: float | timedelta | None = None,
        labels: Mapping[str, str] | None = None,
        holder: str | None = None,
        on_conflict: OnConflict = "raise",
    ) -> AbstractContextManager[Hold | Conflict]:
        """``AsyncClient.hold`` for a ``with`` block; ``KeyboardInterrupt`` releases CANCELLED."""
        request = _acquire_request(
            task_key, run_id, ttl, labels, self._holder if holder is None else holder, on_conflict
        )
        return HoldContext(self, request, _ttl_s(ttl), on_conflict)

    @overload
    def acquire(
        self,
        task_key: str,
        run_id: str | None = None,
        ttl: float | timedelta | None = None,
        labels: Mapping[str, str] | None = None,
        holder: str | None = None,
        on_conflict: Literal["raise"] = "raise",
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
    ) -> Lease | Conflict: ...

    def acquire(
        self,
        task_key: str,
        run_id: str | None = None,
        ttl: float | timedelta | None = None,
        labels: Mapping[str, str] | None = None,
        holder: str | None = None,
        on_conflict: Literal["raise", "return"] = "raise",
    ) -> Lease | Conflict:
        """See ``AsyncClient.acquire``."""
        holder = self._holder if holder is None else holder
        request = _acquire_request(task_key, run_id, ttl, labels, holder, "raise")
        response: pb.AcquireResponse = self._unary("Acquire", request)
        return acquired(response.outcome, response.guard, response.lease_id, on_conflict)

    def renew(self, lease_id: str, ttl: float | timedelta | None = None) -> Guard:
        request = pb.RenewRequest(lease_id=lease_id)
        if ttl is not None:
            request.ttl.CopyFrom(duration_pb(ttl))
        response: pb.RenewResponse = self._unary("Renew", request)
        return guard_from_pb(response.guard)

    def release(self, lease_id: str, status: RunStatus | str, detail: str = "") -> Guard:
        return self._release(lease_id, status, detail)

    def _release(self, lease_id: str, status: RunStatus | str, detail: str, deadline: float | None = None) -> Guard:
        request = pb.ReleaseRequest(lease_id=lease_id, status=run_status_pb(status), detail=fit_detail(detail))
        response: pb.ReleaseResponse = self._unary("Release", request, deadline=deadline)
        return guard_from_pb(response.guard)

    # --- operators ----------------------------------------------------------------------

    def approve_retry(self, task_key: str, approver: str, reason: str) -> Guard:
        request = pb.ApproveRetryRequest(task_key=task_key, approver=approver, reason=reason)
        response: pb.ApproveRetryResponse = self._unary("ApproveRetry", request, retry=False)
        return guard_from_pb(response.guard)

    def force_release(self, task_key: str, operator: str, reason: str) -> Guard:
        request = pb.ForceReleaseRequest(task_key=task_key, operator=operator, reason=reason)
        response: pb.ForceReleaseResponse = self._unary("ForceRelease", request, retry=False)
        return guard_from_pb(response.guard)

    # --- reads --------------------------------------------------------------------------

    def get(self, task_key: str) -> Guard:
        response: pb.Guard = self._unary("GetGuard", pb.GetGuardRequest(task_key=task_key))
        return guard_from_pb(response)

    def check_fence(self, task_key: str, fencing_token: int) -> bool:
        request = pb.CheckFenceRequest(task_key=task_key, fencing_token=fencing_token)
        response: pb.CheckFenceResponse = self._unary("CheckFence", request)
        return response.valid

    def watch(self, prefix: str = "", start_revision: int = 0, include_snapshot: bool = False) -> Watch:
        """Live guard events under ``prefix`` (see ``Watch``)."""
        return Watch(self, _WatchPosition(prefix, start_revision, include_snapshot))

    def _follow(self, prefix: str, start_revision: int) -> Watch:
        return Watch(self, _WatchPosition(prefix, start_revision, False), probe=False)

    def list(
        self,
        prefix: str | None = None,
        states: Iterable[GuardState | str] | None = None,
        stale_only: bool = False,
        page_size: int = DEFAULT_PAGE_SIZE,
    ) -> Iterator[Guard]:
        request = _list_request(prefix, states, stale_only, page_size)
        while True:
            page: pb.ListGuardsResponse = self._unary("ListGuards", request)
            for guard in page.guards:
                yield guard_from_pb(guard)
            if not page.next_page_token:
                return
            request.page_token = page.next_page_token


class Watch:
    """``AsyncWatch`` as a blocking iterator."""

    def __init__(self, client: Client, position: _WatchPosition, probe: bool = True) -> None:
        self._client = client
        self._position = position
        self._call: Any = None
        self._pending: deque[pb.GuardEvent] = deque()
        self._checked = not probe
        self._closed = False

    @property
    def last_revision(self) -> int:
        return self._position.last_revision

    def __iter__(self) -> Watch:
        return self

    def __next__(self) -> GuardEvent:
        delays = self._client._retry.delays()
        while not self._closed:
            while self._pending:
                event = self._position.take(self._pending.popleft())
                if event is not None:
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
                code, _ = _errors.status_of(error)
                if self._closed:
                    break
                if code not in _RESUMABLE:
                    raise _errors.from_rpc_error(error) from error
                time.sleep(next(delays))
                continue
            self._pending.extend(message.events)
        raise StopIteration

    def _connect(self) -> None:
        client = self._client
        if not self._checked:
            client._unary("ListGuards", pb.ListGuardsRequest(key_prefix=self._position.prefix, page_size=1))
            self._checked = True
        request = self._position.request()
        self._call = client._stub.WatchGuardBatches(request, metadata=client._metadata(), wait_for_ready=True)

    def close(self) -> None:
        """Stop watching; may be called from another thread to end a blocked iteration."""
        self._closed = True
        call = self._call
        if call is not None:
            call.cancel()

    def __enter__(self) -> Watch:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
