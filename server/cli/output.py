"""How the CLIs print documents: a table for people, JSON for scripts."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from bson import ObjectId


def jsonable(value: Any) -> Any:
    """BSON values as JSON: ObjectId -> hex string, datetime -> ISO 8601."""
    if isinstance(value, ObjectId):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def to_json(value: Any) -> str:
    return json.dumps(jsonable(value), indent=2, sort_keys=True)


def short_date(value: Any) -> str:
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    return "-" if value is None else str(value)


def table(rows: Sequence[Sequence[str]], headers: Sequence[str]) -> str:
    """A plain fixed-width table (no dependency, readable in a journal or a pipe)."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


DEVICE_HEADERS = ("clientId", "macID", "status", "userId", "certificateSerial", "expires")


def device_row(doc: Mapping[str, Any]) -> list[str]:
    return [
        str(doc.get("clientId", "-")),
        str(doc.get("macID", "-")),
        str(doc.get("status", "-")),
        str(doc.get("userId") or "-"),
        str(doc.get("certificateSerial") or "-"),
        short_date(doc.get("certificateExpiresAt")),
    ]
