"""The policy file: the issue's example loads; every mistake is named with its path and
file:line, and nothing half-valid is accepted."""

from __future__ import annotations

from pathlib import Path

import pytest

from divingbell.core.errors import DocumentError
from divingbell.policy.config import LabelSelector, load_policy, normal_path

EXAMPLE = """\
uid_enforcer: {enabled: true}
registry_enforcer: {enabled: true, registries: [docker-registry.tools.example.org]}
host_path_enforcer:
  enabled: true
  paths: [/etc/ldap.conf, /var/run/nslcd/socket]
  prefixes: [/data/project/, /data/scratch/, /public/dumps/]
host_auto_mounter: {enabled: true, paths: [/etc/ldap.conf, /var/run/nslcd/socket]}
namespace_selector: {matchLabels: {tenancy: tool}}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    return path


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(DocumentError) as caught:
        load_policy(write(tmp_path, text))
    return [str(p) for p in caught.value.problems]


def test_the_issue_example_loads(tmp_path: Path) -> None:
    config = load_policy(write(tmp_path, EXAMPLE))
    assert config.uid_enforcer.enabled and config.host_path_enforcer.prefixes == [
        "/data/project/", "/data/scratch/", "/public/dumps/"]
    assert config.selector_for(config.uid_enforcer) == LabelSelector.model_validate(
        {"matchLabels": {"tenancy": "tool"}})


@pytest.mark.parametrize(("text", "expected"), [
    ("uid_enforcer: {enabeld: true}\n", "uid_enforcer.enabeld: unknown key 'enabeld'; did you mean 'enabled'?"),
    ("namespace_selector: {matchLabel: {a: b}}\n", "did you mean 'matchLabels'?"),
    ("uid_enforcer: {enabeld: true}\n", "/policy.yaml:1)"),
    ("host_path_enforcer:\n  paths: [etc/x]\n", "must be an absolute path"),
    ("registry_enforcer: {enabled: true}\n", "would refuse every image"),
    ("registry_enforcer: {registries: ['https://r.example/']}\n", "is not a registry host"),
    ("registry_enforcer: {enabled: true, registries: [internal]}\n",
     "'internal' has no '.' or ':': the runtime reads 'internal/x' as docker.io/internal/x"),
    ("registry_enforcer: {enabled: true, registries: [r.example.org, mirror]}\n",
     "registry_enforcer.registries[1]"),
    ("host_path_enforcer:\n  prefixes: [/]\n", "would allow every host path"),
    ("host_path_enforcer:\n  paths: [etc/x]\n", "/policy.yaml:2)"),
    ("host_path_enforcer:\n  paths: [/data/../etc]\n", "write '/etc'"),
    ("host_path_enforcer: {enabled: true, paths: [/a]}\n"
     "host_auto_mounter: {enabled: true, paths: [/b]}\n", "host_path_enforcer would then refuse"),
    ("namespace_selector:\n  matchExpressions:\n  - {key: a, operator: In}\n",
     "needs at least one value"),
    ("uid_enforcer: {enabled: true}\nuid_enforcer: {enabled: false}\n", "duplicate key"),
    ("namespace_cache_seconds: -1\n", "namespace_cache_seconds"),
])
def test_mistakes_are_named(tmp_path: Path, text: str, expected: str) -> None:
    found = problems(tmp_path, text)
    assert any(expected in p for p in found), found


def test_selectors_match_like_kubernetes() -> None:
    selector = LabelSelector.model_validate({
        "matchLabels": {"tenancy": "tool"},
        "matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["infra"]},
                             {"key": "frozen", "operator": "DoesNotExist"}]})
    assert selector.matches({"tenancy": "tool"})
    assert selector.matches({"tenancy": "tool", "tier": "web"})
    assert not selector.matches({"tenancy": "tool", "tier": "infra"})
    assert not selector.matches({"tenancy": "tool", "frozen": ""})
    assert not selector.matches({})


def test_normal_path() -> None:
    assert normal_path("//etc/./x/../y/") == "/etc/y"
    assert normal_path("/data/project/../../etc") == "/etc"


def test_paths_are_normalised_and_deduplicated(tmp_path: Path) -> None:
    config = load_policy(write(tmp_path, "host_auto_mounter:\n  enabled: true\n"
                                         "  paths: [/etc/ldap.conf, /etc/ldap.conf/]\n"))
    assert config.host_auto_mounter.paths == ["/etc/ldap.conf"]


@pytest.mark.parametrize("registry", ["localhost", "localhost:5000", "internal:5000",
                                      "registry.internal", "r.example.org:443"])
def test_registry_hosts_a_runtime_reads_as_hosts_load(tmp_path: Path, registry: str) -> None:
    text = f"registry_enforcer: {{enabled: true, registries: ['{registry}']}}\n"
    assert load_policy(write(tmp_path, text)).registry_enforcer.registries == [registry]
