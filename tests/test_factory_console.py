"""The board's factory console: commands on real files, and over a real raw pty."""

from __future__ import annotations

import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from agent.birth import BirthIdentity, Endpoints
from agent.cli import reset_state
from agent.factory import commands as fc
from agent.factory.commands import BoardLocked, CertificateMismatch, Command, IdentityState
from agent.factory.console import FactoryConsole
from agent.factory.link import RemoteError, SerialLink
from agent.protocol import ErrorCode
from server.pki.ca import CertificateAuthority
from tests.serial_pty import LineProxy, open_port
from tests.simulated_board import make_board_files, make_sysfs

MAC = "02:00:00:AA:BB:01"
ENDPOINTS = Endpoints("prov.example", 8883, "mqtt.example", 8884)


@dataclass(frozen=True)
class BoardFiles:
    """A simulated board's filesystem: sysfs with one NIC, a machine-id, a state dir."""

    root: Path
    sysfs: Path
    state_dir: Path
    mac: str

    def console(self) -> FactoryConsole:
        return FactoryConsole(self.state_dir, sysfs_root=self.sysfs, root=self.root)

    def cli_args(self) -> list[str]:
        return [
            "--state-dir",
            str(self.state_dir),
            "--sysfs-root",
            str(self.sysfs),
            "--root",
            str(self.root),
        ]


def make_board(directory: Path, mac: str = MAC, serial: str = "SN-0001") -> BoardFiles:
    directory.mkdir(parents=True, exist_ok=True)
    sysfs = make_sysfs(directory / "sys", {"lo": ("00:00:00:00:00:00", False), "eth0": (mac, True)})
    make_board_files(directory, machine_id=serial + "\n")
    return BoardFiles(directory, sysfs, directory / "state", mac)


@pytest.fixture(scope="module")
def factory_ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.init(tmp_path_factory.mktemp("ca") / "ca")


def call(console: FactoryConsole, command: Command, request: dict[str, Any]) -> dict[str, Any]:
    return fc.decode(console.handle(command, fc.encode(request)), command.name)


def staged_items(console: FactoryConsole, ca: CertificateAuthority, client_id: str) -> bytes:
    """GEN_KEY, sign, PUT every item; returns nothing but the commit hash (as bytes)."""
    csr_pem = call(console, Command.GEN_KEY, {"clientId": client_id})["csr"]
    csr = x509.load_pem_x509_csr(csr_pem.encode())
    cert = ca.sign_birth_certificate(csr.public_key(), client_id, console.mac())  # type: ignore[arg-type]
    items = {
        fc.ITEM_CLIENT_ID: client_id.encode(),
        fc.ITEM_CERTIFICATE: cert.public_bytes(Encoding.PEM),
        fc.ITEM_CA_CHAIN: ca.factory_ca_chain_pem,
        fc.ITEM_ENDPOINTS: fc.encode(ENDPOINTS.to_json()),
    }
    for name, data in items.items():
        call(console, Command.PUT, {"item": name, "data": data.decode()})
    return fc.commit_digest(items).encode()


def test_info_reports_mac_serial_and_state(tmp_path: Path) -> None:
    console = make_board(tmp_path).console()
    info = call(console, Command.INFO, {})
    assert info == {"mac": MAC, "serial": "SN-0001", "state": "none"}


def test_gen_key_is_idempotent_and_the_key_stays(tmp_path: Path) -> None:
    board = make_board(tmp_path)
    console = board.console()
    first = x509.load_pem_x509_csr(
        call(console, Command.GEN_KEY, {"clientId": "dev-a"})["csr"].encode()
    )
    again = x509.load_pem_x509_csr(
        call(console, Command.GEN_KEY, {"clientId": "dev-a"})["csr"].encode()
    )
    assert first.public_key() == again.public_key()
    assert first.subject.rfc4514_string() == "CN=dev-a"
    assert console.state() is IdentityState.KEYED
    key = board.state_dir / "keys" / "birth.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    # A fresh console process (board rebooted) still answers with the same key.
    third = x509.load_pem_x509_csr(
        call(board.console(), Command.GEN_KEY, {"clientId": "dev-a"})["csr"].encode()
    )
    assert third.public_key() == first.public_key()


