"""Reach a broker listener the way the agent would, for ``provision-agent doctor``.

Three steps, each one line of the report: the name resolves, the port answers, and a
TLS handshake verifies the broker against the configured CA while presenting the
board's certificate. Nothing is sent over MQTT.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from agent.health import CheckResult, failed, passed

# TLS 1.3 reports a refused client certificate only after the handshake: how long to
# wait for that alert (the broker, waiting for CONNECT, sends nothing otherwise).
REFUSAL_WAIT_S = 0.3


@dataclass(frozen=True)
class Listener:
    name: str  # "provisioning" or "operational"
    host: str
    port: int
    ca_file: Path
    cert: Path | None = None  # what the board presents; None: verify the broker only
    key: Path | None = None
    cert_label: str = ""


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
            refusal = _refused_after_handshake(tls)
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


def _refused_after_handshake(tls: ssl.SSLSocket) -> str | None:
    """The broker's alert after a TLS 1.3 handshake, or None when it waits for CONNECT."""
    tls.settimeout(REFUSAL_WAIT_S)
    try:
        data = tls.recv(1)
    except TimeoutError:
        return None
    except ssl.SSLError as exc:
        return exc.reason or str(exc)
    except OSError as exc:
        return exc.strerror or str(exc)
    return None if data else "connection closed"
