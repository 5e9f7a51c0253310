"""Bootstrap over HTTP: join scripts, design validation, node labels (as Promenade serves them).

The rules live in `divingbell.bootstrap.service`; this router parses HTTP, checks who calls,
finds the fleet's machine for a join script, and turns a service reply into a response.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from sqlalchemy import select

from divingbell.fleet import lifecycle, scheduler
from divingbell.fleet.auth import Admin, CurrentPrincipal, Principal, Reader
from divingbell.fleet.errors import ApiError
from divingbell.fleet.models import Machine
from divingbell.fleet.settings import FleetSettings

router = APIRouter(prefix="/v1", tags=["bootstrap"])
MAX_DESIGN_BYTES = 1024 * 1024


def _settings(request: Request) -> FleetSettings:
    settings: FleetSettings = request.app.state.settings
    return settings


def _reply(reply: Any) -> Response:
    if reply.status >= 400:
        raise ApiError(reply.status, reply.body["detail"])
    if reply.media_type == "application/json":
        return JSONResponse(reply.body, status_code=reply.status)
    return Response(reply.body, status_code=reply.status, media_type=reply.media_type)


@router.get("/join-scripts", response_class=Response, responses={200: {
    "content": {"text/x-shellscript": {"schema": {"type": "string"}}},
    "description": "The node's self-contained join script"}})
def join_scripts(
    request: Request, principal: CurrentPrincipal,
    hostname: Annotated[str, Query(max_length=253, description="the node's name")] = "",
    ip: Annotated[str, Query(max_length=64, description="the node's address")] = "",
    role: Annotated[str | None, Query(max_length=63, description=(
        "the design role, for a host the design does not list and the fleet has no role "
        "for"))] = None,
    static: Annotated[list[str], Query(alias="labels.static", description=(
        "KEY=VALUE, repeated: kubelet --node-labels"))] = [],  # noqa: B006
    dynamic: Annotated[list[str], Query(alias="labels.dynamic", description=(
        "KEY=VALUE, repeated: applied through the API once Ready"))] = [],  # noqa: B006
) -> Response:
    """The join script for a host, built from the current design. A machine the fleet knows
    (by hostname) gets its fleet role, and that role's labels. 400 with the reasons for a
    hostname or IP that conflicts with the design.

    A join script holds the node's private keys: only an admin may ask for any host's; a
    machine's own credential gets only its own, for its accepted hostname and one of its
    addresses, with its fleet role. Anyone else is refused (403), before anything is built."""
    from divingbell.bootstrap.service import FleetMachine, join_script

    _may_get_join_script(request, principal, hostname, ip, role)
    settings = _settings(request)
    if not settings.bootstrap_design or not settings.bootstrap_pki:
        raise ApiError(404, {"error": "bootstrap-not-configured", "message": (
            "this fleet service has no bootstrap design and PKI (serve --bootstrap-design, "
            "--bootstrap-pki)")})

    def fleet_machine(name: str) -> FleetMachine | None:
        with request.app.state.db.read() as session:
            # Only a name an operator accepted: a claimed one is the machine's own word.
            machine = session.execute(select(Machine).where(
                Machine.hostname == name, Machine.hostname_accepted.is_(True),
                Machine.state.not_in(lifecycle.ACTIVE_EXCLUDED)).limit(1)).scalar_one_or_none()
            if machine is None:
                return None
            roles = [str(r) for r in machine.roles or []]
            return FleetMachine(roles[0] if roles else None,
                                scheduler.node_labels(roles, machine.rack))

    return _reply(join_script([Path(p) for p in settings.bootstrap_design],
                              Path(settings.bootstrap_pki), hostname=hostname, ip=ip,
                              static=static, dynamic=dynamic, role=role, machine=fleet_machine))


def _may_get_join_script(request: Request, principal: Principal, hostname: str, ip: str,
                         role: str | None) -> None:
    if principal.role == "admin":
        return
    if principal.kind != "machine":
        raise ApiError(403, {"error": "forbidden", "message": (
            "join scripts hold node keys: an admin token, or the machine's own credential")})
    with request.app.state.db.read() as session:
        machine = session.get(Machine, principal.id)
        if machine is None:
            raise ApiError(403, {"error": "forbidden", "message": "unknown machine"})
        addresses = {str(a.get("address")) for i in machine.interfaces or []
                     for a in i.get("addresses") or []}
        problem = None
        if role is not None:
            problem = ("role", "a machine gets its fleet role; only an admin names one")
        elif not machine.hostname_accepted or hostname != machine.hostname:
            problem = ("hostname", f"machine {machine.id} may fetch only the join script of its "
                                   "own accepted hostname"
                                   + ("" if machine.hostname_accepted else
                                      " (none accepted yet: divingbell fleet accept)"))
        elif ip not in addresses:
            problem = ("ip", f"{ip or '(none)'} is not an address machine {machine.id} reported")
    if problem is not None:
        raise ApiError(403, {"error": "forbidden", "field": problem[0], "message": problem[1]})


@router.post("/designs/validate", openapi_extra={"requestBody": {
    "required": True,
    "content": {"application/yaml": {"schema": {"type": "string"}},
                "text/plain": {"schema": {"type": "string"}}}}})
async def validate_design(request: Request, _: Reader) -> Response:
    """Every problem in a design (YAML body), with its path and line: 200 `{"status":
    "Success"}` when valid, 422 with `problems` when not."""
    from divingbell.bootstrap.service import validate_design as validate

    data = await request.body()
    if len(data) > MAX_DESIGN_BYTES:
        raise ApiError(413, {"error": "too-large", "field": "body",
                             "message": f"designs are limited to {MAX_DESIGN_BYTES} bytes"})
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise ApiError(422, {"error": "invalid-body", "field": "body",
                             "message": "the design must be UTF-8 YAML text"}) from None
    return _reply(await run_in_threadpool(validate, text))


@router.put("/nodes/{name}/labels")
async def put_node_labels(
    request: Request, _: Admin,
    name: Annotated[str, PathParam(max_length=253, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")],
) -> Response:
    """Make `{"labels": {...}}` the Node's labels through the Kubernetes API. Labels not named
    are removed, except under kubernetes.io/ and k8s.io/ (never removed). 404 for an unknown
    node."""
    from divingbell.bootstrap.service import put_labels

    try:
        body = json.loads(await request.body() or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(422, {"error": "invalid-body", "field": "body",
                             "message": 'expected JSON: {"labels": {"key": "value"}}'}) from None
    api = _kube(request)
    return _reply(await run_in_threadpool(put_labels, api, name, body))


def _kube(request: Request) -> Any:
    api = getattr(request.app.state, "kube", None)
    if api is None:
        from divingbell.kube import LightkubeApi

        settings = _settings(request)
        try:
            api = LightkubeApi(settings.kubeconfig, server=settings.kube_server)
        except Exception as exc:  # lightkube's config errors share no public base
            raise ApiError(404, {"error": "kubernetes-not-configured", "message": (
                f"no Kubernetes API credentials ({type(exc).__name__}): serve --kubeconfig")}
                ) from None
        request.app.state.kube = api
    return api
