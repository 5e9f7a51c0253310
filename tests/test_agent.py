"""The agent loop: readiness as the rollout gate, document swaps the way a kubelet volume does
them (followed here: the operator's opt-in mode; pinning is in tests/k8s), label changes,
backoff, drift, per-node status and events, probes and metrics over real HTTP. In-process on a scratch host with the fake API server (there is none here), and once as
the real `divingbell agent` process converging real sysctls in a network namespace."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from divingbell.agent.loop import Agent, AgentSettings, read_labels_file, serve
from divingbell.core.host import Host
from divingbell.kube import FakeKube
from tests.conftest import Cli, NetNs


class ConfigMapVolume:
    """A directory laid out like a kubelet ConfigMap or Secret volume: `doc.yaml ->
    ..data/doc.yaml`, `..data -> ..<timestamp>`; an update writes a new timestamped dir and
    swaps `..data`."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.generation = 0
        base.mkdir(parents=True, exist_ok=True)

    @property
    def document(self) -> Path:
        return self.base / "doc.yaml"

    def publish(self, text: str) -> None:
        self.generation += 1
        data = self.base / f"..2026_11_22_{self.generation:04d}"
        data.mkdir()
        (data / "doc.yaml").write_text(text)
        tmp = self.base / "..data_tmp"
        tmp.symlink_to(data.name)
        os.replace(tmp, self.base / "..data")  # atomic, as the kubelet does it
        if not self.document.is_symlink():
            self.document.symlink_to("..data/doc.yaml")


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


DOC = "conf:\n  sysctl:\n    net.ipv4.ip_forward: 1\n"
OVERRIDE = """\
conf:
  sysctl:
    vm.swappiness: 10
  overrides:
    divingbell_sysctl:
      labels:
        - label: {key: role, values: [storage]}
          conf:
            sysctl:
              vm.swappiness: 1
"""


@pytest.fixture
def volume(tmp_path: Path) -> ConfigMapVolume:
    return ConfigMapVolume(tmp_path / "configmap")


@pytest.fixture
def kube() -> FakeKube:
    fake = FakeKube()
    fake.add_node("n1", {"role": "compute"})
    return fake


def make_agent(host: Host, volume: ConfigMapVolume, kube: FakeKube | None, clock: Clock,
               **settings: float | bool) -> Agent:
    config = AgentSettings([volume.document], "n1", host, lock_timeout=1.0,
                           follow_document_changes=True)
    for name, value in settings.items():
        setattr(config, name, value)
    return Agent(config, kube, clock)


def live(host: Host, key: str) -> str:
    return host.proc_sys.joinpath(*key.split(".")).read_text().strip()


def status(kube: FakeKube) -> dict[str, str]:
    return kube.node_objects["n1"].status


def test_ready_only_once_the_current_revision_converged(scratch_host: Host,
                                                        volume: ConfigMapVolume, kube: FakeKube
                                                        ) -> None:
    clock = Clock()
    volume.publish(DOC)
    agent = make_agent(scratch_host, volume, kube, clock)
    assert not agent.ready
    agent.tick()
    assert agent.ready and live(scratch_host, "net.ipv4.ip_forward") == "1"
    first = agent.revision
    assert status(kube) == {"state": "Done", "revision": first,
                            "reason": f"revision {first} converged: 2 change(s)"}
    assert [e["reason"] for e in kube.events("n1")] == ["Applied"]

    volume.publish(DOC.replace(": 1", ": 0"))
    clock.now += 2
    agent.tick()
    assert agent.ready and agent.revision != first
    assert live(scratch_host, "net.ipv4.ip_forward") == "0"
    assert status(kube)["revision"] == agent.revision

    sent = len(kube.sent)
    clock.now += 2
    agent.tick()
    assert len(kube.sent) == sent, "a settled node sends nothing"


