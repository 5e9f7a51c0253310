"""kernel: command-line parameters as divingbell's GRUB drop-in, then a real `update-grub`
chrooted into a Debian root on a loop device (tests/grubroot.py says what is real); what the
running kernel booted with and what GRUB boots next, both in the plan."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from divingbell.core.document.loader import load_text
from divingbell.core.document.nodeconfig import NodeConfig
from divingbell.core.document.validate import resolve, validate
from divingbell.core.engine.change import NONE, REBOOT, Action
from divingbell.core.engine.journal import ModuleRecord
from divingbell.core.engine.runner import ApplyReport, Plan, apply_node, plan_node
from divingbell.core.errors import DocumentError
from divingbell.core.host import Host
from divingbell.core.modules.kernel import (
    BOOT_CONFIG,
    DROPIN,
    DROPIN_TEXT,
    GRUBENV,
    RUNNING,
    SCRIPT,
    SCRIPT_TEXT,
    TRIAL_FILE,
    VARIABLE,
    BootEntry,
    ClearTry,
    Held,
    Kernel,
    KernelObserved,
    Reverted,
    Trial,
    TrialState,
    TryOnce,
    default_entry,
    load_trial,
    parse_grubenv,
    settle_trial,
)
from tests.conftest import Cli
from tests.grubroot import boot, next_boot_line

DOC = """\
conf:
  kernel:
    cmdline:
      hugepages: 16
      isolcpus: 2-7
    flags: [nosmt]
  overrides:
    divingbell_kernel:
      labels:
        - label: {key: role, values: [storage]}
          conf:
            kernel:
              cmdline: {hugepages: 1024}
      hosts:
        - name: special
          conf:
            kernel:
              flags: [nosmt, mitigations-off-please]
"""


def config(text: str, node: str = "n1", labels: dict[str, str] | None = None) -> NodeConfig:
    return resolve(validate(load_text(text)), node, labels or {})


# Pure: grub.cfg's default entry ------------------------------------------------------------

GRUB_CFG_TEXT = """\
if [ "${next_entry}" ] ; then
   set default="${next_entry}"
else
   set default="%s"
