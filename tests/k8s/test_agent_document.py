"""The agent in a pod: a node sees a new document only when its pod is replaced. Files that
change under a running agent, the way the kubelet re-projects a volume (a new `..<timestamp>`
directory and an atomic `..data` symlink swap), are reported and ignored unless the operator
chose --follow-document-changes; labels, drift and retries keep using the document the pod
started with. Also: the pod's document digest, the converge log line, and /healthz failing
while a converge is stuck (a real held host lock)."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from divingbell.agent.loop import Agent, AgentSettings, configure_logging, serve
from divingbell.agent.manifests import document_digest
from divingbell.core.engine.lock import host_lock
from divingbell.core.host import Host
from divingbell.kube import FakeKube, LightkubeApi
from tests.conftest import NetNs
from tests.test_agent import DOC, OVERRIDE, Clock, ConfigMapVolume, get, live, wait_for


@pytest.fixture
def volume(tmp_path: Path) -> ConfigMapVolume:
    return ConfigMapVolume(tmp_path / "document")


@pytest.fixture
def kube() -> FakeKube:
    fake = FakeKube()
    fake.add_node("n1", {"role": "compute"})
    return fake


def pinned_agent(host: Host, volume: ConfigMapVolume, kube: FakeKube | None, clock: Clock,
                 **settings: object) -> Agent:
    config = AgentSettings([volume.document], "n1", host, lock_timeout=1.0)
    for name, value in settings.items():
        setattr(config, name, value)
    return Agent(config, kube, clock)


def test_a_swapped_document_is_not_converged_by_the_running_agent(
        scratch_host: Host, volume: ConfigMapVolume, kube: FakeKube) -> None:
    clock = Clock()
    volume.publish(DOC)
    agent = pinned_agent(scratch_host, volume, kube, clock)
    agent.tick()
    assert agent.ready and live(scratch_host, "net.ipv4.ip_forward") == "1"
    started_with = agent.revision

    volume.publish(DOC.replace(": 1", ": 0"))  # the kubelet's ..data swap
    for _ in range(3):
        clock.now += 2
        agent.tick()
    assert live(scratch_host, "net.ipv4.ip_forward") == "1"
    assert agent.ready and agent.revision == started_with
    assert kube.node_objects["n1"].status["revision"] == started_with
    ignored = [e for e in kube.events("n1") if e["reason"] == "DocumentChangeIgnored"]
    assert len(ignored) == 1 and ignored[0]["count"] == 1, "reported once, not every pass"
    assert ignored[0]["type"] == "Warning"

    # A new pod (a new agent process) on the same node takes the new document.
    replacement = pinned_agent(scratch_host, volume, kube, clock)
    replacement.tick()
    assert replacement.ready and live(scratch_host, "net.ipv4.ip_forward") == "0"


def test_labels_drift_and_retries_use_the_document_the_pod_started_with(
        scratch_host: Host, volume: ConfigMapVolume, kube: FakeKube) -> None:
    clock = Clock()
    volume.publish(OVERRIDE)
    agent = pinned_agent(scratch_host, volume, kube, clock)
    agent.tick()
    assert live(scratch_host, "vm.swappiness") == "10"
    volume.publish("conf:\n  sysctl:\n    vm.swappiness: 33\n")  # no label override any more
    kube.set_labels("n1", {"role": "storage"})
    clock.now += 31
    agent.tick()
    assert live(scratch_host, "vm.swappiness") == "1", "the pinned document's label override"
    scratch_host.proc_sys.joinpath("vm/swappiness").write_text("60\n")  # drift
    clock.now += 301
    agent.tick()
    assert live(scratch_host, "vm.swappiness") == "1", "corrected to the pinned document"


def test_a_pinned_agent_with_an_unreadable_volume_keeps_its_document(
        scratch_host: Host, volume: ConfigMapVolume, kube: FakeKube) -> None:
    clock = Clock()
    volume.publish(DOC)
    agent = pinned_agent(scratch_host, volume, kube, clock)
    agent.tick()
    (volume.base / "..data").unlink()
    scratch_host.proc_sys.joinpath("net/ipv4/ip_forward").write_text("0\n")
    clock.now += 301
    agent.tick()
    assert live(scratch_host, "net.ipv4.ip_forward") == "1" and agent.ready


def test_the_agent_refuses_a_document_its_pod_was_not_made_for(
        scratch_host: Host, volume: ConfigMapVolume, kube: FakeKube) -> None:
    clock = Clock()
    volume.publish(DOC)
    expected = document_digest({"doc.yaml": DOC.replace(": 1", ": 0")})
    agent = pinned_agent(scratch_host, volume, kube, clock, expected_digest=expected)
    agent.tick()
    assert not agent.ready and live(scratch_host, "net.ipv4.ip_forward") == "0"
    assert f"is not the one this pod was made for ({expected})" in agent.reason
    assert agent.reason.startswith("refusing") and "Nothing was changed" in agent.reason
    volume.publish(DOC.replace(": 1", ": 0"))  # the kubelet catches up
    clock.now += 2
    agent.tick()
    assert agent.ready and live(scratch_host, "net.ipv4.ip_forward") == "0"


def test_healthz_fails_while_a_converge_is_stuck_past_its_budget(
        scratch_host: Host, volume: ConfigMapVolume, kube: FakeKube) -> None:
    volume.publish(DOC)
    agent = pinned_agent(scratch_host, volume, kube, Clock(), poll_interval=0.05,
                         lock_timeout=60.0, converge_timeout=0.2)
    server = serve(agent, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.server_address[1]}/healthz"
    stop = threading.Event()
    loop = threading.Thread(target=agent.run, args=(stop,))
    try:
        with host_lock(scratch_host):  # another run holds the host: the converge waits
            loop.start()
            wait_for(lambda: get(url)[0] == 503, timeout=20)
            code, body = get(url)
            assert code == 503 and body.startswith("stuck: converge of revision ")
            assert "budget" in body and not agent.ready
        wait_for(lambda: agent.ready, timeout=20)
        assert get(url) == (200, "ok\n")
    finally:
        stop.set()
        loop.join(10)
        server.shutdown()


def test_healthz_fails_when_no_pass_finished_for_five_minutes(
        scratch_host: Host, volume: ConfigMapVolume) -> None:
    volume.publish(DOC)
    elapsed = Clock()
    agent = Agent(AgentSettings([volume.document], "n1", scratch_host), None, Clock(),
                  monotonic=elapsed)
    server = serve(agent, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.server_address[1]}/healthz"
    try:
        agent.tick()
        elapsed.now += 299
        assert get(url) == (200, "ok\n")
        elapsed.now += 2
        assert get(url) == (503, "stuck: no agent pass for 301s\n")
        agent.tick()
        assert get(url) == (200, "ok\n")
    finally:
        server.shutdown()


def test_converge_budget_counts_the_documents_own_waits(scratch_host: Host) -> None:
    from divingbell.agent.loop import converge_budget
    from divingbell.core.document.api import node_config
    from divingbell.core.document.loader import load_text
    from divingbell.core.document.validate import validate

    document = validate(load_text(
        "conf:\n  exec:\n    a.sh: {data: 'x', timeout: 100}\n    b.sh: {data: 'x', "
        "timeout: 200}\n  apt:\n    dpkg_lock_timeout: 50\n"))
    config = node_config(document, "n1", {})
    settings = AgentSettings([], "n1", scratch_host, lock_timeout=60, stuck_margin=1000)
    assert converge_budget(config, settings) == 1000 + 60 + 100 + 200 + 50
    settings.converge_timeout = 7
    assert converge_budget(config, settings) == 7


def test_kubernetes_requests_are_logged_only_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    from tests.test_kube import ApiStub

    stub = ApiStub()
    saved = {name: logging.getLogger(name).level for name in ("", "divingbell")}
    try:
        api = LightkubeApi(server=stub.url)
        configure_logging("info")
        api.node_labels("n1")
        assert not [r for r in caplog.records if "HTTP Request" in r.getMessage()]
        logging.getLogger("divingbell.agent").info("converged")
        assert [r.getMessage() for r in caplog.records] == ["converged"]
        configure_logging("debug")
        api.node_labels("n1")
        assert any("GET" in r.getMessage() and "/api/v1/nodes/n1" in r.getMessage()
                   for r in caplog.records if r.levelno == logging.INFO)
    finally:
        stub.server.shutdown()
        for name, level in saved.items():
            logging.getLogger(name or None).setLevel(level)


@pytest.fixture
def agent_log(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "agent.log"


@pytest.mark.kernel
def test_the_agent_process_ignores_a_volume_swap_until_its_pod_is_replaced(
        netns: NetNs, tmp_path: Path, root: Path, agent_log: Path) -> None:
    volume = ConfigMapVolume(tmp_path / "document")
    volume.publish("conf:\n  sysctl:\n    net.ipv4.tcp_fin_timeout: 21\n")

    def start(log: Path) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            ["ip", "netns", "exec", netns.name, sys.executable, "-m", "divingbell", "agent",
             str(volume.document), "--root", str(root), "--node", "n1", "--no-kube",
             "--listen", "127.0.0.1:9114", "--poll-interval", "0.1"],
            stdout=log.open("wb"), stderr=subprocess.STDOUT)

    def stop(process: subprocess.Popen[bytes]) -> None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    agent = start(agent_log)
    try:
        wait_for(lambda: "converged: sysctl" in agent_log.read_text(), timeout=20)
        assert netns.sysctl("net.ipv4.tcp_fin_timeout") == "21"
        volume.publish("conf:\n  sysctl:\n    net.ipv4.tcp_fin_timeout: 42\n")
        wait_for(lambda: "changed under the running agent" in agent_log.read_text(), timeout=20)
        # Several more passes after it noticed, and still the document it started with.
        mark = agent_log.stat().st_size
        time.sleep(0.5)
        assert netns.sysctl("net.ipv4.tcp_fin_timeout") == "21"
        assert "converged" not in agent_log.read_text()[mark:]
    finally:
        stop(agent)
    assert agent.returncode == 0, agent_log.read_text()
    text = agent_log.read_text()
    line = next(x for x in text.splitlines() if "converged: sysctl" in x)
    assert " INFO divingbell.agent: revision " in line and "sysctl 2 change(s) in " in line

    replacement_log = tmp_path / "replacement.log"
    replacement = start(replacement_log)  # the rollout replaced the pod
    try:
        wait_for(lambda: netns.sysctl("net.ipv4.tcp_fin_timeout") == "42", timeout=20)
    finally:
        stop(replacement)
    assert replacement.returncode == 0, replacement_log.read_text()
