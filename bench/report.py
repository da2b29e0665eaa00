"""The benchmark's report: every number of one run, as JSON and as a table with targets.

Targets are issue 14's (1,000 devices, 50 in flight, every ratio from the same run).
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from bench.fleet_prefill import Prefill
from bench.provisioning_rate import AgentResult, FleetResult, ServiceRate, median
from bench.signing_rate import SigningRate
from bench.stack import ServerStart
from server.store.audit import AuditReport

TARGET_FRACTION_OF_CEILING: Final = 0.045
TARGET_RATE_REMOTE_DB: Final = 100.0
TARGET_SCALING_LOCAL: Final = 1.0
TARGET_SCALING_REMOTE: Final = 1.6
TARGET_FIRST_BOOT_S: Final = 0.25
TARGET_AGENT_BOOT_S: Final = 1.0
TARGET_AGENT_RSS_MB: Final = 30.0
TARGET_SERVER_START_S: Final = 5.0
TARGET_LARGE_RATIO: Final = 0.8
MB: Final = 2**20


def machine(db_rtt_ms: float, server_env: dict[str, str] | None = None) -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    database = "MONGODB_URI" if os.environ.get("MONGODB_URI") else "secantusd-py (embedded)"
    if db_rtt_ms > 0:
        database += f" behind a proxy adding {db_rtt_ms:g} ms RTT"
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "database": database,
        "server_settings": dict(server_env or {}),
    }


@dataclass(frozen=True)
class Row:
    metric: str
    value: str
    target: str = ""
    met: bool | None = None

    @property
    def verdict(self) -> str:
        return "" if self.met is None else ("met" if self.met else "NOT met")


@dataclass(frozen=True)
class Report:
    db_rtt_ms: float
    load: tuple[float, float]
    """1-minute load average when the run started and when it ended."""
    ceiling: SigningRate
    service: ServiceRate
    start: ServerStart
    fleet: FleetResult
    first_boot: list[float]
    agent: AgentResult
    prefill: Prefill | None = None
    large_start: ServerStart | None = None
    large: FleetResult | None = None
    scaled_start: ServerStart | None = None
    scaled: FleetResult | None = None
    retained: int = 0
    """Retained statuses in the broker when the 2 servers started."""
    audit: AuditReport | None = None
    """``provision-server audit`` of the ledger after the runs."""

    def runs(self) -> list[FleetResult]:
        return [r for r in (self.fleet, self.large, self.scaled) if r is not None]

    @property
    def all_active_and_audited(self) -> bool:
        return all(
            r.active_in_db == r.devices and not r.failures and not r.not_active for r in self.runs()
        ) and (self.audit is None or self.audit.clean)

    def results(self) -> dict[str, Any]:
        fleet = self.fleet
        out: dict[str, Any] = {
            "db_rtt_ms": self.db_rtt_ms,
            "load_start": self.load[0],
            "load_end": self.load[1],
            "ceiling_per_s": round(self.ceiling.per_second, 1),
            "server_start_s": round(self.start.total_s, 2),
            **_fleet("e2e", fleet),
            "e2e_fraction_of_ceiling": round(fleet.per_second / self.ceiling.per_second, 4),
            "first_boot_samples_s": [round(s, 4) for s in self.first_boot],
            "first_boot_median_s": round(median(self.first_boot), 4),
            "service_per_s": round(self.service.per_second, 1),
            "service_devices": self.service.count,
            "db_commands_per_device": round(self.service.commands_per_device, 2),
            "agent_boot_samples_s": [round(s, 4) for s in self.agent.boot_seconds],
            "agent_boot_median_s": round(median(self.agent.boot_seconds), 4),
            "agent_rss_mb": [round(b / MB, 1) for b in self.agent.rss_active_idle],
            "agent_pss_mb": [round(b / MB, 1) for b in self.agent.pss_active_idle],
            "agent_rss_median_mb": round(median(self.agent.rss_active_idle) / MB, 1),
            "agent_pss_median_mb": round(median(self.agent.pss_active_idle) / MB, 1),
        }
        for which in ("to_certificate", "to_online"):
            for pct in (50, 95, 99):
                out[f"latency_{which}_p{pct}_ms"] = round(fleet.latency(which, pct / 100) * 1000, 1)
        if self.prefill is not None and self.large is not None and self.large_start is not None:
            out["registered"] = self.prefill.devices
            out["prefill_insert_s"] = round(self.prefill.insert_seconds, 1)
            out["prefill_retained_s"] = round(self.prefill.retained_seconds, 1)
            out["large_server_start_s"] = round(self.large_start.total_s, 2)
            out["large_server_connected_s"] = round(self.large_start.connected_s, 2)
            out.update(_fleet("large", self.large))
            out["large_ratio"] = round(self.large.per_second / fleet.per_second, 3)
        if self.scaled is not None and self.scaled_start is not None:
            out.update(_fleet("scaled", self.scaled))
            out["scaled_servers"] = self.scaled.servers
            out["scaled_server_start_s"] = round(self.scaled_start.total_s, 2)
            out["scaled_retained_statuses"] = self.retained
            out["scaling_ratio"] = round(self.scaled.per_second / fleet.per_second, 3)
        if self.audit is not None:
            out["audit"] = self.audit.to_json() | {"exceptions": self.audit.exceptions[:20]}
        return out

    def rows(self) -> list[Row]:
        r = self.results()
        fleet = self.fleet
        remote = self.db_rtt_ms > 0

        def pcts(which: str) -> str:
            return " / ".join(f"{r[f'latency_{which}_p{p}_ms']:.0f}" for p in (50, 95, 99))

        rows = [
            Row("load average (1 min) at start / end", f"{self.load[0]:.1f} / {self.load[1]:.1f}"),
            Row("CSR check + sign, in-process, 1 thread", f"{r['ceiling_per_s']:.0f} /s"),
            Row(
                f"server logic + database, in-process, no MQTT, {self.service.count} devices",
                f"{r['service_per_s']:.1f} devices/s, "
                f"{r['db_commands_per_device']:.1f} db commands/device",
            ),
            Row("1 server start: spawn -> subscribed and idle", f"{r['server_start_s']:.1f} s"),
            _rate_row(fleet, "1 server", remote),
            Row(
                "end to end / ceiling",
                f"{100 * r['e2e_fraction_of_ceiling']:.1f} %",
                "" if remote else f">= {100 * TARGET_FRACTION_OF_CEILING:.1f} %",
                None if remote else r["e2e_fraction_of_ceiling"] >= TARGET_FRACTION_OF_CEILING,
            ),
            _active_row(fleet),
            *cpu_rows(fleet, "1 server"),
            Row("latency token -> certificate p50/p95/p99", f"{pcts('to_certificate')} ms"),
            Row("latency token -> online acked p50/p95/p99", f"{pcts('to_online')} ms"),
            Row("retries (retryable errors)", str(r["e2e_retries"])),
            Row(
                "server RSS idle -> peak during the run",
                f"{r['e2e_rss_idle_mb']:.0f} -> {r['e2e_rss_peak_mb']:.0f} MB",
            ),
            Row(
                f"first boot to ACTIVE, median of {len(self.first_boot)}",
                f"{1000 * r['first_boot_median_s']:.0f} ms",
                f"<= {1000 * TARGET_FIRST_BOOT_S:.0f} ms",
                r["first_boot_median_s"] <= TARGET_FIRST_BOOT_S,
            ),
            Row(
                f"real provision-agent process start to ACTIVE, median of "
                f"{len(self.agent.boot_seconds)}",
                f"{1000 * r['agent_boot_median_s']:.0f} ms",
                f"< {1000 * TARGET_AGENT_BOOT_S:.0f} ms",
                r["agent_boot_median_s"] < TARGET_AGENT_BOOT_S,
            ),
            Row(
                "provision-agent RSS (PSS), ACTIVE and idle, median",
                f"{r['agent_rss_median_mb']:.1f} MB ({r['agent_pss_median_mb']:.1f} MB)",
                f"< {TARGET_AGENT_RSS_MB:.0f} MB",
                r["agent_rss_median_mb"] < TARGET_AGENT_RSS_MB,
            ),
        ]
        if self.large is not None and self.prefill is not None:
            rows += self._large_rows(r)
        if self.scaled is not None:
            target = TARGET_SCALING_REMOTE if remote else TARGET_SCALING_LOCAL
            rows += [
                Row(
                    f"2 servers start, {self.retained} retained statuses in the broker",
                    f"{r['scaled_server_start_s']:.1f} s",
                ),
                _rate_row(self.scaled, "2 servers", remote),
                _active_row(self.scaled),
                *cpu_rows(self.scaled, "2 servers"),
                Row(
                    "scaling ratio 2 servers / 1",
                    f"{r['scaling_ratio']:.2f}",
                    f">= {target:.1f}",
                    r["scaling_ratio"] >= target,
                ),
            ]
        if self.audit is not None:
            found = self.audit
            rows.append(
                Row(
                    "audit of the ledger after the runs (provision-server audit)",
                    f"{found.certificates} certificates, {len(found.exceptions)} exceptions",
                    "clean",
                    found.clean,
                )
            )
        return rows

    def _large_rows(self, r: dict[str, Any]) -> list[Row]:
        assert self.large is not None and self.prefill is not None
        return [
            Row(
                f"registered fleet: {self.prefill.devices} ACTIVE devices, records, retained",
                f"inserted in {r['prefill_insert_s']:.0f} s, "
                f"statuses retained in {r['prefill_retained_s']:.0f} s",
            ),
            Row(
                f"1 server start with {self.prefill.devices} retained statuses",
                f"{r['large_server_start_s']:.1f} s",
                f"< {TARGET_SERVER_START_S:.0f} s",
                r["large_server_start_s"] < TARGET_SERVER_START_S,
            ),
            _rate_row(self.large, f"1 server, {self.prefill.devices} registered", False),
            _active_row(self.large),
            *cpu_rows(self.large, f"{self.prefill.devices} registered"),
            Row(
                f"e2e at {self.prefill.devices} registered / at the start",
                f"{r['large_ratio']:.2f}",
                f">= {TARGET_LARGE_RATIO}",
                r["large_ratio"] >= TARGET_LARGE_RATIO,
            ),
            Row(
                "server RSS idle -> peak, large fleet",
                f"{r['large_rss_idle_mb']:.0f} -> {r['large_rss_peak_mb']:.0f} MB",
            ),
        ]


def _fleet(prefix: str, fleet: FleetResult) -> dict[str, Any]:
    return {
        f"{prefix}_devices": fleet.devices,
        f"{prefix}_active_in_db": fleet.active_in_db,
        f"{prefix}_failures": list(fleet.failures),
        f"{prefix}_not_active": list(fleet.not_active),
        f"{prefix}_retries": fleet.retries,
        f"{prefix}_concurrency": fleet.concurrency,
        f"{prefix}_seconds": round(fleet.seconds, 3),
        f"{prefix}_per_s": round(fleet.per_second, 1),
        f"{prefix}_rss_idle_mb": round(fleet.server_rss_idle / MB, 1),
        f"{prefix}_rss_peak_mb": round(fleet.server_rss_peak / MB, 1),
        **_cpu(prefix, fleet),
    }


def _cpu(prefix: str, fleet: FleetResult) -> dict[str, Any]:
    """CPU ms per ACTIVE device by process, cores busy, database commands per device."""
    cpu, devices = fleet.cpu, fleet.active_in_db
    if cpu is None or devices <= 0:
        return {}
    out: dict[str, Any] = {
        f"{prefix}_cpu_window_s": round(cpu.seconds, 3),
        f"{prefix}_cpu_ms_per_device": {
            k: round(v, 2) for k, v in cpu.per_device_ms(devices).items()
        },
        f"{prefix}_cpu_cores": {k: round(v, 3) for k, v in cpu.cores().items()},
    }
    if cpu.db_commands is not None and cpu.db_ops is not None:
        out[f"{prefix}_db_commands_per_device"] = round(cpu.db_commands / devices, 2)
        out[f"{prefix}_db_ops_per_device"] = {
            k: round(v / devices, 2) for k, v in cpu.db_ops.items()
        }
    return out


def cpu_rows(fleet: FleetResult, label: str) -> list[Row]:
    """One row per process: CPU ms per device and cores busy; then the database commands."""
    cpu = fleet.cpu
    if cpu is None or fleet.active_in_db <= 0:
        return []
    per_device, cores = cpu.per_device_ms(fleet.active_in_db), cpu.cores()
    rows = [
        Row(f"  CPU per device, {label}: {name}", f"{ms:.1f} ms ({cores[name]:.2f} cores)")
        for name, ms in per_device.items()
        if name != "total"
    ]
    rows.append(
        Row(
            f"  CPU per device, {label}: whole machine ({cpu.seconds:.1f} s window)",
            f"{per_device['total']:.1f} ms ({cores['total']:.2f} of {os.cpu_count()} cores)",
        )
    )
    if cpu.db_commands is not None and cpu.db_ops is not None:
        ops = ", ".join(f"{k} {v / fleet.active_in_db:.1f}" for k, v in cpu.db_ops.items() if v)
        rows.append(
            Row(
                f"  database commands per device, {label}",
                f"{cpu.db_commands / fleet.active_in_db:.1f} (ops: {ops})",
            )
        )
    return rows


def _rate_row(fleet: FleetResult, servers: str, remote: bool) -> Row:
    return Row(
        f"end to end, {fleet.devices} devices, {servers}, {fleet.concurrency} in flight",
        f"{fleet.per_second:.1f} devices/s",
        f">= {TARGET_RATE_REMOTE_DB:.0f}/s" if remote else "",
        fleet.per_second >= TARGET_RATE_REMOTE_DB if remote else None,
    )


def _active_row(fleet: FleetResult) -> Row:
    return Row(
        "devices ACTIVE in database",
        f"{fleet.active_in_db}/{fleet.devices}",
        "all",
        fleet.active_in_db == fleet.devices and not fleet.failures,
    )


def render_table(rows: list[Row], info: dict[str, Any]) -> str:
    header = ("metric", "value", "target", "")
    cells = [header, *((r.metric, r.value, r.target, r.verdict) for r in rows)]
    widths = [max(len(c[i]) for c in cells) for i in range(4)]
    lines = [
        f"machine: {info['cpus']} CPUs ({info['cpu_model']}), Python {info['python']}, "
        f"database {info['database']}"
        + "".join(f", {k}={v}" for k, v in info.get("server_settings", {}).items())
    ]
    for index, cell in enumerate(cells):
        lines.append("  ".join(c.ljust(w) for c, w in zip(cell, widths, strict=True)).rstrip())
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
