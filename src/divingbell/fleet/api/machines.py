"""Discovery, machines, roles, configuration, reports and the install flow."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Annotated, Any, NamedTuple

from fastapi import APIRouter, Header, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import Connection

from divingbell.fleet import (
    admission,
    documents,
    installs,
    lifecycle,
    listing,
    revisions,
    rollouts,
    states,
    views,
)
from divingbell.fleet.api.schemas import (
    AcceptUnadmittedBody,
    Discovery,
    HostnameBody,
    InstallResult,
    ReportBody,
    RolesBody,
)
from divingbell.fleet.auth import (
    MACHINE_PREFIX,
    Admin,
    Bearer,
    Credentials,
    Enroller,
    MachineOrAdmin,
    MachineOrReader,
    Principal,
    Reader,
)
from divingbell.fleet.db import Database
from divingbell.fleet.errors import ApiError
from divingbell.fleet.models import iso, utcnow
from divingbell.fleet.pgloop import LoopStatement, LoopStore

router = APIRouter(prefix="/v1", tags=["machines"])
log = logging.getLogger("divingbell.fleet")
MachineId = Annotated[str, Path(max_length=32, pattern=r"^[A-Za-z0-9_-]+$")]


@router.post("/discovery", status_code=201)
def discovery(facts: Discovery, request: Request, response: Response,
              principal: Enroller) -> dict[str, Any]:
    """Enrol a machine and issue its credential, once: with the boot token of its own network
    boot (bound to that boot's UUID and MAC, single use), or an operator's bootstrap token.
    A machine already enrolled is updated only with its own credential (`credential` is then
    null: it keeps the one it has); for anyone else it is a 409 `already-enrolled` until an
    operator runs `divingbell fleet reenroll ID`. A MAC or hostname already on another
    machine is a 409 naming both. A boot token enrolling a new machine while
    `--max-unadmitted` anonymous enrolments await an operator's acceptance gets 429."""
    with request.app.state.db.write() as session:
        admission.check_room(session, facts.uuid, request.app.state.settings, principal)
        enrolment = lifecycle.discover(session, facts, request.app.state.settings, principal)
        machine = enrolment.machine
        result = {"machine_id": machine.id, "state": machine.state, "roles": machine.roles,
                  "hostname_accepted": machine.hostname_accepted,
                  "credential": enrolment.credential}
    response.status_code = 201 if enrolment.credential else 200
    return result


@router.get("/machines")
def list_machines(
        request: Request, _: Reader,
        state: Annotated[str | None, Query(max_length=32,
                                           description="only machines in this state")] = None,
        limit: Annotated[int | None, Query(
            ge=1, le=listing.MACHINES_PAGE_MAX,
            description=f"machines per page (at most {listing.MACHINES_PAGE_MAX}; "
                        f"{listing.MACHINES_PAGE} when only `after` is given)")] = None,
        after: Annotated[str | None, Query(
            min_length=1, max_length=200,
            description="the `next` cursor of the previous page")] = None,
) -> list[dict[str, Any]] | dict[str, Any]:
    """Machines in the order they were first seen. With `limit` or `after`, one page:
    `{"machines": [...], "next": cursor}` (`next` is null on the last page). Without either,
    every machine as a bare list, as before pagination (kept for existing clients)."""
    position = None
    if after is not None:
        try:
            position = listing.parse_machine_cursor(after)
        except ValueError:
            raise ApiError(422, {"error": "invalid-cursor", "field": "after",
                                 "message": "after: not a cursor from this service (pass the "
                                            "previous page's `next` as it is)"}) from None
    paged = limit is not None or after is not None
    with request.app.state.db.read() as session:
        active = revisions.active_revision(session)
        page = listing.list_machines(session, state,
                                     (limit or listing.MACHINES_PAGE) if paged else None,
                                     position)
        summaries = [listing.machine_summary(m, active, page.power.get(m.id))
                     for m in page.machines]
    if not paged:
        return summaries
    return {"machines": summaries, "next": page.next}


@router.get("/machines/{machine_id}")
def get_machine(machine_id: MachineId, request: Request, _: MachineOrReader) -> dict[str, Any]:
    with request.app.state.db.read() as session:
        machine = lifecycle.get_machine(session, machine_id)
        return listing.machine_detail(session, machine, revisions.active_revision(session))


@router.put("/machines/{machine_id}/roles")
def put_roles(machine_id: MachineId, body: RolesBody, request: Request,
              principal: Admin) -> dict[str, Any]:
    """Pin roles (`pinned: true`), or set them and let the scheduler keep them (`false`);
    `{"roles": [], "pinned": false}` hands the machine back to the scheduler."""
    with request.app.state.db.write() as session:
        machine = lifecycle.get_machine(session, machine_id)
        lifecycle.set_roles(session, machine, body.roles, body.pinned,
                            request.app.state.settings, principal.label)
        return {"id": machine.id, "roles": machine.roles, "pinned": machine.pinned,
                "state": machine.state}


@router.post("/machines/{machine_id}/decommission")
def decommission(machine_id: MachineId, request: Request, principal: Admin) -> dict[str, Any]:
    """Take a machine out of the fleet: roles, grants and slots released; the scheduler tops
    the control plane up if it was a member."""
    with request.app.state.db.write() as session:
        machine = lifecycle.get_machine(session, machine_id)
        try:
            lifecycle.decommission(session, machine, request.app.state.settings, principal.label)
        except states.TransitionError as exc:
            raise ApiError(409, {"error": "bad-transition", "message": str(exc)}) from None
        return {"id": machine.id, "state": machine.state}


@router.post("/machines/{machine_id}/reenroll")
def reenroll(machine_id: MachineId, request: Request, principal: Admin) -> dict[str, Any]:
    """Let the next network boot of this machine enrol it again (a reinstall, a lost
    credential): its credential is revoked at once, its grants and slots released, and it is
    `booting` until it enrols. Audited."""
    with request.app.state.db.write() as session:
        machine = lifecycle.get_machine(session, machine_id)
        lifecycle.reenroll(session, machine, principal.label)
        return {"id": machine.id, "state": machine.state}


@router.put("/machines/{machine_id}/hostname")
def accept_hostname(machine_id: MachineId, body: HostnameBody, request: Request,
                    principal: Admin) -> dict[str, Any]:
    """Accept a host name for this machine (the one it claimed when `hostname` is omitted):
    from then on it selects the document's host overrides for it and its join script.
    Unique among active machines: a conflict is a 409 naming both."""
    with request.app.state.db.write() as session:
        machine = lifecycle.get_machine(session, machine_id)
        lifecycle.accept_hostname(session, machine, body.hostname, principal.label)
        return {"id": machine.id, "hostname": machine.hostname,
                "hostname_accepted": machine.hostname_accepted}


@router.post("/machines/accept")
def accept_unadmitted(body: AcceptUnadmittedBody, request: Request,
                      principal: Admin) -> dict[str, Any]:
    """Admit machines in bulk: accept the claimed host name of every machine enrolled
    anonymously that no operator accepted yet (`{"all_unadmitted": true}`), when the name is
    valid and free; the others are listed with why. One audit event with the counts. Frees
    room under `--max-unadmitted`."""
    with request.app.state.db.write() as session:
        result = admission.accept_all_unadmitted(session, principal.label)
        return {"accepted": result.accepted,
                "refused": [{"id": r.machine_id, "hostname": r.hostname, "reason": r.reason}
                            for r in result.refused],
                "unadmitted": admission.count_unadmitted(session)}


@router.post("/scheduler/run")
def run_scheduler(request: Request, _: Admin) -> dict[str, Any]:
    """Run a scheduling pass now (it also runs after every discovery and role change)."""
    with request.app.state.db.write() as session:
        return {"assigned": lifecycle.run_scheduler(session, request.app.state.settings)}


def serve_config(db: Database, credentials: Credentials, machine_id: str,
                 if_none_match: str | None) -> tuple[Principal, views.Rendered]:
    """A configuration poll, in one worker thread: credentials, machine and configuration in
    one transaction; a running machine fetching a configuration it has not converged is then
    marked updating. Shared by the route and the hot path (fleet/hotpath.py)."""
    with db.read_conn() as connection:
        principal, machine, active, place = views.authorized_view(
            connection, credentials, machine_id, readers=True)
        masked = principal.kind != "machine" and not documents.sees_secrets(principal)
        rendered = views.render_config(connection, machine, if_none_match, active, place,
                                       masked=masked)
    if (rendered.text is not None and principal.kind == "machine"
            and machine.state in (states.READY, states.DEGRADED)):
        with db.write() as session:
            views.note_config_served(session, lifecycle.get_machine(session, machine_id),
                                     rendered)
    return principal, rendered


def unchanged_config(db: Database, credentials: Credentials, machine_id: str,
                     if_none_match: str | None) -> tuple[Principal, views.Rendered] | None:
    """A machine's own poll answered on the calling thread when its configuration did not
    change (the 304 nearly every poll gets): the credential checked and the machine read in
    one statement, on SQLite only, never waiting for a lock (`Database.nonblocking_read`).
    None when it must go the whole way (`serve_config` in a store thread): another caller,
    PostgreSQL, a configuration to render, or the store busy."""
    if (not db.sqlite or credentials.prefix != MACHINE_PREFIX
            or credentials.ident != machine_id or if_none_match is None):
        return None
    with db.nonblocking_read() as connection:
        if connection is None:
            return None
        principal, machine, active, place = views.authorized_view(
            connection, credentials, machine_id, readers=True)
    rendered = views.unchanged_config(machine, if_none_match, active, place)
    return None if rendered is None else (principal, rendered)


_SELF_VIEW_ON_LOOP = LoopStatement(views.SELF_VIEW)
_at_once_on_loop: dict[tuple[int, bool], LoopStatement] = {}


def _own(credentials: Credentials, machine_id: str) -> bool:
    return credentials.prefix == MACHINE_PREFIX and credentials.ident == machine_id


async def unchanged_config_on_loop(store: LoopStore, credentials: Credentials, machine_id: str,
                                   if_none_match: str | None
                                   ) -> tuple[Principal, views.Rendered] | None:
    """`unchanged_config` on PostgreSQL, from the event loop (fleet/pgloop.py): the machine's
    own poll, one query. None when it must go the whole way (`serve_config`); `Unavailable`
    when the loop's way cannot ask now."""
    if not _own(credentials, machine_id) or if_none_match is None:
        return None
    principal, machine, active, place = views.own_view(
        credentials, await store.first(_SELF_VIEW_ON_LOOP, {"id": machine_id}))
    rendered = views.unchanged_config(machine, if_none_match, active, place)
    return None if rendered is None else (principal, rendered)


async def report_on_loop(store: LoopStore, credentials: Credentials, machine_id: str,
                         body: ReportBody, keep: int) -> tuple[Principal, dict[str, Any]] | None:
    """`store_report` on PostgreSQL, from the event loop (fleet/pgloop.py): the machine's own
    report in two round trips without a transaction. Its view is read (the credential
    checked), then every write goes in one statement on condition that the machine still has
    that credential and state (`views.report_at_once`), so a change in between (a revocation,
    an operator's transition, another report) is never overwritten. None when it must go the
    whole way in a transaction (`store_report`): a revision this process has not seen, a
    report that may settle a rollout turn, a machine changed in between; `Unavailable` when
    the loop's way cannot ask now."""
    if not _own(credentials, machine_id) or keep < 1:
        return None
    row = await store.first(_SELF_VIEW_ON_LOOP, {"id": machine_id})
    principal, machine, active, place = views.own_view(credentials, row)
    assert row is not None  # else own_view raised
    if (not views.revision_known(store.url, body.revision)
            or views.settles_turn(place, body)):
        return None
    effect = views.report_effect(machine, active, place, body, utcnow())
    changes_state = effect.state_change is not None
    statement = _at_once_on_loop.get((keep, changes_state))
    if statement is None:
        statement = _at_once_on_loop[(keep, changes_state)] = LoopStatement(
            views.report_at_once(keep, changes_state))
    params = {"mid": machine_id, "credential_hash": row[0],  # the caller's, own_view checked
              "from_state": machine.state,
              **{f"v_{name}": value for name, value in effect.machine.items()},
              **{f"r_{name}": value for name, value in effect.report.items()}}
    if effect.state_change is not None:
        params.update({f"h_{name}": value for name, value in effect.state_change.items()})
    changed = await store.first(statement, params)
    if changed is None or changed[0] != 1:
        return None
    return principal, report_answer(effect.after, active)


def report_answer(machine: views.View, active: int | None) -> dict[str, Any]:
    """A stored report's answer: the machine's state after it, and whether it is up to date."""
    return {"state": machine.state, "up_to_date": views.up_to_date(machine, active),
            "revision": active}


def config_response(rendered: views.Rendered) -> Response:
    headers = {"ETag": rendered.etag, "X-Divingbell-Revision": str(rendered.revision)}
    if rendered.text is None:
        return Response(status_code=304, headers=headers)
    return Response(rendered.text, media_type="application/yaml", headers=headers)


def store_report(db: Database, credentials: Credentials, machine_id: str, body: ReportBody,
                 keep: int) -> tuple[Principal, dict[str, Any]]:
    """A report, in one worker thread and one write transaction. Shared by the route and the
    hot path (fleet/hotpath.py). (Not in PostgreSQL's pipeline mode: for one report it saves
    round trips but costs more CPU than it saves, 549 against 665 us a report measured.)"""
    with db.write_conn() as connection:
        return _settled(connection, _report_in(connection, credentials, machine_id, body, keep))


class _Stored(NamedTuple):
    """A report written, its rollout step still to come."""

    principal: Principal
    machine: views.View
    active: int | None
    place: rollouts.Membership | None
    body: ReportBody


def _report_in(connection: Connection, credentials: Credentials, machine_id: str,
               body: ReportBody, keep: int) -> _Stored:
    principal, machine, active, place = views.authorized_view(
        connection, credentials, machine_id, readers=False)
    machine = views.add_report(connection, machine, active, place, body, keep,
                               step_rollout=False)
    return _Stored(principal, machine, active, place, body)


def _settled(connection: Connection, stored: _Stored) -> tuple[Principal, dict[str, Any]]:
    """The report's rollout step (outside any pipeline: it reads through the ORM), and the
    answer."""
    machine, active = stored.machine, stored.active
    views.step_rollout_after(connection, machine.id, stored.place, stored.body)
    return stored.principal, report_answer(machine, active)


def _reports_in(connection: Connection, reports: Sequence[Report], keep: int
                ) -> list[_Stored]:
    """Several reports in one transaction. Machines reporting with their own credentials,
    each once, have their views read all at once (`views.own_views`: on PostgreSQL one round
    trip for the batch, and the writes then go with the commit); otherwise one by one."""
    machine_ids = [machine_id for _, machine_id, _ in reports]
    if (len(set(machine_ids)) < len(reports)
            or any(c.prefix != MACHINE_PREFIX or c.ident != machine_id
                   for c, machine_id, _ in reports)):
        return [_report_in(connection, *report, keep) for report in reports]
    stored = []
    for (_, _, body), (principal, before, active, place) in zip(
            reports, views.own_views(connection, [c for c, _, _ in reports]), strict=True):
        machine = views.add_report(connection, before, active, place, body, keep,
                                   step_rollout=False)
        stored.append(_Stored(principal, machine, active, place, body))
    return stored


Report = tuple[Credentials, str, ReportBody]
"""A machine's report waiting for the store: its credentials, the machine id, the body."""


def store_reports(db: Database, reports: Sequence[Report], keep: int
                  ) -> list[tuple[Principal, dict[str, Any]] | Exception]:
    """Reports that arrived together, stored in one write transaction (group commit: one
    commit, one write lock, one thread hand-off for all of them; on PostgreSQL in pipeline
    mode, so a report's writes travel with the next one's read). The answer for each, in
    order: its result or the exception it raised. Each report is committed before its answer
    is given. If any of them fails, the transaction is rolled back and each one is stored on
    its own, so a failing report (a revoked credential, an unknown revision, a deadlock with
    another replica) only fails itself."""
    if len(reports) > 1:
        # Machine order: two replicas' batches then lock machine rows in the same order.
        order = sorted(range(len(reports)), key=lambda index: reports[index][1])
        answers: list[tuple[Principal, dict[str, Any]] | Exception] = [
            Exception("not stored")] * len(reports)
        try:
            with db.write_conn() as connection:
                with db.pipeline(connection):
                    stored = _reports_in(connection, [reports[index] for index in order],
                                         keep)
                for index, one in zip(order, stored, strict=True):
                    answers[index] = _settled(connection, one)
        except Exception as exc:  # each one on its own below says which failed
            log.info("a batch of %d reports failed (%s); storing each on its own",
                     len(reports), type(exc).__name__)
        else:
            return answers
    results: list[tuple[Principal, dict[str, Any]] | Exception] = []
    for credentials, machine_id, body in reports:
        try:
            results.append(store_report(db, credentials, machine_id, body, keep))
        except Exception as exc:  # handed to that report's request
            results.append(exc)
    return results


def serve_configs(db: Database, polls: Sequence[tuple[Credentials, str, str | None]]
                  ) -> list[tuple[Principal, views.Rendered] | Exception]:
    """Configuration polls that arrived together, answered in one thread hand-off, each in
    its own transaction as `serve_config`."""
    results: list[tuple[Principal, views.Rendered] | Exception] = []
    for credentials, machine_id, if_none_match in polls:
        try:
            results.append(serve_config(db, credentials, machine_id, if_none_match))
        except Exception as exc:  # handed to that poll's request
            results.append(exc)
    return results


@router.get("/machines/{machine_id}/config", response_class=Response, responses={
    200: {"content": {"application/yaml": {}}, "description": "the effective document"},
    304: {"description": "not modified"}})
async def get_config(machine_id: MachineId, request: Request, credentials: Bearer,
                     if_none_match: Annotated[str | None, Header(max_length=1024)] = None
                     ) -> Response:
    """The machine's effective configuration: a complete document with no overrides (its
    labels and accepted hostname already applied). `ETag: "<revision>-<digest>"`; send it
    back as `If-None-Match` to get 304 while nothing changed. (That machine's credential, or
    a reader or admin token; a reader sees secrets masked.)"""
    principal, rendered = await run_in_threadpool(
        serve_config, request.app.state.db, credentials, machine_id, if_none_match)
    request.state.principal = principal
    return config_response(rendered)


@router.post("/machines/{machine_id}/reports", status_code=201)
async def post_report(machine_id: MachineId, body: ReportBody, request: Request,
                      credentials: Bearer) -> dict[str, Any]:
    """What the agent applied: revision, outcome, per-module changes and failures, drift.
    (That machine's credential, or an admin token.)"""
    principal, answer = await run_in_threadpool(
        store_report, request.app.state.db, credentials, machine_id, body,
        request.app.state.settings.reports_kept)
    request.state.principal = principal
    return answer


@router.get("/machines/{machine_id}/reports")
def get_reports(machine_id: MachineId, request: Request, _: MachineOrReader
                ) -> list[dict[str, Any]]:
    from sqlalchemy import select

    from divingbell.fleet.models import Report

    with request.app.state.db.read() as session:
        lifecycle.get_machine(session, machine_id)
        rows = session.scalars(select(Report).where(Report.machine_id == machine_id)
                               .order_by(Report.id.desc()))
        return [listing.report_dict(r) for r in rows]


@router.post("/machines/{machine_id}/install/grant")
def install_grant(machine_id: MachineId, request: Request, _: MachineOrAdmin) -> dict[str, Any]:
    """Ask to install. At most K machines hold a grant at once; a grant is a lease that
    expires if no result comes (the machine is then `failed`, and the grant free)."""
    with request.app.state.db.write() as session:
        machine = lifecycle.get_machine(session, machine_id)
        held = installs.grant_install(session, machine, request.app.state.settings)
        return {"granted": True, "grant": held.name, "expires_at": iso(held.expires_at),
                "roles": machine.roles}


@router.post("/machines/{machine_id}/install/result")
def post_install_result(machine_id: MachineId, body: InstallResult, request: Request,
                        _: MachineOrAdmin) -> dict[str, Any]:
    with request.app.state.db.write() as session:
        machine = lifecycle.get_machine(session, machine_id)
        installs.install_result(session, machine, body.success, body.output)
        return {"id": machine.id, "state": machine.state}
