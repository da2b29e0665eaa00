"""Real local services for tests and the demo: Mosquitto and a MongoDB-wire server.

Both run as separate processes on free loopback ports, with a readiness wait
and bounded shutdown. Nothing here fakes a service: when ``MONGODB_URI`` is
set, that server is used instead of starting one.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Final

import pymongo
import pymongo.errors

from server.errors import ServerError

READY_TIMEOUT_S: Final = 30.0


class ServiceError(ServerError):
    """A local service could not be started or stopped."""


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, timeout: float, process: subprocess.Popen[bytes] | None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise ServiceError(f"process exited with code {process.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise ServiceError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


def find_executable(name: str, *extra_dirs: str) -> str:
    """An executable from PATH, the running interpreter's bin dir, or ``extra_dirs``."""
    candidates = [os.path.dirname(sys.executable), *extra_dirs]
    found = shutil.which(name) or shutil.which(name, path=os.pathsep.join(candidates))
    if found is None:
        raise ServiceError(f"{name} is not installed (looked in PATH and {', '.join(candidates)})")
    return found


class _Process:
    """A child process whose output goes to a log file, stopped on exit."""

    name = "service"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.log_path = workdir / f"{self.name}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def _spawn(self, argv: list[str]) -> subprocess.Popen[bytes]:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop())
        self.process = subprocess.Popen(
            argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.workdir,
            start_new_session=True,  # a Ctrl-C in the terminal is ours to forward
        )
        return self.process

    def log_text(self, tail: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL, for fault tests."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> _Process:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class MongoWireServer(_Process):
    """``secantusd-py`` (PyPI ``secantusdb``) on a free port with on-disk storage."""

    name = "secantusd"

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        super().__init__(workdir)
        self.port = port or free_port()
        self.storage = workdir / "data"

    @property
    def uri(self) -> str:
        """The server's URI, with retryable writes off.

        secantusdb 0.7 keeps a record of every retryable write for 30 minutes and walks
        all of them (sorting once there are 10,000) on every later write: after about
        ten thousand writes each write costs several milliseconds more, and update_one
        falls from about 800/s to 90/s (docs/performance.md, issue 14 findings). Our
        writes are guarded by the expected state and converge when a device retries, so
        the driver's one automatic retry is not needed against this server.
        """
        return f"mongodb://127.0.0.1:{self.port}/?retryWrites=false"

    def database_uri(self, name: str) -> str:
        """The URI naming database ``name`` on this server (options kept)."""
        return f"mongodb://127.0.0.1:{self.port}/{name}?retryWrites=false"

    def start(self, timeout: float = READY_TIMEOUT_S) -> MongoWireServer:
        argv = [
            find_executable("secantusd-py"),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--storage-path",
            str(self.storage),
            "--log-level",
            "WARNING",
        ]
        process = self._spawn(argv)
        try:
            wait_for_port(self.port, timeout, process)
            self._wait_for_ping(timeout)
        except ServiceError as exc:
            self.stop()
            raise ServiceError(f"secantusd-py did not start: {exc}\n{self.log_text()}") from None
        return self

    def _wait_for_ping(self, timeout: float) -> None:
        client: pymongo.MongoClient[dict[str, object]] = pymongo.MongoClient(
            self.uri, serverSelectionTimeoutMS=int(timeout * 1000)
        )
        try:
            client.admin.command("ping")
        except pymongo.errors.PyMongoError as exc:
            raise ServiceError(f"no ping answer: {exc}") from None
        finally:
            client.close()


class MosquittoBroker(_Process):
    """Debian's ``mosquitto`` with a config file written by ``server.broker.mosquitto_conf``."""

    name = "mosquitto"

    def __init__(self, workdir: Path, config_path: Path, ports: tuple[int, ...]) -> None:
        super().__init__(workdir)
        self.config_path = config_path
        self.ports = ports

    def start(self, timeout: float = READY_TIMEOUT_S) -> MosquittoBroker:
        argv = [find_executable("mosquitto", "/usr/sbin"), "-c", str(self.config_path)]
        process = self._spawn(argv)
        try:
            for port in self.ports:
                wait_for_port(port, timeout, process)
        except ServiceError as exc:
            self.stop()
            raise ServiceError(f"mosquitto did not start: {exc}\n{self.log_text()}") from None
        return self

    def reload(self) -> None:
        """SIGHUP: Mosquitto re-reads the ACL file and the CRL without dropping clients."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGHUP)

    def restart(self, timeout: float = READY_TIMEOUT_S) -> None:
        # Mosquitto sets SO_REUSEADDR, so the same ports can be bound again at once.
        self.stop()
        self.start(timeout)
