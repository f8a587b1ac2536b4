"""``taskguard run --on-conflict queue|keep-newest`` as real processes racing on one real sidecar."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from taskguard_client import AsyncClient, EventType, GuardEvent
from tests.support import ROOT, SidecarProcess

TIMEOUT_S = 120.0  # twenty Python processes on a loaded 2-core machine
PIPE = asyncio.subprocess.PIPE

# The task each shell runs: note its start and end (with its fencing token), working a little between.
TASK = (
    "import os, time\n"
    "log = open(os.environ['LOG'], 'a')\n"
    "run, token = os.environ['TASKGUARD_RUN_ID'], os.environ['TASKGUARD_FENCING_TOKEN']\n"
    "log.write(f'start {run} {token}\\n'); log.flush()\n"
    "time.sleep(0.05)\n"
    "log.write(f'end {run} {token}\\n'); log.flush()\n"
)


async def _run(address: str, log: Path, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "taskguard",
        "--addr",
        address,
        "run",
        *args,
        stdin=PIPE,
        stdout=PIPE,
        stderr=PIPE,
        cwd=ROOT,
        env={"LOG": str(log), "PATH": "/usr/bin:/bin"},
    )


async def _events(address: str, key: str, done: int) -> list[GuardEvent]:
    """The key's events from its first, until ``done`` runs were released."""
    seen: list[GuardEvent] = []
    async with AsyncClient(address) as client, client.watch(key, start_revision=1) as events:
        async for event in events:
            seen.append(event)
            if sum(1 for e in seen if e.type is EventType.RELEASED) == done:
                return seen
    return seen


@pytest.mark.slow
async def test_twenty_racing_shells_run_one_after_another_in_arrival_order_each_once(
    sidecar: SidecarProcess, workdir: Path, key: str
) -> None:
    log = workdir / "runs.log"
    runs = [f"shell-{index:02d}" for index in range(20)]
    processes = await asyncio.gather(
        *(
            _run(sidecar.address, log, key, "--run-id", run, "--on-conflict", "queue", "--", sys.executable, "-c", TASK)
            for run in runs
        )
    )
    events = await asyncio.wait_for(_events(sidecar.address, key, len(runs)), TIMEOUT_S)
    results = [await asyncio.wait_for(process.communicate(b""), TIMEOUT_S) for process in processes]
    assert [process.returncode for process in processes] == [0] * len(runs), [err for _, err in results]

    # Arrival: the order in which each run first reached the sidecar (acquired at once, or queued).
    arrived: list[str] = []
    for event in events:
        run = event.waiter_run_id or (event.guard.run_id if event.type is EventType.ACQUIRED else "")
        if run and run not in arrived:
            arrived.append(run)
    admitted = [event.guard.run_id for event in events if event.type is EventType.ACQUIRED]
    assert sorted(arrived) == runs
    assert admitted == arrived  # FIFO, each exactly once

    lines = log.read_text().splitlines()
    # One after another: every start is followed by its own end, in the order the sidecar admitted them.
    assert lines == [f"{edge} {run} {token}" for token, run in enumerate(admitted, 1) for edge in ("start", "end")]
    queued_notices = sum(err.decode().count("queued, position") for _, err in results)
    assert queued_notices >= len(runs) - 1


async def test_keep_newest_runs_the_latest_follow_up_once_and_the_replaced_one_exits_84(
    sidecar: SidecarProcess, workdir: Path, key: str
) -> None:
    log = workdir / "runs.log"
    wait = "import os, sys; sys.stdin.read()"
    holder = await _run(sidecar.address, log, key, "--run-id", "first", "--", sys.executable, "-c", wait)
    async with AsyncClient(sidecar.address) as client:
        async with client.watch(key, start_revision=1) as events:
            async for event in events:
                if event.type is EventType.ACQUIRED:
                    break
        follow_up = ("--on-conflict", "keep-newest", "--", sys.executable, "-c", TASK)
        older = await _run(sidecar.address, log, key, "--run-id", "older", *follow_up)
        assert older.stderr is not None
        notice = await asyncio.wait_for(older.stderr.readline(), TIMEOUT_S)
        assert b"queued, position 1 behind run first" in notice
        newer = await _run(sidecar.address, log, key, "--run-id", "newer", *follow_up)
        _, older_err = await asyncio.wait_for(older.communicate(b""), TIMEOUT_S)
        assert older.returncode == 84 and b"superseded by run newer" in older_err

        await asyncio.wait_for(holder.communicate(b""), TIMEOUT_S)
        assert holder.returncode == 0
        await asyncio.wait_for(newer.communicate(b""), TIMEOUT_S)
        assert newer.returncode == 0
        guard = await client.get(key)
    assert log.read_text().splitlines() == ["start newer 2", "end newer 2"]
    assert guard.run_id == "newer" and guard.state.value == "SUCCEEDED"
