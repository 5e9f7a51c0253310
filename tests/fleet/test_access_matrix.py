"""Least privilege, route by route: every route of the service's /openapi.json, called by every
class of caller, answers as the table in docs/security.md says. The table is the expectation,
so a new route without a row there fails here, and so does a row the service does not keep.

A cell is `ok` (the caller gets past the access check: any answer but 401 and 403; the route
may still say 404 or 409 about the request itself), `401` or `403`."""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from divingbell.fleet.client import FleetClient
from divingbell.fleet.db import Database
from divingbell.fleet.models import Token, utcnow
from divingbell.fleet.settings import FleetSettings
from divingbell.fleet.tokens import create_token, revoke_token
from tests.fleet.servers import ThreadServer, thread_server
from tests.fleet.test_trust import boot_token

DOCS = Path(__file__).resolve().parents[2] / "docs" / "security.md"
CALLERS = ("none", "expired", "revoked", "reader", "bootstrap", "boot", "self", "other", "admin")
DOCUMENT = b"conf:\n  sysctl:\n    net.ipv4.tcp_fin_timeout: 30\n"


def documented_table() -> dict[tuple[str, str], dict[str, str]]:
    """`| \\`GET /v1/x\\` | ok | 401 | ... |` rows of the least-privilege table."""
    table: dict[tuple[str, str], dict[str, str]] = {}
    for line in DOCS.read_text().splitlines():
        found = re.match(r"^\| `(GET|POST|PUT|DELETE|PATCH) (\S+)` \|(.*)\|\s*$", line)
        if not found:
            continue
        cells = [cell.strip() for cell in found.group(3).split("|")]
        assert len(cells) == len(CALLERS), line
        assert set(cells) <= {"ok", "401", "403"}, line
        table[(found.group(1), found.group(2))] = dict(zip(CALLERS, cells, strict=True))
    return table


def fresh_uuid() -> str:
    return f"8c6f0a1e-0000-4000-a000-{secrets.token_hex(6)}"


def machine_facts(uuid: str, n: int) -> dict[str, Any]:
    return {"uuid": uuid, "boot_id": "b", "hostname": f"m{n}-{uuid[-6:]}",
            "interfaces": [{"name": "eth0", "mac": f"52:54:00:{uuid[-6:-4]}:{uuid[-4:-2]}:"
                            f"{uuid[-2:]}", "boot": True,
                            "addresses": [{"address": "10.9.0.1", "prefix": 24}]}]}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadServer]:
    path = tmp_path_factory.mktemp("matrix") / "fleet.db"
    settings = FleetSettings(db_url=f"sqlite:///{path}", control_plane_size=1)
    with thread_server(settings) as server:
        server.admin.push_document(DOCUMENT)
        yield server


def test_every_route_has_a_row_and_every_row_a_route(fleet: ThreadServer) -> None:
    schema = fleet.client().call("GET", "/openapi.json")
    routes = {(method.upper(), path) for path, operations in schema["paths"].items()
              for method in operations}
    table = documented_table()
    assert sorted(routes - set(table)) == [], "routes without a row in docs/security.md"
    assert sorted(set(table) - routes) == [], "rows in docs/security.md for no route"


class Callers:
    """A token or credential of each class, against one target machine (made per route, so a
    route that retires it leaves the next route a fresh one)."""

    def __init__(self, fleet: ThreadServer) -> None:
        self.fleet = fleet
        db = Database(fleet.settings.db_url)
        expired_id, self.expired = create_token(db, "admin", "expired")
        with db.write() as session:
            session.execute(update(Token).where(Token.id == expired_id).values(
                expires_at=utcnow() - timedelta(seconds=1)))
        revoked_id, self.revoked = create_token(db, "admin", "revoked")
        revoke_token(db, revoked_id)
        db.dispose()
        other = fleet.bootstrap.discover(machine_facts(fresh_uuid(), 2))
        self.other: str = other["credential"]

    def target(self) -> tuple[str, dict[str, Any], str]:
        facts = machine_facts(fresh_uuid(), 1)
        enrolled = self.fleet.bootstrap.discover(facts)
        return enrolled["machine_id"], facts, enrolled["credential"]

    def token(self, caller: str, self_credential: str) -> str | None:
        tokens: dict[str, str | None] = {
            "none": None, "expired": self.expired, "revoked": self.revoked,
            "reader": self.fleet.reader_token, "bootstrap": self.fleet.bootstrap_token,
            "self": self_credential, "other": self.other, "admin": self.fleet.admin_token}
        return tokens[caller]


