"""The etcd store: one guard space shared by the sidecars of many hosts.

Layout under the prefix (default ``/taskguard/``; documents in ``etcd_docs.py``):

* ``g/<task_key>``: the guard after its last state change, the events that
  change made, the sidecar that made it (``host``) and the lease ids of the
  runs before it whose snapshots are kept. Every state change compares the
  key's mod revision with the revision the decision was made on, so two
  sidecars racing on a key get exactly one winner. Changes of different keys
  that wait at the same time share one transaction (``etcd_txn.py``). The
  same transaction writes:
* ``l/<lease_id>``: the last snapshot of a run that a later run of its key
  replaced (``find_run``, so an old lease's release is still answered). The
  current run needs none (the copy has it); the ``RUNS_KEPT`` newest past
  runs of a key are kept and older ones deleted, so the keys stay bounded by
  the guards, whatever the number of runs.
* ``o/<task_key>``: the owner of a stream-bound run, attached to the etcd
  lease of the sidecar whose Hold stream holds it; deleted when the run ends.
  When a whole sidecar dies or is cut off, etcd expires its lease and deletes
  these keys; every sidecar sees the deletes and the lease keeper turns them
  into ``Abandon`` commands (the first wins, the rest find the run ended).
* ``s/<host_id>``: each sidecar's presence, on its own etcd lease
  (``etcd_lease.py``).

TTL deadlines never depend on hosts' clocks agreeing. The sidecar that made a
state change (or took a heartbeat) keeps that guard's deadline on its own
monotonic clock and expires it; the others leave it alone while its ``s/``
key lives. Once etcd expires that sidecar's lease (etcd counts the TTL), the
others take over: each arms ``ttl`` from the moment it last learnt of a grant,
renewal or heartbeat, which is never earlier than the granting sidecar would
have. Wall-clock fields (``expires_at``, ``heartbeat_at``) are only shown.

Refused triggers and heartbeats are not state changes, and not a write each:
they change this sidecar's copy at once and are written, one put per guard,
within ``LINGER_S``:

* ``r/<task_key>``: the refusals since the last put. Watchers everywhere get
  them as DUPLICATE_REFUSED / RETRY_REFUSED events; the guard's revision (its
  last state change) does not move, as with SQLite.
* ``h/<task_key>``: a Hold's last heartbeat, so the deadline moves everywhere.

Every sidecar keeps a copy of all guards, loaded at start in pages that all
read one revision and kept current by one etcd watch on the prefix from the
revision after; reads come from it. The copy can lag other hosts by the
watch's latency, which a transaction's compare catches: a lost compare
refreshes the key, and the engine decides again. ``confirm`` reads etcd itself
(CheckFence), and a sidecar that lost its lease or its watch says its copy may
be stale (``ensure_current``) rather than answer from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import grpc
from grpc import aio

from taskguard.clock import Clock, instant
from taskguard.guard.model import Durability, Event, GuardRecord, Instant
from taskguard.store import (
    Committed,
    GuardLost,
    RevisionCompacted,
    StoreConflict,
    StoreUnavailable,
    Write,
)
from taskguard.store import etcd_docs as docs
from taskguard.store.etcd_client import RETRY_S, EtcdClient, EtcdSettings, range_end, unavailable
from taskguard.store.etcd_docs import encode_revision, etcd_revision_of
from taskguard.store.etcd_lease import SidecarLease
from taskguard.store.etcd_txn import Moved, Transition, TxnBatcher
from taskguard.store.etcdpb import etcdv3_pb2 as etcd
from taskguard.store.index import GuardIndex, IndexedStore

__all__ = ["EtcdSettings", "EtcdStore", "encode_revision", "etcd_revision_of"]

log = logging.getLogger(__name__)

LINGER_S = 0.2
# Refusals in one put at most: well inside etcd's request size limit.
MAX_REFUSALS_PER_PUT = 2000
# Past runs of one key whose snapshots stay readable by lease id.
RUNS_KEPT = 8
# Own commits remembered until the watch brings them back (a bound, should the watch never do so).
_OWN_EVENTS_KEPT = 8192

OwnerLossHandler = Callable[[str, int], None]
DeadlineHandler = Callable[[GuardRecord], None]


def _stamped(write: Write, revision: int, slot: int) -> tuple[GuardRecord, tuple[Event, ...]]:
    """The write's record and events with the revisions of where its transaction put them."""
    record = replace(write.record, revision=encode_revision(revision, slot + max(len(write.events) - 1, 0)))
    events = tuple(
        replace(event, revision=encode_revision(revision, slot + index), guard=record)
        for index, event in enumerate(write.events)
    )
    return record, events


