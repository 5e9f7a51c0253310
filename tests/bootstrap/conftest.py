"""Fixtures for bootstrap: a PKI, a design, stand-in kubelet and container-runtime packages in a
signed apt repository (with Debian's real curl, which the join script uses for the API), and
the Kubernetes API stand-in."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.aptrepo import Deb, Repo, build_repo
from tests.booted import CACHE
from tests.bootstrap.kubeapi import KubeApiStandIn

KUBELET = """\
#!/bin/sh
# Stand-in kubelet: checks its configuration, records its arguments, registers its Node with
# the API server using the kubeconfig's credentials (as the real kubelet does), then stays up.
set -eu
config=""; kubeconfig=""; name=""; labels=""
for arg in "$@"; do
  case "$arg" in
    --config=*) config=${arg#*=} ;;
    --kubeconfig=*) kubeconfig=${arg#*=} ;;
    --hostname-override=*) name=${arg#*=} ;;
    --node-labels=*) labels=${arg#*=} ;;
  esac
done
test -f "$config" || { echo "kubelet: no config file '$config'" >&2; exit 1; }
test -S /run/containerd/containerd.sock || test -f /run/containerd/containerd.sock || {
  echo "kubelet: container runtime not running" >&2; exit 1; }
mkdir -p /run/kubelet-standin
printf '%s\\n' "$@" > /run/kubelet-standin/args
field() { sed -n "s/^ *$1: *//p" "$kubeconfig" | head -n 1; }
json=$(printf '%s' "$labels" | awk -F, '{ for (i = 1; i <= NF; i++) { split($i, kv, "=");
  printf "%s\\"%s\\":\\"%s\\"", (i > 1 ? "," : ""), kv[1], kv[2] } }')
curl -sS -o /dev/null --cacert "$(field certificate-authority)" --cert "$(field client-certificate)" \\
  --key "$(field client-key)" -X POST -H 'Content-Type: application/json' \\
  --data "{\\"metadata\\":{\\"name\\":\\"$name\\",\\"labels\\":{$json}}}" \\
  "$(field server)/api/v1/nodes" || true
exec sleep infinity
"""
CONTAINERD = """\
#!/bin/sh
# Stand-in container runtime: refuses to start without its configuration, then stays up.
set -eu
grep -q 'SystemdCgroup = true' /etc/containerd/config.toml
mkdir -p /run/containerd
touch /run/containerd/containerd.sock
exec sleep infinity
"""


def unit(description: str, binary: str) -> str:
    return (f"[Unit]\nDescription={description}\n\n[Service]\nExecStart={binary}\n"
            "Restart=on-failure\n\n[Install]\nWantedBy=multi-user.target\n")


STAND_INS = (
    Deb("kubelet", "1.30.2-1.1", depends="curl", files=(
        ("/usr/bin/kubelet", KUBELET, 0o755),
        ("/lib/systemd/system/kubelet.service", unit("stand-in kubelet", "/usr/bin/kubelet"),
         0o644))),
    Deb("containerd", "1.6.20~ds1-1", files=(
        ("/usr/bin/containerd", CONTAINERD, 0o755),
        ("/lib/systemd/system/containerd.service",
         unit("stand-in container runtime", "/usr/bin/containerd"), 0o644))),
)
# Debian's curl and what it needs beyond the minimal test root.
CURL_PACKAGES = ("curl", "libcurl4", "libbrotli1", "libldap-2.5-0", "libnghttp2-14", "libpsl5",
                 "librtmp1", "libsasl2-2", "libsasl2-modules-db", "libssh2-1")


def curl_debs() -> tuple[Path, ...]:
    """Debian's curl and its libraries, downloaded once with apt-get and cached."""
    key = hashlib.sha256(" ".join(CURL_PACKAGES).encode()).hexdigest()[:12]
    cache = CACHE / f"debs-curl-{key}"
    if not cache.is_dir():
        if shutil.which("apt-get") is None:
            pytest.skip("needs apt-get to download Debian's curl")
        partial = CACHE / f"debs-curl-{key}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        result = subprocess.run(["apt-get", "download", *CURL_PACKAGES], cwd=partial,
                                capture_output=True, text=True, check=False)
        if result.returncode != 0:
            # No (or stale) package lists here: fetch lists of our own, leaving the machine's
            # apt state as it is.
            lists = CACHE / "apt-lists"
            (lists / "partial").mkdir(parents=True, exist_ok=True)
            private = ["-o", f"Dir::State::Lists={lists}",
                       "-o", f"Dir::Cache={CACHE / 'apt-cache'}"]
            (CACHE / "apt-cache/archives/partial").mkdir(parents=True, exist_ok=True)
            subprocess.run(["apt-get", *private, "update", "-qq"], capture_output=True,
                           check=False)
            result = subprocess.run(["apt-get", *private, "download", *CURL_PACKAGES],
                                    cwd=partial, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            shutil.rmtree(partial, ignore_errors=True)
            pytest.skip(f"cannot download curl from Debian: {result.stderr[-300:]}")
        partial.rename(cache)
    return tuple(sorted(cache.glob("*.deb")))


@pytest.fixture(scope="session")
def standin_repo(tmp_path_factory: pytest.TempPathFactory) -> Repo:
    return build_repo(tmp_path_factory.mktemp("standins"), packages=STAND_INS,
                      extra_debs=curl_debs())


@pytest.fixture
def kube_api() -> Iterator[KubeApiStandIn]:
    api = KubeApiStandIn()
    yield api
    api.close()
