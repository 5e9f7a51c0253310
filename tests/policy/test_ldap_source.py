"""The LDAP source against a real slapd started for the session (a throwaway database on a
loopback port): accounts of an object class under a base DN with a numeric uid become
tenants; expired accounts are disabled; unusable entries are skipped and reported."""

from __future__ import annotations

import datetime
import itertools
import os
from pathlib import Path
from typing import Any

import ldap3
import pytest

from divingbell.policy.tenant_sources import (
    LdapSettings,
    LdapSource,
    LdapUrl,
    SourceError,
    open_source,
)
from tests.policy import slapd as slapd_server
from tests.policy.pki import NOW, ScratchCa
from tests.policy.tenantworld import World

_ous = itertools.count()
TODAY = NOW.date()
DAYS = (TODAY - datetime.date(1970, 1, 1)).days


def admin(server: slapd_server.Slapd) -> ldap3.Connection:
    return ldap3.Connection(ldap3.Server("127.0.0.1", port=server.port), slapd_server.ADMIN_DN,
                            slapd_server.ADMIN_PASSWORD, auto_bind=True, raise_exceptions=True)


def account(connection: ldap3.Connection, base: str, name: str, uid: int | None,
            **extra: Any) -> None:
    classes = ["inetOrgPerson"]
    attributes: dict[str, Any] = {"cn": name, "sn": name, "uid": name}
    if uid is not None:
        classes += ["posixAccount", "shadowAccount"]
        attributes.update(uidNumber=uid, gidNumber=extra.pop("gid", uid),
                          homeDirectory=extra.pop("home", f"/home/{name}"))
    attributes.update(extra)
    connection.add(f"uid={name},{base}", classes, attributes)  # type: ignore[no-untyped-call]


@pytest.fixture
def directory(slapd: slapd_server.Slapd) -> tuple[slapd_server.Slapd, str]:
    """A fresh organizational unit per test, filled with accounts."""
    base = f"ou=tools{next(_ous)},{slapd_server.SUFFIX}"
    with admin(slapd) as connection:
        connection.add(base, ["organizationalUnit"])  # type: ignore[no-untyped-call]
        account(connection, base, "alice", 52001, home="/data/project/alice")
        account(connection, base, "bob", 52002, gid=600)
        account(connection, base, "eve", 52005, shadowExpire=DAYS - 1)  # expired yesterday
        account(connection, base, "frank", 52006, shadowExpire=DAYS + 30)
        account(connection, base, "Not_A_Label", 52007)
        account(connection, base, "zero", 0)
        account(connection, base, "plainperson", None)  # no posixAccount: not a tenant
        connection.add(f"ou=nested,{base}", ["organizationalUnit"])  # type: ignore[no-untyped-call]
        account(connection, f"ou=nested,{base}", "gina", 52008)
    return slapd, base


def source(server: slapd_server.Slapd, base: str, query: str = "", **settings: Any
           ) -> LdapSource:
    url = LdapUrl.parse(f"{server.url}/{base}{query}")
    return LdapSource(url, LdapSettings(**settings), "tool-", today=lambda: TODAY)


def test_accounts_become_tenants(directory: tuple[slapd_server.Slapd, str]) -> None:
    server, base = directory
    read = source(server, base).read()
    found = {t.name: t for t in read.tenants}
    assert sorted(found) == ["alice", "bob", "eve", "frank", "gina"]
    assert (found["alice"].uid, found["alice"].gid, found["alice"].home) == (
        52001, 52001, "/data/project/alice")
    assert found["bob"].gid == 600
    assert found["eve"].disabled and not found["frank"].disabled
    assert any("Not_A_Label" in s and "DNS label" in s for s in read.skipped)
    assert any("uid=zero" in s and "positive" in s for s in read.skipped)


def test_scope_and_filter_from_the_url(directory: tuple[slapd_server.Slapd, str]) -> None:
    server, base = directory
    one_level = source(server, base, "??one").read()
    assert "gina" not in {t.name for t in one_level.tenants}
    filtered = source(server, base, "??sub?(uidNumber>=52005)").read()
    assert {t.name for t in filtered.tenants} == {"eve", "frank", "gina"}


def test_bind_with_a_password_file(directory: tuple[slapd_server.Slapd, str],
                                   tmp_path: Path) -> None:
    server, base = directory
    secret = tmp_path / "ldap-password"
    secret.write_text(slapd_server.ADMIN_PASSWORD + "\n")
    assert source(server, base, bind_dn=slapd_server.ADMIN_DN, password_file=secret).read(
    ).tenants
    secret.write_text("wrong\n")
    with pytest.raises(SourceError, match="invalidCredentials"):
        source(server, base, bind_dn=slapd_server.ADMIN_DN, password_file=secret).read()


def test_an_unreachable_directory_is_an_error_not_an_empty_list(
        directory: tuple[slapd_server.Slapd, str]) -> None:
    _, base = directory
    url = LdapUrl.parse(f"ldap://127.0.0.1:9/{base}")
    with pytest.raises(SourceError, match="LDAP"):
        LdapSource(url, LdapSettings(timeout_seconds=2), "tool-").read()


@pytest.mark.parametrize(("url", "message"), [
    ("ldap://", "with a host"),
    ("ldap://127.0.0.1:389/", "names no base DN"),
    ("ldap://127.0.0.1:389/ou=x??tree", "scope must be"),
])
def test_bad_urls(url: str, message: str) -> None:
    with pytest.raises(SourceError, match=message):
        open_source(url, LdapSettings(), "tool-")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown tenant homes")
def test_the_controller_provisions_ldap_tenants(directory: tuple[slapd_server.Slapd, str],
                                                tmp_path: Path, ca: ScratchCa) -> None:
    server, base = directory
    world = World(tmp_path, ca)
    world.settings["home"] = {"from_source": False}  # never the machine's own /home
    for name, uid in (("alice", 52001), ("bob", 52002), ("eve", 52005), ("frank", 52006),
                      ("gina", 52008)):
        world.make_home(name, uid)
    ldap = source(server, base)
    ldap.url = LdapUrl.parse(f"{server.url}/{base}")
    report = world.controller(source=ldap).run()
    states = {t.name: t.state for t in report.tenants}
    assert states == {"alice": "active", "bob": "active", "eve": "disabled",
                      "frank": "active", "gina": "active"}
    assert world.cluster.find("RoleBinding", "tenant", "tool-eve") is None
    bob = world.cluster.find("Namespace", "tool-bob")
    assert bob is not None and bob["metadata"]["annotations"] == {"RunAsUser": "52002",
                                                                  "RunAsGroup": "600"}
    # eve's account expires no more: she is enabled on the next run
    with admin(server) as connection:
        connection.modify(f"uid=eve,{base}", {"shadowExpire": [(ldap3.MODIFY_REPLACE,  # type: ignore[no-untyped-call]
                                                                [DAYS + 100])]})
    world.controller(source=ldap).run()
    assert world.cluster.find("RoleBinding", "tenant", "tool-eve") is not None
