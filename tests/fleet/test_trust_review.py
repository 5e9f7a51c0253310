"""A fresh-eyes review of issue 22's trust work: gaps the first round missed, each as an
attack from the provisioning network, on the real service."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import yaml
from sqlalchemy import select, update

import divingbell.image
from divingbell.fleet.app import MAX_BODY_BYTES
from divingbell.fleet.client import FleetApiError
from divingbell.fleet.models import Lease, Machine, utcnow
from tests.fleet.servers import ThreadServer
from tests.fleet.test_api import error_of, register
from tests.fleet.test_hostile_bodies import service  # noqa: F401  (fixture)
from tests.fleet.test_trust import (
    HOST_DOC,
    UUID,
    boot_token,
    booted_facts,
    bootstrap_fleet,  # noqa: F401  (fixture)
    enrol_by_boot,
    ipxe,
    join,
    store,
)


def test_an_impostor_re_enrolling_a_released_machine_does_not_inherit_its_accepted_name(
        bootstrap_fleet: ThreadServer) -> None:  # noqa: F811
    """Decommission and reenroll leave the machine's name accepted; whoever boots its UUID
    first enrols it again with a boot token. Its own word must not carry the operator's
    acceptance over: no host override, no join script (node key) until accepted again."""
    fleet = bootstrap_fleet
    fleet.admin.push_document(HOST_DOC.replace("db1", "n1").encode())
    for release in ("decommission", "reenroll"):
        machine, own = enrol_by_boot(fleet, hostname="n1")
        fleet.admin.call("PUT", f"/v1/machines/{machine}/hostname", {})
        assert join(fleet, own.token, hostname="n1", ip="10.0.0.11").status_code == 200
        fleet.admin.call("POST", f"/v1/machines/{machine}/{release}")
        # The attacker: boots naming the machine's UUID, enrols with the token it got.
        token = boot_token(fleet, f"?uuid={UUID}")
        answer = fleet.client(token).discover(booted_facts(hostname="n1"))
        assert answer["machine_id"] == machine, release
        assert answer["hostname_accepted"] is False, release
        impostor = fleet.client(answer["credential"])
        refused = join(fleet, impostor.token, hostname="n1", ip="10.0.0.11")
        assert refused.status_code == 403, release
        assert "BEGIN CERTIFICATE" not in refused.text
        served = yaml.safe_load(impostor.config(machine).text or "")
        assert served["conf"]["sysctl"]["net.ipv4.tcp_fin_timeout"] == "30", release
        fleet.admin.call("POST", f"/v1/machines/{machine}/decommission")
        with store(fleet).write() as session:  # the next round starts from a new machine
            session.execute(update(Machine).where(Machine.id == machine)
                            .values(uuid=f"retired-{release}"))


def test_a_reenrolled_machine_first_enrolled_by_an_operator_survives_the_boot_purge(
        fleet: ThreadServer) -> None:
    """The purge of never-enrolled `booting` rows took any booting row whose discovered_at
    equals created_at: a machine first enrolled with a bootstrap token (`divingbell
    discover`) has those equal, so `fleet reenroll` made it junk, and the next boot request
    from anyone deleted it with its roles, history and reports."""
    machine, _ = register(fleet, 1)
    fleet.admin.set_roles(machine, ["worker"])
    with store(fleet).write() as session:  # enrolled long ago
        past = utcnow() - timedelta(days=30)
        session.execute(update(Machine).where(Machine.id == machine)
                        .values(created_at=past, discovered_at=past))
    fleet.admin.call("POST", f"/v1/machines/{machine}/reenroll")
    assert ipxe(fleet, "?uuid=8c6f0a1e-0000-4000-8000-00000000beef")[0] == 200
    with store(fleet).read() as session:
        kept = session.scalars(select(Machine).where(Machine.id == machine)).first()
        assert kept is not None, "the reenrolled machine was purged as a junk boot row"
        assert kept.roles == ["worker"]
    assert fleet.admin.machine(machine)["state"] == "booting"


CONCURRENCY_BY_HOST = """\
conf:
  maintenance:
    reboot:
      concurrency: 1
  overrides:
    divingbell_maintenance:
      hosts:
        - name: big
          conf:
            maintenance:
              reboot:
                concurrency: 3
