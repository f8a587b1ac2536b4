"""Fixtures for the OpenClaw tests: a real sidecar, the scripted model, the gates downstream work waits at, gateways.

One sidecar, one model and one gateway with the plugin serve the whole module
(starting a gateway takes 10-30 s on a busy 2-core machine); every test uses
task names and sessions of its own. The gateway without the plugin is started
only for the scenario.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from taskguard_client import Client, EventType, GuardEvent
from tests.openclaw.fake_model import FakeModel
from tests.openclaw.gateway import Gateway, ensure_openclaw
from tests.support import SidecarProcess

DOWNSTREAM = Path(__file__).with_name("downstream.py")


class GateServer:
    """The unix socket every downstream run reports to and waits at, until the test opens its task's gate.

    A run says ``start TASK``, then ``conflict`` (its lock was taken; it exits 75)
    or ``wait``; once released it says ``end CODE``. Counts per task can be waited for.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._changed = threading.Condition()
        self._waiting: dict[str, list[socket.socket]] = {}
        self._open: set[str] = set()
        self.started: dict[str, int] = {}
        self.finished: dict[str, int] = {}
        self._server = socket.socket(socket.AF_UNIX)
        self._server.bind(str(path))
        self._server.listen(128)
        threading.Thread(target=self._accept, name="gates", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(connection,), name="gate", daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        task = ""
        with connection, connection.makefile("rb") as lines:
            for raw in lines:
                word, _, rest = raw.decode().strip().partition(" ")
                with self._changed:
                    if word == "start":
                        task = rest
                        self.started[task] = self.started.get(task, 0) + 1
                    elif word == "wait":
                        if task in self._open:
                            connection.sendall(b"x")
                        else:
                            self._waiting.setdefault(task, []).append(connection)
                    elif word in ("conflict", "end"):
                        self.finished[task] = self.finished.get(task, 0) + 1
                    self._changed.notify_all()
        with self._changed:  # the run is gone (killed with its gateway): nothing to release any more
            waiting = self._waiting.get(task, [])
            if connection in waiting:
                waiting.remove(connection)
                self._changed.notify_all()

    def _wait(self, condition: Callable[[], bool], what: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while not condition():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{what} within {timeout_s} s; started {self.started}, finished {self.finished}")
                self._changed.wait(left)

    def waiting(self, task: str) -> int:
        with self._changed:
            return len(self._waiting.get(task, []))

    def wait_waiting(self, task: str, count: int = 1, timeout_s: float = 60.0) -> None:
        """Until ``count`` runs of ``task`` are at the gate (running, past their lock)."""
        self._wait(
            lambda: len(self._waiting.get(task, [])) >= count, f"{count} run(s) of {task} at the gate", timeout_s
        )

    def wait_settled(self, started: int, timeout_s: float = 60.0) -> None:
        """Until ``started`` runs have started and each has finished or is waiting at its gate."""

        def settled() -> bool:
            waiting = sum(len(connections) for connections in self._waiting.values())
            total = sum(self.started.values())
            return total >= started and total == sum(self.finished.values()) + waiting

        self._wait(settled, f"{started} downstream runs started and settled", timeout_s)

    def wait_finished(self, task: str, count: int, timeout_s: float = 60.0) -> None:
        self._wait(lambda: self.finished.get(task, 0) >= count, f"{count} run(s) of {task} finished", timeout_s)

    def release(self, task: str, keep_open: bool = True) -> None:
        """Let every waiting run of ``task`` finish (and, with ``keep_open``, later ones pass at once)."""
        with self._changed:
            if keep_open:
                self._open.add(task)
            for connection in self._waiting.pop(task, []):
                connection.sendall(b"x")

    def release_all(self) -> None:
        with self._changed:
            for task in list(self._waiting):
                self.release(task)

    def close(self) -> None:
        self._server.close()
        self.release_all()


@dataclass
class Work:
    """The downstream script's command lines and what it recorded."""

    folder: Path
    gates: GateServer

    @property
    def log(self) -> Path:
        return self.folder / "downstream.jsonl"

    def command(self, task: str, exit_code_file: Path | None = None) -> str:
        locks = self.folder / "locks"
        locks.mkdir(exist_ok=True)
        extra = f" --exit-code-file {exit_code_file}" if exit_code_file else ""
        return f"{sys.executable} {DOWNSTREAM} {task} --log {self.log} --locks {locks} --gate {self.gates.path}{extra}"

    def records(self, task: str | None = None, event: str | None = None) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        rows = [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]
        return [r for r in rows if (task is None or r["task"] == task) and (event is None or r["event"] == event)]

    def launches(self, task: str) -> int:
        return len(self.records(task, "launch"))


@dataclass
class GuardEvents:
    """Every committed guard event, from a WatchGuards stream read on a thread, for tests to wait on."""

    client: Client
    events: list[tuple[float, GuardEvent]] = field(default_factory=list)
    _changed: threading.Condition = field(default_factory=threading.Condition)
    _stopped: bool = False

    def start(self) -> GuardEvents:
        threading.Thread(target=self._follow, name="guard-events", daemon=True).start()
        return self

    def _follow(self) -> None:
        last = 0
        while not self._stopped:
            try:
                # From the revision after the last one seen: a sidecar restart (one test stops it) loses nothing.
                with self.client.watch(start_revision=last + 1 if last else 0) as watch:
                    for event in watch:
                        last = max(last, event.revision)
                        with self._changed:
                            self.events.append((time.monotonic(), event))
                            self._changed.notify_all()
                        if self._stopped:
                            return
            except Exception:  # the sidecar is down on purpose; try again until it is back
                if self._stopped:
                    return
                with self._changed:
                    self._changed.wait(0.2)  # a reconnection backoff, not a test waiting for something

    def wait(
        self, matches: Callable[[GuardEvent], bool], timeout_s: float = 60.0, what: str = "guard event"
    ) -> tuple[float, GuardEvent]:
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                for seen_at, event in self.events:
                    if matches(event):
                        return seen_at, event
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = [(e.type.name, e.guard.task_key) for _, e in self.events[-20:]]
                    raise TimeoutError(f"no {what} within {timeout_s} s; last events: {seen}")
                self._changed.wait(left)

    def of(self, task_key: str, event_type: EventType) -> list[GuardEvent]:
        with self._changed:
            return [e for _, e in self.events if e.guard.task_key == task_key and e.type is event_type]

    def stop(self) -> None:
        self._stopped = True


@contextmanager
def cpu_hogs(count: int) -> Iterator[None]:
    """``count`` processes that keep a core busy each, at normal priority, for the duration of the block."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        yield
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait(10)


@dataclass
class Lab:
    workdir: Path
    sidecar: SidecarProcess
    model: FakeModel
    gates: GateServer
    work: Work
    guards: GuardEvents
    client: Client
    gateway: Gateway
    plugin_config: dict[str, Any]
    _bare: Gateway | None = None

    def bare_gateway(self) -> Gateway:
        """The same gateway without the plugin (for the scenario's unguarded replay)."""
        if self._bare is None:
            folder = self.workdir / "bare"
            folder.mkdir()
            self._bare = Gateway(folder, self.model.base_url, None).start()
        return self._bare


PLUGIN_RULES = [
    # Every downstream run is named for its task, whatever its flags say.
    {"tool": "exec", "match": r"downstream\.py (\S+)", "name": "$1"},
    # A task that must not run unguarded.
    {"tool": "exec", "match": r"downstream\.py (critical-\S+)", "name": "$1", "onUnavailable": "block"},
    # A task whose repeats wait their turn (issue 16) instead of being blocked.
    {"tool": "exec", "match": r"downstream\.py (queued-\S+)", "name": "$1", "onConflict": "queue"},
]


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    ensure_openclaw()
    workdir = Path(tempfile.mkdtemp(prefix="oc-", dir="/tmp"))
    sidecar = SidecarProcess(workdir)
    sidecar.start()
    model = FakeModel().__enter__()
    gates = GateServer(workdir / "gates.sock")
    work_folder = workdir / "work"
    work_folder.mkdir()
    client = Client(sidecar.address, holder="tests")
    guards = GuardEvents(client).start()
    plugin_config = {
        "address": sidecar.address,
        # Named rules first: the critical rule must win over the generic one.
        "rules": [PLUGIN_RULES[1], PLUGIN_RULES[2], PLUGIN_RULES[0]],
    }
    gateway_folder = workdir / "gw"
    gateway_folder.mkdir()
    gateway = Gateway(gateway_folder, model.base_url, plugin_config)
    lab = Lab(workdir, sidecar, model, gates, Work(work_folder, gates), guards, client, gateway, plugin_config)
    try:
        gateway.start()
        yield lab
    finally:
        guards.stop()
        for running in (gateway, lab._bare):
            if running is not None:
                running.close()
        gates.close()
        model.__exit__(None, None, None)
        client.close()
        sidecar.close()
        if not os.environ.get("TASKGUARD_KEEP_TEST_FILES"):
            shutil.rmtree(workdir, ignore_errors=True)
