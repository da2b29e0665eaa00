"""The README's main job: the whole story on embedded defaults, nothing to configure.

A local MongoDB-wire server (or MONGODB_URI), Mosquitto with generated TLS,
`provision-server run`, a few simulated boards whose factory consoles the
station programs over pty cables (birth identity, registered UNALLOCATED),
allocation to a user, agents provisioning to ACTIVE, one agent stopped
(OFFLINE), and the fleet as the database holds it.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import click

from harness.local_services import free_port
from harness.simulated_fleet import LocalStack, SimulatedBoard, program_boards
from server.cli.output import DEVICE_HEADERS, device_row, table
from server.errors import ServerError
from server.station.batch import ProgressPrinter, format_table
from server.store.devices import DeviceRepository, utcnow
from server.store.schema import DeviceStatus
from server.store.users import UserRepository

BOARDS = (
    ("02:00:5E:10:00:01", "demo-board-1"),
    ("02:00:5E:10:00:02", "demo-board-2"),
    ("02:00:5E:10:00:03", "demo-board-3"),
)


def step(text: str) -> None:
    click.echo(click.style("==> ", fg="cyan", bold=True) + text, err=True)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def wait_until(what: str, check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise ServerError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--workdir",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("demo-state"),
    show_default=True,
    help="Where the demo keeps its database, CA, broker files and logs (reused next run).",
)
@click.option(
    "--keep-running/--no-keep-running",
    default=None,
    help="Keep the services up until Ctrl-C (default: when stdin is a terminal).",
)
def main(workdir: Path, keep_running: bool | None) -> None:
    """Run the provisioning demo on embedded defaults and show the fleet."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
    started = time.monotonic()
    run_start = utcnow()
    stack: LocalStack | None = None
    boards: list[SimulatedBoard] = []
    try:
        step("starting MongoDB-wire server, CA, Mosquitto (3 TLS listeners), ACL/CRL sync")
        stack = LocalStack.start(workdir, os.environ.get("MONGODB_URI"))
        metrics_port = free_port()
        stack.start_server(metrics_port=metrics_port, broker_sync=True)
        step(f"provision-server run is up (database {stack.database.safe_uri})")
        click.echo(f"metrics: http://127.0.0.1:{metrics_port}/metrics")
        devices = DeviceRepository(stack.database)
        for mac, client_id in BOARDS:
            board = SimulatedBoard(stack.workdir / "boards" / client_id, client_id, mac)
            board.prepare()
            if board.birth_endpoints() not in (None, stack.endpoints):
                # The broker could not get last run's ports back: the factory starts over.
                board.factory_reset()
                step(f"{client_id}: broker endpoints changed, `provision-agent reset` done")
            boards.append(board)
        step(
            f"factory: {len(boards)} factory consoles on pty cables; "
            "provision-station programs them in parallel"
        )
        results = program_boards(stack, boards, ProgressPrinter(sys.stderr))
        click.echo(format_table(results), err=True)
        failed = [r for r in results if not r.ok]
        if failed:
            raise ServerError(f"the station could not program {failed[0].port}: {failed[0].error}")
        step("factory: every board holds its birth certificate and is registered UNALLOCATED")
        owner = UserRepository(stack.database).add("demo-owner@example.com", "Demo Owner")
        for board in boards:
            board.start_agent()
        step("agents started; they wait while their device is UNALLOCATED")
        for board in boards:
            doc = devices.find(board.client_id)
            if doc["status"] == DeviceStatus.UNALLOCATED.value:
                devices.allocate(board.client_id, str(owner["_id"]))
            step(f"allocated {board.client_id} to {owner['email']}")

        def active_count() -> int:
            # Fresh this run: a second run must not count the last run's statuses.
            docs = [devices.find(b.client_id) for b in boards]
            return sum(
                d["status"] == "ACTIVE" and d.get("lastSeenAt", run_start) > run_start for d in docs
            )

        wait_until("every board ACTIVE", lambda: active_count() == len(boards), 90)
        step(f"all {len(boards)} boards ACTIVE over mTLS")
        last = boards[-1]
        last.stop_agent()
        wait_until(
            f"{last.client_id} OFFLINE",
            lambda: devices.find(last.client_id)["status"] == "OFFLINE",
            30,
        )
        step(f"stopped the agent of {last.client_id}: OFFLINE through its clean disconnect")

        click.echo()
        click.echo(table([device_row(d) for d in devices.list()], DEVICE_HEADERS))
        click.echo()
        first = boards[0]
        live = first.state_dir / "certs" / "live"
        click.echo(f"done in {time.monotonic() - started:.1f} s. Look further (while it runs):")
        click.echo(
            f"  .venv/bin/provision-server --mongodb-uri {stack.database.safe_uri} device list"
        )
        click.echo(f"  .venv/bin/provision-agent status --config {first.config_path}")
        click.echo(
            f"  .venv/bin/provision-station --help   (station config: {stack.station_config_path})"
        )
        click.echo(
            f"  mosquitto_sub -h 127.0.0.1 -p {stack.layout.operational_port} -V mqttv5 "
            f"--cafile {stack.ca.paths.root_cert} --cert {live}/cert.pem "
            f"--key {live}/key.pem -i {first.client_id}-sub -t 'devices/{first.client_id}/#' -v"
        )
        if keep_running is None:
            keep_running = sys.stdin.isatty()
        if keep_running:
            click.echo("services keep running; press Ctrl-C to stop everything", err=True)
            signal.pause()
    except ServerError as exc:
        click.echo(f"demo failed: {exc.message}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("stopping what the demo started", err=True)
    finally:
        # A second Ctrl-C must not cut the cleanup short (every wait in it is bounded).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for board in boards:
            board.stop_agent()
        if stack is not None:
            stack.stop()


if __name__ == "__main__":
    main()
