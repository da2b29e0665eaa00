"""The README's main job: the whole story on embedded defaults, nothing to configure.

Today it runs what exists: a local MongoDB-wire server (or MONGODB_URI), the
web app's schema, a few boards registered UNALLOCATED, allocation to a user,
and the devices as the database holds them.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType

import click

from server.cli_output import DEVICE_HEADERS, device_row, table
from server.db import Database
from server.devices import DeviceRepository
from server.errors import DeviceConflict, ServerError
from server.local_services import MongoWireServer
from server.users import UserRepository

BOARDS = (
    ("02:00:5E:10:00:01", "demo-board-1"),
    ("02:00:5E:10:00:02", "demo-board-2"),
    ("02:00:5E:10:00:03", "demo-board-3"),
)


def step(text: str) -> None:
    click.echo(click.style("==> ", fg="cyan", bold=True) + text)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--workdir",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("demo-state"),
    show_default=True,
    help="Where the demo keeps its database files and logs (reused by the next run).",
)
def main(workdir: Path) -> None:
    """Run the provisioning demo on embedded defaults and show the fleet."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
    started = time.monotonic()
    mongo: MongoWireServer | None = None
    try:
        uri = os.environ.get("MONGODB_URI")
        if uri:
            step("using MONGODB_URI")
        else:
            step("starting the local MongoDB-wire server (secantusd-py)")
            mongo = MongoWireServer(workdir.resolve() / "mongo").start()
            uri = mongo.uri + "device_provisioning_demo"
        database = Database(uri)
        report = database.init()
        step(f"schema ready ({len(report.created)} indexes created, {len(report.present)} present)")
        devices = DeviceRepository(database)
        for mac, client_id in BOARDS:
            try:
                devices.add(mac, client_id)
                step(f"registered {client_id} ({mac}) as UNALLOCATED")
            except DeviceConflict:
                step(f"{client_id} is already registered (second run)")
        owner = UserRepository(database).add("demo-owner@example.com", "Demo Owner")
        for _mac, client_id in BOARDS[:2]:
            doc = devices.find(client_id)
            if doc["status"] == "UNALLOCATED":
                devices.allocate(client_id, str(owner["_id"]))
                step(f"allocated {client_id} to {owner['email']}")
        click.echo()
        click.echo(table([device_row(d) for d in devices.list()], DEVICE_HEADERS))
        click.echo()
        click.echo(f"done in {time.monotonic() - started:.1f} s. Look further with:")
        click.echo(f"  .venv/bin/provision-server --mongodb-uri {database.safe_uri} device list")
        database.close()
    except ServerError as exc:
        click.echo(f"demo failed: {exc.message}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("interrupted; stopping what the demo started", err=True)
        sys.exit(130)
    finally:
        if mongo is not None:
            mongo.stop()


if __name__ == "__main__":
    main()
