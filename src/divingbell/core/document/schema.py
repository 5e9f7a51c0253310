"""The document schema: Divingbell's documented YAML, unchanged, plus divingbell's extensions.

Every module key under `conf:` is modelled here, so a document is validated whole before
anything touches a host. Values keep YAML 1.1 meanings where the seeds rely on them
(`tx-tcp-segmentation: off` is the NIC setting "off"). Unions are avoided (or tagged `<...>`,
stripped from error paths) so each problem is reported once, at its own path.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    RootModel,
    SecretStr,
    Tag,
    field_validator,
    model_validator,
)

from divingbell.core.document.keys import (  # re-exported: the schema's names
    MERGE_KEY_CANONICALIZERS as MERGE_KEY_CANONICALIZERS,  # noqa: PLC0414
)
from divingbell.core.document.keys import MODULE_NAMES as MODULE_NAMES  # noqa: PLC0414
from divingbell.core.document.keys import canonical_sysctl_key as canonical_sysctl_key  # noqa: PLC0414
from divingbell.core.document.keys import sysctl_components as sysctl_components  # noqa: PLC0414
from divingbell.core.document.types import (
    MAX_SECONDS,
    EnvName,
    IdName,
    SingleLine,
    UnitValue,
    single_line,
    whole_seconds,
)
from divingbell.core.document.views import AptConfViews, EthtoolInterfaceViews, RepositoryViews


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


# Scalars --------------------------------------------------------------------------------------

def _scalar_text(value: Any) -> str:
    """A YAML scalar as text: bools in the kernel's 1/0, numbers as written."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int | float | str):
        return str(value)
    raise ValueError(f"must be a number or a string, not {_kind(value)}")


def _plain_text(value: Any) -> str:
    """Text fields that YAML may have typed: `values: [true]` is the label value "true"."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | str):
        return str(value)
    raise ValueError(f"must be a string, not {_kind(value)}")


def _switch(value: Any) -> bool:
    """on/off, true/false, yes/no; YAML 1.1 already turned unquoted ones into bools."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _SWITCH_WORDS:
        return _SWITCH_WORDS[value.strip().lower()]
    raise ValueError(f"must be on or off (true/false), not {value!r}")


_SWITCH_WORDS = {"on": True, "off": False, "true": True, "false": False, "yes": True, "no": False}


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "empty"
    return type(value).__name__


Text = Annotated[str, BeforeValidator(_plain_text, json_schema_input_type=str | int | float | bool)]
Switch = Annotated[bool, BeforeValidator(_switch, json_schema_input_type=bool | str)]


def _absolute_path(value: Any) -> str:
    text = _plain_text(value)
    if not text.startswith("/"):
        raise ValueError(f"must be an absolute path, not {text!r}")
    if "\0" in text or "\n" in text:
        raise ValueError("must not contain NUL or newline characters")
    if ".." in text.split("/"):
        raise ValueError(f"{text!r} must not contain `..` (every path stays inside the host "
                         "root)")
    return text


AbsPath = Annotated[str, BeforeValidator(_absolute_path, json_schema_input_type=str)]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@+-]*$")


def _file_name(value: Any) -> str:
    text = _plain_text(value)
    if not _NAME.match(text) or ".." in text:
        raise ValueError(
            f"{text!r} cannot name a file: use letters, digits and . _ - @ + (not starting "
            "with . and without ..)"
        )
    return text


FileName = Annotated[str, BeforeValidator(_file_name, json_schema_input_type=str)]


def _check_name_keys(value: Any) -> Any:
    if isinstance(value, dict):
        for key in value:
            _file_name(key)
    return value


# sysctl ---------------------------------------------------------------------------------------

def _sysctl_key_problem(key: str) -> str | None:
    parts = sysctl_components(key)
    if not key or any(not part for part in parts):
        return f"{key!r} is not a sysctl key (empty component)"
    if any(part in (".", "..") for part in parts) or re.search(r"[\s\0]", key):
        return f"{key!r} is not a sysctl key"
    return None


SysctlValue = Annotated[
    str, BeforeValidator(_scalar_text, json_schema_input_type=int | float | str | bool),
    AfterValidator(single_line),
]


