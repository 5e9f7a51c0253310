"""Fleet trust, as someone on the provisioning network would attack it (issue 22): a machine's
identity is bound once, every credential does one thing, and nothing anonymous grows the store
without bound. Each test is one finding, on the real service (both stores where it matters)."""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from sqlalchemy import func, select, update

from divingbell.fleet.client import FleetClient
from divingbell.fleet.db import Database
from divingbell.fleet.models import Machine, StateChange, Token, utcnow
from divingbell.fleet.settings import FleetSettings
from tests.conftest import Cli
from tests.fleet.servers import ThreadServer, thread_server
from tests.fleet.test_api import error_of, facts

UUID = "8c6f0a1e-0000-4000-8000-000000000001"
MAC = "52:54:00:aa:00:01"


def ipxe(server: ThreadServer, query: str = "") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"{server.url}/v1/ipxe{query}", timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def boot_token(server: ThreadServer, query: str = "") -> str:
    status, script = ipxe(server, query)
    found = re.search(r"divingbell\.token=(\S+)", script)
    assert status == 200 and found, script
    return found.group(1)


def booted_facts(uuid: str = UUID, mac: str = MAC, hostname: str = "") -> dict[str, Any]:
    return {"uuid": uuid, "boot_id": "0" * 36, "hostname": hostname,
            "interfaces": [{"name": "eth0", "mac": mac, "boot": True,
                            "addresses": [{"address": "10.0.0.11", "prefix": 24}]}],
            "disks": [{"path": "/dev/sda", "size_bytes": 1 << 30}]}


def enrol_by_boot(server: ThreadServer, uuid: str = UUID, mac: str = MAC,
                  hostname: str = "") -> tuple[str, FleetClient]:
    """What the discovery image does: boot, then enrol with the token the boot carried."""
    token = boot_token(server, f"?uuid={uuid}&mac={mac.replace(':', '-')}")
    answer = server.client(token).discover(booted_facts(uuid, mac, hostname))
    return answer["machine_id"], server.client(answer["credential"])


def store(server: ThreadServer) -> Database:
    return Database(server.settings.db_url)


# 1. A boot token re-registering an enrolled machine ------------------------------------------

def test_a_boot_token_cannot_take_over_an_enrolled_machine(fleet: ThreadServer) -> None:
    victim, victim_client = enrol_by_boot(fleet)
    # The attack of the finding: an anonymous token, the victim's UUID, no interfaces.
    anonymous = fleet.client(boot_token(fleet))
    taken = error_of(lambda: anonymous.discover({"uuid": UUID, "boot_id": "x"}))
    assert taken.status in (403, 409)
    # A boot naming the victim's UUID and MAC gets a token bound to it; still not enough.
    spoofed = fleet.client(boot_token(fleet, f"?uuid={UUID}&mac={MAC}"))
    refused = error_of(lambda: spoofed.discover(booted_facts()))
    assert refused.status == 409 and refused.detail["error"] == "already-enrolled"
    assert refused.detail["machine"] == victim
    assert "fleet reenroll" in refused.detail["message"]
    # An operator's bootstrap token cannot issue a second credential either.
    assert error_of(lambda: fleet.bootstrap.discover(booted_facts())).status == 409
    # The real machine's credential still works; no credential was issued to anyone else.
    assert victim_client.machine(victim)["uuid"] == UUID
    audit = [e for e in fleet.admin.call("GET", "/v1/audit") if e["action"] == "enrol"]
    assert [e["subject"] for e in audit] == [victim]


def test_a_boot_token_enrols_only_the_boot_it_was_issued_to_and_only_once(
        fleet: ThreadServer) -> None:
    token = boot_token(fleet, f"?uuid={UUID}&mac={MAC}")
    other_uuid = "8c6f0a1e-0000-4000-8000-000000000002"
    wrong_uuid = error_of(lambda: fleet.client(token).discover(
        booted_facts(other_uuid, "52:54:00:aa:00:02")))
    assert wrong_uuid.status == 403 and wrong_uuid.detail["field"] == "uuid"
    wrong_mac = error_of(lambda: fleet.client(token).discover(
        booted_facts(UUID, "52:54:00:aa:00:09")))
    assert wrong_mac.status == 403 and wrong_mac.detail["field"] == "interfaces"
    # A token from a boot that named no machine cannot enrol one a boot already created.
    unbound = boot_token(fleet)
    assert error_of(lambda: fleet.client(unbound).discover(booted_facts())).status == 403
    enrolled = fleet.client(token).discover(booted_facts())
    assert enrolled["credential"].startswith("dbm_")
    # Single use: spent, on every route.
    assert error_of(lambda: fleet.client(token).discover(booted_facts())).status == 401
    # Nothing but enrolling: a fresh boot token reads nothing, holds nothing.
    fresh = fleet.client(boot_token(fleet, "?uuid=8c6f0a1e-0000-4000-8000-000000000003"))
    assert error_of(fresh.machines).status == 403
    assert error_of(lambda: fresh.machine(enrolled["machine_id"])).status == 403
    assert error_of(lambda: fresh.claim_slot(enrolled["machine_id"])).status == 403


