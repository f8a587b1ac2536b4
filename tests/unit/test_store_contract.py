"""The store contract, run against every backend, plus what only the SQLite file promises.

Records come from ``core.decide`` at explicit instants of a ``ManualClock`` (``execute`` below is a
ten-line engine: read, decide, commit), so every write is one the state machine could have produced.
The same clock is the store's, which is what lets age retention and the restart mapping of deadlines
be checked exactly.
"""

from __future__ import annotations

import asyncio
import gc
import random
import sqlite3
import uuid
import warnings
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from taskguard.clock import ManualClock, instant
from taskguard.guard.core import decide
from taskguard.guard.model import (
    Acquire,
    Command,
    Decision,
    Durability,
    Event,
    EventType,
    ForceRelease,
    GuardRecord,
    GuardState,
    Heartbeat,
    Instant,
    Labels,
    Policy,
    Release,
    RunStatus,
)
from taskguard.store import Committed, RevisionCompacted, Store, StoreConflict, StoreUnavailable, Write
from taskguard.store import sqlite as sqlite_module
from taskguard.store import sqlite as sqlite_store
from taskguard.store.etcd import EtcdStore
from taskguard.store.etcd_client import EtcdSettings
from taskguard.store.memory import MemoryStore
from taskguard.store.retention import Retention
from taskguard.store.sqlite import DatabaseCorrupt, SchemaTooNew, SqliteStore
from tests.etcd_cluster import EtcdCluster

POLICY = Policy()

# SQLite prunes its event log once per this many new events (a DELETE per commit would cost more than
# it saves), so retention tests commit that many events: then every backend has pruned.
EVENTS_THAT_FORCE_PRUNING = sqlite_module._PRUNE_EVERY


# --- fixtures and helpers ---------------------------------------------------------------


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "tg.db"


