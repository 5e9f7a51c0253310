"""Where a document enters the fleet is where a human decides what it removes (issue 23): a
push shows, per machine and per module, what leaves each machine's configuration; one that
removes more than it keeps on some machine needs `allow_removals`, enforced by the service
and recorded in the audit log. On the real service (SQLite and PostgreSQL) and through the
real commands."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from divingbell.fleet.client import FleetClient
from divingbell.fleet.settings import FleetSettings
from tests.conftest import Cli
from tests.fleet.servers import ThreadServer, thread_server
from tests.fleet.test_api import error_of, facts, register
from tests.fleet.test_rollouts_api import converge

WORKERS = """\
  overrides:
    divingbell_sysctl:
      labels:
        - label: {key: divingbell.io/role, values: [worker]}
          conf:
            sysctl:
              net.ipv4.tcp_keepalive_time: 600
              net.ipv4.tcp_keepalive_intvl: 30
              net.ipv4.tcp_keepalive_probes: 5
"""
# Every machine: three sysctls. Workers: three more, from their override.
FULL = """\
conf:
  sysctl:
    net.ipv4.tcp_fin_timeout: 30
    vm.swappiness: 10
    net.core.somaxconn: 1024
""" + WORKERS
# Two of the three common sysctls leave: the control plane keeps 1 of 3, workers 4 of 6.
TRIMMED = """\
conf:
  sysctl:
    net.ipv4.tcp_fin_timeout: 30
