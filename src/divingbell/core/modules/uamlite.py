"""uamlite: local accounts, their SSH keys and sudo, without locking anyone out.

- Missing users are created with a home and a login shell. A user removed from the document is
  expired (no login; files and UID kept, so re-adding it gives the same account back) and loses
  its sudoers file; with purge_expired_users it is deleted with its home.
- Accounts divingbell did not create (root, the image's own users) are never expired or
  deleted; if the document names them, their keys and sudo are managed and restored when they
  leave the document.
- A sudoers file is checked with `visudo -c` before it is installed.
- A document that would leave the host with no way in (no account with an SSH key plus sudo,
  or root with a key) that it had before is refused unless `allow_lockout: true`.
- Password hashes go to chpasswd on stdin, never argv; plans show them as (sensitive). A
  password divingbell set that leaves the document is locked (the hash is replaced by `!`),
  so password login stops; the plan says so.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from divingbell.core.document.keys import CRYPT_PREFIXES
from divingbell.core.engine.change import Action, Change
from divingbell.core.engine.files import FileChange, FileSpec, plan_file
from divingbell.core.engine.journal import MANAGED_LINE, ModuleRecord
from divingbell.core.errors import CommandError, ModuleError
from divingbell.core.host import Host, UserDir
from divingbell.core.modules.base import HostModule
from divingbell.core.modules.sudoers import parse_tree

if TYPE_CHECKING:
    from divingbell.core.modules.uamlite_schema import UamliteConf, User

SUDOERS_DIR = "/etc/sudoers.d"
HEADER = MANAGED_LINE + "\n"


def sudoers_file(user: str) -> str:
    return f"{SUDOERS_DIR}/divingbell-{user}"


def sudoers_content(user: str) -> str:
    return f"{HEADER}{user} ALL=(ALL:ALL) NOPASSWD: ALL\n"


def keys_content(keys: list[str]) -> str:
    return HEADER + "".join(f"{key}\n" for key in keys)


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int
    home: str
    expired: bool
    password_digest: str  # sha256 of the hash field: compared, never shown or stored raw
    has_password: bool = False  # a usable crypt hash (not locked, not empty)

    @property
    def password_usable(self) -> bool:
        return self.has_password


@dataclass
class UamliteObserved:
    accounts: dict[str, Account]
    groups: dict[str, set[str]]           # group -> members
    files: dict[str, str | None]          # sudoers and authorized_keys paths -> content
    keys_owner: dict[str, tuple[int, int]] = field(default_factory=dict)
    keys_user: dict[str, tuple[str, str]] = field(default_factory=dict)  # path -> user, home
    sudoers: dict[str, str] = field(default_factory=dict)  # the whole sudoers tree, by path
    group_ids: dict[str, int] = field(default_factory=dict)
    unsafe: dict[str, str] = field(default_factory=dict)  # keys path -> why it is refused


@dataclass(frozen=True)
class AccountStep:
    """Payload of a change to an account itself."""

    user: str
    op: str  # create | unexpire | expire | purge | password | lock
    secret: str | None = None


def parse_passwd(text: str | None) -> dict[str, tuple[int, int, str]]:
    out = {}
    for line in (text or "").splitlines():
        fields = line.split(":")
        if len(fields) >= 7 and fields[2].isdigit() and fields[3].isdigit():
            out[fields[0]] = (int(fields[2]), int(fields[3]), fields[5])
    return out


def parse_shadow(text: str | None, today: int) -> dict[str, tuple[bool, str, bool]]:
    """user -> (expired, sha256 of the password field, has a usable password)."""
    out = {}
    for line in (text or "").splitlines():
        fields = line.split(":")
        if len(fields) >= 8:
            expire = fields[7]
            expired = expire.isdigit() and int(expire) <= today
            usable = fields[1].startswith(CRYPT_PREFIXES)
            out[fields[0]] = (expired, hashlib.sha256(fields[1].encode()).hexdigest(), usable)
    return out


def parse_group_ids(text: str | None) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in (text or "").splitlines():
        fields = line.split(":")
        if len(fields) >= 4 and fields[2].isdigit():
            out.setdefault(fields[0], int(fields[2]))
    return out


def parse_groups(text: str | None) -> dict[str, set[str]]:
    out = {}
    for line in (text or "").splitlines():
        fields = line.split(":")
        if len(fields) >= 4:
            out[fields[0]] = {m for m in fields[3].split(",") if m}
    return out


class Uamlite(HostModule["UamliteConf", UamliteObserved]):
    name = "uamlite"

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._now = clock

    def observe(self, host: Host, desired: UamliteConf | None, record: ModuleRecord
                ) -> UamliteObserved:
        today = int(self._now() // 86400)
        passwd = parse_passwd(host.read_text("/etc/passwd"))
        shadow = parse_shadow(host.read_text("/etc/shadow"), today)
        accounts = {
            name: Account(name, uid, gid, home, *shadow.get(name, (False, "", False)))
            for name, (uid, gid, home) in passwd.items()
        }
        files: dict[str, str | None] = {}
        keys_owner: dict[str, tuple[int, int]] = {}
        keys_user: dict[str, tuple[str, str]] = {}
        unsafe: dict[str, str] = {}
        for name, account in accounts.items():
            keys = f"{account.home.rstrip('/')}/.ssh/authorized_keys"
            keys_owner[keys] = (account.uid, account.gid)
            keys_user[keys] = (name, account.home)
            try:
                # The user controls their home: read it as sshd's StrictModes would trust it.
                files[keys] = host.read_text(keys, user_dir=UserDir(
                    account.home, account.uid, account.gid))
            except (OSError, ValueError) as exc:
                files[keys] = None
                unsafe[keys] = str(exc)
            files[sudoers_file(name)] = host.read_text(sudoers_file(name))
        for path in record.owned_files:
            if path not in files:
                files[path] = host.read_text(path)
        sudoers: dict[str, str] = {}

        def read_sudoers(path: str) -> str | None:
            text = host.read_text(path)
            if text is not None:
                sudoers[path] = text
            return text

        parse_tree(read_sudoers, host.listdir)
        if desired is not None:
            problems = []
            for user in desired.users:
                # A file already installed with this content passed visudo when it was written.
                content = sudoers_content(user.user_name)
                if user.user_sudo and files.get(sudoers_file(user.user_name)) != content:
                    try:
                        host.run(["visudo", "-c", "-q", "-f", "-"], input_text=content)
                    except CommandError as exc:
                        problems.append(f"{user.user_name}: visudo rejects its sudoers entry: "
                                        f"{exc.stderr.strip() or exc}")
            for user in desired.users:
                path = keys_file_of(accounts.get(user.user_name), user.user_name)
                managed = (user.user_sshkeys is not None
                           and "user_sshkeys" in user.model_fields_set)
                if path in unsafe and (managed or record.owns(path)):
                    problems.append(f"{user.user_name}: {unsafe[path]}")
            if problems:
                raise ModuleError(self.name, problems)
        group_text = host.read_text("/etc/group")
        return UamliteObserved(accounts, parse_groups(group_text), files, keys_owner,
                               keys_user, sudoers, parse_group_ids(group_text), unsafe)

    def plan(self, desired: UamliteConf | None, observed: UamliteObserved, record: ModuleRecord
             ) -> list[Change]:
        users = {u.user_name: u for u in (desired.users if desired else [])}
        created = set(record.state.get("created", []))
        changes: list[Change] = []
        for _, user in sorted(users.items()):
            changes.extend(self._plan_user(user, observed, record, created))
        for name in sorted(created - set(users)):
            account = observed.accounts.get(name)
            if account is None:
                continue
            if desired is not None and desired.purge_expired_users:
                changes.append(Change(self.name, f"user {name}", Action.DELETE, "exists", None,
                                      "left the document; purge_expired_users deletes it and "
                                      "its home", payload=AccountStep(name, "purge")))
            elif not account.expired:
                changes.append(Change(self.name, f"user {name}", Action.SET, "active", "expired",
                                      "left the document; expired (files and UID kept)",
                                      payload=AccountStep(name, "expire")))
        managed = {p for p in record.owned_files}
        wanted_files = self._wanted_files(users, observed)
        unmanaged = {keys_file(observed, u.user_name) for u in users.values()
                     if u.user_sshkeys is None}
        for path in sorted((managed - set(wanted_files)) & unmanaged):
            changes.append(Change(self.name, path, Action.NOOP, None, None,
                                  "keys are [Unmanaged] now: left as they are, no longer owned",
                                  forget=True, payload=FileChange(None, None, own=False)))
        for path in sorted(managed - set(wanted_files) - unmanaged):
            owner = observed.keys_owner.get(path)
            user_home = observed.keys_user.get(path)
            restore = (FileSpec("", 0o600, owner, owner_user=user_home[0], user_dir=user_home[1])
                       if owner and user_home else FileSpec("", 0o600, owner) if owner
                       else FileSpec("", 0o440))
            change = plan_file(self.name, path, None, observed.files.get(path), record,
                               restore_as=restore)
            if change is not None:
                changes.append(change)
        self._check_lockout(desired, observed, changes)
        return changes

    def _plan_user(self, user: User, observed: UamliteObserved, record: ModuleRecord,
                   created: set[str]) -> list[Change]:
        name = user.user_name
        account = observed.accounts.get(name)
        changes = []
        if account is None:
            changes.append(Change(self.name, f"user {name}", Action.SET, "absent", "active",
                                  "create with a home and /bin/bash",
                                  payload=AccountStep(name, "create")))
        elif account.expired and name in created:
            changes.append(Change(self.name, f"user {name}", Action.SET, "expired", "active",
                                  "back in the document; unexpire (same UID and home)",
                                  payload=AccountStep(name, "unexpire")))
        secret = user.user_crypt_passwd.get_secret_value() if user.user_crypt_passwd else None
        if secret is not None:
            digest = hashlib.sha256(secret.encode()).hexdigest()
            if account is None or account.password_digest != digest:
                changes.append(Change(self.name, f"user {name} password", Action.SET,
                                      "other", "set", "set the password hash", sensitive=True,
                                      payload=AccountStep(name, "password", secret)))
        elif (account is not None and account.password_usable
              and name in record.state.get("passwords", [])):
            changes.append(Change(self.name, f"user {name} password", Action.SET, "set",
                                  "locked", "user_crypt_passwd left the document: the password "
                                  "is locked (hash replaced by !), password login stops",
                                  payload=AccountStep(name, "lock")))
        for path, spec in self._files_for(user, observed).items():
            change = plan_file(self.name, path, spec, observed.files.get(path), record,
                               _describe, restore_as=replace(spec, content=""))
            if change is not None:
                changes.append(change)
        return changes

    def _wanted_files(self, users: dict[str, User], observed: UamliteObserved
                      ) -> dict[str, FileSpec]:
        wanted: dict[str, FileSpec] = {}
        for user in users.values():
            wanted.update(self._files_for(user, observed))
        return wanted

    @staticmethod
    def _files_for(user: User, observed: UamliteObserved) -> dict[str, FileSpec]:
        name = user.user_name
        files: dict[str, FileSpec] = {}
        if user.user_sudo:
            files[sudoers_file(name)] = FileSpec(sudoers_content(name), 0o440)
        # None: [Unmanaged]. Not given at all (a user named only for its password or sudo):
        # divingbell does not take the keys over, and lets go of a keys file it had.
        if user.user_sshkeys is not None and "user_sshkeys" in user.model_fields_set:
            account = observed.accounts.get(name)
            files[keys_file(observed, name)] = FileSpec(
                keys_content(user.user_sshkeys), 0o600, dir_mode=0o700, owner_user=name,
                user_dir=account.home if account else f"/home/{name}")
        return files

    def _check_lockout(self, desired: UamliteConf | None, observed: UamliteObserved,
                       changes: list[Change]) -> None:
        if desired is not None and desired.allow_lockout:
            return
        before = ways_in(observed, {})
        after = ways_in(observed, {c.target: c for c in changes})
        if before and not after:
            raise ModuleError(self.name, [
                "this document would leave no way in: no account would keep both a way to log "
                "in (an SSH key or a password) and root (uid 0, or sudo to ALL commands "
                f"through the sudoers tree) (today: {', '.join(sorted(before))}). Add one, or "
                "set uamlite.allow_lockout: true if that is really intended"])

    def apply_setting(self, host: Host, change: Change, record: ModuleRecord) -> None:
        step: AccountStep = change.payload
        if step.op == "create":
            # Recorded before useradd runs: killed right after it, the journal still knows
            # divingbell made this account (and a later removal expires or purges it).
            record.state["created"] = sorted({*record.state.get("created", []), step.user})
            record.save_intent()
            host.run(["useradd", "--create-home", "--shell", "/bin/bash", step.user])
        elif step.op == "unexpire":
            host.run(["usermod", "--expiredate", "", step.user])
        elif step.op == "expire":
            host.run(["usermod", "--expiredate", "1", step.user])
        elif step.op == "purge":
            host.run(["userdel", "--remove", step.user], ok_codes=(0, 12))
            record.state["created"] = [u for u in record.state.get("created", [])
                                       if u != step.user]
        elif step.op == "password":
            host.run(["chpasswd", "--encrypted"], input_text=f"{step.user}:{step.secret}\n")
            record.state["passwords"] = sorted({*record.state.get("passwords", []), step.user})
        elif step.op == "lock":
            host.run(["usermod", "--password", "!", step.user])
            record.state["passwords"] = [u for u in record.state.get("passwords", [])
                                         if u != step.user]

    def undo_setting(self, host: Host, change: Change) -> None:
        step: AccountStep = change.payload
        if step.op == "create":
            host.run(["userdel", "--remove", step.user], ok_codes=(0, 12))
        elif step.op == "expire":
            host.run(["usermod", "--expiredate", "", step.user])
        elif step.op == "unexpire":
            host.run(["usermod", "--expiredate", "1", step.user])


def _describe(content: str) -> str:
    lines = [line for line in content.splitlines() if line and not line.startswith("#")]
    return f"{len(lines)} line{'s' if len(lines) != 1 else ''}"


def keys_file(observed: UamliteObserved, user: str) -> str:
    return keys_file_of(observed.accounts.get(user), user)


def keys_file_of(account: Account | None, user: str) -> str:
    home = account.home if account else f"/home/{user}"
    return f"{home.rstrip('/')}/.ssh/authorized_keys"


def ways_in(observed: UamliteObserved, planned: dict[str, Change]) -> set[str]:
    """Accounts that can log in (an SSH key or a password) and become root (uid 0, or sudo to
    every command through the sudoers tree), once `planned` is applied."""
    created = {c.payload.user for c in planned.values()
               if isinstance(c.payload, AccountStep) and c.payload.op == "create"}
    passwords = {c.payload.user for c in planned.values()
                 if isinstance(c.payload, AccountStep) and c.payload.op == "password"}
    sudo_texts = dict(observed.sudoers)
    for path in planned:
        if path.startswith(SUDOERS_DIR + "/"):
            after = _after(observed, planned, path)
            if after is None:
                sudo_texts.pop(path, None)
            else:
                sudo_texts[path] = after

    def listdir(directory: str) -> list[str]:
        prefix = directory.rstrip("/") + "/"
        return sorted({p[len(prefix):] for p in sudo_texts if p.startswith(prefix)
                       and "/" not in p[len(prefix):]})

    tree = parse_tree(sudo_texts.get, listdir)
    ids: dict[str, tuple[int, int]] = {n: (a.uid, a.gid) for n, a in observed.accounts.items()}
    for name in created - set(ids):
        ids[name] = (-1, -1)  # a new account: never uid 0, no primary group yet
    groups = {name: (observed.group_ids.get(name, -1), members)
              for name, members in observed.groups.items()}
    root_capable = tree.root_users(ids, groups) | {n for n, (uid, _) in ids.items() if uid == 0}
    ways = set()
    for name in root_capable:
        account = observed.accounts.get(name)
        expired = account.expired if account else False
        step = planned.get(f"user {name}")
        if step is not None and isinstance(step.payload, AccountStep):
            expired = {"expire": True, "purge": True, "unexpire": False}.get(
                step.payload.op, expired)
        if expired:
            continue
        keys = _after(observed, planned, keys_file(observed, name)) or ""
        has_key = any(line.strip() and not line.startswith("#") for line in keys.splitlines())
        has_password = name in passwords or (account is not None and account.has_password)
        if has_key or has_password:
            ways.add(name)
    return ways


def _after(observed: UamliteObserved, planned: dict[str, Change], path: str) -> str | None:
    """A file's content once `planned` is applied."""
    change = planned.get(path)
    write = getattr(change.payload, "write", None) if change is not None else None
    if change is None or change.action is Action.NOOP:
        return observed.files.get(path)
    return write.content if write is not None else None
