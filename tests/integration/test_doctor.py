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
    # The rules come next (issue 16), then the database and the listener.
    (database,) = [line for line in lines if line.startswith("ok   database")]
    assert "integrity ok, schema version" in database and "1 guards (1 running)" in database
    (listener,) = [line for line in lines if line.startswith("ok   listener")]
    assert "a sidecar is serving there (SERVING)" in listener
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


def test_doctor_checks_the_metrics_token_file_by_the_sidecars_rules(
    sidecar_factory: Callable[..., SidecarProcess],
) -> None:
    sidecar = sidecar_factory(start=False)
    token = sidecar.workdir / "metrics.token"
    args = ("--listen", sidecar.address, "--db", str(sidecar.db), "--metrics-listen", "127.0.0.1:9464")

    missing = _doctor(*args)
    assert f"ok   metrics: /metrics on 127.0.0.1:9464; the sidecar creates its token file {token}" in missing.stdout
    assert not token.exists()  # the doctor changes nothing

    token.write_text("m" * 32 + "\n")
    token.chmod(0o644)
    unsafe = _doctor(*args)
    assert unsafe.returncode == 1
    assert f"FAIL metrics: metrics token file {token}: group or others may open it (mode 0644)" in unsafe.stdout

    token.chmod(0o600)
    assert f"ok   metrics: /metrics on 127.0.0.1:9464; scrapes present the token in {token}" in _doctor(*args).stdout
