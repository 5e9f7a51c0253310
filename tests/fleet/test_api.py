"""The fleet API, served for real on loopback, over SQLite and over a real PostgreSQL (the
`store_url` fixture runs every test here against both)."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from divingbell.core.document.api import load_document, load_document_text, node_config
from divingbell.fleet.client import FleetApiError, FleetClient
from tests.fleet.servers import ThreadServer, wait_for


def facts(n: int, *, macs: list[str] | None = None, rack: str | None = None,
          hostname: str | None = None) -> dict[str, Any]:
    macs = macs if macs is not None else [f"52:54:00:00:{n // 256:02x}:{n % 256:02x}"]
    return {
        "uuid": f"00000000-0000-4000-8000-{n:012d}", "boot_id": f"boot-{n}",
        "hostname": hostname or f"node{n}",
        "interfaces": [{"name": f"eth{i}", "mac": mac,
                        "addresses": [{"address": f"10.0.{i}.{n % 250 + 1}", "prefix": 24}],
                        "gateway": "10.0.0.254", "boot": i == 0}
                       for i, mac in enumerate(macs)],
        "disks": [{"path": "/dev/sda", "size_bytes": 10737418240, "model": "QEMU HARDDISK"}],
        "lldp": [{"interface": "eth0", "chassis_id": f"00:11:22:33:44:{(n % 3):02x}",
                  "chassis_name": rack, "port_id": f"Ethernet{n}"}] if rack else [],
    }


def register(fleet: ThreadServer, n: int, **kwargs) -> tuple[str, FleetClient]:
    answer = fleet.bootstrap.discover(facts(n, **kwargs))
    return answer["machine_id"], fleet.client(answer["credential"])


def error_of(call) -> FleetApiError:
    with pytest.raises(FleetApiError) as info:
        call()
    return info.value


def seed_machines(db_url: str, ids: list[str], created_at: datetime) -> None:
    """Machines written straight into the store, all first seen at the same instant (so their
    order is decided by id alone): many machines without many discoveries."""
    from sqlalchemy import insert

    from divingbell.fleet.db import Database
    from divingbell.fleet.models import Machine

    rows = [{"id": ident, "uuid": f"seeded-{ident}", "hostname": f"host-{ident}",
             "state": "discovered", "state_changed_at": created_at, "roles": [],
             "pinned": True, "interfaces": [], "disks": [], "lldp": [], "credential_hash": "",
             "created_at": created_at, "discovered_at": created_at} for ident in ids]
    db = Database(db_url)
    try:
        with db.write() as session:
            for start in range(0, len(rows), 1000):
                session.execute(insert(Machine), rows[start:start + 1000])
    finally:
        db.dispose()


DOC = """\
conf:
  sysctl:
    net.ipv4.tcp_fin_timeout: 30
  overrides:
    divingbell_sysctl:
      labels:
        - label:
            key: divingbell.io/role
            values: [worker]
          conf:
            sysctl:
              net.ipv4.tcp_fin_timeout: 12
