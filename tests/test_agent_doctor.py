"""``provision-agent doctor``: a healthy board passes; each check, broken on purpose, fails.

The board is real files made the way the factory console and the agent make them (key
store, birth identity, versioned certificate store, state.json) and the broker a real
Mosquitto with the test CA, so the network checks resolve, connect and shake hands.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.birth import Endpoints, keys_dir, write_birth_identity
from agent.doctor import Doctor, diagnose
from agent.health import CheckResult, Outcome
from agent.keystore import FileKeyStore
from agent.runner import certs_dir
from agent.state import AgentState, StateRecord, StateStore
from agent.storage import CertificateStore
from harness.simulated_board import make_sysfs
from server.pki.ca import CertificateAuthority
from tests.broker_fixture import LocalBroker

CLIENT_ID = "doctor-board"
MAC = "02:00:00:00:D0:C1"

# Nothing listens on port 1 (tcpmux, privileged): refused at once, and unlike a port that
# was free a moment ago, no other process on this shared machine can have taken it.
CLOSED_PORT = 1


@dataclass
class Board:
    root: Path
    ca: CertificateAuthority
    broker: LocalBroker

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def config_path(self) -> Path:
        return self.root / "agent.toml"

    def write_config(self, **broker: object) -> None:
        lines = [f'[device]\nstate_dir = "{self.state_dir}"\nsysfs_root = "{self.root / "sys"}"\n']
        lines.append("[broker]\n")
        lines += [f"{key} = {json.dumps(value)}\n" for key, value in broker.items()]
        self.config_path.write_text("".join(lines))

    def issue(
        self,
        *,
        not_before: datetime | None = None,
        validity: timedelta = timedelta(days=90),
        key: ec.EllipticCurvePrivateKey | None = None,
        factory: bool = False,
    ) -> int:
        """A new operational certificate (live), for a fresh key in the key store."""
        keystore = FileKeyStore(keys_dir(self.state_dir))
        slot = f"op-{len(os.listdir(keys_dir(self.state_dir)))}"
        public = keystore.generate(slot)
        if key is not None:
            public = key.public_key()  # a certificate that does not belong to the stored key
        sign = self.ca.sign_birth_certificate if factory else self.ca.sign_device_certificate
        if factory:
            cert = sign(public, CLIENT_ID, MAC)
        else:
            cert = self.ca.sign_device_certificate(public, CLIENT_ID, MAC, validity, not_before)
        certs = CertificateStore(certs_dir(self.state_dir))
        version = certs.stage(
            cert.public_bytes(serialization.Encoding.PEM),
            self.ca.device_ca_chain_pem,
            {"serial": f"{cert.serial_number:X}"},
            key_file=keystore.key_file(slot),
        )
        certs.activate(version)
        return version

    def live_cert(self) -> Path:
        return CertificateStore(certs_dir(self.state_dir)).live_paths().cert

    def live_key(self) -> Path:
        key = CertificateStore(certs_dir(self.state_dir)).live_paths().key
        assert key is not None
        return key

    def doctor(self) -> dict[str, CheckResult]:
        return {result.name: result for result in diagnose(self.config_path)}


@pytest.fixture
def board(tmp_path: Path, ca: CertificateAuthority, broker: LocalBroker) -> Board:
    """A provisioned, ACTIVE board whose birth identity names the broker's listeners."""
    made = Board(tmp_path / "board", ca, broker)
    made.root.mkdir()
    make_sysfs(made.root / "sys", {"eth0": (MAC.lower(), True)})
    keystore = FileKeyStore(keys_dir(made.state_dir))
    birth = ca.sign_birth_certificate(keystore.generate("birth"), CLIENT_ID, MAC)
    layout = broker.layout
    write_birth_identity(
        made.state_dir,
        client_id=CLIENT_ID,
        mac=MAC,
        serial="SN-DOCTOR",
        endpoints=Endpoints(
            "127.0.0.1", layout.provisioning_port, "127.0.0.1", layout.operational_port
        ),
        cert_pem=birth.public_bytes(serialization.Encoding.PEM),
        chain_pem=ca.factory_ca_chain_pem,
        finalized=True,
    )
    made.issue()
    StateStore(made.state_dir).save(StateRecord(state=AgentState.ACTIVE))
    made.write_config()
    return made


def failing(results: dict[str, CheckResult]) -> dict[str, str]:
    return {name: r.message for name, r in results.items() if r.outcome == Outcome.FAIL}


