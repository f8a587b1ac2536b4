"""taskguard doctor: checks configuration, database and listener, and changes nothing."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from collections.abc import Callable

from grpc import aio

from taskguard_client.v1 import taskguard_pb2_grpc as pb_grpc
from tests.support import ROOT, SidecarProcess, acquire


def _doctor(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "taskguard", "doctor", *args], capture_output=True, text=True, timeout=60, cwd=ROOT
    )


async def test_doctor_reports_a_healthy_sidecar_and_its_database(sidecar: SidecarProcess, key: str) -> None:
    async with aio.insecure_channel(sidecar.address) as channel:
        await acquire(pb_grpc.TaskGuardStub(channel), key)
    before = sidecar.db.read_bytes()
    result = _doctor("--listen", sidecar.address, "--db", str(sidecar.db))
    assert result.returncode == 0, result.stdout
    lines = result.stdout.splitlines()
    assert lines[0].startswith("ok   config: valid; listen " + sidecar.address)
    assert lines[1].startswith("ok   rule default: '*': on conflict reject")
    assert "integrity ok, schema version" in lines[2] and "1 guards (1 running)" in lines[2]
    assert "a sidecar is serving there (SERVING)" in lines[3]
    assert sidecar.db.read_bytes() == before


def test_doctor_fails_on_a_bad_setting_a_damaged_database_and_a_newer_schema(
    sidecar_factory: Callable[..., SidecarProcess],
) -> None:
    sidecar = sidecar_factory(start=False)
    bad = _doctor("--listen", sidecar.address, "--max-watchers", "zero")
    assert bad.returncode == 1 and bad.stdout.startswith("FAIL config: max_watchers")

    sidecar.db.write_bytes(b"not a database at all" * 100)
    damaged = _doctor("--listen", sidecar.address, "--db", str(sidecar.db))
    assert damaged.returncode == 1
    assert "FAIL database" in damaged.stdout

    sidecar.db.unlink()
    with sqlite3.connect(sidecar.db) as db:
        db.execute("PRAGMA user_version=999")
    db.close()
    newer = _doctor("--listen", sidecar.address, "--db", str(sidecar.db))
    assert newer.returncode == 1
    assert "schema version 999 is newer than this sidecar's" in newer.stdout
    assert "socket" in newer.stdout and "is free" in newer.stdout
