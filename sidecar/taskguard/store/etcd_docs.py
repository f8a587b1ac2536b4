"""The documents the etcd store keeps under its prefix, and the revisions its events carry.

Pure conversions between bytes and records or events; which document goes
where, and what a copy makes of it, is the store's business (``etcd.py``).

Revisions: etcd's revision is global and rises across hosts, and one put of
``r/`` can carry many events, so the revision a watcher sees is
``etcd_revision << 16 | index``; ``Guard.revision`` lives in the same space.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from taskguard.guard.model import Event, EventType, GuardRecord, Instant
from taskguard.store import codec

SHIFT = 16

Localize = Callable[[GuardRecord], GuardRecord]


def encode_revision(etcd_revision: int, index: int = 0) -> int:
    return (etcd_revision << SHIFT) | index


def etcd_revision_of(revision: int) -> int:
    return revision >> SHIFT


def _at(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


# --- g/<task_key>: the guard after its last state change ---------------------------------------------


# A run's last deadline move: the etcd revision that made it (0 in a document: that document's own) and the
# sidecar that made it, which keeps that run's TTL deadline on its own monotonic clock.
Move = tuple[int, str]


@dataclass(frozen=True, slots=True)
class GuardMeta:
    """What a g/ document says beside the guard: who wrote it, and what it knew of each running run's deadline."""

    # The sidecar that committed the state change; "" when unknown.
    host: str
    # Each running run's last deadline move, by fencing token (see ``Move``). None in documents older than
    # semaphores: their one run's deadline is the writer's.
    moves: Mapping[int, Move] | None = None
    # What was left of the key's lock-delay when it was written (its writer's clock), if one runs.
    lock_delay_s: float | None = None
    # What was left then of each waiter's max_wait (by run id), and of a superseded run's grace: a copy counts
    # them from when it learns of them (late, never early), not from another host's wall clock.
    waits: Mapping[str, float] | None = None
    stop_left_s: float | None = None

    def move_of(self, fencing_token: int, mod_revision: int) -> Move:
        """The last move of a running run's deadline this document knows of."""
        move = self.moves.get(fencing_token) if self.moves is not None else None
        if move is None:
            return mod_revision, self.host
        return (move[0] or mod_revision), move[1]


@dataclass(frozen=True, slots=True)
class GuardDoc:
    record: GuardRecord
    events: list[Event]
    meta: GuardMeta
    # Lease ids of the runs before this one whose snapshots are kept under l/, newest first.
    runs: tuple[str, ...] = ()

    @property
    def host(self) -> str:
        return self.meta.host


# A semaphore's change can make an event per run (a force-release, a queue filling every place), each with the
# key's other runs and its queue: N events of N runs each would outgrow etcd's request limit. The events' guards
# of such a document name their holders and waiters by their place in tables the document shares ("shared").
_SHARED = ("holders", "waiters")


class _Shared:
    def __init__(self) -> None:
        self.tables: dict[str, list[Any]] = {field: [] for field in _SHARED}
        self._places: dict[str, dict[str, int]] = {field: {} for field in _SHARED}

    def compact(self, guard: dict[str, Any]) -> dict[str, Any]:
        for field in _SHARED:
            entries = guard.get(field)
            if entries:
                guard[field] = [self._place(field, entry) for entry in entries]
        return guard

    def _place(self, field: str, entry: Any) -> int:
        text = codec.dumps(entry)
        places = self._places[field]
        if text not in places:
            places[text] = len(places)
            self.tables[field].append(entry)
        return places[text]


def _expanded(guard: dict[str, Any], shared: dict[str, list[Any]]) -> dict[str, Any]:
    for field in _SHARED:
        entries = guard.get(field)
        if entries and field in shared:
            guard[field] = [shared[field][entry] if isinstance(entry, int) else entry for entry in entries]
    return guard


def _event_doc(event: Event, with_guard: bool, shared: _Shared | None) -> dict[str, Any]:
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
        guard = codec.record_to_doc(event.guard)
        doc["guard"] = shared.compact(guard) if shared is not None else guard
    return doc


