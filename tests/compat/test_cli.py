"""The command as a new operator meets it: one-line errors saying what to do, JSON that is
always JSON, plan exit codes and diffs, status that shows everything owned, input checks."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from divingbell.core.host import Host
from tests.conftest import Cli, NetNs, write

pytestmark = pytest.mark.kernel

SYSCTL_DOC = "conf:\n  sysctl:\n    net.ipv4.ip_forward: 1\n    net.ipv4.tcp_syncookies: 0\n"


def no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stderr + result.stdout, result.stderr


# errors -----------------------------------------------------------------------------------------

@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory an unprivileged user can read (pytest's tmp_path is root-only)."""
    path = Path(tempfile.mkdtemp(prefix="dbt-shared-"))
    path.chmod(0o755)
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


def as_nobody(*args: str | Path) -> subprocess.CompletedProcess[str]:
    argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
            sys.executable, "-m", "divingbell", *map(str, args)]
    env = {**os.environ, "HOME": "/nonexistent"}
    return subprocess.run(argv, capture_output=True, text=True, check=False, env=env)


def test_not_root_is_one_line_saying_run_as_root(cli: Cli, shared_dir: Path) -> None:
    root = shared_dir / "root"
    root.mkdir()
    root.chmod(0o755)
    doc = write(shared_dir / "d.yaml", "conf: {}\n")
    doc.chmod(0o644)
    assert cli("apply", doc, "--root", root).returncode == 0  # state dir now exists, 0700
    for command in (("plan", doc), ("apply", doc), ("status",)):
        result = as_nobody(*command, "--root", root)
        no_traceback(result)
        assert result.returncode == 1, (command, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: permission denied"), lines
        assert lines[0].endswith("run it as root")
    as_json = as_nobody("plan", doc, "--root", root, "--format", "json")
    assert json.loads(as_json.stdout)["errors"][0].startswith("permission denied")


def test_status_kube_without_a_kubeconfig(cli: Cli, tmp_path: Path) -> None:
    env = {"KUBECONFIG": "", "HOME": str(tmp_path), "KUBERNETES_SERVICE_HOST": ""}
    result = cli("status", "--kube", env=env)
    no_traceback(result)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot configure the Kubernetes")
    assert "--kubeconfig" in lines[0] and "KUBECONFIG" in lines[0]
    as_json = json.loads(cli("status", "--kube", "--format", "json", env=env).stdout)
    assert as_json["errors"][0].startswith("cannot configure the Kubernetes client")


def test_a_file_that_is_not_utf8(cli: Cli, tmp_path: Path) -> None:
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"conf:\n  sysctl:\n    # caf\xe9\n    net.ipv4.ip_forward: 1\n")
    result = cli("validate", bad)
    no_traceback(result)
    assert result.returncode == 2
    assert f"not UTF-8 text (byte 0xe9): save the file as UTF-8 ({bad}:3)" in result.stderr


def test_yaml_errors_have_a_column(cli: Cli, tmp_path: Path) -> None:
    bad = write(tmp_path / "bad.yaml", "conf:\n  sysctl:\n    a: [1\n")
    result = cli("validate", bad)
    assert result.returncode == 2
    assert f"({bad}:4:1)" in result.stderr, result.stderr


def test_an_unreadable_document_gets_clicks_message_from_apply(shared_dir: Path) -> None:
    """apply's fast path (no click) leaves an unreadable document to click, as a non-root user
    sees it: a usage error naming the file, not a document error."""
    root = shared_dir / "root"
    root.mkdir()
    root.chmod(0o755)
    doc = write(shared_dir / "secret.yaml", "conf: {}\n")
    doc.chmod(0o000)
    result = as_nobody("apply", doc, "--root", root)
    no_traceback(result)
    assert result.returncode == 2, result.stderr
    assert "Invalid value for 'FILES...'" in result.stderr and "is not readable" in \
        result.stderr, result.stderr


