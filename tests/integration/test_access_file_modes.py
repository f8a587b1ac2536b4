"""The database holds lease_ids, which are capabilities: only the sidecar's user may read it."""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from grpc import aio

from taskguard_client.v1 import taskguard_pb2_grpc as pb_grpc
from tests.other_user import assert_nobody_cannot_read, needs_root, open_to_others
from tests.support import ROOT, SidecarProcess, acquire

pytestmark = needs_root


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    """The umask a sidecar started meanwhile inherits (022: what most shells and services have)."""
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def _doctor(sidecar: SidecarProcess, db: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "taskguard", "doctor", "--listen", sidecar.address, "--db", str(db)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


async def test_a_new_database_its_wal_and_shm_are_readable_by_their_owner_only(
    sidecar_factory: Callable[..., SidecarProcess], workdir: Path, key: str
) -> None:
    open_to_others(workdir)
    db = workdir / "data" / "tg.db"
    with _umask(0o022):
        sidecar = sidecar_factory("--db", str(db))
    async with aio.insecure_channel(sidecar.address) as channel:
        await acquire(pb_grpc.TaskGuardStub(channel), key)
    assert _mode(db.parent) == 0o700
    for path in (db, Path(f"{db}-wal"), Path(f"{db}-shm"), Path(f"{db}.lock")):
        assert _mode(path) == 0o600, path
    # Even with the folder opened up, another user cannot read the files.
    db.parent.chmod(0o755)
    for path in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
        assert_nobody_cannot_read(path)


async def test_wider_modes_left_on_the_files_are_narrowed_at_start_and_doctor_flags_them(
    sidecar_factory: Callable[..., SidecarProcess], workdir: Path, key: str
) -> None:
    sidecar = sidecar_factory()
    async with aio.insecure_channel(sidecar.address) as channel:
        await acquire(pb_grpc.TaskGuardStub(channel), key)
    sidecar.kill()  # leaves the -wal and -shm behind
    files = [sidecar.db, Path(f"{sidecar.db}-wal"), Path(f"{sidecar.db}-shm")]
    for path in files:
        path.chmod(0o644)
    flagged = _doctor(sidecar, sidecar.db)
    assert flagged.returncode == 1
    assert f"FAIL file modes: {sidecar.db} is mode 0644" in flagged.stdout, flagged.stdout
    sidecar.start()
    for path in files:
        assert _mode(path) == 0o600, path
    assert f"{sidecar.db}: narrowed its mode from 0644 to 0600" in sidecar.log()
    healthy = _doctor(sidecar, sidecar.db)
    assert healthy.returncode == 0, healthy.stdout
    assert "ok   file modes:" in healthy.stdout


def test_doctor_flags_a_database_folder_others_may_write(
    sidecar_factory: Callable[..., SidecarProcess], workdir: Path
) -> None:
    sidecar = sidecar_factory()
    assert sidecar.terminate() == 0
    workdir.chmod(0o777)
    result = _doctor(sidecar, sidecar.db)
    assert result.returncode == 1
    assert f"its folder {workdir} is mode 0777 (others may replace files)" in result.stdout, result.stdout


@pytest.mark.parametrize("planted", ["-wal", "-shm"])
def test_a_symlink_planted_beside_the_database_is_refused_and_never_followed(
    sidecar_factory: Callable[..., SidecarProcess], workdir: Path, planted: str
) -> None:
    sidecar = sidecar_factory()
    assert sidecar.terminate() == 0
    target = workdir / "precious"
    target.write_text("not the sidecar's\n")
    target.chmod(0o644)
    Path(f"{sidecar.db}{planted}").symlink_to(target)
    with pytest.raises(RuntimeError, match="sidecar exited with 1"):
        sidecar.start()
    assert f"{sidecar.db}{planted}: cannot check its mode" in sidecar.log()
    assert "Traceback" not in sidecar.log()
    assert target.read_text() == "not the sidecar's\n" and _mode(target) == 0o644
