"""Who is on the other end of a unix socket, for a gRPC server that cannot say.

grpc-python exposes no SO_PEERCRED (grpc/grpc#15511, #28755). When the public
socket is open to more than its owner, this front accepts connections itself,
reads each one's credentials from the kernel, and relays it to the gRPC
server's private socket from a client socket *bound to a path of its own*.
The server's ``context.peer()`` then reads ``unix:<that path>``, which this
front maps back to the uid. One relay per connection; no bytes are parsed.

With the default 0600 socket only its owner (and root) can connect at all, so
the server listens directly and nothing here runs.

Loopback TCP has no SO_PEERCRED either, but the kernel knows the client's end
of every local connection and who made it: ``TcpPeers`` asks its socket table
(sock_diag, the interface ``ss`` uses) for the socket whose local address is
the peer's and whose remote port is the sidecar's, and takes that socket's uid.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import itertools
import logging
import os
import socket
import struct
from pathlib import Path
from urllib.parse import unquote

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
        """The uid behind a gRPC ``context.peer()`` string, if this front relayed it and the kernel said."""
        uid = self._uids.get(peer.removeprefix("unix:"))
        # -1: SO_PEERCRED failed. Callers without a uid must not share one ("uid:-1") and each other's runs.
        return uid if uid is not None and uid >= 0 else None

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


# sock_diag (linux/sock_diag.h, linux/inet_diag.h): one socket by its addresses, as `ss` asks for it.
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 0x1
_NLMSG_ERROR = 2
_NLMSGHDR = struct.Struct("=IHHII")
_REQ_V2 = struct.Struct("=BBBBI")  # family, protocol, ext, pad, states; an inet_diag_sockid follows
_NO_COOKIE = 0xFFFFFFFF
# Client ends a live connection can have. Not LISTEN (the kernel's lookup falls back to a listener),
# nor TIME_WAIT or SYN_RECV minisockets, whose uid reads 0.
_LIVE_STATES = frozenset({1, 4, 5, 8, 9, 11})  # ESTABLISHED FIN_WAIT1 FIN_WAIT2 CLOSE_WAIT LAST_ACK CLOSING
_DIAG_TIMEOUT_S = 1.0

_IP = ipaddress.IPv4Address | ipaddress.IPv6Address


class TcpPeers:
    """The uid behind a loopback TCP connection to this sidecar's ``port``, from the kernel's socket table.

    A socket's uid is the effective uid of the process that created it, kept
    by the kernel: like SO_PEERCRED's, a caller cannot claim another's. Only
    loopback peers are looked up; a lookup that finds no live socket, or that
    the kernel refuses, answers None (the caller is then known by its token or
    certificate only). One lookup is one netlink round trip (bench/peer_lookup.py measures it).
    """

    def __init__(self, port: int, host: str = "") -> None:
        self.port = port
        try:
            self._host: _IP | None = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            self._host = None  # a name (localhost): the peer's own address and the usual loopback ones
        self._warned = False

    def uid_for(self, peer: str) -> int | None:
        address = _tcp_peer(peer)
        if address is None or not address[0].is_loopback:
            return None
        ip, peer_port = address
        try:
            for server_ip in self._server_addresses(ip):
                uid = _socket_uid(ip, peer_port, server_ip, self.port)
                if uid is not None:
                    return uid
        except OSError as error:
            if not self._warned:
                self._warned = True
                log.warning("cannot read the kernel's socket table (sock_diag): %s; TCP callers have no uid", error)
        return None

    def _server_addresses(self, peer: _IP) -> list[_IP]:
        """Where the peer may have connected to: the listen address, else its own address or the usual one."""
        if self._host is not None and not self._host.is_unspecified and self._host.version == peer.version:
            return [self._host]
        usual = ipaddress.ip_address("127.0.0.1" if peer.version == 4 else "::1")
        return [peer] if peer == usual else [peer, usual]


def _tcp_peer(peer: str) -> tuple[_IP, int] | None:
    """``ipv4:127.0.0.1:5000`` / ``ipv6:%5B::1%5D:5000`` (gRPC's peer strings) -> address and port."""
    scheme, _, rest = peer.partition(":")
    if scheme not in ("ipv4", "ipv6"):
        return None
    host, _, port = unquote(rest).rpartition(":")
    try:
        ip = ipaddress.ip_address(host.strip("[]").partition("%")[0])
    except ValueError:
        return None
    if not port.isdigit():
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip, int(port)


def _socket_uid(src: _IP, sport: int, dst: _IP, dport: int) -> int | None:
    """The uid of the live TCP socket whose local end is ``src:sport`` and remote end ``dst:dport``."""
    family = socket.AF_INET if src.version == 4 else socket.AF_INET6
    sockid = (
        struct.pack(">HH", sport, dport)
        + src.packed.ljust(16, b"\0")
        + dst.packed.ljust(16, b"\0")
        + struct.pack("=III", 0, _NO_COOKIE, _NO_COOKIE)
    )
    body = _REQ_V2.pack(family, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF) + sockid
    request = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, 1, 0) + body
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as diag:
        diag.settimeout(_DIAG_TIMEOUT_S)
        diag.sendto(request, (0, 0))
        data = diag.recv(1 << 13)
    at = _NLMSGHDR.size
    if len(data) < at + 4:
        return None
    if _NLMSGHDR.unpack_from(data)[1] == _NLMSG_ERROR:
        code = -struct.unpack_from("=i", data, at)[0]
        if code == errno.ENOENT:
            return None
        raise OSError(code, os.strerror(code))
    # inet_diag_msg: family, state, timer, retrans; sockid (sport, dport big-endian, src[16], dst[16],
    # if, cookie[2]: 48 bytes); expires, rqueue, wqueue, uid, inode.
    if len(data) < at + 72:
        return None
    state = data[at + 1]
    found = struct.unpack_from(">HH", data, at + 4), data[at + 8 : at + 40]
    if state not in _LIVE_STATES or found != ((sport, dport), sockid[4:36]):
        return None
    uid: int = struct.unpack_from("=I", data, at + 64)[0]
    return uid
