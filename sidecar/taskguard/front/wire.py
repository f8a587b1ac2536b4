"""Protobuf <-> model: input validation on the way in, snapshots and watch framing on the way out.

Only the gRPC front (``api``, ``rpc``, ``hold_stream``, ``watch_stream``) and
this module import the generated stubs. Every check names the field and the
rule, and runs before anything reaches the engine, so a rejected request
cannot change stored state.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import cast

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from taskguard.guard import model
from taskguard.guard.model import (
    ConflictPolicy,
    Event,
    GuardQuery,
    GuardRecord,
    GuardState,
    Outcome,
    Rejected,
    Rejection,
    RejectionKind,
    RunStatus,
)
from taskguard_client.v1 import taskguard_pb2 as pb

MAX_TASK_KEY_BYTES = 512
MAX_ID_BYTES = 128
MAX_TEXT_BYTES = 256
MAX_DETAIL_BYTES = 4096
MAX_LABELS = 64
MAX_LABEL_KEY_BYTES = 63
MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100

# C0, DEL and C1: what a terminal acts on instead of showing. Free text may hold anything else.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class BadRequest(Rejection):
    """A request that breaks a rule of the wire format (the field, and the rule it breaks)."""

    def __init__(self, field: str, rule: str, kind: RejectionKind = RejectionKind.INVALID_ARGUMENT) -> None:
        super().__init__(Rejected(kind, field, rule))


# --- validation -------------------------------------------------------------------


def _printable(value: str, field: str, low: int, high: int) -> str:
    size = len(value.encode("utf-8", "surrogatepass"))
    if not low <= size <= high or not value.isprintable():
        span = f"{low}..{high}" if low else f"at most {high}"
        raise BadRequest(field, f"must be {span} bytes of printable UTF-8")
    return value


def task_key(value: str, field: str = "task_key") -> str:
    return _printable(value, field, 1, MAX_TASK_KEY_BYTES)


def key_prefix(value: str) -> str:
    return _printable(value, "key_prefix", 0, MAX_TASK_KEY_BYTES)


def lease_id(value: str, field: str = "lease_id") -> str:
    if not value:
        raise BadRequest(field, "is required")
    return _printable(value, field, 1, MAX_ID_BYTES)


def _text(value: str, field: str, limit: int = MAX_TEXT_BYTES) -> str:
    if len(value.encode("utf-8", "surrogatepass")) > limit:
        raise BadRequest(field, f"must be at most {limit} bytes")
    if _CONTROL.search(value):
        # Printed by `taskguard ls`, run's conflict message and the dashboard: an escape sequence here
        # would rewrite an operator's terminal.
        raise BadRequest(field, "must not contain control characters (C0, DEL or C1)")
    return value


def _enum(value: int, field: str, allowed: Mapping[int, str]) -> int:
    if value not in allowed:
        names = ", ".join(allowed.values())
        raise BadRequest(field, f"must be one of {names} (got {value})")
    return value


_RUN_STATUS_NAMES = {int(s): f"RUN_STATUS_{s.name}" for s in RunStatus if s is not RunStatus.UNSPECIFIED}
_GUARD_STATE_NAMES = {int(s): f"GUARD_STATE_{s.name}" for s in GuardState}
_ON_CONFLICT_NAMES = {int(value): pb.OnConflict.Name(value) for value in pb.OnConflict.values()}


def _on_conflict(value: int) -> ConflictPolicy | None:
    """UNSPECIFIED (None) leaves the choice to the key's rule, as the proto says."""
    _enum(value, "on_conflict", _ON_CONFLICT_NAMES)
    return ConflictPolicy(value) if value != pb.ON_CONFLICT_UNSPECIFIED else None


def run_status(value: int) -> RunStatus:
    return RunStatus(_enum(value, "status", _RUN_STATUS_NAMES))


def duration_s(message: Duration, field: str) -> float:
    if not -999_999_999 <= message.nanos <= 999_999_999 or (message.seconds * message.nanos < 0):
        raise BadRequest(field, "is not a valid google.protobuf.Duration")
    return message.seconds + message.nanos / 1e9


def _labels(values: Mapping[str, str]) -> model.Labels:
    if len(values) > MAX_LABELS:
        raise BadRequest("labels", f"must have at most {MAX_LABELS} entries")
    for key, value in values.items():
        _printable(key, "labels", 1, MAX_LABEL_KEY_BYTES)
        _text(value, f"labels[{key}]")
    return tuple(sorted(values.items()))


