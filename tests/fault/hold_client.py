"""A Hold client in its own process: acquires, prints its guard as one JSON line, then holds until killed."""

from __future__ import annotations

import asyncio
import json
import sys

from grpc import aio

from taskguard_client.v1 import taskguard_pb2 as pb
from taskguard_client.v1 import taskguard_pb2_grpc as pb_grpc


async def main(address: str, task_key: str) -> None:
    async with aio.insecure_channel(address) as channel:
        call = pb_grpc.TaskGuardStub(channel).Hold()
        await call.write(pb.HoldRequest(acquire=pb.AcquireRequest(task_key=task_key, holder="hold_client")))
        first = await call.read()
        print(
            json.dumps(
                {"outcome": first.outcome, "revision": first.guard.revision, "token": first.guard.fencing_token}
            ),
            flush=True,
        )
        await call.read()  # holds until the process is killed


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
