"""deploy/monitoring: the alert rules load in Prometheus' own promtool and pass their unit tests; the dashboard is sane.

promtool comes from Debian's prometheus package, which ``.ci/dev.py setup`` unpacks into .cache/prometheus
(tests/integration/test_metrics.py checks that every metric these files use is one the sidecar exports).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.support import ROOT

MONITORING = ROOT / "deploy" / "monitoring"
ALERTS = ("TaskGuardSidecarDown", "TaskGuardSidecarMissing", "TaskGuardGuardsAwaitingApproval", "TaskGuardStaleGuards")


@pytest.fixture(scope="module")
def promtool() -> Path:
    unpacked = ROOT / ".cache" / "prometheus" / "usr" / "bin" / "promtool"
    found = unpacked if unpacked.exists() else shutil.which("promtool")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing: .ci/dev.py setup unpacks it into .cache/prometheus")
        pytest.skip("promtool is missing: run python3 .ci/dev.py setup")
    return Path(found)


def _promtool(promtool: Path, *args: str, cwd: Path = MONITORING) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(promtool), *args], capture_output=True, text=True, cwd=cwd, timeout=60)


def test_the_alert_rules_load(promtool: Path) -> None:
    checked = _promtool(promtool, "check", "rules", "alerts.yml")

    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in checked.stdout


def test_the_alert_rules_pass_their_unit_tests(promtool: Path) -> None:
    tested = _promtool(promtool, "test", "rules", "alerts.test.yml")

    assert tested.returncode == 0, tested.stdout + tested.stderr
    rules = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    assert [rule["alert"] for group in rules["groups"] for rule in group["rules"]] == list(ALERTS)
    tests = (MONITORING / "alerts.test.yml").read_text()
    for alert in ALERTS:
        assert f"alertname: {alert}" in tests, f"{alert} has no promtool test"


def test_the_unit_tests_catch_an_alert_that_fires_too_early(promtool: Path, tmp_path: Path) -> None:
    shutil.copy(MONITORING / "alerts.test.yml", tmp_path)
    hasty = (MONITORING / "alerts.yml").read_text().replace("for: 15m", "for: 1m")
    (tmp_path / "alerts.yml").write_text(hasty)

    tested = _promtool(promtool, "test", "rules", "alerts.test.yml", cwd=tmp_path)

    assert tested.returncode != 0
    assert "TaskGuardGuardsAwaitingApproval" in tested.stdout + tested.stderr


def test_the_grafana_dashboard_is_one_prometheus_dashboard_with_distinct_panels() -> None:
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())

    panels = dashboard["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    assert len({panel["title"] for panel in panels}) == len(panels)
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"] and all('job="taskguard"' in target["expr"] for target in panel["targets"])
    variables = {variable["name"] for variable in dashboard["templating"]["list"]}
    assert variables == {"datasource", "instance"}


def test_the_sample_scrape_job_is_a_valid_prometheus_config(promtool: Path, tmp_path: Path) -> None:
    sample = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    (job,) = sample["scrape_configs"]
    assert job["job_name"] == "taskguard"  # what the alert rules and the dashboard select
    assert job["authorization"]["type"] == "Bearer"
    # promtool checks that the token file exists: a stand-in for the sidecar's, and the rules by their path.
    token = tmp_path / "taskguard-metrics.token"
    token.write_text("x" * 32 + "\n")
    job["authorization"]["credentials_file"] = str(token)
    sample["rule_files"] = [str(MONITORING / "alerts.yml")]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(sample))

    checked = _promtool(promtool, "check", "config", "prometheus.yml", cwd=tmp_path)

    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in checked.stdout
