"""The agent runs the maintenance sequence after each pass: the document's section (with the
node's label override), its readiness as the health gate after boot, Leases in the agent's
namespace, and the maintenance metrics on its /metrics."""

from __future__ import annotations

import urllib.request
from pathlib import Path

from divingbell.agent.loop import Agent, AgentSettings, serve
from divingbell.core.host import Host
from divingbell.kube import FakeKube
from divingbell.maintenance import decide
from divingbell.maintenance.sequence import hook_for

from .conftest import Clock

DOC = """\
conf:
  limits:
    nofile: {domain: root, type: soft, item: nofile, value: 4096}
  maintenance:
    reboot: {strategy: none}
  overrides:
    divingbell_maintenance:
      labels:
        - label: {key: pool, values: [batch]}
          conf:
            maintenance:
              reboot: {strategy: kexec, slot_ttl: 10m}
"""


def test_the_agent_reboots_its_node_by_the_document(tmp_path: Path, kube: FakeKube,
                                                    clock: Clock) -> None:
    kube.set_labels("n1", {"pool": "batch"})
    for pod in ("web-1", "web-2"):
        kube.delete_pod("shop", pod, 0)
    root, proc_sys = tmp_path / "root", tmp_path / "proc_sys"
    (proc_sys / "kernel/random").mkdir(parents=True)
    (proc_sys / "kernel/random/boot_id").write_text("boot-1\n")
    (root / "run").mkdir(parents=True)
    (root / "run/reboot-required").write_text("")
    document = tmp_path / "site.yaml"
    document.write_text(DOC)
    settings = AgentSettings([document], "n1", Host(root=root, proc_sys=proc_sys),
                             lock_timeout=1.0)
    agent = Agent(settings, kube, clock)
    assert agent.maintenance is not None
    rebooted: list[str] = []
    agent.maintenance.sequence._reboot = rebooted.append
    agent.tick()
    assert agent.ready and rebooted == ["kexec"]  # the label override's strategy
    lease = kube.get_lease("divingbell", "divingbell-slot-default-0")
    assert lease is not None and (lease.holder, lease.duration_seconds) == ("n1", 600)
    server = serve(agent, "127.0.0.1", 0)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            metrics = response.read().decode()
    finally:
        server.shutdown()
    assert "divingbell_reboot_required 1.0" in metrics
    assert "divingbell_maintenance_slot_held 1.0" in metrics
    assert "divingbell_drain_duration_seconds_count 1.0" in metrics

    # After the reboot: a new agent process on the new boot.
    (proc_sys / "kernel/random/boot_id").write_text("boot-2\n")
    (root / "run/reboot-required").unlink()
    after = Agent(settings, kube, clock)
    after.tick()  # converges first, then the sequence sees it ready
    assert after.maintenance is not None
    record = after.maintenance.sequence.load()
    assert record.phase == decide.IDLE and record.outcome.startswith("rebooted (kexec)")
    assert not kube.node_state("n1").unschedulable
    assert after.metrics.registry.get_sample_value("divingbell_reboots_total") == 1


def test_hook_uses_the_pod_namespace_and_no_backend_without_kubernetes(tmp_path: Path,
                                                                       kube: FakeKube) -> None:
    from prometheus_client import CollectorRegistry

    settings = AgentSettings([tmp_path / "x.yaml"], "n1", Host(root=tmp_path))
    hook = hook_for(settings, kube, CollectorRegistry(), environ={"POD_NAMESPACE": "ops"})
    assert getattr(hook.sequence.slots, "namespace", None) == "ops"
    assert hook_for(settings, None, CollectorRegistry(), environ={}).sequence.slots is None
