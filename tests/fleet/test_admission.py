"""The cap on anonymous enrolments no operator has admitted (issue 22, "bounded anonymous
work"): boot after boot, each spent boot token used to enrol one more brand-new UUID for good.
On the real service, both stores."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest
from sqlalchemy import func, select, update

from divingbell.fleet.client import FleetApiError
from divingbell.fleet.db import Database
from divingbell.fleet.models import Machine
from divingbell.fleet.settings import FleetSettings
from tests.conftest import Cli
from tests.fleet.servers import ThreadServer, thread_server
from tests.fleet.test_api import error_of
from tests.fleet.test_trust import boot_token, booted_facts, enrol_by_boot, ipxe

CAP = 4


def uuid_of(n: int) -> str:
    return f"8c6f0a1e-0000-4000-8000-{n:012d}"


def mac_of(n: int) -> str:
    return f"52:54:00:ab:{n // 256:02x}:{n % 256:02x}"


@pytest.fixture
def capped(settings: FleetSettings) -> Iterator[ThreadServer]:
    with thread_server(replace(settings, max_unadmitted=CAP)) as server:
        yield server


def machine_rows(server: ThreadServer) -> int:
    db = Database(server.settings.db_url)
    try:
        with db.read() as session:
            return int(session.scalar(select(func.count()).select_from(Machine)) or 0)
    finally:
        db.dispose()


def metrics(server: ThreadServer) -> str:
    with urllib.request.urlopen(f"{server.url}/metrics", timeout=10) as answer:
        return str(answer.read().decode())


def flood(server: ThreadServer, start: int, boots: int) -> dict[str, int]:
    """Boot then enrol `boots` new UUIDs, as the discovery image would; outcomes by kind."""
    outcomes: dict[str, int] = {}
    for n in range(start, start + boots):
        status, script = ipxe(server, f"?uuid={uuid_of(n)}&mac={mac_of(n).replace(':', '-')}")
        if status == 200:
            token = script.split("divingbell.token=")[1].split()[0]
            answer = server.client(token).discover(booted_facts(uuid_of(n), mac_of(n),
                                                                f"node{n}"))
            kind = "enrolled" if answer["credential"] else "updated"
        else:
            assert status == 429, script
            kind = "ipxe-429"
        outcomes[kind] = outcomes.get(kind, 0) + 1
    return outcomes


def test_a_flood_of_anonymous_enrolments_stops_at_the_cap(capped: ThreadServer) -> None:
    assert flood(capped, 0, 50) == {"enrolled": CAP, "ipxe-429": 50 - CAP}
    assert machine_rows(capped) == CAP  # the refused boots left nothing behind
    # The iPXE answer is a retry script with Retry-After, like the pending-boots cap.
    status, script = ipxe(capped, f"?uuid={uuid_of(999)}")
    assert status == 429 and "divingbell.token" not in script and script.startswith("#!ipxe")


def test_a_boot_token_issued_before_the_cap_cannot_enrol_past_it(capped: ThreadServer) -> None:
    # Tokens taken while there was room: the cap is checked again at enrolment.
    tokens = [boot_token(capped, f"?uuid={uuid_of(n)}&mac={mac_of(n).replace(':', '-')}")
              for n in range(CAP + 2)]
    for n in range(CAP):
        assert capped.client(tokens[n]).discover(booted_facts(uuid_of(n), mac_of(n)))[
            "credential"]
    late = error_of(lambda: capped.client(tokens[CAP]).discover(
        booted_facts(uuid_of(CAP), mac_of(CAP))))
    assert late.status == 429 and late.detail["error"] == "too-many-unadmitted"
    assert late.detail["field"] == "max_unadmitted" and late.detail["limit"] == CAP
    assert "--max-unadmitted" in late.detail["message"]
    assert "fleet accept --all-unadmitted" in late.detail["message"]


def test_enrolled_machines_keep_working_at_the_cap_and_results_free_no_room(
        capped: ThreadServer) -> None:
    machines = [enrol_by_boot(capped, uuid_of(n), mac_of(n), f"node{n}") for n in range(CAP)]
    # The scheduler made them control plane and workers: each installs and reports.
    for n, (machine, own) in enumerate(machines):
        assert own.install_grant(machine)["granted"]
        own.install_result(machine, True, "ok")
        assert own.machine(machine)["state"] == "installed"
        # Updating its own facts with its own credential is not a new enrolment.
        assert own.discover(booted_facts(uuid_of(n), mac_of(n), f"node{n}"))["credential"] \
            is None
    assert flood(capped, 100, 3) == {"ipxe-429": 3}


def test_bulk_accept_frees_room_and_is_audited(capped: ThreadServer, cli: Cli) -> None:
    for n in range(CAP - 1):
        enrol_by_boot(capped, uuid_of(n), mac_of(n), f"node{n}")
    nameless, _ = enrol_by_boot(capped, uuid_of(CAP - 1), mac_of(CAP - 1))
    assert flood(capped, 100, 1) == {"ipxe-429": 1}
    assert f"divingbell_fleet_machines_unadmitted {CAP}.0" in metrics(capped)
    admin = {"DIVINGBELL_TOKEN": capped.admin_token}
    listed = cli("fleet", "machines", "--server", capped.url, env=admin)
    assert listed.stdout.count("(unadmitted)") == CAP, listed.stdout
    api = ["--server", capped.url, "--format", "json"]
    denied = cli("fleet", "accept", "--all-unadmitted", *api,
                 env={"DIVINGBELL_TOKEN": capped.reader_token})
    assert denied.returncode != 0
    result = cli("fleet", "accept", "--all-unadmitted", *api,
                 env={"DIVINGBELL_TOKEN": capped.admin_token})
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert sorted(a["hostname"] for a in answer["accepted"]) == [f"node{n}"
                                                                  for n in range(CAP - 1)]
    assert [(r["id"], "claimed no hostname" in r["reason"]) for r in answer["refused"]] == [
        (nameless, True)]
    assert answer["unadmitted"] == 1
    assert "divingbell_fleet_machines_unadmitted 1.0" in metrics(capped)
    listed = cli("fleet", "machines", "--server", capped.url, env=admin)
    assert "node0 (unadmitted)" not in listed.stdout and "node0" in listed.stdout
    assert listed.stdout.count("(unadmitted)") == 1
    events = [e for e in capped.admin.call("GET", "/v1/audit")
              if e["action"] == "accept-unadmitted"]
    assert len(events) == 1 and events[0]["detail"].startswith(f"{CAP - 1} accepted")
    # Room again: the new machines enrol until the cap, then wait again.
    assert flood(capped, 200, CAP) == {"enrolled": CAP - 1, "ipxe-429": 1}
    # Accepting one machine by hand admits it too.
    capped.admin.accept_hostname(nameless, "spare")
    assert flood(capped, 300, 2) == {"enrolled": 1, "ipxe-429": 1}
    # Nothing selected is not a request: the body must say all_unadmitted.
    empty = error_of(lambda: capped.admin.call("POST", "/v1/machines/accept", {}))
    assert empty.status == 422 and "all_unadmitted" in json.dumps(empty.detail)


def test_operator_enrolments_never_count_and_decommission_frees_room(
        capped: ThreadServer) -> None:
    for n in range(CAP + 3):
        assert capped.bootstrap.discover(booted_facts(uuid_of(500 + n), mac_of(500 + n)))[
            "credential"]
    assert flood(capped, 0, CAP + 1) == {"enrolled": CAP, "ipxe-429": 1}
    anonymous = [m["id"] for m in capped.admin.machines()
                 if m["uuid"] in {uuid_of(n) for n in range(CAP)}]
    assert len(anonymous) == CAP
    capped.admin.call("POST", f"/v1/machines/{anonymous[0]}/decommission")
    assert flood(capped, 700, 2) == {"enrolled": 1, "ipxe-429": 1}
    # A decommissioned machine booting again is a new anonymous enrolment: it waits too.
    status, _ = ipxe(capped, f"?uuid={uuid_of(0)}")
    assert status == 429


def test_accept_names_one_machine_or_all_unadmitted_never_both(cli: Cli) -> None:
    api = ["--server", "http://127.0.0.1:9"]
    neither = cli("fleet", "accept", *api)
    assert neither.returncode == 2 and "give MACHINE_ID, or --all-unadmitted" in neither.stderr
    both = cli("fleet", "accept", "m1", "--all-unadmitted", *api)
    assert both.returncode == 2 and "--all-unadmitted takes no MACHINE_ID" in both.stderr


def test_concurrent_enrolments_cannot_pass_the_cap_together(capped: ThreadServer) -> None:
    # Tokens taken while there was room, spent all at once: the count is taken under the
    # scheduler's lock, so exactly CAP get through.
    extra = 4
    tokens = [boot_token(capped, f"?uuid={uuid_of(n)}&mac={mac_of(n).replace(':', '-')}")
              for n in range(CAP + extra)]

    def enrol(n: int) -> int:
        try:
            capped.client(tokens[n]).discover(booted_facts(uuid_of(n), mac_of(n)))
        except FleetApiError as exc:  # its status is the outcome under test
            return exc.status
        return 201

    with ThreadPoolExecutor(max_workers=CAP + extra) as pool:
        statuses = sorted(pool.map(enrol, range(CAP + extra)))
    assert statuses == [201] * CAP + [429] * extra
    assert machine_rows(capped) == CAP + extra  # the refused keep their `booting` rows only


def test_bulk_accept_leaves_a_name_another_active_machine_holds(capped: ThreadServer) -> None:
    claimer, _ = enrol_by_boot(capped, uuid_of(1), mac_of(1), "twin")
    holder = capped.bootstrap.discover(booted_facts(uuid_of(2), mac_of(2), "other"))
    # A row from before names were unique (or an older export): same name, enrolment unknown.
    db = Database(capped.settings.db_url)
    try:
        with db.write() as session:
            session.execute(update(Machine).where(Machine.id == holder["machine_id"]).values(
                hostname="twin", hostname_accepted=False, enrolled_with=None))
    finally:
        db.dispose()
    answer = capped.admin.accept_unadmitted()
    assert answer["accepted"] == []
    assert [(r["id"], r["hostname"]) for r in answer["refused"]] == [(claimer, "twin")]
    assert "already another active machine's" in answer["refused"][0]["reason"]
    assert capped.admin.machine(claimer)["hostname_accepted"] is False
