"""A machine's BMC (admin) and its power: `status` for readers, changes for admins."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Request
from fastapi.responses import JSONResponse
from pydantic import Field, field_validator, model_validator

from divingbell.fleet import lifecycle, power
from divingbell.fleet.api.schemas import Strict
from divingbell.fleet.auth import Admin, Reader
from divingbell.power.bmc import check_address
from divingbell.power.secrets import Credentials

router = APIRouter(prefix="/v1", tags=["power"])
MachineId = Annotated[str, Path(max_length=32, pattern=r"^[A-Za-z0-9_-]+$")]
MAX_CA = 65536


class BmcBody(Strict):
    protocol: Literal["redfish", "ipmi"]
    address: Annotated[str, Field(min_length=1, max_length=512)]
    username: Annotated[str, Field(min_length=1, max_length=128)]
    password: Annotated[str, Field(min_length=1, max_length=256)]
    insecure: bool = False
    """Do not verify the BMC's TLS certificate (Redfish): said in the audit log."""
    ca_pem: Annotated[str, Field(max_length=MAX_CA)] | None = None

    @field_validator("ca_pem")
    @classmethod
    def _pem(cls, value: str | None) -> str | None:
        if value is not None and "-----BEGIN CERTIFICATE-----" not in value:
            raise ValueError("not a PEM certificate")
        return value

    @model_validator(mode="after")
    def _address(self) -> BmcBody:
        try:
            self.address = check_address(self.protocol, self.address)
        except ValueError as exc:
            raise ValueError(f"address: {exc}") from None
        if self.insecure and self.ca_pem:
            raise ValueError("insecure: a CA and insecure exclude each other")
        if self.protocol == "ipmi" and (self.insecure or self.ca_pem):
            raise ValueError("insecure: IPMI has no TLS (ca_pem and insecure are for Redfish)")
        return self


class PowerBody(Strict):
    action: Literal["status", "on", "off", "soft-off", "cycle"]
    boot_once: Literal["pxe", "disk"] | None = None


@router.put("/machines/{machine_id}/bmc")
def put_bmc(machine_id: MachineId, body: BmcBody, request: Request,
            principal: Admin) -> dict[str, Any]:
    """Set the machine's BMC. The credentials are sealed with the service's secrets key and
    never returned; TLS is verified unless `insecure` (or against `ca_pem`)."""
    wanted = power.BmcSettings(body.protocol, body.address,
                               Credentials(body.username, body.password),
                               verify_tls=not body.insecure, ca_pem=body.ca_pem)
    with request.app.state.db.write() as session:
        lifecycle.get_machine(session, machine_id)  # 404 before 503: the request's fault first
        box = power.require_box(request.app.state.secret_box)
        return power.bmc_view(power.set_bmc(session, machine_id, wanted, box,
                                            principal.label))


@router.get("/machines/{machine_id}/bmc")
def get_bmc(machine_id: MachineId, request: Request, _: Reader) -> dict[str, Any]:
    """The BMC's address, protocol and last confirmed power state (never its credentials)."""
    with request.app.state.db.read() as session:
        return power.bmc_view(power.get_bmc(session, machine_id))


@router.delete("/machines/{machine_id}/bmc")
def delete_bmc(machine_id: MachineId, request: Request, principal: Admin) -> dict[str, Any]:
    with request.app.state.db.write() as session:
        power.remove_bmc(session, machine_id, principal.label)
    return {"machine_id": machine_id, "removed": True}


@router.get("/machines/{machine_id}/power")
def get_power(machine_id: MachineId, request: Request, principal: Reader) -> JSONResponse:
    """Ask the BMC now (a confirmed read; serialized with other commands to this BMC)."""
    return _run(request, machine_id, "status", None, principal.label)


@router.post("/machines/{machine_id}/power")
def post_power(machine_id: MachineId, body: PowerBody, request: Request,
               principal: Admin) -> JSONResponse:
    """Power `on` (only from a confirmed off), `off`, `soft-off`, `cycle` (off, confirmed,
    then on, confirmed), or `status`; `boot_once` sets the next boot first. 200 when the BMC
    confirmed the outcome; 502 with the same body when it did not (what was sent, what was
    read, why it stopped). Nothing is sent on a state that is not confirmed."""
    return _run(request, machine_id, body.action, body.boot_once, principal.label)


@router.post("/machines/{machine_id}/reprovision")
def post_reprovision(machine_id: MachineId, request: Request, principal: Admin
                     ) -> JSONResponse:
    """Install an installed (or failed) machine again, as the same machine (id, roles, history
    and reports kept; audited): its credential is revoked and it is `booting`, so its next
    network boot enrols it again and installs. With a BMC, without hands: PXE once, then a
    power cycle (each step confirmed); `power` is null without one. 502 when the BMC did not
    confirm: the machine then reinstalls at its next network boot."""
    app = request.app
    state, outcome = power.reprovision(app.state.db, app.state.settings, app.state.secret_box,
                                       machine_id, principal.label)
    if outcome is None:
        return JSONResponse({"id": machine_id, "state": state, "power": None})
    if outcome.ok:
        return JSONResponse({"id": machine_id, "machine_state": state, "machine_id": machine_id,
                             **outcome.as_dict()})
    return _answer(machine_id, outcome)


def _run(request: Request, machine_id: str, verb: str, boot_once: str | None,
         who: str) -> JSONResponse:
    outcome = power.power(request.app.state.db, request.app.state.settings,
                          request.app.state.secret_box, machine_id, verb, boot_once, who)
    return _answer(machine_id, outcome)


def _answer(machine_id: str, outcome: Any) -> JSONResponse:
    body = {"machine_id": machine_id, **outcome.as_dict()}
    if outcome.ok:
        return JSONResponse(body)
    return JSONResponse({"detail": {"error": "bmc-unconfirmed", "message": outcome.message,
                                    **body}}, status_code=502)