def test_reenroll_is_an_operators_act_and_lets_the_next_boot_enrol_again(
        fleet: ThreadServer) -> None:
    machine, old = enrol_by_boot(fleet)
    fleet.admin.set_roles(machine, ["worker"])
    assert error_of(lambda: fleet.reader.call(
        "POST", f"/v1/machines/{machine}/reenroll")).status == 403
    assert error_of(lambda: old.call("POST", f"/v1/machines/{machine}/reenroll")).status == 403
    answer = fleet.admin.call("POST", f"/v1/machines/{machine}/reenroll")
    assert answer == {"id": machine, "state": "booting"}
    assert error_of(lambda: old.machine(machine)).status == 401  # revoked at once
    again, new = enrol_by_boot(fleet)
    assert again == machine
    detail = new.machine(machine)
    assert (detail["state"], detail["roles"]) == ("scheduled", ["worker"])  # roles kept
    actions = [(e["action"], e["subject"]) for e in fleet.admin.call("GET", "/v1/audit")]
    assert ("reenroll", machine) in actions


# 2. Join scripts: node keys only for an admin or the node itself ------------------------------

CATALOG = """\
certificate_authorities:
  kubernetes:
    certificates:
      - {document_name: kubelet-n0, common_name: "system:node:n0", groups: [system:nodes]}
      - {document_name: kubelet-n1, common_name: "system:node:n1", groups: [system:nodes]}
"""
DESIGN = """\
cluster:
  name: demo
  api_endpoints: [https://10.0.0.10:6443]
  pod_cidr: 10.97.0.0/16
  service_cidr: 10.96.0.0/16
  cluster_dns: 10.96.0.10
  kubernetes_version: 1.30.2
  genesis: n0
roles:
  control-plane: {}
  worker: {}
nodes:
  - {hostname: n0, ip: 10.0.0.10, role: control-plane}
  - {hostname: n1, ip: 10.0.0.11, role: worker}
"""


@pytest.fixture
def bootstrap_fleet(cli: Cli, tmp_path: Path) -> Iterator[ThreadServer]:
    (tmp_path / "catalog.yaml").write_text(CATALOG)
    (tmp_path / "design.yaml").write_text(DESIGN)
    assert cli("pki", "generate", tmp_path / "catalog.yaml", "-o", tmp_path / "pki"
               ).returncode == 0
    settings = FleetSettings(db_url=f"sqlite:///{tmp_path / 'fleet.db'}", control_plane_size=1,
                             bootstrap_design=(str(tmp_path / "design.yaml"),),
                             bootstrap_pki=str(tmp_path / "pki"))
    with thread_server(settings) as running:
        yield running


def join(server: ThreadServer, token: str | None, **params: str) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.get(f"{server.url}/v1/join-scripts", params=params, headers=headers,
                     timeout=30)


def test_join_scripts_only_for_an_admin_or_the_machine_itself(
        bootstrap_fleet: ThreadServer) -> None:
    fleet = bootstrap_fleet
    n0 = {"hostname": "n0", "ip": "10.0.0.10"}
    anonymous = boot_token(fleet)
    for token in (anonymous, fleet.bootstrap_token, fleet.reader_token):
        assert join(fleet, token, **n0).status_code == 403
        rogue = join(fleet, token, hostname="rogue", ip="10.0.0.99", role="control-plane")
        assert rogue.status_code == 403 and "BEGIN CERTIFICATE" not in rogue.text
    assert join(fleet, None, **n0).status_code == 401
    assert join(fleet, fleet.admin_token, **n0).status_code == 200
    assert "readonly NODE_NAME=n1\n" in join(fleet, fleet.admin_token, hostname="n1",
                                              ip="10.0.0.11").text

    # n1 enrolled by its own boot: its claimed name is not accepted yet.
    machine, own = enrol_by_boot(fleet, hostname="n1")
    assert own.token is not None
    refused = join(fleet, own.token, hostname="n1", ip="10.0.0.11")
    assert refused.status_code == 403 and "fleet accept" in refused.json()["detail"]["message"]
    fleet.admin.call("PUT", f"/v1/machines/{machine}/hostname", {})
    mine = join(fleet, own.token, hostname="n1", ip="10.0.0.11")
    assert mine.status_code == 200, mine.text
    assert "readonly NODE_NAME=n1\n" in mine.text
    for params, field in (({"hostname": "n0", "ip": "10.0.0.10"}, "hostname"),
                          ({"hostname": "n1", "ip": "10.0.0.10"}, "ip"),
                          ({"hostname": "n1", "ip": "10.0.0.11", "role": "control-plane"},
                           "role")):
        other = join(fleet, own.token, **params)
        assert other.status_code == 403 and other.json()["detail"]["field"] == field
    # 4. Decommission revokes join-script access with the credential.
    fleet.admin.call("POST", f"/v1/machines/{machine}/decommission")
    assert join(fleet, own.token, hostname="n1", ip="10.0.0.11").status_code == 401