"""


def test_discovery_enrols_once_then_the_machine_updates_itself_with_its_credential(
        fleet: ThreadServer) -> None:
    first = fleet.bootstrap.discover(facts(1))
    assert first["state"] == "scheduled"  # control_plane_size=1: the first machine gets it
    assert first["roles"] == ["control-plane"]
    # Enrolled: the bootstrap token cannot register it again (no second credential).
    refused = error_of(lambda: fleet.bootstrap.discover({**facts(1), "hostname": "renamed"}))
    assert refused.status == 409
    assert refused.detail["error"] == "already-enrolled"
    assert refused.detail["machine"] == first["machine_id"]
    # Its own credential updates its facts and keeps working (no new credential issued).
    own = fleet.client(first["credential"])
    again = own.request("POST", "/v1/discovery", {**facts(1), "hostname": "renamed",
                                                  "disks": []})
    assert again.status == 200
    body = again.json()
    assert body["machine_id"] == first["machine_id"]
    assert body["credential"] is None
    machine = own.machine(first["machine_id"])
    assert machine["hostname"] == "renamed"
    assert machine["disks"] == []  # the latest report replaces disks and interfaces
    assert [h["to"] for h in machine["history"]] == ["discovered", "scheduled"]


def test_a_mac_on_another_machine_is_a_conflict_naming_both(fleet: ThreadServer) -> None:
    one, _ = register(fleet, 1, macs=["52:54:00:aa:bb:01"])
    exc = error_of(lambda: fleet.bootstrap.discover(
        facts(2, macs=["52:54:00:AA:BB:01".replace(":", "-")])))
    assert exc.status == 409
    assert exc.detail["error"] == "mac-conflict"
    assert exc.detail["mac"] == "52:54:00:aa:bb:01"
    assert one in exc.detail["machines"]
    assert "uuid:00000000-0000-4000-8000-000000000002" in exc.detail["machines"]
    assert len(fleet.admin.machines()) == 1  # nothing changed


def test_enjoliver_discovery_payload_is_translated(fleet: ThreadServer) -> None:
    payload = {
        "boot-info": {"uuid": "AB0F5A4E-0000-4000-8000-000000000042",
                      "mac": "52:54:00:95:24:0f", "random-id": "b1b2"},
        "interfaces": [{"name": "eth0", "mac": "52:54:00:95:24:0f", "netmask": 21,
                        "ipv4": "172.20.0.65", "cidrv4": "172.20.0.65/21",
                        "gateway": "172.20.0.1", "fqdn": ["node-42.example.org"]}],
        "disks": [{"path": "/dev/sda", "size-bytes": 21474836480}],
        "lldp": {"is_file": True, "data": {"interfaces": [
            {"chassis": {"id": "28:f1:0e:12:20:00", "name": "rack-7"},
             "port": {"id": "fe:54:00:95:24:0f"}, "name": "eth0"}]}},
    }
    answer = fleet.bootstrap.discover(payload)
    machine = fleet.admin.machine(answer["machine_id"])
    assert machine["uuid"] == "ab0f5a4e-0000-4000-8000-000000000042"
    assert machine["hostname"] == "node-42"
    assert machine["rack"] == "rack-7"
    assert machine["labels"]["divingbell.io/rack"] == "rack-7"
    assert machine["interfaces"][0]["addresses"] == [{"address": "172.20.0.65", "prefix": 21}]
    assert machine["interfaces"][0]["boot"] is True
    assert machine["disks"][0]["size_bytes"] == 21474836480


def enjoliver_payload(disk: dict[str, Any]) -> dict[str, Any]:
    """Enjoliver's discovery client sends every interface `ip addr` lists, loopback first."""
    return {
        "boot-info": {"uuid": "AB0F5A4E-0000-4000-8000-000000000043",
                      "mac": "52:54:00:95:24:10", "random-id": "c1c2"},
        "interfaces": [
            {"name": "lo", "mac": "", "netmask": 8, "ipv4": "127.0.0.1",
             "cidrv4": "127.0.0.1/8", "gateway": "", "fqdn": ["localhost"]},
            {"name": "eth0", "mac": "52:54:00:95:24:10", "netmask": 21,
             "ipv4": "172.20.0.66", "cidrv4": "172.20.0.66/21", "gateway": "172.20.0.1",
             "fqdn": ["node-43.example.org"]}],
        "disks": [disk],
        "lldp": {"is_file": False, "data": None},
    }


def test_enjoliver_loopback_is_not_a_nic(fleet: ThreadServer) -> None:
    answer = fleet.bootstrap.discover(enjoliver_payload(
        {"path": "/dev/sda", "size-bytes": 21474836480}))
    machine = fleet.admin.machine(answer["machine_id"])
    assert [i["name"] for i in machine["interfaces"]] == ["eth0"]
    assert machine["hostname"] == "node-43"
    listed = next(m for m in fleet.admin.machines() if m["id"] == answer["machine_id"])
    assert "127.0.0.1" not in json.dumps(listed)
    assert "127.0.0.1" not in json.dumps(machine)


