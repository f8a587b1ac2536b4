"""One frozen ``Settings``, from a TOML file, ``TASKGUARD_*`` variables and flags, in rising precedence.

This is the only module that reads ``os.environ``. Every value is validated
here, at start, with a message naming the setting, where it came from and
the rule it broke.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from taskguard.front.auth import AuthSettings
from taskguard.guard.model import ConflictPolicy, FailureHandling, KeyRule, Policy
from taskguard.store import backends
from taskguard.store.etcd import EtcdSettings
from taskguard.store.etcd_client import keepalive_interval_s
from taskguard.store.retention import Retention
from taskguard.telemetry import TelemetrySettings
from taskguard.webaccess import is_loopback, parse_listen

ENV_PREFIX = "TASKGUARD_"
METRICS_TOKEN_NAME = "metrics.token"


class ConfigError(Exception):
    pass


def tcp_host(settings: Settings) -> str:
    """The host of a TCP ``listen``; ConfigError unless it is host:port and loopback (or allow_remote)."""
    host, _, port = settings.listen.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"listen: must be host:port or unix:PATH, got {settings.listen!r}")
    if not settings.allow_remote and not is_loopback(host):
        raise ConfigError(
            f"listen: {host} is not a loopback address; a sidecar listens on loopback or a unix socket "
            "unless allow_remote is set"
        )
    return host


def metrics_address(settings: Settings) -> tuple[str, int]:
    """``metrics_listen`` as (host, port); ConfigError unless it is host:port and loopback (or allow_remote)."""
    try:
        return parse_listen(
            settings.metrics_listen,
            settings.allow_remote,
            setting="metrics_listen",
            why="/metrics is plain HTTP",
            remedy="it listens on loopback unless allow_remote is set",
        )
    except ValueError as error:
        raise ConfigError(str(error)) from None


def runtime_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The default socket's folder; a well-known name, so the listener makes sure it is private."""
    environ = os.environ if environ is None else environ
    base = environ.get("XDG_RUNTIME_DIR")
    return Path(base) / "taskguard" if base else Path(f"/tmp/taskguard-{os.getuid()}")


def client_token(token: str | None, token_file: str | None, environ: Mapping[str, str] | None = None) -> str | None:
    """The bearer token a client command presents, or None.

    ``token`` (else ``$TASKGUARD_TOKEN``) wins; failing that, the contents of ``token_file`` (else
    ``$TASKGUARD_TOKEN_FILE``). The client commands' counterpart of ``load``: the sidecar's own settings
    are not involved.
    """
    environ = os.environ if environ is None else environ
    token = token or environ.get(ENV_PREFIX + "TOKEN")
    token_file = token_file or environ.get(ENV_PREFIX + "TOKEN_FILE")
    if not token and token_file:
        token = Path(token_file).read_text().strip()
    return token or None


def _data_dir(environ: Mapping[str, str]) -> Path:
    base = environ.get("XDG_DATA_HOME")
    home = Path(environ["HOME"]) if environ.get("HOME") else Path.home()
    return (Path(base) if base else home / ".local" / "share") / "taskguard"


_POLICY = Policy()
_RULE = _POLICY.default_rule
# A semaphore's runs are in its one record, which every commit of the key rewrites: a bound keeps that small.
MAX_HOLDERS = 64


