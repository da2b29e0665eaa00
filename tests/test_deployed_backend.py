"""The backend deployed as docs/server.md says, on a booted Debian 12, provisions a board.

harness/deployed_backend.py boots a Debian 12 container (systemd as PID 1) and runs
scripts/deploy-backend.sh in it: the provision-server .deb, Debian's mosquitto.service
as user mosquitto, provision-server.service as shipped. A real agent process on the
host then goes from its birth identity to ACTIVE through that broker and server.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from bson import ObjectId

from agent.birth import Endpoints
from harness.deployed_backend import BROKER_PORTS, DeployedBackend, _port_in_use
from harness.simulated_board import make_sysfs
from server.pki.ca import CertificateAuthority
from server.store.db import Database
from server.store.devices import DeviceRepository
from server.store.schema import DEVICES, USERS
from tests.test_agent_provisioning import wait_for
from tests.test_agent_state import make_birth
from tests.test_debs import DIST, VERSION, deb_arch, debs_match_checkout

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
MAC = "02:00:00:5E:0D:01"
CLIENT_ID = "dev-0200005e0d01"


def built_debs() -> tuple[Path, Path]:
    """(agent, server) .debs of this checkout in dist/, built when missing or stale."""
    arch = deb_arch()
    agent = DIST / f"provision-agent_{VERSION}_{arch}.deb"
    server = DIST / f"provision-server_{VERSION}_{arch}.deb"
    if not debs_match_checkout(agent, server):
        subprocess.run(["bash", "scripts/build-debs.sh", "--no-lintian"], cwd=REPO, check=True)
    return agent, server


def physical_interface() -> tuple[str, str]:
    """(name, MAC) of the first non-virtual network interface, as the container sees it."""
    for path in sorted(Path("/sys/class/net").iterdir()):
        mac = (path / "address").read_text().strip().upper()
        if "/virtual/" not in str(path.resolve()) and mac.strip("0:"):
            return path.name, mac
    raise AssertionError("no physical network interface on this machine")


def activate(database: Database, mac: str, client_id: str) -> None:
    """Register the board UNALLOCATED, then allocate it to a new user (the web app's part)."""
    DeviceRepository(database).add(mac, client_id)
    owner_id = ObjectId()
    database.collection(USERS).insert_one({"_id": owner_id, "email": f"{client_id}@example.com"})
    DeviceRepository(database).allocate(client_id, str(owner_id))


def status(database: Database, client_id: str) -> str | None:
    doc = database.collection(DEVICES).find_one({"clientId": client_id})
    return None if doc is None else str(doc.get("status"))


@pytest.fixture
def deployed(
    tmp_path: Path, database: Database, mongodb_uri: str
) -> Iterator[tuple[DeployedBackend, Database]]:
    for tool in ("systemd-nspawn", "mmdebstrap"):
        assert shutil.which(tool), f"{tool} is missing: scripts/test.sh installs it"
    assert os.geteuid() == 0, "booting a container needs root (CI runs as root)"
    assert not any(_port_in_use(port) for port in BROKER_PORTS), "broker ports busy"
    # The container shares the host's network: the test's database is reachable as is.
    backend = DeployedBackend.start(tmp_path / "backend", mongodb_uri, built_debs()[1])
    try:
        yield backend, database
    finally:
        backend.stop()


def test_a_board_reaches_active_against_the_deployed_backend(
    deployed: tuple[DeployedBackend, Database], tmp_path: Path
) -> None:
    backend, database = deployed
    assert "provision-server active (mosquitto as user mosquitto)" in backend.deploy_output
    assert "CA material written" in backend.deploy_output
    # As shipped: both services run as their own users, the unit unmodified.
    for unit, user in (("provision-server.service", "provision-server"),
                       ("mosquitto.service", "mosquitto")):  # fmt: skip
        pid = backend.run("systemctl", "show", "-p", "MainPID", "--value", unit).stdout.strip()
        owner = backend.run("stat", "-c", "%U", f"/proc/{pid}").stdout.strip()
        assert owner == user, unit
    assert backend.run("systemctl", "is-enabled", "provision-server.service").stdout.strip() == (
        "enabled"
    )
    # The Deploy block runs again without harm (an operator retrying, a new package).
    ca_files = {p.name: p.read_bytes() for p in backend.ca_dir.iterdir()}
    again = backend.deploy(backend.mongodb_uri, "localhost")
    assert "CA material already in /var/lib/provision-server/ca: kept" in again
    assert {p.name: p.read_bytes() for p in backend.ca_dir.iterdir()} == ca_files
    # A board with a birth certificate from the deployed factory CA, registered, allocated.
    ca = CertificateAuthority.load(backend.ca_dir, backend.passphrase)
    state_dir = tmp_path / "board" / "state"
    sysfs = make_sysfs(tmp_path / "board" / "sys", {"eth0": (MAC.lower(), True)})
    provisioning, operational, _server = BROKER_PORTS
    endpoints = Endpoints("localhost", provisioning, "localhost", operational)
    make_birth(state_dir, ca, client_id=CLIENT_ID, mac=MAC, endpoints=endpoints)
    activate(database, MAC, CLIENT_ID)
    config = tmp_path / "board" / "agent.toml"
    config.write_text(
        f'[device]\nstate_dir = "{state_dir}"\nsysfs_root = "{sysfs}"\n'
        "[timing]\nbackoff_initial_s = 0.2\nbackoff_max_s = 2.0\nheartbeat_s = 1\n"
    )
    log = tmp_path / "board" / "agent.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROVISION_AGENT_")}
    with log.open("ab") as out:
        agent = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
            stdout=out, stderr=out, cwd=REPO, env=env,
        )  # fmt: skip
    try:

        def active() -> bool:
            assert agent.poll() is None, log.read_text()
            return status(database, CLIENT_ID) == "ACTIVE"

        try:
            wait_for(active, 60, f"{CLIENT_ID} ACTIVE")
        except AssertionError as exc:
            journal = backend.run("journalctl", "--no-pager", "-u", "provision-server",
                                  "-u", "mosquitto").stdout  # fmt: skip
            raise AssertionError(f"{exc}\n{log.read_text()[-3000:]}\n{journal[-4000:]}") from None
    finally:
        agent.kill()
        agent.wait(10)


