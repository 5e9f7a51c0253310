"""Two `divingbell serve` processes sharing one PostgreSQL database: nothing that matters is
held in one process, so either serves any request, and concurrent claimers spread over both
never get the same install grant or slot twice."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from divingbell.fleet import migrations
from divingbell.fleet.client import FleetApiError, FleetClient
from divingbell.fleet.db import Database
from divingbell.fleet.tokens import create_token
from tests.fleet.servers import PostgresCluster, ProcessServer
from tests.fleet.test_api import DOC, facts

MACHINES = 24
INSTALL_PARALLEL = 3
SLOTS = 4
CLAIMERS = 24
ROUNDS = 5


@pytest.fixture
def replicas(postgres: PostgresCluster, tmp_path: Path
             ) -> Iterator[tuple[list[FleetClient], str, str]]:
    url = postgres.create_database()
    db = Database(url)
    migrations.upgrade(db.write_engine)
    admin = create_token(db, "admin")[1]
    bootstrap = create_token(db, "bootstrap")[1]
    db.dispose()
    servers = []
    try:
        for name in ("a", "b"):
            servers.append(ProcessServer(
                url, args=("--control-plane-size", "3", "--install-parallel",
                           str(INSTALL_PARALLEL), "--slot-concurrency",
                           str(SLOTS))).start(tmp_path / f"serve-{name}.log"))
        yield [FleetClient(s.url, admin) for s in servers], admin, bootstrap
    finally:
        for server in servers:
            server.stop()


def test_either_replica_serves_any_request(
        replicas: tuple[list[FleetClient], str, str]) -> None:
    (a, b), _admin, bootstrap = replicas
    registered = FleetClient(a.base_url, bootstrap).discover(facts(1))
    machine_on_b = FleetClient(b.base_url, registered["credential"])
    assert machine_on_b.machine(registered["machine_id"])["uuid"] == facts(1)["uuid"]
    assert b.push_document(DOC.encode())["revision"] == 1
    config = FleetClient(a.base_url, registered["credential"]).config(registered["machine_id"])
    assert config.status == 200
    assert machine_on_b.config(registered["machine_id"], config.etag).status == 304
    machine_on_b.report(registered["machine_id"], {"revision": 1, "etag": config.etag,
                                                   "state": "converged"})
    assert a.machine(registered["machine_id"])["up_to_date"] is True
    held = machine_on_b.claim_slot(registered["machine_id"])
    assert a.call("GET", "/v1/slots")[0]["holder"] == registered["machine_id"]
    assert FleetClient(a.base_url, registered["credential"]).release_slot(
        held["slot"], registered["machine_id"])["released"] is True


def test_concurrent_claimers_on_two_replicas_never_share_a_grant_or_slot(
        replicas: tuple[list[FleetClient], str, str]) -> None:
    (a, b), admin, bootstrap = replicas
    with ThreadPoolExecutor(8) as pool:
        registered = list(pool.map(
            lambda n: FleetClient((a, b)[n % 2].base_url, bootstrap).discover(facts(n)),
            range(MACHINES)))
    ids = [r["machine_id"] for r in registered]
    assert len(set(ids)) == MACHINES
    roles = [m["roles"] for m in a.machines()]
    assert sum(r == ["control-plane"] for r in roles) == 3  # scheduled once, not per replica
    assert sum(r == ["worker"] for r in roles) == MACHINES - 3

    # Install grants: every machine asks at once, half through each replica.
    start = threading.Barrier(MACHINES)

    def ask(i: int) -> dict[str, Any] | None:
        client = FleetClient((a, b)[i % 2].base_url, registered[i]["credential"])
        start.wait()
        for _attempt in range(5):
            try:
                return client.install_grant(ids[i])
            except FleetApiError as exc:
                assert exc.status == 409, exc
                # A transaction that lost a race to a concurrent one says "retry" (as a real
                # client does); a full throttle is a final answer for this test.
                if not (isinstance(exc.detail, dict) and exc.detail.get("error") == "conflict"):
                    return None
        return None

    with ThreadPoolExecutor(MACHINES) as pool:
        grants = [g for g in pool.map(ask, range(MACHINES)) if g is not None]
    assert len(grants) == INSTALL_PARALLEL
    assert len({g["grant"] for g in grants}) == INSTALL_PARALLEL
    installing = [m for m in a.machines() if m["state"] == "installing"]
    assert len(installing) == INSTALL_PARALLEL

    # Slots: rounds of claimers racing for SLOTS slots; winners release for the next round.
    for _round in range(ROUNDS):
        barrier = threading.Barrier(CLAIMERS)

        def claim(i: int, barrier: threading.Barrier = barrier) -> dict[str, Any] | None:
            client = FleetClient((a, b)[i % 2].base_url, admin)
            barrier.wait()
            try:
                return client.claim_slot(f"holder-{i}", "race", ttl_seconds=60)
            except FleetApiError as exc:
                assert exc.status == 409 and exc.detail["error"] == "no-free-slot", exc
                return None

        with ThreadPoolExecutor(CLAIMERS) as pool:
            won = [w for w in pool.map(claim, range(CLAIMERS)) if w is not None]
        assert len(won) == SLOTS
        assert len({w["slot"] for w in won}) == SLOTS
        assert len({w["holder"] for w in won}) == SLOTS
        listed = {s["slot"]: s["holder"] for s in b.call("GET", "/v1/slots")}
        assert listed == {w["slot"]: w["holder"] for w in won}
        for i, winner in enumerate(won):
            (a, b)[i % 2].release_slot(winner["slot"], winner["holder"])


def test_two_replicas_enrolling_one_machine_at_once_issue_one_credential(
        replicas: tuple[list[FleetClient], str, str]) -> None:
    """The same machine booted twice (a boot token from each replica) and an operator's
    bootstrap token, all enrolling one UUID at the same instant through both replicas: one
    credential comes back; every other attempt is refused (spent token, or already enrolled)."""
    (a, b), _admin, bootstrap = replicas
    uuid, mac = "8c6f0a1e-0000-4000-8000-00000000c0de", "52:54:00:c0:00:de"
    tokens = []
    for replica in (a, b):
        script = FleetClient(replica.base_url).request(
            "GET", f"/v1/ipxe?uuid={uuid}&mac={mac}").body.decode()
        found = re.search(r"divingbell\.token=(\S+)", script)
        assert found, script
        tokens.append(found.group(1))
    body = {"uuid": uuid, "boot_id": "b",
            "interfaces": [{"name": "eth0", "mac": mac, "boot": True}]}
    attempts = 24
    start = threading.Barrier(attempts)

    def enrol(i: int) -> tuple[int, str | None]:
        token = (*tokens, bootstrap)[i % 3]
        client = FleetClient((a, b)[i % 2].base_url, token)
        start.wait()
        try:
            answer = client.request("POST", "/v1/discovery", body)
        except FleetApiError as exc:
            return exc.status, None
        return answer.status, answer.json()["credential"]

    with ThreadPoolExecutor(attempts) as pool:
        results = list(pool.map(enrol, range(attempts)))
    credentials = [credential for _status, credential in results if credential]
    assert len(credentials) == 1, results
    assert sorted({status for status, _ in results}) in ([201, 401, 409], [201, 409])
    machine_id = a.machines()[0]["id"]
    enrolments = [e for e in a.call("GET", "/v1/audit") if e["action"] == "enrol"]
    assert [e["subject"] for e in enrolments] == [machine_id]
    assert FleetClient(b.base_url, credentials[0]).machine(machine_id)["uuid"] == uuid
