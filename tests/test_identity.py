"""MAC selection from a sysfs tree, board serial sources, default clientId."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.errors import IdentityError
from agent.identity import board_serial, default_client_id, read_mac
from agent.protocol import CLIENT_ID_RE
from tests.simulated_board import make_board_files, make_sysfs

LO = ("00:00:00:00:00:00", False)


def test_make_sysfs_builds_kernel_layout(tmp_path: Path) -> None:
    make_sysfs(tmp_path, {"eth0": ("02:00:00:00:00:01", True), "lo": LO})
    eth0 = tmp_path / "class" / "net" / "eth0"
    assert eth0.is_symlink() and not os.readlink(eth0).startswith("/")
    assert (eth0 / "device").is_symlink()
    assert "devices/platform" in os.path.realpath(eth0)
    assert "devices/virtual/net" in os.path.realpath(tmp_path / "class" / "net" / "lo")
    assert not os.path.lexists(tmp_path / "class" / "net" / "lo" / "device")


def test_skips_loopback_and_virtual_interfaces(tmp_path: Path) -> None:
    make_sysfs(
        tmp_path,
        {
            "lo": LO,
            "docker0": ("02:42:ac:11:00:01", False),
            "br0": ("02:42:ac:11:00:02", False),
            "end0": ("dc:a6:32:01:02:03", True),
        },
    )
    assert read_mac(tmp_path) == ("end0", "DC:A6:32:01:02:03")


def test_interface_without_device_link_is_virtual(tmp_path: Path) -> None:
    make_sysfs(tmp_path, {"eth0": ("02:00:00:00:00:01", True), "eth1": ("b8:27:eb:00:00:02", True)})
    os.unlink(tmp_path / "class" / "net" / "eth0" / "device")
    assert read_mac(tmp_path) == ("eth1", "B8:27:EB:00:00:02")


def test_wired_before_wireless_before_others(tmp_path: Path) -> None:
    make_sysfs(
        tmp_path,
        {
            "usb0": ("02:00:00:00:00:03", True),
            "wlan0": ("02:00:00:00:00:02", True),
            "enp1s0": ("02:00:00:00:00:01", True),
        },
    )
    assert read_mac(tmp_path)[0] == "enp1s0"
    os.unlink(tmp_path / "class" / "net" / "enp1s0")
    assert read_mac(tmp_path)[0] == "wlan0"
    os.unlink(tmp_path / "class" / "net" / "wlan0")
    assert read_mac(tmp_path)[0] == "usb0"


def test_alphabetical_within_group(tmp_path: Path) -> None:
    make_sysfs(
        tmp_path,
        {"eth1": ("02:00:00:00:00:02", True), "eth0": ("02:00:00:00:00:01", True)},
    )
    assert read_mac(tmp_path) == ("eth0", "02:00:00:00:00:01")


@pytest.mark.parametrize("bad", ["00:00:00:00:00:00", "ff:ff:ff:ff:ff:ff", "garbage"])
def test_skips_zero_broadcast_and_garbage_addresses(tmp_path: Path, bad: str) -> None:
    make_sysfs(tmp_path, {"eth0": (bad, True), "eth1": ("02:00:00:00:00:09", True)})
    assert read_mac(tmp_path) == ("eth1", "02:00:00:00:00:09")


def test_skips_unreadable_address(tmp_path: Path) -> None:
    make_sysfs(tmp_path, {"eth0": ("02:00:00:00:00:01", True), "eth1": ("02:00:00:00:00:02", True)})
    os.unlink(tmp_path / "class" / "net" / "eth0" / "address")
    assert read_mac(tmp_path)[0] == "eth1"


def test_skips_non_ethernet_type(tmp_path: Path) -> None:
    make_sysfs(
        tmp_path,
        {"can0": ("02:00:00:00:00:01", True), "zz0": ("02:00:00:00:00:02", True)},
        types={"can0": 280},
    )
    assert read_mac(tmp_path)[0] == "zz0"


def test_missing_type_file_is_accepted(tmp_path: Path) -> None:
    make_sysfs(tmp_path, {"eth0": ("02:00:00:00:00:01", True)})
    os.unlink(tmp_path / "class" / "net" / "eth0" / "type")
    assert read_mac(tmp_path)[0] == "eth0"


def test_no_usable_interface_names_path_and_fix(tmp_path: Path) -> None:
    make_sysfs(tmp_path, {"lo": LO, "docker0": ("02:42:ac:11:00:01", False)})
    with pytest.raises(IdentityError) as info:
        read_mac(tmp_path)
    message = str(info.value)
    assert str(tmp_path / "class" / "net") in message
    assert "interface" in message and "config" in message
    assert "docker0: virtual" in message and "lo: loopback" in message


def test_missing_sysfs_is_identity_error(tmp_path: Path) -> None:
    with pytest.raises(IdentityError, match="cannot list"):
        read_mac(tmp_path)


def test_explicit_interface_is_used_even_if_virtual(tmp_path: Path) -> None:
    make_sysfs(tmp_path, {"eth0": ("02:00:00:00:00:01", True), "br0": ("0a-0b-0c-0d-0e-0f", False)})
    assert read_mac(tmp_path, "br0") == ("br0", "0A:0B:0C:0D:0E:0F")


def test_explicit_interface_missing(tmp_path: Path) -> None:
    make_sysfs(tmp_path, {"eth0": ("02:00:00:00:00:01", True)})
    with pytest.raises(IdentityError) as info:
        read_mac(tmp_path, "wlan0")
    assert str(tmp_path / "class" / "net" / "wlan0") in str(info.value)
    assert "interface" in str(info.value)


def test_explicit_interface_with_zero_address(tmp_path: Path) -> None:
    make_sysfs(tmp_path, {"eth0": ("00:00:00:00:00:00", True)})
    with pytest.raises(IdentityError, match="all-zero"):
        read_mac(tmp_path, "eth0")


def test_read_mac_on_this_machine_is_valid_or_explained() -> None:
    try:
        _, mac = read_mac()
    except IdentityError as exc:
        assert "interface" in str(exc)
    else:
        assert len(mac) == 17


def test_board_serial_prefers_device_tree(tmp_path: Path) -> None:
    make_board_files(tmp_path, dt_serial=b"10000000abcdef01\x00", machine_id="m" * 32 + "\n")
    assert board_serial(tmp_path) == "10000000abcdef01"


@pytest.mark.parametrize("dt", [b"\x00", b"0000000000000000\x00", b"  \n"])
def test_board_serial_falls_back_to_machine_id(tmp_path: Path, dt: bytes) -> None:
    make_board_files(tmp_path, dt_serial=dt, machine_id="4b1c0e1a2f9e4d0c8f1e2d3c4b5a6978\n")
    assert board_serial(tmp_path) == "4b1c0e1a2f9e4d0c8f1e2d3c4b5a6978"


def test_board_serial_missing(tmp_path: Path) -> None:
    make_board_files(tmp_path, machine_id="uninitialized\n")
    with pytest.raises(IdentityError, match="machine-id"):
        board_serial(tmp_path)


def test_default_client_id() -> None:
    assert default_client_id("DC:A6:32:01:02:0F") == "dev-dca63201020f"
    assert default_client_id("dc-a6-32-01-02-0f") == "dev-dca63201020f"
    assert CLIENT_ID_RE.match(default_client_id("02:00:00:00:00:01"))
    with pytest.raises(IdentityError):
        default_client_id("ff:ff:ff:ff:ff:ff")
