"""Discovery facts from the real host: what `divingbell discover` sends to the fleet service.

Machine formats only: DMI from /sys/class/dmi/id, the boot id from /proc, interfaces and
routes from netlink (`ip -j addr`, `ip -j route`), disks from /sys/block, LLDP neighbours from
`lldpd` (`lldpcli -f json show neighbors`) when it runs. The parsers are pure and tested on
real output. Standard library only: this runs on nodes and in the network-boot image.
"""

from __future__ import annotations

import json
import socket
import uuid as uuid_module
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from divingbell.core.errors import CommandError
from divingbell.core.host import Host

SKIPPED_DISKS = ("loop", "ram", "zram", "sr", "fd", "nbd", "dm-", "md")


def parse_ip_addr(data: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """`ip -j addr` -> interfaces (loopback left out)."""
    interfaces = []
    for link in data:
        if link.get("link_type") == "loopback" or link.get("ifname") == "lo":
            continue
        mac = link.get("address") if link.get("link_type") == "ether" else None
        addresses = [{"address": a["local"], "prefix": int(a["prefixlen"])}
                     for a in link.get("addr_info") or []
                     if a.get("local") and a.get("family") in ("inet", "inet6")]
        interfaces.append({"name": link["ifname"], "mac": mac, "addresses": addresses,
                           "gateway": None, "fqdns": [], "boot": False})
    return interfaces


def parse_ip_route(data: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """`ip -j route` (or `ip -j -6 route`) -> {device: default gateway}."""
    gateways: dict[str, str] = {}
    for route in data:
        if route.get("dst") == "default" and route.get("gateway") and route.get("dev"):
            gateways.setdefault(route["dev"], route["gateway"])
    return gateways


def parse_lldp(data: Mapping[str, Any]) -> list[dict[str, Any]]:
    """`lldpcli -f json show neighbors` -> neighbours. lldpd writes one interface as an object
    and several as a list, and each chassis as {name: {...}}."""
    lldp = data.get("lldp") or {}
    entries = lldp.get("interface") if isinstance(lldp, Mapping) else None
    if isinstance(entries, Mapping):
        entries = [{name: value} for name, value in entries.items()]
    neighbours = []
    for entry in entries or []:
        for name, value in (entry.items() if isinstance(entry, Mapping) else ()):
            chassis = value.get("chassis") or {}
            chassis_name, chassis_body = next(iter(chassis.items()), (None, {}))
            if not isinstance(chassis_body, Mapping):
                chassis_body = {}
            if "id" in chassis and not isinstance(chassis.get("id"), Mapping):
                chassis_name, chassis_body = None, chassis
            chassis_id = chassis_body.get("id")
            if isinstance(chassis_id, Mapping):
                chassis_id = chassis_id.get("value")
            port = value.get("port") or {}
            port_id = port.get("id")
            if isinstance(port_id, Mapping):
                port_id = port_id.get("value")
            neighbours.append({
                "interface": name, "chassis_id": chassis_id, "chassis_name": chassis_name,
                "port_id": port_id, "port_description": port.get("descr")})
    return neighbours


def read_disks(sys_block: Path) -> list[dict[str, Any]]:
    disks = []
    for device in sorted(sys_block.iterdir()) if sys_block.is_dir() else []:
        if device.name.startswith(SKIPPED_DISKS):
            continue
        try:
            sectors = int((device / "size").read_text().strip())
        except (OSError, ValueError):
            continue
        disk: dict[str, Any] = {"path": f"/dev/{device.name}", "size_bytes": sectors * 512}
        for key, names in (("model", ("device/model",)),
                           ("serial", ("device/serial", "serial", "device/wwid"))):
            for relative in names:
                text = _read(device / relative)
                if text:
                    disk[key] = text
                    break
        disks.append(disk)
    return disks


def machine_uuid(sys_root: Path, etc: Path) -> tuple[str, str]:
    """(uuid, where it came from): DMI's product UUID, else /etc/machine-id as a UUID."""
    dmi = _read(sys_root / "class/dmi/id/product_uuid")
    if dmi and dmi.strip("0-") and dmi.lower() != "03000200-0400-0500-0006-000700080009":
        return dmi.lower(), "dmi"
    machine_id = _read(etc / "machine-id")
    if machine_id and len(machine_id) == 32:
        return str(uuid_module.UUID(hex=machine_id)), "machine-id"
    raise ValueError("no DMI product UUID and no /etc/machine-id: cannot identify this machine")


def gather(host: Host | None = None, sys_root: Path = Path("/sys"),
           proc: Path = Path("/proc"), etc: Path = Path("/etc"), uuid: str | None = None
           ) -> dict[str, Any]:
    host = host or Host()
    if uuid is None:
        uuid, _source = machine_uuid(sys_root, etc)
    interfaces = parse_ip_addr(json.loads(host.run(["ip", "-j", "addr"]).stdout or "[]"))
    gateways: dict[str, str] = {}
    for family in ("-4", "-6"):
        try:
            routes = json.loads(host.run(["ip", "-j", family, "route"]).stdout or "[]")
        except CommandError:
            continue
        for device, gateway in parse_ip_route(routes).items():
            gateways.setdefault(device, gateway)
    hostname = socket.gethostname()
    fqdn = socket.getfqdn()
    for interface in interfaces:
        interface["gateway"] = gateways.get(interface["name"])
        if interface["name"] in gateways and not any(i["boot"] for i in interfaces):
            interface["boot"] = True
            if fqdn and "." in fqdn:
                interface["fqdns"] = [fqdn]
    lldp: list[dict[str, Any]] = []
    try:
        answer = host.run(["lldpcli", "-f", "json", "show", "neighbors"], timeout=10)
        lldp = parse_lldp(json.loads(answer.stdout or "{}"))
    except (CommandError, ValueError):
        pass  # lldpd not installed or not running: no neighbours known
    facts: dict[str, Any] = {
        "uuid": uuid, "boot_id": _read(proc / "sys/kernel/random/boot_id"),
        "hostname": hostname, "serial": _read(sys_root / "class/dmi/id/product_serial"),
        "interfaces": interfaces, "disks": read_disks(sys_root / "block"), "lldp": lldp}
    return facts


def _read(path: Path) -> str | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return text or None
