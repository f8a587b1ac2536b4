"""The embedded default store: SQLite in WAL mode through aiosqlite, with group commit.

One writer task owns the write connection. Transitions queue up while the
previous batch is being fsynced and go into the next transaction together, so
a burst of N acquisitions costs a handful of fsyncs, not N. A SYNC write's
future resolves only after its COMMIT returned (``synchronous=FULL``), which is
what lets the engine promise "committed before anyone is told".

Every guard is also kept in memory (``GuardIndex``): this process is the only
writer, so the in-memory copy is authoritative and reads never touch the disk.
Reads of old runs (a lease that is no longer current) and of the event log go
through a second, read-only connection, which WAL lets run beside the writer.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import sqlite3
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from taskguard import lockfile
from taskguard.clock import Clock, instant
from taskguard.guard.model import Durability, Event, GuardRecord
from taskguard.store import (
    Committed,
    RevisionCompacted,
    StoreConflict,
    StoreError,
    StoreUnavailable,
    Write,
    codec,
)
from taskguard.store.index import GuardIndex, SingleWriterStore, other_runs_changed, stamp
from taskguard.store.retention import Retention

log = logging.getLogger(__name__)

_T = TypeVar("_T")

_SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS meta (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS guards (
    task_key TEXT PRIMARY KEY,
    revision INTEGER NOT NULL,
    doc      TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    lease_id      TEXT PRIMARY KEY,
    task_key      TEXT NOT NULL,
    fencing_token INTEGER NOT NULL,
    doc           TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_by_key ON runs (task_key, fencing_token);
CREATE TABLE IF NOT EXISTS events (
    revision    INTEGER PRIMARY KEY,
    task_key    TEXT NOT NULL,
    occurred_at TEXT NOT NULL,
    doc         TEXT NOT NULL
);
"""

# MIGRATIONS[n] takes a database from schema version n to n + 1; PRAGMA
# user_version records where a file is. Append, never edit: files in the field
# are at every version this list ever had.
MIGRATIONS: tuple[str, ...] = (
    _SCHEMA_V1,
    # 2: age-based retention deletes by time; without an index that is a scan of the whole log.
    "CREATE INDEX IF NOT EXISTS events_by_time ON events (occurred_at);",
)
SCHEMA_VERSION = len(MIGRATIONS)


_UPSERT_GUARD = (
    "INSERT INTO guards (task_key, revision, doc) VALUES (?, ?, ?) "
    "ON CONFLICT (task_key) DO UPDATE SET revision = excluded.revision, doc = excluded.doc"
)
_UPSERT_RUN = (
    "INSERT INTO runs (lease_id, task_key, fencing_token, doc) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (lease_id) DO UPDATE SET doc = excluded.doc"
)
_INSERT_EVENT = "INSERT INTO events (revision, task_key, occurred_at, doc) VALUES (?, ?, ?, ?)"
_SET_REVISION = (
    "INSERT INTO meta (name, value) VALUES ('revision', ?) ON CONFLICT (name) DO UPDATE SET value = excluded.value"
)

# Pruning the event log costs a DELETE; do it once per this many new events
# (or this long), so the log may run over its count limit by that much.
_PRUNE_EVERY = 1000
_PRUNE_INTERVAL_S = 60.0
# Refused triggers wait this long for a state change to ride along with
# before they get a transaction of their own.
_LAZY_LINGER_S = 0.1


class SchemaTooNew(StoreError):
    def __init__(self, path: Path, found: int) -> None:
        super().__init__(
            f"{path}: database schema version {found} is newer than this sidecar's ({SCHEMA_VERSION}); "
            "upgrade taskguard or point --db at another file"
        )


class DatabaseCorrupt(StoreError):
    pass


@dataclass(slots=True)
class _Queued:
    write: Write
    done: asyncio.Future[Committed] | None


