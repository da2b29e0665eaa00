"""Serial test helpers: the pty cable lives in ``harness.serial_pair`` (the demo uses it too)."""

from __future__ import annotations

from typing import Any

import serial

from harness.serial_pair import LineFaults, LineProxy, open_raw_pty

__all__ = ["LineFaults", "LineProxy", "open_port", "open_raw_pty"]


def open_port(path: str, baudrate: int = 115200) -> Any:
    return serial.Serial(path, baudrate=baudrate, timeout=0.05, exclusive=True)
