"""``taskguard dashboard``: the HTTP side. One page, one server-sent event stream, two operator actions.

Routes:

* ``GET /`` and ``GET /static/{app.js,app.css}``: the page, from the package (no build step, no CDN). It holds
  no data: it asks for the viewer token, then reads everything below with it.
* ``GET /events``: server-sent events. ``hello`` (every guard, the feed, the connection) on connect, then
  ``batch`` (the guards that changed and the new events, at most one message per ``BATCH_INTERVAL_S``) and
  ``status`` (the watch went up or down). A slow page costs bounded memory: its pending guards are coalesced
  by key and its pending events capped at the feed's size (``reset_feed`` says some were dropped).
* ``GET /api/history?task_key=K``: the last events of K the dashboard knows (from the sidecar's log, see ``state.py``).
* ``GET /proof?nonce=N``: ``{"proof": ...}``, that this server knows the viewer token (``access.py``); the page
  asks before it sends the token anywhere, so that a server squatting the port while the dashboard is down
  gets nothing from an open page.
* ``POST /api/approve-retry`` and ``POST /api/force-release``: JSON ``{"task_key", "reason", "operator"}``.
  The operator token comes in the ``X-TaskGuard-Operator-Token`` header and goes on to the sidecar with
  ``x-taskguard-token-only: 1``; the sidecar decides. The answer is ``{"ok": true, "guard": ...}`` or
  ``{"ok": false, "code": "PERMISSION_DENIED", "error": "operator token not accepted"}``: errors say what they
  mean to a person at the page (the sidecar's own words, about operator uids and metadata, go to the log).
* ``POST /api/check-operator-token``: JSON ``{}``, the token in the same header: whether the sidecar takes it
  as an operator's (``follow.operator_token_accepted``, a call that changes nothing), asked when the token is
  entered rather than when an action is refused. ``{"ok": true}``, or ``{"ok": false, "code":
  "PERMISSION_DENIED", "error": "token not accepted"}``, or why it could not be checked.

Reading: ``/events`` and every ``/api/`` route need ``Authorization: Bearer <viewer token>`` (``access.py``),
else 401 and nothing else: the dashboard reads the sidecar with its own user's access, and any local user can
reach its port, so without this it would widen who may see the guards. Actions need both tokens.

Defences: actions need the ``X-TaskGuard-Dashboard: 1`` header and a JSON body, which a cross-site form cannot
send and a cross-site script cannot send without a CORS preflight that is never granted; an ``Origin`` or
``Sec-Fetch-Site`` that names another site is refused too. On loopback, requests whose ``Host`` is not a
loopback name are refused, so a DNS-rebound name cannot read the page. The access log has no headers, so the
tokens are never logged, and no URL carries them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from collections import deque
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web

from taskguard import webaccess
from taskguard.dashboard import access
from taskguard.dashboard.access import ViewerToken
from taskguard.dashboard.follow import Follower, operator_client, operator_token_accepted
from taskguard.dashboard.state import Change, Connection, DashboardState, guard_document
from taskguard_client import Guard, GuardState, StatusError, TaskGuardError

BATCH_INTERVAL_S = 0.1
KEEPALIVE_S = 15.0
ACTION_HEADER = "X-TaskGuard-Dashboard"
OPERATOR_TOKEN_HEADER = "X-TaskGuard-Operator-Token"
# Routes that carry data: each needs the viewer token.
_PROTECTED_PREFIXES = ("/events", "/api/")
# No headers in it: the page's tokens travel in them and must never reach a log.
ACCESS_LOG_FORMAT = '%a "%r" %s %b %Tfs'
MAX_BODY_BYTES = 16 * 1024
MAX_REASON_CHARS = 1000
TOKEN_NOT_ACCEPTED = "token not accepted"

_HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 403,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
_CONTENT_TYPES = {"js": "text/javascript", "css": "text/css", "html": "text/html"}
_PAGE_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

log = logging.getLogger("taskguard.dashboard")


def _sse(event: str, data: str) -> bytes:
    return f"event: {event}\ndata: {data}\n\n".encode()


class _Subscriber:
    """One open page's pending changes, coalesced until its stream writes them."""

    def __init__(self, feed_cap: int) -> None:
        self.guards: dict[str, str] = {}
        self.events: deque[str] = deque(maxlen=feed_cap)
        self.dropped = False
        self.revision = 0
        self.status: str | None = None
        self.wake = asyncio.Event()
        self.closed = False

    def add(self, change: Change) -> None:
        self.guards[change.task_key] = change.guard_json
        if change.event_json is not None:
            self.dropped = self.dropped or len(self.events) == self.events.maxlen
            self.events.append(change.event_json)
        self.revision = max(self.revision, change.revision)
        self.wake.set()

    def take(self) -> bytes:
        self.wake.clear()
        message = b""
        if self.guards or self.events:
            batch = (
                f'{{"revision":{self.revision},"reset_feed":{json.dumps(self.dropped)},'
                f'"guards":[{",".join(self.guards.values())}],"events":[{",".join(self.events)}]}}'
            )
            message += _sse("batch", batch)
            self.guards, self.dropped = {}, False
            self.events.clear()
        if self.status is not None:
            message += _sse("status", self.status)
            self.status = None
        return message