@dataclass(frozen=True, slots=True)
class Settings:
    listen: str
    db: Path
    store: str = "sqlite"
    # The policy's own defaults: the core's, unless configured.
    default_ttl_s: float = _POLICY.default_ttl_s
    max_ttl_s: float = _POLICY.max_ttl_s
    stale_after_s: float = _POLICY.stale_after_s
    resume_grace_s: float = _POLICY.resume_grace_s
    # The default rule: what keys no [[rules]] entry matches get (and what a rule leaves unset).
    abandoned_requires_approval: bool = _RULE.abandoned_requires_approval
    expired_requires_approval: bool = _RULE.expired_requires_approval
    on_conflict: ConflictPolicy = _RULE.on_conflict
    failure: FailureHandling = _RULE.failure
    lock_delay_s: float = _RULE.lock_delay_s
    max_hold_s: float | None = _RULE.max_hold_s
    max_queue: int = _RULE.max_queue
    max_wait_s: float | None = _RULE.max_wait_s
    allow_supersede: bool = _RULE.allow_supersede
    supersede_grace_s: float = _RULE.supersede_grace_s
    max_holders: int = _RULE.max_holders
    # Per-key rules, from the config file's [[rules]] tables only: first match wins.
    rules: tuple[KeyRule, ...] = ()
    event_retention_count: int = 100_000
    event_retention_age_s: float = 24 * 3600.0
    watch_buffer: int = 4096
    max_watchers: int = 1024
    max_watchers_per_connection: int = 256
    shutdown_grace_s: float = 5.0
    log_level: str = "info"
    otlp_endpoint: str = ""
    telemetry_console: bool = False
    # Listener and transport security.
    socket_mode: int = 0o600
    socket_group: str = ""
    allow_remote: bool = False
    # A second, health-only listener (grpc.health.v1 and nothing else) for
    # probes that cannot reach a unix socket, such as the kubelet's.
    health_listen: str = ""
    # /metrics in the Prometheus text format, over plain HTTP: loopback unless allow_remote, and only for
    # whoever presents the token in metrics_token_file (default: metrics.token beside the database).
    metrics_listen: str = ""
    metrics_token_file: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    # Access control; None: the sidecar's own uid and root.
    operator_uids: tuple[int, ...] | None = None
    operator_token: str = ""
    operator_token_file: Path | None = None
    holder_token: str = ""
    holder_token_file: Path | None = None
    # Limits that keep one client from hurting the rest.
    max_message_bytes: int = 1 << 20
    max_streams_per_connection: int = 4096
    max_guards_per_holder: int = 10_000
    hold_first_message_timeout_s: float = 10.0
    # The etcd store (store = "etcd://host:port,..."): guards shared by the sidecars of many hosts.
    etcd_prefix: str = "/taskguard/"
    etcd_lease_ttl_s: float = 10.0
    etcd_timeout_s: float = 5.0
    etcd_ca: Path | None = None
    etcd_cert: Path | None = None
    etcd_key: Path | None = None
    etcd_user: str = ""
    etcd_password_file: Path | None = None
    # Not a setting anyone types: tests hand in in-memory exporters here.
    telemetry_overrides: TelemetrySettings | None = None

    @property
    def default_rule(self) -> KeyRule:
        return KeyRule(**{name: getattr(self, name) for name in _RULE_SETTINGS})

    @property
    def policy(self) -> Policy:
        return Policy(
            default_ttl_s=self.default_ttl_s,
            max_ttl_s=self.max_ttl_s,
            stale_after_s=self.stale_after_s,
            resume_grace_s=self.resume_grace_s,
            rules=self.rules,
            default_rule=self.default_rule,
        )

    @property
    def telemetry(self) -> TelemetrySettings:
        if self.telemetry_overrides is not None:
            return self.telemetry_overrides
        return TelemetrySettings(
            otlp_endpoint=self.otlp_endpoint, console=self.telemetry_console, prometheus=bool(self.metrics_listen)
        )

    @property
    def metrics_token_path(self) -> Path:
        """Where the /metrics token is (created there, mode 0600, when missing)."""
        return self.metrics_token_file or self.db.parent / METRICS_TOKEN_NAME

    @property
    def auth(self) -> AuthSettings:
        uids = self.operator_uids if self.operator_uids is not None else (0, os.geteuid())
        return AuthSettings(
            operator_token=self.operator_token or _read_secret(self.operator_token_file, "operator_token_file"),
            holder_token=self.holder_token or _read_secret(self.holder_token_file, "holder_token_file"),
            operator_uids=frozenset(uids),
        )

    def __repr__(self) -> str:
        # Tokens stay out of logs and tracebacks.
        shown = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _SECRETS}
        return f"Settings({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

    @property
    def etcd(self) -> EtcdSettings:
        return EtcdSettings.from_url(
            self.store,
            prefix=self.etcd_prefix,
            lease_ttl_s=max(1, round(self.etcd_lease_ttl_s)),
            timeout_s=self.etcd_timeout_s,
            ca=self.etcd_ca,
            cert=self.etcd_cert,
            key=self.etcd_key,
            user=self.etcd_user,
            password=_read_secret(self.etcd_password_file, "etcd_password_file"),
        )

    @property
    def retention(self) -> Retention:
        return Retention(max_events=self.event_retention_count, max_age_s=self.event_retention_age_s or None)


