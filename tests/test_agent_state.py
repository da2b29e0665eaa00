"""Agent state without a server: backoff, state.json, resume rules, birth identity, CLI."""

from __future__ import annotations

import json
import logging
import random
import stat
import threading
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.backoff import Backoff, full_jitter
from agent.birth import (
    BirthIdentity,
    Endpoints,
    birth_dir,
    keys_dir,
    mark_finalized,
    write_birth_identity,
)
from agent.cli import main
from agent.config import load_config
from agent.context import DeviceContext
from agent.errors import IdentityError, StorageError
from agent.keystore import FileKeyStore
from agent.provisioning import Provisioner
from agent.runner import certs_dir
from agent.state import AgentState, StateRecord, StateStore
from agent.storage import CertificateStore
from server.pki.ca import CertificateAuthority
from tests.simulated_board import make_sysfs

MAC = "02:00:00:AB:CD:EF"
CLIENT_ID = "dev-0200000abcdef"


@pytest.fixture(scope="module")
def agent_ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.init(tmp_path_factory.mktemp("agent-ca") / "pki")


def make_birth(
    state_dir: Path,
    ca: CertificateAuthority,
    *,
    client_id: str = CLIENT_ID,
    mac: str = MAC,
    endpoints: Endpoints | None = None,
    finalized: bool = True,
) -> BirthIdentity:
    """What the factory console leaves behind: birth key, certificate, chain, identity.json."""
    keystore = FileKeyStore(keys_dir(state_dir))
    public = keystore.generate("birth")
    cert = ca.sign_birth_certificate(public, client_id, mac)
    return write_birth_identity(
        state_dir,
        client_id=client_id,
        mac=mac,
        serial="board-0001",
        endpoints=endpoints or Endpoints("127.0.0.1", 1, "127.0.0.1", 2),
        cert_pem=cert.public_bytes(serialization.Encoding.PEM),
        chain_pem=ca.factory_ca_chain_pem,
        finalized=finalized,
    )


def write_config(tmp_path: Path, state_dir: Path, extra: str = "") -> Path:
    sysfs = tmp_path / "sys"
    if not sysfs.exists():
        make_sysfs(sysfs, {"eth0": (MAC.lower(), True)})
    path = tmp_path / "agent.toml"
    path.write_text(
        f'[device]\nstate_dir = "{state_dir}"\nsysfs_root = "{sysfs}"\n'
        "[timing]\nbackoff_initial_s = 0.05\nbackoff_max_s = 0.2\nrequest_timeout_s = 2\n" + extra
    )
    return path


# --- backoff ------------------------------------------------------------------------------


def test_full_jitter_stays_within_exponential_ceiling() -> None:
    rng = random.Random(7)
    for attempt in range(12):
        ceiling = min(30.0, 0.5 * 2**attempt)
        samples = [full_jitter(attempt, 0.5, 30.0, rng) for _ in range(400)]
        assert all(0.0 <= s <= ceiling for s in samples)
        # Full jitter spreads over the whole range, not just near the ceiling.
        assert min(samples) < ceiling * 0.1 and max(samples) > ceiling * 0.9
    assert full_jitter(10_000, 1.0, 300.0, rng) <= 300.0  # no overflow after days of retries
    with pytest.raises(ValueError):
        full_jitter(-1, 1.0, 2.0, rng)


def test_backoff_grows_resets_and_honours_retry_after() -> None:
    backoff = Backoff(1.0, 8.0, random.Random(1))
    delays = [backoff.next_delay() for _ in range(6)]
    assert backoff.attempt == 6 and all(0 <= d <= 8.0 for d in delays)
    backoff.reset()
    assert backoff.attempt == 0 and backoff.next_delay() <= 1.0
    for _ in range(50):  # retryAfter is a floor; the jitter on top is at most retryAfter again
        delay = backoff.next_delay(retry_after=30.0)
        assert 30.0 <= delay <= 60.0
    with pytest.raises(ValueError):
        Backoff(2.0, 1.0)


# --- state.json -------------------------------------------------------------------------