fi
menuentry 'Debian GNU/Linux' --class debian $menuentry_id_option 'gnulinux-simple-u1' {
	linux	/boot/vmlinuz-6.1.0-31-amd64 root=UUID=u1 ro quiet hugepages=16
	initrd	/boot/initrd.img-6.1.0-31-amd64
}
submenu 'Advanced options for Debian GNU/Linux' $menuentry_id_option 'gnulinux-advanced-u1' {
	menuentry 'Debian GNU/Linux, with Linux 6.1.0-31-amd64' $menuentry_id_option 'k31' {
		linux	/boot/vmlinuz-6.1.0-31-amd64 root=UUID=u1 ro quiet hugepages=16
	}
	menuentry 'Debian GNU/Linux, with Linux 6.1.0-30-amd64' $menuentry_id_option 'k30' {
		linux	/boot/vmlinuz-6.1.0-30-amd64 root=UUID=u1 ro quiet
	}
}
"""


@pytest.mark.parametrize(("default", "grubenv", "title", "params"), [
    ("0", None, "Debian GNU/Linux", ["root=UUID=u1", "ro", "quiet", "hugepages=16"]),
    ("1>1", None, "Debian GNU/Linux, with Linux 6.1.0-30-amd64",
     ["root=UUID=u1", "ro", "quiet"]),
    # An id names an entry of the top menu only (GRUB's rule): no match boots the first.
    ("k30", None, "Debian GNU/Linux", ["root=UUID=u1", "ro", "quiet", "hugepages=16"]),
    ("gnulinux-advanced-u1>k30", None, "Debian GNU/Linux, with Linux 6.1.0-30-amd64",
     ["root=UUID=u1", "ro", "quiet"]),
    ("${saved_entry}", "# GRUB Environment Block\nsaved_entry=1>1\n",
     "Debian GNU/Linux, with Linux 6.1.0-30-amd64", ["root=UUID=u1", "ro", "quiet"]),
    ("${saved_entry}", None, "Debian GNU/Linux", ["root=UUID=u1", "ro", "quiet", "hugepages=16"]),
    ("7", None, "Debian GNU/Linux", ["root=UUID=u1", "ro", "quiet", "hugepages=16"]),
])
def test_default_entry(default: str, grubenv: str | None, title: str, params: list[str]) -> None:
    assert default_entry(GRUB_CFG_TEXT % default, grubenv) == BootEntry(title, params)


def test_no_entry_at_all() -> None:
    assert default_entry("set default=0\n") is None


# Pure: validation ----------------------------------------------------------------------------

@pytest.mark.parametrize(("kernel", "path", "message"), [
    ("cmdline: {root: /dev/sdb1}", "kernel", "root: decides what boots"),
    ("cmdline: {init: /bin/sh}", "kernel", "kernel.allow_unsafe"),
    ("cmdline: {console: 'tty S0'}", "kernel.cmdline.console", "cannot go on a boot line"),
    ("cmdline: {x: 'a\"b'}", "kernel.cmdline.x", "cannot go on a boot line"),
    ("cmdline: {x: \"a'b\"}", "kernel.cmdline.x", "cannot go on a boot line"),
    ("cmdline: {x: 'a;reboot'}", "kernel.cmdline.x", "cannot go on a boot line"),
    ("cmdline: {x: '$(id)'}", "kernel.cmdline.x", "cannot go on a boot line"),
    ("cmdline: {x: \"a\\nb\"}", "kernel.cmdline.x", "cannot go on a boot line"),
    ("cmdline: {x: ''}", "kernel.cmdline.x", "goes in flags"),
    ("cmdline: {mitigations: off}", "kernel.cmdline.mitigations", "YAML boolean"),
    ("cmdline: {'a b': '1'}", "kernel.cmdline", "not kernel parameter names"),
    ("flags: ['quiet splash']", "kernel.flags", "not kernel parameter names"),
    ("flags: ['a=1']", "kernel.flags", "not kernel parameter names"),
    ("{cmdline: {quiet: '1'}, flags: [quiet]}", "kernel", "with a value and as a flag"),
    ("flags: [nosmt, nosmt]", "kernel", "flags listed twice"),
    ("allow_unsafe: [ro]", "kernel.allow_unsafe", ""),
])
def test_validation_refuses_what_would_break_a_boot_line(kernel: str, path: str,
                                                         message: str) -> None:
    with pytest.raises(DocumentError) as caught:
        validate(load_text(f"conf:\n  kernel: {kernel}\n" if kernel.startswith("{") else
                           f"conf:\n  kernel:\n    {kernel}\n"))
    problems = [str(p) for p in caught.value.problems]
    assert any(path in p and message in p for p in problems), problems


def test_unsafe_parameters_pass_when_allowed() -> None:
    document = validate(load_text(
        "conf:\n  kernel:\n    cmdline: {root: 'UUID=1234', init: /lib/systemd/systemd}\n"
        "    allow_unsafe: [root, init]\n"))
    conf = resolve(document, "n1", {}).modules["kernel"]
    assert dict(conf.cmdline) == {"root": "UUID=1234", "init": "/lib/systemd/systemd"}


# Pure: planning ------------------------------------------------------------------------------

ONE = "conf:\n  kernel:\n    cmdline: {hugepages: 16}\n"
BASE = ["root=/dev/sda1", "ro", "quiet"]
WIRED = BootEntry("Debian", [*BASE, VARIABLE])
OWNED = ModuleRecord(originals={DROPIN: None, SCRIPT: None}, owned_files=[DROPIN, SCRIPT])


def observed(running: list[str], env: dict[str, str] | None = None,
             trial: TrialState | None = None, boot_id: str = "b2") -> KernelObserved:
    return KernelObserved(DROPIN_TEXT, [*BASE, *running], WIRED, True, SCRIPT_TEXT,
                          env or {}, trial or TrialState(), boot_id)


def _plan(doc: str | None, seen: KernelObserved, record: ModuleRecord | None = None
          ) -> dict[str, tuple[Action, str, str, object]]:
    desired = config(doc).modules["kernel"] if doc else None
    changes = Kernel().plan(desired, seen, record or OWNED)
    return {c.target: (c.action, c.disruption, c.reason, c.payload) for c in changes}


def kinds(planned: dict[str, tuple[Action, str, str, object]]) -> dict[str, tuple[Action, str]]:
    """Without the wiring files that are as they should be."""
    return {t: (a, d) for t, (a, d, _, _) in planned.items()
            if not (t in (DROPIN, SCRIPT) and a == Action.NOOP)}


def test_plan_first_use_wires_grub_and_tries_the_line_once() -> None:
    seen = KernelObserved(None, BASE, BootEntry("Debian", BASE), True)
    planned = _plan(ONE, seen, ModuleRecord())
    assert kinds(planned) == {
        DROPIN: (Action.WRITE, NONE), SCRIPT: (Action.WRITE, NONE),
        "grub.cfg": (Action.SET, NONE), BOOT_CONFIG: (Action.SET, REBOOT),
        RUNNING: (Action.NOOP, REBOOT)}
    assert planned[BOOT_CONFIG][3] == TryOnce(("hugepages=16",), 30, 900.0)
    assert "last-known-good: (none of divingbell's)" in planned[BOOT_CONFIG][2]


def test_plan_committed_and_booted_is_no_disruption() -> None:
    planned = _plan(ONE, observed(["hugepages=16"], {"divingbell_good": "hugepages=16"}))
    assert kinds(planned) == {RUNNING: (Action.NOOP, NONE)}


def test_plan_set_on_trial_but_not_rebooted_is_a_pending_reboot() -> None:
    env = {"divingbell_try": "hugepages=16 panic=30"}
    trial = TrialState(Trial(["hugepages=16"], "b1", 0.0, 900.0))
    planned = _plan(ONE, observed([], env, trial, boot_id="b1"))
    assert kinds(planned) == {RUNNING: (Action.NOOP, REBOOT)}


def test_plan_booted_on_trial_waits_for_the_commit_and_never_tries_again() -> None:
    # GRUB cleared divingbell_try when it booted it: not a reason to set it again.
    trial = TrialState(Trial(["hugepages=16"], "b1", 0.0, 900.0))
    planned = _plan(ONE, observed(["hugepages=16", "panic=30"], {}, trial))
    assert kinds(planned) == {RUNNING: (Action.NOOP, NONE)}
    assert "on trial" in planned[RUNNING][2]


def test_plan_a_reverted_line_is_held_and_said() -> None:
    trial = TrialState(reverted=Reverted(["hugepages=16"], "the try did not boot", 1.0))
    planned = _plan(ONE, observed([], {}, trial))
    assert kinds(planned) == {RUNNING: (Action.NOOP, NONE)}
    assert planned[RUNNING][3] == Held("the try did not boot")
    # Other parameters are tried afresh.
    planned = _plan("conf:\n  kernel:\n    cmdline: {hugepages: 32}\n", observed([], {}, trial))
    assert isinstance(planned[BOOT_CONFIG][3], TryOnce)


def test_plan_back_to_the_good_line_clears_a_pending_try() -> None:
    env = {"divingbell_good": "hugepages=16", "divingbell_try": "hugepages=32 panic=30"}
    planned = _plan(ONE, observed(["hugepages=16"], env))
    assert planned[BOOT_CONFIG][3] == ClearTry()


def test_plan_grub_cfg_regenerated_without_the_variable_is_drift() -> None:
    seen = KernelObserved(DROPIN_TEXT, BASE, BootEntry("Debian", BASE), True, SCRIPT_TEXT,
                          {"divingbell_good": "hugepages=16"})
    planned = _plan(ONE, seen)
    assert planned["grub.cfg"][:2] == (Action.SET, NONE)
    assert "does not take the parameters" in planned["grub.cfg"][2]


def test_plan_removal_unwires_and_waits_for_the_reboot() -> None:
    record = ModuleRecord(originals={DROPIN: None, SCRIPT: None}, owned_files=[DROPIN, SCRIPT])
    record.state["names"] = ["hugepages"]
    planned = _plan(None, observed(["hugepages=16"], {"divingbell_good": "hugepages=16"}),
                    record)
    assert kinds(planned) == {
        DROPIN: (Action.DELETE, REBOOT), SCRIPT: (Action.DELETE, REBOOT),
        "grub.cfg": (Action.SET, REBOOT), BOOT_CONFIG: (Action.SET, REBOOT),
        RUNNING: (Action.NOOP, REBOOT)}
    assert planned[RUNNING][2] == "pending reboot: it still has hugepages=16"


def test_apply_looks_for_the_trial_where_the_module_keeps_it() -> None:
    from divingbell.commands.apply import KERNEL_TRIAL_FILE

    assert KERNEL_TRIAL_FILE == TRIAL_FILE


def test_parse_grubenv() -> None:
    text = ("# GRUB Environment Block\ndivingbell_good=hugepages=16 nosmt\nsaved_entry=0\n"
            + "#" * 900)
    assert parse_grubenv(text) == {"divingbell_good": "hugepages=16 nosmt", "saved_entry": "0"}


def test_no_grub_refuses_the_plan_and_changes_nothing(scratch_host: Host) -> None:
    plan = plan_node(scratch_host, config(ONE))
    assert plan.errors and "no GRUB on this host" in plan.errors[0]
    assert not scratch_host.path(DROPIN).exists()


# Real: update-grub and grub-editenv chrooted into a Debian root ------------------------------

def apply(host: Host, text: str, node: str = "n1",
          labels: dict[str, str] | None = None) -> ApplyReport:
    report = apply_node(host, config(text, node, labels), "r")
    assert report.ok, report.errors
    return report


def shown(plan: Plan) -> dict[str, tuple[Action, str]]:
    return {c.target: (c.action, c.disruption) for c in plan.changes
            if not (c.target in (DROPIN, SCRIPT) and c.action == Action.NOOP)}


def grubenv(host: Host) -> dict[str, str]:
    """divingbell's variables that hold a line (GRUB leaves a used try set to nothing)."""
    return {k: v for k, v in parse_grubenv(host.read_text(GRUBENV)).items()
            if k.startswith("divingbell_") and v}


