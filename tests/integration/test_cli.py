"""The ``taskguard`` client commands as real subprocesses (``python -m taskguard --addr ...``) on a real sidecar."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from taskguard.cli import common as cli_common
from taskguard.cli import main as cli
from taskguard_client import AsyncClient, EventType, GuardEvent, GuardState, RunStatus
from tests.support import ROOT, SidecarProcess

TIMEOUT_S = 15.0
PIPE = asyncio.subprocess.PIPE

# Commands for `taskguard run`: print a line once started, then wait to be ended.
SLEEPER = "import os, time; print('ready', os.getpid(), flush=True); time.sleep(60)"
TERM_REPORTER = (
    "import os, signal, sys, time\n"
    "signal.signal(signal.SIGTERM, lambda *_: (print('got SIGTERM', flush=True), sys.exit(0)))\n"
    "print('ready', os.getpid(), flush=True)\n"
    "time.sleep(60)\n"
)


@pytest.fixture
def address(module_sidecar: SidecarProcess) -> str:
    return module_sidecar.address


@pytest.fixture
async def client(address: str) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(address, holder="tests") as tests_client:
        yield tests_client


@dataclass
class Spawned:
    """Processes a test started, and pids of commands that may outlive them; all killed at teardown."""

    processes: list[asyncio.subprocess.Process] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)


@pytest.fixture
async def spawned() -> AsyncIterator[Spawned]:
    started = Spawned()
    yield started
    for pid in started.pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for process in started.processes:
        if process.returncode is None:
            process.kill()
        # Read the pipes to their end (the commands above held them open): asyncio closes a transport only then.
        await asyncio.wait_for(process.communicate(), TIMEOUT_S)


def _command(address: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "taskguard", "--addr", address, *args]


async def taskguard(address: str, *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(*_command(address, *args), stdout=PIPE, stderr=PIPE, cwd=ROOT)
    out, err = await asyncio.wait_for(process.communicate(), TIMEOUT_S)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def start(spawned: Spawned, address: str, *args: str) -> asyncio.subprocess.Process:
    process = await asyncio.create_subprocess_exec(*_command(address, *args), stdout=PIPE, stderr=PIPE, cwd=ROOT)
    spawned.processes.append(process)
    return process


async def line(stream: asyncio.StreamReader | None) -> str:
    assert stream is not None
    text = (await asyncio.wait_for(stream.readline(), TIMEOUT_S)).decode()
    assert text, "the stream ended"
    return text.rstrip("\n")


async def finished(process: asyncio.subprocess.Process) -> tuple[int, str]:
    """Exit code and stderr of a process started with ``start``."""
    assert process.stderr is not None
    err = await asyncio.wait_for(process.stderr.read(), TIMEOUT_S)
    return await asyncio.wait_for(process.wait(), TIMEOUT_S), err.decode()


async def first_event(
    client: AsyncClient,
    key: str,
    start_revision: int,
    match: Callable[[GuardEvent], bool],
    timeout_s: float = TIMEOUT_S,
) -> GuardEvent:
    async def scan() -> GuardEvent:
        async with client.watch(key, start_revision=start_revision) as events:
            async for event in events:
                if event.guard.task_key == key and match(event):
                    return event
        raise AssertionError("the watch ended")

    return await asyncio.wait_for(scan(), timeout_s)


def _one_error_line(err: str) -> str:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("taskguard: ")
    return lines[0]


# --- reading and operating ------------------------------------------------------------------


async def test_ls_json_is_one_document_and_the_table_shows_the_guard(
    address: str, client: AsyncClient, key: str
) -> None:
    lease = await client.acquire(key, ttl=60, holder="host-1")
    code, out, _ = await taskguard(address, "ls", "--prefix", key, "--json")
    assert code == 0
    (guard,) = json.loads(out)
    assert (guard["task_key"], guard["state"], guard["run_id"], guard["fencing_token"]) == (
        key,
        "RUNNING",
        lease.run_id,
        1,
    )
    assert guard["started_at"].endswith("Z") and guard["ttl"] == 60.0
    code, out, _ = await taskguard(address, "ls", "--prefix", key, "--state", "running", "failed", "--wide")
    header, row = out.splitlines()
    assert header.split()[:3] == ["KEY", "STATE", "RUN"] and "EXPIRES" in header and "DUPS" in header
    assert row.split()[:4] == [key, "RUNNING", lease.run_id, "host-1"]
    code, out, _ = await taskguard(address, "ls", "--prefix", key, "--state", "failed", "--json")
    assert (code, json.loads(out)) == (0, [])


async def test_get_shows_one_guard_and_an_unknown_key_exits_66(address: str, client: AsyncClient, key: str) -> None:
    await client.acquire(key)
    code, out, _ = await taskguard(address, "get", key, "--json")
    assert code == 0 and json.loads(out)["task_key"] == key
    code, out, _ = await taskguard(address, "get", key)
    assert code == 0 and "state" in out and "RUNNING" in out
    code, _, err = await taskguard(address, "get", key + "/missing")
    assert code == cli_common.EXIT_NOT_FOUND == 66
    assert "no guard has this key" in _one_error_line(err)


async def test_check_fence_exits_0_for_the_holding_token_and_1_otherwise(
    address: str, client: AsyncClient, key: str
) -> None:
    lease = await client.acquire(key)
    assert (await taskguard(address, "check-fence", key, str(lease.fencing_token)))[0] == 0
    assert (await taskguard(address, "check-fence", key, str(lease.fencing_token + 1)))[0] == 1
    await client.release(lease.lease_id, RunStatus.SUCCEEDED)
    assert (await taskguard(address, "check-fence", key, str(lease.fencing_token)))[0] == 1


async def test_force_release_cancels_a_running_guard_and_refuses_a_finished_one(
    address: str, client: AsyncClient, key: str
) -> None:
    await client.acquire(key)
    code, out, _ = await taskguard(address, "force-release", key, "--reason", "stuck", "--operator", "ops")
    assert code == 0 and "CANCELLED" in out
    guard = await client.get(key)
    assert (guard.state, guard.released_by, guard.last_detail) == (GuardState.CANCELLED, "ops", "stuck")
    code, _, err = await taskguard(address, "force-release", key, "--reason", "again")
    assert code == cli_common.EXIT_FAILED_PRECONDITION and "not RUNNING" in _one_error_line(err)


async def test_watch_json_prints_one_event_per_line(
    address: str, client: AsyncClient, key: str, spawned: Spawned
) -> None:
    lease = await client.acquire(key, holder="cron")
    watcher = await start(spawned, address, "watch", "--prefix", key, "--snapshot", "--json")
    snapshot = json.loads(await line(watcher.stdout))
    assert (snapshot["type"], snapshot["guard"]["task_key"], snapshot["guard"]["holder"]) == ("SNAPSHOT", key, "cron")
    await client.release(lease.lease_id, RunStatus.FAILED, "exit code 1")
    released = json.loads(await line(watcher.stdout))
    assert (released["type"], released["guard"]["state"], released["guard"]["last_detail"]) == (
        "RELEASED",
        "FAILED",
        "exit code 1",
    )
    assert released["revision"] > snapshot["revision"]
    watcher.kill()


# --- run ----------------------------------------------------------------------------------


async def test_run_gives_the_command_its_guard_and_releases_succeeded(
    address: str, client: AsyncClient, key: str
) -> None:
    show = 'echo "$TASKGUARD_TASK_KEY $TASKGUARD_RUN_ID $TASKGUARD_FENCING_TOKEN"'
    code, out, err = await taskguard(address, "run", key, "--run-id", "run-1", "--ttl", "30s", "--", "sh", "-c", show)
    assert (code, out.split()) == (0, [key, "run-1", "1"]), err
    guard = await client.get(key)
    assert (guard.state, guard.run_id, guard.stream_bound) == (GuardState.SUCCEEDED, "run-1", True)


async def test_a_failing_command_fails_the_guard_and_a_retry_needs_approve_retry(
    address: str, client: AsyncClient, key: str
) -> None:
    code, _, _ = await taskguard(address, "run", key, "--", "sh", "-c", "exit 3")
    assert code == 3
    guard = await client.get(key)
    assert (guard.state, guard.last_detail) == (GuardState.FAILED, "exit code 3")
    code, _, err = await taskguard(address, "run", key, "--", "true")
    assert code == cli_common.EXIT_RETRY_REQUIRES_APPROVAL == 76
    assert "exit code 3" in _one_error_line(err) and "approve-retry" in err
    code, out, _ = await taskguard(address, "approve-retry", key, "--reason", "fixed", "--approver", "ops")
    assert code == 0 and "RETRY_APPROVED" in out
    assert (await taskguard(address, "run", key, "--", "true"))[0] == 0
    assert (await client.get(key)).fencing_token == 2
    code, _, err = await taskguard(address, "approve-retry", key, "--reason", "not failed")
    assert code == cli_common.EXIT_FAILED_PRECONDITION and "not waiting for a retry approval" in err


async def test_a_command_killed_by_a_signal_exits_128_plus_it(address: str, client: AsyncClient, key: str) -> None:
    code, _, _ = await taskguard(address, "run", key, "--", "sh", "-c", "kill -KILL $$")
    assert code == 128 + signal.SIGKILL
    guard = await client.get(key)
    assert (guard.state, guard.last_detail) == (GuardState.FAILED, "killed by signal SIGKILL")


async def test_a_conflict_exits_75_naming_the_winner_and_skip_exits_0(
    address: str, client: AsyncClient, key: str
) -> None:
    winner = await client.acquire(key, ttl=60, holder="host-a")
    code, out, err = await taskguard(address, "run", key, "--", "echo", "ran")
    assert code == cli_common.EXIT_ALREADY_RUNNING == 75 and "ran" not in out
    message = _one_error_line(err)
    assert winner.run_id in message and "host-a" in message and "started" in message
    code, out, err = await taskguard(address, "run", key, "--on-conflict", "skip", "--", "echo", "ran")
    assert code == 0 and "ran" not in out and "skipped" in err and winner.run_id in err


async def test_wait_joins_the_winner_and_exits_with_its_outcome(
    address: str, client: AsyncClient, key: str, spawned: Spawned
) -> None:
    # The first winner succeeds (exit 0); that frees the key for the second, which fails (exit 80).
    for status, expected in ((RunStatus.SUCCEEDED, 0), (RunStatus.FAILED, cli_common.EXIT_JOINED_RUN_FAILED)):
        winner = await client.acquire(key)
        joiner = f"joiner-{status.value}"
        waiting = await start(spawned, address, "run", key, "--on-conflict", "wait", "--run-id", joiner, "--", "true")

        def refused(event: GuardEvent, joiner: str = joiner) -> bool:
            return event.type is EventType.DUPLICATE_REFUSED and event.trigger_run_id == joiner

        await first_event(client, key, winner.guard.revision + 1, refused)
        assert waiting.returncode is None
        await client.release(winner.lease_id, status, "done")
        code, err = await finished(waiting)
        assert code == expected, err
        assert f"run {winner.run_id} ended {status.value}" in err
        assert (await client.get(key)).run_id == winner.run_id  # the joiner never ran


async def test_sigterm_is_forwarded_to_the_command_and_the_guard_cancelled(
    address: str, client: AsyncClient, key: str, spawned: Spawned
) -> None:
    running = await start(spawned, address, "run", key, "--", sys.executable, "-c", SLEEPER)
    assert (await line(running.stdout)).startswith("ready")
    running.send_signal(signal.SIGTERM)
    code, err = await finished(running)
    assert code == 128 + signal.SIGTERM, err  # the command died of the forwarded SIGTERM
    guard = await client.get(key)
    assert (guard.state, guard.last_status) == (GuardState.CANCELLED, RunStatus.CANCELLED)
    assert guard.last_detail == "SIGTERM forwarded to the command; killed by signal SIGTERM"


async def test_sigkill_of_taskguard_run_abandons_the_guard_within_2s(
    address: str, client: AsyncClient, key: str, spawned: Spawned
) -> None:
    running = await start(spawned, address, "run", key, "--", sys.executable, "-c", SLEEPER)
    ready = await line(running.stdout)
    spawned.pids.append(int(ready.split()[1]))  # the command outlives it; the fixture kills it
    held = await client.get(key)
    assert held.state is GuardState.RUNNING
    running.kill()
    abandoned = await first_event(
        client, key, held.revision + 1, lambda e: e.type is EventType.ABANDONED, timeout_s=2.0
    )
    assert abandoned.guard.state is GuardState.ABANDONED and abandoned.guard.run_id == held.run_id


async def test_a_lost_guard_stops_the_command_and_exits_79(
    address: str, client: AsyncClient, key: str, spawned: Spawned
) -> None:
    running = await start(spawned, address, "run", key, "--ttl", "30s", "--", sys.executable, "-c", TERM_REPORTER)
    assert (await line(running.stdout)).startswith("ready")
    await client.force_release(key, "ops", "stuck")
    assert await line(running.stdout) == "got SIGTERM"
    code, err = await finished(running)
    assert code == cli_common.EXIT_LEASE_LOST == 79, err
    assert "force-released by ops: stuck" in err and "Traceback" not in err
    assert (await client.get(key)).state is GuardState.CANCELLED


async def test_a_lost_guard_is_reported_with_the_time_of_its_loss(
    address: str, client: AsyncClient, key: str, spawned: Spawned
) -> None:
    running = await start(spawned, address, "run", key, "--", sys.executable, "-c", TERM_REPORTER)
    assert (await line(running.stdout)).startswith("ready")
    acquired = await client.get(key)
    # Into the next second of the wall clock (what the message shows), so that the acquisition's time cannot pass
    # for the loss's. Not a synchronisation (nothing else is waited for): time has to pass, that is all.
    next_second = acquired.started_at.replace(microsecond=0) + timedelta(seconds=1)
    await asyncio.sleep(max(0.0, (next_second - datetime.now(UTC)).total_seconds()) + 0.01)
    await client.force_release(key, "ops", "stuck")
    code, err = await finished(running)
    assert code == cli_common.EXIT_LEASE_LOST, err
    released = await client.get(key)
    assert released.released_at is not None
    lost_at = cli_common.iso(released.released_at)
    assert lost_at != cli_common.iso(acquired.started_at)
    assert f"{key}: the guard was lost at {lost_at} (" in err, err
    assert "force-released by ops: stuck" in err
    assert err.count("force-released") == 1, err  # one message, not one at the loss and one at the exit


# A command that says it started, then exits 3 when it reads a line.
EXIT_3_ON_A_LINE = "import sys; print('ready', flush=True); sys.stdin.readline(); sys.exit(3)"


@pytest.mark.slow  # run waits out the resume window (15 s) for a sidecar that does not come back
@pytest.mark.timeout(180)
async def test_run_exits_with_its_commands_status_when_the_sidecar_is_gone_at_the_end(
    sidecar_factory: Callable[..., SidecarProcess], key: str
) -> None:
    sidecar = sidecar_factory()
    command = _command(sidecar.address, "--timeout", "3s", "run", key, "--", sys.executable, "-c", EXIT_3_ON_A_LINE)
    running = await asyncio.create_subprocess_exec(*command, stdin=PIPE, stdout=PIPE, stderr=PIPE, cwd=ROOT)
    try:
        assert (await line(running.stdout)) == "ready"
        await asyncio.to_thread(sidecar.kill)
        assert running.stdin is not None
        running.stdin.write(b"exit now\n")
        await running.stdin.drain()
        _, err_bytes = await asyncio.wait_for(running.communicate(), 120)
    finally:
        if running.returncode is None:
            running.kill()
            await running.wait()
    err = err_bytes.decode()
    assert running.returncode == 3, err  # the command's own status, not 79: nothing was taken away from it
    message = _one_error_line(err)
    assert f"{key}: the run's end (FAILED: exit code 3) was not recorded" in message, message
    assert "SIGTERM" not in err


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_run_records_its_commands_end_when_the_sidecar_comes_back_within_the_resume_window(
    sidecar_factory: Callable[..., SidecarProcess], key: str
) -> None:
    sidecar = sidecar_factory()
    command = _command(sidecar.address, "run", key, "--", sys.executable, "-c", EXIT_3_ON_A_LINE)
    running = await asyncio.create_subprocess_exec(*command, stdin=PIPE, stdout=PIPE, stderr=PIPE, cwd=ROOT)
    try:
        assert (await line(running.stdout)) == "ready"
        await asyncio.to_thread(sidecar.kill)
        assert running.stdin is not None
        running.stdin.write(b"exit now\n")
        await running.stdin.drain()
        await asyncio.to_thread(sidecar.start)
        _, err_bytes = await asyncio.wait_for(running.communicate(), 120)
    finally:
        if running.returncode is None:
            running.kill()
            await running.wait()
    assert running.returncode == 3, err_bytes.decode()
    assert err_bytes == b""
    async with AsyncClient(sidecar.address) as client:
        guard = await client.get(key)
    assert (guard.state, guard.last_detail) == (GuardState.FAILED, "exit code 3")


async def test_a_missing_command_exits_127_without_acquiring(address: str, client: AsyncClient, key: str) -> None:
    code, _, err = await taskguard(address, "run", key, "--", "no-such-command-here")
    assert code == 127 and "command not found" in _one_error_line(err)
    assert [guard async for guard in client.list(prefix=key)] == []


# --- failures are one line ------------------------------------------------------------------


@pytest.mark.slow  # each command retries for about a second before it gives up
async def test_an_unreachable_sidecar_is_one_line_and_exit_69(workdir: Path, key: str) -> None:
    nobody = f"unix:{workdir / 'nobody.sock'}"
    for args in (("ls",), ("get", key), ("run", key, "--", "true")):
        code, _, err = await taskguard(nobody, *args)
        assert code == cli_common.EXIT_UNAVAILABLE == 69, err
        assert "not reachable" in _one_error_line(err)


async def test_a_bad_key_is_one_line_and_exit_65(address: str) -> None:
    for args in (("get", "bad\tkey"), ("run", "", "--", "true"), ("check-fence", "bad\nkey", "1")):
        code, _, err = await taskguard(address, *args)
        assert code == cli_common.EXIT_INVALID_ARGUMENT == 65, err
        assert "task_key" in _one_error_line(err)


def test_help_documents_every_exit_code() -> None:
    text = cli.build_parser().format_help()
    for code in (0, 1, 2, 65, 66, 67, 69, 70, 75, 76, 77, 79, 80, 126, 127, 130):
        assert f"\n  {code} " in text, code
    readme = (ROOT / "README.md").read_text()
    assert "## CLI" in readme and "75" in readme and "76" in readme
