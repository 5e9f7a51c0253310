"""Where tenants come from: a YAML file or an LDAP directory, read into `Tenant`s.

A source either returns every tenant or raises `SourceError`; the controller never acts on a
partial read (an LDAP outage must not look like every tenant was removed). Entries that cannot
be tenants (a name that is not a DNS label, no numeric uid) are skipped and reported.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

from divingbell.core.document.problems import load_model
from divingbell.core.errors import DivingbellError, DocumentError

NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class SourceError(DivingbellError):
    """The source could not be read whole; nothing should be changed."""


@dataclass(frozen=True)
class Tenant:
    name: str
    uid: int
    gid: int
    home: str | None = None
    disabled: bool = False
    quota: Mapping[str, str] = field(default_factory=dict)
    limits: Mapping[str, Mapping[str, str]] = field(default_factory=dict)


@dataclass
class SourceRead:
    tenants: list[Tenant]
    skipped: list[str] = field(default_factory=list)  # why each unusable entry was skipped
    # Names of skipped entries: the controller leaves their namespaces alone (a broken entry
    # is not a removal).
    held: set[str] = field(default_factory=set)

    def without_shared_uids(self) -> SourceRead:
        """Two tenants with one uid could read each other's files: both are held back."""
        owners: dict[int, list[str]] = {}
        for tenant in self.tenants:
            owners.setdefault(tenant.uid, []).append(tenant.name)
        shared = {uid: names for uid, names in owners.items() if len(names) > 1}
        if not shared:
            return self
        skipped = [*self.skipped, *(f"{', '.join(names)}: share uid {uid}; all held back"
                                    for uid, names in sorted(shared.items()))]
        held = self.held | {n for names in shared.values() for n in names}
        return SourceRead([t for t in self.tenants if t.uid not in shared], skipped, held)


class TenantSource(Protocol):
    def read(self) -> SourceRead: ...

    def describe(self) -> str: ...


def check_name(name: str, prefix: str) -> str | None:
    """Why `name` cannot be a tenant (its namespace is `prefix + name`), or None."""
    if not NAME.match(name):
        return f"{name!r} is not a DNS label (lowercase letters, digits and '-')"
    if len(prefix) + len(name) > 63:
        return f"namespace {prefix}{name!r} would be longer than 63 characters"
    return None


# YAML -------------------------------------------------------------------------------------

Quantity = str | int | float


def _quantities(value: Mapping[str, Quantity]) -> dict[str, str]:
    return {key: str(amount) for key, amount in value.items()}


