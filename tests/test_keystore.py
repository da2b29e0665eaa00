"""File key store: permissions, no overwrite, crash leftovers, CSR content."""

from __future__ import annotations

import logging
import os
import random
import stat
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtensionOID, NameOID

from agent.errors import KeyStoreError
from agent.keystore import FileKeyStore, KeyStore, build_csr
from tests.sigkill import kill_at_random_point


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def loose_umask() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def write_foreign_key(path: Path, key: ec.EllipticCurvePrivateKey, mode: int = 0o600) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.write_bytes(pem)
    os.chmod(path, mode)


def test_generate_writes_0600_key_in_0700_dir(tmp_path: Path, loose_umask: None) -> None:
    store: KeyStore = FileKeyStore(tmp_path / "keys")
    public = store.generate("birth")
    path = tmp_path / "keys" / "birth.key"
    assert mode_of(tmp_path / "keys") == 0o700
    assert mode_of(path) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8, unencrypted
    assert store.exists("birth")
    assert store.public_key("birth") == public
    assert store.load_private("birth").public_key() == public
    assert isinstance(public.curve, ec.SECP256R1)
    assert store.key_file("birth") == path
    assert sorted(os.listdir(tmp_path / "keys")) == [".lock", "birth.key"]


def test_existing_dir_is_tightened(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir(mode=0o755)
    os.chmod(tmp_path / "keys", 0o755)  # noqa: S103 (loosened on purpose)
    FileKeyStore(tmp_path / "keys")
    assert mode_of(tmp_path / "keys") == 0o700


def test_generate_never_overwrites(tmp_path: Path) -> None:
    store = FileKeyStore(tmp_path)
    store.generate("op-1")
    before = (tmp_path / "op-1.key").read_bytes()
    with pytest.raises(KeyStoreError, match="already holds a key"):
        store.generate("op-1")
    assert (tmp_path / "op-1.key").read_bytes() == before
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


def test_generate_refuses_a_symlink_in_the_slot(tmp_path: Path) -> None:
    store = FileKeyStore(tmp_path / "keys")
    os.symlink(tmp_path / "elsewhere", tmp_path / "keys" / "op-1.key")
    with pytest.raises(KeyStoreError, match="already holds a key"):
        store.generate("op-1")
    assert not (tmp_path / "elsewhere").exists()


@pytest.mark.parametrize("slot", ["", "../birth", "a/b", ".hidden", "x" * 65, "op 1"])
def test_invalid_slot_names(tmp_path: Path, slot: str) -> None:
    store = FileKeyStore(tmp_path)
    with pytest.raises(KeyStoreError, match="slot"):
        store.generate(slot)


def test_half_written_temp_is_never_loaded_and_is_removed(tmp_path: Path) -> None:
    store = FileKeyStore(tmp_path)
    store.generate("other")
    stale = tmp_path / "birth.key.tmp-0123456789ab"
    stale.write_bytes(b"-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49")
    assert not store.exists("birth")
    with pytest.raises(KeyStoreError, match="no key in slot 'birth'"):
        store.load_private("birth")
    assert not stale.exists()
    store.generate("birth")  # the slot is usable after the crash
    assert store.load_private("birth")


def test_load_refuses_group_readable_key(tmp_path: Path) -> None:
    store = FileKeyStore(tmp_path)
    write_foreign_key(tmp_path / "op-1.key", ec.generate_private_key(ec.SECP256R1()), 0o640)
    with pytest.raises(KeyStoreError, match="mode 0600"):
        store.load_private("op-1")


def test_load_refuses_symlinked_key(tmp_path: Path) -> None:
    store = FileKeyStore(tmp_path / "keys")
    write_foreign_key(tmp_path / "real.key", ec.generate_private_key(ec.SECP256R1()))
    os.symlink(tmp_path / "real.key", tmp_path / "keys" / "op-1.key")
    with pytest.raises(KeyStoreError, match="cannot open"):
        store.load_private("op-1")


def test_load_refuses_other_curves(tmp_path: Path) -> None:
    store = FileKeyStore(tmp_path)
    write_foreign_key(tmp_path / "op-1.key", ec.generate_private_key(ec.SECP384R1()))
    with pytest.raises(KeyStoreError, match="P-256"):
        store.load_private("op-1")


def test_corrupt_key_error_does_not_echo_content(tmp_path: Path) -> None:
    store = FileKeyStore(tmp_path)
    (tmp_path / "op-1.key").write_bytes(b"SECRETSECRET")
    os.chmod(tmp_path / "op-1.key", 0o600)
    with pytest.raises(KeyStoreError) as info:
        store.load_private("op-1")
    assert "SECRET" not in str(info.value)


def test_delete_is_idempotent_and_frees_the_slot(tmp_path: Path) -> None:
    store = FileKeyStore(tmp_path)
    first = store.generate("op-1")
    store.delete("op-1")
    store.delete("op-1")
    assert not store.exists("op-1")
    with pytest.raises(KeyStoreError):
        store.key_file("op-1")
    assert store.generate("op-1") != first


def test_csr_content(tmp_path: Path) -> None:
    store = FileKeyStore(tmp_path)
    public = store.generate("op-1")
    pem = store.build_csr("op-1", "dev-dca63201020f", "dc-a6-32-01-02-0f")
    csr = x509.load_pem_x509_csr(pem)
    assert csr.is_signature_valid
    assert csr.public_key() == public
    assert isinstance(csr.signature_hash_algorithm, hashes.SHA256)
    assert csr.subject == x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev-dca63201020f")])
    assert [ext.oid for ext in csr.extensions] == [ExtensionOID.SUBJECT_ALTERNATIVE_NAME]
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert not san.critical
    assert list(san.value) == [x509.UniformResourceIdentifier("urn:dev:mac:dca63201020f")]
    # The only attribute is the extensionRequest that carries the SAN: no challenge password etc.
    assert [attr.oid.dotted_string for attr in csr.attributes] == ["1.2.840.113549.1.9.14"]


@pytest.mark.parametrize(
    ("client_id", "mac", "match"),
    [("bad id", "02:00:00:00:00:01", "client id"), ("dev-1", "00:00:00:00:00:00", "MAC")],
)
def test_csr_rejects_bad_inputs(client_id: str, mac: str, match: str) -> None:
    with pytest.raises(KeyStoreError, match=match):
        build_csr(ec.generate_private_key(ec.SECP256R1()), client_id, mac)


def test_no_key_material_in_logs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    store = FileKeyStore(tmp_path)
    store.generate("birth")
    store.build_csr("birth", "dev-1", "02:00:00:00:00:01")
    secret = (tmp_path / "birth.key").read_text().splitlines()[1]
    assert "PRIVATE KEY" not in caplog.text
    assert secret not in caplog.text


GENERATOR = textwrap.dedent(
    """
    import sys
    from agent.keystore import FileKeyStore
    store = FileKeyStore(sys.argv[1])
    i = 0
    while True:
        i += 1
        store.generate(f"k-{sys.argv[2]}-{i}")
        if i == 1:
            print("ready", flush=True)
    """
)


@pytest.mark.slow
def test_sigkill_during_generate_never_leaves_a_bad_key(tmp_path: Path) -> None:
    rng = random.Random(7)
    for run in range(5):
        kill_at_random_point(GENERATOR, [str(tmp_path), str(run)], rng, 0.1)
    store = FileKeyStore(tmp_path)
    slots = [name.removesuffix(".key") for name in os.listdir(tmp_path) if name.endswith(".key")]
    assert len(slots) >= 5
    for slot in slots:
        assert mode_of(tmp_path / f"{slot}.key") == 0o600
        assert isinstance(store.load_private(slot), ec.EllipticCurvePrivateKey)
    assert not [name for name in os.listdir(tmp_path) if ".tmp-" in name]