def test_enjoliver_disk_without_its_size_is_a_422_naming_the_field(fleet: ThreadServer) -> None:
    exc = error_of(lambda: fleet.bootstrap.discover(enjoliver_payload({"path": "/dev/sda"})))
    assert exc.status == 422
    # Named as the native schema names it (Enjoliver's `size-bytes` is translated to it).
    assert [(d["field"], d["type"]) for d in exc.detail] == [("disks[0].size_bytes", "missing")]
    assert fleet.admin.machines() == []


@pytest.mark.parametrize(("body", "field"), [
    ({"uuid": "x" * 65}, "uuid"),
    ({"uuid": "a1", "interfaces": [{"name": "eth0", "mac": "zz:zz"}]}, "interfaces[0].mac"),
    ({"uuid": "a1", "interfaces": [{"name": "eth0", "addresses": [
        {"address": "10.0.0.1", "prefix": 40}]}]}, "interfaces[0].addresses[0]"),
    ({"uuid": "a1", "disks": [{"path": "/dev/sda", "size_bytes": -1}]}, "disks[0].size_bytes"),
    ({"uuid": "a1", "colour": "blue"}, "colour"),
])
def test_bad_discovery_is_a_422_naming_the_field(fleet: ThreadServer, body: dict[str, Any],
                                                 field: str) -> None:
    exc = error_of(lambda: fleet.bootstrap.discover(body))
    assert exc.status == 422
    assert any(field in d["field"] for d in exc.detail), exc.detail
    assert fleet.admin.machines() == []


def test_roles_and_tokens_are_enforced(fleet: ThreadServer) -> None:
    a, machine_a = register(fleet, 1)
    b, machine_b = register(fleet, 2)
    fleet.admin.push_document(DOC.encode())
    anonymous = fleet.client(None)
    assert error_of(anonymous.machines).status == 401
    assert error_of(lambda: fleet.client("dbt_nope_nope").machines()).status == 401
    assert error_of(fleet.bootstrap.machines).status == 403
    assert error_of(lambda: fleet.reader.push_document(DOC.encode())).status == 403
    assert error_of(lambda: fleet.reader.discover(facts(3))).status == 403
    # A machine reads only its own machine and configuration, writes only its own reports.
    assert machine_a.machine(a)["id"] == a
    assert machine_a.config(a).status == 200
    assert error_of(lambda: machine_a.machine(b)).status == 403
    assert error_of(lambda: machine_a.config(b)).status == 403
    assert error_of(lambda: machine_a.report(b, {"revision": 1, "state": "converged"})
                    ).status == 403
    assert error_of(lambda: machine_a.install_grant(b)).status == 403
    assert error_of(lambda: machine_a.claim_slot(b)).status == 403
    assert error_of(machine_a.machines).status == 403
    assert error_of(lambda: machine_b.set_roles(b, ["worker"])).status == 403


def test_push_validates_exactly_like_validate_and_a_rejected_document_changes_nothing(
        fleet: ThreadServer, tmp_path: Path) -> None:
    bad = "conf:\n  sysctl:\n    net.ipv4.tcp_fin_timeout: [1]\n  sysctll: {}\n"
    path = tmp_path / "site.yaml"
    path.write_text(bad)
    cli = subprocess.run([sys.executable, "-m", "divingbell", "validate", "site.yaml",
                          "--format", "json"], capture_output=True, text=True, check=False,
                         cwd=tmp_path)
    assert cli.returncode == 2
    expected = json.loads(cli.stdout)["problems"]
    exc = error_of(lambda: fleet.admin.push_document(bad.encode(), "site.yaml"))
    assert exc.status == 422
    assert exc.detail["problems"] == expected
    assert fleet.admin.revisions() == []
    assert error_of(lambda: fleet.admin.push_document(b"\xff\xfe", "x.yaml")).status == 422


