"""Fixtures: real sidecar processes, in-process servers on real sockets, fresh keys."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from grpc import aio

from taskguard import config, server
from taskguard.clock import Clock, ManualClock
from taskguard_client.v1 import taskguard_pb2_grpc as pb_grpc
from tests.support import InProcess, SidecarProcess


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A short temporary folder: unix socket paths must fit in 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="tg-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def key() -> str:
    return f"t-{uuid.uuid4().hex}::job"


@pytest.fixture
def sidecar_factory(workdir: Path) -> Iterator[Callable[..., SidecarProcess]]:
    started: list[SidecarProcess] = []

    def make(*args: str, start: bool = True) -> SidecarProcess:
        sidecar = SidecarProcess(workdir, tuple(args))
        started.append(sidecar)
        if start:
            sidecar.start()
        return sidecar

    yield make
    for sidecar in started:
        sidecar.close()


@pytest.fixture
def sidecar(sidecar_factory: Callable[..., SidecarProcess]) -> SidecarProcess:
    return sidecar_factory()


@pytest.fixture
async def stub(sidecar: SidecarProcess) -> AsyncIterator[pb_grpc.TaskGuardStub]:
    async with aio.insecure_channel(sidecar.address) as channel:
        yield pb_grpc.TaskGuardStub(channel)


@pytest.fixture
def settings_for(workdir: Path) -> Callable[..., config.Settings]:
    def make(**overrides: Any) -> config.Settings:
        values: dict[str, Any] = {"listen": f"unix:{workdir / 'in.sock'}", "db": workdir / "in.db"}
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
        harness = InProcess(sidecar, sidecar.engine.clock, channel, pb_grpc.TaskGuardStub(channel))
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