def test_grub_cfg_reads_the_line_from_the_environment_block(grub_host: Host) -> None:
    before = next_boot_line(grub_host)
    apply(grub_host, DOC)
    cfg = grub_host.read_text("/boot/grub/grub.cfg") or ""
    # Debian's update-grub keeps the variable for GRUB to expand at boot, after its load_env.
    assert VARIABLE in cfg
    assert cfg.index("load_env") < cfg.index('set divingbell_cmdline="${divingbell_try}"') \
        < cfg.index(VARIABLE)
    assert grub_host.read_text(DROPIN) == DROPIN_TEXT
    assert grubenv(grub_host) == {"divingbell_try": "hugepages=16 isolcpus=2-7 nosmt panic=30"}
    assert next_boot_line(grub_host) == [*before, "hugepages=16", "isolcpus=2-7", "nosmt",
                                         "panic=30"]


def test_try_once_then_commit(grub_host: Host) -> None:
    base = next_boot_line(grub_host)
    report = apply(grub_host, DOC)
    assert any("boots once at the next boot, on trial" in note
               for note in report.results[0].notes)
    assert grub_host.read_text("/run/reboot-required") == "*** System restart required ***\n"
    # The default stays the previous line: only the next boot gets the new one.
    assert "divingbell_good" not in grubenv(grub_host)
    trial = load_trial(grub_host)
    assert trial.trying is not None and trial.trying.params == ["hugepages=16", "isolcpus=2-7",
                                                                "nosmt"]
    assert oct(grub_host.path(TRIAL_FILE).stat().st_mode & 0o777) == "0o600"
    plan = plan_node(grub_host, config(DOC))
    assert shown(plan) == {RUNNING: (Action.NOOP, REBOOT)}

    booted = boot(grub_host)
    assert booted == [*base, "hugepages=16", "isolcpus=2-7", "nosmt", "panic=30"]
    assert "divingbell_try" not in grubenv(grub_host), "GRUB boots the try once"
    # Booted on trial: nothing to change, nothing to try again, not committed yet.
    plan = plan_node(grub_host, config(DOC))
    assert shown(plan) == {RUNNING: (Action.NOOP, NONE)}
    assert settle_trial(grub_host, lambda: "not converged (starting)", 100.0) is None
    assert "divingbell_good" not in grubenv(grub_host)
    settled = settle_trial(grub_host, lambda: None, 110.0)
    assert settled is not None and settled.outcome == "committed"
    assert grubenv(grub_host) == {"divingbell_good": "hugepages=16 isolcpus=2-7 nosmt"}
    assert load_trial(grub_host).trying is None
    # Committed: every boot from now on gets it, without panic= (that was for the trial).
    assert boot(grub_host) == [*base, "hugepages=16", "isolcpus=2-7", "nosmt"]
    assert plan_node(grub_host, config(DOC)).disruption == NONE


