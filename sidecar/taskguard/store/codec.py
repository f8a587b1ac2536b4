"""Records and events as JSON documents, for backends that store bytes."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime
from typing import Any

from taskguard.clock import to_monotonic
from taskguard.guard.model import (
    Acquire,
    ConflictPolicy,
    Event,
    EventType,
    GuardRecord,
    GuardState,
    Instant,
    RunStatus,
    Waiter,
)


def _at(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _parse_at(value: Any) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def record_to_doc(record: GuardRecord) -> dict[str, Any]:
    # Monotonic fields are process-local, so only their UTC twins are stored.
    doc = _run_to_doc(record)
    # A semaphore's: a single run's document has neither.
    if record.holders:
        doc["holders"] = [_run_to_doc(holder) for holder in record.holders]
    if record.tokens_issued:
        doc["tokens_issued"] = record.tokens_issued
    return doc


def _run_to_doc(record: GuardRecord) -> dict[str, Any]:
    return {
        "task_key": record.task_key,
        "state": record.state.name,
        "run_id": record.run_id,
        "holder": record.holder,
        "lease_id": record.lease_id,
        "fencing_token": record.fencing_token,
        "attempt": record.attempt,
        "started_at": _at(record.started_at),
        "heartbeat_at": _at(record.heartbeat_at),
        "ttl_s": record.ttl_s,
        "expires_at": _at(record.expires_at),
        "running_deadline": record.expires_deadline is not None,
        "stream_bound": record.stream_bound,
        "labels": dict(record.labels),
        "last_status": record.last_status.name,
        "last_detail": record.last_detail,
        "released_at": _at(record.released_at),
        "released_by": record.released_by,
        "duplicate_count": record.duplicate_count,
        "approved_by": record.approved_by,
        "approval_reason": record.approval_reason,
        "trace_context": record.trace_context,
        "principal": record.principal,
        "retry_key": record.retry_key,
        "revision": record.revision,
        "lock_delay_until": _at(record.lock_delay_until),
        "hold_until": _at(record.hold_until),
        "waiters": [_waiter_to_doc(waiter) for waiter in record.waiters],
        "claimed": record.claimed,
        "stop_requested_by": record.stop_requested_by,
        "stop_until": _at(record.stop_until),
    }


def _waiter_to_doc(waiter: Waiter) -> dict[str, Any]:
    cmd = waiter.acquire
    return {
        "run_id": cmd.run_id,
        "holder": cmd.holder,
        "ttl_s": cmd.ttl_s,
        "lease_id": cmd.lease_id,
        "stream_bound": cmd.stream_bound,
        "labels": dict(cmd.labels),
        "trace_context": cmd.trace_context,
        "principal": cmd.principal,
        "retry_key": cmd.retry_key,
        "on_conflict": cmd.on_conflict.name if cmd.on_conflict is not None else None,
        "max_wait_s": cmd.max_wait_s,
        "queued_at": _at(waiter.queued_at),
        "keep_newest": waiter.keep_newest,
        "superseding": waiter.superseding,
        "wait_until": _at(waiter.wait_until),
        **({"host": cmd.host} if cmd.host else {}),
    }


def _waiter_from_doc(task_key: str, doc: dict[str, Any], now: Instant) -> Waiter:
    queued_at = _parse_at(doc["queued_at"])
    wait_until = _parse_at(doc["wait_until"])
    assert queued_at is not None
    on_conflict = doc["on_conflict"]
    acquire = Acquire(
        task_key=task_key,
        run_id=doc["run_id"],
        holder=doc["holder"],
        ttl_s=doc["ttl_s"],
        lease_id=doc["lease_id"],
        stream_bound=bool(doc["stream_bound"]),
        labels=tuple(sorted(doc["labels"].items())),
        trace_context=doc["trace_context"],
        principal=doc["principal"],
        retry_key=doc["retry_key"],
        on_conflict=ConflictPolicy[on_conflict] if on_conflict is not None else None,
        max_wait_s=doc["max_wait_s"],
        host=doc.get("host", ""),
    )
    return Waiter(
        acquire,
        queued_at,
        keep_newest=bool(doc["keep_newest"]),
        superseding=bool(doc.get("superseding", False)),
        wait_until=wait_until,
        wait_deadline=to_monotonic(wait_until, now) if wait_until is not None else None,
    )


def record_from_doc(doc: dict[str, Any], now: Instant) -> GuardRecord:
    record = _run_from_doc(doc, now)
    if "holders" not in doc and "tokens_issued" not in doc:
        return record
    return replace(
        record,
        holders=tuple(_run_from_doc(holder, now) for holder in doc.get("holders", ())),
        tokens_issued=int(doc.get("tokens_issued", 0)),
    )


def _run_from_doc(doc: dict[str, Any], now: Instant) -> GuardRecord:
    heartbeat_at = _parse_at(doc["heartbeat_at"])
    started_at = _parse_at(doc["started_at"])
    expires_at = _parse_at(doc["expires_at"])
    # Written since per-key rules; older documents have neither.
    lock_delay_until = _parse_at(doc.get("lock_delay_until"))
    hold_until = _parse_at(doc.get("hold_until"))
    stop_until = _parse_at(doc.get("stop_until"))
    running = doc["state"] == GuardState.RUNNING.name
    assert heartbeat_at is not None and started_at is not None
    return GuardRecord(
        task_key=doc["task_key"],
        state=GuardState[doc["state"]],
        run_id=doc["run_id"],
        holder=doc["holder"],
        lease_id=doc["lease_id"],
        fencing_token=int(doc["fencing_token"]),
        attempt=int(doc["attempt"]),
        started_at=started_at,
        heartbeat_at=heartbeat_at,
        last_seen=to_monotonic(heartbeat_at, now),
        ttl_s=doc["ttl_s"],
        expires_at=expires_at,
        expires_deadline=(
            to_monotonic(expires_at, now) if expires_at is not None and doc["running_deadline"] else None
        ),
        stream_bound=bool(doc["stream_bound"]),
        labels=tuple(sorted(doc["labels"].items())),
        last_status=RunStatus[doc["last_status"]],
        last_detail=doc["last_detail"],
        released_at=_parse_at(doc["released_at"]),
        released_by=doc["released_by"],
        duplicate_count=int(doc["duplicate_count"]),
        approved_by=doc["approved_by"],
        approval_reason=doc["approval_reason"],
        trace_context=doc["trace_context"],
        principal=doc.get("principal", ""),
        # Runs stored before retry keys: their principal alone stood for the caller.
        retry_key=doc.get("retry_key", ""),
        revision=int(doc["revision"]),
        lock_delay_until=lock_delay_until,
        lock_delay_deadline=to_monotonic(lock_delay_until, now) if lock_delay_until is not None else None,
        hold_until=hold_until,
        hold_deadline=to_monotonic(hold_until, now) if hold_until is not None and running else None,
        # Written since queues; older documents have none.
        waiters=tuple(_waiter_from_doc(doc["task_key"], waiter, now) for waiter in doc.get("waiters", ())),
        claimed=bool(doc.get("claimed", True)),
        stop_requested_by=doc.get("stop_requested_by", ""),
        stop_until=stop_until,
        stop_deadline=to_monotonic(stop_until, now) if stop_until is not None and running else None,
    )


def event_to_doc(event: Event) -> dict[str, Any]:
    return {
        "type": event.type.name,
        "guard": record_to_doc(event.guard),
        "occurred_at": _at(event.occurred_at),
        "trigger_run_id": event.trigger_run_id,
        "trigger_holder": event.trigger_holder,
        "actor": event.actor,
        "reason": event.reason,
        "waiter_run_id": event.waiter_run_id,
        "revision": event.revision,
    }


def event_from_doc(doc: dict[str, Any], now: Instant) -> Event:
    occurred_at = _parse_at(doc["occurred_at"])
    assert occurred_at is not None
    return Event(
        type=EventType[doc["type"]],
        guard=record_from_doc(doc["guard"], now),
        occurred_at=occurred_at,
        trigger_run_id=doc["trigger_run_id"],
        trigger_holder=doc["trigger_holder"],
        actor=doc["actor"],
        reason=doc["reason"],
        waiter_run_id=doc.get("waiter_run_id", ""),
        revision=int(doc["revision"]),
    )


def dumps(doc: Any) -> str:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False)


def encode_record(record: GuardRecord) -> str:
    """``dumps(record_to_doc(record))``, with each waiter encoded once for all the commits that carry it: a
    queue of N waiters is in every commit and event of its key, and encoding it afresh each time cost O(N)
    dictionaries per commit."""
    return _dumps_with_raw(_record_doc_raw(record))


def encode_event(event: Event) -> str:
    """``dumps(event_to_doc(event))``, its guard's waiters encoded once (see ``encode_record``)."""
    doc = event_to_doc(replace(event, guard=_without_waiters(event.guard)))
    doc["guard"] = _Raw(_dumps_with_raw(_record_doc_raw(event.guard)))
    return _dumps_with_raw(doc)


