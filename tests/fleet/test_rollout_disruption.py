"""`fleet rollout plan` says, before anything starts, what each machine will do: live changes
only, restart services or reboot, and how many machines of each."""

from __future__ import annotations

import subprocess
from pathlib import Path

from divingbell.core.host import Host
from divingbell.fleet.client import FleetClient
from divingbell.fleet.settings import FleetSettings
from tests.conftest import Cli
from tests.fleet.servers import ThreadServer, thread_server
from tests.fleet.test_push_removals import FULL, fleet_on, roles
from tests.fleet.test_rollouts_api import DOC, current, fleet_of, served

# Workers get a script that declares a reboot; every machine gets one more sysctl (live).
REBOOT_WORKERS = FULL.replace("    net.core.somaxconn: 1024\n",
                              "    net.core.somaxconn: 1024\n    vm.dirty_ratio: 5\n") + """\
    divingbell_exec:
      labels:
        - label: {key: divingbell.io/role, values: [worker]}
          conf:
            exec:
              hugepages.sh: {data: 'echo 16 > /proc/sys/vm/nr_hugepages', disruption: reboot}
"""


def test_the_rollout_plan_shows_each_machine_disruption_and_counts(cli: Cli,
                                                                  tmp_path: Path) -> None:
    settings = FleetSettings(db_url=f"sqlite:///{tmp_path / 'fleet.db'}", control_plane_size=1)
    document = tmp_path / "site.yaml"
    with thread_server(settings) as server:
        fleet_on(server, FULL)
        control = next(name for name, r in roles(server).items() if "control-plane" in r)
        workers = sorted(set(roles(server)) - {control})
        new = server.admin.push_document(REBOOT_WORKERS.encode())["revision"]
        server.admin.activate(new - 1)

        plan = server.reader.call("GET", f"/v1/rollouts/plan/{new}")
        assert plan["disruption"] == {"none": 1, "restart": 0, "reboot": 2}
        kinds = {m["name"]: m["disruption"] for m in plan["machines"]}
        assert kinds[control] == {"kind": "none", "modules": {}}
        for worker in workers:
            assert kinds[worker] == {"kind": "reboot", "modules": {
                "exec": "reboot: new or changed scripts declare it (hugepages.sh: reboot)"}}

        def fleet(*args: str | Path) -> subprocess.CompletedProcess[str]:
            return cli("fleet", *args, "--server", server.url,
                       env={"DIVINGBELL_TOKEN": server.admin_token})

        document.write_text(REBOOT_WORKERS)
        shown = fleet("rollout", "plan", str(new))
        assert shown.returncode == 0, shown.stderr
        assert "disruption: 2 reboot, 0 restart services, 1 live only\n" in shown.stdout
        assert f"~ {control} (" in shown.stdout
        for worker in workers:
            assert f"~ {worker} (" in shown.stdout
        lines = shown.stdout.splitlines()
        control_line = next(line for line in lines if line.startswith(f"~ {control} ("))
        assert control_line.endswith(": live changes only")
        worker_line = next(line for line in lines if line.startswith(f"~ {workers[0]} ("))
        assert worker_line.endswith(": REBOOTS")
        assert ("  exec: reboot: new or changed scripts declare it (hugepages.sh: reboot)"
                in lines)


def report(client: FleetClient, machine: str, state: str) -> int:
    config = client.config(machine)
    assert config.revision is not None
    client.report(machine, {"revision": config.revision, "etag": config.etag, "state": state,
                            "modules": {"kernel": {"changes": 2, "failures": []}},
                            "drift": False, "duration_seconds": 0.1, "boot_id": "b"})
    return config.revision