def test_a_try_that_does_not_boot_is_reverted_and_held(grub_host: Host) -> None:
    base = next_boot_line(grub_host)
    apply(grub_host, ONE)
    boot(grub_host)
    settle_trial(grub_host, lambda: None, 10.0)  # hugepages=16 committed
    bad = "conf:\n  kernel:\n    cmdline: {hugepages: 16, init: /bin/false}\n" \
          "    allow_unsafe: [init]\n"
    apply(grub_host, bad)
    # The try panics (init exits; panic=30 reboots), GRUB boots the default: the good line.
    assert boot(grub_host, the_try_fails=True) == [*base, "hugepages=16"]
    settled = settle_trial(grub_host, lambda: "not converged (starting)", 20.0)
    assert settled is not None and settled.outcome == "reverted" and not settled.reboot
    assert "came back on the last-known-good command line" in settled.reason
    assert grubenv(grub_host) == {"divingbell_good": "hugepages=16"}
    # Held: the same document tries nothing again and says why; the node converges.
    plan = plan_node(grub_host, config(bad))
    held = [c for c in plan.changes if isinstance(c.payload, Held)]
    assert held and "reverted to the last-known-good line hugepages=16" in held[0].reason
    assert plan.disruption == NONE
    report = apply(grub_host, bad)
    assert not report.applied
    assert "divingbell_try" not in grubenv(grub_host)