def test_lock_held_fails_before_saying_it_applies(cli: Cli, root: Path, tmp_path: Path) -> None:
    doc = write(tmp_path / "d.yaml", "conf: {}\n")
    assert cli("apply", doc, "--root", root).returncode == 0
    fd = os.open(root / "var/lib/divingbell/apply.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        result = cli("apply", doc, "--root", root, "--lock-timeout", "0.2")
        assert result.returncode == 3
        assert result.stdout == "", "nothing may claim the run started"
        assert result.stderr.startswith("error: another divingbell run")
        as_json = cli("apply", doc, "--root", root, "--lock-timeout", "0.2", "--format", "json")
        data = json.loads(as_json.stdout)
        assert data["result"] == "locked" and "another divingbell run" in data["errors"][0]
    finally:
        os.close(fd)


# JSON -------------------------------------------------------------------------------------------

def test_json_is_json_for_invalid_documents_too(cli: Cli, tmp_path: Path, root: Path) -> None:
    typo = write(tmp_path / "typo.yaml", "conf:\n  sysctll: {}\n")
    for command in ("plan", "apply"):
        result = cli(command, typo, "--root", root, "--format", "json")
        assert result.returncode == 2
        data = json.loads(result.stdout)
        assert data["result"] == "invalid"
        assert data["errors"] == [
            f"conf.sysctll: unknown key 'sysctll'; did you mean 'sysctl'? ({typo}:2)"]


def test_plan_and_apply_json_share_one_schema(ns_cli: Cli, tmp_path: Path, root: Path,
                                              netns: NetNs) -> None:
    doc = write(tmp_path / "d.yaml", SYSCTL_DOC)
    plan = json.loads(ns_cli("plan", doc, "--root", root, "--format", "json").stdout)
    applied = json.loads(ns_cli("apply", doc, "--root", root, "--format", "json").stdout)
    for key in ("node", "revision", "result", "summary", "errors", "modules", "notes"):
        assert key in plan and key in applied, key
    assert plan["revision"] == applied["revision"]
    assert "plan_errors" not in applied
    assert plan["result"] == "changes" and applied["result"] == "ok"


# plan -------------------------------------------------------------------------------------------

def test_plan_detailed_exitcode(ns_cli: Cli, tmp_path: Path, root: Path) -> None:
    doc = write(tmp_path / "d.yaml", SYSCTL_DOC)
    assert ns_cli("plan", doc, "--root", root).returncode == 0
    assert ns_cli("plan", doc, "--root", root, "--detailed-exitcode").returncode == 2
    assert ns_cli("apply", doc, "--root", root).returncode == 0
    assert ns_cli("plan", doc, "--root", root, "--detailed-exitcode").returncode == 0
    typo = write(tmp_path / "typo.yaml", "conf:\n  sysctll: {}\n")
    assert ns_cli("plan", typo, "--root", root, "--detailed-exitcode").returncode == 1
    missing = write(tmp_path / "m.yaml", "conf:\n  sysctl:\n    net.ipv4.no_such: 1\n")
    assert ns_cli("plan", missing, "--root", root, "--detailed-exitcode").returncode == 1


def test_plan_diff_shows_file_lines(ns_cli: Cli, tmp_path: Path, root: Path) -> None:
    doc = write(tmp_path / "d.yaml", SYSCTL_DOC)
    assert ns_cli("apply", doc, "--root", root).returncode == 0
    write(doc, SYSCTL_DOC.replace("tcp_syncookies: 0", "tcp_syncookies: 1"))
    text = ns_cli("plan", doc, "--root", root, "--diff").stdout
    assert "      --- /etc/sysctl.d/60-divingbell.conf (now)" in text
    assert "      +++ /etc/sysctl.d/60-divingbell.conf (planned)" in text
    assert "      -net.ipv4.tcp_syncookies = 0" in text
    assert "      +net.ipv4.tcp_syncookies = 1" in text
    data = json.loads(ns_cli("plan", doc, "--root", root, "--diff", "--format", "json").stdout)
    diffs = [c["diff"] for m in data["modules"] for c in m["changes"] if "diff" in c]
    assert len(diffs) == 1 and "+net.ipv4.tcp_syncookies = 1" in diffs[0]
    plain = ns_cli("plan", doc, "--root", root).stdout
    assert "+net.ipv4" not in plain, "diffs only when asked"


def test_unknown_sysctl_suggests_the_real_one(ns_cli: Cli, tmp_path: Path, root: Path) -> None:
    doc = write(tmp_path / "d.yaml", "conf:\n  sysctl:\n    net.ipv4.ip_froward: 1\n")
    result = ns_cli("plan", doc, "--root", root)
    assert result.returncode == 1
    assert "net.ipv4.ip_froward: no such sysctl on this kernel" in result.stdout
    assert "did you mean net.ipv4.ip_forward?" in result.stdout


def test_root_says_sysctls_are_the_live_kernels(ns_cli: Cli, cli: Cli, tmp_path: Path,
                                                root: Path) -> None:
    doc = write(tmp_path / "d.yaml", SYSCTL_DOC)
    result = ns_cli("plan", doc, "--root", root)
    assert "sysctls on the running kernel's /proc/sys (net.* within this network namespace): " \
        "--root does not move them; --proc-sys does" in result.stderr
    help_text = " ".join(cli("plan", "--help").stdout.split())
    assert "Kernel state is not: sysctls follow --proc-sys" in help_text
    assert "--root never moves them" in help_text


# apply, render, status ------------------------------------------------------------------------

def test_apply_output_is_grouped_by_module(ns_cli: Cli, tmp_path: Path, root: Path) -> None:
    doc = write(tmp_path / "d.yaml", SYSCTL_DOC + "  limits:\n    nofile:\n      domain: root\n"
                "      type: soft\n      item: nofile\n      value: 4096\n")
    out = ns_cli("apply", doc, "--root", root).stdout.splitlines()
    assert out[0].startswith("Applying revision ")
    assert out[1] == "sysctl:"
    limits_at = out.index("limits:")
    assert all(line.startswith("  ") for line in out[2:limits_at])
    assert out[limits_at + 1].startswith("  + /etc/security/limits.d/")


def test_render_keeps_long_keys_on_one_line(cli: Cli, tmp_path: Path) -> None:
    key = "net.ipv4.conf." + "x" * 90 + ".forwarding"
    doc = write(tmp_path / "d.yaml", f"conf:\n  sysctl:\n    {key}: 1\n")
    out = cli("render", doc, "--node", "n1").stdout
    assert f"  {key}: '1'" in out.splitlines()


def test_status_shows_everything_owned_with_originals(ns_cli: Cli, tmp_path: Path,
                                                      overlay_root: Path) -> None:
    target = overlay_root / "srv/dbt-perm"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("x\n")
    target.chmod(0o644)
    doc = write(tmp_path / "d.yaml", SYSCTL_DOC + (
        "  perm:\n    paths:\n      - {path: /srv/dbt-perm, owner: root, group: root, "
        "permissions: '0600'}\n"
        "  exec:\n    hello: {data: \"#!/bin/sh\\necho hi\\n\"}\n"))
    assert ns_cli("apply", doc, "--root", overlay_root).returncode == 0
    text = ns_cli("status", "--root", overlay_root).stdout
    assert "  net.ipv4.ip_forward (original: 0)" in text
    assert "  /etc/sysctl.d/60-divingbell.conf (owned file)" in text
    assert "perm:\n  /srv/dbt-perm (original: 0644 root:root)" in text, text
    assert "exec:\n  scripts hello: exit 0, ran at 20" in text, text


# input checks -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("args", "message"), [
    (("--label", "a b=c"), "'a b' is not a Kubernetes label key"),
    (("--label", "role=has space"), "'has space' is not a Kubernetes label value"),
    (("--label", "-bad=x"), "'-bad' is not a Kubernetes label key"),
    (("--node", ""), "'' is not a node name"),
    (("--node", "a b"), "'a b' is not a node name"),
])
def test_bad_labels_and_node_names_are_refused(cli: Cli, tmp_path: Path,
                                               args: tuple[str, str], message: str) -> None:
    doc = write(tmp_path / "d.yaml", "conf: {}\n")
    result = cli("render", doc, *args)
    assert result.returncode == 2
    assert message in result.stderr, result.stderr


