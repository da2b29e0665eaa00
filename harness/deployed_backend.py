"""The backend as an operator deploys it: a booted Debian 12 system running docs/server.md.

``DeployedBackend.start`` boots a Debian 12 root file system (``mmdebstrap``, cached
outside the checkout) with ``systemd-nspawn -b`` (systemd as PID 1, real units, real
users), copies the provision-server .deb into it and runs ``scripts/deploy-backend.sh``
there, which executes the "Deploy" block of docs/server.md as written: Debian's own
``mosquitto.service`` on the generated configuration as user ``mosquitto``,
``provision-server.service`` as shipped. The container shares the host's network, so
the deployed broker's ports (8883/8884/8885, the doc's defaults) are on the host's
loopback and the container reaches a MongoDB-wire server there.

For a board (tests, ``scripts/board-vm.sh``): ``ca_dir`` and ``passphrase`` are host paths
into the container's files (the factory station signs birth certificates with that CA).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import platformdirs

from server.errors import ServerError

REPO: Final = Path(__file__).resolve().parent.parent
SUITE: Final = "bookworm"
PACKAGES: Final = (
    "systemd", "systemd-sysv", "dbus", "python3", "mosquitto", "util-linux", "procps",
)  # fmt: skip
"""The backend host's Debian packages before ours (the .deb's dependencies: no network
inside the container, so they are in the image)."""
BROKER_PORTS: Final = (8883, 8884, 8885)
BOOT_TIMEOUT_S: Final = 60.0
DEPLOY_TIMEOUT_S: Final = 300.0
STOP_TIMEOUT_S: Final = 30.0
NSPAWN_FLAGS: Final = ("--register=no", "--keep-unit", "--console=passive", "--quiet")
"""No machined on the host (no system bus): nothing to register with; keep our own cgroup."""


class DeployError(ServerError):
    """The container could not be built, booted or deployed (the message says which step)."""


def cache_dir() -> Path:
    return Path(platformdirs.user_cache_dir("device-provisioning"))


def ensure_rootfs_tarball(log: Path) -> Path:
    """A ``mmdebstrap`` tarball of Debian 12 with ``PACKAGES``, built once per package list."""
    key = hashlib.sha256(f"{SUITE} {' '.join(PACKAGES)}".encode()).hexdigest()[:12]
    tarball = cache_dir() / f"backend-rootfs-{SUITE}-{key}.tar"
    if tarball.exists():
        return tarball
    tarball.parent.mkdir(parents=True, exist_ok=True)
    partial = tarball.with_name(f".{tarball.name}.{os.getpid()}")
    argv = ["mmdebstrap", "--variant=minbase", "--format=tar",
            f"--include={','.join(PACKAGES)}", SUITE, str(partial)]  # fmt: skip
    with log.open("ab") as out:
        result = subprocess.run(argv, stdout=out, stderr=out, stdin=subprocess.DEVNULL,
                                timeout=900, check=False)  # fmt: skip
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise DeployError(f"mmdebstrap failed (exit {result.returncode}); see {log}")
    os.replace(partial, tarball)
    return tarball


def _port_in_use(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class DeployedBackend:
    workdir: Path
    rootfs: Path
    process: subprocess.Popen[bytes]
    leader: int
    deploy_output: str = ""
    log: Path = field(default_factory=Path)
    mongodb_uri: str = ""

    @property
    def ca_dir(self) -> Path:
        return self.rootfs / "var/lib/provision-server/ca"

    @property
    def passphrase(self) -> bytes:
        return (self.rootfs / "etc/provision-server/ca-passphrase").read_bytes().strip()

    @classmethod
    def start(
        cls, workdir: Path, mongodb_uri: str, server_deb: Path, broker_name: str = "localhost"
    ) -> DeployedBackend:
        """Boot a fresh container and deploy; returns once deploy-backend.sh has succeeded."""
        busy = [port for port in BROKER_PORTS if _port_in_use(port)]
        if busy:
            raise DeployError(
                f"ports {busy} are in use on this host: the deployed broker needs them"
            )
        for tool in ("mmdebstrap", "systemd-nspawn", "nsenter"):
            if shutil.which(tool) is None:
                raise DeployError(f"{tool} is missing (Debian: mmdebstrap, systemd-container)")
        workdir.mkdir(parents=True, exist_ok=True)
        log = workdir / "container.log"
        rootfs = workdir / "rootfs"
        if rootfs.exists():
            shutil.rmtree(rootfs)
        rootfs.mkdir()
        tarball = ensure_rootfs_tarball(log)
        subprocess.run(["tar", "-C", str(rootfs), "-xf", str(tarball)], check=True, timeout=300)
        deploy = rootfs / "root/deploy"
        for relative in ("scripts/deploy-backend.sh", "docs/server.md"):
            (deploy / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO / relative, deploy / relative)
        (deploy / "dist").mkdir()
        shutil.copy(server_deb, deploy / "dist" / server_deb.name)
        with log.open("ab") as out:
            process = subprocess.Popen(
                ["systemd-nspawn", "-D", str(rootfs), "-b", *NSPAWN_FLAGS,
                 "-M", f"backend-{os.getpid()}"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
            )  # fmt: skip
        backend = cls(workdir, rootfs, process, leader=0, log=log, mongodb_uri=mongodb_uri)
        try:
            backend.leader = backend._wait_for_boot()
            backend.deploy_output = backend.deploy(mongodb_uri, broker_name)
        except BaseException:
            backend.stop()
            raise
        return backend

    def _wait_for_boot(self) -> int:
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise DeployError(f"systemd-nspawn exited ({self.process.returncode}); {self.log}")
            children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
            with contextlib.suppress(OSError, ValueError, IndexError):  # not forked yet
                leader = int(children.read_text().split()[0])
                state = subprocess.run(
                    ["nsenter", "-t", str(leader), "-a", "systemctl", "is-system-running"],
                    capture_output=True, text=True, timeout=10, check=False,
                ).stdout.strip()  # fmt: skip
                if state in ("running", "degraded"):
                    return leader
            time.sleep(0.5)
        raise DeployError(f"the container did not boot in {BOOT_TIMEOUT_S:g} s; {self.log}")

    def run(self, *argv: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """A command inside the container, as its root, with a clean environment."""
        return subprocess.run(
            ["nsenter", "-t", str(self.leader), "-a", "env", "-i",
             "PATH=/usr/sbin:/usr/bin:/sbin:/bin", *argv],
            capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip

    def deploy(self, mongodb_uri: str, broker_name: str) -> str:
        """Run scripts/deploy-backend.sh in the container (again: the steps are re-runnable)."""
        result = self.run(
            f"MONGODB_URI={mongodb_uri}", f"BROKER_NAME={broker_name}",
            "bash", "/root/deploy/scripts/deploy-backend.sh", "--deb-dir", "/root/deploy/dist",
            timeout=DEPLOY_TIMEOUT_S,
        )  # fmt: skip
        output = result.stdout + result.stderr
        (self.workdir / "deploy.log").write_text(output)
        if result.returncode != 0:
            raise DeployError(
                f"deploy-backend.sh failed (exit {result.returncode}):\n{output[-4000:]}"
            )
        return output

    def stop(self) -> None:
        """Power the container off (SIGTERM to nspawn), then kill it if it hangs."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
