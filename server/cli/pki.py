"""``provision-server ca`` and ``provision-server broker-config``: CA material and broker files.

Registered on ``main`` by server/cli/main.py (``main.add_command``).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from server.cli.output import to_json
from server.cli.state import CliState, ServerGroup, pass_state
from server.config import create_passphrase_file, read_passphrase

# --- ca --------------------------------------------------------------------

F = TypeVar("F", bound=Callable[..., Any])

passphrase_option = click.option(
    "--passphrase-file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="File holding the passphrase of the CA keys.",
)


def ca_dir_option(name: str, help_text: str) -> Callable[[F], F]:
    return click.option(name, "ca_dir", type=click.Path(path_type=Path), required=True,
                        help=help_text)  # fmt: skip


@click.group(cls=ServerGroup)
def ca() -> None:
    """Certificate authorities (root, device CA, factory CA)."""


@ca.command("init")
@ca_dir_option("--dir", "Directory for the CA material (created 0700).")
@click.option(
    "--passphrase-file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Encrypt the CA keys with the passphrase in this file; a missing file is created "
    "(0600) with a random passphrase.",
)
@click.option(
    "--server-name",
    "server_names",
    multiple=True,
    default=("localhost",),
    show_default=True,
    help="DNS name of the broker (repeatable).",
)
@click.option(
    "--exist-ok",
    is_flag=True,
    help="Succeed without a change when the directory already holds a complete CA that the "
    "passphrase unlocks (a deploy run again).",
)
def ca_init(
    ca_dir: Path, passphrase_file: Path | None, server_names: tuple[str, ...], exist_ok: bool
) -> None:
    """Create the CAs and the broker/server identities; never overwrites."""
    from server.pki.ca import CaPaths, CertificateAuthority

    if exist_ok and all(path.exists() for path in CaPaths.of(ca_dir).material()):
        # Loading proves the keys, certificates and passphrase belong together.
        CertificateAuthority.load(ca_dir, read_passphrase(passphrase_file))
        click.echo(f"CA material already in {ca_dir}: kept")
        return
    created = passphrase_file is not None and create_passphrase_file(passphrase_file)
    try:
        CertificateAuthority.init(
            ca_dir, passphrase=read_passphrase(passphrase_file), server_names=server_names
        )
    except BaseException:
        if created and passphrase_file is not None:
            passphrase_file.unlink()  # nothing was encrypted with it: leave no trace
        raise
    if created:
        click.echo(f"new CA passphrase written to {passphrase_file} (keep a copy offline)")
    click.echo(f"CA material written to {ca_dir}")


@ca.command("show")
@ca_dir_option("--dir", "CA directory.")
@passphrase_option
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def ca_show(ca_dir: Path, passphrase_file: Path | None, as_json: bool) -> None:
    """Show subject, serial, validity and fingerprint of each CA certificate."""
    from server.pki.ca import CertificateAuthority

    described = CertificateAuthority.load(ca_dir, read_passphrase(passphrase_file)).describe()
    if as_json:
        click.echo(to_json(described))
        return
    for entry in described:
        for key, value in entry.items():
            click.echo(f"{key:12} {value}")
        click.echo()


# --- broker ------------------------------------------------------------------


@click.command("broker-config")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="Directory for mosquitto.conf, ACL files and the CRL.",
)
@ca_dir_option("--ca-dir", "CA directory (the CRL is signed with the device CA key).")
@passphrase_option
@click.option(
    "--provisioning-port",
    type=click.IntRange(1, 65535),
    default=8883,
    show_default=True,
    help="Listener for birth certificates.",
)
@click.option(
    "--operational-port",
    type=click.IntRange(1, 65535),
    default=8884,
    show_default=True,
    help="Listener for operational certificates (with CRL).",
)
@click.option(
    "--server-port",
    type=click.IntRange(1, 65535),
    default=8885,
    show_default=True,
    help="Loopback listener for the server's own identity.",
)
@click.option(
    "--bind",
    default="0.0.0.0",  # noqa: S104 (devices connect from the network)
    show_default=True,
    help="Address of the two device listeners.",
)
@click.option(
    "--run-as",
    default=None,
    help="Mosquitto's `user` option (default: mosquitto); its group may read OUT, nobody else.",
)
@click.option(
    "--guard-plugin",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    default=None,
    help="A prebuilt provisioning_guard.so (default: the package's, else build it with gcc "
    "and mosquitto-dev).",
)
@pass_state
def broker_config(
    state: CliState,
    out_dir: Path,
    ca_dir: Path,
    passphrase_file: Path | None,
    provisioning_port: int,
    operational_port: int,
    server_port: int,
    bind: str,
    run_as: str | None,
    guard_plugin: Path | None,
) -> None:
    """Write a working Mosquitto config with ACLs, CRLs and its plugin from the database.

    Start Mosquitto with `mosquitto -c OUT/mosquitto.conf`; `provision-server run
    --broker-config-dir OUT` then keeps the ACL and CRLs in sync (reload over MQTT, no
    restart) and disconnects revoked devices. OUT holds copies of the broker's key and
    certificates (mode 0640, group of --run-as): Mosquitto never reads the CA directory.
    """
    from server.broker.acl_sync import read_broker_state
    from server.broker.broker_assets import install_broker_assets
    from server.broker.guard_plugin import (
        PLUGIN_NAME,
        build_guard_plugin,
        packaged_guard_plugin,
    )
    from server.broker.layout_file import save_layout
    from server.broker.mosquitto_conf import BrokerLayout, write_broker_files
    from server.pki.ca import CertificateAuthority

    ca = CertificateAuthority.load(ca_dir, read_passphrase(passphrase_file))
    layout = BrokerLayout(
        directory=out_dir.resolve(),
        ca=ca.paths,
        provisioning_port=provisioning_port,
        operational_port=operational_port,
        server_port=server_port,
        device_bind=bind,
        run_as=run_as,
    )
    broker_state = read_broker_state(state.database)
    if guard_plugin is None:
        guard_plugin = packaged_guard_plugin()  # built with the package, if installed
    if guard_plugin is not None:
        install_broker_assets(layout, guard_plugin)
    else:
        with tempfile.TemporaryDirectory() as build_dir:
            install_broker_assets(layout, build_guard_plugin(Path(build_dir) / PLUGIN_NAME))
    write_broker_files(
        layout,
        broker_state.acl_docs,
        broker_state.revoked_device_ids,
        broker_state.crl_pem(ca),
        broker_state.factory_crl_pem(ca),
    )
    save_layout(layout)
    click.echo(
        f"wrote {layout.conf_path} (listeners: provisioning {provisioning_port}, "
        f"operational {operational_port}, server 127.0.0.1:{server_port})"
    )
