"""Real Kubernetes nodes for the tests: a booted systemd-nspawn machine (systemd, containerd,
runc, the real kubelet from the kube assets) joined to the session's control plane.

What this machine needs, each row of ../shared/kube/README.md ("A real node"), and where:
- PID 1 here is not systemd: `--register=no --keep-unit`; the node's cgroups are made by us
  in every v1 hierarchy under our own cgroup, the supervising shell moved in; stopped with
  SIGRTMIN+4 to the node's init (a systemd poweroff). `Node.boot`, `Node.stop`.
- cgroup v1: kubelet `failCgroupV1: false`, `cgroupDriver: cgroupfs`; containerd without
  systemd cgroups; nspawn's read-only v1 hierarchies remounted read-write at boot
  (`node-prep`).
- no CAP_SYS_RESOURCE: containerd's `restrict_oom_score_adj`.
- nspawn's seccomp filter and read-only /proc/sys: SYSTEMD_SECCOMP=0, `--capability=all`,
  SYSTEMD_NSPAWN_API_VFS_WRITABLE=network (only the node's own net.* writable).
- the kubelet's machine-wide sysctls: files holding the values it wants, bind-mounted over
  those /proc/sys entries at boot (`node-prep`): it finds them set and writes nothing.
- privileged pods see the machine's kernel: runc is wrapped (containerd's BinaryName) so
  every container gets readonlyPaths over /proc/sys (all but net), /proc/sysrq-trigger and
  /sys. Tests that change sysctls use net.* keys.
- /dev/kmsg bound read-only for the kubelet's OOM watcher.
- the apiserver listens on the machine's 127.0.0.1: forwarders listen inside the node's network
  namespace, on 127.0.0.1:6443 (the kubelet) and the node's address (pods), and the
  `kubernetes` Service 10.0.0.1:443 is DNATed there.
- no registry: images built here (a pause image from a few lines of C, static; the divingbell
  image from deploy/build-image), packed as docker archives, imported into containerd's k8s.io
  namespace at every boot.
- RBAC only: the kubelet's client certificate is `system:node:NAME` in `system:nodes`, bound
  to the `system:node` ClusterRole.
- nspawn exits 133 when the node reboots: the supervising shell boots it again, its cgroups
  emptied in between (the kubelet stalls on a previous boot's kubepods).
- pods ignoring SIGTERM: `DefaultTimeoutStopSec=10s`.

The root is a debootstrap bookworm (cached as a tarball, under a lock), extracted once per
session; each node boots an overlay of it on a tmpfs, with containerd's state on a tmpfs of its
own (containerd's overlay snapshots cannot live on an overlay). Everything is undone by `stop`:
the container, its cgroups, mounts, forwarders and network namespace.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import pytest
import yaml

from tests.booted import CACHE, debian_tarball, extract, remove_cgroup
from tests.kube.controlplane import (
    ApiError,
    AssetsMissing,
    Ca,
    ControlPlane,
    kubeconfig,
    kubelet_binary,
)
from tests.kube.standin import FORWARDED_PORT, Forwarder

NODE_PACKAGES = ("systemd", "systemd-sysv", "dbus", "containerd", "runc",
                 "containernetworking-plugins", "iptables", "iproute2", "jq")
PAUSE_IMAGE = "divingbell.test/pause:1"
SERVICE_IP = "10.0.0.1"  # the `kubernetes` Service (tests/kube/controlplane.py's range)
SERVICE_RANGE = "10.0.0.0/24"
POD_SUBNET = "10.88.0.0/16"
IMAGES_IN_NODE = "/opt/node-images"
# What the kubelet wants these machine-wide sysctls to be (it writes them otherwise).
KUBELET_SYSCTLS = {"vm/overcommit_memory": "1", "vm/panic_on_oom": "0", "kernel/panic": "10",
                   "kernel/panic_on_oops": "1", "kernel/keys/root_maxkeys": "1000000",
                   "kernel/keys/root_maxbytes": "25000000"}
READONLY_PATHS = [*(f"/proc/sys/{name}" for name in
                    ("abi", "debug", "dev", "fs", "kernel", "user", "vm")),
                  "/proc/sysrq-trigger",
                  *(f"/sys/{name}" for name in ("block", "bus", "devices", "firmware",
                                                "hypervisor", "kernel", "module", "power"))]

# The sandbox's init: exits on SIGINT/SIGTERM, reaps children, sleeps otherwise.
PAUSE_C = r"""
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int sig) { (void)sig; _exit(0); }
static void reap(int sig) { (void)sig; while (waitpid(-1, NULL, WNOHANG) > 0) {} }

