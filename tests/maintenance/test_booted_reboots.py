"""The booted proof: two Debian hosts (systemd as PID 1 in systemd-nspawn) whose agents run as
the shipped systemd service in fleet mode, against a real fleet service (`divingbell serve`,
SQLite). Both need a reboot, concurrency 1: one reboots by the configured strategy while the
other waits; its container restarts it (the test is the power button), its agent finishes the
sequence after boot from the record it left, releases the slot, and only then does the second
go. Then a host that dies holding the slot loses it after the TTL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.booted import BootedHost, overlay
from tests.conftest import NetNs, require_root_tools
from tests.fleet.servers import ProcessServer, fresh_store, wait_for

pytestmark = pytest.mark.kernel
REPO = Path(__file__).resolve().parents[2]
DIVINGBELL = Path(sys.executable).with_name("divingbell")
REBOOTED = 133  # systemd-nspawn's exit status when the container asked for a reboot

DOC = """\
conf:
  limits:
    nofile: {{domain: root, type: soft, item: nofile, value: {fin}}}
  maintenance:
    reboot:
      strategy: reboot
      when: [reboot-required]
      concurrency: 1
      slot_ttl: {ttl}
      health: {{timeout: 3m}}
"""

FLEET_DROP_IN = """\
# Fleet mode: the configuration comes from the fleet service (see docs/fleet.md).
[Unit]
ConditionPathExists=
ConditionPathExists=/etc/divingbell/credential
[Service]
ExecStart=
ExecStart={divingbell} agent --server {url} --token-file /etc/divingbell/credential \\
    --root / --listen 127.0.0.1:9114 --poll-interval 0.5 --fleet-interval 1
RestartSec=1s
"""


@dataclass
class Host:
    """A booted node, and the power button: when its container exits because it rebooted,
    the watcher boots it again (unless told the host died)."""

    booted: BootedHost
    root: Path
    machine_id: str = ""
    exits: list[tuple[float, int]] = field(default_factory=list)
    comes_back: bool = True
    stop: threading.Event = field(default_factory=threading.Event)

    def watch(self) -> None:
        while not self.stop.is_set():
            process = self.booted.process
            code = process.poll() if process is not None else None
            if code is not None:
                self.exits.append((time.time(), code))
                self.booted.process = None
                if self.comes_back and code == REBOOTED:
                    self.booted.boot(timeout=60)
            time.sleep(0.1)

    def record(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(
                (self.root / "var/lib/divingbell/maintenance.json").read_text())
        except (OSError, ValueError):
            return {"phase": "idle"}
        return data

    def boot_id(self) -> str:
        return self.booted.run("cat", "/proc/sys/kernel/random/boot_id").stdout.strip()

    def needs_reboot(self) -> None:
        self.booted.run("sh", "-c", "echo '*** System restart required ***' "
                        "> /run/reboot-required")


def settle(hosts: list[Host], predicate: Any, timeout: float) -> None:
    """wait_for, and on a timeout the agents' own logs in the error."""
    try:
        wait_for(predicate, timeout=timeout, interval=0.3)
    except AssertionError as exc:
        logs = []
        for host in hosts:
            if host.booted.process is None:
                continue
            journal = host.booted.run("journalctl", "-u", "divingbell-agent", "--no-pager",
                                      "-n", "40", check=False)
            logs.append(f"--- {host.machine_id}: {host.record()}\n{journal.stdout[-4000:]}")
        raise AssertionError(f"{exc}\n" + "\n".join(logs)) from None


