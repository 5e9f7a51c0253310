"""The apt module's configuration: packages (with versions and debconf answers), repositories
as deb822 sources, and how apt may change the host."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Discriminator, Field, Tag, model_validator

from divingbell.core.document.fields import StrictModel, Text, matching_text, plain_text
from divingbell.core.document.types import SingleLine
from divingbell.core.document.views import AptConfViews, RepositoryViews

_PACKAGE = re.compile(r"^[a-z0-9][a-z0-9+.-]+(:[a-z0-9-]+)?$")


def _package_name(value: Any) -> str:
    if isinstance(value, dict) and set(value) == {"name"}:
        value = value["name"]  # Divingbell's docs also wrote `- name: telnetd`
    return matching_text(value, _PACKAGE, "{} is not a Debian package name")


PackageName = Annotated[str, BeforeValidator(_package_name, json_schema_input_type=str)]


class DebconfAnswer(StrictModel):
    question: SingleLine
    question_type: Literal[
        "boolean", "string", "select", "multiselect", "note", "text", "password", "title"
    ]
    answer: SingleLine


_VERSION = re.compile(r"^(\d+:)?[0-9][A-Za-z0-9.+~:-]*$")


def _package_version(value: Any) -> str:
    return matching_text(value, _VERSION, "{} is not a Debian version (like 1:9.2p1-2+deb12u3)")


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
            text = plain_text(key)
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


