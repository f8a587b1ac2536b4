"""The etcd store: one guard space shared by the sidecars of many hosts.

Layout under the prefix (default ``/taskguard/``; documents in ``etcd_docs.py``):

* ``g/<task_key>``: the guard after its last state change (a semaphore's
  with every run that holds it), the events that change made, the sidecar
  that made it (``host``), each running run's last deadline move (below)
  and the lease ids of the past runs whose snapshots are kept. Every state
  change compares the key's mod revision with the revision the decision was
  made on, so two sidecars racing on a key get exactly one winner. Changes
  of different keys that wait at the same time share one transaction
  (``etcd_txn.py``). The same transaction writes:
* ``l/<lease_id>``: the last snapshot of a run that left its key's record
  (``find_run``, so an old lease's release is still answered): the one its
  change's event tells when there is one (a semaphore's run that ended
  beside others), else the record it was before a later run replaced it.
  Runs still in the record need none (the copy has them); the ``RUNS_KEPT``
  newest past runs of a key are kept (all that one change ended, if more)
  and older ones deleted, so the keys stay bounded by the guards, whatever
  the number of runs.
* ``o/<task_key>\\x1f<fencing_token>``: the owner of one stream-bound run,
  attached to the etcd lease of the sidecar whose Hold stream holds it:
  written by the change that bound the run to that stream (its acquisition,
  resume or claim there), deleted by the one that ends it, and left alone by
  changes to the key's other runs, so each run stays with its own sidecar.
  When a whole sidecar dies or is cut off, etcd expires its lease and
  deletes its owner keys, and only those; every sidecar sees the deletes and
  the lease keeper turns each into an ``Abandon`` of that run (the first
  wins, the rest find the run ended).
* ``s/<host_id>``: each sidecar's presence, on its own etcd lease
  (``etcd_lease.py``).

TTL deadlines never depend on hosts' clocks agreeing. The sidecar that last
moved a run's deadline (granted, renewed, resumed, claimed or heartbeated it)
keeps that deadline on its own monotonic clock and expires it; the others
leave it alone while its ``s/`` key lives. Once etcd expires that sidecar's
lease (etcd counts the TTL), the others take over: each arms ``ttl`` from the
moment it last learnt of that move, which is never earlier than the keeping
sidecar would have. A g/ document names each running run's last move (the
etcd revision that made it, and the sidecar), and a copy takes a document's
word on a run only when it knows of no later move: a change to one of a
semaphore's runs, written by a sidecar that had not yet seen another run's
heartbeat, does not undo it. Wall-clock fields (``expires_at``,
``heartbeat_at``) are only shown.

Refused triggers and heartbeats are not state changes, and not a write each:
they change this sidecar's copy at once and are written, one put per guard,
within ``LINGER_S``:

* ``r/<task_key>``: the refusals since the last put. Watchers everywhere get
  them as DUPLICATE_REFUSED / RETRY_REFUSED events; the guard's revision (its
  last state change) does not move, as with SQLite.
* ``h/<task_key>``: the last heartbeats of the key's runs held here, so their
  deadlines move everywhere.

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
from taskguard.guard.model import Durability, Event, EventType, GuardRecord, Instant, Waiter
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
from taskguard.store.etcd_txn import MAX_TXN_OPS, Moved, Transition, TxnBatcher
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
# The revision of a deadline move of this sidecar's own that is not in etcd yet (a heartbeat waiting for its
# put): later than any etcd revision, so nothing another sidecar wrote before it undoes it.
PENDING = 1 << 62
# The events that move their run's deadline, and those that bind it to the stream that asked (a Hold's).
_MOVES = frozenset({EventType.ACQUIRED, EventType.RENEWED, EventType.RESUMED})
_BINDS = frozenset({EventType.ACQUIRED, EventType.RESUMED})

OwnerLossHandler = Callable[[str, int], None]
DeadlineHandler = Callable[[GuardRecord], None]


def _stamped(write: Write, revision: int, slot: int) -> tuple[GuardRecord, tuple[Event, ...]]:
    """The write's record and events with the revisions of where its transaction put them.

    An event about another of a semaphore's runs keeps that run's record, with the guard's new revision.
    """
    record = replace(write.record, revision=encode_revision(revision, slot + max(len(write.events) - 1, 0)))
    events = tuple(
        replace(
            event,
            revision=encode_revision(revision, slot + index),
            guard=record if _is(event.guard, write.record) else replace(event.guard, revision=record.revision),
        )
        for index, event in enumerate(write.events)
    )
    return record, events


def _is(guard: GuardRecord, record: GuardRecord) -> bool:
    return guard is record or guard == record


def _has_deadline(record: GuardRecord) -> bool:
    return record.running and record.expires_at is not None and _span(record) is not None


def _span(run: GuardRecord) -> float | None:
    """How long ``run``'s deadline lasts from its last move, for a sidecar taking it over: its TTL, or for a
    queue's turn no call took up yet, the resume grace its deadline was set to (a difference of the granting
    sidecar's own clock readings: no comparison of two hosts' clocks). A turn of a waiter without a TTL has
    no TTL, and its deadline must still be kept when both its waiter's sidecar and the granting one are gone."""
    if not run.claimed and run.expires_at is not None:
        return max(0.0, (run.expires_at - run.heartbeat_at).total_seconds())
    return run.ttl_s


