"""``--metrics-listen``: a real sidecar's /metrics, scraped over HTTP and read with Prometheus' own text parser.

One sidecar for the module (a rule gives ``careful:*`` keys a lock-delay); ``scenario`` scrapes it, drives
acquisitions, each kind of refusal and releases, and scrapes again, so the tests compare two real scrapes.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from taskguard.clock import ManualClock
from taskguard.telemetry import ACQUIRE_BUCKETS_S, RUN_BUCKETS_S
from taskguard_client import AsyncClient, Conflict, Lease, Outcome, RunStatus
from taskguard_client.v1 import taskguard_pb2 as pb
from tests.conftest import InProcessFactory
from tests.support import ROOT, InProcess, SidecarProcess

MONITORING = ROOT / "deploy" / "monitoring"
RULES = '[[rules]]\nname = "careful"\nmatch = "careful:*"\nlock_delay = "1h"\n'
# Series Prometheus makes itself, not the sidecar.
PROMETHEUS_OWN = {"up"}


@dataclass(frozen=True)
class Scrape:
    samples: list[Sample]
    types: dict[str, str]

    def value(self, name: str, **labels: str) -> float:
        found = [
            s.value for s in self.samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        ]
        assert len(found) == 1, f"{name}{labels}: {len(found)} samples"
        return found[0]

    def names(self) -> set[str]:
        return {sample.name for sample in self.samples}


def http_get(url: str, token: str | None, host: str | None = None) -> tuple[int, dict[str, str], str]:
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    if host is not None:
        request.add_header("Host", host)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read().decode()


def scrape(sidecar: SidecarProcess, token: str) -> Scrape:
    status, headers, body = http_get(sidecar.metrics_url, token)
    assert status == 200, body
    assert headers["Content-Type"].startswith("text/plain; version=")  # the Prometheus text format
    families = list(text_string_to_metric_families(body))
    return Scrape([sample for family in families for sample in family.samples], {f.name: f.type for f in families})


@pytest.fixture(scope="module")
def metered() -> Iterator[SidecarProcess]:
    workdir = Path(tempfile.mkdtemp(prefix="tg-metrics-", dir="/tmp"))
    (workdir / "taskguard.toml").write_text(RULES)
    sidecar = SidecarProcess(workdir, ("--config", str(workdir / "taskguard.toml"), "--metrics-listen", "127.0.0.1:0"))
    sidecar.start()
    yield sidecar
    sidecar.close()
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def token(metered: SidecarProcess) -> str:
    return (metered.workdir / "metrics.token").read_text().strip()


@dataclass(frozen=True)
class Scenario:
    before: Scrape
    after: Scrape
    approved: Scrape


@pytest.fixture(scope="module")
def scenario(metered: SidecarProcess, token: str) -> Scenario:
    before = scrape(metered, token)

    async def drive() -> Scrape:
        async with AsyncClient(metered.address) as client:
            done = await client.acquire("m::done")
            duplicate = await client.acquire("m::done", on_conflict="return")
            assert isinstance(duplicate, Conflict) and duplicate.outcome is Outcome.ALREADY_RUNNING
            await client.release(done.lease_id, RunStatus.SUCCEEDED)
            failed = await client.acquire("m::failed")
            await client.release(failed.lease_id, RunStatus.FAILED, "boom")
            retry = await client.acquire("m::failed", on_conflict="return")
            assert isinstance(retry, Conflict) and retry.outcome is Outcome.RETRY_REQUIRES_APPROVAL
            await client.acquire("careful:m::lost")
            await client.force_release("careful:m::lost", "ops", "stuck")
            delayed = await client.acquire("careful:m::lost", on_conflict="return")
            assert isinstance(delayed, Conflict) and delayed.outcome is Outcome.LOCK_DELAYED
            # Refusals are written with the next batch: this acquisition's commit carries them, and its answer
            # comes after their events were published.
            assert isinstance(await client.acquire("m::running"), Lease)
            after = scrape(metered, token)
            await client.approve_retry("m::failed", "ops", "fixed")
        return after

    after = asyncio.run(drive())
    return Scenario(before, after, scrape(metered, token))


def _delta(scenario: Scenario, name: str, **labels: str) -> float:
    return scenario.after.value(name, **labels) - scenario.before.value(name, **labels)


def test_counters_count_acquisitions_and_each_kind_of_refusal(scenario: Scenario) -> None:
    assert _delta(scenario, "taskguard_acquisitions_total") == 4
    assert _delta(scenario, "taskguard_duplicates_refused_total") == 1
    assert _delta(scenario, "taskguard_retries_refused_total") == 1
    assert _delta(scenario, "taskguard_lock_delays_refused_total") == 1
    for outcome in ("ALREADY_RUNNING", "RETRY_REQUIRES_APPROVAL", "LOCK_DELAYED"):
        assert _delta(scenario, "taskguard_refusals_total", taskguard_outcome=outcome) == 1, outcome
    assert scenario.after.types["taskguard_refusals"] == "counter"
    assert scenario.approved.value("taskguard_retry_approvals_total") == 1


def test_gauges_show_running_and_awaiting_guards_and_the_database_size(
    scenario: Scenario, metered: SidecarProcess
) -> None:
    assert scenario.before.value("taskguard_guards_running") == 0
    assert scenario.after.value("taskguard_guards_running") == 1
    assert scenario.after.value("taskguard_guards_stale") == 0
    assert scenario.before.value("taskguard_guards_awaiting_approval") == 0
    assert scenario.after.value("taskguard_guards_awaiting_approval") == 1
    assert scenario.approved.value("taskguard_guards_awaiting_approval") == 0
    size = scenario.after.value("taskguard_store_size_bytes")
    assert 0 < size and metered.db.stat().st_size <= size


def test_histograms_have_seconds_buckets_for_the_wait_and_the_hold(scenario: Scenario) -> None:
    for name, bounds, count in (
        ("taskguard_acquire_duration_seconds", ACQUIRE_BUCKETS_S, 7),
        ("taskguard_run_duration_seconds", RUN_BUCKETS_S, 3),
    ):
        assert scenario.after.types[name] == "histogram"
        buckets = [s for s in scenario.after.samples if s.name == f"{name}_bucket"]
        assert {float(s.labels["le"]) for s in buckets} == {*bounds, float("inf")}, name
        counts = [s for s in scenario.after.samples if s.name == f"{name}_count"]
        assert sum(s.value for s in counts) == count, name
        before = [s for s in scenario.before.samples if s.name == f"{name}_count"]
        assert not before, f"{name}: nothing was measured before the scenario"
    # By how a run ended, and by what the caller heard.
    ended = {
        s.labels["taskguard_state"] for s in scenario.after.samples if s.name == "taskguard_run_duration_seconds_count"
    }
    assert ended == {"SUCCEEDED", "FAILED", "CANCELLED"}
    refused = scenario.after.value("taskguard_acquire_duration_seconds_count", taskguard_outcome="LOCK_DELAYED")
    assert refused == 1


def test_the_start_line_names_the_metrics_url_and_the_token_file_is_private(metered: SidecarProcess) -> None:
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/metrics", metered.metrics_url)
    mode = (metered.workdir / "metrics.token").stat().st_mode
    assert stat.S_IMODE(mode) == 0o600


def test_a_scrape_needs_the_token(metered: SidecarProcess, token: str) -> None:
    for presented in (None, "not-the-token-at-all", token[:-1]):
        status, headers, _ = http_get(metered.metrics_url, presented)
        assert status == 401, presented
        assert headers["WWW-Authenticate"] == 'Bearer realm="taskguard-metrics"'
    assert http_get(metered.metrics_url.removesuffix("/metrics") + "/", token)[0] == 404


def test_a_scrape_under_another_host_name_is_refused_on_loopback(metered: SidecarProcess, token: str) -> None:
    port = metered.metrics_url.split(":")[2].split("/")[0]
    status, _, body = http_get(metered.metrics_url, token, host=f"attacker.example:{port}")
    assert status == 421 and "loopback names only" in body
    assert http_get(metered.metrics_url, token, host=f"localhost:{port}")[0] == 200


def _serve(workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``taskguard serve`` that is expected to refuse to start."""
    command = [
        sys.executable,
        "-m",
        "taskguard",
        "serve",
        "--listen",
        f"unix:{workdir}/x.sock",
        "--db",
        f"{workdir}/x.db",
    ]
    return subprocess.run([*command, *args], capture_output=True, text=True, cwd=ROOT, timeout=60)


