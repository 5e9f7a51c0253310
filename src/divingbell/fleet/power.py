"""BMCs and power in the fleet: the store's side of `power/`.

One power command per BMC at a time, on every replica: a `bmc` lease (fleet/leases.py, a
compare-and-set row) named by the machine is held while the BMC is spoken to, outside any
transaction; requests stay `power_min_interval_seconds` apart across commands through the
row's `last_request_at`. Each command is audited with its outcome; the last confirmed state is
kept for the UI and metrics. Credentials are opened only here, only for the request.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from divingbell.fleet import leases, lifecycle
from divingbell.fleet.db import Database
from divingbell.fleet.errors import ApiError, not_found
from divingbell.fleet.models import BmcRow, iso, utcnow
from divingbell.fleet.settings import FleetSettings
from divingbell.power import control
from divingbell.power.bmc import BmcError, Endpoint, connect
from divingbell.power.secrets import Credentials, SecretBox, SecretsError

log = logging.getLogger("divingbell.fleet.power")
LEASE_KIND = "bmc"


@dataclass(frozen=True)
class BmcSettings:
    protocol: str
    address: str
    credentials: Credentials
    verify_tls: bool = True
    ca_pem: str | None = None


def require_box(box: SecretBox | None) -> SecretBox:
    if box is None:
        raise ApiError(503, {"error": "no-secrets-key", "message":
                             "this service has no secrets key for BMC credentials: start it "
                             "with divingbell serve --secrets-key-file FILE"})
    return box


def bmc_view(row: BmcRow) -> dict[str, Any]:
    """What anyone may see of a BMC: never its credentials."""
    return {"machine_id": row.machine_id, "protocol": row.protocol, "address": row.address,
            "verify_tls": row.verify_tls, "ca": row.ca_pem is not None,
            "credentials": "set (encrypted)", "power_state": row.power_state,
            "power_checked_at": iso(row.power_checked_at), "updated_at": iso(row.updated_at),
            "updated_by": row.updated_by}


def get_bmc(session: Session, machine_id: str) -> BmcRow:
    lifecycle.get_machine(session, machine_id)
    row = session.get(BmcRow, machine_id)
    if row is None:
        raise not_found("BMC for machine", machine_id)
    return row


def set_bmc(session: Session, machine_id: str, wanted: BmcSettings, box: SecretBox,
            who: str) -> BmcRow:
    lifecycle.get_machine(session, machine_id)
    row = session.get(BmcRow, machine_id)
    if row is None:
        row = BmcRow(machine_id=machine_id, power_state="unknown")
        session.add(row)
    row.protocol, row.address = wanted.protocol, wanted.address
    row.verify_tls, row.ca_pem = wanted.verify_tls, wanted.ca_pem
    row.sealed_credentials = box.seal(wanted.credentials)
    row.updated_at, row.updated_by = utcnow(), who[:64]
    trust = ("TLS verified with its CA" if wanted.ca_pem else "TLS verified"
             ) if wanted.verify_tls else "TLS NOT verified (insecure)"
    lifecycle.audit(session, who, "bmc", machine_id,
                    f"{wanted.protocol} {wanted.address}; {trust}; credentials replaced")
    return row


def remove_bmc(session: Session, machine_id: str, who: str) -> None:
    session.delete(get_bmc(session, machine_id))
    lifecycle.audit(session, who, "bmc-removed", machine_id)


def lease_ttl(settings: FleetSettings) -> float:
    """Long enough for the longest command (a cycle: two changes, each confirmed) plus the
    reads before it; a replica that dies mid-command frees the BMC after this."""
    reads = 8 * (settings.power_min_interval_seconds + settings.bmc_request_timeout_seconds)
    return 2 * settings.power_timeout_seconds + reads + 60


def policy_of(settings: FleetSettings) -> control.Policy:
    return control.Policy(min_interval=settings.power_min_interval_seconds,
                          confirm_reads=settings.power_confirm_reads,
                          max_reads=max(6, settings.power_confirm_reads + 3),
                          timeout=settings.power_timeout_seconds)


def power(db: Database, settings: FleetSettings, box_or_none: SecretBox | None,
          machine_id: str, verb: str, boot_once: str | None, who: str) -> control.Outcome:
    """Run one power verb against a machine's BMC, holding its lease; audit the outcome."""
    holder = f"{who[:80]}/{secrets.token_hex(4)}"
    now = utcnow()
    with db.write() as session:
        row = get_bmc(session, machine_id)  # 404 (no machine, no BMC) before 503 (no key)
        box = require_box(box_or_none)
        held = leases.claim(session, LEASE_KIND, machine_id, 1, holder, lease_ttl(settings),
                            now)
        if not isinstance(held, leases.Held):
            busy = held.holders[0] if isinstance(held, leases.Busy) and held.holders else None
            raise ApiError(409, {"error": "bmc-busy", "message":
                                 f"another power command is using the BMC of {machine_id}"
                                 + (f" ({busy.holder}, until {iso(busy.expires_at)})"
                                    if busy else "") + "; try again when it is done"})
        endpoint = Endpoint(row.protocol, row.address, row.verify_tls, row.ca_pem,
                            settings.bmc_request_timeout_seconds)
        sealed, last_request = row.sealed_credentials, row.last_request_at
    previous = None
    if last_request is not None:  # the store's wall clock, turned into this process' monotonic
        previous = time.monotonic() - (now - last_request).total_seconds()
    try:
        outcome = _speak(endpoint, box, sealed, verb, boot_once, policy_of(settings), previous)
    finally:
        with db.write() as session:
            leases.release(session, LEASE_KIND, machine_id, 0, holder)
    with db.write() as session:
        row = get_bmc(session, machine_id)
        row.last_request_at = utcnow()
        if outcome.state is not None:
            row.power_state, row.power_checked_at = outcome.state, utcnow()
        elif outcome.actions:
            row.power_state = "unknown"  # something was sent and not confirmed
        lifecycle.audit(session, who, f"power {verb}", machine_id, json.dumps({
            "ok": outcome.ok, "boot_once": boot_once, "sent": outcome.actions,
            "before": outcome.before, "state": outcome.state, "message": outcome.message}))
    log.info("power %s %s by %s: %s", verb, machine_id, who, outcome.message)
    return outcome


