"""Request bodies, validated at the edge: every bound is explicit (lengths, ranges), so bad
input is a 422 naming the field and nothing reaches the store that it could refuse."""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Text = Annotated[str, Field(max_length=255)]
Name = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
MAX_INT = 2**62

_MAC_RE = re.compile(r"^[0-9a-f]{2}([:-]?)[0-9a-f]{2}(\1[0-9a-f]{2}){4}$")
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
HOSTNAME_RE = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*$")
"""RFC 1123 host names, lower case (what Kubernetes accepts as a node name)."""


def check_hostname(value: str) -> str:
    """A host name as the fleet stores it: lower-cased, RFC 1123; ValueError naming why."""
    name = value.strip().lower()
    if name and not HOSTNAME_RE.fullmatch(name):
        raise ValueError(f"{value[:64]!r} is not an RFC 1123 host name (letters, digits and "
                         "'-' in dot-separated labels of at most 63, each starting and ending "
                         "with a letter or digit; 253 at most)")
    return name


def normalise_mac(value: str) -> str:
    text = value.strip().lower()
    if not _MAC_RE.match(text):
        raise ValueError(f"{value!r} is not a MAC address (like 52:54:00:12:34:56)")
    digits = re.sub(r"[^0-9a-f]", "", text)
    return ":".join(digits[i:i + 2] for i in range(0, 12, 2))


def _nul_path(value: Any, path: str) -> str | None:
    if isinstance(value, str):
        return path if "\x00" in value else None
    if isinstance(value, dict):
        for key, item in value.items():
            found = _nul_path(key, path) or _nul_path(item, f"{path}.{key}" if path else str(key))
            if found is not None:
                return found
    if isinstance(value, list):
        for index, item in enumerate(value):
            found = _nul_path(item, f"{path}[{index}]")
            if found is not None:
                return found
    return None


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    @model_validator(mode="before")
    @classmethod
    def _no_nul(cls, data: Any) -> Any:
        # PostgreSQL text cannot hold NUL; refuse it here, naming where it is.
        found = _nul_path(data, "")
        if found is not None:
            raise ValueError(f"{found or 'value'}: NUL characters are not allowed")
        return data


class Address(Strict):
    address: Text
    prefix: Annotated[int, Field(ge=0, le=128)]

    @model_validator(mode="after")
    def _check(self) -> Address:
        try:
            ip = ipaddress.ip_address(self.address)
        except ValueError:
            raise ValueError(f"{self.address!r} is not an IPv4 or IPv6 address") from None
        if ip.version == 4 and self.prefix > 32:
            raise ValueError(f"prefix {self.prefix} is too long for IPv4")
        self.address = str(ip)
        return self


