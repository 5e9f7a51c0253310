"""Delivering a kubeconfig into a home directory the tenant controls: symlinks, hard links,
FIFOs and foreign owners anywhere on the path are refused, never followed; the file is 0600 and
the tenant's; an existing kubeconfig is merged, an invalid one left untouched."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import yaml

from divingbell.policy import kubeconfig
from divingbell.policy.kubeconfig import Entries, HomeError

UID, GID = 52001, 52010
ENTRIES = Entries("divingbell", "alice@divingbell", "alice@divingbell", "tool-alice")
CLUSTER = {"server": "https://k8s.example:6443"}
USER = {"client-certificate-data": "Y2VydA==", "client-key-data": "a2V5"}

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown to test uids")


@pytest.fixture
def home(tmp_path: Path) -> Path:
    directory = tmp_path / "home" / "alice"
    directory.mkdir(parents=True)
    os.chown(directory, UID, UID)
    return directory


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A root-owned file a tenant would love divingbell to overwrite or read."""
    target = tmp_path / "etc" / "shadow"
    target.parent.mkdir()
    target.write_text("root:$6$secret:19000::::::\n")
    target.chmod(0o600)
    return target


def fresh(home: Path) -> dict[str, object]:
    return kubeconfig.merged(None, ENTRIES, CLUSTER, USER)


def test_written_file_is_the_tenants_and_private(home: Path) -> None:
    assert kubeconfig.read(str(home), UID) == kubeconfig.Existing()
    kubeconfig.write(str(home), UID, GID, fresh(home))
    config = home / ".kube" / "config"
    info = config.stat()
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (UID, GID, 0o600)
    kube = (home / ".kube").stat()
    assert (kube.st_uid, stat.S_IMODE(kube.st_mode)) == (UID, 0o700)
    data = yaml.safe_load(config.read_text())
    assert data["current-context"] == "alice@divingbell"
    assert data["contexts"] == [{"name": "alice@divingbell", "context": {
        "cluster": "divingbell", "user": "alice@divingbell", "namespace": "tool-alice"}}]
    assert kubeconfig.read(str(home), UID).data == data
    assert [p.name for p in (home / ".kube").iterdir()] == ["config"]  # no temp file left


def test_existing_kubeconfig_is_merged(home: Path) -> None:
    (home / ".kube").mkdir()
    (home / ".kube" / "config").write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "other",
        "clusters": [{"name": "other", "cluster": {"server": "https://other"}},
                     {"name": "divingbell", "cluster": {"server": "https://stale"}}],
        "users": [{"name": "me", "user": {"token": "t"}}],
        "contexts": [{"name": "other", "context": {"cluster": "other", "user": "me"}}]}))
    existing = kubeconfig.read(str(home), UID)
    assert existing.problem is None
    kubeconfig.write(str(home), UID, GID, kubeconfig.merged(existing.data, ENTRIES, CLUSTER,
                                                           USER))
    data = yaml.safe_load((home / ".kube" / "config").read_text())
    assert data["current-context"] == "other"
    assert {c["name"]: c["cluster"]["server"] for c in data["clusters"]} == {
        "other": "https://other", "divingbell": "https://k8s.example:6443"}
    assert [u["name"] for u in data["users"]] == ["me", "alice@divingbell"]
    assert kubeconfig.remove(str(home), UID, GID, ENTRIES)
    data = yaml.safe_load((home / ".kube" / "config").read_text())
    assert [u["name"] for u in data["users"]] == ["me"]
    assert [c["name"] for c in data["clusters"]] == ["other"]


def test_removing_the_only_entries_deletes_the_file(home: Path) -> None:
    kubeconfig.write(str(home), UID, GID, fresh(home))
    assert kubeconfig.remove(str(home), UID, GID, ENTRIES)
    assert not (home / ".kube" / "config").exists()
    assert not kubeconfig.remove(str(home), UID, GID, ENTRIES)


@pytest.mark.parametrize("text", ["{{{ not yaml", "- a list\n", "kind: Pod\n",
                                  "users: {alice: 1}\n"])