def test_a_try_that_boots_unhealthy_is_reverted_after_the_timeout(grub_host: Host) -> None:
    doc = "conf:\n  kernel:\n    cmdline: {hugepages: 16}\n    trial_timeout: 60\n"
    apply(grub_host, doc)
    boot(grub_host)
    assert settle_trial(grub_host, lambda: "the fleet service cannot be reached", 1000.0) is None
    assert settle_trial(grub_host, lambda: "the fleet service cannot be reached", 1059.0) is None
    settled = settle_trial(grub_host, lambda: "the fleet service cannot be reached", 1060.0)
    assert settled is not None and settled.outcome == "reverted" and settled.reboot
    assert settled.reason == ("not healthy 60s after booting the tried line: the fleet "
                              "service cannot be reached")
    assert grubenv(grub_host) == {}, "the next boot is the distribution's line"
    assert "hugepages=16" not in boot(grub_host)
    plan = plan_node(grub_host, config(doc))
    assert any(isinstance(c.payload, Held) for c in plan.changes)


def test_label_and_host_overrides(grub_host: Host) -> None:
    apply(grub_host, DOC, "s1", {"role": "storage"})
    assert next_boot_line(grub_host)[-4:] == ["hugepages=1024", "isolcpus=2-7", "nosmt",
                                              "panic=30"]
    apply(grub_host, DOC, "special")
    assert next_boot_line(grub_host)[-5:] == ["hugepages=16", "isolcpus=2-7", "nosmt",
                                              "mitigations-off-please", "panic=30"]


def test_removal_restores_the_boot_line(grub_host: Host) -> None:
    original = next_boot_line(grub_host)
    apply(grub_host, DOC)
    boot(grub_host)
    settle_trial(grub_host, lambda: None, 1.0)
    apply(grub_host, "conf:\n  sysctl: {vm.swappiness: 60}\n")
    assert grub_host.read_text(DROPIN) is None and grub_host.read_text(SCRIPT) is None
    assert grubenv(grub_host) == {}
    assert grub_host.read_text(TRIAL_FILE) is None
    assert VARIABLE not in (grub_host.read_text("/boot/grub/grub.cfg") or "")
    assert next_boot_line(grub_host) == original
    # The running kernel still has them until it reboots.
    plan = plan_node(grub_host, config("conf:\n  sysctl: {vm.swappiness: 60}\n"))
    assert shown(plan)[RUNNING] == (Action.NOOP, REBOOT)
    boot(grub_host)
    plan = plan_node(grub_host, config("conf:\n  sysctl: {vm.swappiness: 60}\n"))
    assert plan.disruption == NONE
    # Gone everywhere: the module forgets it, and leaves the journal.
    apply(grub_host, "conf:\n  sysctl: {vm.swappiness: 60}\n")
    plan = plan_node(grub_host, config("conf:\n  sysctl: {vm.swappiness: 60}\n"))
    assert "kernel" not in [m.module for m in plan.modules]


