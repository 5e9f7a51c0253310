"""Network boot routes: /boot.ipxe, /v1/ipxe (one machine's script, by its state) and the
assets under /v1/assets/. The decisions are in fleet/boot.py; this file looks machines up,
records every boot request in the machine's history and issues the short-lived bootstrap
token a discovery boot carries on its kernel command line.

Firmware cannot authenticate, so these routes take no token; they reveal nothing about a
machine but which script it should run, and never a 500 for what a machine sends. What an
anonymous caller can make them store is bounded (docs/security.md): a boot token can only
enrol the machine of its own boot, once; at most `max_pending_boots` are pending (429 beyond);
unused tokens and `booting` rows that never enrolled are purged once they expire; a machine
keeps its last `boot_history_kept` boot requests in its history, and all its state changes.
"""

from __future__ import annotations

import logging
import secrets
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, PlainTextResponse, Response
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from divingbell.fleet import admission, lifecycle, states
from divingbell.fleet.auth import BOOT, TOKEN_PREFIX, format_token, hash_secret, new_secret
from divingbell.fleet.boot import (
    ASSET_PATH,
    BootMachine,
    BootProfileError,
    BootProfiles,
    BootQuery,
    chain_script,
    check_base_url,
    load_profiles,
    machine_script,
    needs_bootstrap_token,
    parse_query,
    retry_script,
)
from divingbell.fleet.errors import ApiError
from divingbell.fleet.models import Lease, Machine, MachineMac, StateChange, Token, utcnow

router = APIRouter(tags=["boot"])
log = logging.getLogger("divingbell.fleet.boot")

BOOT_TOKEN_DESCRIPTION = "network boot (issued by /v1/ipxe)"
IPXE = "text/plain; charset=utf-8"


def _base_url(request: Request) -> str:
    """Where machines reach the service: --public-url, else the address this request came to
    (iPXE sends the Host it connected to)."""
    configured = request.app.state.settings.public_url
    if configured:
        return str(configured)
    return f"{request.url.scheme}://{request.headers.get('host', '')}"


def boot_profiles(request: Request) -> BootProfiles:
    """The profiles, loaded once per app (`divingbell serve` checks the file before it starts;
    an app built with a bad file answers 503 naming the problems, and machines retry)."""
    cached: BootProfiles | None = getattr(request.app.state, "boot_profiles", None)
    if cached is None:
        path = request.app.state.settings.boot_profiles
        try:
            cached = load_profiles(Path(path)) if path else BootProfiles()
        except BootProfileError as exc:
            log.error("boot profiles %s are invalid: %s", path, exc)
            raise ApiError(503, {"error": "boot-profiles-invalid",
                                 "problems": [str(p) for p in exc.problems]}) from None
        request.app.state.boot_profiles = cached
    return cached


@router.get("/boot.ipxe", response_class=PlainTextResponse)
def boot_ipxe(request: Request) -> Response:
    """The entry point to give machines as their DHCP boot file: retries DHCP, then chains to
    /v1/ipxe with the machine's UUID, MAC, host name and serial."""
    try:
        script = chain_script(_base_url(request))
    except ValueError:
        script = ("#!ipxe\necho divingbell: the service cannot tell its own URL; start it with"
                  " --public-url\nexit\n")
    return PlainTextResponse(script, media_type=IPXE)


def _find_machine(session: Session, query: BootQuery) -> Machine | None:
    uuid = query.machine_uuid
    if uuid is None:
        return None
    return session.scalars(select(Machine).where(Machine.uuid == uuid)).first()


def _install_granted(session: Session, machine: Machine, now: datetime) -> bool:
    lease = session.scalars(select(Lease).where(
        Lease.kind == lifecycle.INSTALL, Lease.holder == machine.id,
        Lease.expires_at > now)).first()
    return lease is not None


