"""deploy/container/Containerfile, built with Debian's buildah and started with Debian's podman, served from.

No registry of images is reachable here, so the image the Containerfile names as its base
(``docker.io/library/python:3.11-slim``) is stood in for, in a storage of this module's own, by an image made
with mmdebstrap from Debian's packages (through the host's own apt sources): python3, its venv, useradd and
libstdc++ (what the official image has and the build uses), trusting the CAs the host trusts (this machine's
TLS goes through a proxy of its own; pip in the build reaches PyPI through it). The Containerfile itself is
built as it is. Then the image runs as the Kubernetes manifest and the unit would run it: its own ENTRYPOINT
and CMD, the socket and the database on volumes; the test acquires through the socket from the host, asks
the health port from inside the container, and stops it (graceful: exit 0).

Rootful, vfs storage, chroot isolation for the build and runc for the run (crun refuses this machine's
hybrid cgroup hierarchy), so nothing but the packages .ci/dev.py installs is needed.
"""

from __future__ import annotations

import os
import selectors
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from taskguard_client import Client, GuardState, RunStatus
from tests.support import ROOT

BASE_IMAGE = "docker.io/library/python:3.11-slim"
IMAGE = "localhost/taskguard:test"
# The image's user (Containerfile: USER 10001:10001); the volumes must be its to write.
IMAGE_UID = 10001
TOOLS = ("buildah", "podman", "runc", "mmdebstrap")
BUILD_TIMEOUT_S = 600.0
TIMEOUT_S = 60.0
# What the stand-in base must have for the Containerfile's RUN lines (see the module's docstring).
BASE_PACKAGES = ("passwd", "ca-certificates", "libstdc++6", "python3", "python3-venv", "python-is-python3")

# The module fixture (about 30 s of mmdebstrap, 45 s of build here; more with a cold mirror) counts
# against the test's timeout, far above the suite's default.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2 * BUILD_TIMEOUT_S + 120)]


def _missing() -> str | None:
    if sys.platform != "linux" or os.geteuid() != 0:
        return "needs root on Linux (rootful buildah and podman on vfs storage)"
    absent = [tool for tool in TOOLS if shutil.which(tool) is None]
    if absent:
        return f"{', '.join(absent)} not installed (.ci/dev.py installs Debian's)"
    return None


def _run(*command: str | Path, timeout: float = TIMEOUT_S) -> str:
    done = subprocess.run([str(part) for part in command], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(map(str, command))}: exit {done.returncode}\n{done.stderr[-4000:]}"
    return done.stdout


