"""The servers the benchmark measures, each started on loopback with its data under one temporary folder.

Every server is a child process of the runner, bound to 127.0.0.1 (or a unix socket), and stopped by
``Server.stop`` (SIGTERM, then SIGKILL). ``ensure_binaries`` installs Debian's ``etcd-server`` and
``redis-server`` when their binaries are missing, so a fresh machine needs nothing but python3.
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
# What provides each binary the bench runs.
DEBIAN_PACKAGES = {"etcd": "etcd-server", "redis-server": "redis-server"}
_POLICY_RC_D = Path("/usr/sbin/policy-rc.d")


def ensure_binaries(names: tuple[str, ...] = ("etcd", "redis-server")) -> None:
    """apt-get install the Debian packages of whichever of ``names`` is not on PATH."""
    missing = [DEBIAN_PACKAGES[name] for name in names if shutil.which(name) is None]
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise SystemExit(f"bench: {', '.join(missing)} missing; install them (Debian: apt-get install {missing})")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    if not _has_candidates(missing, env):
        _apt(["apt-get", "update", "-q"], env)
    # The packages' maintainer scripts would start system-wide daemons on the default ports; policy-rc.d
    # exiting 101 is Debian's way of saying "do not start services" (container images ship it already).
    made_policy = not _POLICY_RC_D.exists()
    if made_policy:
        _POLICY_RC_D.write_text("#!/bin/sh\n# bench/servers.py: no daemons during apt-get install\nexit 101\n")
        _POLICY_RC_D.chmod(0o755)
    try:
        install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
        if subprocess.run(install, env=env).returncode != 0:
            _apt(["apt-get", "update", "-q"], env)  # stale lists: refresh once and retry
            _apt(install, env)
    finally:
        if made_policy:
            _POLICY_RC_D.unlink()
    still = [name for name in names if shutil.which(name) is None]
    if still:
        raise SystemExit(f"bench: {still} still missing after installing {missing}")


def _has_candidates(packages: list[str], env: dict[str, str]) -> bool:
    policy = subprocess.run(["apt-cache", "policy", *packages], env=env, capture_output=True, text=True).stdout
    return policy.count("Candidate:") == len(packages) and "Candidate: (none)" not in policy


def _apt(command: list[str], env: dict[str, str]) -> None:
    print("+", " ".join(command), file=sys.stderr, flush=True)
    subprocess.run(command, env=env, check=True)


def free_port() -> int:
    """A port on 127.0.0.1 nobody listens on right now (the server binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Server:
    """One server process; ``address`` is what a client dials."""

    name: str
    address: str
    process: subprocess.Popen[bytes]
    log_path: Path
    facts: dict[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 20) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=STOP_TIMEOUT_S)
        if self.process.stdout is not None:
            self.process.stdout.close()


def start_sidecar(workdir: Path, etcd: str = "", prefix: str = "", flags: tuple[str, ...] = ()) -> Server:
    """``python -m taskguard serve`` on a unix socket with its default store (SQLite, WAL, synchronous=FULL),
    or on the etcd at ``etcd`` (host:port) when given, under ``prefix`` (default: one of its own); ``flags``
    are more ``serve`` flags."""
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "sidecar.log"
    command = [
        sys.executable,
        "-m",
        "taskguard",
        "serve",
        "--listen",
        f"unix:{workdir / 'tg.sock'}",
        "--db",
        str(workdir / "tg.db"),
        *flags,
    ]
    if etcd:
        command += ["--store", f"etcd://{etcd}", "--etcd-prefix", prefix or f"/{workdir.name}/"]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, cwd=ROOT)
    line = _first_line(process, log_path)
    if "listening on " not in line:
        process.kill()
        raise RuntimeError(f"sidecar said {line!r}; log: {log_path.read_text(errors='replace')}")
    address = line.split("listening on ", 1)[1].split(" ", 1)[0]
    store = line.split("(store: ", 1)[1].split(" ", 1)[0].rstrip(")") if "(store: " in line else "?"
    server = Server("taskguard-etcd" if etcd else "taskguard", address, process, log_path, {"store": store})
    if not etcd:
        server.facts.update(sqlite_durability(workdir / "tg.db"))
    return server


