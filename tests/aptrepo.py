"""A small signed apt repository built from scratch, so apt tests need no network.

Packages are made with dpkg-deb, indexed with apt-ftparchive and signed with a throwaway gpg
key, the way a real repository is; hosts trust it through the key, never `[trusted=yes]`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_PATH = "/srv/repo"

ASK_TEMPLATES = """\
Template: dbt-ask/greeting
Type: string
Default: hello
Description: Greeting to write to /etc/dbt-ask.conf
 The test package writes this answer into its config file.
"""
ASK_CONFIG = """\
#!/bin/sh
set -e
. /usr/share/debconf/confmodule
db_input medium dbt-ask/greeting || true
db_go || true
"""
ASK_POSTINST = """\
#!/bin/sh
set -e
. /usr/share/debconf/confmodule
db_get dbt-ask/greeting
echo "$RET" > /etc/dbt-ask.conf
"""
NEEDS_REBOOT_POSTINST = """\
#!/bin/sh
set -e
echo '*** System restart required ***' > /run/reboot-required
echo dbt-hello >> /run/reboot-required.pkgs
"""


@dataclass(frozen=True)
class Deb:
    name: str
    version: str
    depends: str = ""
    scripts: tuple[tuple[str, str], ...] = ()
    conffile: str | None = None  # makes `dpkg --remove` leave it in rc state
    files: tuple[tuple[str, str, int], ...] = ()  # (path, content, mode) shipped as they are


PACKAGES = (
    Deb("dbt-hello", "1:1.0-1"),
    Deb("dbt-hello", "1:2.0-1", scripts=(("postinst", NEEDS_REBOOT_POSTINST),)),
    Deb("dbt-lib", "1.0"),
    Deb("dbt-tool", "1.0", depends="dbt-lib"),
    Deb("dbt-extra", "1.0"),
    Deb("dbt-needs-extra", "1.0", depends="dbt-extra"),
    Deb("dbt-ask", "1.0", depends="debconf",
        scripts=(("templates", ASK_TEMPLATES), ("config", ASK_CONFIG),
                 ("postinst", ASK_POSTINST)), conffile="/etc/dbt-ask.defaults"),
)


@dataclass(frozen=True)
class Repo:
    path: Path          # the repository on this machine: copy it to REPO_PATH in a test root
    key: str            # its ASCII-armored public key

    def install_into(self, root: Path) -> None:
        target = root / REPO_PATH.lstrip("/")
        shutil.copytree(self.path, target)
        for directory in (target, target.parent):
            directory.chmod(0o755)


def build_deb(deb: Deb, out: Path, work: Path) -> Path:
    tree = work / f"{deb.name}-{deb.version.replace(':', '_')}"
    (tree / "DEBIAN").mkdir(parents=True)
    share = tree / "usr/share" / deb.name
    share.mkdir(parents=True)
    (share / "version").write_text(deb.version + "\n")
    control = [f"Package: {deb.name}", f"Version: {deb.version}", "Architecture: all",
               "Maintainer: divingbell tests <tests@divingbell.invalid>", "Priority: optional",
               "Section: misc", f"Description: divingbell test package {deb.name}"]
    if deb.depends:
        control.append(f"Depends: {deb.depends}")
    (tree / "DEBIAN/control").write_text("\n".join(control) + "\n")
    if deb.conffile:
        conf = tree / deb.conffile.lstrip("/")
        conf.parent.mkdir(parents=True, exist_ok=True)
        conf.write_text("# defaults\n")
        (tree / "DEBIAN/conffiles").write_text(deb.conffile + "\n")
    for path, content, mode in deb.files:
        shipped = tree / path.lstrip("/")
        shipped.parent.mkdir(parents=True, exist_ok=True)
        shipped.write_text(content)
        shipped.chmod(mode)
    for name, text in deb.scripts:
        script = tree / "DEBIAN" / name
        script.write_text(text)
        script.chmod(0o755 if text.startswith("#!") else 0o644)
    target = out / f"{deb.name}_{deb.version.split(':')[-1]}_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(tree),
                    str(target)], check=True, capture_output=True)
    return target


def build_repo(base: Path, packages: tuple[Deb, ...] = PACKAGES,
               extra_debs: tuple[Path, ...] = ()) -> Repo:
    """A signed flat repository of `packages` (built here) and `extra_debs` (copied in)."""
    for tool in ("dpkg-deb", "apt-ftparchive", "gpg"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool} (installed by .ci/run)")
    repo = base / "repo"
    repo.mkdir(parents=True)
    for deb in packages:
        build_deb(deb, repo, base / "build")
    for path in extra_debs:
        shutil.copy(path, repo / path.name)
    home = base / "gnupg"
    home.mkdir(mode=0o700)
    env = {**os.environ, "GNUPGHOME": str(home)}
    gpg = ["gpg", "--batch", "--quiet", "--pinentry-mode", "loopback", "--passphrase", ""]

    def run(argv: list[str]) -> str:
        return subprocess.run(argv, cwd=repo, env=env, check=True, capture_output=True,
                              text=True).stdout

    try:
        run([*gpg, "--quick-gen-key", "divingbell test repo <repo@divingbell.invalid>",
             "ed25519", "sign", "never"])
        (repo / "Packages").write_text(run(["apt-ftparchive", "packages", "."]))
        (repo / "Release").write_text(run(["apt-ftparchive", "-o", "APT::FTPArchive::Release::"
                                           "Origin=divingbell-tests", "release", "."]))
        run([*gpg, "--clearsign", "-o", "InRelease", "Release"])
        key = run(["gpg", "--batch", "--armor", "--export"])
    finally:
        subprocess.run(["gpgconf", "--kill", "all"], env=env, check=False, capture_output=True)
    return Repo(repo, key)
