"""What every RPC handler of the gRPC front shares: who calls, its span, and how failures become statuses.

This module holds the only table from failures to gRPC status codes
(``status_for``) and the only ``context.abort`` call (``answer``). Business
outcomes (ALREADY_RUNNING, RETRY_REQUIRES_APPROVAL) are responses, not errors.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf.message import DecodeError
from grpc import aio

from taskguard.front import wire
from taskguard.front.auth import Authorizer, Caller, PermissionDenied
from taskguard.guard import model
from taskguard.guard.model import GuardRecord, Rejected, Rejection, RejectionKind
from taskguard.runtime.engine import Result
from taskguard.runtime.events import RevisionAhead, TooManyWatchers, WatchOverflow
from taskguard.runtime.leases import HolderLimit
from taskguard.runtime.turns import Turn
from taskguard.store import GuardLost, RevisionCompacted, StoreConflict, StoreUnavailable
from taskguard.telemetry import RpcSpan, Telemetry

log = logging.getLogger(__name__)

_Request = TypeVar("_Request")
_Response = TypeVar("_Response")

# 192 random bits: a lease_id is a capability, not an identifier.
_LEASE_ID_BYTES = 24


class Draining(Exception):
    """The sidecar is shutting down; streams end so clients reconnect and resume."""


_REJECTION_STATUS = {
    RejectionKind.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    RejectionKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    RejectionKind.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    RejectionKind.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
}


def status_for(error: Exception) -> tuple[grpc.StatusCode, str]:
    """The one place that decides which status a failure becomes."""
    match error:
        case Rejection():
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


class Front(Protocol):
    """A servicer whose methods ``answer`` wraps."""

    telemetry: Telemetry
    authorizer: Authorizer


_Servicer = TypeVar("_Servicer", bound=Front)
_Method = Callable[[_Servicer, _Request, aio.ServicerContext[Any, Any], Call], Awaitable[_Response]]


def answer(
    method: _Method[_Servicer, _Request, _Response],
) -> Callable[[_Servicer, _Request, aio.ServicerContext[Any, Any]], Awaitable[_Response]]:
    """Identify the caller, check its role, run the RPC in its span, and turn any failure into its status.

    This is the one ``abort`` there is.
    """
    name = method.__name__

    @functools.wraps(method)
    async def answered(self: _Servicer, request: _Request, context: aio.ServicerContext[Any, Any]) -> _Response:
        with self.telemetry.rpc(name, context.invocation_metadata()) as span:
            try:
                caller = self.authorizer.identify(context.peer(), context.invocation_metadata(), _common_names(context))
                self.authorizer.check(name, caller)
                decoded(request)
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


def expect(result: Result, span: RpcSpan | None = None) -> GuardRecord:
    """The committed guard of a command that must not be rejected (for a semaphore, the run the command was
    about); the rejection is raised otherwise."""
    if span is not None:
        span.guard(result.record)
    if isinstance(result.reply, Rejected):
        raise Rejection(result.reply)
    if isinstance(result.reply, model.GuardReply) and result.reply.guard is not None:
        return result.reply.guard
    assert result.record is not None
    return result.record


def acquired(result: Result, span: RpcSpan, run_id: str | None) -> model.AcquireReply:
    """An acquisition's reply, noted on the span; ``run_id`` is the run the caller asked for (None: a resume)."""
    reply = result.reply
    if isinstance(reply, Rejected):
        raise Rejection(reply)
    assert isinstance(reply, model.AcquireReply)
    span.guard(reply.guard)
    span.outcome(reply.outcome, reply.guard, run_id or reply.guard.run_id)
    return reply


def waited(telemetry: Telemetry, turn: Turn, outcome: str) -> None:
    """A queued call's wait is over: ``outcome`` is how (an Outcome's name, or LEFT when the call ended first)."""
    if turn.queued_at is not None and turn.ahead is not None:
        telemetry.queue_waited(turn.acquire, turn.queued_at, turn.ahead, outcome)


def new_lease_id() -> str:
    return secrets.token_urlsafe(_LEASE_ID_BYTES)


# --- decoding ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Undecodable:
    """A request whose bytes are not the message they should be."""

    type_name: str


def tolerant(message_type: Any) -> Callable[[bytes], Any]:
    """A deserializer that cannot fail: bad bytes become ``Undecodable``, which ``decoded`` rejects."""

    def parse(data: bytes) -> Any:
        try:
            return message_type.FromString(data)
        except DecodeError:
            return Undecodable(message_type.DESCRIPTOR.full_name)

    return parse


def decoded(request: Any) -> None:
    if isinstance(request, Undecodable):
        raise wire.BadRequest("request", f"is not a valid {request.type_name} message")


def encode(message: Any) -> bytes:
    """Serialize a response; watches hand over events already encoded once for every watcher."""
    if isinstance(message, bytes):
        return message
    encoded: bytes = message.SerializeToString()
    return encoded
