"""``provision-server device history DEVICE``: one device's life, oldest first."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

import click

from server.cli.output import short_date, table, to_json
from server.cli.state import CliState, pass_state
from server.store.devices import DeviceRepository
from server.store.history import device_history

HISTORY_HEADERS = ("when (UTC)", "source", "event", "who", "details")


def _value(value: Any) -> str:
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d")
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value) or "-"
    return str(value)


def _details(details: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={_value(v)}" for k, v in details.items() if v not in (None, ""))


@click.command("history")
@click.argument("device_ref", metavar="DEVICE")
@click.option("--json", "as_json", is_flag=True, help="Print the device and its events as JSON.")
@pass_state
def device_history_command(state: CliState, device_ref: str, as_json: bool) -> None:
    """Show DEVICE's history (MAC or clientId): registration, operator actions
    (who, what, when), certificates issued and revoked, oldest first."""
    device = DeviceRepository(state.database).find(device_ref)
    events = device_history(state.database, device)
    if as_json:
        click.echo(to_json({"device": device, "events": [e.to_json() for e in events]}))
        return
    click.echo(
        f"{device['clientId']} (MAC {device['macID']}): {device['status']}, "
        f"certificate {device.get('certificateSerial') or '-'}"
    )
    rows = [[short_date(e.at), e.source, e.event, e.actor, _details(e.details)] for e in events]
    click.echo(table(rows, HISTORY_HEADERS))
