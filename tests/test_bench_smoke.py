"""The benchmark command on a small fleet: real services, every device ACTIVE in the database."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_bench_small_fleet_reports_every_row_and_all_devices_active(repo_root: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--devices", "20", "--concurrency", "10",
         "--first-boot-samples", "3", "--agent-samples", "1", "--json"],
        cwd=repo_root, capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads(run.stdout)
    results = report["results"]
    # The benchmark's own check against the database, for both runs.
    assert results["e2e_active_in_db"] == 20 and results["e2e_failures"] == []
    assert results["scaled_active_in_db"] == 20
    assert results["ceiling_per_s"] > 0 and results["e2e_per_s"] > 0
    assert 0 < results["e2e_fraction_of_ceiling"] < 1
    assert len(results["first_boot_samples_s"]) == 3
    assert results["e2e_rss_peak_mb"] > 0
    # Where the CPU went, per process, and the database commands per device (both runs).
    for phase, servers in (("e2e", 1), ("scaled", 2)):
        cpu = results[f"{phase}_cpu_ms_per_device"]
        names = {f"provision-server {n}" for n in range(1, servers + 1)}
        assert names | {"secantusd-py (database)", "mosquitto", "total"} <= set(cpu), cpu
        assert all(cpu[name] > 0 for name in names) and cpu["total"] > 0
        assert results[f"{phase}_db_commands_per_device"] >= 2
    assert results["service_per_s"] > 0 and results["db_commands_per_device"] >= 3
    # Every certificate of the runs is in the ledger and accounted for.
    assert results["audit"]["clean"], results["audit"]
    assert results["audit"]["certificates"] >= 40 and results["audit"]["current"] >= 40
    assert len(results["agent_boot_samples_s"]) == 1 and results["agent_rss_median_mb"] > 5
    p50, p95, p99 = (results[f"latency_to_certificate_p{p}_ms"] for p in (50, 95, 99))
    assert 0 < p50 <= p95 <= p99
    metrics = [row["metric"] for row in report["rows"]]
    for needle in ("CSR check + sign", "end to end, 20 devices", "first boot to ACTIVE",
                   "server RSS", "scaling ratio", "latency token -> certificate",
                   "server logic + database", "provision-agent RSS",
                   "CPU per device, 1 server: mosquitto",
                   "database commands per device, 2 servers"):  # fmt: skip
        assert any(needle in m for m in metrics), (needle, metrics)
    # The human-readable table went to stderr with the same rows, progress before it.
    assert "devices ACTIVE in database" in run.stderr
    assert "20/20" in run.stderr
    assert "[bench " in run.stderr


@pytest.mark.slow
def test_bench_remote_database_and_registered_fleet_options(repo_root: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--devices", "10", "--concurrency", "5",
         "--first-boot-samples", "2", "--agent-samples", "1", "--no-scaling",
         "--db-rtt-ms", "5", "--registered", "300", "--json"],
        cwd=repo_root, capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads(run.stdout)
    results = report["results"]
    assert "5 ms RTT" in report["machine"]["database"]
    assert results["db_rtt_ms"] == 5 and "scaling_ratio" not in results
    assert results["registered"] == 300 and results["large_active_in_db"] == 10
    assert results["large_server_start_s"] > 0 and results["large_ratio"] > 0
    metrics = [row["metric"] for row in report["rows"]]
    assert any("1 server start with 300 retained statuses" in m for m in metrics), metrics


@pytest.mark.slow
def test_broker_scale_bench_measures_every_row(repo_root: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "bench.broker_scale", "--devices", "200", "--changes", "2",
         "--sustained", "2", "--json"],
        cwd=repo_root, capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    (result,) = json.loads(run.stdout)
    assert result["devices"] == 200 and result["user_blocks"] == 20
    assert result["crl_serials"] == 100 and result["broker_rss_mb"] > 0
    assert len(result["rule_change_s"]) == 2 and len(result["revocation_s"]) == 2
    assert result["sustained_rule_change_s"] and result["sustained_writes"] > 0
    assert max(result["rule_change_s"] + result["revocation_s"]) < 10
    assert result["rule_changes_reloaded"] == 0  # rights go to the broker without a reload
    assert "revocation -> session cut" in run.stderr  # the table