def test_metrics_beyond_loopback_need_allow_remote(tmp_path: Path) -> None:
    refused = _serve(tmp_path, "--metrics-listen", "0.0.0.0:0")

    assert refused.returncode == 2
    assert "metrics_listen: 0.0.0.0 is not a loopback address; /metrics is plain HTTP" in refused.stderr
    assert "unless allow_remote is set" in refused.stderr


def test_a_token_file_others_may_read_is_refused(tmp_path: Path) -> None:
    token_file = tmp_path / "metrics.token"
    token_file.write_text("a" * 32 + "\n")
    token_file.chmod(0o644)

    refused = _serve(tmp_path, "--metrics-listen", "127.0.0.1:0", "--metrics-token-file", str(token_file))

    assert refused.returncode == 1
    assert f"metrics token file {token_file}: group or others may open it (mode 0644)" in refused.stderr


@pytest.mark.slow
def test_allow_remote_serves_beyond_loopback_without_the_host_check(tmp_path: Path) -> None:
    token_file = tmp_path / "scrape.token"
    token_file.write_text("s3cret-token-for-prometheus\n")
    token_file.chmod(0o600)
    sidecar = SidecarProcess(
        tmp_path, ("--metrics-listen", "0.0.0.0:0", "--allow-remote", "--metrics-token-file", str(token_file))
    )
    sidecar.start()
    try:
        port = sidecar.metrics_url.rsplit(":", 1)[1].split("/")[0]
        url = f"http://127.0.0.1:{port}/metrics"
        status, _, body = http_get(url, "s3cret-token-for-prometheus", host=f"taskguard.example:{port}")
        assert status == 200 and "taskguard_guards_running" in body
        assert http_get(url, None)[0] == 401
        assert "beyond loopback in plain HTTP" in sidecar.log()
    finally:
        sidecar.close()