def test_an_edited_grub_cfg_is_drift_and_regenerated(grub_host: Host) -> None:
    apply(grub_host, DOC)
    cfg = grub_host.path("/boot/grub/grub.cfg")
    cfg.write_text(cfg.read_text().replace(f" {VARIABLE}", ""))
    plan = plan_node(grub_host, config(DOC))
    assert shown(plan)["grub.cfg"] == (Action.SET, NONE)
    apply(grub_host, DOC)
    assert "hugepages=16" in next_boot_line(grub_host)


def test_a_failing_update_grub_rolls_the_wiring_back(grub_host: Host) -> None:
    # A broken grub.d script makes grub-mkconfig fail; the drop-in goes back to what it was
    # (absent), and the failure names update-grub.
    breaker = grub_host.path("/etc/grub.d/05_broken")
    breaker.write_text("#!/bin/sh\nexit 3\n")
    breaker.chmod(0o755)
    before = grub_host.path("/boot/grub/grub.cfg").read_text()
    report = apply_node(grub_host, config(DOC), "r")
    (result,) = report.results
    assert result.error is not None and "update-grub failed" in result.error
    assert grub_host.read_text(DROPIN) is None
    assert grub_host.path("/boot/grub/grub.cfg").read_text() == before
    assert grubenv(grub_host) == {}


def test_status_says_a_reboot_is_pending(grub_host: Host, cli: Cli, tmp_path: Path) -> None:
    document = tmp_path / "doc.yaml"
    document.write_text(DOC)
    args = ("--root", grub_host.root, "--proc-sys", grub_host.proc_sys, "--node", "n1")
    applied = cli("apply", *args, "--format", "json", document)
    assert applied.returncode == 0, applied.stderr
    assert json.loads(applied.stdout)["disruption"] == REBOOT
    status = cli("status", "--root", grub_host.root)
    assert "  disruption: reboot (pending until the node boots again" in status.stdout
    plan = cli("plan", *args, document)
    assert ("  = pending reboot: the running kernel booted without hugepages=16 isolcpus=2-7 "
            "nosmt  [reboot]") in plan.stdout


def test_an_operators_apply_commits_or_reverts_the_trial(grub_host: Host, cli: Cli,
                                                         tmp_path: Path) -> None:
    document = tmp_path / "doc.yaml"
    document.write_text(ONE)
    args = ("--root", grub_host.root, "--proc-sys", grub_host.proc_sys, "--node", "n1")
    assert cli("apply", *args, document).returncode == 0
    boot(grub_host)
    applied = cli("apply", *args, document)
    assert applied.returncode == 0, applied.stderr
    assert "kernel command line hugepages=16 committed: healthy on the tried line" \
        in applied.stderr
    assert grubenv(grub_host) == {"divingbell_good": "hugepages=16"}
    document.write_text("conf:\n  kernel:\n    cmdline: {hugepages: 16, init: /bin/false}\n"
                        "    allow_unsafe: [init]\n")
    assert cli("apply", *args, document).returncode == 0
    boot(grub_host, the_try_fails=True)
    applied = cli("apply", *args, document)
    assert applied.returncode == 0, applied.stderr
    assert "kernel command line hugepages=16 init=/bin/false reverted: the machine came back " \
        "on the last-known-good command line" in applied.stderr
    assert "No changes" in applied.stdout, "the same line is not tried again"
    assert "reverted to the last-known-good line hugepages=16" in cli("plan", *args,
                                                                      document).stdout
    assert grubenv(grub_host) == {"divingbell_good": "hugepages=16"}
