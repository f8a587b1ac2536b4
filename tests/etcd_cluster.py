"""Real etcd for the tests: Debian's etcd-server, started on loopback ports in a temporary folder."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from taskguard.store.etcdpb import etcdv3_pb2 as etcd
from taskguard.store.etcdpb import etcdv3_pb2_grpc as etcd_grpc

READY_TIMEOUT_S = 30.0


def etcd_binary() -> str:
    found = shutil.which("etcd")
    if found is None:
        raise RuntimeError("etcd is not installed; python3 .ci/dev.py setup installs Debian's etcd-server")
    return found


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Member:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"


@dataclass
class EtcdCluster:
    """One to three etcd members on 127.0.0.1, each a child process with its own data folder."""

    root: Path
    size: int = 1
    # PEM files (ca, server_cert, server_key) for client TLS with client certificates; None: plaintext.
    tls: dict[str, Path] | None = None
    members: list[Member] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for index in range(self.size):
            name = f"m{index}"
            self.members.append(Member(name, _free_port(), _free_port(), self.root / name, self.root / f"{name}.log"))

    @property
    def url(self) -> str:
        scheme = "etcds" if self.tls else "etcd"
        return f"{scheme}://" + ",".join(member.endpoint for member in self.members)

    def start(self) -> None:
        for member in self.members:
            self.start_member(member, new=True)
        self.wait_ready()

    def start_member(self, member: Member, new: bool = False) -> None:
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        scheme = "https" if self.tls else "http"
        command = [
            etcd_binary(),
            "--name", member.name,
            "--data-dir", str(member.data_dir),
            "--listen-client-urls", f"{scheme}://{member.endpoint}",
            "--advertise-client-urls", f"{scheme}://{member.endpoint}",
            "--listen-peer-urls", member.peer_url,
            "--initial-advertise-peer-urls", member.peer_url,
            "--initial-cluster", initial,
            "--initial-cluster-state", "new",
            "--initial-cluster-token", f"tg-{self.root.name}",
            # Fast elections: the fault tests kill members and want a new leader soon.
            "--heartbeat-interval", "50",
            "--election-timeout", "500",
        ]  # fmt: skip
        if self.tls:
            command += [
                "--cert-file", str(self.tls["server_cert"]),
                "--key-file", str(self.tls["server_key"]),
                "--trusted-ca-file", str(self.tls["ca"]),
                "--client-cert-auth",
            ]  # fmt: skip
        with member.log_path.open("ab") as log:
            member.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

    def wait_ready(self, members: list[Member] | None = None) -> None:
        """Until a write through each given member succeeds (so a leader exists and it is in the cluster)."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        for member in members or self.members:
            with self._channel(member) as channel:
                kv = etcd_grpc.KVStub(channel)
                while True:
                    try:
                        # wait_for_ready blocks until the member accepts connections; a retry covers "no leader yet".
                        kv.Put(etcd.PutRequest(key=b"/ready", value=b"1"), timeout=5, wait_for_ready=True)
                        break
                    except grpc.RpcError as error:
                        if time.monotonic() > deadline:
                            log = member.log_path.read_text()
                            raise TimeoutError(f"etcd {member.name} not ready; log: {log}") from error

    def _channel(self, member: Member) -> grpc.Channel:
        if not self.tls:
            return grpc.insecure_channel(member.endpoint)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self.tls["ca"].read_bytes(),
            private_key=self.tls["client_key"].read_bytes(),
            certificate_chain=self.tls["client_cert"].read_bytes(),
        )
        return grpc.secure_channel(member.endpoint, credentials)

    def kill(self, member: Member) -> None:
        assert member.process is not None
        member.process.send_signal(signal.SIGKILL)
        member.process.wait(timeout=10)

    def restart(self, member: Member) -> None:
        self.start_member(member)

    def compact(self, revision: int) -> None:
        with self._channel(self.members[0]) as channel:
            etcd_grpc.KVStub(channel).Compact(etcd.CompactionRequest(revision=revision, physical=True), timeout=10)

    def stop(self) -> None:
        for member in self.members:
            if member.process is not None and member.process.poll() is None:
                member.process.terminate()
                try:
                    member.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    member.process.kill()
                    member.process.wait()