# 3. Hostnames ------------------------------------------------------------------------------

HOST_DOC = """\
conf:
  sysctl:
    net.ipv4.tcp_fin_timeout: 30
  overrides:
    divingbell_sysctl:
      hosts:
        - name: db1
          conf:
            sysctl:
              net.ipv4.tcp_fin_timeout: 5
"""


def test_hostnames_are_rfc1123_unique_and_select_overrides_only_once_accepted(
        fleet: ThreadServer) -> None:
    for bad in ("x\n---", "under_score", "-lead", "a" * 64):
        exc = error_of(lambda bad=bad: fleet.bootstrap.discover(facts(7, hostname=bad)))
        assert exc.status == 422 and "hostname" in str(exc.detail), bad
    assert fleet.admin.machines() == []
    fleet.admin.push_document(HOST_DOC.encode())
    first = fleet.bootstrap.discover(facts(1, hostname="DB1"))  # stored lower-case
    clash = error_of(lambda: fleet.bootstrap.discover(facts(2, hostname="db1")))
    assert clash.status == 409 and clash.detail["error"] == "hostname-conflict"
    assert clash.detail["machines"] == [first["machine_id"],
                                        "uuid:00000000-0000-4000-8000-000000000002"]
    # A machine enrolled by its own boot claims db1's name once db1 is gone: the claim is
    # recorded, but it is not served db1's host override until an operator accepts it.
    fleet.admin.call("POST", f"/v1/machines/{first['machine_id']}/decommission")
    machine, own = enrol_by_boot(fleet, hostname="db1")
    assert own.machine(machine)["hostname_accepted"] is False
    served = yaml.safe_load(own.config(machine).text or "")
    assert served["conf"]["sysctl"]["net.ipv4.tcp_fin_timeout"] == "30"
    accepted = fleet.admin.call("PUT", f"/v1/machines/{machine}/hostname", {})
    assert accepted["hostname_accepted"] is True
    served = yaml.safe_load(own.config(machine).text or "")
    assert served["conf"]["sysctl"]["net.ipv4.tcp_fin_timeout"] == "5"
    # Renaming itself drops the acceptance.
    own.request("POST", "/v1/discovery", booted_facts(hostname="db2"))
    assert own.machine(machine)["hostname_accepted"] is False


# 4. Decommission revokes -----------------------------------------------------------------

def test_decommission_revokes_the_credential_and_everything_it_held(
        fleet: ThreadServer) -> None:
    fleet.admin.push_document(HOST_DOC.encode())
    machine, own = enrol_by_boot(fleet)
    own.claim_slot(machine)
    assert own.config(machine).status == 200
    fleet.admin.call("POST", f"/v1/machines/{machine}/decommission")
    for call in (lambda: own.config(machine),
                 lambda: own.report(machine, {"revision": 1, "state": "converged"}),
                 lambda: own.claim_slot(machine),
                 lambda: own.install_grant(machine),
                 lambda: own.request("POST", "/v1/discovery", booted_facts())):
        assert error_of(call).status == 401
    assert fleet.admin.call("GET", "/v1/slots") == []
    with store(fleet).read() as session:
        assert session.scalar(select(func.count()).select_from(Token).where(
            Token.machine_id == machine)) == 0


# 5. Anonymous requests do not grow the store --------------------------------------------

def count(db: Database, model: Any, *where: Any) -> int:
    with db.read() as session:
        return int(session.scalar(select(func.count()).select_from(model).where(*where)) or 0)