class Hub:
    """Fans the follower's changes out to every open page."""

    def __init__(self, feed_cap: int) -> None:
        self._feed_cap = feed_cap
        self._subscribers: set[_Subscriber] = set()

    def __len__(self) -> int:
        return len(self._subscribers)

    def subscribe(self) -> _Subscriber:
        subscriber = _Subscriber(self._feed_cap)
        self._subscribers.add(subscriber)
        return subscriber

    def unsubscribe(self, subscriber: _Subscriber) -> None:
        self._subscribers.discard(subscriber)

    def publish(self, change: Change) -> None:
        for subscriber in self._subscribers:
            subscriber.add(change)

    def publish_connection(self, connection: Connection) -> None:
        for subscriber in self._subscribers:
            subscriber.status = connection.json()
            subscriber.wake.set()

    def close(self) -> None:
        for subscriber in self._subscribers:
            subscriber.closed = True
            subscriber.wake.set()


class Dashboard:
    """The aiohttp application's handlers, around one ``DashboardState`` fed by one ``Follower``."""

    def __init__(
        self,
        address: str,
        client_options: dict[str, Any],
        *,
        viewer: ViewerToken,
        stale_after_s: float,
        allow_remote: bool,
    ) -> None:
        self.address = address
        self.viewer = viewer
        self.client_options = client_options
        self.stale_after_s = stale_after_s
        self.allow_remote = allow_remote
        self.state = DashboardState(datetime.now(UTC))
        self.hub = Hub(self.state.feed_cap)
        self.follower = Follower(address, client_options, self.state, self.hub.publish, self.hub.publish_connection)
        folder = resources.files("taskguard.dashboard").joinpath("static")
        self._static = {name: folder.joinpath(name).read_bytes() for name in ("index.html", "app.js", "app.css")}

    def application(self) -> web.Application:
        # A page on another site that rebinds its name to 127.0.0.1 arrives with its own name as Host.
        guard_host = webaccess.loopback_host_only(self.allow_remote, "this dashboard answers to loopback names only")
        app = web.Application(middlewares=[guard_host, self._require_viewer], client_max_size=MAX_BODY_BYTES)
        app.on_response_prepare.append(_common_headers)
        app.router.add_get("/", self.index)
        app.router.add_get("/static/{name}", self.static)
        app.router.add_get("/events", self.events)
        app.router.add_get("/api/history", self.history)
        app.router.add_get("/proof", self.proof)
        app.router.add_post("/api/approve-retry", self.approve_retry)
        app.router.add_post("/api/force-release", self.force_release)
        app.router.add_post("/api/check-operator-token", self.check_operator_token)
        return app

    # --- defences ---------------------------------------------------------------------------

    @web.middleware
    async def _require_viewer(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if not request.path.startswith(_PROTECTED_PREFIXES):
            return await handler(request)
        # Cross-site first: a forged action learns that it is cross-site, nothing about the token.
        if request.method == "POST" and (refusal := self._cross_site(request)) is not None:
            return _refused(403, "CROSS_SITE", refusal)
        if not self.viewer.admits(request.headers.get("Authorization", "")):
            response = _refused(
                401, "UNAUTHENTICATED", "this dashboard needs its viewer token (Authorization: Bearer ...)"
            )
            response.headers["WWW-Authenticate"] = 'Bearer realm="taskguard-dashboard"'
            return response
        return await handler(request)

    @staticmethod
    def _cross_site(request: web.Request) -> str | None:
        """Why an action request may come from another site, or None."""
        if request.headers.get(ACTION_HEADER) != "1":
            return f"actions need the {ACTION_HEADER}: 1 header (cross-site requests are refused)"
        origin = request.headers.get("Origin")
        if origin is not None and origin != f"{request.scheme}://{request.host}":
            return f"origin {origin} is not this dashboard"
        site = request.headers.get("Sec-Fetch-Site")
        if site is not None and site not in ("same-origin", "none"):
            return f"a {site} request is refused"
        if request.content_type != "application/json":
            return "actions take a JSON body (Content-Type: application/json)"
        return None

    # --- the page ---------------------------------------------------------------------------

    async def index(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self._static["index.html"],
            content_type="text/html",
            charset="utf-8",
            headers={"Content-Security-Policy": _PAGE_POLICY, "X-Frame-Options": "DENY"},
        )

    async def static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in self._static or name == "index.html":
            raise web.HTTPNotFound()
        return web.Response(
            body=self._static[name], content_type=_CONTENT_TYPES[name.rsplit(".", 1)[1]], charset="utf-8"
        )

    async def events(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"})
        await response.prepare(request)
        # Subscribe and take the hello in one step (no await between): nothing is missed or sent twice.
        subscriber = self.hub.subscribe()
        hello = self.state.hello_json(self.stale_after_s)
        try:
            await response.write(b"retry: 1000\n" + _sse("hello", hello))
            while not subscriber.closed:
                try:
                    await asyncio.wait_for(subscriber.wake.wait(), KEEPALIVE_S)
                except TimeoutError:
                    await response.write(b": keepalive\n\n")
                    continue
                if subscriber.closed:
                    break
                await asyncio.sleep(BATCH_INTERVAL_S)  # let a burst gather into one message
                await response.write(subscriber.take())
        except ConnectionResetError:
            pass  # the page went away
        finally:
            self.hub.unsubscribe(subscriber)
        return response

    async def history(self, request: web.Request) -> web.Response:
        task_key = request.query.get("task_key", "")
        guard = self.state.guard_json(task_key) or "null"
        body = f'{{"task_key":{json.dumps(task_key)},"guard":{guard},"events":{self.state.history_json(task_key)}}}'
        return web.Response(text=body, content_type="application/json")

    async def proof(self, request: web.Request) -> web.Response:
        try:
            proof = self.viewer.proof(request.query.get("nonce", ""))
        except ValueError as error:
            return _refused(400, "INVALID_ARGUMENT", str(error))
        return web.json_response({"proof": proof})

    # --- actions ----------------------------------------------------------------------------

    async def approve_retry(self, request: web.Request) -> web.Response:
        return await self._act(request, "approve-retry")

    async def force_release(self, request: web.Request) -> web.Response:
        return await self._act(request, "force-release")

    async def _act(self, request: web.Request, action: str) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return _refused(400, "INVALID_ARGUMENT", "the body is not JSON")
        if not isinstance(body, dict):
            return _refused(400, "INVALID_ARGUMENT", "the body must be a JSON object")
        task_key, reason, operator = body.get("task_key"), body.get("reason"), body.get("operator") or "dashboard"
        if not isinstance(task_key, str) or not task_key or not task_key.isprintable():
            return _refused(400, "INVALID_ARGUMENT", "task_key: required, printable")
        if not isinstance(reason, str) or not reason.strip():
            return _refused(400, "INVALID_ARGUMENT", "reason: required")
        if len(reason) > MAX_REASON_CHARS or not isinstance(operator, str) or len(operator) > 200:
            return _refused(400, "INVALID_ARGUMENT", "reason or operator: too long")
        if not (reason.isprintable() and operator.isprintable()):
            # The sidecar refuses them too; checked here as well because they reach this process's log.
            return _refused(400, "INVALID_ARGUMENT", "reason or operator: must not contain control characters")
        token = request.headers.get(OPERATOR_TOKEN_HEADER, "").strip()
        async with operator_client(self.address, self.client_options, token) as client:
            try:
                if action == "approve-retry":
                    guard = await client.approve_retry(task_key, operator, reason.strip())
                else:
                    guard = await client.force_release(task_key, operator, reason.strip())
            except StatusError as error:
                log.info("%s %s refused: %s: %s", action, task_key, error.code.name, _one_line(str(error)))
                return _refused(_HTTP_STATUS.get(error.code, 502), error.code.name, _explain(error))
            except TaskGuardError as error:
                return _refused(502, "ERROR", str(error))
        log.info("%s %s by %s: %s", action, task_key, operator, guard.state.value)
        return web.json_response({"ok": True, "action": action, "guard": _document(guard)})

    async def check_operator_token(self, request: web.Request) -> web.Response:
        token = request.headers.get(OPERATOR_TOKEN_HEADER, "").strip()
        if not token:
            return _refused(400, "INVALID_ARGUMENT", f"no operator token ({OPERATOR_TOKEN_HEADER})")
        try:
            accepted = await operator_token_accepted(self.address, self.client_options, token)
        except StatusError as error:
            return _refused(_HTTP_STATUS.get(error.code, 502), error.code.name, _explain(error))
        except TaskGuardError as error:
            return _refused(502, "ERROR", str(error))
        if not accepted:
            log.info("an operator token was checked and not accepted")
            return _refused(403, "PERMISSION_DENIED", TOKEN_NOT_ACCEPTED)
        return web.json_response({"ok": True})


async def _common_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    response.headers.setdefault("Cache-Control", "no-store")


def _document(guard: Guard) -> dict[str, Any]:
    return guard_document(guard, guard.state is GuardState.FAILED)


def _explain(error: StatusError) -> str:
    """A refusal as the person at the page can act on it."""
    if error.code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
        return f"operator {TOKEN_NOT_ACCEPTED}"
    if error.code is grpc.StatusCode.UNAVAILABLE:
        return "the sidecar is unreachable; nothing was done"
    if error.code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return "the sidecar did not answer in time; look at the guard before you try again"
    return str(error)  # the sidecar's "field: rule" (a guard in the wrong state, no such key)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _refused(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"ok": False, "code": code, "error": " ".join(message.split())}, status=status)


def parse_listen(listen: str, allow_remote: bool) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8080`` for IPv6) -> (host, port); a non-loopback host needs ``allow_remote``."""
    return webaccess.parse_listen(
        listen,
        allow_remote,
        setting="--listen",
        why="the page shows every guard and forwards operator tokens over plain HTTP",
        remedy="pass --allow-remote to serve it beyond this host anyway",
    )


def _logging() -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
    for name in ("aiohttp.access", "taskguard.dashboard"):
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return handler


async def serve(args: argparse.Namespace, address: str, client_options: dict[str, Any], viewer: ViewerToken) -> int:
    host, port = parse_listen(args.listen, args.allow_remote)
    dashboard = Dashboard(
        address, client_options, viewer=viewer, stale_after_s=args.stale_after, allow_remote=args.allow_remote
    )
    handler = _logging()
    runner = web.AppRunner(
        dashboard.application(),
        access_log=logging.getLogger("aiohttp.access"),
        access_log_format=ACCESS_LOG_FORMAT,
        shutdown_timeout=2.0,
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    following = asyncio.ensure_future(dashboard.follower.run())
    stop = asyncio.Event()
    # The follower ends only by a bug: then stop, rather than serve a page that looks live and is not.
    following.add_done_callback(lambda _: stop.set())
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await site.start()
        bound = _bound(runner)
        if args.allow_remote and not webaccess.is_loopback(host):
            print(
                "taskguard dashboard: warning: serving beyond loopback; the viewer and operator tokens cross the"
                " network in plain HTTP, where anyone on the path can read them and then every guard",
                file=sys.stderr,
                flush=True,
            )
        print(
            f"taskguard dashboard: serving http://{bound}/ for the sidecar at {address};"
            f" the page asks for the viewer token in {viewer.path}",
            flush=True,
        )
        await stop.wait()
        if following.done() and not following.cancelled() and following.exception() is not None:
            error = following.exception()
            print(f"taskguard dashboard: following the sidecar failed: {error!r}", file=sys.stderr, flush=True)
            return 1
    finally:
        dashboard.hub.close()
        following.cancel()
        await asyncio.gather(following, return_exceptions=True)
        await dashboard.follower.close()
        await runner.cleanup()
        logging.getLogger("aiohttp.access").removeHandler(handler)
        logging.getLogger("taskguard.dashboard").removeHandler(handler)
    return 0


def _bound(runner: web.AppRunner) -> str:
    for address in runner.addresses:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    raise RuntimeError("the dashboard is not listening")


def main(args: argparse.Namespace, address: str, client_options: dict[str, Any]) -> int:
    """Run until SIGINT or SIGTERM; 2 for a bad --listen or viewer token file, 1 when it cannot listen."""
    try:
        parse_listen(args.listen, args.allow_remote)
    except ValueError as error:
        print(f"taskguard: dashboard: {error}", file=sys.stderr)
        return 2
    path = Path(args.viewer_token_file) if args.viewer_token_file else access.default_path()
    try:
        viewer = ViewerToken(access.load_or_create(path), path)
    except access.TokenFileError as error:
        print(f"taskguard: dashboard: {error}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(serve(args, address, client_options, viewer))
    except OSError as error:
        print(f"taskguard: dashboard: cannot listen on {args.listen}: {error}", file=sys.stderr)
        return 1
