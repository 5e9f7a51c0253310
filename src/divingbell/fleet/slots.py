"""The fleet's rules for maintenance slots (issue 22): how many slots a group has and how long
one may be held are the service's to say, never the claimer's.

A group's slot count is the `maintenance.reboot.concurrency` of the document the claiming
machine is served (its rollout's revision, its labels and host overrides: what its agent
obeys), or `FleetSettings.slot_concurrency` when it is served none (or the holder is not a
machine). A TTL is capped at `FleetSettings.slot_ttl_max_seconds`.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from divingbell.core.document.api import node_config
from divingbell.core.document.schema import Health
from divingbell.fleet import revisions, rollouts, views
from divingbell.fleet.models import Machine, Revision
from divingbell.fleet.settings import FleetSettings

DEFAULT_HEALTH_TIMEOUT = Health().timeout


def served_reboot(session: Session, holder: str) -> Any | None:
    """`maintenance.reboot` of the document the machine `holder` is served (its rollout's
    revision, its labels and host overrides: what its agent obeys), or None."""
    machine = session.get(Machine, holder)
    if machine is None:
        return None
    revision = rollouts.served_revision(session, machine.id, revisions.active_revision(session))
    if revision is None:
        return None
    row = session.execute(select(Revision.number, Revision.digest, Revision.text,
                                 Revision.source_name).where(Revision.number == revision)).one()
    config = node_config(revisions.revision_document(row), views.served_name(machine),
                         revisions.labels_of(machine))
    return getattr(config.modules.get("maintenance"), "reboot", None)


def slot_count(session: Session, holder: str, settings: FleetSettings) -> int:
    """How many slots each group has, for a claim by `holder`."""
    concurrency = getattr(served_reboot(session, holder), "concurrency", None)
    return int(concurrency) if concurrency is not None else settings.slot_concurrency


def health_timeout(session: Session, holder: str) -> float:
    """How long the machine's maintenance reboot may take until it is healthy: its served
    document's `maintenance.reboot.health.timeout` (the schema's default without one)."""
    health = getattr(served_reboot(session, holder), "health", None)
    timeout = getattr(health, "timeout", None)
    return float(timeout) if timeout is not None else DEFAULT_HEALTH_TIMEOUT


def capped_ttl(asked: float, settings: FleetSettings) -> float:
    return min(asked, settings.slot_ttl_max_seconds)