class SysctlConf(RootModel[dict[str, SysctlValue]]):
    """Kernel tunables: `net.ipv4.ip_forward: 1` or `net/ipv4/ip_forward: 1`."""

    @model_validator(mode="before")
    @classmethod
    def _canonical_keys(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        seen: dict[str, str] = {}
        problems = []
        out: dict[str, Any] = {}
        for key, item in value.items():
            problem = _sysctl_key_problem(str(key))
            if problem:
                problems.append(problem)
                continue
            canonical = canonical_sysctl_key(str(key))
            if canonical in seen:
                problems.append(f"{key!r} and {seen[canonical]!r} name the same sysctl")
            seen[canonical] = str(key)
            out[canonical] = item
        if problems:
            raise ValueError("; ".join(problems))
        return out


# mounts ---------------------------------------------------------------------------------------

class Mount(StrictModel):
    """A mount persisted as a systemd .mount unit (never /etc/fstab)."""

    mnt_tgt: AbsPath
    device: UnitValue
    type: UnitValue
    options: UnitValue | None = None  # as Divingbell: no Options= line unless given
    before: UnitValue = "docker.service"
    after: UnitValue = "network-online.target"


class MountsConf(RootModel[Annotated[dict[str, Mount], BeforeValidator(_check_name_keys)]]):
    pass


# ethtool --------------------------------------------------------------------------------------

def _ethtool_number(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"must be a whole number, not {value!r}")
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"must be a whole number, not {value!r}") from None
    if number < 0:
        raise ValueError(f"must not be negative, got {number}")
    return number


def _coalesce_value(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, str) and value.lower() in _SWITCH_WORDS:
        return "on" if _SWITCH_WORDS[value.lower()] else "off"
    return str(_ethtool_number(value))


EthtoolNumber = Annotated[int, BeforeValidator(_ethtool_number, json_schema_input_type=int)]
CoalesceValue = Annotated[
    str, BeforeValidator(_coalesce_value, json_schema_input_type=int | bool | str)
]


class EthtoolInterface(EthtoolInterfaceViews, BaseModel):
    """Offload features by ethtool name (`tx-tcp-segmentation: off`), plus divingbell's ring
    sizes, channels and interrupt coalescing (`ring: {rx: 4096}`)."""

    model_config = ConfigDict(extra="allow", frozen=True)
    __pydantic_extra__: dict[str, Switch] = Field(init=False)

    ring: dict[str, EthtoolNumber] | None = None
    channels: dict[str, EthtoolNumber] | None = None
    coalesce: dict[str, CoalesceValue] | None = None


def _interface_name(value: Any) -> Any:
    if isinstance(value, dict):
        for key in value:
            if not re.match(r"^[A-Za-z0-9_.@+-]{1,15}$", str(key)) or str(key) in (".", ".."):
                raise ValueError(f"{key!r} is not a network interface name")
            settings = value[key]
            groups = [settings] + [settings.get(g) for g in ("ring", "channels", "coalesce")
                                   if isinstance(settings, dict)]
            for group in groups:
                for name in group if isinstance(group, dict) else ():
                    if not re.match(r"^[A-Za-z0-9_-]{1,64}$", str(name)):
                        # These names land in a unit's ExecStart= line.
                        raise ValueError(f"{key}: {name!r} is not an ethtool setting name")
    return value


class EthtoolConf(
    RootModel[Annotated[dict[str, EthtoolInterface], BeforeValidator(_interface_name)]]
):
    pass


# limits ---------------------------------------------------------------------------------------

LIMIT_ITEMS = (
    "core", "data", "fsize", "memlock", "nofile", "rss", "stack", "cpu", "nproc", "as",
    "maxlogins", "maxsyslogins", "nonewprivs", "priority", "locks", "sigpending", "msgqueue",
    "nice", "rtprio", "chroot",
)


def _limit_value(value: Any) -> str:
    text = _plain_text(value).strip()
    if text in ("unlimited", "infinity", "-1") or re.match(r"^-?[0-9]{1,19}$", text):
        return text
    raise ValueError(f"{text!r} is not a limit: use a whole number, unlimited or infinity")


def _limit_domain(value: Any) -> str:
    text = _plain_text(value).strip()
    if not text or re.search(r"\s", text):
        raise ValueError(f"{text!r} is not a pam_limits domain (user, @group, uid:uid, *)")
    return text


