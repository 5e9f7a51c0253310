"""What an air-gapped site holds, built here from the kube assets (tests/kube/controlplane.py)
with no network: a signed apt repository of `kubelet` and `kubectl` packaged with dpkg-deb, and
a local registry (Debian's `docker-registry` on loopback) holding the control-plane images,
each one static binary packed with `umoci` and pushed with `skopeo`, and a pause image (the
pod sandbox containerd's `sandbox_image` names) from a few lines of C built with `gcc -static`.

The .debs and the OCI layouts are cached under the test cache, keyed by the binaries'
SHA256SUMS, so a later session only starts the registry and pushes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.aptrepo import Repo, build_repo
from tests.booted import CACHE
from tests.kube import controlplane

DEB_VERSION = controlplane.VERSION.removeprefix("v") + "-1"
IMAGES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")
ETCD_TAG = "v3.6.0"
PAUSE_TAG = "3.10"
# The pod sandbox's process: sleeps until told to stop, reaping what is reparented to it.
PAUSE_C = r"""
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int signal_number) { (void)signal_number; _exit(0); }
static void reap(int signal_number) {
    (void)signal_number;
    while (waitpid(-1, NULL, WNOHANG) > 0) {}
}

int main(void) {
    signal(SIGINT, stop);
    signal(SIGTERM, stop);
    signal(SIGCHLD, reap);
    if (getpid() != 1) {
        /* a pod with hostPID: true shares the node's PID namespace; Kubernetes' pause only
           warns then too */
        fprintf(stderr, "Warning: pause should be the first process\n");
    }
    for (;;) {
        pause();
    }
}
"""
KUBELET_UNIT = """\
[Unit]
Description=kubelet: the Kubernetes node agent
Wants=network-online.target
After=network-online.target

[Service]
ExecStart=/usr/bin/kubelet
Restart=always
RestartSec=2