def test_a_machine_waiting_for_its_reboot_is_still_updating(fleet: ThreadServer) -> None:
    machines = fleet_of(fleet, 2)
    second = fleet.admin.push_document(DOC.format(value=20).encode())["revision"]
    waves = [[m["id"] for m in wave] for wave in current(fleet)["waves"]]
    control, worker = waves[0][0], waves[1][0]
    assert report(machines[control], control, "rebooting") == second
    rollout = current(fleet)
    assert rollout["status"] == "running"
    assert rollout["waves"][0][0]["progress"] == "updating"
    assert fleet.admin.machine(control)["state"] == "updating"
    assert served(machines[worker], worker) == second - 1, "the next wave waits for the reboot"
    # Back from the reboot: the kernel has what it applied.
    report(machines[control], control, "converged")
    assert current(fleet)["waves"][0][0]["progress"] == "done"
    assert fleet.admin.machine(control)["state"] == "ready"
    assert served(machines[worker], worker) == second


KERNEL_DOC = """\
conf:
  kernel:
    cmdline: {hugepages: 16}
"""


def test_a_fleet_agent_reports_rebooting_until_the_kernel_has_its_command_line(
        fleet: ThreadServer, grub_host: Host) -> None:
    from divingbell.agent.fleet_source import build
    from tests.fleet.test_api import facts

    answer = fleet.bootstrap.discover(facts(1))
    machine = answer["machine_id"]
    fleet.admin.push_document(KERNEL_DOC.encode())
    agent = build(fleet.url, answer["credential"], grub_host, poll_interval=1,
                  fetch_interval=0, report_interval=0, drift_interval=3600, backoff_max=60)
    agent.tick()
    assert agent.ready, agent.reason
    assert grub_host.exists("/run/reboot-required"), "maintenance reboots for it"
    (last, *_) = fleet.admin.call("GET", f"/v1/machines/{machine}/reports")
    assert last["state"] == "rebooting"
    assert fleet.admin.machine(machine)["state"] != "ready"
    # The node reboots into what GRUB boots next: the line on trial.
    from tests.grubroot import boot

    assert "hugepages=16" in boot(grub_host)
    agent = build(fleet.url, answer["credential"], grub_host, poll_interval=1,
                  fetch_interval=0, report_interval=0, drift_interval=3600, backoff_max=60)
    agent.tick()
    (last, *_) = fleet.admin.call("GET", f"/v1/machines/{machine}/reports")
    assert last["state"] == "converged"
    assert fleet.admin.machine(machine)["state"] == "ready"


BAD_KERNEL_DOC = """\
conf:
  kernel:
    cmdline: {hugepages: 16, init: /bin/false}
    allow_unsafe: [init]
"""


