"""Atomic files, private directories and the versioned certificate store, incl. SIGKILL safety."""

from __future__ import annotations

import datetime
import os
import random
import signal
import stat
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.errors import StorageError
from agent.keystore import FileKeyStore
from agent.storage import (
    CertificateStore,
    atomic_write,
    ensure_private_dir,
    read_json,
    write_json_atomic,
)
from tests.sigkill import kill_at_random_point


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def loose_umask() -> Iterator[None]:
    """A umask that would leave files world-readable unless the code sets modes itself."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def self_signed(key: ec.EllipticCurvePrivateKey, name: str) -> bytes:
    now = datetime.datetime.now(datetime.timezone.utc)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


# --- atomic files and private directories ------------------------------------


def test_atomic_write_creates_0600_and_replaces(tmp_path: Path, loose_umask: None) -> None:
    target = tmp_path / "state.json"
    atomic_write(target, b"one")
    assert target.read_bytes() == b"one"
    assert mode_of(target) == 0o600
    atomic_write(target, b"two", mode=0o640)
    assert target.read_bytes() == b"two"
    assert mode_of(target) == 0o640
    assert os.listdir(tmp_path) == ["state.json"]


def test_atomic_write_leaves_no_temp_on_failure(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    with pytest.raises(IsADirectoryError):
        atomic_write(tmp_path / "dir", b"x")  # rename over a directory fails
    assert os.listdir(tmp_path) == ["dir"]


def test_ensure_private_dir_creates_0700_with_parents(tmp_path: Path, loose_umask: None) -> None:
    target = tmp_path / "a" / "b" / "state"
    assert ensure_private_dir(target) == target
    assert target.is_dir() and mode_of(target) == 0o700
    ensure_private_dir(target)  # idempotent
    assert mode_of(target) == 0o700


def test_ensure_private_dir_tightens_existing(tmp_path: Path) -> None:
    target = tmp_path / "state"
    target.mkdir()
    os.chmod(target, 0o755)  # noqa: S103 (loosened on purpose)
    ensure_private_dir(target)
    assert mode_of(target) == 0o700


def test_ensure_private_dir_refuses_symlink_and_file(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "link")
    with pytest.raises(StorageError, match="symlink"):
        ensure_private_dir(tmp_path / "link")
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match="not a directory"):
        ensure_private_dir(tmp_path / "file")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown to another uid")
def test_ensure_private_dir_refuses_other_owner(tmp_path: Path) -> None:
    target = tmp_path / "state"
    target.mkdir(mode=0o700)
    os.chown(target, 54321, 54321)
    with pytest.raises(StorageError, match="owned by uid 54321"):
        ensure_private_dir(target)


def test_json_round_trip_and_errors(tmp_path: Path, loose_umask: None) -> None:
    path = tmp_path / "x.json"
    assert read_json(path) is None
    write_json_atomic(path, {"b": 1, "a": [1, 2]})
    assert read_json(path) == {"a": [1, 2], "b": 1}
    assert mode_of(path) == 0o600
    path.write_text("[1]")
    with pytest.raises(StorageError, match="JSON object"):
        read_json(path)
    path.write_text("{nope")
    with pytest.raises(StorageError, match="not valid JSON"):
        read_json(path)


# --- certificate store --------------------------------------------------------


def stage_new(store: CertificateStore, keys: FileKeyStore, slot: str) -> int:
    keys.generate(slot)
    cert = self_signed(keys.load_private(slot), slot)
    return store.stage(cert, cert, {"slot": slot}, key_file=keys.key_file(slot))


def assert_consistent(root: Path) -> int:
    """The store's invariants; returns the live version."""
    store = CertificateStore(root / "certs")
    for directory, dirs, files in os.walk(root):
        for name in dirs:
            path = Path(directory) / name
            if not path.is_symlink():
                assert mode_of(path) == 0o700, path
        for name in files:
            path = Path(directory) / name
            if not path.is_symlink():
                assert mode_of(path) == 0o600, path
    for version in store.versions():
        paths = store.paths(version)
        assert paths.key is not None, version
        assert paths.cert.stat().st_size > 0 and paths.chain.stat().st_size > 0
        assert "slot" in store.meta(version)
    live = store.live_version()
    assert live is not None
    cert_path, chain_path, key_path = store.live_paths()
    assert key_path is not None
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert cert.public_key() == key.public_key()
    assert chain_path.read_bytes() == cert_path.read_bytes()
    return live


