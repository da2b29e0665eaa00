"""``scripts/board-vm.sh``: a real Debian board in qemu, programmed over its UART, to ACTIVE.

The board is the cached Debian 12 image with the agent .deb installed
(harness/board_image.py), booted with systemd as PID 1 (harness/qemu_board.py).
The backend runs on the host on loopback ports: the MongoDB-wire server (or
``MONGODB_URI``), Mosquitto with generated TLS, ``provision-server run``.

1. Factory: the image's marker starts provision-factory-console.service on
   the second UART; ``provision-station program --port <qemu pty>`` (a real
   station process) programs it. Power is cut at the station's ``gen_key``
   and ``commit`` steps first; the next boot and station run converge.
2. Field: marker removed, reboot. The agent runs under the shipped unit,
   waits while UNALLOCATED, is allocated, and power is cut when the database
   shows PROVISIONING and again at PROVISIONED; the next boot reaches ACTIVE.
3. A clean reboot comes back ACTIVE with the same certificate.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Final

import click

from agent.birth import Endpoints
from harness import board_checks as checks
from harness.board_backend import BoardBackend, deployed_backend, host_backend
from harness.board_image import ARCHES, BROKER_HOSTNAME, cache_root, ensure_image
from harness.qemu_board import Forward, QemuBoard
from server.errors import ServerError
from server.station.config import StationConfig, write_station_config
from server.store.certificates import CertificateRecords
from server.store.devices import DeviceRepository, utcnow
from server.store.users import UserRepository

REPO: Final = Path(__file__).resolve().parent.parent
GUEST_PORTS: Final = (8883, 8884)  # what the station writes on the board
FACTORY_CUTS: Final = ("gen_key", "commit")
FIELD_CUTS: Final = ("PROVISIONING", "PROVISIONED")
BOOT_TIMEOUT_S: Final = 600.0
KEEP_RUNS: Final = 5  # run directories (disk overlay, logs, backend) kept for a look afterwards


def say(text: str) -> None:
    click.echo(f"board-vm: {text}", err=True)


def built_deb(package: str, arch: str, built: set[str]) -> Path:
    """``dist/<package>_*_<arch>.deb`` from ``scripts/build-debs.sh --arch ARCH`` (once per run).

    Always built: a package left in dist/ by an older checkout would boot old code.
    """
    if arch not in built:
        build = ["bash", str(REPO / "scripts/build-debs.sh"), "--arch", arch, "--no-lintian"]
        subprocess.run(build, check=True)
        built.add(arch)
    pattern = f"{package}_*_{arch}.deb"
    debs = sorted((REPO / "dist").glob(pattern), key=os.path.getmtime)
    if not debs:
        raise ServerError(f"scripts/build-debs.sh wrote no dist/{pattern}")
    return debs[-1]


def host_arch() -> str:
    return subprocess.run(
        ["dpkg", "--print-architecture"], capture_output=True, text=True, check=True
    ).stdout.strip()


class Scenario:
    """One run: backend, board, and the timings it measured."""

    def __init__(self, backend: BoardBackend, board: QemuBoard, workdir: Path) -> None:
        self.backend = backend
        self.board = board
        self.workdir = workdir
        self.devices = DeviceRepository(backend.database)
        self.certificates = CertificateRecords(backend.database)
        self.client_id = "board-" + board.mac.replace(":", "").lower()
        self.times: dict[str, float] = {}
        self.powered_on_utc = utcnow()
        self.station_config = workdir / "station.toml"
        write_station_config(
            self.station_config,
            StationConfig(
                ca_dir=backend.ca_dir,
                mongodb_uri=backend.mongodb_uri,
                endpoints=Endpoints(
                    BROKER_HOSTNAME, GUEST_PORTS[0], BROKER_HOSTNAME, GUEST_PORTS[1]
                ),
                client_id_pattern="board-{mac}",
                ca_passphrase_file=backend.passphrase_file,
            ),
        )

    def boot(self) -> float:
        self.powered_on_utc = utcnow()
        self.board.power_on()
        seconds = self.board.wait_booted(BOOT_TIMEOUT_S)
        self.times.setdefault("first_boot_s", seconds)
        say(f"boot {self.board.boots}: systemd up in {seconds:.1f} s")
        return seconds

    def station(self, cut_at: str | None) -> subprocess.Popen[str]:
        port = self.board.factory_pty
        assert port is not None
        argv = [str(Path(sys.executable).with_name("provision-station")), "program",
                "--port", port, "--config", str(self.station_config)]  # fmt: skip
        if cut_at is None:
            argv.append("--json")
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def factory(self, cuts: tuple[str, ...]) -> None:
        for step in cuts:
            self.boot()
            checks.check_factory_console(self.board.guest(), self.board.image.arch.factory_port)
            station = self.station(step)
            assert station.stderr is not None
            seen = []
            for line in station.stderr:
                seen.append(line.rstrip())
                if line.rstrip().endswith(f"]  {step}"):
                    self.board.power_cut()
                    break
            else:
                raise ServerError(f"station never reached {step}: {seen}")
            station.communicate(timeout=120)
            say(f"power cut at the station's {step} step (station exit {station.returncode})")
        self.boot()
        guest = self.board.guest()
        checks.check_factory_console(guest, self.board.image.arch.factory_port)
        started = time.monotonic()
        station = self.station(None)
        out, err = station.communicate(timeout=300)
        if station.returncode != 0:
            raise ServerError(
                f"provision-station program failed ({station.returncode}): {out}{err}"
            )
        self.times["station_s"] = time.monotonic() - started
        result = json.loads(out)[0]
        mac = checks.guest_mac(guest)
        doc = self.devices.find(self.client_id)
        if doc["status"] != "UNALLOCATED" or doc["macID"].upper() != mac:
            raise ServerError(
                f"after the station: {doc['status']} {doc['macID']} (guest MAC {mac})"
            )
        birth = guest.check(f"find {checks.STATE_DIR} -type f | sort")
        say(
            f"factory: {self.client_id} {result['result']} over the UART in "
            f"{result['duration_s']} s, certificate {result['certificate_serial']}, UNALLOCATED"
        )
        say(f"birth identity in the guest: {' '.join(birth.split())}")
        guest.check(f"rm {checks.CONFIG_DIR}/factory-mode")
        self.board.shutdown()

    def wait_status(self, wanted: set[str], timeout: float) -> str:
        """Poll the database; ACTIVE counts only when seen since this boot's power-on."""
        deadline = time.monotonic() + timeout
        while True:
            doc = self.devices.find(self.client_id)
            fresh = doc.get("lastSeenAt", self.powered_on_utc) > self.powered_on_utc
            if doc["status"] in wanted and (doc["status"] != "ACTIVE" or fresh):
                return str(doc["status"])
            if not self.board.running:
                raise ServerError(f"the board powered off while {doc['status']}")
            if time.monotonic() > deadline:
                guest = self.board.guest()
                raise ServerError(
                    f"{self.client_id} is {doc['status']}, not {wanted}, after {timeout:.0f} s\n"
                    f"{checks.diagnostics(guest)}"
                )
            time.sleep(0.2)

    def field(self, cuts: tuple[str, ...]) -> None:
        self.boot()
        guest = self.board.guest()
        checks.check_shipped_unit(guest)
        checks.wait_journal(guest, checks.AGENT_UNIT, "waiting_for_allocation", 300)
        if self.devices.find(self.client_id)["status"] != "UNALLOCATED":
            raise ServerError("the device left UNALLOCATED before its allocation")
        checks.check_notify(guest, "NEED_TOKEN")
        say("field: agent under the shipped unit waits while UNALLOCATED (READY, STATUS, watchdog)")
        owner = UserRepository(self.backend.database).add("board-vm@example.com", "Board VM")
        self.devices.allocate(self.client_id, str(owner["_id"]))
        for status in cuts:
            reached = self.wait_status({status, "PROVISIONED", "ACTIVE"}, 300)
            self.board.power_cut()
            say(f"power cut with the device {reached} (waited for {status})")
            self.boot()
        self.wait_status({"ACTIVE"}, 300)
        self.times["boot_to_active_s"] = time.monotonic() - self.board.powered_on_at
        guest = self.board.guest()
        checks.check_shipped_unit(guest)
        checks.check_notify(guest, "ACTIVE")
        listing = checks.check_key_files(guest)
        say("key files in the guest:\n  " + "\n  ".join(listing))
        say("provision-agent doctor on the board:\n  " + "\n  ".join(
            checks.check_doctor(guest).splitlines()))  # fmt: skip

    def reboot(self) -> None:
        before = self.certificates.current(self.client_id)
        self.board.shutdown()
        self.boot()
        self.wait_status({"ACTIVE"}, 300)
        self.times["reboot_to_active_s"] = time.monotonic() - self.board.powered_on_at
        after = self.certificates.current(self.client_id)
        if before is None or after is None or before["fingerprint"] != after["fingerprint"]:
            raise ServerError("the reboot provisioned the board again (new certificate)")
        guest = self.board.guest()
        if checks.journal_count(guest, checks.AGENT_UNIT, "state=NEED_TOKEN"):
            raise ServerError("the agent asked for a token again after the reboot")
        say("reboot: ACTIVE again with the same certificate, no token asked")