# --- a semaphore's runs -------------------------------------------------------------------------
#
# A record speaks for one run (its own fields) and lists the key's other running runs in ``holders``; what this
# store tracks per run (deadline moves, owner keys, snapshots) is by fencing token.


def _run_of(record: GuardRecord | None, fencing_token: int) -> GuardRecord | None:
    """The running run of ``record`` that has ``fencing_token`` (its own, or one of its holders)."""
    return record.run_with_token(fencing_token) if record is not None else None


def _each_run(record: GuardRecord, change: Callable[[GuardRecord], GuardRecord]) -> GuardRecord:
    """``record`` after ``change`` (of run fields only) to its own run and to each of its holders."""
    changed = change(record)
    if not record.holders:
        return changed
    return replace(changed, holders=tuple(change(holder) for holder in record.holders))


def _with_beat_of(run: GuardRecord, known: GuardRecord) -> GuardRecord:
    """``run`` with what this copy knows of its deadline (``known``: the same run in the copy)."""
    return replace(
        run,
        heartbeat_at=known.heartbeat_at,
        last_seen=known.last_seen,
        expires_at=known.expires_at,
        expires_deadline=known.expires_deadline,
        hold_deadline=known.hold_deadline,
    )


def _moved_by(write: Write, previous: GuardRecord | None) -> set[int]:
    """The running runs whose deadline ``write`` moves (granted, renewed, resumed, claimed, heartbeated, or
    set aside for a resume), by fencing token. A change to a semaphore's other runs leaves theirs alone."""
    moving = {event.guard.fencing_token for event in write.events if event.type in _MOVES}
    moved: set[int] = set()
    for run in write.record.runs:
        before = _run_of(previous, run.fencing_token)
        if before is None or run.fencing_token in moving or run.claimed != before.claimed:
            moved.add(run.fencing_token)
        elif (run.heartbeat_at, run.expires_at, run.ttl_s) != (before.heartbeat_at, before.expires_at, before.ttl_s):
            # Moved by the decision, or by another sidecar's heartbeat this copy took since (then the copy's
            # is the newer reading, and the decision's is older than it).
            if run.last_seen >= before.last_seen:
                moved.add(run.fencing_token)
    return moved


def _bound_here(write: Write, previous: GuardRecord | None) -> list[GuardRecord]:
    """The stream-bound runs ``write`` binds to a Hold stream of this sidecar (acquired or resumed on it, or
    a queue's turn claimed by it): their owner keys go on this sidecar's lease."""
    binding = {event.guard.fencing_token for event in write.events if event.type in _BINDS}
    bound = []
    for run in write.record.runs:
        if not (run.stream_bound and run.claimed):
            continue
        before = _run_of(previous, run.fencing_token)
        if run.fencing_token in binding or (before is not None and not before.claimed):
            bound.append(run)
    return bound


def _put(key: bytes, value: bytes, lease: int = 0) -> Any:
    return etcd.RequestOp(request_put=etcd.PutRequest(key=key, value=value, lease=lease))


def _delete(key: bytes) -> Any:
    return etcd.RequestOp(request_delete_range=etcd.DeleteRangeRequest(key=key))