def test_stage_is_not_live_until_activated(tmp_path: Path, loose_umask: None) -> None:
    store = CertificateStore(tmp_path / "certs")
    keys = FileKeyStore(tmp_path / "keys")
    assert store.live_version() is None
    with pytest.raises(StorageError, match="no certificate"):
        store.live_paths()
    first = stage_new(store, keys, "op-1")
    assert first == 1
    assert store.live_version() is None
    store.activate(first)
    assert store.live_version() == 1
    assert os.readlink(tmp_path / "certs" / "live") == "archive/1"
    paths = store.live_paths()
    assert paths.cert == tmp_path / "certs" / "archive" / "1" / "cert.pem"
    assert paths.key is not None
    # The key is the key store's file (hard link), not a second copy of the material.
    assert os.stat(paths.key).st_ino == os.stat(keys.key_file("op-1")).st_ino
    assert store.meta(1) == {"slot": "op-1"}
    assert assert_consistent(tmp_path) == 1


def test_version_survives_deleting_key_slot(tmp_path: Path) -> None:
    store = CertificateStore(tmp_path / "certs")
    keys = FileKeyStore(tmp_path / "keys")
    store.activate(stage_new(store, keys, "op-1"))
    keys.delete("op-1")
    assert assert_consistent(tmp_path) == 1


def test_stage_without_key_file(tmp_path: Path) -> None:
    store = CertificateStore(tmp_path / "certs")
    version = store.stage(b"cert", b"chain", {"key_slot": "tpm:0x81000001"})
    store.activate(version)
    assert store.live_paths().key is None
    assert store.meta(version)["key_slot"] == "tpm:0x81000001"


def test_activate_switches_and_records_previous(tmp_path: Path) -> None:
    store = CertificateStore(tmp_path / "certs")
    keys = FileKeyStore(tmp_path / "keys")
    one = stage_new(store, keys, "op-1")
    two = stage_new(store, keys, "op-2")
    assert (one, two) == (1, 2)
    store.activate(one)
    assert store.previous_version() is None
    store.activate(two)
    assert (store.live_version(), store.previous_version()) == (2, 1)
    store.activate(two)  # re-activating the live version changes nothing
    assert (store.live_version(), store.previous_version()) == (2, 1)
    store.activate(one)  # rollback
    assert (store.live_version(), store.previous_version()) == (1, 2)


def test_activate_missing_version(tmp_path: Path) -> None:
    store = CertificateStore(tmp_path / "certs")
    with pytest.raises(StorageError, match="does not exist"):
        store.activate(7)
    assert store.live_version() is None


def test_live_link_to_garbage_is_an_error(tmp_path: Path) -> None:
    store = CertificateStore(tmp_path / "certs")
    ensure_private_dir(tmp_path / "certs")
    os.symlink("/etc", tmp_path / "certs" / "live")
    with pytest.raises(StorageError, match="expected archive"):
        store.live_version()


def test_prune_keeps_live_previous_and_newer(tmp_path: Path) -> None:
    store = CertificateStore(tmp_path / "certs")
    for n in range(1, 7):
        assert store.stage(b"c", b"ch", {"n": n}) == n
    assert store.prune() == []  # nothing live yet: everything may still be activated
    store.activate(2)
    store.activate(4)
    # live 4, previous 2, newer 5 and 6 are protected; keep=1 keeps only live of <= 4
    assert store.prune(keep=1) == [1, 3]
    assert store.versions() == [2, 4, 5, 6]
    store.activate(5)  # previous becomes 4
    assert store.prune(keep=2) == [2]
    assert store.versions() == [4, 5, 6]
    with pytest.raises(ValueError):
        store.prune(keep=0)


