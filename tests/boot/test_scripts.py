"""The iPXE scripts, by machine state, and what a booting machine may and may not put in them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from divingbell.fleet.boot import (
    PLATFORMS,
    BootMachine,
    BootProfile,
    BootProfileError,
    BootProfiles,
    BootQuery,
    chain_script,
    load_profiles,
    machine_script,
    parse_query,
)

BASE = "http://10.0.2.2:8080"
TOKEN = "bootstrap-abcdef123456"
UUID = "8c6f0a1e-1111-2222-3333-444455556666"
MAC = "52:54:00:12:34:56"
QUERY = BootQuery(uuid=UUID, mac=MAC)


def machine(state: str, roles: tuple[str, ...] = (), granted: bool = False,
            macs: frozenset[str] = frozenset({MAC})) -> BootMachine:
    return BootMachine("m-1", state, roles, macs, granted)


def commands(script: str) -> list[str]:
    return [line.split()[0] for line in script.splitlines()
            if line and not line.startswith(("#", ":"))]


def walk(script: str, settings: dict[str, str], failing: frozenset[str] = frozenset(),
         limit: int = 50) -> list[str]:
    """The commands iPXE runs for `script`, in order, with `${name}` expanded from `settings`.

    The subset of iPXE's script semantics these scripts use: labels and `goto`, `a && b || c`
    (a command runs after `&&` when the last one succeeded, after `||` when it failed; an empty
    command after `||` clears the failure), `iseq`, and `exit`. Commands named in `failing` fail,
    every other succeeds; a `sanboot` or `boot` that succeeds leaves iPXE, and a `chain` that
    succeeds ran a script that returned (the next line runs). Stops after `limit` commands, so a
    loop shows as a long walk."""
    lines = script.splitlines()
    labels = {line[1:]: index for index, line in enumerate(lines) if line.startswith(":")}
    ran: list[str] = []
    position = 0
    while position < len(lines) and len(ran) < limit:
        line = lines[position]
        position += 1
        if not line or line.startswith(("#", ":")):
            continue
        parts = re.split(r" (&&|\|\|) ?", line)
        failed = False
        for index in range(0, len(parts), 2):
            operator = parts[index - 1] if index else None
            if (operator == "&&" and failed) or (operator == "||" and not failed):
                continue
            command = re.sub(r"\$\{([a-z0-9/:]+)\}",
                             lambda m: settings.get(m.group(1), ""), parts[index].strip())
            if not command:
                failed = False
                continue
            ran.append(command)
            name, *args = command.split()
            if name == "exit":
                return ran
            if name == "goto":
                position = labels[args[0]]
                break
            failed = name in failing or (name == "iseq" and args[0] != args[1])
            if name in ("sanboot", "boot") and not failed:
                return ran
    return ran


def names(ran: list[str]) -> list[str]:
    return [command.split()[0] for command in ran]


def test_chain_script_retries_dhcp_and_chains_with_the_machine_identity() -> None:
    script = chain_script(BASE + "/")
    assert script.startswith("#!ipxe\n")
    assert "dhcp || goto retry" in script
    chain = next(line for line in script.splitlines() if line.startswith("chain"))
    assert chain == ("chain --autofree http://10.0.2.2:8080/v1/ipxe?uuid=${uuid}"
                     "&mac=${net0/mac:hexhyp}&hostname=${hostname:uristring}"
                     "&serial=${serial:uristring}&platform=${platform} || goto retry")
    assert "goto start" in script


@pytest.mark.parametrize(
    ("state", "roles", "granted", "action"),
    [
        (None, (), False, "discovery"),
        ("booting", (), False, "discovery"),
        ("discovered", (), False, "discovery"),
        ("scheduled", ("worker",), False, "discovery"),
        ("installing", ("worker",), True, "install"),
        ("installing", ("worker",), False, "discovery"),  # grant expired: start over
        ("failed", ("worker",), False, "discovery"),
        ("installed", ("worker",), False, "local"),
        ("ready", ("worker",), False, "local"),
        ("updating", ("worker",), False, "local"),
        ("degraded", ("worker",), False, "local"),
        ("decommissioned", (), False, "discovery"),  # a network boot brings it back
    ],
)
def test_the_script_follows_the_machine_state(state: str | None, roles: tuple[str, ...],
                                              granted: bool, action: str) -> None:
    known = machine(state, roles, granted) if state else None
    decision = machine_script(QUERY, known, BootProfiles(), BASE, TOKEN)
    assert decision.action == action
    if action in ("discovery", "install"):
        assert commands(decision.script) == ["echo", "kernel", "initrd", "boot", "echo", "sleep",
                                             "chain"]
        assert f"kernel {BASE}/v1/assets/vmlinuz " in decision.script
        assert f"initrd --name initrd0 {BASE}/v1/assets/initrd.img" in decision.script
        assert f"divingbell.url={BASE} divingbell.token={TOKEN}" in decision.script
        assert ("divingbell.phase=install" in decision.script) == (action == "install")
    elif action == "local":
        assert "sanboot --no-describe --drive 0x80" in decision.script
        assert "divingbell.token" not in decision.script
    else:
        assert commands(decision.script) == ["echo", "exit"]


def test_chain_script_ends_when_the_machine_script_returns_and_retries_when_none_came() -> None:
    script = chain_script(BASE)
    # A machine script that returns chose the next boot device: iPXE's exit leaves only the
    # script it is in, so the chain script must exit too (not fall into its retry loop).
    assert names(walk(script, {"platform": "efi"})) == ["dhcp", "chain", "exit"]
    retried = walk(script, {}, failing=frozenset({"chain"}), limit=9)
    assert names(retried) == ["dhcp", "chain", "goto", "echo", "sleep", "goto", "dhcp", "chain",
                              "goto"]
    assert retried[2] == retried[8] == "goto retry"


@pytest.mark.parametrize("platform", sorted(PLATFORMS))
def test_discovery_names_every_initrd_on_the_kernel_command_line(platform: str) -> None:
    # An EFI-stub kernel finds its initrds only through initrd=<name> on its command line; a
    # BIOS kernel under iPXE gets them either way, so one script serves both.
    profiles = BootProfiles(discovery={"default": BootProfile(
        kernel="vmlinuz", initrd=["initrd.img", "extra.cpio"], cmdline="quiet")})
    decision = machine_script(QUERY, None, profiles, BASE, TOKEN)
    kernel = next(line for line in decision.script.splitlines() if line.startswith("kernel "))
    loaded = re.findall(r"^initrd --name (\S+) ", decision.script, re.MULTILINE)
    assert loaded == ["initrd0", "initrd1"]
    assert [arg for arg in kernel.split() if arg.startswith("initrd=")] == [
        f"initrd={name}" for name in loaded]
    ran = walk(decision.script, {"platform": platform, "net0/mac:hexhyp": "52-54-00-12-34-56"})
    assert names(ran) == ["echo", "kernel", "initrd", "initrd", "boot"]
    assert "BOOTIF=01-52-54-00-12-34-56" in ran[1]


def test_local_boot_sanboots_the_bios_disk_and_under_uefi_returns_to_the_firmware() -> None:
    script = machine_script(QUERY, machine("installed", ("worker",)), BootProfiles(), BASE,
                            TOKEN).script
    bios = walk(script, {"platform": "pcbios"})
    assert names(bios) == ["echo", "iseq", "sanboot"]
    assert bios[-1] == "sanboot --no-describe --drive 0x80"
    # BIOS drive numbers mean nothing to UEFI: exit, and the firmware boots its next option.
    uefi = walk(script, {"platform": "efi"})
    assert names(uefi) == ["echo", "iseq", "goto", "echo", "exit"]
    assert "back to the firmware" in uefi[-2]
    # A BIOS disk that does not boot: on to the next boot device, not a loop.
    failed = walk(script, {"platform": "pcbios"}, failing=frozenset({"sanboot"}))
    assert names(failed) == ["echo", "iseq", "sanboot", "goto", "echo", "exit"]
    # The same whichever platform the machine reported: iPXE's own ${platform} decides.
    for platform in (*PLATFORMS, None):
        query = BootQuery(uuid=UUID, mac=MAC, platform=platform)
        assert machine_script(query, machine("installed", ("worker",)), BootProfiles(), BASE,
                              TOKEN).script == script


def test_profiles_choose_by_phase_and_first_role_with_a_profile() -> None:
    profiles = BootProfiles(
        install={
            "default": BootProfile(kernel="os/linux", initrd=["os/initrd.gz"]),
            "control-plane": BootProfile(kernel="https://mirror.example.org/cp/linux",
                                         initrd=["cp/a.img", "cp/b.img"], cmdline="auto=true"),
        },
        local_boot="exit",
    )
    cp = machine_script(QUERY, machine("installing", ("control-plane",), True), profiles, BASE,
                        TOKEN)
    assert "kernel https://mirror.example.org/cp/linux auto=true initrd=initrd0 initrd=initrd1 " \
        in cp.script
    assert f"initrd --name initrd1 {BASE}/v1/assets/cp/b.img" in cp.script
    worker = machine_script(QUERY, machine("installing", ("worker",), True), profiles, BASE, TOKEN)
    assert f"kernel {BASE}/v1/assets/os/linux " in worker.script
    local = machine_script(QUERY, machine("installed", ("worker",)), profiles, BASE, TOKEN)
    assert "sanboot" not in local.script and commands(local.script) == ["echo", "exit"]


def test_a_uuid_whose_machine_has_other_macs_gets_the_generic_discovery_profile() -> None:
    other = BootQuery(uuid=UUID, mac="52:54:00:99:99:99")
    decision = machine_script(other, machine("installed", ("worker",)), BootProfiles(), BASE,
                              TOKEN)
    assert decision.action == "discovery"
    assert "m-1" not in decision.script


def test_no_usable_token_or_base_url_gives_a_retry_not_an_error() -> None:
    assert machine_script(QUERY, None, BootProfiles(), BASE, None).action == "retry"
    assert machine_script(QUERY, None, BootProfiles(), BASE, "tok en ${x}").action == "retry"
    decision = machine_script(QUERY, None, BootProfiles(), "http://evil\nshell", TOKEN)
    assert decision.action == "none" and "evil" not in decision.script


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"uuid": UUID.upper(), "mac": "52-54-00-12-34-56"}, BootQuery(UUID, MAC)),
        ({"uuid": "00000000-0000-0000-0000-000000000000", "mac": "52-54-00-12-34-56"},
         BootQuery(None, MAC, dropped=("uuid: the firmware has none (all zeros or ones)",))),
        ({"uuid": "nope", "mac": "zz"},
         BootQuery(None, None, dropped=("uuid: not a UUID", "mac: not a MAC address"))),
        ({"hostname": "node1.example.org", "serial": "ABC 123"},
         BootQuery(hostname="node1.example.org", serial="ABC 123")),
        ({"hostname": "x\nchain http://evil/", "serial": "${root-path}"},
         BootQuery(dropped=("hostname: not a host name",
                            "serial: unexpected characters or too long"))),
        ({"platform": "efi"}, BootQuery(platform="efi")),
        ({"platform": " pcbios "}, BootQuery(platform="pcbios")),
        ({"platform": "efi\nexit"}, BootQuery(dropped=("platform: not pcbios or efi",))),
        ({"platform": "EFI"}, BootQuery(dropped=("platform: not pcbios or efi",))),
        ({}, BootQuery()),
    ],
)
def test_parse_query_keeps_only_well_formed_values(params: dict[str, str],
                                                   expected: BootQuery) -> None:
    assert parse_query(params) == expected


def test_a_machine_without_a_firmware_uuid_is_known_by_its_mac() -> None:
    query = parse_query({"uuid": "00000000-0000-0000-0000-000000000000",
                         "mac": "52-54-00-12-34-56"})
    # The discovery client derives the same uuid (image/initramfs/discovery: machine_uuid).
    assert query.machine_uuid == "00000000-0000-4000-8000-525400123456"


@given(st.dictionaries(st.sampled_from(["uuid", "mac", "hostname", "serial", "platform",
                                        "other"]),
                       st.text(max_size=80)))
def test_nothing_a_machine_sends_reaches_the_script(params: dict[str, str]) -> None:
    query = parse_query(params)
    decision = machine_script(query, None, BootProfiles(), BASE, TOKEN)
    assert decision.action == "discovery"
    # Only fixed text, the service's own values and iPXE's own settings: the same script for
    # every query.
    assert decision.script == machine_script(BootQuery(), None, BootProfiles(), BASE,
                                             TOKEN).script


def test_profiles_file_errors_name_the_path_and_line(tmp_path: Path) -> None:
    path = tmp_path / "profiles.yaml"
    path.write_text(
        "discovery:\n"
        "  default:\n"
        "    kernel: ../etc/shadow\n"
        "    initrd: ['http://x/a b']\n"
        "install:\n"
        "  Worker:\n"
        "    kernel: vmlinuz\n"
        "    cmdlin: quiet\n"
        "local_boot: pxe\n"
    )
    with pytest.raises(BootProfileError) as caught:
        load_profiles(path)
    text = str(caught.value)
    assert re.search(r"discovery\.default\.kernel: must be an http\(s\) URL or a relative path"
                     r".*profiles\.yaml:3", text), text
    assert "discovery.default.initrd[0]: is not a plain http(s) URL" in text
    assert "install.Worker.cmdlin: unknown key 'cmdlin'" in text
    assert "install.Worker: is not a role name" in text
    assert "local_boot:" in text


def test_profiles_file_example_from_the_docs_loads(tmp_path: Path) -> None:
    docs = Path(__file__).resolve().parents[2] / "docs" / "boot.md"
    example = docs.read_text().split("```yaml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "profiles.yaml"
    path.write_text(example)
    profiles = load_profiles(path)
    assert profiles.profile("install", ("control-plane",)).kernel.startswith("https://")
    assert profiles.profile("discovery").kernel == "vmlinuz"