def request_for(method: str, path: str, machine: str, facts: dict[str, Any], caller: str,
                fleet: ThreadServer) -> tuple[str, dict[str, Any]]:
    """The path filled in and a valid body: the access check, not validation, must decide."""
    filled = (path.replace("{machine_id}", machine).replace("{number}", "1")
              .replace("{rollout_id}", "1").replace("{group}", "default")
              .replace("{index}", "0").replace("{verb}", "pause").replace("{old}", "1")
              .replace("{new}", "1").replace("{name}", "n1").replace("{path}", "vmlinuz"))
    if path == "/v1/join-scripts":
        filled += f"?hostname={facts['hostname']}&ip=10.9.0.1"
    bodies: dict[tuple[str, str], Callable[[], dict[str, Any]]] = {
        ("POST", "/v1/discovery"): lambda: {"json": facts if caller in ("self", "other")
                                            else machine_facts(fresh_uuid(), 3)},
        ("PUT", "/v1/machines/{machine_id}/roles"): lambda: {"json": {"roles": ["worker"]}},
        ("PUT", "/v1/machines/{machine_id}/hostname"): lambda: {"json": {}},
        ("POST", "/v1/machines/{machine_id}/reports"): lambda: {
            "json": {"revision": 1, "state": "converged"}},
        ("POST", "/v1/machines/{machine_id}/install/result"): lambda: {
            "json": {"success": True, "output": ""}},
        ("PUT", "/v1/document"): lambda: {"data": DOCUMENT, "content_type": "application/yaml"},
        ("POST", "/v1/slots/claim"): lambda: {"json": {"holder": machine}},
        ("POST", "/v1/slots/{group}/{index}/renew"): lambda: {"json": {"holder": machine}},
        ("POST", "/v1/slots/{group}/{index}/release"): lambda: {"json": {"holder": machine}},
        ("POST", "/v1/rollouts/current/{verb}"): lambda: {"json": {}},
        ("PUT", "/v1/rollout-policy"): lambda: {"json": {"max_unavailable": 1}},
        ("POST", "/v1/designs/validate"): lambda: {"data": b"cluster: {}\n",
                                                   "content_type": "application/yaml"},
        ("PUT", "/v1/nodes/{name}/labels"): lambda: {"json": {"labels": {}}},
    }
    make = bodies.get((method, path))
    return filled, make() if make else {}


def test_every_caller_gets_what_the_table_says_on_every_route(fleet: ThreadServer) -> None:
    table = documented_table()
    callers = Callers(fleet)
    wrong = []
    for (method, path), expected in sorted(table.items()):
        machine, facts, credential = callers.target()
        for caller in CALLERS:
            if caller == "boot":
                # A boot token from a boot of its own: a discovery enrols exactly that boot.
                uuid = fresh_uuid()
                token: str | None = boot_token(fleet, f"?uuid={uuid}")
                filled, kwargs = request_for(method, path, machine, facts, caller, fleet)
                if path == "/v1/discovery":
                    kwargs = {"json": {**machine_facts(uuid, 4), "interfaces": []}}
            else:
                token = callers.token(caller, credential)
                filled, kwargs = request_for(method, path, machine, facts, caller, fleet)
            body = kwargs.pop("json", None)
            answer = FleetClient(fleet.url, token).request(
                method, filled, body, ok=tuple(range(300, 600)), **kwargs)
            got = "ok" if answer.status not in (401, 403) else str(answer.status)
            assert answer.status < 500, (method, filled, caller, answer.body[:300])
            if got != expected[caller]:
                wrong.append(f"{method} {path} as {caller}: {answer.status}, "
                             f"table says {expected[caller]}")
    assert wrong == []