def test_bad_document_degrades_without_changing_the_host_then_recovers(
        scratch_host: Host, volume: ConfigMapVolume, kube: FakeKube) -> None:
    clock = Clock()
    volume.publish(DOC)
    agent = make_agent(scratch_host, volume, kube, clock)
    agent.tick()
    volume.publish("conf:\n  sysctl:\n    net.ipv4.ip_forward: 0\n  bogus: 1\n")
    clock.now += 2
    agent.tick()
    assert not agent.ready
    assert status(kube)["state"] == "Degraded"
    assert "invalid document" in status(kube)["reason"] and "bogus" in status(kube)["reason"]
    assert live(scratch_host, "net.ipv4.ip_forward") == "1", "nothing applied from a bad doc"
    warning = kube.events("n1")[-1]
    assert (warning["reason"], warning["type"]) == ("InvalidDocument", "Warning")
    assert b'divingbell_failures_total{module="document"} 1.0' in agent.metrics.render()

    volume.publish(DOC.replace(": 1", ": 0"))  # the fix: retried at once, not after backoff
    clock.now += 2
    agent.tick()
    assert agent.ready and status(kube)["state"] == "Done"


def test_a_failing_apply_backs_off_and_retries(scratch_host: Host, volume: ConfigMapVolume,
                                               kube: FakeKube) -> None:
    clock = Clock()
    volume.publish("conf:\n  sysctl:\n    kernel.osrelease: x\n")  # read-only: apply fails
    agent = make_agent(scratch_host, volume, kube, clock)
    agent.tick()
    assert not agent.ready and status(kube)["state"] == "Degraded"
    def attempts() -> int:  # one Event, counted up on each retry (an event series)
        return sum(e["count"] for e in kube.events("n1") if e["reason"] == "ConvergeFailed")

    assert attempts() == 1
    for step, expected in ((5, 1), (6, 2), (19, 2), (2, 3)):  # waits 10 s, then 20 s
        clock.now += step
        agent.tick()
        assert attempts() == expected, (step, expected)
    assert [e["reason"] for e in kube.events("n1")] == ["ConvergeFailed"]


def test_label_change_reconverges_with_the_label_override(scratch_host: Host,
                                                          volume: ConfigMapVolume,
                                                          kube: FakeKube) -> None:
    clock = Clock()
    volume.publish(OVERRIDE)
    agent = make_agent(scratch_host, volume, kube, clock)
    agent.tick()
    assert live(scratch_host, "vm.swappiness") == "10"
    kube.set_labels("n1", {"role": "storage"})
    clock.now += 10
    agent.tick()
    assert live(scratch_host, "vm.swappiness") == "10", "labels are re-read every 30 s"
    clock.now += 25
    agent.tick()
    assert live(scratch_host, "vm.swappiness") == "1"


def test_labels_unreadable_after_a_converge_keep_the_node_ready(
        scratch_host: Host, volume: ConfigMapVolume, kube: FakeKube,
        caplog: pytest.LogCaptureFixture) -> None:
    """A failed re-read (the API server busy) changes nothing on the host: the node stays
    ready (a rolling update would replace an unready pod at once), keeps its labels, says so
    once, and reads them again on the next pass."""
    clock = Clock()
    volume.publish(OVERRIDE)
    agent = make_agent(scratch_host, volume, kube, clock)
    agent.tick()
    assert agent.ready
    node = kube.node_objects.pop("n1")
    for _ in range(3):
        clock.now += 35
        agent.tick()
        assert agent.ready and agent.labels == {"role": "compute"}
    assert sum("cannot re-read node labels" in r.getMessage() for r in caplog.records) == 1
    kube.node_objects["n1"] = node
    kube.set_labels("n1", {"role": "storage"})
    clock.now += 1
    agent.tick()
    assert agent.labels == {"role": "storage"} and live(scratch_host, "vm.swappiness") == "1"


