"""``layout.json`` beside the broker files: how `run` finds what `broker-config` wrote."""

from __future__ import annotations

import json
from pathlib import Path

from server.broker.mosquitto_conf import BrokerLayout, replace_if_changed
from server.errors import ConfigError
from server.pki.ca import CaPaths

LAYOUT_FILE = "layout.json"


def save_layout(layout: BrokerLayout) -> Path:
    path = layout.directory / LAYOUT_FILE
    data = {
        "ca_dir": str(layout.ca.directory),
        "provisioning_port": layout.provisioning_port,
        "operational_port": layout.operational_port,
        "server_port": layout.server_port,
        "device_bind": layout.device_bind,
        "run_as": layout.run_as,
        "runtime_dir": str(layout.runtime_dir) if layout.runtime_dir else None,
    }
    replace_if_changed(path, (json.dumps(data, indent=2) + "\n").encode())
    return path


def load_layout(directory: Path) -> BrokerLayout:
    path = directory / LAYOUT_FILE
    try:
        data = json.loads(path.read_text())
        return BrokerLayout(
            directory=directory,
            ca=CaPaths.of(Path(data["ca_dir"])),
            provisioning_port=int(data["provisioning_port"]),
            operational_port=int(data["operational_port"]),
            server_port=int(data["server_port"]),
            device_bind=str(data["device_bind"]),
            run_as=data.get("run_as"),
            runtime_dir=Path(data["runtime_dir"]) if data.get("runtime_dir") else None,
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            f"{path} is missing or invalid ({exc}); run `provision-server broker-config` first"
        ) from None
