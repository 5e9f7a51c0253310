"""The policy file: which admission policies are on, what they allow, where they apply."""

from __future__ import annotations

import posixpath
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from divingbell.core.document.problems import load_model

_REGISTRY = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?(:[0-9]{1,5})?$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class SelectorRequirement(_Strict):
    key: str
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _values_fit_operator(self) -> SelectorRequirement:
        if self.operator in ("In", "NotIn") and not self.values:
            raise ValueError(f"operator {self.operator} needs at least one value")
        if self.operator in ("Exists", "DoesNotExist") and self.values:
            raise ValueError(f"operator {self.operator} takes no values")
        return self

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.operator == "In":
            return labels.get(self.key) in self.values
        if self.operator == "NotIn":
            return labels.get(self.key) not in self.values
        if self.operator == "Exists":
            return self.key in labels
        return self.key not in labels


class LabelSelector(_Strict):
    """A Kubernetes label selector (matchLabels AND every matchExpression)."""

    match_labels: dict[str, str] = Field(default_factory=dict, alias="matchLabels")
    match_expressions: list[SelectorRequirement] = Field(default_factory=list,
                                                          alias="matchExpressions")

    def matches(self, labels: Mapping[str, str]) -> bool:
        return (all(labels.get(k) == v for k, v in self.match_labels.items())
                and all(e.matches(labels) for e in self.match_expressions))

    def as_kubernetes(self) -> dict[str, object]:
        out: dict[str, object] = {}
        if self.match_labels:
            out["matchLabels"] = dict(self.match_labels)
        if self.match_expressions:
            out["matchExpressions"] = [e.model_dump(exclude_defaults=False)
                                       for e in self.match_expressions]
        return out


def normal_path(path: str) -> str:
    """The absolute path with `.`, `..` and repeated slashes resolved (no symlinks: the
    webhook cannot see the node's filesystem)."""
    normal = posixpath.normpath(path)
    return "/" + normal.lstrip("/") if normal.startswith("/") else normal


def _absolute_normal(value: str, what: str) -> str:
    if not value.startswith("/"):
        raise ValueError(f"{what} {value!r} must be an absolute path")
    if normal_path(value) != value.rstrip("/"):
        raise ValueError(f"{what} {value!r} is not in normal form; write "
                         f"{normal_path(value)!r}")
    return normal_path(value)


class _Scoped(_Strict):
    enabled: bool = False
    namespace_selector: LabelSelector | None = None


class UidEnforcerConf(_Scoped):
    annotation: str = "RunAsUser"
    group_annotation: str = "RunAsGroup"
    # hostNetwork/hostPID/hostIPC let a pod see and signal the node's processes and sockets,
    # whatever its uid: refused unless allowed here.
    allow_host_namespaces: bool = False


def _registry_host(registry: str) -> str:
    if not _REGISTRY.match(registry):
        raise ValueError(f"{registry!r} is not a registry host (like "
                         "registry.example.org or registry.example.org:5000)")
    if "." not in registry and ":" not in registry and registry != "localhost":
        # A runtime reads a first component without them as a Docker Hub path.
        raise ValueError(
            f"{registry!r} has no '.' or ':': the runtime reads '{registry}/x' as "
            f"docker.io/{registry}/x, so images from Docker Hub would pass; name the "
            f"host fully (like {registry}.example.org) or with its port ({registry}:5000)")
    return registry


class RegistryEnforcerConf(_Scoped):
    registries: list[Annotated[str, AfterValidator(_registry_host)]] = Field(
        default_factory=list)

    @model_validator(mode="after")
    def _needs_registries(self) -> RegistryEnforcerConf:
        if self.enabled and not self.registries:
            raise ValueError("enabled with no registries would refuse every image")
        return self


class HostPathEnforcerConf(_Scoped):
    paths: list[str] = Field(default_factory=list)
    prefixes: list[str] = Field(default_factory=list)

    @field_validator("paths")
    @classmethod
    def _paths(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(_absolute_normal(p, "path") for p in value))

    @field_validator("prefixes")
    @classmethod
    def _prefixes(cls, value: list[str]) -> list[str]:
        out = []
        for prefix in value:
            if prefix.startswith("/") and prefix.rstrip("/") == "":
                raise ValueError("prefix '/' would allow every host path")
            _absolute_normal(prefix, "prefix")
            out.append(prefix.rstrip("/") + "/")
        return out

    def allows(self, path: str) -> bool:
        normal = normal_path(path)
        return normal in self.paths or any(normal.startswith(p) for p in self.prefixes)


class HostAutoMounterConf(_Scoped):
    paths: list[str] = Field(default_factory=list)

    @field_validator("paths")
    @classmethod
    def _paths(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(_absolute_normal(p, "path") for p in value))


class PolicyConfig(_Strict):
    uid_enforcer: UidEnforcerConf = UidEnforcerConf()
    registry_enforcer: RegistryEnforcerConf = RegistryEnforcerConf()
    host_path_enforcer: HostPathEnforcerConf = HostPathEnforcerConf()
    host_auto_mounter: HostAutoMounterConf = HostAutoMounterConf()
    namespace_selector: LabelSelector | None = None
    namespace: str = "divingbell-policy"
    namespace_cache_seconds: float = Field(default=10.0, ge=0, le=600)

    @model_validator(mode="after")
    def _mounts_pass_the_enforcer(self) -> PolicyConfig:
        enforcer = self.host_path_enforcer
        if self.host_auto_mounter.enabled and enforcer.enabled:
            refused = [p for p in self.host_auto_mounter.paths if not enforcer.allows(p)]
            if refused:
                raise ValueError(
                    f"host_auto_mounter adds {', '.join(refused)}, which host_path_enforcer "
                    "would then refuse: add them to host_path_enforcer.paths")
        return self

    def selector_for(self, policy: _Scoped) -> LabelSelector | None:
        return policy.namespace_selector or self.namespace_selector


def load_policy(path: Path) -> PolicyConfig:
    """Raises DocumentError naming every problem with its path and file:line."""
    return load_model(PolicyConfig, path)