def test_labels_unreadable_means_wait_not_guess(scratch_host: Host, volume: ConfigMapVolume
                                                ) -> None:
    clock = Clock()
    volume.publish(OVERRIDE)
    agent = make_agent(scratch_host, volume, FakeKube(), clock)  # the node is unknown: 404
    agent.tick()
    assert not agent.ready and "cannot read node labels" in agent.reason
    assert live(scratch_host, "vm.swappiness") == "60"


@pytest.mark.parametrize("mode", ["correct", "report"])
def test_drift_is_reported_and_corrected_unless_report_only(
        scratch_host: Host, volume: ConfigMapVolume, kube: FakeKube, mode: str) -> None:
    clock = Clock()
    volume.publish(f"drift: {mode}\n{DOC}")
    agent = make_agent(scratch_host, volume, kube, clock)
    agent.tick()
    scratch_host.proc_sys.joinpath("net/ipv4/ip_forward").write_text("0\n")  # someone's edit
    clock.now += 299
    agent.tick()
    assert live(scratch_host, "net.ipv4.ip_forward") == "0", "not checked before the interval"
    clock.now += 2
    agent.tick()
    drift = [e for e in kube.events("n1") if e["reason"] == "Drift"]
    assert len(drift) == 1 and "sysctl: net.ipv4.ip_forward" in drift[0]["message"]
    assert b'divingbell_drift_total{module="sysctl"} 1.0' in agent.metrics.render()
    assert live(scratch_host, "net.ipv4.ip_forward") == ("1" if mode == "correct" else "0")
    assert agent.ready


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_probes_and_metrics_over_http_with_the_loop_running(
        scratch_host: Host, volume: ConfigMapVolume, kube: FakeKube) -> None:
    volume.publish("conf:\n  sysctl:\n    kernel.osrelease: x\n")
    agent = make_agent(scratch_host, volume, kube, Clock(), poll_interval=0.05,
                       backoff_initial=3600)
    server = serve(agent, "127.0.0.1", 0)
    port = server.server_address[1]
    stop = threading.Event()
    loop = threading.Thread(target=agent.run, args=(stop,))
    loop.start()
    try:
        wait_for(lambda: agent.state == "Degraded")
        assert get(f"http://127.0.0.1:{port}/healthz") == (200, "ok\n")
        code, body = get(f"http://127.0.0.1:{port}/readyz")
        assert code == 503 and json.loads(body)["state"] == "Degraded"
        volume.publish(DOC)
        wait_for(lambda: agent.ready)
        code, body = get(f"http://127.0.0.1:{port}/readyz")
        assert code == 200 and json.loads(body)["revision"] == agent.revision
        code, metrics = get(f"http://127.0.0.1:{port}/metrics")
        assert code == 200
        assert f'divingbell_document_revision_info{{revision="{agent.revision}"}} 1.0' in metrics
        assert 'divingbell_changes_total{module="sysctl"} 2.0' in metrics
        assert 'divingbell_failures_total{module="sysctl"} 1.0' in metrics
        assert "divingbell_converge_duration_seconds_count 2.0" in metrics
        assert "divingbell_ready 1.0" in metrics
        assert get(f"http://127.0.0.1:{port}/nope")[0] == 404
    finally:
        stop.set()
        loop.join(5)
        server.shutdown()


