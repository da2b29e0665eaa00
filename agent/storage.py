"""Crash-safe files and the versioned certificate store of the agent's state directory.

Boards lose power at any moment, so every write here is "all or nothing":
data goes to a fresh temp file in the same directory (``O_EXCL``), is fsynced,
renamed over the target, and the directory is fsynced so the rename survives.

``CertificateStore`` follows certbot's ``archive/``/``live`` layout::

    <root>/archive/<n>/cert.pem, chain.pem, meta.json [, key.pem]
    <root>/live      -> archive/<n>    (the version in use)
    <root>/previous  -> archive/<m>    (the version live before it, for rollback)

A numbered version directory only ever appears complete (it is built under a
temp name and renamed), and ``live`` is switched with one ``os.replace`` of a
symlink, so a crash leaves either the old or the new version live, never a mix.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
import shutil
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from agent.errors import StorageError

FILE_MODE = 0o600
DIR_MODE = 0o700


def fsync_dir(path: Path) -> None:
    """Make a rename/link/unlink inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_new_file(path: Path, data: bytes, mode: int = FILE_MODE) -> None:
    """Create ``path`` (which must not exist) with ``data``, fsynced; never follows symlinks."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have removed bits we asked for
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{secrets.token_hex(6)}")


def atomic_write(path: Path, data: bytes, mode: int = FILE_MODE) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new content, never half."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        write_new_file(tmp, data, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) with mode 0700, or tighten an existing one to 0700.

    Refuses a symlink, a non-directory, and a directory owned by another user:
    those would let someone else read or swap our keys.
    """
    path = Path(path)
    try:
        os.mkdir(path, DIR_MODE)
    except FileExistsError:
        pass
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, DIR_MODE)
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise StorageError(f"{path} is a symlink; the state directory must be a real directory")
    if not stat.S_ISDIR(st.st_mode):
        raise StorageError(f"{path} exists and is not a directory")
    if st.st_uid != os.geteuid():
        raise StorageError(
            f"{path} is owned by uid {st.st_uid}, not by this user (uid {os.geteuid()}); "
            "fix its ownership or choose another state directory"
        )
    if stat.S_IMODE(st.st_mode) != DIR_MODE:
        os.chmod(path, DIR_MODE)
    return path


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object stored at ``path``, or None when the file does not exist."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc.strerror}") from None
    try:
        obj = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StorageError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise StorageError(f"{path} must hold a JSON object")
    return obj


@contextlib.contextmanager
def directory_lock(directory: Path) -> Iterator[None]:
    """Exclusive ``flock`` on ``<directory>/.lock``, across processes, released on exit."""
    fd = os.open(
        directory / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE
    )
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj: Mapping[str, Any], mode: int = FILE_MODE) -> None:
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=True).encode() + b"\n", mode)


class VersionPaths(NamedTuple):
    """Files of one certificate version; ``key`` is None when the key lives in a key store."""

    cert: Path
    chain: Path
    key: Path | None


CERT_FILE = "cert.pem"
CHAIN_FILE = "chain.pem"
KEY_FILE = "key.pem"
META_FILE = "meta.json"


