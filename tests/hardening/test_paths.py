"""Symlink mazes for every module that writes a file, the state directory and the lock: an
absolute symlink where divingbell expects a directory must resolve inside the root (as it would
for the host itself) and never lead to the real path outside it; a user's own symlinks are never
followed at all. Run with the kernel's openat2 and with the O_NOFOLLOW fallback walk."""

from __future__ import annotations

import os
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from divingbell.core.document.loader import load_text
from divingbell.core.document.validate import resolve, validate
from divingbell.core.engine.runner import ApplyReport, apply_node
from divingbell.core.errors import DocumentError, UnsafePath
from divingbell.core.host import Host, UserDir
from tests.conftest import make_proc_sys, write
from tests.hardening.conftest import snapshot

KEY = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGKv9eU0ZP4B9hTL2cHmy1oExGv3A0kQfJ9pA3d5m1Yh "
       "bob@laptop")


def apply(host: Host, text: str) -> ApplyReport:
    return apply_node(host, resolve(validate(load_text(text)), "n1", {}), "r", lock_timeout=1)


@pytest.fixture
def outside(tmp_path: Path) -> Iterator[Path]:
    """A directory outside every root: nothing may ever be written here."""
    path = tmp_path / "outside"
    (path / "etc").mkdir(parents=True)
    write(path / "etc/shadow", "root:secret:1::::::\n").chmod(0o640)
    before = snapshot(path, ("/",))
    yield path
    assert snapshot(path, ("/",)) == before, "divingbell wrote outside the root"


@pytest.fixture
def maze_host(tmp_path: Path, root: Path, resolver: str) -> Host:
    proc_sys = make_proc_sys(tmp_path / "proc_sys", {"vm/swappiness": "60"})
    return Host(root=root, proc_sys=proc_sys)


def plant(root: Path, where: str, target: Path | str) -> None:
    link = root / where.lstrip("/")
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)


@pytest.mark.parametrize(("where", "doc", "written"), [
    ("/etc/sysctl.d", "conf:\n  sysctl:\n    vm.swappiness: 10\n", "60-divingbell.conf"),
    ("/etc/security/limits.d",
     "conf:\n  limits:\n    nofile: {domain: '*', type: soft, item: nofile, value: 1024}\n",
     "60-divingbell-nofile.conf"),
    ("/var/lib/divingbell", "conf:\n  sysctl:\n    vm.swappiness: 10\n", "journal.json"),
    ("/var/lib/divingbell/exec", "conf:\n  exec:\n    fix: {data: 'true'}\n", "fix"),
    ("/etc", "conf:\n  sysctl:\n    vm.swappiness: 10\n", "sysctl.d/60-divingbell.conf"),
])
def test_absolute_symlinked_directories_stay_inside_the_root(
        maze_host: Host, outside: Path, where: str, doc: str, written: str) -> None:
    root = maze_host.root
    plant(root, where, outside)
    # The link's target as the host sees it: the same path, inside the root.
    (root / str(outside).lstrip("/")).mkdir(parents=True)
    apply(maze_host, doc)
    assert (root / str(outside).lstrip("/") / written).exists()


def test_a_dangling_absolute_symlink_is_a_clear_error(maze_host: Host, outside: Path) -> None:
    plant(maze_host.root, "/etc/sysctl.d", outside)  # exists outside the root only
    report = apply(maze_host, "conf:\n  sysctl:\n    vm.swappiness: 10\n")
    assert not report.ok
    assert "/etc/sysctl.d" in " ".join(report.errors)


def test_relative_symlinks_cannot_climb_out(maze_host: Host, outside: Path) -> None:
    root = maze_host.root
    depth = len(root.parts) + 3
    plant(root, "/etc/sysctl.d", "../" * depth + str(outside).lstrip("/"))
    (root / str(outside).lstrip("/")).mkdir(parents=True)
    apply(maze_host, "conf:\n  sysctl:\n    vm.swappiness: 10\n")
    assert (root / str(outside).lstrip("/") / "60-divingbell.conf").exists()


