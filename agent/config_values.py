"""The agent configuration's value checks: one function per kind of value.

Each takes the raw TOML value (or, with ``from_env``, the environment variable's text) and
returns the typed value or raises ``InvalidValue`` saying what was expected.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Final

from agent.protocol import CLIENT_ID_RE


class InvalidValue(Exception):
    """A value failed its check; the message says what was expected."""


HOST_RE: Final = re.compile(r"^[A-Za-z0-9._:\[\]-]{1,253}$")
IFNAME_RE: Final = re.compile(r"^[A-Za-z0-9_.:-]{1,15}$")


def text(raw: object, from_env: bool) -> str:
    if not isinstance(raw, str):
        raise InvalidValue("a string")
    return raw


def host(raw: object, from_env: bool) -> str:
    value = text(raw, from_env)
    if not HOST_RE.fullmatch(value):
        raise InvalidValue("a host name or IP address (no scheme, no port, no spaces)")
    return value


def integer(raw: object, from_env: bool) -> int:
    if from_env and isinstance(raw, str):
        try:
            return int(raw.strip())
        except ValueError:
            raise InvalidValue("an integer") from None
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise InvalidValue("an integer")
    return raw


def number(raw: object, from_env: bool) -> float:
    if from_env and isinstance(raw, str):
        try:
            value = float(raw.strip())
        except ValueError:
            raise InvalidValue("a number") from None
    elif isinstance(raw, bool) or not isinstance(raw, int | float):
        raise InvalidValue("a number")
    else:
        value = float(raw)
    if not math.isfinite(value):
        raise InvalidValue("a finite number")
    return value


def port(raw: object, from_env: bool) -> int:
    value = integer(raw, from_env)
    if not 1 <= value <= 65535:
        raise InvalidValue("a TCP port number in 1..65535")
    return value


def positive_seconds(raw: object, from_env: bool) -> float:
    value = number(raw, from_env)
    if value <= 0:
        raise InvalidValue("a positive number of seconds")
    return value


def fraction(raw: object, from_env: bool) -> float:
    value = number(raw, from_env)
    if not 0 < value < 1:
        raise InvalidValue("a fraction strictly between 0 and 1")
    return value


def keepalive(raw: object, from_env: bool) -> int:
    value = integer(raw, from_env)
    if not 1 <= value <= 65535:
        raise InvalidValue("whole seconds in 1..65535 (the MQTT keep-alive field)")
    return value


def baud(raw: object, from_env: bool) -> int:
    value = integer(raw, from_env)
    if not 50 <= value <= 4_000_000:
        raise InvalidValue("a baud rate in 50..4000000")
    return value


def interface(raw: object, from_env: bool) -> str:
    value = text(raw, from_env)
    if not IFNAME_RE.fullmatch(value):
        raise InvalidValue("a network interface name (1-15 characters, as in /sys/class/net)")
    return value


def client_id(raw: object, from_env: bool) -> str:
    value = text(raw, from_env)
    if not CLIENT_ID_RE.fullmatch(value):
        raise InvalidValue(f"a client id matching {CLIENT_ID_RE.pattern}")
    return value


def device_path(raw: object, from_env: bool) -> str:
    value = text(raw, from_env)
    if not value.startswith("/"):
        raise InvalidValue("an absolute device path such as /dev/ttyS0")
    return value


def path(raw: object, from_env: bool) -> Path:
    value = text(raw, from_env)
    if not value or "\0" in value:
        raise InvalidValue("a file system path")
    return Path(value)