class Limit(StrictModel):
    """One pam_limits line, written to /etc/security/limits.d/60-divingbell-<name>.conf."""

    domain: Annotated[str, BeforeValidator(_limit_domain, json_schema_input_type=str | int)]
    type: Literal["soft", "hard", "-"]
    item: Literal[LIMIT_ITEMS]  # type: ignore[valid-type]  # noqa: RUF100
    value: Annotated[str, BeforeValidator(_limit_value, json_schema_input_type=str | int)]

    @model_validator(mode="after")
    def _value_fits_item(self) -> Limit:
        if self.item in ("nice", "priority"):
            return self
        if self.value.startswith("-") and self.value != "-1":
            raise ValueError(f"{self.item} cannot be negative (got {self.value})")
        return self


class LimitsConf(RootModel[Annotated[dict[str, Limit], BeforeValidator(_check_name_keys)]]):
    pass


# perm -----------------------------------------------------------------------------------------

def _mode(value: Any) -> str:
    text = _plain_text(value).strip()
    if not re.match(r"^0?[0-7]{3,4}$", text):
        raise ValueError(f"{text!r} is not an octal mode (like '0644')")
    return f"{int(text, 8):04o}"


def _interval(value: Any) -> int | Literal["infinite"]:
    if value == "infinite":
        return "infinite"
    value = whole_seconds(value)
    if isinstance(value, bool):
        raise ValueError(f"must be a number of seconds or 'infinite', not {value!r}")
    try:
        seconds = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"must be a number of seconds or 'infinite', not {value!r}") from None
    if seconds < 60:
        raise ValueError(f"must be at least 60 seconds (got {seconds})")
    return seconds


FileMode = Annotated[str, BeforeValidator(_mode, json_schema_input_type=str | int)]
Interval = Annotated[
    int | Literal["infinite"], BeforeValidator(_interval, json_schema_input_type=int | str)
]
RerunPolicy = Literal["always", "never", "once_successfully"]


def _check_policy(policy: str | None, rerun: Any, retry: Any) -> None:
    """Refuse interval settings the rerun policy would silently ignore."""
    problems = []
    if rerun is not None and policy == "once_successfully":
        problems.append("rerun_interval does nothing with rerun_policy once_successfully (after "
                        "a success it never runs again): remove it, or use retry_interval to "
                        "pace retries after failures")
    if rerun is not None and policy == "never":
        problems.append("rerun_interval does nothing with rerun_policy never (it runs once): "
                        "remove it, or use rerun_policy always")
    if retry is not None and policy == "never":
        problems.append("retry_interval does nothing with rerun_policy never (it runs once, "
                        "failed or not): remove it, or use rerun_policy once_successfully")
    if problems:
        raise ValueError("; ".join(problems))


class PermPath(StrictModel):
    """Owner, group and mode for every path matching a glob."""

    path: AbsPath
    owner: IdName
    group: IdName
    permissions: FileMode


class PermConf(StrictModel):
    paths: list[PermPath] = []
    ignore_missing: bool = False
    rerun_policy: RerunPolicy | None = None
    rerun_interval: Interval | None = None

    @model_validator(mode="after")
    def _consistent_policy(self) -> PermConf:
        _check_policy(self.rerun_policy, self.rerun_interval, None)
        return self

    @model_validator(mode="before")
    @classmethod
    def _bare_list(cls, value: Any) -> Any:
        # Early Divingbell took the list of paths directly under `perm:`.
        return {"paths": value} if isinstance(value, list) else value


# uamlite --------------------------------------------------------------------------------------

SSH_KEY_TYPES = (
    "ssh-rsa", "ssh-dss", "ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521", "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com",
)
from divingbell.core.document.keys import CRYPT_PREFIXES  # noqa: E402


def _ssh_key(value: Any) -> str:
    text = single_line(_plain_text(value).strip())
    parts = text.split(None, 2)
    if len(parts) < 2 or parts[0] not in SSH_KEY_TYPES:
        raise ValueError(
            f"not an SSH public key: must start with one of {', '.join(SSH_KEY_TYPES)}"
        )
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"the {parts[0]} key's body is not valid base64") from None
    name_length = int.from_bytes(blob[:4], "big") if len(blob) >= 4 else -1
    if blob[4 : 4 + name_length].decode(errors="replace") != parts[0]:
        raise ValueError(f"the key's body does not encode a {parts[0]} key")
    return text