class Interface(Strict):
    name: Annotated[str, Field(min_length=1, max_length=64)]
    mac: Annotated[str | None, Field(max_length=32)] = None
    addresses: Annotated[list[Address], Field(max_length=256)] = []
    gateway: Text | None = None
    fqdns: Annotated[list[Text], Field(max_length=64)] = []
    boot: bool = False

    @field_validator("mac")
    @classmethod
    def _mac(cls, value: str | None) -> str | None:
        return None if value in (None, "") else normalise_mac(value)

    @field_validator("gateway")
    @classmethod
    def _gateway(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            raise ValueError(f"{value!r} is not an IP address") from None


class Disk(Strict):
    path: Annotated[str, Field(min_length=1, max_length=255)]
    size_bytes: Annotated[int, Field(ge=0, le=MAX_INT)]
    model: Text | None = None
    serial: Text | None = None


class Neighbour(Strict):
    interface: Text | None = None
    chassis_id: Text | None = None
    chassis_name: Text | None = None
    port_id: Text | None = None
    port_description: Text | None = None


class ReportedBmc(Strict):
    """Where the machine says its BMC is (the discovery image's `ipmitool lan print`, or a file
    an image of one's own fills). Kept as reported: never credentials, never used to power
    anything until an admin sets the BMC (`fleet bmc`)."""

    address: Annotated[str, Field(min_length=2, max_length=45)]
    source: Literal["ipmitool", "image"] = "image"

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        try:
            address = ipaddress.ip_address(value)
        except ValueError:
            raise ValueError(f"{value!r} is not an IP address") from None
        if address.is_unspecified or address.is_multicast:
            raise ValueError(f"{value} cannot be a BMC's address")
        return str(address)


class Discovery(Strict):
    """What a machine says it is. Enjoliver's payload is accepted too and translated."""

    uuid: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9-]+$")]
    boot_id: Annotated[str, Field(max_length=64)] | None = None
    hostname: Annotated[str, Field(max_length=253)] = ""
    serial: Text | None = None
    interfaces: Annotated[list[Interface], Field(max_length=256)] = []
    disks: Annotated[list[Disk], Field(max_length=256)] = []
    lldp: Annotated[list[Neighbour], Field(max_length=256)] = []
    bmc: ReportedBmc | None = None

    @field_validator("uuid")
    @classmethod
    def _uuid(cls, value: str) -> str:
        return value.lower()

    @field_validator("hostname")
    @classmethod
    def _hostname(cls, value: str) -> str:
        return check_hostname(value)

    @model_validator(mode="before")
    @classmethod
    def _enjoliver(cls, data: Any) -> Any:
        if isinstance(data, dict) and "boot-info" in data:
            return from_enjoliver(data)
        return data

    @model_validator(mode="after")
    def _unique_macs(self) -> Discovery:
        seen: dict[str, str] = {}
        for interface in self.interfaces:
            if interface.mac is None:
                continue
            if interface.mac in seen:
                raise ValueError(f"MAC {interface.mac} is on two interfaces: "
                                 f"{seen[interface.mac]} and {interface.name}")
            seen[interface.mac] = interface.name
        return self


def _is_loopback(item: dict[str, Any]) -> bool:
    """Enjoliver's `lo`: no MAC, and the loopback name or only loopback addresses."""
    if item.get("mac"):
        return False
    if item.get("name") == "lo":
        return True
    addresses = [item.get("ipv4"), str(item.get("cidrv4") or "").partition("/")[0]]
    present = [a for a in addresses if isinstance(a, str) and a]
    try:
        return bool(present) and all(ipaddress.ip_address(a).is_loopback for a in present)
    except ValueError:
        return False  # left for the schema to name


def from_enjoliver(data: dict[str, Any]) -> dict[str, Any]:
    """Enjoliver's discovery payload -> ours (unknown shapes are left for validation to name)."""
    boot = data.get("boot-info") or {}
    if not isinstance(boot, dict):
        return {"uuid": None, "boot-info": boot}
    boot_mac = boot.get("mac")
    interfaces = []
    fqdns: list[str] = []
    for item in data.get("interfaces") or []:
        if not isinstance(item, dict):
            interfaces.append(item)
            continue
        if _is_loopback(item):
            continue  # Enjoliver reports `lo` like any interface; `discover` leaves it out too
        addresses = []
        ipv4, cidr = item.get("ipv4"), item.get("cidrv4")
        if isinstance(cidr, str) and "/" in cidr:
            address, _, prefix = cidr.partition("/")
            addresses.append({"address": address, "prefix": int(prefix) if prefix.isdigit()
                              else prefix})
        elif ipv4:
            addresses.append({"address": ipv4, "prefix": item.get("netmask", 32)})
        fqdn = item.get("fqdn") or []
        fqdn_list = [fqdn] if isinstance(fqdn, str) else list(fqdn)
        fqdns.extend(f for f in fqdn_list if isinstance(f, str))
        interfaces.append({
            "name": item.get("name"), "mac": item.get("mac"), "addresses": addresses,
            "gateway": item.get("gateway") or None, "fqdns": fqdn_list,
            "boot": bool(boot_mac) and item.get("mac") == boot_mac})
    # A disk without its size is refused by the native schema, never stored as 0 bytes.
    disks = [{"path": d.get("path")} | ({"size_bytes": d["size-bytes"]} if "size-bytes" in d
                                         else {})
             if isinstance(d, dict) else d for d in data.get("disks") or []]
    lldp = []
    raw_lldp = data.get("lldp") or {}
    neighbours = ((raw_lldp.get("data") or {}).get("interfaces") or []
                  if isinstance(raw_lldp, dict) else [])
    for item in neighbours if isinstance(neighbours, list) else []:
        if not isinstance(item, dict):
            continue
        chassis = item.get("chassis") or {}
        port = item.get("port") or {}
        lldp.append({"interface": item.get("name"), "chassis_id": chassis.get("id"),
                     "chassis_name": chassis.get("name"), "port_id": port.get("id")})
    return {"uuid": boot.get("uuid"), "boot_id": boot.get("random-id"),
            "hostname": fqdns[0].split(".")[0] if fqdns else "",
            "interfaces": interfaces, "disks": disks, "lldp": lldp}


