"""The validated-document cache: a hit gives exactly what validation gives, never loads
pydantic, and anything doubtful about the cache file is a miss."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from divingbell.core.document.api import load_document, node_config
from divingbell.core.document.frozen import decode, encode
from tests.compat.conftest import DATA
from tests.conftest import Cli, write
from tests.test_validate import SEED_DIVINGBELL

pytestmark = pytest.mark.kernel

CACHE = "var/lib/divingbell/document-cache.json"
DOC = "conf:\n  sysctl:\n    net.ipv4.ip_forward: 1\n"


def planned_forward(cli: Cli, doc: Path, root: Path, node: str = "n1") -> str | None:
    """The value plan would give net.ipv4.ip_forward (None: nothing planned for it)."""
    data = json.loads(cli("plan", doc, "--root", root, "--node", node, "--format", "json",
                          "-v").stdout)
    for module in data["modules"]:
        for change in module["changes"]:
            if change["target"] == "net.ipv4.ip_forward":
                return str(change["after"]) if change["action"] == "set" else None
    return None


def test_decoded_configuration_matches_the_validated_models(tmp_path: Path) -> None:
    seed = write(tmp_path / "seed.yaml", SEED_DIVINGBELL)
    for files in ([seed], [DATA / "values.yaml", DATA / "site-values.yaml"]):
        config = node_config(load_document(files), "superhost", {})
        for name, model in config.modules.items():
            light = decode(json.loads(json.dumps(encode(model))))
            assert light.model_dump(exclude_none=True) == model.model_dump(
                mode="json", exclude_none=True), name
            assert encode(light) == encode(model), name
        apt = config.modules["apt"]
        light_apt = decode(encode(apt))
        assert encode(light_apt.all_packages) == encode(apt.all_packages)
        for repo_name, repo in apt.repositories.items():
            assert light_apt.repositories[repo_name].suites == repo.suites
    seed_config = node_config(load_document([seed]), "n", {})
    ethtool = seed_config.modules["ethtool"].root["ens3"]
    assert decode(encode(ethtool)).features == ethtool.features == {
        "tx-tcp-segmentation": False, "tx-checksum-ip-generic": True}
    user = seed_config.modules["uamlite"].users[0]
    assert decode(encode(user)).user_sshkeys == user.user_sshkeys


def test_a_cache_hit_plans_the_same_and_never_imports_pydantic(
        ns_cli: Cli, tmp_path: Path, root: Path) -> None:
    doc = write(tmp_path / "d.yaml", DOC)
    first = ns_cli("plan", doc, "--root", root, "--node", "n1")
    cache = root / CACHE
    assert cache.stat().st_mode & 0o777 == 0o600
    assert (cache.parent.stat().st_mode & 0o777) == 0o700
    second = ns_cli("plan", doc, "--root", root, "--node", "n1")
    assert second.stdout == first.stdout and second.returncode == first.returncode
    probe = (
        "import sys\n"
        "from divingbell.commands.cli import cli\n"
        "try:\n"
        f"    cli(['plan', {str(doc)!r}, '--root', {str(root)!r}, '--node', 'n1'],\n"
        "        standalone_mode=False)\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('heavy:', sorted(m for m in ('pydantic', 'yaml') if m in sys.modules))\n")
    out = subprocess.run(["ip", "netns", "exec", ns_cli.netns.name,  # type: ignore[union-attr]
                          sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True).stdout
    assert "heavy: []" in out, out


def test_changed_bytes_node_or_labels_miss(ns_cli: Cli, tmp_path: Path, root: Path) -> None:
    doc = write(tmp_path / "d.yaml", DOC)
    assert planned_forward(ns_cli, doc, root) == "1"
    write(doc, DOC.replace("ip_forward: 1", "ip_forward: 0"))
    assert planned_forward(ns_cli, doc, root) is None, "0 is the namespace's own value"
    write(doc, DOC + "  overrides:\n    divingbell_sysctl:\n      hosts:\n"
          "        - {name: n2, conf: {sysctl: {net.ipv4.ip_forward: 0}}}\n")
    assert planned_forward(ns_cli, doc, root, "n1") == "1"
    assert planned_forward(ns_cli, doc, root, "n2") is None


def test_a_cache_file_others_could_write_is_ignored(ns_cli: Cli, tmp_path: Path,
                                                    root: Path) -> None:
    doc = write(tmp_path / "d.yaml", DOC)
    assert planned_forward(ns_cli, doc, root) == "1"
    cache = root / CACHE
    # Forge the entry (same key): a hit would plan the forged value.
    entry = json.loads(cache.read_text())
    entry["modules"]["sysctl"]["fields"]["root"]["$dict"]["net.ipv4.ip_forward"] = "7"
    cache.write_text(json.dumps(entry))
    cache.chmod(0o600)
    assert planned_forward(ns_cli, doc, root) == "7", "proof a private entry is used"
    cache.chmod(0o666)
    assert planned_forward(ns_cli, doc, root) == "1", "a world-writable file is never trusted"
    cache.write_text('{"key": "x", "modules": {"sysctl": {"$model": "os.system"}}}')
    cache.chmod(0o600)
    assert planned_forward(ns_cli, doc, root) == "1"


def test_an_invalid_document_is_never_cached(cli: Cli, tmp_path: Path, root: Path) -> None:
    bad = write(tmp_path / "bad.yaml", "conf:\n  sysctl:\n    net.ipv4.ip_forward: [1]\n")
    for _ in range(2):
        result = cli("plan", bad, "--root", root, "--node", "n1")
        assert result.returncode == 2
        assert 'conf.sysctl["net.ipv4.ip_forward"]: must be a number or a string, not a list ' \
            f"({bad}:3)" in result.stderr
    assert not (root / CACHE).exists()


def test_a_cached_configuration_knows_which_fields_the_document_wrote(tmp_path: Path) -> None:
    # uamlite keeps a user's keys when the document names the user only to set a password: it
    # asks which fields were written, so a cache hit must answer the same as the models.
    doc = write(tmp_path / "d.yaml", "conf:\n  uamlite:\n    users:\n"
                "      - user_name: bob\n        user_sudo: true\n"
                "      - user_name: carol\n        user_sshkeys: []\n")
    users = node_config(load_document([doc]), "n", {}).modules["uamlite"].users
    decoded = decode(json.loads(json.dumps(encode(users))))
    for model, light in zip(users, decoded, strict=True):
        assert light.model_fields_set == model.model_fields_set
    assert "user_sshkeys" not in decoded[0].model_fields_set
    assert "user_sshkeys" in decoded[1].model_fields_set


def test_a_full_state_filesystem_leaves_no_cache_temp_file(cli: Cli, tmp_path: Path,
                                                           root: Path) -> None:
    """The cache is best effort: with no room under the state directory (a one-page tmpfs in
    this session's private mount namespace, filled) plan still works, no cache is written and
    no `.document-cache.json.NNNN` temp file is left behind."""
    state = root / "var/lib/divingbell"
    state.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k,mode=0700", "tmpfs", str(state)],
                   check=True)
    try:
        fd = os.open(state / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            with pytest.raises(OSError, match="No space left"):
                while True:
                    os.write(fd, b"x" * 512)
        finally:
            os.close(fd)
        doc = write(tmp_path / "d.yaml", DOC)
        result = cli("plan", doc, "--root", root, "--node", "n1")
        assert result.returncode == 0, result.stderr
        assert sorted(p.name for p in state.iterdir()) == ["filler"]
    finally:
        subprocess.run(["umount", "-l", str(state)], check=False)