def _armed_from_last_seen(due: set[int], run: GuardRecord) -> GuardRecord:
    """``run``'s TTL from when this copy last learnt of its last move, if it is among ``due``."""
    span = _span(run)
    if not run.running or run.fencing_token not in due or span is None:
        return run
    return replace(run, expires_deadline=run.last_seen + span)


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
        # task key -> {fencing token of a running run: its last deadline move (revision, the sidecar keeping it)}
        self._moves: dict[str, dict[int, docs.Move]] = {}
        self._runs: dict[str, tuple[str, ...]] = {}  # task key -> past runs with l/ snapshots, newest first
        self._hosts: set[str] = set()  # sidecars whose s/ key exists
        # task key -> {name of an o/ key of it: fencing token of the run that key owns}
        self._owners: dict[str, dict[str, int]] = {}
        # task key -> its write on its way from here, and what its document says of the key's runs
        self._pending: dict[str, tuple[Write, Transition, docs.GuardMeta]] = {}
        self._own_events: dict[tuple[str, int], tuple[Event, ...]] = {}
        self._echoed: dict[str, tuple[int, GuardRecord, tuple[Event, ...]]] = {}  # own writes the watch brought first
        self._refusals: defaultdict[str, list[Event]] = defaultdict(list)
        self._heartbeats: defaultdict[str, set[int]] = defaultdict(set)  # task key -> runs heartbeated since a put
        self._flusher: asyncio.TimerHandle | None = None
        self._flushing: asyncio.Task[None] | None = None
        self._owner_loss: OwnerLossHandler | None = None
        self._waiters_gone: Callable[[GuardRecord], None] | None = None
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
        owners: dict[str, dict[str, int]] = {}
        for kv in read["o"]:
            name = self._kind(kv.key)[1]
            owners.setdefault(docs.owner_task_key(name), {})[name] = docs.owner_token(kv.value)
        reloading = self._etcd_revision > 0
        gone_hosts = self._hosts - hosts
        gone_owners = [
            (key, token)
            for key, named in self._owners.items()
            for name, token in named.items()
            if owners.get(key, {}).get(name) != token
        ]
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

    def set_waiters_gone_handler(self, handler: Callable[[GuardRecord], None]) -> None:
        self._waiters_gone = handler

    def _waiters_of_gone_hosts(self, gone: Callable[[str], bool]) -> list[GuardRecord]:
        """Guards with waiters whose call was on a sidecar that is gone, each naming only those waiters."""
        found = []
        for record in self._index.queued():
            lost = tuple(w for w in record.waiters if w.acquire.host and gone(w.acquire.host))
            if lost:
                # Only these waiters: the runs and the other waiters are no business of whoever dismisses them.
                found.append(replace(record, waiters=lost, holders=(), claimed=True))
        return found

    # --- the copy -----------------------------------------------------------------------------

    def _move_of(
        self, run: GuardRecord, meta: docs.GuardMeta, mod_revision: int, known: GuardRecord | None
    ) -> tuple[docs.Move, bool]:
        """A running run's last deadline move, and whether it is one this copy knew already (the copy's
        reading of the deadline stands), rather than the document's (a later one, or one the copy missed)."""
        told = meta.move_of(run.fencing_token, mod_revision)
        mine = self._moves.get(run.task_key, {}).get(run.fencing_token)
        if known is not None and mine is not None and mine[0] >= told[0]:
            return mine, True
        return told, False

    def _localize(self, now: Instant, meta: docs.GuardMeta, mod_revision: int) -> docs.Localize:
        """What a record read from etcd means on this process's clock (see the module docstring), run by run."""

        def localize(record: GuardRecord) -> GuardRecord:
            copy = self._index.get(record.task_key)

            def settle(run: GuardRecord) -> GuardRecord:
                if not run.running:
                    return replace(run, last_seen=now.monotonic, expires_deadline=None, hold_deadline=None)
                known = _run_of(copy, run.fencing_token)
                (_, keeper), ours = self._move_of(run, meta, mod_revision, known)
                if ours:
                    assert known is not None
                    return _with_beat_of(run, known)
                # A run's max hold is kept by the sidecar that granted it, whoever moved its TTL since.
                keeps_hold = known is not None and known.hold_until == run.hold_until
                deadline = None
                if _has_deadline(run) and (keeper == self.host_id or keeper not in self._hosts):
                    # Its keeper is gone (or it is this sidecar, without this copy's reading): from now on,
                    # which is late, never early. Another host's wall clock says nothing about ours.
                    deadline = now.monotonic + (_span(run) or 0.0)
                return replace(
                    run,
                    last_seen=now.monotonic,
                    expires_deadline=deadline,
                    hold_deadline=known.hold_deadline if known is not None and keeps_hold else None,
                )

            settled = _each_run(record, settle)
            return replace(
                settled,
                lock_delay_deadline=_lock_delay(record, copy, meta, now),
                waiters=_waiters_localized(record, copy, meta, now),
                stop_deadline=_stop_deadline(record, copy, meta, now),
            )

        return localize

    def _moves_of(self, record: GuardRecord, meta: docs.GuardMeta, mod_revision: int) -> dict[int, docs.Move]:
        """The last deadline move of each of ``record``'s running runs, as this copy takes it (see _move_of)."""
        copy = self._index.get(record.task_key)
        return {
            run.fencing_token: self._move_of(run, meta, mod_revision, _run_of(copy, run.fencing_token))[0]
            for run in record.runs
        }

    def _decode_guard(self, kv: Any, now: Instant) -> docs.GuardDoc:
        mod_revision = int(kv.mod_revision)
        return docs.decode_guard(kv.value, mod_revision, now, lambda meta: self._localize(now, meta, mod_revision))

    def _apply_guard(self, kv: Any, now: Instant) -> list[Event]:
        """Take a g/ put into the copy (unless the copy has it already); the events it made."""
        key = self._kind(kv.key)[1]
        own = self._own_events.pop((key, kv.mod_revision), None)
        if own is not None:
            return list(own)
        pending = self._pending.get(key)
        if pending is not None and pending[1].ops and pending[1].ops[0].request_put.value == kv.value:
            # Our own write, back before its transaction's answer: no need to decode what we wrote.
            write, transition, meta = pending
            record, events = _stamped(write, kv.mod_revision, transition.slot)
            if kv.mod_revision > self._mods.get(key, 0):
                record = self._keep_own(record, kv.mod_revision, transition.runs, meta)
            self._echoed[key] = (kv.mod_revision, record, events)
            return list(events)
        doc = self._decode_guard(kv, now)
        if kv.mod_revision > self._mods.get(key, 0):
            record = doc.record
            current = self._index.get(key)
            if current is not None and current.newest_token == record.newest_token:
                # Keep refusals counted here that are still on their way (a count is of the newest run's time).
                record = replace(record, duplicate_count=max(record.duplicate_count, current.duplicate_count))
            self._keep(record, kv.mod_revision, doc.runs, self._moves_of(record, doc.meta, kv.mod_revision))
        return doc.events

    def _keep(self, record: GuardRecord, mod_revision: int, runs: tuple[str, ...], moves: dict[int, docs.Move]) -> None:
        key = record.task_key
        self._index.put(record)
        self._mods[key] = mod_revision
        self._runs[key] = runs
        if moves:
            self._moves[key] = moves
        else:
            self._moves.pop(key, None)

    def _keep_own(
        self, record: GuardRecord, mod_revision: int, runs: tuple[str, ...], meta: docs.GuardMeta
    ) -> GuardRecord:
        """Take this sidecar's own committed write into the copy; the record as kept.

        The runs it moved are as decided here; its other runs keep what the copy learnt of them since the
        decision (another sidecar's heartbeat may have come while the transaction was on its way).
        """
        copy = self._index.get(record.task_key)
        known_moves = self._moves.get(record.task_key, {})
        moves: dict[int, docs.Move] = {}

        def settle(run: GuardRecord) -> GuardRecord:
            if not run.running:
                return run
            token = run.fencing_token
            written = meta.move_of(token, mod_revision)
            if written == (mod_revision, self.host_id):
                moves[token] = written
                return run
            known = _run_of(copy, token)
            moves[token] = known_moves.get(token, written)
            return _with_beat_of(run, known) if known is not None else run

        kept = _each_run(record, settle)
        self._keep(kept, mod_revision, runs, moves)
        return kept

    def _merged(self, record: GuardRecord, moved: set[int], copy: GuardRecord | None) -> GuardRecord:
        """A change made here that is not a transaction (a refusal, a heartbeat): the runs it did not move
        keep what the copy has of their deadlines."""

        def settle(run: GuardRecord) -> GuardRecord:
            known = _run_of(copy, run.fencing_token)
            if not run.running or run.fencing_token in moved or known is None:
                return run
            return _with_beat_of(run, known)

        return _each_run(record, settle)

    def _apply_side(self, kv: Any, now: Instant) -> list[Event]:
        """Fold an r/ (refusals) or h/ (heartbeats) put into the copy; the refusal events it carries."""
        kind, task_key = self._kind(kv.key)
        record = self._index.get(task_key)
        if record is None:
            return []  # about a guard not seen yet: nothing to fold
        if kind == "h":
            self._apply_beats(record, docs.decode_heartbeat(kv.value), int(kv.mod_revision), now)
            return []
        if kind != "r":
            return []
        refusals = docs.decode_refusals(kv.value, kv.mod_revision, record)
        if refusals.counted > record.duplicate_count:
            self._index.put(replace(record, duplicate_count=refusals.counted))
        return refusals.events

    def _apply_beats(self, record: GuardRecord, beats: docs.HeartbeatDoc, mod_revision: int, now: Instant) -> None:
        """A sidecar's heartbeats of runs of one key: each moves its run's deadline, unless this copy knows of
        a later move (at start, the g/ read with it may be newer)."""
        key = record.task_key
        known_moves = self._moves.setdefault(key, {})
        beaten: dict[int, GuardRecord] = {}
        for beat in beats.beats:
            run = _run_of(record, beat.fencing_token)
            if run is None:
                continue
            mine = known_moves.get(beat.fencing_token, (0, ""))
            if beats.host == self.host_id:
                # Our own put, back: the move is in etcd now, unless a newer one waits for the next put.
                if mine[1] == self.host_id and beat.fencing_token not in self._heartbeats.get(key, ()):
                    known_moves[beat.fencing_token] = (
                        mod_revision if mine[0] == PENDING else max(mine[0], mod_revision),
                        self.host_id,
                    )
                continue
            if mine[0] >= mod_revision:
                continue
            deadline = None
            if _has_deadline(run) and beats.host not in self._hosts:
                deadline = now.monotonic + (_span(run) or 0.0)
            beaten[beat.fencing_token] = replace(
                run,
                heartbeat_at=beat.heartbeat_at or run.heartbeat_at,
                last_seen=now.monotonic,
                expires_at=beat.expires_at,
                expires_deadline=deadline,
            )
            known_moves[beat.fencing_token] = (mod_revision, beats.host)
        if not beaten:
            return
        updated = _each_run(record, lambda run: beaten.get(run.fencing_token, run) if run.running else run)
        self._index.put(updated)
        if self._deadline_set is not None and any(run.expires_deadline is not None for run in beaten.values()):
            self._deadline_set(updated)

    def _host_gone(self, host: str, now: Instant) -> None:
        """etcd expired a sidecar's lease: the TTL deadlines it kept are ours to keep now."""
        for record in self._index.running():
            known_moves = self._moves.get(record.task_key, {})
            due = {
                run.fencing_token
                for run in record.runs
                if known_moves.get(run.fencing_token, (0, ""))[1] == host
                and _has_deadline(run)
                and run.expires_deadline is None
            }
            if not due:
                continue
            # From when this copy last learnt of the move, which is no earlier than the gone sidecar made it.
            armed = _each_run(record, functools.partial(_armed_from_last_seen, due))
            self._index.put(armed)
            if self._deadline_set is not None:
                self._deadline_set(armed)
        # Its waiters' calls went with it (every sidecar sees this and dismisses them: the first one wins).
        if self._waiters_gone is not None:
            for waiting in self._waiters_of_gone_hosts(lambda gone: gone == host):
                self._waiters_gone(waiting)

    def _owners_gone(self, owners: Sequence[tuple[str, int]]) -> None:
        for key, token in owners:
            if token in self._owners.get(key, {}).values():
                continue  # another owner key holds that run still (it resumed on another sidecar)
            # A change that ends a run deletes its owner key in the same transaction: nothing to abandon then.
            if _run_of(self._index.get(key), token) is not None and self._owner_loss is not None:
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
            if kind == "o":
                gone_owners.extend(self._owner_changed(name, kv.value if change.type != etcd.Event.DELETE else None))
            elif change.type == etcd.Event.DELETE:
                if kind == "s":
                    self._hosts.discard(name)
                    gone_hosts.append(name)
            elif kind == "g":
                published.extend(self._apply_guard(kv, now))
            elif kind in ("r", "h"):
                published.extend(self._apply_side(kv, now))
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

    def _owner_changed(self, name: str, value: bytes | None) -> list[tuple[str, int]]:
        """An o/ key put (``value``) or deleted (None); the run whose owner key went, if one did."""
        key = docs.owner_task_key(name)
        if value is not None:
            self._owners.setdefault(key, {})[name] = docs.owner_token(value)
            return []
        named = self._owners.get(key)
        if named is None or name not in named:
            return []
        token = named.pop(name)
        if not named:
            del self._owners[key]
        return [(key, token)]

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
        # Waiters whose call was on a sidecar that is no longer there (this one's last incarnation among them:
        # each start is a new host id). A gone sidecar's s/ key may still live a little: then its waiters are
        # dismissed when it goes (_host_gone). A turn already handed to a gone call ends after the resume grace.
        return self._waiters_of_gone_hosts(lambda host: host not in self._hosts)

    async def unowned_stream_guards(self) -> list[GuardRecord]:
        """Each RUNNING stream-bound run (a semaphore's each, as a record of that run) whose owner key is gone:
        its sidecar died while none watched. An unclaimed turn is a waiter's, not a holder's: it has none yet."""
        owned: set[tuple[str, int]] = set()
        async for _, kvs in self._etcd.pages(self._key("o")):
            owned.update((docs.owner_task_key(self._kind(kv.key)[1]), docs.owner_token(kv.value)) for kv in kvs)
        return [
            run
            for record in self._index.running()
            for run in record.runs
            if run.stream_bound and run.claimed and (record.task_key, run.fencing_token) not in owned
        ]

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
        return docs.decode_refusals(kv.value, kv.mod_revision, record).events if record is not None else []

    @property
    def revision(self) -> int:
        return self._revision

    # --- writes ---------------------------------------------------------------------------------

    async def commit(self, write: Write) -> Committed:
        if self._closing:
            raise StoreUnavailable("the store is closed")
        key = write.record.task_key
        self._index.check(write)
        previous = self._index.get(key)
        if write.durability is Durability.LAZY:
            kept = self._merged(write.record, set(), previous)
            self._index.put(kept)
            self._refusals[key].extend(write.events)
            self._schedule_flush()
            return Committed(kept, ())
        if write.durability is Durability.VOLATILE:
            return self._commit_volatile(write, previous)
        transition, meta = self._transition(write, previous)
        self._pending[key] = (write, transition, meta)
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
                record = self._keep_own(record, revision, transition.runs, meta)
                if revision > self._etcd_revision:
                    self._own_events[(key, revision)] = events
                    if len(self._own_events) > _OWN_EVENTS_KEPT:
                        self._own_events.pop(next(iter(self._own_events)))
        return Committed(record, events)

    def _commit_volatile(self, write: Write, previous: GuardRecord | None) -> Committed:
        """A heartbeat (or a run set aside for a resume): in the copy at once, its put within LINGER_S."""
        key = write.record.task_key
        moved = _moved_by(write, previous)
        targets = [run for run in write.record.runs if run.fencing_token in moved] or [write.record]
        if any(run.stream_bound for run in targets) and not self.lease_alive:
            raise GuardLost("this sidecar lost its etcd lease; its stream-bound guards may be taken elsewhere")
        kept = self._merged(write.record, moved, previous)
        self._index.put(kept)
        if moved:
            known_moves = self._moves.setdefault(key, {})
            for token in moved:
                known_moves[token] = (PENDING, self.host_id)
            self._heartbeats[key].update(moved)
            self._schedule_flush()
        return Committed(kept, ())

    def _transition(self, write: Write, previous: GuardRecord | None) -> tuple[Transition, docs.GuardMeta]:
        """The writes of one state change: the guard, the snapshots of runs that left it, the owner keys of
        runs it binds here or ends; and what its document says of each run's deadline."""
        record = write.record
        key = record.task_key
        guard_key = self._key("g", key)
        moved = _moved_by(write, previous)
        known_moves = self._moves.get(key, {})
        moves: dict[int, docs.Move] = {}
        for run in record.runs:
            mine = known_moves.get(run.fencing_token)
            # 0: this document's own revision.
            moves[run.fencing_token] = (
                (0, self.host_id) if run.fencing_token in moved or mine is None or mine[0] == PENDING else mine
            )
        mono = self._clock.monotonic()
        lock_delay_s = None
        if record.lock_delay_deadline is not None:
            lock_delay_s = max(0.0, record.lock_delay_deadline - mono)
        waits = {w.run_id: max(0.0, w.wait_deadline - mono) for w in record.waiters if w.wait_deadline is not None}
        stop_left_s = max(0.0, record.stop_deadline - mono) if record.stop_deadline is not None else None
        meta = docs.GuardMeta(self.host_id, moves, lock_delay_s, waits, stop_left_s)

        ops: list[Any] = []
        keys = {guard_key}
        snapshots = _snapshots(write, previous)
        for lease_id, run in snapshots.items():
            run_key = self._key("l", lease_id)
            ops.append(_put(run_key, docs.encode_run(run)))
            keys.add(run_key)
        bound = _bound_here(write, previous)
        if bound and not self.lease_alive:
            raise StoreUnavailable("this sidecar's etcd lease is not alive: no stream can hold a guard here")
        bound_names = {docs.owner_name(key, run.fencing_token): run.fencing_token for run in bound}
        for name, token in bound_names.items():
            owner_key = self._key("o", name)
            ops.append(_put(owner_key, docs.encode_owner(token, self.host_id), self._lease.id))
            keys.add(owner_key)

        # Then what may wait for a later change if this one has no room left (etcd takes MAX_TXN_OPS at
        # most): owner keys of runs that ended (a stale one abandons nothing: its run is no longer running),
        # then snapshots past the ones kept.
        room = MAX_TXN_OPS - 1 - len(ops)
        deletes: list[bytes] = []
        for name in _owner_keys_to_delete(key, record, previous, self._owners.get(key, {}), bound_names):
            if len(deletes) == room:
                break
            deletes.append(self._key("o", name))
        runs = [*reversed(snapshots), *(lease for lease in self._runs.get(key, ()) if lease not in snapshots)]
        keep = max(RUNS_KEPT, len(snapshots))
        dropped = set(runs[keep:][::-1][: max(room - len(deletes), 0)])  # the oldest first
        deletes.extend(self._key("l", lease) for lease in dropped)
        for deleted in deletes:
            ops.append(_delete(deleted))
            keys.add(deleted)
        kept_runs = tuple(lease for lease in runs if lease not in dropped)

        def build(slot: int) -> list[Any]:
            value = docs.encode_guard(record, write.events, meta, kept_runs, slot)
            return [_put(guard_key, value), *ops]

        transition = Transition(
            build=build,
            keys=frozenset(keys),
            slots=max(len(write.events), 1),
            compare_key=guard_key,
            expected_mod=etcd_revision_of(write.expected_revision),
            uses_lease=bool(bound),
            runs=kept_runs,
        )
        return transition, meta

    def _refresh(self, kvs: Sequence[Any]) -> None:
        """Take keys as etcd has them now (after a lost compare, or a confirming read)."""
        now = instant(self._clock)
        for kv in kvs:
            key = self._kind(kv.key)[1]
            if kv.mod_revision > self._mods.get(key, 0):
                doc = self._decode_guard(kv, now)
                self._keep(doc.record, kv.mod_revision, doc.runs, self._moves_of(doc.record, doc.meta, kv.mod_revision))

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
        heartbeats, self._heartbeats = self._heartbeats, defaultdict(set)
        puts: list[Any] = []
        for key, events in refusals.items():
            for start in range(0, len(events), MAX_REFUSALS_PER_PUT):
                puts.append(
                    self._put(self._key("r", key), docs.encode_refusals(events[start : start + MAX_REFUSALS_PER_PUT]))
                )
        for key, tokens in heartbeats.items():
            record = self._index.get(key)
            beaten = [run for run in record.runs if run.fencing_token in tokens] if record is not None else []
            if beaten:
                puts.append(self._put(self._key("h", key), docs.encode_heartbeat(beaten, self.host_id)))
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


