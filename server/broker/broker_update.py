"""Bring the running broker up to what the files say: rights without a reload where possible.

The sync writes the broker's files first (atomically), then calls ``BrokerUpdater.apply``:

* only device rights changed: the changed devices' ``user`` blocks go to the plugin's
  rights table over the control topic (``BrokerControl.update_rights``), no reload. At
  100,000 devices a reload stalls the broker for 0.3-1 s; a block takes milliseconds.
* a CRL or the configuration changed, the broker's table is not known (first pass, a
  failed request), or more than ``MAX_INCREMENTAL_DEVICES`` devices changed at once: a
  reload (SIGHUP), which re-reads everything, the rights file included.
* cuts: a device whose block now denies everything (its current certificate is revoked)
  is kicked together with its block, at once - before the new CRL is even signed (``then``
  writes it) - and can only reconnect to no rights. Every other cut (a superseded
  certificate, a birth certificate) waits for the reload's event, after the new CRLs: it
  can only reconnect against them.

A failed request leaves a reload pending with its cuts: the next pass re-reads everything
although the files no longer change.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from server.broker.acl_rules import REVOKED_BLOCK
from server.broker.broker_control import BrokerControl
from server.broker.fleet_state import Cuts
from server.broker.mosquitto_conf import BrokerLayout

MAX_INCREMENTAL_DEVICES: Final = 2000
"""More changed devices than this in one pass (a full resync after an outage, a bulk edit):
one reload instead of megabytes of control messages."""

Blocks = Mapping[str, tuple[str, ...]]


def changed_blocks(before: Blocks, after: Blocks) -> dict[str, tuple[str, ...]]:
    """The devices whose block differs (no block any more: ``()``, back to the baseline)."""
    changed = {d: lines for d, lines in after.items() if before.get(d) != lines}
    changed.update({d: () for d in before if d not in after})
    return changed


@dataclass
class Applied:
    """What one ``apply`` did (for the sync's log line)."""

    rights: int = 0
    reload_s: float | None = None
    cut: frozenset[str] = frozenset()
    cut_birth: frozenset[str] = frozenset()
    written: frozenset[Path] = frozenset()
    """What ``then`` wrote."""


class BrokerUpdater:
    """What the broker holds, and the requests that bring it up to date."""

    def __init__(self, layout: BrokerLayout, control: BrokerControl) -> None:
        self.layout = layout
        self.control = control
        self.reloads = 0
        self.rights_updates = 0
        """Control messages that changed device rights without a reload."""
        self.kicked = 0
        self.broker_blocks: Blocks | None = None
        """The user blocks the broker's rights table holds; None: not known (re-read)."""
        self._pending = Cuts()
        self._reload_pending = False

    def require_reload(self) -> None:
        """The next ``apply`` reloads (files may have changed without being reported)."""
        self._reload_pending = True

    def apply(
        self,
        blocks: Blocks,
        changed: frozenset[Path],
        cuts: Cuts,
        then: Callable[[], frozenset[Path]] | None = None,
    ) -> Applied:
        """Bring the broker to ``blocks`` (as just written) and the written files.

        ``then`` writes the rest (the CRLs) after the rights went out and before the
        reload decision; it returns the files it changed."""
        pending = Cuts(self._pending.devices | cuts.devices, self._pending.births | cuts.births)
        self._pending = pending
        known = self.broker_blocks
        acl_changed = self.layout.acl_operational in changed
        diff = changed_blocks(known, blocks) if known is not None else {}
        incremental = known is not None and len(diff) <= MAX_INCREMENTAL_DEVICES
        # The table may not be what the file says (first pass, someone else wrote the file,
        # too many changes for blocks): the reload re-reads it.
        reload = self._reload_pending or bool(changed - {self.layout.acl_operational})
        reload = reload or (acl_changed and not (incremental and diff))
        early = frozenset(
            d for d in pending.devices if incremental and blocks.get(d) == REVOKED_BLOCK
        )
        late = pending.devices - early
        reload = reload or bool(late or pending.births)
        applied = Applied()
        self._reload_pending = True  # until the broker confirmed
        try:
            if incremental and (diff or early):
                self.control.update_rights(diff, kick=early)
                self.rights_updates += bool(diff)
                self.kicked += len(early)
                self._pending = Cuts(late, pending.births)
                applied.rights, applied.cut = len(diff), early
            if then is not None:
                applied.written = then()
                reload = reload or bool(applied.written - {self.layout.acl_operational})
            if reload:
                started = time.monotonic()
                self.control.reload(kick=late, kick_birth=pending.births)
                applied.reload_s = time.monotonic() - started
                self.reloads += 1
                self.kicked += len(late) + len(pending.births)
                applied.cut, applied.cut_birth = applied.cut | late, pending.births
        except BaseException:
            self.broker_blocks = None  # unknown now: the retry reloads
            raise
        self.broker_blocks = blocks
        self._pending, self._reload_pending = Cuts(), False
        return applied
