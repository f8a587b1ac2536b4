"""The etcd store's settings checked at start: a cut-off sidecar must be able to notice in time."""

from __future__ import annotations

import argparse

import pytest

from taskguard import config
from taskguard.config import ConfigError

ENVIRON = {"XDG_RUNTIME_DIR": "/run/user/4242", "XDG_DATA_HOME": "/srv/data", "HOME": "/home/tester"}


def _load(*flags: str) -> config.Settings:
    parser = argparse.ArgumentParser(prog="taskguard serve")
    config.add_arguments(parser)
    return config.load(parser.parse_args(["--store", "etcd://127.0.0.1:2379", *flags]), environ=ENVIRON)


@pytest.mark.parametrize(
    ("ttl", "timeout"),
    [("3s", "2s"), ("2s", "1.5s"), ("10s", "7s"), ("1s", "1s")],
)
def test_an_etcd_timeout_that_leaves_no_room_before_the_lease_lapses_is_refused_naming_the_settings(
    ttl: str, timeout: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        _load("--etcd-lease-ttl", ttl, "--etcd-timeout", timeout)
    message = str(refused.value)
    assert "etcd_timeout" in message and "etcd_lease_ttl" in message and "keep-alive interval" in message


@pytest.mark.parametrize(("ttl", "timeout"), [("10s", "5s"), ("2s", "1s"), ("4s", "2.5s"), ("60s", "30s")])
def test_an_etcd_timeout_below_the_lease_ttl_less_the_keepalive_interval_is_accepted(ttl: str, timeout: str) -> None:
    settings = _load("--etcd-lease-ttl", ttl, "--etcd-timeout", timeout)
    assert settings.etcd.timeout_s + settings.etcd.lease_ttl_s / 3 < settings.etcd.lease_ttl_s


def test_the_defaults_pass_and_the_check_is_only_for_the_etcd_store() -> None:
    _load()
    parser = argparse.ArgumentParser(prog="taskguard serve")
    config.add_arguments(parser)
    config.load(parser.parse_args(["--etcd-lease-ttl", "1s", "--etcd-timeout", "5s"]), environ=ENVIRON)