def _purge_expired_boots(session: Session, now: datetime, ttl_seconds: float) -> None:
    """Expired boot tokens, and `booting` rows created by a boot request that never enrolled
    within a token's lifetime (with their history and boot MAC), are deleted."""
    session.execute(delete(Token).where(Token.role == BOOT, Token.expires_at <= now))
    # Never enrolled: its history holds nothing but boot requests. (discovered_at equal to
    # created_at is not enough: a machine an operator enrolled directly has those equal, and
    # after `fleet reenroll` it is `booting` without a credential too.)
    enrolled_once = select(StateChange.id).where(
        StateChange.machine_id == Machine.id, StateChange.to_state != states.BOOTING).exists()
    stale = select(Machine.id).where(
        Machine.state == states.BOOTING, Machine.credential_hash == "",
        Machine.discovered_at == Machine.created_at,
        Machine.created_at < now - timedelta(seconds=ttl_seconds), ~enrolled_once)
    ids = list(session.scalars(stale.limit(1000)))
    if ids:
        session.execute(delete(StateChange).where(StateChange.machine_id.in_(ids)))
        session.execute(delete(MachineMac).where(MachineMac.machine_id.in_(ids)))
        session.execute(delete(Machine).where(Machine.id.in_(ids)))


def _pending_boot_tokens(session: Session, now: datetime) -> int:
    return session.scalar(select(func.count()).select_from(Token).where(
        Token.role == BOOT, Token.expires_at > now)) or 0


def _issue_boot_token(session: Session, ttl_seconds: float, now: datetime,
                      machine_id: str | None, query: BootQuery) -> str:
    """A boot token for one boot: it can enrol only the machine of this boot (its `booting`
    row, the UUID and MAC this request carried), once, and expires soon."""
    ident, secret = secrets.token_hex(6), new_secret()
    session.add(Token(id=ident, role=BOOT, description=BOOT_TOKEN_DESCRIPTION,
                      secret_hash=hash_secret(secret), created_at=now,
                      expires_at=now + timedelta(seconds=ttl_seconds), machine_id=machine_id,
                      bound_uuid=query.machine_uuid, bound_mac=query.mac))
    return format_token(TOKEN_PREFIX, ident, secret)


def _trim_boot_history(session: Session, machine_id: str, keep: int) -> None:
    """Boot requests are anyone's to make: keep the newest `keep` of them in a machine's
    history, so they can never push its state changes out of view."""
    boots = (StateChange.machine_id == machine_id, StateChange.reason.like("boot request:%"),
             StateChange.from_state == StateChange.to_state)
    cutoff = (select(StateChange.id).where(*boots).order_by(StateChange.id.desc())
              .offset(keep).limit(1).scalar_subquery())
    session.execute(delete(StateChange).where(*boots, StateChange.id <= cutoff))


def _describe(query: BootQuery) -> str:
    parts = [f"{name}={value}" for name, value in
             (("mac", query.mac), ("hostname", query.hostname), ("serial", query.serial),
              ("platform", query.platform))
             if value]
    parts += [f"dropped {text}" for text in query.dropped]
    return ", ".join(parts)


