"""The CA on real files: layout, modes, refusal to overwrite, certificate profiles, CRL."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store

from agent.protocol import mac_uri
from server.errors import CaError
from server.pki.ca import (
    SERVER_CLIENT_CN,
    CaPaths,
    CertificateAuthority,
    fingerprint_sha256,
    serial_hex,
)

MAC = "02:00:5E:10:00:01"
PASSPHRASE = b"correct horse battery staple"


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.init(tmp_path_factory.mktemp("ca") / "pki")


def _device_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _pem_certs(data: bytes) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(data)


# --- init / load ----------------------------------------------------------------


def test_init_creates_every_file_with_private_modes(tmp_path: Path) -> None:
    directory = tmp_path / "pki"
    ca = CertificateAuthority.init(directory, server_names=["broker.example", "localhost"])
    paths = CaPaths.of(directory)
    assert _mode(directory) == 0o700
    for path in paths.material():
        assert path.is_file(), path
    for key in (paths.root_key, paths.device_ca_key, paths.factory_ca_key):
        assert _mode(key) == 0o600
    for key in (paths.broker_key, paths.server_client_key):
        assert _mode(key) == 0o600
    assert [c.subject for c in _pem_certs(paths.device_ca_chain.read_bytes())] == [
        ca.device_ca.subject,
        ca.root.subject,
    ]
    assert paths.device_ca_chain.read_bytes() == ca.device_ca_chain_pem
    assert paths.factory_ca_chain.read_bytes() == ca.factory_ca_chain_pem
    assert paths.root_cert.read_bytes() == ca.root_pem
    assert not list(directory.glob(".*")), "temporary files left behind"


def test_ca_hierarchy_is_p256_under_one_root(ca: CertificateAuthority) -> None:
    ca.root.verify_directly_issued_by(ca.root)
    for intermediate in (ca.device_ca, ca.factory_ca):
        intermediate.verify_directly_issued_by(ca.root)
        constraints = intermediate.extensions.get_extension_for_class(x509.BasicConstraints)
        assert constraints.critical and constraints.value.ca
        assert constraints.value.path_length == 0
    for cert in (ca.root, ca.device_ca, ca.factory_ca):
        key = cert.public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"


def test_broker_and_server_client_identities(ca: CertificateAuthority) -> None:
    broker = x509.load_pem_x509_certificate(ca.broker_cert_path.read_bytes())
    san = broker.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    # A device that trusts only its ca_certificate bundle must accept the broker.
    verifier = (
        PolicyBuilder()
        .store(Store(_pem_certs(ca.device_ca_chain_pem)[1:]))
        .build_server_verifier(x509.DNSName("localhost"))
    )
    verifier.verify(broker, [])

    client, intermediate = _pem_certs(ca.server_client_cert_path.read_bytes())
    assert intermediate == ca.device_ca
    assert client.subject.rfc4514_string() == f"CN={SERVER_CLIENT_CN}"
    client.verify_directly_issued_by(ca.device_ca)
    eku = client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    key = serialization.load_pem_private_key(ca.server_client_key_path.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.public_key() == client.public_key()


def test_second_init_refuses_and_leaves_files_untouched(tmp_path: Path) -> None:
    directory = tmp_path / "pki"
    CertificateAuthority.init(directory)
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in directory.iterdir()}
    with pytest.raises(CaError, match="already holds CA material"):
        CertificateAuthority.init(directory)
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in directory.iterdir()}
    assert after == before


def test_init_refuses_a_single_leftover_key(tmp_path: Path) -> None:
    directory = tmp_path / "pki"
    directory.mkdir(mode=0o700)
    (directory / "device-ca.key").write_bytes(b"somebody's key")
    with pytest.raises(CaError, match=r"device-ca\.key"):
        CertificateAuthority.init(directory)
    assert sorted(p.name for p in directory.iterdir()) == ["device-ca.key"]


def test_load_returns_the_same_ca(tmp_path: Path) -> None:
    created = CertificateAuthority.init(tmp_path / "pki")
    loaded = CertificateAuthority.load(tmp_path / "pki")
    assert loaded.describe() == created.describe()
    rows = loaded.describe()
    assert [r["name"] for r in rows] == ["root", "device-ca", "factory-ca"]
    assert rows[1]["fingerprint_sha256"] == fingerprint_sha256(created.device_ca)
    assert rows[1]["serial"] == serial_hex(created.device_ca)
    cert = loaded.sign_device_certificate(_device_key().public_key(), "dev-1", MAC, timedelta(1))
    cert.verify_directly_issued_by(created.device_ca)


def test_passphrase_encrypts_ca_keys_and_is_required_to_load(tmp_path: Path) -> None:
    directory = tmp_path / "pki"
    CertificateAuthority.init(directory, passphrase=PASSPHRASE)
    paths = CaPaths.of(directory)
    for key in (paths.root_key, paths.device_ca_key, paths.factory_ca_key):
        assert b"ENCRYPTED PRIVATE KEY" in key.read_bytes()
    # The broker and server start unattended; their keys cannot be encrypted.
    assert b"ENCRYPTED" not in paths.broker_key.read_bytes()
    CertificateAuthority.load(directory, passphrase=PASSPHRASE)
    with pytest.raises(CaError, match="wrong passphrase"):
        CertificateAuthority.load(directory, passphrase=b"wrong")
    with pytest.raises(CaError, match=r"device-ca\.key"):
        CertificateAuthority.load(directory)


def test_load_names_the_missing_file_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(CaError, match=r"root\.pem is missing.*provision-server ca init"):
        CertificateAuthority.load(tmp_path / "nothing-here")
    CertificateAuthority.init(tmp_path / "pki")
    (tmp_path / "pki" / "factory-ca.key").unlink()
    with pytest.raises(CaError, match=r"factory-ca\.key is missing"):
        CertificateAuthority.load(tmp_path / "pki")


def test_load_refuses_a_readable_ca_key(tmp_path: Path) -> None:
    CertificateAuthority.init(tmp_path / "pki")
    (tmp_path / "pki" / "device-ca.key").chmod(0o644)
    with pytest.raises(CaError, match="must be 0600"):
        CertificateAuthority.load(tmp_path / "pki")


def test_load_refuses_a_certificate_that_is_not_pem(tmp_path: Path) -> None:
    CertificateAuthority.init(tmp_path / "pki")
    (tmp_path / "pki" / "device-ca.pem").write_bytes(b"garbage")
    with pytest.raises(CaError, match=r"device-ca\.pem is not a PEM certificate"):
        CertificateAuthority.load(tmp_path / "pki")


# --- device and birth certificates ---------------------------------------------------


def test_device_certificate_profile(ca: CertificateAuthority) -> None:
    key = _device_key()
    before = datetime.now(timezone.utc)
    cert = ca.sign_device_certificate(key.public_key(), "dev-0001", MAC, timedelta(days=90))
    cert.verify_directly_issued_by(ca.device_ca)
    with pytest.raises((ValueError, InvalidSignature)):
        cert.verify_directly_issued_by(ca.factory_ca)
    assert cert.public_key() == key.public_key()
    assert cert.subject == x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev-0001")])
    assert cert.issuer == ca.device_ca.subject
    assert {e.oid for e in cert.extensions} == {
        ExtensionOID.BASIC_CONSTRAINTS,
        ExtensionOID.KEY_USAGE,
        ExtensionOID.EXTENDED_KEY_USAGE,
        ExtensionOID.SUBJECT_KEY_IDENTIFIER,
        ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
        ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
    }
    ext = cert.extensions
    bc = ext.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    ku = ext.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    assert list(ext.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    san = ext.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier(mac_uri(MAC))]
    aki = ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca.device_ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    # Backdated for clock skew, valid for exactly the requested time.
    assert timedelta(minutes=1) < before - cert.not_valid_before_utc < timedelta(minutes=10)
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == timedelta(days=90)


def test_device_certificate_passes_rfc5280_client_validation(ca: CertificateAuthority) -> None:
    cert = ca.sign_device_certificate(_device_key().public_key(), "dev-0002", MAC, timedelta(1))
    verifier = PolicyBuilder().store(Store([ca.root])).build_client_verifier()
    verified = verifier.verify(cert, [ca.device_ca])
    assert verified.chain[-1] == ca.root


def test_rsa_device_key_and_explicit_not_before(ca: CertificateAuthority) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    start = datetime(2030, 1, 1, tzinfo=timezone.utc)
    cert = ca.sign_device_certificate(key.public_key(), "dev-rsa", MAC, timedelta(days=1), start)
    assert cert.not_valid_before_utc == start
    assert cert.not_valid_after_utc == start + timedelta(days=1)
    cert.verify_directly_issued_by(ca.device_ca)


def test_serials_are_distinct_positive_and_random(ca: CertificateAuthority) -> None:
    public_key = _device_key().public_key()
    certs = [ca.sign_device_certificate(public_key, "dev-s", MAC, timedelta(1)) for _ in range(64)]
    serials = [c.serial_number for c in certs]
    assert len(set(serials)) == len(serials)
    assert all(s > 0 for s in serials)
    # x509.random_serial_number draws 159 bits; P(bit_length <= 64) is 2**-95 per draw.
    assert all(s.bit_length() > 64 for s in serials)


def test_birth_certificate_comes_from_the_factory_ca(ca: CertificateAuthority) -> None:
    cert = ca.sign_birth_certificate(_device_key().public_key(), "dev-0003", MAC)
    cert.verify_directly_issued_by(ca.factory_ca)
    assert cert.issuer == ca.factory_ca.subject
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [mac_uri(MAC)]
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime > timedelta(days=365 * 19)
    # Never outlives its issuer, however long the request.
    long = ca.sign_birth_certificate(_device_key().public_key(), "d", MAC, timedelta(days=99999))
    assert long.not_valid_after_utc == ca.factory_ca.not_valid_after_utc


def test_server_identity_is_never_issued_to_a_device(ca: CertificateAuthority) -> None:
    with pytest.raises(CaError, match="reserved"):
        ca.sign_device_certificate(_device_key().public_key(), SERVER_CLIENT_CN, MAC, timedelta(1))


def test_serial_hex_and_fingerprint_spelling(ca: CertificateAuthority) -> None:
    cert = ca.sign_device_certificate(_device_key().public_key(), "dev-f", MAC, timedelta(1))
    text = serial_hex(cert)
    assert text == text.upper() and ":" not in text and int(text, 16) == cert.serial_number
    fingerprint = fingerprint_sha256(cert)
    assert len(fingerprint) == 64 and fingerprint == fingerprint.lower()
    assert bytes.fromhex(fingerprint) == cert.fingerprint(hashes.SHA256())


# --- CRL -------------------------------------------------------------------------------


def test_crl_lists_revoked_serials_and_is_signed_by_the_device_ca(
    ca: CertificateAuthority,
) -> None:
    certs = [
        ca.sign_device_certificate(_device_key().public_key(), f"d{i}", MAC, timedelta(1))
        for i in range(3)
    ]
    when = datetime(2031, 5, 1, 12, 0, tzinfo=timezone.utc)
    pem = ca.build_crl([(c.serial_number, when) for c in certs[:2]], timedelta(days=7))
    crl = x509.load_pem_x509_crl(pem)
    assert crl.issuer == ca.device_ca.subject
    device_ca_key = ca.device_ca.public_key()
    assert isinstance(device_ca_key, ec.EllipticCurvePublicKey)
    assert crl.is_signature_valid(device_ca_key)
    for cert in certs[:2]:
        entry = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
        assert entry is not None and entry.revocation_date_utc == when
    assert crl.get_revoked_certificate_by_serial_number(certs[2].serial_number) is None
    assert crl.next_update_utc is not None
    assert crl.next_update_utc - datetime.now(timezone.utc) > timedelta(days=6)
    assert ca.write_crl(pem).read_bytes() == pem

    factory_crl = x509.load_pem_x509_crl(ca.build_crl([], timedelta(days=1), issuer="factory"))
    factory_ca_key = ca.factory_ca.public_key()
    assert isinstance(factory_ca_key, ec.EllipticCurvePublicKey)
    assert factory_crl.is_signature_valid(factory_ca_key)
    assert not factory_crl.is_signature_valid(device_ca_key)
    assert len(factory_crl) == 0


# --- a real Mosquitto: the operational listener trusts the device CA and loads the CRL ------


def _free_ports(count: int) -> list[int]:
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:  # all bound at once, so the ports are distinct
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]


def _write_device(
    directory: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> tuple[Path, Path]:
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return cert_path, key_path


def _mosquitto() -> str:
    # Debian installs the broker in /usr/sbin, which is not on every user's PATH.
    return shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin") or "mosquitto"


def _wait_for_port(port: int, process: subprocess.Popen[bytes], stderr: Path) -> None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        assert process.poll() is None, f"mosquitto exited: {stderr.read_text()}"
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise AssertionError(f"mosquitto did not listen on port {port}")


def test_mosquitto_accepts_device_cert_until_revoked(tmp_path: Path) -> None:
    """Operational listener = device-ca-chain + CRL: device in, revoked device out, birth out.

    A second listener without ``crlfile`` is the control: there a birth certificate that
    brings its factory CA along is accepted, because both chains end at the same root.
    Only OpenSSL's CRL check ("unable to get certificate CRL" for the factory CA) keeps
    birth certificates off the operational listener.
    """
    ca = CertificateAuthority.init(tmp_path / "pki")
    ca.write_crl(ca.build_crl([], timedelta(days=1)))
    port, control_port, provisioning_port = _free_ports(3)
    conf = tmp_path / "mosquitto.conf"
    log = tmp_path / "mosquitto.log"
    tls = (
        f"cafile {ca.paths.device_ca_chain}\n"
        f"certfile {ca.broker_cert_path}\n"
        f"keyfile {ca.broker_key_path}\n"
        "require_certificate true\n"
        "use_identity_as_username true\n"
    )
    conf.write_text(
        f"user {pwd.getpwuid(os.getuid()).pw_name}\n"
        "persistence false\n"
        f"log_dest file {log}\n"
        "log_type all\n"
        f"listener {port} 127.0.0.1\n{tls}crlfile {ca.paths.crl}\n"
        f"listener {control_port} 127.0.0.1\n{tls}"
        f"listener {provisioning_port} 127.0.0.1\n"
        + tls.replace(str(ca.paths.device_ca_chain), str(ca.paths.factory_ca_chain))
    )
    device_key = _device_key()
    device = ca.sign_device_certificate(device_key.public_key(), "dev-live", MAC, timedelta(1))
    dev_cert, dev_key = _write_device(tmp_path, "dev", device, device_key)
    birth = ca.sign_birth_certificate(device_key.public_key(), "dev-live", MAC)
    birth_cert, birth_key = _write_device(tmp_path, "birth", birth, device_key)
    with birth_cert.open("ab") as fh:  # send the factory CA along, as a hostile device would
        fh.write(ca.factory_ca.public_bytes(serialization.Encoding.PEM))

    def publish(cert: Path, key: Path, to: int = port) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(to), "-q", "1",
             "--cafile", str(ca.paths.device_ca_chain), "--cert", str(cert), "--key", str(key),
             "-i", "test-client", "-t", "devices/dev-live/hello", "-m", "hi"],
            capture_output=True, text=True, timeout=10, check=False,
        )  # fmt: skip

    stderr = tmp_path / "mosquitto.stderr"
    with stderr.open("wb") as err:
        broker = subprocess.Popen([_mosquitto(), "-c", str(conf)], stderr=err)
    try:
        _wait_for_port(port, broker, stderr)
        _wait_for_port(control_port, broker, stderr)
        accepted = publish(dev_cert, dev_key)
        assert accepted.returncode == 0, accepted.stderr + log.read_text()
        server = publish(ca.server_client_cert_path, ca.server_client_key_path)
        assert server.returncode == 0, server.stderr + log.read_text()
        assert publish(birth_cert, birth_key).returncode != 0, "birth cert accepted"
        control = publish(birth_cert, birth_key, to=control_port)
        assert control.returncode == 0, control.stderr + log.read_text()

        revoked = ca.build_crl([(device.serial_number, datetime.now(timezone.utc))], timedelta(1))
        ca.write_crl(revoked)
        broker.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while publish(dev_cert, dev_key).returncode == 0:
            assert time.monotonic() < deadline, "revoked certificate still accepted after SIGHUP"
            time.sleep(0.1)
        # The provisioning listener (factory chain) takes birth certs and the server.
        _wait_for_port(provisioning_port, broker, stderr)
        birth_leaf = tmp_path / "birth-leaf.pem"
        birth_leaf.write_bytes(birth.public_bytes(serialization.Encoding.PEM))
        for cert, key in (
            (birth_leaf, birth_key),
            (ca.server_client_cert_path, ca.server_client_key_path),
        ):
            result = publish(cert, key, to=provisioning_port)
            assert result.returncode == 0, result.stderr + log.read_text()
        # Revocation is per certificate: the server's own identity still connects.
        server = publish(ca.server_client_cert_path, ca.server_client_key_path)
        assert server.returncode == 0, server.stderr + log.read_text()
    finally:
        broker.terminate()
        broker.wait(timeout=5)
