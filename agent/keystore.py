"""Where the device's private keys live, behind an interface a PKCS#11 / TPM store can implement.

A key is addressed by a *slot* name such as ``"birth"`` or ``"op-3"``. Keys are
ECDSA P-256, created on the device, and never leave it: the only thing that
goes out is a CSR (``build_csr``). No function here logs or formats key bytes.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Final, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.errors import KeyStoreError
from agent.protocol import CLIENT_ID_RE, mac_uri, normalise_mac
from agent.storage import FILE_MODE, directory_lock, ensure_private_dir, fsync_dir

SLOT_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
KEY_SUFFIX: Final = ".key"
TEMP_MARK: Final = ".key.tmp-"


class KeyStore(Protocol):
    """Named P-256 key slots. Implementations never overwrite an existing slot."""

    def generate(self, slot: str) -> ec.EllipticCurvePublicKey:
        """Create a new key in ``slot``; KeyStoreError if the slot is taken."""
        ...

    def exists(self, slot: str) -> bool: ...

    def public_key(self, slot: str) -> ec.EllipticCurvePublicKey: ...

    def load_private(self, slot: str) -> ec.EllipticCurvePrivateKey:
        """The private key object (hardware stores may not support this)."""
        ...

    def key_file(self, slot: str) -> Path | None:
        """A PEM file ``ssl.SSLContext.load_cert_chain`` can use, or None for hardware keys."""
        ...

    def delete(self, slot: str) -> None:
        """Remove ``slot``; deleting a missing slot is not an error."""
        ...

    def build_csr(self, slot: str, client_id: str, mac: str) -> bytes:
        """A PEM CSR for ``client_id``/``mac`` signed by the key in ``slot``."""
        ...

    def sign(self, slot: str, data: bytes) -> bytes:
        """ECDSA/SHA-256 signature (DER) of ``data`` by ``slot``'s key (proof of possession)."""
        ...


def build_csr(key: ec.EllipticCurvePrivateKey, client_id: str, mac: str) -> bytes:
    """CSR with subject exactly ``CN=<client_id>``, one SAN URI ``urn:dev:mac:…``, SHA-256.

    No other extensions: the server sets those itself and rejects CSRs that carry more.
    """
    if not CLIENT_ID_RE.match(client_id):
        raise KeyStoreError(f"client id {client_id!r} is not valid for a certificate")
    try:
        uri = mac_uri(normalise_mac(mac))
    except ValueError as exc:
        raise KeyStoreError(str(exc)) from None
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, client_id)]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def _check_slot(slot: str) -> str:
    if not SLOT_RE.match(slot):
        raise KeyStoreError(
            f"key slot {slot!r} is invalid (letters, digits, '-' and '_', at most 64)"
        )
    return slot


class FileKeyStore:
    """Keys as PEM (PKCS#8) files ``<directory>/<slot>.key``, mode 0600 in a 0700 directory.

    The files are not encrypted on purpose: the device must boot and reconnect
    unattended, so a passphrase would have to sit next to the key anyway. What
    protects a key is the service's own user, these permissions, and (where
    the board has one) a hardware store implementing ``KeyStore`` instead.

    A key appears under its final name only complete: it is written to
    ``<slot>.key.tmp-<random>`` (``O_EXCL``), fsynced, then hard-linked to the
    final name (``link`` fails if that exists, so a key is never overwritten).
    Temp files left by a crash are removed before keys are read.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = ensure_private_dir(Path(directory))

    def _path(self, slot: str) -> Path:
        return self.directory / (_check_slot(slot) + KEY_SUFFIX)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # Serialises generate/cleanup across processes so cleanup never removes
        # the temp file of a key that another process is still writing.
        with directory_lock(self.directory):
            yield

    def _remove_stale_temps(self) -> None:
        removed = False
        for name in os.listdir(self.directory):
            if TEMP_MARK in name:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.directory / name)
                removed = True
        if removed:
            fsync_dir(self.directory)

    def generate(self, slot: str) -> ec.EllipticCurvePublicKey:
        final = self._path(slot)
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        with self._locked():
            if os.path.lexists(final):
                raise KeyStoreError(f"key slot {slot!r} already holds a key ({final})")
            tmp = self.directory / f"{slot}{TEMP_MARK}{secrets.token_hex(6)}"
            try:
                fd = os.open(
                    tmp,
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                    FILE_MODE,
                )
                try:
                    os.fchmod(fd, FILE_MODE)
                    view = memoryview(pem)
                    while view:
                        view = view[os.write(fd, view) :]
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.link(tmp, final)
            except FileExistsError:
                raise KeyStoreError(f"key slot {slot!r} already holds a key ({final})") from None
            except OSError as exc:
                raise KeyStoreError(f"cannot write key {final}: {exc.strerror}") from None
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
            fsync_dir(self.directory)
        return key.public_key()

    def exists(self, slot: str) -> bool:
        return os.path.lexists(self._path(slot))

    def load_private(self, slot: str) -> ec.EllipticCurvePrivateKey:
        path = self._path(slot)
        with self._locked():
            self._remove_stale_temps()
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KeyStoreError(f"no key in slot {slot!r} ({path})") from None
        except OSError as exc:
            raise KeyStoreError(f"cannot open key {path}: {exc.strerror}") from None
        with os.fdopen(fd, "rb") as handle:
            st = os.fstat(handle.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise KeyStoreError(f"key {path} is not a regular file")
            if st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) & 0o077:
                raise KeyStoreError(
                    f"key {path} must be owned by uid {os.geteuid()} with mode 0600 "
                    f"(it is uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o})"
                )
            data = handle.read()
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError):
            # The parser's message is not shown: it could echo bytes of the key.
            raise KeyStoreError(f"key {path} is not a valid unencrypted PEM key") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(
            key.curve, ec.SECP256R1
        ):
            raise KeyStoreError(f"key {path} is not an ECDSA P-256 key")
        return key

    def public_key(self, slot: str) -> ec.EllipticCurvePublicKey:
        return self.load_private(slot).public_key()

    def key_file(self, slot: str) -> Path:
        path = self._path(slot)
        if not os.path.lexists(path):
            raise KeyStoreError(f"no key in slot {slot!r} ({path})")
        return path

    def delete(self, slot: str) -> None:
        # No overwrite before unlink: on flash with wear levelling it would not
        # reach the old blocks anyway.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(slot))
            fsync_dir(self.directory)

    def build_csr(self, slot: str, client_id: str, mac: str) -> bytes:
        return build_csr(self.load_private(slot), client_id, mac)

    def sign(self, slot: str, data: bytes) -> bytes:
        return self.load_private(slot).sign(data, ec.ECDSA(hashes.SHA256()))
