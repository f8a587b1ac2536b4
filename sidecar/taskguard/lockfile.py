"""One sidecar per database and per socket: an exclusive lock on a file beside each.

``flock`` locks belong to an open file description, so the kernel drops them
when the process dies, however it dies (SIGKILL included): a lock that can be
taken means that nobody is using the resource any more, and whatever it left
behind (a stale socket) may be replaced. A second ``taskguard serve`` finds the
lock taken and stops before it touches anything, naming the process that holds
it: the kernel's own record (``/proc/locks``) first, else the pid the holder
wrote into the file.

The file stays when its lock is released: unlinking a lock file that another
process has just opened would let two processes each lock a file of their own.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from dataclasses import dataclass
from pathlib import Path


class LockHeld(Exception):
    """Another process holds the lock; the message names it and what it guards."""


@dataclass
class LockFile:
    path: Path
    _fd: int | None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None


def take(path: Path, what: str) -> LockFile:
    """Lock ``path`` (created 0600, never through a symlink) for this process, or raise ``LockHeld``.

    ``what`` names the resource in the error, such as ``"database /var/lib/taskguard/taskguard.db"``.
    OSError when the file cannot be opened at all (a read-only disk without one, a folder not ours).
    """
    flags = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK  # NONBLOCK: a FIFO planted here must not hang us
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | flags, 0o600)
    except OSError as error:
        if error.errno not in (errno.EROFS, errno.EACCES):
            raise
        # An existing lock file on a read-only disk still locks; the start fails later, saying why.
        fd = os.open(path, os.O_RDONLY | flags)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise LockHeld(f"{what}: its lock file {path} is not a regular file")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            raise LockHeld(
                f"{what} is in use by another taskguard serve ({holder}, lock {path}); "
                "one sidecar serves one database and one socket: stop that one, or give this one "
                "its own --db and --listen"
            ) from None
        with contextlib.suppress(OSError):  # opened read-only: the kernel's record still names us
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    return LockFile(path, fd)


def _holder(fd: int) -> str:
    pid = _pid_from_proc_locks(fd) or _pid_from_file(fd)
    return f"pid {pid}" if pid else "pid unknown"


def _pid_from_proc_locks(fd: int) -> int | None:
    """The pid the kernel records for the flock on this file (in this pid namespace's numbering)."""
    st = os.fstat(fd)
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    with contextlib.suppress(OSError):
        for line in Path("/proc/locks").read_text().splitlines():
            # "1: FLOCK  ADVISORY  WRITE 4242 fe:00:2146558 0 EOF"; waiters have "->" after the number.
            fields = line.split()
            if "->" in fields or len(fields) < 6 or fields[1] != "FLOCK" or fields[5] != inode:
                continue
            if fields[4].isdigit() and int(fields[4]) > 0:
                return int(fields[4])
    return None


def _pid_from_file(fd: int) -> int | None:
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return int(text) if text.isdigit() else None
