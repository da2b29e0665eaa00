"""docs/prometheus-rules.yml and docs/grafana-dashboard.json, checked by Prometheus' own promtool.

``promtool`` comes from Debian's ``prometheus`` package (scripts/bootstrap.sh installs it).
Which metric names they use is checked against a live scrape in tests/test_metrics.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    assert found, "promtool is missing: run bash scripts/bootstrap.sh (Debian's prometheus)"
    return found


def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


def test_rules_are_valid(promtool: str, repo_root: Path) -> None:
    done = run([promtool, "check", "rules", "docs/prometheus-rules.yml"], repo_root)
    assert done.returncode == 0, done.stdout + done.stderr


def test_each_alert_fires_where_it_should_and_only_there(promtool: str, repo_root: Path) -> None:
    """The unit tests cover every alert of the file, firing and (where it matters) not firing."""
    tests = repo_root / "tests" / "prometheus" / "rules_test.yml"
    rules = (repo_root / "docs" / "prometheus-rules.yml").read_text()
    alerts = {line.split(":", 1)[1].strip() for line in rules.splitlines()
              if line.strip().startswith("- alert:")}  # fmt: skip
    tested = {line.split(":", 1)[1].strip() for line in tests.read_text().splitlines()
              if line.strip().startswith("alertname:")}  # fmt: skip
    assert alerts == tested
    done = run([promtool, "test", "rules", tests.name], tests.parent)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_broken_rule_is_caught(promtool: str, tmp_path: Path) -> None:
    """The check can fail: a typo in an expression is refused."""
    bad = tmp_path / "bad.yml"
    bad.write_text("groups:\n- name: x\n  rules:\n  - alert: X\n    expr: rate(foo[5m] > 1\n")
    assert run([promtool, "check", "rules", str(bad)], tmp_path).returncode != 0


def test_dashboard_queries_are_valid_promql(promtool: str, repo_root: Path, tmp_path: Path) -> None:
    """Each panel query, written as a recording rule, passes promtool's parser."""
    dashboard = json.loads((repo_root / "docs" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    rules = {
        "groups": [
            {"name": "dashboard", "rules": [
                {"record": f"dashboard:query_{i}", "expr": e} for i, e in enumerate(exprs)
            ]}
        ]
    }  # fmt: skip
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(json.dumps(rules))  # JSON is YAML
    done = run([promtool, "check", "rules", str(path)], tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    titles = [panel["title"] for panel in dashboard["panels"]]
    assert len(titles) == len(set(titles))
    assert {"Broker connection", "CRL nextUpdate in", "CA expires in"} <= set(titles)
