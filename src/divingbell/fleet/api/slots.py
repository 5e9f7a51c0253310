"""Maintenance slots: leases a machine holds while it drains, converges or reboots."""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request

from divingbell.fleet import leases, lifecycle, listing, rescue
from divingbell.fleet import slots as fleet_slots
from divingbell.fleet.api.schemas import SlotClaim, SlotRelease, SlotRenew
from divingbell.fleet.auth import Admin, CurrentPrincipal, Principal, Reader
from divingbell.fleet.errors import ApiError
from divingbell.fleet.models import utcnow
from divingbell.fleet.settings import FleetSettings

router = APIRouter(prefix="/v1/slots", tags=["slots"])
log = logging.getLogger("divingbell.fleet")
Group = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
Index = Annotated[int, Path(ge=0, le=999)]


def _may_hold(principal: Principal, holder: str) -> None:
    """A machine acts only for itself; an admin for anyone."""
    if principal.role == "admin" or (principal.kind == "machine" and principal.id == holder):
        return
    raise ApiError(403, {"error": "forbidden", "field": "holder",
                         "message": "a machine may only claim, renew or release its own slots"})


@router.post("/claim")
def claim(body: SlotClaim, request: Request, principal: CurrentPrincipal) -> dict[str, Any]:
    """Take one of the slots of `group` for `ttl_seconds` (capped by the service). How many
    slots a group has is the service's to say: the claimer's served document
    (`maintenance.reboot.concurrency`), else the fleet's `slot_concurrency`; the `slots`
    field is ignored. Claiming again while holding one renews and returns it; a holder has one
    slot at a time (409 `holds-another-slot`); an expired slot is taken over
    (`taken_over_from`)."""
    _may_hold(principal, body.holder)
    settings: FleetSettings = request.app.state.settings
    ttl = fleet_slots.capped_ttl(body.ttl_seconds, settings)
    with request.app.state.db.write() as session:
        # One slot per holder is read-then-claim: claims serialise (replicas included) on the
        # scheduler's lock, or two claims of different groups at once would both find none.
        lifecycle.lock_scheduler(session)
        count = fleet_slots.slot_count(session, body.holder, settings)
        result = leases.claim(session, lifecycle.SLOT, body.group, count, body.holder, ttl,
                              utcnow(), one_per_holder=True)
        if isinstance(result, leases.Busy):
            raise ApiError(409, {"error": "no-free-slot", "slots": count,
                                 "holders": [listing.lease_dict(h) for h in result.holders]})
        if isinstance(result, leases.HoldsAnother):
            raise ApiError(409, {"error": "holds-another-slot", "field": "group",
                                 "slot": result.held.name,
                                 "message": f"{body.holder} already holds slot "
                                            f"{result.held.name}: release it first"})
        if result.taken_over_from:
            log.warning("slot %s taken over from %s (expired) by %s", result.name,
                        result.taken_over_from, result.holder)
        return {**listing.lease_dict(result), "taken_over_from": result.taken_over_from}


@router.post("/{group}/{index}/renew")
def renew(group: Group, index: Index, body: SlotRenew, request: Request,
          principal: CurrentPrincipal) -> dict[str, Any]:
    _may_hold(principal, body.holder)
    with request.app.state.db.write() as session:
        held = leases.renew(session, lifecycle.SLOT, group, index, body.holder,
                            fleet_slots.capped_ttl(body.ttl_seconds,
                                                   request.app.state.settings), utcnow())
        if held is None:
            raise ApiError(409, {"error": "not-holder", "field": "holder",
                                 "message": f"{body.holder} does not hold slot {group}/{index}"})
        rescue.heard(session, body.holder, body.rebooting, utcnow())
        return listing.lease_dict(held)


@router.post("/{group}/{index}/release")
def release(group: Group, index: Index, body: SlotRelease, request: Request,
            principal: CurrentPrincipal) -> dict[str, Any]:
    _may_hold(principal, body.holder)
    with request.app.state.db.write() as session:
        if not leases.release(session, lifecycle.SLOT, group, index, body.holder):
            raise ApiError(409, {"error": "not-holder", "field": "holder",
                                 "message": f"{body.holder} does not hold slot {group}/{index}"})
        rescue.released(session, body.holder)
        return {"slot": f"{group}/{index}", "released": True}


@router.get("")
def list_slots(request: Request, _: Reader) -> list[dict[str, Any]]:
    now = utcnow()
    with request.app.state.db.read() as session:
        return [{**listing.lease_dict(lease),
                 "live": lease.expires_at is not None and lease.expires_at > now}
                for lease in leases.holders(session, lifecycle.SLOT) if lease.holder is not None]


@router.delete("/{group}/{index}")
def force_release(group: Group, index: Index, request: Request, principal: Admin
                  ) -> dict[str, Any]:
    with request.app.state.db.write() as session:
        holder = next((lease.holder for lease in leases.holders(session, lifecycle.SLOT, group)
                       if lease.index == index), None)
        released = leases.release(session, lifecycle.SLOT, group, index, None)
        if released:
            rescue.released(session, holder)
            lifecycle.audit(session, principal.label, "force-release", f"slot {group}/{index}")
    if not released:
        raise ApiError(404, {"error": "not-held", "message": f"slot {group}/{index} is free"})
    log.warning("slot %s/%s force-released by %s", group, index, principal.label)
    return {"slot": f"{group}/{index}", "released": True}
