"""apt in a real Debian root (chroot into a per-test overlay) against a signed local repository:
installs in one transaction, pins that stay put, removal of only what divingbell installed,
strict and blacklist, upgrades with reboot-required, debconf, the dpkg lock, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from divingbell.commands.output import plan_text
from divingbell.core.document.loader import load_text
from divingbell.core.document.validate import NodeConfig, resolve, validate
from divingbell.core.engine.runner import ApplyReport, apply_node, plan_node
from divingbell.core.errors import DocumentError
from divingbell.core.host import Host
from divingbell.core.modules.apt import PREFERENCES, PROTECTED, sources_file
from tests.aptrepo import REPO_PATH, Repo, build_repo

pytestmark = pytest.mark.kernel


@pytest.fixture(scope="session")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Repo:
    return build_repo(tmp_path_factory.mktemp("aptrepo"))


@pytest.fixture
def host(debian_host: Host, repo: Repo) -> Iterator[Host]:
    """An offline Debian node: its own sources emptied, our repository at /srv/repo."""
    (debian_host.path("/etc/apt/sources.list")).write_text("")
    lists = debian_host.path("/var/lib/apt/lists")
    for entry in lists.iterdir():
        if entry.is_file():
            entry.unlink()
    repo.install_into(debian_host.root)
    yield debian_host


def doc(repo: Repo, apt: str = "", *, with_repo: bool = True) -> str:
    lines = ["conf:", "  apt:"]
    if with_repo:
        key = textwrap.indent(repo.key, " " * 10)
        lines += ["    repositories:", "      local:", f"        url: file:{REPO_PATH}",
                  "        distributions: [./]", "        gpgkey: |", key.rstrip("\n")]
    lines += [textwrap.indent(textwrap.dedent(apt), "    ").rstrip("\n")] if apt else []
    return "\n".join(lines) + "\n"


def config(text: str) -> NodeConfig:
    return resolve(validate(load_text(text)), "n1", {})


def apply(host: Host, text: str) -> ApplyReport:
    return apply_node(host, config(text), "r", lock_timeout=1)


def installed(host: Host) -> dict[str, str]:
    out = host.run(["dpkg-query", "-W", "-f", "${Package} ${Version} ${db:Status-Abbrev}\n"])
    return {name: version for name, version, status in
            (line.split(" ", 2) for line in out.stdout.splitlines()) if status.startswith("ii")}


def dpkg_actions(host: Host) -> int:
    log = host.read_text("/var/log/dpkg.log") or ""
    return sum(1 for line in log.splitlines() if " install " in line or " remove " in line
               or " upgrade " in line or " purge " in line)


def shown(report: ApplyReport) -> dict[str, tuple[str | None, str | None, str]]:
    return {c.target: (c.before, c.after, c.reason) for c in report.plan.changes
            if c.module == "apt" and c.changes_host}


def test_install_pin_noop_and_removal(host: Host, repo: Repo) -> None:
    text = doc(repo, """
        packages:
          - name: dbt-hello
            version: 1:1.0-1
          - name: dbt-tool
    """)
    plan = plan_node(host, config(text))
    assert not plan.errors, plan.errors
    # Before the repository exists the lists cannot answer; the plan says what it will do.
    assert {"package dbt-hello", "package dbt-tool"} <= {c.target for c in plan.changes}
    report = apply(host, text)
    assert report.ok, report.as_dict()
    have = installed(host)
    assert have["dbt-hello"] == "1:1.0-1"  # pinned, though 1:2.0-1 is the candidate
    assert have["dbt-tool"] == "1.0" and have["dbt-lib"] == "1.0"
    sources = host.read_text(sources_file("local")) or ""
    assert "Signed-By: /etc/apt/keyrings/divingbell-local.asc" in sources
    assert "Pin: version 1:1.0-1" in (host.read_text(PREFERENCES) or "")

    # Now the lists know the packages: the plan is apt's own simulation, dependencies included.
    before = dpkg_actions(host)
    again = apply(host, text)
    assert again.ok and shown(again) == {}, shown(again)
    assert dpkg_actions(host) == before, "a satisfied pin must not reinstall anything"

    gone = apply(host, doc(repo, "packages: []"))
    assert gone.ok, gone.as_dict()
    changes = shown(gone)
    assert changes["package dbt-hello"][1] is None and changes["package dbt-tool"][1] is None
    have = installed(host)
    assert "dbt-hello" not in have and "dbt-tool" not in have
    assert "dbt-lib" not in have, "its automatic dependency, needed by nothing else, goes too"
    assert changes["package dbt-lib"][2].startswith("installed automatically for dbt-hello, "
                                                    "dbt-tool; no longer needed")
    assert host.read_text(PREFERENCES) is None

    final = apply(host, "conf: {}\n")
    assert final.ok
    assert host.read_text(sources_file("local")) is None
    assert host.read_text("/etc/apt/keyrings/divingbell-local.asc") is None


def test_plan_shows_apt_simulation_and_touches_nothing(host: Host, repo: Repo) -> None:
    assert apply(host, doc(repo)).ok  # the repository alone: sources, key, lists
    before = installed(host)
    plan = plan_node(host, config(doc(repo, "packages: [{name: dbt-tool}]")))
    lines = plan_text(plan)
    assert "package dbt-tool" in lines and "package dbt-lib" in lines
    dep = next(c for c in plan.changes if c.target == "package dbt-lib")
    assert dep.after == "1.0" and "dependency" in dep.reason
    assert installed(host) == before


def test_rc_state_counts_as_not_installed(host: Host, repo: Repo) -> None:
    text = doc(repo, "packages: [{name: dbt-ask}]")
    assert apply(host, text).ok
    host.run(["dpkg", "--remove", "dbt-ask"])  # leaves rc: its config files stay
    status = host.run(["dpkg-query", "-W", "-f", "${db:Status-Abbrev}", "dbt-ask"]).stdout
    assert status.startswith("rc")
    report = apply(host, text)
    assert report.ok and "package dbt-ask" in shown(report)
    assert "dbt-ask" in installed(host)


def test_packages_divingbell_did_not_install_are_never_removed(host: Host, repo: Repo) -> None:
    host.run(["dpkg", "-i", f"{REPO_PATH}/dbt-extra_1.0_all.deb"])
    assert apply(host, doc(repo, "packages: [{name: dbt-extra}, {name: dbt-lib}]")).ok
    report = apply(host, doc(repo, "packages: []"))
    assert report.ok
    have = installed(host)
    assert "dbt-extra" in have, "it was there before divingbell"
    assert "dbt-lib" not in have, "divingbell installed this one"


def test_removal_that_would_take_other_packages_is_refused(host: Host, repo: Repo) -> None:
    assert apply(host, doc(repo, "packages: [{name: dbt-extra}]")).ok
    host.run(["apt-get", "install", "-y", "-q", "dbt-needs-extra"],
             env={"DEBIAN_FRONTEND": "noninteractive"})
    report = apply(host, doc(repo, "packages: []"))
    assert not report.ok
    assert "would make apt also remove dbt-needs-extra" in " ".join(report.plan.errors)
    assert {"dbt-extra", "dbt-needs-extra"} <= set(installed(host))


def test_pins_hold_through_upgrade_and_downgrades_need_consent(host: Host, repo: Repo) -> None:
    assert apply(host, doc(repo, "packages: [{name: dbt-hello}]")).ok
    assert installed(host)["dbt-hello"] == "1:2.0-1"
    pinned = doc(repo, "packages: [{name: dbt-hello, version: '1:1.0-1'}]")
    refused = apply(host, pinned)
    assert not refused.ok
    assert "older than the installed 1:2.0-1; set allow_downgrade" in " ".join(
        refused.plan.errors)
    assert installed(host)["dbt-hello"] == "1:2.0-1"

    consent = "packages: [{name: dbt-hello, version: '1:1.0-1', allow_downgrade: true}]"
    allowed = apply(host, doc(repo, consent))
    assert allowed.ok, allowed.as_dict()
    assert shown(allowed)["package dbt-hello"] == ("1:2.0-1", "1:1.0-1", "pinned at 1:1.0-1")
    upgrade = apply(host, doc(repo, f"upgrade: true\n{consent}"))
    assert upgrade.ok, upgrade.as_dict()
    assert installed(host)["dbt-hello"] == "1:1.0-1", "upgrade: true must not move a pin"


def test_upgrade_reports_reboot_required(host: Host, repo: Repo) -> None:
    assert apply(host, doc(repo)).ok
    host.run(["apt-get", "install", "-y", "-q", "dbt-hello=1:1.0-1"],
             env={"DEBIAN_FRONTEND": "noninteractive"})
    text = doc(repo, "upgrade: true")
    plan = plan_node(host, config(text))
    step = next(c for c in plan.changes if c.target == "package dbt-hello")
    assert (step.before, step.after, step.reason) == ("1:1.0-1", "1:2.0-1", "upgrade")
    report = apply(host, text)
    assert report.ok, report.as_dict()
    assert installed(host)["dbt-hello"] == "1:2.0-1"
    notes = [n for result in report.results for n in result.notes]
    assert any("needs a reboot" in n and "dbt-hello" in n for n in notes), notes
    assert shown(apply(host, text)) == {}


def test_debconf_preseeded_before_install_and_reconfigured_on_change(host: Host,
                                                                     repo: Repo) -> None:
    def with_answer(answer: str) -> str:
        return doc(repo, f"""
            packages:
              - name: dbt-ask
                debconf:
                  - {{question: dbt-ask/greeting, question_type: string, answer: {answer}}}
        """)

    assert apply(host, with_answer("ahoy")).ok
    assert host.read_text("/etc/dbt-ask.conf") == "ahoy\n"
    assert shown(apply(host, with_answer("ahoy"))) == {}
    changed = apply(host, with_answer("hej"))
    assert changed.ok and "debconf dbt-ask/greeting" in shown(changed)
    assert host.read_text("/etc/dbt-ask.conf") == "hej\n", "the installed package reconfigured"


def test_strict_removes_only_the_unrequested_and_never_essentials(host: Host, repo: Repo) -> None:
    assert apply(host, doc(repo, "packages: [{name: dbt-tool}]")).ok
    host.run(["dpkg", "-i", f"{REPO_PATH}/dbt-extra_1.0_all.deb"])
    base = installed(host)
    plan = plan_node(host, config(doc(repo, "strict: true\npackages: [{name: dbt-tool}]")))
    removed = {c.target.removeprefix("package ") for c in plan.changes
               if c.target.startswith("package ") and c.after is None}
    assert "dbt-extra" in removed
    assert "dbt-lib" not in removed, "a dependency of a requested package stays"
    essential = set(host.run(["dpkg-query", "-W", "-f", "${Package} ${Essential}\n"])
                    .stdout.split("\n"))
    assert not removed & {line.split()[0] for line in essential if line.endswith(" yes")}
    assert not removed & PROTECTED

    # Whitelisting what the image had leaves exactly the stray package to remove.
    whitelist = sorted(set(base) - {"dbt-extra", "dbt-tool", "dbt-lib"})
    text = doc(repo, f"strict: true\nwhitelistpkgs: {json.dumps(whitelist)}\n"
                     "packages: [{name: dbt-tool}]")
    report = apply(host, text)
    assert report.ok, report.as_dict()
    assert set(shown(report)) == {"package dbt-extra"}
    assert set(installed(host)) == set(base) - {"dbt-extra"}


def test_blacklist_purges_without_autoremove(host: Host, repo: Repo) -> None:
    assert apply(host, doc(repo)).ok
    host.run(["apt-get", "install", "-y", "-q", "dbt-tool"],
             env={"DEBIAN_FRONTEND": "noninteractive"})
    host.run(["apt-mark", "auto", "dbt-lib"])
    report = apply(host, doc(repo, "blacklistpkgs: [dbt-tool]"))
    assert report.ok
    assert shown(report)["package dbt-tool"][2] == "blacklisted: purged"
    have = installed(host)
    assert "dbt-tool" not in have and "dbt-lib" in have, "no autoremove of unrelated packages"
    status = host.run(["dpkg-query", "-W", "-f", "${db:Status-Abbrev}", "dbt-tool"],
                      ok_codes=(0, 1)).stdout
    assert not status.startswith("rc"), "purged, not just removed"


def test_exclusive_sources_blanks_others_and_gives_them_back(host: Host, repo: Repo) -> None:
    other = "deb http://deb.debian.org/debian bookworm main\n"
    host.path("/etc/apt/sources.list").write_text(other)
    report = apply(host, doc(repo, "exclusive_sources: true\npackages: [{name: dbt-lib}]"))
    assert report.ok, report.as_dict()  # no network: it works only if the mirror is disabled
    assert "Disabled by divingbell" in (host.read_text("/etc/apt/sources.list") or "")
    assert apply(host, doc(repo, "packages: [{name: dbt-lib}]")).ok
    assert host.read_text("/etc/apt/sources.list") == other


def test_dpkg_lock_held_gives_a_clear_error_and_changes_nothing(host: Host, repo: Repo) -> None:
    assert apply(host, doc(repo)).ok
    lock = host.path("/var/lib/dpkg/lock-frontend")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl,sys,time; f=open(sys.argv[1],'w'); "
         "fcntl.lockf(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)", str(lock)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        report = apply(host, doc(repo, "dpkg_lock_timeout: 1\npackages: [{name: dbt-lib}]"))
    finally:
        holder.kill()
        holder.wait()
    assert not report.ok
    error = " ".join(r.error or "" for r in report.results)
    assert "dpkg lock is busy" in error and "waited 1s" in error, error
    assert "dbt-lib" not in installed(host)


@pytest.mark.parametrize(("apt", "message"), [
    ("packages: [{name: dbt-hello, version: 'not a version'}]", "is not a Debian version"),
    ("packages: [{name: Bad_Name}]", "is not a Debian package name"),
    ("packages: [{name: dbt-lib}]\nblacklistpkgs: [dbt-lib]", "requested and blacklisted"),
    ("repositories: {r: {url: 'http://x', distributions: [bookworm]}}", "components are required"),
    ("repositories: {r: {url: 'http://x', distributions: [./], gpgkey: nope}}", "ASCII-armored"),
])
def test_bad_input_is_refused_with_its_path(repo: Repo, apt: str, message: str) -> None:
    with pytest.raises(DocumentError) as err:
        config(doc(repo, apt, with_repo=False))
    assert message in str(err.value)
    assert "conf.apt" in str(err.value)


def test_unknown_package_fails_the_plan_and_changes_nothing(host: Host, repo: Repo) -> None:
    assert apply(host, doc(repo)).ok
    before = installed(host)
    report = apply(host, doc(repo, "packages: [{name: dbt-lib}, {name: dbt-nonexistent}]"))
    assert not report.ok
    assert "Unable to locate package dbt-nonexistent" in " ".join(report.plan.errors)
    assert installed(host) == before


def test_cli_plan_lists_packages(host: Host, repo: Repo, tmp_path: Path) -> None:
    assert apply(host, doc(repo)).ok
    document = tmp_path / "doc.yaml"
    document.write_text(doc(repo, "packages: [{name: dbt-tool}]"))
    out = subprocess.run([sys.executable, "-m", "divingbell", "plan", str(document), "--root",
                          str(host.root), "--node", "n1", "--format", "json"],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    targets = {c["target"] for m in json.loads(out.stdout)["modules"] for c in m["changes"]}
    assert {"package dbt-tool", "package dbt-lib"} <= targets


def test_blacklist_takes_dependents_but_never_requested_ones(host: Host, repo: Repo) -> None:
    assert apply(host, doc(repo, "packages: [{name: dbt-tool}]")).ok
    refused = apply(host, doc(repo, "packages: [{name: dbt-tool}]\nblacklistpkgs: [dbt-lib]"))
    assert not refused.ok
    assert "also remove dbt-tool" in " ".join(refused.plan.errors)
    assert "dbt-lib" in installed(host)

    report = apply(host, doc(repo, "blacklistpkgs: [dbt-lib]"))
    assert report.ok, report.as_dict()
    assert shown(report)["package dbt-tool"][2] == "depends on blacklisted dbt-lib"
    assert not {"dbt-tool", "dbt-lib"} & set(installed(host))