def _ssh_keys(value: Any) -> Any:
    if value in (["Unmanaged"], "Unmanaged"):
        return None
    return value


def _crypt(value: Any) -> Any:
    text = value.get_secret_value() if isinstance(value, SecretStr) else _plain_text(value)
    if not text.startswith(CRYPT_PREFIXES) or len(text.split("$")) < 4 or not re.match(
            r"^[A-Za-z0-9./$=,+-]+$", text):
        raise ValueError(
            "must be a crypt(3) hash in one of the formats " + " ".join(CRYPT_PREFIXES)
            + " (not a plain password)"
        )
    return text


class User(StrictModel):
    user_name: Annotated[str, Field(pattern=r"^[a-z_][a-z0-9_-]{0,30}[$]?$")]
    user_sudo: bool = False
    user_sshkeys: Annotated[
        list[Annotated[str, BeforeValidator(_ssh_key)]] | None,
        BeforeValidator(_ssh_keys),
        Field(description="Public keys for authorized_keys; [Unmanaged] leaves the file alone."),
    ] = []
    user_crypt_passwd: Annotated[
        SecretStr | None, BeforeValidator(lambda v: None if v is None else _crypt(v))
    ] = None


class UamliteConf(StrictModel):
    purge_expired_users: bool = False
    users: list[User] = []
    allow_lockout: bool = Field(
        False,
        description="Apply even if the document would remove the host's last key+sudo login.",
    )

    @field_validator("users")
    @classmethod
    def _unique_users(cls, users: list[User]) -> list[User]:
        names = [user.user_name for user in users]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"users listed more than once: {', '.join(duplicates)}")
        return users


# apt ------------------------------------------------------------------------------------------

_PACKAGE = re.compile(r"^[a-z0-9][a-z0-9+.-]+(:[a-z0-9-]+)?$")


def _package_name(value: Any) -> str:
    if isinstance(value, dict) and set(value) == {"name"}:
        value = value["name"]  # Divingbell's docs also wrote `- name: telnetd`
    text = _plain_text(value)
    if not _PACKAGE.match(text):
        raise ValueError(f"{text!r} is not a Debian package name")
    return text


PackageName = Annotated[str, BeforeValidator(_package_name, json_schema_input_type=str)]


class DebconfAnswer(StrictModel):
    question: SingleLine
    question_type: Literal[
        "boolean", "string", "select", "multiselect", "note", "text", "password", "title"
    ]
    answer: SingleLine


_VERSION = re.compile(r"^(\d+:)?[0-9][A-Za-z0-9.+~:-]*$")


def _package_version(value: Any) -> str:
    text = _plain_text(value)
    if not _VERSION.match(text):
        raise ValueError(f"{text!r} is not a Debian version (like 1:9.2p1-2+deb12u3)")
    return text


PackageVersion = Annotated[str, BeforeValidator(_package_version, json_schema_input_type=str)]


class Package(StrictModel):
    name: PackageName
    version: PackageVersion | None = None
    allow_downgrade: bool | None = None
    debconf: list[DebconfAnswer] = []


PackageList = list[Package]
PackageGroups = dict[str, list[Package]]


def _package_shape(value: Any) -> str:
    return "<map>" if isinstance(value, dict) else "<list>"


def _deb822_word(value: str) -> str:
    if any(c.isspace() for c in value) or not value:
        raise ValueError(f"{value!r} must be one word: the .sources file separates URIs, "
                         "suites and components by spaces (list them as separate items)")
    return value


Deb822Word = Annotated[SingleLine, AfterValidator(_deb822_word)]


