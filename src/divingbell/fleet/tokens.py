"""Operator and bootstrap tokens: created, listed and revoked straight in the store (the CLI
does this with `--db`, so the first admin token needs no running service)."""

from __future__ import annotations

import re
import secrets
from datetime import timedelta
from typing import Any

from sqlalchemy import insert, select

from divingbell.fleet.auth import ROLES, TOKEN_PREFIX, format_token, hash_secret, new_secret
from divingbell.fleet.db import Database
from divingbell.fleet.models import Token, iso, utcnow

_DURATION = re.compile(r"^(\d+)([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> timedelta:
    match = _DURATION.match(text.strip())
    if not match or int(match.group(1)) == 0:
        raise ValueError(f"{text!r} is not a duration like 90s, 30m, 1h, 7d or 2w")
    return timedelta(seconds=int(match.group(1)) * _UNITS[match.group(2)])


def create_token(db: Database, role: str, description: str = "",
                 ttl: timedelta | None = None) -> tuple[str, str]:
    """Returns (token id, the token itself: shown once, only its hash is stored)."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}: one of {', '.join(ROLES)}")
    ident = secrets.token_hex(6)
    secret = new_secret()
    now = utcnow()
    with db.write() as session:
        # Only the columns every schema revision has: the first admin token is created
        # before the service (and its migrations) first runs.
        session.execute(insert(Token).values(
            id=ident, role=role, description=description[:200],
            secret_hash=hash_secret(secret), created_at=now,
            expires_at=now + ttl if ttl else None))
    return ident, format_token(TOKEN_PREFIX, ident, secret)


def list_tokens(db: Database) -> list[dict[str, Any]]:
    now = utcnow()
    with db.read() as session:
        rows = session.scalars(select(Token).order_by(Token.created_at)).all()
        return [{"id": t.id, "role": t.role, "description": t.description,
                 "created_at": iso(t.created_at), "expires_at": iso(t.expires_at),
                 "revoked_at": iso(t.revoked_at),
                 "valid": t.revoked_at is None and (t.expires_at is None or t.expires_at > now)}
                for t in rows]


def revoke_token(db: Database, ident: str) -> bool:
    with db.write() as session:
        token = session.get(Token, ident)
        if token is None:
            return False
        if token.revoked_at is None:
            token.revoked_at = utcnow()
        return True
