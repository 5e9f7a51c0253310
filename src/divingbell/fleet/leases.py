"""Leases: numbered rows (kind, group, index) with a holder and an expiry.

Install grants (kind `install`, group `install`) and maintenance slots (kind `slot`, group
chosen by the caller; count and TTL decided by the service, fleet/slots.py) are both leases.
Claiming is a compare-and-set: read a free or expired row, then `UPDATE ... WHERE holder IS
<what we read> AND expires_at IS <what we read>`; the update succeeds for exactly one claimer
on SQLite (one writer at a time) and on PostgreSQL (the row lock re-evaluates the condition),
so two replicas never hand out one lease twice. Nothing is kept in process memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import and_, delete, select, true, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from divingbell.fleet.models import Lease


@dataclass(frozen=True)
class Held:
    kind: str
    group: str
    index: int
    holder: str
    expires_at: datetime
    taken_over_from: str | None = None

    @property
    def name(self) -> str:
        return f"{self.group}/{self.index}"


@dataclass(frozen=True)
class Busy:
    holders: list[Held]


def _ensure_rows(session: Session, kind: str, group: str, count: int) -> None:
    rows = [{"kind": kind, "group": group, "index": i} for i in range(count)]
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    session.execute(insert(Lease).values(rows).on_conflict_do_nothing())


def holders(session: Session, kind: str, group: str | None = None) -> list[Lease]:
    query = select(Lease).where(Lease.kind == kind)
    if group is not None:
        query = query.where(Lease.group == group)
    return list(session.scalars(query.order_by(Lease.group, Lease.index)))


@dataclass(frozen=True)
class HoldsAnother:
    """The holder already holds a live lease of this kind in another group."""
    held: Held


def claim(session: Session, kind: str, group: str, count: int, holder: str, ttl: float,
          now: datetime, *, one_per_holder: bool = False) -> Held | Busy | HoldsAnother:
    """Take (or keep) one of `count` leases of `group`. Claiming again while holding one
    renews and returns it, whatever `count` says now. With `one_per_holder`, a holder with a
    live lease in another group gets `HoldsAnother` instead of a second one.

    Live leases at or past `count` (the count went down) still count as taken; free rows past
    it are deleted, so rows per group stay at the count."""
    expires = now + timedelta(seconds=ttl)
    owned = list(session.execute(
        select(Lease.group, Lease.index, Lease.expires_at)
        .where(Lease.kind == kind, Lease.holder == holder)
        .where(true() if one_per_holder else Lease.group == group)
        .order_by(Lease.group, Lease.index)))
    for row_group, index, _expires in owned:
        if row_group == group:
            renewed = renew(session, kind, group, index, holder, ttl, now)
            if renewed is not None:
                return renewed
    for row_group, index, row_expires in owned:
        if row_group != group and row_expires is not None and row_expires > now:
            return HoldsAnother(Held(kind, row_group, index, holder, row_expires))
    session.execute(delete(Lease).where(Lease.kind == kind, Lease.group == group,
                                        Lease.index >= count, Lease.holder.is_(None))
                    .execution_options(synchronize_session=False))
    _ensure_rows(session, kind, group, count)
    rows = list(session.execute(
        select(Lease.index, Lease.holder, Lease.expires_at)
        .where(Lease.kind == kind, Lease.group == group)
        .order_by(Lease.index)))
    live = sum(1 for _i, h, e in rows if h is not None and e is not None and e > now)
    for index, row_holder, row_expires in rows if live < count else []:
        free = row_holder is None or row_expires is None or row_expires <= now
        if not free or index >= count:
            continue
        condition = and_(Lease.kind == kind, Lease.group == group, Lease.index == index,
                         Lease.holder.is_(None) if row_holder is None
                         else Lease.holder == row_holder,
                         Lease.expires_at.is_(None) if row_expires is None
                         else Lease.expires_at == row_expires)
        result = session.execute(
            update(Lease).where(condition)
            .values(holder=holder, claimed_at=now, expires_at=expires)
            .execution_options(synchronize_session=False))
        if result.rowcount == 1:  # type: ignore[attr-defined]
            return Held(kind, group, index, holder, expires, row_holder)
    return Busy([Held(kind, group, i, h or "", e or now) for i, h, e in session.execute(
        select(Lease.index, Lease.holder, Lease.expires_at)
        .where(Lease.kind == kind, Lease.group == group, Lease.holder.is_not(None),
               Lease.expires_at > now)
        .order_by(Lease.index))])


def renew(session: Session, kind: str, group: str, index: int, holder: str, ttl: float,
          now: datetime) -> Held | None:
    """Extend a lease its holder still has (even past its expiry, if nobody took it)."""
    expires = now + timedelta(seconds=ttl)
    result = session.execute(
        update(Lease).where(Lease.kind == kind, Lease.group == group, Lease.index == index,
                            Lease.holder == holder)
        .values(expires_at=expires).execution_options(synchronize_session=False))
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return None
    return Held(kind, group, index, holder, expires)


def release(session: Session, kind: str, group: str, index: int, holder: str | None) -> bool:
    """Free a lease; `holder` None forces it (an operator's release)."""
    condition = [Lease.kind == kind, Lease.group == group, Lease.index == index,
                 Lease.holder.is_not(None)]
    if holder is not None:
        condition.append(Lease.holder == holder)
    result = session.execute(
        update(Lease).where(*condition).values(holder=None, claimed_at=None, expires_at=None)
        .execution_options(synchronize_session=False))
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def release_all(session: Session, kind: str, holder: str) -> int:
    result = session.execute(
        update(Lease).where(Lease.kind == kind, Lease.holder == holder)
        .values(holder=None, claimed_at=None, expires_at=None)
        .execution_options(synchronize_session=False))
    return int(result.rowcount)  # type: ignore[attr-defined]


def held_by(session: Session, kind: str, holder: str, now: datetime) -> Lease | None:
    return session.scalars(select(Lease).where(
        Lease.kind == kind, Lease.holder == holder, Lease.expires_at > now)).first()