class Repository(RepositoryViews, StrictModel):
    url: Deb822Word
    distributions: Annotated[list[Deb822Word], Field(min_length=1)]
    components: list[Deb822Word] = []
    architectures: list[Deb822Word] = []
    gpgkey: Text | None = None
    # Divingbell's shorthand: `subrepos: [backports, updates]` adds `<distribution>-<subrepo>`
    # suites for every distribution.
    subrepos: list[Deb822Word] = []

    @model_validator(mode="after")
    def _check(self) -> Repository:
        if not re.match(r"^(https?|file|cdrom|mirror\+\w+|tor\+\w+):", self.url):
            raise ValueError(f"url {self.url!r} is not an apt URI (http://, https://, file:...)")
        flat = [d for d in self.distributions if d.endswith("/")]
        if flat and len(flat) != len(self.distributions):
            raise ValueError("distributions mixes flat paths (ending in /) with suites")
        if flat and self.components:
            raise ValueError("a flat repository (distribution ending in /) has no components")
        if flat and self.subrepos:
            raise ValueError("a flat repository (distribution ending in /) has no subrepos")
        if not flat and not self.components:
            raise ValueError("components are required (e.g. [main]) unless the distribution "
                             "is a flat path ending in /")
        if self.gpgkey is not None and "-----BEGIN PGP PUBLIC KEY BLOCK-----" not in self.gpgkey:
            raise ValueError("gpgkey must be an ASCII-armored public key "
                             "(-----BEGIN PGP PUBLIC KEY BLOCK-----)")
        return self


_APT_FILE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def _check_repository_names(value: Any) -> Any:
    """A repository's name becomes /etc/apt/sources.list.d/divingbell-NAME.sources and
    /etc/apt/keyrings/divingbell-NAME.asc: no `/` or `..`, and only the characters apt reads
    in sources.list.d (it ignores a file named with anything else, `+` and `@` included)."""
    if isinstance(value, dict):
        for key in value:
            text = _plain_text(key)
            if not _APT_FILE_NAME.match(text) or ".." in text or text.startswith("."):
                raise ValueError(f"{text!r} cannot name an apt sources file: use letters, "
                                 "digits and . _ - (not starting with . and without ..; apt "
                                 "silently ignores a file named otherwise)")
    return value


class AptConf(AptConfViews, StrictModel):
    packages: Annotated[
        Annotated[PackageList, Tag("<list>")] | Annotated[PackageGroups, Tag("<map>")],
        Discriminator(_package_shape),
    ] = []
    repositories: Annotated[dict[str, Repository],
                            BeforeValidator(_check_repository_names)] = {}
    upgrade: bool = False
    allow_downgrade: bool = False
    strict: bool = False
    exclusive_sources: bool = False
    dpkg_lock_timeout: Annotated[int, Field(ge=0, le=3600)] = 300
    blacklistpkgs: list[PackageName] = []
    whitelistpkgs: list[PackageName] = []

    @model_validator(mode="after")
    def _check(self) -> AptConf:
        seen: set[str] = set()
        problems = []
        for pkg in self.all_packages:
            if pkg.name in seen:
                problems.append(f"package {pkg.name} is listed twice")
            seen.add(pkg.name)
        both = sorted(seen & set(self.blacklistpkgs))
        if both:
            problems.append(f"requested and blacklisted at once: {', '.join(both)}")
        if problems:
            raise ValueError("; ".join(problems))
        return self


# apparmor -------------------------------------------------------------------------------------

class AppArmorConf(StrictModel):
    # Divingbell wrote "true"/"false" strings (and took "false" as true): both mean what they say.
    complain_mode: Switch = False
    profiles: Annotated[dict[str, str], BeforeValidator(_check_name_keys)] = {}
    # An extension: false writes (and syntax-checks) profiles without loading them, for hosts
    # whose AppArmor is enabled at a later boot.
    load: Switch = True


# kernel ---------------------------------------------------------------------------------------

KERNEL_PARAM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# Only characters neither the shell that reads GRUB_CMDLINE_LINUX="..." nor GRUB's own script
# (the `linux` line in grub.cfg) gives a meaning: no whitespace, quotes, $, \\, ;, |, &, <, >,
# #, braces, parentheses or wildcards.
KERNEL_PARAM_VALUE = re.compile(r"[A-Za-z0-9%+,\-./:=@^_~]+")
UNSAFE_KERNEL_PARAMS = ("root", "init", "rdinit", "rootfstype", "rootflags", "nfsroot",
                        "BOOT_IMAGE")
"""Parameters that decide what boots: refused unless named in `allow_unsafe`."""