def test_commit_writes_identity_and_finalize_locks(
    tmp_path: Path, factory_ca: CertificateAuthority
) -> None:
    board = make_board(tmp_path)
    console = board.console()
    digest = staged_items(console, factory_ca, "dev-a")
    answer = call(console, Command.COMMIT, {"sha256": digest.decode()})
    assert answer == {"state": "committed", "clientId": "dev-a"}
    # COMMIT of what is committed is a no-op success (the station retried).
    assert call(console, Command.COMMIT, {"sha256": digest.decode()})["state"] == "committed"
    identity = BirthIdentity.load(board.state_dir)
    assert identity is not None and identity.client_id == "dev-a" and identity.mac == MAC
    assert identity.endpoints == ENDPOINTS and not identity.finalized
    assert stat.S_IMODE(board.state_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(identity.cert_path.stat().st_mode) == 0o600
    assert call(console, Command.FINALIZE, {}) == {"state": "finalized"}
    assert call(console, Command.FINALIZE, {}) == {"state": "finalized"}
    for command, request in (
        (Command.GEN_KEY, {"clientId": "dev-a"}),
        (Command.PUT, {"item": "clientId", "data": "dev-b"}),
        (Command.COMMIT, {"sha256": digest.decode()}),
    ):
        with pytest.raises(BoardLocked, match="provision-agent reset") as caught:
            call(console, command, request)
        assert caught.value.code is ErrorCode.WRONG_STATE
    assert call(console, Command.INFO, {})["state"] == "finalized"


def test_commit_refuses_a_wrong_hash_and_a_foreign_certificate(
    tmp_path: Path, factory_ca: CertificateAuthority
) -> None:
    board = make_board(tmp_path)
    console = board.console()
    staged_items(console, factory_ca, "dev-a")
    with pytest.raises(fc.FactoryCommandError, match="hash mismatch"):
        call(console, Command.COMMIT, {"sha256": "00" * 32})
    # A certificate for another board's MAC is refused, nothing is written.
    other = make_board(tmp_path / "other", mac="02:00:00:AA:BB:99").console()
    csr = x509.load_pem_x509_csr(
        call(other, Command.GEN_KEY, {"clientId": "dev-a"})["csr"].encode()
    )
    cert = factory_ca.sign_birth_certificate(csr.public_key(), "dev-a", other.mac())  # type: ignore[arg-type]
    items = {
        fc.ITEM_CLIENT_ID: b"dev-a",
        fc.ITEM_CERTIFICATE: cert.public_bytes(Encoding.PEM),
        fc.ITEM_CA_CHAIN: factory_ca.factory_ca_chain_pem,
        fc.ITEM_ENDPOINTS: fc.encode(ENDPOINTS.to_json()),
    }
    for name, data in items.items():
        call(console, Command.PUT, {"item": name, "data": data.decode()})
    with pytest.raises(CertificateMismatch, match="MAC"):
        call(console, Command.COMMIT, {"sha256": fc.commit_digest(items)})
    assert BirthIdentity.load(board.state_dir) is None
    with pytest.raises(fc.WrongStep):
        call(console, Command.FINALIZE, {})


def test_commit_without_put_is_a_clear_error(tmp_path: Path) -> None:
    console = make_board(tmp_path).console()
    with pytest.raises(fc.WrongStep, match="PUT them before COMMIT"):
        call(console, Command.COMMIT, {"sha256": "00" * 32})
    with pytest.raises(fc.FactoryCommandError, match="unknown factory command"):
        console.handle(0x7F, b"{}")
    with pytest.raises(fc.FactoryCommandError, match="JSON"):
        console.handle(Command.INFO, b"\xff")


def test_locked_board_refuses_over_a_real_pty(
    tmp_path: Path, factory_ca: CertificateAuthority
) -> None:
    board = make_board(tmp_path)
    console = board.console()
    call(console, Command.COMMIT, {"sha256": staged_items(console, factory_ca, "dev-a").decode()})
    call(console, Command.FINALIZE, {})
    with LineProxy() as proxy:
        board_port = open_port(proxy.board_path)
        station_port = open_port(proxy.station_path)
        stop = threading.Event()
        thread = threading.Thread(target=board.console().serve, args=(board_port, stop))
        thread.start()
        try:
            link = SerialLink(station_port, timeout=0.3, retries=3)
            link.connect()
            info = fc.decode(link.request(Command.INFO, b"{}"), "INFO")
            assert info["state"] == "finalized" and info["clientId"] == "dev-a"
            with pytest.raises(RemoteError, match="finalized as dev-a") as caught:
                link.request(Command.GEN_KEY, fc.encode({"clientId": "dev-a"}))
            assert caught.value.remote_code == "WRONG_STATE"
        finally:
            stop.set()
            thread.join(timeout=5)
            board_port.close()
            station_port.close()


def test_reset_unlocks_a_finalized_board_with_a_new_key(
    tmp_path: Path, factory_ca: CertificateAuthority
) -> None:
    board = make_board(tmp_path)
    console = board.console()
    call(console, Command.COMMIT, {"sha256": staged_items(console, factory_ca, "dev-a").decode()})
    call(console, Command.FINALIZE, {})
    old_key = (board.state_dir / "keys" / "birth.key").read_bytes()
    reset_state(board.state_dir)
    assert console.state() is IdentityState.NONE
    call(console, Command.COMMIT, {"sha256": staged_items(console, factory_ca, "dev-b").decode()})
    identity = BirthIdentity.load(board.state_dir)
    assert identity is not None and identity.client_id == "dev-b" and not identity.finalized
    assert (board.state_dir / "keys" / "birth.key").read_bytes() != old_key


def test_deeply_nested_payload_is_a_bad_request_not_an_internal_error(tmp_path: Path) -> None:
    console = make_board(tmp_path).console()
    nested = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(fc.FactoryCommandError, match="nested too deeply") as info:
        console.handle(Command.GEN_KEY, nested)
    assert info.value.code.value == "BAD_REQUEST"
    assert call(console, Command.INFO, {})["state"] == "none"  # nothing was written