[Install]
WantedBy=multi-user.target
"""


def require(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool} (installed by .ci/run)")


def binary(name: str) -> Path:
    """A kube binary: the control plane's from `controlplane.assets()`; the kubelet, which the
    control-plane tests do not need, from the same place, unpacked once and checked."""
    try:
        directory = controlplane.assets()
    except controlplane.AssetsMissing as missing:
        pytest.skip(str(missing))
    if (directory / name).exists():
        return directory / name
    shared = next((p for p in controlplane._shared_candidates()
                   if (p / f"{name}.xz").exists()), None)
    if shared is None:
        pytest.skip(f"no {name} beside the kube assets: {controlplane.HOW_TO_GET}")
    expected = {n: d for d, n in (line.split() for line in
                                  (shared / "SHA256SUMS").read_text().splitlines() if line)}
    target = directory / name
    with (directory / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.exists():
            partial = directory / f".{name}.partial"
            with partial.open("wb") as out:
                subprocess.run(["xz", "-dc", shared / f"{name}.xz"], stdout=out, check=True)
            assert controlplane._sha256(partial) == expected[name], f"{name}.xz is corrupt"
            partial.chmod(0o755)
            partial.rename(target)
    return target


def _key() -> str:
    sums = "".join(controlplane._sha256(binary(n)) for n in ("kubelet", "kubectl", *IMAGES))
    return hashlib.sha256(sums.encode()).hexdigest()[:12]


@contextlib.contextmanager
def _cached(name: str) -> Iterator[tuple[Path, bool]]:
    """(directory, ready): build into it when not ready; it is renamed in place only whole."""
    CACHE.mkdir(parents=True, exist_ok=True)
    final = CACHE / name
    with (CACHE / f".{name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if final.is_dir():
            yield final, True
            return
        partial = CACHE / f"{name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        yield partial, False
        partial.rename(final)


def kube_debs() -> tuple[Path, ...]:
    """kubelet and kubectl as Debian packages (amd64, the static binaries plus the kubelet's
    unit), built with dpkg-deb once."""
    require("dpkg-deb")
    with _cached(f"kube-debs-{_key()}") as (directory, ready):
        if not ready:
            for name, files in (("kubelet", (("usr/bin/kubelet", binary("kubelet"), 0o755),
                                              ("lib/systemd/system/kubelet.service",
                                               KUBELET_UNIT, 0o644))),
                                ("kubectl", (("usr/bin/kubectl", binary("kubectl"), 0o755),))):
                tree = directory / "build" / name
                (tree / "DEBIAN").mkdir(parents=True)
                for path, source, mode in files:
                    target = tree / path
                    target.parent.mkdir(parents=True, exist_ok=True)
                    if isinstance(source, Path):
                        shutil.copy(source, target)
                    else:
                        target.write_text(source)
                    target.chmod(mode)
                (tree / "DEBIAN/control").write_text(
                    f"Package: {name}\nVersion: {DEB_VERSION}\nArchitecture: amd64\n"
                    "Maintainer: divingbell tests <tests@divingbell.invalid>\n"
                    "Section: admin\nPriority: optional\n"
                    f"Description: Kubernetes {name} {controlplane.VERSION} (static binary)\n")
                subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "-z1", "--build",
                                str(tree), str(directory / f"{name}_{DEB_VERSION}_amd64.deb")],
                               check=True, capture_output=True)
            shutil.rmtree(directory / "build")
    return tuple(sorted((CACHE / f"kube-debs-{_key()}").glob("*.deb")))


def kube_apt_repo(base: Path) -> Repo:
    """A signed flat repository holding kubelet and kubectl."""
    return build_repo(base, packages=(), extra_debs=kube_debs())


def image_layouts() -> Path:
    """One OCI layout holding an image per control-plane component, tagged `<name>`: the
    static binary in /usr/local/bin, as the entrypoint. Built once with umoci."""
    require("umoci")
    with _cached(_layouts_name()) as (directory, ready):
        if not ready:
            layout = directory / "layout"
            subprocess.run(["umoci", "init", "--layout", layout], check=True)
            for name in IMAGES:
                bundle = directory / f"bundle-{name}"
                for argv in (["umoci", "new", "--image", f"{layout}:{name}"],
                             ["umoci", "unpack", "--image", f"{layout}:{name}", str(bundle)]):
                    subprocess.run(argv, check=True, capture_output=True)
                target = bundle / "rootfs/usr/local/bin" / name
                target.parent.mkdir(parents=True)
                shutil.copy(binary(name), target)
                target.chmod(0o755)
                for argv in (["umoci", "repack", "--image", f"{layout}:{name}", str(bundle)],
                             ["umoci", "config", "--image", f"{layout}:{name}",
                              f"--config.entrypoint=/usr/local/bin/{name}",
                              "--author=divingbell tests", "--created=2026-01-01T00:00:00Z"],
                             ["umoci", "gc", "--layout", str(layout)]):
                    subprocess.run(argv, check=True, capture_output=True)
                shutil.rmtree(bundle)
            _pause_image(directory, layout)
    return CACHE / _layouts_name() / "layout"


def _layouts_name() -> str:
    """The binaries' digests and the pause source's: a changed pause.c is a new image."""
    return f"kube-images-{_key()}-pause-{hashlib.sha256(PAUSE_C.encode()).hexdigest()[:8]}"


def _pause_image(directory: Path, layout: Path) -> None:
    require("gcc")
    source = directory / "pause.c"
    source.write_text(PAUSE_C)
    bundle = directory / "bundle-pause"
    for argv in (["umoci", "new", "--image", f"{layout}:pause"],
                 ["umoci", "unpack", "--image", f"{layout}:pause", str(bundle)]):
        subprocess.run(argv, check=True, capture_output=True)
    subprocess.run(["gcc", "-static", "-Os", "-Wall", "-Werror", "-o",
                    str(bundle / "rootfs/pause"), str(source)], check=True, capture_output=True)
    for argv in (["umoci", "repack", "--image", f"{layout}:pause", str(bundle)],
                 ["umoci", "config", "--image", f"{layout}:pause", "--config.entrypoint=/pause",
                  "--author=divingbell tests", "--created=2026-01-01T00:00:00Z"],
                 ["umoci", "gc", "--layout", str(layout)]):
        subprocess.run(argv, check=True, capture_output=True)
    shutil.rmtree(bundle)


@dataclass
class Registry:
    """Debian's docker-registry on loopback (or in a network namespace), storing in a test
    directory."""

    address: str
    process: subprocess.Popen[bytes]
    log: Path
    digests: dict[str, str] = field(default_factory=dict)  # repository:tag -> digest
    netns: str | None = None  # where it listens, and where skopeo must run to reach it

    def _inside(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *argv] if self.netns else argv

    def push(self, layout: Path, tag: str, repository: str) -> str:
        """Copy `layout:tag` to `repository` here; its manifest digest."""
        return self.copy(f"oci:{layout}:{tag}", repository)

    def copy(self, source: str, repository: str) -> str:
        """Copy a skopeo `source` (`oci:...`, `docker-archive:...`) to `repository` here; its
        manifest digest."""
        destination = f"docker://{self.address}/{repository}"
        subprocess.run(self._inside(["skopeo", "copy", "--quiet", "--dest-tls-verify=false",
                                     source, destination]),
                       check=True, capture_output=True)
        inspected = subprocess.run(
            self._inside(["skopeo", "inspect", "--tls-verify=false", destination]),
            check=True, capture_output=True, text=True).stdout
        digest: str = json.loads(inspected)["Digest"]
        self.digests[repository] = digest
        return digest

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@contextlib.contextmanager
def registry(directory: Path, netns: str | None = None, listen: str = "127.0.0.1",
             port: int | None = None) -> Iterator[Registry]:
    """The registry on `listen`:`port` (a free one by default), inside `netns` if given: a
    site's registry that machines on a bridge reach."""
    require("docker-registry", "skopeo")
    port = port or controlplane.free_port()
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "config.yml"
    config.write_text(json.dumps({
        "version": 0.1, "log": {"level": "warn"},
        "storage": {"filesystem": {"rootdirectory": str(directory / "storage")},
                    "delete": {"enabled": True}},
        "http": {"addr": f"{listen}:{port}"}}))
    log = directory / "registry.log"
    with log.open("wb") as out:
        inside = ["ip", "netns", "exec", netns] if netns else []
        process = subprocess.Popen([*inside, "docker-registry", "serve", str(config)],
                                   stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    running = Registry(f"{listen}:{port}", process, log, netns=netns)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, f"docker-registry exited: {log.read_text()[-2000:]}"
            if netns:
                probe = subprocess.run(
                    [*inside, sys.executable, "-c", "import sys, urllib.request; "
                     "urllib.request.urlopen(sys.argv[1], timeout=2)",
                     f"http://{running.address}/v2/"], capture_output=True, check=False)
                if probe.returncode == 0:
                    break
            else:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"http://{running.address}/v2/",
                                 timeout=2).status_code == 200:
                        break
            assert time.monotonic() < deadline, "docker-registry did not answer in 30 s"
            time.sleep(0.1)
        yield running
    finally:
        running.stop()


def push_control_plane(running: Registry, prefix: str = "kube") -> dict[str, str]:
    """Every control-plane image and the pause image pushed as <prefix>/<name>:<tag> (the design's naming);
    image reference -> digest."""
    layout = image_layouts()
    pushed = {}
    for name in (*IMAGES, "pause"):
        tag = {"etcd": ETCD_TAG, "pause": PAUSE_TAG}.get(name, controlplane.VERSION)
        reference = f"{prefix}/{name}:{tag}"
        pushed[f"{running.address}/{reference}"] = running.push(layout, name, reference)
    return pushed
