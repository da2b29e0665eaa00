"""harness/tcp_relay.py, the per-connection relay behind the board VM's guestfwd rules."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from pathlib import Path

RELAY = Path(__file__).resolve().parent.parent / "harness" / "tcp_relay.py"


def _echo_server() -> tuple[socket.socket, int]:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data.upper())

    threading.Thread(target=serve, daemon=True).start()
    return server, server.getsockname()[1]


def test_relays_both_ways_and_ends_when_the_guest_closes() -> None:
    server, port = _echo_server()
    with server:
        payload = b"hello broker " * 10000  # more than one read on either side
        result = subprocess.run(
            [sys.executable, str(RELAY), "127.0.0.1", str(port)],
            input=payload,
            capture_output=True,
            timeout=30,
            check=False,
        )
    assert result.returncode == 0, result.stderr
    assert result.stdout == payload.upper()


def test_refuses_a_target_that_is_not_loopback() -> None:
    result = subprocess.run(
        [sys.executable, str(RELAY), "192.0.2.1", "8883"],
        input=b"x",
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert b"not a loopback address" in result.stderr
    assert result.stdout == b""


def test_nothing_listening_is_exit_1() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = subprocess.run(
        [sys.executable, str(RELAY), "127.0.0.1", str(port)],
        input=b"x",
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 1
    assert b"cannot connect" in result.stderr
