"""The harness's control channel into a board VM: qemu-guest-agent over virtio-serial.

The guest runs Debian's ``qemu-guest-agent`` (test image only, never part of
the agent package); qemu exposes its port as a Unix socket on the host. The
protocol is one JSON object per line; ``guest-exec`` runs a command and
``guest-exec-status`` returns its exit code and base64 output.
"""

from __future__ import annotations

import base64
import json
import random
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.errors import ServerError


class GuestAgentError(ServerError):
    """The guest agent did not answer or a command in the guest failed."""


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    stdout: str
    stderr: str


class GuestAgent:
    """A client for one qemu-guest-agent socket (one request at a time)."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self._sock: socket.socket | None = None
        self._buffer = b""

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._buffer = b""

    def _connect(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(self.socket_path))
            self._sock = sock
        return self._sock

    def _send(self, command: str, arguments: dict[str, Any] | None = None) -> None:
        request: dict[str, Any] = {"execute": command}
        if arguments is not None:
            request["arguments"] = arguments
        self._connect().sendall(json.dumps(request).encode() + b"\n")

    def _read_message(self, timeout: float) -> dict[str, Any]:
        sock = self._connect()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            sock.settimeout(remaining)
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("guest agent socket closed")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        # guest-sync-delimited answers after a 0xFF byte that resets the parser.
        message: dict[str, Any] = json.loads(line.lstrip(b"\xff") or b"{}")
        return message

    def wait_ready(self, timeout: float) -> None:
        """Block until the guest agent answers (it starts early in the guest's boot)."""
        deadline = time.monotonic() + timeout
        while True:
            token = random.randint(1, 2**31)  # noqa: S311 (a sync id, not a secret)
            try:
                self._send("guest-sync-delimited", {"id": token})
                while True:
                    reply = self._read_message(min(3.0, max(0.1, deadline - time.monotonic())))
                    if reply.get("return") == token:
                        return
            except (OSError, TimeoutError, ConnectionError, ValueError):
                self.close()
            if time.monotonic() > deadline:
                raise GuestAgentError(f"no answer from the guest agent after {timeout:.0f} s")
            time.sleep(0.5)

    def call(
        self, command: str, arguments: dict[str, Any] | None = None, timeout: float = 30.0
    ) -> Any:
        self._send(command, arguments)
        try:
            reply = self._read_message(timeout)
        except (OSError, TimeoutError) as exc:
            self.close()
            raise GuestAgentError(f"guest agent: no reply to {command}: {exc!r}") from None
        if "error" in reply:
            raise GuestAgentError(f"guest agent: {command}: {reply['error']}")
        return reply.get("return")

    def run(self, script: str, timeout: float = 60.0) -> ExecResult:
        """``/bin/sh -c script`` in the guest as root; its exit code and output."""
        started = self.call(
            "guest-exec",
            {"path": "/bin/sh", "arg": ["-c", script], "capture-output": True},
        )
        pid = started["pid"]
        deadline = time.monotonic() + timeout
        while True:
            status = self.call("guest-exec-status", {"pid": pid})
            if status["exited"]:
                return ExecResult(
                    int(status.get("exitcode", -1)),
                    base64.b64decode(status.get("out-data", "")).decode(errors="replace"),
                    base64.b64decode(status.get("err-data", "")).decode(errors="replace"),
                )
            if time.monotonic() > deadline:
                raise GuestAgentError(
                    f"guest command still running after {timeout:.0f} s: {script}"
                )
            time.sleep(0.2)

    def check(self, script: str, timeout: float = 60.0) -> str:
        """Like ``run`` but a non-zero exit is an error; returns stdout."""
        result = self.run(script, timeout)
        if result.exit_code != 0:
            raise GuestAgentError(
                f"guest command failed (exit {result.exit_code}): {script}\n"
                f"{result.stdout[-1500:]}{result.stderr[-1500:]}"
            )
        return result.stdout
