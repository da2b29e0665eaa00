"""``provision-agent``: run the device service, show its status, reset its identity.

Exit codes: 0 success, 1 an operational error (one line on stderr), 2 usage.
``run`` checks the config, then replaces this process with the click-free
service process ``python -m agent run`` (same PID, agent/__main__.py), so the
long-running service never holds click (design.md §7).
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar, NoReturn

import click

from agent.config import AgentConfig, load_config
from agent.errors import AgentError

STATE_ENTRIES = ("identity.json", "state.json", "keys", "certs", "birth", "ca-chain.pem")


def _fail(message: str) -> NoReturn:
    click.echo(f"provision-agent: error: {message}", err=True)
    sys.exit(1)


def _config(path: Path | None) -> AgentConfig:
    try:
        return load_config(path)
    except AgentError as exc:
        _fail(exc.message)


config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Config file (default: $PROVISION_AGENT_CONFIG, then the standard locations).",
)


class _LazyGroup(click.Group):
    """Commands in ``lazy`` are imported only when used (or listed by ``--help``).

    The factory console pulls in cryptography and pyserial; ``run`` must not pay
    for them in memory (design.md §7).
    """

    lazy: ClassVar[dict[str, tuple[str, str]]] = {
        "factory-console": ("agent.factory.console", "factory_console_command"),
        "doctor": ("agent.doctor", "doctor_command"),
    }

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy and cmd_name not in self.commands:
            module, attribute = self.lazy[cmd_name]
            command: click.Command = getattr(importlib.import_module(module), attribute)
            return command
        return super().get_command(ctx, cmd_name)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Device agent: from birth identity to a live mTLS MQTT session."""


@main.command()
@config_option
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def run(config_path: Path | None, verbose: bool) -> None:
    """Run the agent service until SIGTERM/SIGINT (exit 0 on a clean stop)."""
    _config(config_path)  # a bad config is reported here, with the CLI's usual one line
    from agent.runner import exec_service, service_argv

    try:
        exec_service(service_argv(config_path, verbose))
    except OSError as exc:
        _fail(f"cannot start the service ({sys.executable}): {os.strerror(exc.errno or 0)}")


def collect_status(config: AgentConfig) -> dict[str, Any]:
    """What ``status`` shows; only files are read, nothing is contacted."""
    from agent.birth import BirthIdentity
    from agent.runner import certs_dir
    from agent.state import StateStore
    from agent.storage import CertificateStore

    state_dir = config.device.state_dir
    record = StateStore(state_dir).load()
    identity = BirthIdentity.load(state_dir)
    info: dict[str, Any] = {
        "state": record.state.value,
        "stateDir": str(state_dir),
        "clientId": identity.client_id if identity else None,
        "mac": identity.mac if identity else None,
        "finalized": identity.finalized if identity else False,
        "certificateSerial": None,
        "certificateExpiresAt": None,
        "broker": None,
        "error": (
            {"code": record.error_code, "message": record.error_message}
            if record.state.value == "REJECTED"
            else None
        ),
        "retryAt": _iso(record.retry_at) if record.state.value == "REJECTED" else None,
    }
    if identity is not None:
        ep = identity.effective_endpoints(config.broker)
        info["broker"] = {
            "provisioning": f"{ep.provisioning_host}:{ep.provisioning_port}",
            "operational": f"{ep.operational_host}:{ep.operational_port}",
        }
    certs = CertificateStore(certs_dir(state_dir))
    version = certs.live_version()
    if version is not None:
        meta = certs.meta(version)
        info["certificateSerial"] = meta.get("serial")
        info["certificateExpiresAt"] = _iso(meta.get("not_after"))
    return info


def _iso(timestamp: object) -> str | None:
    if not isinstance(timestamp, int | float):
        return None
    return datetime.fromtimestamp(timestamp).astimezone().isoformat(timespec="seconds")


@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(config_path: Path | None, as_json: bool) -> None:
    """Show state, clientId, MAC, certificate serial and expiry, broker."""
    config = _config(config_path)
    try:
        info = collect_status(config)
    except AgentError as exc:
        _fail(exc.message)
    if as_json:
        click.echo(json.dumps(info, indent=2, sort_keys=True))
        return
    broker = info["broker"] or {}
    rows = [
        ("state", info["state"]),
        ("client id", info["clientId"] or "-"),
        ("MAC", info["mac"] or "-"),
        ("certificate serial", info["certificateSerial"] or "-"),
        ("certificate expires", info["certificateExpiresAt"] or "-"),
        ("provisioning broker", broker.get("provisioning", "-")),
        ("operational broker", broker.get("operational", "-")),
        ("state dir", info["stateDir"]),
    ]
    if info["error"]:
        rows.append(("last error", f"{info['error']['code']}: {info['error']['message']}"))
        rows.append(("retry at", info["retryAt"] or "-"))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        click.echo(f"{name:<{width}}  {value}")


@main.command()
@config_option
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def reset(config_path: Path | None, yes: bool) -> None:
    """Delete keys, certificates, state and the birth identity (factory reset).

    The device then needs the factory station again to get a new birth identity.
    """
    config = _config(config_path)
    state_dir = config.device.state_dir
    if not yes and not click.confirm(
        f"Delete the device identity, keys and certificates in {state_dir}?"
    ):
        _fail("reset cancelled (nothing was deleted); use --yes to skip the question")
    try:
        removed = reset_state(state_dir)
    except OSError as exc:
        _fail(f"cannot reset {state_dir}: {exc}")
    click.echo(f"reset {state_dir}: removed {', '.join(removed) or 'nothing (already empty)'}")


def reset_state(state_dir: Path) -> list[str]:
    """Remove everything identity-related; identity.json first, so a crash leaves no identity."""
    removed = []
    for name in STATE_ENTRIES:
        path = state_dir / name
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            # Rename first: a crash mid-delete leaves a trash dir, never half an identity.
            trash = state_dir / f".trash-{name}-{time.monotonic_ns()}"
            path.rename(trash)
            shutil.rmtree(trash)
        else:
            continue
        removed.append(name)
    for leftover in state_dir.glob(".trash-*") if state_dir.is_dir() else []:
        shutil.rmtree(leftover, ignore_errors=True)
    return removed


if __name__ == "__main__":
    main()
