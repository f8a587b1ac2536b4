"""Who may read an HTTP endpoint Task Guard serves (the dashboard, ``/metrics``): one set of rules, one copy.

* **Where it listens.** ``parse_listen``: ``HOST:PORT`` on a loopback address unless ``allow_remote``: both
  endpoints speak plain HTTP.
* **Which names it answers to.** ``loopback_host_only``: while it is not allowed beyond loopback, a request
  whose ``Host`` is not a loopback name is refused (421), so a page on another site that rebinds its DNS name
  to 127.0.0.1 cannot read it: the browser sends that site's name as ``Host``.
* **Who presents the token.** ``BearerToken`` checks ``Authorization: Bearer <token>`` in constant time; the
  token lives in a file only this user can open (``load_or_create``: owned by this user, nothing for group or
  others, in a folder others cannot write, never a symlink), created with 256 random bits when missing, so an
  endpoint started with no token set up is locked all the same. The token never goes in a URL or a log.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import secrets
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aiohttp import web
    from aiohttp.typedefs import Middleware

# 256 random bits, URL-safe so that it pastes as one word.
_TOKEN_BYTES = 32
MIN_TOKEN_CHARS = 16
_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})

Handler = Callable[["web.Request"], Awaitable["web.StreamResponse"]]


def is_loopback(host: str) -> bool:
    """A loopback name or address (``[::1]`` with or without its brackets)."""
    host = host.strip("[]").lower()
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def hostname(host: str) -> str:
    """The name in a Host header, without its port or an IPv6 address's brackets."""
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def parse_listen(listen: str, allow_remote: bool, *, setting: str, why: str, remedy: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8080`` for IPv6) -> (host, port); ValueError naming ``setting`` and the rule.

    A host that is not loopback needs ``allow_remote``: ``why`` says what would cross the network, ``remedy``
    how to allow it anyway.
    """
    host, sep, port_text = listen.rpartition(":")
    if not sep or not port_text.isdigit() or not host:
        raise ValueError(f"{setting}: must be HOST:PORT, not {listen!r}")
    host = host.removeprefix("[").removesuffix("]")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"{setting}: port must be 0..65535, not {port}")
    if not allow_remote and not is_loopback(host):
        raise ValueError(f"{setting}: {host} is not a loopback address; {why}, so {remedy}")
    return host, port


def loopback_host_only(allow_remote: bool, refusal: str) -> Middleware:
    """aiohttp middleware: 421 ``refusal`` for a request whose Host is not a loopback name (unless allow_remote)."""
    # Here, not at the top: config uses this module's address rules, and every CLI command imports config.
    from aiohttp import web

    @web.middleware
    async def guard_host(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not allow_remote and not is_loopback(hostname(request.host)):
            return web.Response(status=421, text=refusal + "\n")
        return await handler(request)

    return guard_host


class TokenFileError(Exception):
    """A token file is missing, unsafe or unusable; the message names the file and the rule."""


def load_or_create(path: Path, what: str) -> str:
    """The token in ``path``; a new random one written there (mode 0600) when the file does not exist.

    ``what`` names the token in messages ("viewer token"). Refuses (``TokenFileError``) a file that is not a
    regular file of this user's, or that group or others may read or write, or a folder that group or others
    may write (they could swap the file), or a symlink at the file itself. A missing folder is created 0700.
    """
    folder = path.parent
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        _check_folder(folder, what)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return _create(path)
        with os.fdopen(fd, "r", encoding="utf-8") as file:
            _check_file(path, os.fstat(file.fileno()), what)
            token = file.read().strip()
    except OSError as error:
        raise TokenFileError(f"{what} file {path}: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise TokenFileError(f"{what} file {path}: is not UTF-8 text") from None
    if len(token) < MIN_TOKEN_CHARS or not token.isprintable() or " " in token:
        raise TokenFileError(
            f"{what} file {path}: must hold one token of at least {MIN_TOKEN_CHARS} printable characters"
        )
    return token


def _check_folder(folder: Path, what: str) -> None:
    info = os.lstat(folder)
    if not stat.S_ISDIR(info.st_mode):
        raise TokenFileError(f"{what} folder {folder}: is not a folder (a symlink?)")
    if info.st_uid not in (os.geteuid(), 0):
        raise TokenFileError(f"{what} folder {folder}: belongs to uid {info.st_uid}, not to this user or root")
    if info.st_mode & 0o022:
        raise TokenFileError(
            f"{what} folder {folder}: group or others may write it (mode {stat.S_IMODE(info.st_mode):04o})"
        )


def _check_file(path: Path, info: os.stat_result, what: str) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise TokenFileError(f"{what} file {path}: is not a regular file")
    if info.st_uid != os.geteuid():
        raise TokenFileError(f"{what} file {path}: belongs to uid {info.st_uid}, not to this user")
    if info.st_mode & 0o077:
        raise TokenFileError(
            f"{what} file {path}: group or others may open it (mode {stat.S_IMODE(info.st_mode):04o}); chmod 600 it"
        )


def _create(path: Path) -> str:
    token = secrets.token_urlsafe(_TOKEN_BYTES)
    # O_EXCL: never through a symlink or over a file someone put there meanwhile.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as file:
        file.write(token + "\n")
    return token


class BearerToken:
    """The one credential a request presents to read an endpoint; never printed (``repr`` hides it)."""

    def __init__(self, token: str, path: Path) -> None:
        self._token = token.encode()
        self.path = path

    def __repr__(self) -> str:
        return f"{type(self).__name__}(path={str(self.path)!r})"

    @property
    def secret(self) -> bytes:
        return self._token

    def admits(self, authorization: str) -> bool:
        """Whether an ``Authorization`` header presents this token (constant-time)."""
        if authorization[:7].lower() != "bearer ":
            return False
        return hmac.compare_digest(authorization[7:].strip().encode(), self._token)