def in_ns(ns: NetNs, *args: str | Path) -> str:
    run = subprocess.run(["ip", "netns", "exec", ns.name, sys.executable, "-m", "divingbell",
                          *map(str, args)], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout


def make_ns(name: str) -> NetNs:
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    return NetNs(name)


@dataclass
class Lab:
    service: NetNs
    nodes: list[NetNs]
    prefix: str


@pytest.fixture
def lab() -> Iterator[Lab]:
    """The service's namespace with a bridge; each node's namespace on it by a veth pair."""
    require_root_tools("ip", "systemd-nspawn", "nsenter")
    tag = f"{os.getpid() % 10000}"
    octet = os.getpid() % 200 + 21
    service = make_ns(f"dbm-s{tag}")
    nodes: list[NetNs] = []
    try:
        s = service.name
        subprocess.run(["ip", "-n", s, "link", "add", "br0", "type", "bridge"], check=True)
        subprocess.run(["ip", "-n", s, "addr", "add", f"10.89.{octet}.1/24", "dev", "br0"],
                       check=True)
        subprocess.run(["ip", "-n", s, "link", "set", "br0", "up"], check=True)
        for i in range(2):
            ns = make_ns(f"dbm-n{tag}-{i}")
            nodes.append(ns)
            subprocess.run(["ip", "-n", s, "link", "add", f"vn{i}", "type", "veth", "peer",
                            "name", "eth0", "netns", ns.name], check=True)
            subprocess.run(["ip", "-n", s, "link", "set", f"vn{i}", "master", "br0", "up"],
                           check=True)
            subprocess.run(["ip", "-n", ns.name, "addr", "add", f"10.89.{octet}.{10 + i}/24",
                            "dev", "eth0"], check=True)
            subprocess.run(["ip", "-n", ns.name, "link", "set", "eth0", "up"], check=True)
        yield Lab(service, nodes, f"10.89.{octet}")
    finally:
        for ns in [*nodes, service]:
            subprocess.run(["ip", "netns", "del", ns.name], check=False)


def test_two_hosts_reboot_one_at_a_time_through_the_fleet_service(
        lab: Lab, debian_root: Path, tmp_path: Path) -> None:
    db_url, tokens = fresh_store(tmp_path)
    server = ProcessServer(db_url, host=f"{lab.prefix}.1", netns=lab.service.name,
                           args=("--control-plane-size", "1")).start(tmp_path / "serve.log")
    api = ("--server", server.url, "--token-file", tokens["admin"])
    doc = tmp_path / "site.yaml"
    doc.write_text(DOC.format(fin=4101, ttl="60s"))
    in_ns(lab.service, "fleet", "document", "push", doc, *api)

    hosts: list[Host] = []
    watchers: list[threading.Thread] = []
    try:
        for i, ns in enumerate(lab.nodes):
            root = overlay(debian_root, tmp_path / f"node{i}")
            etc = root / "etc/divingbell"
            etc.mkdir(parents=True)
            answer = json.loads(in_ns(
                ns, "discover", "--server", server.url, "--bootstrap-token-file",
                tokens["bootstrap"], "--credential-file", etc / "credential", "--uuid",
                f"00000000-0000-4000-8000-0000000001{i:02d}", "--hostname", f"node{i}",
                "--format", "json"))
            units = root / "etc/systemd/system"
            (units / "divingbell-agent.service").write_text(
                (REPO / "deploy/divingbell-agent.service").read_text())
            (units / "divingbell-agent.service.d").mkdir()
            (units / "divingbell-agent.service.d/fleet.conf").write_text(
                FLEET_DROP_IN.format(divingbell=DIVINGBELL, url=server.url))
            (units / "multi-user.target.wants").mkdir(exist_ok=True)
            (units / "multi-user.target.wants/divingbell-agent.service").symlink_to(
                "../divingbell-agent.service")
            booted = BootedHost(root, f"dbm-{os.getpid() % 10000}-{i}", ns.name,
                                binds=[sys.base_prefix, str(REPO)])
            booted.boot(timeout=60)
            host = Host(booted, root, answer["machine_id"])
            hosts.append(host)
            watchers.append(threading.Thread(target=host.watch, daemon=True))
            watchers[-1].start()

        def machines() -> dict[str, dict[str, Any]]:
            rows = json.loads(in_ns(lab.service, "fleet", "machines", *api, "--format", "json"))
            return {m["id"]: m for m in rows}

        def up_to_date(revision: int) -> bool:
            rows = machines()
            return all(rows[h.machine_id]["up_to_date"] and rows[h.machine_id]["revision"]
                       == revision for h in hosts)

        settle(hosts, lambda: up_to_date(1), 120)
        before = [h.boot_id() for h in hosts]
        assert all(before) and before[0] != before[1]

        # Both need a reboot; concurrency 1.
        for host in hosts:
            host.needs_reboot()
        seen: list[tuple[str, str, str]] = []

        def both_done() -> bool:
            records = [h.record() for h in hosts]
            for host, record in zip(hosts, records, strict=True):
                seen.append((host.machine_id, record["phase"], record.get("reason", "")))
            busy = [r for r in records if r["phase"] in ("cordoning", "draining", "rebooting",
                                                         "verifying")]
            assert len(busy) <= 1, records  # never two hosts in maintenance at once
            return all(r["phase"] == "idle" and r.get("outcome", "").startswith("rebooted")
                       for r in records)

        settle(hosts, both_done, 300)
        records = [h.record() for h in hosts]
        for host, record in zip(hosts, records, strict=True):
            print(f"{host.machine_id}: {record['outcome']}")  # the figures, with -s
        first, second = sorted(records, key=lambda r: r["started_at"])
        assert first["finished_at"] <= second["started_at"]  # the second went only then
        waiter = hosts[records.index(second)].machine_id
        holder = hosts[records.index(first)].machine_id
        assert any(m == waiter and phase == "waiting" and
                   reason.startswith(f"waiting for a slot in group 'default' (default/0 by "
                                     f"{holder}") for m, phase, reason in seen), seen
        for host, old, record in zip(hosts, before, records, strict=True):
            assert [code for _, code in host.exits] == [REBOOTED]  # exactly one reboot each
            assert host.boot_id() not in ("", old)
            assert record["boot_id"] == old  # recorded before going down
            assert not (host.root / "run/reboot-required").exists()
        slots = json.loads(in_ns(lab.service, "node", "status", "--no-kube", *api,
                                 "--format", "json"))
        assert slots["slots"] == []  # released
        assert up_to_date(1)  # converged again after the reboot

        # A host that dies holding the slot loses it after the TTL.
        doc.write_text(DOC.format(fin=4102, ttl="10s"))
        in_ns(lab.service, "fleet", "document", "push", doc, *api)
        settle(hosts, lambda: up_to_date(2), 120)
        dead, survivor = hosts
        dead.comes_back = False
        dead.needs_reboot()
        settle(hosts, lambda: len(dead.exits) == 2, 120)
        held = json.loads(in_ns(lab.service, "node", "status", "--no-kube", *api,
                                "--format", "json"))["slots"]
        assert [(s["slot"], s["holder"]) for s in held] == [("default/0", dead.machine_id)]
        survivor.needs_reboot()
        settle(hosts, lambda: (survivor.record().get("finished_at") or 0)
               > dead.record()["reboot_at"], 300)
        taken = survivor.record()
        assert taken["started_at"] >= dead.record()["started_at"] + 10  # not before the TTL
        assert taken["outcome"].endswith(f"the slot was taken over from {dead.machine_id}")
        assert [code for _, code in survivor.exits] == [REBOOTED, REBOOTED]

        # The dead host comes back: its agent finishes from the record it left.
        dead.booted.boot(timeout=60)
        settle(hosts, lambda: dead.record()["phase"] == "idle", 120)
        assert "the slot was no longer ours" in dead.record()["outcome"]
    finally:
        for host in hosts:
            host.stop.set()
        for watcher in watchers:
            watcher.join(timeout=90)
        for host in hosts:
            host.booted.poweroff()
        server.stop()
        for i in range(len(lab.nodes)):
            subprocess.run(["umount", "-R", "-l", str(tmp_path / f"node{i}")], check=False)