""" + WORKERS


def fleet_on(fleet: ThreadServer, text: str, count: int = 3) -> dict[str, FleetClient]:
    machines = dict(register(fleet, n) for n in range(1, count + 1))
    first = fleet.admin.push_document(text.encode())["revision"]
    for machine, client in machines.items():
        assert converge(client, machine) == first
    return machines


def roles(fleet: ThreadServer) -> dict[str, list[str]]:
    return {m["hostname"]: m["roles"] for m in fleet.admin.machines()}


def test_a_push_removing_more_than_it_keeps_needs_allow_removals(fleet: ThreadServer) -> None:
    fleet_on(fleet, FULL)
    control = next(name for name, r in roles(fleet).items() if "control-plane" in r)
    audit_before = fleet.admin.call("GET", "/v1/audit")

    refused = error_of(lambda: fleet.admin.push_document(TRIMMED.encode(), "site.yaml"))
    assert refused.status == 409
    detail: dict[str, Any] = refused.detail
    assert detail["error"] == "removals-need-consent" and detail["field"] == "allow_removals"
    assert control in detail["message"] and "nothing was stored" in detail["message"]
    (group,) = detail["removals"]  # only the control plane: workers keep 4 of 6
    assert [m["name"] for m in group["machines"]] == [control]
    assert (group["removed"], group["kept"], group["exceeds_kept"]) == (2, 1, True)
    assert group["modules"] == {"sysctl": {
        "entries": ["net.core.somaxconn", "vm.swappiness"],
        "effect": "original values restored"}}
    assert [r["revision"] for r in fleet.admin.revisions()] == [1], "nothing stored"
    assert fleet.admin.call("GET", "/v1/audit") == audit_before

    stored = fleet.admin.push_document(TRIMMED.encode(), "site.yaml", allow_removals=True)
    assert stored["revision"] == 2 and stored["created"]
    # Grouped by what they lose and keep: the control plane first (it exceeds), the workers.
    first, workers = stored["removals"]
    assert [m["name"] for m in first["machines"]] == [control] and first["exceeds_kept"]
    assert {m["name"] for m in workers["machines"]} == set(roles(fleet)) - {control}
    assert (workers["removed"], workers["kept"], workers["exceeds_kept"]) == (2, 4, False)
    assert workers["modules"] == first["modules"], "every machine loses the same two sysctls"
    (push,) = [e for e in fleet.admin.call("GET", "/v1/audit") if e["action"] == "push"
               and e["subject"] == "revision 2"]
    assert "removals allowed" in push["detail"] and control in push["detail"]
    assert push["actor"].startswith("token:")


def test_removals_that_revert_nothing_or_stay_within_what_is_kept_need_no_consent(
        fleet: ThreadServer) -> None:
    five = "".join(f"    0{i}0-step: {{data: 'echo {i}'}}\n" for i in range(1, 6))
    fleet_on(fleet, FULL + "  exec:\n" + five, count=2)
    one = FULL + "  exec:\n    010-only: {data: 'echo only'}\n"
    answer = fleet.admin.push_document(one.encode())
    assert answer["created"]
    # Five scripts replaced by one: shown, not counted (one group per role: they keep more
    # or fewer sysctls).
    assert sum(len(group["machines"]) for group in answer["removals"]) == 2
    for group in answer["removals"]:
        assert group["removed"] == 0 and not group["exceeds_kept"]
        assert group["modules"]["exec"]["entries"] == [f"0{i}0-step" for i in range(1, 6)]
        assert "reverts nothing" in group["modules"]["exec"]["effect"]
    # The same text again: nothing new, nothing to consent to.
    assert fleet.admin.push_document(one.encode()) == {"revision": 2, "created": False}


def test_the_rollout_plan_shows_removals_per_machine(fleet: ThreadServer) -> None:
    fleet_on(fleet, FULL)
    control = next(name for name, r in roles(fleet).items() if "control-plane" in r)
    new = fleet.admin.push_document(TRIMMED.encode(), allow_removals=True)["revision"]
    fleet.admin.activate(new - 1)
    plan = fleet.reader.call("GET", f"/v1/rollouts/plan/{new}")
    assert plan["exceeds_kept"] == [control]
    for machine in plan["machines"]:
        removals = machine["removals"]
        assert removals["modules"]["sysctl"]["entries"] == ["net.core.somaxconn",
                                                            "vm.swappiness"]
        assert removals["exceeds_kept"] == (machine["name"] == control)


def test_the_push_and_plan_commands_show_and_ask(cli: Cli, tmp_path: Path) -> None:
    settings = FleetSettings(db_url=f"sqlite:///{tmp_path / 'fleet.db'}", control_plane_size=1)
    document = tmp_path / "site.yaml"
    with thread_server(settings) as server:
        fleet_on(server, FULL)
        control = next(name for name, r in roles(server).items() if "control-plane" in r)

        def fleet(*args: str | Path) -> subprocess.CompletedProcess[str]:
            return cli("fleet", *args, "--server", server.url,
                       env={"DIVINGBELL_TOKEN": server.admin_token})

        document.write_text(TRIMMED)
        refused = fleet("document", "push", document)
        assert refused.returncode == 2, refused.stderr
        assert f"removes more than it keeps on 1 machine(s): {control}" in refused.stderr
        assert (f"- {control}" in refused.stderr
                and "removes 2, keeps 1  MORE THAN IT KEEPS" in refused.stderr)
        assert ("    sysctl: original values restored: net.core.somaxconn, vm.swappiness"
                in refused.stderr)
        as_json = fleet("document", "push", document, "--format", "json")
        assert json.loads(as_json.stdout)["detail"]["removals"][0]["machines"][0]["name"] == (
            control)

        pushed = fleet("document", "push", document, "--allow-removals")
        assert pushed.returncode == 0, pushed.stderr
        assert pushed.stdout.startswith("revision 2 stored and active\n")
        workers = ", ".join(sorted(set(roles(server)) - {control}))
        assert f"- {workers}: removes 2, keeps 4\n" in pushed.stdout
        assert f"- {control}: removes 2, keeps 1  MORE THAN IT KEEPS\n" in pushed.stdout

        server.admin.activate(1)
        plan = fleet("rollout", "plan", "2")
        assert plan.returncode == 0, plan.stderr
        assert f"removes more than it keeps on 1 machine(s): {control}" in plan.stdout
        assert "  removed (the host restores or removes each):" in plan.stdout
        assert "2 removed, 1 kept  MORE THAN IT KEEPS" in plan.stdout


def test_a_fleet_agent_refuses_a_configuration_that_fails_to_parse(
        fleet: ThreadServer, tmp_path: Path, root: Path) -> None:
    from divingbell.agent.fleet_source import build
    from divingbell.core.host import Host
    from tests.conftest import make_proc_sys

    answer = fleet.bootstrap.discover(facts(1))
    machine = answer["machine_id"]
    fleet.admin.push_document(FULL.encode())
    host = Host(root=root, proc_sys=make_proc_sys(tmp_path / "proc_sys", {
        "net/ipv4/tcp_fin_timeout": "60", "vm/swappiness": "60", "net/core/somaxconn": "4096"}))
    agent = build(fleet.url, answer["credential"], host, poll_interval=1, fetch_interval=0,
                  report_interval=0, drift_interval=3600, backoff_max=60)
    agent.tick()
    assert agent.ready, agent.reason
    assert host.proc_sys.joinpath("vm/swappiness").read_text().strip() == "10"
    # The cached revision is damaged (a cut write, a service newer than this agent): the
    # service still answers 304 for its ETag, and what is left does not parse.
    agent.source.document.write_text("# divingbell revision 1\nconf:\n  sysctl: [\n")
    agent.tick()
    assert not agent.ready
    assert host.proc_sys.joinpath("vm/swappiness").read_text().strip() == "10"
    (report, *_) = fleet.admin.call("GET", f"/v1/machines/{machine}/reports")
    assert report["state"] == "failed"
    (failure,) = report["modules"]["engine"]["failures"]
    assert failure.startswith("refusing an invalid document: not valid YAML")
    assert failure.endswith("Nothing was changed on this host, which keeps what it has")
