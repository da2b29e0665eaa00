"""Reach a broker listener the way the agent would, for ``provision-agent doctor``.

Three steps, each one line of the report: the name resolves, the port answers, and a
TLS handshake verifies the broker against the configured CA while presenting the
board's certificate. TLS 1.3 reports a refused client certificate only after the
handshake, so the probe then sends one MQTT CONNECT with an empty client id (the
broker assigns one: the agent's own session is never taken over) and waits for the
CONNACK, which proves the certificate was accepted, or for the refusal. It publishes
and subscribes nothing.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from agent.health import CheckResult, failed, passed

# MQTT v5 CONNECT: protocol "MQTT" level 5, clean start, keep-alive 10 s, no properties,
# empty client id; and DISCONNECT (normal).
MQTT_CONNECT: Final = bytes.fromhex("100d00044d5154540502000a000000")
MQTT_DISCONNECT: Final = bytes.fromhex("e000")
CONNACK: Final = 0x20


@dataclass(frozen=True)
class Listener:
    name: str  # "provisioning" or "operational"
    host: str
    port: int
    ca_file: Path
    cert: Path | None = None  # what the board presents; None: verify the broker only
    key: Path | None = None
    cert_label: str = ""
    timeout: float = 3.0


def probe(listener: Listener, config_source: object, timeout: float) -> list[CheckResult]:
    """dns, port and tls results of one listener (stops at the first failing step)."""
    name, host, port = listener.name, listener.host, listener.port
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return [
            failed(
                f"{name}-dns",
                f"cannot resolve {host} ({reason}): check DNS and [broker] {name}_host in "
                f"{config_source or 'the config'}",
            )
        ]
    shown = sorted({str(address[4][0]) for address in addresses})
    results = [passed(f"{name}-dns", f"{host} resolves to {', '.join(shown)}")]
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        results.append(
            failed(
                f"{name}-port",
                f"{host}:{port} does not answer ({exc.strerror or exc}): is the broker up, "
                "and does a firewall let this board through?",
            )
        )
        return results
    results.append(passed(f"{name}-port", f"{host}:{port} accepts connections"))
    results.append(_tls(listener, sock))
    return results


def _tls(listener: Listener, sock: socket.socket) -> CheckResult:
    name, ca_file = f"{listener.name}-tls", listener.ca_file
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file))
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if listener.cert is not None and listener.key is not None:
            context.load_cert_chain(str(listener.cert), str(listener.key))
    except (OSError, ssl.SSLError) as exc:
        sock.close()
        return failed(name, f"cannot load the CA file {ca_file} or the certificate: {exc}")
    try:
        with context.wrap_socket(sock, server_hostname=listener.host) as tls:
            if listener.cert is None:
                return passed(
                    name,
                    f"broker certificate verifies against {ca_file} "
                    "(no operational certificate yet to present)",
                )
            refusal = _connect(tls, listener.timeout)
    except ssl.SSLCertVerificationError as exc:
        return failed(
            name,
            f"the broker's certificate does not verify against {ca_file} "
            f"({exc.verify_message}): check [broker] ca_bundle and the broker's address",
        )
    except (OSError, ssl.SSLError) as exc:
        return failed(name, f"TLS handshake with {listener.host} failed: {exc}")
    if refusal is not None:
        return failed(
            name,
            f"the broker refused the {listener.cert_label} certificate ({refusal}): it may "
            "be revoked or from another CA; ask the operator for the device's history",
        )
    return passed(
        name, f"broker verified against {ca_file}; it accepts the {listener.cert_label} certificate"
    )


def _connect(tls: ssl.SSLSocket, timeout: float) -> str | None:
    """None when the broker answers CONNECT with a CONNACK, else why it did not."""
    tls.settimeout(timeout)
    try:
        tls.sendall(MQTT_CONNECT)
        data = tls.recv(4)
        if data[:1] == bytes([CONNACK]):
            tls.sendall(MQTT_DISCONNECT)
            return None
    except TimeoutError:
        return f"no CONNACK within {timeout:g} s"
    except ssl.SSLError as exc:
        return exc.reason or str(exc)
    except OSError as exc:
        return exc.strerror or str(exc)
    return "connection closed" if not data else f"unexpected answer {data[:4].hex()}"