int main(void) {
    struct sigaction down = {.sa_handler = stop};
    struct sigaction child = {.sa_handler = reap, .sa_flags = SA_NOCLDSTOP};
    if (sigaction(SIGINT, &down, NULL) || sigaction(SIGTERM, &down, NULL)
        || sigaction(SIGCHLD, &child, NULL))
        return 1;
    for (;;)
        pause();
}
"""

# What the runc wrapper does to every container's OCI config: read-only paths over the
# machine's kernel tunables and devices (a privileged pod here shares the machine's kernel;
# /proc/sys/net stays writable, it is the node's own), and a hook that shows the container the
# node's boot id: nspawn gives each boot of the node its own, over
# /proc/sys/kernel/random/boot_id, but a container's fresh /proc would show the machine's, which
# no reboot of the node changes. (runc refuses an OCI mount inside /proc; a createContainer
# hook runs in the container's mount namespace before pivot_root, where the node's /proc is
# still in sight.)
OCI_EDIT = f"""
.linux.readonlyPaths = ((.linux.readonlyPaths // []) + {json.dumps(READONLY_PATHS)} | unique)
| .hooks.createContainer = ((.hooks.createContainer // [])
                            + [{{"path": "/usr/local/sbin/node-boot-id"}}])
"""

BOOT_ID_HOOK = """#!/bin/sh
# An OCI createContainer hook: the node's boot id over the container's (see OCI_EDIT). nspawn's
# boot id file is an unlinked one, which cannot be bind-mounted: node-prep copies it to /run.
set -e
bundle=$(jq -r .bundle)
root=$(jq -r .root.path "$bundle/config.json")
case "$root" in /*) ;; *) root="$bundle/$root" ;; esac
target="$root/proc/sys/kernel/random/boot_id"
mount --bind /run/node-boot-id "$target"
mount -o remount,bind,ro "$target"
"""

RUNC_WRAPPER = """#!/bin/sh
# containerd's runc, through /usr/local/lib/oci-edit.jq (tests/kube/node.py says why).
bundle=
previous=
for arg in "$@"; do
  case "$previous" in --bundle|-b) bundle=$arg ;; esac
  case "$arg" in --bundle=*) bundle=${arg#--bundle=} ;; esac
  previous=$arg
done
if [ -n "$bundle" ] && [ -f "$bundle/config.json" ]; then
  jq -f /usr/local/lib/oci-edit.jq "$bundle/config.json" > "$bundle/config.json.edit" &&
    mv "$bundle/config.json.edit" "$bundle/config.json"
fi
exec /usr/sbin/runc "$@"
"""

NODE_PREP = """#!/bin/sh
# Before containerd and the kubelet, at every boot of a test node (tests/kube/node.py).
set -e
for hierarchy in /sys/fs/cgroup/*; do
  mount -o remount,bind,rw "$hierarchy"
done
cat /proc/sys/kernel/random/boot_id > /run/node-boot-id
for file in /etc/kubelet-sysctls/*; do
  mount --bind "$file" "/proc/sys/$(basename "$file" | tr . /)"
done
"""

IMPORT_IMAGES = f"""#!/bin/sh
# Images come from files, never a registry: import them into the kubelet's namespace.
for archive in {IMAGES_IN_NODE}/*.tar; do
  [ -e "$archive" ] && ctr -n k8s.io images import --no-unpack=false "$archive"
done
exit 0
"""


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def node_tarball() -> Path:
    with locked(CACHE / ".node-root.lock"):
        return debian_tarball(NODE_PACKAGES)


def docker_archive(layout: Path, tag: str, name: str, out: Path) -> Path:
    """An OCI layout's image as a docker archive named `name` (what `ctr import` names it)."""
    partial = out.with_suffix(".partial")
    partial.unlink(missing_ok=True)
    subprocess.run(["skopeo", "copy", "-q", f"oci:{layout}:{tag}",
                    f"docker-archive:{partial}:{name}"], check=True, capture_output=True)
    partial.rename(out)
    return out


def pause_image() -> Path:
    """The sandbox image: PAUSE_C built static, alone in an image (cached)."""
    key = hashlib.sha256(PAUSE_C.encode()).hexdigest()[:12]
    out = CACHE / "node-images" / f"pause-{key}.tar"
    with locked(CACHE / "node-images" / ".lock"):
        if out.exists():
            return out
        with tempfile.TemporaryDirectory() as scratch:
            work = Path(scratch)
            (work / "pause.c").write_text(PAUSE_C)
            layout, bundle = work / "layout", work / "bundle"
            subprocess.run(["umoci", "init", "--layout", layout], check=True)
            subprocess.run(["umoci", "new", "--image", f"{layout}:1"], check=True)
            subprocess.run(["umoci", "unpack", "--image", f"{layout}:1", bundle], check=True,
                           capture_output=True)
            subprocess.run(["gcc", "-static", "-O2", "-o", bundle / "rootfs/pause",
                            work / "pause.c"], check=True)
            subprocess.run(["umoci", "repack", "--image", f"{layout}:1", bundle], check=True)
            subprocess.run(["umoci", "config", "--image", f"{layout}:1",
                            "--config.entrypoint", "/pause"], check=True)
            return docker_archive(layout, "1", PAUSE_IMAGE, out)


def _own_cgroups() -> dict[str, str]:
    """Each mounted v1 hierarchy (and the unified one) -> this process's path in it."""
    paths: dict[str, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else ["unified"]:
            paths[controller.removeprefix("name=")] = path
    found = {}
    for hierarchy in Path("/sys/fs/cgroup").iterdir():
        names = hierarchy.name.split(",")
        own = next((paths[n] for n in names if n in paths), None)
        if own is not None and hierarchy.is_dir() and not hierarchy.is_symlink():
            found[hierarchy.name] = own
    return found


def containerd_config(sandbox_image: str, registry_config_path: str | None = None) -> str:
    """containerd as this host needs it: runc through the wrapper (RUNC_WRAPPER), cgroupfs
    rather than systemd's cgroups, CNI from Debian's plugins."""
    registry = ("" if registry_config_path is None else
                '  [plugins."io.containerd.grpc.v1.cri".registry]\n'
                f'    config_path = "{registry_config_path}"\n')
    return f"""version = 2
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{sandbox_image}"
  restrict_oom_score_adj = true
{registry}  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
      BinaryName = "/usr/local/sbin/runc"
      SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "/etc/cni/net.d"
"""

@dataclass
class Node:
    """One real node: `boot` it, `stop` it (everything undone)."""

    name: str
    index: int
    # None: a bare machine (systemd, containerd, this machine's workarounds) that a test
    # makes a node itself, e.g. with a bootstrap script that installs the kubelet.
    plane: ControlPlane | None
    lower: Path  # the extracted node root (shared, never written)
    base: Path  # this node's tmpfs: overlay layers, containerd's state
    images: list[Path]
    kubelet: Path | None
    netns: str = ""
    process: subprocess.Popen[bytes] | None = None
    cgroups: list[Path] = field(default_factory=list)
    forwarders: list[Forwarder] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"10.233.{self.index}.1"

    @property
    def root(self) -> Path:
        return self.base / "merged"

    # Building -----------------------------------------------------------------------------

    def prepare(self) -> None:
        """The node's filesystem and network namespace, before the first boot."""
        self.base.mkdir(parents=True)
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", self.base], check=True)
        for name in ("upper", "work", "merged", "containerd", "pki"):
            (self.base / name).mkdir()
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={self.lower},upperdir={self.base}/upper,"
                        f"workdir={self.base}/work", self.root], check=True)
        # Unique per machine of this process: a session's real-node pair and a test's own
        # machines (the genesis proof) are alive at the same time on one worker.
        self.netns = f"dbn-{os.getpid()}-{self.name}"
        subprocess.run(["ip", "netns", "add", self.netns], check=True)
        if self.plane is None:
            subprocess.run(["ip", "-n", self.netns, "link", "set", "lo", "up"], check=True)
            self._write_machine_files()
            return
        # The Service range routed (to lo) so that connecting to it reaches the DNAT at all.
        for argv in (["link", "set", "lo", "up"],
                     ["addr", "add", f"{self.address}/32", "dev", "lo"],
                     ["route", "add", SERVICE_RANGE, "dev", "lo"]):
            subprocess.run(["ip", "-n", self.netns, *argv], check=True)
        for chain in ("OUTPUT", "PREROUTING"):
            subprocess.run(["ip", "netns", "exec", self.netns, "iptables", "-t", "nat", "-A",
                            chain, "-d", f"{SERVICE_IP}/32", "-p", "tcp", "--dport", "443",
                            "-j", "DNAT", "--to-destination",
                            f"{self.address}:{FORWARDED_PORT}"], check=True)
        port = int(self.plane.server.rsplit(":", 1)[1])
        self.forwarders = [Forwarder(self.netns, port),
                           Forwarder(self.netns, port, address=self.address)]
        self._write_machine_files()
        self._write_kubelet_files(self.plane, Ca.load(self.plane.ca_path))

    def _write(self, path: str, text: str, mode: int = 0o644) -> None:
        target = self.root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        target.chmod(mode)

    def _enable(self, unit: str, text: str) -> None:
        self._write(f"/etc/systemd/system/{unit}", text)
        wants = self.root / "etc/systemd/system/multi-user.target.wants"
        wants.mkdir(parents=True, exist_ok=True)
        (wants / unit).unlink(missing_ok=True)
        (wants / unit).symlink_to(f"/etc/systemd/system/{unit}")

    def _write_machine_files(self) -> None:
        """What every machine needs on this kind of host (the module's docstring)."""
        self._write("/etc/hostname", f"{self.name}\n")
        self._write("/etc/resolv.conf", "")
        self._write("/etc/systemd/system.conf.d/stop-timeout.conf",
                    "[Manager]\nDefaultTimeoutStopSec=10s\n")
        for name, value in KUBELET_SYSCTLS.items():
            self._write(f"/etc/kubelet-sysctls/{name.replace('/', '.')}", f"{value}\n")
        self._write("/usr/local/sbin/node-prep", NODE_PREP, 0o755)
        self._write("/usr/local/sbin/import-images", IMPORT_IMAGES, 0o755)
        self._write("/usr/local/sbin/runc", RUNC_WRAPPER, 0o755)
        self._write("/usr/local/lib/oci-edit.jq", OCI_EDIT)
        self._write("/usr/local/sbin/node-boot-id", BOOT_ID_HOOK, 0o755)
        self._write("/etc/containerd/config.toml", containerd_config(PAUSE_IMAGE))
        self._write("/etc/cni/net.d/10-pods.conflist", json.dumps({
            "cniVersion": "1.0.0", "name": "pods", "plugins": [
                {"type": "bridge", "bridge": "cni0", "isGateway": True, "ipMasq": False,
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_SUBNET}]],
                          "routes": [{"dst": "0.0.0.0/0"}]}},
                {"type": "portmap", "capabilities": {"portMappings": True}}]}))
        self._enable("node-prep.service", """[Unit]
Description=test node: cgroups writable, kubelet sysctls in place
DefaultDependencies=no
Before=containerd.service kubelet.service
After=local-fs.target
[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/sbin/node-prep
[Install]
WantedBy=multi-user.target
""")
        self._enable("import-images.service", """[Unit]
Description=test node: images from files into containerd
After=containerd.service
Requires=containerd.service
Before=kubelet.service
[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/sbin/import-images
[Install]
WantedBy=multi-user.target
""")

    def _write_kubelet_files(self, plane: ControlPlane, ca: Ca) -> None:
        """The kubelet's credentials, configuration and unit: a node of `plane`."""
        pki = self.base / "pki"
        cert, key = ca.issue(pki, "kubelet", f"system:node:{self.name}",
                             organizations=("system:nodes",))
        self._write("/etc/kubernetes/pki/ca.crt", plane.ca_path.read_text())
        self._write("/etc/kubernetes/pki/kubelet.crt", cert.read_text())
        self._write("/etc/kubernetes/pki/kubelet.key", key.read_text(), 0o600)
        kubeconfig(pki / "kubelet.kubeconfig", f"https://127.0.0.1:{FORWARDED_PORT}",
                   Path("/etc/kubernetes/pki/ca.crt"),
                   cert=(Path("/etc/kubernetes/pki/kubelet.crt"),
                         Path("/etc/kubernetes/pki/kubelet.key")))
        self._write("/etc/kubernetes/kubelet.kubeconfig",
                    (pki / "kubelet.kubeconfig").read_text(), 0o600)
        self._write("/etc/kubernetes/kubelet.yaml", yaml.safe_dump({
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            "failCgroupV1": False, "cgroupDriver": "cgroupfs",
            "containerRuntimeEndpoint": "unix:///run/containerd/containerd.sock",
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": False},
                               "x509": {"clientCAFile": "/etc/kubernetes/pki/ca.crt"}},
            "authorization": {"mode": "AlwaysAllow"},
            "failSwapOn": False, "protectKernelDefaults": False,
            "localStorageCapacityIsolation": False,
            "resolvConf": "/etc/resolv.conf",
            "evictionHard": {"memory.available": "1Mi", "nodefs.available": "1%",
                             "imagefs.available": "1%", "nodefs.inodesFree": "1%"},
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            "shutdownGracePeriod": "0s"}))
        self._enable("kubelet.service", f"""[Unit]
Description=kubelet
After=containerd.service import-images.service node-prep.service
Requires=containerd.service
StartLimitIntervalSec=0
[Service]
ExecStart=/usr/local/bin/kubelet --config=/etc/kubernetes/kubelet.yaml \\
  --kubeconfig=/etc/kubernetes/kubelet.kubeconfig --hostname-override={self.name} \\
  --node-ip={self.address}
Restart=always
RestartSec=1
[Install]
WantedBy=multi-user.target
""")

    # Running ------------------------------------------------------------------------------

    def boot(self) -> None:
        """Start the container (nspawn restarts it by itself after a reboot inside)."""
        self.cgroups = []
        for hierarchy, own in _own_cgroups().items():
            cgroup = Path("/sys/fs/cgroup") / hierarchy / own.lstrip("/") / self.netns
            cgroup.mkdir(exist_ok=True)
            if hierarchy == "cpuset":
                for name in ("cpuset.cpus", "cpuset.mems"):
                    (cgroup / name).write_text((cgroup.parent / name).read_text())
            self.cgroups.append(cgroup)
        joins = "; ".join(f"echo $$ > {c}/cgroup.procs" for c in self.cgroups)
        argv = ["systemd-nspawn", "-q", "-D", str(self.root), "-b", "-M", self.name[:64],
                "--register=no", "--keep-unit", "--console=passive", "--capability=all",
                f"--network-namespace-path=/run/netns/{self.netns}", "--bind-ro=/dev/kmsg",
                *([f"--bind-ro={self.kubelet}:/usr/local/bin/kubelet"] if self.kubelet else []),
                f"--bind={self.base}/containerd:/var/lib/containerd",
                *[f"--bind-ro={image}:{IMAGES_IN_NODE}/{image.name}" for image in self.images]]
        env = {**os.environ, "SYSTEMD_SECCOMP": "0",
               "SYSTEMD_NSPAWN_API_VFS_WRITABLE": "network"}
        nspawn_dir = Path("/run/systemd/nspawn")
        if not os.path.ismount(nspawn_dir):
            nspawn_dir.mkdir(parents=True, exist_ok=True)
            subprocess.run(["mount", "-t", "tmpfs", "tmpfs", nspawn_dir], check=True)
        log = (self.base / "nspawn.log").open("ab")
        # nspawn exits 133 when the node reboots (systemd-nspawn@.service restarts it on that
        # status): boot it again, with its cgroups emptied in between as a real reboot would
        # (the kubelet stalls on the previous boot's kubepods).
        cgroups = " ".join(str(c) for c in self.cgroups)
        supervisor = (f'{joins}\nwhile :; do\n  "$@"\n  status=$?\n'
                      '  [ "$status" = 133 ] || exit "$status"\n'
                      f'  for cgroup in {cgroups}; do\n'
                      '    find "$cgroup" -mindepth 1 -depth -type d -exec rmdir {} + '
                      '2>/dev/null\n  done\ndone\n')
        self.process = subprocess.Popen(["sh", "-c", supervisor, "sh", *argv],
                                        env=env, stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=subprocess.STDOUT)

    def leader(self) -> int:
        """The node's init (changes with every boot); 0 while there is none."""
        if self.process is None:
            return 0
        nspawn = _child(self.process.pid)
        return _child(nspawn) if nspawn else 0

    def run(self, *argv: str | Path, check: bool = True, timeout: float = 120
            ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["nsenter", "-t", str(self.leader()), "-a", *map(str, argv)],
                              capture_output=True, text=True, check=check, timeout=timeout)

    def journal(self, unit: str = "kubelet", lines: int = 40) -> str:
        """The unit's last lines, without the kubelet's complaints every 10 s that it cannot
        size containerd's filesystem (a bind of a tmpfs directory; harmless here)."""
        try:
            text = self.run("journalctl", "-u", unit, "-n", str(lines * 4), "--no-pager",
                            check=False).stdout
            return "\n".join([line for line in text.splitlines()
                              if "filesystem info" not in line][-lines:])
        except (subprocess.SubprocessError, OSError) as error:
            return f"(no journal: {error})"

    def import_seconds(self) -> float:
        """How long this boot's image import took (the unit's start to its exit)."""
        shown = self.run("systemctl", "show", "import-images", "--property",
                         "ExecMainStartTimestampMonotonic,ExecMainExitTimestampMonotonic",
                         check=False).stdout
        values = dict(line.split("=", 1) for line in shown.splitlines() if "=" in line)
        try:
            return (int(values["ExecMainExitTimestampMonotonic"])
                    - int(values["ExecMainStartTimestampMonotonic"])) / 1e6
        except (KeyError, ValueError):
            return float("nan")

    def pod_logs(self, container: str, lines: int = 20) -> str:
        """The last lines of every `container` this node ran (the apiserver cannot reach the
        kubelet for `kubectl logs`: the node's address is only inside its namespace)."""
        try:
            return self.run("sh", "-c", f"tail -n {lines} /var/log/pods/*/{container}/*.log",
                            check=False).stdout
        except (subprocess.SubprocessError, OSError) as error:
            return f"(no logs: {error})"

    def stop(self) -> None:
        """Power off, then undo everything `prepare` and `boot` did."""
        if self.process is not None:
            leader = self.leader()
            if leader:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(leader, signal.SIGRTMIN + 4)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                # Its init killed, the node's PID namespace goes with it; then nspawn.
                for pid in (self.leader(), _child(self.process.pid)):
                    if pid:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                self.process.kill()
                self.process.wait()
            self.process = None
        for cgroup in self.cgroups:
            remove_cgroup(cgroup)
        for forwarder in self.forwarders:
            forwarder.close()
        if self.netns:
            subprocess.run(["ip", "netns", "del", self.netns], check=False)
        subprocess.run(["umount", "-R", "-l", self.base], check=False)
        with contextlib.suppress(OSError):
            self.base.rmdir()


def _child(pid: int) -> int:
    try:
        pids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return 0
    return int(pids[0]) if pids else 0


def bind_node_role(plane: ControlPlane, name: str) -> None:
    """RBAC only (no Node authorizer): the node's user gets the system:node ClusterRole."""
    admin = plane.admin()
    try:
        admin.post("/apis/rbac.authorization.k8s.io/v1/clusterrolebindings", {
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": f"dbtest-node-{name}"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                        "name": "system:node"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User",
                          "name": f"system:node:{name}"}]})
    except ApiError as error:
        if error.code != 409:
            raise
    finally:
        admin.close()


def ready(plane: ControlPlane, name: str) -> bool:
    admin = plane.admin()
    try:
        node = admin.get(f"/api/v1/nodes/{name}")
    except ApiError:
        return False
    finally:
        admin.close()
    return any(c["type"] == "Ready" and c["status"] == "True"
               for c in node.get("status", {}).get("conditions", []))


def wait_ready(plane: ControlPlane, node: Node, timeout: float = 180) -> float:
    started = time.monotonic()
    while not ready(plane, node.name):
        if node.process is not None and node.process.poll() is not None:
            log = (node.base / "nspawn.log").read_text(errors="replace")[-3000:]
            raise AssertionError(f"node {node.name} exited {node.process.returncode}:\n{log}")
        if time.monotonic() - started > timeout:
            raise AssertionError(f"node {node.name} not Ready in {timeout:.0f} s\n"
                                 f"{node.journal('containerd')}\n{node.journal()}")
        time.sleep(0.2)
    return time.monotonic() - started


def start_nodes(plane: ControlPlane, kubelet: Path, directory: Path, names: list[str],
                images: list[Path]) -> list[Node]:
    """Boot `names` as real nodes joined to `plane`; each Ready when this returns."""
    if shutil.which("systemd-nspawn") is None:
        raise RuntimeError("needs systemd-nspawn")
    lower = directory / "node-root"
    if not lower.exists():
        extract(node_tarball(), lower)
    nodes: list[Node] = []
    try:
        for index, name in enumerate(names, start=1):
            node = Node(name, index, plane, lower, directory / f"node-{index}", images, kubelet)
            nodes.append(node)
            bind_node_role(plane, name)
            started = time.monotonic()
            node.prepare()
            node.boot()
            wait_ready(plane, node)
            node.timings["start"] = time.monotonic() - started
    except BaseException:
        for node in nodes:
            node.stop()
        raise
    return nodes


def divingbell_image() -> Path:
    """The image deploy/build-image builds from this checkout, as a docker archive named
    divingbell.test/divingbell:DIGEST (cached by the digest of what goes into it)."""
    repo = Path(__file__).resolve().parent.parent.parent
    digest = hashlib.sha256()
    for path in sorted([*repo.glob("src/**/*"), repo / "pyproject.toml",
                        repo / "deploy/build-image"]):
        if path.is_file() and "__pycache__" not in path.parts:
            digest.update(str(path.relative_to(repo)).encode() + b"\0" + path.read_bytes())
    key = digest.hexdigest()[:12]
    out = CACHE / "node-images" / f"divingbell-{key}.tar"
    with locked(CACHE / "node-images" / ".lock-divingbell"):
        if out.exists():
            return out
        with tempfile.TemporaryDirectory() as scratch:
            result = subprocess.run([repo / "deploy/build-image", scratch], cwd=repo,
                                    capture_output=True, text=True, check=False,
                                    env={**os.environ, "PYTHON": sys.executable})
            if result.returncode != 0:
                raise RuntimeError(f"deploy/build-image failed:\n{result.stderr[-3000:]}")
            archive = Path(result.stdout.strip().splitlines()[-1])
            layout = Path(scratch) / "layout"
            layout.mkdir()
            subprocess.run(["tar", "-C", layout, "-xf", archive], check=True)
            (tag,) = [m["annotations"]["org.opencontainers.image.ref.name"] for m in
                      json.loads((layout / "index.json").read_text())["manifests"]]
            return docker_archive(layout, tag, f"{DIVINGBELL_IMAGE}-{key}", out)


DIVINGBELL_IMAGE = "divingbell.test/divingbell:build"


def image_name(archive: Path) -> str:
    """The name an archive made here is imported under."""
    if archive.name.startswith("divingbell-"):
        return f"{DIVINGBELL_IMAGE}-{archive.stem.removeprefix('divingbell-')}"
    return PAUSE_IMAGE


@dataclass
class RealNodes:
    plane: ControlPlane
    nodes: list[Node]
    images: list[Path]

    @property
    def divingbell_image(self) -> str:
        return image_name(self.images[1])


@pytest.fixture(scope="session")
def real_nodes(kube_cluster: ControlPlane, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[RealNodes]:
    """Two real nodes, one pair per test session (per xdist worker), shared by the tests that
    need them; each test leaves them as it found them (uncordoned, its pods gone)."""
    def missing(why: str) -> NoReturn:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the real-node tests: {why}")
        pytest.skip(why)

    try:
        kubelet = kubelet_binary()
    except AssetsMissing as error:
        missing(str(error))
    for tool in ("systemd-nspawn", "nsenter", "umoci", "skopeo", "gcc", "debootstrap"):
        if shutil.which(tool) is None:
            missing(f"real nodes need {tool}")
    started = time.monotonic()
    images = [pause_image(), divingbell_image()]
    built = time.monotonic() - started
    directory = tmp_path_factory.mktemp("nodes")
    names = [f"dbnode-{os.getpid()}-{index}" for index in (1, 2)]
    nodes = start_nodes(kube_cluster, kubelet, directory, names, images)
    print(f"\nreal nodes: images ready in {built:.1f} s; " + ", ".join(
        f"{node.name} Ready {node.timings['start']:.1f} s after its start (images imported in "
        f"{node.import_seconds():.1f} s)" for node in nodes))
    try:
        yield RealNodes(kube_cluster, nodes, images)
    finally:
        for node in nodes:
            node.stop()
        admin = kube_cluster.admin()
        for name in names:
            admin.request("DELETE", f"/api/v1/nodes/{name}")
        admin.close()
