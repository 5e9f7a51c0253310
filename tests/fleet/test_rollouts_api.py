"""Rollouts on the real service (SQLite and PostgreSQL): what each machine is served as the
waves advance, the halt on the first failure, the operator's verbs and the plan."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from divingbell.fleet.client import FleetApiError, FleetClient
from tests.fleet.servers import ThreadServer
from tests.fleet.test_api import error_of, register

DOC = """\
conf:
  sysctl:
    net.ipv4.tcp_fin_timeout: {value}
"""


def served(client: FleetClient, machine: str) -> int | None:
    return client.config(machine).revision


def converge(client: FleetClient, machine: str, *, ok: bool = True, error: str = "") -> int:
    config = client.config(machine)
    assert config.revision is not None
    modules = {"sysctl": {"changes": 1, "failures": [] if ok else [error]}}
    client.report(machine, {"revision": config.revision, "etag": config.etag,
                            "state": "converged" if ok else "failed", "modules": modules,
                            "drift": False, "duration_seconds": 0.1, "boot_id": "b"})
    return config.revision


def fleet_of(fleet: ThreadServer, count: int) -> dict[str, FleetClient]:
    machines = dict(register(fleet, n) for n in range(1, count + 1))
    first = fleet.admin.push_document(DOC.format(value=30).encode())["revision"]
    for machine, client in machines.items():
        assert converge(client, machine) == first
    assert {m["state"] for m in fleet.admin.machines()} == {"ready"}
    return machines


def current(fleet: ThreadServer) -> dict[str, Any]:
    result: dict[str, Any] = fleet.reader.call("GET", "/v1/rollouts/current")
    return result


def test_waves_advance_with_reports_and_a_failure_halts_the_rollout(fleet: ThreadServer):
    machines = fleet_of(fleet, 5)  # control plane of 1 (settings), 4 workers
    fleet.admin.call("PUT", "/v1/rollout-policy", {"max_unavailable": 2})
    second = fleet.admin.push_document(DOC.format(value=20).encode())["revision"]
    rollout = current(fleet)
    assert rollout["revision"] == second and rollout["status"] == "running"
    waves = [[m["id"] for m in wave] for wave in rollout["waves"]]
    assert [len(w) for w in waves] == [1, 2, 2]
    control, first_workers, last_workers = waves[0][0], waves[1], waves[2]
    assert "control-plane" in fleet.admin.machine(control)["roles"]

    # only the control-plane machine is served the new revision; the others keep theirs
    assert served(machines[control], control) == second
    for worker in first_workers + last_workers:
        assert served(machines[worker], worker) == second - 1
    converge(machines[control], control)
    for worker in first_workers:
        assert served(machines[worker], worker) == second
    for worker in last_workers:
        assert served(machines[worker], worker) == second - 1

    converge(machines[first_workers[0]], first_workers[0])
    converge(machines[first_workers[1]], first_workers[1], ok=False, error="kernel said no")
    rollout = current(fleet)
    assert rollout["status"] == "halted"
    assert first_workers[1] in rollout["halt_reason"] or \
        fleet.admin.machine(first_workers[1])["hostname"] in rollout["halt_reason"]
    assert "kernel said no" in rollout["halt_reason"]
    for worker in last_workers:  # nothing new starts
        assert served(machines[worker], worker) == second - 1

    # a reader sees but cannot act
    assert error_of(lambda: fleet.reader.call("POST", "/v1/rollouts/current/resume")).status == 403
    # resume retries the failed machine; once it converges, the last wave starts
    assert fleet.admin.call("POST", "/v1/rollouts/current/resume")["status"] == "running"
    converge(machines[first_workers[1]], first_workers[1])
    for worker in last_workers:
        assert served(machines[worker], worker) == second
        converge(machines[worker], worker)
    rollout = current(fleet)
    assert rollout["status"] == "completed" and rollout["summary"]["done"] == 5
    assert all(m["duration_seconds"] is not None for wave in rollout["waves"] for m in wave)
    history = fleet.reader.call("GET", "/v1/rollouts")
    assert history[0]["id"] == rollout["id"] and history[0]["started_by"].startswith("token:")


def test_pause_abort_and_rollback(fleet: ThreadServer):
    machines = fleet_of(fleet, 3)
    second = fleet.admin.push_document(DOC.format(value=21).encode())["revision"]
    waves = [[m["id"] for m in wave] for wave in current(fleet)["waves"]]
    control, worker_a, worker_b = waves[0][0], waves[1][0], waves[2][0]
    assert fleet.admin.call("POST", "/v1/rollouts/current/pause")["status"] == "paused"
    converge(machines[control], control)
    assert served(machines[worker_a], worker_a) == second - 1  # paused: nothing new starts
    error = error_of(lambda: fleet.admin.call("POST", "/v1/rollouts/current/pause"))
    assert error.status == 409 and "paused" in str(error.detail)
    fleet.admin.call("POST", "/v1/rollouts/current/resume")
    assert served(machines[worker_a], worker_a) == second
    converge(machines[worker_a], worker_a)
    aborted = fleet.admin.request("POST", "/v1/rollouts/current/abort",
                                  {"rollback": True}).json()
    assert aborted["status"] == "aborted" and aborted["rollback"] is True
    for machine in (control, worker_a, worker_b):  # everyone back on the previous revision
        assert served(machines[machine], machine) == second - 1
    active = [r for r in fleet.reader.revisions() if r["active"]]
    assert active[0]["revision"] == second - 1


def test_abort_without_rollback_keeps_updated_machines(fleet: ThreadServer):
    machines = fleet_of(fleet, 2)
    second = fleet.admin.push_document(DOC.format(value=22).encode())["revision"]
    control = current(fleet)["waves"][0][0]["id"]
    worker = current(fleet)["waves"][1][0]["id"]
    converge(machines[control], control)
    # the worker was started by the control plane's report; abort before it converges
    fleet.admin.call("POST", "/v1/rollouts/current/pause")
    fleet.admin.call("POST", "/v1/rollouts/current/abort")
    assert served(machines[control], control) == second
    assert served(machines[worker], worker) == second  # already reached


def test_plan_shows_the_blast_radius_per_machine(fleet: ThreadServer):
    fleet_of(fleet, 3)
    override = DOC.format(value=30) + """\
  overrides:
    divingbell_sysctl:
      labels:
        - label: {key: divingbell.io/role, values: [worker]}
          conf:
            sysctl:
              net.ipv4.tcp_fin_timeout: 15
