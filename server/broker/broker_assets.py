"""Copies of what Mosquitto needs from elsewhere: the CA's certificates, the broker key, the
plugin. Mosquitto drops root to its own user before it reads its TLS files, and the CA's
directory is private (0700) to the CA's owner; so the broker reads copies in its own
directory (mode 0640, Mosquitto's group, nothing world-readable; see mosquitto_conf).
"""

from __future__ import annotations

from pathlib import Path

from server.broker.mosquitto_conf import (
    BrokerError,
    BrokerLayout,
    prepare_broker_directory,
    replace_if_changed,
)


def install_broker_assets(layout: BrokerLayout, plugin: Path | None = None) -> bool:
    """Copy the broker certificate and key, both CA chains and (if given) the plugin.

    True if a file changed (the broker then needs a reload, or a restart for the plugin).
    Called by ``broker-config`` with the plugin and by ``AclSync`` at start (so a re-issued
    broker certificate reaches the broker).
    """
    prepare_broker_directory(layout, enforce=plugin is not None)
    ca = layout.ca
    copies = [
        (ca.broker_cert, layout.broker_cert),
        (ca.broker_key, layout.broker_key),
        (ca.device_ca_chain, layout.device_ca_chain),
        (ca.factory_ca_chain, layout.factory_ca_chain),
    ]
    if plugin is not None:
        copies.append((plugin, layout.guard_plugin))
    changed = False
    for source, target in copies:
        try:
            data = source.read_bytes()
        except OSError as exc:
            raise BrokerError(f"cannot read {source} for the broker: {exc.strerror}") from None
        try:
            changed |= replace_if_changed(target, data)
        except OSError as exc:
            raise BrokerError(f"cannot write {target}: {exc.strerror}") from None
    if not layout.guard_plugin.exists():
        raise BrokerError(
            f"{layout.guard_plugin} is missing: run `provision-server broker-config` (it builds "
            "and copies the provisioning_guard plugin)"
        )
    return changed