def default_settings(*, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {
        "listen": f"unix:{runtime_dir(environ) / 'taskguard.sock'}",
        "db": _data_dir(environ) / "taskguard.db",
    }
    values.update(overrides)
    return Settings(**values)


# --- parsing -------------------------------------------------------------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration_s(value: Any) -> float:
    """``30``, ``"30s"``, ``"1.5m"``, ``"250ms"``, ``"2h"`` -> seconds."""
    if isinstance(value, bool):
        raise ValueError("must be a duration such as 30s, 5m or 1h")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ValueError("must be a duration such as 30s, 5m or 1h")
        seconds = float(match.group(1)) * _UNIT_S[match.group(2)]
    # TOML has inf and nan, and a long enough string of digits parses to inf.
    if not math.isfinite(seconds):
        raise ValueError("must be a finite duration")
    return seconds


def _parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def _parse_int(value: Any) -> int:
    # int() would truncate a TOML 1.5 to 1 (and raise OverflowError on inf).
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError("must be a whole number")
    return int(value)


def _parse_octal(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return int(str(value), 8)


def _parse_uids(value: Any) -> tuple[int, ...]:
    items = value if isinstance(value, list) else [part for part in str(value).split(",") if part.strip()]
    return tuple(_parse_int(item) if not isinstance(item, str) else int(item.strip()) for item in items)


def _read_secret(path: Path | None, setting: str) -> str:
    if path is None:
        return ""
    try:
        return path.read_text().strip()
    except OSError as error:
        raise ConfigError(f"{setting}: cannot read {path}: {error.strerror}") from None


def _parse_on_conflict(value: Any) -> ConflictPolicy:
    return ConflictPolicy[str(value).strip().upper().replace("-", "_")]


def _parse_failure(value: Any) -> FailureHandling:
    return FailureHandling[str(value).strip().upper()]


def _parse_optional_duration(value: Any) -> float | None:
    # 0 and "none" switch it off, so a rule can undo the default rule's.
    if isinstance(value, str) and value.strip().lower() in ("", "none", "off"):
        return None
    seconds = parse_duration_s(value)
    return seconds if seconds > 0 else None


def _parse_path(value: Any) -> Path:
    # Path("") is Path("."), which would pass as a file path.
    if isinstance(value, str) and not value.strip():
        raise ValueError("must be a file path")
    return Path(value)


@dataclass(frozen=True, slots=True)
class _Rule:
    parse: Callable[[Any], Any]
    check: Callable[[Any], bool]
    requirement: str
    help: str
    secret: bool = False


def _positive(value: float) -> bool:
    return value > 0


def _non_negative(value: float) -> bool:
    return value >= 0


_RULES: dict[str, _Rule] = {
    "listen": _Rule(str, lambda v: bool(v), "must be host:port or unix:PATH", "address to listen on"),
    "db": _Rule(_parse_path, lambda v: bool(str(v)), "must be a file path", "SQLite database file"),
    "store": _Rule(
        str,
        lambda v: backends.backend_for(v) is not None,
        backends.RULE,
        "storage backend: the embedded SQLite file, memory (tests), or an etcd cluster shared by many hosts",
    ),
    "default_ttl_s": _Rule(parse_duration_s, _positive, "must be a duration > 0", "TTL of unary leases"),
    "max_ttl_s": _Rule(parse_duration_s, _positive, "must be a duration > 0", "largest TTL a caller may ask"),
    "stale_after_s": _Rule(
        parse_duration_s, _positive, "must be a duration > 0", "RUNNING without heartbeat this long is stale"
    ),
    "resume_grace_s": _Rule(
        parse_duration_s, _non_negative, "must be a duration >= 0", "time for Hold holders to resume after a restart"
    ),
    "abandoned_requires_approval": _Rule(
        _parse_bool, lambda v: True, "must be true or false", "ABANDONED guards need approve-retry"
    ),
    "expired_requires_approval": _Rule(
        _parse_bool, lambda v: True, "must be true or false", "EXPIRED guards need approve-retry"
    ),
    "on_conflict": _Rule(
        _parse_on_conflict,
        lambda v: True,
        "must be reject, join, queue, keep-newest or supersede",
        "what an acquisition that does not choose gets when the key is taken (join: Hold streams only)",
    ),
    "failure": _Rule(
        _parse_failure,
        lambda v: True,
        "must be require_approval or reopen",
        "after a FAILED run: wait for approve-retry, or reopen the key at once",
    ),
    "lock_delay_s": _Rule(
        parse_duration_s,
        _non_negative,
        "must be a duration >= 0",
        "after an abandoned, expired or force-released run the key stays closed this long",
    ),
    "max_hold_s": _Rule(
        _parse_optional_duration,
        lambda v: v is None or v > 0,
        "must be a duration > 0, or none",
        "a run ends EXPIRED this long after it started, whatever its renewals",
    ),
    "max_queue": _Rule(
        _parse_int,
        _non_negative,
        "must be a whole number >= 0",
        "callers that may wait in a key's queue (queue, keep-newest); 0: none",
    ),
    "max_wait_s": _Rule(
        _parse_optional_duration,
        lambda v: v is None or v > 0,
        "must be a duration > 0, or none",
        "a waiter leaves a key's queue after this long",
    ),
    "allow_supersede": _Rule(
        _parse_bool,
        lambda v: True,
        "must be true or false",
        "on_conflict supersede may ask a key's running run to stop",
    ),
    "supersede_grace_s": _Rule(
        parse_duration_s,
        _non_negative,
        "must be a duration >= 0",
        "a superseded run that has not released after this long is force-released",
    ),
    "max_holders": _Rule(
        _parse_int,
        lambda v: 1 <= v <= MAX_HOLDERS,
        f"must be a whole number from 1 to {MAX_HOLDERS}",
        "runs that may hold a key at once (a semaphore), each with its own lease and fencing token",
    ),
    "event_retention_count": _Rule(
        _parse_int, _positive, "must be a whole number > 0", "events kept for watchers to resume"
    ),
    "event_retention_age_s": _Rule(
        parse_duration_s, _non_negative, "must be a duration >= 0 (0: no age limit)", "age limit of kept events"
    ),
    "watch_buffer": _Rule(
        _parse_int, _positive, "must be a whole number > 0", "events buffered per watcher before it is cut off"
    ),
    "max_watchers": _Rule(_parse_int, _positive, "must be a whole number > 0", "WatchGuards streams at once"),
    "max_watchers_per_connection": _Rule(
        _parse_int,
        _positive,
        "must be a whole number > 0",
        "WatchGuards streams one connection may have (one caller, on the owner-only socket)",
    ),
    "shutdown_grace_s": _Rule(
        parse_duration_s, _non_negative, "must be a duration >= 0", "time in-flight calls get at shutdown"
    ),
    "otlp_endpoint": _Rule(
        str, lambda v: True, "", "OTLP/gRPC endpoint for traces and metrics (also OTEL_EXPORTER_OTLP_ENDPOINT)"
    ),
    "telemetry_console": _Rule(
        _parse_bool, lambda v: True, "must be true or false", "print spans and metrics to stdout (debugging)"
    ),
    "socket_mode": _Rule(
        _parse_octal, lambda v: 0 <= v <= 0o777, "must be an octal file mode such as 0600", "unix socket file mode"
    ),
    "socket_group": _Rule(str, lambda v: True, "", "group of the unix socket (name or gid)"),
    "allow_remote": _Rule(
        _parse_bool, lambda v: True, "must be true or false", "let a TCP listener bind to a non-loopback address"
    ),
    "health_listen": _Rule(
        str,
        lambda v: not v or (":" in v and v.rpartition(":")[2].isdigit()),
        "must be host:port",
        "extra TCP listener serving only the gRPC health service (for kubelet probes)",
    ),
    "metrics_listen": _Rule(
        str,
        lambda v: not v or (":" in v and v.rpartition(":")[2].isdigit()),
        "must be host:port",
        "serve /metrics (Prometheus text format) on this TCP address; loopback unless allow_remote",
    ),
    "metrics_token_file": _Rule(
        _parse_path,
        lambda v: True,
        "must be a file path",
        f"file holding the token a scrape must present (default: {METRICS_TOKEN_NAME} beside the database)",
    ),
    "tls_cert": _Rule(_parse_path, lambda v: True, "must be a file path", "TLS certificate chain (PEM) for TCP"),
    "tls_key": _Rule(_parse_path, lambda v: True, "must be a file path", "TLS private key (PEM)"),
    "tls_client_ca": _Rule(
        _parse_path, lambda v: True, "must be a file path", "CA (PEM) that client certificates must chain to: mTLS"
    ),
    "operator_uids": _Rule(
        _parse_uids,
        lambda v: all(uid >= 0 for uid in v),
        "must be a list of uids such as [0, 1000] (env: 0,1000)",
        "uids that are operators on the unix socket (default: the sidecar's own and root)",
    ),
    "operator_token": _Rule(str, lambda v: True, "", "operator bearer token (prefer operator_token_file)", True),
    "operator_token_file": _Rule(_parse_path, lambda v: True, "must be a file path", "file holding the operator token"),
    "holder_token": _Rule(str, lambda v: True, "", "holder bearer token every call must present", True),
    "holder_token_file": _Rule(_parse_path, lambda v: True, "must be a file path", "file holding the holder token"),
    "max_message_bytes": _Rule(
        _parse_int,
        lambda v: 1024 <= v <= 64 << 20,
        "must be a whole number of bytes from 1024 to 64 MiB",
        "largest request",
    ),
    "max_streams_per_connection": _Rule(
        _parse_int, _positive, "must be a whole number > 0", "concurrent streams one connection may open"
    ),
    "max_guards_per_holder": _Rule(
        _parse_int,
        _positive,
        "must be a whole number > 0",
        "RUNNING guards and places in queues one caller may have at once (counted by who it is, whatever holder "
        "it names)",
    ),
    "hold_first_message_timeout_s": _Rule(
        parse_duration_s,
        _positive,
        "must be a duration > 0",
        "a Hold stream whose first message (acquire or resume) has not come by then is ended",
    ),
    "etcd_prefix": _Rule(
        str, lambda v: v.startswith("/") and v.endswith("/"), "must start and end with /", "etcd key prefix"
    ),
    "etcd_lease_ttl_s": _Rule(
        parse_duration_s, lambda v: 1 <= v <= 3600, "must be a duration from 1s to 1h", "this sidecar's etcd lease"
    ),
    "etcd_timeout_s": _Rule(parse_duration_s, _positive, "must be a duration > 0", "deadline of each etcd call"),
    "etcd_ca": _Rule(_parse_path, lambda v: True, "must be a file path", "CA of etcd's certificates (TLS)"),
    "etcd_cert": _Rule(_parse_path, lambda v: True, "must be a file path", "client certificate for etcd (mTLS)"),
    "etcd_key": _Rule(_parse_path, lambda v: True, "must be a file path", "client key for etcd (mTLS)"),
    "etcd_user": _Rule(str, lambda v: True, "", "etcd user (etcd auth)"),
    "etcd_password_file": _Rule(_parse_path, lambda v: True, "must be a file path", "file holding the etcd password"),
    "log_level": _Rule(
        str.lower,
        lambda v: v in ("debug", "info", "warning", "error"),
        "must be debug, info, warning or error",
        "log level",
    ),
}


# The settings a [[rules]] entry may set, as KeyRule names them; the top-level ones make the default rule.
_RULE_SETTINGS = (
    "on_conflict",
    "failure",
    "abandoned_requires_approval",
    "expired_requires_approval",
    "lock_delay_s",
    "max_hold_s",
    "max_queue",
    "max_wait_s",
    "allow_supersede",
    "supersede_grace_s",
    "max_holders",
)


def _flag(name: str) -> str:
    return "--" + name.removesuffix("_s").replace("_", "-")


def _env_name(name: str) -> str:
    return ENV_PREFIX + name.removesuffix("_s").upper()


def _toml_name(name: str) -> str:
    return name.removesuffix("_s")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for every setting (all default to None: unset, so lower sources show through)."""
    parser.add_argument("--config", type=Path, help="TOML file with settings (env: TASKGUARD_CONFIG)")
    for name, rule in _RULES.items():
        if rule.parse is _parse_optional_duration:
            parser.add_argument(
                _flag(name), dest=name, default=None, help=f"{rule.help}; none: no bound (env: {_env_name(name)})"
            )
        elif rule.parse is _parse_bool:
            parser.add_argument(
                _flag(name), dest=name, action=argparse.BooleanOptionalAction, default=None, help=rule.help
            )
        else:
            parser.add_argument(_flag(name), dest=name, default=None, help=f"{rule.help} (env: {_env_name(name)})")


def load(args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    environ = os.environ if environ is None else environ
    raw: dict[str, tuple[Any, str]] = {}
    config_path = getattr(args, "config", None) or environ.get(ENV_PREFIX + "CONFIG")
    rule_tables: list[Any] = []
    if config_path:
        found, rule_tables = _from_toml(Path(config_path))
        raw.update(found)
    if environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        raw["otlp_endpoint"] = (
            environ["OTEL_EXPORTER_OTLP_ENDPOINT"],
            "environment variable OTEL_EXPORTER_OTLP_ENDPOINT",
        )
    for name in _RULES:
        if _env_name(name) in environ:
            raw[name] = (environ[_env_name(name)], f"environment variable {_env_name(name)}")
        value = getattr(args, name, None) if args is not None else None
        if value is not None:
            raw[name] = (value, f"flag {_flag(name)}")
    values: dict[str, Any] = {}
    for name, (value, source) in raw.items():
        rule = _RULES[name]
        try:
            parsed = rule.parse(value)
        except (TypeError, ValueError, KeyError):
            parsed = rule  # not a value any setting takes: fails the check below
        if parsed is rule or not rule.check(parsed):
            shown = "a value that is not shown" if rule.secret else repr(value)
            raise ConfigError(f"{_toml_name(name)} ({source}): {rule.requirement}, got {shown}")
        values[name] = parsed
    settings = default_settings(environ=environ, **values)
    if rule_tables:
        settings = replace(settings, rules=_key_rules(rule_tables, settings.default_rule, f"config file {config_path}"))
    if (settings.tls_cert is None) != (settings.tls_key is None):
        raise ConfigError("tls_cert and tls_key go together: give both or neither")
    if settings.tls_client_ca is not None and settings.tls_cert is None:
        raise ConfigError("tls_client_ca (mTLS) needs tls_cert and tls_key")
    if settings.tls_cert is not None and settings.listen.startswith("unix:"):
        raise ConfigError("TLS is for TCP listeners; the unix socket is protected by its file mode")
    for path in (settings.tls_cert, settings.tls_key, settings.tls_client_ca):
        if path is not None and not path.is_file():
            raise ConfigError(f"{path}: no such file (TLS)")
    if not settings.listen.startswith("unix:"):
        tcp_host(settings)
    if settings.metrics_listen:
        metrics_address(settings)
    _ = settings.auth  # reads the token files now, so a missing one fails at start
    if backends.backend_of(settings).shared:
        _check_etcd_timing(settings)
    _check_semaphores(settings)
    if settings.default_ttl_s > settings.max_ttl_s:
        raise ConfigError(
            f"default_ttl ({settings.default_ttl_s:g}s) must not exceed max_ttl ({settings.max_ttl_s:g}s)"
        )
    return settings


def _check_semaphores(settings: Settings) -> None:
    for rule in (*settings.rules, settings.default_rule):
        if rule.max_holders == 1:
            continue
        where = f"rule {rule.name!r}" if rule in settings.rules else "the default rule"
        if rule.allow_supersede:
            raise ConfigError(
                f"{where}: allow_supersede needs max_holders = 1 (got {rule.max_holders}): with several runs "
                "holding a key, a superseding caller would not say which to stop"
            )


def _check_etcd_timing(settings: Settings) -> None:
    """A sidecar cut off from etcd must give up its guards before etcd expires its lease and others take them.

    It notices at most ``etcd_timeout`` after a keep-alive goes unanswered, and
    keep-alives go out once per interval, so the two together must stay below
    the lease's TTL.
    """
    ttl_s = settings.etcd.lease_ttl_s
    interval_s = keepalive_interval_s(ttl_s)
    if settings.etcd_timeout_s + interval_s >= ttl_s:
        raise ConfigError(
            f"etcd_timeout ({settings.etcd_timeout_s:g}s) plus the keep-alive interval ({interval_s:.3g}s, "
            f"a third of etcd_lease_ttl) must stay below etcd_lease_ttl ({ttl_s:g}s), or a sidecar cut off from "
            "etcd would still vouch for guards that etcd hands to others: lower etcd_timeout or raise etcd_lease_ttl"
        )


def describe_rule(rule: KeyRule) -> str:
    """One line a person reads: what the rule makes a key do."""
    losses = [
        state
        for state, needs in (
            ("abandoned", rule.abandoned_requires_approval),
            ("expired", rule.expired_requires_approval),
        )
        if needs
    ]
    parts = [
        f"on conflict {rule.on_conflict.name.lower()}",
        "failed runs reopen the key" if rule.failure is FailureHandling.REOPEN else "failed runs need approve-retry",
        f"{' and '.join(losses)} runs need approve-retry" if losses else "lost runs reopen the key",
        f"lock-delay {rule.lock_delay_s:g}s" if rule.lock_delay_s > 0 else "no lock-delay",
        f"max hold {rule.max_hold_s:g}s" if rule.max_hold_s is not None else "no max hold",
        f"queue of at most {rule.max_queue}"
        + (f", waiting at most {rule.max_wait_s:g}s" if rule.max_wait_s is not None else ""),
        f"supersede allowed (grace {rule.supersede_grace_s:g}s)" if rule.allow_supersede else "no supersede",
        f"up to {rule.max_holders} holders at once" if rule.max_holders > 1 else "one holder at a time",
    ]
    return ", ".join(parts)


# Secrets and where a person should put them instead of a flag.
SECRET_FILES = {"operator_token": "operator_token_file", "holder_token": "holder_token_file"}


def secret_flag_warning(name: str) -> str:
    """For a secret found on the command line, which every local user can read."""
    file_setting = SECRET_FILES[name]
    return (
        f"{name} is given on the command line ({_flag(name)}), which every local user can read in "
        f"/proc/<pid>/cmdline; put it in a file of mode 0600 named by {file_setting} ({_flag(file_setting)}), "
        f"or in the environment variable {_env_name(name)}"
    )


def risk_warnings(settings: Settings) -> list[str]:
    """Settings that expose secrets: token files others may read, and plaintext beyond loopback."""
    found = []
    for name, file_setting in SECRET_FILES.items():
        path = getattr(settings, file_setting)
        if path is not None and not getattr(settings, name):
            with contextlib.suppress(OSError):
                mode = path.stat().st_mode & 0o777
                if mode & 0o077:
                    found.append(f"{file_setting} {path} has mode {mode:04o}: other users may read it; chmod 600 it")
    if not settings.listen.startswith("unix:") and settings.tls_cert is None:
        if not is_loopback(settings.listen.rpartition(":")[0]):
            found.append(
                f"listen {settings.listen} serves other hosts WITHOUT TLS: tokens, lease_ids and every guard "
                "cross the network in plaintext, where anyone on the path can read and replay them, and callers "
                "cannot be told apart by uid; set tls_cert and tls_key (and tls_client_ca for mTLS)"
            )
    return found


def _from_toml(path: Path) -> tuple[dict[str, tuple[Any, str]], list[Any]]:
    """The settings the file sets, and its [[rules]] tables (checked later, on top of the default rule)."""
    try:
        document = tomllib.loads(path.read_text())
    except OSError as error:
        raise ConfigError(f"config file {path}: cannot read it: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"config file {path}: not valid TOML: {error}") from None
    known = {_toml_name(name): name for name in _RULES}
    found: dict[str, tuple[Any, str]] = {}
    rules = document.pop("rules", [])
    if not isinstance(rules, list) or not all(isinstance(table, dict) for table in rules):
        raise ConfigError(f"config file {path}: rules must be an array of tables ([[rules]])")
    for key, value in document.items():
        if key not in known:
            raise ConfigError(
                f"config file {path}: unknown setting {key!r}; known: {', '.join(sorted([*known, 'rules']))}"
            )
        found[known[key]] = (value, f"config file {path}")
    return found, rules


_RULE_KEYS = {_toml_name(name): name for name in _RULE_SETTINGS}


def _key_rules(tables: list[dict[str, Any]], default: KeyRule, source: str) -> tuple[KeyRule, ...]:
    """The [[rules]] tables as KeyRules: each sets what differs from the default rule.

    Every mistake names the rule (its position and name), the setting and the rule it breaks.
    """
    rules: list[KeyRule] = []
    names: set[str] = set()
    for position, table in enumerate(tables):
        name = table.get("name", f"rules[{position}]")
        where = f"rules[{position}]" + (f" ({name!r})" if "name" in table else "")
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"{where}.name ({source}): must be a non-empty string")
        if name in names or name == default.name:
            raise ConfigError(f"{where}.name ({source}): {name!r} is taken; each rule needs its own name")
        names.add(name)
        match = table.get("match")
        if not isinstance(match, str) or not match:
            raise ConfigError(
                f'{where}.match ({source}): is required: a glob of task keys, such as "agent:ops:*" (a prefix) '
                'or "*::deploy"'
            )
        values: dict[str, Any] = {}
        for key, value in table.items():
            if key in ("name", "match"):
                continue
            if key not in _RULE_KEYS:
                known = ", ".join(["match", "name", *sorted(_RULE_KEYS)])
                raise ConfigError(f"{where} ({source}): unknown setting {key!r}; a rule may set {known}")
            setting = _RULE_KEYS[key]
            rule = _RULES[setting]
            try:
                parsed = rule.parse(value)
            except (TypeError, ValueError, KeyError):
                parsed = rule  # not a value any setting takes: fails the check below
            if parsed is rule or not rule.check(parsed):
                raise ConfigError(f"{where}.{key} ({source}): {rule.requirement}, got {value!r}")
            values[setting] = parsed
        rules.append(replace(default, name=name, match=match, **values))
    return tuple(rules)


_SECRETS = frozenset(name for name, rule in _RULES.items() if rule.secret)

_NOT_FLAGS = {"telemetry_overrides", "rules"}
assert {f.name for f in fields(Settings)} - _NOT_FLAGS == set(_RULES), "every setting needs a rule"
