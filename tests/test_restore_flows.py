"""Restoring is the product (issue 23): Divingbell's gate-style flows, where a setting leaves the
document and the host gets back what it had, however much that removes. Each flow runs twice:
through the real `divingbell apply` command, and through the agent's loop (the systemd mode:
it follows its document file), against the real hosts the module tests use."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from divingbell.agent.loop import Agent, AgentSettings
from divingbell.core.host import Host
from divingbell.core.modules.apt import APT_ENV
from divingbell.core.modules.exec import STORE
from divingbell.core.modules.limits import LIMITS_DIR
from tests.aptrepo import REPO_PATH, Repo
from tests.conftest import Cli, make_proc_sys, write
from tests.test_apt import doc as apt_doc
from tests.test_apt import (
    installed,
    repo,  # noqa: F401  (fixture: the signed test repository)
)
from tests.test_exec import LOG, logger
from tests.test_exec import doc as exec_doc
from tests.test_mounts import live
from tests.test_perm import GROUP, PASSWD, owner_mode
from tests.test_uamlite import doc as uamlite_doc
from tests.test_uamlite import (
    keys,  # noqa: F401  (fixture: two SSH public keys)
    passwd,
    shadow_expire,
    user,
)

pytestmark = pytest.mark.kernel

Converge = Callable[[Host, str], None]
"""Bring the host to one document, as an operator or an agent would; fails the test if the
run does not succeed."""


@pytest.fixture(params=["cli", "agent"])
def converge(request: pytest.FixtureRequest, tmp_path: Path, cli: Cli) -> Converge:
    document = tmp_path / "document.yaml"
    agents: dict[str, Agent] = {}

    def by_hand(host: Host, text: str) -> None:
        write(document, text)
        result = cli("apply", "--root", host.root, "--proc-sys", host.proc_sys,
                     "--node", "n1", document)
        assert result.returncode == 0, result.stdout + result.stderr

    def unattended(host: Host, text: str) -> None:
        write(document, text)
        if "agent" not in agents:
            agents["agent"] = Agent(AgentSettings(documents=[document], node="n1", host=host,
                                                  follow_document_changes=True), None)
        agent = agents["agent"]
        agent.tick()
        assert agent.ready, agent.reason

    return by_hand if request.param == "cli" else unattended


def sysctl(host: Host, key: str) -> str:
    return host.proc_sys.joinpath(*key.split(".")).read_text().strip()


def test_an_empty_sysctl_section_restores_three_originals(
        converge: Converge, tmp_path: Path, root: Path) -> None:
    originals = {"vm/swappiness": "60", "net/core/somaxconn": "4096",
                 "net/ipv4/ip_forward": "0"}
    host = Host(root=root, proc_sys=make_proc_sys(tmp_path / "proc_sys", originals))
    converge(host, "conf:\n  sysctl:\n    vm.swappiness: 10\n    net.core.somaxconn: 1024\n"
                   "    net.ipv4.ip_forward: 1\n")
    assert sysctl(host, "vm.swappiness") == "10"
    converge(host, "conf:\n  sysctl: {}\n")
    assert {key: sysctl(host, key.replace("/", ".")) for key in originals} == originals


MOUNT = "      mnt_tgt: /mnt/{name}\n      device: tmpfs\n      type: tmpfs\n" \
        "      options: 'defaults,size=4M'\n"


def mounts(*names: str) -> str:
    return "conf:\n  mounts:\n" + "".join(f"    {n}:\n" + MOUNT.format(name=n) for n in names)


def test_mounts_revert_unmounts_all_three(converge: Converge, overlay_root: Path) -> None:
    host = Host(root=overlay_root)
    converge(host, mounts("gate1", "gate2", "gate3"))
    assert all(live(host, f"/mnt/gate{i}") is not None for i in (1, 2, 3))
    converge(host, "conf:\n  mounts: {}\n")  # 6 removals (unmount, unit) against 3 disables
    assert all(live(host, f"/mnt/gate{i}") is None for i in (1, 2, 3))
    assert not list(host.path("/etc/systemd/system").glob("mnt-gate*.mount"))


@pytest.fixture
def perm_host(root: Path) -> Host:
    write(root / "etc/passwd", PASSWD)
    write(root / "etc/group", GROUP)
    for name in ("a.log", "b.log"):
        write(root / "var/log" / name, "x\n").chmod(0o644)
    return Host(root=root)


PERM = "  perm:\n    paths:\n      - {path: '/var/log/*.log', owner: syslog, group: adm, " \
       "permissions: '0640'}\n"
LIMITS = "  limits:\n    nofile:\n      domain: root\n      type: soft\n      item: nofile\n" \
         "      value: '4096'\n"


def test_perm_revert_restores_owner_and_mode(converge: Converge, perm_host: Host) -> None:
    before = owner_mode(perm_host, "/var/log/a.log")
    converge(perm_host, "conf:\n" + PERM)
    assert owner_mode(perm_host, "/var/log/a.log") == (104, 4, "0640")
    converge(perm_host, "conf:\n  perm:\n    paths: []\n")
    assert owner_mode(perm_host, "/var/log/a.log") == before
    assert owner_mode(perm_host, "/var/log/b.log") == before


def test_dropping_the_only_perm_entry_from_a_full_document(converge: Converge,
                                                          perm_host: Host) -> None:
    before = owner_mode(perm_host, "/var/log/b.log")
    converge(perm_host, "conf:\n" + PERM + LIMITS)
    converge(perm_host, "conf:\n" + LIMITS)
    assert owner_mode(perm_host, "/var/log/a.log") == before
    assert owner_mode(perm_host, "/var/log/b.log") == before
    limits = [p.read_text() for p in perm_host.path(LIMITS_DIR).iterdir()]
    assert len(limits) == 1 and "nofile" in limits[0] and "4096" in limits[0]


def test_uamlite_purge_deletes_expired_users_and_their_homes(
        converge: Converge, debian_host: Host, keys: list[str]) -> None:  # noqa: F811
    converge(debian_host, uamlite_doc(user("ops", keys[0], sudo=False)
                                      + user("dev", keys[1], sudo=False)))
    assert passwd(debian_host, "dev") is not None
    converge(debian_host, uamlite_doc(user("ops", keys[0], sudo=False)))
    assert shadow_expire(debian_host, "dev") == "1" and debian_host.path("/home/dev").is_dir()
    converge(debian_host, "conf:\n  uamlite:\n    purge_expired_users: true\n    users: []\n")
    for name in ("ops", "dev"):
        assert passwd(debian_host, name) is None, name
        assert not debian_host.path(f"/home/{name}").exists(), name


def test_replacing_five_exec_scripts_by_one(converge: Converge, overlay_root: Path) -> None:
    host = Host(root=overlay_root)
    five = {f"0{i}0-step": logger(f"step{i}", timeout=30) for i in range(1, 6)}
    converge(host, exec_doc(five))
    assert (host.read_text(LOG) or "").count("step") == 5
    host.path(LOG).write_text("")
    converge(host, exec_doc({"010-only": logger("only", timeout=5)}))
    assert host.read_text(LOG) == "only  \n", "the one left runs; the others revert nothing"
    assert {p.name.split(".")[0] for p in host.path(STORE).iterdir()} == {"010-only"}


@pytest.fixture
def apt_host(debian_host: Host, repo: Repo) -> Iterator[Host]:  # noqa: F811
    """An offline Debian node whose image has its own sources (the test repository): the
    document only lists packages, as in Divingbell's gate."""
    debian_host.path("/etc/apt/keyrings").mkdir(parents=True, exist_ok=True)
    debian_host.path("/etc/apt/keyrings/site.asc").write_text(repo.key)
    debian_host.path("/etc/apt/sources.list").write_text(
        f"deb [signed-by=/etc/apt/keyrings/site.asc] file:{REPO_PATH} ./\n")
    for entry in debian_host.path("/var/lib/apt/lists").iterdir():
        if entry.is_file():
            entry.unlink()
    repo.install_into(debian_host.root)
    debian_host.run(["apt-get", "update", "-q"], env=APT_ENV)
    yield debian_host


def test_a_strict_apt_list_minus_one_package_divingbell_added(
        converge: Converge, apt_host: Host, repo: Repo) -> None:  # noqa: F811
    strict = f"strict: true\nwhitelistpkgs: {json.dumps(sorted(installed(apt_host)))}\n"
    converge(apt_host, apt_doc(repo, strict + "packages: [{name: dbt-hello}, {name: dbt-tool}]",
                               with_repo=False))
    assert {"dbt-hello", "dbt-tool", "dbt-lib"} <= set(installed(apt_host))
    converge(apt_host, apt_doc(repo, strict + "packages: [{name: dbt-tool}]", with_repo=False))
    have = installed(apt_host)
    assert "dbt-hello" not in have and {"dbt-tool", "dbt-lib"} <= set(have)
