"""Maintenance on a real API server, with each agent's own pod-bound token and the admission
policies as shipped: slot Leases raced by two agents (one winner), an expired slot taken over,
cordon ownership, and a drain through the Eviction API that a PodDisruptionBudget blocks, that
is retried once the budget allows it, and whose timeout names the pod and the budget. The test
acts as the kubelet: pods are patched Running/Ready so the disruption controller counts them,
and a pod being deleted is removed as a kubelet would once its containers stopped."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from divingbell.kube import LightkubeApi
from divingbell.maintenance import operator
from divingbell.maintenance.slots import ClaimResult, LeaseSlots
from tests.kube.agents import Agents
from tests.kube.kubelet import add_pod, finish_deletions, set_ready

pytestmark = pytest.mark.kube


def _slots(agents: Agents, node: str, offset: float = 0.0) -> LeaseSlots:
    api = LightkubeApi(agents.kubeconfig(node))
    return LeaseSlots(api, agents.namespace, clock=lambda: time.time() + offset)


def test_two_agents_race_for_one_slot_and_one_wins(agents: Agents) -> None:
    racers = {node: _slots(agents, node) for node in (agents.node_a, agents.node_b)}
    start = threading.Barrier(len(racers))
    results: dict[str, ClaimResult] = {}

    def claim(node: str) -> None:
        start.wait()
        results[node] = racers[node].claim("race", node, 1, 60)

    threads = [threading.Thread(target=claim, args=(node,)) for node in racers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [node for node, result in results.items() if result.slot is not None]
    assert len(winners) == 1, results
    (loser,) = set(racers) - set(winners)
    assert [slot.holder for slot in results[loser].holders] == winners
    # The loser may not free the winner's slot either.
    assert racers[loser].release("race/0", loser) is False
    assert racers[winners[0]].release("race/0", winners[0]) is True


def test_an_expired_slot_is_taken_over_and_its_old_holder_cannot_renew(agents: Agents) -> None:
    first = _slots(agents, agents.node_a)
    assert first.claim("ttl", agents.node_a, 1, 2).slot is not None
    # B's clock runs 10 s ahead: for B the slot expired 8 s ago.
    later = _slots(agents, agents.node_b, offset=10)
    taken = later.claim("ttl", agents.node_b, 1, 60)
    assert taken.slot is not None and taken.slot.holder == agents.node_b
    assert taken.taken_over_from == agents.node_a
    assert first.renew("ttl/0", agents.node_a, 60) is False
    # A live slot is not B's to take, whatever A's clock says.
    assert _slots(agents, agents.node_a, offset=30).claim("ttl", agents.node_a, 1, 60).slot is None


def test_cordon_belongs_to_who_made_it(agents: Agents) -> None:
    own = LightkubeApi(agents.kubeconfig(agents.node_a))
    operator.cordon(own, agents.node_a, "divingbell-agent", "reboot")
    try:
        node = agents.admin.get(f"/api/v1/nodes/{agents.node_a}")
        assert node["spec"]["unschedulable"] is True
        with pytest.raises(operator.OperatorError, match="not uncordoning"):
            operator.uncordon(own, agents.node_a, "someone-else", force=False)
        other = LightkubeApi(agents.kubeconfig(agents.node_b))
        with pytest.raises(Exception, match="only the node its pod runs on"):
            other.patch_node(agents.node_a, unschedulable=False)
    finally:
        operator.uncordon(own, agents.node_a, "divingbell-agent", force=False)
    assert not agents.admin.get(f"/api/v1/nodes/{agents.node_a}")["spec"].get("unschedulable")


def _budget(agents: Agents, name: str, min_available: int, pods: int) -> None:
    agents.admin.post(f"/apis/policy/v1/namespaces/{agents.workloads}/poddisruptionbudgets", {
        "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
        "metadata": {"name": name, "namespace": agents.workloads},
        "spec": {"minAvailable": min_available, "selector": {"matchLabels": {"app": name}}}})
    path = f"/apis/policy/v1/namespaces/{agents.workloads}/poddisruptionbudgets/{name}"
    deadline = time.monotonic() + 30
    while agents.admin.get(path).get("status", {}).get("currentHealthy") != pods:
        assert time.monotonic() < deadline, agents.admin.get(path)
        time.sleep(0.2)


def test_a_drain_waits_for_the_budget_and_its_timeout_names_pod_and_budget(
        agents: Agents) -> None:
    ns, node = agents.workloads, agents.node_a
    for name, on in (("db-1", agents.node_a), ("db-2", agents.node_b)):
        add_pod(agents.admin, ns, name, on, labels={"app": "db"})
        set_ready(agents.admin, ns, name)
    _budget(agents, "db", 2, 2)
    api = LightkubeApi(agents.kubeconfig(node))
    operator.cordon(api, node, "divingbell-agent", "drain test")
    progress: list[str] = []

    def wait(seconds: float) -> None:
        finish_deletions(agents.admin, node)
        time.sleep(seconds)

    blocked = operator.drain(api, node, grace_seconds=5, timeout=3, poll=0.5, sleep=wait,
                             pod_selector="app=db", progress=progress.append)
    assert not blocked.done
    assert blocked.blocking == [(f"{ns}/db-1", [f"{ns}/db"])]
    assert f"waiting: evicting {ns}/db-1 would violate its PodDisruptionBudget" in progress
    events = agents.admin.get("/api/v1/namespaces/default/events",
                              fieldSelector=f"involvedObject.name={node}")["items"]
    timeout = [e for e in events if e["reason"] == "DrainTimeout"]
    assert timeout and f"{ns}/db-1" in timeout[0]["message"] and f"{ns}/db" in timeout[0][
        "message"]

    # A third replica becomes Ready elsewhere while the drain retries: the budget allows one
    # disruption, the retried eviction goes through, and the pod leaves the node.
    def wait_then_scale(seconds: float) -> None:
        if not scaled:
            add_pod(agents.admin, ns, "db-3", agents.node_b, labels={"app": "db"})
            set_ready(agents.admin, ns, "db-3")
            scaled.append(True)
        wait(seconds)

    scaled: list[Any] = []
    report = operator.drain(api, node, grace_seconds=5, timeout=60, poll=0.5,
                            sleep=wait_then_scale, pod_selector="app=db",
                            progress=progress.append)
    assert report.done and report.evicted == [f"{ns}/db-1"], report
    operator.uncordon(api, node, "divingbell-agent", force=False)
    agents.admin.delete(f"/apis/policy/v1/namespaces/{ns}/poddisruptionbudgets/db")
