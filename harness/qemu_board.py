"""One board VM: qemu (TCG) booting the board image with systemd as PID 1.

Devices the harness relies on:
- the kernel console (ttyS0 / ttyAMA0) goes to ``console-<n>.log``;
- the factory UART is a qemu ``pty`` chardev: the host's station opens it
  like a USB-serial adapter (``factory_pty``);
- the NIC is qemu user networking with ``restrict=on``: the guest reaches
  only the ``guestfwd`` rules (each a loopback port on the host, relayed by
  ``harness/tcp_relay.py`` per connection) and nothing else;
- qemu-guest-agent on a virtio-serial port is the harness's control channel.

Boots never reboot in place (``-no-reboot``): a guest reboot ends the qemu
process and the harness powers the board on again, so every boot has its
own console log and pty. ``power_cut()`` is SIGKILL of qemu.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Final

from harness.board_image import BROKER_GUEST_IP, BoardImage
from harness.guest_agent import GuestAgent
from server.errors import ServerError

RELAY: Final = Path(__file__).with_name("tcp_relay.py")
PTY_RE: Final = re.compile(rb"char device redirected to (/dev/pts/\d+) \(label factory\)")


class BoardVmError(ServerError):
    """The board VM failed to start or stop as expected."""


@dataclass(frozen=True)
class Forward:
    """Guest ``BROKER_GUEST_IP:guest_port`` -> host ``127.0.0.1:host_port``."""

    guest_port: int
    host_port: int


@dataclass
class QemuBoard:
    """The board's hardware: disk overlay, NIC MAC, forwards; powered on once per boot."""

    image: BoardImage
    run_dir: Path
    mac: str
    forwards: list[Forward]
    memory_mib: int = 512
    boots: int = 0
    process: subprocess.Popen[bytes] | None = None
    factory_pty: str | None = None
    agent: GuestAgent | None = None
    powered_on_at: float = 0.0
    _log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def overlay(self) -> Path:
        return self.run_dir / "disk.qcow2"

    @property
    def console_log(self) -> Path:
        return self.run_dir / f"console-{self.boots}.log"

    def create_disk(self) -> None:
        """A copy-on-write overlay over the cached image: the board's own flash."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw",
             "-b", str(self.image.disk), str(self.overlay)],
            check=True,
        )  # fmt: skip

    def _netdev(self) -> str:
        rules = [
            f"guestfwd=tcp:{BROKER_GUEST_IP}:{f.guest_port}-cmd:"
            f"{sys.executable} {RELAY} 127.0.0.1 {f.host_port}"
            for f in self.forwards
        ]
        return ",".join(["user", "id=net0", "restrict=on", *rules])

    def argv(self) -> list[str]:
        spec = self.image.arch
        qga = self.run_dir / "qga.sock"
        common = [
            "-accel", "tcg", "-m", str(self.memory_mib), "-nodefaults", "-nographic",
            "-no-reboot", "-display", "none",
            "-kernel", str(self.image.kernel), "-initrd", str(self.image.initrd),
            "-append", f"root=/dev/vda rw console={spec.console} quiet",
            "-drive", f"file={self.overlay},if=none,id=disk0,format=qcow2",
            "-device", "virtio-blk-pci,drive=disk0",
            "-serial", f"file:{self.console_log}",
            "-chardev", "pty,id=factory",
            "-netdev", self._netdev(),
            "-device", f"virtio-net-pci,netdev=net0,mac={self.mac}",
            "-device", "virtio-serial-pci",
            "-chardev", f"socket,path={qga},server=on,wait=off,id=qga0",
            "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
        ]  # fmt: skip
        if spec.arch == "amd64":
            return [spec.qemu, "-machine", "pc", "-smp", "2", *common, "-serial", "chardev:factory"]
        return [spec.qemu, "-machine", "virt", "-cpu", "cortex-a57", "-smp", "2", *common,
                "-device", "pci-serial,chardev=factory"]  # fmt: skip

    def power_on(self, timeout: float = 30.0) -> None:
        """Start qemu; returns once the factory UART's pty is known."""
        if self.running:
            raise BoardVmError("the board is already powered on")
        self.boots += 1
        (self.run_dir / "qga.sock").unlink(missing_ok=True)
        log_path = self.run_dir / f"qemu-{self.boots}.log"
        self._log = log_path.open("wb")
        self.powered_on_at = time.monotonic()
        self.process = subprocess.Popen(
            self.argv(), stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + timeout
        while True:
            match = PTY_RE.search(log_path.read_bytes())
            if match:
                self.factory_pty = match.group(1).decode()
                break
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise BoardVmError(f"qemu did not start: {log_path.read_text(errors='replace')}")
            time.sleep(0.05)
        self.agent = GuestAgent(self.run_dir / "qga.sock")

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def guest(self) -> GuestAgent:
        if self.agent is None or not self.running:
            raise BoardVmError("the board is not running")
        return self.agent

    def wait_booted(self, timeout: float = 300.0) -> float:
        """Wait for the guest agent, then for systemd to finish booting; seconds since power-on."""
        guest = self.guest()
        guest.wait_ready(timeout)
        guest.run("systemctl is-system-running --wait", timeout=timeout)
        return time.monotonic() - self.powered_on_at

    def shutdown(self, timeout: float = 120.0) -> None:
        """A clean ``systemctl poweroff`` (a reboot: the next ``power_on`` boots it again)."""
        guest = self.guest()
        try:
            guest.call("guest-exec", {"path": "/bin/systemctl", "arg": ["poweroff"]})
        finally:
            self._wait_exit(timeout)

    def power_cut(self) -> None:
        """SIGKILL of qemu: the guest loses whatever it had not written to its disk."""
        self.kill()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self._wait_exit(10.0)

    def _wait_exit(self, timeout: float) -> None:
        if self.process is not None:
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise BoardVmError(f"qemu still running {timeout:.0f} s after poweroff") from None
        if self.agent is not None:
            self.agent.close()
            self.agent = None
        if self._log is not None:
            self._log.close()
            self._log = None
        self.factory_pty = None
