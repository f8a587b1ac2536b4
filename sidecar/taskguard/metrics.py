"""``metrics_listen``: ``GET /metrics`` in the Prometheus text format, for Prometheus to scrape.

The exposition is prometheus_client's, of the registry the OTel Prometheus reader fills (``telemetry.py``): the
same instruments OTLP exports, under Prometheus names (``taskguard.acquire.duration`` in seconds becomes
``taskguard_acquire_duration_seconds``, counters end in ``_total``). Before each scrape the gauges are counted
afresh, so a scrape sees the guards as they are, not as they were at the last refresh.

Access, by the dashboard's rules (``webaccess``): a loopback address unless ``allow_remote``; while on loopback,
only requests whose ``Host`` is a loopback name (no DNS rebinding); and ``Authorization: Bearer <token>`` with
the token in ``metrics_token_file``, created (0600, random) when missing. Prometheus presents it with
``authorization: {credentials_file: ...}`` in its scrape config. There is no access log: Prometheus scrapes
every few seconds, and a line each time would drown the sidecar's own.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from taskguard import webaccess
from taskguard.telemetry import Telemetry
from taskguard.webaccess import BearerToken

PATH = "/metrics"
REALM = "taskguard-metrics"
TOKEN_NAME = "metrics token"

log = logging.getLogger("taskguard.metrics")


class MetricsEndpoint:
    """The aiohttp application: ``/metrics`` and nothing else."""

    def __init__(self, telemetry: Telemetry, token: BearerToken, allow_remote: bool) -> None:
        assert telemetry.prometheus_registry is not None, "telemetry without the Prometheus reader"
        self._telemetry = telemetry
        self._registry = telemetry.prometheus_registry
        self._token = token
        self._allow_remote = allow_remote

    def application(self) -> web.Application:
        guard_host = webaccess.loopback_host_only(self._allow_remote, "/metrics answers to loopback names only")
        app = web.Application(middlewares=[guard_host])
        app.router.add_get(PATH, self.metrics)
        return app

    async def metrics(self, request: web.Request) -> web.Response:
        if not self._token.admits(request.headers.get("Authorization", "")):
            return web.Response(
                status=401,
                text=f"/metrics needs its token (Authorization: Bearer ..., the {TOKEN_NAME} file)\n",
                headers={"WWW-Authenticate": f'Bearer realm="{REALM}"'},
            )
        await self._telemetry.refresh()
        # On the loop: the gauges' callbacks only read numbers, and a collection of a few dozen series is quick.
        body = generate_latest(self._registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST, "Cache-Control": "no-store"})


@dataclass
class MetricsServer:
    runner: web.AppRunner
    address: str

    @property
    def url(self) -> str:
        return f"http://{self.address}{PATH}"

    async def stop(self) -> None:
        await self.runner.cleanup()


async def serve(telemetry: Telemetry, host: str, port: int, token_path: Path, *, allow_remote: bool) -> MetricsServer:
    """Listen on ``host:port``; ``webaccess.TokenFileError`` for an unsafe token file, OSError when it cannot bind."""
    token = BearerToken(webaccess.load_or_create(token_path, TOKEN_NAME), token_path)
    runner = web.AppRunner(MetricsEndpoint(telemetry, token, allow_remote).application(), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    if not webaccess.is_loopback(host):
        log.warning(
            "serving %s beyond loopback in plain HTTP: its token crosses the network, where anyone on the path can "
            "read it and then the metrics",
            PATH,
        )
    bound = runner.addresses[0]
    address = f"[{bound[0]}]:{bound[1]}" if ":" in bound[0] else f"{bound[0]}:{bound[1]}"
    return MetricsServer(runner, address)