def test_bad_labels_in_json_mode_are_json(cli: Cli, tmp_path: Path, root: Path) -> None:
    doc = write(tmp_path / "d.yaml", "conf: {}\n")
    result = cli("plan", doc, "--root", root, "--label", "a b=c", "--format", "json")
    assert result.returncode == 2
    data = json.loads(result.stdout)
    assert data["result"] == "invalid" and "'a b' is not a Kubernetes label key" in data[
        "errors"][0]


def test_good_labels_are_accepted(cli: Cli, tmp_path: Path) -> None:
    doc = write(tmp_path / "d.yaml", "conf: {}\n")
    result = cli("render", doc, "--node", "n1", "--label", "example.com/role=compute",
                 "--label", "empty=")
    assert result.returncode == 0, result.stderr


def test_plan_diff_shows_a_sudoers_file_and_never_a_password(
        cli: Cli, debian_host: Host, tmp_path: Path) -> None:
    secret = "$6$saltsalt$" + "q" * 86
    doc = write(tmp_path / "u.yaml", "conf:\n  uamlite:\n    users:\n      - user_name: ops\n"
                f"        user_sudo: true\n        user_crypt_passwd: '{secret}'\n")
    result = cli("plan", doc, "--root", debian_host.root, "--node", "n1", "--diff")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "      +++ /etc/sudoers.d/divingbell-ops (planned)" in result.stdout
    assert "      +ops ALL=(ALL:ALL) NOPASSWD: ALL" in result.stdout
    assert "qqqq" not in result.stdout + result.stderr
    as_json = cli("plan", doc, "--root", debian_host.root, "--node", "n1", "--diff",
                  "--format", "json")
    assert "qqqq" not in as_json.stdout