class CertificateStore:
    """Versioned certificates with an atomically switched ``live`` link (see module doc).

    Mutating methods hold an exclusive ``flock`` on ``<root>/.lock`` so that two
    agent processes (service and factory console) cannot interleave.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.archive = self.root / "archive"
        self.live_link = self.root / "live"
        self.previous_link = self.root / "previous"

    # --- reading ------------------------------------------------------------

    def version_dir(self, version: int) -> Path:
        return self.archive / str(version)

    def versions(self) -> list[int]:
        """All stored versions, oldest first (each one is complete by construction)."""
        try:
            names = os.listdir(self.archive)
        except FileNotFoundError:
            return []
        return sorted(int(name) for name in names if name.isdigit())

    def _link_version(self, link: Path) -> int | None:
        try:
            target = os.readlink(link)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"{link} is not a symlink: {exc.strerror}") from None
        parts = Path(target).parts
        if len(parts) != 2 or parts[0] != "archive" or not parts[1].isdigit():
            raise StorageError(f"{link} points to {target!r}, expected archive/<number>")
        return int(parts[1])

    def live_version(self) -> int | None:
        """The active version, or None before the first activation."""
        version = self._link_version(self.live_link)
        if version is not None and not self.version_dir(version).is_dir():
            raise StorageError(f"{self.live_link} points to missing version {version}")
        return version

    def previous_version(self) -> int | None:
        """The version that was live before the current one, if it is still stored."""
        version = self._link_version(self.previous_link)
        if version is None or version == self.live_version():
            return None
        return version if self.version_dir(version).is_dir() else None

    def meta(self, version: int) -> dict[str, Any]:
        meta = read_json(self.version_dir(version) / META_FILE)
        if meta is None:
            raise StorageError(f"version {version} does not exist in {self.archive}")
        return meta

    def paths(self, version: int) -> VersionPaths:
        directory = self.version_dir(version)
        if not directory.is_dir():
            raise StorageError(f"version {version} does not exist in {self.archive}")
        key = directory / KEY_FILE
        return VersionPaths(
            directory / CERT_FILE, directory / CHAIN_FILE, key if key.exists() else None
        )

    def live_paths(self) -> VersionPaths:
        """Live files, resolved to ``archive/<n>`` so a later switch cannot mix two versions."""
        version = self.live_version()
        if version is None:
            raise StorageError(f"no certificate is active yet in {self.root}")
        return self.paths(version)

    # --- writing ------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        ensure_private_dir(self.root)
        ensure_private_dir(self.archive)
        with directory_lock(self.root):
            yield

    def _remove_leftovers(self) -> None:
        """Delete staging/trash directories left by a crash (never numbered versions)."""
        for name in os.listdir(self.archive):
            if name.startswith((".staging-", ".trash-")):
                shutil.rmtree(self.archive / name, ignore_errors=True)
        for name in os.listdir(self.root):
            if name.startswith(".link-"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.root / name)

    def stage(
        self,
        cert_pem: bytes,
        chain_pem: bytes,
        meta: Mapping[str, Any],
        *,
        key_file: Path | None = None,
    ) -> int:
        """Store a new version (not live yet) and return its number.

        ``key_file`` is an existing private key file (a ``FileKeyStore`` key); it
        is hard-linked into the version (copied when that is impossible) so the
        version stays usable after the key store slot is deleted. Keys held by
        hardware are not given here; put their slot into ``meta`` instead.
        """
        with self._locked():
            self._remove_leftovers()
            existing = self.versions()
            version = (existing[-1] if existing else 0) + 1
            staging = self.archive / f".staging-{secrets.token_hex(6)}"
            os.mkdir(staging, DIR_MODE)
            try:
                os.chmod(staging, DIR_MODE)
                write_new_file(staging / CERT_FILE, cert_pem)
                write_new_file(staging / CHAIN_FILE, chain_pem)
                if key_file is not None:
                    _link_or_copy_key(Path(key_file), staging / KEY_FILE)
                write_new_file(
                    staging / META_FILE,
                    json.dumps(dict(meta), indent=2, sort_keys=True).encode() + b"\n",
                )
                fsync_dir(staging)
                final = self.version_dir(version)
                if os.path.lexists(final):  # cannot happen under the lock; never merge into one
                    raise StorageError(f"{final} already exists")
                os.rename(staging, final)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            fsync_dir(self.archive)
            return version

    def activate(self, version: int) -> None:
        """Make ``version`` live; the version that was live becomes ``previous``."""
        with self._locked():
            paths = self.paths(version)
            if not paths.cert.is_file() or not paths.chain.is_file():
                raise StorageError(f"version {version} is incomplete; refusing to activate it")
            current = self._link_version(self.live_link)
            if current == version:
                return
            if current is not None:
                self._point(self.previous_link, current)
            self._point(self.live_link, version)

    def _point(self, link: Path, version: int) -> None:
        tmp = self.root / f".link-{secrets.token_hex(6)}"
        os.symlink(f"archive/{version}", tmp)
        try:
            os.replace(tmp, link)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        fsync_dir(self.root)

    def prune(self, keep: int = 2) -> list[int]:
        """Delete old versions, keeping the ``keep`` newest up to live, ``previous``,
        and every version newer than live (it may be about to be activated).

        Returns the removed version numbers. Does nothing before the first activation.
        """
        if keep < 1:
            raise ValueError("keep must be at least 1 (the live version)")
        with self._locked():
            self._remove_leftovers()
            live = self.live_version()
            if live is None:
                return []
            previous = self.previous_version()
            upto_live = [v for v in self.versions() if v <= live]
            protected = set(upto_live[-keep:]) | {live}
            if previous is not None:
                protected.add(previous)
            removed = []
            for version in upto_live:
                if version in protected:
                    continue
                # Rename first: a crash mid-delete leaves a .trash dir, never a partial version.
                trash = self.archive / f".trash-{version}-{secrets.token_hex(6)}"
                os.rename(self.version_dir(version), trash)
                fsync_dir(self.archive)
                shutil.rmtree(trash)
                removed.append(version)
            return removed


def _link_or_copy_key(source: Path, target: Path) -> None:
    try:
        os.link(source, target, follow_symlinks=False)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
            raise StorageError(f"cannot store key {source}: {exc.strerror}") from None
        write_new_file(target, source.read_bytes())
    st = os.lstat(target)
    if not stat.S_ISREG(st.st_mode) or stat.S_IMODE(st.st_mode) & 0o077:
        raise StorageError(f"key file {source} must be a regular file with mode 0600")
