"""A rollout through six real agents in fleet mode, each in its own network namespace: a
revision that fails on the third machine (by a host override) halts the rollout there, and the
machines after it are untouched on their hosts; the fixed revision, once resumed, completes."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import NetNs
from tests.fleet.servers import ProcessServer, fresh_store, stop_processes, wait_for
from tests.fleet.test_fleet_agents import Lab, divingbell, network_lab, ok

AGENTS = 6

GOOD = """\
conf:
  sysctl:
    net.ipv4.tcp_fin_timeout: {value}
"""
# A host override that cannot converge on that host: the kernel has no such key.
BROKEN = GOOD + """\
  overrides:
    divingbell_sysctl:
      hosts:
        - name: {host}
          conf:
            sysctl:
              net.ipv4.no_such_setting: 1
"""


@pytest.fixture
def six() -> Iterator[Lab]:
    with network_lab(AGENTS, "dbr", 89) as made:
        yield made


@pytest.mark.kernel
def test_a_failing_revision_halts_at_the_third_machine_and_the_fix_completes(
        six: Lab, tmp_path: Path) -> None:
    db_url, tokens = fresh_store(tmp_path)
    server = ProcessServer(db_url, host=f"{six.prefix}.1", netns=six.service_ns.name,
                           args=("--control-plane-size", "1")).start(tmp_path / "serve.log")
    api = ("--server", server.url, "--token-file", tokens["admin"])
    agents: list[subprocess.Popen[str]] = []

    def fleet(*args: str | Path) -> str:
        return ok(divingbell(six.service_ns, "fleet", *args, *api))

    def fleet_json(*args: str | Path) -> Any:
        return json.loads(fleet(*args, "--format", "json"))

    try:
        doc = tmp_path / "site.yaml"
        doc.write_text(GOOD.format(value=30))
        fleet("document", "push", doc)
        hosts: dict[str, NetNs] = {}
        for i, ns in enumerate(six.agent_ns):
            root = tmp_path / f"root{i}"
            root.mkdir()
            ok(divingbell(ns, "discover", "--server", server.url, "--bootstrap-token-file",
                          tokens["bootstrap"], "--credential-file", root / "credential",
                          "--uuid", f"00000000-0000-4000-8000-0000000001{i:02d}",
                          "--hostname", f"node{i}", "--format", "json"))
            hosts[f"node{i}"] = ns
            agents.append(subprocess.Popen(
                ["ip", "netns", "exec", ns.name, sys.executable, "-m", "divingbell", "agent",
                 "--server", server.url, "--token-file", str(root / "credential"),
                 "--root", str(root), "--listen", "127.0.0.1:9114", "--poll-interval", "0.2",
                 "--fleet-interval", "0.3"],
                stdout=(tmp_path / f"agent{i}.log").open("w"), stderr=subprocess.STDOUT,
                text=True, start_new_session=True))

        def machines() -> list[dict[str, Any]]:
            rows: list[dict[str, Any]] = fleet_json("machines")
            return rows

        def converged(revision: int) -> bool:
            rows = machines()
            return len(rows) == AGENTS and all(
                m["revision"] == revision and m["state"] == "ready" for m in rows)

        wait_for(lambda: converged(1), timeout=90, interval=0.5)
        by_name = {m["hostname"]: m for m in machines()}
        control = [n for n, m in by_name.items() if "control-plane" in m["roles"]]
        workers = sorted(n for n in by_name if n not in control)
        order = control + workers  # the rollout's order: quorum first, then workers by name
        third = order[2]

        # The broken revision: converges on the first two machines, fails on the third.
        doc.write_text(BROKEN.format(value=31, host=third))
        fleet("document", "push", doc)

        def rollout() -> dict[str, Any]:
            result = divingbell(six.service_ns, "fleet", "rollout", "status", *api,
                                "--format", "json")
            assert result.returncode in (0, 1), result.stderr
            data: dict[str, Any] = json.loads(result.stdout)
            return data

        wait_for(lambda: rollout()["status"] == "halted", timeout=90, interval=0.5)
        halted = rollout()
        assert third in halted["halt_reason"] and "no_such_setting" in halted["halt_reason"]
        status = divingbell(six.service_ns, "fleet", "rollout", "status", *api)
        assert status.returncode == 1 and "HALTED" in status.stdout
        for name in order[:2]:
            assert hosts[name].sysctl("net.ipv4.tcp_fin_timeout") == "31"
        for name in order[3:]:  # untouched, on their hosts
            assert hosts[name].sysctl("net.ipv4.tcp_fin_timeout") == "30"
            assert by_name[name]["id"] in {m["id"] for wave in halted["waves"] for m in wave
                                           if m["progress"] == "pending"}
        # stays halted: nothing moves while the operator looks
        wait_for(lambda: all(hosts[n].sysctl("net.ipv4.tcp_fin_timeout") == "30"
                             for n in order[3:]), timeout=2)

        # The fix: a new revision, which waits for `resume` after a halt.
        doc.write_text(GOOD.format(value=31))
        fleet("document", "push", doc)
        assert rollout()["status"] == "paused"
        plan = fleet_json("rollout", "plan", "3")
        assert plan["changed"] == 4  # the three untouched machines and the failed one
        fleet("rollout", "resume")
        wait_for(lambda: rollout()["status"] == "completed", timeout=120, interval=0.5)
        wait_for(lambda: converged(3), timeout=60, interval=0.5)
        for name in order:
            assert hosts[name].sysctl("net.ipv4.tcp_fin_timeout") == "31"
        history = fleet_json("rollout", "history")
        assert [r["status"] for r in history[:3]] == ["completed", "aborted", "completed"]
    finally:
        stop_processes(agents)
        server.stop()
