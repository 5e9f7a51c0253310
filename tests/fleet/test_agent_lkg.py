"""A revision that cuts a fleet agent off from its service is reverted on the machine to the
last-known-good configuration, and reported `reverted` once the service answers again (the
rollout halts there). The cut is real: an HTTP proxy between the agent and the service that
stops answering (tests/power/faults.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from divingbell.agent.fleet_source import build
from divingbell.core.host import Host
from tests.conftest import make_proc_sys
from tests.fleet.servers import ThreadServer
from tests.fleet.test_api import register
from tests.fleet.test_rollout_disruption import report
from tests.fleet.test_rollouts_api import current, served
from tests.power.faults import HttpFaultProxy

DOC = "conf:\n  sysctl:\n    vm.swappiness: {value}\n"


@pytest.fixture
def proxy(fleet: ThreadServer) -> Iterator[HttpFaultProxy]:
    relay = HttpFaultProxy(fleet.port)
    yield relay
    relay.close()


def test_a_revision_that_cuts_the_machine_off_is_reverted_and_reported_later(
        fleet: ThreadServer, proxy: HttpFaultProxy, root: Path, tmp_path: Path) -> None:
    host = Host(root=root, proc_sys=make_proc_sys(tmp_path / "proc_sys",
                                                  {"vm/swappiness": "60"}))
    machines = dict(register(fleet, n) for n in (1, 2))
    first = fleet.admin.push_document(DOC.format(value=10).encode())["revision"]
    control = next(m for m in machines if "control-plane" in fleet.admin.machine(m)["roles"])
    (worker,) = set(machines) - {control}
    credential = machines[control].token
    assert credential is not None
    agent = build(proxy.url, credential, host, poll_interval=1, fetch_interval=0,
                  report_interval=0, drift_interval=3600, backoff_max=60, revert_after=60.0)
    agent.source.client.timeout = 0.5
    clock = [0.0]
    agent.clock = lambda: clock[-1]

    def tick(at: float) -> None:
        clock.append(at)
        agent.tick()

    def swappiness() -> str:
        return host.proc_sys.joinpath("vm/swappiness").read_text().strip()

    tick(0.0)
    assert swappiness() == "10"
    report(machines[worker], worker, "converged")
    assert fleet.admin.machine(control)["revision"] == first

    second = fleet.admin.push_document(DOC.format(value=20).encode())["revision"]
    assert current(fleet)["waves"][0][0]["id"] == control
    # The new revision arrives, and nothing answers after it (as if it broke the network).
    proxy.faults.stop_after = proxy.faults.forwarded + 1
    tick(100.0)
    assert swappiness() == "20"
    tick(130.0)
    tick(159.0)
    assert swappiness() == "20", "not yet: the service may just be slow"
    tick(160.0)
    tick(161.0)
    assert swappiness() == "10", "the last-known-good revision, converged again"
    assert agent.ready

    # The service answers again: it is told, and keeps serving revision 2, which this machine
    # does not take again.
    proxy.faults.stop_after = None
    tick(200.0)
    tick(201.0)
    assert swappiness() == "10"
    (last, *_) = fleet.admin.call("GET", f"/v1/machines/{control}/reports")
    assert (last["revision"], last["state"]) == (second, "reverted")
    (failure,) = last["modules"]["engine"]["failures"]
    assert failure.startswith("the fleet service was not reached in the 60s after revision "
                              f"{second} was applied")
    assert failure.endswith(f"reverted to the last-known-good revision {first}")
    rollout = current(fleet)
    assert rollout["status"] == "halted"
    assert fleet.admin.machine(control)["state"] == "degraded"
    assert served(machines[worker], worker) == first, "the rollout stops at it"

    # A new revision is taken and converged as usual.
    fleet.admin.call("POST", "/v1/rollouts/current/abort")
    third = fleet.admin.push_document(DOC.format(value=30).encode())["revision"]
    tick(300.0)
    assert swappiness() == "30"
    (last, *_) = fleet.admin.call("GET", f"/v1/machines/{control}/reports")
    assert (last["revision"], last["state"]) == (third, "converged")
