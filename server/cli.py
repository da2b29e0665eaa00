"""``provision-server``: the admin CLI and the service entry point.

Exit codes follow click: 0 success, 1 an expected failure (one line on
stderr), 2 a usage error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import click

from server.cli_output import DEVICE_HEADERS, device_row, table, to_json
from server.db import DEFAULT_DATABASE, Database
from server.devices import DeviceRepository
from server.errors import ServerError
from server.schema import DeviceStatus
from server.users import UserRepository

DEFAULT_MONGODB_URI = f"mongodb://127.0.0.1:27017/{DEFAULT_DATABASE}"


class ServerGroup(click.Group):
    """Turns every ServerError into click's one-line error with exit code 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ServerError as exc:
            raise click.ClickException(exc.message) from None


@dataclass
class CliState:
    mongodb_uri: str
    _database: Database | None = field(default=None, repr=False)

    @property
    def database(self) -> Database:
        if self._database is None:
            self._database = Database(self.mongodb_uri)
        return self._database

    def close(self) -> None:
        if self._database is not None:
            self._database.close()


pass_state = click.make_pass_decorator(CliState)


@click.group(cls=ServerGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--mongodb-uri",
    envvar="MONGODB_URI",
    default=DEFAULT_MONGODB_URI,
    show_default=True,
    help="MongoDB URI; the database name is its path (default database: "
    f"{DEFAULT_DATABASE}). Also read from MONGODB_URI.",
)
@click.version_option(package_name="device-provisioning")
@click.pass_context
def main(ctx: click.Context, mongodb_uri: str) -> None:
    """Provisioning server and admin tools for the device fleet."""
    state = CliState(mongodb_uri)
    ctx.obj = state
    ctx.call_on_close(state.close)


# --- db --------------------------------------------------------------------


@main.group(cls=ServerGroup)
def db() -> None:
    """Database set-up."""


@db.command("init")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@pass_state
def db_init(state: CliState, as_json: bool) -> None:
    """Create the web app's collections and indexes (idempotent, keeps data)."""
    report = state.database.init()
    if as_json:
        click.echo(to_json({"created": report.created, "present": report.present}))
        return
    for label in report.created:
        click.echo(f"created index {label}")
    click.echo(
        f"database {state.database.safe_uri} ready: {len(report.created)} index(es) created, "
        f"{len(report.present)} already present"
    )


# --- user ------------------------------------------------------------------


@main.group(cls=ServerGroup)
def user() -> None:
    """Users (normally created by the web app; here for demos and tests)."""


@user.command("add")
@click.option("--email", required=True, help="The user's e-mail address (unique).")
@click.option("--name", default="", help="Display name.")
@click.option("--json", "as_json", is_flag=True, help="Print the user as JSON.")
@pass_state
def user_add(state: CliState, email: str, name: str, as_json: bool) -> None:
    """Create a user and print its id (use it with `device allocate --user`)."""
    doc = UserRepository(state.database).add(email, name)
    click.echo(to_json(doc) if as_json else str(doc["_id"]))


# --- device ----------------------------------------------------------------


@main.group(cls=ServerGroup)
def device() -> None:
    """Register, allocate and inspect devices."""


@device.command("add")
@click.option("--mac", required=True, help="MAC address, e.g. AA:BB:CC:DD:EE:FF.")
@click.option("--client-id", default=None, help="clientId (default: dev-<mac hex>).")
@click.option("--json", "as_json", is_flag=True, help="Print the device as JSON.")
@pass_state
def device_add(state: CliState, mac: str, client_id: str | None, as_json: bool) -> None:
    """Register a device as UNALLOCATED."""
    doc = DeviceRepository(state.database).add(mac, client_id)
    if as_json:
        click.echo(to_json(doc))
    else:
        click.echo(f"added {doc['clientId']} ({doc['macID']}) as {doc['status']}")


@device.command("allocate")
@click.argument("device_ref", metavar="DEVICE")
@click.option("--user", "user_id", required=True, help="The owner's user id (ObjectId).")
@click.option("--json", "as_json", is_flag=True, help="Print the device as JSON.")
@pass_state
def device_allocate(state: CliState, device_ref: str, user_id: str, as_json: bool) -> None:
    """Allocate DEVICE (MAC or clientId) to a user: UNALLOCATED -> ALLOCATED."""
    doc = DeviceRepository(state.database).allocate(device_ref, user_id)
    if as_json:
        click.echo(to_json(doc))
    else:
        click.echo(f"allocated {doc['clientId']} to user {doc['userId']}")


@device.command("list")
@click.option(
    "--status",
    type=click.Choice([s.value for s in DeviceStatus]),
    default=None,
    help="Only devices in this status.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the devices as JSON.")
@pass_state
def device_list(state: CliState, status: str | None, as_json: bool) -> None:
    """List devices as the database holds them."""
    docs = DeviceRepository(state.database).list(DeviceStatus(status) if status else None)
    if as_json:
        click.echo(to_json(docs))
    elif docs:
        click.echo(table([device_row(d) for d in docs], DEVICE_HEADERS))
    else:
        click.echo("no devices")


@device.command("show")
@click.argument("device_ref", metavar="DEVICE")
@click.option("--json", "as_json", is_flag=True, help="Print the device as JSON.")
@pass_state
def device_show(state: CliState, device_ref: str, as_json: bool) -> None:
    """Show one device (MAC or clientId) with every field."""
    doc = DeviceRepository(state.database).find(device_ref)
    if as_json:
        click.echo(to_json(doc))
        return
    for key in sorted(doc):
        value = doc[key]
        if key in ("crt", "ca_certificate") and isinstance(value, str):
            value = f"<PEM, {len(value)} chars>"
        click.echo(f"{key:22} {value}")
