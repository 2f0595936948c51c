"""deploy/: the Grafana dashboard and the Prometheus alerts read only what /metrics serves,
and every alert fires on a bad series and stays silent on a good one (promtool)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from promql_names import metric_names
from test_monitor import (
    MONITOR,
    fill,
    free_port,
    make_settings,
    scrape,
    server_free_environ,
    wait_for,
    write_config,
)

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "ratebox.json"
ALERTS = ROOT / "deploy" / "prometheus" / "ratebox-alerts.yml"
ALERT_TESTS = ROOT / "deploy" / "prometheus" / "ratebox-alerts.test.yml"
#: Made by Prometheus itself for every scrape target, never served by /metrics.
SYNTHETIC = {"up"}
PANEL_TYPES = {"timeseries", "stat"}


def dashboard_exprs() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"] for p in panels for t in p["targets"]]


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        message = "promtool missing: apt-get install prometheus"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)  # CI installs it: missing there is a broken CI, not a skip
        pytest.skip(message)
    return found


# -- the files ----------------------------------------------------------------------------------


def test_the_dashboard_is_importable_into_grafana_10() -> None:
    board = json.loads(DASHBOARD.read_text())
    assert board["schemaVersion"] >= 36 and board["uid"] and board["title"]
    assert [i["name"] for i in board["__inputs"]] == ["DS_PROMETHEUS"]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        assert panel["type"] in PANEL_TYPES and panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}"
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"])


def test_every_alert_has_a_duration_a_severity_and_a_summary_saying_what_to_do() -> None:
    rules = alert_rules()
    assert {r["alert"] for r in rules} >= {
        "RateboxBacklogGrowing",
        "RateboxEntryPendingTooLong",
        "RateboxDeadLetters",
        "RateboxErrorRateHigh",
        "RateboxChildCrashLooping",
        "RateboxSupervisorDown",
        "RateboxMonitorDown",
        "RateboxRedisDown",
        "RateboxPostgresDown",
    }
    for rule in rules:
        assert rule["for"] and rule["labels"]["severity"] in {"warning", "critical"}
        assert ". " in rule["annotations"]["summary"], rule["alert"]  # what, then what to do


def test_every_alert_is_unit_tested() -> None:
    tested = {
        case["alertname"]
        for test in yaml.safe_load(ALERT_TESTS.read_text())["tests"]
        for case in test["alert_rule_test"]
    }
    assert tested == {r["alert"] for r in alert_rules()}


def test_promtool_checks_the_rules() -> None:
    done = subprocess.run(
        [promtool(), "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_unit_tests_fire_on_bad_series_and_not_on_good_ones() -> None:
    done = subprocess.run(
        [promtool(), "test", "rules", ALERT_TESTS.name],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ALERT_TESTS.parent,
    )
    assert done.returncode == 0, done.stdout + done.stderr


# -- against a live /metrics ----------------------------------------------------------------------


@pytest.fixture
def served(names, redis_client, redis_url, pg_schema_dsn, tmp_path) -> set[str]:
    """Every sample name a real monitor serves over real servers with a supervisor's status."""
    fill(make_settings(names), redis_client, redis_url, pg_schema_dsn)
    status = tmp_path / "status.json"
    child = {"pid": os.getpid(), "state": "running", "restarts": 1, "started_at": time.time()}
    status.write_text(
        json.dumps(
            {
                "supervisor_pid": os.getpid(),
                "started_at": time.time(),
                "workers": {"desired": 1, "running": 1, "autoscale": True, "reason": "start"},
                "children": [
                    {"name": "worker_001", "role": "worker", **child},
                    {"name": "sweeper", "role": "sweeper", **child},
                ],
            }
        )
    )
    port = free_port()
    path = write_config(
        tmp_path, redis_url, pg_schema_dsn, names, metrics_listen=f"127.0.0.1:{port}"
    )
    monitor = subprocess.Popen(
        [*MONITOR, "-c", str(path), "continuous", "0.5", "--metrics", "--status", str(status)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=server_free_environ(),
    )
    try:
        text = wait_for(lambda: (t := scrape(port)) and "ratebox_child_up" in t and t, 60)
    finally:
        monitor.send_signal(signal.SIGTERM)
        try:
            monitor.wait(timeout=15)
        except subprocess.TimeoutExpired:
            monitor.kill()
            monitor.wait()
    assert text, "the monitor served no /metrics"
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


def test_the_dashboard_reads_only_metrics_that_are_served(served: set[str]) -> None:
    used = set().union(*(metric_names(e) for e in dashboard_exprs()))
    assert "ratebox_processing_seconds_bucket" in used and "ratebox_group_lag" in used
    assert used - served - SYNTHETIC == set()


def test_the_alerts_read_only_metrics_that_are_served(served: set[str]) -> None:
    used = set().union(*(metric_names(r["expr"]) for r in alert_rules()))
    assert "ratebox_group_oldest_pending_seconds" in used
    assert used - served - SYNTHETIC == set()