@router.get("/v1/ipxe", response_class=PlainTextResponse)
def ipxe(request: Request, uuid: str | None = None, mac: str | None = None,
         hostname: str | None = None, serial: str | None = None,
         platform: str | None = None) -> Response:
    """The iPXE script for the machine asking, by its state: discovery (unknown, booting,
    discovered, scheduled, failed), install (holding an install grant), local disk (installed
    and after). Every request is recorded in the machine's history, with the platform iPXE
    runs on (pcbios, efi); an unknown machine with a usable UUID or MAC is created in state
    `booting`."""
    settings = request.app.state.settings
    # Taken as any text and reduced by parse_query: a malformed value gets the safe default
    # script, not a 422 that iPXE could only retry.
    given = {"uuid": uuid, "mac": mac, "hostname": hostname, "serial": serial,
             "platform": platform}
    query = parse_query({key: value for key, value in given.items() if value is not None})
    profiles = boot_profiles(request)
    base = _base_url(request)
    now = utcnow()
    with request.app.state.db.write() as session:
        _purge_expired_boots(session, now, settings.boot_token_ttl_seconds)
        machine = _find_machine(session, query)
        view = None
        if machine is not None:
            macs = frozenset(session.scalars(select(MachineMac.mac).where(
                MachineMac.machine_id == machine.id)))
            view = BootMachine(machine.id, machine.state, tuple(machine.roles or ()), macs,
                               machine.state == states.INSTALLING
                               and _install_granted(session, machine, now))
        token = None
        new_id = "m" + secrets.token_hex(6) if machine is None else None
        if needs_bootstrap_token(query, view):
            full = _pending_boot_tokens(session, now) >= settings.max_pending_boots
            if full:
                log.warning("boot: %d boot tokens pending; refusing another (429)",
                            settings.max_pending_boots)
            elif admission.is_new_enrolment(machine) and admission.at_cap(session, settings):
                full = True
                log.warning("boot: %d anonymous enrolments await admission; refusing a boot "
                            "token to a new machine (429)", settings.max_unadmitted)
            if full:
                return PlainTextResponse(
                    retry_script_for(base, profiles.retry_seconds), status_code=429,
                    media_type=IPXE, headers={"Retry-After": str(profiles.retry_seconds)})
            bound = machine.id if machine is not None else (
                new_id if query.machine_uuid is not None else None)
            token = _issue_boot_token(session, settings.boot_token_ttl_seconds, now, bound,
                                      query)
        decision = machine_script(query, view, profiles, base, token)
        seen = _describe(query)
        reason = f"boot request: {decision.reason}" + (f" ({seen})" if seen else "")
        if machine is None and query.machine_uuid is not None:
            assert new_id is not None
            machine = Machine(
                id=new_id, uuid=query.machine_uuid, state=states.BOOTING,
                state_changed_at=now, created_at=now, discovered_at=now, roles=[], pinned=False,
                credential_hash="", hostname=(query.hostname or "").lower(), serial=query.serial,
                interfaces=[{"name": "net0", "mac": query.mac, "addresses": [], "gateway": None,
                             "fqdns": [], "boot": True}] if query.mac else [],
                disks=[], lldp=[])
            session.add(machine)
            session.add(StateChange(machine_id=machine.id, from_state=None,
                                    to_state=states.BOOTING, reason=reason, at=now))
        elif machine is not None and machine.state == states.DECOMMISSIONED \
                and decision.action == "discovery":
            # Booting is how a retired machine comes back: it enrols again from here.
            lifecycle.transition(session, machine, states.BOOTING, reason, now)
        elif machine is not None:
            # A boot of a known machine is history, not a state change (an installed machine
            # that reboots is still installed); anyone can send one, so only the last few
            # are kept.
            session.add(StateChange(machine_id=machine.id, from_state=machine.state,
                                    to_state=machine.state, reason=reason, at=now))
            session.flush()
            _trim_boot_history(session, machine.id, settings.boot_history_kept)
        who = machine.id if machine is not None else "unidentified machine"
    log.info("boot: %s -> %s (%s)", who, decision.action, decision.reason)
    return PlainTextResponse(decision.script, media_type=IPXE)


def retry_script_for(base: str, seconds: int) -> str:
    try:
        return retry_script(check_base_url(base), "too many machines enrolling at once; "
                            "retrying", seconds)
    except ValueError:
        return "#!ipxe\nexit\n"


AssetPath = Annotated[str, PathParam(max_length=1024)]
NAME_MAX = 255


@router.get("/v1/assets/{path:path}")
def asset(path: AssetPath, request: Request) -> Response:
    """A file under `divingbell serve --assets DIR` (kernels, initrds, install hooks)."""
    directory = request.app.state.settings.assets_dir
    if not directory:
        raise ApiError(404, {"error": "no-assets",
                             "message": "the service has no assets: start it with --assets DIR"})
    # The path is checked as text (no "..", no hidden files, no absolute path); symlinks the
    # operator put in the directory are followed.
    target = Path(directory) / path
    parts = path.split("/")
    if any(len(part.encode()) > NAME_MAX for part in parts):  # stat would say ENAMETOOLONG
        raise ApiError(404, {"error": "not-found", "field": "path", "path": path[:200],
                             "message": f"no such asset: a path component is longer than "
                                        f"{NAME_MAX} bytes"})
    if not ASSET_PATH.match(path) or any(part.startswith(".") for part in parts) \
            or not target.is_file():
        raise ApiError(404, {"error": "not-found", "field": "path", "path": path[:200],
                             "message": "no such asset"})
    return FileResponse(target, media_type="application/octet-stream")