def acquire(
    request: pb.AcquireRequest,
    *,
    stream_bound: bool,
    new_lease_id: str,
    trace_context: str = "",
    principal: str = "",
    shared_principal: bool = False,
) -> model.Acquire:
    """The Acquire command (its ``on_conflict`` says whether the caller asked to JOIN the winner).

    ``shared_principal``: the principal names many callers, so the run is tied
    to its retry_secret too (see ``retry_key``).
    """
    key = task_key(request.task_key)
    run_id = _printable(request.run_id, "run_id", 1, MAX_ID_BYTES) if request.run_id else str(uuid.uuid4())
    on_conflict = _on_conflict(request.on_conflict)
    if on_conflict is ConflictPolicy.JOIN and not stream_bound:
        raise BadRequest("on_conflict", "ON_CONFLICT_JOIN needs a Hold stream")
    ttl_s = duration_s(request.ttl, "ttl") if request.HasField("ttl") else None
    max_wait_s = duration_s(request.max_wait, "max_wait") if request.HasField("max_wait") else None
    return model.Acquire(
        task_key=key,
        run_id=run_id,
        holder=_text(request.holder, "holder"),
        ttl_s=ttl_s,
        lease_id=new_lease_id,
        stream_bound=stream_bound,
        labels=_labels(request.labels),
        trace_context=trace_context,
        principal=principal,
        retry_key=retry_key(request.retry_secret, shared_principal),
        on_conflict=on_conflict,
        max_wait_s=max_wait_s,
    )


MIN_RETRY_SECRET_BYTES = 16


def retry_key(secret: str, shared_principal: bool) -> str | None:
    """What a retry must match besides the principal (see model.Acquire.retry_key).

    "" when the principal is one caller's own; the SHA-256 of the secret when it
    is shared; None (matches nothing) when it is shared and there is no secret.
    """
    if secret and (
        not MIN_RETRY_SECRET_BYTES <= len(secret) <= MAX_ID_BYTES or not secret.isascii() or not secret.isprintable()
    ):
        raise BadRequest("retry_secret", f"must be {MIN_RETRY_SECRET_BYTES}..{MAX_ID_BYTES} bytes of printable ASCII")
    if not shared_principal:
        return ""
    return "sha256:" + hashlib.sha256(secret.encode()).hexdigest() if secret else None


def renew_ttl_s(request: pb.RenewRequest) -> float | None:
    return duration_s(request.ttl, "ttl") if request.HasField("ttl") else None


def release_detail(detail: str) -> str:
    return _text(detail, "detail", MAX_DETAIL_BYTES)


def approve_retry(request: pb.ApproveRetryRequest) -> model.ApproveRetry:
    return model.ApproveRetry(
        task_key(request.task_key),
        _text(request.approver, "approver"),
        _text(request.reason, "reason", MAX_DETAIL_BYTES),
    )


def force_release(request: pb.ForceReleaseRequest) -> model.ForceRelease:
    return model.ForceRelease(
        task_key(request.task_key),
        _text(request.operator, "operator"),
        _text(request.reason, "reason", MAX_DETAIL_BYTES),
    )


def guard_states(values: Iterable[int]) -> frozenset[GuardState]:
    return frozenset(GuardState(_enum(value, "states", _GUARD_STATE_NAMES)) for value in values)


def guard_query(request: pb.ListGuardsRequest) -> GuardQuery:
    return GuardQuery(
        prefix=key_prefix(request.key_prefix),
        after=decode_page_token(request.page_token),
        size=page_size(request.page_size),
        states=guard_states(request.states),
        stale_only=request.stale_only,
    )


def page_size(value: int) -> int:
    if value > MAX_PAGE_SIZE:
        raise BadRequest("page_size", f"must be at most {MAX_PAGE_SIZE}")
    return value or DEFAULT_PAGE_SIZE


def encode_page_token(last_key: str) -> str:
    return base64.urlsafe_b64encode(last_key.encode()).decode()


def decode_page_token(token: str) -> str:
    if not token:
        return ""
    try:
        return task_key(base64.urlsafe_b64decode(token.encode()).decode(), "page_token")
    except (binascii.Error, UnicodeError, ValueError, BadRequest):
        raise BadRequest("page_token", "is not a token this server issued") from None


# --- rendering ----------------------------------------------------------------------