# --- drift: what deploy/monitoring uses is what the sidecar exports ---------------------------------


def _expressions() -> dict[str, str]:
    """Every PromQL expression of the alert rules and the Grafana dashboard, by where it is."""
    found: dict[str, str] = {}
    rules = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            found[f"alerts.yml {rule['alert']}"] = rule["expr"]
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            found[f"grafana-dashboard.json {panel['title']!r} {target['refId']}"] = target["expr"]
    return found


def _metric_names(expression: str) -> set[str]:
    # Strings (label values, durations in [..]) and label names inside {...} or by (...) are not metrics.
    bare = re.sub(r'"[^"]*"', '""', expression)
    bare = re.sub(r"\{[^}]*\}", "{}", bare)
    bare = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", bare)
    bare = re.sub(r"\[[^\]]*\]", "[]", bare)
    return {
        name
        for name in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", bare)
        if name.startswith("taskguard_") or name in PROMETHEUS_OWN
    }


def test_every_metric_the_alerts_and_the_dashboard_use_is_exported(scenario: Scenario) -> None:
    exported = scenario.after.names() | PROMETHEUS_OWN
    expressions = _expressions()
    assert len(expressions) >= 8
    used: set[str] = set()
    for where, expression in expressions.items():
        names = _metric_names(expression)
        assert names, f"{where}: {expression!r} uses no metric"
        missing = names - exported
        assert not missing, f"{where} uses {sorted(missing)}, which the sidecar does not export"
        used |= names
    # Every instrument an operator asked for is on the dashboard or in an alert.
    for name in (
        "taskguard_guards_awaiting_approval",
        "taskguard_guards_stale",
        "taskguard_guards_running",
        "taskguard_refusals_total",
        "taskguard_acquire_duration_seconds_bucket",
        "taskguard_run_duration_seconds_bucket",
        "taskguard_store_size_bytes",
        "up",
    ):
        assert name in used, name