class SqliteStore(SingleWriterStore):
    """Not safe to share across event loops; one process per database file."""

    def __init__(self, path: Path, clock: Clock, retention: Retention | None = None) -> None:
        self._path = path
        self._clock = clock
        self._retention = retention or Retention()
        self._index = GuardIndex()
        self._db: aiosqlite.Connection | None = None
        self._lock: lockfile.LockFile | None = None
        self._reader: aiosqlite.Connection | None = None
        self._queue: list[_Queued] = []
        self._flush_waiters: list[asyncio.Future[None]] = []
        self._has_work = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._closing = False
        self._revision = 0
        self._oldest_event = 1
        self._since_prune = 0
        self._last_prune = 0.0
        self._syncing: dict[str, int] = {}
        self._linger: asyncio.TimerHandle | None = None
        self.transactions = 0
        self._lazy_lost = 0

    @property
    def path(self) -> Path:
        return self._path

    async def open(self) -> None:
        self._lock = _take_database(self._path)
        try:
            self._db = await aiosqlite.connect(self._path, isolation_level=None)
            await self._prepare(self._db)
            await self._load(self._db)
            self._oldest_event = await self._in_thread(_prune_rows, self._prune_plan(self._revision), self._revision)
            # as_uri() percent-encodes the path: a raw '#', '?' or '%' in it would end or alter the URI.
            reader_uri = f"{self._path.absolute().as_uri()}?mode=ro"
            self._reader = await aiosqlite.connect(reader_uri, uri=True, isolation_level=None)
        except sqlite3.OperationalError as error:
            # The file may be fine: the disk, a permission or a lock is in the way.
            await self._close_connections()
            raise StoreUnavailable(
                f"{self._path}: cannot open the database: {error}{_why_not_writable(self._path)}"
            ) from error
        except sqlite3.DatabaseError as error:
            await self._close_connections()
            raise DatabaseCorrupt(f"{self._path}: not a usable Task Guard database: {error}") from error
        except BaseException:
            # SchemaTooNew and the like: a refused open leaves nothing for the caller to close.
            await self._close_connections()
            raise
        finally:
            if self._db is None:
                self._release_lock()
        self._writer = asyncio.create_task(self._write_loop(), name="taskguard-sqlite-writer")

    async def _prepare(self, db: aiosqlite.Connection) -> None:
        async with db.execute("PRAGMA user_version") as cursor:
            row = await cursor.fetchone()
        found = int(row[0]) if row else 0
        if found > SCHEMA_VERSION:
            raise SchemaTooNew(self._path, found)
        if found == 0:
            async with db.execute("SELECT count(*) FROM sqlite_master") as cursor:
                row = await cursor.fetchone()
            if row and row[0]:
                raise DatabaseCorrupt(
                    f"{self._path}: a SQLite database, but not Task Guard's (tables, no schema version)"
                )
        else:
            async with db.execute("PRAGMA quick_check") as cursor:
                verdict = [str(line[0]) async for line in cursor]
            if verdict != ["ok"]:
                raise DatabaseCorrupt(f"{self._path}: integrity check failed: {'; '.join(verdict[:3])}")
        async with db.execute("PRAGMA journal_mode=WAL") as cursor:
            mode = await cursor.fetchone()
        if not mode or str(mode[0]).lower() != "wal":
            raise DatabaseCorrupt(f"{self._path}: could not switch to WAL mode (got {mode})")
        # FULL: a commit is on disk, not only in the OS cache, before it returns.
        await db.execute("PRAGMA synchronous=FULL")
        await db.execute("PRAGMA foreign_keys=ON")
        for version in range(found, SCHEMA_VERSION):
            # One transaction per step: a crash mid-migration leaves the file at a version it really is at.
            await db.executescript(f"BEGIN IMMEDIATE; {MIGRATIONS[version]} PRAGMA user_version={version + 1}; COMMIT;")
            if found:
                log.info("%s: migrated the schema from version %d to %d", self._path, version, version + 1)

    async def _load(self, db: aiosqlite.Connection) -> None:
        now = instant(self._clock)
        async with db.execute("SELECT doc FROM guards") as cursor:
            async for (doc,) in cursor:
                self._index.put(codec.record_from_doc(codec.loads(doc), now))
        async with db.execute("SELECT value FROM meta WHERE name = 'revision'") as cursor:
            row = await cursor.fetchone()
        self._revision = int(row[0]) if row else 0
        async with db.execute("SELECT MIN(revision) FROM events") as cursor:
            row = await cursor.fetchone()
        self._oldest_event = int(row[0]) if row and row[0] is not None else self._revision + 1

    async def close(self) -> None:
        if self._writer is not None:
            await self.flush()
            self._closing = True
            self._has_work.set()
            await self._writer
            self._writer = None
        await self._close_connections()
        self._release_lock()

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    async def _close_connections(self) -> None:
        for connection in (self._reader, self._db):
            if connection is not None:
                await connection.close()
        self._reader = self._db = None

    async def find_run(self, lease_id: str) -> GuardRecord | None:
        current = self._current_run(lease_id)
        if current is not None:
            return current
        assert self._reader is not None
        async with self._reader.execute("SELECT doc FROM runs WHERE lease_id = ?", (lease_id,)) as cursor:
            row = await cursor.fetchone()
        return codec.record_from_doc(codec.loads(row[0]), instant(self._clock)) if row else None

    async def commit(self, write: Write) -> Committed:
        if self._writer is None or self._closing:
            raise StoreUnavailable("the store is closed")
        key = write.record.task_key
        if write.durability is not Durability.SYNC:
            # Refusals and heartbeats are visible at once; their rows ride along
            # with the next batch (VOLATILE ones only with the next state change).
            # Applied over a state change still in flight they would be written
            # from the wrong base, so that is a conflict, like a moved revision.
            if key in self._syncing:
                raise StoreConflict(f"guard {key!r} has a state change in flight")
            self._index.check(write)
            self._index.put(write.record)
            if write.durability is Durability.LAZY:
                self._queue.append(_Queued(write, None))
                if self._linger is None:
                    self._linger = asyncio.get_running_loop().call_later(_LAZY_LINGER_S, self._has_work.set)
            return Committed(write.record, ())
        done: asyncio.Future[Committed] = asyncio.get_running_loop().create_future()
        self._syncing[key] = self._syncing.get(key, 0) + 1
        self._enqueue(_Queued(write, done))
        try:
            return await done
        finally:
            if self._syncing[key] == 1:
                del self._syncing[key]
            else:
                self._syncing[key] -= 1

    def _enqueue(self, item: _Queued) -> None:
        self._queue.append(item)
        self._has_work.set()

    async def flush(self) -> None:
        """Persist every LAZY write made so far; StoreUnavailable if some could not be."""
        if self._writer is None:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._flush_waiters.append(waiter)
        self._has_work.set()
        await waiter
        lost, self._lazy_lost = self._lazy_lost, 0
        if lost:
            raise StoreUnavailable(f"{lost} refused-trigger records could not be written")

    async def _write_loop(self) -> None:
        while True:
            await self._has_work.wait()
            self._has_work.clear()
            if self._linger is not None:
                self._linger.cancel()
                self._linger = None
            batch, self._queue = self._queue, []
            waiters, self._flush_waiters = self._flush_waiters, []
            if batch:
                try:
                    await self._write_batch(batch)
                except Exception as error:
                    # Whatever broke, no caller may wait forever on this batch.
                    log.exception("writing a batch failed")
                    self._fail(batch, StoreUnavailable(f"the store failed to write: {error!r}"))
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
            if self._closing and not self._queue:
                return

    async def _write_batch(self, batch: list[_Queued]) -> None:
        assert self._db is not None
        revision = self._revision
        # Revisions as of this batch, so that two queued writes of one key are
        # checked against each other and not only against the committed index.
        latest: dict[str, int] = {}
        accepted: list[tuple[_Queued, Committed]] = []
        guard_rows: list[tuple[str, int, str]] = []
        run_rows: list[tuple[str, str, int, str]] = []
        event_rows: list[tuple[int, str, str, str]] = []
        for item in batch:
            write = item.write
            key = write.record.task_key
            if item.done is not None:
                current = latest.get(key)
                if current is None:
                    record = self._index.get(key)
                    current = record.revision if record is not None else 0
                if current != write.expected_revision:
                    item.done.set_exception(StoreConflict.at(key, current, write.expected_revision))
                    continue
            committed = stamp(write, revision + 1)
            revision += len(committed.events)
            latest[key] = committed.record.revision
            accepted.append((item, committed))
            doc = codec.encode_record(committed.record)
            guard_rows.append((key, committed.record.revision, doc))
            run_rows.append((committed.record.lease_id, key, committed.record.fencing_token, doc))
            run_rows.extend(
                (run.lease_id, key, run.fencing_token, codec.encode_record(run))
                for run in other_runs_changed(committed)
            )
            event_rows.extend(
                (event.revision, key, event.occurred_at.isoformat(), codec.encode_event(event))
                for event in committed.events
            )
        if not accepted:
            return
        self._since_prune += len(event_rows)
        prune = self._prune_plan(revision) if self._prune_due() else None
        try:
            oldest = await self._in_thread(_write_rows, guard_rows, run_rows, event_rows, revision, prune)
        except sqlite3.Error as error:
            log.error("commit of %d transitions failed: %s", len(accepted), error)
            self._fail([item for item, _ in accepted], StoreUnavailable(f"the database cannot commit: {error}"))
            return
        self.transactions += 1
        if oldest is not None:
            self._oldest_event = oldest
        self._revision = revision
        events: list[Event] = []
        for item, committed in accepted:
            if item.done is not None:
                self._index.put(committed.record)
                if not item.done.done():
                    item.done.set_result(committed)
            events.extend(committed.events)
        self._index.publish(events)

    def _fail(self, items: list[_Queued], error: StoreUnavailable) -> None:
        for item in items:
            if item.done is None:
                self._lazy_lost += 1
            elif not item.done.done():
                item.done.set_exception(error)

    def _prune_due(self) -> bool:
        # By count every so many events, and by age at least once a minute.
        return self._since_prune >= _PRUNE_EVERY or self._clock.monotonic() - self._last_prune >= _PRUNE_INTERVAL_S

    def _prune_plan(self, revision: int) -> _Prune:
        self._since_prune = 0
        self._last_prune = self._clock.monotonic()
        cutoff = self._retention.cutoff(self._clock.now_utc())
        return _Prune(revision - self._retention.max_events, cutoff.isoformat() if cutoff else None)

    async def _in_thread(self, work: Callable[..., _T], *args: Any) -> _T:
        """Run ``work(connection, *args)`` on aiosqlite's own thread, in one hop.

        aiosqlite's public calls cost a thread hop each, and a batch needs
        about six statements; its ``_execute`` runs a whole function there.
        """
        db = self._db
        assert db is not None
        result: _T = await db._execute(lambda: work(db._conn, *args))  # type: ignore[no-untyped-call]
        return result

    async def events_since(self, revision: int, limit: int) -> list[Event]:
        revision = max(revision, 1)
        if revision < self._oldest_event and revision <= self._revision:
            raise RevisionCompacted(revision, self._oldest_event)
        assert self._reader is not None
        now = instant(self._clock)
        async with self._reader.execute(
            "SELECT doc FROM events WHERE revision >= ? AND revision <= ? ORDER BY revision LIMIT ?",
            (revision, self._revision, limit),
        ) as cursor:
            return [codec.event_from_doc(codec.loads(doc), now) async for (doc,) in cursor]

    @property
    def revision(self) -> int:
        return self._revision