def _kernel_value(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("is a YAML boolean (on/off/yes/no/true/false unquoted): quote the "
                         "value the kernel should get, such as 'off' or '1'")
    if isinstance(value, int | float):
        return str(value)
    return value


def _check_kernel_value(value: str) -> str:
    if not KERNEL_PARAM_VALUE.fullmatch(value):
        raise ValueError(f"{value!r} cannot go on a boot line: letters, digits and "
                         "% + , - . / : = @ ^ _ ~ only (no whitespace, quotes or shell "
                         "characters; not empty: a parameter without a value goes in flags)")
    return value


def _check_kernel_names(value: Any) -> Any:
    names = value.keys() if isinstance(value, dict) else value if isinstance(value, list) else []
    bad = [str(n) for n in names if not KERNEL_PARAM_NAME.fullmatch(str(n))]
    if bad:
        raise ValueError(f"not kernel parameter names: {', '.join(repr(b) for b in bad)} "
                         "(letters, digits, _ . -; the value goes after the name, not in it)")
    return value


KernelValue = Annotated[str, BeforeValidator(_kernel_value, json_schema_input_type=str | int),
                        AfterValidator(_check_kernel_value)]


class KernelConf(StrictModel):
    """Kernel command-line parameters, written as divingbell's own GRUB drop-in."""

    # name -> value: `hugepages: 1024` boots with hugepages=1024.
    cmdline: Annotated[dict[str, KernelValue], BeforeValidator(_check_kernel_names)] = {}
    # Parameters without a value (`nosmt`, `quiet`).
    flags: Annotated[list[str], BeforeValidator(_check_kernel_names)] = []
    # Names from UNSAFE_KERNEL_PARAMS the document may set all the same.
    allow_unsafe: list[Literal[UNSAFE_KERNEL_PARAMS]] = []  # type: ignore[valid-type]
    # A new line boots once on trial (with panic=trial_panic, 0: none added) and is committed
    # when the node is healthy on it; not healthy within trial_timeout seconds: reverted.
    trial_panic: Annotated[int, Field(ge=0, le=3600)] = 30
    trial_timeout: Annotated[float, Field(ge=30, le=86400)] = 900.0

    @model_validator(mode="after")
    def _check(self) -> KernelConf:
        problems = []
        both = sorted(set(self.cmdline) & set(self.flags))
        if both:
            problems.append(f"set with a value and as a flag at once: {', '.join(both)}")
        twice = sorted({f for f in self.flags if self.flags.count(f) > 1})
        if twice:
            problems.append(f"flags listed twice: {', '.join(twice)}")
        unsafe = sorted(n for n in [*self.cmdline, *self.flags]
                        if n in UNSAFE_KERNEL_PARAMS and n not in self.allow_unsafe)
        if unsafe:
            problems.append(f"{', '.join(unsafe)}: decides what boots; a mistake leaves the node "
                            "unbootable. Name it in kernel.allow_unsafe to set it all the same")
        if problems:
            raise ValueError("; ".join(problems))
        return self


# exec -----------------------------------------------------------------------------------------

_UNIT = r"[A-Za-z0-9:_.@\\-]+"  # systemd unit names, \x2d escapes included
_DISRUPTION = re.compile(rf"none|reboot|(restart|reload):{_UNIT}(,{_UNIT})*")


def _check_disruption(value: str) -> str:
    if not _DISRUPTION.fullmatch(value):
        raise ValueError("must be none, reboot, restart:<unit>[,<unit>...] or "
                         "reload:<unit>[,<unit>...]")
    return value


class Script(StrictModel):
    data: str
    args: list[Text] = []
    env: dict[EnvName, Text] = {}
    rerun_policy: RerunPolicy = "always"
    # always: None reruns on every apply; N at most every N seconds; infinite: never again.
    rerun_interval: Interval | None = None
    # After a failure (once_successfully, always): None retries on every apply; N at most
    # every N seconds.
    retry_interval: Interval | None = None
    timeout: Annotated[
        int, BeforeValidator(whole_seconds),
        Field(ge=1, le=MAX_SECONDS, validation_alias=AliasChoices("timeout", "script_timeout"))
    ] = 1800
    blocking_policy: Literal["foreground", "foreground_halt_pod_on_failure"] = "foreground"
    # What running the script costs the node's workloads: divingbell cannot see what a script
    # does, so the document says it (an extension; Divingbell had no such key).
    disruption: Annotated[str, AfterValidator(_check_disruption)] = "none"

    @model_validator(mode="after")
    def _consistent_policy(self) -> Script:
        _check_policy(self.rerun_policy, self.rerun_interval, self.retry_interval)
        return self


class ExecConf(RootModel[Annotated[dict[str, Script], BeforeValidator(_check_name_keys)]]):
    pass


# maintenance (issue 15: reboots and drains, a few nodes at a time) ---------------------------
# Not a host module: the agent's maintenance sequence reads it (divingbell.maintenance), with
# the same override rules as the modules (conf.overrides.divingbell_maintenance).

_DURATION = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?$")


def parse_duration(value: Any) -> float:
    """`15m`, `1h30m`, `90s`, or a plain number of seconds, as seconds."""
    if isinstance(value, bool):
        raise ValueError(f"must be a duration like 90s, 15m or 1h30m, not {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = _plain_text(value).strip()
        match = _DURATION.match(text)
        if text.isdigit():
            seconds = float(text)
        elif not text or match is None:
            raise ValueError(f"{text!r} is not a duration: use e.g. 90s, 15m or 1h30m")
        else:
            hours, minutes, secs = (float(g or 0) for g in match.groups())
            seconds = hours * 3600 + minutes * 60 + secs
    if seconds <= 0:
        raise ValueError(f"must be longer than zero (got {value!r})")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration, json_schema_input_type=str | int)]
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def _clock_time(value: Any) -> str:
    text = _plain_text(value).strip()
    match = re.match(r"^([01]?\d|2[0-3]):([0-5]\d)$", text)
    if match is None:
        raise ValueError(f"{text!r} is not a time of day: use HH:MM (24-hour), like \"02:00\"")
    return f"{int(match.group(1)):02d}:{match.group(2)}"


