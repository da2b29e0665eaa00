"""Seeded generators of hostile MQTT payloads for the provisioning server.

Every message is built so that the server must refuse it or answer it without a
database change: garbage, wrong types, oversize and deeply nested JSON, unknown ops
and fields, mutated CSRs and birth certificates, and replays of requests that were
valid once (the used CSR request, which the server answers with the same
certificate; a token request of a device nobody allocated). A near-valid status
message is never generated: an ``online`` would be a legitimate write.
"""

from __future__ import annotations

import base64
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any, Final

from agent import protocol
from agent.protocol import RequestChannel
from bench.hostile_pki import (
    Material,
    cert_variants,
    csr_variants,
    der_pem,
    pem_der,
    same_signed_content,
)
from server.pki.ca import CertificateAuthority

LIMIT: Final = protocol.MAX_PAYLOAD_BYTES
_JUNK: Final = ("", " ", "\x00", "\ud800", "é" * 3, "' OR 1=1 --", "$where", "../../etc/passwd")


class Channel(str, Enum):
    REQUEST = "request"  # provisioning/<id>/request (birth certificate session)
    RENEW = "renew"  # devices/<id>/cert/renew (operational session)
    STATUS = "status"  # devices/<id>/status (operational session)

    @property
    def request_channel(self) -> RequestChannel:
        """How the server sees a request on this topic (status messages are no requests)."""
        return RequestChannel.RENEWAL if self is Channel.RENEW else RequestChannel.PROVISIONING


@dataclass(frozen=True)
class Hostile:
    family: str
    channel: Channel
    payload: bytes
    target: str  # "active" (provisioned device) or "unallocated"