def test_revisions_are_kept_and_any_can_be_made_current(fleet: ThreadServer) -> None:
    assert fleet.admin.push_document(DOC.encode(), "site.yaml") == {"revision": 1,
                                                                    "created": True}
    assert fleet.admin.push_document(DOC.encode(), "site.yaml") == {"revision": 1,
                                                                    "created": False}
    second = DOC.replace("30", "31")
    assert fleet.admin.push_document(second.encode(), "site.yaml")["revision"] == 2
    listed = fleet.reader.revisions()
    assert [(r["revision"], r["active"]) for r in listed] == [(1, False), (2, True)]
    fleet.admin.activate(1)
    assert [r["active"] for r in fleet.reader.revisions()] == [True, False]
    assert fleet.admin.call("GET", "/v1/revisions/2")["text"] == second
    shown = fleet.reader.call("GET", "/v1/revisions/2")
    assert shown["masked"] is True
    assert yaml.safe_load(shown["text"]) == yaml.safe_load(second)  # nothing secret in it
    assert error_of(lambda: fleet.admin.activate(9)).status == 404


def test_config_is_the_agent_override_resolution_with_etag_and_304(
        fleet: ThreadServer, tmp_path: Path) -> None:
    control, control_client = register(fleet, 1)  # control-plane (size 1)
    worker, worker_client = register(fleet, 2, rack="rack-2")  # worker
    fleet.admin.push_document(DOC.encode(), "site.yaml")
    for machine_id, client in ((control, control_client), (worker, worker_client)):
        answer = client.config(machine_id)
        assert answer.status == 200 and answer.revision == 1
        assert answer.etag and answer.etag.startswith('"1-')
        served = load_document_text(answer.text or "", "served.yaml")
        assert served.raw_conf.get("overrides") is None
        # The same resolution the agent does, from the same document and the machine's labels.
        machine = fleet.admin.machine(machine_id)
        path = tmp_path / "site.yaml"
        path.write_text(DOC)
        expected = node_config(load_document([path]), machine["hostname"],
                               machine["labels"]).dump()
        assert node_config(served, "any", {}).dump() == expected
        again = client.config(machine_id, answer.etag)
        assert again.status == 304 and again.text is None and again.etag == answer.etag
    worker_conf = yaml.safe_load(worker_client.config(worker).text or "")
    assert worker_conf["conf"]["sysctl"] == {"net.ipv4.tcp_fin_timeout": "12"}
    # A role change changes the configuration, and so the ETag, within one revision.
    old = worker_client.config(worker).etag
    fleet.admin.set_roles(worker, ["control-plane"])
    changed = worker_client.config(worker, old)
    assert changed.status == 200 and changed.etag != old
    assert yaml.safe_load(changed.text or "")["conf"]["sysctl"] == {
        "net.ipv4.tcp_fin_timeout": "30"}


def test_reports_make_machines_up_to_date_then_outdated_and_keep_the_last_n(
        fleet: ThreadServer) -> None:
    m, client = register(fleet, 1)
    fleet.admin.push_document(DOC.encode())
    config = client.config(m)
    for _ in range(5):
        answer = client.report(m, {"revision": 1, "etag": config.etag, "state": "converged",
                                   "modules": {"sysctl": {"changes": 1, "failures": []}},
                                   "drift": False, "duration_seconds": 0.2, "boot_id": "b1"})
    assert answer == {"state": "ready", "up_to_date": True, "revision": 1}
    assert len(client.call("GET", f"/v1/machines/{m}/reports")) == 3  # reports_kept=3
    fleet.admin.push_document(DOC.replace("30", "40").encode())
    assert fleet.admin.machine(m)["up_to_date"] is False
    newer = client.config(m, config.etag)
    assert newer.status == 200 and newer.revision == 2
    assert fleet.admin.machine(m)["state"] == "updating"
    failed = client.report(m, {"revision": 2, "etag": newer.etag, "state": "failed",
                               "modules": {"sysctl": {"changes": 0, "failures": ["EINVAL"]}}})
    assert failed["state"] == "degraded" and failed["up_to_date"] is False
    done = client.report(m, {"revision": 2, "etag": newer.etag, "state": "converged"})
    assert done == {"state": "ready", "up_to_date": True, "revision": 2}
    bad = error_of(lambda: client.report(m, {"revision": 99, "state": "converged"}))
    assert bad.status == 422 and bad.detail["field"] == "revision"
    history = [h["to"] for h in fleet.admin.machine(m)["history"]]
    assert history[-4:] == ["ready", "updating", "degraded", "ready"]


