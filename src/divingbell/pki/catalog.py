"""The PKI catalog: which certificate authorities, certificates and keypairs a cluster needs.

The format is Promenade's `PKICatalog`: given bare, or wrapped as a `promenade/PKICatalog/v1`
document (`schema`/`metadata`/`data`), one or several YAML documents per file. Several files
given together form one catalog: a CA named in two files is one CA holding the certificates of
both. Every problem is reported with its path and file:line, like the node document's.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from divingbell.core.document.loader import Loaded, load_all_text
from divingbell.core.document.paths import PathKey
from divingbell.core.document.problems import check_model, problem_at
from divingbell.core.document.types import is_ip_address
from divingbell.core.errors import DocumentError, Problem

SCHEMA = "promenade/PKICatalog/v1"
Algorithm = Literal["ecdsa-p256", "rsa-2048", "rsa-3072", "rsa-4096"]
Usage = Literal["server", "client"]
BOTH_USAGES: tuple[Usage, ...] = ("server", "client")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_DNS = re.compile(r"^(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*"
                  r"[A-Za-z0-9])?)*\.?$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _file_name(value: str) -> str:
    if not _NAME.match(value) or value.endswith("-key"):
        raise ValueError(f"{value!r} cannot be a file name: use letters, digits, '.', '_' "
                         "and '-', not ending in '-key'")
    return value


class CertificateSpec(_Strict):
    document_name: str
    common_name: str
    description: str = ""
    hosts: list[str] = Field(default_factory=list)
    groups: list[str] = Field(default_factory=list)
    kubernetes_service_names: list[str] = Field(default_factory=list)
    usages: list[Usage] = Field(default_factory=lambda: list(BOTH_USAGES), min_length=1)
    algorithm: Algorithm | None = None
    validity_days: int | None = Field(default=None, ge=1, le=36500)

    _name = field_validator("document_name")(_file_name)

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, hosts: list[str]) -> list[str]:
        for host in hosts:
            if not is_ip_address(host) and not _DNS.match(host):
                raise ValueError(f"{host!r} is neither an IP address nor a DNS name")
        return hosts

    @field_validator("kubernetes_service_names")
    @classmethod
    def _service_names(cls, names: list[str]) -> list[str]:
        for name in names:
            if not _DNS.match(name) or name.startswith("*"):
                raise ValueError(f"{name!r} is not a DNS name")
        return names

    def subject_alt_names(self) -> tuple[list[str], list[str]]:
        """(DNS names, IP addresses): `hosts`, plus every dotted prefix of each Kubernetes
        service name (kubernetes, kubernetes.default, ... kubernetes.default.svc.cluster.local),
        the way Promenade expands them. Order kept, duplicates dropped."""
        dns: list[str] = []
        ips: list[str] = []
        for host in self.hosts:
            target = ips if is_ip_address(host) else dns
            if host not in target:
                target.append(host)
        for name in self.kubernetes_service_names:
            parts = name.rstrip(".").split(".")
            for end in range(1, len(parts) + 1):
                prefix = ".".join(parts[:end])
                if prefix not in dns:
                    dns.append(prefix)
        return dns, ips


class AuthoritySpec(_Strict):
    description: str = ""
    certificates: list[CertificateSpec] = Field(default_factory=list)
    algorithm: Algorithm | None = None
    validity_days: int | None = Field(default=None, ge=1, le=36500)


class KeypairSpec(_Strict):
    name: str
    description: str = ""
    algorithm: Algorithm | None = None

    _name = field_validator("name")(_file_name)


class CatalogData(_Strict):
    certificate_authorities: dict[str, AuthoritySpec] = Field(default_factory=dict)
    keypairs: list[KeypairSpec] = Field(default_factory=list)
    # divingbell's additions; Promenade's catalogs leave them out and get these defaults.
    algorithm: Algorithm | None = None
    validity_days: int | None = Field(default=None, ge=1, le=36500)
    ca_validity_days: int | None = Field(default=None, ge=1, le=36500)

    @field_validator("certificate_authorities")
    @classmethod
    def _ca_names(cls, cas: dict[str, AuthoritySpec]) -> dict[str, AuthoritySpec]:
        for name in cas:
            _file_name(name)
        return cas


class WrappedCatalog(_Strict):
    schema_: Literal["promenade/PKICatalog/v1"] = Field(alias="schema")
    metadata: dict[str, Any] = Field(default_factory=dict)
    data: CatalogData


DEFAULT_ALGORITHM: Algorithm = "rsa-2048"
"""Promenade's (cfssl's) and kubeadm's: RSA 2048, so leaves get Key Encipherment too. A catalog
says `algorithm: ecdsa-p256` for ECDSA. The default shapes new keys only: an existing key of
another algorithm is kept unless the catalog names one (an upgrade never rotates a CA)."""
DEFAULT_VALIDITY_DAYS = 365
DEFAULT_CA_VALIDITY_DAYS = 3650


@dataclass(frozen=True)
class Certificate:
    spec: CertificateSpec
    authority: str
    algorithm: Algorithm
    validity_days: int
    location: str | None
    algorithm_stated: bool = False
    """The catalog names the algorithm (else it is the default, for new keys only)."""


@dataclass(frozen=True)
class Authority:
    name: str
    description: str
    algorithm: Algorithm
    validity_days: int
    location: str | None
    algorithm_stated: bool = False


@dataclass(frozen=True)
class Keypair:
    name: str
    algorithm: Algorithm
    location: str | None
    algorithm_stated: bool = False


@dataclass
class Catalog:
    """Every catalog file given, merged: CAs by name, certificates and keypairs by file name."""

    authorities: dict[str, Authority] = field(default_factory=dict)
    certificates: list[Certificate] = field(default_factory=list)
    keypairs: list[Keypair] = field(default_factory=list)

    def certificates_of(self, authority: str) -> list[Certificate]:
        return [c for c in self.certificates if c.authority == authority]


def load_catalog(paths: Sequence[Path]) -> Catalog:
    """Load, validate and merge catalog files; DocumentError lists every problem in all."""
    problems: list[Problem] = []
    parts: list[tuple[Loaded, PathKey, CatalogData]] = []
    for path in paths:
        try:
            text = path.read_text()
        except OSError as exc:
            problems.append(Problem("", f"cannot read {path}: {exc.strerror}"))
            continue
        try:
            documents = load_all_text(text, str(path))
        except DocumentError as exc:
            problems.extend(exc.problems)
            continue
        found = 0
        for loaded in documents:
            if loaded.data is None:
                continue
            part, part_problems = _catalog_in(loaded)
            problems.extend(part_problems)
            if part is not None:
                parts.append((loaded, *part))
            if part is not None or part_problems:
                found += 1
        if found == 0:
            problems.append(Problem("", f"no PKI catalog in {path} (expected "
                                    f"certificate_authorities/keypairs or schema: {SCHEMA})",
                                    f"{path}:1"))
    if problems:
        raise DocumentError(problems)
    return _merge(parts)


def _catalog_in(loaded: Loaded) -> tuple[tuple[PathKey, CatalogData] | None, list[Problem]]:
    """The catalog in one YAML document, or None for a document of another schema (a
    Promenade configuration file carries many)."""
    data = loaded.data
    if not isinstance(data, dict):
        return None, [Problem("", "a catalog must be a mapping", loaded.location(()))]
    if "schema" in data:
        if data["schema"] != SCHEMA:
            return None, []
        wrapped, problems = check_model(WrappedCatalog, data, loaded)
        return ((("data",), wrapped.data) if wrapped else None), problems
    bare, problems = check_model(CatalogData, data, loaded)
    return (((), bare) if bare else None), problems


def _merge(parts: Iterable[tuple[Loaded, PathKey, CatalogData]]) -> Catalog:
    catalog = Catalog()
    problems: list[Problem] = []
    names: dict[str, str | None] = {}  # output file stem -> where it was defined

    def claim(name: str, path: PathKey, loaded: Loaded) -> bool:
        if name in names:
            first = names[name]
            problems.append(problem_at(loaded, path, f"{name!r} is already defined"
                                       + (f" at {first}" if first else "")
                                       + "; every CA, certificate and keypair needs its own name"))
            return False
        names[name] = loaded.location(path)
        return True

    for loaded, prefix, data in parts:
        default_algorithm = data.algorithm or DEFAULT_ALGORITHM
        for ca_name, ca in data.certificate_authorities.items():
            ca_path = (*prefix, "certificate_authorities", ca_name)
            if ca_name not in catalog.authorities and claim(ca_name, ca_path, loaded):
                catalog.authorities[ca_name] = Authority(
                    ca_name, ca.description, ca.algorithm or default_algorithm,
                    ca.validity_days or data.ca_validity_days or DEFAULT_CA_VALIDITY_DAYS,
                    loaded.location(ca_path), bool(ca.algorithm or data.algorithm))
            for index, cert in enumerate(ca.certificates):
                cert_path = (*ca_path, "certificates", index, "document_name")
                if claim(cert.document_name, cert_path, loaded):
                    catalog.certificates.append(Certificate(
                        cert, ca_name, cert.algorithm or ca.algorithm or default_algorithm,
                        cert.validity_days or data.validity_days or DEFAULT_VALIDITY_DAYS,
                        loaded.location(cert_path),
                        bool(cert.algorithm or ca.algorithm or data.algorithm)))
        for index, keypair in enumerate(data.keypairs):
            path = (*prefix, "keypairs", index, "name")
            if claim(keypair.name, path, loaded):
                catalog.keypairs.append(Keypair(
                    keypair.name, keypair.algorithm or default_algorithm, loaded.location(path),
                    bool(keypair.algorithm or data.algorithm)))
    if problems:
        raise DocumentError(problems)
    return catalog