def wait_for(condition: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(condition) and condition():
            return
        time.sleep(0.02)
    raise AssertionError("condition not reached in time")


def test_labels_file_format(tmp_path: Path) -> None:
    path = tmp_path / "labels"
    path.write_text("# roles\nrole = storage\n\nrack=r1\n")
    assert read_labels_file(path) == {"role": "storage", "rack": "r1"}
    path.write_text("role storage\n")
    with pytest.raises(ValueError, match="labels:1: expected KEY=VALUE"):
        read_labels_file(path)


@pytest.mark.kernel
def test_the_agent_process_converges_real_sysctls_in_a_namespace(
        netns: NetNs, tmp_path: Path, root: Path) -> None:
    volume = ConfigMapVolume(tmp_path / "configmap")
    volume.publish(OVERRIDE.replace("vm.swappiness", "net.ipv4.tcp_fin_timeout"))
    labels = tmp_path / "labels"
    labels.write_text("role=compute\n")
    agent = subprocess.Popen(
        ["ip", "netns", "exec", netns.name, sys.executable, "-m", "divingbell", "agent",
         str(volume.document), "--root", str(root), "--node", "n1", "--no-kube",
         "--labels-file", str(labels), "--listen", "127.0.0.1:9114", "--poll-interval", "0.1",
         "--label-interval", "0.1", "--follow-document-changes"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def probe(path: str) -> tuple[int, str]:
        code = ("import sys,urllib.request,urllib.error\ntry:\n r=urllib.request.urlopen("
                f"'http://127.0.0.1:9114{path}',timeout=2); print(r.status); print(r.read()."
                "decode())\nexcept urllib.error.HTTPError as e: print(e.code); print(e.read()."
                "decode())\nexcept OSError: print(0)")
        out = subprocess.run(["ip", "netns", "exec", netns.name, sys.executable, "-c", code],
                             capture_output=True, text=True, check=True).stdout
        status_line, _, body = out.partition("\n")
        return int(status_line), body

    try:
        wait_for(lambda: probe("/readyz")[0] == 200, timeout=20)
        assert netns.sysctl("net.ipv4.tcp_fin_timeout") == "10"
        labels.write_text("role=storage\n")
        wait_for(lambda: netns.sysctl("net.ipv4.tcp_fin_timeout") == "1", timeout=20)
        volume.publish("conf:\n  sysctl:\n    net.ipv4.tcp_fin_timeout: 33\n")
        wait_for(lambda: netns.sysctl("net.ipv4.tcp_fin_timeout") == "33", timeout=20)
        wait_for(lambda: probe("/readyz")[0] == 200, timeout=20)
        assert "divingbell_ready 1.0" in probe("/metrics")[1]
    finally:
        agent.send_signal(signal.SIGTERM)
        try:
            output, _ = agent.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            agent.kill()
            output, _ = agent.communicate()
    assert agent.returncode == 0, output
    assert "document changed" in output and "node labels changed" in output


def test_an_address_the_agent_cannot_listen_on_is_a_message(cli: Cli, tmp_path: Path) -> None:
    # A port taken by another process (a second agent, node-exporter on hostNetwork), a port
    # out of range or a name that does not resolve: one line naming --listen, not a traceback.
    document = tmp_path / "site.yaml"
    document.write_text("conf: {}\n")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for listen, code, message in [
                (f"127.0.0.1:{port}", 1,
                 f"cannot listen on 127.0.0.1:{port}: Address already in use"),
                ("127.0.0.1:99999", 2, "'127.0.0.1:99999' is not ADDR:PORT"),
                ("no-such-host.invalid:9114", 1, "cannot listen on no-such-host.invalid:9114")]:
            run = cli("agent", document, "--root", tmp_path, "--no-kube", "--listen", listen)
            assert run.returncode == code, (listen, run.stderr)
            assert message in run.stderr and "Traceback" not in run.stderr, listen


def test_a_kernel_trial_commits_only_when_the_kubernetes_node_is_ready(
        scratch_host: Host, volume: ConfigMapVolume, kube: FakeKube) -> None:
    """What the agent counts as healthy on a tried kernel line, where the host is a node."""
    clock = Clock()
    volume.publish(DOC)
    agent = make_agent(scratch_host, volume, kube, clock)
    problem = agent.unhealthy()
    assert problem is not None and problem.startswith("not converged")
    agent.tick()
    assert agent.ready, agent.reason
    kube.set_node_ready("n1", False)
    assert agent.unhealthy() == "the Kubernetes node is not Ready"
    kube.set_node_ready("n1", True)
    assert agent.unhealthy() is None
