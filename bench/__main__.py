"""``python -m bench``: fleet provisioning benchmark on real services, printed as a table.

Progress goes to stderr. The table goes to stdout; with ``--json`` stdout holds the JSON
report instead and the table goes to stderr. Exit status 1 if any device of the run did
not reach ACTIVE in the database, or (without ``--registered``) the ledger's audit after
the runs is not clean.

One run, in this order: the signing ceiling, the server logic in-process, one server and
N devices, single first boots, real agents; with ``--registered M``, M more devices
written as a deployed fleet (records and retained statuses) and N devices again on one
freshly started server; then N devices on two servers (unless ``--no-scaling``). Every
ratio in the table compares runs of the same invocation.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from bench.fleet_prefill import prefill_fleet
from bench.provisioning_rate import (
    first_boot_to_active,
    measure_service_rate,
    real_agent_boots,
    run_fleet,
)
from bench.report import Report, machine, render_table
from bench.signing_rate import measure_signing_rate
from bench.stack import BenchStack
from server.store.audit import audit


def progress(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Options:
    devices: int
    concurrency: int
    boot_samples: int
    agent_samples: int
    scaling: bool
    db_rtt_ms: float
    registered: int
    db_batches_in_flight: int | None = None
    workers: int | None = None

    def server_env(self) -> dict[str, str]:
        """Settings the benchmark's servers get beyond the defaults (environment)."""
        env = {}
        if self.db_batches_in_flight is not None:
            env["PROVISION_SERVER_SERVICE_DB_BATCHES_IN_FLIGHT"] = str(self.db_batches_in_flight)
        if self.workers is not None:
            env["PROVISION_SERVER_SERVICE_WORKERS"] = str(self.workers)
        return env


def run_benchmark(options: Options, workdir: Path) -> Report:
    devices, concurrency = options.devices, options.concurrency
    load_start = os.getloadavg()[0]
    with BenchStack(
        workdir,
        progress,
        db_rtt_ms=options.db_rtt_ms,
        fleet_listener=options.registered > 0,
        server_env=options.server_env(),
    ) as stack:
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
        start = stack.start_servers(1)
        progress(f"provisioning {devices} devices, {concurrency} in flight")
        fleet = run_fleet(stack, batch, concurrency, progress)
        progress(f"end to end: {fleet.per_second:.1f} devices/s")
        progress(f"first boot to ACTIVE: {options.boot_samples} single devices")
        boots = first_boot_to_active(stack, options.boot_samples)
        progress(f"real provision-agent processes: {options.agent_samples}, one at a time")
        agent = real_agent_boots(stack, options.agent_samples)
        # Every device provisioned over MQTT so far left a retained status.
        retained = fleet.devices + len(boots) + len(agent.boot_seconds)
        prefill = large_start = large = None
        if options.registered > 0 and stack.fleet_port is not None:
            stack.stop_servers()
            progress(f"writing a deployed fleet of {options.registered} devices")
            prefill = prefill_fleet(
                stack.database, stack.user_id, options.registered, stack.fleet_port
            )
            retained += options.registered
            more = stack.register(f"large-{uuid.uuid4().hex[:4]}", devices)
            progress(f"starting 1 server facing {retained} retained statuses")
            large_start = stack.start_servers(1)
            progress(f"provisioning {devices} devices with {options.registered} registered")
            large = run_fleet(stack, more, concurrency, progress)
            retained += large.devices
        scaled_start = scaled = None
        if options.scaling:
            stack.stop_servers()
            progress(f"registering {devices} more devices for the 2-server run")
            more = stack.register(f"scale-{uuid.uuid4().hex[:4]}", devices)
            progress(f"starting 2 servers ({retained} retained statuses in the broker)")
            scaled_start = stack.start_servers(2)
            progress(f"provisioning {devices} devices with 2 servers")
            scaled = run_fleet(stack, more, concurrency, progress)
        # The ledger after every device of the runs (the prefilled fleet has no ledger
        # records, so there is nothing to audit against with --registered).
        ledger_audit = audit(stack.database) if options.registered == 0 else None
        for run in (fleet, large, scaled):
            if run is not None and (run.failures or run.not_active):
                progress(
                    f"{run.servers}-server run: {len(run.failures)} devices failed "
                    f"{list(run.failures[:3])}; not ACTIVE: {list(run.not_active[:10])}"
                )
        return Report(
            db_rtt_ms=options.db_rtt_ms,
            load=(load_start, os.getloadavg()[0]),
            ceiling=ceiling,
            service=service,
            start=start,
            fleet=fleet,
            first_boot=boots,
            agent=agent,
            prefill=prefill,
            large_start=large_start,
            large=large,
            scaled_start=scaled_start,
            scaled=scaled,
            retained=retained,
            audit=ledger_audit,
        )


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
    parser.add_argument(
        "--db-rtt-ms",
        type=float,
        default=0.0,
        help="servers reach the database through a proxy adding this round trip (e.g. 20)",
    )
    parser.add_argument(
        "--registered",
        type=int,
        default=0,
        help="then write a deployed fleet of this many devices and run again (e.g. 100000)",
    )
    parser.add_argument(
        "--db-batches-in-flight",
        type=int,
        default=None,
        help="the servers' service.db_batches_in_flight (default: the server's, 3)",
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="the servers' service.workers (default 32)"
    )
    parser.add_argument("--json", action="store_true", help="JSON report on stdout")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="keep logs and files here (default: temporary)"
    )
    args = parser.parse_args(argv)
    counts = (args.devices, args.concurrency, args.first_boot_samples, args.agent_samples)
    if min(counts) < 1:
        parser.error("--devices, --concurrency and the sample counts must be at least 1")
    if args.db_rtt_ms < 0 or args.registered < 0:
        parser.error("--db-rtt-ms and --registered cannot be negative")
    if any(v is not None and v < 1 for v in (args.db_batches_in_flight, args.workers)):
        parser.error("--db-batches-in-flight and --workers must be at least 1")
    options = Options(
        devices=args.devices,
        concurrency=args.concurrency,
        boot_samples=args.first_boot_samples,
        agent_samples=args.agent_samples,
        scaling=not args.no_scaling,
        db_rtt_ms=args.db_rtt_ms,
        registered=args.registered,
        db_batches_in_flight=args.db_batches_in_flight,
        workers=args.workers,
    )
    # Ctrl-C or SIGTERM (even when started in the background, where SIGINT is ignored)
    # unwinds through the context managers, which stop every process we started.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        workdir = Path(tmp) if args.workdir is None else args.workdir.resolve()
        workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        report = run_benchmark(options, workdir)
    info = machine(options.db_rtt_ms, options.server_env())
    table = render_table(report.rows(), info)
    if args.json:
        print(table, file=sys.stderr)
        rows = [r.__dict__ | {"verdict": r.verdict} for r in report.rows()]
        print(json.dumps({"machine": info, "results": report.results(), "rows": rows}, indent=2))
    else:
        print(table)
    return 0 if report.all_active_and_audited else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        progress("interrupted; everything started was stopped")
        sys.exit(130)
