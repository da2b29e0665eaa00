"""Reduced hostile-input suite (the full one: ``python -m bench.hostile``).

Real Mosquitto, a real ``provision-server run`` process, a real database, a real pty.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent import protocol
from agent.keystore import build_csr
from agent.protocol import ErrorCode, ProtocolError
from bench.churn import churn
from bench.hostile import Services, run_messages
from bench.hostile_mqtt import memory_growth_mb
from bench.hostile_pki import der_pem
from bench.hostile_serial import run_frames
from server.errors import CsrInvalid
from server.pki.ca import CertificateAuthority
from server.pki.csr_policy import CsrPolicy
from server.store.db import Database
from tests.broker_fixture import LocalBroker

SEED = int(os.environ.get("HOSTILE_SEED", random.SystemRandom().randrange(2**32)))


def test_hostile_messages_change_nothing_and_the_server_survives(
    database: Database,
    mongodb_uri: str,
    ca: CertificateAuthority,
    broker: LocalBroker,
    tmp_path: Path,
) -> None:
    print(f"hostile seed: {SEED} (replay with HOSTILE_SEED={SEED})")
    services = Services(database, mongodb_uri, ca, broker.layout, tmp_path)
    report = run_messages(services, seed=SEED, broker_count=8000, direct_count=2000)
    print(report.broker, report.direct.codes, report.direct.seconds)
    assert report.broker.sent + report.direct.sent == 10_000
    assert report.failures() == [], f"seed {SEED}"
    assert_audit_clean(mongodb_uri)
    assert memory_growth_mb(report.broker.rss_samples) < 20


# --- regressions the hostile run found ------------------------------------------------


def _der_with(pem: bytes, old: bytes, new: bytes) -> str:
    der = x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER)
    assert old in der
    return der_pem(der.replace(old, new, 1), "CERTIFICATE REQUEST")


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (bytes.fromhex("06072a8648ce3d0201"), bytes.fromhex("06072a8648ce3d0001")),  # key OID
        (b"\x03\x42\x00\x04", b"\x03\x42\x00\x07"),  # point encoding
        (b"\x02\x01\x00", b"\x02\x01\x04"),  # CSR version 4 (InvalidVersion)
    ],
)
def test_mangled_csr_is_csr_invalid_not_a_crash(old: bytes, new: bytes) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    mangled = _der_with(build_csr(key, "dev-1", "02:00:00:00:00:01"), old, new)
    with pytest.raises(CsrInvalid):
        CsrPolicy().check(mangled, client_id="dev-1", mac="02:00:00:00:00:01")


@pytest.mark.parametrize(
    "payload",
    [
        b'{"v":1,"op":"csr","token":"\\ud800","csr":"x"}',
        b'{"v":1,"op":"renew-confirm","serial":"\\udfff"}',
    ],
)
def test_unpaired_surrogates_are_bad_requests(payload: bytes) -> None:
    with pytest.raises(ProtocolError) as caught:
        protocol.parse_request(payload)
    assert caught.value.code is ErrorCode.BAD_REQUEST
    with pytest.raises(ProtocolError):
        protocol.parse_status(b'{"v":1,"status":"error","error":"\\ud800"}')


def test_mutated_serial_frames_never_kill_the_console(tmp_path: Path) -> None:
    print(f"hostile seed: {SEED}")
    outcome = run_frames(tmp_path, 5000, SEED)
    assert outcome.sent == 5000 and outcome.bytes_answered > 0
    assert outcome.failures() == [], f"seed {SEED}"


def test_churn_ends_with_every_status_matching_the_connection(
    database: Database,
    mongodb_uri: str,
    ca: CertificateAuthority,
    broker: LocalBroker,
    tmp_path: Path,
) -> None:
    print(f"churn seed: {SEED}")
    outcome = churn(
        database, mongodb_uri, ca, broker.layout, tmp_path, devices=100, seconds=15, seed=SEED
    )
    print(outcome)
    assert sum(outcome.actions.values()) > 200
    assert {"connect", "clean", "will", "drop"} <= set(outcome.actions)
    assert 0 < outcome.connected_at_end < 100
    assert outcome.failures() == [], f"seed {SEED}"
    assert_audit_clean(mongodb_uri)


def assert_audit_clean(mongodb_uri: str) -> None:
    """`provision-server audit` (the real CLI, as an operator runs it) finds no exception."""
    audit = subprocess.run(
        [str(Path(sys.executable).with_name("provision-server")), "--mongodb-uri", mongodb_uri,
         "audit"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert audit.returncode == 0, audit.stdout + audit.stderr
    assert "audit clean" in audit.stdout