"""
    # store the new revision without making it current yet: push, then re-activate the old one
    new = fleet.admin.push_document(override.encode())["revision"]
    fleet.admin.activate(new - 1)
    plan = fleet.reader.call("GET", f"/v1/rollouts/plan/{new}")
    changed = {m["name"] for m in plan["machines"] if m["changed"]}
    unchanged = {m["name"] for m in plan["machines"] if not m["changed"]}
    roles = {m["hostname"]: m["roles"] for m in fleet.admin.machines()}
    assert changed == {name for name, r in roles.items() if "worker" in r}
    assert unchanged == {name for name, r in roles.items() if "control-plane" in r}
    assert plan["changed"] == 2 and plan["unchanged"] == 1
    lines = next(m for m in plan["machines"] if m["changed"])["modules"]["sysctl"]
    assert any(line.startswith("+") and "15" in line for line in lines)
    assert error_of(lambda: fleet.reader.call("GET", "/v1/rollouts/plan/999")).status == 404


SECRET_DOC = DOC.format(value=30) + """\
  uamlite:
    users:
      - user_name: operator
        user_crypt_passwd: "{crypt}"
"""
OLD_HASH, NEW_HASH = "$6$oldsalt$oldpasswordhash", "$6$newsalt$newpasswordhash"


def test_plan_counts_a_changed_password_as_a_change_without_showing_it(
        fleet: ThreadServer, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    machines = fleet_of(fleet, 2)
    first = fleet.admin.push_document(SECRET_DOC.format(crypt=OLD_HASH).encode())["revision"]
    for machine, client in machines.items():
        assert converge(client, machine) == first
    new = fleet.admin.push_document(SECRET_DOC.format(crypt=NEW_HASH).encode())["revision"]
    fleet.admin.activate(first)
    with caplog.at_level(logging.DEBUG):
        answer = fleet.reader.request("GET", f"/v1/rollouts/plan/{new}")
    plan = answer.json()
    assert plan["changed"] == 2 and plan["unchanged"] == 0
    for machine in plan["machines"]:
        assert machine["changed"] and list(machine["modules"]) == ["uamlite"]
        added = [line for line in machine["modules"]["uamlite"][2:] if line.startswith("+")]
        assert added == ["+- user_crypt_passwd: '********** (sensitive, changed)'"]
    everything = answer.body.decode() + "\n".join(r.getMessage() for r in caplog.records)
    for secret in (OLD_HASH, NEW_HASH, "oldpasswordhash", "newpasswordhash"):
        assert secret not in everything
    # the same text again is no change at all
    again = fleet.reader.call("GET", f"/v1/rollouts/plan/{first}")
    assert again["changed"] == 0 and again["unchanged"] == 2


def test_revision_diff_and_policy_validation(fleet: ThreadServer):
    one = fleet.admin.push_document(DOC.format(value=30).encode())["revision"]
    two = fleet.admin.push_document(DOC.format(value=31).encode())["revision"]
    diff = fleet.reader.call("GET", f"/v1/revisions/{one}/diff/{two}")["diff"]
    assert "-    net.ipv4.tcp_fin_timeout: 30" in diff
    assert "+    net.ipv4.tcp_fin_timeout: 31" in diff
    for bad in ({"max_unavailable": 0}, {"max_unavailable": "150%"}, {"max_failures": -1},
                {"pause_seconds": "soon"}, {"surprise": 1}):
        error = error_of(lambda bad=bad: fleet.admin.call("PUT", "/v1/rollout-policy", bad))
        assert error.status == 422, bad
    assert fleet.admin.call("PUT", "/v1/rollout-policy", {"max_unavailable": "25%"})[
        "max_unavailable"] == "25%"
    assert error_of(lambda: fleet.admin.call("POST", "/v1/rollouts/current/explode")
                    ).status == 422


@pytest.mark.parametrize("verb", ["pause", "resume", "abort"])
def test_verbs_without_a_rollout_are_a_clear_404(fleet: ThreadServer, verb: str):
    with pytest.raises(FleetApiError) as info:
        fleet.admin.call("POST", f"/v1/rollouts/current/{verb}")
    assert info.value.status == 404 and "no rollout" in str(info.value.detail)


def test_config_yaml_is_the_served_revision(fleet: ThreadServer):
    machines = fleet_of(fleet, 2)
    fleet.admin.push_document(DOC.format(value=23).encode())
    worker = current(fleet)["waves"][1][0]["id"]
    text = machines[worker].config(worker).text
    assert text is not None
    assert yaml.safe_load(text)["conf"]["sysctl"]["net.ipv4.tcp_fin_timeout"] == "30"


def test_a_revision_pushed_after_a_halt_waits_for_resume(fleet: ThreadServer):
    machines = fleet_of(fleet, 2)
    second = fleet.admin.push_document(DOC.format(value=24).encode())["revision"]
    control = current(fleet)["waves"][0][0]["id"]
    converge(machines[control], control, ok=False, error="broken")
    assert current(fleet)["status"] == "halted"
    third = fleet.admin.push_document(DOC.format(value=25).encode())["revision"]
    rollout = current(fleet)
    assert rollout["revision"] == third and rollout["status"] == "paused"
    assert "resume" in rollout["reason"]
    assert served(machines[control], control) == second  # nothing moved yet
    fleet.admin.call("POST", "/v1/rollouts/current/resume")
    assert served(machines[control], control) == third
