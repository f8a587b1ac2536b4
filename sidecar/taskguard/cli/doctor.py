"""``taskguard doctor``: check the configuration, the database and the listener, and say what was found.

It never changes anything: the database is opened read-only (it is not
migrated), and the listener is only looked at or connected to.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sqlite3
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from taskguard import webaccess
from taskguard.config import Settings, describe_rule, runtime_dir
from taskguard.front.listener import private_dir_problem
from taskguard.store import backends
from taskguard.store.sqlite import DATABASE_SUFFIXES, SCHEMA_VERSION


@dataclass(frozen=True, slots=True)
class Finding:
    ok: bool
    topic: str
    text: str

    def __str__(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'} {self.topic}: {self.text}"


def examine(settings: Settings) -> list[Finding]:
    return [
        *_configuration(settings),
        *_rules(settings),
        *_database(settings),
        *_listener(settings),
        *_file_modes(settings),
        *_metrics(settings),
    ]


def _configuration(settings: Settings) -> Iterator[Finding]:
    auth = settings.auth
    who = []
    if auth.operator_token:
        who.append("operator token")
    if auth.operator_uids:
        who.append(f"operator uids {sorted(auth.operator_uids)}")
    yield Finding(
        True,
        "config",
        f"valid; listen {settings.listen}, store {settings.store}, default ttl {settings.default_ttl_s:g}s, "
        f"resume grace {settings.resume_grace_s:g}s; operators by {', '.join(who) or 'nothing (no operator)'}"
        + ("; holder token required" if auth.holder_token else ""),
    )


def _rules(settings: Settings) -> Iterator[Finding]:
    """Each key rule in the order it is matched (first match wins), then the default rule."""
    for rule in (*settings.rules, settings.default_rule):
        yield Finding(True, f"rule {rule.name}", f"{rule.match!r}: {describe_rule(rule)}")


def _database(settings: Settings) -> Iterator[Finding]:
    if not backends.backend_of(settings).keeps_a_file:
        yield Finding(True, "database", f"store {settings.store}: nothing on disk")
        return
    path = settings.db
    if not path.exists():
        writable = _writable_dir(path.parent)
        yield Finding(
            writable,
            "database",
            f"{path} does not exist yet; it will be created"
            + ("" if writable else " (but its folder is not writable)"),
        )
        return
    try:
        db = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as error:
        yield Finding(False, "database", f"{path}: cannot open: {error}")
        return
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        verdict = [row[0] for row in db.execute("PRAGMA integrity_check")]
        if verdict != ["ok"]:
            yield Finding(False, "database", f"{path}: integrity check failed: {'; '.join(verdict[:5])}")
            return
        if version > SCHEMA_VERSION:
            yield Finding(
                False, "database", f"{path}: schema version {version} is newer than this sidecar's ({SCHEMA_VERSION})"
            )
            return
        guards = db.execute("SELECT count(*) FROM guards").fetchone()[0]
        running = db.execute("SELECT count(*) FROM guards WHERE json_extract(doc, '$.state') = 'RUNNING'").fetchone()[0]
        revision = db.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()
        note = "" if version == SCHEMA_VERSION else f" (will be migrated to {SCHEMA_VERSION} at start)"
        yield Finding(
            True,
            "database",
            f"{path}: integrity ok, schema version {version}{note}, {guards} guards ({running} running), "
            f"revision {revision[0] if revision else 0}",
        )
    except sqlite3.Error as error:
        yield Finding(False, "database", f"{path}: not a usable Task Guard database: {error}")
    finally:
        db.close()


def _file_modes(settings: Settings) -> Iterator[Finding]:
    """Who else may read the database (it holds lease_ids, which are capabilities) or swap it."""
    if not backends.backend_of(settings).keeps_a_file or not settings.db.exists():
        return
    real = Path(os.path.realpath(settings.db))
    wide = []
    for suffix in DATABASE_SUFFIXES:
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(f"{real}{suffix}")
            if stat.S_IMODE(st.st_mode) & 0o077:
                wide.append(f"{real}{suffix} is mode {stat.S_IMODE(st.st_mode):04o}")
    folder = os.stat(real.parent)
    if folder.st_mode & 0o022 and not folder.st_mode & stat.S_ISVTX:
        wide.append(f"its folder {real.parent} is mode {stat.S_IMODE(folder.st_mode):04o} (others may replace files)")
    if wide:
        yield Finding(
            False,
            "file modes",
            "; ".join(wide) + ": other users can read lease_ids, or swap the files (the sidecar narrows the "
            "files to 0600 at start; chmod 700 the folder)",
        )
    else:
        yield Finding(True, "file modes", f"{real} and its -wal/-shm are readable by their owner only")


def _listener(settings: Settings) -> Iterator[Finding]:
    if settings.listen.startswith("unix:"):
        path = Path(settings.listen.removeprefix("unix:").removeprefix("//"))
        if path.absolute().parent == runtime_dir().absolute() and path.parent.exists():
            problem = private_dir_problem(path.parent)
            if problem:
                yield Finding(False, "listener", f"{problem}: the sidecar refuses to start there, clients to connect")
                return
        if path.is_socket():
            yield _probe(f"unix:{path}", f"socket {path} (mode {oct(path.stat().st_mode & 0o777)})")
        elif path.exists():
            yield Finding(False, "listener", f"{path} exists and is not a socket")
        else:
            writable = _writable_dir(path.parent) or not path.parent.exists()
            yield Finding(
                writable,
                "listener",
                f"socket {path} is free" + ("" if writable else ", but its folder is not writable"),
            )
        return
    host, _, port = settings.listen.rpartition(":")
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host.strip("[]"), int(port)))
        except OSError:
            if settings.tls_cert is not None:
                yield Finding(True, "listener", f"{settings.listen} is in use (TLS; not probed)")
            else:
                yield _probe(settings.listen, f"{settings.listen} is in use")
            return
    yield Finding(True, "listener", f"{settings.listen} is free")


def _metrics(settings: Settings) -> Iterator[Finding]:
    """/metrics: the token file a scrape needs, by the rules the sidecar holds it to (read, never created here)."""
    if not settings.metrics_listen:
        return
    path = settings.metrics_token_path
    where = f"/metrics on {settings.metrics_listen}"
    if not path.exists():
        yield Finding(True, "metrics", f"{where}; the sidecar creates its token file {path} (0600) at start")
        return
    try:
        webaccess.load_or_create(path, "metrics token")
    except webaccess.TokenFileError as error:
        yield Finding(False, "metrics", f"{error}: the sidecar refuses to start")
        return
    yield Finding(True, "metrics", f"{where}; scrapes present the token in {path}")


def _probe(target: str, what: str) -> Finding:
    """Is a sidecar serving there? Ask its health service."""
    try:
        with grpc.insecure_channel(target) as channel:
            stub: Any = health_pb2_grpc.HealthStub(channel)  # its type stubs name no methods
            response = stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
    except grpc.RpcError as error:
        return Finding(
            False, "listener", f"{what}, and nothing answers health checks there ({error.code().name}); a stale socket?"
        )
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    return Finding(True, "listener", f"{what}: a sidecar is serving there ({status})")


def _writable_dir(path: Path) -> bool:
    while not path.exists():
        path = path.parent
    return os.access(path, os.W_OK | os.X_OK)


def report(settings: Settings) -> int:
    findings = examine(settings)
    for finding in findings:
        print(finding)
    return 0 if all(finding.ok for finding in findings) else 1