def test_state_round_trip_mode_and_log_without_token(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = StateStore(tmp_path / "state")
    assert store.load() == StateRecord()
    caplog.set_level(logging.INFO, logger="agent.state")
    record = store.transition(StateRecord(), AgentState.NEED_TOKEN, "birth identity")
    record = store.transition(
        record,
        AgentState.HAVE_TOKEN,
        "token issued",
        token="s3cr3t-token-value",
        token_expires_at=9e9,
    )
    loaded = store.load()
    assert loaded.state is AgentState.HAVE_TOKEN and loaded.token == "s3cr3t-token-value"
    assert loaded == record
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(store.path.parent.stat().st_mode) == 0o700
    lines = [r.getMessage() for r in caplog.records if r.name == "agent.state"]
    assert len(lines) == 2
    assert lines[1].startswith("event=state from=NEED_TOKEN to=HAVE_TOKEN")
    assert "token=set" in lines[1]
    assert all("s3cr3t" not in line for line in caplog.text.splitlines())


def test_corrupt_state_file_is_a_clear_error(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.path.write_text('{"state": "NO_SUCH_STATE"}')
    with pytest.raises(StorageError, match="invalid agent state"):
        store.load()


def test_slot_counter_never_reuses_a_name(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    _record, first = store.next_slot(StateRecord())
    _, second = store.next_slot(store.load())
    assert (first, second) == ("op-1", "op-2")


def _provisioner(state_dir: Path, identity: BirthIdentity) -> Provisioner:
    config = load_config(write_config(state_dir.parent, state_dir), env={})
    context = DeviceContext(
        identity=identity,
        endpoints=identity.endpoints,
        ca_file=identity.chain_path,
        timing=config.timing,
        states=StateStore(state_dir),
        key_dir=keys_dir(state_dir),
        certs=CertificateStore(certs_dir(state_dir)),
        sleep=lambda seconds: True,  # the first wait stops the run
        stop=threading.Event(),
    )
    return Provisioner(context)


def test_resume_reuses_key_and_csr_once_built(
    tmp_path: Path, agent_ca: CertificateAuthority
) -> None:
    state_dir = tmp_path / "state"
    identity = make_birth(state_dir, agent_ca, endpoints=Endpoints("127.0.0.1", 9, "127.0.0.1", 9))
    store = StateStore(state_dir)
    record = store.transition(StateRecord(), AgentState.HAVE_TOKEN, token="t", token_expires_at=9e9)
    # HAVE_TOKEN builds key + CSR and persists CSR_SENT before it tries to send (port 9: refused).
    record = _provisioner(state_dir, identity).run(record)
    assert record.state is AgentState.CSR_SENT and record.key_slot == "op-1"
    csr = record.csr
    keys = FileKeyStore(keys_dir(state_dir))
    assert keys.exists("op-1")
    # A crash and a token error later: a new token, but the same key and the same CSR.
    record = store.transition(store.load(), AgentState.HAVE_TOKEN, token="t2", token_expires_at=9e9)
    record = _provisioner(state_dir, identity).run(record)
    assert (record.state, record.key_slot, record.csr) == (AgentState.CSR_SENT, "op-1", csr)
    assert sorted(p.name for p in keys.directory.glob("op-*")) == ["op-1.key"]


def test_resume_after_crash_before_key_or_csr_existed(
    tmp_path: Path, agent_ca: CertificateAuthority
) -> None:
    state_dir = tmp_path / "state"
    identity = make_birth(state_dir, agent_ca, endpoints=Endpoints("127.0.0.1", 9, "127.0.0.1", 9))
    store = StateStore(state_dir)
    keys = FileKeyStore(keys_dir(state_dir))
    # Crash after the slot name was persisted and the key written, before the CSR was saved:
    # the key was never sent anywhere, so it is reused (no second key appears).
    record = store.transition(
        StateRecord(), AgentState.HAVE_TOKEN, token="t", token_expires_at=9e9, key_slot="op-1",
        slot_counter=1,
    )  # fmt: skip
    public = keys.generate("op-1")
    record = _provisioner(state_dir, identity).run(record)
    assert record.state is AgentState.CSR_SENT and record.key_slot == "op-1"
    assert record.csr is not None
    csr = x509.load_pem_x509_csr(record.csr.encode())
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    assert csr.public_key().public_bytes(*spki) == public.public_bytes(*spki)


def test_expired_token_goes_back_to_need_token(
    tmp_path: Path, agent_ca: CertificateAuthority
) -> None:
    state_dir = tmp_path / "state"
    identity = make_birth(state_dir, agent_ca, endpoints=Endpoints("127.0.0.1", 9, "127.0.0.1", 9))
    store = StateStore(state_dir)
    record = store.transition(StateRecord(), AgentState.HAVE_TOKEN, token="t", token_expires_at=1.0)
    record = _provisioner(state_dir, identity).run(record)
    assert record.state is AgentState.NEED_TOKEN and record.token is None
    assert not FileKeyStore(keys_dir(state_dir)).exists("op-1")


# --- birth identity -----------------------------------------------------------------------


def test_birth_identity_round_trip_and_modes(
    tmp_path: Path, agent_ca: CertificateAuthority
) -> None:
    state_dir = tmp_path / "state"
    assert BirthIdentity.load(state_dir) is None
    identity = make_birth(state_dir, agent_ca, finalized=False)
    loaded = BirthIdentity.load(state_dir)
    assert loaded == identity and loaded.client_id == CLIENT_ID and loaded.mac == MAC
    assert not loaded.finalized
    assert mark_finalized(state_dir).finalized
    for path in (state_dir, birth_dir(state_dir), keys_dir(state_dir)):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700
    for path in (state_dir / "identity.json", identity.cert_path, identity.chain_path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((keys_dir(state_dir) / "birth.key").stat().st_mode) == 0o600
    assert "BEGIN CERTIFICATE" in identity.cert_pem()


def test_birth_identity_refuses_a_certificate_for_another_key(
    tmp_path: Path, agent_ca: CertificateAuthority
) -> None:
    state_dir = tmp_path / "state"
    identity = make_birth(state_dir, agent_ca)
    stranger = ec.generate_private_key(ec.SECP256R1()).public_key()
    cert = agent_ca.sign_birth_certificate(stranger, CLIENT_ID, MAC)
    with pytest.raises(IdentityError, match="does not match the birth key"):
        write_birth_identity(
            state_dir, client_id=CLIENT_ID, mac=MAC, serial="x", endpoints=identity.endpoints,
            cert_pem=cert.public_bytes(serialization.Encoding.PEM),
            chain_pem=agent_ca.factory_ca_chain_pem,
        )  # fmt: skip
    assert BirthIdentity.load(state_dir) == identity  # refused before anything changed


def test_interrupted_rewrite_leaves_no_identity(
    tmp_path: Path, agent_ca: CertificateAuthority
) -> None:
    """identity.json is un-committed first: a failure after that leaves none, never a mix."""
    state_dir = tmp_path / "state"
    identity = make_birth(state_dir, agent_ca)
    identity.chain_path.unlink()
    identity.chain_path.mkdir()  # the chain write (after the cert write) will fail
    with pytest.raises(OSError):
        write_birth_identity(
            state_dir, client_id=CLIENT_ID, mac=MAC, serial="x", endpoints=identity.endpoints,
            cert_pem=identity.cert_path.read_bytes(), chain_pem=agent_ca.factory_ca_chain_pem,
        )  # fmt: skip
    assert BirthIdentity.load(state_dir) is None
    identity.chain_path.rmdir()
    assert make_birth_again(state_dir, agent_ca, identity) == identity


def make_birth_again(
    state_dir: Path, ca: CertificateAuthority, identity: BirthIdentity
) -> BirthIdentity:
    return write_birth_identity(
        state_dir, client_id=identity.client_id, mac=identity.mac, serial=identity.serial,
        endpoints=identity.endpoints, cert_pem=identity.cert_path.read_bytes(),
        chain_pem=ca.factory_ca_chain_pem, finalized=identity.finalized,
    )  # fmt: skip


def test_config_endpoints_override_identity(tmp_path: Path, agent_ca: CertificateAuthority) -> None:
    state_dir = tmp_path / "state"
    identity = make_birth(
        state_dir, agent_ca, endpoints=Endpoints("factory", 8883, "factory", 8884)
    )
    plain = load_config(write_config(tmp_path, state_dir), env={})
    assert identity.effective_endpoints(plain.broker) == identity.endpoints
    moved = load_config(
        write_config(
            tmp_path / "b",
            state_dir,
            '[broker]\nprovisioning_host = "lab"\nprovisioning_port = 1883\n',
        ),
        env={},
    )
    assert identity.effective_endpoints(moved.broker) == Endpoints("lab", 1883, "lab", 8884)


# --- CLI ----------------------------------------------------------------------------------


def test_cli_status_before_and_after_provisioning(
    tmp_path: Path, agent_ca: CertificateAuthority
) -> None:
    state_dir = tmp_path / "state"
    config = write_config(tmp_path, state_dir)
    cli = CliRunner()
    empty = cli.invoke(main, ["status", "--json", "--config", str(config)])
    assert empty.exit_code == 0, empty.output
    assert json.loads(empty.output)["state"] == "UNPROVISIONED"
    assert json.loads(empty.output)["clientId"] is None

    make_birth(state_dir, agent_ca)
    keys = FileKeyStore(keys_dir(state_dir))
    cert = agent_ca.sign_device_certificate(
        keys.generate("op-1"), CLIENT_ID, MAC, timedelta(days=3)
    )
    certs = CertificateStore(certs_dir(state_dir))
    serial = format(cert.serial_number, "X")
    version = certs.stage(
        cert.public_bytes(serialization.Encoding.PEM), agent_ca.device_ca_chain_pem,
        {"serial": serial, "not_after": cert.not_valid_after_utc.timestamp()},
        key_file=keys.key_file("op-1"),
    )  # fmt: skip
    certs.activate(version)
    StateStore(state_dir).transition(StateRecord(), AgentState.ACTIVE, cert_version=version)
    result = cli.invoke(main, ["status", "--json", "--config", str(config)])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["state"] == "ACTIVE" and info["clientId"] == CLIENT_ID and info["mac"] == MAC
    assert info["certificateSerial"] == serial
    assert info["certificateExpiresAt"].startswith(str(cert.not_valid_after_utc.year))
    assert info["broker"] == {"provisioning": "127.0.0.1:1", "operational": "127.0.0.1:2"}
    text = cli.invoke(main, ["status", "--config", str(config)])
    assert text.exit_code == 0 and serial in text.output and "ACTIVE" in text.output


def test_cli_reset_needs_confirmation_and_removes_everything(
    tmp_path: Path, agent_ca: CertificateAuthority
) -> None:
    state_dir = tmp_path / "state"
    config = write_config(tmp_path, state_dir)
    make_birth(state_dir, agent_ca)
    StateStore(state_dir).transition(StateRecord(), AgentState.NEED_TOKEN)
    cli = CliRunner()
    refused = cli.invoke(main, ["reset", "--config", str(config)], input="n\n")
    assert refused.exit_code == 1 and BirthIdentity.load(state_dir) is not None
    assert "nothing was deleted" in refused.output
    done = cli.invoke(main, ["reset", "--config", str(config)], input="y\n")
    assert done.exit_code == 0, done.output
    assert sorted(p.name for p in state_dir.iterdir()) == []
    again = cli.invoke(main, ["reset", "--yes", "--config", str(config)])
    assert again.exit_code == 0 and "nothing" in again.output


def test_cli_usage_and_config_errors(tmp_path: Path) -> None:
    cli = CliRunner()
    for args in (["--help"], ["run", "--help"], ["status", "--help"], ["reset", "--help"]):
        assert cli.invoke(main, args).exit_code == 0
    assert cli.invoke(main, ["frobnicate"]).exit_code == 2
    bad = tmp_path / "bad.toml"
    bad.write_text("[broker]\nprovisioning_port = 0\n")
    result = cli.invoke(main, ["status", "--config", str(bad)])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and "provisioning_port" in result.output
