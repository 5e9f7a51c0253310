"""Real agents in fleet mode, each in its own network namespace, joined over veth to the
service running in a namespace of its own (nothing touches this machine's network): each
registers with `divingbell discover`, converges its namespace's real sysctls from the
configuration the service resolved for it, and reports; a new revision makes them outdated,
then up to date again. Operators' commands run for real too (`divingbell fleet ...`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import NetNs, require_root_tools
from tests.fleet.servers import ProcessServer, fresh_store, stop_processes, wait_for

AGENTS = 3

DOC = """\
conf:
  sysctl:
    net.ipv4.tcp_fin_timeout: {base}
    net.ipv4.tcp_keepalive_probes: 7
  overrides:
    divingbell_sysctl:
      labels:
        - label:
            key: divingbell.io/role
            values: [worker]
          conf:
            sysctl:
              net.ipv4.tcp_fin_timeout: {worker}
"""


def _ns(name: str) -> NetNs:
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    return NetNs(name)


@dataclass
class Lab:
    service_ns: NetNs
    agent_ns: list[NetNs]
    prefix: str


@contextmanager
def network_lab(agents: int, tag: str, subnet: int) -> Iterator[Lab]:
    """A service namespace with a bridge at 10.<subnet>.<octet>.1; `agents` namespaces on it,
    each through a veth pair, with a default route to the service. Removed on exit."""
    require_root_tools("ip", "sysctl")
    pid = os.getpid()
    service = _ns(f"{tag}-s{pid % 10000}")
    members: list[NetNs] = []
    octet = pid % 200 + 20
    gateway = f"10.{subnet}.{octet}.1"
    try:
        s = service.name
        subprocess.run(["ip", "-n", s, "link", "add", "br0", "type", "bridge"], check=True)
        subprocess.run(["ip", "-n", s, "addr", "add", f"{gateway}/24", "dev", "br0"], check=True)
        subprocess.run(["ip", "-n", s, "link", "set", "br0", "up"], check=True)
        for i in range(agents):
            ns = _ns(f"{tag}-a{pid % 10000}-{i}")
            members.append(ns)
            subprocess.run(["ip", "-n", s, "link", "add", f"v{tag}{i}", "type", "veth", "peer",
                            "name", "eth0", "netns", ns.name], check=True)
            subprocess.run(["ip", "-n", s, "link", "set", f"v{tag}{i}", "master", "br0", "up"],
                           check=True)
            subprocess.run(["ip", "-n", ns.name, "addr", "add",
                            f"10.{subnet}.{octet}.{10 + i}/24", "dev", "eth0"], check=True)
            subprocess.run(["ip", "-n", ns.name, "link", "set", "eth0", "up"], check=True)
            subprocess.run(["ip", "-n", ns.name, "route", "add", "default", "via", gateway],
                           check=True)
        yield Lab(service, members, f"10.{subnet}.{octet}")
    finally:
        for ns in [*members, service]:
            subprocess.run(["ip", "netns", "del", ns.name], check=False)


@pytest.fixture
def lab() -> Iterator[Lab]:
    with network_lab(AGENTS, "dbf", 88) as made:
        yield made


def divingbell(ns: NetNs, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns.name, sys.executable, "-m", "divingbell",
                           *map(str, args)], capture_output=True, text=True, check=False)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.kernel
def test_agents_in_fleet_mode_converge_report_and_follow_new_revisions(
        lab: Lab, tmp_path: Path) -> None:
    db_url, tokens = fresh_store(tmp_path)
    server = ProcessServer(db_url, host=f"{lab.prefix}.1", netns=lab.service_ns.name,
                           args=("--control-plane-size", "1")).start(tmp_path / "serve.log")
    api = ("--server", server.url, "--token-file", tokens["admin"])
    agents: list[subprocess.Popen[str]] = []
    try:
        doc = tmp_path / "site.yaml"
        doc.write_text(DOC.format(base=30, worker=12))
        assert "revision 1 stored" in ok(divingbell(lab.service_ns, "fleet", "document", "push",
                                                    doc, *api))
        ids = []
        for i, ns in enumerate(lab.agent_ns):
            root = tmp_path / f"root{i}"
            root.mkdir()
            out = ok(divingbell(ns, "discover", "--server", server.url, "--bootstrap-token-file",
                                tokens["bootstrap"], "--credential-file", root / "credential",
                                "--uuid", f"00000000-0000-4000-8000-00000000000{i}",
                                "--hostname", f"node{i}", "--format", "json"))
            ids.append(json.loads(out)["machine_id"])
            assert (root / "credential").stat().st_mode & 0o777 == 0o600
            agents.append(subprocess.Popen(
                ["ip", "netns", "exec", ns.name, sys.executable, "-m", "divingbell", "agent",
                 "--server", server.url, "--token-file", str(root / "credential"),
                 "--root", str(root), "--listen", "127.0.0.1:9114", "--poll-interval", "0.2",
                 "--fleet-interval", "0.3"],
                stdout=(tmp_path / f"agent{i}.log").open("w"), stderr=subprocess.STDOUT,
                text=True, start_new_session=True))

        def machines() -> list[dict[str, Any]]:
            rows: list[dict[str, Any]] = json.loads(ok(divingbell(
                lab.service_ns, "fleet", "machines", *api, "--format", "json")))
            return rows

        def all_up_to_date(revision: int) -> bool:
            rows = machines()
            return len(rows) == AGENTS and all(
                m["up_to_date"] and m["revision"] == revision and m["state"] == "ready"
                for m in rows)

        wait_for(lambda: all_up_to_date(1), timeout=60, interval=0.5)
        roles = {m["id"]: m["roles"] for m in machines()}
        assert sorted(r[0] for r in roles.values()) == ["control-plane", "worker", "worker"]
        for machine_id, ns in zip(ids, lab.agent_ns, strict=True):
            expected = "30" if roles[machine_id] == ["control-plane"] else "12"
            assert ns.sysctl("net.ipv4.tcp_fin_timeout") == expected
            assert ns.sysctl("net.ipv4.tcp_keepalive_probes") == "7"
        detail = json.loads(ok(divingbell(lab.service_ns, "fleet", "machine", ids[0], *api,
                                          "--format", "json")))
        report = detail["reports"][0]
        assert report["state"] == "converged" and report["revision"] == 1
        assert report["modules"]["sysctl"]["changes"] >= 1
        assert report["boot_id"]

        # Freeze the agents, push a new revision: every machine is outdated until they
        # fetch and converge it.
        for agent in agents:
            os.killpg(agent.pid, signal.SIGSTOP)
        doc.write_text(DOC.format(base=31, worker=13))
        ok(divingbell(lab.service_ns, "fleet", "document", "push", doc, *api))
        text_status = divingbell(lab.service_ns, "fleet", "status", *api)
        assert text_status.returncode == 1, text_status.stderr  # outdated machines: exit 1
        assert f"outdated: {AGENTS}" in text_status.stdout
        status = json.loads(ok(divingbell(lab.service_ns, "fleet", "status", *api, "--format",
                                          "json")))
        assert status["outdated"] == AGENTS and status["up_to_date"] == 0
        assert status["active_revision"] == 2
        for agent in agents:
            os.killpg(agent.pid, signal.SIGCONT)
        wait_for(lambda: all_up_to_date(2), timeout=60, interval=0.5)
        for machine_id, ns in zip(ids, lab.agent_ns, strict=True):
            expected = "31" if roles[machine_id] == ["control-plane"] else "13"
            assert ns.sysctl("net.ipv4.tcp_fin_timeout") == expected
        history = [h["to"] for h in json.loads(ok(divingbell(
            lab.service_ns, "fleet", "machine", ids[1], *api, "--format", "json")))["history"]]
        assert history[-2:] == ["updating", "ready"]

        # Registering again updates the facts with the machine's own credential (enrolment
        # happens once: the credential stays).
        root0 = tmp_path / "root0"
        discover0 = ("discover", "--server", server.url, "--bootstrap-token-file",
                     tokens["bootstrap"], "--credential-file", root0 / "credential", "--uuid",
                     "00000000-0000-4000-8000-000000000000", "--hostname", "node0")
        before = (root0 / "credential").read_text()
        ok(divingbell(lab.agent_ns[0], *discover0))
        assert (root0 / "credential").read_text() == before
        # An admin allows a new enrolment (a reinstall): the old credential is revoked, the
        # next discover enrols with the bootstrap token, and the running agent picks the new
        # credential up from its file when the old one is refused, following the next
        # revision too.
        assert "may enrol it again" in ok(divingbell(lab.service_ns, "fleet", "reenroll",
                                                     ids[0], *api))
        again = divingbell(lab.agent_ns[0], *discover0)
        assert again.returncode == 0, again.stderr
        assert "was revoked: enrolling with the bootstrap token" in again.stderr
        assert (root0 / "credential").read_text() != before
        doc.write_text(DOC.format(base=32, worker=14))
        ok(divingbell(lab.service_ns, "fleet", "document", "push", doc, *api))
        wait_for(lambda: all_up_to_date(3), timeout=60, interval=0.5)
        assert "changed (the machine registered again)" in (tmp_path / "agent0.log").read_text()
    finally:
        stop_processes(agents)
        server.stop()