def _timestamp(value: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def guard(record: GuardRecord, stale: bool, stale_run: Callable[[GuardRecord], bool] | None = None) -> pb.Guard:
    """``record`` as the wire has it; ``stale_run`` says which of a semaphore's other runs are stale."""
    message = pb.Guard(
        task_key=record.task_key,
        session_key=record.session_key,
        task_name=record.task_name,
        state=cast(pb.GuardState, int(record.state)),
        run_id=record.run_id,
        holder=record.holder,
        started_at=_timestamp(record.started_at),
        fencing_token=record.fencing_token,
        attempt=record.attempt,
        last_status=cast(pb.RunStatus, int(record.last_status)),
        last_detail=record.last_detail,
        duplicate_count=record.duplicate_count,
        stream_bound=record.stream_bound,
        labels=dict(record.labels),
        revision=record.revision,
        heartbeat_at=_timestamp(record.heartbeat_at),
        stale=stale,
        approved_by=record.approved_by,
        approval_reason=record.approval_reason,
        released_by=record.released_by,
    )
    if record.expires_at is not None:
        message.expires_at.CopyFrom(_timestamp(record.expires_at))
    if record.released_at is not None:
        message.released_at.CopyFrom(_timestamp(record.released_at))
    if record.ttl_s is not None:
        message.ttl.FromNanoseconds(round(record.ttl_s * 1e9))
    if record.lock_delay_until is not None:
        message.lock_delay_until.CopyFrom(_timestamp(record.lock_delay_until))
    if record.hold_until is not None:
        message.hold_until.CopyFrom(_timestamp(record.hold_until))
    for waiting in record.waiters:
        message.waiters.append(waiter(waiting))
    if record.running and record.stop_requested_by:
        message.stop_requested_by = record.stop_requested_by
        if record.stop_until is not None:
            message.stop_at.CopyFrom(_timestamp(record.stop_until))
    for run in record.holders:
        message.holders.append(holder(run, stale_run(run) if stale_run is not None else False))
    return message


def holder(run: GuardRecord, stale: bool) -> pb.Holder:
    message = pb.Holder(
        run_id=run.run_id,
        holder=run.holder,
        fencing_token=run.fencing_token,
        attempt=run.attempt,
        started_at=_timestamp(run.started_at),
        heartbeat_at=_timestamp(run.heartbeat_at),
        stream_bound=run.stream_bound,
        labels=dict(run.labels),
        stale=stale,
    )
    if run.expires_at is not None:
        message.expires_at.CopyFrom(_timestamp(run.expires_at))
    return message


def waiter(waiting: model.Waiter) -> pb.Waiter:
    message = pb.Waiter(
        run_id=waiting.run_id,
        holder=waiting.acquire.holder,
        queued_at=_timestamp(waiting.queued_at),
        keep_newest=waiting.keep_newest,
        superseding=waiting.superseding,
    )
    if waiting.wait_until is not None:
        message.wait_until.CopyFrom(_timestamp(waiting.wait_until))
    return message


def key_policy(rule: model.KeyRule) -> pb.KeyPolicy:
    message = pb.KeyPolicy(
        rule=rule.name,
        match=rule.match,
        on_conflict=cast(pb.OnConflict, int(rule.on_conflict)),
        failure=cast(pb.FailureHandling, int(rule.failure)),
        abandoned_requires_approval=rule.abandoned_requires_approval,
        expired_requires_approval=rule.expired_requires_approval,
    )
    if rule.lock_delay_s > 0:
        message.lock_delay.FromNanoseconds(round(rule.lock_delay_s * 1e9))
    if rule.max_hold_s is not None:
        message.max_hold.FromNanoseconds(round(rule.max_hold_s * 1e9))
    message.max_queue = rule.max_queue
    if rule.max_wait_s is not None:
        message.max_wait.FromNanoseconds(round(rule.max_wait_s * 1e9))
    message.allow_supersede = rule.allow_supersede
    message.supersede_grace.FromNanoseconds(round(rule.supersede_grace_s * 1e9))
    message.max_holders = rule.max_holders
    return message


def outcome(value: Outcome) -> pb.AcquireOutcome:
    return cast(pb.AcquireOutcome, int(value))


def guard_event(event: Event, stale: bool, stale_run: Callable[[GuardRecord], bool] | None = None) -> pb.GuardEvent:
    return pb.GuardEvent(
        revision=event.revision,
        type=cast(pb.GuardEventType, int(event.type)),
        guard=guard(event.guard, stale, stale_run),
        trigger_run_id=event.trigger_run_id,
        trigger_holder=event.trigger_holder,
        occurred_at=_timestamp(event.occurred_at),
        actor=event.actor,
        reason=event.reason,
        waiter_run_id=event.waiter_run_id,
    )


# --- watch framing ---------------------------------------------------------------------

# Encoded events kept for watchers that are a little behind the others.
_ENCODED_EVENTS_KEPT = 4096


class EventEncoder:
    """Each committed event as wire bytes, built once however many watchers send it."""

    def __init__(self, is_stale: Callable[[GuardRecord], bool]) -> None:
        self._is_stale = is_stale
        self._encoded: OrderedDict[int, tuple[Event, bytes]] = OrderedDict()

    def event(self, event: Event) -> bytes:
        """A GuardEvent message's bytes."""
        key = id(event)
        cached = self._encoded.get(key)
        if cached is not None and cached[0] is event:
            return cached[1]
        encoded = guard_event(event, self._is_stale(event.guard), self._is_stale).SerializeToString()
        # Holding the event keeps its id from being reused while it is cached.
        self._encoded[key] = (event, encoded)
        if len(self._encoded) > _ENCODED_EVENTS_KEPT:
            self._encoded.popitem(last=False)
        return encoded

    def batch(self, events: Iterable[Event]) -> bytes:
        """A GuardEventBatch message's bytes: a repeated field's entries concatenate, so the batch is
        its events' cached bytes, each framed as field 1 (length-delimited)."""
        return b"".join(b"\x0a" + _varint(len(encoded)) + encoded for encoded in map(self.event, events))


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)
