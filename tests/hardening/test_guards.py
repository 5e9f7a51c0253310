"""A file without `conf:` never rolls a node back, while a whole document is applied however
much it removes (section 6, issue 23), and the lock-out guard sees every way into the host:
the whole sudoers tree, groups, passwords (section 7)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from divingbell.core.document.loader import load_text
from divingbell.core.document.validate import resolve, validate
from divingbell.core.engine.runner import ApplyReport, apply_node
from divingbell.core.host import Host
from divingbell.core.modules.sudoers import parse_tree
from tests.conftest import Cli, make_proc_sys, write

THREE = "conf:\n  sysctl:\n    vm.swappiness: 10\n    net.core.somaxconn: 1024\n" \
        "    net.ipv4.ip_forward: 1\n"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGKv9eU0ZP4B9hTL2cHmy1oExGv3A0kQfJ9pA3d5m1Yh"
HASH = ("$6$salt$IxDD3jeSOb5eB1CX5LBsqZFVkJdido3OUILO5Ifz5iwMuTS4XMS130MTSuDDl3aCI6WouIL9AjRbLC"
        "elDCy.g.")


def converge(host: Host, text: str) -> ApplyReport:
    return apply_node(host, resolve(validate(load_text(text)), "n1", {}), "r", lock_timeout=1)


def test_a_document_that_removes_more_than_it_keeps_is_applied(scratch_host: Host) -> None:
    assert converge(scratch_host, THREE).ok
    report = converge(scratch_host, "conf:\n  limits: {}\n")
    assert report.ok and sum(c.action == "restore" for c in report.applied) == 3
    assert (scratch_host.proc_sys / "vm/swappiness").read_text().strip() == "60"


def test_conf_braces_is_an_explicit_empty_document(scratch_host: Host) -> None:
    assert converge(scratch_host, THREE).ok
    assert converge(scratch_host, "conf: {}\n").ok
    assert (scratch_host.proc_sys / "vm/swappiness").read_text().strip() == "60"


def test_allow_mass_removal_still_validates_with_a_note() -> None:
    document = validate(load_text("allow_mass_removal: true\nconf: {}\n", "site.yaml"))
    (note,) = document.notes
    assert note.startswith("allow_mass_removal no longer does anything")
    assert "--allow-removals" in note and "site.yaml:1" in note


def test_the_cli_refuses_only_a_file_without_conf(scratch_host: Host, cli: Cli,
                                                  tmp_path: Path) -> None:
    args = ("--root", scratch_host.root, "--proc-sys", scratch_host.proc_sys, "--node", "n1")
    assert cli("apply", *args, write(tmp_path / "three.yaml", THREE)).returncode == 0
    empty = write(tmp_path / "empty.yaml", "")
    refused = cli("apply", *args, empty)
    assert refused.returncode == 2 and "no `conf:`" in refused.stderr
    assert (scratch_host.proc_sys / "vm/swappiness").read_text().strip() == "10"
    # An operator at the keyboard sees the plan and gets what the document says.
    one = write(tmp_path / "one.yaml", "conf:\n  sysctl:\n    vm.swappiness: 10\n")
    planned = cli("plan", *args, one)
    assert planned.returncode == 0 and planned.stderr == "", planned.stderr
    assert "net.core.somaxconn" in planned.stdout and "4096" in planned.stdout
    done = cli("apply", *args, one)
    assert done.returncode == 0, done.stderr
    assert (scratch_host.proc_sys / "net/core/somaxconn").read_text().strip() == "4096"
    done = cli("apply", *args, "--allow-empty", empty)
    assert done.returncode == 0, done.stderr
    assert (scratch_host.proc_sys / "vm/swappiness").read_text().strip() == "60"


@pytest.mark.parametrize(("text", "reason", "says"), [
    ("", "IncompleteDocument", "it has no `conf:`"),
    ("# only a comment: the rest was cut\n", "IncompleteDocument", "it has no `conf:`"),
    ("drift: report\n", "IncompleteDocument", "it has no `conf:`"),
    ("conf:\n  sysctl:\n    vm.swappiness: [1\n", "InvalidDocument", "refusing an invalid"),
])
def test_the_agent_refuses_what_is_evidently_not_a_whole_document(
        tmp_path: Path, root: Path, caplog: pytest.LogCaptureFixture, text: str, reason: str,
        says: str) -> None:
    from divingbell.agent.loop import Agent, AgentSettings

    host = Host(root=root, proc_sys=make_proc_sys(tmp_path / "ps", {
        "vm/swappiness": "60", "net/core/somaxconn": "4096", "net/ipv4/ip_forward": "0"}))
    doc = write(tmp_path / "doc.yaml", THREE)
    # Driven through its loop as in production. A pinned agent (the DaemonSet's default) never
    # reads a changed file at all; one that follows changes (the systemd unit, an operator's
    # own mutable Secret) reads the broken file and must refuse it.
    agent = Agent(AgentSettings(documents=[doc], node="n1", host=host,
                                follow_document_changes=True), None)
    agent.tick()
    assert agent.ready and (host.proc_sys / "vm/swappiness").read_text().strip() == "10"
    doc.write_text(text)
    agent.tick()
    assert (host.proc_sys / "vm/swappiness").read_text().strip() == "10"
    assert not agent.ready and says in agent.reason, agent.reason
    assert "Nothing was changed on this host" in agent.reason
    assert f"{reason}: refusing" in caplog.text, "the agent's log says why"
    # A whole document that removes everything but one setting is converged.
    doc.write_text("conf:\n  sysctl:\n    vm.swappiness: 10\n")
    agent.tick()
    assert agent.ready, agent.reason
    assert (host.proc_sys / "net/core/somaxconn").read_text().strip() == "4096"


# The lock-out guard ---------------------------------------------------------------------------

def uam(users: str, *, allow_lockout: bool = False) -> str:
    return ("conf:\n  uamlite:\n" + ("    allow_lockout: true\n" if allow_lockout else "")
            + "    users:\n" + textwrap.indent(textwrap.dedent(users), "      "))


def plain(host: Host, text: str) -> ApplyReport:
    return apply_node(host, resolve(validate(load_text(text)), "n1", {}), "r", lock_timeout=1)


@pytest.mark.parametrize("grant", [
    ("/etc/sudoers.d/90-admins", "carol ALL=(ALL:ALL) NOPASSWD: ALL\n"),
    ("/etc/sudoers.d/90-admins", "%ops-admins ALL=(root) ALL\n"),
    ("/etc/sudoers.d/90-admins", "User_Alias ADMINS = dave, \\\n  carol\nADMINS ALL = ALL\n"),
    ("/etc/sudoers", None),  # Debian's own %sudo rule, carol in group sudo
])
def test_sudo_from_anywhere_in_the_tree_counts(debian_host: Host, grant: tuple[str, str | None]
                                               ) -> None:
    debian_host.run(["groupadd", "ops-admins"])
    debian_host.run(["useradd", "--create-home", "-G", "ops-admins,sudo", "carol"]
                    if grant[1] is None or "ops-admins" in grant[1]
                    else ["useradd", "--create-home", "carol"])
    if grant[1] is not None:
        write(debian_host.path(grant[0]), grant[1]).chmod(0o440)
    assert plain(debian_host, uam(f"- user_name: carol\n  user_sshkeys: ['{KEY}']\n")).ok
    refused = plain(debian_host, uam("- user_name: carol\n  user_sshkeys: []\n"))
    assert not refused.ok and "no way in" in " ".join(refused.errors)
    assert KEY in debian_host.path("/home/carol/.ssh/authorized_keys").read_text()


def test_a_rule_for_some_commands_is_not_root(debian_host: Host) -> None:
    debian_host.run(["useradd", "--create-home", "carol"])
    write(debian_host.path("/etc/sudoers.d/50-apt"), "carol ALL=(root) /usr/bin/apt\n")
    tree = parse_tree(debian_host.read_text, debian_host.listdir)
    ids = {"carol": debian_host.user_ids("carol")}
    assert tree.root_users(ids, {}) == set()


def test_a_password_is_a_way_in(debian_host: Host) -> None:
    debian_host.run(["useradd", "--create-home", "-G", "sudo", "carol"])
    assert plain(debian_host, uam(f"- user_name: carol\n  user_sshkeys: ['{KEY}']\n"
                                  f"  user_crypt_passwd: '{HASH}'\n")).ok
    # Keys go, the password stays: still a way in with root.
    assert plain(debian_host, uam("- user_name: carol\n  user_sshkeys: []\n")).ok


def test_naming_a_user_only_for_a_password_keeps_its_keys(debian_host: Host) -> None:
    debian_host.run(["useradd", "--create-home", "carol"])
    keys = write(debian_host.path("/home/carol/.ssh/authorized_keys"), f"{KEY} carol@laptop\n")
    assert plain(debian_host, uam(f"- user_name: carol\n  user_crypt_passwd: '{HASH}'\n",
                                  allow_lockout=True)).ok
    assert keys.read_text() == f"{KEY} carol@laptop\n"
