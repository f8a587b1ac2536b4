"""What telling loopback TCP callers apart by uid costs: one sock_diag lookup per acquisition.

``python -m bench.peer_lookup`` prints the time of ``TcpPeers.uid_for`` on a live
loopback connection, and beside it the time of a whole unary Acquire over
loopback TCP to an in-process sidecar (which includes one such lookup), so the
share of the lookup can be read off. Other RPCs do not look the uid up.
"""

from __future__ import annotations

import asyncio
import socket
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from grpc import aio

from taskguard import config, server
from taskguard.front.peercred import TcpPeers
from taskguard_client.v1 import taskguard_pb2 as pb
from taskguard_client.v1 import taskguard_pb2_grpc as pb_grpc

LOOKUPS = 20_000
ACQUISITIONS = 2_000


def _lookup_us() -> float:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    with listener, socket.create_connection(("127.0.0.1", port)) as client:
        accepted, _ = listener.accept()
        with accepted:
            peers = TcpPeers(port, "127.0.0.1")
            peer = f"ipv4:127.0.0.1:{client.getsockname()[1]}"
            assert peers.uid_for(peer) is not None, "sock_diag is not available here"
            started = time.perf_counter()
            for _ in range(LOOKUPS):
                peers.uid_for(peer)
            return (time.perf_counter() - started) / LOOKUPS * 1e6


async def _acquire_us(folder: Path) -> float:
    settings = config.default_settings(listen="127.0.0.1:0", db=folder / "bench.db")
    sidecar = await server.start(settings)
    try:
        async with aio.insecure_channel(sidecar.address) as channel:
            stub = pb_grpc.TaskGuardStub(channel)
            prefix = uuid.uuid4().hex
            times = []
            for i in range(ACQUISITIONS):
                started = time.perf_counter()
                await stub.Acquire(pb.AcquireRequest(task_key=f"{prefix}::{i}"))
                times.append(time.perf_counter() - started)
            return statistics.median(times) * 1e6
    finally:
        await sidecar.stop(0)


def main() -> None:
    sockets = sum(1 for _ in Path("/proc/net/tcp").open()) - 1 + sum(1 for _ in Path("/proc/net/tcp6").open()) - 1
    lookup = _lookup_us()
    with tempfile.TemporaryDirectory() as folder:
        acquire = asyncio.run(_acquire_us(Path(folder)))
    print(f"TCP sockets on this host: {sockets}")
    print(f"uid lookup (sock_diag), mean of {LOOKUPS}: {lookup:.1f} us")
    print(f"unary Acquire over loopback TCP, median of {ACQUISITIONS}: {acquire:.0f} us (lookup included)")
    print(f"lookup share of an Acquire: {lookup / acquire:.1%}")


if __name__ == "__main__":
    main()
