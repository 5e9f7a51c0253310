"""SIGTERM, Ctrl-C and SIGKILL (issue 11, section 5): apply stops between changes, kills a
running script's process group, records the outcome and says what happened; what was created
before a kill is known to the journal."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import write

pytestmark = pytest.mark.kernel

SCRIPTS = """\
conf:
  exec:
    a-slow:
      rerun_policy: never
      data: |
        #!/bin/sh
        if [ -e /var/tmp/db-let-finish ]; then touch /var/tmp/db-finished; exit 0; fi
        echo $$ > /var/tmp/db-slow.pid
        sleep 300 &
        echo $! > /var/tmp/db-child.pid
        wait
    b-after:
      data: |
        #!/bin/sh
        touch /var/tmp/db-after
"""


def start_apply(root: Path, doc: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "divingbell", "apply", "--root", str(root),
                             "--node", "n1", str(doc)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def divingbell(root: Path, command: str, doc: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "divingbell", command, "--root", str(root),
                           "--node", "n1", str(doc)], capture_output=True, text=True,
                          check=False)


def wait_for(path: Path, proc: subprocess.Popen[str]) -> int:
    for _ in range(600):
        if path.exists() and path.read_text().strip():
            return int(path.read_text())
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError(f"{path} never appeared")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat").read_text().split()[2]
    return status != "Z"


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_during_a_script_kills_its_group_and_records_it(
        overlay_root: Path, tmp_path: Path, signum: int, code: int) -> None:
    doc = write(tmp_path / "doc.yaml", SCRIPTS)
    proc = start_apply(overlay_root, doc)
    wait_for(overlay_root / "var/tmp/db-slow.pid", proc)
    child = wait_for(overlay_root / "var/tmp/db-child.pid", proc)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, out + err
    assert f"interrupted by {signal.Signals(signum).name}: 1 of 2 changes applied; " \
        "run apply again" in err
    assert "Traceback" not in err and "Aborted" not in err
    assert "Stopped by a signal between two changes" in out
    for _ in range(100):  # the group got SIGTERM then SIGKILL; give the kernel a moment
        if not alive(child):
            break
        time.sleep(0.05)
    assert not alive(child), "the script's child survived"
    assert not (overlay_root / "var/tmp/db-after").exists()  # stopped between changes
    last = json.loads((overlay_root / "var/lib/divingbell/last-run.json").read_text())
    assert last["result"] == "interrupted"
    assert (last["applied_count"], last["planned_count"]) == (1, 2)
    # An interrupted run does not count: the `never` script never finished, so the next plan
    # says it was interrupted and will run, and the next apply runs it to its end.
    plan = divingbell(overlay_root, "plan", doc)
    assert plan.returncode == 0, plan.stdout + plan.stderr
    assert "script a-slow: interrupted -> run" in plan.stdout
    (overlay_root / "var/tmp/db-let-finish").touch()
    again = divingbell(overlay_root, "apply", doc)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "already matches the document" not in again.stdout
    assert (overlay_root / "var/tmp/db-finished").exists(), "the interrupted script did not rerun"
    assert (overlay_root / "var/tmp/db-after").exists()
    # Run to its end once, `never` holds again.
    (overlay_root / "var/tmp/db-finished").unlink()
    third = divingbell(overlay_root, "apply", doc)
    assert third.returncode == 0, third.stdout + third.stderr
    assert "script a-slow" not in third.stdout  # b-after, `always`, runs each time
    assert not (overlay_root / "var/tmp/db-finished").exists(), "the `never` script ran twice"


def test_a_user_created_just_before_a_kill_is_known_to_the_journal(debian_host: object,
                                                                    tmp_path: Path) -> None:
    from divingbell.core.host import Host

    assert isinstance(debian_host, Host)
    root = debian_host.root
    subprocess.run(["chroot", str(root), "chpasswd", "--encrypted"], check=True, text=True,
                   input="root:$6$salt$IxDD3jeSOb5eB1CX5LBsqZFVkJdido3OUILO5Ifz5iwMuTS4XMS130"
                   "MTSuDDl3aCI6WouIL9AjRbLCelDCy.g.\n")
    doc = write(tmp_path / "doc.yaml", "conf:\n  uamlite:\n    users:\n"
                "      - {user_name: crashy, user_sudo: false}\n"
                "      - {user_name: crashz, user_sudo: false}\n")
    env = {**os.environ, "DIVINGBELL_FAULT_KILL_AT": "change:2"}  # after `crashy` is made
    killed = subprocess.run([sys.executable, "-m", "divingbell", "apply", "--root", str(root),
                             "--node", "n1", str(doc)], env=env, capture_output=True,
                            text=True, check=False)
    assert killed.returncode == -9, killed.stdout + killed.stderr
    assert "crashy:" in (root / "etc/passwd").read_text()
    purge = write(tmp_path / "purge.yaml", "conf:\n  uamlite:\n    purge_expired_users: true\n"
                  "    users: []\n")
    done = subprocess.run([sys.executable, "-m", "divingbell", "apply", "--root", str(root),
                           "--node", "n1", str(purge)], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "crashy:" not in (root / "etc/passwd").read_text()


SIGNAL_POINTS = {
    # point: (changed by the time the signal lands, what the message must say)
    "start": (False, "before changing anything"),
    "resolved": (False, "interrupted by SIG"),
    "applied": (True, "after the run had finished"),
    "reported": (True, "after the run had finished"),
}


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("point", sorted(SIGNAL_POINTS))
def test_a_signal_very_early_or_very_late_is_said_with_what_was_done(
        scratch_host: object, tmp_path: Path, point: str, signame: str) -> None:
    """A signal landing before the engine starts, or after it finished, once ended apply with
    no word (killed by SIGTERM, a silent exit 130, or exit 0). Whenever divingbell stops on a
    signal it says so, and what it did. The signal is real, sent by the process to itself at a
    named point (DIVINGBELL_FAULT_SIGNAL_AT), so every window is hit every time."""
    from divingbell.core.host import Host

    assert isinstance(scratch_host, Host)
    doc = write(tmp_path / "doc.yaml", "conf:\n  sysctl:\n    vm.swappiness: 10\n")
    signum = signal.Signals[signame]
    result = subprocess.run(
        [sys.executable, "-m", "divingbell", "apply", "--root", str(scratch_host.root),
         "--proc-sys", str(scratch_host.proc_sys), "--node", "n1", str(doc)],
        capture_output=True, text=True, check=False,
        env={**os.environ, "DIVINGBELL_FAULT_SIGNAL_AT": f"{point}:{signame}"})
    changed, said = SIGNAL_POINTS[point]
    assert result.returncode == 128 + signum, result.stdout + result.stderr
    assert f"{signame}" in result.stderr and said in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    if point != "start":  # what it did: how many of the planned changes were made
        assert re.search(rf"\b{2 if changed else 0} of 2 changes applied", result.stderr)
    swappiness = (scratch_host.proc_sys / "vm/swappiness").read_text().strip()
    assert swappiness == ("10" if changed else "60")


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_a_signal_early_in_another_command_is_said(tmp_path: Path, signame: str) -> None:
    doc = write(tmp_path / "doc.yaml", "conf:\n  sysctl:\n    vm.swappiness: 10\n")
    result = subprocess.run(
        [sys.executable, "-m", "divingbell", "validate", str(doc)], capture_output=True,
        text=True, check=False, env={**os.environ, "DIVINGBELL_FAULT_SIGNAL_AT": f"start:{signame}"})
    assert result.returncode == 128 + signal.Signals[signame], result.stdout + result.stderr
    assert f"divingbell: stopped by {signame}" in result.stderr