def _time_zone(value: Any) -> str:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    text = _plain_text(value).strip()
    try:
        ZoneInfo(text)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"{text!r} is not a time zone known to this host's tzdata "
                         "(use an IANA name like Europe/Paris or UTC)") from None
    return text


def _weekday(value: Any) -> str:
    text = _plain_text(value).strip().lower()[:3]
    if text not in WEEKDAYS:
        raise ValueError(f"{value!r} is not a day: use {', '.join(WEEKDAYS)}")
    return text


def _label_selector(value: Any) -> str:
    from divingbell.maintenance.selectors import parse_selector

    text = _plain_text(value).strip()
    parse_selector(text)  # raises ValueError naming the bad requirement
    return text


def _regex(value: Any) -> str:
    text = _plain_text(value)
    try:
        re.compile(text)
    except re.error as exc:
        raise ValueError(f"{text!r} is not a regular expression: {exc}") from None
    return text


ClockTime = Annotated[str, BeforeValidator(_clock_time, json_schema_input_type=str)]
TimeZone = Annotated[str, BeforeValidator(_time_zone, json_schema_input_type=str)]
Weekday = Annotated[str, BeforeValidator(_weekday, json_schema_input_type=str)]
Selector = Annotated[str, BeforeValidator(_label_selector, json_schema_input_type=str)]
Regex = Annotated[str, BeforeValidator(_regex, json_schema_input_type=str)]


class MaintenanceWindow(StrictModel):
    """When maintenance may *start*, in local time; `days` are the days a window opens (a
    window from 22:00 to 04:00 opened on a Friday ends on Saturday morning)."""

    days: list[Weekday] = list(WEEKDAYS)
    start: ClockTime
    end: ClockTime
    timezone: TimeZone = "UTC"

    @model_validator(mode="after")
    def _check(self) -> MaintenanceWindow:
        if self.start == self.end:
            raise ValueError("start and end are equal: a window needs a length (leave "
                             "`window` out to allow maintenance at any time)")
        if not self.days:
            raise ValueError("days is empty: the window would never open")
        return self


class PodBlocker(StrictModel):
    selector: Selector


class AlertBlocker(StrictModel):
    prometheus: Text
    match: Regex = ".*"
    timeout: Duration = 10.0

    @field_validator("prometheus")
    @classmethod
    def _url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError(f"{value!r} is not an http(s) URL of a Prometheus server")
        return value.rstrip("/")