def encode_guard(
    record: GuardRecord, events: Sequence[Event], meta: GuardMeta, runs: Sequence[str], slot: int
) -> bytes:
    """An event's guard that is the record itself (the last event's, unless it is about another of a
    semaphore's runs) is not written twice.

    ``slot``: the number of the first event within its etcd revision (a transaction writes many guards).
    """
    last = len(events) - 1
    semaphore = bool(record.holders or record.tokens_issued or any(event.guard.holders for event in events))
    shared = _Shared() if semaphore else None
    document: dict[str, Any] = {
        "slot": slot,
        "record": codec.record_to_doc(record),
        "events": [
            _event_doc(event, index != last or not _is_record(event.guard, record), shared)
            for index, event in enumerate(events)
        ],
        "host": meta.host,
        "runs": list(runs),
    }
    if shared is not None and any(shared.tables.values()):
        document["shared"] = shared.tables
    if meta.moves is not None:
        document["moves"] = {str(token): [revision, host] for token, (revision, host) in sorted(meta.moves.items())}
    if meta.lock_delay_s is not None:
        document["lock_delay_s"] = meta.lock_delay_s
    if meta.waits:
        document["waits"] = dict(meta.waits)
    if meta.stop_left_s is not None:
        document["stop_left_s"] = meta.stop_left_s
    return codec.dumps(document).encode()


def _is_record(guard: GuardRecord, record: GuardRecord) -> bool:
    return guard is record or guard == record


def _meta_from(document: dict[str, Any]) -> GuardMeta:
    moves = document.get("moves")
    lock_delay_s = document.get("lock_delay_s")
    stop_left_s = document.get("stop_left_s")
    return GuardMeta(
        host=str(document.get("host", "")),
        moves=(
            {int(token): (int(move[0]), str(move[1])) for token, move in moves.items()} if moves is not None else None
        ),
        lock_delay_s=float(lock_delay_s) if lock_delay_s is not None else None,
        waits={str(run_id): float(left) for run_id, left in document.get("waits", {}).items()},
        stop_left_s=float(stop_left_s) if stop_left_s is not None else None,
    )


def decode_guard(
    value: bytes, mod_revision: int, now: Instant, localize_for: Callable[[GuardMeta], Localize]
) -> GuardDoc:
    """The guard and its events, stamped with revisions and localized (given what the document says).

    Every event's guard has the revision of the guard after the change (a transaction's are stamped alike).
    """
    document = codec.loads(value)
    meta = _meta_from(document)
    slot = int(document.get("slot", 0))
    localize = localize_for(meta)
    raw_events = document.get("events", [])
    last = len(raw_events) - 1
    revision = encode_revision(mod_revision, slot + max(last, 0))
    record = localize(replace(codec.record_from_doc(document["record"], now), revision=revision))
    shared = document.get("shared", {})
    events = []
    for index, raw in enumerate(raw_events):
        guard = record
        if "guard" in raw:
            guard_doc = _expanded(raw["guard"], shared)
            guard = localize(replace(codec.record_from_doc(guard_doc, now), revision=revision))
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
    return GuardDoc(record, events, meta, tuple(document.get("runs", ())))


# --- l/<lease_id>: a past run's last snapshot -----------------------------------------------------------


def encode_run(record: GuardRecord) -> bytes:
    return codec.dumps(codec.record_to_doc(record)).encode()


def decode_run(value: bytes, now: Instant) -> GuardRecord:
    return codec.record_from_doc(codec.loads(value), now)


# --- r/<task_key>: refusals since the last put -------------------------------------------------------------


def encode_refusals(events: Sequence[Event]) -> bytes:
    # Each refusal keeps the run and the count it saw: a put may span a run's end. A count is the key's since
    # its newest run started (``newest_token``), whichever of a semaphore's runs the refusal names.
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
                "newest_token": event.guard.newest_token,
            }
            for event in events
        ],
    }
    return codec.dumps(document).encode()


