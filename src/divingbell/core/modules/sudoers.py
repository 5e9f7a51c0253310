"""Who can become root through sudo: the sudoers tree read the way sudo reads it.

`/etc/sudoers` and everything it includes (`@include`, `@includedir`, and the older
`#include`/`#includedir`; in an included directory, names ending in `~` or containing a `.` are
skipped, as sudo does), with line continuations, comments, and User_, Runas_ and Cmnd_ aliases.
A rule grants root when its users match the account (by name, `#uid`, `%group` including the
account's primary group, `ALL`, or an alias of these; `!` excludes), it may run as root
(`(ALL)`, `(root)`, `(ALL:ALL)`, or no runas list at all) and its commands include `ALL`.
A rule for specific commands is not counted: the lock-out guard must not be satisfied by a rule
that may not give a shell. Host lists are taken as matching (a node's name may change).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

SUDOERS = "/etc/sudoers"
MAX_DEPTH = 8  # sudo's own include limit is 128; a deeper tree here is a loop
_ALIAS_KINDS = {"User_Alias": "user", "Runas_Alias": "runas", "Host_Alias": "host",
                "Cmnd_Alias": "cmnd", "Cmd_Alias": "cmnd"}
_TAG = re.compile(r"^\s*([A-Z_]+)\s*:(?!=)")


@dataclass
class Rule:
    users: list[str]
    runas: list[str] | None   # None: no runas list, root by default
    commands: list[str]


@dataclass
class Sudoers:
    rules: list[Rule] = field(default_factory=list)
    aliases: dict[str, dict[str, list[str]]] = field(
        default_factory=lambda: {"user": {}, "runas": {}, "host": {}, "cmnd": {}})
    files: list[str] = field(default_factory=list)

    def root_users(self, accounts: dict[str, tuple[int, int]],
                   groups: dict[str, tuple[int, set[str]]]) -> set[str]:
        """Accounts (name -> uid, gid) that some rule lets run any command as root.
        `groups`: name -> (gid, members)."""
        gid_names = {gid: name for name, (gid, _) in groups.items()}
        out = set()
        for name, (uid, gid) in accounts.items():
            member_of = {g for g, (_, members) in groups.items() if name in members}
            if gid in gid_names:
                member_of.add(gid_names[gid])
            for rule in self.rules:
                if (self._matches(rule.users, "user", name, uid, member_of)
                        and self._runs_as_root(rule) and self._all_commands(rule.commands)):
                    out.add(name)
                    break
        return out

    def _expand(self, items: list[str], kind: str, depth: int = 0) -> list[str]:
        out: list[str] = []
        for item in items:
            negated = item.startswith("!")
            bare = item.lstrip("!").strip()
            alias = self.aliases[kind].get(bare)
            if alias is not None and depth < MAX_DEPTH:
                expanded = self._expand(alias, kind, depth + 1)
                out.extend(("!" + e if negated and not e.startswith("!") else e)
                           for e in expanded)
            else:
                out.append(("!" if negated else "") + bare)
        return out

    def _matches(self, items: list[str], kind: str, name: str, uid: int,
                 member_of: set[str]) -> bool:
        matched = False
        for item in self._expand(items, kind):
            negated = item.startswith("!")
            bare = item.lstrip("!")
            hit = bare in ("ALL", name, f"#{uid}") or (
                bare.startswith("%") and bare[1:].lstrip(":") in member_of)
            if hit:
                matched = not negated  # sudo: the last match wins
        return matched

    def _runs_as_root(self, rule: Rule) -> bool:
        if rule.runas is None:
            return True
        users = rule.runas[0].split(":", 1)[0].split(",") if rule.runas else []
        items = [u.strip() for u in users if u.strip()]
        if not items:
            return False  # (:group) only: runs as the invoking user
        return self._matches(items, "runas", "root", 0, {"root"})

    def _all_commands(self, commands: list[str]) -> bool:
        allowed = False
        for item in self._expand(commands, "cmnd"):
            negated = item.startswith("!")
            if item.lstrip("!").strip() == "ALL":
                allowed = not negated
        return allowed


def logical_lines(text: str) -> list[str]:
    lines, pending = [], ""
    for raw in text.splitlines():
        if raw.endswith("\\"):
            pending += raw[:-1] + " "
            continue
        lines.append(pending + raw)
        pending = ""
    if pending:
        lines.append(pending)
    return lines


def _split_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_tree(read: Callable[[str], str | None], listdir: Callable[[str], list[str]],
               path: str = SUDOERS) -> Sudoers:
    """Parse `path` and what it includes. `read` returns a file's text (None: absent)."""
    result = Sudoers()
    _parse_file(read, listdir, path, result, 0, set())
    return result


def _parse_file(read: Callable[[str], str | None], listdir: Callable[[str], list[str]],
                path: str, result: Sudoers, depth: int, seen: set[str]) -> None:
    if depth > MAX_DEPTH or path in seen:
        return
    seen.add(path)
    text = read(path)
    if text is None:
        return
    result.files.append(path)
    base = path.rsplit("/", 1)[0] or "/"
    for line in logical_lines(text):
        stripped = line.strip()
        directive = re.match(r"^[@#](include|includedir)\s+(\S+)", stripped)
        if directive:
            target = directive.group(2)
            target = target if target.startswith("/") else f"{base}/{target}"
            if directive.group(1) == "include":
                _parse_file(read, listdir, target, result, depth + 1, seen)
            else:
                for name in sorted(listdir(target)):
                    if name.endswith("~") or "." in name:
                        continue
                    _parse_file(read, listdir, f"{target.rstrip('/')}/{name}", result,
                                depth + 1, seen)
            continue
        if stripped.startswith("#") and not re.match(r"^#\d", stripped):
            continue
        stripped = re.sub(r"(?<!\\)#(?!\d).*$", "", stripped).strip()
        if not stripped or stripped.startswith("Defaults"):
            continue
        keyword = stripped.split(None, 1)[0]
        if keyword in _ALIAS_KINDS:
            for definition in stripped[len(keyword):].split(":"):
                alias, sep, members = definition.partition("=")
                if sep:
                    result.aliases[_ALIAS_KINDS[keyword]][alias.strip()] = _split_list(members)
            continue
        _parse_rule(stripped, result)


def _parse_rule(line: str, result: Sudoers) -> None:
    left, sep, right = line.partition("=")
    if not sep:
        return
    left = re.sub(r"\s*,\s*", ",", left.strip())
    parts = left.split()
    if len(parts) < 2:
        return
    users = _split_list(parts[0])
    # `host = cmnds : host = cmnds`: each host section after a `:` that has its own `=`.
    for section in _host_sections(right):
        runas: list[str] | None = None
        rest = section.strip()
        match = re.match(r"^\(([^)]*)\)\s*", rest)
        if match:
            runas = [match.group(1)]
            rest = rest[match.end():]
        while True:
            tag = _TAG.match(rest)
            if not tag:
                break
            rest = rest[tag.end():]
        result.rules.append(Rule(users, runas, _split_list(rest)))


def _host_sections(right: str) -> list[str]:
    """The command specs of `h1 = A : h2 = B` (the first host list was before the `=`)."""
    sections = [right]
    while True:
        match = re.search(r":\s*[A-Za-z0-9_.,!\s-]+?\s*=(?!=)", sections[-1])
        if not match or _TAG.match(sections[-1][max(0, match.start() - 20):match.start() + 1]):
            break
        head, tail = sections[-1][:match.start()], sections[-1][match.end():]
        sections[-1] = head
        sections.append(tail)
    return sections
