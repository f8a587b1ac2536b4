"""Fixtures: real sidecar processes, in-process servers on real sockets, fresh keys."""

from __future__ import annotations

import os

# Before grpc loads: its fork support installs pthread_atfork handlers that wait for grpc's own threads to
# stop, and a fork while an asyncio server or channel is busy waited there forever (a test that runs a
# command as another user forks: setuid rules out vfork, which would skip the handlers). The tests fork only
# to exec, which needs none of it.
os.environ["GRPC_ENABLE_FORK_SUPPORT"] = "false"

import faulthandler
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator
from pathlib import Path
from typing import IO, Any

import pytest
from grpc import aio

from taskguard import config, server
from taskguard.clock import Clock, ManualClock
from taskguard_client.v1 import taskguard_pb2_grpc as pb_grpc
from tests.etcd_cluster import EtcdCluster
from tests.pki import make_pki
from tests.support import InProcess, SidecarProcess

# pytest-timeout's signal fails a test that overruns, but cannot reach a main thread stuck inside C code
# (a grpc core call that never returns). Past this much more, faulthandler's own thread writes every
# thread's stack to the hang report and ends the run, so a hang costs minutes and says where it was,
# instead of the whole CI budget. `.ci/dev.py test` prints the report.
HARD_LIMIT_MARGIN_S = 180.0
_hang_report: IO[str] | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _hang_report
    path = os.environ.get("TASKGUARD_HANG_REPORT")
    if path:
        _hang_report = open(path, "w")


def pytest_unconfigure(config: pytest.Config) -> None:
    if _hang_report is not None:
        _hang_report.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, object, object]:
    if _hang_report is None:
        return (yield)
    marker = item.get_closest_marker("timeout")
    soft_limit = float(marker.args[0]) if marker and marker.args else float(item.config.getini("timeout") or 120)
    hard_limit = soft_limit + HARD_LIMIT_MARGIN_S
    # The header stays only while the test runs: a report left non-empty names the test the run died in.
    _hang_report.write(f"{item.nodeid} was still running after {hard_limit:.0f} s (or the run died in it):\n")
    _hang_report.flush()
    faulthandler.dump_traceback_later(hard_limit, exit=True, file=_hang_report)
    try:
        return (yield)
    finally:
        faulthandler.cancel_dump_traceback_later()
        _hang_report.seek(0)
        _hang_report.truncate()


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A short temporary folder: unix socket paths must fit in 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="tg-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def key() -> str:
    return f"t-{uuid.uuid4().hex}::job"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Modules marked ``backends("sqlite", "etcd")`` run every test once per store."""
    marker = metafunc.definition.get_closest_marker("backends")
    if marker is not None and "store_backend" in metafunc.fixturenames:
        metafunc.parametrize("store_backend", marker.args, indirect=True)


@pytest.fixture
def store_backend(request: pytest.FixtureRequest) -> str:
    """The store real sidecars of this test use: sqlite unless the module runs under ``backends(...)``."""
    return str(getattr(request, "param", "sqlite"))


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """One etcd member for the whole session; each test gets a key prefix of its own."""
    cluster = EtcdCluster(tmp_path_factory.mktemp("etcd"))
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture
def store_args(store_backend: str, request: pytest.FixtureRequest) -> tuple[str, ...]:
    """``serve`` flags that put this test's guards in its backend (a fresh etcd prefix each test)."""
    if store_backend != "etcd":
        return ()
    cluster: EtcdCluster = request.getfixturevalue("etcd_server")
    # A short sidecar lease: the tests that kill sidecars wait it out.
    return (
        "--store",
        cluster.url,
        "--etcd-prefix",
        f"/t-{uuid.uuid4().hex}/",
        "--etcd-lease-ttl",
        "2s",
        "--etcd-timeout",
        "1s",
    )


@pytest.fixture
def sidecar_factory(workdir: Path, store_args: tuple[str, ...]) -> Iterator[Callable[..., SidecarProcess]]:
    started: list[SidecarProcess] = []

    def make(*args: str, start: bool = True) -> SidecarProcess:
        sidecar = SidecarProcess(workdir, (*store_args, *args))
        started.append(sidecar)
        if start:
            sidecar.start()
        return sidecar

    yield make
    for sidecar in started:
        sidecar.close()


@pytest.fixture
def pki(workdir: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate (CN worker-7), as PEM files."""
    return make_pki(workdir)


@pytest.fixture(scope="module")
def module_sidecar() -> Iterator[SidecarProcess]:
    """One sidecar process shared by a module's tests (each uses keys of its own)."""
    workdir = Path(tempfile.mkdtemp(prefix="tg-", dir="/tmp"))
    sidecar = SidecarProcess(workdir)
    sidecar.start()
    yield sidecar
    sidecar.close()
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def sidecar(sidecar_factory: Callable[..., SidecarProcess]) -> SidecarProcess:
    return sidecar_factory()


@pytest.fixture
async def stub(sidecar: SidecarProcess) -> AsyncIterator[pb_grpc.TaskGuardStub]:
    async with aio.insecure_channel(sidecar.address) as channel:
        yield pb_grpc.TaskGuardStub(channel)


@pytest.fixture
def settings_for(workdir: Path, store_args: tuple[str, ...]) -> Callable[..., config.Settings]:
    store: dict[str, Any] = {}
    if store_args:
        flags = dict(zip(store_args[::2], store_args[1::2], strict=True))
        store = {
            "store": flags["--store"],
            "etcd_prefix": flags["--etcd-prefix"],
            "etcd_lease_ttl_s": 2.0,
            "etcd_timeout_s": 1.0,
        }

    def make(**overrides: Any) -> config.Settings:
        values: dict[str, Any] = {"listen": f"unix:{workdir / 'in.sock'}", "db": workdir / "in.db", **store}
        values.update(overrides)
        return config.default_settings(**values)

    return make


InProcessFactory = Callable[..., Awaitable[InProcess]]


@pytest.fixture
async def in_process_factory(settings_for: Callable[..., config.Settings]) -> AsyncIterator[InProcessFactory]:
    running: list[InProcess] = []

    async def make(clock: Clock | None = None, **overrides: Any) -> InProcess:
        sidecar = await server.start(settings_for(**overrides), clock)
        channel = aio.insecure_channel(sidecar.address)
        harness = InProcess(sidecar, sidecar.clock, channel, pb_grpc.TaskGuardStub(channel))
        running.append(harness)
        return harness

    yield make
    for harness in running:
        await harness.close()


@pytest.fixture
async def in_process(in_process_factory: InProcessFactory) -> InProcess:
    return await in_process_factory()


@pytest.fixture
async def manual(in_process_factory: InProcessFactory) -> InProcess:
    """An in-process sidecar whose clock moves only when the test says so."""
    return await in_process_factory(ManualClock())
