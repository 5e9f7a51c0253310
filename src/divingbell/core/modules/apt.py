"""apt: packages, repositories and day-2 patching, decided by apt's own resolver.

- What the host has comes from dpkg (`rc`, config-files only, counts as not installed). What a
  transaction would do comes from apt's simulation (`apt-get -s`), so the plan lists exactly the
  packages apt would install, upgrade, downgrade or remove, dependencies included.
- A pinned version is compared with what is installed, epoch-aware, so an installed pin is a
  no-op (Divingbell purged and reinstalled it on alternate runs). Pins also go into an owned
  apt preferences file, so neither `upgrade: true` nor an operator's `apt upgrade` moves them.
- Repositories are owned deb822 `.sources` files with their key under /etc/apt/keyrings
  (Signed-By; no apt-key). Other sources are left alone unless `exclusive_sources: true`, which
  blanks them, keeping their content as originals to restore.
- Removal from the document uninstalls only packages divingbell installed, together with the
  packages apt installed automatically for them that nothing else needs any more (apt's
  autoremove after that removal, minus garbage that was there before). `strict` removes
  what is neither requested nor whitelisted, found the way `apt autoremove` finds garbage
  (everything else marked automatic in a scratch copy of apt's state), so dependencies of kept
  packages stay; essential and required packages, and the tools divingbell itself runs on the
  host, are always kept. Blacklisted packages are purged, never with an autoremove.
- apt has no rollback: packages a failed run changed stay changed, and the run says so.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from divingbell.core.document.keys import REBOOT_PACKAGES as REBOOT_PACKAGE_NAMES
from divingbell.core.engine.change import NONE, REBOOT, Action, Change, restart
from divingbell.core.engine.files import FileSpec, plan_files
from divingbell.core.engine.journal import MANAGED_LINE, ModuleRecord
from divingbell.core.engine.settings import converge, left_the_document, restore
from divingbell.core.errors import CommandError, ModuleError
from divingbell.core.host import Host
from divingbell.core.modules.base import HostModule

if TYPE_CHECKING:
    from divingbell.core.modules.apt_schema import AptConf, Package, Repository

SOURCES_DIR = "/etc/apt/sources.list.d"
SOURCES_LIST = "/etc/apt/sources.list"
KEYRINGS_DIR = "/etc/apt/keyrings"
PREFERENCES = "/etc/apt/preferences.d/divingbell.pref"
DEBCONF_DB = ("/var/cache/debconf/config.dat", "/var/cache/debconf/passwords.dat")
STRICT_STATES = "/var/lib/divingbell/apt-strict.extended_states"
REBOOT_REQUIRED = "/run/reboot-required"
DPKG_INFO = "/var/lib/dpkg/info"
UNIT_DIRS = ("/lib/systemd/system/", "/usr/lib/systemd/system/")
REBOOT_PACKAGES = re.compile(REBOOT_PACKAGE_NAMES)
HEADER = MANAGED_LINE + "\n"
DISABLED = "# Disabled by divingbell (apt.exclusive_sources); its original returns after.\n"

APT_ENV = {"DEBIAN_FRONTEND": "noninteractive", "APT_LISTCHANGES_FRONTEND": "none",
           "NEEDRESTART_MODE": "l"}
# Keep the node's changed config files; take the package's for files nobody edited.
DPKG_OPTIONS = ["-o", "Dpkg::Options::=--force-confdef", "-o", "Dpkg::Options::=--force-confold"]
# What divingbell runs on the host: strict mode never takes these away.
PROTECTED = frozenset({
    "apt", "dpkg", "debconf", "passwd", "login", "util-linux", "mount", "sudo", "openssh-server",
    "systemd", "systemd-sysv", "ethtool", "iproute2", "kmod", "procps", "apparmor",
    "init-system-helpers", "gpgv",
})
_SIM_LINE = re.compile(
    r"^(?P<op>Inst|Remv|Purg) (?P<name>[^\s:]+)(?::\S+)?"
    r"(?: \[(?P<old>[^\]]+)\])?(?: \((?P<new>\S+)[^)]*\))?")


def sources_file(name: str) -> str:
    return f"{SOURCES_DIR}/divingbell-{name}.sources"


def keyring_file(name: str) -> str:
    return f"{KEYRINGS_DIR}/divingbell-{name}.asc"


def render_source(name: str, repo: Repository) -> str:
    lines = [HEADER.rstrip("\n"), "Types: deb", f"URIs: {repo.url}",
             f"Suites: {' '.join(repo.suites)}"]
    if repo.components:
        lines.append(f"Components: {' '.join(repo.components)}")
    if repo.architectures:
        lines.append(f"Architectures: {' '.join(repo.architectures)}")
    if repo.gpgkey is not None:
        lines.append(f"Signed-By: {keyring_file(name)}")
    return "\n".join(lines) + "\n"


def render_preferences(pins: dict[str, str]) -> str:
    return HEADER + "".join(
        f"\nPackage: {name}\nPin: version {version}\nPin-Priority: 1001\n"
        for name, version in sorted(pins.items()))


@dataclass(frozen=True)
class Installed:
    version: str
    arch: str
    essential: bool
    priority: str


@dataclass
class AptRun:
    """What one run of the module shares between its changes."""

    lock_timeout: int
    refresh: bool
    refreshed: bool = False


@dataclass
class Transaction:
    """One apt-get run. Every package change it makes carries it; it runs once."""

    argv: list[str]
    run: AptRun
    allow_downgrade: bool = False
    downgrades: set[str] = field(default_factory=set)
    installs: list[str] = field(default_factory=list)  # requested names it installs fresh
    removes: list[str] = field(default_factory=list)   # owned names it takes away
    done: bool = False
    reported_undo: bool = False


@dataclass(frozen=True)
class Step:
    op: str  # install | upgrade | downgrade | remove | purge
    name: str
    old: str | None
    new: str | None


@dataclass(frozen=True)
class DebconfStep:
    owner: str
    question: str
    qtype: str
    value: str


@dataclass(frozen=True)
class Reconfigure:
    package: str


@dataclass
class AptObserved:
    packages: dict[str, Installed]
    files: dict[str, str | None]
    foreign_sources: list[str]       # other sources on the host (exclusive_sources blanks them)
    debconf: dict[str, str]          # question -> current answer
    debconf_types: dict[str, str]    # question -> template type
    run: AptRun
    planned: list[tuple[Transaction, list[Step], dict[str, str]]] = field(default_factory=list)
    deferred: list[Package] = field(default_factory=list)
    reboot_required: str | None = None
    services: dict[str, list[str]] = field(default_factory=dict)  # package -> its units


def package_services(listing: str | None) -> list[str]:
    """The service units a package ships (its dpkg `.list`), templates excepted: the ones
    its maintainer scripts restart on upgrade and stop on removal."""
    units = set()
    for line in (listing or "").splitlines():
        if line.startswith(UNIT_DIRS) and line.endswith(".service"):
            unit = line.rsplit("/", 1)[-1]
            if "@" not in unit:
                units.add(unit)
    return sorted(units)


def package_disruption(op: str, name: str, services: dict[str, list[str]]) -> str:
    """What one package step costs the node: a kernel or microcode only takes effect after a
    reboot; upgrading, downgrading, reconfiguring or removing an installed package restarts
    (or stops) the services it ships; a fresh install starts what was not running."""
    if REBOOT_PACKAGES.match(name):
        return REBOOT
    if op == "install":
        return NONE
    return restart(*services.get(name, []))


def parse_dpkg_status(text: str) -> dict[str, Installed]:
    """`dpkg-query -W` output. Only unpacked-or-better packages count: `rc` is not installed."""
    out = {}
    for line in text.splitlines():
        fields = line.split("\t")
        if len(fields) != 6:
            continue
        name, version, status, essential, priority, arch = fields
        if len(status) >= 2 and status[1] not in ("n", "c"):
            out[name] = Installed(version, arch, essential == "yes", priority)
    return out


def parse_simulation(text: str) -> list[Step]:
    steps = []
    for line in text.splitlines():
        match = _SIM_LINE.match(line)
        if not match:
            continue
        op, name, old, new = match["op"], match["name"], match["old"], match["new"]
        if op == "Inst":
            steps.append(Step("upgrade" if old else "install", name, old, new))
        else:
            steps.append(Step("purge" if op == "Purg" else "remove", name, old, None))
    return steps


def parse_debconf(text: str | None, key: str = "Value") -> dict[str, str]:
    """One field of each stanza of a debconf database file, by question name."""
    values = {}
    prefix = f"{key}: "
    for stanza in (text or "").split("\n\n"):
        name = value = None
        for line in stanza.splitlines():
            if line.startswith("Name: "):
                name = line[6:]
            elif line.startswith(prefix):
                value = line[len(prefix):]
        if name is not None and value is not None:
            values[name] = value
    return values


def wanted_files(desired: AptConf | None, foreign_sources: list[str]) -> dict[str, FileSpec]:
    """Sources, keys and pins the document wants, and the foreign sources it blanks."""
    if desired is None:
        return {}
    wanted = {}
    for name, repo in sorted(desired.repositories.items()):
        wanted[sources_file(name)] = FileSpec(render_source(name, repo))
        if repo.gpgkey is not None:
            key = repo.gpgkey if repo.gpgkey.endswith("\n") else repo.gpgkey + "\n"
            wanted[keyring_file(name)] = FileSpec(key, dir_mode=0o755)
    pins = {p.name: p.version for p in desired.all_packages if p.version}
    if pins:
        wanted[PREFERENCES] = FileSpec(render_preferences(pins))
    if desired.exclusive_sources:
        for path in foreign_sources:
            wanted[path] = FileSpec(DISABLED)
    return wanted


def apt_errors(exc: CommandError) -> str:
    lines = [line for line in (exc.stderr + exc.stdout).splitlines()
             if line.startswith(("E:", "W:", "dpkg:"))]
    return "; ".join(lines) or str(exc)


class Apt(HostModule["AptConf", AptObserved]):
    name = "apt"

    # observe --------------------------------------------------------------------------------

    def observe(self, host: Host, desired: AptConf | None, record: ModuleRecord) -> AptObserved:
        packages = self._installed(host)
        foreign = self._foreign_sources(host, record)
        wanted = wanted_files(desired, foreign)
        paths = set(wanted) | set(record.owned_files) | {
            p for p in record.originals if p.startswith("/")}
        files = {path: host.read_text(path) for path in sorted(paths)}
        # Pins change candidates, not what the lists hold: only sources and keys need a refresh.
        sources_change = any(files.get(p) != spec.content for p, spec in wanted.items()
                             if p != PREFERENCES) or any(
            p not in wanted and p != PREFERENCES for p in record.owned_files)
        run = AptRun(desired.dpkg_lock_timeout if desired else 300, refresh=sources_change)
        debconf: dict[str, str] = {}
        for path in DEBCONF_DB:
            debconf.update(parse_debconf(host.read_text(path)))
        types = parse_debconf(host.read_text("/var/cache/debconf/templates.dat"), "Type")
        observed = AptObserved(packages, files, foreign, debconf, types, run,
                               reboot_required=host.read_text(REBOOT_REQUIRED))
        if desired is not None and desired.upgrade and not sources_change:
            # An upgrade is only as current as the package lists: refresh them (apt's cache
            # only) so the plan shows what the upgrade would really do.
            self._update(host, run)
        self._plan_transactions(host, desired, record, observed, sources_change)
        touched = {step.name for _, steps, _ in observed.planned for step in steps
                   if step.op != "install"}
        touched |= {pkg.name for pkg in (desired.all_packages if desired else [])
                    if pkg.debconf}
        for name in sorted(touched & set(packages)):
            arch = packages[name].arch
            listing = (host.read_text(f"{DPKG_INFO}/{name}.list")
                       or host.read_text(f"{DPKG_INFO}/{name}:{arch}.list"))
            observed.services[name] = package_services(listing)
        return observed

    def _installed(self, host: Host) -> dict[str, Installed]:
        fmt = ("${Package}\t${Version}\t${db:Status-Abbrev}\t${Essential}\t${Priority}\t"
               "${Architecture}\n")
        return parse_dpkg_status(host.run(["dpkg-query", "-W", "-f", fmt]).stdout)

    @staticmethod
    def _foreign_sources(host: Host, record: ModuleRecord) -> list[str]:
        paths = [SOURCES_LIST]
        paths += [f"{SOURCES_DIR}/{name}" for name in host.listdir(SOURCES_DIR)
                  if name.endswith((".list", ".sources")) and not name.startswith("divingbell-")]
        # A source divingbell blanked stays foreign: it has an original to give back.
        return [p for p in paths if host.exists(p) or record.owns(p)]

    def _plan_transactions(self, host: Host, desired: AptConf | None, record: ModuleRecord,
                           observed: AptObserved, sources_change: bool) -> None:
        packages = observed.packages
        requested = {p.name: p for p in (desired.all_packages if desired else [])}
        owned = set(record.state.get("installed", []))
        run = observed.run
        purged: set[str] = set()
        if desired is not None:
            purge = sorted(n for n in desired.blacklistpkgs if n in packages)
            if purge:
                tx = Transaction(self._argv("purge", purge), run)
                steps = self._simulate(host, tx, run, sources_change)
                if steps is None:
                    raise ModuleError(self.name, [f"apt cannot purge {', '.join(purge)}"])
                self._check_removals(steps, set(purge), requested, desired, only_kept=True)
                purged = {s.name for s in steps}
                tx.removes = sorted(purged)
                reasons = {n: "blacklisted: purged" for n in purge}
                observed.planned.append((tx, steps, reasons | {
                    n: f"depends on blacklisted {', '.join(purge)}" for n in purged - set(purge)}))
        leaving = sorted(n for n in owned - set(requested) - purged if n in packages)
        why: dict[str, str] = {n: "left the document (divingbell installed it)" for n in leaving}
        removals = list(leaving)
        if leaving:
            keep = set(requested) | set(desired.whitelistpkgs if desired else []) | PROTECTED
            for name in self._orphaned_by(host, leaving, sources_change):
                if name not in keep and name not in purged:
                    removals.append(name)
                    why[name] = (f"installed automatically for {', '.join(leaving)}; no longer "
                                 "needed by anything (what apt autoremove would remove)")
        if desired is not None and desired.strict:
            for name in self._strict_garbage(host, desired, packages):
                if name not in why and name not in purged:
                    removals.append(name)
                    why[name] = "strict: neither requested nor whitelisted"
        installs: list[str] = []
        fresh: list[str] = []
        downgrades: set[str] = set()
        for name, pkg in sorted(requested.items()):
            have = packages.get(name)
            if have is None:
                installs.append(f"{name}={pkg.version}" if pkg.version else name)
                fresh.append(name)
                why[name] = "requested" + (f" at {pkg.version}" if pkg.version else "")
            elif pkg.version and not self._same_version(host, have.version, pkg.version):
                if self._older(host, pkg.version, have.version):
                    allowed = pkg.allow_downgrade if pkg.allow_downgrade is not None else (
                        desired is not None and desired.allow_downgrade)
                    if not allowed:
                        raise ModuleError(self.name, [
                            f"{name}: pinned {pkg.version} is older than the installed "
                            f"{have.version}; set allow_downgrade: true to downgrade"])
                    downgrades.add(name)
                installs.append(f"{name}={pkg.version}")
                why[name] = f"pinned at {pkg.version}"
        if installs or removals:
            tx = Transaction(self._argv("install", installs + [f"{n}-" for n in removals]), run,
                             allow_downgrade=bool(downgrades), downgrades=downgrades,
                             installs=fresh, removes=leaving)
            steps = self._simulate(host, tx, run, sources_change)
            if steps is None:
                observed.deferred = [requested[n] for n in fresh]
                steps = []
            else:
                self._check_removals(steps, set(removals), requested, desired)
            observed.planned.append((tx, steps, why))
        if desired is not None and desired.upgrade:
            tx = Transaction(self._argv("dist-upgrade", []), run)
            steps = self._simulate(host, tx, run, sources_change)
            pinned = {p.name for p in requested.values() if p.version}
            if steps is None:
                steps = [Step("upgrade", "(all)", None, None)]
            steps = [s for s in steps if s.name not in pinned]
            if steps:
                observed.planned.append((tx, steps, {}))

    @staticmethod
    def _argv(verb: str, args: list[str]) -> list[str]:
        return ["apt-get", "-q", verb, *args]

    def _simulate(self, host: Host, tx: Transaction, run: AptRun, sources_change: bool
                  ) -> list[Step] | None:
        """apt's own answer to what `tx` would do; None when it needs lists not fetched yet."""
        argv = [*tx.argv[:2], "-s", "-o", "Debug::NoLocking=true", *tx.argv[2:]]
        if tx.allow_downgrade:
            argv.insert(2, "--allow-downgrades")
        while True:
            try:
                return parse_simulation(host.run(argv, env=APT_ENV).stdout)
            except CommandError as exc:
                if sources_change:
                    return None  # the lists that can answer are fetched at apply time
                unknown = "Unable to locate" in exc.stderr or "was not found" in exc.stderr
                if unknown and not run.refreshed:
                    self._update(host, run)  # stale lists: refresh once and ask again
                    continue
                raise ModuleError(self.name, [f"apt cannot resolve `{' '.join(tx.argv[2:])}`: "
                                              f"{apt_errors(exc)}"]) from None

    def _orphaned_by(self, host: Host, leaving: list[str], sources_change: bool) -> list[str]:
        """Packages apt marks auto-installed that removing `leaving` makes unneeded: apt's
        autoremove after the removal, minus what autoremove would take already (garbage that is
        not this removal's doing stays for the operator's own `apt autoremove`)."""
        simulate = ["apt-get", "-q", "-s", "-o", "Debug::NoLocking=true"]
        try:
            now = host.run([*simulate, "autoremove"], env=APT_ENV).stdout
            plain = host.run([*simulate, "remove", *leaving], env=APT_ENV).stdout
            after = host.run([*simulate, "-o", "APT::Get::AutomaticRemove=true", "remove",
                              *leaving], env=APT_ENV).stdout
        except CommandError as exc:
            if sources_change:
                return []  # lists not fetched yet: the next apply finds them
            raise ModuleError(self.name, [f"apt cannot work out what removing "
                                          f"{', '.join(leaving)} leaves unneeded: "
                                          f"{apt_errors(exc)}"]) from None
        def removed(text: str) -> set[str]:
            return {s.name for s in parse_simulation(text) if s.op in ("remove", "purge")}

        # Dependents the removal itself takes are not orphans: _check_removals judges those.
        return sorted(removed(after) - removed(plain) - removed(now) - set(leaving))

    def _strict_garbage(self, host: Host, desired: AptConf,
                        packages: dict[str, Installed]) -> list[str]:
        """What `strict` removes: `apt autoremove` on a scratch copy of apt's auto/manual marks
        in which only requested, whitelisted, essential, required and protected packages are
        manual. apt keeps whatever those depend on."""
        keep = ({p.name for p in desired.all_packages} | set(desired.whitelistpkgs) | PROTECTED)
        native = host.run(["dpkg", "--print-architecture"]).stdout.strip()
        stanzas = []
        for name, pkg in sorted(packages.items()):
            manual = name in keep or pkg.essential or pkg.priority == "required"
            arch = native if pkg.arch == "all" else pkg.arch
            stanzas.append(f"Package: {name}\nArchitecture: {arch}\n"
                           f"Auto-Installed: {0 if manual else 1}\n")
        host.write_atomic(STRICT_STATES, "\n".join(stanzas), 0o600, dir_mode=0o700)
        try:
            out = host.run(["apt-get", "-q", "-s", "-o", "Debug::NoLocking=true", "-o",
                            f"Dir::State::extended_states={STRICT_STATES}", "autoremove"],
                           env=APT_ENV).stdout
        except CommandError as exc:
            raise ModuleError(self.name, [f"strict: apt cannot work out what to remove: "
                                          f"{apt_errors(exc)}"]) from None
        finally:
            host.remove(STRICT_STATES)
        return [s.name for s in parse_simulation(out) if s.op in ("remove", "purge")]

    def _check_removals(self, steps: list[Step], asked: set[str],
                        requested: dict[str, Package], desired: AptConf | None,
                        *, only_kept: bool = False) -> None:
        """Refuse a removal that takes more with it than asked: anything at all, or (for a
        blacklist, whose dependents must go) anything the document keeps."""
        keep = set(requested) | set(desired.whitelistpkgs if desired else []) | PROTECTED
        extra = sorted(s.name for s in steps if s.op in ("remove", "purge")
                       and s.name not in asked)
        if only_kept:
            extra = [n for n in extra if n in keep]
        if extra:
            kept = [n for n in extra if n in keep]
            raise ModuleError(self.name, [
                f"removing {', '.join(sorted(asked))} would make apt also remove "
                f"{', '.join(extra)}" + (f" (of which {', '.join(kept)} must stay)" if kept
                                         else "") + "; refusing: remove those explicitly first"])

    def _same_version(self, host: Host, a: str, b: str) -> bool:
        return a == b or host.run(["dpkg", "--compare-versions", a, "eq", b],
                                  ok_codes=(0, 1)).returncode == 0

    def _older(self, host: Host, a: str, b: str) -> bool:
        return host.run(["dpkg", "--compare-versions", a, "lt", b],
                        ok_codes=(0, 1)).returncode == 0

    # plan -----------------------------------------------------------------------------------

    def plan(self, desired: AptConf | None, observed: AptObserved, record: ModuleRecord
             ) -> list[Change]:
        changes = self._plan_files(desired, observed, record)
        if observed.run.refresh:
            changes.append(Change(self.name, "package lists", Action.SET, "cached", "refreshed",
                                  "sources changed: apt-get update", payload=observed.run))
        changes += self._plan_debconf(desired, observed, record)
        for tx, steps, why in observed.planned:
            for step in steps:
                changes.append(self._package_change(tx, step, why, observed))
            if not steps and tx.argv[2] == "install":
                for pkg in observed.deferred:
                    changes.append(Change(
                        self.name, f"package {pkg.name}", Action.SET, "absent",
                        pkg.version or "candidate",
                        "requested; resolved once the package lists are refreshed from the "
                        "changed sources", payload=tx))
        if desired is not None and desired.upgrade and observed.reboot_required is not None:
            changes.append(Change(self.name, "reboot", Action.NOOP, None, None,
                                  "the host already needs a reboot (/run/reboot-required)",
                                  disruption=REBOOT))
        return changes

    def _plan_files(self, desired: AptConf | None, observed: AptObserved, record: ModuleRecord
                    ) -> list[Change]:
        return plan_files(self.name, wanted_files(desired, observed.foreign_sources),
                          observed.files, record, _describe)

    def _plan_debconf(self, desired: AptConf | None, observed: AptObserved,
                      record: ModuleRecord) -> list[Change]:
        changes = []
        wanted: dict[str, DebconfStep] = {}
        for pkg in desired.all_packages if desired else []:
            for answer in pkg.debconf:
                wanted[answer.question] = DebconfStep(pkg.name, answer.question,
                                                      answer.question_type, answer.answer)
        reconfigure = set()
        for question, step in sorted(wanted.items()):
            secret = step.qtype == "password"
            change = converge(self.name, f"debconf {question}", observed.debconf.get(question),
                              step.value, record, payload=step, sensitive=secret)
            if secret:
                change = _no_capture(change)
            changes.append(change)
            if change.action is Action.SET and step.owner in observed.packages:
                reconfigure.add(step.owner)
        for target in left_the_document(record, {f"debconf {q}" for q in wanted}):
            question = target.removeprefix("debconf ")
            original = record.originals.get(target)
            qtype = observed.debconf_types.get(question, "string")
            changes.append(restore(self.name, target, observed.debconf.get(question), original,
                                   payload=DebconfStep(question.split("/")[0], question, qtype,
                                                       original or "")))
        for name in sorted(reconfigure):
            changes.append(Change(self.name, f"package {name}", Action.SET, "configured",
                                  "reconfigured", "its debconf answers changed: "
                                  "dpkg-reconfigure", payload=Reconfigure(name),
                                  disruption=restart(*observed.services.get(name, []))))
        return changes

    def _package_change(self, tx: Transaction, step: Step, why: dict[str, str],
                        observed: AptObserved) -> Change:
        target = f"package {step.name}"
        if step.op in ("remove", "purge"):
            return Change(self.name, target, Action.DELETE, step.old, None,
                          why.get(step.name, f"{step.op}d by apt along with the rest"),
                          payload=tx,
                          disruption=package_disruption(step.op, step.name, observed.services))
        op = "downgrade" if step.name in tx.downgrades else step.op
        default = {"install": "dependency of the requested packages",
                   "upgrade": "upgrade" if tx.argv[2] == "dist-upgrade" else "dependency upgrade",
                   "downgrade": "downgrade"}[op]
        # An upgrade apt could not list yet (its lists come with the apply) may hold a kernel.
        disruption = (REBOOT if step.name == "(all)"
                      else package_disruption(op, step.name, observed.services))
        return Change(self.name, target, Action.SET, step.old or "absent", step.new,
                      why.get(step.name, default), payload=tx, disruption=disruption)

    # apply ----------------------------------------------------------------------------------

    def apply_setting(self, host: Host, change: Change, record: ModuleRecord) -> list[str]:
        payload = change.payload
        if isinstance(payload, DebconfStep):
            self._preseed(host, payload)
            return []
        if isinstance(payload, AptRun):
            if not payload.refreshed:
                self._update(host, payload)
            return []
        if isinstance(payload, Reconfigure):
            self._apt(host, ["dpkg-reconfigure", "-f", "noninteractive", payload.package], 300)
            return []
        tx: Transaction = payload
        if tx.done:
            return []
        return self._run_transaction(host, tx, record)

    def _run_transaction(self, host: Host, tx: Transaction, record: ModuleRecord) -> list[str]:
        run = tx.run
        if run.refresh and not run.refreshed:
            self._update(host, run)
        argv = [*tx.argv[:2], "-y", "-o", f"DPkg::Lock::Timeout={run.lock_timeout}",
                *DPKG_OPTIONS, *tx.argv[2:]]
        if tx.allow_downgrade:
            argv.insert(2, "--allow-downgrades")
        tx.done = True
        self._apt(host, argv, run.lock_timeout)
        owned = set(record.state.get("installed", []))
        record.state["installed"] = sorted((owned | set(tx.installs)) - set(tx.removes))
        notes = []
        if tx.argv[2] == "dist-upgrade":
            needs = host.read_text(REBOOT_REQUIRED)
            if needs is not None:
                pkgs = (host.read_text(REBOOT_REQUIRED + ".pkgs") or "").split()
                notes.append("the host needs a reboot (/run/reboot-required)"
                             + (f" for {', '.join(sorted(set(pkgs)))}" if pkgs else ""))
        return notes

    def _update(self, host: Host, run: AptRun) -> None:
        self._apt(host, ["apt-get", "-q", "update", "--error-on=any", "-o",
                         f"DPkg::Lock::Timeout={run.lock_timeout}"], run.lock_timeout)
        run.refreshed = True

    def _apt(self, host: Host, argv: list[str], lock_timeout: int) -> None:
        try:
            host.run(argv, env=APT_ENV)
        except CommandError as exc:
            text = exc.stderr + exc.stdout
            if "Could not get lock" in text:
                held = next((line for line in text.splitlines() if "held by" in line), "")
                raise ModuleError(self.name, [
                    f"the dpkg lock is busy{': ' + held.strip() if held else ''} "
                    f"(waited {lock_timeout}s, apt.dpkg_lock_timeout); "
                    "nothing was changed by this transaction"]) from None
            raise ModuleError(self.name, [f"`{' '.join(argv)}` failed: {apt_errors(exc)}"]
                              ) from None

    def _preseed(self, host: Host, step: DebconfStep) -> None:
        host.run(["debconf-set-selections"],
                 input_text=f"{step.owner} {step.question} {step.qtype} {step.value}\n")

    def undo_setting(self, host: Host, change: Change) -> None:
        payload = change.payload
        if isinstance(payload, DebconfStep) and change.before is not None:
            self._preseed(host, DebconfStep(payload.owner, payload.question, payload.qtype,
                                            change.before))
            return
        if isinstance(payload, Transaction):
            tx = payload
            if tx.done and not tx.reported_undo:
                tx.reported_undo = True
                raise ModuleError(self.name, [
                    f"apt has no rollback: `{' '.join(tx.argv[2:])}` stays done"])


def _no_capture(change: Change) -> Change:
    return replace(change, capture_original=False)


def _describe(content: str) -> str:
    for line in content.splitlines():
        if line.startswith("URIs: "):
            return line[6:]
    lines = [line for line in content.splitlines() if line and not line.startswith("#")]
    if not lines:
        return "disabled" if content.startswith(DISABLED[:20]) else "empty"
    if lines[0].startswith("-----BEGIN PGP"):
        return "public key"
    return f"{len(lines)} lines"