def test_install_grants_are_throttled_leases(fleet: ThreadServer) -> None:
    clients = [register(fleet, n) for n in range(1, 5)]  # 1 control plane + 3 workers
    granted = []
    for machine_id, client in clients[:2]:
        answer = client.install_grant(machine_id)
        assert answer["granted"] is True
        granted.append(machine_id)
        assert client.install_grant(machine_id)["grant"] == answer["grant"]  # idempotent
    third, third_client = clients[2]
    exc = error_of(lambda: third_client.install_grant(third))
    assert exc.status == 409
    assert exc.detail["granted"] is False and exc.detail["reason"] == "throttle-full"
    assert exc.detail["retry_after"] >= 1
    assert sorted(exc.detail["installing"]) == sorted(granted)
    first_id, first_client = clients[0]
    assert first_client.install_result(first_id, False, "disk error")["state"] == "failed"
    assert fleet.admin.machine(first_id)["install_output"] == "disk error"
    assert third_client.install_grant(third)["granted"] is True
    assert third_client.install_result(third, True, "ok")["state"] == "installed"
    nope = error_of(lambda: third_client.install_result(third, True))
    assert nope.status == 409 and nope.detail["error"] == "not-installing"


def test_a_machine_without_a_role_is_not_granted(fleet: ThreadServer) -> None:
    m, client = register(fleet, 1)
    fleet.admin.set_roles(m, [], pinned=False)  # handed back: the scheduler re-picks it
    assert fleet.admin.machine(m)["roles"] == ["control-plane"]
    fleet.admin.call("POST", f"/v1/machines/{m}/decommission")
    assert fleet.admin.machine(m)["state"] == "decommissioned"
    assert error_of(lambda: client.install_grant(m)).status == 401  # its credential is revoked
    exc = error_of(lambda: fleet.admin.install_grant(m))
    assert exc.status == 409 and exc.detail["reason"] == "no-role"


def test_a_lost_control_plane_member_is_replaced_and_workers_keep_their_roles(
        fleet: ThreadServer) -> None:
    """The scheduler reads only the control plane and machines without roles (the pass runs
    on every registration); on both stores that must still find the member to replace and
    leave every worker alone."""
    control, _ = register(fleet, 1)
    workers = [register(fleet, n)[0] for n in range(2, 6)]
    pinned, _ = register(fleet, 6)
    fleet.admin.set_roles(pinned, ["worker"])  # pinned by an operator
    assert fleet.admin.machine(control)["roles"] == ["control-plane"]
    fleet.admin.call("POST", f"/v1/machines/{control}/decommission")
    replacement, _ = register(fleet, 7)
    assert fleet.admin.machine(replacement)["roles"] == ["control-plane"]
    assert [fleet.admin.machine(w)["roles"] for w in workers] == [["worker"]] * 4
    assert fleet.admin.machine(pinned)["roles"] == ["worker"]
    later, _ = register(fleet, 8)
    assert fleet.admin.machine(later)["roles"] == ["worker"]


