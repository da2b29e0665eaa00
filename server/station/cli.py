"""``provision-station``: program boards over serial at the factory.

Exit codes: 0 every board programmed (or already programmed), 1 at least one
board failed (see the table and the report), 2 the station itself cannot run
(config, CA, database, report path). Ctrl-C ends a ``batch --watch`` session
normally (table, report, the exit code of its boards).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import click

from agent.factory import commands as fc
from server.errors import ServerError
from server.pki.ca import CertificateAuthority
from server.station.batch import (
    DEFAULT_WATCH_GLOBS,
    PortWatcher,
    ProgressPrinter,
    format_table,
    program_many,
    watch_ports,
    write_report,
)
from server.station.config import StationConfig, load_station_config
from server.station.programmer import BoardProgrammer, BoardResult, StepHook
from server.store.db import Database

EXIT_OK, EXIT_BOARD_FAILED, EXIT_STATION = 0, 1, 2


@dataclass(frozen=True)
class Station:
    config: StationConfig
    ca: CertificateAuthority
    database: Database

    def programmer(self, on_step: StepHook | None = None) -> BoardProgrammer:
        return BoardProgrammer(
            self.ca,
            self.database,
            client_id_for=self.config.client_id,
            endpoints_json=fc.encode(self.config.endpoints.to_json()),
            timeout=self.config.timeout_s,
            retries=self.config.retries,
            baud=self.config.baud,
            on_step=on_step,
        )


@contextmanager
def open_station(config_path: Path | None) -> Iterator[Station]:
    try:
        config = load_station_config(config_path)
        ca = CertificateAuthority.load(config.ca_dir, config.ca_passphrase())
        database = Database(config.mongodb_uri)
        database.init()
    except ServerError as exc:
        click.echo(f"provision-station: {exc.message}", err=True)
        sys.exit(EXIT_STATION)
    try:
        yield Station(config, ca, database)
    finally:
        database.close()


def _finish(results: Sequence[BoardResult], report: Path | None, as_json: bool) -> None:
    if report is not None:
        try:
            write_report(report, results)
        except (ServerError, OSError) as exc:
            message = exc.message if isinstance(exc, ServerError) else str(exc)
            click.echo(f"provision-station: cannot write report: {message}", err=True)
            sys.exit(EXIT_STATION)
    if as_json:
        click.echo(json.dumps([r.to_row() for r in results], indent=2))
    else:
        click.echo(format_table(results))
    sys.exit(EXIT_OK if all(r.ok for r in results) else EXIT_BOARD_FAILED)


_config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Station TOML (default: $PROVISION_STATION_CONFIG, /etc/provision-station/station.toml).",
)
_report_option = click.option(
    "--report", type=click.Path(path_type=Path), default=None, help="Report file, .csv or .json."
)


@click.group()
def main() -> None:
    """Program boards over their serial console and register them as UNALLOCATED."""


@main.command()
@click.option("--port", required=True, help="Serial device of the board, e.g. /dev/ttyUSB0.")
@_config_option
@_report_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def program(port: str, config_path: Path | None, report: Path | None, as_json: bool) -> None:
    """Program one board."""
    with open_station(config_path) as station:
        progress = None if as_json else ProgressPrinter(sys.stderr)
        result = station.programmer(progress).program(port)
    _finish([result], report, as_json)


@main.command()
@click.option("--ports", "ports", multiple=True, help="Serial devices (also as arguments).")
@click.argument("more_ports", nargs=-1)
@click.option(
    "--watch",
    is_flag=True,
    help="Program each board as it is plugged in (new USB serial ports) until Ctrl-C.",
)
@click.option(
    "--watch-glob",
    "watch_globs",
    multiple=True,
    help=f"With --watch: device paths to watch (default {' '.join(DEFAULT_WATCH_GLOBS)}).",
)
@click.option(
    "--count",
    type=click.IntRange(min=1),
    default=None,
    help="With --watch: stop after this many boards.",
)
@click.option(
    "--poll",
    "poll_s",
    type=click.FloatRange(min=0.05),
    default=0.5,
    show_default=True,
    help="With --watch: seconds between looks for new ports.",
)
@_config_option
@_report_option
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def batch(
    ports: tuple[str, ...],
    more_ports: tuple[str, ...],
    watch: bool,
    watch_globs: tuple[str, ...],
    count: int | None,
    poll_s: float,
    config_path: Path | None,
    report: Path | None,
    as_json: bool,
) -> None:
    """Program many boards in parallel: `--ports /dev/ttyUSB0 /dev/ttyUSB1 ...` or `--watch`."""
    every = [*ports, *more_ports]
    if watch and every:
        raise click.UsageError("--watch finds the ports itself; do not name ports with it")
    if not watch and (watch_globs or count is not None):
        raise click.UsageError("--watch-glob and --count go with --watch")
    if not watch and not every:
        raise click.UsageError("name at least one port with --ports, or use --watch")
    with open_station(config_path) as station:
        progress = None if as_json else ProgressPrinter(sys.stderr)
        try:
            if watch:
                watcher = PortWatcher(watch_globs or DEFAULT_WATCH_GLOBS)
                limit = "" if count is None else f"; stopping after {count} boards"
                click.echo(
                    f"watching {' '.join(watcher.patterns)} for boards{limit}; Ctrl-C to stop",
                    err=True,
                )
                results = watch_ports(
                    watcher,
                    station.programmer,
                    progress,
                    count=count,
                    poll_interval=poll_s,
                    on_found=lambda port: click.echo(f"{port}: new board", err=True),
                )
            else:
                results = program_many(every, station.programmer, progress)
        except ServerError as exc:
            click.echo(f"provision-station: {exc.message}", err=True)
            sys.exit(EXIT_STATION)
    _finish(results, report, as_json)