"""


def test_a_claimed_hostname_does_not_choose_the_slot_count(fleet: ThreadServer) -> None:
    """The slot count is the concurrency of the document the claimer is served; an
    unaccepted claimed name selects no host override there, so it must not here either."""
    fleet.admin.push_document(CONCURRENCY_BY_HOST.encode())
    holder, holder_client = enrol_by_boot(fleet, "8c6f0a1e-0000-4000-8000-0000000000b1",
                                          "52:54:00:aa:00:b1")
    claimer, claimer_client = enrol_by_boot(fleet, hostname="big")
    assert claimer_client.machine(claimer)["hostname_accepted"] is False
    assert holder_client.claim_slot(holder, "rack9")["slot"] == "rack9/0"
    busy = error_of(lambda: claimer_client.claim_slot(claimer, "rack9"))
    assert busy.status == 409 and busy.detail["slots"] == 1


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-16-be", "utf-32"])
def test_json_in_another_encoding_json_accepts_is_depth_checked_too(
        service: ThreadServer, encoding: str) -> None:  # noqa: F811
    """json.loads reads UTF-8 with a BOM, UTF-16 and UTF-32 too: the depth guard looked for a
    leading `[` or `{` byte and let those through to a RecursionError (a 500)."""
    deep = ("[" * 100_000 + "]" * 100_000).encode(encoding)
    reply = httpx.put(service.url + "/v1/nodes/n1/labels", content=deep, timeout=30,
                      headers={"Authorization": f"Bearer {service.admin_token}",
                               "Content-Type": "application/json"})
    assert reply.status_code == 422, reply.text
    assert reply.json()["detail"]["field"] == "body"


def _raw_post(server: ThreadServer, head: bytes, body: bytes) -> bytes:
    """Send a request over a plain socket (the body in the background: the service may answer
    before it has read it all) and return the start of the answer."""
    host, port = urlsplit(server.url).hostname, urlsplit(server.url).port
    with socket.create_connection((host, port), timeout=30) as connection:
        def send() -> None:
            with contextlib.suppress(OSError):  # the service closes once it answered
                connection.sendall(head + body)

        sender = threading.Thread(target=send)
        sender.start()
        answer = connection.recv(4096)
        sender.join()
        return answer


def test_an_anonymous_body_past_the_largest_any_route_takes_is_refused_unread(
        service: ThreadServer) -> None:  # noqa: F811
    """The depth guard read every POST/PUT body whole, before authentication: an anonymous
    caller could make the service hold any amount in memory (and it undid the document
    route's own streaming limit)."""
    declared = _raw_post(service, b"POST /v1/discovery HTTP/1.1\r\nHost: fleet\r\n"
                         b"Content-Type: application/json\r\n"
                         b"Content-Length: 100000000000\r\n\r\n", b" " * 65536)
    assert declared.startswith(b"HTTP/1.1 413"), declared
    assert b'"field":"body"' in declared
    chunk = b" " * (1 << 20)
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk)
                       for _ in range(MAX_BODY_BYTES // len(chunk) + 1)) + b"0\r\n\r\n"
    streamed = _raw_post(service, b"POST /v1/discovery HTTP/1.1\r\nHost: fleet\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n", chunked)
    assert streamed.startswith(b"HTTP/1.1 413"), streamed
    # A document at its own limit still gets through to the route's own check.
    at_limit = b"conf: {}\n" + b"#" * (4 * 1024 * 1024 - 10) + b"\n"
    pushed = httpx.put(service.url + "/v1/document", content=at_limit, timeout=60,
                       headers={"Authorization": f"Bearer {service.admin_token}"})
    assert pushed.status_code != 413, pushed.text


def test_an_unaccepted_claimed_name_does_not_shape_that_hosts_join_script(
        bootstrap_fleet: ThreadServer) -> None:  # noqa: F811
    """The join-script route looked the fleet's machine up by hostname whether or not an
    operator accepted it: a machine enrolled from the provisioning network claiming `n1` (or a
    host the design does not list) chose the role and labels of the script an admin fetches
    for that host."""
    fleet = bootstrap_fleet
    machine, own = enrol_by_boot(fleet, hostname="n5")
    fleet.admin.set_roles(machine, ["control-plane"])
    assert own.machine(machine)["hostname_accepted"] is False
    unlisted = join(fleet, fleet.admin_token, hostname="n5", ip="10.0.0.15")
    assert unlisted.status_code == 400, unlisted.text
    assert unlisted.json()["detail"]["problems"][0]["field"] == "hostname"
    fleet.admin.call("PUT", f"/v1/machines/{machine}/hostname", {})
    accepted = join(fleet, fleet.admin_token, hostname="n5", ip="10.0.0.15")
    assert accepted.status_code == 200, accepted.text
    assert "divingbell.io/role" in accepted.text and "control-plane" in accepted.text


def test_the_discovery_client_never_prints_its_boot_token(tmp_path: Path) -> None:
    """Without divingbell.url= the discovery client printed the whole kernel command line to
    the console (and so to a BMC's serial log), boot token included."""
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("quiet divingbell.token=dbt_0123abcd_s3cr3t-boot-token BOOTIF=01-aa\n")
    client = Path(divingbell.image.__file__).parent / "initramfs" / "discovery"
    # Its own mount namespace: the client sees this command line and a /run of its own.
    result = subprocess.run(
        ["unshare", "--mount", "sh", "-c", f"mount --bind {cmdline} /proc/cmdline && "
         f"mount -t tmpfs tmpfs /run && exec busybox sh {client}"],
        capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1, result.stderr
    assert "divingbell.url=" in result.stdout and "BOOTIF=01-aa" in result.stdout
    assert "s3cr3t-boot-token" not in result.stdout + result.stderr


def test_one_slot_per_holder_holds_when_it_claims_many_groups_at_once(
        fleet: ThreadServer) -> None:
    """One slot per holder was checked by reading what the holder had, then claiming: two
    claims of different groups at the same instant (threads here, replicas in production;
    PostgreSQL reads committed rows) both found nothing held and both took a slot."""
    machine, own = register(fleet, 1)
    groups = [f"rack{n}" for n in range(16)]
    start = threading.Barrier(len(groups))

    def claim(group: str) -> int:
        start.wait()
        try:
            own.claim_slot(machine, group)
            return 1
        except FleetApiError as exc:
            assert exc.status == 409 and exc.detail["error"] == "holds-another-slot"
            return 0

    with ThreadPoolExecutor(len(groups)) as pool:
        taken = sum(pool.map(claim, groups))
    assert taken == 1
    assert len(fleet.admin.call("GET", "/v1/slots")) == 1


def test_a_machine_asking_for_an_install_grant_many_times_at_once_holds_one(
        fleet: ThreadServer) -> None:
    """The same read-then-claim: concurrent grant requests by one machine took several of the
    `install_parallel` grants, so one stolen credential could hold every install slot."""
    machine, own = register(fleet, 1)
    fleet.admin.set_roles(machine, ["worker"])
    start = threading.Barrier(16)

    def ask(_: int) -> str:
        start.wait()
        return str(own.install_grant(machine)["grant"])

    with ThreadPoolExecutor(16) as pool:
        grants = set(pool.map(ask, range(16)))
    assert len(grants) == 1, grants
    with store(fleet).read() as session:
        held = session.scalars(select(Lease).where(Lease.kind == "install",
                                                   Lease.holder == machine)).all()
        assert len(held) == 1
