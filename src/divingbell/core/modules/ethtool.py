"""ethtool: NIC offload features, ring sizes, channels and coalescing.

Applied live with ethtool, then read back: the kernel may force dependent features (turning
tx-checksum-ip-generic off also turns TSO off) and says nothing; divingbell reports them. Each
interface's settings persist in an owned oneshot unit that re-applies them at boot, before the
network is up. Removal restores every setting's original value.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from divingbell.core.engine.change import Change
from divingbell.core.engine.journal import MANAGED_LINE, ModuleRecord
from divingbell.core.engine.settings import converge, restore
from divingbell.core.errors import CommandError, ModuleError
from divingbell.core.host import Host
from divingbell.core.modules.base import HostModule
from divingbell.core.modules.systemd import (
    is_enabled,
    plan_unit,
    unit_file,
)

if TYPE_CHECKING:
    from divingbell.core.modules.ethtool_schema import EthtoolConf, EthtoolInterface

WANTED_BY = "multi-user.target"

# ethtool's short names for features (ethtool(8), -K)
FEATURE_ALIASES = {
    "rx": "rx-checksumming", "tx": "tx-checksumming", "sg": "scatter-gather",
    "tso": "tcp-segmentation-offload", "ufo": "udp-fragmentation-offload",
    "gso": "generic-segmentation-offload", "gro": "generic-receive-offload",
    "lro": "large-receive-offload", "rxvlan": "rx-vlan-offload", "txvlan": "tx-vlan-offload",
    "ntuple": "ntuple-filters", "rxhash": "receive-hashing",
}

# group -> (query flag, set flag, what it is called in errors)
GROUPS = {
    "ring": ("-g", "-G", "ring sizes"),
    "channels": ("-l", "-L", "channels"),
    "coalesce": ("-c", "-C", "interrupt coalescing"),
}


@dataclass(frozen=True)
class Feature:
    active: bool
    fixed: bool | None  # None: a group of features (e.g. tx-checksumming)


def parse_features(text: str) -> dict[str, Feature]:
    """`ethtool --json -k IFACE` -> feature name -> state."""
    data = json.loads(text)
    entry = data[0] if isinstance(data, list) else data
    return {
        name: Feature(bool(value.get("active")), value.get("fixed"))
        for name, value in entry.items()
        if isinstance(value, dict) and "active" in value
    }


def parse_settings(text: str) -> dict[str, int | None]:
    """The "Current hardware settings" of `ethtool -g` or `-l` -> parameter -> value.

    Names are the ones -G/-L take ("rx", "rx-jumbo", "combined"); n/a becomes None.
    """
    current: dict[str, int | None] = {}
    in_current = False
    for line in text.splitlines():
        if line.strip().startswith("Current hardware settings"):
            in_current = True
            continue
        if not in_current or ":" not in line:
            continue
        label, _, value = line.partition(":")
        name = label.strip().lower().replace(" ", "-")
        value = value.strip()
        current[name] = int(value) if value.isdigit() else None
    return current


def parse_coalesce(text: str) -> dict[str, str]:
    """`ethtool -c IFACE` -> parameter (as -C takes it) -> value."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        adaptive = re.match(r"Adaptive RX:\s*(\S+)\s+TX:\s*(\S+)", line)
        if adaptive:
            values["adaptive-rx"], values["adaptive-tx"] = adaptive.groups()
            continue
        match = re.match(r"^([a-z0-9-]+):\s+(\S+)\s*$", line)
        if match:
            values[match.group(1)] = match.group(2)
    return values


@dataclass
class NicState:
    features: dict[str, Feature]
    groups: dict[str, dict[str, str]] = field(default_factory=dict)  # ring/channels/coalesce


@dataclass(frozen=True)
class EthtoolObserved:
    nics: dict[str, NicState]              # interfaces that exist
    units: dict[str, str | None]           # unit path -> content
    enabled: dict[str, bool]               # unit name -> enabled for boot
    ethtool_path: str


@dataclass(frozen=True)
class Setting:
    """Payload of a live change: which knob of which interface."""

    iface: str
    group: str | None  # None for an offload feature
    name: str
    # Every offload feature the document requests on this interface (name, on|off): a change
    # that makes the kernel drop another requested feature is a conflict, not a note.
    requested: tuple[tuple[str, str], ...] = ()


def unit_name(iface: str) -> str:
    return f"divingbell-ethtool-{iface}.service"


def target(iface: str, group: str | None, name: str) -> str:
    return f"{iface} {group} {name}" if group else f"{iface} {name}"


def parse_target(text: str) -> Setting | None:
    parts = text.split(" ")
    if len(parts) == 2:
        return Setting(parts[0], None, parts[1])
    if len(parts) == 3 and parts[1] in GROUPS:
        return Setting(parts[0], parts[1], parts[2])
    return None


def _switch(value: bool) -> str:
    return "on" if value else "off"


