"""Acting as another local user: the tests run as root, and an attacker is ``nobody`` (or a uid of their own)."""

from __future__ import annotations

import os
import pwd
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support import ROOT, START_TIMEOUT_S

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another uid")

NOBODY = pwd.getpwnam("nobody")


def run_as(
    uid: int, gid: int, argv: list[str], env: dict[str, str] | None = None, timeout_s: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` as ``uid:gid`` with no supplementary groups (root's would leak through otherwise)."""
    return subprocess.run(
        argv,
        user=uid,
        group=gid,
        extra_groups=[],
        cwd="/",
        env={"PYTHONPATH": f"{ROOT / 'clients' / 'python'}:{ROOT / 'sidecar'}", "PATH": "/usr/bin:/bin", **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def python_as_nobody(code: str, *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return run_as(NOBODY.pw_uid, NOBODY.pw_gid, [sys.executable, "-c", code, *args], timeout_s=timeout_s)


def open_to_others(path: Path) -> None:
    """Let other users reach into ``path`` (a test's workdir is 0700), so only what is inside protects itself."""
    path.chmod(0o755)


def assert_nobody_cannot_read(path: Path) -> None:
    result = python_as_nobody("import sys; open(sys.argv[1], 'rb').read(1)", str(path))
    assert result.returncode != 0 and "PermissionError" in result.stderr, (path, result.stdout, result.stderr)


def serve_or_exit(
    args: list[str], env: dict[str, str], user: tuple[int, int] | None = None, timeout_s: float = START_TIMEOUT_S
) -> tuple[int, str]:
    """Start ``taskguard serve`` and expect it to refuse: its exit status and stderr.

    One that starts serving instead fails the test (after a SIGTERM, as an
    operator would stop it), so the test ends with the defect named, not a timeout.
    """
    command = [sys.executable, "-m", "taskguard", "serve", *args]
    identity: dict[str, Any] = {} if user is None else {"user": user[0], "group": user[1], "extra_groups": []}
    with (
        subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=env, **identity
        ) as process,
        selectors.DefaultSelector() as selector,
    ):
        assert process.stdout is not None and process.stderr is not None
        deadline = time.monotonic() + timeout_s
        output = b""
        selector.register(process.stdout, selectors.EVENT_READ)
        while b"listening on" not in output:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not selector.select(remaining):
                process.kill()
                process.wait(10)
                raise AssertionError("taskguard serve neither exited nor served")
            chunk = os.read(process.stdout.fileno(), 4096)
            if not chunk:
                return process.wait(10), process.stderr.read().decode()
            output += chunk
        process.send_signal(signal.SIGTERM)
        process.wait(30)
        raise AssertionError(f"taskguard serve started: {output.decode().strip()}; {process.stderr.read().decode()}")


def sidecar_env(**extra: str) -> dict[str, str]:
    """An environment for a sidecar process: this one's, without the XDG folders unless given."""
    env = {name: value for name, value in os.environ.items() if not name.startswith(("XDG_", "TASKGUARD_"))}
    return {**env, **extra}