def _record_doc_raw(record: GuardRecord) -> dict[str, Any]:
    doc = record_to_doc(_without_waiters(record))
    doc["waiters"] = _Raw("[" + ",".join(_encoded_waiter(waiter) for waiter in record.waiters) + "]")
    return doc


def _without_waiters(record: GuardRecord) -> GuardRecord:
    return replace(record, waiters=()) if record.waiters else record


class _Raw(str):
    """Text already encoded as JSON."""


def _dumps_with_raw(doc: dict[str, Any]) -> str:
    """``dumps(doc)`` for a document whose values may be ``_Raw`` (written as they are)."""
    return (
        "{"
        + ",".join(f"{dumps(key)}:{value if isinstance(value, _Raw) else dumps(value)}" for key, value in doc.items())
        + "}"
    )


# Waiters are immutable and shared between the records of their key (a queue moves by slicing its tuple):
# each one's JSON is kept while it may still be written, keyed by identity.
_WAITERS_KEPT = 8192
_encoded_waiters: dict[int, tuple[Waiter, str]] = {}


def _encoded_waiter(waiter: Waiter) -> str:
    kept = _encoded_waiters.get(id(waiter))
    if kept is not None and kept[0] is waiter:
        return kept[1]
    text = dumps(_waiter_to_doc(waiter))
    if len(_encoded_waiters) >= _WAITERS_KEPT:
        _encoded_waiters.pop(next(iter(_encoded_waiters)))
    _encoded_waiters[id(waiter)] = (waiter, text)
    return text


def loads(text: str | bytes) -> dict[str, Any]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError("stored document is not an object")
    return value