def wanted_settings(conf: EthtoolInterface) -> dict[tuple[str | None, str], str]:
    wanted: dict[tuple[str | None, str], str] = {}
    for name, value in conf.features.items():
        wanted[(None, FEATURE_ALIASES.get(name, name))] = _switch(value)
    for group in GROUPS:
        for name, number in (getattr(conf, group) or {}).items():
            wanted[(group, name)] = str(number)
    return wanted


def render_unit(iface: str, conf: EthtoolInterface, ethtool: str) -> str:
    wanted = wanted_settings(conf)
    lines = [
        MANAGED_LINE,
        "[Unit]",
        f"Description=divingbell: NIC settings for {iface}",
        # Ordering only: BindsTo= would never start where udev does not run (containers).
        f"After=sys-subsystem-net-devices-{iface}.device",
        "Before=network-pre.target",
        "Wants=network-pre.target",
        "",
        "[Service]",
        "Type=oneshot",
        "RemainAfterExit=yes",
    ]
    features = [f"{name} {value}" for (group, name), value in sorted(
        wanted.items(), key=lambda item: (item[0][0] or "", item[0][1])) if group is None]
    if features:
        lines.append(f"ExecStart={ethtool} -K {iface} {' '.join(features)}")
    for group, (_, set_flag, _) in GROUPS.items():
        params = [f"{name} {value}" for (g, name), value in sorted(
            wanted.items(), key=lambda item: item[0][1]) if g == group]
        if params:
            lines.append(f"ExecStart={ethtool} {set_flag} {iface} {' '.join(params)}")
    lines += ["", "[Install]", f"WantedBy={WANTED_BY}", ""]
    return "\n".join(lines)


