"""Fake board filesystems for tests (the implementation is shared with the demo)."""

from harness.simulated_board import ARPHRD_ETHER, ARPHRD_LOOPBACK, make_board_files, make_sysfs

__all__ = ["ARPHRD_ETHER", "ARPHRD_LOOPBACK", "make_board_files", "make_sysfs"]
