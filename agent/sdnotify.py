"""The systemd notify protocol (sd_notify(3)) without python-systemd.

A ``Type=notify`` service tells systemd it is ready, what it is doing and
that it is still alive by sending datagrams to ``$NOTIFY_SOCKET``. Outside
systemd (a laptop demo, tests) the variable is unset and every call is a
no-op, so the agent never needs to know how it was started.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping


class SystemdNotifier:
    """Sends ``READY=1``, ``STATUS=``, ``WATCHDOG=1`` and ``STOPPING=1`` to systemd.

    The environment is read once, at construction. Send failures are
    swallowed: a service must not crash because its supervisor went away,
    and systemd restarts it anyway if the watchdog stops being fed.
    """

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        environ = os.environ if env is None else env
        self._address = _socket_address(environ.get("NOTIFY_SOCKET", ""))
        self._watchdog_usec = environ.get("WATCHDOG_USEC")
        self._watchdog_pid = environ.get("WATCHDOG_PID")

    @property
    def enabled(self) -> bool:
        """True when running under systemd with a notify socket."""
        return self._address is not None

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=value`` lines in one datagram; False if nothing was sent."""
        if self._address is None or not assignments:
            return False
        for line in assignments:
            if "\n" in line or "=" not in line:
                raise ValueError(f"not a single KEY=value line: {line!r}")
        payload = "\n".join(assignments).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(payload, self._address)
        except OSError:
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        if status is None:
            return self.notify("READY=1")
        return self.notify("READY=1", _status_line(status))

    def status(self, text: str) -> bool:
        return self.notify(_status_line(text))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def watchdog_interval(self) -> float | None:
        """The ping period in seconds (half of ``WatchdogSec=``), or None.

        None when the watchdog is off or addressed to another process
        (``WATCHDOG_PID`` set and not ours), as sd_watchdog_enabled(3) does.
        """
        if not self._watchdog_usec:
            return None
        if self._watchdog_pid:
            try:
                if int(self._watchdog_pid) != os.getpid():
                    return None
            except ValueError:
                return None
        try:
            usec = int(self._watchdog_usec)
        except ValueError:
            return None
        if usec <= 0:
            return None
        return usec / 1_000_000 / 2


def _status_line(text: str) -> str:
    # STATUS= is one line; a newline would start a new (bogus) assignment.
    return "STATUS=" + " ".join(text.split("\n"))


def _socket_address(value: str) -> str | bytes | None:
    """``@name`` is a Linux abstract socket (leading NUL); ``/path`` a file."""
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None  # systemd only ever passes one of the two forms
