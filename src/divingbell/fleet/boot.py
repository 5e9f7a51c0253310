"""Network boot: the iPXE scripts the fleet service hands to machines, chosen by machine state.

Pure: no database, no HTTP. The boot routes (fleet/api/boot.py) look the machine up and call
`machine_script`; everything a machine sends is parsed by `parse_query`, which keeps only values
of the expected shape, so nothing a machine sends can reach a script (no iPXE injection through
a DHCP hostname or an SMBIOS serial).

    GET /boot.ipxe                 -> chain_script: retry DHCP, then chain to /v1/ipxe?uuid=..
    GET /v1/ipxe?uuid=&mac=&...    -> machine_script, by the machine's state:
        unknown, booting, discovered, scheduled, failed,
        decommissioned (it boots back into the fleet)   -> the discovery profile
        installing (holds an install grant)             -> the install profile of its role
        installed, ready, updating, degraded            -> boot from the local disk

The same scripts serve legacy BIOS and UEFI machines: the kernel finds its initrds by name on
its command line (`initrd=initrd0`, as an EFI-stub kernel under iPXE needs), and the local-disk
script branches on iPXE's own `${platform}`: `sanboot` of BIOS drive 0x80 under `pcbios`, and
under `efi` an `exit` back to the firmware, whose next boot option is the disk (BIOS drive
numbers mean nothing there). The platform a machine reports is only recorded, never trusted.

Profiles are configuration (`BootProfiles`, a YAML file): a kernel, initrds and a command line
per phase (discovery, install) and role. Relative paths are files under `divingbell serve
--assets DIR` (served at /v1/assets/); absolute http(s) URLs are fetched as they are.
"""

from __future__ import annotations

import re
import uuid as uuid_module
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from divingbell.core.errors import DivingbellError, Problem

PHASES = ("discovery", "install")
ASSETS_PREFIX = "/v1/assets/"
DEFAULT_CMDLINE = "console=tty0 console=ttyS0,115200n8 panic=10 quiet"

# States whose machine boots the discovery image (the image itself waits for a role and grant).
DISCOVERY_STATES = frozenset({"booting", "discovered", "scheduled", "failed", "decommissioned"})
LOCAL_BOOT_STATES = frozenset({"installed", "ready", "updating", "degraded"})

ASSET_PATH = re.compile(r"^(?!.*(?:^|/)\.\.?(?:/|$))[A-Za-z0-9._~+-]+(?:/[A-Za-z0-9._~+-]+)*$")
_URL = re.compile(r"^https?://[A-Za-z0-9.-]+(?::[0-9]{1,5})?(?:/[A-Za-z0-9._~%+=&?/:@-]*)?$")
_BASE_URL = re.compile(r"^https?://(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?"
                       r"(?:/[A-Za-z0-9._~-]+)*$")
_TOKEN = re.compile(r"^[A-Za-z0-9._~+/=-]{8,512}$")
_ROLE = re.compile(r"^(?:default|[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)$")
_MACHINE_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_MAC = re.compile(r"^[0-9a-f]{2}([:-])[0-9a-f]{2}(?:\1[0-9a-f]{2}){4}$")
_HOSTNAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")
_SERIAL = re.compile(r"^[A-Za-z0-9 ._:/-]{1,64}$")
# iPXE's ${platform}: the firmware interface this iPXE build runs on.
PLATFORMS = frozenset({"pcbios", "efi"})
_NO_UUID = {uuid_module.UUID(int=0), uuid_module.UUID(int=(1 << 128) - 1)}


class BootProfileError(DivingbellError):
    """A profiles file is invalid: every problem, with its path and file:line."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


def _check_source(value: str) -> str:
    if value.startswith(("http://", "https://")):
        if not _URL.match(value):
            raise ValueError("is not a plain http(s) URL (no spaces, quotes or ${...})")
    elif not ASSET_PATH.match(value):
        raise ValueError("must be an http(s) URL or a relative path under the assets directory "
                         "(letters, digits, ._~+- and /; no '..', no leading '/')")
    return value


def _check_cmdline(value: str) -> str:
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        raise ValueError("must be one line with no control characters")
    if len(value) > 2048:
        raise ValueError("is longer than 2048 characters")
    return value


Source = Annotated[str, AfterValidator(_check_source)]


class BootProfile(BaseModel):
    """What a machine boots in one phase: a kernel, its initrds and its command line."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kernel: Source
    initrd: list[Source] = Field(default_factory=list)
    cmdline: Annotated[str, AfterValidator(_check_cmdline)] = ""


DEFAULT_DISCOVERY = BootProfile(kernel="vmlinuz", initrd=["initrd.img"], cmdline=DEFAULT_CMDLINE)


def _check_role(value: str) -> str:
    if not _ROLE.match(value):
        raise ValueError("is not a role name: lower-case letters, digits and '-' (or 'default')")
    return value


Profiles = dict[Annotated[str, AfterValidator(_check_role)], BootProfile]


