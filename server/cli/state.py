"""What every ``provision-server`` command shares: the group class and the lazy database."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import click

from server.errors import ServerError
from server.store.db import Database

F = TypeVar("F", bound=Callable[..., Any])


def config_option(purpose: str) -> Callable[[F], F]:
    """``--config FILE`` (or PROVISION_SERVER_CONFIG): the server's TOML, read for ``purpose``."""
    return click.option(
        "--config",
        "config_path",
        type=click.Path(path_type=Path, dir_okay=False),
        envvar="PROVISION_SERVER_CONFIG",
        default=None,
        help=f"Server config file (see docs/server.md), {purpose}. Also PROVISION_SERVER_CONFIG.",
    )


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
    operator: str = "-"
    """Who runs the command, for the audit trail (``--operator``, else login@host)."""
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