def test_a_healthy_board_passes_every_check(board: Board) -> None:
    done = subprocess.run(
        [str(Path(sys.executable).with_name("provision-agent")), "doctor", "--config",
         str(board.config_path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    names = [line.split()[1] for line in lines]
    assert names == [
        "config", "identity", "clock", "keys", "key-match", "certificate",
        "provisioning-dns", "provisioning-port", "provisioning-tls",
        "operational-dns", "operational-port", "operational-tls", "state",
    ]  # fmt: skip
    assert all(line.startswith("PASS") for line in lines), done.stdout
    assert "accepts the operational certificate" in done.stdout
    as_json = subprocess.run(
        [str(Path(sys.executable).with_name("provision-agent")), "doctor", "--json", "--config",
         str(board.config_path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    report = json.loads(as_json.stdout)
    assert report["ok"] is True
    assert {c["status"] for c in report["checks"]} == {"pass"}


def test_a_broken_config_fails_with_the_cli_exit_code(board: Board) -> None:
    board.config_path.write_text("[broker]\nprovisioning_port = 0\n")
    done = subprocess.run(
        [str(Path(sys.executable).with_name("provision-agent")), "doctor", "--config",
         str(board.config_path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stdout.startswith("FAIL  config")
    assert "provisioning_port: expected a TCP port number in 1..65535, got 0" in done.stdout


def test_a_clock_before_the_certificate_fails(board: Board) -> None:
    board.issue(not_before=datetime.now(timezone.utc) + timedelta(days=3))
    assert (
        "before the operational certificate's validity starts" in failing(board.doctor())["clock"]
    )


def test_a_clock_before_the_build_fails(board: Board) -> None:
    from agent.config import load_config

    doctor = Doctor(load_config(board.config_path), now=datetime(2001, 1, 1, tzinfo=timezone.utc))
    results = {r.name: r for r in doctor.run()}
    assert results["clock"].outcome == Outcome.FAIL
    assert "before this agent was built" in results["clock"].message
    assert "set the time" in results["clock"].message


def test_a_key_readable_by_others_fails(board: Board) -> None:
    os.chmod(board.live_key(), 0o644)
    message = failing(board.doctor())["keys"]
    assert f"key {board.live_key()} has mode 0644: chmod 600 {board.live_key()}" in message


def test_a_state_directory_open_to_others_fails(board: Board) -> None:
    os.chmod(board.state_dir, 0o750)  # noqa: S103 (the misconfiguration under test)
    message = failing(board.doctor())["keys"]
    assert f"directory {board.state_dir} has mode 0750: chmod 700 {board.state_dir}" in message


def test_a_certificate_for_another_key_fails(board: Board) -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    cert = board.ca.sign_device_certificate(other.public_key(), CLIENT_ID, MAC)
    board.live_cert().write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    message = failing(board.doctor())["key-match"]
    assert "the operational certificate" in message and "does not belong to its key" in message


def test_an_expired_certificate_fails_and_a_late_renewal_warns(board: Board) -> None:
    now = datetime.now(timezone.utc)
    board.issue(not_before=now - timedelta(days=10), validity=timedelta(days=5))
    assert "expired on" in failing(board.doctor())["certificate"]
    board.issue(not_before=now - timedelta(days=80), validity=timedelta(days=90))
    late = board.doctor()["certificate"]
    assert late.outcome == Outcome.WARN
    assert "renewal was due" in late.message


def test_a_broker_name_that_does_not_resolve_fails(board: Board) -> None:
    # A name glibc refuses without asking a DNS server: the test sends nothing off the machine.
    board.write_config(operational_host="-no-such-broker", operational_port=8884)
    message = failing(board.doctor())["operational-dns"]
    assert "cannot resolve -no-such-broker" in message and "operational_host" in message


def test_a_port_that_does_not_answer_fails(board: Board) -> None:
    port = CLOSED_PORT
    board.write_config(operational_host="127.0.0.1", operational_port=port)
    message = failing(board.doctor())["operational-port"]
    assert f"127.0.0.1:{port} does not answer" in message


def test_a_broker_that_does_not_verify_against_the_ca_fails(board: Board, tmp_path: Path) -> None:
    stranger = CertificateAuthority.init(tmp_path / "other-ca")
    board.write_config(ca_bundle=str(stranger.paths.root_cert))
    results = failing(board.doctor())
    for listener in ("provisioning", "operational"):
        assert "the broker's certificate does not verify against" in results[f"{listener}-tls"]


def test_a_certificate_the_broker_refuses_fails(board: Board) -> None:
    # Signed by the factory CA: the operational listener trusts only the device CA.
    board.issue(factory=True)
    message = failing(board.doctor())["operational-tls"]
    assert "the broker refused the operational certificate" in message


def test_the_state_machines_last_error_fails(board: Board) -> None:
    StateStore(board.state_dir).save(
        StateRecord(
            state=AgentState.REJECTED,
            error_code="MAC_MISMATCH",
            error_message="the MAC in the request is not the device's registered MAC",
            retry_at=datetime.now(timezone.utc).timestamp() + 3600,
        )
    )
    message = failing(board.doctor())["state"]
    assert message.startswith("REJECTED by the server: MAC_MISMATCH: the MAC in the request")


def test_an_identity_of_another_board_fails(board: Board) -> None:
    shutil.rmtree(board.root / "sys")
    make_sysfs(board.root / "sys", {"eth0": ("02:00:00:00:0f:0f", True)})
    message = failing(board.doctor())["identity"]
    assert "this board's MAC 02:00:00:00:0F:0F (eth0) is not the MAC of its birth" in message


def test_a_board_without_identity_says_to_program_it(board: Board) -> None:
    (board.state_dir / "identity.json").unlink()
    results = board.doctor()
    assert "program the board with provision-station" in failing(results)["identity"]
    assert set(results) == {"config", "identity", "state"}


def test_certificate_checks_read_the_real_certificate(board: Board) -> None:
    """Not the version's meta.json: a swapped certificate file is what the broker sees."""
    cert = x509.load_pem_x509_certificate(board.live_cert().read_bytes())
    assert f"{cert.serial_number:X}" in board.doctor()["certificate"].message