class HostnameBody(Strict):
    hostname: Annotated[str, Field(max_length=253)] | None = None
    """None: accept the name the machine claimed."""

    @field_validator("hostname")
    @classmethod
    def _hostname(cls, value: str | None) -> str | None:
        return None if value is None else check_hostname(value)


class AcceptUnadmittedBody(Strict):
    all_unadmitted: Literal[True]
    """Must be true: the one selection there is (every unadmitted machine), said out loud."""


class RolesBody(Strict):
    roles: Annotated[list[Literal["control-plane", "worker"]], Field(max_length=2)]
    pinned: bool = True


class ModuleReport(Strict):
    changes: Annotated[int, Field(ge=0, le=MAX_INT)] = 0
    failures: Annotated[list[Annotated[str, Field(max_length=4096)]], Field(max_length=100)] = []


class ReportBody(Strict):
    revision: Annotated[int, Field(ge=1, le=2**31 - 1)]
    # rebooting: applied, but what it applied takes effect only after a reboot (a kernel
    # command line, a kernel package) and the node has not rebooted yet: still updating.
    # reverted: a kernel command line tried once did not come back healthy; the machine holds
    # its last-known-good line (a failure: the rollout halts at it).
    state: Literal["converged", "rebooting", "failed", "reverted"]
    modules: Annotated[dict[Annotated[str, Field(max_length=64)], ModuleReport],
                       Field(max_length=64)] = {}
    drift: bool = False
    duration_seconds: Annotated[float, Field(ge=0, le=1e9)] = 0.0
    boot_id: Annotated[str, Field(max_length=64)] | None = None
    etag: Annotated[str, Field(max_length=64)] | None = None
    """The ETag of the configuration applied (tells a role change apart from a revision)."""


class InstallResult(Strict):
    success: bool
    output: Annotated[str, Field(max_length=1_000_000)] = ""


class SlotClaim(Strict):
    group: Name = "default"
    holder: Annotated[str, Field(min_length=1, max_length=128)]
    slots: Annotated[int, Field(ge=1, le=1000)] = 1
    """Ignored (older agents send it): the service decides a group's slot count."""
    ttl_seconds: Annotated[float, Field(gt=0, le=7 * 86400)] = 600.0
    """Capped by the service (`slot_ttl_max_seconds`)."""


class SlotRenew(Strict):
    holder: Annotated[str, Field(min_length=1, max_length=128)]
    ttl_seconds: Annotated[float, Field(gt=0, le=7 * 86400)] = 600.0
    rebooting: bool = False
    """The holder is in a maintenance reboot (not back yet): the service watches it and
    power-cycles it once through its BMC when it is not heard from within its health timeout."""


class SlotRelease(Strict):
    holder: Annotated[str, Field(min_length=1, max_length=128)]
