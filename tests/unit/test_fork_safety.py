"""The tests fork (to run commands as another user) while grpc is busy in the same process: grpc's fork
handlers must be off there, or a fork can wait on grpc's threads forever (it did, in CI)."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.other_user import NOBODY, needs_root

# An asyncio grpc server busy with calls while another thread forks with setuid (which rules out vfork).
_FORK_WHILE_BUSY = """
import asyncio, subprocess, sys
import grpc
from grpc import aio

async def main() -> None:
    server = aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = aio.insecure_channel(f"127.0.0.1:{port}")
    call = channel.unary_unary("/no.Such/Method")
    async def busy() -> None:
        while True:
            try:
                await call(b"", timeout=5)
            except grpc.aio.AioRpcError:
                pass
    load = [asyncio.create_task(busy()) for _ in range(4)]
    uid, gid = int(sys.argv[1]), int(sys.argv[2])
    for _ in range(20):
        await asyncio.to_thread(subprocess.run, ["/bin/true"], user=uid, group=gid, extra_groups=[], timeout=30)
    for task in load:
        task.cancel()
    await server.stop(0)

asyncio.run(main())
"""


def _fork_while_busy(**env: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", _FORK_WHILE_BUSY, str(NOBODY.pw_uid), str(NOBODY.pw_gid)],
        env={**os.environ, "GRPC_VERBOSITY": "info", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result.stderr


@needs_root
def test_grpc_runs_no_fork_handlers_in_the_test_process() -> None:
    assert os.environ["GRPC_ENABLE_FORK_SUPPORT"] == "false"  # set by conftest before grpc loads
    assert "fork_posix" not in _fork_while_busy()
    # What it guards against: with fork support on (grpc's default), every fork goes through its handlers.
    assert "fork_posix" in _fork_while_busy(GRPC_ENABLE_FORK_SUPPORT="true")