def _new_run_dir(arch: str, keep: int = KEEP_RUNS) -> Path:
    """A fresh directory under the cache's runs/; only the newest ``keep`` older ones stay."""
    runs = cache_root() / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    old = sorted((p for p in runs.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    for stale in old[: max(0, len(old) - keep)]:
        shutil.rmtree(stale, ignore_errors=True)
    return runs / f"{arch}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"


def _mac() -> str:
    octets = [0x02, 0x42, *(random.randint(0, 255) for _ in range(4))]  # noqa: S311
    return ":".join(f"{o:02x}" for o in octets)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--arch", type=click.Choice(sorted(ARCHES)), default="amd64", show_default=True)
@click.option("--backend", type=click.Choice(["deployed", "host"]), default="deployed",
              show_default=True, help="deployed: docs/server.md Deploy in a Debian 12 "
              "container; host: processes on this machine.")  # fmt: skip
@click.option("--agent-deb", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="Agent package to install (default: scripts/build-debs.sh).")  # fmt: skip
@click.option("--server-deb", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="Server package for --backend deployed (default: built).")  # fmt: skip
@click.option("--power-cuts/--no-power-cuts", default=True, show_default=True,
              help="Cut the power during factory programming and field provisioning.")  # fmt: skip
@click.option("--workdir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Run directory (default: a new one under the cache's runs/).")  # fmt: skip
def main(
    arch: str,
    backend: str,
    agent_deb: Path | None,
    server_deb: Path | None,
    power_cuts: bool,
    workdir: Path | None,
) -> None:
    """Boot a Debian 12 board VM, program it over its UART and see it ACTIVE."""
    started = time.monotonic()
    workdir = (workdir or _new_run_dir(arch)).resolve()
    workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
    services: BoardBackend | None = None
    board: QemuBoard | None = None
    try:
        built_arches: set[str] = set()
        deb = agent_deb or built_deb("provision-agent", arch, built_arches)
        image, build_times = ensure_image(arch, deb, workdir / "image-build.log")
        built = ", ".join(f"{k} {v:.0f} s" for k, v in build_times.items()) or "cached"
        say(f"image {image.directory} ({built})")
        started_backend = time.monotonic()
        if backend == "deployed":
            server = server_deb or built_deb("provision-server", host_arch(), built_arches)
            services = deployed_backend(workdir / "backend", server)
        else:
            services = host_backend(workdir / "backend")
        build_times["backend_s"] = time.monotonic() - started_backend
        say(f"backend ({backend}) up in {build_times['backend_s']:.1f} s, {services.mongodb_uri}")
        forwards = [Forward(GUEST_PORTS[0], services.provisioning_port),
                    Forward(GUEST_PORTS[1], services.operational_port)]  # fmt: skip
        board = QemuBoard(image, workdir / "board", _mac(), forwards)
        board.create_disk()
        run = Scenario(services, board, workdir)
        run.factory(FACTORY_CUTS if power_cuts else ())
        run.field(FIELD_CUTS if power_cuts else ())
        run.reboot()
        board.shutdown()
        times = {**build_times, **run.times, "total_s": time.monotonic() - started}
        (workdir / "times.json").write_text(json.dumps(times, indent=1) + "\n")
        say(" ".join(f"{k}={v:.1f}" for k, v in times.items()))
        click.echo(f"board-vm: {run.client_id} ACTIVE in {run.times['boot_to_active_s']:.1f} s")
    except (ServerError, subprocess.CalledProcessError) as exc:
        say(f"failed: {exc}")
        say(f"logs: {workdir}")
        sys.exit(1)
    finally:
        if board is not None:
            board.kill()
        if services is not None:
            services.stop()


if __name__ == "__main__":
    main(prog_name="scripts/board-vm.sh")
