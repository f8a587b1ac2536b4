"""The Hold stream protocol: the first message acquires or resumes, heartbeats follow, a release ends it.

The lease itself (what the run holds, its heartbeats, its end) is the
``HoldSession`` of ``leases``; this module reads and writes the stream's
messages around it, and ends the stream when the run, the caller or the
sidecar does.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from dataclasses import replace
from typing import Any

from grpc import aio

from taskguard.front import wire
from taskguard.front.rpc import Call, Draining, acquired, decoded, expect, new_lease_id, waited
from taskguard.guard.model import GuardRecord, Outcome, Rejection
from taskguard.runtime.leases import HoldSession
from taskguard.runtime.turns import TurnNews
from taskguard.telemetry import Telemetry
from taskguard_client.v1 import taskguard_pb2 as pb

_DROPPED = "the holder's Hold stream ended without a release"
_REJECTED = "its Hold stream was ended for a message the sidecar rejected"

Render = Callable[[GuardRecord], pb.Guard]

# The last guard rendered for position notices, and its rendering (see HoldStream._notice_guard).
_last_notice: tuple[GuardRecord, pb.Guard] | None = None


class HoldStream:
    """One Hold RPC from its first message to its end."""

    def __init__(
        self,
        session: HoldSession,
        context: aio.ServicerContext[Any, Any],
        call: Call,
        *,
        render: Render,
        telemetry: Telemetry,
        draining: asyncio.Future[None],
        first_message_timeout_s: float,
    ) -> None:
        self._session = session
        self._context = context
        self._call = call
        self._render = render
        self._telemetry = telemetry
        self._draining = draining
        self._first_message_timeout_s = first_message_timeout_s
        # When the acquisition was answered: a joined stream waits for the winner's run from then on.
        self._answered_at = 0.0
        self._writing = asyncio.Lock()
        self._telling: asyncio.Future[None] | None = None

    async def serve(self) -> None:
        try:
            await self._open()
        except wire.BadRequest:
            # A rejected message says nothing about the run: it stays held, and its holder may resume it
            # on a new stream within the resume grace (the stream it broke is ended here).
            self._session.leave_for_resume(_REJECTED)
            raise
        finally:
            if self._session.turn is not None and not self._session.turn.settled:
                waited(self._telemetry, self._session.turn, "LEFT")
            self._session.close(_DROPPED)

    async def _open(self) -> None:
        session, call = self._session, self._call
        try:
            first = await asyncio.wait_for(self._context.read(), self._first_message_timeout_s)
        except TimeoutError:
            # A silent stream would otherwise hold a slot of the connection's streams forever.
            rule = f"the first Hold message (acquire or resume) must arrive within {self._first_message_timeout_s:g}s"
            raise wire.BadRequest("request", rule) from None
        decoded(first)
        which = first.WhichOneof("request") if isinstance(first, pb.HoldRequest) else None
        if which == "acquire":
            command = wire.acquire(
                first.acquire,
                stream_bound=True,
                new_lease_id=new_lease_id(),
                trace_context=self._telemetry.traceparent(),
                principal=call.caller.principal,
                shared_principal=call.caller.shared,
            )
            reply = acquired(await session.acquire(command), call.span, command.run_id)
        elif which == "resume":
            lease_id = wire.lease_id(first.resume.lease_id, "resume.lease_id")
            reply = acquired(await session.resume(lease_id), call.span, None)
        else:
            raise wire.BadRequest("request", "the first Hold message must be acquire or resume")
        await self._context.write(
            pb.HoldResponse(
                outcome=wire.outcome(reply.outcome),
                guard=self._render(reply.guard),
                lease_id=reply.lease_id,
                event=pb.HOLD_EVENT_ACQUIRE_RESULT,
                position=reply.position,
            )
        )
        self._answered_at = time.perf_counter()
        if reply.outcome is Outcome.QUEUED and not await self._wait_turn():
            return  # superseded, or its max_wait passed: answered, and the stream ends
        if session.ended is None:
            return  # refused without JOIN: answered, and the stream ends
        await self._follow_run(session.ended)

    async def _wait_turn(self) -> bool:
        """Tell the waiter of each change of its place until its turn comes (True) or it must go (False).

        Nothing is read meanwhile: a waiter that goes away cancels the call, which ends the wait (and the
        session leaves the queue as the stream closes).
        """
        turn = self._session.turn
        assert turn is not None
        while True:
            news = await self._unless_draining(turn.news())
            if news.outcome is Outcome.QUEUED:
                await self._context.write(
                    pb.HoldResponse(
                        outcome=wire.outcome(news.outcome),
                        guard=self._notice_guard(news.guard),
                        event=pb.HOLD_EVENT_QUEUE_POSITION,
                        position=news.position,
                    )
                )
                continue
            waited(self._telemetry, turn, news.outcome.name)
            guard = await self._session.take_turn(news.guard) if news.outcome is Outcome.ACQUIRED else news.guard
            self._call.span.outcome(news.outcome, guard, turn.run_id)
            await self._context.write(
                pb.HoldResponse(
                    outcome=wire.outcome(news.outcome),
                    guard=self._render(guard),
                    lease_id=guard.lease_id if news.outcome is Outcome.ACQUIRED else "",
                    event=pb.HOLD_EVENT_ACQUIRE_RESULT,
                    superseded_by=news.superseded_by,
                )
            )
            return news.outcome is Outcome.ACQUIRED

    def _notice_guard(self, record: GuardRecord) -> pb.Guard:
        """The guard a position notice carries: without its waiters, and rendered once for every waiter told of
        the same change (a queue of N waiters hears N notices per change; N waiter lists each would be N²)."""
        global _last_notice
        if _last_notice is None or _last_notice[0] is not record:
            _last_notice = (record, self._render(replace(record, waiters=())))
        return _last_notice[1]

    async def _unless_draining(self, waiting: Coroutine[Any, Any, TurnNews]) -> TurnNews:
        task = asyncio.ensure_future(waiting)
        either: set[asyncio.Future[Any]] = {task, self._draining}
        try:
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():
                task.cancel()
        if not task.done() or task.cancelled():
            raise Draining()
        return task.result()

    async def _follow_run(self, ended: asyncio.Future[GuardRecord]) -> None:
        """Serve heartbeats and the release until the stream, the run or the sidecar ends.

        The handler itself waits in ``context.read()``; the end of the run or a
        drain interrupts that read by cancelling it. (A reader task per stream
        would cost kilobytes each, and 10,000 held streams add up.)
        """
        handler = asyncio.current_task()
        assert handler is not None
        parked = False

        def interrupt(_: object) -> None:
            if parked:
                handler.cancel()

        ended.add_done_callback(interrupt)
        self._draining.add_done_callback(interrupt)
        # A stop request is told while the handler waits in read() (a read that was cancelled cannot go on),
        # by a task made only then: a task per held stream would cost its memory 10,000 times over.
        self._session.stop_requested.add_done_callback(self._stop_requested)
        try:
            while True:
                if self._draining.done():
                    raise Draining()
                if ended.done():
                    await self._run_ended(ended.result())
                    return
                parked = True
                try:
                    message = await self._context.read()
                except asyncio.CancelledError:
                    # Ours (the run ended, the sidecar drains) unless someone else cancels too.
                    if handler.uncancel() > 0 or not (ended.done() or self._draining.done()):
                        raise
                    continue
                finally:
                    parked = False
                decoded(message)
                if not isinstance(message, pb.HoldRequest):
                    return  # the client half-closed without a release; the session abandons
                if await self._step(message):
                    return
        finally:
            self._session.stop_requested.remove_done_callback(self._stop_requested)
            if self._telling is not None:
                self._telling.cancel()
            ended.remove_done_callback(interrupt)
            self._draining.remove_done_callback(interrupt)

    def _stop_requested(self, request: asyncio.Future[GuardRecord]) -> None:
        if not request.cancelled():
            self._telling = asyncio.ensure_future(self._tell_stop_requested(request.result()))

    async def _tell_stop_requested(self, superseded: GuardRecord) -> None:
        """A newer trigger superseded the run (SUPERSEDE): the holder should stop, and release."""
        await self._send(pb.HoldResponse(guard=self._render(superseded), event=pb.HOLD_EVENT_STOP_REQUESTED))
        self._session.next_stop_request().add_done_callback(self._stop_requested)

    async def _send(self, response: pb.HoldResponse) -> None:
        # One write at a time: stop requests are written beside the handler's own answers.
        async with self._writing:
            await self._context.write(response)

    async def _run_ended(self, final: GuardRecord) -> None:
        held = self._session.held
        if held is None:
            self._telemetry.joined(time.perf_counter() - self._answered_at, final)
            await self._context.write(
                pb.HoldResponse(
                    outcome=pb.ACQUIRE_OUTCOME_ALREADY_RUNNING,
                    guard=self._render(final),
                    event=pb.HOLD_EVENT_WINNER_FINISHED,
                )
            )
            return
        await self._send(pb.HoldResponse(guard=self._render(final), event=pb.HOLD_EVENT_LOST))
        raise Rejection(self._session.why_lost(final))

    async def _step(self, message: pb.HoldRequest) -> bool:
        """Handle one message after the first; True when the stream is done."""
        which = message.WhichOneof("request")
        if self._session.held is None:
            raise wire.BadRequest("request", "a joined Hold stream only waits; send nothing")
        if which == "heartbeat":
            record = expect(await self._session.heartbeat())
            await self._send(pb.HoldResponse(guard=self._render(record), event=pb.HOLD_EVENT_HEARTBEAT_ACK))
            return False
        if which == "release":
            status = wire.run_status(message.release.status)
            detail = wire.release_detail(message.release.detail)
            record = expect(await self._session.release(status, detail))
            await self._send(pb.HoldResponse(guard=self._render(record), event=pb.HOLD_EVENT_RELEASED))
            return True
        raise wire.BadRequest("request", "after the first message a Hold stream takes only heartbeat or release")
