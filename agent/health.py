"""Health-check results and their report (``provision-agent doctor``, ``provision-server doctor``).

Each check says pass, warn or fail in one line that tells the reader what to do;
the command exits 1 when any check failed (a warning alone exits 0).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum


class Outcome(str, Enum):
    PASS = "pass"  # noqa: S105 (an outcome, not a password)
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True)
class CheckResult:
    name: str
    outcome: Outcome
    message: str


def passed(name: str, message: str) -> CheckResult:
    return CheckResult(name, Outcome.PASS, message)


def warned(name: str, message: str) -> CheckResult:
    return CheckResult(name, Outcome.WARN, message)


def failed(name: str, message: str) -> CheckResult:
    return CheckResult(name, Outcome.FAIL, message)


def healthy(results: Sequence[CheckResult]) -> bool:
    return all(result.outcome != Outcome.FAIL for result in results)


def render_text(results: Sequence[CheckResult]) -> str:
    """``PASS  name        message``, one line per check, names aligned."""
    width = max((len(result.name) for result in results), default=0)
    return "\n".join(
        f"{result.outcome.value.upper():4}  {result.name:<{width}}  {result.message}"
        for result in results
    )


def render_json(results: Sequence[CheckResult]) -> str:
    return json.dumps(
        {
            "ok": healthy(results),
            "checks": [
                {"name": r.name, "status": r.outcome.value, "message": r.message} for r in results
            ],
        },
        indent=2,
    )
