"""Where the sidecar listens, and who can reach it.

* ``unix:PATH`` (the default): the socket file gets ``socket_mode`` (0600
  unless configured) and ``socket_group``, and is created under a umask that
  never lets anyone else see it half-made. When the mode lets others in, a
  ``PeerCredFront`` learns each connection's uid so operator uids can be told
  apart (see peercred.py); with 0600 only the owner and root can connect.
* ``host:port``: loopback only unless ``allow_remote``; TLS with
  ``tls_cert``/``tls_key``, and mTLS when ``tls_client_ca`` is given.

One socket has one sidecar: a lock on ``<socket>.lock`` (see lockfile.py) is
taken before anything at the path is touched, so a second sidecar stops there
and the live socket stays. With the lock held, a socket file at the path that
nobody answers on was left by a sidecar that died, and is replaced.

The default folder (``$XDG_RUNTIME_DIR/taskguard``, ``/tmp/taskguard-$UID``)
has a well-known name, so another user could make it first and catch every
client's calls and tokens: it is created 0700, and used only when it is a real
folder of this user's that nobody else may write to. Modes and groups are set
on the socket through a descriptor that never follows a symlink.
"""

from __future__ import annotations

import contextlib
import grp
import os
import shutil
import socket
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc import aio

from taskguard import lockfile
from taskguard.config import ConfigError, Settings, runtime_dir, tcp_host
from taskguard.front.peercred import PeerCredFront, TcpPeers
from taskguard.lockfile import LockFile, LockHeld

_UCRED = struct.Struct("3i")
# How long a socket found at the path may take to accept a probe before it counts as live.
_PROBE_TIMEOUT_S = 2.0


@dataclass
class Listener:
    address: str
    front: PeerCredFront | None = None
    _socket_path: Path | None = None
    _mode: int = 0o600
    _group: str = ""
    _private_dir: Path | None = None
    _lock: LockFile | None = None
    _inode: int | None = None
    # Loopback TCP: who is behind each connection, by the kernel's socket table.
    tcp_peers: TcpPeers | None = None

    async def start(self) -> None:
        """Finish what binding started, once the gRPC server is serving."""
        if self.front is not None:
            with _umask(0o177):
                await self.front.start()
        if self._socket_path is not None:
            self._inode = _set_mode(self._socket_path, self._mode, _gid(self._group) if self._group else -1)

    async def stop(self) -> None:
        if self.front is not None:
            await self.front.stop()
        if self._private_dir is not None:
            shutil.rmtree(self._private_dir, ignore_errors=True)
        if self._socket_path is not None and self._inode is not None:
            # Only the socket this sidecar made (gRPC may have removed it already).
            with contextlib.suppress(FileNotFoundError):
                if os.lstat(self._socket_path).st_ino == self._inode:
                    self._socket_path.unlink()
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def bind(server: aio.Server, settings: Settings) -> Listener:
    """Add the configured port to ``server`` (before it starts)."""
    if settings.listen.startswith("unix:"):
        return _bind_unix(server, settings)
    return _bind_tcp(server, settings)


def _bind_unix(server: aio.Server, settings: Settings) -> Listener:
    path = Path(settings.listen.removeprefix("unix:").removeprefix("//")).absolute()
    if path.parent == runtime_dir().absolute():
        claim_private_dir(path.parent)
    else:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    lock_path = path.with_name(f"{path.name}.lock")
    try:
        lock = lockfile.take(lock_path, f"socket {path}")
    except OSError as error:
        raise ConfigError(f"listen: cannot open the socket's lock file {lock_path}: {error.strerror}") from None
    try:
        _remove_stale(path)
        shared = bool(settings.socket_mode & 0o077)
        if not shared:
            with _umask(0o177):
                server.add_insecure_port(f"unix:{path}")
            return Listener(f"unix:{path}", None, path, settings.socket_mode, settings.socket_group, _lock=lock)
        private = path.parent / f".{path.name}.d"
        private.mkdir(mode=0o700, exist_ok=True)
        _check_own_private_dir(private)
        inner = private / "grpc.sock"
        if inner.is_socket():
            inner.unlink()
        with _umask(0o177):
            server.add_insecure_port(f"unix:{inner}")
        front = PeerCredFront(path, inner, private / "peers")
        return Listener(f"unix:{path}", front, path, settings.socket_mode, settings.socket_group, private, _lock=lock)
    except BaseException:
        lock.release()
        raise


