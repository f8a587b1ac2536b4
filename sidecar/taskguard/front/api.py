"""The gRPC servicer: each method is parse (wire) -> engine -> render (wire).

How a call is answered (who calls, its span, failures to statuses) is ``rpc``;
the Hold and watch streams are ``hold_stream`` and ``watch_stream``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from grpc import aio

from taskguard.front import wire
from taskguard.front.auth import Authorizer
from taskguard.front.hold_stream import HoldStream
from taskguard.front.rpc import Call, acquired, answer, encode, expect, new_lease_id, tolerant, waited
from taskguard.front.watch_stream import serve_watch
from taskguard.guard import model
from taskguard.guard.model import NO_SUCH_GUARD, GuardRecord, Outcome, Rejection
from taskguard.runtime.engine import Engine
from taskguard.runtime.events import EventHub
from taskguard.runtime.leases import LeaseKeeper
from taskguard.runtime.turns import Turn, TurnNews
from taskguard.telemetry import Telemetry
from taskguard_client.v1 import taskguard_pb2 as pb
from taskguard_client.v1 import taskguard_pb2_grpc as pb_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TaskGuard"].full_name


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
        self._encoder = wire.EventEncoder(engine.is_stale)
        # One future every stream waits on, not a task per stream: 10,000 held streams add up.
        self._draining: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def drain(self) -> None:
        """End every Hold and WatchGuards stream with UNAVAILABLE (graceful shutdown)."""
        if not self._draining.done():
            self._draining.set_result(None)

    def _render(self, record: GuardRecord) -> pb.Guard:
        return wire.guard(record, self._engine.is_stale(record), self._engine.is_stale)

    # --- leases -------------------------------------------------------------------------

    @answer
    async def Acquire(
        self, request: pb.AcquireRequest, context: aio.ServicerContext[Any, Any], call: Call
    ) -> pb.AcquireResponse:
        command = wire.acquire(
            request,
            stream_bound=False,
            new_lease_id=new_lease_id(),
            trace_context=self.telemetry.traceparent(),
            principal=call.caller.principal,
            shared_principal=call.caller.shared,
        )
        with self._keeper.admit(command.principal):
            turn = self._keeper.turn(command)
            try:
                reply = acquired(await self._engine.execute(command), call.span, command.run_id)
                if reply.outcome is Outcome.QUEUED:
                    # A unary caller hears only its final answer: it waits here, up to its deadline.
                    turn.queued(reply)
                    reply = await self._wait_turn(turn, call, command.run_id)
                else:
                    turn.settle()
            finally:
                if turn.queued_at is not None and not turn.settled:
                    waited(self.telemetry, turn, "LEFT")
                turn.close("the waiter's Acquire call ended before its turn came")
        return pb.AcquireResponse(
            outcome=wire.outcome(reply.outcome), guard=self._render(reply.guard), lease_id=reply.lease_id
        )

    async def _wait_turn(self, turn: Turn, call: Call, run_id: str) -> model.AcquireReply:
        news = await turn.outcome()
        waited(self.telemetry, turn, news.outcome.name)
        if news.outcome is Outcome.ACQUIRED:
            held = await turn.claim(news.guard)
            turn.settle()
            news = TurnNews(Outcome.ACQUIRED, held)
        reply = news.reply()
        call.span.outcome(reply.outcome, reply.guard, run_id)
        return reply

    @answer
    async def Renew(
        self, request: pb.RenewRequest, context: aio.ServicerContext[Any, Any], call: Call
    ) -> pb.RenewResponse:
        lease_id = wire.lease_id(request.lease_id)
        ttl_s = wire.renew_ttl_s(request)
        result = await self._engine.execute_on_lease(lease_id, lambda key: model.Renew(key, lease_id, ttl_s))
        return pb.RenewResponse(guard=self._render(expect(result, call.span)))

    @answer
    async def Release(
        self, request: pb.ReleaseRequest, context: aio.ServicerContext[Any, Any], call: Call
    ) -> pb.ReleaseResponse:
        lease_id = wire.lease_id(request.lease_id)
        status = wire.run_status(request.status)
        detail = wire.release_detail(request.detail)
        result = await self._engine.execute_on_lease(lease_id, lambda key: model.Release(key, lease_id, status, detail))
        return pb.ReleaseResponse(guard=self._render(expect(result, call.span)))

    @answer
    async def Hold(self, request_iterator: Any, context: aio.ServicerContext[Any, Any], call: Call) -> None:
        stream = HoldStream(
            self._keeper.hold(),
            context,
            call,
            render=self._render,
            telemetry=self.telemetry,
            draining=self._draining,
            first_message_timeout_s=self._first_message_timeout_s,
        )
        await stream.serve()

    # --- operators ----------------------------------------------------------------------

    @answer
    async def ApproveRetry(
        self, request: pb.ApproveRetryRequest, context: aio.ServicerContext[Any, Any], call: Call
    ) -> pb.ApproveRetryResponse:
        return pb.ApproveRetryResponse(guard=await self._guard_after(wire.approve_retry(request), call))

    @answer
    async def ForceRelease(
        self, request: pb.ForceReleaseRequest, context: aio.ServicerContext[Any, Any], call: Call
    ) -> pb.ForceReleaseResponse:
        return pb.ForceReleaseResponse(guard=await self._guard_after(wire.force_release(request), call))

    async def _guard_after(self, command: model.Command, call: Call) -> pb.Guard:
        """The guard as ``command`` left it, rendered (an operator's command is rejected or changes it)."""
        return self._render(expect(await self._engine.execute(command), call.span))

    # --- reads ----------------------------------------------------------------------------

    @answer
    async def GetGuard(
        self, request: pb.GetGuardRequest, context: aio.ServicerContext[Any, Any], call: Call
    ) -> pb.Guard:
        record = await self._engine.read(wire.task_key(request.task_key))
        call.span.guard(record)
        if record is None:
            raise Rejection(NO_SUCH_GUARD)
        shown = self._render(record)
        shown.policy.CopyFrom(wire.key_policy(self._engine.rule_for(record.task_key)))
        return shown

    @answer
    async def ListGuards(
        self, request: pb.ListGuardsRequest, context: aio.ServicerContext[Any, Any], call: Call
    ) -> pb.ListGuardsResponse:
        found, after = await self._engine.find(wire.guard_query(request))
        return pb.ListGuardsResponse(
            guards=[self._render(record) for record in found],
            next_page_token=wire.encode_page_token(after) if after is not None else "",
        )

    @answer
    async def CheckFence(
        self, request: pb.CheckFenceRequest, context: aio.ServicerContext[Any, Any], call: Call
    ) -> pb.CheckFenceResponse:
        valid, record = await self._engine.check_fence(wire.task_key(request.task_key), request.fencing_token)
        call.span.guard(record)
        response = pb.CheckFenceResponse(valid=valid)
        if record is not None:
            response.guard.CopyFrom(self._render(record))
        return response

    @answer
    async def WatchGuards(
        self, request: pb.WatchGuardsRequest, context: aio.ServicerContext[Any, Any], call: Call
    ) -> None:
        await serve_watch(self._hub, self._encoder, request, context, call, batched=False, draining=self._draining)

    @answer
    async def WatchGuardBatches(
        self, request: pb.WatchGuardsRequest, context: aio.ServicerContext[Any, Any], call: Call
    ) -> None:
        await serve_watch(self._hub, self._encoder, request, context, call, batched=True, draining=self._draining)


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
            request_deserializer=tolerant(getattr(pb, method.input_type.name)),
            response_serializer=encode,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
