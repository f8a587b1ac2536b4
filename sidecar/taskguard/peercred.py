"""Who is on the other end of a unix socket, for a gRPC server that cannot say.

grpc-python exposes no SO_PEERCRED (grpc/grpc#15511, #28755). When the public
socket is open to more than its owner, this front accepts connections itself,
reads each one's credentials from the kernel, and relays it to the gRPC
server's private socket from a client socket *bound to a path of its own*.
The server's ``context.peer()`` then reads ``unix:<that path>``, which this
front maps back to the uid. One relay per connection; no bytes are parsed.

With the default 0600 socket only its owner (and root) can connect at all, so
the server listens directly and nothing here runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import struct
from pathlib import Path

log = logging.getLogger(__name__)

_UCRED = struct.Struct("3i")


class _Relay(asyncio.Protocol):
    """One direction's reader; writes to ``peer`` with back-pressure both ways."""

    def __init__(self, closed: asyncio.Future[None]) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Relay | None = None
        self.closed = closed

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write(data)

    def eof_received(self) -> bool:
        if self.peer is not None and self.peer.transport is not None and self.peer.transport.can_write_eof():
            self.peer.transport.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()
        if not self.closed.done():
            self.closed.set_result(None)

    # The peer's writes filled its buffer: stop reading here until it drains.
    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


class PeerCredFront:
    def __init__(self, public_path: Path, inner_path: Path, peer_dir: Path) -> None:
        self.public_path = public_path
        self.inner_path = inner_path
        self._peer_dir = peer_dir
        self._uids: dict[str, int] = {}
        self._server: asyncio.Server | None = None
        self._counter = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()

    def uid_for(self, peer: str) -> int | None:
        """The uid behind a gRPC ``context.peer()`` string, if this front relayed it."""
        return self._uids.get(peer.removeprefix("unix:"))

    async def start(self) -> None:
        self._peer_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        for stale in self._peer_dir.glob("*.peer"):
            stale.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self.public_path))
        listener.listen(1024)
        listener.setblocking(False)
        self._server = await asyncio.get_running_loop().create_unix_server(self._connection_factory, sock=listener)

    def _connection_factory(self) -> asyncio.Protocol:
        return _Accepted(self)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _bridge(self, downstream: _Relay, sock: socket.socket) -> None:
        """Open the upstream leg for an accepted connection and pipe the two together."""
        loop = asyncio.get_running_loop()
        try:
            _, uid, _ = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        except OSError:
            uid = -1
        bound = self._peer_dir / f"{next(self._counter)}.peer"
        upstream_socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        closed: asyncio.Future[None] = loop.create_future()
        try:
            upstream_socket.bind(str(bound))
            upstream_socket.setblocking(False)
            await loop.sock_connect(upstream_socket, str(self.inner_path))
            self._uids[str(bound)] = uid
            _, upstream = await loop.create_unix_connection(lambda: _Relay(closed), sock=upstream_socket)
            assert isinstance(upstream, _Relay) and downstream.transport is not None
            upstream.peer, downstream.peer = downstream, upstream
            downstream.transport.resume_reading()
            await asyncio.wait({closed, downstream.closed}, return_when=asyncio.FIRST_COMPLETED)
            if upstream.transport is not None:
                upstream.transport.close()
        except OSError as error:
            log.warning("cannot relay a unix connection: %s", error)
            upstream_socket.close()
        finally:
            if downstream.transport is not None:
                downstream.transport.close()
            self._uids.pop(str(bound), None)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(bound)


class _Accepted(_Relay):
    """The downstream leg: holds its bytes until the upstream leg is connected."""

    def __init__(self, front: PeerCredFront) -> None:
        super().__init__(asyncio.get_running_loop().create_future())
        self._front = front

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()
        sock = transport.get_extra_info("socket")
        task = asyncio.get_running_loop().create_task(self._front._bridge(self, sock))
        self._front._tasks.add(task)
        task.add_done_callback(self._front._tasks.discard)