@pytest.fixture(params=["memory", "sqlite", "etcd"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# The event log of the etcd store is etcd's own history: etcd's compaction (its --auto-compaction-retention) bounds it.
ETCD_KEEPS_ITS_OWN_HISTORY = "the etcd store's event log is etcd's history, which etcd's own compaction bounds"

StoreMaker = Callable[..., Store]


@pytest.fixture
def new_store(backend: str, db_path: Path, clock: ManualClock, request: pytest.FixtureRequest) -> StoreMaker:
    """Stores of this test's backend: one SQLite file, or one etcd prefix of its own on the session's etcd."""
    if backend == "etcd":
        cluster: EtcdCluster = request.getfixturevalue("etcd_server")
        settings = EtcdSettings.from_url(cluster.url, prefix=f"/contract-{uuid.uuid4().hex}/", lease_ttl_s=2)

    def make(retention: Retention | None = None) -> Store:
        if backend == "memory":
            return MemoryStore(clock, retention)
        if backend == "etcd":
            return EtcdStore(settings, clock)
        return SqliteStore(db_path, clock, retention)

    return make


@asynccontextmanager
async def opened(store: Store) -> AsyncIterator[Store]:
    await store.open()
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
async def store(new_store: StoreMaker) -> AsyncIterator[Store]:
    async with opened(new_store()) as store:
        yield store


def acquire(
    task_key: str,
    run_id: str = "run-1",
    *,
    ttl_s: float | None = 30.0,
    stream_bound: bool = False,
    labels: Labels = (),
) -> Acquire:
    return Acquire(
        task_key=task_key,
        run_id=run_id,
        holder=f"host-of-{run_id}",
        ttl_s=ttl_s,
        lease_id=lease_of(task_key, run_id),
        stream_bound=stream_bound,
        labels=labels,
    )


def lease_of(task_key: str, run_id: str) -> str:
    """The lease the shell would have minted for ``run_id``'s acquisition of ``task_key``."""
    return f"lease:{task_key}:{run_id}"


def release(task_key: str, run_id: str = "run-1", status: RunStatus = RunStatus.SUCCEEDED) -> Release:
    return Release(task_key, lease_of(task_key, run_id), status, detail=f"{run_id} is done")


def write_of(before: GuardRecord | None, decision: Decision) -> Write:
    assert decision.record is not None, decision.reply
    return Write(decision.record, decision.events, decision.durability, before.revision if before else 0)


async def decided(store: Store, command: Command, now: Instant) -> tuple[GuardRecord | None, Decision]:
    before = await store.get(command.task_key)
    return before, decide(before, command, now, POLICY)


async def execute(store: Store, command: Command, clock: ManualClock) -> Committed:
    """What the engine does with one command: read, decide at the clock's instant, commit."""
    before, decision = await decided(store, command, instant(clock))
    return await store.commit(write_of(before, decision))


async def acquire_many(store: Store, clock: ManualClock, count: int, prefix: str = "k") -> list[Committed]:
    """``count`` concurrent acquisitions of distinct keys, one event each."""
    return await asyncio.gather(*(execute(store, acquire(f"{prefix}-{i:05}::job"), clock) for i in range(count)))


def revisions(events: Sequence[Event]) -> list[int]:
    return [event.revision for event in events]


class Order:
    """The revisions a test sees, by their order: 1 is the first after the store opened, 2 the next...

    SQLite and memory number revisions 1, 2, 3; etcd's come from etcd's own
    (shared, and numbering the events inside one transaction in low bits). The
    contract is the order, and that the same event always has the same revision.
    """

    def __init__(self, store: Store) -> None:
        self._store = store
        self._base = store.revision
        self._seen: list[int] = []
        self._published = 0
        self._heard = asyncio.Event()
        store.subscribe(self._hear)

    def _hear(self, events: Sequence[Event]) -> None:
        self._published += len(events)
        self._heard.set()

    async def published(self, count: int) -> None:
        """Wait until ``count`` events were published: a shared store publishes (and logs, in its copy) what its
        watch brings back, which may come after a commit or a flush returned."""
        while True:
            self._heard.clear()
            if self._published >= count:
                return
            await asyncio.wait_for(self._heard.wait(), 10)

    def of(self, revision: int) -> int:
        if revision <= self._base:
            return 0
        if revision not in self._seen:
            assert not self._seen or revision > self._seen[-1], f"revision {revision} came after {self._seen[-1]}"
            self._seen.append(revision)
        return self._seen.index(revision) + 1

    def each(self, found: Sequence[int]) -> list[int]:
        return [self.of(revision) for revision in found]

    def events(self, events: Sequence[Event]) -> list[int]:
        return self.each(revisions(events))

    @property
    def head(self) -> int:
        return self.of(self._store.revision)

    def revision(self, nth: int) -> int:
        """The store's revision for the nth one seen, or the next to come when none that far was seen.

        (A shared etcd may have compacted revisions before the first one this test made.)
        """
        assert self._seen, "no revision seen yet"
        return self._seen[nth - 1] if nth <= len(self._seen) else self._store.revision + 1


@pytest.fixture
def order(store: Store) -> Order:
    return Order(store)


# --- the contract: every backend ------------------------------------------------------------


async def test_get_of_an_unknown_key_is_none(store: Store, order: Order, key: str) -> None:
    assert await store.get(key) is None
    await order.published(0)  # a shared store's head follows its watch
    assert order.head == 0


async def test_a_sync_commit_stamps_consecutive_revisions_and_moves_the_guard_to_the_last_one(
    backend: str, store: Store, order: Order, clock: ManualClock, key: str
) -> None:
    first = await execute(store, acquire(key, "run-1", ttl_s=10.0), clock)
    assert order.events(first.events) == [1]
    assert order.of(first.record.revision) == 1

    # The lapsed lease heals to EXPIRED and run-2 acquires: one decision, two events.
    clock.advance(20)
    second = await execute(store, acquire(key, "run-2"), clock)

    assert [event.type for event in second.events] == [EventType.EXPIRED, EventType.ACQUIRED]
    assert order.events(second.events) == [2, 3]
    if backend != "etcd":
        # Each event's snapshot at its own revision. (The engine never asks etcd for this: it commits healing
        # apart, one state change per transaction, and etcd stamps a transaction's snapshots alike.)
        assert order.each([event.guard.revision for event in second.events]) == [2, 3]
    assert order.of(second.record.revision) == 3
    assert second.record.run_id == "run-2"
    assert await store.get(key) == second.record
    await order.published(3)  # a shared store's head follows its watch
    assert order.head == 3


async def test_a_lazy_refusal_is_visible_at_once_and_leaves_the_guard_revision_alone(
    store: Store, order: Order, clock: ManualClock, key: str
) -> None:
    await execute(store, acquire(key, "run-1"), clock)
    before, refusal = await decided(store, acquire(key, "run-2"), instant(clock))
    assert refusal.durability is Durability.LAZY

    committed = await store.commit(write_of(before, refusal))

    # Visible before any flush, and the guard keeps the revision of its last state change.
    current = await store.get(key)
    assert current is not None
    assert current.duplicate_count == 1
    assert order.of(current.revision) == 1
    assert order.of(committed.record.revision) == 1

    await store.flush()
    await order.published(2)
    logged = await store.events_since(order.revision(1), 100)
    assert [(order.of(event.revision), event.type) for event in logged] == [
        (1, EventType.ACQUIRED),
        (2, EventType.DUPLICATE_REFUSED),
    ]
    assert order.of(logged[1].guard.revision) == 1
    assert logged[1].trigger_run_id == "run-2"
    await order.published(2)  # a shared store's head follows its watch
    assert order.head == 2

    # The next state change is decided on revision 1 and goes through.
    released = await execute(store, release(key, "run-1"), clock)
    assert order.events(released.events) == [3]
    assert released.record.duplicate_count == 1


async def test_a_volatile_heartbeat_writes_no_events(store: Store, order: Order, clock: ManualClock, key: str) -> None:
    acquired = await execute(store, acquire(key, "run-1", ttl_s=30.0), clock)
    clock.advance(5)
    before, heartbeat = await decided(store, Heartbeat(key, lease_of(key, "run-1")), instant(clock))
    assert heartbeat.durability is Durability.VOLATILE

    committed = await store.commit(write_of(before, heartbeat))

    assert committed.events == ()
    current = await store.get(key)
    assert current is not None
    assert current.expires_deadline == clock.monotonic() + 30.0
    assert current.revision == acquired.record.revision
    await store.flush()
    assert order.of(acquired.record.revision) == 1
    await order.published(1)  # a shared store's head follows its watch
    assert order.head == 1
    assert order.events(await store.events_since(order.revision(1), 100)) == [1]


async def test_a_commit_decided_on_a_stale_revision_raises_conflict_and_changes_nothing(
    store: Store, order: Order, clock: ManualClock, key: str
) -> None:
    acquired = await execute(store, acquire(key, "run-1"), clock)
    stale_release = decide(acquired.record, release(key, "run-1"), instant(clock), POLICY)
    assert stale_release.record is not None

    with pytest.raises(StoreConflict, match=f"at revision {acquired.record.revision}, not 0"):
        await store.commit(Write(stale_release.record, stale_release.events, Durability.SYNC, expected_revision=0))

    assert await store.get(key) == acquired.record
    await store.flush()
    assert order.of(acquired.record.revision) == 1
    await order.published(1)  # a shared store's head follows its watch
    assert order.head == 1
    assert order.events(await store.events_since(order.revision(1), 100)) == [1]


async def test_a_refusal_decided_on_a_stale_revision_raises_conflict_and_changes_nothing(
    store: Store, order: Order, clock: ManualClock, key: str
) -> None:
    acquired = await execute(store, acquire(key, "run-1"), clock)
    assert order.of(acquired.record.revision) == 1
    refusal = decide(acquired.record, acquire(key, "run-2"), instant(clock), POLICY)
    assert refusal.record is not None

    with pytest.raises(StoreConflict):
        await store.commit(
            Write(refusal.record, refusal.events, refusal.durability, expected_revision=acquired.record.revision + 7)
        )

    assert await store.get(key) == acquired.record
    await store.flush()
    await order.published(1)  # a shared store's head follows its watch
    assert order.head == 1


async def test_concurrent_acquisitions_of_a_new_key_have_exactly_one_winner(
    store: Store, order: Order, clock: ManualClock, key: str
) -> None:
    now = instant(clock)
    decisions = [decide(None, acquire(key, f"run-{i}"), now, POLICY) for i in range(8)]

    outcomes = await asyncio.gather(
        *(store.commit(write_of(None, decision)) for decision in decisions), return_exceptions=True
    )

    winners = [outcome for outcome in outcomes if isinstance(outcome, Committed)]
    assert len(winners) == 1
    assert all(isinstance(outcome, StoreConflict) for outcome in outcomes if outcome is not winners[0])
    assert await store.get(key) == winners[0].record
    assert order.of(winners[0].record.revision) == 1
    await order.published(1)  # a shared store's head follows its watch
    assert order.head == 1


async def test_two_concurrent_sync_commits_from_the_same_revision_have_exactly_one_winner(
    store: Store, order: Order, clock: ManualClock, key: str
) -> None:
    acquired = await execute(store, acquire(key, "run-1"), clock)
    assert order.of(acquired.record.revision) == 1
    now = instant(clock)
    by_holder = decide(acquired.record, release(key, "run-1"), now, POLICY)
    by_operator = decide(acquired.record, ForceRelease(key, "ops", "stuck"), now, POLICY)

    outcomes = await asyncio.gather(
        store.commit(write_of(acquired.record, by_holder)),
        store.commit(write_of(acquired.record, by_operator)),
        return_exceptions=True,
    )

    winners = [outcome for outcome in outcomes if isinstance(outcome, Committed)]
    losers = [outcome for outcome in outcomes if isinstance(outcome, StoreConflict)]
    assert (len(winners), len(losers)) == (1, 1)
    assert await store.get(key) == winners[0].record
    assert order.of(winners[0].record.revision) == 2
    await order.published(2)  # a shared store's head follows its watch
    assert order.head == 2
    assert order.events(await store.events_since(order.revision(1), 100)) == [1, 2]


async def test_find_run_finds_the_current_lease(store: Store, clock: ManualClock, key: str) -> None:
    acquired = await execute(store, acquire(key, "run-1"), clock)

    assert await store.find_run(lease_of(key, "run-1")) == acquired.record


async def test_find_run_finds_an_old_lease_s_last_snapshot_after_the_key_was_acquired_again(
    store: Store, order: Order, clock: ManualClock, key: str
) -> None:
    acquired = await execute(store, acquire(key, "run-1"), clock)
    clock.advance(1)
    released = await execute(store, release(key, "run-1", RunStatus.SUCCEEDED), clock)
    assert order.each([acquired.record.revision, released.record.revision]) == [1, 2]
    clock.advance(1)
    second = await execute(store, acquire(key, "run-2"), clock)

    old = await store.find_run(lease_of(key, "run-1"))
    assert old is not None
    assert (old.task_key, old.run_id, old.state, old.fencing_token, old.last_detail) == (
        key,
        "run-1",
        GuardState.SUCCEEDED,
        1,
        "run-1 is done",
    )
    assert order.of(old.revision) == 2
    assert await store.find_run(lease_of(key, "run-2")) == second.record


async def test_find_run_of_an_unknown_lease_is_none(store: Store, clock: ManualClock, key: str) -> None:
    await execute(store, acquire(key, "run-1"), clock)

    assert await store.find_run("lease-nobody-minted") is None


SCAN_KEYS = ["c::1", "a::1", "b::3", "ba::1", "b::1", "b::2"]


@pytest.mark.parametrize(
    ("prefix", "after", "limit", "expected"),
    [
        ("", "", 100, ["a::1", "b::1", "b::2", "b::3", "ba::1", "c::1"]),
        ("b::", "", 100, ["b::1", "b::2", "b::3"]),
        ("b::", "b::1", 100, ["b::2", "b::3"]),
        ("b::", "", 2, ["b::1", "b::2"]),
        ("b", "b::3", 100, ["ba::1"]),
        ("", "b::2", 2, ["b::3", "ba::1"]),
        ("b::", "a", 100, ["b::1", "b::2", "b::3"]),
        ("b::", "c", 100, []),
        ("zz", "", 100, []),
    ],
    ids=[
        "everything",
        "prefix",
        "prefix-after",
        "prefix-limit",
        "after-inside-a-wider-prefix",
        "after-limit",
        "after-before-the-prefix",
        "after-past-the-prefix",
        "no-match",
    ],
)
async def test_scan_returns_keys_in_order_honouring_prefix_after_and_limit(
    store: Store, clock: ManualClock, prefix: str, after: str, limit: int, expected: list[str]
) -> None:
    for task_key in SCAN_KEYS:
        await execute(store, acquire(task_key), clock)

    found = await store.scan(prefix, after, limit)

    assert [record.task_key for record in found] == expected


async def test_running_lists_only_running_guards(store: Store, clock: ManualClock) -> None:
    for task_key in ("s::running-1", "s::released", "s::running-2", "s::forced"):
        await execute(store, acquire(task_key), clock)
    await execute(store, release("s::released"), clock)
    await execute(store, ForceRelease("s::forced", "ops", "stuck"), clock)

    running = await store.running()

    assert sorted(record.task_key for record in running) == ["s::running-1", "s::running-2"]
    assert all(record.state is GuardState.RUNNING for record in running)


async def test_events_since_returns_events_in_revision_order_from_the_given_revision(
    store: Store, order: Order, clock: ManualClock, key: str
) -> None:
    first = await execute(store, acquire(key, "run-1"), clock)
    await execute(store, release(key, "run-1"), clock)
    await execute(store, acquire(key, "run-2"), clock)
    await execute(store, ForceRelease(key, "ops", "stuck"), clock)
    assert order.of(first.record.revision) == 1
    await order.published(4)

    everything = await store.events_since(order.revision(1), 100)
    assert [(order.of(event.revision), event.type) for event in everything] == [
        (1, EventType.ACQUIRED),
        (2, EventType.RELEASED),
        (3, EventType.ACQUIRED),
        (4, EventType.FORCE_RELEASED),
    ]
    assert all(event.task_key == key for event in everything)
    assert order.events(await store.events_since(order.revision(2), 2)) == [2, 3]
    assert order.events(await store.events_since(order.revision(4), 100)) == [4]
    assert await store.events_since(order.revision(5), 100) == []


async def test_subscribers_get_every_batch_in_revision_order(
    store: Store, order: Order, clock: ManualClock, key: str
) -> None:
    batches: list[list[int]] = []
    store.subscribe(lambda events: batches.append(revisions(events)))

    await acquire_many(store, clock, 20)
    await execute(store, acquire("k-00003::job", "run-2"), clock)  # a LAZY refusal
    await execute(store, acquire(key), clock)
    await store.flush()
    await order.published(22)

    assert all(batches), "no empty batch is published"
    assert all(batch == sorted(batch) for batch in batches)
    assert order.each([revision for batch in batches for revision in batch]) == list(range(1, 23))
    assert order.events(await store.events_since(order.revision(1), 100)) == list(range(1, 23))


async def test_retention_by_count_compacts_all_but_the_newest_events(
    backend: str, new_store: StoreMaker, clock: ManualClock
) -> None:
    if backend == "etcd":
        pytest.skip(ETCD_KEEPS_ITS_OWN_HISTORY)
    async with opened(new_store(Retention(max_events=10, max_age_s=None))) as store:
        await acquire_many(store, clock, EVENTS_THAT_FORCE_PRUNING)
        head = store.revision
        oldest = head - 10 + 1

        with pytest.raises(RevisionCompacted) as compacted:
            await store.events_since(1, 100)

        assert (compacted.value.requested, compacted.value.oldest) == (1, oldest)
        assert f"the oldest available is {oldest}" in str(compacted.value)
        with pytest.raises(RevisionCompacted):
            await store.events_since(oldest - 1, 100)
        assert revisions(await store.events_since(oldest, 100)) == list(range(oldest, head + 1))


async def test_retention_by_age_compacts_events_older_than_the_limit(
    backend: str, new_store: StoreMaker, clock: ManualClock
) -> None:
    if backend == "etcd":
        pytest.skip(ETCD_KEEPS_ITS_OWN_HISTORY)
    async with opened(new_store(Retention(max_events=100_000, max_age_s=60.0))) as store:
        await acquire_many(store, clock, EVENTS_THAT_FORCE_PRUNING - 2, prefix="old")
        clock.advance(30)
        await execute(store, acquire("young::job"), clock)
        clock.advance(31)
        await execute(store, acquire("new::job"), clock)
        young = EVENTS_THAT_FORCE_PRUNING - 1

        with pytest.raises(RevisionCompacted) as compacted:
            await store.events_since(1, 100)

        assert compacted.value.oldest == young
        assert [event.task_key for event in await store.events_since(young, 100)] == ["young::job", "new::job"]


async def test_flush_persists_lazy_writes_to_the_event_log(
    store: Store, order: Order, clock: ManualClock, key: str
) -> None:
    acquired = await execute(store, acquire(key, "run-1"), clock)
    assert order.of(acquired.record.revision) == 1
    for i in range(3):
        await execute(store, acquire(key, f"dup-{i}"), clock)

    await store.flush()
    await order.published(4)

    logged = await store.events_since(acquired.record.revision + 1, 100)
    assert [event.trigger_run_id for event in logged] == ["dup-0", "dup-1", "dup-2"]
    assert order.events(logged) == [2, 3, 4]
    await order.published(4)  # a shared store's head follows its watch
    assert order.head == 4
    assert [event.guard.duplicate_count for event in logged] == [1, 2, 3]


# --- SQLite only: the file ---------------------------------------------------------------


async def test_sqlite_keeps_every_sync_commit_across_close_and_reopen(db_path: Path, clock: ManualClock) -> None:
    async with opened(SqliteStore(db_path, clock)) as store:
        await execute(store, acquire("a::ttl", labels=(("team", "infra"), ("zone", "é"))), clock)
        await execute(store, acquire("a::stream", ttl_s=None, stream_bound=True), clock)
        await execute(store, acquire("a::failed"), clock)
        await execute(store, release("a::failed", status=RunStatus.FAILED), clock)
        await execute(store, acquire("a::forced"), clock)
        await execute(store, ForceRelease("a::forced", "ops", "stuck"), clock)
        await execute(store, acquire("a::again", "run-1"), clock)
        first_run = (await execute(store, release("a::again", "run-1"), clock)).record
        await execute(store, acquire("a::again", "run-2"), clock)
        before = {record.task_key: record for record in await store.scan("", "", 100)}
        head = store.revision
        logged = [(event.revision, event.type, event.task_key) for event in await store.events_since(1, 100)]

    async with opened(SqliteStore(db_path, clock)) as store:
        assert {record.task_key: record for record in await store.scan("", "", 100)} == before
        assert store.revision == head == 9
        assert [(event.revision, event.type, event.task_key) for event in await store.events_since(1, 100)] == logged
        assert sorted(record.task_key for record in await store.running()) == ["a::again", "a::stream", "a::ttl"]
        assert await store.find_run(lease_of("a::again", "run-1")) == first_run

        # The revision counter carries on where it stopped.
        next_commit = await execute(store, release("a::ttl"), clock)
        assert revisions(next_commit.events) == [head + 1]


async def test_sqlite_maps_stored_deadlines_onto_the_clock_of_the_reopening_process(
    db_path: Path, clock: ManualClock
) -> None:
    async with opened(SqliteStore(db_path, clock)) as store:
        acquired = await execute(store, acquire("d::job", ttl_s=30.0), clock)
    assert acquired.record.expires_deadline == clock.monotonic() + 30.0

    # A new process, 10 s later by the wall clock, whose monotonic clock reads what the old one did.
    restarted = ManualClock(start=clock.now_utc() + timedelta(seconds=10))
    async with opened(SqliteStore(db_path, restarted)) as store:
        loaded = await store.get("d::job")

    assert loaded is not None
    assert loaded.expires_at == acquired.record.expires_at
    assert loaded.expires_deadline == restarted.monotonic() + 20.0
    assert loaded.last_seen == restarted.monotonic() - 10.0
    assert loaded == replace(acquired.record, expires_deadline=loaded.expires_deadline, last_seen=loaded.last_seen)


async def test_sqlite_keeps_lazy_duplicate_counts_written_before_close(db_path: Path, clock: ManualClock) -> None:
    async with opened(SqliteStore(db_path, clock)) as store:
        await execute(store, acquire("l::job", "run-1"), clock)
        for i in range(3):
            await execute(store, acquire("l::job", f"dup-{i}"), clock)
        # No flush: close must write them.

    async with opened(SqliteStore(db_path, clock)) as store:
        loaded = await store.get("l::job")
        assert loaded is not None
        assert (loaded.duplicate_count, loaded.revision) == (3, 1)
        assert store.revision == 4
        assert [event.type for event in await store.events_since(1, 100)] == [
            EventType.ACQUIRED,
            *[EventType.DUPLICATE_REFUSED] * 3,
        ]
        released = await execute(store, release("l::job", "run-1"), clock)
        assert released.record.revision == 5


def write_user_version(path: Path, version: int) -> None:
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version={version}")
    db.close()


def read_user_version(path: Path) -> int:
    with sqlite3.connect(path) as db:
        (version,) = db.execute("PRAGMA user_version").fetchone()
    db.close()
    return int(version)


def write_garbage(path: Path) -> bytes:
    garbage = random.Random(7).randbytes(16384)
    path.write_bytes(garbage)
    return garbage


def file_bytes(path: Path) -> bytes:
    return path.read_bytes()


def file_names(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def truncate_to_half(path: Path) -> None:
    assert not path.with_name(path.name + "-wal").exists(), "closing checkpoints the WAL into the file"
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])


@contextmanager
def resource_warnings() -> Iterator[list[warnings.WarningMessage]]:
    """Collect the ResourceWarnings raised inside; an aiosqlite connection freed while open raises one."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found: list[warnings.WarningMessage] = []
        yield found
    found.extend(warning for warning in caught if issubclass(warning.category, ResourceWarning))


async def test_sqlite_refuses_a_database_from_a_newer_schema(db_path: Path, clock: ManualClock) -> None:
    newer = sqlite_module.SCHEMA_VERSION + 1
    write_user_version(db_path, newer)
    store = SqliteStore(db_path, clock)

    with pytest.raises(SchemaTooNew) as refused:
        await store.open()

    message = str(refused.value)
    assert str(db_path) in message
    assert f"schema version {newer} is newer than this sidecar's ({sqlite_module.SCHEMA_VERSION})" in message
    assert "upgrade taskguard" in message
    del refused
    assert read_user_version(db_path) == newer, "the newer file is left as it was"
    with resource_warnings() as leaked:
        del store
        gc.collect()
    assert leaked == [], "a refused open leaves no connection open"


async def test_sqlite_refuses_a_file_of_random_bytes_and_leaves_it_alone(db_path: Path, clock: ManualClock) -> None:
    garbage = write_garbage(db_path)
    store = SqliteStore(db_path, clock)

    with pytest.raises(DatabaseCorrupt, match="not a usable Task Guard database"):
        await store.open()

    assert file_bytes(db_path) == garbage
    with resource_warnings() as leaked:
        del store
        gc.collect()
    assert leaked == []


async def test_sqlite_refuses_a_truncated_database(db_path: Path, clock: ManualClock) -> None:
    async with opened(SqliteStore(db_path, clock)) as store:
        await acquire_many(store, clock, 300)
    truncate_to_half(db_path)

    with pytest.raises(DatabaseCorrupt, match=str(db_path)):
        await SqliteStore(db_path, clock).open()


async def test_sqlite_batches_concurrent_commits_on_distinct_keys_into_fewer_transactions(
    db_path: Path, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with opened(SqliteStore(db_path, clock)) as store:
        assert isinstance(store, SqliteStore)
        statements = record_statements(store, monkeypatch)

        committed = await acquire_many(store, clock, 50)

        assert sorted(revision for done in committed for revision in revisions(done.events)) == list(range(1, 51))
        transactions = statements.count("BEGIN IMMEDIATE")
        assert 1 <= transactions < 50
        assert statements.count("COMMIT") == transactions


def record_statements(
    store: SqliteStore, monkeypatch: pytest.MonkeyPatch, fail: Callable[[str], bool] | None = None
) -> list[str]:
    """Record each statement a batch runs on the writer's thread; those ``fail`` picks raise a disk error instead."""
    seen: list[str] = []
    real_write_rows = sqlite_store._write_rows

    class Recording:
        def __init__(self, connection: sqlite3.Connection) -> None:
            self._connection = connection

        def execute(self, sql: str, *args: Any) -> Any:
            seen.append(sql)
            if fail is not None and fail(sql):
                raise sqlite3.OperationalError("disk I/O error")
            return self._connection.execute(sql, *args)

        def executemany(self, sql: str, rows: Any) -> Any:
            seen.append(sql)
            return self._connection.executemany(sql, rows)

        @property
        def in_transaction(self) -> bool:
            return self._connection.in_transaction

    def write_rows(connection: sqlite3.Connection, *args: Any) -> Any:
        return real_write_rows(Recording(connection), *args)  # type: ignore[arg-type]

    monkeypatch.setattr(sqlite_store, "_write_rows", write_rows)
    return seen


async def test_sqlite_turns_a_failed_batch_into_store_unavailable_and_the_next_commit_succeeds(
    db_path: Path, clock: ManualClock, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async with opened(SqliteStore(db_path, clock)) as store:
        assert isinstance(store, SqliteStore)
        acquired = await execute(store, acquire("f::job", "run-1"), clock)
        published: list[list[int]] = []
        store.subscribe(lambda events: published.append(revisions(events)))
        commits_to_fail = [1]  # only the first COMMIT: the disk comes back afterwards

        def fail_once(sql: str) -> bool:
            if sql == "COMMIT" and commits_to_fail:
                return bool(commits_to_fail.pop())
            return False

        record_statements(store, monkeypatch, fail=fail_once)

        with pytest.raises(StoreUnavailable, match="disk I/O error"):
            await execute(store, release("f::job", "run-1"), clock)

        assert await store.get("f::job") == acquired.record
        assert store.revision == 1
        assert published == []
        assert revisions(await store.events_since(1, 100)) == [1]
        assert "commit of 1 transitions failed" in caplog.text

        released = await execute(store, release("f::job", "run-1"), clock)
        assert revisions(released.events) == [2]
        assert published == [[2]]

    async with opened(SqliteStore(db_path, clock)) as store:
        assert await store.get("f::job") == released.record
        assert revisions(await store.events_since(1, 100)) == [1, 2]


async def test_sqlite_opens_a_database_whose_path_has_uri_special_characters(
    tmp_path: Path, clock: ManualClock
) -> None:
    db_path = tmp_path / "odd#dir?mode=rw%20" / "tg.db"
    async with opened(SqliteStore(db_path, clock)) as store:
        await execute(store, acquire("u::job", "run-1"), clock)
        await execute(store, release("u::job", "run-1"), clock)
        await execute(store, acquire("u::job", "run-2"), clock)

        # Both of these read through the second, read-only connection.
        assert revisions(await store.events_since(1, 100)) == [1, 2, 3]
        old = await store.find_run(lease_of("u::job", "run-1"))
        assert old is not None and old.state is GuardState.SUCCEEDED

    assert file_names(tmp_path) == ["odd#dir?mode=rw%20"], "no stray database file"