def test_perm_never_leaves_the_root(maze_host: Host, outside: Path) -> None:
    root = maze_host.root
    write(root / "etc/passwd", "root:x:0:0:root:/root:/bin/sh\n")
    write(root / "etc/group", "root:x:0:\n")
    plant(root, "/srv/data", outside / "etc")
    report = apply(maze_host, textwrap.dedent("""\
        conf:
          perm:
            paths:
              - {path: /srv/data/shadow, owner: root, group: root, permissions: '0777'}
              - {path: '/srv/data/*', owner: root, group: root, permissions: '0777'}
        """))
    # /srv/data leads to <root>/<outside>/etc, where there is no shadow: nothing to change.
    assert not report.ok and "no such file" in " ".join(report.errors)
    with pytest.raises(DocumentError, match=r"\.\."):
        validate(load_text("conf:\n  perm:\n    paths:\n      - {path: /../../x/etc/shadow, "
                           "owner: root, group: root, permissions: '0600'}\n"))


def test_perm_refuses_a_final_symlink(maze_host: Host, outside: Path) -> None:
    root = maze_host.root
    write(root / "etc/passwd", "root:x:0:0:root:/root:/bin/sh\n")
    write(root / "etc/group", "root:x:0:\n")
    plant(root, "/srv/file", outside / "etc/shadow")
    report = apply(maze_host, "conf:\n  perm:\n    paths:\n      - {path: /srv/file, owner: "
                   "root, group: root, permissions: '0777'}\n")
    assert "is a symlink" in " ".join(report.errors)
    with pytest.raises(UnsafePath):
        maze_host.set_owner_mode("/srv/file", 0, 0, 0o777)


def test_a_symlink_loop_is_an_error_not_a_hang(maze_host: Host) -> None:
    plant(maze_host.root, "/etc/sysctl.d", "/etc/sysctl.d")
    report = apply(maze_host, "conf:\n  sysctl:\n    vm.swappiness: 10\n")
    assert not report.ok
    assert "sysctl.d" in " ".join(report.errors)


# A user's own directories -------------------------------------------------------------------

def bob(host: Host) -> tuple[int, int]:
    host.run(["useradd", "--create-home", "--shell", "/bin/bash", "bob"])
    return host.user_ids("bob")


def keys_doc(extra: str = "") -> str:
    return textwrap.dedent(f"""\
        conf:
          uamlite:
            allow_lockout: true
            users:
              - user_name: bob
                user_sshkeys: ['{KEY}']
        """) + extra


@pytest.mark.parametrize("link", ["../../root/.ssh", "/root/.ssh"])
def test_a_users_ssh_symlink_never_reaches_roots_keys(debian_host: Host, link: str) -> None:
    """The privilege escalation: bob points ~/.ssh at /root/.ssh; the next apply must not
    write bob's key (owned by bob) into root's authorized_keys."""
    uid, gid = bob(debian_host)
    root_keys = write(debian_host.path("/root/.ssh/authorized_keys"), "ssh-ed25519 AAAA root\n")
    ssh = debian_host.path("/home/bob/.ssh")
    ssh.symlink_to(link)
    os.lchown(ssh, uid, gid)
    report = apply(debian_host, keys_doc())
    assert not report.ok
    assert "/home/bob/.ssh" in " ".join(report.errors)
    assert root_keys.read_text() == "ssh-ed25519 AAAA root\n"
    assert root_keys.stat().st_uid == 0


def test_a_home_that_is_a_symlink_is_refused(debian_host: Host) -> None:
    bob(debian_host)
    home = debian_host.path("/home/bob")
    subprocess.run(["rm", "-rf", str(home)], check=True)
    home.symlink_to("/root")
    report = apply(debian_host, keys_doc())
    assert not report.ok and "/home/bob" in " ".join(report.errors)
    assert not debian_host.path("/root/.ssh/authorized_keys").exists()


def test_an_ssh_directory_owned_by_someone_else_is_refused(debian_host: Host) -> None:
    bob(debian_host)
    ssh = debian_host.path("/home/bob/.ssh")
    ssh.mkdir(mode=0o700)
    os.chown(ssh, 4242, 4242)
    report = apply(debian_host, keys_doc())
    assert not report.ok and "uid 4242" in " ".join(report.errors)
    assert not (ssh / "authorized_keys").exists()


def test_authorized_keys_as_a_symlink_is_refused(debian_host: Host) -> None:
    uid, gid = bob(debian_host)
    ssh = debian_host.path("/home/bob/.ssh")
    ssh.mkdir(mode=0o700)
    os.chown(ssh, uid, gid)
    (ssh / "authorized_keys").symlink_to("/etc/shadow")
    shadow_before = debian_host.path("/etc/shadow").read_bytes()
    report = apply(debian_host, keys_doc())
    assert not report.ok and "symlink" in " ".join(report.errors)
    assert debian_host.path("/etc/shadow").read_bytes() == shadow_before


