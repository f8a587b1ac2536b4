"""Who may read the dashboard: whoever presents its viewer token.

The dashboard is a client of the sidecar with its own user's access (on the default socket, an operator's),
and it serves that access over TCP, where every local user can connect. So it must not hand out what it
reads: every route that carries data (``/events``, ``/api/*``) needs ``Authorization: Bearer <viewer token>``,
and the page asks for it. The token lives in a file only the dashboard's user can read, by the same rules as
the sidecar's socket (owned by that user, nothing for group or others); it is created with a fresh random
value when it does not exist, so that a plain ``taskguard dashboard`` is locked too. Acting (approve-retry,
force-release) needs the sidecar's operator token on top, which the sidecar judges.

The token never appears in a URL or a log: the page sends it in a header, and the server prints the file's
path, never its contents.

A loopback port belongs to whoever binds it: while the dashboard is down, another user may serve its port, and
an open page that reconnects would hand that server its token. So before a page sends the token anywhere it
asks the server to prove that it knows it: ``GET /proof?nonce=N`` (N: 128 random bits the page drew) answers
HMAC-SHA256(token, ``PROOF_CONTEXT`` + N), which the page checks with WebCrypto.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import stat
from pathlib import Path

# 256 random bits, URL-safe so that it pastes as one word.
_TOKEN_BYTES = 32
MIN_TOKEN_CHARS = 16
DEFAULT_NAME = "dashboard.token"
# What a proof is an HMAC of, before the page's nonce: nothing else is ever signed with the token.
PROOF_CONTEXT = "taskguard-dashboard-proof:"
NONCE = re.compile(r"[0-9a-f]{32}")


class TokenFileError(Exception):
    """The viewer token file is missing, unsafe or unusable; the message names the file and the rule."""


def default_path() -> Path:
    """``~/.local/share/taskguard/dashboard.token``, beside the sidecar's default database."""
    return Path.home() / ".local" / "share" / "taskguard" / DEFAULT_NAME


def load_or_create(path: Path) -> str:
    """The viewer token in ``path``; a new random one written there (mode 0600) when the file does not exist.

    Refuses (``TokenFileError``) a file that is not a regular file of this user's, or that group or others
    may read or write, or a folder that group or others may write (they could swap the file), or a symlink
    at the file itself. A missing folder is created 0700.
    """
    folder = path.parent
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        _check_folder(folder)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return _create(path)
        with os.fdopen(fd, "r", encoding="utf-8") as file:
            _check_file(path, os.fstat(file.fileno()))
            token = file.read().strip()
    except OSError as error:
        raise TokenFileError(f"viewer token file {path}: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise TokenFileError(f"viewer token file {path}: is not UTF-8 text") from None
    if len(token) < MIN_TOKEN_CHARS or not token.isprintable() or " " in token:
        raise TokenFileError(
            f"viewer token file {path}: must hold one token of at least {MIN_TOKEN_CHARS} printable characters"
        )
    return token


def _check_folder(folder: Path) -> None:
    info = os.lstat(folder)
    if not stat.S_ISDIR(info.st_mode):
        raise TokenFileError(f"viewer token folder {folder}: is not a folder (a symlink?)")
    if info.st_uid not in (os.geteuid(), 0):
        raise TokenFileError(f"viewer token folder {folder}: belongs to uid {info.st_uid}, not to this user or root")
    if info.st_mode & 0o022:
        raise TokenFileError(
            f"viewer token folder {folder}: group or others may write it (mode {stat.S_IMODE(info.st_mode):04o})"
        )


def _check_file(path: Path, info: os.stat_result) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise TokenFileError(f"viewer token file {path}: is not a regular file")
    if info.st_uid != os.geteuid():
        raise TokenFileError(f"viewer token file {path}: belongs to uid {info.st_uid}, not to this user")
    if info.st_mode & 0o077:
        raise TokenFileError(
            f"viewer token file {path}: group or others may open it (mode {stat.S_IMODE(info.st_mode):04o});"
            " chmod 600 it"
        )


def _create(path: Path) -> str:
    token = secrets.token_urlsafe(_TOKEN_BYTES)
    # O_EXCL: never through a symlink or over a file someone put there meanwhile.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as file:
        file.write(token + "\n")
    return token


class ViewerToken:
    """The one credential that lets a request read the dashboard; never printed (``repr`` hides it)."""

    def __init__(self, token: str, path: Path) -> None:
        self._token = token.encode()
        self.path = path

    def __repr__(self) -> str:
        return f"ViewerToken(path={str(self.path)!r})"

    def admits(self, authorization: str) -> bool:
        """Whether an ``Authorization`` header presents this token (constant-time)."""
        if authorization[:7].lower() != "bearer ":
            return False
        return hmac.compare_digest(authorization[7:].strip().encode(), self._token)

    def proof(self, nonce: str) -> str:
        """That this server knows the token, for the page's fresh ``nonce`` (32 lowercase hex digits)."""
        if not NONCE.fullmatch(nonce):
            raise ValueError("nonce: must be 32 lowercase hex digits")
        return hmac.new(self._token, (PROOF_CONTEXT + nonce).encode(), hashlib.sha256).hexdigest()