def test_invalid_kubeconfig_is_left_untouched(home: Path, text: str) -> None:
    (home / ".kube").mkdir()
    (home / ".kube" / "config").write_text(text)
    existing = kubeconfig.read(str(home), UID)
    assert existing.problem is not None and "not a valid kubeconfig" in existing.problem
    assert (home / ".kube" / "config").read_text() == text


def test_config_symlink_is_not_followed(home: Path, victim: Path) -> None:
    (home / ".kube").mkdir()
    (home / ".kube" / "config").symlink_to(victim)
    existing = kubeconfig.read(str(home), UID)
    assert existing.problem is not None and "is a symlink" in existing.problem
    before = victim.read_text()
    with pytest.raises(HomeError):
        kubeconfig.remove(str(home), UID, GID, ENTRIES)
    assert victim.read_text() == before
    assert (home / ".kube" / "config").is_symlink()


def test_kube_dir_symlink_is_not_followed(home: Path, victim: Path) -> None:
    (home / ".kube").symlink_to(victim.parent)
    assert "symlink" in (kubeconfig.read(str(home), UID).problem or "")
    with pytest.raises(HomeError, match="symlink"):
        kubeconfig.write(str(home), UID, GID, fresh(home))
    assert sorted(p.name for p in victim.parent.iterdir()) == ["shadow"]


def test_symlinked_home_or_parent_is_refused(home: Path, tmp_path: Path, victim: Path) -> None:
    link = tmp_path / "home" / "mallory"
    link.symlink_to(victim.parent)
    with pytest.raises(HomeError, match="symlink"):
        kubeconfig.write(str(link), UID, GID, fresh(home))
    parent_link = tmp_path / "homes"
    parent_link.symlink_to(tmp_path / "home")
    with pytest.raises(HomeError, match="symlink"):
        kubeconfig.write(str(parent_link / "alice"), UID, GID, fresh(home))
    assert not (victim.parent / ".kube").exists()
    assert not (home / ".kube").exists()


def test_hard_link_is_not_read(home: Path, victim: Path) -> None:
    (home / ".kube").mkdir()
    os.link(victim, home / ".kube" / "config")
    existing = kubeconfig.read(str(home), UID)
    assert existing.problem is not None and "hard links" in existing.problem
    assert existing.data is None


def test_fifo_does_not_block(home: Path) -> None:
    (home / ".kube").mkdir()
    os.mkfifo(home / ".kube" / "config")
    existing = kubeconfig.read(str(home), UID)
    assert "not a regular file" in (existing.problem or "")


def test_foreign_owned_home_or_file(home: Path) -> None:
    os.chown(home, 52999, 52999)
    assert "owned by uid 52999" in (kubeconfig.read(str(home), UID).problem or "")
    with pytest.raises(HomeError, match="owned by uid 52999"):
        kubeconfig.write(str(home), UID, GID, fresh(home))
    os.chown(home, UID, UID)
    (home / ".kube").mkdir()
    (home / ".kube" / "config").write_text("kind: Config\n")
    os.chown(home / ".kube" / "config", 52999, 52999)
    assert "owned by uid 52999" in (kubeconfig.read(str(home), UID).problem or "")


def test_replacing_a_config_symlink_replaces_the_link_only(home: Path, victim: Path) -> None:
    """write() is only called when read() found no problem; even so, rename replaces a link
    planted between the two, never the file it points to."""
    (home / ".kube").mkdir()
    (home / ".kube" / "config").symlink_to(victim)
    before = victim.read_text()
    kubeconfig.write(str(home), UID, GID, fresh(home))
    assert victim.read_text() == before
    assert not (home / ".kube" / "config").is_symlink()


def test_missing_home_is_created_only_when_asked(tmp_path: Path) -> None:
    (tmp_path / "home").mkdir()
    target = str(tmp_path / "home" / "bob")
    assert "does not exist" in (kubeconfig.read(target, UID).problem or "")
    with pytest.raises(HomeError, match="does not exist"):
        kubeconfig.write(target, UID, GID, fresh(tmp_path))
    kubeconfig.write(target, UID, GID, fresh(tmp_path), create_home=True)
    info = os.stat(target)
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (UID, GID, 0o700)