def test_an_anonymous_flood_leaves_a_bounded_store(tmp_path: Path) -> None:
    settings = FleetSettings(db_url=f"sqlite:///{tmp_path / 'fleet.db'}", control_plane_size=1,
                             max_pending_boots=200)
    with thread_server(settings) as fleet, httpx.Client(base_url=fleet.url) as http:
        statuses: dict[int, int] = {}
        for n in range(10_000):
            status = http.get(f"/v1/ipxe?uuid=00000000-0000-4000-9000-{n:012d}").status_code
            statuses[status] = statuses.get(status, 0) + 1
        assert statuses == {200: 200, 429: 9_800}
        refused = http.get(f"/v1/ipxe?uuid={UUID}")
        assert refused.status_code == 429 and refused.headers["retry-after"].isdigit()
        assert refused.text.startswith("#!ipxe\n") and "divingbell.token" not in refused.text
        db = store(fleet)
        assert count(db, Machine) == 200
        assert count(db, Token, Token.role == "boot") == 200
        assert count(db, StateChange) == 200
        # Expired: the next request purges every unused token and never-enrolled row.
        with db.write() as session:
            past = utcnow() - timedelta(hours=1)
            session.execute(update(Token).values(expires_at=past))
            session.execute(update(Machine).values(created_at=past, discovered_at=past))
        assert http.get(f"/v1/ipxe?uuid={UUID}").status_code == 200
        assert (count(db, Machine), count(db, Token, Token.role == "boot"),
                count(db, StateChange)) == (1, 1, 1)
        # A real machine still enrols into the flooded service.
        assert enrol_by_boot(fleet, "8c6f0a1e-0000-4000-8000-00000000abcd",
                             "52:54:00:aa:ab:cd")[0]
        db.dispose()


def test_boot_requests_naming_a_machine_cannot_flood_its_history(fleet: ThreadServer) -> None:
    machine, _ = enrol_by_boot(fleet)
    fleet.admin.set_roles(machine, ["worker"])
    for _ in range(100):
        ipxe(fleet, f"?uuid={UUID}&mac={MAC}")
    history = fleet.admin.machine(machine)["history"]
    changes = [(h["from"], h["to"]) for h in history if h["from"] != h["to"]]
    assert changes == [(None, "booting"), ("booting", "discovered"),
                       ("discovered", "scheduled")]
    boots = [h for h in history if h["reason"].startswith("boot request:")]
    assert len(boots) == fleet.settings.boot_history_kept + 1  # + the first, its creation


# 9. Readers see secrets masked everywhere ---------------------------------------------------

SECRET_DOC = """\
conf:
  uamlite:
    users:
      - user_name: ops
        user_crypt_passwd: $6$salt$hunter2hashhash
  exec:
    001-hello.sh:
      env: {API_KEY: s3cr3t-api-key}
      data: |
        #!/bin/sh
        echo hi
"""
SECRETS = ("hunter2hashhash", "s3cr3t-api-key")


def test_readers_see_secrets_masked_everywhere(fleet: ThreadServer) -> None:
    fleet.admin.push_document(SECRET_DOC.encode())
    fleet.admin.push_document(SECRET_DOC.replace("hunter2", "hunter3")
                              .replace("echo hi", "echo ho").encode())
    machine, own = enrol_by_boot(fleet)
    reader_views = {
        "revision": fleet.reader.call("GET", "/v1/revisions/1")["text"],
        "diff": fleet.reader.call("GET", "/v1/revisions/1/diff/2")["diff"],
        "config": fleet.reader.config(machine).text or "",
    }
    # The web UI's reader session reads through the same routes, with its cookie.
    with httpx.Client(base_url=fleet.url, follow_redirects=False) as browser:
        form = browser.get("/ui/login").text
        login_csrf = form.split('name="login_csrf" value="', 1)[1].split('"', 1)[0]
        assert browser.post("/ui/login", data={"token": fleet.reader_token,
                                               "login_csrf": login_csrf}).status_code == 303
        reader_views["ui revision"] = browser.get("/v1/revisions/1").json()["text"]
        reader_views["ui diff"] = browser.get("/v1/revisions/1/diff/2").json()["diff"]
    for where, text in reader_views.items():
        for secret in SECRETS:
            assert secret not in text, where
        assert "**********" in text, where
    # Those who need them get them: an admin, and the machine its own configuration.
    assert all(s in fleet.admin.call("GET", "/v1/revisions/1")["text"] for s in SECRETS)
    served = own.config(machine).text or ""
    assert "s3cr3t-api-key" in served and "hunter3hashhash" in served


# 10. Nothing a machine sends is pasted into a served document ------------------------------

def test_a_hostile_hostname_in_the_store_cannot_rewrite_the_served_document(
        fleet: ThreadServer) -> None:
    fleet.admin.push_document(HOST_DOC.encode())
    machine, own = enrol_by_boot(fleet)
    # A name from before hostnames were checked (or written by any other path) is served as
    # data: the document stays one document with the base conf.
    with store(fleet).write() as session:
        session.execute(update(Machine).where(Machine.id == machine).values(
            hostname="x\n---\nconf: {sysctl: {kernel.evil: '1'}}\n", hostname_accepted=True))
    text = own.config(machine).text or ""
    documents = list(yaml.safe_load_all(text))
    assert len(documents) == 1
    assert documents[0]["conf"]["sysctl"] == {"net.ipv4.tcp_fin_timeout": "30"}
    assert text.splitlines()[0].startswith("# divingbell revision 1 for machine ")
