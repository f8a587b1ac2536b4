"""A sidecar restart must not take guards from healthy Hold holders, TTL or not.

Heartbeats on a Hold stream are not durable, so the deadline stored with a
TTL'd Hold run is the one from its acquisition (or its last durable change).
After a restart every stream-bound run gets the resume grace counted from the
restart, and a resumed holder's TTL counts from its resume.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable

import pytest

from taskguard_client import AsyncClient, EventType, GuardEvent, GuardState
from tests.support import ROOT, SidecarProcess

TIMEOUT_S = 30.0
TTL_S = 3.0
# Prints once started, then waits for a line on stdin and exits 0.
WAITER = "import sys; print('ready', flush=True); sys.stdin.readline()"


async def _first(client: AsyncClient, key: str, start_revision: int, match: Callable[[GuardEvent], bool]) -> GuardEvent:
    async with client.watch(key, start_revision=start_revision) as events:
        async for event in events:
            if event.guard.task_key == key and match(event):
                return event
    raise AssertionError("the watch ended")


@pytest.mark.slow
@pytest.mark.parametrize("stop", ["sigterm", "sigkill"])
async def test_a_ttl_hold_run_survives_a_sidecar_restart_and_its_ttl_counts_from_its_resume(
    sidecar: SidecarProcess, key: str, stop: str
) -> None:
    run = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "taskguard", "--addr", sidecar.address, "run", key, "--ttl", f"{TTL_S:g}s"),
        *("--", sys.executable, "-c", WAITER),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    assert run.stdout is not None and run.stdin is not None and run.stderr is not None
    try:
        assert (await asyncio.wait_for(run.stdout.readline(), TIMEOUT_S)).strip() == b"ready"
        async with AsyncClient(sidecar.address) as client:
            before = await client.get(key)
            assert before.state is GuardState.RUNNING and before.expires_at is not None
            # Heartbeats carry it past the deadline stored at the acquisition, which is what a restart finds.
            lost = _first(client, key, before.revision, lambda event: not event.guard.running)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(lost, 2 * TTL_S)
        if stop == "sigterm":
            sidecar.terminate()
        else:
            sidecar.kill()
        sidecar.start()
        async with AsyncClient(sidecar.address) as client:
            resumed = await asyncio.wait_for(
                _first(
                    client,
                    key,
                    before.revision,
                    lambda event: event.type is EventType.RESUMED or not event.guard.running,
                ),
                TIMEOUT_S,
            )
            assert resumed.type is EventType.RESUMED, f"lost at the restart: {resumed.guard.last_detail}"
            # Its TTL restarted at the resume, not at the acquisition.
            assert resumed.guard.expires_at is not None and resumed.guard.expires_at > before.expires_at
            # Well past the deadline stored at the acquisition (and past a TTL after the resume): still held.
            lost = _first(client, key, resumed.revision, lambda event: not event.guard.running)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(lost, 3 * TTL_S)
            assert (await client.get(key)).state is GuardState.RUNNING
            run.stdin.write(b"done\n")
            await run.stdin.drain()
            assert await asyncio.wait_for(run.wait(), TIMEOUT_S) == 0, await run.stderr.read()
            assert (await client.get(key)).state is GuardState.SUCCEEDED
    finally:
        if run.returncode is None:
            run.kill()
        await asyncio.wait_for(run.communicate(), TIMEOUT_S)
