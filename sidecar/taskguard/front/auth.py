"""Who is calling, and may they call this method.

Two roles. Holders may acquire, hold, renew, release, read and watch; only a
lease_id (an unguessable capability) lets a caller renew or release a lease.
Operators may also approve retries and force-release guards. A caller is an
operator when it presents the operator token (``authorization: Bearer ...``,
compared in constant time) or, on the unix socket, when its uid is in the
operator uid list. When a holder token is configured, every call needs it (or
the operator token). A caller that acts for others (the dashboard) sends
``x-taskguard-token-only: 1`` so that its own uid grants it nothing.

The caller's *principal* is recorded with each acquisition; only the caller
that made a run gets its lease back by asking again with its run_id:

* ``uid:1000``: on the unix socket (SO_PEERCRED, see peercred.py) and over
  loopback TCP (the kernel's socket table, ``TcpPeers``). Over TCP the uid
  names the caller but grants no role: operators there present the token.
* ``cert:<common name>``: over mTLS from another host.
* ``token:operator``, ``token:holder``, ``anonymous``: shared by everyone who
  has the token (or none), so such a principal is ``shared`` and a retry must
  also present the run's ``retry_secret`` (see wire.py); without it no caller
  of a shared principal ever gets a lease back.

Secrets never leave this module: they are not logged, not put on spans and
not echoed in errors.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

OPERATOR_METHODS = frozenset({"ApproveRetry", "ForceRelease"})
# Metadata by which a caller asks to be judged by its token alone, never by its uid.
TOKEN_ONLY_HEADER = "x-taskguard-token-only"


class PermissionDenied(Exception):
    pass


class PeerDirectory(Protocol):
    def uid_for(self, peer: str) -> int | None: ...


@dataclass(slots=True)
class Caller:
    operator: bool
    holder: bool
    # Who it is, worked out when first asked: only acquisitions need it, and over TCP it costs a kernel lookup.
    _identify: Callable[[], tuple[str, bool]]
    _identity: tuple[str, bool] | None = None

    @property
    def principal(self) -> str:
        return self._identified()[0]

    @property
    def shared(self) -> bool:
        """The principal names many callers (a token, or nobody in particular)."""
        return self._identified()[1]

    def _identified(self) -> tuple[str, bool]:
        if self._identity is None:
            self._identity = self._identify()
        return self._identity


@dataclass(frozen=True, slots=True)
class AuthSettings:
    operator_token: str = ""
    holder_token: str = ""
    operator_uids: frozenset[int] = frozenset()

    def __repr__(self) -> str:  # never print the tokens
        hidden = {name: "***" if getattr(self, name) else "" for name in ("operator_token", "holder_token")}
        return f"AuthSettings({hidden}, operator_uids={sorted(self.operator_uids)})"


class Authorizer:
    def __init__(
        self, settings: AuthSettings, peers: PeerDirectory | None = None, tcp_peers: PeerDirectory | None = None
    ) -> None:
        self._settings = settings
        self._peers = peers
        self._tcp_peers = tcp_peers
        # On a socket only its owner can open (0600), every unix caller is the owner or root.
        self._owner_uid = os.geteuid()

    def identify(
        self, peer: str, metadata: Iterable[tuple[str, str | bytes]] | None, common_names: list[str]
    ) -> Caller:
        token = _bearer(metadata)
        settings = self._settings
        operator = bool(settings.operator_token) and token is not None and _same(token, settings.operator_token)
        holder = bool(settings.holder_token) and token is not None and _same(token, settings.holder_token)
        uid = self._uid(peer)
        if uid is not None and uid in settings.operator_uids and not _token_only(metadata):
            operator = True

        def identify() -> tuple[str, bool]:
            known = uid if uid is not None or self._tcp_peers is None else self._tcp_peers.uid_for(peer)
            if known is not None:
                return f"uid:{known}", False
            if common_names:
                return f"cert:{common_names[0]}", False
            if operator:
                return "token:operator", True
            return ("token:holder" if holder else "anonymous"), True

        return Caller(operator=operator, holder=operator or holder or not settings.holder_token, _identify=identify)

    def _uid(self, peer: str) -> int | None:
        if not peer.startswith("unix:"):
            return None
        if self._peers is not None:
            return self._peers.uid_for(peer)
        return self._owner_uid

    def check(self, method: str, caller: Caller) -> None:
        if not caller.holder:
            raise PermissionDenied(f"{method} needs the holder token (authorization: Bearer ...)")
        if method in OPERATOR_METHODS and not caller.operator:
            raise PermissionDenied(
                f"{method} is for operators: present the operator token or call from an operator uid"
            )


def _token_only(metadata: Iterable[tuple[str, Any]] | None) -> bool:
    """A proxy for other people (the dashboard) waives the operator role its own uid would give it."""
    return any(key == TOKEN_ONLY_HEADER and value == "1" for key, value in metadata or ())


def _bearer(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value[:7].lower() == "bearer ":
            return value[7:].strip()
    return None


def _same(presented: str, expected: str) -> bool:
    return hmac.compare_digest(presented.encode(), expected.encode())
