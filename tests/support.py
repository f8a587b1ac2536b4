"""Helpers the tests share: a real sidecar process, an in-process sidecar, small gRPC shortcuts."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf.duration_pb2 import Duration
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from taskguard import server
from taskguard.clock import Clock, ManualClock
from taskguard_client.v1 import taskguard_pb2 as pb
from taskguard_client.v1 import taskguard_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 20.0


@dataclass
class SidecarProcess:
    """``python -m taskguard serve`` on a unix socket in ``workdir``, with a real SQLite file.

    ``command`` is what runs ``taskguard``: this checkout's by default, or an installed one's script."""

    workdir: Path
    args: tuple[str, ...] = ()
    command: tuple[str, ...] = (sys.executable, "-m", "taskguard")
    cwd: Path = ROOT
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0
    listening_on: str = ""
    health_address: str = ""
    # Where it serves /metrics (``metrics on URL`` in its start line), when started with --metrics-listen.
    metrics_url: str = ""
    log_paths: list[Path] = field(default_factory=list)

    @property
    def socket(self) -> Path:
        return self.workdir / "tg.sock"

    @property
    def db(self) -> Path:
        return self.workdir / "tg.db"

    @property
    def address(self) -> str:
        """Where it said it listens (a --listen among ``args`` may have moved it off the socket)."""
        return self.listening_on or f"unix:{self.socket}"

    def start(self, *extra: str) -> None:
        """Start and return once it printed its address (it prints only when serving)."""
        self.starts += 1
        log_path = self.workdir / f"sidecar-{self.starts}.log"
        self.log_paths.append(log_path)
        command = [
            *self.command,
            "serve",
            "--listen",
            f"unix:{self.socket}",
            "--db",
            str(self.db),
            *self.args,
            *extra,
        ]
        with log_path.open("wb") as log:
            self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, cwd=self.cwd)
        self._wait_for_listening()

    def _wait_for_listening(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        selector = selectors.DefaultSelector()
        selector.register(self.process.stdout, selectors.EVENT_READ)
        try:
            line = b""
            while not line.endswith(b"\n"):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not selector.select(remaining):
                    raise TimeoutError(f"sidecar did not start; log: {self.log()}")
                chunk = os.read(self.process.stdout.fileno(), 4096)
                if not chunk:
                    raise RuntimeError(f"sidecar exited with {self._reap(10)}; log: {self.log()}")
                line += chunk
            assert b"listening on" in line, line
            text = line.decode()
            self.listening_on = text.split("listening on ", 1)[1].split(" ", 1)[0]
            self.health_address = text.split("health only on ", 1)[1].rstrip(")\n") if "health only on" in text else ""
            metrics = text.split("metrics on ", 1)[1] if "metrics on " in text else ""
            self.metrics_url = metrics.split(";", 1)[0].split(")", 1)[0].strip()
        finally:
            selector.close()

    def log(self) -> str:
        return "\n".join(path.read_text(errors="replace") for path in self.log_paths if path.exists())

    def kill(self) -> None:
        """SIGKILL: no flush, no goodbye."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self._reap(10)

    def terminate(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self._reap(30)

    def _reap(self, timeout_s: float) -> int:
        assert self.process is not None
        code = self.process.wait(timeout=timeout_s)
        if self.process.stdout is not None:
            self.process.stdout.close()
        return code

    def restart_after_kill(self) -> None:
        self.kill()
        self.start()

    def close(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.kill()
        self._reap(10)


@contextlib.contextmanager
def sidecars_on_one_store(
    workdir: Path, store_args: tuple[str, ...], hosts: int, *args: str
) -> Iterator[list[SidecarProcess]]:
    """``hosts`` sidecar processes, each in a folder of its own (as if on a host of its own), on one shared
    store; all closed at the end, however far the start got."""
    started: list[SidecarProcess] = []
    try:
        for number in range(hosts):
            folder = workdir / f"host-{chr(ord('a') + number)}"
            folder.mkdir()
            sidecar = SidecarProcess(folder, (*store_args, *args))
            started.append(sidecar)
            sidecar.start()
        yield started
    finally:
        for sidecar in started:
            sidecar.close()


@dataclass
class InProcess:
    """A sidecar on this test's event loop, listening on a real unix socket."""

    sidecar: server.Sidecar
    clock: Clock
    channel: aio.Channel
    stub: pb_grpc.TaskGuardStub

    @property
    def address(self) -> str:
        return self.sidecar.address

    @property
    def stale_after_s(self) -> float:
        return self.sidecar.settings.stale_after_s

    @property
    def manual_clock(self) -> ManualClock:
        assert isinstance(self.clock, ManualClock)
        return self.clock

    async def advance(self, seconds: float) -> None:
        """Move the manual clock and expire what that made due."""
        self.manual_clock.advance(seconds)
        await self.sidecar.keeper.expire_due()

    async def close(self) -> None:
        await self.channel.close()
        stopping = asyncio.ensure_future(self.sidecar.stop(0))
        done, _ = await asyncio.wait({stopping}, timeout=STOP_WITHIN_S)
        if not done:
            # A stop that hangs is a bug of its own: fail here, saying what is still waiting, not at the timeout.
            raise AssertionError(f"the sidecar did not stop within {STOP_WITHIN_S} s; tasks:\n{describe_tasks()}")
        stopping.result()


STOP_WITHIN_S = 30.0


def describe_tasks() -> str:
    """Every task of the running loop and where it waits."""
    out = io.StringIO()
    for task in asyncio.all_tasks():
        task.print_stack(file=out)
    return out.getvalue()


async def wait_serving(address: str, timeout_s: float = 10.0) -> None:
    async with aio.insecure_channel(address) as channel:
        response = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="taskguard.v1.TaskGuard"), timeout=timeout_s, wait_for_ready=True
        )
        assert response.status == health_pb2.HealthCheckResponse.SERVING


def seconds(value: float) -> Any:
    duration = Duration()
    duration.FromNanoseconds(round(value * 1e9))
    return duration


async def acquire(
    stub: pb_grpc.TaskGuardStub, task_key: str, ttl_s: float | None = None, **fields: Any
) -> pb.AcquireResponse:
    request = pb.AcquireRequest(task_key=task_key, **fields)
    if ttl_s is not None:
        request.ttl.CopyFrom(seconds(ttl_s))
    response: pb.AcquireResponse = await stub.Acquire(request, timeout=10)
    return response


async def open_watch(stub: pb_grpc.TaskGuardStub, **request: Any) -> Any:
    """A WatchGuards call the sidecar has registered: it sends headers only once the watcher is in place,
    so a change made after this returns is one the call will see."""
    call = stub.WatchGuards(pb.WatchGuardsRequest(**request))
    await asyncio.wait_for(call.initial_metadata(), 10)
    return call


async def watch_until(
    stub: pb_grpc.TaskGuardStub,
    done: Callable[[list[pb.GuardEvent]], bool],
    timeout_s: float = 10.0,
    **request: Any,
) -> list[pb.GuardEvent]:
    """Collect WatchGuards events until ``done(events)`` holds; fail after ``timeout_s``."""
    events: list[pb.GuardEvent] = []
    call = stub.WatchGuards(pb.WatchGuardsRequest(**request))

    async def collect() -> None:
        async for event in call:
            events.append(event)
            if done(events):
                return

    try:
        await asyncio.wait_for(collect(), timeout_s)
    finally:
        call.cancel()
    return events
