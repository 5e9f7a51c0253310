"""The boot routes on a real fleet service (HTTP on loopback, SQLite): scripts by state, boot
requests in the history, the bootstrap token a boot carries, assets, and hostile queries."""

from __future__ import annotations

import re
import subprocess
import urllib.request
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from divingbell.fleet.client import FleetApiError
from divingbell.fleet.db import Database
from divingbell.fleet.models import Token, utcnow
from divingbell.fleet.settings import FleetSettings
from tests.fleet.servers import ThreadServer, thread_server

UUID = "8c6f0a1e-0000-4000-8000-000000000001"
MAC = "52:54:00:aa:00:01"


@pytest.fixture
def assets(tmp_path: Path) -> Path:
    directory = tmp_path / "assets"
    (directory / "hooks").mkdir(parents=True)
    (directory / "vmlinuz").write_bytes(b"kernel bytes")
    (directory / "initrd.img").write_bytes(b"initrd bytes")
    (directory / ".secret").write_text("hidden")
    (tmp_path / "outside").write_text("not an asset")
    (directory / "hooks" / "linked.sh").symlink_to(tmp_path / "outside")
    return directory


@pytest.fixture
def service(tmp_path: Path, assets: Path) -> Iterator[ThreadServer]:
    settings = FleetSettings(db_url=f"sqlite:///{tmp_path / 'fleet.db'}", control_plane_size=1,
                             install_parallel=1, assets_dir=str(assets))
    with thread_server(settings) as server:
        yield server


