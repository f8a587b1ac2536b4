"""The etcd store: one guard space shared by the sidecars of many hosts.

Layout under the prefix (default ``/taskguard/``):

* ``g/<task_key>``: the guard, as ``{"record": ..., "events": [...]}``: the
  record after a state change and the event it made. Every state change is
  one transaction that compares the key's mod revision with the revision the
  decision was made on, so two sidecars racing on a key get exactly one
  winner. The same transaction writes:
* ``l/<lease_id>``: the last snapshot of the run a lease was minted for
  (``find_run``, so an old lease's release is still answered), and
* ``o/<task_key>``: the owner of a stream-bound run, attached to the etcd
  lease of the sidecar whose Hold stream holds it and kept alive by that
  sidecar; deleted when the run ends. When a whole sidecar dies or is cut
  off, etcd expires its lease and deletes these keys; every sidecar sees the
  deletes and the lease keeper turns them into ``Abandon`` commands (the
  first wins, the rest find the run already ended).

Refused triggers and heartbeats are not state changes, and not a write each:
they change this sidecar's copy at once and are written, one put per guard,
within ``LINGER_S``:

* ``r/<task_key>``: ``{"fencing_token", "duplicate_count", "events": [...]}``,
  the refusals since the last put. Watchers everywhere get them as
  DUPLICATE_REFUSED / RETRY_REFUSED events; the guard's revision (its last
  state change) does not move, as with SQLite.
* ``h/<task_key>``: ``{"fencing_token", "heartbeat_at", "expires_at"}``, so a
  Hold's heartbeats move the deadline every sidecar sees.

Revisions: etcd's revision is global and rises across hosts, and one put of
``r/`` can carry many events, so the revision a watcher sees is
``etcd_revision << 16 | index``; ``Guard.revision`` lives in the same space.
Fencing tokens stay the per-key counter kept in the record, written in the
state change's transaction.

Every sidecar keeps a copy of all guards, loaded at start in pages that all
read one revision and kept current by one etcd watch on the prefix from the
revision after; reads come from it. The copy can lag other
hosts by the watch's latency, which a transaction's compare catches: a lost
compare refreshes the key, and the engine decides again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any

from grpc import aio

from taskguard.clock import Clock, instant, to_monotonic
from taskguard.core import Durability, Event, EventType, GuardRecord, Instant
from taskguard.store import (
    Committed,
    GuardLost,
    RevisionCompacted,
    StoreConflict,
    StoreUnavailable,
    Write,
    codec,
)
from taskguard.store.etcd_client import RETRY_S, EtcdClient, EtcdSettings, range_end
from taskguard.store.etcdpb import etcdv3_pb2 as etcd
from taskguard.store.index import GuardIndex, IndexedStore

__all__ = ["EtcdSettings", "EtcdStore", "encode_revision", "etcd_revision_of"]

log = logging.getLogger(__name__)

SHIFT = 16
LINGER_S = 0.2
# Refusals in one put at most: well inside etcd's request size limit.
MAX_REFUSALS_PER_PUT = 2000

OwnerLossHandler = Callable[[str, int], None]


def encode_revision(etcd_revision: int, index: int = 0) -> int:
    return (etcd_revision << SHIFT) | index


def etcd_revision_of(revision: int) -> int:
    return revision >> SHIFT


def _at(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


class EtcdStore(IndexedStore):
    """Not safe to share across event loops."""

    def __init__(self, settings: EtcdSettings, clock: Clock) -> None:
        self._settings = settings
        self._clock = clock
        self._prefix = settings.prefix.encode()
        self._index = GuardIndex()
        self._mods: dict[str, int] = {}  # task key -> etcd mod revision of the g/ copy we hold
        self._refusals: defaultdict[str, list[Event]] = defaultdict(list)
        self._heartbeats: set[str] = set()
        self._flusher: asyncio.TimerHandle | None = None
        self._flushing: asyncio.Task[None] | None = None
        self._owner_loss: OwnerLossHandler | None = None
        self._lease_loss: Callable[[], None] | None = None
        self._etcd = EtcdClient(settings)
        self._lease_id = 0
        self._lease_alive = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._revision = 0  # the last event revision seen (the head a history read runs to)
        self._etcd_revision = 0  # the last etcd revision applied to the copy
        self._closing = False
        self.host_id = secrets.token_hex(6)
        self.transactions = 0

    # --- connection -------------------------------------------------------------------------

    def _key(self, kind: str, name: str = "") -> bytes:
        return self._prefix + f"{kind}/{name}".encode()

    def _kind(self, key: bytes) -> tuple[str, str]:
        kind, _, name = key[len(self._prefix) :].decode().partition("/")
        return kind, name

    async def open(self) -> None:
        await self._etcd.open()
        try:
            await self._grant_lease()
            await self._load()
        except aio.AioRpcError as error:
            await self._etcd.close()
            raise StoreUnavailable(f"etcd refused the sidecar: {error.code().name}: {error.details()}") from None
        except BaseException:
            await self._etcd.close()
            raise
        self._tasks.append(asyncio.create_task(self._keep_lease_alive(), name="taskguard-etcd-lease"))
        self._tasks.append(asyncio.create_task(self._follow(), name="taskguard-etcd-watch"))

    async def _grant_lease(self) -> None:
        reply = await self._etcd.call(
            self._etcd.lease.LeaseGrant, etcd.LeaseGrantRequest(TTL=self._settings.lease_ttl_s)
        )
        if reply.error:
            raise StoreUnavailable(f"etcd refused a lease: {reply.error}")
        self._lease_id = reply.ID
        self._lease_alive.set()

    async def _load(self) -> None:
        """Guards, then the refusals and heartbeats about them, as they all stood at one revision.

        Read in pages (a prefix grows past any one message), all at the
        revision of the first page; the watch follows from the revision after.
        Run snapshots (``l/``) are read only when asked for, never here.
        """
        now = instant(self._clock)
        revision = 0
        for kind in ("g", "h", "r"):
            async for at, kvs in self._etcd.pages(self._key(kind), revision):
                revision = at
                for kv in kvs:
                    if kind == "g":
                        record, _ = self._decode_guard(kv, now)
                        self._index.put(record)
                        self._mods[record.task_key] = kv.mod_revision
                        self._revision = max(self._revision, record.revision)
                    else:
                        for event in self._apply_side(kv, now):
                            self._revision = max(self._revision, event.revision)
        self._etcd_revision = revision

    async def close(self) -> None:
        with contextlib.suppress(StoreUnavailable):
            await self.flush()
        self._closing = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # The lease is left to expire rather than revoked: stream holders get its TTL to resume elsewhere.
        await self._etcd.close()

    # --- this sidecar's lease -----------------------------------------------------------------

    async def _keep_lease_alive(self) -> None:
        interval = max(self._settings.lease_ttl_s / 3, 0.5)
        while True:
            try:
                call = self._etcd.lease.LeaseKeepAlive(metadata=self._etcd.metadata)
                while True:
                    await call.write(etcd.LeaseKeepAliveRequest(ID=self._lease_id))
                    reply = await asyncio.wait_for(call.read(), self._settings.timeout_s)
                    if reply is aio.EOF or reply.TTL <= 0:
                        raise StoreUnavailable("this sidecar's etcd lease expired")
                    self._lease_alive.set()
                    await asyncio.sleep(interval)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.warning("etcd lease keep-alive failed: %s", error)
                if self._lease_alive.is_set():
                    self._lease_alive.clear()
                    if self._lease_loss is not None:
                        self._lease_loss()
                # The old lease may have expired: guards bound to it are gone or about to be, and
                # everyone learns it from the watch. Streams bound from now on use a new one.
                with contextlib.suppress(Exception):
                    await asyncio.sleep(RETRY_S[-1])
                    await self._grant_lease()

    @property
    def lease_alive(self) -> bool:
        return self._lease_alive.is_set()

    def set_owner_loss_handler(self, handler: OwnerLossHandler) -> None:
        self._owner_loss = handler

    def set_lease_loss_handler(self, handler: Callable[[], None]) -> None:
        self._lease_loss = handler

    # --- decoding ---------------------------------------------------------------------------

    def _decode_guard(self, kv: Any, now: Instant) -> tuple[GuardRecord, list[Event]]:
        document = codec.loads(kv.value)
        raw_events = document.get("events", [])
        last = encode_revision(kv.mod_revision, max(len(raw_events) - 1, 0))
        record = replace(codec.record_from_doc(document["record"], now), revision=last)
        events = []
        for index, raw in enumerate(raw_events):
            event = codec.event_from_doc(raw, now)
            guard = record if index == len(raw_events) - 1 else event.guard
            events.append(replace(event, revision=encode_revision(kv.mod_revision, index), guard=guard))
        return record, events

    def _apply_side(self, kv: Any, now: Instant) -> list[Event]:
        """Fold an r/ (refusals) or h/ (heartbeat) put into the copy; the refusal events it carries."""
        kind, task_key = self._kind(kv.key)
        record = self._index.get(task_key)
        document = codec.loads(kv.value)
        if record is None or (kind == "h" and record.fencing_token != int(document["fencing_token"])):
            return []  # about a run that is over (or not seen yet): nothing to fold
        if kind == "h":
            if record.running:
                expires_at = _at(document["expires_at"])
                heartbeat_at = _at(document["heartbeat_at"]) or record.heartbeat_at
                if heartbeat_at > record.heartbeat_at:
                    self._index.put(
                        replace(
                            record,
                            heartbeat_at=heartbeat_at,
                            last_seen=to_monotonic(heartbeat_at, now),
                            expires_at=expires_at,
                            expires_deadline=to_monotonic(expires_at, now) if expires_at else None,
                        )
                    )
            return []
        if kind != "r":
            return []
        events = self._refusal_events(kv, record)
        counted = max(
            (e.guard.duplicate_count for e in events if e.guard.fencing_token == record.fencing_token), default=0
        )
        if counted > record.duplicate_count:
            self._index.put(replace(record, duplicate_count=counted))
        return events

    @staticmethod
    def _refusal_events(kv: Any, record: GuardRecord) -> list[Event]:
        """The refusals an r/ put carries, each with the guard as it stood (the run in the way, its count)."""
        document = codec.loads(kv.value)
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
                    revision=encode_revision(kv.mod_revision, index),
                )
            )
        return events

    # --- following every host's changes -----------------------------------------------------

    async def _follow(self) -> None:
        attempt = 0
        while not self._closing:
            start = self._etcd_revision + 1
            create = etcd.WatchCreateRequest(
                key=self._prefix, range_end=range_end(self._prefix), start_revision=start, prev_kv=True, fragment=True
            )
            try:
                call = self._etcd.watch.Watch(metadata=self._etcd.metadata)
                await call.write(etcd.WatchRequest(create_request=create))
                async for response in call:
                    attempt = 0
                    if response.compact_revision:
                        log.error("etcd compacted past this sidecar's copy (revision %d); reloading", start)
                        await self._load()
                        break
                    if response.canceled:
                        raise StoreUnavailable(f"etcd cancelled the watch: {response.cancel_reason}")
                    self._apply(response.events)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.warning("etcd watch broke (%s); resuming from revision %d", error, self._etcd_revision + 1)
            attempt += 1
            await asyncio.sleep(RETRY_S[min(attempt, len(RETRY_S)) - 1])

    def _apply(self, changes: Sequence[Any]) -> None:
        now = instant(self._clock)
        published: list[Event] = []
        for change in changes:
            kv = change.kv
            self._etcd_revision = max(self._etcd_revision, kv.mod_revision)
            kind, task_key = self._kind(kv.key)
            if change.type == etcd.Event.DELETE:
                if kind == "o" and change.prev_kv.value and self._owner_loss is not None:
                    owner = codec.loads(change.prev_kv.value)
                    self._owner_loss(task_key, int(owner["fencing_token"]))
                continue
            if kind == "g":
                record, events = self._decode_guard(kv, now)
                if kv.mod_revision > self._mods.get(task_key, 0):
                    current = self._index.get(task_key)
                    if current is not None and current.fencing_token == record.fencing_token:
                        # Keep refusals counted here that are still on their way.
                        record = replace(record, duplicate_count=max(record.duplicate_count, current.duplicate_count))
                    self._index.put(record)
                    self._mods[task_key] = kv.mod_revision
                published.extend(events)
            elif kind in ("r", "h"):
                published.extend(self._apply_side(kv, now))
        fresh = [event for event in published if event.revision > self._revision]
        if fresh:
            self._revision = fresh[-1].revision
            self._index.publish(fresh)

    # --- reads --------------------------------------------------------------------------------

    async def find_run(self, lease_id: str) -> GuardRecord | None:
        current = self._current_run(lease_id)
        if current is not None:
            return current
        reply = await self._etcd.call(self._etcd.kv.Range, etcd.RangeRequest(key=self._key("l", lease_id)))
        if not reply.kvs:
            return None
        return codec.record_from_doc(codec.loads(reply.kvs[0].value), instant(self._clock))

    async def unowned_stream_guards(self) -> list[GuardRecord]:
        """RUNNING stream-bound guards whose owner key is gone (their sidecar died while none watched)."""
        owned: set[str] = set()
        async for _, kvs in self._etcd.pages(self._key("o"), keys_only=True):
            owned.update(self._kind(kv.key)[1] for kv in kvs)
        return [record for record in self._index.running() if record.stream_bound and record.task_key not in owned]

    async def events_since(self, revision: int, limit: int) -> list[Event]:
        """From etcd's history, through a short-lived watch, up to the head this sidecar has seen.

        The head is the revision of a g/ or r/ put, so the read ends when that put arrives.
        """
        revision = max(revision, 1)
        head = self._revision
        if revision > head:
            return []
        # etcd reads a start revision of 0 as "from now"; revision 1 is its first.
        create = etcd.WatchCreateRequest(
            key=self._prefix,
            range_end=range_end(self._prefix),
            start_revision=max(1, etcd_revision_of(revision)),
            fragment=True,
        )
        found: list[Event] = []
        now = instant(self._clock)
        call = self._etcd.watch.Watch(metadata=self._etcd.metadata)
        try:
            await call.write(etcd.WatchRequest(create_request=create))
            while len(found) < limit:
                response = await asyncio.wait_for(call.read(), self._settings.timeout_s)
                if response is aio.EOF:
                    raise StoreUnavailable("etcd ended the watch")
                if response.compact_revision:
                    raise RevisionCompacted(revision, encode_revision(response.compact_revision))
                if response.canceled:
                    raise StoreUnavailable(f"etcd cancelled the watch: {response.cancel_reason}")
                for change in response.events:
                    if change.type == etcd.Event.PUT:
                        found.extend(
                            event for event in self._history(change.kv, now) if revision <= event.revision <= head
                        )
                if response.events and response.events[-1].kv.mod_revision >= etcd_revision_of(head):
                    break
        except TimeoutError:
            raise StoreUnavailable("etcd did not answer the history read in time") from None
        except aio.AioRpcError as error:
            raise StoreUnavailable(f"etcd: {error.code().name}: {error.details()}") from None
        finally:
            call.cancel()
        return found[:limit]

    def _history(self, kv: Any, now: Instant) -> list[Event]:
        """The events a past put made, as they were (the copy is not touched)."""
        kind, task_key = self._kind(kv.key)
        if kind == "g":
            return self._decode_guard(kv, now)[1]
        if kind != "r":
            return []
        record = self._index.get(task_key)
        return self._refusal_events(kv, record) if record is not None else []

    @property
    def revision(self) -> int:
        return self._revision

    # --- writes ---------------------------------------------------------------------------------

    async def commit(self, write: Write) -> Committed:
        if self._closing:
            raise StoreUnavailable("the store is closed")
        key = write.record.task_key
        self._index.check(write)
        if write.durability is Durability.LAZY:
            self._index.put(write.record)
            self._refusals[key].extend(write.events)
            self._schedule_flush()
            return Committed(write.record, ())
        if write.durability is Durability.VOLATILE:
            if write.record.stream_bound and not self.lease_alive:
                raise GuardLost("this sidecar lost its etcd lease; its stream-bound guards may be taken elsewhere")
            self._index.put(write.record)
            self._heartbeats.add(key)
            self._schedule_flush()
            return Committed(write.record, ())
        reply = await self._transact(write.record, write.events, etcd_revision_of(write.expected_revision))
        revision = reply.header.revision
        record = replace(write.record, revision=encode_revision(revision, max(len(write.events) - 1, 0)))
        events = tuple(
            replace(event, revision=encode_revision(revision, index), guard=record)
            for index, event in enumerate(write.events)
        )
        if revision > self._mods.get(key, 0):
            self._index.put(record)
            self._mods[key] = revision
        return Committed(record, events)

    async def _transact(self, record: GuardRecord, events: Sequence[Event], expected_mod: int) -> Any:
        key = record.task_key
        guard_key = self._key("g", key)
        document = {"record": codec.record_to_doc(record), "events": [codec.event_to_doc(event) for event in events]}
        run = codec.dumps(codec.record_to_doc(record)).encode()
        success = [
            etcd.RequestOp(request_put=etcd.PutRequest(key=guard_key, value=codec.dumps(document).encode())),
            etcd.RequestOp(request_put=etcd.PutRequest(key=self._key("l", record.lease_id), value=run)),
        ]
        owner_key = self._key("o", key)
        if record.running and record.stream_bound:
            if not self.lease_alive:
                raise StoreUnavailable("this sidecar's etcd lease is not alive: no stream can hold a guard here")
            owner = {"fencing_token": record.fencing_token, "host": self.host_id}
            success.append(
                etcd.RequestOp(
                    request_put=etcd.PutRequest(key=owner_key, value=codec.dumps(owner).encode(), lease=self._lease_id)
                )
            )
        else:
            success.append(etcd.RequestOp(request_delete_range=etcd.DeleteRangeRequest(key=owner_key)))
        compare = etcd.Compare(
            result=etcd.Compare.EQUAL, target=etcd.Compare.MOD, key=guard_key, mod_revision=expected_mod
        )
        request = etcd.TxnRequest(
            compare=[compare], success=success, failure=[etcd.RequestOp(request_range=etcd.RangeRequest(key=guard_key))]
        )
        try:
            reply = await self._etcd.call(self._etcd.kv.Txn, request)
        except aio.AioRpcError as error:
            if "lease not found" in (error.details() or ""):
                self._lease_alive.clear()
                raise StoreUnavailable("this sidecar's etcd lease expired") from None
            raise
        self.transactions += 1
        if not reply.succeeded:
            self._refresh(reply)
            raise StoreConflict(f"guard {key!r} changed in etcd since revision {expected_mod}")
        return reply

    def _refresh(self, reply: Any) -> None:
        """After a lost compare: take the key as etcd has it now, so the engine decides on that."""
        now = instant(self._clock)
        for response in reply.responses:
            for kv in response.response_range.kvs:
                record, _ = self._decode_guard(kv, now)
                if kv.mod_revision > self._mods.get(record.task_key, 0):
                    self._index.put(record)
                    self._mods[record.task_key] = kv.mod_revision

    def _schedule_flush(self) -> None:
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().call_later(LINGER_S, self._start_flush)

    def _start_flush(self) -> None:
        self._flusher = None
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.create_task(self._flush_side_keys())
        else:
            self._schedule_flush()

    async def _flush_side_keys(self) -> None:
        """One put per guard with refusals or a heartbeat to write; none waits for the others."""
        refusals, self._refusals = self._refusals, defaultdict(list)
        heartbeats, self._heartbeats = self._heartbeats, set()
        puts: list[Any] = []
        for key, events in refusals.items():
            for start in range(0, len(events), MAX_REFUSALS_PER_PUT):
                chunk = events[start : start + MAX_REFUSALS_PER_PUT]
                # Each refusal keeps the run and the count it saw: a put may span a run's end.
                document = {
                    "fencing_token": chunk[-1].guard.fencing_token,
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
                        for event in chunk
                    ],
                }
                puts.append(self._put(self._key("r", key), document))
        for key in heartbeats:
            record = self._index.get(key)
            if record is None or not record.running:
                continue
            document = {
                "fencing_token": record.fencing_token,
                "heartbeat_at": record.heartbeat_at.isoformat(),
                "expires_at": record.expires_at.isoformat() if record.expires_at else None,
            }
            puts.append(self._put(self._key("h", key), document))
        results = await asyncio.gather(*puts, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                # Refusals are not promised to last, and the next heartbeat writes again.
                log.info("a refusal or heartbeat put failed: %s", result)

    async def _put(self, key: bytes, document: dict[str, Any]) -> None:
        await self._etcd.call(self._etcd.kv.Put, etcd.PutRequest(key=key, value=codec.dumps(document).encode()))
        self.transactions += 1

    async def flush(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            self._flusher = None
        if self._flushing is not None and not self._flushing.done():
            await self._flushing
        await self._flush_side_keys()