def _first_line(process: subprocess.Popen[bytes], log_path: Path) -> str:
    assert process.stdout is not None
    deadline = time.monotonic() + START_TIMEOUT_S
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    line = b""
    try:
        while not line.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not selector.select(remaining):
                process.kill()
                raise TimeoutError(f"sidecar did not start; log: {log_path.read_text(errors='replace')}")
            chunk = os.read(process.stdout.fileno(), 4096)
            if not chunk:
                raise RuntimeError(f"sidecar exited with {process.wait()}; log: {log_path.read_text(errors='replace')}")
            line += chunk
    finally:
        selector.close()
    return line.decode()


def sqlite_durability(db: Path) -> dict[str, str]:
    """The sidecar's SQLite durability settings: journal mode from the file, synchronous from the store's code.

    ``synchronous`` is a per-connection setting that no other process can read, so it is taken from the
    PRAGMA the running store module issues when it opens its database.
    """
    import re
    import sqlite3

    from taskguard.store import sqlite as sqlite_store

    source = Path(sqlite_store.__file__).read_text()
    pragmas = re.findall(r"PRAGMA synchronous\s*=\s*(\w+)", source)
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as connection:
        journal_mode = connection.execute("PRAGMA journal_mode").fetchone()[0]
    return {"synchronous": ",".join(pragmas) or "?", "journal_mode": str(journal_mode)}


def start_etcd(workdir: Path) -> Server:
    """A single-member etcd with its data dir in ``workdir``, client and peer URLs on 127.0.0.1 only."""
    workdir.mkdir(parents=True, exist_ok=True)
    client_port, peer_port = free_port(), free_port()
    client_url, peer_url = f"http://{LOOPBACK}:{client_port}", f"http://{LOOPBACK}:{peer_port}"
    log_path = workdir / "etcd.log"
    command = [
        "etcd",
        "--name",
        "bench",
        "--data-dir",
        str(workdir / "data"),
        "--listen-client-urls",
        client_url,
        "--advertise-client-urls",
        client_url,
        "--listen-peer-urls",
        peer_url,
        "--initial-advertise-peer-urls",
        peer_url,
        "--initial-cluster",
        f"bench={peer_url}",
        "--initial-cluster-state",
        "new",
        "--log-level",
        "warn",
        "--logger",
        "zap",
    ]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
    server = Server("etcd", f"{LOOPBACK}:{client_port}", process, log_path)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"etcd exited with {process.returncode}: {server.log_tail()}")
        try:
            with urllib.request.urlopen(f"{client_url}/health", timeout=2) as reply:
                if json.loads(reply.read()).get("health") == "true":
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise TimeoutError(f"etcd not healthy after {START_TIMEOUT_S}s: {server.log_tail()}")
        time.sleep(0.1)
    with urllib.request.urlopen(f"{client_url}/version", timeout=2) as reply:
        server.facts["version"] = json.loads(reply.read()).get("etcdserver", "?")
    server.facts["durability"] = "raft WAL fsync per commit"
    return server


def start_redis(workdir: Path, durable: bool) -> Server:
    """redis-server on 127.0.0.1; durable: AOF with ``appendfsync always``, else no persistence at all."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = workdir / "redis.log"
    persistence = ["--appendonly", "yes", "--appendfsync", "always"] if durable else ["--appendonly", "no"]
    command = [
        "redis-server",
        "--bind",
        LOOPBACK,
        "--port",
        str(port),
        "--dir",
        str(workdir),
        "--daemonize",
        "no",
        "--save",
        "",
        *persistence,
        "--logfile",
        str(log_path),
        "--maxclients",
        "4096",
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=workdir)
    name = "redis-durable" if durable else "redis-volatile"
    server = Server(name, f"{LOOPBACK}:{port}", process, log_path)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"redis-server exited with {process.returncode}: {server.log_tail()}")
        try:
            server.facts.update(_redis_config(port))
            return server
        except OSError:
            if time.monotonic() > deadline:
                server.stop()
                raise TimeoutError(
                    f"redis-server not answering after {START_TIMEOUT_S}s: {server.log_tail()}"
                ) from None
            time.sleep(0.05)


def _redis_config(port: int) -> dict[str, str]:
    """What the running server says about its persistence (CONFIG GET), not what we asked for."""
    import redis

    client = redis.Redis(host=LOOPBACK, port=port, socket_timeout=2, decode_responses=True)
    try:
        config = client.config_get("appendonly") | client.config_get("appendfsync") | client.config_get("save")
        version = client.info("server")["redis_version"]
    except redis.ConnectionError as error:
        raise OSError(str(error)) from error
    finally:
        client.close()
    return {"version": str(version), **{str(key): str(value) for key, value in config.items()}}
