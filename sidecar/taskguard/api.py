"""The gRPC servicer: each method is parse (wire) -> engine -> render (wire).

This module holds the only table from failures to gRPC status codes
(``status_for``) and the only ``context.abort`` call (``_answer``).
Business outcomes (ALREADY_RUNNING, RETRY_REQUIRES_APPROVAL) are responses.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError
from grpc import aio

from taskguard import core, model, wire
from taskguard.auth import Authorizer, Caller, PermissionDenied
from taskguard.engine import Engine, Result
from taskguard.events import EventHub, RevisionAhead, TooManyWatchers, Watcher, WatchOverflow
from taskguard.leases import HolderLimit, HoldSession, LeaseKeeper
from taskguard.model import GuardRecord, Rejected, RejectionKind
from taskguard.store import GuardLost, RevisionCompacted, StoreConflict, StoreUnavailable
from taskguard.telemetry import RpcSpan, Telemetry
from taskguard_client.v1 import taskguard_pb2 as pb
from taskguard_client.v1 import taskguard_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

_Request = TypeVar("_Request")
_Response = TypeVar("_Response")

# 192 random bits: a lease_id is a capability, not an identifier.
_LEASE_ID_BYTES = 24


# Encoded events kept for watchers that are a little behind the others.
_ENCODED_EVENTS_KEPT = 4096
# Events in one WatchGuardBatches message at most (well under the 4 MiB a client takes by default).
_BATCH_EVENTS = 256

_HOLD_DROPPED = "the holder's Hold stream ended without a release"
_HOLD_REJECTED = "its Hold stream was ended for a message the sidecar rejected"

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TaskGuard"].full_name


class Refused(Exception):
    """A core rejection on its way to the status table."""

    def __init__(self, rejection: Rejected) -> None:
        super().__init__(rejection.message)
        self.rejection = rejection


class Draining(Exception):
    """The sidecar is shutting down; streams end so clients reconnect and resume."""


_REJECTION_STATUS = {
    RejectionKind.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    RejectionKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    RejectionKind.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
}


def status_for(error: Exception) -> tuple[grpc.StatusCode, str]:
    """The one place that decides which status a failure becomes."""
    match error:
        case wire.BadRequest() | Refused():
            return _REJECTION_STATUS[error.rejection.kind], error.rejection.message
        case GuardLost():
            return grpc.StatusCode.FAILED_PRECONDITION, f"lease_id: lease lost: {error}"
        case StoreUnavailable():
            return grpc.StatusCode.UNAVAILABLE, f"store unavailable: {error}"
        case StoreConflict():
            # Other sidecars of a shared store kept winning the race for this guard: the call may be retried.
            return grpc.StatusCode.UNAVAILABLE, f"{error}; try again"
        case RevisionCompacted() | RevisionAhead():
            return grpc.StatusCode.OUT_OF_RANGE, f"start_revision: {error}"
        case WatchOverflow() | TooManyWatchers():
            return grpc.StatusCode.RESOURCE_EXHAUSTED, str(error)
        case PermissionDenied():
            return grpc.StatusCode.PERMISSION_DENIED, str(error)
        case HolderLimit():
            return grpc.StatusCode.RESOURCE_EXHAUSTED, str(error)
        case Draining():
            return grpc.StatusCode.UNAVAILABLE, "the sidecar is shutting down; reconnect and resume"
        case _:
            return grpc.StatusCode.INTERNAL, "internal error; see the sidecar's log"


@dataclass(frozen=True, slots=True)
class Call:
    """What every RPC handler gets besides its request: its span and who is calling."""

    span: RpcSpan
    caller: Caller


_Method = Callable[[Any, _Request, aio.ServicerContext[Any, Any], Call], Awaitable[_Response]]


def _answer(
    method: _Method[_Request, _Response],
) -> Callable[[Any, _Request, aio.ServicerContext[Any, Any]], Awaitable[_Response]]:
    """Identify the caller, check its role, run the RPC in its span, and turn any failure into its status.

    This is the one ``abort`` there is.
    """
    name = method.__name__

    @functools.wraps(method)
    async def answered(self: TaskGuardService, request: _Request, context: aio.ServicerContext[Any, Any]) -> _Response:
        with self.telemetry.rpc(name, context.invocation_metadata()) as span:
            try:
                caller = self.authorizer.identify(context.peer(), context.invocation_metadata(), _common_names(context))
                self.authorizer.check(name, caller)
                _decoded(request)
                response = await method(self, request, context, Call(span, caller))
            except (asyncio.CancelledError, aio.AbortError):
                span.status("CANCELLED", grpc.StatusCode.CANCELLED.value[0], "")
                raise
            except aio.InternalError:
                # A stream write failed in grpc core: the caller closed the stream while it was in flight.
                # There is no one left to answer; grpc's server ignores this for a closed call, and logs it
                # otherwise, so it goes back to grpc rather than becoming an INTERNAL status here.
                span.status("CANCELLED", grpc.StatusCode.CANCELLED.value[0], "the caller closed the stream")
                raise
            except Exception as error:
                code, message = status_for(error)
                if code is grpc.StatusCode.INTERNAL:
                    log.exception("%s failed", name)
                span.status(code.name, code.value[0], message)
                failure = error
            else:
                span.status("OK", 0, "")
                return response
        # The span ends before the status goes out, as it does before a response: whoever sees the
        # status can already see the span (abort sends at once; the span would otherwise end later).
        await context.abort(code, message)
        raise AssertionError("abort returned") from failure

    return answered


def _common_names(context: aio.ServicerContext[Any, Any]) -> list[str]:
    """The client certificate's common names under mTLS, else nothing."""
    names = context.auth_context().get("x509_common_name", [])
    return [name.decode(errors="replace") for name in names]