def _apt_sources() -> tuple[str, Path]:
    """The host's Debian release and its apt sources (mmdebstrap pastes a sources file into the new root)."""
    release = dict(line.split("=", 1) for line in Path("/etc/os-release").read_text().splitlines() if "=" in line)
    codename = release["VERSION_CODENAME"].strip('"')
    for candidate in (Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list")):
        if candidate.exists():
            return codename, candidate
    raise AssertionError("no apt sources on this machine")


class Containers:
    """buildah and podman on a storage of their own under ``folder``: nothing of the machine's is touched."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        storage = ["--root", str(folder / "storage"), "--runroot", str(folder / "run"), "--storage-driver", "vfs"]
        self.buildah = ["buildah", *storage]
        self.podman = [
            "podman",
            *storage,
            "--tmpdir",
            str(folder / "tmp"),
            "--runtime",
            "runc",
            "--cgroup-manager",
            "cgroupfs",
            "--events-backend",
            "file",
        ]

    def make_base(self) -> None:
        codename, sources = _apt_sources()
        rootfs = self.folder / "base.tar"
        excluded = [f"--dpkgopt=path-exclude=/usr/share/{part}/*" for part in ("doc", "man", "locale")]
        _run(
            "mmdebstrap",
            "--quiet",
            "--variant=essential",
            f"--include={','.join(BASE_PACKAGES)}",
            *excluded,
            "--customize-hook=copy-in /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs",
            # pip uses its own CA list unless told: the system's (now the host's) is the one that reaches PyPI.
            '--customize-hook=printf "[global]\\ncert = /etc/ssl/certs/ca-certificates.crt\\n" > "$1/etc/pip.conf"',
            codename,
            rootfs,
            sources,
            timeout=BUILD_TIMEOUT_S,
        )
        container = _run(*self.buildah, "from", "scratch").strip()
        _run(*self.buildah, "add", container, rootfs, "/", timeout=BUILD_TIMEOUT_S)
        _run(*self.buildah, "commit", "--quiet", container, BASE_IMAGE, timeout=BUILD_TIMEOUT_S)
        _run(*self.buildah, "rm", container)
        rootfs.unlink()

    def build(self) -> None:
        _run(
            *self.buildah,
            "build",
            "--isolation",
            "chroot",
            "--pull=never",
            "--file",
            ROOT / "deploy" / "container" / "Containerfile",
            "--tag",
            IMAGE,
            ROOT,
            timeout=BUILD_TIMEOUT_S,
        )

    def close(self) -> None:
        subprocess.run([*self.podman, "rm", "--all", "--force"], capture_output=True, timeout=TIMEOUT_S)
        subprocess.run([*self.buildah, "rm", "--all"], capture_output=True, timeout=TIMEOUT_S)
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture(scope="module")
def containers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containers]:
    reason = _missing()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"the container test cannot run on CI: {reason}")
        pytest.skip(reason)
    tools = Containers(tmp_path_factory.mktemp("containers"))
    try:
        tools.make_base()
        tools.build()
        yield tools
    finally:
        tools.close()


def _first_line(process: subprocess.Popen[bytes], log: Path) -> str:
    """The sidecar's first stdout line (it prints where it listens once it serves)."""
    assert process.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + TIMEOUT_S
    line = b""
    try:
        while not line.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            assert remaining > 0 and selector.select(remaining), f"no line from the container; {log.read_text()}"
            chunk = os.read(process.stdout.fileno(), 4096)
            assert chunk, f"the container exited with {process.wait(TIMEOUT_S)}: {log.read_text()}"
            line += chunk
    finally:
        selector.close()
    return line.decode()


def test_the_image_builds_runs_as_its_user_and_serves_on_its_socket_and_health_port(
    containers: Containers, tmp_path: Path
) -> None:
    sockets, state = tmp_path / "run", tmp_path / "state"
    for volume in (sockets, state):
        volume.mkdir()
        os.chown(volume, IMAGE_UID, IMAGE_UID)
    name = f"taskguard-test-{uuid.uuid4().hex[:8]}"
    log = tmp_path / "podman.log"
    with log.open("wb") as stderr:
        process = subprocess.Popen(
            [
                *containers.podman,
                "run",
                "--rm",
                "--name",
                name,
                # No network of its own beyond loopback: the API is the socket, the health port stays inside.
                "--network",
                "none",
                # Podman's defaults raise these above what this machine lets a process have.
                "--ulimit",
                "nofile=4096:4096",
                "--ulimit",
                "nproc=1024:1024",
                "--volume",
                f"{sockets}:/run/taskguard",
                "--volume",
                f"{state}:/var/lib/taskguard",
                IMAGE,
            ],
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
    try:
        line = _first_line(process, log)
        assert "listening on unix:/run/taskguard/taskguard.sock" in line, line
        assert "health only on 0.0.0.0:8081" in line, line

        socket = sockets / "taskguard.sock"
        assert socket.stat().st_uid == IMAGE_UID and (state / "taskguard.db").stat().st_uid == IMAGE_UID
        key = f"container-{uuid.uuid4().hex}::job"
        with Client(f"unix:{socket}") as client:
            lease = client.acquire(key, ttl=60, holder="tests")
            assert client.get(key).state is GuardState.RUNNING
            assert client.release(lease.lease_id, RunStatus.SUCCEEDED).state is GuardState.SUCCEEDED

        probe = (
            "from grpc import insecure_channel\n"
            "from grpc_health.v1 import health_pb2, health_pb2_grpc\n"
            "stub = health_pb2_grpc.HealthStub(insecure_channel('127.0.0.1:8081'))\n"
            "print(health_pb2.HealthCheckResponse.ServingStatus.Name(\n"
            "    stub.Check(health_pb2.HealthCheckRequest(), timeout=10, wait_for_ready=True).status))\n"
        )
        assert _run(*containers.podman, "exec", name, "/opt/taskguard/bin/python", "-c", probe).strip() == "SERVING"
        assert _run(*containers.podman, "exec", name, "id", "-u").strip() == str(IMAGE_UID)

        _run(*containers.podman, "stop", "--time", "30", name)
        assert process.wait(TIMEOUT_S) == 0, log.read_text()
        assert "shutting down" in log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(TIMEOUT_S)
        assert process.stdout is not None
        process.stdout.close()