def _lock_delay(record: GuardRecord, copy: GuardRecord | None, meta: docs.GuardMeta, now: Instant) -> float | None:
    """A lock-delay runs its whole length from when this copy learns of the loss (late, never early: its length
    is a difference of that host's own clock readings); one this copy already counts goes on as it was."""
    if record.lock_delay_until is None:
        return None
    if copy is not None and copy.lock_delay_until == record.lock_delay_until:
        return copy.lock_delay_deadline
    if record.running or record.holders or record.released_at is None:
        # A semaphore's run was lost beside others: what was left of it when written, from now.
        return now.monotonic + meta.lock_delay_s if meta.lock_delay_s is not None else _lock_delay_from(record, now)
    return _lock_delay_from(record, now)


def _waiters_localized(
    record: GuardRecord, copy: GuardRecord | None, meta: docs.GuardMeta, now: Instant
) -> tuple[Waiter, ...]:
    """``record``'s waiters with their max_wait on this process's clock: as this copy already counts it, else
    what the writer had left of it, from now (another host's wall clock says nothing about ours)."""
    if not any(waiter.wait_until is not None for waiter in record.waiters):
        return record.waiters
    counted = {(w.run_id, w.wait_until): w.wait_deadline for w in copy.waiters} if copy is not None else {}
    waits = meta.waits or {}

    def localized(waiter: Waiter) -> Waiter:
        if waiter.wait_until is None:
            return waiter
        deadline = counted.get((waiter.run_id, waiter.wait_until))
        if deadline is None and waiter.run_id in waits:
            deadline = now.monotonic + waits[waiter.run_id]
        if deadline is None:
            return waiter  # written before the writer said what was left: its wall time, as then
        return replace(waiter, wait_deadline=deadline)

    return tuple(localized(waiter) for waiter in record.waiters)


