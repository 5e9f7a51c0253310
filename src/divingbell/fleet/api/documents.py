"""The desired configuration: documents pushed as numbered revisions, one of them active."""

from __future__ import annotations

import os
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from sqlalchemy import select

from divingbell.fleet import documents, listing, revisions
from divingbell.fleet.auth import Admin, Reader
from divingbell.fleet.errors import ApiError, not_found
from divingbell.fleet.models import Revision, iso

router = APIRouter(prefix="/v1", tags=["documents"])
MAX_DOCUMENT_BYTES = 4 * 1024 * 1024
RevisionNumber = Annotated[int, Path(ge=1, le=2**31 - 1)]


@router.put("/document", status_code=201, openapi_extra={"requestBody": {
    "required": True,
    "content": {"application/yaml": {"schema": {"type": "string"}},
                "text/plain": {"schema": {"type": "string"}}}}})
async def put_document(request: Request, principal: Admin, name: Annotated[
        str, Query(max_length=255, description="file name used in problem locations")
        ] = "document.yaml", allow_removals: Annotated[bool, Query(
            description="consent to a revision that removes more than it keeps on some "
                        "machine (recorded in the audit log)")] = False) -> JSONResponse:
    """Store a new revision after validating it exactly as `divingbell validate` does; the
    new revision becomes active. A rejected document changes nothing: 422 with every problem
    (path, message, file:line). A revision that removes more than it keeps on some machine
    (what leaves its effective configuration, against what stays) answers 409 naming those
    machines, with what it removes per module, unless `allow_removals=true`. The answer
    lists, per machine, what the revision removes (the host restores or removes it).
    Pushing the active text again answers 200 with its number."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():  # read at most the limit, never the whole upload
        size += len(chunk)
        if size > MAX_DOCUMENT_BYTES:
            raise ApiError(413, {"error": "too-large", "field": "body", "message":
                                 f"documents are limited to {MAX_DOCUMENT_BYTES} bytes"})
        chunks.append(chunk)
    data = b"".join(chunks)
    source = os.path.basename(name.replace("\\", "/")) or "document.yaml"
    if "\x00" in source:
        raise ApiError(422, {"error": "invalid-name", "field": "name",
                             "message": "NUL characters are not allowed"})

    def store() -> tuple[int, bool, list[dict[str, Any]]]:
        with request.app.state.db.write() as session:
            return documents.push_document(session, data, source, principal.label,
                                           allow_removals=allow_removals)

    number, created, removals = await run_in_threadpool(store)
    answer: dict[str, Any] = {"revision": number, "created": created}
    if removals:
        answer["removals"] = removals
    return JSONResponse(answer, status_code=201 if created else 200)


@router.get("/revisions")
def list_revisions(request: Request, _: Reader) -> list[dict[str, Any]]:
    with request.app.state.db.read() as session:
        active = revisions.active_revision(session)
        rows = session.execute(select(Revision.number, Revision.source_name, Revision.digest,
                                      Revision.created_at, Revision.created_by)
                               .order_by(Revision.number)).all()
        return [{"revision": r.number, "name": r.source_name, "digest": r.digest,
                 "created_at": iso(r.created_at), "created_by": r.created_by,
                 "active": r.number == active} for r in rows]


@router.get("/revisions/{number}")
def get_revision(number: RevisionNumber, request: Request, principal: Reader) -> dict[str, Any]:
    """A stored revision. An admin gets the text as pushed; a reader gets it re-serialised with
    every secret masked (`masked: true`)."""
    with request.app.state.db.read() as session:
        revision = session.get(Revision, number)
        if revision is None:
            raise not_found("revision", number)
        return {"revision": revision.number, "name": revision.source_name,
                "digest": revision.digest, "created_at": iso(revision.created_at),
                "created_by": revision.created_by,
                "text": documents.shown_text(revision.text, principal),
                "masked": not documents.sees_secrets(principal),
                "active": revisions.active_revision(session) == revision.number}


@router.post("/revisions/{number}/activate")
def activate_revision(number: RevisionNumber, request: Request, principal: Admin
                      ) -> dict[str, Any]:
    """Make an earlier (or later) revision the current one again."""
    with request.app.state.db.write() as session:
        documents.activate(session, number, principal.label)
        return {"revision": number, "active": True}


@router.get("/audit", tags=["audit"])
def audit(request: Request, _: Reader, limit: Annotated[int, Query(ge=1, le=1000)] = 100
          ) -> list[dict[str, Any]]:
    """What operators did, newest first: pushes, activations, role pins, decommissions,
    forced slot releases."""
    with request.app.state.db.read() as session:
        return listing.audit_events(session, limit)
