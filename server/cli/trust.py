"""``provision-server device revoke|reprovision|quarantine|release`` and ``audit``."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import click

from server.cli.output import to_json
from server.cli.state import CliState, config_option, pass_state
from server.config import load_server_config
from server.service import device_control
from server.store.audit import audit
from server.store.operator_actions import OperatorAction, OperatorActionLog

DEVICE_ARG = click.argument("device_ref", metavar="DEVICE")
JSON_OPT = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")


def _record(
    state: CliState, action: OperatorAction, decision: device_control.Decision, **details: str
) -> None:
    """The audit trail (``operator_actions``): only decisions that were carried out."""
    OperatorActionLog(state.database).record(
        action, decision.client_id, state.operator, {"serials": list(decision.serials), **details}
    )


def _result(decision: device_control.Decision, as_json: bool, text: str) -> None:
    if as_json:
        click.echo(to_json({"clientId": decision.client_id, "serials": list(decision.serials),
                            "status": decision.status}))  # fmt: skip
    else:
        click.echo(text)


@click.command("revoke")
@DEVICE_ARG
@click.option("--reason", default="revoked by operator", show_default=True)
@JSON_OPT
@pass_state
def device_revoke(state: CliState, device_ref: str, reason: str, as_json: bool) -> None:
    """Revoke DEVICE's current and pending certificates; the device goes to ERROR.

    The broker refuses the certificates once the running server's ACL/CRL sync has
    applied the change. The device may provision again only after an operator approves
    it (`provision-server device reprovision`).
    """
    decision = device_control.revoke_device(state.database, device_ref, reason)
    _record(state, OperatorAction.REVOKE, decision, reason=reason)
    serials = ", ".join(decision.serials)
    _result(decision, as_json, f"revoked certificate {serials} of {decision.client_id}")


@click.command("reprovision")
@DEVICE_ARG
@config_option("for policy.offline_timeout_s")
@click.option("--force", is_flag=True, help="Approve although the device looks online.")
@JSON_OPT
@pass_state
def device_reprovision(
    state: CliState, device_ref: str, config_path: Path | None, force: bool, as_json: bool
) -> None:
    """Approve DEVICE re-provisioning with its birth certificate (status -> ALLOCATED).

    Needed under the default policy (policy.reprovision = "approval") for a device that
    is PROVISIONED, ACTIVE, OFFLINE or ERROR. The web app does the same by setting the
    device's status to ALLOCATED.
    """
    config = load_server_config(config_path)
    decision = device_control.approve_reprovision(
        state.database,
        device_ref,
        offline_timeout=timedelta(seconds=config.offline_timeout_s),
        force=force,
    )
    _record(state, OperatorAction.REPROVISION_APPROVAL, decision, forced=str(force).lower())
    _result(decision, as_json,
            f"{decision.client_id} may re-provision: status ALLOCATED")  # fmt: skip


@click.command("quarantine")
@DEVICE_ARG
@click.option("--reason", default="quarantined by operator", show_default=True)
@JSON_OPT
@pass_state
def device_quarantine(state: CliState, device_ref: str, reason: str, as_json: bool) -> None:
    """Revoke DEVICE's birth certificate (factory CRL): it can no longer provision.

    The device's operational certificate is untouched (revoke it too with `device
    revoke`). Undo with `device release`; or re-birth the board at the factory
    (docs/factory.md).
    """
    decision = device_control.quarantine(state.database, device_ref, reason)
    _record(state, OperatorAction.QUARANTINE, decision, reason=reason)
    _result(decision, as_json,
            f"quarantined {decision.client_id}: birth certificate "
            f"{', '.join(decision.serials)} revoked")  # fmt: skip


@click.command("release")
@DEVICE_ARG
@JSON_OPT
@pass_state
def device_release(state: CliState, device_ref: str, as_json: bool) -> None:
    """Take DEVICE's quarantined birth certificate off the factory CRL."""
    decision = device_control.release(state.database, device_ref)
    _record(state, OperatorAction.RELEASE, decision)
    _result(decision, as_json,
            f"released {decision.client_id}: birth certificate {decision.serials[0]} "
            "is valid again")  # fmt: skip


@click.command("audit")
@JSON_OPT
@pass_state
def audit_command(state: CliState, as_json: bool) -> None:
    """Check that every certificate the CA signed is current, pending, expired or revoked.

    Exit 1 when any is not, naming each exception on its own line.
    """
    report = audit(state.database)
    if as_json:
        click.echo(to_json(report.to_json()))
    else:
        counts = ", ".join(
            f"{report.outcome[k]} {k}" for k in ("current", "pending", "expired", "on-crl")
        )
        click.echo(f"{report.certificates} certificates in the ledger: {counts}")
        for line in report.exceptions:
            click.echo(f"exception: {line}")
        click.echo("audit clean" if report.clean else f"{len(report.exceptions)} exception(s)")
    if not report.clean:
        click.get_current_context().exit(1)