def test_new_version_numbers_never_reuse_pruned_ones(tmp_path: Path) -> None:
    store = CertificateStore(tmp_path / "certs")
    for _ in range(3):
        store.activate(store.stage(b"c", b"ch", {}))
    store.prune(keep=1)
    assert store.versions() == [2, 3]
    assert store.stage(b"c", b"ch", {}) == 4


def test_leftovers_from_a_crash_are_cleaned(tmp_path: Path) -> None:
    store = CertificateStore(tmp_path / "certs")
    store.activate(store.stage(b"c", b"ch", {}))
    (tmp_path / "certs" / "archive" / ".staging-dead").mkdir()
    (tmp_path / "certs" / "archive" / ".staging-dead" / "cert.pem").write_text("half")
    os.symlink("archive/1", tmp_path / "certs" / ".link-dead")
    assert store.versions() == [1]
    assert store.stage(b"c", b"ch", {}) == 2
    assert sorted(os.listdir(tmp_path / "certs" / "archive")) == ["1", "2"]
    assert not os.path.lexists(tmp_path / "certs" / ".link-dead")


CHILD = textwrap.dedent(
    """
    import sys, datetime
    from pathlib import Path
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID
    from agent.keystore import FileKeyStore
    from agent.storage import CertificateStore

    root = Path(sys.argv[1])
    store = CertificateStore(root / "certs")
    keys = FileKeyStore(root / "keys")
    now = datetime.datetime.now(datetime.timezone.utc)
    i = 0
    while True:
        i += 1
        slot = f"op-{sys.argv[2]}-{i}"
        keys.generate(slot)
        key = keys.load_private(slot)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, slot)])
        cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(i)
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256())
        ).public_bytes(serialization.Encoding.PEM)
        version = store.stage(cert, cert, {"slot": slot}, key_file=keys.key_file(slot))
        store.activate(version)
        store.prune(keep=2)
        keys.delete(slot)
        if i == 1:
            print("ready", flush=True)
    """
)


@pytest.mark.slow
def test_sigkill_at_random_points_leaves_a_consistent_store(tmp_path: Path) -> None:
    store = CertificateStore(tmp_path / "certs")
    keys = FileKeyStore(tmp_path / "keys")
    store.activate(stage_new(store, keys, "op-initial"))
    rng = random.Random(0xC0FFEE)
    lives = set()
    for run in range(20):
        returncode = kill_at_random_point(CHILD, [str(tmp_path), str(run)], rng, 0.15)
        assert returncode == -signal.SIGKILL
        lives.add(assert_consistent(tmp_path))
    assert len(lives) == 20  # every run got as far as its own activation
    # After all those crashes the store still accepts a new version and cleans up.
    version = stage_new(store, keys, "op-final")
    store.activate(version)
    store.prune(keep=2)
    assert assert_consistent(tmp_path) == version
    assert not [n for n in os.listdir(tmp_path / "certs" / "archive") if n.startswith(".")]


WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from agent.storage import atomic_write
    target = Path(sys.argv[1])
    i = 0
    while True:
        i += 1
        atomic_write(target, (b"A" if i % 2 else b"B") * 200_000)
        if i == 1:
            print("ready", flush=True)
    """
)


@pytest.mark.slow
def test_sigkill_during_atomic_write_leaves_old_or_new_content(tmp_path: Path) -> None:
    target = tmp_path / "state.bin"
    rng = random.Random(3)
    for _ in range(5):
        kill_at_random_point(WRITER, [str(target)], rng, 0.1)
        assert target.read_bytes() in (b"A" * 200_000, b"B" * 200_000)
        assert mode_of(target) == 0o600
