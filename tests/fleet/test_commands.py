"""The operators' commands for real: tokens, backup, export/import, serve over TLS, and
discover on a real network namespace."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from divingbell.fleet.client import FleetApiError, FleetClient, read_token
from divingbell.fleet.facts import parse_ip_addr, parse_ip_route, parse_lldp
from divingbell.fleet.settings import FleetSettings
from tests.conftest import Cli, NetNs
from tests.fleet.servers import PostgresCluster, ProcessServer, thread_server
from tests.fleet.test_api import DOC, facts, seed_machines


def test_tokens_are_shown_once_stored_hashed_listed_and_revoked(cli: Cli, tmp_path: Path
                                                                ) -> None:
    db = f"sqlite:///{tmp_path / 'fleet.db'}"
    made = cli("fleet", "token", "create", "--role", "admin", "--db", db, "--description",
               "ops", "--format", "json")
    assert made.returncode == 0, made.stderr
    token = json.loads(made.stdout)["token"]
    assert token.startswith("dbt_")
    assert (tmp_path / "fleet.db").stat().st_mode & 0o777 == 0o600
    stored = sqlite3.connect(tmp_path / "fleet.db").execute(
        "SELECT secret_hash FROM tokens").fetchall()
    assert len(stored) == 1 and token.split("_", 2)[2] not in stored[0][0]
    listed = cli("fleet", "token", "list", "--db", db)
    assert "ops" in listed.stdout and "admin" in listed.stdout
    assert token not in listed.stdout
    short = cli("fleet", "token", "create", "--role", "reader", "--db", db, "--ttl", "1h")
    assert short.returncode == 0 and short.stdout.startswith("dbt_")
    bad = cli("fleet", "token", "create", "--role", "reader", "--db", db, "--ttl", "soon")
    assert bad.returncode == 2 and "not a duration" in bad.stderr
    with thread_server(FleetSettings(db_url=db)) as server:
        client = FleetClient(server.url, token)
        assert client.machines() == []
        token_id = json.loads(made.stdout)["id"]
        assert cli("fleet", "token", "revoke", token_id, "--db", db).returncode == 0
        with pytest.raises(FleetApiError) as info:
            client.machines()
        assert info.value.status == 401
    assert cli("fleet", "token", "revoke", "nope", "--db", db).returncode == 1


def test_token_files_readable_by_others_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "admin.token"
    path.write_text("dbt_a_b\n")
    path.chmod(0o644)
    with pytest.raises(FleetApiError, match="readable by others"):
        read_token(path)
    path.chmod(0o600)
    assert read_token(path) == "dbt_a_b"


def test_export_from_sqlite_imports_into_postgresql_and_machines_keep_working(
        cli: Cli, tmp_path: Path, postgres: PostgresCluster) -> None:
    source = f"sqlite:///{tmp_path / 'fleet.db'}"
    with thread_server(FleetSettings(db_url=source, control_plane_size=1)) as server:
        registered = server.bootstrap.discover(facts(1))
        server.bootstrap.discover(facts(2))
        server.admin.push_document(DOC.encode(), "site.yaml")
        server.admin.push_document(DOC.replace("30", "35").encode(), "site.yaml")
        server.admin.activate(1)
    exported = tmp_path / "export.json"
    assert cli("fleet", "export", "--db", source, "-o", exported).returncode == 0
    assert exported.stat().st_mode & 0o777 == 0o600
    data = json.loads(exported.read_text())
    assert registered["credential"].split("_", 2)[2] not in exported.read_text()
    assert [r["number"] for r in data["tables"]["revisions"]] == [1, 2]
    target = postgres.create_database()
    result = cli("fleet", "import", exported, "--db", target)
    assert result.returncode == 0, result.stderr
    assert "revisions 2" in result.stdout and "machines 2" in result.stdout
    again = cli("fleet", "import", exported, "--db", target)  # replayable: no duplicates
    assert again.returncode == 0 and "all already there" in again.stdout
    with thread_server(FleetSettings(db_url=target, control_plane_size=1)) as server:
        machine = FleetClient(server.url, registered["credential"])
        assert machine.machine(registered["machine_id"])["roles"] == ["control-plane"]
        assert machine.config(registered["machine_id"]).revision == 1
        assert [r["revision"] for r in server.admin.revisions()] == [1, 2]


def test_backup_of_sqlite_and_postgresql(cli: Cli, tmp_path: Path,
                                         postgres: PostgresCluster) -> None:
    source = f"sqlite:///{tmp_path / 'fleet.db'}"
    with thread_server(FleetSettings(db_url=source)) as server:
        server.bootstrap.discover(facts(1))
        copy = tmp_path / "backup.db"
        result = cli("fleet", "backup", copy, "--db", source)  # while the service runs
        assert result.returncode == 0, result.stderr
    assert copy.stat().st_mode & 0o777 == 0o600
    assert sqlite3.connect(copy).execute("SELECT count(*) FROM machines").fetchone() == (1,)
    pg = postgres.create_database()
    assert cli("fleet", "migrate", "--db", pg).returncode == 0
    dump = tmp_path / "fleet.dump"
    result = cli("fleet", "backup", dump, "--db", pg)
    assert result.returncode == 0, result.stderr
    assert dump.read_bytes().startswith(b"PGDMP")
    assert dump.stat().st_mode & 0o777 == 0o600


def test_serve_over_tls(tmp_path: Path, cli: Cli) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext",
                    "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    db = f"sqlite:///{tmp_path / 'fleet.db'}"
    made = cli("fleet", "token", "create", "--role", "reader", "--db", db)
    server = ProcessServer(db, args=("--tls-cert", str(cert), "--tls-key", str(key)),
                           scheme="https", ca_file=str(cert)).start(tmp_path / "serve.log")
    try:
        client = FleetClient(server.url, made.stdout.strip(), ca_file=str(cert))
        assert client.machines() == []
        with pytest.raises(FleetApiError):  # the system CAs do not trust it
            FleetClient(server.url, made.stdout.strip()).machines()
    finally:
        server.stop()
    assert made.stdout.strip() not in (tmp_path / "serve.log").read_text()


def test_discover_reads_a_real_namespace(ns_cli: Cli, netns: NetNs) -> None:
    ns = netns.name
    subprocess.run(["ip", "-n", ns, "link", "add", "eth7", "address", "52:54:00:ab:cd:07",
                    "type", "veth", "peer", "name", "eth8"], check=True)
    subprocess.run(["ip", "-n", ns, "addr", "add", "10.9.8.7/24", "dev", "eth7"], check=True)
    subprocess.run(["ip", "-n", ns, "addr", "add", "fd00:9::7/64", "dev", "eth7"], check=True)
    for dev in ("eth7", "eth8"):
        subprocess.run(["ip", "-n", ns, "link", "set", dev, "up"], check=True)
    subprocess.run(["ip", "-n", ns, "route", "add", "default", "via", "10.9.8.1"], check=True)
    result = ns_cli("discover", "--dry-run", "--uuid", "11111111-2222-4333-8444-555555555555")
    assert result.returncode == 0, result.stderr
    sent = json.loads(result.stdout)
    assert sent["uuid"] == "11111111-2222-4333-8444-555555555555"
    eth7 = next(i for i in sent["interfaces"] if i["name"] == "eth7")
    assert eth7["mac"] == "52:54:00:ab:cd:07"
    assert {"address": "10.9.8.7", "prefix": 24} in eth7["addresses"]
    assert {"address": "fd00:9::7", "prefix": 64} in eth7["addresses"]
    assert eth7["gateway"] == "10.9.8.1" and eth7["boot"] is True
    assert all(i["name"] != "lo" for i in sent["interfaces"])
    assert sent["boot_id"] == Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def test_fact_parsers() -> None:
    # ip -j addr / ip -j route, iproute2 6.1 on Debian 12 (trimmed).
    links: list[dict[str, Any]] = [{"ifindex": 1, "ifname": "lo", "link_type": "loopback", "address": "00:00:00:00:00:00",
              "addr_info": [{"family": "inet", "local": "127.0.0.1", "prefixlen": 8}]},
             {"ifindex": 2, "ifname": "eth0", "link_type": "ether",
              "address": "02:fc:00:00:00:01",
              "addr_info": [{"family": "inet", "local": "192.0.2.2", "prefixlen": 24},
                            {"family": "inet6", "local": "fe80::fc:ff:fe00:1", "prefixlen": 64}]},
             {"ifindex": 3, "ifname": "wg0", "link_type": "none", "addr_info": []}]
    assert parse_ip_addr(links) == [
        {"name": "eth0", "mac": "02:fc:00:00:00:01", "gateway": None, "fqdns": [],
         "boot": False, "addresses": [{"address": "192.0.2.2", "prefix": 24},
                                      {"address": "fe80::fc:ff:fe00:1", "prefix": 64}]},
        {"name": "wg0", "mac": None, "gateway": None, "fqdns": [], "boot": False,
         "addresses": []}]
    routes: list[dict[str, Any]] = [{"dst": "default", "gateway": "192.0.2.1", "dev": "eth0", "flags": []},
              {"dst": "192.0.2.0/24", "dev": "eth0", "protocol": "kernel", "scope": "link"}]
    assert parse_ip_route(routes) == {"eth0": "192.0.2.1"}
    # lldpcli -f json show neighbors (lldpd 1.0.16): one interface is an object, several a list.
    one = {"lldp": {"interface": {"eth0": {
        "via": "LLDP", "chassis": {"rack1-tor": {"id": {"type": "mac",
                                                         "value": "00:11:22:33:44:55"}}},
        "port": {"id": {"type": "ifname", "value": "Ethernet12"}, "descr": "to node1"}}}}}
    assert parse_lldp(one) == [{"interface": "eth0", "chassis_id": "00:11:22:33:44:55",
                                "chassis_name": "rack1-tor", "port_id": "Ethernet12",
                                "port_description": "to node1"}]
    several = {"lldp": {"interface": [
        {"eth0": {"chassis": {"tor-a": {"id": {"value": "aa"}}}, "port": {"id": {"value": "1"}}}},
        {"eth1": {"chassis": {"tor-b": {"id": {"value": "bb"}}}, "port": {"id": {"value": "2"}}}},
    ]}}
    assert [n["chassis_name"] for n in parse_lldp(several)] == ["tor-a", "tor-b"]
    assert parse_lldp({"lldp": {}}) == []


def test_the_node_side_needs_none_of_the_service_dependencies(cli: Cli) -> None:
    code = ("import sys, divingbell.commands.cli, divingbell.agent.fleet_source, divingbell.fleet.client,"
            " divingbell.fleet.facts, divingbell.commands.discover\n"
            "heavy = [m for m in ('fastapi', 'sqlalchemy', 'alembic', 'uvicorn', 'psycopg',"
            " 'jinja2', 'cryptography') if m in sys.modules]\n"
            "print(','.join(heavy))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == ""
    helped = cli("agent", "--help")
    assert "--server" in helped.stdout and "--fleet-interval" in helped.stdout
    refused = cli("agent")
    assert refused.returncode == 2 and "--server URL" in refused.stderr


def test_serve_with_worker_processes(tmp_path: Path, cli: Cli, postgres: PostgresCluster
                                     ) -> None:
    db = postgres.create_database()
    made = cli("fleet", "token", "create", "--role", "admin", "--db", db)
    assert made.returncode == 0, made.stderr
    server = ProcessServer(db, args=("--workers", "2")).start(tmp_path / "serve.log")
    try:
        admin = FleetClient(server.url, made.stdout.strip())
        for n in range(6):  # spread over both workers by the kernel
            admin.discover(facts(n))
        assert len(admin.machines()) == 6
        assert admin.call("GET", "/readyz")["ready"] is True
    finally:
        server.stop()


def test_every_api_command_ends_an_api_error_the_same_way(cli: Cli, tmp_path: Path) -> None:
    """The fleet and rollout commands share one path for an API error: `error: ` and the
    request, the problems under it, exit 2 for what the request got wrong (404, 409, 422) and
    1 for the rest (401, 403); a push under --format json answers in JSON instead."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("conf:\n  sysctl: 3\n")
    good = tmp_path / "site.yaml"
    good.write_text(DOC)
    settings = FleetSettings(db_url=f"sqlite:///{tmp_path / 'fleet.db'}", control_plane_size=1)
    with thread_server(settings) as server:
        machine = server.bootstrap.discover(facts(1))["machine_id"]
        admin, reader, forged = server.admin_token, server.reader_token, "dbt_forged_token"

        def fleet(token: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
            return cli("fleet", *args, "--server", server.url, env={"DIVINGBELL_TOKEN": token})

        failures: list[tuple[str, tuple[str | Path, ...], int, str]] = [
            (admin, ("machine", "nope"), 2, "GET /v1/machines/nope: 404 no machine nope"),
            (admin, ("roles", "nope", "worker"), 2, "PUT /v1/machines/nope/roles: 404"),
            (reader, ("roles", machine, "worker"), 1,
             f"PUT /v1/machines/{machine}/roles: 403 needs a admin token"),
            (admin, ("revisions", "--activate", "9"), 2, "POST /v1/revisions/9/activate: 404"),
            (reader, ("document", "push", good), 1, "PUT /v1/document?name=site.yaml: 403"),
            (forged, ("machines",), 1, "GET /v1/machines?limit=1000: 401 invalid token"),
            (forged, ("status",), 1, "GET /v1/machines?limit=1000: 401 invalid token"),
            (admin, ("decommission", "nope"), 2, "POST /v1/machines/nope/decommission: 404"),
            (reader, ("reenroll", machine), 1,
             f"POST /v1/machines/{machine}/reenroll: 403 needs a admin token"),
            (admin, ("accept", machine, "--hostname", "Bad_Name"), 2,
             f"PUT /v1/machines/{machine}/hostname: 422"),
            (admin, ("reprovision", machine), 2, f"POST /v1/machines/{machine}/reprovision: "
             f"409 machine {machine} is scheduled, not installed"),
            (reader, ("reprovision", machine), 1,
             f"POST /v1/machines/{machine}/reprovision: 403"),
            (forged, ("audit",), 1, "GET /v1/audit?limit=50: 401 invalid token"),
            (admin, ("rollout", "status"), 2, "GET /v1/rollouts/current: 404 no rollout yet"),
            (admin, ("rollout", "plan", "9"), 2, "GET /v1/rollouts/plan/9: 404 no revision 9"),
            (forged, ("rollout", "history"), 1, "GET /v1/rollouts: 401 invalid token"),
            (reader, ("rollout", "pause"), 1, "POST /v1/rollouts/current/pause: 403"),
            (admin, ("rollout", "policy", "--max-unavailable", "x"), 2,
             "PUT /v1/rollout-policy: 422 max_unavailable"),
        ]
        for token, args, code, message in failures:
            result = fleet(token, *args)
            assert (result.returncode, result.stdout) == (code, ""), (args, result)
            assert result.stderr.startswith(f"error: {message}"), (args, result.stderr)
            assert len(result.stderr.splitlines()) == 1, (args, result.stderr)

        rejected = fleet(admin, "document", "push", bad)
        assert rejected.returncode == 2 and rejected.stderr.splitlines() == [
            "error: PUT /v1/document?name=bad.yaml: 422 invalid-document",
            "  conf.sysctl: must be a mapping (got 3) (bad.yaml:2)"]
        as_json = fleet(admin, "document", "push", bad, "--format", "json")
        assert as_json.returncode == 2 and as_json.stderr == ""
        assert json.loads(as_json.stdout)["detail"]["problems"][0]["path"] == "conf.sysctl"

        assert fleet(admin, "document", "push", good).stdout == "revision 1 stored and active\n"
        completed = fleet(admin, "rollout", "abort")
        assert completed.returncode == 2
        assert "409 cannot abort a rollout that is completed" in completed.stderr
        listed = fleet(admin, "revisions", "--activate", "1", "--format", "json")
        assert listed.returncode == 0, listed.stderr
        assert [r["revision"] for r in json.loads(listed.stdout)] == [1]
        shown = fleet(reader, "machine", machine, "--format", "json")
        assert json.loads(shown.stdout)["id"] == machine
        accepted = fleet(admin, "accept", machine, "--hostname", "db7")
        assert (accepted.returncode, accepted.stdout) == (0, f"{machine}: hostname db7 accepted\n")
        reenrolled = fleet(admin, "reenroll", machine, "--format", "json")
        assert json.loads(reenrolled.stdout) == {"id": machine, "state": "booting"}


def test_fleet_machines_and_status_fetch_every_page(cli: Cli, tmp_path: Path) -> None:
    """More machines than the client asks for at once (1000): the commands follow `next`."""
    db = f"sqlite:///{tmp_path / 'fleet.db'}"
    with thread_server(FleetSettings(db_url=db)) as server:
        ids = [f"m{n:05d}" for n in range(1205)]
        seed_machines(db, ids, datetime(2020, 1, 1))
        api = ["--server", server.url]
        env = {"DIVINGBELL_TOKEN": server.reader_token}
        listed = cli("fleet", "machines", *api, "--format", "json", env=env)
        assert listed.returncode == 0, listed.stderr
        assert [m["id"] for m in json.loads(listed.stdout)] == ids
        first = cli("fleet", "machines", *api, "--limit", "1001", "--format", "json", env=env)
        assert [m["id"] for m in json.loads(first.stdout)] == ids[:1001]
        table = cli("fleet", "machines", *api, "--state", "discovered", env=env)
        assert table.returncode == 0 and len(table.stdout.splitlines()) == 1 + len(ids)
        status = cli("fleet", "status", *api, "--format", "json", env=env)
        assert json.loads(status.stdout)["machines"] == len(ids)
        bad = cli("fleet", "machines", *api, "--limit", "0", env=env)
        assert bad.returncode == 2 and "--limit" in bad.stderr
