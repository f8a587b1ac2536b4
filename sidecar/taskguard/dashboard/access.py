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
import re
from pathlib import Path

from taskguard import webaccess
from taskguard.webaccess import MIN_TOKEN_CHARS, TokenFileError

__all__ = ["DEFAULT_NAME", "MIN_TOKEN_CHARS", "NONCE", "PROOF_CONTEXT", "TokenFileError", "ViewerToken"]

DEFAULT_NAME = "dashboard.token"
# What a proof is an HMAC of, before the page's nonce: nothing else is ever signed with the token.
PROOF_CONTEXT = "taskguard-dashboard-proof:"
NONCE = re.compile(r"[0-9a-f]{32}")


def default_path() -> Path:
    """``~/.local/share/taskguard/dashboard.token``, beside the sidecar's default database."""
    return Path.home() / ".local" / "share" / "taskguard" / DEFAULT_NAME


def load_or_create(path: Path) -> str:
    """The viewer token in ``path``, by the rules of ``webaccess.load_or_create`` (created when missing)."""
    return webaccess.load_or_create(path, "viewer token")


class ViewerToken(webaccess.BearerToken):
    """The one credential that lets a request read the dashboard; never printed (``repr`` hides it)."""

    def proof(self, nonce: str) -> str:
        """That this server knows the token, for the page's fresh ``nonce`` (32 lowercase hex digits)."""
        if not NONCE.fullmatch(nonce):
            raise ValueError("nonce: must be 32 lowercase hex digits")
        return hmac.new(self.secret, (PROOF_CONTEXT + nonce).encode(), hashlib.sha256).hexdigest()
