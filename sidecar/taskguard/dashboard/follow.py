"""The dashboard as a client of the sidecar: one WatchGuards watch, followed for as long as the dashboard runs.

The watch asks for a snapshot first, then live events; ``AsyncWatch`` resumes
it by revision by itself when the stream breaks (sidecar restarted, killed,
drained), so no event is given twice or skipped. What ``AsyncWatch`` hides is
*that* it broke: ``WatchTracker`` is a client interceptor that sees each
watch call it opens (WatchGuards or WatchGuardBatches, whichever the client
uses). The sidecar sends its headers as soon as a
watch is registered, so headers mean "up", and the end of a call we did not
cancel means "down" until the next call's headers. The first watch's probe
failing (no sidecar at start) is reported by the watch itself.

Operator actions do not go through the follower's client: each one uses a
client of its own carrying the operator token the page presented, plus
``x-taskguard-token-only: 1`` so that the dashboard's own uid (an operator on
the unix socket by default) grants the page nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import grpc
from grpc import aio

from taskguard.auth import TOKEN_ONLY_HEADER
from taskguard.dashboard.state import Change, Connection, ConnectionState, DashboardState
from taskguard_client import AsyncClient, OutOfRangeError, PermissionDeniedError, RetryPolicy, TaskGuardError

# The client watches over either streaming method (batches when the sidecar has them); both are "the watch".
WATCH_METHODS = frozenset({"/taskguard.v1.TaskGuard/WatchGuards", "/taskguard.v1.TaskGuard/WatchGuardBatches"})
# Between attempts to (re)open the first watch when the sidecar is not there; the watch's own resumption
# uses the client's RetryPolicy.
RESTART_POLICY = RetryPolicy(initial_backoff_s=0.2, max_backoff_s=2.0)


def _method(details: aio.ClientCallDetails) -> str:
    method: str | bytes = details.method
    return method.decode() if isinstance(method, bytes) else method


def _one_line(text: str) -> str:
    return " ".join(text.split())


class WatchTracker(aio.UnaryStreamClientInterceptor):
    """Calls ``on_up`` when a watch stream is established and ``on_down`` when one broke."""

    def __init__(self, on_up: Callable[[], None], on_down: Callable[[str], None]) -> None:
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
        if self.closing or code is grpc.StatusCode.OK:
            return
        details = await call.details()
        self._on_down(_one_line(f"the watch broke: {code.name}: {details or 'no details'}"))

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
        on_connection: called when the watch went up or down.

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

    def _set(self, state: ConnectionState, message: str) -> None:
        changed = self._state.set_connection(state, message, datetime.now(UTC))
        if changed is not None:
            self._on_connection(changed)

    def _up(self) -> None:
        self._set("up", f"watching the sidecar at {self.address}")

    def _down(self, message: str) -> None:
        self._set("down", message)

    async def run(self) -> None:
        start_revision, snapshot = 0, True
        delays = RESTART_POLICY.delays()
        while True:
            async with self._client.watch("", start_revision=start_revision, include_snapshot=snapshot) as watch:
                try:
                    async for event in self._events(watch):
                        self._on_change(self._state.apply(event))
                        delays = RESTART_POLICY.delays()
                except OutOfRangeError as error:
                    # The sidecar no longer keeps the events since we last saw one: read every guard afresh.
                    self._down(_one_line(f"{error.message}; reading every guard again"))
                    start_revision, snapshot = 0, True
                    continue
                except TaskGuardError as error:
                    how = "refused the watch" if isinstance(error, PermissionDeniedError) else "is not reachable"
                    self._down(_one_line(f"the sidecar at {self.address} {how}: {error}"))
                    await asyncio.sleep(next(delays))
                if watch.last_revision:
                    start_revision, snapshot = watch.last_revision + 1, False

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
