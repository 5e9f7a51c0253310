"""Every YAML format reports a mistake the same way: `path: message (file:line)`.

The same kind of mistake is made in each real format (node document, PKI catalog, bootstrap
design, boot profiles, policy file, tenants file), loaded from a file by its own loader, and
the problem reported must read alike.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from divingbell.bootstrap.design import load_design
from divingbell.core.document.api import load_document
from divingbell.core.errors import DocumentError
from divingbell.fleet.boot import BootProfileError, load_profiles
from divingbell.pki.catalog import load_catalog
from divingbell.policy.config import load_policy
from divingbell.policy.tenants import load_config

DESIGN = """\
cluster:
  name: c
  api_endpoints: ['https://10.0.0.1:6443']
  pod_cidr: 10.244.0.0/16
  service_cidr: 10.96.0.0/12
  cluster_dns: 10.96.0.10
  kubernetes_version: 1.30.0
roles:
  worker: {}
"""

Loader = Callable[[Path], Any]

FORMATS: dict[str, Loader] = {
    "document": lambda path: load_document([path]),
    "catalog": lambda path: load_catalog([path]),
    "design": lambda path: load_design([path]),
    "boot profiles": load_profiles,
    "policy": load_policy,
    "tenants": load_config,
}


def problems(tmp_path: Path, kind: str, text: str) -> list[str]:
    path = tmp_path / "f.yaml"
    path.write_text(text)
    with pytest.raises((DocumentError, BootProfileError)) as caught:
        FORMATS[kind](path)
    assert isinstance(caught.value, DocumentError | BootProfileError)
    return [str(problem).replace(f"{tmp_path}/", "") for problem in caught.value.problems]


@pytest.mark.parametrize(("kind", "text", "expected"), [
    ("document", "conf:\n  sysctll: {}\n",
     "conf.sysctll: unknown key 'sysctll'; did you mean 'sysctl'? (f.yaml:2)"),
    ("catalog", "certificate_authorities:\n  ca:\n    descriptoin: x\n",
     "certificate_authorities.ca.descriptoin: unknown key 'descriptoin'; "
     "did you mean 'description'? (f.yaml:3)"),
    ("design", DESIGN + "nodse: []\n",
     "nodse: unknown key 'nodse'; did you mean 'nodes'? (f.yaml:10)"),
    ("boot profiles", "install:\n  default:\n    kernel: vmlinuz\n    cmdlin: quiet\n",
     "install.default.cmdlin: unknown key 'cmdlin'; did you mean 'cmdline'? (f.yaml:4)"),
    ("policy", "uid_enforcer: {enabeld: true}\n",
     "uid_enforcer.enabeld: unknown key 'enabeld'; did you mean 'enabled'? (f.yaml:1)"),
    ("tenants", "namespace_prefx: t-\n",
     "namespace_prefx: unknown key 'namespace_prefx'; did you mean 'namespace_prefix'? "
     "(f.yaml:1)"),
])
def test_an_unknown_key_is_named_with_the_closest_valid_one(
        tmp_path: Path, kind: str, text: str, expected: str) -> None:
    assert expected in problems(tmp_path, kind, text)


@pytest.mark.parametrize(("kind", "text", "expected"), [
    ("document", "conf:\n  limits:\n    n: {domain: root, type: hard, item: nofiles, value: 1}\n",
     "conf.limits.n.item: 'nofiles' is not allowed: expected "),
    ("catalog", "keypairs:\n  - {name: sa, algorithm: dsa}\n",
     "keypairs[0].algorithm: 'dsa' is not allowed: expected 'ecdsa-p256', 'rsa-2048', "
     "'rsa-3072' or 'rsa-4096' (f.yaml:2)"),
    ("boot profiles", "local_boot: pxe\n",
     "local_boot: 'pxe' is not allowed: expected 'sanboot' or 'exit' (f.yaml:1)"),
    ("policy", "namespace_selector:\n  matchExpressions: [{key: a, operator: Maybe}]\n",
     "namespace_selector.matchExpressions[0].operator: 'Maybe' is not allowed: expected "
     "'In', 'NotIn', 'Exists' or 'DoesNotExist' (f.yaml:2)"),
])
def test_a_value_outside_a_fixed_set_names_the_set(
        tmp_path: Path, kind: str, text: str, expected: str) -> None:
    assert any(p.startswith(expected) for p in problems(tmp_path, kind, text))


def test_a_key_below_an_alias_suggests_by_the_alias(tmp_path: Path) -> None:
    """The path and the suggestion use the names written in the file, not the model's."""
    text = "namespace_selector:\n  matchExpressions: [{key: a, operater: In, values: [b]}]\n"
    assert sorted(problems(tmp_path, "policy", text)) == [
        "namespace_selector.matchExpressions[0].operater: unknown key 'operater'; "
        "did you mean 'operator'? (f.yaml:2)",
        "namespace_selector.matchExpressions[0].operator: field required (f.yaml:2)"]


def test_boot_profiles_read_like_every_other_format(tmp_path: Path) -> None:
    """List items by index in brackets, a bad mapping key at the key itself, the value that
    was refused."""
    text = ("discovery:\n  default:\n    kernel: vmlinuz\n    initrd: ['http://x/a b']\n"
            "install:\n  Worker: {kernel: vmlinuz}\n")
    found = problems(tmp_path, "boot profiles", text)
    assert ("discovery.default.initrd[0]: is not a plain http(s) URL (no spaces, quotes or "
            "${...}) (got 'http://x/a b') (f.yaml:4)") in found
    assert ("install.Worker: is not a role name: lower-case letters, digits and '-' (or "
            "'default') (got 'Worker') (f.yaml:6)") in found
