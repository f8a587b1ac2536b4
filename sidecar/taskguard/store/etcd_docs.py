"""The documents the etcd store keeps under its prefix, and the revisions its events carry.

Pure conversions between bytes and records or events; which document goes
where, and what a copy makes of it, is the store's business (``etcd.py``).

Revisions: etcd's revision is global and rises across hosts, and one put of
``r/`` can carry many events, so the revision a watcher sees is
``etcd_revision << 16 | index``; ``Guard.revision`` lives in the same space.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from taskguard.guard.model import Event, EventType, GuardRecord, Instant
from taskguard.store import codec

SHIFT = 16

Localize = Callable[[GuardRecord], GuardRecord]
# Given the sidecar that wrote a guard, how to set what only this process can know (its monotonic fields).
LocalizeFor = Callable[[str], Localize]


def encode_revision(etcd_revision: int, index: int = 0) -> int:
    return (etcd_revision << SHIFT) | index


def etcd_revision_of(revision: int) -> int:
    return revision >> SHIFT


def _at(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


# --- g/<task_key>: the guard after its last state change ---------------------------------------------


@dataclass(frozen=True, slots=True)
class GuardDoc:
    record: GuardRecord
    events: list[Event]
    # The sidecar that committed the state change (and keeps its TTL deadline); "" when unknown.
    host: str
    # Lease ids of the runs before this one whose snapshots are kept under l/, newest first.
    runs: tuple[str, ...]


def _event_doc(event: Event, with_guard: bool) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "type": event.type.name,
        "occurred_at": event.occurred_at.isoformat(),
        "trigger_run_id": event.trigger_run_id,
        "trigger_holder": event.trigger_holder,
        "actor": event.actor,
        "reason": event.reason,
        "waiter_run_id": event.waiter_run_id,
    }
    if with_guard:
        doc["guard"] = codec.record_to_doc(event.guard)
    return doc


def encode_guard(record: GuardRecord, events: Sequence[Event], host: str, runs: Sequence[str], slot: int) -> bytes:
    """The last event's guard is the record itself, so it is not written twice.

    ``slot``: the number of the first event within its etcd revision (a transaction writes many guards).
    """
    last = len(events) - 1
    document = {
        "slot": slot,
        "record": codec.record_to_doc(record),
        "events": [_event_doc(event, with_guard=index != last) for index, event in enumerate(events)],
        "host": host,
        "runs": list(runs),
    }
    return codec.dumps(document).encode()


def decode_guard(value: bytes, mod_revision: int, now: Instant, localize_for: LocalizeFor) -> GuardDoc:
    """The guard and its events, stamped with revisions and localized."""
    document = codec.loads(value)
    host = str(document.get("host", ""))
    slot = int(document.get("slot", 0))
    localize = localize_for(host)
    raw_events = document.get("events", [])
    last = len(raw_events) - 1
    record = codec.record_from_doc(document["record"], now)
    record = localize(replace(record, revision=encode_revision(mod_revision, slot + max(last, 0))))
    events = []
    for index, raw in enumerate(raw_events):
        guard = record if index == last else localize(codec.record_from_doc(raw["guard"], now))
        events.append(
            Event(
                type=EventType[raw["type"]],
                guard=guard,
                occurred_at=datetime.fromisoformat(raw["occurred_at"]),
                trigger_run_id=raw.get("trigger_run_id", ""),
                trigger_holder=raw.get("trigger_holder", ""),
                actor=raw.get("actor", ""),
                reason=raw.get("reason", ""),
                waiter_run_id=raw.get("waiter_run_id", ""),
                revision=encode_revision(mod_revision, slot + index),
            )
        )
    return GuardDoc(record, events, host, tuple(document.get("runs", ())))


# --- l/<lease_id>: a past run's last snapshot -----------------------------------------------------------


def encode_run(record: GuardRecord) -> bytes:
    return codec.dumps(codec.record_to_doc(record)).encode()


def decode_run(value: bytes, now: Instant) -> GuardRecord:
    return codec.record_from_doc(codec.loads(value), now)


# --- r/<task_key>: refusals since the last put -------------------------------------------------------------


def encode_refusals(events: Sequence[Event]) -> bytes:
    # Each refusal keeps the run and the count it saw: a put may span a run's end.
    document = {
        "fencing_token": events[-1].guard.fencing_token,
        "events": [
            {
                "type": event.type.name,
                "occurred_at": event.occurred_at.isoformat(),
                "trigger_run_id": event.trigger_run_id,
                "trigger_holder": event.trigger_holder,
                "fencing_token": event.guard.fencing_token,
                "run_id": event.guard.run_id,
                "duplicate_count": event.guard.duplicate_count,
            }
            for event in events
        ],
    }
    return codec.dumps(document).encode()


def decode_refusals(value: bytes, mod_revision: int, record: GuardRecord) -> list[Event]:
    """The refusals an r/ put carries, each with the guard as it stood (the run in the way, its count)."""
    document = codec.loads(value)
    events = []
    for index, raw in enumerate(document["events"]):
        snapshot = replace(
            record,
            fencing_token=int(raw["fencing_token"]),
            run_id=raw.get("run_id", record.run_id),
            duplicate_count=int(raw["duplicate_count"]),
        )
        events.append(
            Event(
                type=EventType[raw["type"]],
                guard=snapshot,
                occurred_at=datetime.fromisoformat(raw["occurred_at"]),
                trigger_run_id=raw["trigger_run_id"],
                trigger_holder=raw["trigger_holder"],
                revision=encode_revision(mod_revision, index),
            )
        )
    return events


# --- h/<task_key>: a Hold's last heartbeat ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HeartbeatDoc:
    fencing_token: int
    heartbeat_at: datetime | None
    expires_at: datetime | None
    host: str


def encode_heartbeat(record: GuardRecord, host: str) -> bytes:
    document = {
        "fencing_token": record.fencing_token,
        "heartbeat_at": record.heartbeat_at.isoformat(),
        "expires_at": record.expires_at.isoformat() if record.expires_at else None,
        "host": host,
    }
    return codec.dumps(document).encode()


def decode_heartbeat(value: bytes) -> HeartbeatDoc:
    document = codec.loads(value)
    return HeartbeatDoc(
        int(document["fencing_token"]),
        _at(document.get("heartbeat_at")),
        _at(document.get("expires_at")),
        str(document.get("host", "")),
    )


# --- o/<task_key> and s/<host_id> ---------------------------------------------------------------------------


def encode_owner(fencing_token: int, host: str) -> bytes:
    return codec.dumps({"fencing_token": fencing_token, "host": host}).encode()


def owner_token(value: bytes) -> int:
    return int(codec.loads(value)["fencing_token"])


def encode_presence(host: str) -> bytes:
    return codec.dumps({"host": host}).encode()