# The database and the files SQLite keeps beside it; all hold lease_ids, which are capabilities.
DATABASE_SUFFIXES = ("", "-wal", "-shm", "-journal")


class DatabaseExposed(StoreError):
    pass


def _take_database(path: Path) -> lockfile.LockFile:
    """Lock the database for this process, and leave it readable by its user only, before SQLite opens it."""
    # Its parents get the usual modes (like mkdir -p); the folder of the database is private.
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # The file SQLite will really open: two names (symlinks) of one database share one lock.
    real = Path(os.path.realpath(path))
    try:
        lock = lockfile.take(Path(f"{real}.lock"), f"database {path}")
    except OSError as error:
        raise StoreUnavailable(
            f"{path}: cannot open the database's lock file: {error.strerror}{_why_not_writable(real)}"
        ) from None
    try:
        _private_files(real)
    except BaseException:
        lock.release()
        raise
    return lock


def _private_files(path: Path) -> None:
    """Create the database 0600 if it is new; tighten any of its files that others may read or write.

    SQLite makes its -wal and -shm files with the database file's mode, so a
    0600 database keeps them 0600 too. A wider mode on an existing file is a
    leftover (of an older sidecar, a copy, a umask): this process owns the
    files, so it narrows them and says so, rather than refusing to start.
    """
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
    except FileExistsError:
        pass
    except OSError as error:
        raise StoreUnavailable(
            f"{path}: cannot create the database: {error.strerror}{_why_not_writable(path)}"
        ) from None
    for suffix in DATABASE_SUFFIXES:
        name = Path(f"{path}{suffix}")
        try:
            # fchmod on what was opened: a symlink planted in place of -wal is never followed to its target.
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        except OSError as error:
            raise DatabaseExposed(f"{name}: cannot check its mode: {error.strerror}") from None
        try:
            st = os.fstat(fd)
            mode = stat.S_IMODE(st.st_mode)
            if not stat.S_ISREG(st.st_mode):
                raise DatabaseExposed(f"{name}: not a regular file")
            if mode & 0o077:
                try:
                    os.fchmod(fd, mode & 0o700)
                except OSError as error:
                    if error.errno == errno.EROFS:
                        continue  # nothing can write it either; SQLite's open says so
                    raise DatabaseExposed(
                        f"{name}: mode {mode:04o} lets other users read its lease_ids, and it cannot be "
                        f"narrowed (owner uid {st.st_uid}): {error.strerror}; chmod 600 it"
                    ) from None
                log.warning("%s: narrowed its mode from %04o to %04o: it holds lease_ids", name, mode, mode & 0o700)
        finally:
            os.close(fd)


