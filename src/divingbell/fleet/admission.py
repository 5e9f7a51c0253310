"""Admission: the cap on anonymous enrolments no operator has vouched for yet.

A machine is *unadmitted* when it enrolled with a boot token (anonymously, from a network boot),
no operator accepted its host name, and it is not decommissioned, whatever its state (posting
an install result does not take it out of the count). At most `max_unadmitted` of them exist:
beyond that, `/v1/ipxe` issues no boot token to an unknown machine and `POST /v1/discovery`
with a boot token for a new machine answers 429. Machines enrolled with an operator's token never
count; enrolled machines keep working at the cap. An operator admits machines by accepting their
host names (`divingbell fleet accept ID`, or every one at once with `--all-unadmitted`)."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import ColumnElement, and_, func, select
from sqlalchemy.orm import Session

from divingbell.fleet import lifecycle, states
from divingbell.fleet.api.schemas import check_hostname
from divingbell.fleet.auth import BOOT, Principal
from divingbell.fleet.errors import ApiError
from divingbell.fleet.models import Machine, StateChange, utcnow
from divingbell.fleet.settings import FleetSettings

BY_BOOT_TOKEN = "boot"
BY_OPERATOR = "operator"

UNADMITTED: ColumnElement[bool] = and_(
    Machine.enrolled_with == BY_BOOT_TOKEN, Machine.hostname_accepted.is_(False),
    Machine.state != states.DECOMMISSIONED)
"""Read through the index ix_machines_unadmitted (migration 0007)."""


def count_unadmitted(session: Session) -> int:
    return int(session.scalar(select(func.count()).select_from(Machine).where(UNADMITTED)) or 0)


def is_new_enrolment(machine: Machine | None) -> bool:
    """Whether enrolling this machine would add one to the count: one never enrolled (or
    decommissioned since). A machine an operator re-opened with `fleet reenroll` is not new."""
    return machine is None or machine.enrolled_with is None


def at_cap(session: Session, settings: FleetSettings) -> bool:
    return count_unadmitted(session) >= settings.max_unadmitted


def cap_message(settings: FleetSettings) -> str:
    return (f"{settings.max_unadmitted} machines enrolled anonymously are waiting for an operator "
            "to admit them (serve --max-unadmitted): admit them with `divingbell fleet accept "
            "--all-unadmitted` (or `fleet accept ID`), decommission the ones that are not yours, "
            "or raise --max-unadmitted")


def check_room(session: Session, uuid: str, settings: FleetSettings,
               principal: Principal) -> None:
    """Before an enrolment: a boot token enrolling a new machine at the cap gets 429 (under the
    scheduler's lock, so replicas enrolling at once cannot pass the cap together)."""
    if principal.kind != "token" or principal.role != BOOT:
        return
    lifecycle.lock_scheduler(session)
    machine = session.scalars(select(Machine).where(Machine.uuid == uuid)).first()
    if is_new_enrolment(machine) and at_cap(session, settings):
        raise ApiError(429, {"error": "too-many-unadmitted", "field": "max_unadmitted",
                             "limit": settings.max_unadmitted, "message": cap_message(settings)},
                       headers={"Retry-After": "60"})


@dataclass(frozen=True)
class Refusal:
    machine_id: str
    hostname: str
    reason: str


@dataclass(frozen=True)
class BulkAcceptance:
    accepted: list[dict[str, str]]
    refused: list[Refusal]


def accept_all_unadmitted(session: Session, who: str) -> BulkAcceptance:
    """Accept the claimed host name of every unadmitted machine whose name is valid and free
    (in the order the machines were first seen: the first claimer of a name gets it); one audit
    event with the count. The others are reported with why."""
    lifecycle.lock_scheduler(session)
    # Names are unique among active machines when claimed; this also covers rows older
    # than that rule.
    candidates = session.scalars(select(Machine).where(UNADMITTED).order_by(
        Machine.created_at, Machine.id)).all()
    waiting = {machine.id for machine in candidates}
    taken = {hostname for ident, hostname in session.execute(
        select(Machine.id, Machine.hostname).where(
            Machine.hostname != "", Machine.state.not_in(lifecycle.ACTIVE_EXCLUDED)))
        if ident not in waiting}
    now = utcnow()
    accepted: list[dict[str, str]] = []
    refused: list[Refusal] = []
    for machine in candidates:
        reason = _refusal(machine, taken)
        if reason is not None:
            refused.append(Refusal(machine.id, machine.hostname, reason))
            continue
        taken.add(machine.hostname)
        machine.hostname_accepted = True
        accepted.append({"id": machine.id, "hostname": machine.hostname})
        session.add(StateChange(machine_id=machine.id, from_state=machine.state,
                                to_state=machine.state,
                                reason=f"hostname {machine.hostname} accepted by {who} "
                                       "(all unadmitted)", at=now))
    lifecycle.audit(session, who, "accept-unadmitted", "machines",
                    f"{len(accepted)} accepted, {len(refused)} refused")
    session.flush()
    return BulkAcceptance(accepted, refused)


def _refusal(machine: Machine, taken: set[str]) -> str | None:
    if machine.state in lifecycle.ACTIVE_EXCLUDED:
        return f"{machine.state}: accept its name once it enrolled"
    if not machine.hostname:
        return "claimed no hostname: accept it with `fleet accept ID --hostname NAME`"
    try:
        check_hostname(machine.hostname)
    except ValueError as exc:
        return f"hostname: {exc}"
    if machine.hostname in taken:
        return f"hostname {machine.hostname} is already another active machine's"
    return None