class YamlTenant(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    uid: int = Field(gt=0, lt=2**31)
    gid: int | None = Field(default=None, gt=0, lt=2**31)
    home: str | None = None
    disabled: bool = False
    quota: dict[str, Quantity] = Field(default_factory=dict)
    limits: dict[str, dict[str, Quantity]] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _dns_label(cls, value: str) -> str:
        problem = check_name(value, "")
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("home")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("/"):
            raise ValueError(f"home {value!r} must be an absolute path")
        return value


class YamlTenants(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tenants: list[YamlTenant] = Field(default_factory=list)


@dataclass
class YamlSource:
    path: Path
    prefix: str = ""

    def describe(self) -> str:
        return str(self.path)

    def read(self) -> SourceRead:
        try:
            document = load_model(YamlTenants, self.path)
        except DocumentError as exc:
            raise SourceError(f"{self.path} is invalid:\n  " + "\n  ".join(
                str(p) for p in exc.problems)) from None
        seen: dict[str, int] = {}
        tenants, skipped = [], []
        held: set[str] = set()
        for entry in document.tenants:
            problem = check_name(entry.name, self.prefix)
            if entry.name in seen:
                problem = f"{entry.name!r} is listed twice"
                held.add(entry.name)
            if problem:
                skipped.append(problem)
                continue
            seen[entry.name] = entry.uid
            tenants.append(Tenant(entry.name, entry.uid, entry.gid or entry.uid, entry.home,
                                  entry.disabled, _quantities(entry.quota),
                                  {k: _quantities(v) for k, v in entry.limits.items()}))
        return SourceRead(tenants, skipped, held).without_shared_uids()


# LDAP -------------------------------------------------------------------------------------

class LdapSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    bind_dn: str | None = None
    password_file: Path | None = None
    object_class: str = "posixAccount"
    name_attribute: str = "uid"
    uid_attribute: str = "uidNumber"
    gid_attribute: str = "gidNumber"
    home_attribute: str = "homeDirectory"
    # shadowExpire counts days since 1970-01-01; an account expired today or before is
    # disabled (the same rule as `uamlite`'s expiry and as login on the bastions).
    expire_attribute: str = "shadowExpire"
    timeout_seconds: float = Field(default=10.0, gt=0)


@dataclass(frozen=True)
class LdapUrl:
    """ldap[s]://host[:port]/base-dn[?attributes[?scope[?filter]]] (RFC 4516)."""

    scheme: str
    host: str
    port: int
    base: str
    scope: str
    filter: str

    @classmethod
    def parse(cls, url: str) -> LdapUrl:
        parts = urlsplit(url)
        if parts.scheme not in ("ldap", "ldaps") or not parts.hostname:
            raise SourceError(f"{url!r} is not an ldap:// or ldaps:// URL with a host")
        base = unquote(parts.path.lstrip("/"))
        if not base:
            raise SourceError(f"{url!r} names no base DN (ldap://host/ou=people,dc=example,"
                              "dc=org)")
        fields = [unquote(p) for p in parts.query.split("?")] if parts.query else []
        fields += [""] * (3 - len(fields))
        scope = fields[1].lower() or "sub"
        if scope not in ("base", "one", "sub"):
            raise SourceError(f"{url!r}: scope must be base, one or sub, not {scope!r}")
        return cls(parts.scheme, parts.hostname,
                   parts.port or (636 if parts.scheme == "ldaps" else 389), base, scope,
                   fields[2])


@dataclass
class LdapSource:
    url: LdapUrl
    settings: LdapSettings
    prefix: str = ""
    today: Callable[[], datetime.date] = lambda: datetime.datetime.now(datetime.UTC).date()

    def describe(self) -> str:
        return f"{self.url.scheme}://{self.url.host}:{self.url.port}/{self.url.base}"

    def read(self) -> SourceRead:
        import ldap3
        from ldap3.core.exceptions import LDAPException

        s = self.settings
        password = None
        if s.password_file is not None:
            try:
                password = s.password_file.read_text().strip()
            except OSError as exc:
                raise SourceError(f"cannot read the LDAP password file {s.password_file}: "
                                  f"{exc.strerror}") from None
        clauses = f"(objectClass={s.object_class})({s.uid_attribute}=*)"
        if self.url.filter:
            wrapped = self.url.filter if self.url.filter.startswith("(") else (
                f"({self.url.filter})")
            clauses += wrapped
        search_filter = f"(&{clauses})"
        scope = {"base": ldap3.BASE, "one": ldap3.LEVEL, "sub": ldap3.SUBTREE}[self.url.scope]
        attributes = [s.name_attribute, s.uid_attribute, s.gid_attribute, s.home_attribute,
                      s.expire_attribute]
        try:
            server = ldap3.Server(self.url.host, port=self.url.port,
                                  use_ssl=self.url.scheme == "ldaps",
                                  connect_timeout=s.timeout_seconds, get_info=ldap3.NONE)
            with ldap3.Connection(server, user=s.bind_dn, password=password, auto_bind=True,
                                  read_only=True,
                                  receive_timeout=max(1, round(s.timeout_seconds)),
                                  raise_exceptions=True) as connection:
                entries = connection.extend.standard.paged_search(
                    self.url.base, search_filter, scope, attributes=attributes,
                    paged_size=500, generator=False)
        except LDAPException as exc:
            raise SourceError(f"LDAP {self.describe()}: {exc}") from None
        return self._tenants([e for e in entries if e.get("type") == "searchResEntry"])

    def _tenants(self, entries: list[dict[str, Any]]) -> SourceRead:
        s = self.settings
        tenants, skipped = [], []
        seen: set[str] = set()
        held: set[str] = set()
        today = (self.today() - datetime.date(1970, 1, 1)).days
        for entry in entries:
            attrs = entry.get("attributes") or {}
            dn = entry.get("dn", "?")
            name = _first(attrs.get(s.name_attribute))
            uid = _number(attrs.get(s.uid_attribute))
            if name is None:
                skipped.append(f"{dn}: no {s.name_attribute}")
                continue
            problem = check_name(str(name), self.prefix)
            if problem is None and (uid is None or uid <= 0):
                problem = f"{s.uid_attribute} is not a positive number"
                held.add(str(name))
            if problem is None and name in seen:
                problem = f"{name!r} appears twice"
                held.add(str(name))
            if problem:
                skipped.append(f"{dn}: {problem}")
                continue
            assert uid is not None
            seen.add(str(name))
            gid = _number(attrs.get(s.gid_attribute)) or uid
            home = _first(attrs.get(s.home_attribute))
            expire = _number(attrs.get(s.expire_attribute))
            tenants.append(Tenant(str(name), uid, gid, str(home) if home else None,
                                  disabled=expire is not None and 0 <= expire <= today))
        return SourceRead(sorted(tenants, key=lambda t: t.name), skipped,
                          held).without_shared_uids()


def _first(value: Any) -> Any:
    if isinstance(value, list):
        return value[0] if value else None
    return value


def _number(value: Any) -> int | None:
    value = _first(value)
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return None


def open_source(spec: str, ldap: LdapSettings, prefix: str) -> TenantSource:
    """`ldap://...` or `ldaps://...` for a directory, anything else is a YAML file."""
    if spec.startswith(("ldap://", "ldaps://")):
        return LdapSource(LdapUrl.parse(spec), ldap, prefix)
    return YamlSource(Path(spec), prefix)