def test_the_drift_check_sees_a_metric_the_sidecar_does_not_export() -> None:
    assert _metric_names('sum by (job) (rate(taskguard_nonsense_total{job="taskguard"}[5m])) > 0') == {
        "taskguard_nonsense_total"
    }
    assert _metric_names("histogram_quantile(0.99, sum by (le) (rate(taskguard_x_bucket[5m])))") == {
        "taskguard_x_bucket"
    }


# --- in-process sidecars: a clock the test moves, and a restart ---------------------------------------


async def _scrape_in_process(harness: InProcess) -> Scrape:
    metrics = harness.sidecar.metrics
    assert metrics is not None
    token = harness.sidecar.settings.metrics_token_path.read_text().strip()
    status, _, body = await asyncio.to_thread(http_get, metrics.url, token)
    assert status == 200, body
    families = list(text_string_to_metric_families(body))
    return Scrape([sample for family in families for sample in family.samples], {f.name: f.type for f in families})


async def test_the_stale_gauge_counts_running_guards_silent_for_stale_after(
    in_process_factory: InProcessFactory, key: str
) -> None:
    harness = await in_process_factory(ManualClock(), metrics_listen="127.0.0.1:0", stale_after_s=30.0)
    async with AsyncClient(harness.address) as client:
        await client.acquire(f"{key}-quiet", ttl=3600)
        busy = await client.acquire(f"{key}-busy", ttl=3600)
        fresh = await _scrape_in_process(harness)
        await harness.advance(31)
        await client.renew(busy.lease_id)
        silent = await _scrape_in_process(harness)

    assert (fresh.value("taskguard_guards_running"), fresh.value("taskguard_guards_stale")) == (2, 0)
    assert (silent.value("taskguard_guards_running"), silent.value("taskguard_guards_stale")) == (2, 1)


async def test_guards_awaiting_approval_are_counted_after_a_restart(
    in_process_factory: InProcessFactory, key: str
) -> None:
    first = await in_process_factory(metrics_listen="127.0.0.1:0")
    async with AsyncClient(first.address) as client:
        for name in ("a", "b"):
            lease = await client.acquire(f"{key}-{name}")
            await client.release(lease.lease_id, RunStatus.FAILED, "boom")
        await client.approve_retry(f"{key}-b", "ops", "fixed")
    assert (await _scrape_in_process(first)).value("taskguard_guards_awaiting_approval") == 1
    await first.close()

    # A new sidecar on the same database knows of them only from its store.
    again = await in_process_factory(metrics_listen="127.0.0.1:0")
    assert (await _scrape_in_process(again)).value("taskguard_guards_awaiting_approval") == 1


# --- a real Prometheus scrapes it --------------------------------------------------------------------

PROMETHEUS = ROOT / ".cache" / "prometheus" / "usr" / "bin" / "prometheus"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _prometheus_api(base: str, path: str) -> Any:
    with urllib.request.urlopen(f"{base}/api/v1/{path}", timeout=10) as response:
        answer = json.loads(response.read())
    assert answer["status"] == "success", answer
    return answer["data"]