class MessageFactory:
    """``next()`` returns one hostile message; the same seed gives the same sequence."""

    def __init__(self, ca: CertificateAuthority, material: Material, seed: int) -> None:
        self.m = material
        self.rng = random.Random(seed)
        self.csrs = csr_variants(ca, material)
        self.certs = cert_variants(ca, material)
        self.csr_replay = json.dumps(
            {"v": 1, "op": "csr", "token": material.token, "csr": material.csr_pem}
        ).encode()
        self.token_replay = json.dumps(
            {
                "v": 1,
                "op": "token",
                "mac": material.unallocated_mac,
                "cert": material.unallocated_birth_pem,
            }
        ).encode()
        self.families: list[tuple[str, Callable[[], Hostile]]] = [
            ("random-bytes", self.random_bytes),
            ("random-json", self.random_json),
            ("wrong-types", self.wrong_types),
            ("unknown-op", self.unknown_op),
            ("unknown-field", self.unknown_field),
            ("huge-string", self.huge_string),
            ("deep-nesting", self.deep_nesting),
            ("bad-encoding", self.bad_encoding),
            ("csr-mutated", self.csr_mutated),
            ("birth-cert-mutated", self.birth_cert_mutated),
            ("byte-mutated", self.byte_mutated),
            ("replay", self.replay),
            ("renew-confirm", self.renew_confirm),
            ("status-garbage", self.status_garbage),
        ]

    def next(self) -> Hostile:
        _, make = self.rng.choice(self.families)
        return make()

    # --- helpers ----------------------------------------------------------------

    def _channel(self, *choices: Channel) -> Channel:
        return self.rng.choice(choices or tuple(Channel))

    def _junk_value(self) -> Any:
        r = self.rng
        return r.choice(
            [
                None,
                True,
                r.randint(-(2**70), 2**70),
                r.random() * 1e308,
                [],
                {},
                [1, "a"],
                {"$ne": None},
                {"$gt": ""},
                r.choice(_JUNK),
            ]
        )

    def _template(self, channel: Channel) -> dict[str, Any]:
        if channel is Channel.STATUS:
            return {"v": 1, "status": "offline", "ts": "2026-01-01T00:00:00Z"}
        if channel is Channel.RENEW:
            return {"v": 1, "op": "renew", "csr": self.m.csr_pem}
        return {"v": 1, "op": "csr", "token": self.m.token, "csr": self.m.csr_pem}

    def _out(self, family: str, channel: Channel, body: Any, target: str = "active") -> Hostile:
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        return Hostile(family, channel, payload, target)

    # --- families -----------------------------------------------------------------

    def random_bytes(self) -> Hostile:
        size = self.rng.choice([0, 1, 2, 7, 64, 512, 4096, LIMIT, LIMIT + 1])
        return self._out("random-bytes", self._channel(), self.rng.randbytes(size))

    def random_json(self) -> Hostile:
        value = self.rng.choice(
            [[], 1, "s", None, 1.5, [{"v": 1}], {"v": 1}, {"op": "token"}, {}, {"v": 1, "op": None}]
        )
        return self._out("random-json", self._channel(), value)

    def wrong_types(self) -> Hostile:
        channel = self._channel()
        body = self._template(channel)
        name = self.rng.choice(sorted(body))
        body[name] = self._junk_value()
        if channel is Channel.STATUS and name != "v":
            body["ts"] = 12345  # keep it invalid even if the junk happens to be a string
        return self._out("wrong-types", channel, body)

    def unknown_op(self) -> Hostile:
        op = self.rng.choice(
            ["", "TOKEN", "token ", "sign", "revoke", "admin", "renew_confirm", "x" * 5000, 7, None]
        )
        return self._out(
            "unknown-op", self._channel(Channel.REQUEST, Channel.RENEW), {"v": 1, "op": op}
        )

    def unknown_field(self) -> Hostile:
        channel = self._channel()
        body = self._template(channel)
        body[self.rng.choice(["status", "admin", "userId", "crt", "$set", "__proto__", "V"])] = 1
        if channel is Channel.STATUS:
            body["extra"] = True
        return self._out("unknown-field", channel, body)

    def huge_string(self) -> Hostile:
        channel = self._channel()
        body = self._template(channel)
        name = self.rng.choice([k for k in sorted(body) if k != "v"])
        size = self.rng.choice([600, 9000, LIMIT - 200, LIMIT, LIMIT + 1, 4 * LIMIT, 16 * LIMIT])
        body[name] = "A" * size
        if channel is Channel.STATUS:
            body["status"] = "A" * size
        return self._out("huge-string", channel, body)

    def deep_nesting(self) -> Hostile:
        depth = self.rng.choice([100, 1000, 5000, 8000, 10_000, 50_000])
        opener, closer = self.rng.choice([("[", "]"), ('{"a":', "}")])
        nested = opener * depth + "1" + closer * depth
        if self.rng.random() < 0.5:
            text = nested
        else:  # inside an otherwise well-formed message
            text = '{"v":1,"op":"csr","token":' + nested + ',"csr":"x"}'
        return self._out("deep-nesting", self._channel(), text.encode())

    def bad_encoding(self) -> Hostile:
        payload = self.rng.choice(
            [
                b'{"v":1,"op":"token","mac":"\xff\xfe","cert":"x"}',
                b'{"v":1,"op":"csr","token":"\\ud800","csr":"\\udfff"}',
                b'{"v":1,"op":"renew","csr":"\\u0000"}',
                b'{"v":1,"op":"renew-confirm","serial":"\\ud83d"}',
                b'{"v":1,"op":"token","mac":"\\u0041A:BB:CC:DD:EE:FF","cert":"\\ud800"}',
                b"\xef\xbb\xbf{}",
                b'{"v":1,"status":"\\ud800"}',
                b'{"v":NaN,"op":"token"}',
                b'{"v":1e999,"op":"token"}',
                b'{"v":1,"v":2}',
            ]
        )
        return self._out("bad-encoding", self._channel(), payload)

    def _mutated_pem(self, pem: str, label: str) -> str:
        """A mutation that really changes what is signed or breaks the encoding.

        Some bit flips land where a DER parser is lenient (e.g. the BIT STRING's
        unused-bits byte) and leave the signed content and signature intact: that
        certificate is still the genuine one, so it is drawn again.
        """
        for _ in range(20):
            mutated = self._mutate_once(pem, label)
            if not same_signed_content(mutated, pem, label):
                return mutated
        return "-----BEGIN " + label + "-----\n!!!!\n-----END " + label + "-----\n"

    def _mutate_once(self, pem: str, label: str) -> str:
        r = self.rng
        der = bytearray(pem_der(pem))
        how = r.randrange(4)
        if how == 0:
            der[r.randrange(len(der))] ^= 1 << r.randrange(8)
            return der_pem(bytes(der), label)
        if how == 1:
            return der_pem(bytes(der[: r.randrange(len(der))]), label)
        if how == 2:  # cut before the END line: a PEM that lost only its newline is intact
            return pem[: r.randrange(pem.index("-----END"))]
        lines = pem.splitlines()
        lines.insert(r.randrange(1, len(lines)), "!!!!")
        return "\n".join(lines)

    def csr_mutated(self) -> Hostile:
        r = self.rng
        if r.random() < 0.5:
            csr = r.choice(self.csrs)
        else:
            csr = self._mutated_pem(self.m.csr_pem, "CERTIFICATE REQUEST")
        if r.random() < 0.5:
            body = {"v": 1, "op": "renew", "csr": csr}
            return self._out("csr-mutated", Channel.RENEW, body)
        body = {"v": 1, "op": "csr", "token": self.m.token, "csr": csr}
        return self._out("csr-mutated", Channel.REQUEST, body)

    def birth_cert_mutated(self) -> Hostile:
        r = self.rng
        if r.random() < 0.5:
            cert = r.choice(self.certs)
        else:
            cert = self._mutated_pem(self.m.birth_pem, "CERTIFICATE")
        body = {"v": 1, "op": "token", "mac": self.m.mac, "cert": cert}
        return self._out("birth-cert-mutated", Channel.REQUEST, body)

    def byte_mutated(self) -> Hostile:
        """Random byte edits of requests whose every variant is refused or idempotent."""
        r = self.rng
        unallocated = r.random() < 0.5
        data = bytearray(self.token_replay if unallocated else self.csr_replay)
        for _ in range(r.randint(1, 4)):
            pos = r.randrange(len(data))
            edit = r.randrange(3)
            if edit == 0:
                data[pos] = r.randrange(256)
            elif edit == 1:
                del data[pos]
            else:
                data.insert(pos, r.randrange(256))
        target = "unallocated" if unallocated else "active"
        return self._out("byte-mutated", Channel.REQUEST, bytes(data), target)

    def replay(self) -> Hostile:
        if self.rng.random() < 0.5:
            return self._out("replay", Channel.REQUEST, self.token_replay, "unallocated")
        return self._out("replay", Channel.REQUEST, self.csr_replay)

    def renew_confirm(self) -> Hostile:
        serial = self.rng.choice(
            [self.m.serial, "00", "f" * 64, self.rng.randbytes(16).hex(), "-1", "g" * 10]
        )
        signature = self.rng.choice(
            [base64.b64encode(self.rng.randbytes(71)).decode(), "AAAA", "not base64!", "=" * 8]
        )
        body = {"v": 1, "op": "renew-confirm", "serial": serial, "signature": signature}
        return self._out("renew-confirm", Channel.RENEW, body)

    def status_garbage(self) -> Hostile:
        body = self.rng.choice(
            [
                {"v": 1, "status": "ONLINE"},
                {"v": 1, "status": "active"},
                {"v": 2, "status": "online"},
                {"v": "1", "status": "online"},
                {"v": 1, "status": "online", "ts": 5},
                {"v": 1, "status": "online", "ts": "x" * 65},
                {"v": 1, "status": "error"},
                {"v": 1, "status": "error", "error": "e" * 513},
                {"v": 1, "status": "error", "error": 3},
                {"v": 1, "status": "online", "userId": "x"},
                {"v": 1, "status": ["online"]},
                {"status": "online"},
            ]
        )
        return self._out("status-garbage", Channel.STATUS, body)
