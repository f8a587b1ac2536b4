"""Where the sidecar listens, and who can reach it.

* ``unix:PATH`` (the default): the socket file gets ``socket_mode`` (0600
  unless configured) and ``socket_group``, and is created under a umask that
  never lets anyone else see it half-made. When the mode lets others in, a
  ``PeerCredFront`` learns each connection's uid so operator uids can be told
  apart (see peercred.py); with 0600 only the owner and root can connect.
* ``host:port``: loopback only unless ``allow_remote``; TLS with
  ``tls_cert``/``tls_key``, and mTLS when ``tls_client_ca`` is given.
"""

from __future__ import annotations

import contextlib
import grp
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc import aio

from taskguard.config import ConfigError, Settings, tcp_host
from taskguard.peercred import PeerCredFront


@dataclass
class Listener:
    address: str
    front: PeerCredFront | None = None
    _socket_path: Path | None = None
    _mode: int = 0o600
    _group: str = ""
    _private_dir: Path | None = None

    async def start(self) -> None:
        """Finish what binding started, once the gRPC server is serving."""
        if self.front is not None:
            with _umask(0o177):
                await self.front.start()
        if self._socket_path is not None:
            os.chmod(self._socket_path, self._mode)
            if self._group:
                os.chown(self._socket_path, -1, _gid(self._group))

    async def stop(self) -> None:
        if self.front is not None:
            await self.front.stop()
        if self._private_dir is not None:
            shutil.rmtree(self._private_dir, ignore_errors=True)
        if self._socket_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self._socket_path.unlink()


def bind(server: aio.Server, settings: Settings) -> Listener:
    """Add the configured port to ``server`` (before it starts)."""
    if settings.listen.startswith("unix:"):
        return _bind_unix(server, settings)
    return _bind_tcp(server, settings)


def _bind_unix(server: aio.Server, settings: Settings) -> Listener:
    path = Path(settings.listen.removeprefix("unix:").removeprefix("//")).absolute()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.is_socket():
        path.unlink()  # left behind by a sidecar that died
    shared = bool(settings.socket_mode & 0o077)
    if not shared:
        with _umask(0o177):
            server.add_insecure_port(f"unix:{path}")
        return Listener(f"unix:{path}", None, path, settings.socket_mode, settings.socket_group)
    private = path.parent / f".{path.name}.d"
    private.mkdir(mode=0o700, exist_ok=True)
    inner = private / "grpc.sock"
    if inner.is_socket():
        inner.unlink()
    with _umask(0o177):
        server.add_insecure_port(f"unix:{inner}")
    front = PeerCredFront(path, inner, private / "peers")
    return Listener(f"unix:{path}", front, path, settings.socket_mode, settings.socket_group, private)


def _bind_tcp(server: aio.Server, settings: Settings) -> Listener:
    host = tcp_host(settings)  # again: settings made in code (tests, embedding) skip load()
    if settings.tls_cert is not None and settings.tls_key is not None:
        client_ca = settings.tls_client_ca.read_bytes() if settings.tls_client_ca is not None else None
        credentials = grpc.ssl_server_credentials(
            [(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())],
            root_certificates=client_ca,
            require_client_auth=client_ca is not None,
        )
        bound = server.add_secure_port(settings.listen, credentials)
    else:
        bound = server.add_insecure_port(settings.listen)
    if bound == 0:
        raise OSError(f"cannot listen on {settings.listen}")
    return Listener(f"{host}:{bound}")


def _gid(group: str) -> int:
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(f"socket_group: no group named {group!r}") from None


def private_umask() -> contextlib.AbstractContextManager[None]:
    """Sockets created meanwhile are the owner's only, until their mode is set on purpose."""
    return _umask(0o177)


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)
