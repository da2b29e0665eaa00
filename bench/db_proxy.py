"""A TCP proxy that adds a fixed round-trip time: the database as if it were remote.

``python -m bench.db_proxy --listen-port P --target 127.0.0.1:27017 --rtt-ms 20`` forwards
every connection to the target and delays each direction by half the round trip, keeping
the byte order, with no bandwidth limit: every database command then costs at least one
network round trip, as with a managed MongoDB in another availability zone (Atlas: about
1-2 ms in-region, 20 ms or more across regions). It runs as its own process, so its event
loop does not share an interpreter lock with the benchmark's device threads.
``LatencyProxy`` starts and stops it for the benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path
from types import TracebackType
from typing import Final

from harness.local_services import free_port, wait_for_port

READY_TIMEOUT_S: Final = 10.0
CHUNK: Final = 256 * 1024


async def _forward(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float
) -> None:
    """Copy ``reader`` to ``writer``, each chunk delivered ``delay`` seconds after it arrived."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def deliver() -> None:
        while True:
            due, data = await queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                with contextlib.suppress(OSError):
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    sender = asyncio.create_task(deliver())
    try:
        while True:
            data = await reader.read(CHUNK)
            queue.put_nowait((loop.time() + delay, data))
            if not data:
                break
        await sender
    except (ConnectionError, OSError):
        sender.cancel()
    finally:
        writer.close()


async def _serve(listen_port: int, host: str, port: int, rtt_s: float) -> None:
    half = rtt_s / 2

    async def connection(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(host, port)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(
            _forward(client_r, server_w, half),
            _forward(server_r, client_w, half),
            return_exceptions=True,
        )

    server = await asyncio.start_server(connection, "127.0.0.1", listen_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with server:
        await stop.wait()


def proxied_uri(uri: str, port: int) -> str:
    """``uri`` pointed at the proxy on 127.0.0.1:``port`` (database and options kept).

    ``directConnection=true``: a server that announces itself as a replica-set member
    (secantusdb does) would otherwise be reached at its own address, past the proxy.
    """
    parts = urllib.parse.urlsplit(uri)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@127.0.0.1:{port}" if userinfo else f"127.0.0.1:{port}"
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    query = [(k, v) for k, v in query if k.lower() != "directconnection"]
    query.append(("directConnection", "true"))
    return urllib.parse.urlunsplit(
        parts._replace(netloc=netloc, query=urllib.parse.urlencode(query))
    )


class LatencyProxy:
    """``python -m bench.db_proxy`` in front of a single-host MongoDB URI."""

    def __init__(self, target_uri: str, rtt_ms: float, log_path: Path) -> None:
        parts = urllib.parse.urlsplit(target_uri)
        if parts.hostname is None or "," in parts.netloc or parts.scheme != "mongodb":
            raise ValueError(f"--db-rtt-ms needs a single-host mongodb:// URI, not {target_uri!r}")
        self.target = (parts.hostname, parts.port or 27017)
        self.rtt_ms = rtt_ms
        self.port = free_port()
        self.uri = proxied_uri(target_uri, self.port)
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> LatencyProxy:
        argv = [
            sys.executable, "-m", "bench.db_proxy", "--listen-port", str(self.port),
            "--target", f"{self.target[0]}:{self.target[1]}", "--rtt-ms", str(self.rtt_ms),
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        wait_for_port(self.port, READY_TIMEOUT_S, self.process)
        return self

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None

    def __enter__(self) -> LatencyProxy:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.db_proxy", description=__doc__)
    parser.add_argument("--listen-port", type=int, required=True)
    parser.add_argument("--target", required=True, help="HOST:PORT of the database")
    parser.add_argument("--rtt-ms", type=float, required=True, help="round trip added, ms")
    args = parser.parse_args(argv)
    host, _, port = args.target.rpartition(":")
    if not host or not port.isdigit() or args.rtt_ms < 0:
        parser.error("--target must be HOST:PORT and --rtt-ms at least 0")
    started = time.strftime("%H:%M:%S")
    print(f"{started} proxy 127.0.0.1:{args.listen_port} -> {args.target}, +{args.rtt_ms} ms RTT")
    asyncio.run(_serve(args.listen_port, host, int(port), args.rtt_ms / 1000))
    return 0


if __name__ == "__main__":
    sys.exit(main())