class Blockers(StrictModel):
    pods: PodBlocker | None = None
    alerts: AlertBlocker | None = None


class Drain(StrictModel):
    timeout: Duration = 900.0
    grace_period: Duration = 60.0
    on_timeout: Literal["abort", "force"] = "abort"
    pod_selector: Selector = ""


class Health(StrictModel):
    timeout: Duration = 1200.0


REBOOT_TRIGGERS = ("reboot-required", "requested")


class Reboot(StrictModel):
    strategy: Literal["reboot", "kexec", "poweroff", "none"] = "reboot"
    when: list[Literal[REBOOT_TRIGGERS]] = list(REBOOT_TRIGGERS)  # type: ignore[valid-type]  # noqa: RUF100
    concurrency: Annotated[int, Field(ge=1, le=1000)] = 1
    group_by: Text | None = None
    window: MaintenanceWindow | None = None
    blockers: Blockers = Blockers()
    drain: Drain = Drain()
    health: Health = Health()
    # Extensions: how long a slot outlives its holder's last renewal (longer than a reboot
    # takes), and how long to wait after an aborted attempt.
    slot_ttl: Duration = 1800.0
    retry_after: Duration = 1800.0


class MaintenanceConf(StrictModel):
    reboot: Reboot = Reboot()


# overrides ------------------------------------------------------------------------------------

class LabelSelector(StrictModel):
    key: Text
    values: list[Text]


class LabelOverride(StrictModel):
    label: LabelSelector
    conf: dict[str, Any]


class HostOverride(StrictModel):
    name: Text
    conf: dict[str, Any]


class ModuleOverrides(StrictModel):
    labels: list[LabelOverride] = []
    hosts: list[HostOverride] = []


class Overrides(StrictModel):
    divingbell_sysctl: ModuleOverrides | None = None
    divingbell_limits: ModuleOverrides | None = None
    divingbell_mounts: ModuleOverrides | None = None
    divingbell_ethtool: ModuleOverrides | None = None
    divingbell_apt: ModuleOverrides | None = None
    divingbell_uamlite: ModuleOverrides | None = None
    divingbell_perm: ModuleOverrides | None = None
    divingbell_apparmor: ModuleOverrides | None = None
    divingbell_kernel: ModuleOverrides | None = None
    divingbell_exec: ModuleOverrides | None = None
    divingbell_maintenance: ModuleOverrides | None = None


# the document ---------------------------------------------------------------------------------

class Conf(StrictModel):
    sysctl: SysctlConf | None = None
    limits: LimitsConf | None = None
    mounts: MountsConf | None = None
    ethtool: EthtoolConf | None = None
    apt: AptConf | None = None
    uamlite: UamliteConf | None = None
    perm: PermConf | None = None
    apparmor: AppArmorConf | None = None
    kernel: KernelConf | None = None
    exec: ExecConf | None = None
    maintenance: MaintenanceConf | None = None
    overrides: Overrides | None = None
    # Divingbell chart settings, accepted so its values files load unchanged; they have no
    # meaning for an agent on the node and `validate` says so.
    chroot_mnt_path: str | None = None
    log_colors: bool | None = None
    extra_verbose: bool | None = None


class Document(StrictModel):
    """A divingbell document: everything under `conf:`, for every node."""

    conf: Conf = Conf()
    # What the agent does when the host drifts from the document between applies: put it
    # back (correct) or only report it (report: metrics, a node event, the status annotation).
    drift: Literal["correct", "report"] = "correct"
    # Retired: it switched off a guard that refused plans removing more than they keep.
    # Documents that say it still validate (with a note); it changes nothing.
    allow_mass_removal: bool = False


MODULE_MODELS: dict[str, type[BaseModel]] = {
    "sysctl": SysctlConf,
    "limits": LimitsConf,
    "mounts": MountsConf,
    "ethtool": EthtoolConf,
    "apt": AptConf,
    "uamlite": UamliteConf,
    "perm": PermConf,
    "apparmor": AppArmorConf,
    "kernel": KernelConf,
    "exec": ExecConf,
}

SECTION_MODELS: dict[str, type[BaseModel]] = {**MODULE_MODELS, "maintenance": MaintenanceConf}
"""Every section with overrides: the host modules, then the agent's maintenance section."""
