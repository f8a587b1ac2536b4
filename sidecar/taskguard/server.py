"""The composition root: store, engine, leases, events and the gRPC server, started and stopped."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from taskguard import config, metrics
from taskguard.clock import Clock, SystemClock
from taskguard.config import Settings
from taskguard.front import api, listener
from taskguard.front.api import TaskGuardService
from taskguard.front.auth import Authorizer
from taskguard.front.listener import Listener
from taskguard.runtime.engine import Engine
from taskguard.runtime.events import EventHub
from taskguard.runtime.leases import LeaseKeeper
from taskguard.store import SharedStore, Store, backends
from taskguard.telemetry import Telemetry

log = logging.getLogger("taskguard")

SERVICE_NAME = api.SERVICE_NAME


def _server_options(settings: Settings) -> list[tuple[str, int]]:
    return [
        # Find holders whose host or network died without closing the connection.
        ("grpc.keepalive_time_ms", 10_000),
        ("grpc.keepalive_timeout_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_concurrent_streams", settings.max_streams_per_connection),
    ]


def open_store(settings: Settings, clock: Clock) -> Store:
    return backends.backend_of(settings).open(settings, clock)


@dataclass
class Sidecar:
    address: str
    server: aio.Server
    store: Store
    engine: Engine
    hub: EventHub
    keeper: LeaseKeeper
    service: TaskGuardService
    health: health.aio.HealthServicer
    listener: Listener
    # What it runs with (for tests and tools that drive it in-process).
    clock: Clock
    settings: Settings
    probes: tuple[aio.Server, str] | None = None
    metrics: metrics.MetricsServer | None = None
    _stopped: bool = False

    async def stop(self, grace_s: float) -> None:
        """Stop accepting, end streams so clients resume elsewhere, finish calls, flush, close."""
        if self._stopped:
            return
        self._stopped = True
        await self.health.enter_graceful_shutdown()
        await self.keeper.stop()
        self.service.drain()
        await self.server.stop(grace_s)
        if self.probes is not None:
            await self.probes[0].stop(None)
        await self.listener.stop()
        if self.metrics is not None:
            await self.metrics.stop()
        await self.store.close()
        await self.service.telemetry.stop()


async def start(settings: Settings, clock: Clock | None = None) -> Sidecar:
    """Open the store, recover leases, and serve on ``settings.listen``.

    A failure half-way closes what was opened (an open aiosqlite connection
    would keep the process alive), then raises.
    """
    clock = clock or SystemClock()
    for warning in (*_secrets_on_command_line(settings), *config.risk_warnings(settings)):
        log.warning("%s", warning)
    store = open_store(settings, clock)
    await store.open()
    async with contextlib.AsyncExitStack() as undo:
        undo.push_async_callback(store.close)
        engine = Engine(store, clock, settings.policy)
        hub = EventHub(
            engine,
            buffer_size=settings.watch_buffer,
            max_watchers=settings.max_watchers,
            max_watchers_per_connection=settings.max_watchers_per_connection,
        )
        keeper = LeaseKeeper(engine, hub, settings.max_guards_per_holder)
        await keeper.start()
        if isinstance(store, SharedStore):
            store.set_owner_loss_handler(keeper.owner_lost)
            store.set_lease_loss_handler(keeper.lease_lost)
            store.set_deadline_handler(keeper.arm)
            store.set_waiters_gone_handler(keeper.waiters_gone)
        undo.push_async_callback(keeper.stop)
        telemetry = Telemetry(settings.telemetry)
        backend = backends.backend_of(settings)
        telemetry.attach(engine, lambda: backend.size_bytes(settings))
        undo.push_async_callback(telemetry.stop)

        server = aio.server(options=_server_options(settings))
        undo.push_async_callback(server.stop, None)
        bound = listener.bind(server, settings)
        undo.push_async_callback(bound.stop)
        authorizer = Authorizer(settings.auth, bound.front, bound.tcp_peers)
        service = TaskGuardService(
            engine,
            hub,
            keeper,
            telemetry,
            authorizer,
            hold_first_message_timeout_s=settings.hold_first_message_timeout_s,
        )
        api.register(service, server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            server,
        )
        with listener.private_umask():
            await server.start()
        await bound.start()
        probes = await _health_only_server(settings, health_servicer)
        if probes is not None:
            undo.push_async_callback(probes[0].stop, None)
        scraped = await _metrics_server(settings, telemetry)
        if scraped is not None:
            undo.push_async_callback(scraped.stop)
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        undo.pop_all()
    return Sidecar(
        bound.address,
        server,
        store,
        engine,
        hub,
        keeper,
        service,
        health_servicer,
        bound,
        clock,
        settings,
        probes,
        scraped,
    )


async def _metrics_server(settings: Settings, telemetry: Telemetry) -> metrics.MetricsServer | None:
    """``/metrics`` on ``metrics_listen``, for Prometheus."""
    if not settings.metrics_listen:
        return None
    host, port = config.metrics_address(settings)
    return await metrics.serve(telemetry, host, port, settings.metrics_token_path, allow_remote=settings.allow_remote)


def _secrets_on_command_line(settings: Settings) -> list[str]:
    """Warnings for tokens that anyone can read in this process's /proc/<pid>/cmdline."""
    try:
        command_line = Path("/proc/self/cmdline").read_bytes()
    except OSError:
        return []
    auth = settings.auth
    tokens = {"operator_token": auth.operator_token, "holder_token": auth.holder_token}
    return [
        config.secret_flag_warning(name) for name, token in tokens.items() if token and token.encode() in command_line
    ]


async def _health_only_server(settings: Settings, servicer: health.aio.HealthServicer) -> tuple[aio.Server, str] | None:
    """Serve the health service alone on ``health_listen``: probes learn liveness, nothing else."""
    if not settings.health_listen:
        return None
    probes = aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, probes)
    port = probes.add_insecure_port(settings.health_listen)
    if port == 0:
        raise OSError(f"health_listen: cannot listen on {settings.health_listen}")
    await probes.start()
    return probes, f"{settings.health_listen.rpartition(':')[0]}:{port}"


async def run(settings: Settings) -> int:
    """``taskguard serve``: run until SIGTERM or SIGINT, then stop gracefully."""
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    sidecar = await start(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    store_name = backends.backend_of(settings).describe(settings)
    # Metrics before health: tools read "health only on" to the end of the line.
    metrics_note = f"; metrics on {sidecar.metrics.url}" if sidecar.metrics else ""
    health_note = f"; health only on {sidecar.probes[1]}" if sidecar.probes else ""
    print(f"taskguard listening on {sidecar.address} (store: {store_name}{metrics_note}{health_note})", flush=True)
    await stop.wait()
    log.info("shutting down")
    await sidecar.stop(settings.shutdown_grace_s)
    return 0