def test_the_packaged_agent_under_its_unit_reaches_active_all_in_one(
    deployed: tuple[DeployedBackend, Database],
) -> None:
    """All-in-one profile: the agent .deb in the same booted system, provision-agent.service
    as shipped (hardening, Type=notify, its own user), the MAC read from the real sysfs."""
    backend, database = deployed
    agent_deb = built_debs()[0]
    shutil.copy(agent_deb, backend.rootfs / "root/deploy/dist" / agent_deb.name)
    installed = backend.run("dpkg", "-i", f"/root/deploy/dist/{agent_deb.name}", timeout=300)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    # What the factory console leaves on the board: birth identity, chain, agent.toml.
    interface, mac = physical_interface()
    client_id = "dev-" + mac.replace(":", "").lower()
    ca = CertificateAuthority.load(backend.ca_dir, backend.passphrase)
    provisioning, operational, _server = BROKER_PORTS
    # By address: a minimal Debian has no /etc/hosts (the broker certificate names 127.0.0.1).
    endpoints = Endpoints("127.0.0.1", provisioning, "127.0.0.1", operational)
    state_dir = backend.rootfs / "var/lib/provision-agent"
    make_birth(state_dir, ca, client_id=client_id, mac=mac, endpoints=endpoints)
    (backend.rootfs / "etc/provision-agent/agent.toml").write_text(
        f'[device]\ninterface = "{interface}"\n[timing]\nbackoff_max_s = 2\nheartbeat_s = 5\n'
    )
    for command in (
        ("chown", "-R", "provision-agent:provision-agent", "/var/lib/provision-agent",
         "/etc/provision-agent/agent.toml"),
        ("chmod", "0700", "/var/lib/provision-agent"),
        ("chmod", "0600", "/etc/provision-agent/agent.toml"),
        ("systemctl", "start", "--no-block", "provision-agent.service"),
    ):  # fmt: skip
        done = backend.run(*command)
        assert done.returncode == 0, done.stderr
    activate(database, mac, client_id)

    def show(*properties: str) -> dict[str, str]:
        shown = backend.run("systemctl", "show", "provision-agent.service",
                            *(f"--property={p}" for p in properties)).stdout  # fmt: skip
        return dict(line.split("=", 1) for line in shown.splitlines() if "=" in line)

    try:
        wait_for(lambda: status(database, client_id) == "ACTIVE", 90, f"{client_id} ACTIVE")
        # Type=notify: "active (running)" only after READY=1; the watchdog is armed.
        wait_for(lambda: show("ActiveState")["ActiveState"] == "active", 30, "READY=1")
    except AssertionError as exc:
        journal = backend.run("journalctl", "--no-pager", "-u", "provision-agent").stdout
        raise AssertionError(f"{exc}\n{journal[-4000:]}") from None
    unit = show("SubState", "StatusText", "MainPID", "WatchdogUSec", "NRestarts")
    assert unit["SubState"] == "running" and unit["StatusText"], unit
    assert unit["WatchdogUSec"] == "1min 30s" and unit["NRestarts"] == "0", unit
    owner = backend.run("stat", "-c", "%U", f"/proc/{unit['MainPID']}").stdout.strip()
    assert owner == "provision-agent"
    keys = backend.run("find", "/var/lib/provision-agent", "-type", "f", "-name", "*key*",
                       "-printf", "%m %u %p\n").stdout.split("\n")  # fmt: skip
    keys = [line for line in keys if line]
    assert keys and all(line.startswith("600 provision-agent ") for line in keys), keys