@pytest.mark.slow
def test_prometheus_scrapes_it_with_the_sample_job_and_loads_the_alert_rules(
    metered: SidecarProcess, token: str, tmp_path: Path
) -> None:
    """Debian's Prometheus (unpacked by .ci/dev.py) on deploy/monitoring/prometheus.yml, pointed at this sidecar."""
    if not PROMETHEUS.exists():
        if os.environ.get("CI"):
            pytest.fail("Prometheus is missing: .ci/dev.py setup unpacks it into .cache/prometheus")
        pytest.skip("Prometheus is missing: run python3 .ci/dev.py setup")
    token_copy = tmp_path / "taskguard-metrics.token"
    token_copy.write_text(token + "\n")
    token_copy.chmod(0o600)
    sample = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    sample["global"]["scrape_interval"] = "1s"
    sample["rule_files"] = [str(MONITORING / "alerts.yml")]
    (job,) = sample["scrape_configs"]
    job["authorization"]["credentials_file"] = str(token_copy)
    job["static_configs"] = [{"targets": [metered.metrics_url.removeprefix("http://").removesuffix("/metrics")]}]
    config_file = tmp_path / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(sample))
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    command = [
        str(PROMETHEUS),
        f"--config.file={config_file}",
        f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    with (tmp_path / "prometheus.log").open("wb") as log:
        prometheus = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 60
        target: dict[str, Any] = {}
        while time.monotonic() < deadline and target.get("health") != "up":
            assert prometheus.poll() is None, (tmp_path / "prometheus.log").read_text()
            try:
                targets = _prometheus_api(base, "targets")["activeTargets"]
            except OSError:
                targets = []  # not listening yet
            target = targets[0] if targets else {}
            if target.get("health") != "up":
                time.sleep(0.2)  # the next scrape comes each second; this only paces the polling
        assert target.get("health") == "up", (target, (tmp_path / "prometheus.log").read_text())
        assert target["labels"]["job"] == "taskguard"

        running = _prometheus_api(base, "query?query=taskguard_guards_running")["result"]
        assert [float(series["value"][1]) for series in running] == [
            scrape(metered, token).value("taskguard_guards_running")
        ]
        rules = [rule for group in _prometheus_api(base, "rules")["groups"] for rule in group["rules"]]
        assert {rule["name"] for rule in rules} == {
            "TaskGuardSidecarDown",
            "TaskGuardSidecarMissing",
            "TaskGuardGuardsAwaitingApproval",
            "TaskGuardStaleGuards",
        }
        assert all(rule["health"] in ("ok", "unknown") for rule in rules), rules
    finally:
        prometheus.terminate()
        prometheus.wait(timeout=30)


async def test_a_joined_hold_streams_wait_for_the_winner_is_a_histogram_in_seconds(
    in_process_factory: InProcessFactory, key: str
) -> None:
    harness = await in_process_factory(metrics_listen="127.0.0.1:0")
    async with AsyncClient(harness.address) as client:
        winner = await client.acquire(key)
        join = harness.stub.Hold()
        await join.write(pb.HoldRequest(acquire=pb.AcquireRequest(task_key=key, on_conflict=pb.ON_CONFLICT_JOIN)))
        assert (await asyncio.wait_for(join.read(), 10)).outcome == pb.ACQUIRE_OUTCOME_ALREADY_RUNNING
        await client.release(winner.lease_id, RunStatus.FAILED, "exit 2")
        assert (await asyncio.wait_for(join.read(), 10)).event == pb.HOLD_EVENT_WINNER_FINISHED
    scraped = await _scrape_in_process(harness)

    assert scraped.types["taskguard_join_wait_duration_seconds"] == "histogram"
    assert scraped.value("taskguard_join_wait_duration_seconds_count", taskguard_state="FAILED") == 1
    bounds = {float(s.labels["le"]) for s in scraped.samples if s.name == "taskguard_join_wait_duration_seconds_bucket"}
    assert bounds == {*RUN_BUCKETS_S, float("inf")}
