"""A fleet's revisions as both the service and its rollouts read them: which revision is active
(a row of `settings`), a revision's validated document (cached in memory: derived and
immutable, keyed by its number and digest, as a revision's text never changes) and the node
labels a machine's roles and rack give it. Below `views`, `listing`, `documents` and `rollouts`,
which all use them.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Protocol

from sqlalchemy import Connection, Row, select, update
from sqlalchemy.orm import Session

from divingbell.core.document.api import load_document_text
from divingbell.core.document.validate import ValidDocument
from divingbell.fleet.models import Revision, Setting
from divingbell.fleet.scheduler import node_labels

ACTIVE_REVISION = "active_revision"


class MachineLike(Protocol):
    """What the configuration and freshness decisions read: a Machine row or a View."""

    @property
    def id(self) -> str: ...
    @property
    def hostname(self) -> str: ...
    @property
    def hostname_accepted(self) -> bool: ...
    @property
    def roles(self) -> list[Any]: ...
    @property
    def rack(self) -> str | None: ...
    @property
    def last_report_revision(self) -> int | None: ...
    @property
    def last_report_etag(self) -> str | None: ...
    @property
    def last_report_state(self) -> str | None: ...


def labels_of(machine: MachineLike) -> dict[str, str]:
    return node_labels(machine.roles or [], machine.rack)


_documents: OrderedDict[tuple[int, str], ValidDocument] = OrderedDict()
_documents_lock = threading.Lock()


def active_revision(session: Session | Connection) -> int | None:
    value = session.scalar(select(Setting.value).where(Setting.key == ACTIVE_REVISION))
    return int(value) if value else None


def set_active(session: Session, number: int) -> None:
    updated = session.execute(update(Setting).where(Setting.key == ACTIVE_REVISION)
                              .values(value=str(number))).rowcount  # type: ignore[attr-defined]
    if not updated:
        session.add(Setting(key=ACTIVE_REVISION, value=str(number)))


def revision_document(revision: Revision | Row[int, str, str, str]) -> ValidDocument:
    key = (revision.number, revision.digest)
    with _documents_lock:
        cached = _documents.get(key)
        if cached is not None:
            _documents.move_to_end(key)
            return cached
    document = load_document_text(revision.text, revision.source_name)
    with _documents_lock:
        _documents[key] = document
        while len(_documents) > 16:
            _documents.popitem(last=False)
    return document