def _expect(result: Result, span: RpcSpan | None = None) -> GuardRecord:
    if span is not None:
        span.guard(result.record)
    if isinstance(result.reply, Rejected):
        raise Refused(result.reply)
    assert result.record is not None
    return result.record


def _new_lease_id() -> str:
    return secrets.token_urlsafe(_LEASE_ID_BYTES)


class TaskGuardService(pb_grpc.TaskGuardServicer):
    def __init__(
        self,
        engine: Engine,
        hub: EventHub,
        keeper: LeaseKeeper,
        telemetry: Telemetry,
        authorizer: Authorizer,
        hold_first_message_timeout_s: float = 10.0,
    ) -> None:
        self.telemetry = telemetry
        self.authorizer = authorizer
        self._engine = engine
        self._hub = hub
        self._keeper = keeper
        self._first_message_timeout_s = hold_first_message_timeout_s
        self._encoded_events: OrderedDict[int, tuple[model.Event, bytes]] = OrderedDict()
        # One future every stream waits on, not a task per stream: 10,000 held streams add up.
        self._draining: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def drain(self) -> None:
        """End every Hold and WatchGuards stream with UNAVAILABLE (graceful shutdown)."""
        if not self._draining.done():
            self._draining.set_result(None)

    def _render(self, record: GuardRecord) -> pb.Guard:
        return wire.guard(record, self._engine.is_stale(record))

    # --- leases -------------------------------------------------------------------------

    @_answer
    async def Acquire(
        self, request: pb.AcquireRequest, context: aio.ServicerContext[Any, Any], call: Call
    ) -> pb.AcquireResponse:
        command = wire.acquire(
            request,
            stream_bound=False,
            new_lease_id=_new_lease_id(),
            trace_context=self.telemetry.traceparent(),
            principal=call.caller.principal,
            shared_principal=call.caller.shared,
        )
        with self._keeper.admit(command.principal):
            result = await self._engine.execute(command)
        return self._acquire_response(result, call.span, pb.AcquireResponse, command.run_id)

    def _acquire_response(
        self, result: Result, span: RpcSpan, kind: Callable[..., _Response], run_id: str | None, **extra: Any
    ) -> _Response:
        """``run_id``: the run the caller asked for (None for a resume, whose run is the guard's)."""
        reply = result.reply
        if isinstance(reply, Rejected):
            raise Refused(reply)
        assert isinstance(reply, model.AcquireReply)
        span.guard(reply.guard)
        span.outcome(reply.outcome, reply.guard, run_id or reply.guard.run_id)
        return kind(outcome=int(reply.outcome), guard=self._render(reply.guard), lease_id=reply.lease_id, **extra)

    @_answer
    async def Renew(
        self, request: pb.RenewRequest, context: aio.ServicerContext[Any, Any], call: Call
    ) -> pb.RenewResponse:
        lease_id = wire.lease_id(request.lease_id)
        ttl_s = wire.renew_ttl_s(request)
        result = await self._engine.execute_on_lease(lease_id, lambda key: model.Renew(key, lease_id, ttl_s))
        return pb.RenewResponse(guard=self._render(_expect(result, call.span)))

    @_answer
    async def Release(
        self, request: pb.ReleaseRequest, context: aio.ServicerContext[Any, Any], call: Call
    ) -> pb.ReleaseResponse:
        lease_id = wire.lease_id(request.lease_id)
        status = wire.run_status(request.status)
        detail = wire.release_detail(request.detail)
        result = await self._engine.execute_on_lease(lease_id, lambda key: model.Release(key, lease_id, status, detail))
        return pb.ReleaseResponse(guard=self._render(_expect(result, call.span)))

    @_answer
    async def Hold(self, request_iterator: Any, context: aio.ServicerContext[Any, Any], call: Call) -> None:
        session = self._keeper.hold()
        try:
            await self._hold(session, context, call)
        except wire.BadRequest:
            # A rejected message says nothing about the run: it stays held, and its holder may resume it
            # on a new stream within the resume grace (the stream it broke is ended here).
            session.leave_for_resume(_HOLD_REJECTED)
            raise
        finally:
            session.close(_HOLD_DROPPED)

    async def _hold(self, session: HoldSession, context: aio.ServicerContext[Any, Any], call: Call) -> None:
        try:
            first = await asyncio.wait_for(context.read(), self._first_message_timeout_s)
        except TimeoutError:
            # A silent stream would otherwise hold a slot of the connection's streams forever.
            rule = f"the first Hold message (acquire or resume) must arrive within {self._first_message_timeout_s:g}s"
            raise wire.BadRequest("request", rule) from None
        _decoded(first)
        which = first.WhichOneof("request") if isinstance(first, pb.HoldRequest) else None
        if which == "acquire":
            command = wire.acquire(
                first.acquire,
                stream_bound=True,
                new_lease_id=_new_lease_id(),
                trace_context=self.telemetry.traceparent(),
                principal=call.caller.principal,
                shared_principal=call.caller.shared,
            )
            result = await session.acquire(command)
            run_id: str | None = command.run_id
        elif which == "resume":
            lease_id = wire.lease_id(first.resume.lease_id, "resume.lease_id")
            result = await session.resume(lease_id)
            run_id = None
        else:
            raise wire.BadRequest("request", "the first Hold message must be acquire or resume")
        await context.write(
            self._acquire_response(result, call.span, pb.HoldResponse, run_id, event=pb.HOLD_EVENT_ACQUIRE_RESULT)
        )
        if session.ended is None:
            return  # refused without JOIN: answered, and the stream ends
        await self._hold_loop(session, session.ended, context)

    async def _hold_loop(
        self, session: HoldSession, ended: asyncio.Future[GuardRecord], context: aio.ServicerContext[Any, Any]
    ) -> None:
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
        try:
            while True:
                if self._draining.done():
                    raise Draining()
                if ended.done():
                    await self._hold_ended(session, context)
                    return
                parked = True
                try:
                    message = await context.read()
                except asyncio.CancelledError:
                    # Ours (the run ended, the sidecar drains) unless someone else cancels too.
                    if handler.uncancel() > 0 or not (ended.done() or self._draining.done()):
                        raise
                    continue
                finally:
                    parked = False
                _decoded(message)
                if not isinstance(message, pb.HoldRequest):
                    return  # the client half-closed without a release; the session abandons
                if await self._hold_step(session, message, context):
                    return
        finally:
            ended.remove_done_callback(interrupt)
            self._draining.remove_done_callback(interrupt)

    async def _hold_ended(self, session: HoldSession, context: aio.ServicerContext[Any, Any]) -> None:
        assert session.ended is not None
        final = session.ended.result()
        if session.held is None:
            await context.write(
                pb.HoldResponse(
                    outcome=pb.ACQUIRE_OUTCOME_ALREADY_RUNNING,
                    guard=self._render(final),
                    event=pb.HOLD_EVENT_WINNER_FINISHED,
                )
            )
            return
        await context.write(pb.HoldResponse(guard=self._render(final), event=pb.HOLD_EVENT_LOST))
        problem = core.lease_problem(final, session.held.lease_id)
        raise Refused(problem or Rejected(RejectionKind.FAILED_PRECONDITION, "lease_id", "lease lost"))

    async def _hold_step(
        self, session: HoldSession, message: pb.HoldRequest, context: aio.ServicerContext[Any, Any]
    ) -> bool:
        """Handle one message after the first; True when the stream is done."""
        which = message.WhichOneof("request")
        if session.held is None:
            raise wire.BadRequest("request", "a joined Hold stream only waits; send nothing")
        if which == "heartbeat":
            record = _expect(await session.heartbeat())
            await context.write(pb.HoldResponse(guard=self._render(record), event=pb.HOLD_EVENT_HEARTBEAT_ACK))
            return False
        if which == "release":
            status = wire.run_status(message.release.status)
            detail = wire.release_detail(message.release.detail)
            record = _expect(await session.release(status, detail))
            await context.write(pb.HoldResponse(guard=self._render(record), event=pb.HOLD_EVENT_RELEASED))
            return True
        raise wire.BadRequest("request", "after the first message a Hold stream takes only heartbeat or release")

    # --- operators ----------------------------------------------------------------------

    @_answer
    async def ApproveRetry(
        self, request: pb.ApproveRetryRequest, context: aio.ServicerContext[Any, Any], call: Call
    ) -> pb.ApproveRetryResponse:
        result = await self._engine.execute(wire.approve_retry(request))
        return pb.ApproveRetryResponse(guard=self._render(_expect(result, call.span)))

    @_answer
    async def ForceRelease(
        self, request: pb.ForceReleaseRequest, context: aio.ServicerContext[Any, Any], call: Call
    ) -> pb.ForceReleaseResponse:
        result = await self._engine.execute(wire.force_release(request))
        return pb.ForceReleaseResponse(guard=self._render(_expect(result, call.span)))

    # --- reads ----------------------------------------------------------------------------

    @_answer
    async def GetGuard(
        self, request: pb.GetGuardRequest, context: aio.ServicerContext[Any, Any], call: Call
    ) -> pb.Guard:
        record = await self._engine.read(wire.task_key(request.task_key))
        call.span.guard(record)
        if record is None:
            raise Refused(Rejected(RejectionKind.NOT_FOUND, "task_key", "no guard has this key"))
        return self._render(record)

    @_answer
    async def ListGuards(
        self, request: pb.ListGuardsRequest, context: aio.ServicerContext[Any, Any], call: Call
    ) -> pb.ListGuardsResponse:
        found, after = await self._engine.find(wire.guard_query(request))
        return pb.ListGuardsResponse(
            guards=[self._render(record) for record in found],
            next_page_token=wire.encode_page_token(after) if after is not None else "",
        )

    @_answer
    async def CheckFence(
        self, request: pb.CheckFenceRequest, context: aio.ServicerContext[Any, Any], call: Call
    ) -> pb.CheckFenceResponse:
        valid, record = await self._engine.check_fence(wire.task_key(request.task_key), request.fencing_token)
        call.span.guard(record)
        response = pb.CheckFenceResponse(valid=valid)
        if record is not None:
            response.guard.CopyFrom(self._render(record))
        return response

    @_answer
    async def WatchGuards(
        self, request: pb.WatchGuardsRequest, context: aio.ServicerContext[Any, Any], call: Call
    ) -> None:
        await self._watch(request, context, call, batched=False)

    @_answer
    async def WatchGuardBatches(
        self, request: pb.WatchGuardsRequest, context: aio.ServicerContext[Any, Any], call: Call
    ) -> None:
        await self._watch(request, context, call, batched=True)

    async def _watch(
        self, request: pb.WatchGuardsRequest, context: aio.ServicerContext[Any, Any], call: Call, batched: bool
    ) -> None:
        # On the owner-only socket every connection reads "unix:": then the caller is all that tells them apart.
        watcher = self._hub.open(wire.key_prefix(request.key_prefix), f"{call.caller.principal} {context.peer()}")
        # Headers now, so a client knows its watch is established before the first event.
        await context.send_initial_metadata(())
        pump = asyncio.ensure_future(self._pump(watcher, request, context, batched))
        overflowed = asyncio.ensure_future(watcher.overflowed.wait())
        waits: set[asyncio.Future[Any]] = {pump, overflowed, self._draining}
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if pump.done():
                pump.result()
            elif overflowed.done():
                raise WatchOverflow(watcher.delivered)
            else:
                raise Draining()
        finally:
            for task in (pump, overflowed):
                task.cancel()
            self._hub.close(watcher)

    async def _pump(
        self, watcher: Watcher, request: pb.WatchGuardsRequest, context: aio.ServicerContext[Any, Any], batched: bool
    ) -> None:
        limit = _BATCH_EVENTS if batched else 1
        async for batch in self._hub.batches(watcher, request.start_revision, request.include_snapshot, limit):
            if batched:
                # A repeated field's entries concatenate: the batch is its events' cached bytes, each framed as field 1.
                await context.write(b"".join(_as_batch_entry(self._encoded(event)) for event in batch))
            else:
                await context.write(self._encoded(batch[0]))
            if batch[-1].type is not model.EventType.SNAPSHOT:
                watcher.delivered = batch[-1].revision

    def _encoded(self, event: model.Event) -> bytes:
        """The event as wire bytes, built once however many watchers send it."""
        key = id(event)
        cached = self._encoded_events.get(key)
        if cached is not None and cached[0] is event:
            return cached[1]
        stale = self._engine.is_stale(event.guard)
        encoded = wire.guard_event(event, stale).SerializeToString()
        # Holding the event keeps its id from being reused while it is cached.
        self._encoded_events[key] = (event, encoded)
        if len(self._encoded_events) > _ENCODED_EVENTS_KEPT:
            self._encoded_events.popitem(last=False)
        return encoded


