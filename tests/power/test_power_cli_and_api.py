"""The BMC and power commands and routes: admin only where they change something, bad input
refused naming the field, credentials never shown, one command per BMC at a time (issue 28)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from divingbell.fleet import leases, power
from divingbell.fleet.db import Database
from divingbell.fleet.models import utcnow
from divingbell.power.secrets import (
    KEY_FILE_NAME,
    Credentials,
    SecretBox,
    create_key,
    open_key,
)
from tests.conftest import Cli
from tests.fleet.servers import ThreadServer, thread_server
from tests.fleet.test_api import error_of, register
from tests.power.conftest import PASSWORD, USER, Emulator, TlsRedfish, power_settings
from tests.power.faults import UdpFaultRelay


def test_the_commands_set_show_and_power_without_showing_credentials(
        power_fleet: ThreadServer, ipmi: Emulator, udp_relay: UdpFaultRelay, cli: Cli,
        tmp_path: Path) -> None:
    machine, _ = register(power_fleet, 1)
    password_file = tmp_path / "bmc.pass"
    password_file.write_text(PASSWORD + "\n")
    os.chmod(password_file, 0o600)
    api = ["--server", power_fleet.url]
    admin = {"DIVINGBELL_TOKEN": power_fleet.admin_token}
    reader = {"DIVINGBELL_TOKEN": power_fleet.reader_token}

    denied = cli("fleet", "bmc", machine, *api, "--ipmi", f"127.0.0.1:{udp_relay.port}",
                 "--username", USER, "--password-file", password_file, env=reader)
    assert denied.returncode == 1 and "needs a admin token" in denied.stderr
    made = cli("fleet", "bmc", machine, *api, "--ipmi", f"127.0.0.1:{udp_relay.port}",
               "--username", USER, "--password-file", password_file, "--format", "json",
               env=admin)
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["credentials"] == "set (encrypted)"
    shown = cli("fleet", "bmc", machine, *api, env=reader)
    assert shown.returncode == 0 and "ipmi 127.0.0.1" in shown.stdout

    status = cli("fleet", "power", machine, "status", *api, "--format", "json", env=reader)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["state"] == "off"
    refused = cli("fleet", "power", machine, "on", *api, env=reader)
    assert refused.returncode == 1 and "admin" in refused.stderr
    on = cli("fleet", "power", machine, "on", "--boot-once", "pxe", *api, env=admin)
    assert on.returncode == 0, on.stderr
    assert "on (sent: boot-once pxe, on)" in on.stdout and "confirmed" in on.stdout
    assert ipmi.state()["bootdev"] == "network"

    udp_relay.stop_after = udp_relay.from_client
    failed = cli("fleet", "power", machine, "off", *api, env=admin)
    assert failed.returncode == 1 and "nothing sent" in failed.stderr
    assert "off" not in ipmi.state()["commands"]
    for result in (made, shown, status, on, failed, denied):
        assert PASSWORD not in result.stdout + result.stderr

    loose = tmp_path / "loose.pass"
    loose.write_text("x\n")
    os.chmod(loose, 0o644)
    bad = cli("fleet", "bmc", machine, *api, "--ipmi", "127.0.0.1", "--username", USER,
              "--password-file", loose, env=admin)
    assert bad.returncode == 2 and "readable by others" in bad.stderr


def test_bad_bmc_input_is_refused_naming_the_field(power_fleet: ThreadServer) -> None:
    machine, _ = register(power_fleet, 1)
    path = f"/v1/machines/{machine}/bmc"
    good = {"protocol": "redfish", "address": "https://192.0.2.9/redfish/v1/Systems/1",
            "username": USER, "password": PASSWORD}
    cases = {
        "address": {**good, "address": "ftp://192.0.2.9"},
        "address ": {**good, "address": f"https://{USER}:{PASSWORD}@192.0.2.9"},
        "protocol": {**good, "protocol": "telnet"},
        "ca_pem": {**good, "ca_pem": "not a certificate"},
        "insecure": {**good, "protocol": "ipmi", "address": "192.0.2.9", "insecure": True},
        "password": {**good, "password": ""},
    }
    for field, body in cases.items():
        failure = error_of(lambda body=body: power_fleet.admin.call("PUT", path, body))
        assert failure.status == 422, field
        assert field.strip() in json.dumps(failure.detail), (field, failure.detail)
        assert PASSWORD not in json.dumps(failure.detail)
    missing = error_of(lambda: power_fleet.admin.call("PUT", "/v1/machines/nope/bmc", good))
    assert missing.status == 404
    no_bmc = error_of(lambda: power_fleet.admin.call("POST", f"/v1/machines/{machine}/power",
                                                     {"action": "on"}))
    assert no_bmc.status == 404 and "no BMC" in str(no_bmc)
    verb = error_of(lambda: power_fleet.admin.call("POST", f"/v1/machines/{machine}/power",
                                                   {"action": "reboot-hard"}))
    assert verb.status == 422 and "action" in str(verb)


def test_one_command_per_bmc_at_a_time_across_replicas(power_fleet: ThreadServer) -> None:
    """Another replica holds the BMC's lease (claimed in the shared store): a second command
    is refused at once, naming the holder; the BMC is not spoken to."""
    machine, _ = register(power_fleet, 1)
    power_fleet.admin.call("PUT", f"/v1/machines/{machine}/bmc", {
        "protocol": "ipmi", "address": "127.0.0.1:9", "username": USER, "password": PASSWORD})
    db = Database(power_fleet.settings.db_url)
    try:
        with db.write() as session:
            held = leases.claim(session, power.LEASE_KIND, machine, 1, "token:other/replica",
                                600, utcnow())
        assert isinstance(held, leases.Held)
        busy = error_of(lambda: power_fleet.admin.call(
            "POST", f"/v1/machines/{machine}/power", {"action": "off"}))
        assert busy.status == 409 and busy.detail["error"] == "bmc-busy"
        assert "token:other/replica" in busy.detail["message"]
        with db.write() as session:
            leases.release(session, power.LEASE_KIND, machine, 0, "token:other/replica")
    finally:
        db.dispose()
    free = error_of(lambda: power_fleet.admin.call(
        "POST", f"/v1/machines/{machine}/power", {"action": "off"}))
    assert free.status == 502  # now it is tried (and port 9 answers nothing): no 409


def test_the_key_is_generated_once_beside_sqlite_and_required_elsewhere(
        tmp_path: Path, postgres_url_or_skip: str) -> None:
    url = f"sqlite:///{tmp_path / 'store' / 'fleet.db'}"
    first, note = open_key(None, url)
    assert isinstance(first, SecretBox) and "generated a secrets key" in note
    key = tmp_path / "store" / KEY_FILE_NAME
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    again, note = open_key(None, url)
    assert again is not None and "generated a secrets key" not in note
    assert again.open(first.seal(Credentials(USER, PASSWORD))).password == PASSWORD
    box, note = open_key(None, postgres_url_or_skip)
    assert box is None and "--secrets-key-file" in note
    with thread_server(power_settings(postgres_url_or_skip)) as fleet:
        machine, _ = register(fleet, 1)
        refused = error_of(lambda: fleet.admin.call("PUT", f"/v1/machines/{machine}/bmc", {
            "protocol": "ipmi", "address": "192.0.2.1", "username": USER,
            "password": PASSWORD}))
        assert refused.status == 503 and "--secrets-key-file" in str(refused)


def test_serve_says_where_the_key_is_and_refuses_a_readable_one(cli: Cli, tmp_path: Path
                                                                ) -> None:
    key = tmp_path / "open.key"
    key.write_text("x" * 44 + "\n")
    os.chmod(key, 0o644)
    refused = cli("serve", "--db", f"sqlite:///{tmp_path / 'fleet.db'}",
                  "--secrets-key-file", key, "--listen", "127.0.0.1:1")
    assert refused.returncode == 2 and "readable by others" in refused.stderr


def test_redfish_tls_is_verified_unless_told_otherwise(power_fleet: ThreadServer,
                                                       redfish_tls: TlsRedfish) -> None:
    machine, _ = register(power_fleet, 1)
    path = f"/v1/machines/{machine}/bmc"
    base = {"protocol": "redfish", "address": redfish_tls.url, "username": USER,
            "password": PASSWORD}
    client = power_fleet.admin
    client.timeout = 60
    power_fleet.admin.call("PUT", path, base)
    untrusted = error_of(lambda: client.call("POST", f"/v1/machines/{machine}/power",
                                             {"action": "on"}))
    assert untrusted.status == 502 and "CERTIFICATE_VERIFY_FAILED" in str(untrusted)
    assert untrusted.detail["actions"] == []

    shown = power_fleet.admin.call("PUT", path, {**base, "ca_pem": redfish_tls.ca_pem})
    assert shown["ca"] is True and shown["verify_tls"] is True
    assert client.call("GET", f"/v1/machines/{machine}/power")["state"] == "off"

    shown = power_fleet.admin.call("PUT", path, {**base, "insecure": True})
    assert shown["verify_tls"] is False
    assert client.call("GET", f"/v1/machines/{machine}/power")["state"] == "off"
    audit = [e for e in power_fleet.admin.call("GET", "/v1/audit?limit=20")
             if e["action"] == "bmc"]
    assert "TLS NOT verified (insecure)" in audit[0]["detail"]
    assert "TLS verified with its CA" in audit[1]["detail"]


def test_decommission_can_power_the_machine_off_after(
        power_fleet: ThreadServer, ipmi: Emulator, udp_relay: UdpFaultRelay, cli: Cli) -> None:
    machine, _ = register(power_fleet, 1)
    power_fleet.admin.call("PUT", f"/v1/machines/{machine}/bmc", {
        "protocol": "ipmi", "address": f"127.0.0.1:{udp_relay.port}", "username": USER,
        "password": PASSWORD})
    client = power_fleet.admin
    client.timeout = 60
    client.call("POST", f"/v1/machines/{machine}/power", {"action": "on"})
    result = cli("fleet", "decommission", machine, "--power-off", "--server", power_fleet.url,
                 env={"DIVINGBELL_TOKEN": power_fleet.admin_token})
    assert result.returncode == 0, result.stderr
    assert "decommissioned" in result.stdout and "power off" in result.stdout
    assert ipmi.state()["commands"][-1] == "off" and ipmi.state()["power"] == "off"
    actions = [e["action"] for e in power_fleet.admin.call("GET", "/v1/audit?limit=10")
               if e["subject"] == machine]
    assert actions[:2] == ["power off", "decommission"]


def test_a_store_moved_without_its_key_cannot_open_bmc_credentials(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    with thread_server(power_settings(url)) as fleet:  # the key generated beside the store
        machine, _ = register(fleet, 1)
        fleet.admin.call("PUT", f"/v1/machines/{machine}/bmc", {
            "protocol": "ipmi", "address": "127.0.0.1:9", "username": USER,
            "password": PASSWORD})
    other_key = tmp_path / "other.key"
    create_key(other_key)
    with thread_server(power_settings(url, secrets_key_file=str(other_key))) as fleet:
        failure = error_of(lambda: fleet.admin.call(
            "POST", f"/v1/machines/{machine}/power", {"action": "off"}))
        assert failure.status == 502 and "cannot be decrypted" in str(failure)
        assert failure.detail["actions"] == [] and failure.detail["requests"] == 0


def test_reprovision_says_what_was_sent_to_the_bmc(
        power_fleet: ThreadServer, ipmi: Emulator, cli: Cli, tmp_path: Path) -> None:
    from tests.fleet.test_rollouts_api import fleet_of

    machine = next(iter(fleet_of(power_fleet, 1)))  # ready: it may be reprovisioned
    password_file = tmp_path / "bmc.pass"
    password_file.write_text(PASSWORD + "\n")
    os.chmod(password_file, 0o600)
    api = ["--server", power_fleet.url]
    admin = {"DIVINGBELL_TOKEN": power_fleet.admin_token}
    made = cli("fleet", "bmc", machine, *api, "--ipmi", f"127.0.0.1:{ipmi.port}",
               "--username", USER, "--password-file", password_file, env=admin)
    assert made.returncode == 0, made.stderr

    result = cli("fleet", "reprovision", machine, *api, env=admin)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{machine}: reinstall at its next network boot; power on "
                                    "(sent: boot-once pxe, on): "), result.stdout