def claim_private_dir(folder: Path) -> None:
    """Create ``folder`` 0700, or accept it only if it is this user's own folder that nobody else may write.

    ``mkdir`` never follows a symlink (one at ``folder`` is EEXIST), and the
    checks look at the entry itself (``lstat``), so a planted symlink is refused,
    never used. The parent must not let others rename the folder away: it
    belongs to this user or root, and is sticky (``/tmp``) or writable by nobody else.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.mkdir(folder, 0o700)
    problem = private_dir_problem(folder)
    if problem:
        raise ConfigError(f"listen: {problem}; remove it, or set listen to a socket in a folder of your own")


def private_dir_problem(folder: Path) -> str:
    """Why ``folder`` is not safe to hold this user's socket, or "" when it is."""
    me = os.geteuid()
    st = os.lstat(folder)
    if stat.S_ISLNK(st.st_mode):
        return f"the socket folder {folder} is a symbolic link"
    if not stat.S_ISDIR(st.st_mode):
        return f"the socket folder {folder} is not a folder"
    if st.st_uid != me:
        return f"the socket folder {folder} belongs to uid {st.st_uid}, not to this user (uid {me})"
    if st.st_mode & 0o022:
        return f"the socket folder {folder} has mode {stat.S_IMODE(st.st_mode):04o}: other users may write in it"
    parent = os.stat(folder.parent)
    if parent.st_uid not in (me, 0):
        # Its owner may rename what is in it, sticky or not.
        return f"the socket folder's parent {folder.parent} belongs to uid {parent.st_uid}, who may rename it"
    if parent.st_mode & 0o022 and not parent.st_mode & stat.S_ISVTX:
        return f"the socket folder's parent {folder.parent} lets other users rename what is in it (not sticky)"
    return ""


def _check_own_private_dir(folder: Path) -> None:
    """The relay's folder beside a shared socket holds the server's real socket: this user's alone, or refused."""
    st = os.lstat(folder)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) & 0o077:
        raise ConfigError(
            f"listen: {folder} (the relay's private folder) is not a 0700 folder of this user's; remove it"
        )


def _remove_stale(path: Path) -> None:
    """Remove a socket left at ``path`` by a sidecar that died; refuse anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"listen: {path} exists and is not a socket; not touching it")
    # The lock is ours, so no sidecar of this version serves here. Something else still might.
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(_PROBE_TIMEOUT_S)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        path.unlink()  # nothing listens: a sidecar that died left it
        return
    except TimeoutError:
        raise LockHeld(f"socket {path} is live (it accepts no connection now, but keeps them waiting)") from None
    except OSError as error:
        raise ConfigError(f"listen: cannot tell whether {path} is live: {error.strerror}; not touching it") from None
    else:
        pid = _UCRED.unpack(probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))[0]
        raise LockHeld(f"socket {path} is served by another process (pid {pid}) that does not hold its lock")
    finally:
        probe.close()


def _set_mode(path: Path, mode: int, gid: int) -> int:
    """chmod/chgrp the socket at ``path`` without following a symlink; its inode."""
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISSOCK(st.st_mode):
            raise ConfigError(f"listen: {path} is no longer the socket this sidecar made")
        # chmod/chown of /proc/self/fd/N act on the inode the descriptor names, not on a path.
        os.chmod(f"/proc/self/fd/{fd}", mode)
        if gid != -1:
            os.chown(f"/proc/self/fd/{fd}", -1, gid)
        return st.st_ino
    finally:
        os.close(fd)


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
    return Listener(f"{host}:{bound}", tcp_peers=TcpPeers(bound, host))


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