def test_slots_claim_renew_release(fleet: ThreadServer) -> None:
    a, ca = register(fleet, 1)
    b, cb = register(fleet, 2)
    slot = ca.claim_slot(a, "rack1", ttl_seconds=60)
    assert slot["slot"] == "rack1/0" and slot["holder"] == a and slot["taken_over_from"] is None
    assert ca.claim_slot(a, "rack1")["slot"] == "rack1/0"  # held: same slot
    busy = error_of(lambda: cb.claim_slot(b, "rack1"))
    assert busy.status == 409 and busy.detail["error"] == "no-free-slot"
    assert [h["holder"] for h in busy.detail["holders"]] == [a]
    assert error_of(lambda: cb.renew_slot("rack1/0", a)).status == 403  # not its own
    assert error_of(lambda: cb.renew_slot("rack1/0", b)).status == 409  # not the holder
    assert ca.renew_slot("rack1/0", a, 120)["holder"] == a
    assert [s["holder"] for s in fleet.reader.call("GET", "/v1/slots")] == [a]
    assert ca.release_slot("rack1/0", a)["released"] is True
    assert error_of(lambda: ca.release_slot("rack1/0", a)).status == 409
    assert cb.claim_slot(b, "rack1")["holder"] == b
    assert fleet.admin.call("DELETE", "/v1/slots/rack1/0")["released"] is True
    # An expired slot is taken over, naming the previous holder.
    cb.claim_slot(b, "quick", ttl_seconds=0.001)
    import time

    time.sleep(0.05)
    taken = ca.claim_slot(a, "quick")
    assert taken["taken_over_from"] == b


def test_probes_and_metrics(fleet: ThreadServer) -> None:
    m, client = register(fleet, 1)
    fleet.admin.push_document(DOC.encode())
    client.report(m, {"revision": 1, "etag": client.config(m).etag, "state": "converged"})
    anonymous = fleet.client(None)
    assert anonymous.request("GET", "/healthz").body == b"ok\n"
    assert anonymous.call("GET", "/readyz")["ready"] is True
    text = anonymous.request("GET", "/metrics").body.decode()
    assert 'divingbell_fleet_machines{state="ready"} 1.0' in text
    assert "divingbell_fleet_machines_up_to_date 1.0" in text
    assert "divingbell_fleet_machines_outdated 0.0" in text
    assert ('divingbell_fleet_requests_total{method="GET",'
            'route="/v1/machines/{machine_id}/config",status="200"}') in text
    assert "divingbell_fleet_request_duration_seconds_bucket" in text
    assert fleet.admin_token.split("_", 2)[2] not in text
    spec = anonymous.call("GET", "/openapi.json")
    assert "/v1/discovery" in spec["paths"] and "/v1/slots/claim" in spec["paths"]


def test_an_expired_install_grant_fails_its_machine_and_frees_the_throttle(
        store_url: str) -> None:
    from divingbell.fleet.settings import FleetSettings
    from tests.fleet.servers import thread_server

    settings = FleetSettings(db_url=store_url, control_plane_size=1, install_parallel=1,
                             install_ttl_seconds=0.2)
    with thread_server(settings) as fleet:
        dead, dead_client = register(fleet, 1)
        alive, alive_client = register(fleet, 2)
        assert dead_client.install_grant(dead)["granted"] is True
        assert fleet.admin.machine(dead)["state"] == "installing"
        import time

        time.sleep(0.3)  # the grant's TTL passes without a result: the machine died
        assert alive_client.install_grant(alive)["granted"] is True
        machine = fleet.admin.machine(dead)
        assert machine["state"] == "failed"
        assert machine["history"][-1]["reason"] == "install grant expired without a result"
        late = error_of(lambda: dead_client.install_result(dead, True, "too late"))
        assert late.status == 409