def test_keys_are_written_with_the_users_ownership(debian_host: Host) -> None:
    uid, gid = bob(debian_host)
    assert apply(debian_host, keys_doc()).ok
    keys = debian_host.path("/home/bob/.ssh/authorized_keys")
    assert (keys.stat().st_uid, keys.stat().st_gid) == (uid, gid)
    assert (keys.parent.stat().st_uid, oct(keys.parent.stat().st_mode & 0o777)) == (uid, "0o700")
    with pytest.raises(UnsafePath, match="uid 4242"):
        debian_host.write_atomic("/home/bob/.ssh/x", "x", user_dir=UserDir("/home/bob", 4242,
                                                                           4242))


# Modules that run tools: mounts, apparmor, apt ------------------------------------------------

def test_a_mount_target_through_a_symlink_is_refused(overlay_root: Path, outside: Path) -> None:
    host = Host(root=overlay_root)
    plant(overlay_root, "/mnt/maze", outside)
    report = apply(host, "conf:\n  mounts:\n    m:\n      mnt_tgt: /mnt/maze/data\n"
                   "      device: tmpfs\n      type: tmpfs\n")
    assert not report.ok and "symlink" in " ".join(report.errors)
    assert str(outside) not in Path("/proc/self/mountinfo").read_text()


def test_unit_files_follow_a_symlinked_unit_directory_inside_the_root(
        overlay_root: Path, outside: Path) -> None:
    host = Host(root=overlay_root)
    units = overlay_root / "etc/systemd/system"
    subprocess.run(["rm", "-rf", str(units)], check=True)
    units.symlink_to(outside)
    report = apply(host, "conf:\n  mounts:\n    m:\n      mnt_tgt: /mnt/maze-unit\n"
                   "      device: tmpfs\n      type: tmpfs\n")
    assert report.ok, report.errors
    assert (overlay_root / str(outside).lstrip("/") / "mnt-maze\\x2dunit.mount").exists()
    assert apply(host, "conf: {}\n").ok


def test_apparmor_profiles_stay_inside_the_root(overlay_root: Path, outside: Path) -> None:
    if not (overlay_root / "sbin/apparmor_parser").exists() and not (
            overlay_root / "usr/sbin/apparmor_parser").exists():
        pytest.skip("apparmor_parser is not installed (install apparmor with .ci/run)")
    host = Host(root=overlay_root)
    profiles = overlay_root / "etc/apparmor.d"
    moved = overlay_root / "srv/apparmor.d"
    moved.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cp", "-a", str(profiles), str(moved)], check=True)
    subprocess.run(["rm", "-rf", str(profiles)], check=True)
    profiles.symlink_to("/srv/apparmor.d")  # absolute: inside the root, not this machine's
    report = apply(host, "conf:\n  apparmor:\n    load: false\n    profiles:\n      dbmaze: |\n"
                   "        profile dbmaze /usr/bin/true {\n        }\n")
    assert report.ok, report.errors
    assert (moved / "dbmaze").exists()
    assert not Path("/srv/apparmor.d/dbmaze").exists()


def test_apt_sources_stay_inside_the_root(debian_host: Host, outside: Path) -> None:
    from tests.aptrepo import build_repo

    repo = build_repo(debian_host.root.parent.parent / "aptrepo")
    debian_host.path("/etc/apt/sources.list").write_text("")
    repo.install_into(debian_host.root)
    sources = debian_host.path("/etc/apt/sources.list.d")
    subprocess.run(["rm", "-rf", str(sources)], check=True)
    sources.symlink_to(outside)
    (debian_host.root / str(outside).lstrip("/")).mkdir(parents=True)  # as apt sees it
    key = textwrap.indent(repo.key, " " * 10).rstrip("\n")
    from tests.aptrepo import REPO_PATH

    report = apply(debian_host, "conf:\n  apt:\n    repositories:\n      local:\n"
                   f"        url: file:{REPO_PATH}\n        distributions: [./]\n"
                   f"        gpgkey: |\n{key}\n")
    assert report.ok, report.errors
    inside = debian_host.root / str(outside).lstrip("/")
    assert [p.name for p in inside.iterdir()] == ["divingbell-local.sources"]