def _refused_by(record: GuardRecord, raw: dict[str, Any]) -> GuardRecord:
    """The guard a refusal names: the record, or a record of the semaphore's run in the way (every run of the
    key still in it, as the core's own events about one run have it)."""
    token = int(raw["fencing_token"])
    count = int(raw["duplicate_count"])
    if token == record.fencing_token or not (record.holders or record.tokens_issued):
        return replace(record, fencing_token=token, run_id=raw.get("run_id", record.run_id), duplicate_count=count)
    holder = next((run for run in record.holders if run.fencing_token == token), None)
    if holder is None:
        # A run no longer in the record: the guard as it stands (a record naming a run that left it would
        # leave out one that still holds the key).
        return replace(record, duplicate_count=count)
    return replace(record.view_of(holder), duplicate_count=count)


@dataclass(frozen=True, slots=True)
class Refusals:
    events: list[Event]
    # The highest count among them of refusals since ``record``'s newest run started (counts of older runs'
    # times say nothing about it).
    counted: int


def decode_refusals(value: bytes, mod_revision: int, record: GuardRecord) -> Refusals:
    """The refusals an r/ put carries, each with the guard as it stood (the run in the way, its count)."""
    document = codec.loads(value)
    events = []
    counted = 0
    for index, raw in enumerate(document["events"]):
        newest = raw.get("newest_token")
        # Written before semaphores: a count is its record's own run's.
        if newest is not None:
            current = int(newest) == record.newest_token
        else:
            current = int(raw["fencing_token"]) == record.fencing_token
        if current:
            counted = max(counted, int(raw["duplicate_count"]))
        events.append(
            Event(
                type=EventType[raw["type"]],
                guard=_refused_by(record, raw),
                occurred_at=datetime.fromisoformat(raw["occurred_at"]),
                trigger_run_id=raw["trigger_run_id"],
                trigger_holder=raw["trigger_holder"],
                revision=encode_revision(mod_revision, index),
            )
        )
    return Refusals(events, counted)


# --- h/<task_key>: a Hold's last heartbeat ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Beat:
    fencing_token: int
    heartbeat_at: datetime | None
    expires_at: datetime | None


@dataclass(frozen=True, slots=True)
class HeartbeatDoc:
    host: str
    # One per run of the key this sidecar heartbeated since its last put (a semaphore's runs each have one).
    beats: tuple[Beat, ...]


def _beat_doc(record: GuardRecord) -> dict[str, Any]:
    return {
        "fencing_token": record.fencing_token,
        "heartbeat_at": record.heartbeat_at.isoformat(),
        "expires_at": record.expires_at.isoformat() if record.expires_at else None,
    }


def encode_heartbeat(runs: Sequence[GuardRecord], host: str) -> bytes:
    """The first run's beat at the top (as written before semaphores), every run's under ``beats``."""
    document = {**_beat_doc(runs[0]), "host": host}
    if len(runs) > 1:
        document["beats"] = [_beat_doc(run) for run in runs]
    return codec.dumps(document).encode()


def decode_heartbeat(value: bytes) -> HeartbeatDoc:
    document = codec.loads(value)
    beats = tuple(
        Beat(int(beat["fencing_token"]), _at(beat.get("heartbeat_at")), _at(beat.get("expires_at")))
        for beat in document.get("beats", [document])
    )
    return HeartbeatDoc(str(document.get("host", "")), beats)


# --- o/<task_key>\x1f<fencing_token> and s/<host_id> ----------------------------------------------------

# Task keys are printable, so this never occurs in one: an owner key's name says its key and run unambiguously.
# (Written before semaphores, an owner key was named by its task key alone: ``owner_task_key`` reads both.)
OWNER_SEPARATOR = "\x1f"


def owner_name(task_key: str, fencing_token: int) -> str:
    """The name (under o/) of the owner key of ``task_key``'s run ``fencing_token``."""
    return f"{task_key}{OWNER_SEPARATOR}{fencing_token}"


def owner_task_key(name: str) -> str:
    return name.partition(OWNER_SEPARATOR)[0]


def encode_owner(fencing_token: int, host: str) -> bytes:
    return codec.dumps({"fencing_token": fencing_token, "host": host}).encode()


def owner_token(value: bytes) -> int:
    return int(codec.loads(value)["fencing_token"])


def encode_presence(host: str) -> bytes:
    return codec.dumps({"host": host}).encode()