class Ethtool(HostModule["EthtoolConf", EthtoolObserved]):
    name = "ethtool"

    def observe(self, host: Host, desired: EthtoolConf | None, record: ModuleRecord
                ) -> EthtoolObserved:
        wanted = desired.root if desired else {}
        journal_ifaces = {s.iface for t in record.originals if (s := parse_target(t))}
        problems: list[str] = []
        nics: dict[str, NicState] = {}
        for iface in sorted(set(wanted) | journal_ifaces):
            try:
                nic = NicState(parse_features(
                    host.run(["ethtool", "--json", "-k", iface]).stdout))
            except CommandError as exc:
                if iface in wanted:
                    problems.append(f"{iface}: cannot read its features: {exc}"
                                    if "No such device" not in exc.stderr
                                    else f"{iface}: no such network interface on this host")
                continue
            nics[iface] = nic
            groups_needed = {s.group for t in record.originals
                             if (s := parse_target(t)) and s.iface == iface and s.group}
            conf = wanted.get(iface)
            if conf is not None:
                groups_needed |= {g for g in GROUPS if getattr(conf, g)}
                problems.extend(self._check_features(iface, conf, nic))
            for group in sorted(g for g in groups_needed if g):
                try:
                    nic.groups[group] = self._read_group(host, iface, group)
                except CommandError as exc:
                    if conf is not None and getattr(conf, group):
                        problems.append(self._unsupported(host, iface, group, exc))
            if conf is not None:
                problems.extend(self._check_groups(iface, conf, nic))
        if problems:
            raise ModuleError(self.name, problems)
        units = {unit_file(unit_name(i)) for i in wanted} | {
            p for p in record.owned_files}
        return EthtoolObserved(
            nics,
            {path: host.read_text(path) for path in sorted(units)},
            {unit_name(i): is_enabled(host, unit_name(i), WANTED_BY)
             for i in set(wanted) | journal_ifaces},
            "/usr/sbin/ethtool" if host.exists("/usr/sbin/ethtool") else "/sbin/ethtool",
        )

    def plan(self, desired: EthtoolConf | None, observed: EthtoolObserved, record: ModuleRecord
             ) -> list[Change]:
        wanted_ifaces = desired.root if desired else {}
        changes: list[Change] = []
        wanted_targets: set[str] = set()
        for iface, conf in sorted(wanted_ifaces.items()):
            nic = observed.nics[iface]
            wanted = wanted_settings(conf)
            requested = tuple(sorted((name, value) for (group, name), value in wanted.items()
                                     if group is None))
            for (group, name), after in sorted(wanted.items(),
                                               key=lambda kv: (kv[0][0] or "", kv[0][1])):
                key = target(iface, group, name)
                wanted_targets.add(key)
                changes.append(converge(
                    self.name, key, self._current(nic, group, name), after, record,
                    payload=Setting(iface, group, name, requested if group is None else ())))
        for key in sorted(t for t in record.originals if t not in wanted_targets):
            setting = parse_target(key)
            if setting is None:
                continue
            nic_or_gone = observed.nics.get(setting.iface)
            current = self._current(nic_or_gone, setting.group, setting.name)
            changes.append(restore(self.name, key, current, record.originals[key],
                                   payload=setting))
        wanted_units = set()
        for iface, conf in sorted(wanted_ifaces.items()):
            wanted_units.add(unit_name(iface))
            changes.extend(plan_unit(
                self.name, unit_name(iface), render_unit(iface, conf, observed.ethtool_path),
                observed.units, observed.enabled, WANTED_BY, record))
        for path in sorted(observed.units):
            unit = path.rsplit("/", 1)[-1]
            if unit not in wanted_units:
                changes.extend(plan_unit(self.name, unit, None, observed.units,
                                         observed.enabled, WANTED_BY, record))
        return changes

    def apply_setting(self, host: Host, change: Change, record: ModuleRecord) -> list[str]:
        assert change.after is not None
        return self._set(host, change.payload, change.after)

    def undo_setting(self, host: Host, change: Change) -> None:
        if change.before is not None:
            self._set(host, change.payload, change.before)

    # -----------------------------------------------------------------------------------------

    def _set(self, host: Host, setting: Setting, value: str) -> list[str]:
        iface = setting.iface
        if setting.group is None:
            before = parse_features(host.run(["ethtool", "--json", "-k", iface]).stdout)
            host.run(["ethtool", "-K", iface, setting.name, value])
            after = parse_features(host.run(["ethtool", "--json", "-k", iface]).stdout)
            if _switch(after[setting.name].active) != value:
                others = [f"{name} {want}" for name, want in setting.requested
                          if name != setting.name and want == "off"]
                hint = (f"; it conflicts with what the document turns off on {iface} "
                        f"({', '.join(others)}): the kernel ties these features together"
                        if value == "on" and others else "")
                raise ModuleError(self.name, [
                    f"{iface} {setting.name}: requested {value} but the kernel keeps it "
                    f"{_switch(after[setting.name].active)}{hint}"])
            dropped = [
                f"{name} {_switch(after[name].active)} (the document requests {want})"
                for name, want in setting.requested
                if name != setting.name and name in after and name in before
                and _switch(before[name].active) == want and _switch(after[name].active) != want
            ]
            if dropped:
                # This change is not recorded as applied: put it back here, so the module's
                # rollback leaves the NIC as it was.
                host.run(["ethtool", "-K", iface, setting.name,
                          _switch(before[setting.name].active)])
                raise ModuleError(self.name, [
                    f"{iface}: the document's settings conflict: {setting.name} {value} made the "
                    f"kernel turn {', '.join(dropped)}; change one of them"])
            forced = sorted(
                f"{name} {_switch(state.active)}" for name, state in after.items()
                if name != setting.name and state.fixed is not None and name in before
                and before[name].active != state.active
            )
            if forced:
                return [f"{iface}: setting {setting.name} {value} also changed "
                        f"{', '.join(forced)} (kernel feature dependencies)"]
            return []
        _query, set_flag, _ = GROUPS[setting.group]
        host.run(["ethtool", set_flag, iface, setting.name, value])
        reported = self._read_group(host, iface, setting.group).get(setting.name)
        if reported != value:
            raise ModuleError(self.name, [
                f"{iface} {setting.group} {setting.name}: set {value} but the driver reports "
                f"{reported}"])
        return []

    @staticmethod
    def _current(nic: NicState | None, group: str | None, name: str) -> str | None:
        if nic is None:
            return None
        if group is None:
            feature = nic.features.get(name)
            return None if feature is None else _switch(feature.active)
        return nic.groups.get(group, {}).get(name)

    @staticmethod
    def _read_group(host: Host, iface: str, group: str) -> dict[str, str]:
        output = host.run(["ethtool", GROUPS[group][0], iface]).stdout
        if group == "coalesce":
            return parse_coalesce(output)
        return {k: str(v) for k, v in parse_settings(output).items() if v is not None}

    @staticmethod
    def _check_features(iface: str, conf: EthtoolInterface, nic: NicState) -> list[str]:
        problems = []
        for name, value in conf.features.items():
            canonical = FEATURE_ALIASES.get(name, name)
            state = nic.features.get(canonical)
            if state is None:
                problems.append(f"{iface}: no feature named {name!r} (see `ethtool -k {iface}`)")
            elif state.fixed and state.active != value:
                problems.append(f"{iface} {name}: is fixed {_switch(state.active)} by the driver "
                                "([fixed]); it cannot be changed")
        return problems

    @staticmethod
    def _check_groups(iface: str, conf: EthtoolInterface, nic: NicState) -> list[str]:
        problems = []
        for group, (_, _, label) in GROUPS.items():
            have = nic.groups.get(group)
            if have is None:
                continue
            for name in getattr(conf, group) or {}:
                if name not in have:
                    known = ", ".join(sorted(have)) or "none"
                    problems.append(f"{iface} {group}: no parameter {name!r} for {label} "
                                    f"(this NIC has: {known})")
        return problems

    @staticmethod
    def _unsupported(host: Host, iface: str, group: str, exc: CommandError) -> str:
        label = GROUPS[group][2]
        if "not supported" in exc.stderr.lower():
            try:
                info = host.run(["ethtool", "-i", iface]).stdout
                driver = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                               if line.startswith("driver:")), "its driver")
            except CommandError:
                driver = "its driver"
            return f"{iface}: {label} are not supported by {driver}"
        return f"{iface}: cannot read {label}: {exc}"