def reprovision(db: Database, settings: FleetSettings, box_or_none: SecretBox | None,
                machine_id: str, who: str) -> tuple[str, control.Outcome | None]:
    """Install a machine again, as itself (`lifecycle.reprovision`: its credential revoked, its
    next boot enrols it and installs), then, when it has a BMC, without hands: PXE once and a
    confirmed power cycle. The state changes first: a machine that booted before it would be
    sent to its disk. Without a BMC, or when the BMC does not confirm, the machine installs at
    its next network boot. Returns its state and the power outcome (None without a BMC)."""
    with db.write() as session:
        machine = lifecycle.get_machine(session, machine_id)
        if machine.state not in lifecycle.REPROVISIONABLE:
            raise ApiError(409, {"error": "bad-transition", "message": (
                f"machine {machine.id} is {machine.state}, not installed: only "
                f"{', '.join(sorted(lifecycle.REPROVISIONABLE))} machines can be reprovisioned")})
        has_bmc = session.get(BmcRow, machine_id) is not None
        if has_bmc:
            require_box(box_or_none)
        lifecycle.reprovision(session, machine, who)
        state = machine.state
    if not has_bmc:
        return state, None
    return state, power(db, settings, box_or_none, machine_id, "cycle", "pxe", who)


def _speak(endpoint: Endpoint, box: SecretBox, sealed: str, verb: str, boot_once: str | None,
           policy: control.Policy, previous: float | None) -> control.Outcome:
    try:
        credentials = box.open(sealed)
    except SecretsError as exc:
        return control.Outcome(verb, message=f"{exc}; nothing sent to the BMC")
    try:
        bmc = connect(endpoint, credentials)
    except BmcError as exc:
        return control.Outcome(verb, message=f"{exc}; nothing sent to the BMC",
                               errors=[str(exc)], requests=1)
    try:
        return control.run(bmc, verb, boot_once, policy, previous_request=previous)
    finally:
        bmc.close()


def counts_by_power_state(session: Session) -> dict[str, int]:
    return {state: count for state, count in session.execute(
        select(BmcRow.power_state, func.count()).group_by(BmcRow.power_state))}
