"""Who is calling: bearer tokens for operators and bootstrap, credentials for machines.

Tokens look like `dbt_<id>_<secret>` and machine credentials `dbm_<machine id>_<secret>`; the
store keeps only SHA-256 of the secret. The secrets are 256 random bits, so a fast hash is as
safe as a slow one here and costs nothing per request. Neither is ever logged: errors say
"invalid token" and name nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Final

from fastapi import Depends, Header, Request
from sqlalchemy import Connection, select

from divingbell.fleet.errors import ApiError
from divingbell.fleet.models import Machine, Token, utcnow

ROLES: Final = ("admin", "reader", "bootstrap")
"""The roles an operator can create a token for (`fleet token create --role`)."""
BOOT: Final = "boot"
"""The role of the token a network boot receives (fleet/api/boot.py): it can enrol the machine
that booted, once, and nothing else. Never created by hand."""
TOKEN_PREFIX, MACHINE_PREFIX = "dbt", "dbm"


@dataclass(frozen=True)
class Principal:
    kind: str  # "token" | "machine"
    id: str  # token id or machine id (never the secret)
    role: str  # admin | reader | bootstrap | machine

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.id}"


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def format_token(prefix: str, ident: str, secret: str) -> str:
    return f"{prefix}_{ident}_{secret}"


def parse_token(value: str) -> tuple[str, str, str] | None:
    prefix, sep, rest = value.partition("_")
    ident, sep2, secret = rest.partition("_")
    if not (sep and sep2 and ident and secret) or prefix not in (TOKEN_PREFIX, MACHINE_PREFIX):
        return None
    return prefix, ident, secret


def unauthorized(message: str) -> ApiError:
    return ApiError(401, {"error": "unauthorized", "message": message},
                    headers={"WWW-Authenticate": "Bearer"})


SESSION_COOKIE = "divingbell_session"
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def session_principal(request: Request) -> Principal | None:
    """The web UI's session cookie, if valid: the principal of the token that logged in.
    Sets `request.state.csrf` (the session's CSRF token) and `request.state.ui_session`."""
    value = request.cookies.get(SESSION_COOKIE, "")
    session_id, sep, secret = value.partition("_")
    if not sep or not session_id or not secret or len(value) > 256:
        return None
    from divingbell.fleet.models import UiSession

    now = utcnow()
    with request.app.state.db.read() as session:
        row = session.get(UiSession, session_id)
        if (row is None or row.expires_at <= now
                or not hmac.compare_digest(row.secret_hash, hash_secret(secret))):
            return None
        token = session.get(Token, row.token_id)
        if (token is None or token.revoked_at is not None
                or (token.expires_at is not None and token.expires_at <= now)):
            return None
        request.state.csrf = row.csrf
        request.state.ui_session = row.id
        principal = Principal("token", token.id, token.role)
    request.state.principal = principal
    return principal


@dataclass(frozen=True)
class Credentials:
    """A parsed bearer token, not yet checked against the store."""

    prefix: str
    ident: str
    secret: str


def bearer(authorization: Annotated[
        str | None, Header(description="Bearer <token>")] = None) -> Credentials:
    """Parse the Authorization header (no I/O)."""
    if not authorization:
        raise unauthorized("missing Authorization: Bearer <token>")
    scheme, _, value = authorization.partition(" ")
    parsed = parse_token(value.strip()) if scheme.lower() == "bearer" else None
    if parsed is None:
        raise unauthorized("invalid token")
    return Credentials(*parsed)


def verify(connection: Connection, credentials: Credentials) -> Principal:
    """Check credentials against the store, on every request (no cache): a revoked token or
    a revoked credential (decommission, reenroll) stops working at once, on every replica.
    The hot routes call this inside their own transaction; the others through
    `authenticate`."""
    secret_hash = hash_secret(credentials.secret)
    if credentials.prefix == MACHINE_PREFIX:
        stored = connection.execute(select(Machine.credential_hash).where(
            Machine.id == credentials.ident)).scalar()
        # An empty hash is a machine without a credential (booting, decommissioned).
        if not stored or not hmac.compare_digest(stored, secret_hash):
            raise unauthorized("invalid token")
        return Principal("machine", credentials.ident, "machine")
    token = connection.execute(select(
        Token.role, Token.secret_hash, Token.revoked_at, Token.expires_at).where(
        Token.id == credentials.ident)).first()
    if (token is None or token.revoked_at is not None
            or (token.expires_at is not None and token.expires_at <= utcnow())
            or not hmac.compare_digest(token.secret_hash, secret_hash)):
        raise unauthorized("invalid token")
    return Principal("token", credentials.ident, token.role)


def optional_bearer(authorization: Annotated[
        str | None, Header(description="Bearer <token>")] = None) -> Credentials | None:
    """The Authorization header parsed, or None when there is none (a UI session may be)."""
    return None if not authorization else bearer(authorization)


def authenticate(request: Request, credentials: Annotated[
        Credentials | None, Depends(optional_bearer)]) -> Principal:
    """A bearer token, or (without one) the web UI's session cookie; a cookie-authenticated
    request that changes something must also carry the session's CSRF token."""
    if credentials is None:
        if SESSION_COOKIE not in request.cookies:
            raise unauthorized("missing Authorization: Bearer <token>")
        principal = session_principal(request)
        if principal is None:
            raise unauthorized("session expired: log in again")
        if request.method not in _SAFE_METHODS and not hmac.compare_digest(
                request.headers.get("x-csrf-token", ""), request.state.csrf):
            raise ApiError(403, {"error": "csrf", "message": "missing or wrong X-CSRF-Token"})
        return principal
    with request.app.state.db.read_conn() as connection:
        principal = verify(connection, credentials)
    request.state.principal = principal
    return principal


CurrentPrincipal = Annotated[Principal, Depends(authenticate)]

# Which token roles satisfy a required role: admin can do everything a reader or a bootstrap
# token can.
_SATISFIES: Final = {"admin": {"admin"}, "reader": {"admin", "reader"},
                     "bootstrap": {"admin", "bootstrap"}}


def require_role(role: str) -> Callable[[Principal], Principal]:
    if role not in _SATISFIES:
        raise ValueError(f"unknown role {role!r}")

    def dependency(principal: CurrentPrincipal) -> Principal:
        if principal.role not in _SATISFIES[role]:
            raise ApiError(403, {"error": "forbidden", "message": f"needs a {role} token"})
        return principal

    return dependency


def enroller(principal: CurrentPrincipal) -> Principal:
    """Who may call POST /v1/discovery: a boot token (enrols the machine that booted), an
    operator's bootstrap or admin token (enrols a machine without a credential), or a
    machine's own credential (updates its facts). The enrolment rules are in
    lifecycle.discover."""
    if principal.kind == "machine" or principal.role in ("admin", "bootstrap", BOOT):
        return principal
    raise ApiError(403, {"error": "forbidden",
                         "message": "needs a bootstrap, boot or admin token, or the machine's "
                                    "own credential"})


def check_machine_or_admin(principal: Principal, machine_id: str) -> Principal:
    if principal.role == "admin" or (principal.kind == "machine" and principal.id == machine_id):
        return principal
    raise ApiError(403, {"error": "forbidden",
                         "message": "only this machine's credential or an admin token"})


def check_machine_or_reader(principal: Principal, machine_id: str) -> Principal:
    if principal.role in ("admin", "reader") or (
            principal.kind == "machine" and principal.id == machine_id):
        return principal
    raise ApiError(403, {"error": "forbidden",
                         "message": "only this machine's credential or a reader token"})


def machine_or_admin(machine_id: str, principal: CurrentPrincipal) -> Principal:
    """The machine itself (its own credential) or an admin: for writes about one machine."""
    return check_machine_or_admin(principal, machine_id)


def machine_or_reader(machine_id: str, principal: CurrentPrincipal) -> Principal:
    """The machine itself, or a reader or admin token: for reads about one machine."""
    return check_machine_or_reader(principal, machine_id)


Admin = Annotated[Principal, Depends(require_role("admin"))]
Reader = Annotated[Principal, Depends(require_role("reader"))]
Bootstrap = Annotated[Principal, Depends(require_role("bootstrap"))]
Enroller = Annotated[Principal, Depends(enroller)]
MachineOrAdmin = Annotated[Principal, Depends(machine_or_admin)]
MachineOrReader = Annotated[Principal, Depends(machine_or_reader)]
Bearer = Annotated[Credentials, Depends(bearer)]
