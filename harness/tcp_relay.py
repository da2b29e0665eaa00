"""stdin/stdout <-> one TCP connection: qemu's ``guestfwd=...-cmd:`` runs this per connection.

qemu's user network (``restrict=on``) lets the guest reach nothing but its
forwarding rules. A ``guestfwd`` to a character device connects once when
qemu starts; ``cmd:`` starts this relay for every connection the guest
opens, so an agent can reconnect as often as it needs. The target must be a
loopback address: the board reaches only the local backend.

Run as a script (``python3 harness/tcp_relay.py 127.0.0.1 PORT``): it imports
nothing of the project.
"""

from __future__ import annotations

import ipaddress
import os
import selectors
import socket
import sys


def relay(host: str, port: int) -> int:
    if not ipaddress.ip_address(host).is_loopback:
        print(f"tcp_relay: {host} is not a loopback address", file=sys.stderr)
        return 2
    try:
        upstream = socket.create_connection((host, port), timeout=10)
    except OSError as exc:
        print(f"tcp_relay: cannot connect to {host}:{port}: {exc}", file=sys.stderr)
        return 1
    upstream.settimeout(None)
    guest_in, guest_out = sys.stdin.fileno(), sys.stdout.fileno()
    selector = selectors.DefaultSelector()
    selector.register(guest_in, selectors.EVENT_READ, "guest")
    selector.register(upstream, selectors.EVENT_READ, "upstream")
    while True:
        for key, _ in selector.select():
            if key.data == "guest":
                data = os.read(guest_in, 65536)
                if data:
                    upstream.sendall(data)
                else:  # the guest closed its side; the broker may still answer
                    selector.unregister(guest_in)
                    upstream.shutdown(socket.SHUT_WR)
                continue
            data = upstream.recv(65536)
            if not data:
                return 0  # exiting closes the guest's side too
            while data:
                data = data[os.write(guest_out, data) :]


if __name__ == "__main__":
    try:
        sys.exit(relay(sys.argv[1], int(sys.argv[2])))
    except (OSError, IndexError, ValueError) as exc:
        print(f"tcp_relay: {exc}", file=sys.stderr)
        sys.exit(1)
