"""A fresh-eyes review of issue 22's trust work: gaps the first round missed, each as an
attack from the provisioning network, on the real service."""

from __future__ import annotations

from datetime import timedelta

import yaml
from sqlalchemy import select, update

from divingbell.fleet.models import Machine, utcnow
from tests.fleet.servers import ThreadServer
from tests.fleet.test_api import error_of, register
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

