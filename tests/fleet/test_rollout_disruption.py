"""`fleet rollout plan` says, before anything starts, what each machine will do: live changes
only, restart services or reboot, and how many machines of each."""

from __future__ import annotations

import subprocess
from pathlib import Path

from divingbell.fleet.settings import FleetSettings
from tests.conftest import Cli
from tests.fleet.servers import thread_server
from tests.fleet.test_push_removals import FULL, fleet_on, roles

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
