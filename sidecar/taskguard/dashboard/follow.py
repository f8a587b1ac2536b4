"""The dashboard as a client of the sidecar: one WatchGuards watch, followed for as long as the dashboard runs.

The watch starts at the oldest event the sidecar's log keeps (revision 1, or
the oldest the OUT_OF_RANGE answer names), with a snapshot first: the guards
as they are, then what happened to them before this dashboard started (see
``state.py``), then live events. ``AsyncWatch`` resumes it by revision by
itself when the stream breaks (sidecar restarted, killed, drained), so no
event is given twice or skipped. What ``AsyncWatch`` hides is *that* it
broke: ``WatchTracker`` is a client interceptor that sees each watch call it
opens (WatchGuards or WatchGuardBatches, whichever the client uses). The
sidecar sends its headers as soon as a watch is registered, so headers mean
"up", and the end of a call we did not cancel means "down" until the next
call's headers. A sidecar that stops (SIGTERM) ends its watches with
UNAVAILABLE "the sidecar is shutting down": that is reported, and logged, once
as "sidecar stopped; waiting for it", not as an outage. The first watch's
probe failing (no sidecar at start) is reported by the watch itself.

The log gets one line when the watch goes down or comes back, not one per
attempt while it waits.

Operator actions do not go through the follower's client: each one uses a
client of its own carrying the operator token the page presented, plus
``x-taskguard-token-only: 1`` so that the dashboard's own uid (an operator on
the unix socket by default) grants the page nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import grpc
from grpc import aio

from taskguard.dashboard.state import Change, Connection, ConnectionState, DashboardState, DownReason
from taskguard.front.auth import TOKEN_ONLY_HEADER
from taskguard_client import (
    AsyncClient,
    InvalidArgumentError,
    OutOfRangeError,
    PermissionDeniedError,
    RetryPolicy,
    TaskGuardError,
)

# The client watches over either streaming method (batches when the sidecar has them); both are "the watch".
WATCH_METHODS = frozenset({"/taskguard.v1.TaskGuard/WatchGuards", "/taskguard.v1.TaskGuard/WatchGuardBatches"})
# Between attempts to (re)open the first watch when the sidecar is not there; the watch's own resumption
# uses the client's RetryPolicy.
RESTART_POLICY = RetryPolicy(initial_backoff_s=0.2, max_backoff_s=2.0)
# How a draining sidecar ends its streams (api.py's Draining): a stop, not a failure.
_DRAINING = "the sidecar is shutting down"
# How grpc reports a call this process cancelled: the watch closing it (a restart of the watch, or ours).
_LOCALLY_CANCELLED = "Locally cancelled"
# The ends ``AsyncWatch`` resumes after by itself, so only this interceptor can tell. Any other end is raised by
# the watch, and the follower says what it means (OUT_OF_RANGE is a restart from the log's oldest event, not an
# outage).
_BROKEN = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)
STOPPED = "sidecar stopped; waiting for it"

log = logging.getLogger("taskguard.dashboard")


def _method(details: aio.ClientCallDetails) -> str:
    method: str | bytes = details.method
    return method.decode() if isinstance(method, bytes) else method


def _one_line(text: str) -> str:
    return " ".join(text.split())


class WatchTracker(aio.UnaryStreamClientInterceptor):
    """Calls ``on_up`` when a watch stream is established and ``on_down(reason, message)`` when one broke."""

    def __init__(self, on_up: Callable[[], None], on_down: Callable[[DownReason, str], None]) -> None:
        self._on_up = on_up
        self._on_down = on_down
        self._tasks: set[asyncio.Task[None]] = set()
        self.closing = False

    async def intercept_unary_stream(
        self,
        continuation: Callable[[aio.ClientCallDetails, Any], Awaitable[aio.UnaryStreamCall[Any, Any]]],
        client_call_details: aio.ClientCallDetails,
        request: Any,
    ) -> aio.UnaryStreamCall[Any, Any]:
        call = await continuation(client_call_details, request)
        if _method(client_call_details) in WATCH_METHODS:
            task = asyncio.ensure_future(self._track(call))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return call

    async def _track(self, call: aio.UnaryStreamCall[Any, Any]) -> None:
        await call.initial_metadata()  # returns early, empty, when the call failed first
        if not call.done():
            self._on_up()
        code = await call.code()
        if self.closing or code not in _BROKEN:
            return
        details = (await call.details()) or ""
        if code is grpc.StatusCode.CANCELLED and details.startswith(_LOCALLY_CANCELLED):
            return  # we closed it: whoever did says why, if anything is wrong
        if code is grpc.StatusCode.UNAVAILABLE and _DRAINING in details:
            self._on_down("stopped", STOPPED)
            return
        self._on_down("unreachable", _one_line(f"the watch broke: {code.name}: {details or 'no details'}"))

    async def close(self) -> None:
        self.closing = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class Follower:
    """Feeds ``state`` from the sidecar's WatchGuards stream and reports every change and connection change.

    Args:
        address: the sidecar, ``unix:PATH`` or ``HOST:PORT``.
        client_options: ``AsyncClient`` keyword arguments (``token``, ``credentials``, ``timeout``).
        state: the model to apply events to.
        on_change: called with each applied event's ``Change``.
        on_connection: called when the watch went up or down (or why it is down changed).

    Runs on one event loop; ``run()`` returns only when cancelled or closed.
    """

    def __init__(
        self,
        address: str,
        client_options: dict[str, Any],
        state: DashboardState,
        on_change: Callable[[Change], None],
        on_connection: Callable[[Connection], None],
    ) -> None:
        self.address = address
        self._state = state
        self._on_change = on_change
        self._on_connection = on_connection
        self.tracker = WatchTracker(self._up, self._down)
        self._client = AsyncClient(address, interceptors=[self.tracker], **client_options)

    def _set(self, state: ConnectionState, message: str, reason: DownReason = "") -> None:
        before = self._state.connection
        changed = self._state.set_connection(state, message, datetime.now(UTC), reason)
        if changed is None:
            return
        if changed.state != before.state or changed.reason != before.reason:
            self._log(before, changed)
        self._on_connection(changed)

    def _log(self, before: Connection, now: Connection) -> None:
        if now.state == "up" and before.state == "down":
            log.info("sidecar back: watching it at %s, after revision %d", self.address, self._state.logged_revision)
        elif now.state == "up":
            log.info("watching the sidecar at %s", self.address)
        elif now.reason == "stopped":
            log.info("%s", STOPPED)
        else:
            log.info("sidecar watch down: %s", now.message)

    def _up(self) -> None:
        self._set("up", f"watching the sidecar at {self.address}")

    def _down(self, reason: DownReason, message: str) -> None:
        current = self._state.connection
        if current.state == "down" and current.reason == "stopped" and reason == "unreachable":
            return  # a stopped sidecar is unreachable until it is back: that is what "waiting for it" means
        self._set("down", message, reason)

    async def run(self) -> None:
        # From the log's beginning: the snapshot gives the guards, the log what happened to them before.
        start_revision, snapshot = 1, True
        delays = RESTART_POLICY.delays()
        out_of_range = 0
        while True:
            async with self._client.watch("", start_revision=start_revision, include_snapshot=snapshot) as watch:
                try:
                    async for event in self._events(watch):
                        change = self._state.apply(event)
                        if change is not None:
                            self._on_change(change)
                        delays, out_of_range = RESTART_POLICY.delays(), 0
                except OutOfRangeError as error:
                    start_revision, snapshot = self._restart_after(error, start_revision), True
                    out_of_range += 1
                    if out_of_range > 1:  # the log moves on faster than we start: do not spin
                        await asyncio.sleep(next(delays))
                    continue
                except TaskGuardError as error:
                    if isinstance(error, PermissionDeniedError):
                        self._down("refused", _one_line(f"the sidecar at {self.address} refused the watch: {error}"))
                    else:
                        self._down("unreachable", _one_line(f"the sidecar at {self.address} is not reachable: {error}"))
                    await asyncio.sleep(next(delays))
                if watch.last_revision:
                    start_revision, snapshot = watch.last_revision + 1, False

    def _restart_after(self, error: OutOfRangeError, start_revision: int) -> int:
        """Where to start again when the log does not have ``start_revision``."""
        if error.oldest_revision is None:
            # Ahead of the sidecar's log: a new database, whose revisions start again.
            self._state.forget_log_position()
            self._down("resync", _one_line(f"{error.message}; reading every guard again"))
            return 1
        if start_revision > 1:
            # We had followed the log; what it dropped since is gone (state.apply skips what we have).
            self._down("resync", _one_line(f"{error.message}; reading every guard again"))
        return error.oldest_revision

    async def _events(self, watch: AsyncIterator[Any]) -> AsyncIterator[Any]:
        async for event in watch:
            # Headers normally said so already; an event is proof as well.
            if self._state.connection.state != "up":
                self._up()
            yield event

    async def close(self) -> None:
        await self.tracker.close()
        await self._client.close()


class TokenOnly(aio.UnaryUnaryClientInterceptor):
    """Adds ``x-taskguard-token-only: 1``: judge this call by its bearer token alone, never by our uid."""

    async def intercept_unary_unary(
        self,
        continuation: Callable[[aio.ClientCallDetails, Any], Awaitable[aio.UnaryUnaryCall[Any, Any]]],
        client_call_details: aio.ClientCallDetails,
        request: Any,
    ) -> aio.UnaryUnaryCall[Any, Any]:
        metadata = aio.Metadata(*(client_call_details.metadata or ()), (TOKEN_ONLY_HEADER, "1"))
        details = aio.ClientCallDetails(
            client_call_details.method,
            client_call_details.timeout,
            metadata,
            client_call_details.credentials,
            client_call_details.wait_for_ready,
        )
        return await continuation(details, request)


def operator_client(address: str, client_options: dict[str, Any], operator_token: str) -> AsyncClient:
    """A client that acts with the page's operator token only (none: the sidecar will refuse it)."""
    options = {**client_options, "token": operator_token or None}
    return AsyncClient(address, interceptors=[TokenOnly()], **options)


async def operator_token_accepted(address: str, client_options: dict[str, Any], operator_token: str) -> bool:
    """Whether the sidecar takes ``operator_token`` as an operator's, by a call that changes nothing.

    An ApproveRetry without a task_key: the sidecar checks the caller's role before it reads the request, so
    an operator hears INVALID_ARGUMENT (task_key) and anyone else PERMISSION_DENIED. Other failures (the
    sidecar unreachable) raise the client's ``TaskGuardError``.
    """
    async with operator_client(address, client_options, operator_token) as client:
        try:
            await client.approve_retry("", "", "")
        except InvalidArgumentError:
            return True
        except PermissionDeniedError:
            return False
    return True  # past the role check either way (no sidecar approves a retry of no key)
