"""The SQLite file records its schema version; newer sidecars migrate older files in place."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from taskguard.clock import ManualClock, instant
from taskguard.guard.core import decide
from taskguard.guard.model import Acquire
from taskguard.guard.model import Policy as CorePolicy
from taskguard.store import codec
from taskguard.store.sqlite import MIGRATIONS, SCHEMA_VERSION, DatabaseCorrupt, SqliteStore


def _version_one_file(path: Path, clock: ManualClock) -> str:
    """A database exactly as schema version 1 left it, with one guard in it."""
    record = decide(None, Acquire("s::old", "run-1", "h", 60.0, "lease-1", False), instant(clock), CorePolicy()).record
    assert record is not None
    doc = codec.dumps(codec.record_to_doc(record))
    with sqlite3.connect(path) as db:
        db.executescript(MIGRATIONS[0])
        db.execute("INSERT INTO guards (task_key, revision, doc) VALUES (?, ?, ?)", ("s::old", 1, doc))
        db.execute(
            "INSERT INTO runs (lease_id, task_key, fencing_token, doc) VALUES (?, ?, ?, ?)",
            ("lease-1", "s::old", 1, doc),
        )
        db.execute("INSERT INTO meta (name, value) VALUES ('revision', '1')")
        db.execute("PRAGMA user_version=1")
    db.close()
    return record.run_id


async def test_an_older_file_is_migrated_in_place_and_keeps_its_guards(tmp_path: Path) -> None:
    assert SCHEMA_VERSION >= 2
    path = tmp_path / "old.db"
    clock = ManualClock()
    run_id = _version_one_file(path, clock)
    store = SqliteStore(path, clock)
    await store.open()
    try:
        guard = await store.get("s::old")
        assert guard is not None and guard.run_id == run_id
        assert store.revision == 1
    finally:
        await store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        indexes = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    db.close()
    assert "events_by_time" in indexes


async def test_a_sqlite_file_of_another_program_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY)")
    db.close()
    before = path.read_bytes()
    with pytest.raises(DatabaseCorrupt, match="not Task Guard's"):
        await SqliteStore(path, ManualClock()).open()
    assert path.read_bytes() == before


async def test_a_damaged_page_fails_the_integrity_check_at_open(tmp_path: Path) -> None:
    path = tmp_path / "damaged.db"
    store = SqliteStore(path, ManualClock())
    await store.open()
    await store.close()
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA journal_mode=DELETE")
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        (root,) = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'runs_by_key'").fetchone()
    db.close()
    data = bytearray(path.read_bytes())
    offset = (root - 1) * page_size
    data[offset : offset + 8] = b"\xff" * 8  # an index page whose header is garbage
    path.write_bytes(bytes(data))
    with pytest.raises(DatabaseCorrupt, match=r"integrity check failed|malformed"):
        await SqliteStore(path, ManualClock()).open()