def test_a_kernel_line_that_does_not_boot_is_reverted_and_halts_the_rollout(
        fleet: ThreadServer, grub_host: Host, cli: Cli) -> None:
    from divingbell.agent.fleet_source import FleetAgent, build
    from divingbell.core.modules.kernel import GRUBENV, parse_grubenv
    from tests.fleet.test_api import register
    from tests.grubroot import boot

    machines = dict(register(fleet, n) for n in (1, 2))
    fleet.admin.push_document(KERNEL_DOC.encode())
    control = next(m for m in machines if "control-plane" in fleet.admin.machine(m)["roles"])
    (worker,) = set(machines) - {control}

    credential = machines[control].token
    assert credential is not None

    def agent_started() -> FleetAgent:
        return build(fleet.url, credential, grub_host, poll_interval=1,
                     fetch_interval=0, report_interval=0, drift_interval=3600,
                     backoff_max=60)

    agent = agent_started()
    agent.tick()
    boot(grub_host)  # the maintenance reboot: hugepages=16 on trial
    agent = agent_started()
    agent.tick()  # converged on the tried line
    agent.tick()  # healthy: committed
    good = parse_grubenv(grub_host.read_text(GRUBENV))["divingbell_good"]
    assert good == "hugepages=16"
    report(machines[worker], worker, "converged")
    assert {m["state"] for m in fleet.admin.machines()} == {"ready"}

    second = fleet.admin.push_document(BAD_KERNEL_DOC.encode())["revision"]
    assert current(fleet)["waves"][0][0]["id"] == control
    agent.tick()
    (last, *_) = fleet.admin.call("GET", f"/v1/machines/{control}/reports")
    assert (last["revision"], last["state"]) == (second, "rebooting")
    # The tried line panics (init exits; panic=30 reboots) and GRUB boots the default.
    assert "init=/bin/false" not in boot(grub_host, the_try_fails=True)
    rebooted: list[str] = []
    agent = agent_started()
    agent.reboot = lambda: rebooted.append("reboot")
    agent.tick()
    assert not rebooted, "already back on the last-known-good line"
    (last, *_) = fleet.admin.call("GET", f"/v1/machines/{control}/reports")
    assert (last["revision"], last["state"]) == (second, "reverted")
    assert "came back on the last-known-good command line" in \
        last["modules"]["kernel"]["failures"][0]
    rollout = current(fleet)
    assert rollout["status"] == "halted"
    assert rollout["waves"][0][0]["progress"] == "failed"
    assert fleet.admin.machine(control)["state"] == "degraded"
    assert served(machines[worker], worker) == second - 1, "the rollout stops at it"
    shown = cli("fleet", "machine", control, "--server", fleet.url,
                env={"DIVINGBELL_TOKEN": fleet.admin_token})
    assert shown.returncode == 0, shown.stderr
    assert f"  revision: {second} (outdated), last report " in shown.stdout
    assert "(reverted)\n  kernel: reverted: the machine came back on the last-known-good " \
        "command line" in shown.stdout
    status = cli("fleet", "rollout", "status", "--server", fleet.url,
                 env={"DIVINGBELL_TOKEN": fleet.admin_token})
    assert "HALTED" in status.stdout
    assert "kernel: reverted: the machine came back on the last-known-good" in status.stdout
    # The node keeps the good line, and does not try the same line again.
    agent.tick()
    assert not parse_grubenv(grub_host.read_text(GRUBENV)).get("divingbell_try")


def test_a_tried_line_that_leaves_the_fleet_unreachable_is_reverted_and_reported_later(
        fleet: ThreadServer, grub_host: Host) -> None:
    from divingbell.agent.fleet_source import FleetAgent, build
    from divingbell.core.modules.kernel import GRUBENV, parse_grubenv
    from tests.fleet.test_api import register
    from tests.grubroot import boot

    machine, client = register(fleet, 1)
    assert client.token is not None
    credential = client.token
    revision = fleet.admin.push_document(
        b"conf:\n  kernel:\n    cmdline: {hugepages: 16}\n    trial_timeout: 60\n")["revision"]

    def agent_started(url: str, now: float) -> FleetAgent:
        agent = build(url, credential, grub_host, poll_interval=1, fetch_interval=0,
                      report_interval=0, drift_interval=3600, backoff_max=60)
        agent.clock = lambda: now
        return agent

    agent_started(fleet.url, 0.0).tick()
    boot(grub_host)
    # The tried line boots, but the machine cannot reach its fleet (a bad ip=, a NIC driver
    # option): the agent converges from its cached configuration, and does not commit.
    rebooted: list[float] = []
    clock = [1000.0]
    agent = agent_started("http://127.0.0.1:9", 0.0)
    agent.clock = lambda: clock[-1]
    agent.reboot = lambda: rebooted.append(clock[-1])
    for now in (1000.0, 1030.0, 1059.0):
        clock.append(now)
        agent.tick()
        assert agent.ready, agent.reason
    assert not rebooted
    assert "divingbell_good" not in parse_grubenv(grub_host.read_text(GRUBENV))
    clock.append(1060.0)
    agent.tick()
    assert rebooted == [1060.0], "reboots onto the last-known-good line"
    assert "hugepages=16" not in boot(grub_host)
    # Back on the good line and in reach: it says what happened.
    agent_started(fleet.url, 2000.0).tick()
    (last, *_) = fleet.admin.call("GET", f"/v1/machines/{machine}/reports")
    assert (last["revision"], last["state"]) == (revision, "reverted")
    assert ("not healthy 60s after booting the tried line: the fleet service cannot be "
            "reached") in last["modules"]["kernel"]["failures"][0]