class BootProfiles(BaseModel):
    """The boot configuration of a fleet (`divingbell serve --boot-profiles FILE`).

    Each phase maps a role (or `default`) to a profile; a machine uses the profile of its first
    role that has one, else `default`. With no file, both phases boot the discovery image from
    the assets directory (`vmlinuz`, `initrd.img`), so `divingbell image discovery -o DIR` +
    `divingbell serve --assets DIR` is a working setup.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    discovery: Profiles = Field(default_factory=lambda: {"default": DEFAULT_DISCOVERY})
    install: Profiles = Field(default_factory=lambda: {"default": DEFAULT_DISCOVERY})
    local_boot: Literal["sanboot", "exit"] = "sanboot"
    retry_seconds: int = Field(default=10, ge=1, le=3600)

    def profile(self, phase: str, roles: Sequence[str] = ()) -> BootProfile:
        table = self.discovery if phase == "discovery" else self.install
        for role in (*roles, "default"):
            if role in table:
                return table[role]
        return self.discovery.get("default", DEFAULT_DISCOVERY)


def load_profiles(path: Path) -> BootProfiles:
    """A profiles YAML file, validated; BootProfileError lists every problem with file:line."""
    from divingbell.core.document.problems import load_model
    from divingbell.core.errors import DocumentError

    try:
        return load_model(BootProfiles, path)
    except DocumentError as exc:
        raise BootProfileError(exc.problems) from None


@dataclass(frozen=True)
class BootQuery:
    """What a booting machine said about itself, reduced to well-formed values (None when
    absent or malformed; `dropped` names what was thrown away and why, for the log)."""

    uuid: str | None = None
    mac: str | None = None
    hostname: str | None = None
    serial: str | None = None
    platform: str | None = None
    dropped: tuple[str, ...] = ()

    @property
    def machine_uuid(self) -> str | None:
        """The uuid the discovery image reports: the firmware's, or one derived from the MAC
        when the firmware has none (QEMU without -uuid, some boards)."""
        if self.uuid is not None:
            return self.uuid
        return fallback_uuid(self.mac) if self.mac else None


def fallback_uuid(mac: str) -> str:
    """Must match machine_uuid() in the discovery client (image/initramfs/discovery)."""
    return "00000000-0000-4000-8000-" + mac.replace(":", "")


def parse_query(params: Mapping[str, str]) -> BootQuery:
    """Never raises: a value that is not what iPXE sends is dropped, not passed on."""
    dropped: list[str] = []

    def take(name: str) -> str | None:
        value = params.get(name)
        if value is None or value.strip() == "":
            return None
        return value.strip()

    uuid_text = take("uuid")
    machine_uuid = None
    if uuid_text is not None:
        try:
            parsed = uuid_module.UUID(uuid_text)
        except ValueError:
            dropped.append("uuid: not a UUID")
        else:
            if parsed in _NO_UUID:
                dropped.append("uuid: the firmware has none (all zeros or ones)")
            else:
                machine_uuid = str(parsed)
    mac_text = take("mac")
    mac = None
    if mac_text is not None:
        lowered = mac_text.lower()
        if _MAC.match(lowered):
            mac = lowered.replace("-", ":")
        else:
            dropped.append("mac: not a MAC address")
    hostname = take("hostname")
    if hostname is not None and not _HOSTNAME.match(hostname):
        dropped.append("hostname: not a host name")
        hostname = None
    serial = take("serial")
    if serial is not None and not _SERIAL.match(serial):
        dropped.append("serial: unexpected characters or too long")
        serial = None
    platform = take("platform")
    if platform is not None and platform not in PLATFORMS:
        dropped.append("platform: not pcbios or efi")
        platform = None
    return BootQuery(machine_uuid, mac, hostname, serial, platform, tuple(dropped))


@dataclass(frozen=True)
class BootMachine:
    """What the boot routes need to know about a registered machine."""

    id: str
    state: str
    roles: tuple[str, ...] = ()
    macs: frozenset[str] = frozenset()
    install_granted: bool = False


@dataclass(frozen=True)
class BootDecision:
    """The script for one boot request, and why (for the machine's history and the log)."""

    action: Literal["discovery", "install", "local", "none", "retry"]
    reason: str
    script: str


def check_base_url(base_url: str) -> str:
    """The service URL as machines reach it; ValueError if it could smuggle script text."""
    base = base_url.rstrip("/")
    if not _BASE_URL.match(base):
        raise ValueError(f"{base_url!r} is not a plain http(s) base URL")
    return base


def chain_script(base_url: str, retry_seconds: int = 5) -> str:
    """/boot.ipxe: (re)run DHCP, then ask the service for this machine's script until it gets
    one. A machine script that returns (its `exit`: boot the next device) ends this one too;
    iPXE's `exit` leaves only the script it is in."""
    base = check_base_url(base_url)
    return "\n".join([
        "#!ipxe",
        "# divingbell: network boot entry point",
        ":start",
        "dhcp || goto retry",
        f"chain --autofree {base}/v1/ipxe?uuid=${{uuid}}&mac=${{net0/mac:hexhyp}}"
        "&hostname=${hostname:uristring}&serial=${serial:uristring}&platform=${platform}"
        " || goto retry",
        "exit",
        ":retry",
        f"echo divingbell: no boot script from {base}; retrying in {retry_seconds} s",
        f"sleep {retry_seconds}",
        "goto start",
        "",
    ])


def _source_url(source: str, base: str) -> str:
    if source.startswith(("http://", "https://")):
        return source
    return f"{base}{ASSETS_PREFIX}{source}"


def _retry_tail(base: str, seconds: int) -> list[str]:
    return [
        ":failed",
        f"echo divingbell: boot failed; asking {base} again in {seconds} s",
        f"sleep {seconds}",
        f"chain --autofree {base}/boot.ipxe",
        "",
    ]


def profile_script(profile: BootProfile, base: str, extra_args: Sequence[str],
                   banner: str, retry_seconds: int) -> str:
    initrds = [f"initrd --name initrd{i} {_source_url(src, base)} || goto failed"
               for i, src in enumerate(profile.initrd)]
    args = [profile.cmdline, *(f"initrd=initrd{i}" for i in range(len(profile.initrd))),
            *extra_args]
    return "\n".join([
        "#!ipxe",
        f"echo divingbell: {banner}",
        f"kernel {_source_url(profile.kernel, base)} {' '.join(a for a in args if a)} "
        "|| goto failed",
        *initrds,
        "boot || goto failed",
        *_retry_tail(base, retry_seconds),
    ])


def local_boot_script(method: str, banner: str) -> str:
    """Boot the local disk. `sanboot` hands BIOS drive 0x80 to the firmware under legacy BIOS;
    under UEFI (and with method `exit`) iPXE exits, and the firmware boots its next boot option,
    which must be the disk (network first, then disk, in the firmware's boot order)."""
    lines = ["#!ipxe", f"echo divingbell: {banner}"]
    if method == "sanboot":
        lines += ["iseq ${platform} efi && goto firmware ||",
                  "sanboot --no-describe --drive 0x80 || goto next",
                  ":next", "echo divingbell: the local disk did not boot; next boot device",
                  "exit",
                  ":firmware",
                  "echo divingbell: UEFI: back to the firmware, which boots its next boot option"]
    lines += ["exit", ""]
    return "\n".join(lines)


def retry_script(base: str, reason: str, seconds: int) -> str:
    return "\n".join(["#!ipxe", f"echo divingbell: {reason}", f"sleep {seconds}",
                      f"chain --autofree {base}/boot.ipxe", ""])


def trusted_machine(query: BootQuery, machine: BootMachine | None
                    ) -> tuple[BootMachine | None, str]:
    """The machine this request may be answered for (None: treat as unknown), and how to name
    it in a script. A uuid whose machine has other MACs than the one asking is not trusted."""
    if machine is None or not _MACHINE_ID.match(machine.id) \
            or not re.fullmatch(r"[a-z-]{1,32}", machine.state):
        return None, "a new machine"
    if query.mac and machine.macs and query.mac not in machine.macs:
        return None, "a machine whose MAC does not match its uuid"
    return machine, f"machine {machine.id}"


def needs_bootstrap_token(query: BootQuery, machine: BootMachine | None) -> bool:
    """Whether the answer boots a discovery or install profile (which carries a token)."""
    trusted, _ = trusted_machine(query, machine)
    return trusted is None or trusted.state not in LOCAL_BOOT_STATES


def machine_script(query: BootQuery, machine: BootMachine | None, profiles: BootProfiles,
                   base_url: str, bootstrap_token: str | None) -> BootDecision:
    """The script for one boot request. Never raises on what the machine sent; only the
    service's own inputs (base URL, token) are checked, and a bad one gives a retry script."""
    try:
        base = check_base_url(base_url)
    except ValueError:
        base = ""
    seconds = profiles.retry_seconds
    if not base:
        # Nothing safe to point the machine at: let it fall through to the next boot device.
        return BootDecision("none", "the service URL is not usable in a script",
                            local_boot_script("exit", "no usable service URL; next boot device"))
    machine, who = trusted_machine(query, machine)
    state = machine.state if machine is not None else "unknown"
    if machine is not None and state in LOCAL_BOOT_STATES:
        return BootDecision("local", f"{state}: boot from the local disk",
                            local_boot_script(profiles.local_boot,
                                              f"{who} is {state}: booting from the local disk"))
    install = machine is not None and state == "installing" and machine.install_granted
    phase: Literal["discovery", "install"] = "install" if install else "discovery"
    if bootstrap_token is None or not _TOKEN.match(bootstrap_token):
        return BootDecision("retry", "no bootstrap token to give",
                            retry_script(base, "the service cannot issue a bootstrap token yet; "
                                         "retrying", seconds))
    roles = machine.roles if machine is not None else ()
    profile = profiles.profile(phase, roles)
    args = [f"divingbell.url={base}", f"divingbell.token={bootstrap_token}",
            "BOOTIF=01-${net0/mac:hexhyp}"]
    if install:
        args.append("divingbell.phase=install")
    role_text = f" ({', '.join(r for r in roles if _ROLE.match(r))})" if roles else ""
    banner = f"{who}{role_text} is {state}: booting the {phase} profile"
    return BootDecision(phase, f"{state}: {phase} profile",
                        profile_script(profile, base, args, banner, seconds))
