"""The factory station against real boards: raw ptys, line proxy, console processes, MongoDB."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from click.testing import CliRunner

from agent.birth import BirthIdentity, Endpoints
from agent.factory import commands as fc
from server.pki.ca import CertificateAuthority
from server.service.device_control import quarantine
from server.station.cli import main as station_main
from server.station.config import StationConfig, load_station_config, write_station_config
from server.station.programmer import BoardProgrammer, BoardResult, Step, StepHook
from server.store.audit import audit
from server.store.db import Database
from server.store.devices import DeviceRepository
from server.store.issuances import IssuanceLedger
from server.store.schema import DEVICES
from tests.serial_pty import LineFaults, LineProxy, open_port
from tests.test_factory_console import BoardFiles, make_board

ENDPOINTS = Endpoints("prov.example", 8883, "mqtt.example", 8884)
REPO = Path(__file__).resolve().parent.parent


class StationKilled(BaseException):
    """Raised from a step hook: the station dies there, as if the PC lost power."""


@pytest.fixture(scope="module")
def factory_ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.init(tmp_path_factory.mktemp("ca") / "ca")


@pytest.fixture
def station_config(
    tmp_path: Path, factory_ca: CertificateAuthority, mongodb_uri: str
) -> StationConfig:
    return StationConfig(
        ca_dir=factory_ca.paths.directory,
        mongodb_uri=mongodb_uri,
        endpoints=ENDPOINTS,
        client_id_pattern="acme-{mac}",
        timeout_s=0.3,
        retries=3,
    )


def programmer(
    config: StationConfig,
    ca: CertificateAuthority,
    database: Database,
    on_step: StepHook | None = None,
) -> BoardProgrammer:
    return BoardProgrammer(
        ca,
        database,
        client_id_for=config.client_id,
        endpoints_json=fc.encode(config.endpoints.to_json()),
        timeout=config.timeout_s,
        retries=config.retries,
        on_step=on_step,
    )


@contextmanager
def board_thread(board: BoardFiles, path: str) -> Iterator[None]:
    port = open_port(path)
    stop = threading.Event()
    thread = threading.Thread(target=board.console().serve, args=(port, stop), daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
        port.close()


def start_console(board: BoardFiles, path: str, log: Path) -> subprocess.Popen[bytes]:
    """The console as a real process; returns once it has opened the port."""
    env = {k: v for k, v in os.environ.items() if k != "PROVISION_AGENT_CONFIG"}
    with log.open("ab") as sink:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "agent.cli",
                "factory-console",
                "--port",
                path,
                *board.cli_args(),
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=sink,
        )
    deadline = time.monotonic() + 15
    marker = log.read_bytes().count(b"event=listening") + 1
    while log.read_bytes().count(b"event=listening") < marker:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"factory console did not start: {log.read_text()}")
        time.sleep(0.02)
    return process


def devices(database: Database) -> list[dict[str, object]]:
    return list(database.collection(DEVICES).find({}, {"_id": 0}))


def assert_converged(result: BoardResult, board: BoardFiles, database: Database) -> None:
    assert result.ok, result
    identity = BirthIdentity.load(board.state_dir)
    assert identity is not None and identity.finalized
    assert identity.client_id == result.client_id == "acme-020000aabb01"
    assert identity.mac == board.mac and identity.endpoints == ENDPOINTS
    records = devices(database)
    assert len(records) == 1
    assert records[0]["macID"] == board.mac and records[0]["clientId"] == result.client_id
    assert records[0]["status"] == "UNALLOCATED" and records[0]["tokenUsed"] is False
    # The birth certificate is in the issuance ledger; one signed for a run that died
    # before the board got it is revoked (superseded), never left loose.
    births = IssuanceLedger(database).history(str(result.client_id))
    current = [r["serial"] for r in births if r["state"] == "current"]
    assert current == [result.certificate_serial] and births[-1]["kind"] == "birth"
    assert all(r["state"] == "superseded" for r in births if r["serial"] not in current)
    assert audit(database).clean


def test_program_then_rerun_converges(
    tmp_path: Path,
    station_config: StationConfig,
    factory_ca: CertificateAuthority,
    database: Database,
) -> None:
    board = make_board(tmp_path / "board")
    with LineProxy() as proxy, board_thread(board, proxy.board_path):
        steps: list[Step] = []
        station = programmer(station_config, factory_ca, database, lambda _p, s: steps.append(s))
        first = station.program(proxy.station_path)
        assert first.result == "programmed" and first.error is None
        assert steps == list(Step)
        assert_converged(first, board, database)
        cert_before = (board.state_dir / "birth" / "cert.pem").read_bytes()
        second = programmer(station_config, factory_ca, database).program(proxy.station_path)
    assert second.result == "already-programmed"
    assert second.certificate_serial == first.certificate_serial
    assert (board.state_dir / "birth" / "cert.pem").read_bytes() == cert_before
    assert_converged(second, board, database)
    # A quarantined birth certificate is not reused: the board must be re-birthed.
    quarantine(database, str(first.client_id), "test")
    with LineProxy() as proxy, board_thread(board, proxy.board_path):
        third = programmer(station_config, factory_ca, database).program(proxy.station_path)
    assert not third.ok and third.error is not None and "revoked" in third.error
    assert "provision-agent reset" in third.error


def test_line_noise_is_survived(
    tmp_path: Path,
    station_config: StationConfig,
    factory_ca: CertificateAuthority,
    database: Database,
) -> None:
    board = make_board(tmp_path / "board")
    to_board = LineFaults(flip={1: 5, 4: 30}, drop={7: 12}, truncate={9: 10})
    to_station = LineFaults(flip={2: 9, 6: 40}, lose={11})
    with LineProxy(to_board, to_station) as proxy, board_thread(board, proxy.board_path):
        proxy.inject(to_board=b"\x00stale bytes\xc0\xdb\x01", to_station=b"\xc0garbage")
        result = programmer(station_config, factory_ca, database).program(proxy.station_path)
    assert_converged(result, board, database)


@pytest.mark.parametrize(
    "kill_after",
    [Step.HELLO, Step.INFO, Step.GEN_KEY, Step.PUT, Step.COMMIT, Step.REGISTER, Step.FINALIZE],
)
def test_board_killed_after_each_step_then_rerun_converges(
    kill_after: Step,
    tmp_path: Path,
    station_config: StationConfig,
    factory_ca: CertificateAuthority,
    database: Database,
) -> None:
    board = make_board(tmp_path / "board")
    log = tmp_path / "console.log"
    with LineProxy() as proxy:
        console = start_console(board, proxy.board_path, log)
        try:

            def kill(_port: str, step: Step) -> None:
                if step is kill_after:
                    console.send_signal(signal.SIGKILL)
                    console.wait()

            first = programmer(station_config, factory_ca, database, kill).program(
                proxy.station_path
            )
            assert first.ok is (kill_after is Step.FINALIZE), first
            # Whatever the board left is all or nothing (load raises on a half identity).
            BirthIdentity.load(board.state_dir)
            console = start_console(board, proxy.board_path, log)
            second = programmer(station_config, factory_ca, database).program(proxy.station_path)
        finally:
            console.kill()
            console.wait()
    assert_converged(second, board, database)


@pytest.mark.parametrize(
    "die_at", [Step.INFO, Step.GEN_KEY, Step.SIGN, Step.PUT, Step.COMMIT, Step.REGISTER]
)
def test_station_killed_at_each_step_then_rerun_converges(
    die_at: Step,
    tmp_path: Path,
    station_config: StationConfig,
    factory_ca: CertificateAuthority,
    database: Database,
) -> None:
    board = make_board(tmp_path / "board")

    def die(_port: str, step: Step) -> None:
        if step is die_at:
            raise StationKilled(step.value)

    with LineProxy() as proxy, board_thread(board, proxy.board_path):
        with pytest.raises(StationKilled):
            programmer(station_config, factory_ca, database, die).program(proxy.station_path)
        result = programmer(station_config, factory_ca, database).program(proxy.station_path)
    assert_converged(result, board, database)


def test_mac_registered_to_another_client_id_writes_nothing(
    tmp_path: Path,
    station_config: StationConfig,
    factory_ca: CertificateAuthority,
    database: Database,
) -> None:
    board = make_board(tmp_path / "board")
    DeviceRepository(database).add(board.mac, "legacy-7")
    with LineProxy() as proxy, board_thread(board, proxy.board_path):
        result = programmer(station_config, factory_ca, database).program(proxy.station_path)
    assert result.result == "failed" and result.step == Step.INFO.value
    assert result.error is not None and "already registered as clientId 'legacy-7'" in result.error
    assert devices(database) == [
        {"macID": board.mac, "clientId": "legacy-7", "status": "UNALLOCATED", "tokenUsed": False}
    ]
    assert board.console().state() is fc.IdentityState.NONE  # no key, no identity


def test_client_id_owned_by_another_mac_writes_nothing(
    tmp_path: Path,
    station_config: StationConfig,
    factory_ca: CertificateAuthority,
    database: Database,
) -> None:
    board = make_board(tmp_path / "board")
    DeviceRepository(database).add("02:00:00:00:99:99", "acme-020000aabb01")
    with LineProxy() as proxy, board_thread(board, proxy.board_path):
        result = programmer(station_config, factory_ca, database).program(proxy.station_path)
    assert not result.ok and result.error is not None
    assert "already belongs to MAC 02:00:00:00:99:99" in result.error
    assert len(devices(database)) == 1
    assert board.console().state() is fc.IdentityState.NONE


def test_silent_board_times_out_with_a_clear_message(
    station_config: StationConfig, factory_ca: CertificateAuthority, database: Database
) -> None:
    with LineProxy(to_board=LineFaults(blackhole=True)) as proxy:
        started = time.monotonic()
        result = programmer(station_config, factory_ca, database).program(proxy.station_path)
        elapsed = time.monotonic() - started
    assert elapsed < 5
    assert result.result == "failed" and result.step == Step.OPEN.value
    assert result.error is not None and "no answer" in result.error
    assert "factory console runs" in result.error
    assert devices(database) == []


def test_cli_program_and_batch_with_reports(
    tmp_path: Path,
    station_config: StationConfig,
    database: Database,
) -> None:
    config_file = tmp_path / "station.toml"
    write_station_config(config_file, station_config)
    assert load_station_config(config_file, env={}) == station_config
    boards = [make_board(tmp_path / f"b{i}", mac=f"02:00:00:AA:BB:0{i}") for i in (1, 2, 3)]
    runner = CliRunner()
    with LineProxy() as one, LineProxy() as two, LineProxy() as three, LineProxy() as silent:
        proxies = [one, two, three]
        with board_thread(boards[0], one.board_path):
            csv_report = tmp_path / "one.csv"
            done = runner.invoke(
                station_main,
                [
                    "program",
                    "--port",
                    one.station_path,
                    "--config",
                    str(config_file),
                    "--report",
                    str(csv_report),
                    "--json",
                ],
            )
            assert done.exit_code == 0, done.output
            rows = json.loads(done.stdout)
            assert rows[0]["result"] == "programmed"
            header, line = csv_report.read_text().splitlines()
            assert header.startswith("port,mac,client_id,certificate_serial,result")
            assert "acme-020000aabb01" in line and ",programmed," in line
        threads = [board_thread(b, p.board_path) for b, p in zip(boards, proxies, strict=True)]
        for context in threads:
            context.__enter__()
        try:
            json_report = tmp_path / "batch.json"
            ports = [p.station_path for p in proxies] + [silent.station_path]
            done = runner.invoke(
                station_main,
                [
                    "batch",
                    "--ports",
                    *ports,
                    "--config",
                    str(config_file),
                    "--report",
                    str(json_report),
                ],
            )
        finally:
            for context in threads:
                context.__exit__(None, None, None)
    assert done.exit_code == 1, done.output
    report = json.loads(json_report.read_text())
    assert [r["result"] for r in report] == [
        "already-programmed",
        "programmed",
        "programmed",
        "failed",
    ]
    assert "3 of 4 boards programmed" in done.stdout
    assert "finalize" in done.stderr  # progress lines
    assert len(devices(database)) == 3
    bad = runner.invoke(station_main, ["program", "--port", "x", "--config", str(tmp_path / "no")])
    assert bad.exit_code == 2 and "cannot read station config" in bad.stderr


def test_second_station_on_the_same_port_is_refused(
    station_config: StationConfig, factory_ca: CertificateAuthority, database: Database
) -> None:
    with LineProxy() as proxy:
        first_station = open_port(proxy.station_path)  # holds the exclusive lock
        try:
            result = programmer(station_config, factory_ca, database).program(proxy.station_path)
        finally:
            first_station.close()
    assert result.result == "failed" and result.error is not None
    assert "another station on this port?" in result.error


# --- real station processes: --watch, Ctrl-C, SIGKILL ------------------------------------------


def station_process(args: list[str], config_file: Path) -> subprocess.Popen[bytes]:
    """``provision-station`` as an operator runs it (Ctrl-C works as in a terminal)."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("MONGODB_URI", "PROVISION_STATION_CONFIG")
    }
    return subprocess.Popen(
        [str(Path(sys.executable).with_name("provision-station")), *args,
         "--config", str(config_file)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO, env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip


def read_stderr_until(
    process: subprocess.Popen[bytes], done: Callable[[str], bool], timeout: float, seen: bytearray
) -> str:
    """Read the process's stderr (into ``seen``) until ``done(text so far)``; fail on timeout."""
    assert process.stderr is not None
    fd = process.stderr.fileno()
    deadline = time.monotonic() + timeout
    while not done(seen.decode(errors="replace")):
        left = deadline - time.monotonic()
        ready, _, _ = select.select([fd], [], [], max(0.0, left))
        chunk = os.read(fd, 4096) if ready else b""
        if not chunk:
            process.kill()
            raise AssertionError(f"station output so far:\n{seen.decode(errors='replace')}")
        seen += chunk
    return seen.decode(errors="replace")


def test_batch_watch_programs_boards_as_they_are_plugged(
    tmp_path: Path, station_config: StationConfig, database: Database
) -> None:
    config_file = tmp_path / "station.toml"
    write_station_config(config_file, station_config)
    dev = tmp_path / "dev"
    dev.mkdir()
    report = tmp_path / "watch.json"
    boards = [make_board(tmp_path / f"b{i}", mac=f"02:00:00:AA:BB:0{i}") for i in (1, 2)]
    with (
        LineProxy() as one,
        LineProxy() as two,
        LineProxy() as unwatched,
        board_thread(boards[0], one.board_path),
        board_thread(boards[1], two.board_path),
    ):
        (dev / "ttyUSB0").symlink_to(one.station_path)
        (dev / "ttyS0").symlink_to(unwatched.station_path)  # not a USB serial port
        args = ["batch", "--watch", "--watch-glob", str(dev / "ttyUSB*"),
                "--watch-glob", str(dev / "ttyACM*"), "--count", "2", "--poll", "0.1",
                "--report", str(report)]  # fmt: skip
        with station_process(args, config_file) as station:
            try:
                seen = bytearray()
                read_stderr_until(station, lambda text: "finalize" in text, 20, seen)
                assert boards[1].console().state() is fc.IdentityState.NONE
                (dev / "ttyACM0").symlink_to(two.station_path)  # the next board is plugged in
                out, err = station.communicate(timeout=30)
            finally:
                if station.poll() is None:
                    station.kill()
    stderr = seen.decode() + err.decode()
    assert station.returncode == 0, stderr
    assert f"{dev}/ttyUSB0: new board" in stderr and f"{dev}/ttyACM0: new board" in stderr
    assert "ttyS0" not in stderr
    rows = json.loads(report.read_text())
    assert [(r["port"], r["result"]) for r in rows] == [
        (str(dev / "ttyUSB0"), "programmed"),
        (str(dev / "ttyACM0"), "programmed"),
    ]
    assert "2 of 2 boards programmed" in out.decode()
    assert sorted(str(d["clientId"]) for d in devices(database)) == [
        "acme-020000aabb01",
        "acme-020000aabb02",
    ]


def test_batch_watch_reprograms_a_replugged_port_and_stops_on_ctrl_c(
    tmp_path: Path, station_config: StationConfig, database: Database
) -> None:
    """The operator swaps boards on one cable, then ends the session with Ctrl-C."""
    config_file = tmp_path / "station.toml"
    write_station_config(config_file, station_config)
    dev = tmp_path / "dev"
    dev.mkdir()
    boards = [make_board(tmp_path / f"b{i}", mac=f"02:00:00:AA:BB:0{i}") for i in (1, 2)]
    port = dev / "ttyUSB3"
    with (
        LineProxy() as one,
        LineProxy() as two,
        board_thread(boards[0], one.board_path),
        board_thread(boards[1], two.board_path),
    ):
        args = ["batch", "--watch", "--watch-glob", str(dev / "ttyUSB*"), "--poll", "0.1"]
        with station_process(args, config_file) as station:
            try:
                seen = bytearray()
                read_stderr_until(station, lambda text: "Ctrl-C to stop" in text, 20, seen)
                port.symlink_to(one.station_path)
                read_stderr_until(station, lambda text: text.count("finalize") == 1, 20, seen)
                port.unlink()  # unplugged ...
                time.sleep(0.5)
                port.symlink_to(two.station_path)  # ... and the next board on the same port
                read_stderr_until(station, lambda text: text.count("finalize") == 2, 20, seen)
                station.send_signal(signal.SIGINT)
                out, err = station.communicate(timeout=30)
            finally:
                if station.poll() is None:
                    station.kill()
    assert station.returncode == 0, seen.decode() + err.decode()
    assert "2 of 2 boards programmed" in out.decode()
    assert len(devices(database)) == 2
    for board in boards:
        assert board.console().state() is fc.IdentityState.FINALIZED


def test_wrong_baud_rate_fails_clearly_and_writes_nothing(
    tmp_path: Path,
    station_config: StationConfig,
    factory_ca: CertificateAuthority,
    database: Database,
) -> None:
    board = make_board(tmp_path / "board")
    # Each side samples the other's bits at the wrong rate: both directions are garbled.
    with (
        LineProxy(LineFaults(garble=True), LineFaults(garble=True)) as proxy,
        board_thread(board, proxy.board_path),
    ):
        station = BoardProgrammer(
            factory_ca,
            database,
            client_id_for=station_config.client_id,
            endpoints_json=fc.encode(station_config.endpoints.to_json()),
            timeout=station_config.timeout_s,
            retries=station_config.retries,
            baud=9600,  # the station's side of the mistake
        )
        started = time.monotonic()
        result = station.program(proxy.station_path)
        elapsed = time.monotonic() - started
    assert elapsed < 5
    assert result.result == "failed" and result.step == Step.OPEN.value, result
    assert result.error is not None
    assert "baud rate (expected 115200, the port is at 9600)" in result.error
    assert devices(database) == []
    assert board.console().state() is fc.IdentityState.NONE
    assert not board.state_dir.exists() or list(board.state_dir.iterdir()) == []


@pytest.mark.parametrize("kill_after", [Step.GEN_KEY, Step.PUT, Step.COMMIT, Step.REGISTER])
def test_station_process_sigkilled_after_a_step_then_rerun_converges(
    kill_after: Step,
    tmp_path: Path,
    station_config: StationConfig,
    factory_ca: CertificateAuthority,
    database: Database,
) -> None:
    """SIGKILL the real `provision-station program` once its progress shows ``kill_after``."""
    config_file = tmp_path / "station.toml"
    write_station_config(config_file, station_config)
    board = make_board(tmp_path / "board")
    # Line latency: the station cannot finish the next serial exchange before the kill lands.
    slow = LineFaults(latency=0.05)
    with LineProxy(slow, LineFaults(latency=0.05)) as proxy, board_thread(board, proxy.board_path):
        args = ["program", "--port", proxy.station_path]
        with station_process(args, config_file) as station:
            seen = bytearray()
            marker = f"]  {kill_after.value}\n"
            read_stderr_until(station, lambda text: marker in text, 30, seen)
            station.send_signal(signal.SIGKILL)
            _, err = station.communicate(timeout=10)
        assert station.returncode == -signal.SIGKILL
        assert "finalize" not in seen.decode() + err.decode()
        assert board.console().state() is not fc.IdentityState.FINALIZED
        BirthIdentity.load(board.state_dir)  # all or nothing (raises on half an identity)
        assert len(devices(database)) <= 1
        slow.latency = 0.0
        result = programmer(station_config, factory_ca, database).program(proxy.station_path)
    assert_converged(result, board, database)