def test_one_log_line_per_request_and_never_a_token(fleet: ThreadServer,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    import logging

    with caplog.at_level(logging.INFO, logger="divingbell.fleet"):
        m, client = register(fleet, 1)
        fleet.admin.push_document(DOC.encode())
        client.config(m)
        error_of(lambda: fleet.client(fleet.admin_token + "x").machines())

        def access_lines() -> list[dict[str, Any]]:
            return [json.loads(r.getMessage()) for r in caplog.records
                    if r.name == "divingbell.fleet.access"]

        # The line is written once the response is sent: the client may see it first.
        wait_for(lambda: len(access_lines()) >= 4, timeout=10)
    lines = access_lines()
    assert [(entry["method"], entry["route"], entry["status"]) for entry in lines] == [
        ("POST", "/v1/discovery", 201), ("PUT", "/v1/document", 201),
        ("GET", "/v1/machines/{machine_id}/config", 200), ("GET", "/v1/machines", 401)]
    assert lines[2]["caller"] == f"machine:{m}"
    secrets = [t.split("_", 2)[2] for t in (fleet.admin_token, fleet.bootstrap_token)]
    everything = "\n".join(r.getMessage() for r in caplog.records)
    assert not any(secret in everything for secret in secrets)
    assert "dbm_" not in everything


def test_a_boot_request_creates_a_booting_machine_that_discovery_completes(
        fleet: ThreadServer) -> None:
    from divingbell.fleet import lifecycle
    from divingbell.fleet.db import Database

    db = Database(fleet.settings.db_url)
    try:
        uuid = facts(7)["uuid"]
        with db.write() as session:
            booting = lifecycle.record_boot(session, uuid.upper(), "52:54:00:00:00:07")
            assert booting.state == "booting" and booting.credential_hash == ""
        with db.read() as session:
            found = lifecycle.machine_by_mac(session, "52:54:00:00:00:07")
            assert found is not None and found.id == booting.id
        # A booting machine has no credential: nothing authenticates as it.
        assert error_of(lambda: fleet.client(f"dbm_{booting.id}_x").machine(booting.id)
                        ).status == 401
        registered = fleet.bootstrap.discover(facts(7))
        assert registered["machine_id"] == booting.id
        history = [h["to"] for h in fleet.admin.machine(booting.id)["history"]]
        assert history[:2] == ["booting", "discovered"]
    finally:
        db.dispose()


def test_an_oversized_document_is_refused_unread(fleet: ThreadServer) -> None:
    exc = error_of(lambda: fleet.admin.push_document(b"#" * (4 * 1024 * 1024 + 1)))
    assert exc.status == 413 and exc.detail["field"] == "body"
    assert fleet.admin.revisions() == []


def test_machines_are_listed_a_page_at_a_time_in_the_order_first_seen(
        fleet: ThreadServer) -> None:
    first, _ = register(fleet, 1)
    # Five machines first seen at one instant, ids not in insertion order: the id decides.
    tied = ["mc", "ma", "me", "mb", "md"]
    seed_machines(fleet.settings.db_url, tied, datetime(2020, 1, 1, 12, 0, 0, 123456))
    everything = fleet.admin.call("GET", "/v1/machines")
    assert isinstance(everything, list)  # no limit, no cursor: the list as before paging
    order = ["ma", "mb", "mc", "md", "me", first]
    assert [m["id"] for m in everything] == order

    pages, after = [], None
    while True:
        page = fleet.reader.machines_page(limit=4 if after is None else 2, after=after)
        pages.append([m["id"] for m in page["machines"]])
        if after is None:
            # registered while paging: seen once, on a later page, never duplicated
            late, _ = register(fleet, 2)
        after = page["next"]
        if after is None:
            break
    assert pages == [order[:4], order[4:6], [late]]
    assert fleet.reader.machines_page(limit=7)["next"] is None  # exactly all: no empty page
    assert fleet.reader.machines(page_size=2) == fleet.admin.call("GET", "/v1/machines")
    assert [m["id"] for m in fleet.reader.machines(limit=3, page_size=2)] == order[:3]
    assert fleet.reader.machines_page(after=fleet.reader.machines_page(limit=1)["next"])[
        "machines"][0]["id"] == "mb"  # `after` alone pages with the default size
    # the state filter pages too
    discovered = fleet.reader.machines_page(state="discovered", limit=3)
    assert [m["id"] for m in discovered["machines"]] == ["ma", "mb", "mc"]
    rest = fleet.reader.machines_page(state="discovered", limit=3, after=discovered["next"])
    assert [m["id"] for m in rest["machines"]] == ["md", "me"] and rest["next"] is None


def _cursor(value: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


@pytest.mark.parametrize(("query", "field"), [
    ("limit=0", "limit"),
    ("limit=5001", "limit"),
    ("limit=ten", "limit"),
    ("after=", "after"),
    ("after=not-a-cursor", "after"),
    ("after=" + "A" * 201, "after"),
    ("after=%E2%9C%93", "after"),
    ("limit=5&after=" + _cursor(["2030-01-01T12:00:00", "m!x"]), "after"),
    ("after=" + _cursor(["2030-01-01T12:00:00+02:00", "ma"]), "after"),
    ("after=" + _cursor(["yesterday", "ma"]), "after"),
    ("after=" + _cursor({"at": "2030-01-01T12:00:00"}), "after"),
    ("after=" + _cursor(["2030-01-01T12:00:00", 7]), "after"),
])
def test_a_bad_page_request_is_a_422_naming_the_field(fleet: ThreadServer, query: str,
                                                      field: str) -> None:
    register(fleet, 1)
    exc = error_of(lambda: fleet.reader.call("GET", f"/v1/machines?{query}"))
    assert exc.status == 422
    named = [exc.detail["field"]] if isinstance(exc.detail, dict) else [
        d["field"] for d in exc.detail]
    assert named == [field], exc.detail
    assert field in str(exc)


def test_reprovision_sends_a_running_machine_back_to_install_as_itself(
        fleet: ThreadServer) -> None:
    m, client = register(fleet, 1)
    fleet.admin.push_document(DOC.encode())
    assert client.install_grant(m)["granted"] is True
    assert client.install_result(m, True, "ok")["state"] == "installed"
    config = client.config(m)
    assert client.report(m, {"revision": 1, "etag": config.etag,
                             "state": "converged"})["state"] == "ready"
    denied = error_of(lambda: fleet.reader.call("POST", f"/v1/machines/{m}/reprovision"))
    assert denied.status == 403

    answer = fleet.admin.call("POST", f"/v1/machines/{m}/reprovision")
    assert answer == {"id": m, "state": "booting", "power": None}  # no BMC: hands needed
    # The OS that held the credential is about to be replaced: it is revoked at once, and the
    # next boot enrols the machine again as itself (docs/security.md).
    assert error_of(lambda: client.config(m)).status == 401
    machine = fleet.admin.machine(m)
    assert machine["roles"] == ["control-plane"] and len(fleet.admin.machines()) == 1
    last = machine["history"][-1]
    assert (last["from"], last["to"]) == ("ready", "booting")
    assert "reprovision requested by" in last["reason"]
    assert machine["reports"], "the machine's reports are kept"
    events = fleet.admin.call("GET", "/v1/audit")
    assert (events[0]["action"], events[0]["subject"]) == ("reprovision", m)
    # Its next boot enrols it again, as the same machine with its roles, and it installs again.
    again, client = register(fleet, 1)
    assert again == m and fleet.admin.machine(m)["state"] == "scheduled"
    assert len(fleet.admin.machines()) == 1
    assert client.install_grant(m)["granted"] is True
    assert client.install_result(m, True, "again")["state"] == "installed"

    busy, _ = register(fleet, 2)
    fleet.admin.set_roles(busy, ["worker"])
    assert fleet.admin.machine(busy)["state"] == "scheduled"
    refused = error_of(lambda: fleet.admin.call("POST", f"/v1/machines/{busy}/reprovision"))
    assert refused.status == 409 and "not installed" in refused.detail["message"]
    missing = error_of(lambda: fleet.admin.call("POST", "/v1/machines/mnothere0000/reprovision"))
    assert missing.status == 404