def get(server: ThreadServer, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(server.url + path, timeout=10) as answer:
            return answer.status, answer.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def boot_token(script: str) -> str:
    found = re.search(r"divingbell\.token=(\S+)", script)
    assert found, script
    return found.group(1)


def facts(uuid: str = UUID, mac: str = MAC) -> dict[str, object]:
    return {"uuid": uuid, "boot_id": "0" * 36,
            "interfaces": [{"name": "eth0", "mac": mac, "boot": True}],
            "disks": [{"path": "/dev/sda", "size_bytes": 1 << 30}]}


def test_boot_ipxe_chains_back_to_the_address_it_was_fetched_from(service: ThreadServer) -> None:
    status, script = get(service, "/boot.ipxe")
    assert status == 200 and script.startswith("#!ipxe\n")
    assert f"chain --autofree {service.url}/v1/ipxe?uuid=${{uuid}}&mac=${{net0/mac:hexhyp}}" \
        in script


def test_a_machine_boots_through_its_life_and_every_boot_is_in_its_history(
        service: ThreadServer) -> None:
    query = (f"/v1/ipxe?uuid={UUID}&mac={MAC.replace(':', '-')}&hostname=node1&serial=S1"
             "&platform=efi")
    status, script = get(service, query)
    assert status == 200
    assert f"kernel {service.url}/v1/assets/vmlinuz " in script
    machine = service.reader.machines()[0]
    assert (machine["uuid"], machine["state"], machine["hostname"]) == (UUID, "booting", "node1")

    # The token on the command line enrols the machine, once, and does nothing else.
    token = boot_token(script)
    registered = service.client(token).discover(facts())
    assert registered["machine_id"] == machine["id"]
    for spent in (lambda: service.client(token).machines(),
                  lambda: service.client(token).discover(facts())):
        with pytest.raises(FleetApiError) as refused:
            spent()
        assert refused.value.status == 401

    machine_client = service.client(registered["credential"])
    path = f"/v1/machines/{machine['id']}/install/grant"
    assert machine_client.call("POST", path, {})["granted"] is True
    status, script = get(service, query)
    assert "divingbell.phase=install" in script

    machine_client.call("POST", f"/v1/machines/{machine['id']}/install/result",
                        {"success": True, "output": "ok"})
    status, script = get(service, query)
    assert "sanboot --no-describe --drive 0x80" in script and "divingbell.token" not in script

    history = service.reader.machine(machine["id"])["history"]
    changes = [(row["from"], row["to"]) for row in history]
    assert changes == [(None, "booting"), ("booting", "discovered"), ("discovered", "scheduled"),
                       ("scheduled", "installing"), ("installing", "installing"),
                       ("installing", "installed"), ("installed", "installed")]
    assert history[0]["reason"].startswith("boot request: unknown: discovery profile")
    assert "mac=52:54:00:aa:00:01, hostname=node1, serial=S1, platform=efi" \
        in history[0]["reason"]
    assert history[4]["reason"].startswith("boot request: installing: install profile")
    assert history[6]["reason"].startswith("boot request: installed: boot from the local disk")


def test_the_boot_token_is_short_lived_and_expired_ones_are_cleaned_up(
        service: ThreadServer) -> None:
    _, script = get(service, f"/v1/ipxe?uuid={UUID}")
    token = boot_token(script)
    ident = token.split("_")[1]
    db = Database(service.settings.db_url)
    try:
        with db.write() as session:
            row = session.get(Token, ident)
            assert row is not None and row.role == "boot"
            assert (row.bound_uuid, row.bound_mac) == (UUID, None)
            assert row.expires_at is not None
            assert row.expires_at - row.created_at == timedelta(seconds=900)
            row.expires_at = utcnow() - timedelta(seconds=1)
        with pytest.raises(FleetApiError) as refused:
            service.client(token).discover(facts())
        assert refused.value.status == 401
        get(service, f"/v1/ipxe?uuid={UUID}")  # issuing a new one deletes the expired one
        with db.read() as session:
            assert session.get(Token, ident) is None
    finally:
        db.dispose()


@pytest.mark.parametrize("query", [
    "",
    "?uuid=not-a-uuid&mac=zz&hostname=%0Achain%20http://evil/&serial=%24%7Broot-path%7D",
    "?uuid=00000000-0000-0000-0000-000000000000",
    "?uuid=" + "a" * 5000,
    "?mac=52-54-00-aa-00-01&mac=52-54-00-aa-00-02&uuid=%00%ff",
    "?hostname=" + "%C3%A9" * 300 + "&serial=%FF%FE",
    "?platform=efi%0Achain%20http://evil/&mac=52-54-00-aa-00-03",
])
def test_malformed_queries_get_the_generic_discovery_script(service: ThreadServer,
                                                            query: str) -> None:
    status, script = get(service, "/v1/ipxe" + query)
    assert status == 200
    assert "booting the discovery profile" in script
    assert "evil" not in script and "root-path" not in script
    for machine in service.reader.machines():
        assert re.fullmatch(r"[0-9a-f-]{36}", machine["uuid"]), machine


def test_a_uuid_asked_for_with_another_mac_never_gets_that_machines_profile(
        service: ThreadServer) -> None:
    registered = service.bootstrap.discover(facts())
    machine_id = registered["machine_id"]
    machine_client = service.client(registered["credential"])
    machine_client.call("POST", f"/v1/machines/{machine_id}/install/grant", {})
    machine_client.call("POST", f"/v1/machines/{machine_id}/install/result",
                        {"success": True, "output": ""})
    _, own = get(service, f"/v1/ipxe?uuid={UUID}&mac=52-54-00-aa-00-01")
    assert "sanboot" in own
    _, other = get(service, f"/v1/ipxe?uuid={UUID}&mac=52-54-00-aa-00-99")
    assert "sanboot" not in other and machine_id not in other
    assert "a machine whose MAC does not match its uuid" in other


def test_assets_are_served_from_the_directory_only(service: ThreadServer) -> None:
    assert get(service, "/v1/assets/vmlinuz") == (200, "kernel bytes")
    assert get(service, "/v1/assets/hooks/linked.sh") == (200, "not an asset")  # operator's link
    for path in ("../fleet.db", "..%2Ffleet.db", "hooks/../../outside", ".secret", "nope",
                 "hooks", "%2Fetc%2Fpasswd"):
        status, body = get(service, "/v1/assets/" + path)
        assert status == 404, path
        assert '"detail"' in body


def test_without_assets_the_route_says_how_to_configure_it(tmp_path: Path) -> None:
    settings = FleetSettings(db_url=f"sqlite:///{tmp_path / 'fleet.db'}", control_plane_size=1)
    with thread_server(settings) as server:
        status, body = get(server, "/v1/assets/vmlinuz")
    assert status == 404 and "--assets DIR" in body


def test_bad_profiles_answer_503_naming_the_problem_and_serve_refuses_them(
        tmp_path: Path) -> None:
    profiles = tmp_path / "profiles.yaml"
    profiles.write_text("discovery:\n  default:\n    kernel: /etc/shadow\n")
    settings = FleetSettings(db_url=f"sqlite:///{tmp_path / 'fleet.db'}", control_plane_size=1,
                             boot_profiles=str(profiles))
    with thread_server(settings) as server:
        status, body = get(server, f"/v1/ipxe?uuid={UUID}")
    assert status == 503 and "discovery.default.kernel" in body

    from tests.conftest import REPO

    result = subprocess.run(
        [str(REPO / ".venv/bin/divingbell"), "serve", "--db", f"sqlite:///{tmp_path / 'x.db'}",
         "--boot-profiles", str(profiles), "--public-url", "http://10.0.0.5:8500"],
        capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert "--boot-profiles" in result.stderr
    assert "discovery.default.kernel: must be an http(s) URL or a relative path" in result.stderr
    result = subprocess.run(
        [str(REPO / ".venv/bin/divingbell"), "serve", "--db", f"sqlite:///{tmp_path / 'x.db'}",
         "--public-url", "http://x y/"],
        capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2 and "--public-url" in result.stderr


def test_a_decommissioned_machine_that_network_boots_comes_back_through_booting(
        service: ThreadServer) -> None:
    machine_id = service.bootstrap.discover(facts())["machine_id"]
    service.admin.call("POST", f"/v1/machines/{machine_id}/decommission")
    _, script = get(service, f"/v1/ipxe?uuid={UUID}&mac=52-54-00-aa-00-01")
    assert "booting the discovery profile" in script
    assert service.reader.machine(machine_id)["state"] == "booting"
    service.client(boot_token(script)).discover(facts())
    history = service.reader.machine(machine_id)["history"]
    assert [row["to"] for row in history][-4:] == [
        "decommissioned", "booting", "discovered", "scheduled"]
