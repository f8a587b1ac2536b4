"""The store backends a sidecar can run on, and which ``store`` setting names which.

Configuration checks a setting against this list, the server opens what it
names, and the doctor asks whether it keeps a file: one list, so a new backend
is one entry here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from taskguard.clock import Clock
from taskguard.store import Store
from taskguard.store.etcd import EtcdStore
from taskguard.store.etcd_client import EtcdSettings
from taskguard.store.memory import MemoryStore
from taskguard.store.retention import Retention
from taskguard.store.sqlite import SqliteStore


class StoreSettings(Protocol):
    """What the backends read of the sidecar's settings."""

    @property
    def store(self) -> str: ...

    @property
    def db(self) -> Path: ...

    @property
    def retention(self) -> Retention: ...

    @property
    def etcd(self) -> EtcdSettings: ...


@dataclass(frozen=True, slots=True)
class Backend:
    name: str
    accepts: Callable[[str], bool]
    open: Callable[[StoreSettings, Clock], Store]
    describe: Callable[[StoreSettings], str]
    # Its state is a file on this host (the doctor inspects it; the sidecar narrows its modes).
    keeps_a_file: bool = False
    # Several sidecars share it: leases must lapse here before the backend hands their guards to others.
    shared: bool = False
    # The bytes its files take on this host (the store size gauge), or None when it keeps none here.
    size_bytes: Callable[[StoreSettings], int | None] = lambda settings: None


def is_etcd_url(value: str) -> bool:
    scheme, _, hosts = value.partition("://")
    return (
        scheme in ("etcd", "etcds")
        and all(host.rpartition(":")[2].isdigit() for host in hosts.rstrip("/").split(",") if host)
        and bool(hosts.strip("/,"))
    )


BACKENDS = (
    Backend(
        "sqlite",
        accepts=lambda value: value == "sqlite",
        open=lambda settings, clock: SqliteStore(settings.db, clock, settings.retention),
        describe=lambda settings: f"sqlite {settings.db}",
        keeps_a_file=True,
        size_bytes=lambda settings: _file_bytes(settings.db, settings.db.with_name(settings.db.name + "-wal")),
    ),
    Backend(
        "memory",
        accepts=lambda value: value == "memory",
        open=lambda settings, clock: MemoryStore(clock, settings.retention),
        describe=lambda settings: "memory",
    ),
    Backend(
        "etcd",
        accepts=is_etcd_url,
        open=lambda settings, clock: EtcdStore(settings.etcd, clock),
        describe=lambda settings: settings.store,
        shared=True,
    ),
)
RULE = "must be sqlite, memory or etcd://host:port[,host:port...]"


def _file_bytes(*paths: Path) -> int | None:
    """What the files take (those that exist); None when none can be read."""
    sizes = []
    for path in paths:
        with contextlib.suppress(OSError):
            sizes.append(path.stat().st_size)
    return sum(sizes) if sizes else None


def backend_for(store: str) -> Backend | None:
    """The backend a ``store`` setting names, or None when it names none."""
    return next((backend for backend in BACKENDS if backend.accepts(store)), None)


def backend_of(settings: StoreSettings) -> Backend:
    """The backend of validated settings."""
    backend = backend_for(settings.store)
    if backend is None:
        raise ValueError(f"store: {RULE}")
    return backend