@dataclass(frozen=True, slots=True)
class Undecodable:
    """A request whose bytes are not the message they should be."""

    type_name: str


_HANDLER_KINDS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def register(service: TaskGuardService, server: aio.Server) -> None:
    """Add the servicer like the generated helper does, but with deserializers that cannot fail.

    grpc answers a request it cannot decode with UNKNOWN before any handler
    runs; decoding here instead lets the one status table answer
    INVALID_ARGUMENT naming the message.
    """
    handlers = {}
    for method in pb.DESCRIPTOR.services_by_name["TaskGuard"].methods:
        make = _HANDLER_KINDS[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = make(
            getattr(service, method.name),
            request_deserializer=_tolerant(getattr(pb, method.input_type.name)),
            response_serializer=_encode,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))


def _as_batch_entry(encoded_event: bytes) -> bytes:
    """One entry of GuardEventBatch.events: tag of field 1 (length-delimited), length, bytes."""
    return b"\x0a" + _varint(len(encoded_event)) + encoded_event


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _encode(message: Any) -> bytes:
    """Serialize a response; WatchGuards hands over events already encoded once for every watcher."""
    if isinstance(message, bytes):
        return message
    encoded: bytes = message.SerializeToString()
    return encoded


def _tolerant(message_type: Any) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return message_type.FromString(data)
        except DecodeError:
            return Undecodable(message_type.DESCRIPTOR.full_name)

    return parse


def _decoded(request: Any) -> None:
    if isinstance(request, Undecodable):
        raise wire.BadRequest("request", f"is not a valid {request.type_name} message")
