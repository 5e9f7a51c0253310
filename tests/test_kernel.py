"""kernel: command-line parameters as divingbell's GRUB drop-in, then a real `update-grub`
chrooted into a Debian root on a loop device (tests/grubroot.py says what is real); what the
running kernel booted with and what GRUB boots next, both in the plan."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from divingbell.document.loader import load_text
from divingbell.document.nodeconfig import NodeConfig
from divingbell.document.validate import resolve, validate
from divingbell.engine.change import NONE, REBOOT, Action
from divingbell.engine.journal import ModuleRecord
from divingbell.engine.runner import ApplyReport, Plan, apply_node, plan_node
from divingbell.errors import DocumentError
from divingbell.host import Host
from divingbell.modules.kernel import (
    BOOT_CONFIG,
    DROPIN,
    GRUB_CFG,
    RUNNING,
    BootEntry,
    Kernel,
    KernelObserved,
    default_entry,
    render_dropin,
)
from tests.conftest import Cli
from tests.grubroot import KERNEL

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

def _plan(doc: str | None, observed: KernelObserved, record: ModuleRecord | None = None
          ) -> dict[str, tuple[Action, str, str]]:
    desired = config(doc).modules["kernel"] if doc else None
    changes = Kernel().plan(desired, observed, record or ModuleRecord())
    return {c.target: (c.action, c.disruption, c.reason) for c in changes}


ONE = "conf:\n  kernel:\n    cmdline: {hugepages: 16}\n"
BASE = ["root=/dev/sda1", "ro", "quiet"]


def test_plan_a_new_parameter_needs_update_grub_and_a_reboot() -> None:
    planned = _plan(ONE, KernelObserved(None, BASE, BootEntry("Debian", BASE), True))
    assert {t: (a, d) for t, (a, d, _) in planned.items()} == {
        DROPIN: (Action.WRITE, REBOOT), BOOT_CONFIG: (Action.SET, REBOOT),
        RUNNING: (Action.NOOP, REBOOT)}
    assert planned[RUNNING][2] == "pending reboot: the running kernel booted without hugepages=16"


def test_plan_converged_and_booted_is_no_disruption() -> None:
    record = ModuleRecord(originals={DROPIN: None}, owned_files=[DROPIN])
    line = [*BASE, "hugepages=16"]
    planned = _plan(ONE, KernelObserved(render_dropin(["hugepages=16"]), line,
                                        BootEntry("Debian", line), True), record)
    assert {t: (a, d) for t, (a, d, _) in planned.items()} == {
        DROPIN: (Action.NOOP, NONE), RUNNING: (Action.NOOP, NONE)}


def test_plan_applied_but_not_rebooted_is_a_pending_reboot() -> None:
    record = ModuleRecord(originals={DROPIN: None}, owned_files=[DROPIN])
    planned = _plan(ONE, KernelObserved(render_dropin(["hugepages=16"]), BASE,
                                        BootEntry("Debian", [*BASE, "hugepages=16"]), True),
                    record)
    assert planned[RUNNING][:2] == (Action.NOOP, REBOOT)
    assert BOOT_CONFIG not in planned


def test_plan_grub_cfg_regenerated_without_the_dropin_is_drift() -> None:
    record = ModuleRecord(originals={DROPIN: None}, owned_files=[DROPIN])
    planned = _plan(ONE, KernelObserved(render_dropin(["hugepages=16"]), BASE,
                                        BootEntry("Debian", BASE), True), record)
    assert planned[BOOT_CONFIG][:2] == (Action.SET, REBOOT)
    assert "does not boot the document's parameters" in planned[BOOT_CONFIG][2]


def test_plan_removal_deletes_the_dropin_and_waits_for_the_reboot() -> None:
    record = ModuleRecord(originals={DROPIN: None}, owned_files=[DROPIN])
    record.state["names"] = ["hugepages"]
    line = [*BASE, "hugepages=16"]
    planned = _plan(None, KernelObserved(render_dropin(["hugepages=16"]), line,
                                         BootEntry("Debian", line), True), record)
    assert {t: (a, d) for t, (a, d, _) in planned.items()} == {
        DROPIN: (Action.DELETE, REBOOT), BOOT_CONFIG: (Action.SET, REBOOT),
        RUNNING: (Action.NOOP, REBOOT)}
    assert planned[RUNNING][2] == "pending reboot: it still has hugepages=16"


def test_no_grub_refuses_the_plan_and_changes_nothing(scratch_host: Host) -> None:
    plan = plan_node(scratch_host, config(ONE))
    assert plan.errors and "no GRUB on this host" in plan.errors[0]
    assert not scratch_host.path(DROPIN).exists()


# Real: update-grub chrooted into a Debian root ----------------------------------------------

def boot_line(host: Host) -> list[str]:
    """The default entry's parameters but root=, which names this copy's loop backing file."""
    entry = default_entry(host.read_text(GRUB_CFG) or "")
    assert entry is not None
    return [p for p in entry.params if not p.startswith("root=")]


def reboot(host: Host) -> None:
    """What the kernel would have been given by the boot that follows."""
    (host.proc_sys.parent / "cmdline").write_text(
        f"BOOT_IMAGE={KERNEL} " + " ".join(boot_line(host)) + "\n")


def apply(host: Host, text: str, node: str = "n1",
          labels: dict[str, str] | None = None) -> ApplyReport:
    report = apply_node(host, config(text, node, labels), "r")
    assert report.ok, report.errors
    return report


def shown(plan: Plan) -> dict[str, tuple[Action, str]]:
    return {c.target: (c.action, c.disruption) for c in plan.changes}


def test_apply_writes_the_dropin_and_grub_boots_it_next(grub_host: Host) -> None:
    before = boot_line(grub_host)
    assert "hugepages=16" not in before
    plan = plan_node(grub_host, config(DOC))
    assert plan.disruption == REBOOT
    report = apply(grub_host, DOC)
    assert any("the new kernel command line takes effect at the next boot" in note
               for note in report.results[0].notes)
    assert grub_host.read_text("/run/reboot-required") == "*** System restart required ***\n"
    assert grub_host.read_text(DROPIN) == render_dropin(["hugepages=16", "isolcpus=2-7",
                                                         "nosmt"])
    assert boot_line(grub_host) == [*before, "hugepages=16", "isolcpus=2-7", "nosmt"]

    # Applied, not yet rebooted: nothing to change, a reboot pending.
    plan = plan_node(grub_host, config(DOC))
    assert shown(plan) == {DROPIN: (Action.NOOP, NONE), RUNNING: (Action.NOOP, REBOOT)}
    assert plan.disruption == REBOOT
    reboot(grub_host)
    plan = plan_node(grub_host, config(DOC))
    assert shown(plan) == {DROPIN: (Action.NOOP, NONE), RUNNING: (Action.NOOP, NONE)}
    assert plan.disruption == NONE


def test_label_and_host_overrides(grub_host: Host) -> None:
    apply(grub_host, DOC, "s1", {"role": "storage"})
    assert boot_line(grub_host)[-3:] == ["hugepages=1024", "isolcpus=2-7", "nosmt"]
    apply(grub_host, DOC, "special")
    assert boot_line(grub_host)[-4:] == ["hugepages=16", "isolcpus=2-7", "nosmt",
                                         "mitigations-off-please"]


def test_removal_restores_the_boot_line(grub_host: Host) -> None:
    original = boot_line(grub_host)
    apply(grub_host, DOC)
    reboot(grub_host)
    apply(grub_host, "conf:\n  sysctl: {vm.swappiness: 60}\n")
    assert grub_host.read_text(DROPIN) is None
    assert boot_line(grub_host) == original
    # The running kernel still has them until it reboots.
    plan = plan_node(grub_host, config("conf:\n  sysctl: {vm.swappiness: 60}\n"))
    assert shown(plan)[RUNNING] == (Action.NOOP, REBOOT)
    reboot(grub_host)
    plan = plan_node(grub_host, config("conf:\n  sysctl: {vm.swappiness: 60}\n"))
    assert plan.disruption == NONE
    # Gone everywhere: the module forgets it, and leaves the journal.
    apply(grub_host, "conf:\n  sysctl: {vm.swappiness: 60}\n")
    plan = plan_node(grub_host, config("conf:\n  sysctl: {vm.swappiness: 60}\n"))
    assert "kernel" not in [m.module for m in plan.modules]


def test_an_edited_grub_cfg_is_drift_and_regenerated(grub_host: Host) -> None:
    apply(grub_host, DOC)
    cfg = grub_host.path(GRUB_CFG)
    cfg.write_text(cfg.read_text().replace(" hugepages=16", ""))
    plan = plan_node(grub_host, config(DOC))
    assert shown(plan)[BOOT_CONFIG] == (Action.SET, REBOOT)
    apply(grub_host, DOC)
    assert "hugepages=16" in boot_line(grub_host)


def test_a_failing_update_grub_rolls_the_dropin_back(grub_host: Host) -> None:
    # A broken grub.d script makes grub-mkconfig fail; the drop-in goes back to what it was
    # (absent), and the failure names update-grub.
    breaker = grub_host.path("/etc/grub.d/05_broken")
    breaker.write_text("#!/bin/sh\nexit 3\n")
    breaker.chmod(0o755)
    before = grub_host.path(GRUB_CFG).read_text()
    report = apply_node(grub_host, config(DOC), "r")
    (result,) = report.results
    assert result.error is not None and "update-grub failed" in result.error
    assert grub_host.read_text(DROPIN) is None
    assert grub_host.path(GRUB_CFG).read_text() == before


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
