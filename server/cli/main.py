"""``provision-server``: the admin CLI and the service entry point.

Exit codes follow click: 0 success, 1 an expected failure (one line on
stderr), 2 a usage error.
"""

from __future__ import annotations

from pathlib import Path

import click

from server.cli.doctor import doctor_command
from server.cli.history import device_history_command
from server.cli.output import DEVICE_HEADERS, device_row, table, to_json
from server.cli.pki import broker_config, ca
from server.cli.state import CliState, ServerGroup, config_option, pass_state
from server.cli.trust import (
    audit_command,
    device_quarantine,
    device_release,
    device_reprovision,
    device_revoke,
)
from server.config import load_server_config
from server.store.db import DEFAULT_DATABASE
from server.store.devices import DeviceRepository
from server.store.operator_actions import (
    OPERATOR_ENV,
    OperatorAction,
    OperatorActionLog,
    current_operator,
)
from server.store.schema import DeviceStatus
from server.store.users import UserRepository

DEFAULT_MONGODB_URI = f"mongodb://127.0.0.1:27017/{DEFAULT_DATABASE}"


@click.group(cls=ServerGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--mongodb-uri",
    envvar="MONGODB_URI",
    default=DEFAULT_MONGODB_URI,
    show_default=True,
    help="MongoDB URI; the database name is its path (default database: "
    f"{DEFAULT_DATABASE}). Also read from MONGODB_URI.",
)
@click.option(
    "--operator",
    envvar=OPERATOR_ENV,
    default=None,
    help=f"Who acts, recorded in the audit trail (default: login@host). Also {OPERATOR_ENV}.",
)
@click.version_option(package_name="device-provisioning")
@click.pass_context
def main(ctx: click.Context, mongodb_uri: str, operator: str | None) -> None:
    """Provisioning server and admin tools for the device fleet."""
    state = CliState(mongodb_uri, operator=current_operator({OPERATOR_ENV: operator or ""}))
    ctx.obj = state
    ctx.call_on_close(state.close)


# --- ca, broker-config: server/cli/pki.py ---------------------------------

main.add_command(ca)
main.add_command(broker_config)
main.add_command(doctor_command)  # server/cli/doctor.py


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
    OperatorActionLog(state.database).record(
        OperatorAction.ALLOCATE, doc["clientId"], state.operator, {"userId": doc["userId"]}
    )
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


for command in (device_revoke, device_reprovision, device_quarantine, device_release):
    device.add_command(command)


# --- audit: server/cli/trust.py ---------------------------------------------

main.add_command(audit_command)


device.add_command(device_history_command)  # server/cli/history.py


# --- run -------------------------------------------------------------------


@main.command("run")
@config_option("for the service")
@click.option("--ca-dir", type=click.Path(path_type=Path), default=None, help="CA directory.")
@click.option("--broker-host", default=None, help="Broker host (server listener).")
@click.option("--broker-port", type=int, default=None, help="Broker port (server listener).")
@click.option(
    "--broker-config-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Directory written by `broker-config`: keep its ACL and CRL in sync.",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(1, 65535),
    default=None,
    help="Serve Prometheus metrics on http://HOST:PORT/metrics (default: off).",
)
@click.option(
    "--metrics-host",
    default=None,
    help="Address for --metrics-port (default 127.0.0.1: loopback only).",
)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@pass_state
def run(
    state: CliState,
    config_path: Path | None,
    ca_dir: Path | None,
    broker_host: str | None,
    broker_port: int | None,
    broker_config_dir: Path | None,
    metrics_port: int | None,
    metrics_host: str | None,
    verbose: bool,
) -> None:
    """Serve tokens, CSRs, renewals and status over MQTT until SIGTERM."""
    from server.service.runner import run_service

    explicit_uri = click.get_current_context().find_root().params.get("mongodb_uri")
    config = load_server_config(
        config_path,
        mongodb_uri=explicit_uri if explicit_uri != DEFAULT_MONGODB_URI else None,
        ca_dir=ca_dir,
        broker_host=broker_host,
        broker_port=broker_port,
        broker_config_dir=broker_config_dir,
        metrics_port=metrics_port,
        metrics_host=metrics_host,
    )
    run_service(config, verbose=verbose)
