"""Rollouts: the current one and its history, the operator's verbs, the plan before a push,
the rollout policy, and the diff between two revisions."""

from __future__ import annotations

import difflib
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from divingbell.fleet import documents, rollouts
from divingbell.fleet.auth import Admin, Reader
from divingbell.fleet.errors import ApiError, not_found
from divingbell.fleet.models import Revision

router = APIRouter(prefix="/v1", tags=["rollouts"])
RevisionNumber = Annotated[int, Path(ge=1, le=2**31 - 1)]


class ActionBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rollback: bool = Field(False, description="abort only: serve the previous revision to the "
                                              "machines already updated")


class PolicyBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_unavailable: Annotated[int, Field(ge=1, le=100_000)] | Annotated[
        str, Field(pattern=r"^\d{1,3}%$")] = Field(
        1, description="workers updated at once: a number or a percentage such as '25%'")
    max_failures: int = Field(0, ge=0, le=100_000,
                              description="failures tolerated before the rollout halts")
    pause_seconds: float = Field(0.0, ge=0, le=7 * 86400, allow_inf_nan=False,
                                 description="wait between waves")


@router.get("/rollouts")
def list_rollouts(request: Request, _: Reader,
                  limit: Annotated[int, Query(ge=1, le=500)] = 50) -> list[dict[str, Any]]:
    """Rollout history, newest first: who started each, when, and how it ended."""
    with request.app.state.db.read() as session:
        return rollouts.history(session, limit)


@router.get("/rollouts/current")
def current_rollout(request: Request, _: Reader) -> dict[str, Any]:
    """The newest rollout with its waves, each machine's progress and durations, and the
    reason it halted. Re-decides it first, so a pause between waves ends on time."""
    with request.app.state.db.write() as session:
        rollouts.advance(session)
        row = rollouts.current_row(session)
        if row is None:
            raise ApiError(404, {"error": "no-rollout", "message": "no rollout yet"})
        return rollouts.view(session, row)


@router.get("/rollouts/{rollout_id}")
def get_rollout(rollout_id: Annotated[int, Path(ge=1, le=2**31 - 1)], request: Request,
                _: Reader) -> dict[str, Any]:
    with request.app.state.db.read() as session:
        return rollouts.view(session, rollouts.get(session, rollout_id))


@router.post("/rollouts/current/{verb}")
def act(verb: Literal["pause", "resume", "abort"], request: Request, principal: Admin,
        body: ActionBody | None = None) -> dict[str, Any]:
    """pause (nothing new starts), resume (retries failed machines), abort (machines not yet
    reached stay on their revision; with rollback the updated ones get the previous one)."""
    with request.app.state.db.write() as session:
        row = rollouts.act(session, verb, principal.label,
                           rollback=bool(body and body.rollback))
        return rollouts.view(session, row)


@router.get("/rollout-policy")
def get_policy(request: Request, _: Reader) -> dict[str, Any]:
    with request.app.state.db.read() as session:
        return rollouts.policy_dict(rollouts.get_policy(session))


@router.put("/rollout-policy")
def put_policy(body: PolicyBody, request: Request, principal: Admin) -> dict[str, Any]:
    """The policy the next rollout uses (a running one keeps the policy it started with)."""
    policy = rollouts.policy_of(body.model_dump())
    with request.app.state.db.write() as session:
        rollouts.set_policy(session, policy, principal.label)
    return rollouts.policy_dict(policy)


@router.get("/rollouts/plan/{number}")
def plan(number: RevisionNumber, request: Request, _: Reader) -> dict[str, Any]:
    """Per machine, how its effective configuration would change (module by module) if
    revision `number` became current, and which machines would not change at all."""
    with request.app.state.db.read() as session:
        return rollouts.plan(session, number)


@router.get("/revisions/{old}/diff/{new}")
def diff(old: RevisionNumber, new: RevisionNumber, request: Request, principal: Reader
         ) -> dict[str, Any]:
    """The unified diff between two revisions' documents (of their masked texts for a
    reader)."""
    with request.app.state.db.read() as session:
        texts = []
        for number in (old, new):
            revision = session.get(Revision, number)
            if revision is None:
                raise not_found("revision", number)
            texts.append((revision.source_name,
                          documents.shown_text(revision.text, principal)))
    lines = difflib.unified_diff(texts[0][1].splitlines(), texts[1][1].splitlines(),
                                 f"revision {old} ({texts[0][0]})",
                                 f"revision {new} ({texts[1][0]})", lineterm="")
    return {"from": old, "to": new, "diff": "\n".join(lines)}