def _has_deadline(record: GuardRecord) -> bool:
    return record.running and record.ttl_s is not None and record.expires_at is not None


class EtcdStore(IndexedStore):
    """Not safe to share across event loops."""

    def __init__(self, settings: EtcdSettings, clock: Clock) -> None:
        self._settings = settings
        self._clock = clock
        self._prefix = settings.prefix.encode()
        self.host_id = secrets.token_hex(6)
        self._etcd = EtcdClient(settings)
        self._lease = SidecarLease(
            self._etcd, settings, (self._key("s", self.host_id), docs.encode_presence(self.host_id)), self._lease_lost
        )
        self._batcher = TxnBatcher(self._etcd)
        self._index = GuardIndex()
        self._mods: dict[str, int] = {}  # task key -> etcd mod revision of the g/ copy we hold
        self._granters: dict[str, str] = {}  # task key -> the sidecar keeping its current deadline
        self._seen: dict[str, float] = {}  # task key -> monotonic time this copy last learnt its deadline moved
        self._runs: dict[str, tuple[str, ...]] = {}  # task key -> past runs with l/ snapshots, newest first
        self._hosts: set[str] = set()  # sidecars whose s/ key exists
        self._owners: dict[str, int] = {}  # task key -> fencing token of its o/ key
        self._pending: dict[str, tuple[Write, Transition]] = {}  # task key -> its write on its way from here
        self._own_events: dict[tuple[str, int], tuple[Event, ...]] = {}
        self._echoed: dict[str, tuple[int, GuardRecord, tuple[Event, ...]]] = {}  # own writes the watch brought first
        self._refusals: defaultdict[str, list[Event]] = defaultdict(list)
        self._heartbeats: set[str] = set()
        self._flusher: asyncio.TimerHandle | None = None
        self._flushing: asyncio.Task[None] | None = None
        self._owner_loss: OwnerLossHandler | None = None
        self._lease_loss: Callable[[], None] | None = None
        self._deadline_set: DeadlineHandler | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._revision = 0  # the last event revision seen (the head a history read runs to)
        self._etcd_revision = 0  # the last etcd revision applied to the copy
        self._watching = False
        self._watch_created = asyncio.Event()
        self._closing = False
        self._side_puts = 0

    @property
    def transactions(self) -> int:
        """Writes sent to etcd so far (one transaction may carry many transitions)."""
        return self._batcher.transactions + self._side_puts

    def _key(self, kind: str, name: str = "") -> bytes:
        return self._prefix + f"{kind}/{name}".encode()

    def _kind(self, key: bytes) -> tuple[str, str]:
        kind, _, name = key[len(self._prefix) :].decode().partition("/")
        return kind, name

    # --- lifecycle ----------------------------------------------------------------------------

    async def open(self) -> None:
        await self._etcd.open()
        try:
            await self._lease.grant()
            await self._load()
        except aio.AioRpcError as error:
            await self._etcd.close()
            raise StoreUnavailable(f"etcd refused the sidecar: {error.code().name}: {error.details()}") from None
        except BaseException:
            await self._etcd.close()
            raise
        self._tasks.append(asyncio.create_task(self._lease.keep_alive(), name="taskguard-etcd-lease"))
        self._tasks.append(asyncio.create_task(self._keep_the_copy_current(), name="taskguard-etcd-watch"))
        # Serving starts once the copy follows etcd, or reads would answer UNAVAILABLE at first.
        try:
            await asyncio.wait_for(self._watch_created.wait(), self._settings.timeout_s)
        except TimeoutError:
            await self.close()
            raise StoreUnavailable("etcd did not start the watch on the prefix in time") from None

    async def close(self) -> None:
        with contextlib.suppress(StoreUnavailable):
            await self.flush()
        self._closing = True
        await self._batcher.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # The lease is left to expire rather than revoked: stream holders get its TTL to resume elsewhere.
        await self._etcd.close()

    async def _load(self) -> None:
        """Sidecars, owners, guards, then the refusals and heartbeats about them, all as of one revision.

        Read in pages (a prefix grows past any one message), all at the
        revision of the first page; the watch follows from the revision after.
        Run snapshots (``l/``) are read only when asked for, never here.
        """
        for attempt in range(3):
            try:
                await self._load_at_one_revision()
                return
            except aio.AioRpcError as error:
                # Compacted past the revision between two pages: read it all again at a newer one.
                if error.code() is not grpc.StatusCode.OUT_OF_RANGE or attempt == 2:
                    raise

    async def _load_at_one_revision(self) -> None:
        now = instant(self._clock)
        revision = 0
        read: dict[str, list[Any]] = {}
        for kind in ("s", "o", "g", "h", "r"):
            read[kind] = []
            async for at, kvs in self._etcd.pages(self._key(kind), revision):
                revision = at
                read[kind].extend(kvs)
        hosts = {self._kind(kv.key)[1] for kv in read["s"]} | {self.host_id}
        owners = {self._kind(kv.key)[1]: docs.owner_token(kv.value) for kv in read["o"]}
        reloading = self._etcd_revision > 0
        gone_hosts = self._hosts - hosts
        gone_owners = [(key, token) for key, token in self._owners.items() if owners.get(key) != token]
        self._hosts, self._owners = hosts, owners
        self._own_events.clear()
        for kv in read["g"]:
            made = self._apply_guard(kv, now)
            self._revision = max(self._revision, encode_revision(kv.mod_revision), *(e.revision for e in made))
        for kind in ("h", "r"):
            for kv in read[kind]:
                for event in self._apply_side(kv, now):
                    self._revision = max(self._revision, event.revision)
        self._etcd_revision = revision
        if reloading:
            for host in gone_hosts:
                self._host_gone(host, now)
            self._owners_gone(gone_owners)

    # --- this sidecar's lease -----------------------------------------------------------------

    def _lease_lost(self) -> None:
        if self._lease_loss is not None:
            self._lease_loss()

    @property
    def lease_alive(self) -> bool:
        return self._lease.alive

    def set_owner_loss_handler(self, handler: OwnerLossHandler) -> None:
        self._owner_loss = handler

    def set_lease_loss_handler(self, handler: Callable[[], None]) -> None:
        self._lease_loss = handler

    def set_deadline_handler(self, handler: DeadlineHandler) -> None:
        self._deadline_set = handler

    # --- the copy -----------------------------------------------------------------------------

    def _localize(self, now: Instant, host: str) -> docs.Localize:
        """What a record read from etcd means on this process's clock (see the module docstring)."""

        def localize(record: GuardRecord) -> GuardRecord:
            if host == self.host_id:
                pending = self._pending.get(record.task_key)
                mine = pending[0].record if pending is not None else self._index.get(record.task_key)
                if mine is not None and mine.fencing_token == record.fencing_token:
                    deadline = mine.expires_deadline if record.running else None
                    return replace(
                        record,
                        last_seen=mine.last_seen,
                        expires_deadline=deadline,
                        hold_deadline=mine.hold_deadline if record.running else None,
                        lock_delay_deadline=mine.lock_delay_deadline,
                    )
            deadline = None
            if _has_deadline(record) and host not in self._hosts:
                assert record.ttl_s is not None
                deadline = now.monotonic + record.ttl_s
            # Another host's wall clock says nothing about ours. A run's max hold is kept by the sidecar that
            # granted it; a lock-delay runs its whole length from when this copy learns of the loss (late,
            # never early: its length is a difference of that host's own clock readings).
            return replace(
                record,
                last_seen=now.monotonic,
                expires_deadline=deadline,
                hold_deadline=None,
                lock_delay_deadline=_lock_delay_from(record, now),
            )

        return localize

    def _decode_guard(self, kv: Any, now: Instant) -> docs.GuardDoc:
        return docs.decode_guard(kv.value, kv.mod_revision, now, functools.partial(self._localize, now))

    def _apply_guard(self, kv: Any, now: Instant) -> list[Event]:
        """Take a g/ put into the copy (unless the copy has it already); the events it made."""
        key = self._kind(kv.key)[1]
        own = self._own_events.pop((key, kv.mod_revision), None)
        if own is not None:
            return list(own)
        pending = self._pending.get(key)
        if pending is not None and pending[1].ops and pending[1].ops[0].request_put.value == kv.value:
            # Our own write, back before its transaction's answer: no need to decode what we wrote.
            write, transition = pending
            record, events = _stamped(write, kv.mod_revision, transition.slot)
            self._echoed[key] = (kv.mod_revision, record, events)
            if kv.mod_revision > self._mods.get(key, 0):
                self._keep(record, kv.mod_revision, self.host_id, transition.runs, now)
            return list(events)
        doc = self._decode_guard(kv, now)
        if kv.mod_revision > self._mods.get(key, 0):
            record = doc.record
            current = self._index.get(key)
            if current is not None and current.fencing_token == record.fencing_token:
                # Keep refusals counted here that are still on their way.
                record = replace(record, duplicate_count=max(record.duplicate_count, current.duplicate_count))
            self._keep(record, kv.mod_revision, doc.host, doc.runs, now)
        return doc.events

    def _keep(self, record: GuardRecord, mod_revision: int, host: str, runs: tuple[str, ...], now: Instant) -> None:
        key = record.task_key
        self._index.put(record)
        self._mods[key] = mod_revision
        self._granters[key] = host
        self._seen[key] = now.monotonic
        self._runs[key] = runs

    def _apply_side(self, kv: Any, now: Instant) -> list[Event]:
        """Fold an r/ (refusals) or h/ (heartbeat) put into the copy; the refusal events it carries."""
        kind, task_key = self._kind(kv.key)
        record = self._index.get(task_key)
        if record is None:
            return []  # about a guard not seen yet: nothing to fold
        if kind == "h":
            beat = docs.decode_heartbeat(kv.value)
            if record.running and beat.fencing_token == record.fencing_token and beat.host != self.host_id:
                deadline = None
                if _has_deadline(record) and beat.host not in self._hosts:
                    assert record.ttl_s is not None
                    deadline = now.monotonic + record.ttl_s
                self._index.put(
                    replace(
                        record,
                        heartbeat_at=beat.heartbeat_at or record.heartbeat_at,
                        last_seen=now.monotonic,
                        expires_at=beat.expires_at,
                        expires_deadline=deadline,
                    )
                )
                self._granters[task_key] = beat.host
                self._seen[task_key] = now.monotonic
            return []
        if kind != "r":
            return []
        events = docs.decode_refusals(kv.value, kv.mod_revision, record)
        counted = max(
            (e.guard.duplicate_count for e in events if e.guard.fencing_token == record.fencing_token), default=0
        )
        if counted > record.duplicate_count:
            self._index.put(replace(record, duplicate_count=counted))
        return events

    def _host_gone(self, host: str, now: Instant) -> None:
        """etcd expired a sidecar's lease: the TTL deadlines it kept are ours to keep now."""
        for record in self._index.running():
            key = record.task_key
            if self._granters.get(key) != host or not _has_deadline(record) or record.expires_deadline is not None:
                continue
            assert record.ttl_s is not None
            armed = replace(record, expires_deadline=self._seen.get(key, now.monotonic) + record.ttl_s)
            self._index.put(armed)
            if self._deadline_set is not None:
                self._deadline_set(armed)

    def _owners_gone(self, owners: Any) -> None:
        for key, token in owners:
            record = self._index.get(key)
            # A release deletes the owner key in the transaction that ends the run: nothing to abandon then.
            if record is not None and record.running and record.fencing_token == token and self._owner_loss:
                self._owner_loss(key, token)

    # --- following every host's changes -----------------------------------------------------

    async def _keep_the_copy_current(self) -> None:
        attempt = 0
        while not self._closing:
            start = self._etcd_revision + 1
            create = etcd.WatchCreateRequest(
                key=self._prefix, range_end=range_end(self._prefix), start_revision=start, fragment=True
            )
            try:
                call = self._etcd.watch.Watch(metadata=self._etcd.metadata)
                await call.write(etcd.WatchRequest(create_request=create))
                async for response in call:
                    attempt = 0
                    if response.compact_revision:
                        log.error("etcd compacted past this sidecar's copy (revision %d); reloading", start)
                        self._watching = False
                        await self._load()
                        break
                    if response.canceled:
                        raise StoreUnavailable(f"etcd cancelled the watch: {response.cancel_reason}")
                    if response.created:
                        self._watching = True
                        self._watch_created.set()
                    self._apply(response.events)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.warning("etcd watch broke (%s); resuming from revision %d", error, self._etcd_revision + 1)
            self._watching = False
            attempt += 1
            await asyncio.sleep(RETRY_S[min(attempt, len(RETRY_S)) - 1])

    def _apply(self, changes: Sequence[Any]) -> None:
        now = instant(self._clock)
        published: list[Event] = []
        gone_hosts: list[str] = []
        gone_owners: list[tuple[str, int]] = []
        for change in changes:
            kv = change.kv
            self._etcd_revision = max(self._etcd_revision, kv.mod_revision)
            kind, name = self._kind(kv.key)
            if change.type == etcd.Event.DELETE:
                if kind == "o" and name in self._owners:
                    gone_owners.append((name, self._owners.pop(name)))
                elif kind == "s":
                    self._hosts.discard(name)
                    gone_hosts.append(name)
                continue
            if kind == "g":
                published.extend(self._apply_guard(kv, now))
            elif kind in ("r", "h"):
                published.extend(self._apply_side(kv, now))
            elif kind == "o":
                self._owners[name] = docs.owner_token(kv.value)
            elif kind == "s":
                self._hosts.add(name)
        fresh = [event for event in published if event.revision > self._revision]
        if fresh:
            self._revision = fresh[-1].revision
            self._index.publish(fresh)
        for host in gone_hosts:
            if host != self.host_id:
                self._host_gone(host, now)
        self._owners_gone(gone_owners)

    # --- reads --------------------------------------------------------------------------------

    def ensure_current(self) -> None:
        """StoreUnavailable when this copy may be stale past the watch's usual lag."""
        if not self._lease.alive:
            raise StoreUnavailable("this sidecar lost its etcd lease; its copy of the guards may be stale")
        if not self._watching:
            raise StoreUnavailable("this sidecar's etcd watch is down; its copy of the guards may be stale")

    async def latest_revision(self) -> int:
        """Past every event etcd has committed: a quorum read's header revision, with every slot of it."""
        reply = await self._etcd.call(self._etcd.kv.Range, etcd.RangeRequest(key=self._key("s"), keys_only=True))
        return max(self._revision, encode_revision(reply.header.revision + 1) - 1)

    async def confirm(self, task_key: str) -> GuardRecord | None:
        """The guard as etcd has it now: a linearizable read, within ``etcd_timeout`` or StoreUnavailable."""
        reply = await self._etcd.call(self._etcd.kv.Range, etcd.RangeRequest(key=self._key("g", task_key)))
        if not reply.kvs:
            return None
        kv = reply.kvs[0]
        self._refresh(reply.kvs)
        current = self._index.get(task_key)
        if current is not None and self._mods.get(task_key) == kv.mod_revision:
            return current
        return self._decode_guard(kv, instant(self._clock)).record

    async def find_run(self, lease_id: str) -> GuardRecord | None:
        current = self._current_run(lease_id)
        if current is not None:
            return current
        reply = await self._etcd.call(self._etcd.kv.Range, etcd.RangeRequest(key=self._key("l", lease_id)))
        if not reply.kvs:
            return None
        return docs.decode_run(reply.kvs[0].value, instant(self._clock))

    async def orphaned_waiters(self) -> list[GuardRecord]:
        # Other sidecars' waiters share these guards, and which ones were this sidecar's last incarnation's is
        # not recorded: they stay, and a turn none takes up ends CANCELLED after the resume grace (see core).
        return []

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
            raise unavailable(error) from None
        finally:
            call.cancel()
        return found[:limit]

    def _history(self, kv: Any, now: Instant) -> list[Event]:
        """The events a past put made, as they were (the copy is not touched)."""
        kind, task_key = self._kind(kv.key)
        if kind == "g":
            return self._decode_guard(kv, now).events
        if kind != "r":
            return []
        record = self._index.get(task_key)
        return docs.decode_refusals(kv.value, kv.mod_revision, record) if record is not None else []

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
            self._granters[key] = self.host_id
            self._heartbeats.add(key)
            self._schedule_flush()
            return Committed(write.record, ())
        previous = self._index.get(key)
        transition = self._transition(write, previous)
        self._pending[key] = (write, transition)
        try:
            outcome = await self._batcher.submit(transition)
        finally:
            self._pending.pop(key, None)
        if isinstance(outcome, Moved):
            self._refresh(outcome.kvs)
            raise StoreConflict(f"guard {key!r} changed in etcd since revision {transition.expected_mod}")
        revision = outcome.revision
        echoed = self._echoed.pop(key, None)
        if echoed is not None and echoed[0] == revision:
            _, record, events = echoed
        else:
            record, events = _stamped(write, revision, outcome.slot)
        if revision > self._mods.get(key, 0):
            self._keep(record, revision, self.host_id, transition.runs, instant(self._clock))
            if revision > self._etcd_revision:
                self._own_events[(key, revision)] = events
                if len(self._own_events) > _OWN_EVENTS_KEPT:
                    self._own_events.pop(next(iter(self._own_events)))
        return Committed(record, events)

    def _transition(self, write: Write, previous: GuardRecord | None) -> Transition:
        """The writes of one state change: the guard, the replaced run's snapshot, the owner key."""
        record = write.record
        key = record.task_key
        guard_key = self._key("g", key)
        runs = self._runs.get(key, ())
        ops: list[Any] = []
        keys = {guard_key}
        if previous is not None and previous.lease_id and previous.lease_id != record.lease_id:
            runs = (previous.lease_id, *runs)
            run_key = self._key("l", previous.lease_id)
            ops.append(etcd.RequestOp(request_put=etcd.PutRequest(key=run_key, value=docs.encode_run(previous))))
            keys.add(run_key)
            for dropped in runs[RUNS_KEPT:]:
                dropped_key = self._key("l", dropped)
                ops.append(etcd.RequestOp(request_delete_range=etcd.DeleteRangeRequest(key=dropped_key)))
                keys.add(dropped_key)
            runs = runs[:RUNS_KEPT]
        owner_key = self._key("o", key)
        keys.add(owner_key)
        uses_lease = False
        if record.running and record.stream_bound:
            if not self.lease_alive:
                raise StoreUnavailable("this sidecar's etcd lease is not alive: no stream can hold a guard here")
            owner = docs.encode_owner(record.fencing_token, self.host_id)
            ops.append(etcd.RequestOp(request_put=etcd.PutRequest(key=owner_key, value=owner, lease=self._lease.id)))
            uses_lease = True
        elif key in self._owners or (previous is not None and previous.stream_bound):
            ops.append(etcd.RequestOp(request_delete_range=etcd.DeleteRangeRequest(key=owner_key)))
        kept_runs = runs

        def build(slot: int) -> list[Any]:
            value = docs.encode_guard(record, write.events, self.host_id, kept_runs, slot)
            return [etcd.RequestOp(request_put=etcd.PutRequest(key=guard_key, value=value)), *ops]

        transition = Transition(
            build=build,
            keys=frozenset(keys),
            slots=max(len(write.events), 1),
            compare_key=guard_key,
            expected_mod=etcd_revision_of(write.expected_revision),
            uses_lease=uses_lease,
            runs=runs,
        )
        return transition

    def _refresh(self, kvs: Sequence[Any]) -> None:
        """Take keys as etcd has them now (after a lost compare, or a confirming read)."""
        now = instant(self._clock)
        for kv in kvs:
            key = self._kind(kv.key)[1]
            if kv.mod_revision > self._mods.get(key, 0):
                doc = self._decode_guard(kv, now)
                self._keep(doc.record, kv.mod_revision, doc.host, doc.runs, now)

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
                puts.append(
                    self._put(self._key("r", key), docs.encode_refusals(events[start : start + MAX_REFUSALS_PER_PUT]))
                )
        for key in heartbeats:
            record = self._index.get(key)
            if record is None or not record.running:
                continue
            puts.append(self._put(self._key("h", key), docs.encode_heartbeat(record, self.host_id)))
        results = await asyncio.gather(*puts, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                # Refusals are not promised to last, and the next heartbeat writes again.
                log.info("a refusal or heartbeat put failed: %s", result)

    async def _put(self, key: bytes, value: bytes) -> None:
        await self._etcd.call(self._etcd.kv.Put, etcd.PutRequest(key=key, value=value))
        self._side_puts += 1

    async def flush(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            self._flusher = None
        if self._flushing is not None and not self._flushing.done():
            await self._flushing
        await self._flush_side_keys()


def _lock_delay_from(record: GuardRecord, now: Instant) -> float | None:
    if record.lock_delay_until is None or record.released_at is None:
        return None
    return now.monotonic + max(0.0, (record.lock_delay_until - record.released_at).total_seconds())
