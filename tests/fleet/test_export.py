"""`fleet export` → `fleet import` carries every table that matters (issue 22, finding 8): the
store filled through the real API (machines, history, reports, revisions, a rollout and its
members, an install grant and a live slot, audit events), exported, imported into the other
kind of store, exported again: identical, table by table, on SQLite and PostgreSQL. Then the
imported store serves: credentials work, new rows get fresh ids, the live slot is still held."""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

import pytest

from divingbell.fleet.backup import EXCLUDED, BackupError, carried_tables, export, import_
from divingbell.fleet.client import FleetClient
from divingbell.fleet.db import Database
from divingbell.fleet.models import Base
from divingbell.fleet.settings import FleetSettings
from divingbell.power.secrets import create_key
from tests.conftest import Cli
from tests.fleet.servers import PostgresCluster, thread_server
from tests.fleet.test_api import error_of, register
from tests.fleet.test_rollouts_api import DOC, converge

BMC_PASSWORD = "bmc-password-never-in-an-export"


def fill(url: str) -> dict[str, Any]:
    """A store with rows in every carried table, made the way the service makes them."""
    key = Path(tempfile.mkdtemp(prefix="divingbell-key-")) / "secrets.key"
    create_key(key)
    with thread_server(FleetSettings(db_url=url, control_plane_size=1,
                                     secrets_key_file=str(key))) as fleet:
        machines = dict(register(fleet, n) for n in range(1, 4))
        fleet.admin.push_document(DOC.format(value=30).encode())
        for machine, client in machines.items():
            converge(client, machine)
        fleet.admin.push_document(DOC.format(value=31).encode())  # a rollout, with members
        (a, ca), (b, cb), (c, _) = machines.items()
        fleet.admin.set_roles(b, ["worker"])  # audited
        ca.claim_slot(a, "rack1", ttl_seconds=3600)  # live when moved
        ca.renew_slot("rack1/0", a, 3600, rebooting=True)  # its reboot watched
        cb.install_grant(b)
        fleet.admin.claim_slot(c, "rack2")
        fleet.admin.call("DELETE", "/v1/slots/rack2/0")  # audited
        fleet.admin.call("PUT", f"/v1/machines/{a}/bmc", {  # sealed with the key
            "protocol": "ipmi", "address": "192.0.2.1", "username": "bmc-user",
            "password": BMC_PASSWORD})
        return {"a": (a, ca.token), "b": (b, cb.token)}


def exported(url: str) -> dict[str, Any]:
    db = Database(url)
    try:
        return export(db)
    finally:
        db.dispose()


def imported(url: str, data: Any) -> dict[str, int]:
    db = Database(url)
    try:
        from divingbell.fleet import migrations

        migrations.upgrade(db.write_engine)
        return import_(db, data)
    finally:
        db.dispose()


@pytest.fixture
def other_store(store_url: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """The other kind of store than `store_url`: SQLite into PostgreSQL and back."""
    if store_url.startswith("sqlite"):
        cluster: PostgresCluster = request.getfixturevalue("postgres")
        return cluster.create_database()
    return f"sqlite:///{tmp_path / 'target.db'}"


def test_every_table_is_carried_or_excluded_with_a_reason() -> None:
    names = {t.name for t in Base.metadata.sorted_tables}
    assert set(EXCLUDED) <= names, "an exclusion names a table that no longer exists"
    assert all(len(reason) > 20 for reason in EXCLUDED.values())
    assert {t.name for t in carried_tables()} == names - set(EXCLUDED)


def test_export_import_export_is_identical_for_every_table(store_url: str, other_store: str
                                                           ) -> None:
    held = fill(store_url)
    first = exported(store_url)
    assert BMC_PASSWORD not in json.dumps(first) and "bmc-user" not in json.dumps(first)
    for table, rows in first["tables"].items():
        assert rows, f"the fixture leaves {table} empty: make fill() write it"
    assert set(first["tables"]) == {t.name for t in carried_tables()}
    added = imported(other_store, json.loads(json.dumps(first)))
    assert all(added[t] >= 1 for t in first["tables"] if t != "fleet_settings")
    second = exported(other_store)
    for table in first["tables"]:
        assert second["tables"][table] == first["tables"][table], table
    assert sum(imported(other_store, first).values()) == 0  # replaying adds nothing

    with thread_server(FleetSettings(db_url=other_store, control_plane_size=1)) as fleet:
        a, token_a = held["a"]
        b, token_b = held["b"]
        machine_a = FleetClient(fleet.url, token_a)
        assert machine_a.machine(a)["hostname"] == "node1"
        converge(machine_a, a)  # a new report and history rows: ids after the imported ones
        busy = error_of(lambda: FleetClient(fleet.url, token_b).claim_slot(b, "rack1"))
        assert busy.status == 409 and [h["holder"] for h in busy.detail["holders"]] == [a]
        fleet.admin.push_document(DOC.format(value=32).encode())  # audit, rollout rows
    assert len(exported(other_store)["tables"]["reports"]) > len(first["tables"]["reports"])


def test_an_import_over_other_content_changes_nothing(store_url: str, tmp_path: Path) -> None:
    fill(store_url)
    data = exported(store_url)
    data["tables"]["machines"][0]["hostname"] = "changed"
    before = exported(store_url)["tables"]
    with pytest.raises(BackupError, match=r"machines .* exists here with other content"):
        imported(store_url, data)
    assert exported(store_url)["tables"] == before


def test_the_command_line_round_trip_and_a_bad_revision(cli: Cli, tmp_path: Path) -> None:
    source = f"sqlite:///{tmp_path / 'fleet.db'}"
    fill(source)
    path = tmp_path / "export.json"
    assert cli("fleet", "export", "--db", source, "-o", path).returncode == 0
    assert path.stat().st_mode & 0o777 == 0o600
    target = f"sqlite:///{tmp_path / 'target.db'}"
    result = cli("fleet", "import", path, "--db", target)
    assert result.returncode == 0, result.stderr
    assert "reports" in result.stdout and "audit_events" in result.stdout
    assert "all already there" in cli("fleet", "import", path, "--db", target).stdout
    data = json.loads(path.read_text())
    bad = "conf: {nope: 1}\n"
    data["tables"]["revisions"][0].update(text=bad, digest=hashlib.sha256(bad.encode()).hexdigest())
    path.write_text(json.dumps(data))
    fresh = f"sqlite:///{tmp_path / 'fresh.db'}"
    failed = cli("fleet", "import", path, "--db", fresh)
    assert failed.returncode == 1 and "nothing changed" in failed.stderr
    assert "revision 1 is not valid" in failed.stderr


def test_an_export_of_the_first_format_still_imports(tmp_path: Path) -> None:
    text = DOC.format(value=30)
    legacy = {"format": "divingbell-fleet-export/1", "active_revision": 1,
              "revisions": [{"revision": 1, "name": "site.yaml", "text": text}],
              "machines": [{"id": "m1", "uuid": "u-1", "hostname": "node1", "state": "ready",
                            "roles": ["worker"], "interfaces": [
                                {"name": "eth0", "mac": "52:54:00:00:00:01"}],
                            "credential_sha256": "0" * 64}]}
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    assert imported(url, legacy) == {"revisions": 1, "machines": 1}
    tables = exported(url)["tables"]
    assert [m["hostname"] for m in tables["machines"]] == ["node1"]
    assert [m["mac"] for m in tables["machine_macs"]] == ["52:54:00:00:00:01"]