def _stop_deadline(record: GuardRecord, copy: GuardRecord | None, meta: docs.GuardMeta, now: Instant) -> float | None:
    """When a superseded run is force-released, on this process's clock (as for a waiter's max_wait)."""
    if record.stop_deadline is None:
        return None
    if copy is not None and copy.fencing_token == record.fencing_token and copy.stop_until == record.stop_until:
        return copy.stop_deadline
    return now.monotonic + meta.stop_left_s if meta.stop_left_s is not None else record.stop_deadline


def _snapshots(write: Write, previous: GuardRecord | None) -> dict[str, GuardRecord]:
    """The runs that leave the record in ``write``, by lease id, each as last told: by the change's last event
    about it (a semaphore's run that ended beside others), else as the record it was (a run replaced)."""
    record = write.record
    current = {run.lease_id for run in (record, *record.holders)}
    snapshots: dict[str, GuardRecord] = {}
    for event in write.events:
        lease_id = event.guard.lease_id
        if lease_id and lease_id not in current:
            snapshots[lease_id] = _run_alone(event.guard)
    if previous is not None and previous.lease_id and previous.lease_id not in current:
        snapshots.setdefault(previous.lease_id, _run_alone(previous))
    return snapshots


def _run_alone(run: GuardRecord) -> GuardRecord:
    """A semaphore's past run as its snapshot keeps it: without the key's other runs and queue, which a late
    command of that run is not about (and which, N snapshots of N runs each, would outgrow a transaction)."""
    return run.alone() if run.holders or run.tokens_issued else run


def _owner_keys_to_delete(
    key: str, record: GuardRecord, previous: GuardRecord | None, named: dict[str, int], bound: dict[str, int]
) -> list[str]:
    """Owner keys (their names) that ``record`` leaves with no run to own, the ended runs' first: those go by
    name whether this copy saw them or not; then any other owner key of a run no longer held by a stream
    (another name of a run bound here anew, one written before semaphores)."""
    holding = {run.fencing_token for run in record.runs if run.stream_bound}
    names: list[str] = []
    if previous is not None:
        for run in previous.runs:
            if run.stream_bound and run.fencing_token not in holding:
                names.append(docs.owner_name(key, run.fencing_token))
                names.extend(name for name, token in named.items() if token == run.fencing_token)
    bound_tokens = set(bound.values())
    names.extend(
        name for name, token in named.items() if token not in holding or (token in bound_tokens and name not in bound)
    )
    return [name for name in dict.fromkeys(names) if name not in bound]
