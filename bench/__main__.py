"""``python -m bench``: fleet provisioning benchmark on real services, printed as a table.

Progress goes to stderr. The table goes to stdout; with ``--json`` stdout holds the JSON
report instead and the table goes to stderr. Exit status 1 if any device of the run did
not reach ACTIVE in the database.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from bench.provisioning_rate import (
    AgentResult,
    FleetResult,
    ServiceRate,
    first_boot_to_active,
    measure_service_rate,
    median,
    real_agent_boots,
    run_fleet,
)
from bench.signing_rate import SigningRate, measure_signing_rate
from bench.stack import BenchStack

TARGET_RATE = 100.0
TARGET_FIRST_BOOT_S = 1.0
TARGET_AGENT_RSS_MB = 30.0


def progress(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "database": "MONGODB_URI" if os.environ.get("MONGODB_URI") else "secantusd-py (embedded)",
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
    ceiling: SigningRate
    service: ServiceRate
    fleet: FleetResult
    first_boot: list[float]
    agent: AgentResult
    scaled: FleetResult | None
    replay: tuple[int, float] | None
    """Retained statuses present and the seconds the 2 new servers took to handle them."""

    @property
    def all_active(self) -> bool:
        runs = [self.fleet] + ([self.scaled] if self.scaled else [])
        return all(
            r.active_in_db == r.devices and not r.failures and not r.not_active for r in runs
        )

    def results(self) -> dict[str, Any]:
        fleet = self.fleet
        out: dict[str, Any] = {
            "ceiling_per_s": round(self.ceiling.per_second, 1),
            "e2e_devices": fleet.devices,
            "e2e_active_in_db": fleet.active_in_db,
            "e2e_failures": list(fleet.failures),
            "e2e_not_active": list(fleet.not_active),
            "e2e_retries": fleet.retries,
            "e2e_concurrency": fleet.concurrency,
            "e2e_seconds": round(fleet.seconds, 3),
            "e2e_per_s": round(fleet.per_second, 1),
            "e2e_fraction_of_ceiling": round(fleet.per_second / self.ceiling.per_second, 4),
            "server_rss_idle_mb": round(fleet.server_rss_idle / 2**20, 1),
            "server_rss_peak_mb": round(fleet.server_rss_peak / 2**20, 1),
            "first_boot_samples_s": [round(s, 4) for s in self.first_boot],
            "first_boot_median_s": round(median(self.first_boot), 4),
            "service_per_s": round(self.service.per_second, 1),
            "service_devices": self.service.count,
            "db_commands_per_device": round(self.service.commands_per_device, 2),
            "agent_boot_samples_s": [round(s, 4) for s in self.agent.boot_seconds],
            "agent_boot_median_s": round(median(self.agent.boot_seconds), 4),
            "agent_rss_mb": [round(b / 2**20, 1) for b in self.agent.rss_active_idle],
            "agent_pss_mb": [round(b / 2**20, 1) for b in self.agent.pss_active_idle],
            "agent_rss_median_mb": round(median(self.agent.rss_active_idle) / 2**20, 1),
            "agent_pss_median_mb": round(median(self.agent.pss_active_idle) / 2**20, 1),
        }
        for which in ("to_certificate", "to_online"):
            for pct in (50, 95, 99):
                out[f"latency_{which}_p{pct}_ms"] = round(fleet.latency(which, pct / 100) * 1000, 1)
        if self.scaled is not None:
            out["scaled_servers"] = self.scaled.servers
            out["scaled_per_s"] = round(self.scaled.per_second, 1)
            out["scaled_active_in_db"] = self.scaled.active_in_db
            out["scaled_failures"] = list(self.scaled.failures)
            out["scaled_not_active"] = list(self.scaled.not_active)
            out["scaling_ratio"] = round(self.scaled.per_second / fleet.per_second, 3)
        if self.replay is not None:
            out["restart_retained_statuses"] = self.replay[0]
            out["restart_replay_s"] = round(self.replay[1], 2)
        return out

    def rows(self) -> list[Row]:
        r = self.results()
        fleet = self.fleet

        def pcts(which: str) -> str:
            return " / ".join(f"{r[f'latency_{which}_p{p}_ms']:.0f}" for p in (50, 95, 99))

        rows = [
            Row("CSR check + sign, in-process, 1 thread", f"{r['ceiling_per_s']:.0f} /s"),
            Row(
                f"end to end, {fleet.devices} devices, 1 server, {fleet.concurrency} in flight",
                f"{r['e2e_per_s']:.1f} devices/s",
                f">= {TARGET_RATE:.0f}/s",
                r["e2e_per_s"] >= TARGET_RATE,
            ),
            Row("end to end / ceiling", f"{100 * r['e2e_fraction_of_ceiling']:.1f} %"),
            Row(
                f"server logic + database, in-process, no MQTT, {self.service.count} devices",
                f"{r['service_per_s']:.1f} devices/s, "
                f"{r['db_commands_per_device']:.1f} db commands/device",
            ),
            Row("devices ACTIVE in database", f"{fleet.active_in_db}/{fleet.devices}"),
            Row("latency token -> certificate p50/p95/p99", f"{pcts('to_certificate')} ms"),
            Row("latency token -> online acked p50/p95/p99", f"{pcts('to_online')} ms"),
            Row("retries (retryable errors)", str(r["e2e_retries"])),
            Row(
                f"first boot to ACTIVE, median of {len(self.first_boot)}",
                f"{1000 * r['first_boot_median_s']:.0f} ms",
                f"< {1000 * TARGET_FIRST_BOOT_S:.0f} ms",
                r["first_boot_median_s"] < TARGET_FIRST_BOOT_S,
            ),
            Row(
                f"real provision-agent process start to ACTIVE, median of "
                f"{len(self.agent.boot_seconds)}",
                f"{1000 * r['agent_boot_median_s']:.0f} ms",
                f"< {1000 * TARGET_FIRST_BOOT_S:.0f} ms",
                r["agent_boot_median_s"] < TARGET_FIRST_BOOT_S,
            ),
            Row(
                "provision-agent RSS (PSS), ACTIVE and idle, median",
                f"{r['agent_rss_median_mb']:.1f} MB ({r['agent_pss_median_mb']:.1f} MB)",
                f"< {TARGET_AGENT_RSS_MB:.0f} MB",
                r["agent_rss_median_mb"] < TARGET_AGENT_RSS_MB,
            ),
            Row(
                "server RSS idle -> peak during the run",
                f"{r['server_rss_idle_mb']:.0f} -> {r['server_rss_peak_mb']:.0f} MB",
            ),
        ]
        if self.scaled is not None:
            rows.append(
                Row(
                    f"end to end, {self.scaled.devices} more devices, "
                    f"{self.scaled.servers} servers",
                    f"{r['scaled_per_s']:.1f} devices/s "
                    f"({self.scaled.active_in_db}/{self.scaled.devices} ACTIVE)",
                )
            )
            rows.append(Row("scaling ratio 2 servers / 1", f"{r['scaling_ratio']:.2f}"))
        if self.replay is not None:
            rows.append(
                Row(
                    f"2 servers starting with {self.replay[0]} retained statuses: busy for",
                    f"{self.replay[1]:.1f} s",
                )
            )
        return rows


def render_table(rows: list[Row], info: dict[str, Any]) -> str:
    header = ("metric", "value", "target", "")
    cells = [header, *((r.metric, r.value, r.target, r.verdict) for r in rows)]
    widths = [max(len(c[i]) for c in cells) for i in range(4)]
    lines = [
        f"machine: {info['cpus']} CPUs ({info['cpu_model']}), Python {info['python']}, "
        f"database {info['database']}"
    ]
    for index, cell in enumerate(cells):
        lines.append("  ".join(c.ljust(w) for c, w in zip(cell, widths, strict=True)).rstrip())
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run_benchmark(
    devices: int,
    concurrency: int,
    boot_samples: int,
    agent_samples: int,
    scaling: bool,
    workdir: Path,
) -> Report:
    with BenchStack(workdir, progress) as stack:
        ceiling_count = max(200, min(devices, 2000))
        progress(f"ceiling: checking and signing {ceiling_count} CSRs in-process")
        ceiling = measure_signing_rate(stack.ca, ceiling_count)
        progress(f"ceiling: {ceiling.per_second:.0f}/s")
        service_count = max(20, min(devices // 5, 200))
        progress(f"server logic + database in-process: {service_count} devices")
        service = measure_service_rate(stack, stack.register("svc", service_count))
        progress(f"server logic + database: {service.per_second:.1f} devices/s")
        progress(f"registering {devices} devices (UNALLOCATED -> ALLOCATED)")
        batch = stack.register(f"bench-{uuid.uuid4().hex[:4]}", devices)
        stack.start_servers(1)
        progress(f"provisioning {devices} devices, {concurrency} in flight")
        fleet = run_fleet(stack, batch, concurrency, progress)
        progress(f"end to end: {fleet.per_second:.1f} devices/s")
        progress(f"first boot to ACTIVE: {boot_samples} single devices")
        boots = first_boot_to_active(stack, boot_samples)
        progress(f"real provision-agent processes: {agent_samples}, one at a time")
        agent = real_agent_boots(stack, agent_samples)
        scaled, replay = None, None
        if scaling:
            stack.stop_servers()
            progress(f"registering {devices} more devices for the 2-server run")
            more = stack.register(f"scale-{uuid.uuid4().hex[:4]}", devices)
            # Every device provisioned over MQTT so far left a retained status.
            retained = fleet.devices + len(boots) + len(agent.boot_seconds)
            progress(f"starting 2 servers; waiting while they replay {retained} retained statuses")
            replay = (retained, stack.start_servers(2))
            progress(f"provisioning {devices} devices with 2 servers")
            scaled = run_fleet(stack, more, concurrency, progress)
        for run in (fleet, scaled):
            if run is not None and (run.failures or run.not_active):
                progress(
                    f"{run.servers}-server run: {len(run.failures)} devices failed "
                    f"{list(run.failures[:3])}; not ACTIVE: {list(run.not_active[:10])}"
                )
        return Report(ceiling, service, fleet, boots, agent, scaled, replay)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--devices", type=int, default=1000, help="fleet size (default 1000)")
    parser.add_argument("--concurrency", type=int, default=50, help="devices in flight")
    parser.add_argument("--first-boot-samples", type=int, default=20, help="single-device runs")
    parser.add_argument(
        "--agent-samples", type=int, default=5, help="real provision-agent processes"
    )
    parser.add_argument(
        "--no-scaling", action="store_true", help="skip the 2-server run (N more devices)"
    )
    parser.add_argument("--json", action="store_true", help="JSON report on stdout")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="keep logs and files here (default: temporary)"
    )
    args = parser.parse_args(argv)
    counts = (args.devices, args.concurrency, args.first_boot_samples, args.agent_samples)
    if min(counts) < 1:
        parser.error("--devices, --concurrency and the sample counts must be at least 1")
    # Ctrl-C or SIGTERM (even when started in the background, where SIGINT is ignored)
    # unwinds through the context managers, which stop every process we started.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        workdir = Path(tmp) if args.workdir is None else args.workdir.resolve()
        workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        report = run_benchmark(
            args.devices,
            args.concurrency,
            args.first_boot_samples,
            args.agent_samples,
            not args.no_scaling,
            workdir,
        )
    info = machine()
    table = render_table(report.rows(), info)
    if args.json:
        print(table, file=sys.stderr)
        rows = [r.__dict__ | {"verdict": r.verdict} for r in report.rows()]
        print(json.dumps({"machine": info, "results": report.results(), "rows": rows}, indent=2))
    else:
        print(table)
    return 0 if report.all_active else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        progress("interrupted; everything started was stopped")
        sys.exit(130)
