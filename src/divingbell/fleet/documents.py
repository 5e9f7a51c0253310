"""A fleet's documents: a push validated exactly as `divingbell validate` does and stored as a
new revision (removals beyond what it keeps need consent), activating a revision (each starts a
rollout), and a revision's text as a caller may see it (secrets masked but for admins).
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import yaml
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from divingbell.core.document.api import load_document_text
from divingbell.core.errors import DocumentError
from divingbell.fleet import rollouts
from divingbell.fleet.auth import Principal
from divingbell.fleet.errors import ApiError, not_found
from divingbell.fleet.lifecycle import audit
from divingbell.fleet.models import Revision, utcnow
from divingbell.fleet.revisions import active_revision, set_active

log = logging.getLogger("divingbell.fleet")


def push_document(session: Session, data: bytes, name: str, who: str, *,
                  allow_removals: bool = False) -> tuple[int, bool, list[dict[str, Any]]]:
    """Validate exactly as `divingbell validate` does and store a new revision (made active).
    Returns (revision, created, what it removes, machines grouped); pushing the active document's
    exact text again creates nothing. A revision that removes more than it keeps on some
    machine is refused (409, naming them) unless `allow_removals`."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    try:
        document = load_document_text(data, name)
    except DocumentError as exc:
        raise ApiError(422, {"error": "invalid-document", "problems": [
            {"path": p.path, "message": p.message, "location": p.location}
            for p in exc.problems]}) from None
    assert text is not None
    digest = hashlib.sha256(data).hexdigest()
    active = active_revision(session)
    if active is not None:
        current = session.get(Revision, active)
        if current is not None and current.digest == digest:
            return active, False, []
    removed = rollouts.removals_by_machine(session, document)
    beyond = sorted(m["name"] for group in removed if group["exceeds_kept"]
                    for m in group["machines"])
    named = ", ".join(beyond[:20]) + (f" and {len(beyond) - 20} more" if len(beyond) > 20
                                      else "")
    if beyond and not allow_removals:
        raise ApiError(409, {
            "error": "removals-need-consent", "field": "allow_removals",
            "message": f"this revision removes more than it keeps on {len(beyond)} machine(s): "
                       f"{named}; nothing was stored. Check what it removes, then push again "
                       "with --allow-removals (allow_removals=true)",
            "removals": [group for group in removed if group["exceeds_kept"]]})
    number = (session.scalar(select(func.max(Revision.number))) or 0) + 1
    session.add(Revision(number=number, source_name=name, text=text, digest=digest,
                         created_at=utcnow(), created_by=who))
    set_active(session, number)
    consent = (f"; removals allowed: removes more than it keeps on {len(beyond)} "
               f"machine(s): {named}" if beyond else "")
    audit(session, who, "push", f"revision {number}",
          f"{name} sha256:{digest[:12]}{consent}")
    session.flush()
    log.info("revision %d stored from %s by %s%s", number, name, who, consent)
    rollouts.start(session, number, active, who)
    return number, True, removed


def sees_secrets(principal: Principal) -> bool:
    """Only an admin reads a document's secrets through the API (and a machine its own
    configuration): readers and reader UI sessions see them masked everywhere."""
    return principal.role == "admin"


def shown_text(text: str, principal: Principal) -> str:
    """A stored revision's text as this caller may see it: as pushed for an admin; for anyone
    else, re-serialised with every secret masked (comments and layout are not kept)."""
    if sees_secrets(principal):
        return text
    from divingbell.core.document.loader import load_text
    from divingbell.core.document.secrets import mask_document

    data = load_text(text, "revision").data
    return yaml.safe_dump(mask_document(data), sort_keys=False, default_flow_style=False)


def activate(session: Session, number: int, who: str) -> None:
    if session.get(Revision, number) is None:
        raise not_found("revision", number)
    previous = active_revision(session)
    set_active(session, number)
    audit(session, who, "activate", f"revision {number}")
    log.info("revision %d activated by %s", number, who)
    if previous != number:
        rollouts.start(session, number, previous, who)
