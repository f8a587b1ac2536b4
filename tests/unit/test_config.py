"""Settings: defaults, TOML < environment < flags, and a ConfigError naming setting, source and rule for bad values.

Every test passes its own environment mapping to ``config.load``; none reads or changes ``os.environ``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

import pytest

from taskguard import config
from taskguard.config import ConfigError, Settings
from taskguard.guard.model import ConflictPolicy, FailureHandling, KeyRule, Policy
from taskguard.store.retention import Retention

ENVIRON = {"XDG_RUNTIME_DIR": "/run/user/4242", "XDG_DATA_HOME": "/srv/data", "HOME": "/home/tester"}

# Every field a person sets, by its TOML name (``_s`` dropped); ``telemetry_overrides`` is for tests only.
TOML_NAMES = sorted(
    field.name.removesuffix("_s")
    for field in dataclasses.fields(Settings)
    if field.name not in ("telemetry_overrides", "rules")
)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="taskguard serve")
    config.add_arguments(parser)
    return parser


def load(
    tmp_path: Path, *, toml: str | None = None, env: dict[str, str] | None = None, flags: tuple[str, ...] = ()
) -> Settings:
    """``config.load`` as ``taskguard serve`` calls it, with a TOML file passed by ``--config`` when given."""
    argv = list(flags)
    if toml is not None:
        argv += ["--config", str(write_toml(tmp_path, toml))]
    return config.load(parser().parse_args(argv), environ={**ENVIRON, **(env or {})})


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "taskguard.toml"
    path.write_text(text)
    return path


# --- defaults --------------------------------------------------------------------------------


def test_defaults_apply_when_nothing_is_set(tmp_path: Path) -> None:
    settings = load(tmp_path)

    assert settings == Settings(
        listen="unix:/run/user/4242/taskguard/taskguard.sock",
        db=Path("/srv/data/taskguard/taskguard.db"),
        store="sqlite",
        default_ttl_s=60.0,
        max_ttl_s=86400.0,
        stale_after_s=120.0,
        resume_grace_s=15.0,
        abandoned_requires_approval=False,
        expired_requires_approval=False,
        event_retention_count=100_000,
        event_retention_age_s=86400.0,
        watch_buffer=4096,
        max_watchers=1024,
        shutdown_grace_s=5.0,
        log_level="info",
        otlp_endpoint="",
        telemetry_console=False,
    )


def test_default_paths_fall_back_to_tmp_and_home_without_xdg_variables() -> None:
    settings = config.load(parser().parse_args([]), environ={"HOME": "/home/tester"})

    assert settings.listen == f"unix:/tmp/taskguard-{os.getuid()}/taskguard.sock"
    assert settings.db == Path("/home/tester/.local/share/taskguard/taskguard.db")


def test_settings_give_the_core_its_policy_and_the_store_its_retention(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        flags=(
            "--default-ttl",
            "30s",
            "--max-ttl",
            "2h",
            "--expired-requires-approval",
            "--event-retention-count",
            "50",
        ),
    )

    assert settings.policy == Policy(
        default_ttl_s=30.0,
        max_ttl_s=7200.0,
        stale_after_s=120.0,
        resume_grace_s=15.0,
        default_rule=KeyRule(abandoned_requires_approval=False, expired_requires_approval=True),
    )
    assert settings.retention == Retention(max_events=50, max_age_s=86400.0)


def test_an_event_retention_age_of_zero_means_no_age_limit(tmp_path: Path) -> None:
    settings = load(tmp_path, env={"TASKGUARD_EVENT_RETENTION_AGE": "0"})

    assert settings.retention.max_age_s is None


# --- precedence ------------------------------------------------------------------------------


TOML = """
default_ttl = "10s"
log_level = "debug"
abandoned_requires_approval = true
watch_buffer = 10
"""


def test_the_toml_file_overrides_defaults(tmp_path: Path) -> None:
    settings = load(tmp_path, toml=TOML)

    assert (settings.default_ttl_s, settings.log_level, settings.abandoned_requires_approval) == (10.0, "debug", True)
    assert settings.watch_buffer == 10


def test_the_environment_overrides_the_toml_file(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        toml=TOML,
        env={"TASKGUARD_DEFAULT_TTL": "20s", "TASKGUARD_ABANDONED_REQUIRES_APPROVAL": "false"},
    )

    assert (settings.default_ttl_s, settings.log_level, settings.abandoned_requires_approval) == (20.0, "debug", False)


def test_a_flag_overrides_the_environment_and_the_toml_file(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        toml=TOML,
        env={"TASKGUARD_DEFAULT_TTL": "20s", "TASKGUARD_ABANDONED_REQUIRES_APPROVAL": "false"},
        flags=("--default-ttl", "30s", "--abandoned-requires-approval", "--log-level", "WARNING"),
    )

    assert (settings.default_ttl_s, settings.log_level, settings.abandoned_requires_approval) == (30.0, "warning", True)
    assert settings.watch_buffer == 10


def test_a_negated_boolean_flag_overrides_a_true_from_the_environment(tmp_path: Path) -> None:
    settings = load(
        tmp_path, env={"TASKGUARD_EXPIRED_REQUIRES_APPROVAL": "yes"}, flags=("--no-expired-requires-approval",)
    )

    assert settings.expired_requires_approval is False


def test_the_config_file_may_be_named_by_the_environment(tmp_path: Path) -> None:
    path = write_toml(tmp_path, 'store = "memory"\n')

    settings = config.load(parser().parse_args([]), environ={**ENVIRON, "TASKGUARD_CONFIG": str(path)})

    assert settings.store == "memory"


def test_the_config_flag_wins_over_the_config_environment_variable(tmp_path: Path) -> None:
    path = write_toml(tmp_path, 'store = "memory"\n')

    settings = config.load(
        parser().parse_args(["--config", str(path)]),
        environ={**ENVIRON, "TASKGUARD_CONFIG": str(tmp_path / "missing.toml")},
    )

    assert settings.store == "memory"


# --- durations -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("30s", 30.0),
        ("5m", 300.0),
        ("1.5m", 90.0),
        ("1h", 3600.0),
        ("2d", 172800.0),
        ("45", 45.0),
        ("0.5", 0.5),
        (" 10 s ", 10.0),
    ],
)
def test_a_duration_from_the_environment_or_a_flag_is_read_in_its_unit(
    tmp_path: Path, text: str, seconds: float
) -> None:
    from_env = load(tmp_path, env={"TASKGUARD_STALE_AFTER": text})
    from_flag = load(tmp_path, flags=("--stale-after", text))

    assert from_env.stale_after_s == pytest.approx(seconds)
    assert from_flag.stale_after_s == pytest.approx(seconds)


@pytest.mark.parametrize(("value", "seconds"), [("45", 45.0), ("2.5", 2.5), ('"250ms"', 0.25), ('"1h"', 3600.0)])
def test_a_duration_in_toml_may_be_a_number_of_seconds_or_a_string(tmp_path: Path, value: str, seconds: float) -> None:
    settings = load(tmp_path, toml=f"shutdown_grace = {value}\n")

    assert settings.shutdown_grace_s == pytest.approx(seconds)


# --- bad values --------------------------------------------------------------------------------


def env_source(setting: str) -> str:
    return f"environment variable TASKGUARD_{setting.upper()}"


BAD_ENVIRONMENT = [
    ("default_ttl", "soon", "must be a duration > 0"),
    ("default_ttl", "0s", "must be a duration > 0"),
    ("default_ttl", "9" * 400, "must be a duration > 0"),
    ("max_ttl", "1y", "must be a duration > 0"),
    ("stale_after", "-5s", "must be a duration > 0"),
    ("resume_grace", "-1s", "must be a duration >= 0"),
    ("shutdown_grace", "5 minutes", "must be a duration >= 0"),
    ("event_retention_age", "-1", "must be a duration >= 0 (0: no age limit)"),
    ("event_retention_count", "1.5", "must be a whole number > 0"),
    ("event_retention_count", "0", "must be a whole number > 0"),
    ("watch_buffer", "lots", "must be a whole number > 0"),
    ("max_watchers", "-1", "must be a whole number > 0"),
    ("abandoned_requires_approval", "maybe", "must be true or false"),
    ("expired_requires_approval", "2", "must be true or false"),
    ("telemetry_console", "sometimes", "must be true or false"),
    ("store", "etcd", "must be sqlite, memory or etcd://host:port[,host:port...]"),
    ("log_level", "verbose", "must be debug, info, warning or error"),
    ("listen", "", "must be host:port or unix:PATH"),
    ("db", "", "must be a file path"),
    ("metrics_listen", "9464", "must be host:port"),
    ("metrics_listen", "localhost:http", "must be host:port"),
    ("metrics_token_file", " ", "must be a file path"),
]


@pytest.mark.parametrize(
    ("setting", "value", "rule"),
    BAD_ENVIRONMENT,
    ids=[f"{setting}={value[:12]!r}" for setting, value, _ in BAD_ENVIRONMENT],
)
def test_a_bad_environment_value_names_the_setting_its_variable_and_the_rule(
    tmp_path: Path, setting: str, value: str, rule: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        load(tmp_path, env={f"TASKGUARD_{setting.upper()}": value})

    assert str(refused.value) == f"{setting} ({env_source(setting)}): {rule}, got {value!r}"


BAD_FLAGS = [
    ("--max-ttl=0", "max_ttl", "0", "must be a duration > 0"),
    ("--stale-after=1y", "stale_after", "1y", "must be a duration > 0"),
    ("--max-watchers=-3", "max_watchers", "-3", "must be a whole number > 0"),
    ("--event-retention-count=0", "event_retention_count", "0", "must be a whole number > 0"),
    ("--log-level=loud", "log_level", "loud", "must be debug, info, warning or error"),
    ("--store=etcd", "store", "etcd", "must be sqlite, memory or etcd://host:port[,host:port...]"),
]


@pytest.mark.parametrize(("flag", "setting", "value", "rule"), BAD_FLAGS, ids=[flag for flag, *_ in BAD_FLAGS])
def test_a_bad_flag_value_names_the_setting_its_flag_and_the_rule(
    tmp_path: Path, flag: str, setting: str, value: str, rule: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        load(tmp_path, flags=(flag,))

    assert str(refused.value) == f"{setting} (flag {flag.split('=')[0]}): {rule}, got {value!r}"


BAD_TOML = [
    ("stale_after = -5", "stale_after", "-5", "must be a duration > 0"),
    ("default_ttl = true", "default_ttl", "True", "must be a duration > 0"),
    ("default_ttl = nan", "default_ttl", "nan", "must be a duration > 0"),
    ("max_ttl = inf", "max_ttl", "inf", "must be a duration > 0"),
    ('default_ttl = "1y"', "default_ttl", "'1y'", "must be a duration > 0"),
    ("event_retention_count = 1.5", "event_retention_count", "1.5", "must be a whole number > 0"),
    ("event_retention_count = inf", "event_retention_count", "inf", "must be a whole number > 0"),
    ("watch_buffer = true", "watch_buffer", "True", "must be a whole number > 0"),
    ('abandoned_requires_approval = "maybe"', "abandoned_requires_approval", "'maybe'", "must be true or false"),
    ("log_level = 3", "log_level", "3", "must be debug, info, warning or error"),
    ("db = 5", "db", "5", "must be a file path"),
    ('db = ""', "db", "''", "must be a file path"),
]


@pytest.mark.parametrize(("line", "setting", "shown", "rule"), BAD_TOML, ids=[line for line, *_ in BAD_TOML])
def test_a_bad_toml_value_names_the_setting_the_file_and_the_rule(
    tmp_path: Path, line: str, setting: str, shown: str, rule: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        load(tmp_path, toml=line + "\n")

    assert str(refused.value) == f"{setting} (config file {tmp_path / 'taskguard.toml'}): {rule}, got {shown}"


def test_an_unknown_toml_key_is_rejected_listing_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as refused:
        load(tmp_path, toml='default_ttl_s = "30s"\n')

    known = ", ".join(sorted([*TOML_NAMES, "rules"]))
    assert str(refused.value) == (
        f"config file {tmp_path / 'taskguard.toml'}: unknown setting 'default_ttl_s'; known: {known}"
    )


def test_a_toml_table_is_an_unknown_setting(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError,
        match="unknown setting 'server'; known: abandoned_requires_approval, allow_remote, allow_supersede, db, ",
    ):
        load(tmp_path, toml='[server]\nlisten = "unix:/tmp/x.sock"\n')


def test_a_config_file_that_is_not_toml_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"taskguard\.toml: not valid TOML: "):
        load(tmp_path, toml="default_ttl = = 3\n")


def test_a_missing_config_file_is_rejected(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"

    with pytest.raises(ConfigError) as refused:
        config.load(parser().parse_args(["--config", str(missing)]), environ=ENVIRON)

    assert str(refused.value) == f"config file {missing}: cannot read it: No such file or directory"


def test_a_default_ttl_above_max_ttl_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as refused:
        load(tmp_path, toml='max_ttl = "1h"\n', env={"TASKGUARD_DEFAULT_TTL": "2h"})

    assert str(refused.value) == "default_ttl (7200s) must not exceed max_ttl (3600s)"


def test_a_default_ttl_equal_to_max_ttl_is_accepted(tmp_path: Path) -> None:
    settings = load(tmp_path, flags=("--default-ttl", "1h", "--max-ttl", "60m"))

    assert settings.default_ttl_s == settings.max_ttl_s == 3600.0


# Each setting once: its TOML key, a TOML literal, and the same value as a variable or flag spells it.
EVERY_SETTING = [
    ("listen", '"127.0.0.1:0"', "127.0.0.1:0"),
    ("db", '"/var/lib/taskguard/tg.db"', "/var/lib/taskguard/tg.db"),
    ("store", '"memory"', "memory"),
    ("default_ttl", '"1m"', "1m"),
    ("max_ttl", '"2h"', "2h"),
    ("stale_after", '"3m"', "3m"),
    ("resume_grace", "4", "4s"),
    ("abandoned_requires_approval", "true", "on"),
    ("expired_requires_approval", "true", "yes"),
    ("on_conflict", '"join"', "JOIN"),
    ("failure", '"reopen"', "reopen"),
    ("lock_delay", '"15s"', "15s"),
    ("max_hold", '"2h"', "2h"),
    ("max_queue", "12", "12"),
    ("max_wait", '"90s"', "90s"),
    ("allow_supersede", "true", "true"),
    ("supersede_grace", '"45s"', "45s"),
    ("max_holders", "1", "1"),  # more would contradict allow_supersede above: see test_config_rules
    ("event_retention_count", "5", "5"),
    ("event_retention_age", '"6h"', "6h"),
    ("watch_buffer", "7", "7"),
    ("max_watchers", "8", "8"),
    ("max_watchers_per_connection", "3", "3"),
    ("shutdown_grace", '"9s"', "9s"),
    ("log_level", '"ERROR"', "error"),
    ("otlp_endpoint", '"http://collector:4317"', "http://collector:4317"),
    ("telemetry_console", "true", "1"),
    ("socket_mode", '"0660"', "660"),
    ("socket_group", '"taskguard"', "taskguard"),
    ("allow_remote", "true", "true"),
    ("health_listen", '"0.0.0.0:8081"', "0.0.0.0:8081"),
    ("metrics_listen", '"0.0.0.0:9464"', "0.0.0.0:9464"),
    ("metrics_token_file", '"/tmp/tg-config-test/metrics.token"', "/tmp/tg-config-test/metrics.token"),
    ("tls_cert", '"/tmp/tg-config-test/cert.pem"', "/tmp/tg-config-test/cert.pem"),
    ("tls_key", '"/tmp/tg-config-test/key.pem"', "/tmp/tg-config-test/key.pem"),
    ("tls_client_ca", '"/tmp/tg-config-test/ca.pem"', "/tmp/tg-config-test/ca.pem"),
    ("operator_uids", "[0, 1000]", "0,1000"),
    ("operator_token", '"op-secret"', "op-secret"),
    ("operator_token_file", '"/tmp/tg-config-test/op.token"', "/tmp/tg-config-test/op.token"),
    ("holder_token", '"holder-secret"', "holder-secret"),
    ("holder_token_file", '"/tmp/tg-config-test/holder.token"', "/tmp/tg-config-test/holder.token"),
    ("max_message_bytes", "65536", "65536"),
    ("max_streams_per_connection", "100", "100"),
    ("max_guards_per_holder", "50", "50"),
    ("hold_first_message_timeout", '"2s"', "2s"),
    ("etcd_prefix", '"/guards/"', "/guards/"),
    ("etcd_lease_ttl", '"7s"', "7s"),
    ("etcd_timeout", '"3s"', "3s"),
    ("etcd_ca", '"/tmp/tg-config-test/ca.pem"', "/tmp/tg-config-test/ca.pem"),
    ("etcd_cert", '"/tmp/tg-config-test/cert.pem"', "/tmp/tg-config-test/cert.pem"),
    ("etcd_key", '"/tmp/tg-config-test/key.pem"', "/tmp/tg-config-test/key.pem"),
    ("etcd_user", '"taskguard"', "taskguard"),
    ("etcd_password_file", '"/tmp/tg-config-test/op.token"', "/tmp/tg-config-test/op.token"),
]


def test_every_setting_has_a_toml_key_an_environment_variable_and_a_flag(tmp_path: Path) -> None:
    assert sorted(name for name, _, _ in EVERY_SETTING) == TOML_NAMES
    booleans = {
        "abandoned_requires_approval",
        "expired_requires_approval",
        "telemetry_console",
        "allow_remote",
        "allow_supersede",
    }
    files = Path("/tmp/tg-config-test")
    files.mkdir(exist_ok=True)
    for name in ("cert.pem", "key.pem", "ca.pem", "op.token", "holder.token"):
        (files / name).write_text(name)

    from_toml = load(tmp_path, toml="".join(f"{name} = {literal}\n" for name, literal, _ in EVERY_SETTING))
    from_env = load(tmp_path, env={f"TASKGUARD_{name.upper()}": text for name, _, text in EVERY_SETTING})
    from_flags = load(
        tmp_path,
        flags=tuple(
            f"--{name.replace('_', '-')}" + ("" if name in booleans else f"={text}") for name, _, text in EVERY_SETTING
        ),
    )

    expected = Settings(
        listen="127.0.0.1:0",
        db=Path("/var/lib/taskguard/tg.db"),
        store="memory",
        default_ttl_s=60.0,
        max_ttl_s=7200.0,
        stale_after_s=180.0,
        resume_grace_s=4.0,
        abandoned_requires_approval=True,
        expired_requires_approval=True,
        on_conflict=ConflictPolicy.JOIN,
        failure=FailureHandling.REOPEN,
        lock_delay_s=15.0,
        max_hold_s=7200.0,
        max_queue=12,
        max_wait_s=90.0,
        allow_supersede=True,
        supersede_grace_s=45.0,
        event_retention_count=5,
        event_retention_age_s=21600.0,
        watch_buffer=7,
        max_watchers=8,
        max_watchers_per_connection=3,
        shutdown_grace_s=9.0,
        log_level="error",
        otlp_endpoint="http://collector:4317",
        telemetry_console=True,
        socket_mode=0o660,
        socket_group="taskguard",
        allow_remote=True,
        health_listen="0.0.0.0:8081",
        metrics_listen="0.0.0.0:9464",
        metrics_token_file=files / "metrics.token",
        tls_cert=files / "cert.pem",
        tls_key=files / "key.pem",
        tls_client_ca=files / "ca.pem",
        operator_uids=(0, 1000),
        operator_token="op-secret",
        operator_token_file=files / "op.token",
        holder_token="holder-secret",
        holder_token_file=files / "holder.token",
        max_message_bytes=65536,
        max_streams_per_connection=100,
        max_guards_per_holder=50,
        hold_first_message_timeout_s=2.0,
        etcd_prefix="/guards/",
        etcd_lease_ttl_s=7.0,
        etcd_timeout_s=3.0,
        etcd_ca=files / "ca.pem",
        etcd_cert=files / "cert.pem",
        etcd_key=files / "key.pem",
        etcd_user="taskguard",
        etcd_password_file=files / "op.token",
    )
    assert from_toml == from_env == from_flags == expected
    assert "op-secret" not in repr(expected) and "holder-secret" not in repr(expected)


# --- the client commands' token ----------------------------------------------------------------


def test_client_token_comes_from_the_flag_then_the_environment_then_a_file(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    from_file = {"TASKGUARD_TOKEN_FILE": str(token_file)}

    assert config.client_token(None, None, environ={}) is None
    assert config.client_token("from-flag", None, environ={"TASKGUARD_TOKEN": "from-env", **from_file}) == "from-flag"
    assert config.client_token(None, None, environ={"TASKGUARD_TOKEN": "from-env", **from_file}) == "from-env"
    assert config.client_token(None, None, environ=from_file) == "from-file"
    assert config.client_token(None, str(token_file), environ={}) == "from-file"
    # As before the reading moved here: $TASKGUARD_TOKEN itself is taken before any token file, even --token-file's.
    assert config.client_token(None, str(token_file), environ={"TASKGUARD_TOKEN": "from-env"}) == "from-env"


# --- /metrics ----------------------------------------------------------------------------------


def test_metrics_are_off_unless_metrics_listen_is_set(tmp_path: Path) -> None:
    settings = load(tmp_path)

    assert settings.metrics_listen == "" and not settings.telemetry.prometheus and not settings.telemetry.enabled


def test_metrics_listen_turns_on_the_prometheus_reader_with_a_token_beside_the_database(tmp_path: Path) -> None:
    settings = load(tmp_path, toml='metrics_listen = "127.0.0.1:9464"\ndb = "/var/lib/taskguard/tg.db"\n')

    assert settings.telemetry.prometheus and settings.telemetry.enabled
    assert config.metrics_address(settings) == ("127.0.0.1", 9464)
    assert settings.metrics_token_path == Path("/var/lib/taskguard/metrics.token")
    chosen = load(tmp_path, flags=("--metrics-listen=[::1]:0", "--metrics-token-file=/etc/tg/m.token"))
    assert config.metrics_address(chosen) == ("::1", 0)
    assert chosen.metrics_token_path == Path("/etc/tg/m.token")


@pytest.mark.parametrize("listen", ["0.0.0.0:9464", "[::]:9464", "prometheus.example:9464"])
def test_metrics_listen_beyond_loopback_needs_allow_remote(tmp_path: Path, listen: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load(tmp_path, toml=f'metrics_listen = "{listen}"\n')

    host = listen.rpartition(":")[0].strip("[]")
    assert str(refused.value) == (
        f"metrics_listen: {host} is not a loopback address; /metrics is plain HTTP, so it listens on loopback "
        "unless allow_remote is set"
    )
    assert load(tmp_path, toml=f'metrics_listen = "{listen}"\nallow_remote = true\n').metrics_listen == listen


def test_a_metrics_port_out_of_range_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^metrics_listen: port must be 0\.\.65535, not 70000$"):
        load(tmp_path, env={"TASKGUARD_METRICS_LISTEN": "127.0.0.1:70000"})
