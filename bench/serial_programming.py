"""Programming time per board over a pty paced at 115200 baud, against the line's physical limit.

    python -m bench.serial_programming [--boards 8]

Each board is a factory console thread behind a ``LineProxy`` that forwards at
11,520 B/s in each direction (8N1 at 115200 baud). The physical minimum for one
board is the bytes that crossed the line (both directions: the protocol is
request/response, so they do not overlap) divided by 11,520 B/s, plus the
board's key generation and CSR. Uses ``MONGODB_URI`` or starts secantusd-py.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from agent.birth import Endpoints
from agent.factory import commands as fc
from agent.factory.console import FactoryConsole
from agent.keystore import build_csr
from harness.local_services import MongoWireServer
from server.pki.ca import CertificateAuthority
from server.station.programmer import BoardProgrammer, BoardResult
from server.store.db import Database
from tests.serial_pty import LineFaults, LineProxy, open_port
from tests.simulated_board import make_board_files, make_sysfs

UART_BYTES_PER_S = 11_520.0


@contextmanager
def mongodb(workdir: Path) -> Iterator[str]:
    if os.environ.get("MONGODB_URI"):
        yield os.environ["MONGODB_URI"]
        return
    server = MongoWireServer(workdir / "mongo").start()
    try:
        yield server.uri.rstrip("/") + "/bench_serial"
    finally:
        server.stop()


@contextmanager
def paced_board(workdir: Path, index: int) -> Iterator[LineProxy]:
    root = workdir / f"board{index}"
    root.mkdir()
    mac = f"02:00:00:BE:{index // 256:02X}:{index % 256:02X}"
    make_sysfs(root / "sys", {"eth0": (mac, True)})
    make_board_files(root, machine_id=f"bench-{index}\n")
    console = FactoryConsole(root / "state", sysfs_root=root / "sys", root=root)
    pace = LineFaults(bytes_per_second=UART_BYTES_PER_S)
    with LineProxy(pace, LineFaults(bytes_per_second=UART_BYTES_PER_S)) as proxy:
        port = open_port(proxy.board_path)
        stop = threading.Event()
        thread = threading.Thread(target=console.serve, args=(port, stop), daemon=True)
        thread.start()
        try:
            yield proxy
        finally:
            stop.set()
            thread.join(timeout=5)
            port.close()


def keygen_seconds(rounds: int = 50) -> float:
    started = time.perf_counter()
    for _ in range(rounds):
        build_csr(ec.generate_private_key(ec.SECP256R1()), "dev-bench", "02:00:00:00:00:01")
    return (time.perf_counter() - started) / rounds


def run(boards: int) -> None:
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        uri = stack.enter_context(mongodb(workdir))
        database = Database(uri)
        stack.callback(database.close)
        database.init()
        ca = CertificateAuthority.init(workdir / "ca")
        endpoints = fc.encode(Endpoints("prov", 8883, "mqtt", 8884).to_json())

        def programmer() -> BoardProgrammer:
            return BoardProgrammer(
                ca,
                database,
                client_id_for=lambda mac, _serial: "bench-" + mac.replace(":", "").lower(),
                endpoints_json=endpoints,
                timeout=2.0,
            )

        keygen = keygen_seconds()
        single = stack.enter_context(paced_board(workdir, 0))
        result = programmer().program(single.station_path)
        wire = single.to_board.forwarded + single.to_station.forwarded
        minimum = wire / UART_BYTES_PER_S + keygen
        print(f"one board: {result.result} in {result.duration_s:.3f} s")
        print(
            f"  bytes on the wire {wire}, physical minimum {minimum:.3f} s "
            f"(wire {wire / UART_BYTES_PER_S:.3f} s + keygen {keygen * 1000:.1f} ms)"
        )
        print(f"  ratio measured / minimum = {result.duration_s / minimum:.2f}")

        proxies = [stack.enter_context(paced_board(workdir, i)) for i in range(1, boards + 1)]
        results: list[BoardResult] = [BoardResult("", None, None, None, "failed", 0.0)] * boards

        def one(i: int) -> None:
            results[i] = programmer().program(proxies[i].station_path)

        started = time.perf_counter()
        threads = [threading.Thread(target=one, args=(i,)) for i in range(boards)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - started
        ok = sum(r.ok for r in results)
        print(
            f"{boards} boards in parallel: {ok} ok in {elapsed:.3f} s, "
            f"{boards / elapsed * 3600:.0f} boards/hour per station, "
            f"ratio to one board alone = {elapsed / result.duration_s:.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--boards", type=int, default=8)
    run(parser.parse_args().boards)


if __name__ == "__main__":
    main()