def test_ethtool_units_stay_inside_the_root(netns: object, ns_cli: object, overlay_root: Path,
                                            outside: Path, tmp_path: Path) -> None:
    from tests.conftest import Cli, NetNs, require_root_tools

    assert isinstance(netns, NetNs) and isinstance(ns_cli, Cli)
    require_root_tools("ethtool")
    subprocess.run(["ip", "-n", netns.name, "link", "add", "va", "type", "veth", "peer",
                    "name", "vb"], check=True)
    units = overlay_root / "etc/systemd/system"
    subprocess.run(["rm", "-rf", str(units)], check=True)
    units.symlink_to(outside)
    (overlay_root / str(outside).lstrip("/")).mkdir(parents=True, exist_ok=True)
    doc = write(tmp_path / "doc.yaml", "conf:\n  ethtool:\n    va:\n"
                "      tx-tcp-segmentation: off\n")
    result = ns_cli("apply", doc, "--root", overlay_root, "--node", "n1")
    assert result.returncode == 0, result.stdout + result.stderr
    inside = overlay_root / str(outside).lstrip("/")
    assert any(p.name.startswith("divingbell-ethtool-") for p in inside.iterdir())


def test_perm_follows_no_symlink_a_user_planted(maze_host: Host) -> None:
    """perm may name paths under a user's directory; the user must not be able to redirect
    the chown (to /etc/shadow) with a symlink of their own, planted before or after plan."""
    root = maze_host.root
    write(root / "etc/passwd", "root:x:0:0:root:/root:/bin/sh\nbob:x:1000:1000::/home/bob:/bin/sh\n")
    write(root / "etc/group", "root:x:0:\nbob:x:1000:\n")
    shadow = write(root / "etc/shadow", "root:*:1::::::\n")
    shadow.chmod(0o640)
    write(root / "home/bob/data/shadow", "bob's own file\n")
    doc = ("conf:\n  perm:\n    paths:\n      - {path: /home/bob/data/shadow, owner: bob, "
           "group: bob, permissions: '0666'}\n")
    subprocess.run(["rm", "-rf", str(root / "home/bob/data")], check=True)
    plant(root, "/home/bob/data", "/etc")
    os.lchown(root / "home/bob/data", 1000, 1000)
    report = apply(maze_host, doc)
    assert not report.ok and "owned by uid 1000" in " ".join(report.errors)
    with pytest.raises(UnsafePath):
        maze_host.set_owner_mode("/home/bob/data/shadow", 1000, 1000, 0o666)
    info = shadow.stat()
    assert (oct(info.st_mode & 0o777), info.st_uid) == ("0o640", 0)
    # root's own symlinks (/var/run -> /run, /lib -> usr/lib) are followed as before.
    (root / "home/bob/data").unlink()
    plant(root, "/home/bob/data", "/etc")
    assert maze_host.lstat("/home/bob/data/shadow", root_links_only=True) is not None


def test_perm_refuses_a_file_with_several_hard_links(maze_host: Host) -> None:
    # Where fs.protected_hardlinks is off, bob can link /etc/shadow into his home; a perm
    # entry for that name would hand him the shadow file. Refused at plan, and at apply too
    # (the link may appear after the plan).
    root = maze_host.root
    write(root / "etc/passwd", "root:x:0:0:root:/root:/bin/sh\nbob:x:1002:1002::/home/bob:/bin/sh\n")
    write(root / "etc/group", "root:x:0:\nbob:x:1002:\n")
    shadow = write(root / "etc/shadow", "root:$6$x$y:1::::::\n")
    shadow.chmod(0o640)
    (root / "home/bob").mkdir(parents=True)
    os.link(shadow, root / "home/bob/notes")
    report = apply(maze_host, "conf:\n  perm:\n    paths:\n      - {path: /home/bob/notes, "
                   "owner: bob, group: bob, permissions: '0644'}\n")
    assert not report.ok and "/home/bob/notes: has more than one hard link" in " ".join(
        report.errors)
    with pytest.raises(UnsafePath):
        maze_host.set_owner_mode("/home/bob/notes", 1002, 1002, 0o644)
    info = shadow.stat()
    assert (info.st_uid, info.st_gid, info.st_mode & 0o7777) == (0, 0, 0o640)
