"""A holder process killed with SIGKILL loses its guard within 2 seconds."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

from grpc import aio

from taskguard_client.v1 import taskguard_pb2 as pb
from taskguard_client.v1 import taskguard_pb2_grpc as pb_grpc
from tests.support import ROOT, SidecarProcess, acquire, watch_until

ABANDON_WITHIN_S = 2.0


async def test_a_sigkilled_hold_client_is_abandoned_within_two_seconds(sidecar: SidecarProcess, key: str) -> None:
    client = await asyncio.create_subprocess_exec(
        sys.executable,
        str(Path(__file__).with_name("hold_client.py")),
        sidecar.address,
        key,
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        assert client.stdout is not None
        held = json.loads(await asyncio.wait_for(client.stdout.readline(), 10))
        assert held["outcome"] == pb.ACQUIRE_OUTCOME_ACQUIRED
        async with aio.insecure_channel(sidecar.address) as channel:
            stub = pb_grpc.TaskGuardStub(channel)
            assert (await acquire(stub, key)).outcome == pb.ACQUIRE_OUTCOME_ALREADY_RUNNING
            client.send_signal(signal.SIGKILL)
            events = await watch_until(
                stub,
                lambda seen: any(e.type == pb.GUARD_EVENT_TYPE_ABANDONED for e in seen),
                timeout_s=ABANDON_WITHIN_S,
                key_prefix=key,
                start_revision=held["revision"] + 1,
            )
            assert events[-1].guard.fencing_token == held["token"]
            retaken = await acquire(stub, key)
            assert retaken.outcome == pb.ACQUIRE_OUTCOME_ACQUIRED
            assert retaken.guard.fencing_token == held["token"] + 1
    finally:
        if client.returncode is None:
            client.kill()
        await client.wait()