def _why_not_writable(path: Path) -> str:
    for target in (path, path.parent):
        if target.exists() and not os.access(target, os.W_OK):
            return f" ({target} is not writable: read-only file system or permissions)"
    return ""


@dataclass(frozen=True, slots=True)
class _Prune:
    """Which events retention lets go: up to a revision, and (by age) before a time."""

    through_revision: int
    before: str | None


def _write_rows(
    connection: sqlite3.Connection,
    guard_rows: list[tuple[str, int, str]],
    run_rows: list[tuple[str, str, int, str]],
    event_rows: list[tuple[int, str, str, str]],
    revision: int,
    prune: _Prune | None,
) -> int | None:
    """One batch as one transaction, on the connection's thread; the oldest event kept, if it pruned."""
    try:
        connection.execute("BEGIN IMMEDIATE")
        connection.executemany(_UPSERT_GUARD, guard_rows)
        connection.executemany(_UPSERT_RUN, run_rows)
        connection.executemany(_INSERT_EVENT, event_rows)
        connection.execute(_SET_REVISION, (str(revision),))
        oldest = _prune_rows(connection, prune, revision) if prune is not None else None
        connection.execute("COMMIT")
        return oldest
    except BaseException:
        if connection.in_transaction:
            try:
                connection.execute("ROLLBACK")
            except sqlite3.Error as error:
                log.error("rollback failed: %s", error)
        raise


def _prune_rows(connection: sqlite3.Connection, prune: _Prune, revision: int) -> int:
    connection.execute("DELETE FROM events WHERE revision <= ?", (prune.through_revision,))
    if prune.before is not None:
        # Keep the newest event so the log never forgets the current revision.
        connection.execute("DELETE FROM events WHERE occurred_at < ? AND revision < ?", (prune.before, revision))
    row = connection.execute("SELECT MIN(revision) FROM events").fetchone()
    return int(row[0]) if row and row[0] is not None else revision + 1
