"""A real Kubernetes control plane on loopback for the tests: etcd, kube-apiserver,
kube-controller-manager (with the CSR signer) and kube-scheduler, from real binaries.

The binaries come from the directory named by DIVINGBELL_KUBE_ASSETS (the layout
controller-runtime's envtest uses: `etcd`, `kube-apiserver`, `kubectl`, plus
`kube-controller-manager` and `kube-scheduler`), or else from `shared/kube/*.xz` beside the
checkout, unpacked once into a cache outside it and checked against its SHA256SUMS.

There is no kubelet: tests create Nodes through the API and act as the kubelet themselves
(they patch pod status), so the node lifecycle controller is off (it would mark every such
Node unreachable after 40 s and taint it), and so is the garbage collector (it would delete
test pods whose ownerReferences name owners that do not exist, as FakeKube's pods do).
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import fcntl
import hashlib
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

REPO = Path(__file__).resolve().parent.parent.parent
VERSION = "v1.36.2"


def _shared_candidates() -> list[Path]:
    """`shared/kube` beside the checkout; for a git worktree also beside the main checkout
    (its `.git` is a file naming `<main>/.git/worktrees/<name>`)."""
    found = [REPO.parent / "shared" / "kube"]
    dot_git = REPO / ".git"
    if dot_git.is_file():
        gitdir = Path(dot_git.read_text().removeprefix("gitdir:").strip())
        if gitdir.parent.name == "worktrees":
            found.append(gitdir.parent.parent.parent.parent / "shared" / "kube")
    return found


CACHE = Path(os.environ.get("DIVINGBELL_KUBE_CACHE", f"/var/cache/divingbell-test/kube-{VERSION}"))
CONTROL_PLANE = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")
BINARIES = (*CONTROL_PLANE, "kubectl")
HOW_TO_GET = (
    "set DIVINGBELL_KUBE_ASSETS to a directory holding the Kubernetes release binaries "
    "(etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl: the envtest "
    "layout, e.g. `setup-envtest use 1.36` plus the two controller binaries from the release's "
    "server tarball), or put shared/kube/ (the xz-packed binaries with SHA256SUMS) beside the "
    "checkout")
# The users the apiserver knows by static token (--token-auth-file): RBAC gives them nothing
# until a test binds them a role.
TEST_USERS = ("alice", "bob", "operator")


class AssetsMissing(Exception):
    """No Kubernetes binaries on this machine: the message says how to get them."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _unpack(shared: Path, cache: Path, names: tuple[str, ...] = BINARIES) -> Path:
    """Unpack shared/kube's xz files into `cache`, once: the lock makes a second process (an
    xdist worker) wait for the first; each binary is written to a temporary name, checked
    against SHA256SUMS and renamed, so a killed unpack never leaves a half binary. A stamp (the
    SHA256SUMS it was checked against) makes later sessions skip the hashing."""
    sums = (shared / "SHA256SUMS").read_text()
    expected = {name: digest for digest, name in (line.split() for line in sums.splitlines()
                                                  if line.strip())}
    cache.mkdir(parents=True, exist_ok=True)
    stamp = cache / (".verified" if names == BINARIES else f".verified-{'-'.join(names)}")
    with (cache / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.exists() and stamp.read_text() == sums and all(
                (cache / name).exists() for name in names):
            return cache
        stamp.unlink(missing_ok=True)
        for name in names:
            target = cache / name
            if target.exists() and _sha256(target) == expected[name]:
                continue
            partial = cache / f".{name}.partial"
            with partial.open("wb") as out:
                subprocess.run(["xz", "-dc", shared / f"{name}.xz"], stdout=out, check=True)
            got = _sha256(partial)
            if got != expected[name]:
                partial.unlink()
                raise AssetsMissing(f"{shared / name}.xz unpacks to sha256 {got}, but "
                                    f"SHA256SUMS says {expected[name]}")
            partial.chmod(0o755)
            partial.rename(target)
        stamp.write_text(sums)
    return cache


def assets() -> Path:
    """The directory holding the binaries; AssetsMissing says how to get them."""
    named = os.environ.get("DIVINGBELL_KUBE_ASSETS")
    if named:
        directory = Path(named)
        missing = [b for b in BINARIES if not os.access(directory / b, os.X_OK)]
        if missing:
            raise AssetsMissing(f"DIVINGBELL_KUBE_ASSETS={named} has no executable "
                                f"{', '.join(missing)}: {HOW_TO_GET}")
        return directory
    shared = next((p for p in _shared_candidates() if (p / "SHA256SUMS").exists()), None)
    if shared is None:
        raise AssetsMissing(f"no Kubernetes binaries: {HOW_TO_GET}")
    if shutil.which("xz") is None:
        raise AssetsMissing(f"{shared} needs xz to unpack (apt-get install xz-utils)")
    return _unpack(shared, CACHE)


def kubelet_binary() -> Path:
    """The kubelet for real nodes (tests/kube/node.py): beside the control plane's binaries
    in DIVINGBELL_KUBE_ASSETS, else unpacked from shared/kube like them."""
    named = os.environ.get("DIVINGBELL_KUBE_ASSETS")
    if named:
        path = Path(named) / "kubelet"
        if not os.access(path, os.X_OK):
            raise AssetsMissing(f"DIVINGBELL_KUBE_ASSETS={named} has no executable kubelet "
                                "(the release's node tarball has it)")
        return path
    shared = next((p for p in _shared_candidates() if (p / "kubelet.xz").exists()), None)
    if shared is None or shutil.which("xz") is None:
        raise AssetsMissing(f"no kubelet: {HOW_TO_GET}, with kubelet")
    return _unpack(shared, CACHE, ("kubelet",)) / "kubelet"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _pem(key: Any) -> bytes:
    data: bytes = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    return data


@dataclass
class Ca:
    """The cluster's CA: it signs every component's certificate, the apiserver trusts client
    certificates it issued, and the controller-manager's CSR signer signs with it."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def create(cls) -> Ca:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "divingbell test cluster CA")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(hours=1))
                .not_valid_after(now + datetime.timedelta(days=7))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(
                    digital_signature=True, key_cert_sign=True, crl_sign=True,
                    content_commitment=False, key_encipherment=False, data_encipherment=False,
                    key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
                .sign(key, hashes.SHA256()))
        return cls(cert, key)

    @classmethod
    def load(cls, cert: Path) -> Ca:
        """The CA `write` wrote (its key beside it), to issue more certificates."""
        key = serialization.load_pem_private_key(cert.with_name("ca.key").read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return cls(x509.load_pem_x509_certificate(cert.read_bytes()), key)

    def issue(self, directory: Path, name: str, common_name: str, *,
              organizations: tuple[str, ...] = (), server: bool = False) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in organizations]
        attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
        now = datetime.datetime.now(datetime.UTC)
        builder = (x509.CertificateBuilder().subject_name(x509.Name(attributes))
                   .issuer_name(self.cert.subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(hours=1))
                   .not_valid_after(now + datetime.timedelta(days=7)))
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.DNSName("kubernetes"),
                x509.DNSName("kubernetes.default.svc"),
                x509.DNSName("kubernetes.default.svc.cluster.local"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                x509.IPAddress(ipaddress.ip_address("10.0.0.1"))]), critical=False)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        cert = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False).sign(
            self.key, hashes.SHA256())
        cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(_pem(key))
        key_path.chmod(0o600)
        return cert_path, key_path

    def write(self, directory: Path) -> tuple[Path, Path]:
        cert_path, key_path = directory / "ca.crt", directory / "ca.key"
        cert_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(_pem(self.key))
        key_path.chmod(0o600)
        return cert_path, key_path


def kubeconfig(path: Path, server: str, ca: Path, *, cert: tuple[Path, Path] | None = None,
               token: str | None = None, namespace: str | None = None) -> Path:
    user: dict[str, str] = {}
    if cert:
        user = {"client-certificate": str(cert[0]), "client-key": str(cert[1])}
    if token:
        user = {"token": token}
    context: dict[str, str] = {"cluster": "test", "user": "test"}
    if namespace:
        context["namespace"] = namespace
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "test", "cluster": {"server": server,
                                                  "certificate-authority": str(ca)}}],
        "users": [{"name": "test", "user": user}],
        "contexts": [{"name": "test", "context": context}]}))
    path.chmod(0o600)
    return path


class ApiError(Exception):
    def __init__(self, response: httpx.Response) -> None:
        self.code = response.status_code
        try:
            body = response.json()
        except ValueError:
            body = {"message": response.text}
        self.reason = str(body.get("reason", ""))
        self.message = str(body.get("message", response.text))
        super().__init__(f"{response.request.method} {response.request.url.path}: "
                         f"{self.code} {self.reason}: {self.message}")


@dataclass
class Rest:
    """JSON requests to the apiserver as one user (the admin's client certificate, or a
    bearer token). Errors raise ApiError with the status code and the server's message."""

    server: str
    ca: Path
    cert: tuple[Path, Path] | None = None
    token: str | None = None
    _client: httpx.Client | None = field(default=None, repr=False)

    @classmethod
    def from_kubeconfig(cls, path: Path) -> Rest:
        """The first user of a kubeconfig as kubeconfig() writes them (files or a token)."""
        config = yaml.safe_load(path.read_text())
        user, cluster = config["users"][0]["user"], config["clusters"][0]["cluster"]
        cert = ((Path(user["client-certificate"]), Path(user["client-key"]))
                if "client-certificate" in user else None)
        return cls(cluster["server"], Path(cluster["certificate-authority"]), cert=cert,
                   token=user.get("token"))

    @property
    def client(self) -> httpx.Client:
        if self._client is None:
            headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
            context = ssl.create_default_context(cafile=str(self.ca))
            if self.cert:
                context.load_cert_chain(self.cert[0], self.cert[1])
            self._client = httpx.Client(base_url=self.server, verify=context, headers=headers,
                                        timeout=30)
        return self._client

    def request(self, method: str, path: str, body: Any = None, *,
                content_type: str = "application/json",
                params: Mapping[str, str] | None = None) -> Any:
        content = None if body is None else json.dumps(body).encode()
        response = self.client.request(method, path, content=content, params=params,
                                       headers={"Content-Type": content_type})
        if response.status_code >= 400:
            raise ApiError(response)
        return response.json() if response.content else None

    def get(self, path: str, **params: str) -> Any:
        return self.request("GET", path, params=params or None)

    def post(self, path: str, body: Any) -> Any:
        return self.request("POST", path, body)

    def put(self, path: str, body: Any) -> Any:
        return self.request("PUT", path, body)

    def patch(self, path: str, body: Any, kind: str = "merge") -> Any:
        return self.request("PATCH", path, body, content_type=f"application/{kind}-patch+json")

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


@dataclass
class ControlPlane:
    """A running control plane: where it is, who may talk to it, and its processes."""

    directory: Path
    binaries: Path
    server: str
    ca_path: Path
    admin_cert: tuple[Path, Path]
    admin_kubeconfig: Path
    tokens: dict[str, str]
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    started_in: float = 0.0

    def admin(self) -> Rest:
        return Rest(self.server, self.ca_path, cert=self.admin_cert)

    def as_token(self, token: str) -> Rest:
        return Rest(self.server, self.ca_path, token=token)

    def user_kubeconfig(self, path: Path, token: str, namespace: str | None = None) -> Path:
        return kubeconfig(path, self.server, self.ca_path, token=token, namespace=namespace)

    def kubectl(self, *args: str, kubeconfig_path: Path | None = None, input_text: str | None = None,
                check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = [str(self.binaries / "kubectl"),
                f"--kubeconfig={kubeconfig_path or self.admin_kubeconfig}", *args]
        run = subprocess.run(argv, capture_output=True, text=True, input=input_text, check=False,
                             timeout=120)
        if check and run.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({run.returncode}): "
                                 f"{run.stderr}{run.stdout}")
        return run

    def log(self, component: str) -> str:
        return (self.directory / f"{component}.log").read_text(errors="replace")

    def stop(self) -> None:
        """Stop the processes by their PIDs, newest first. SIGKILL after 2 s: the apiserver's
        graceful shutdown waits for its watchers for several seconds, and nothing of this
        cluster outlives the session."""
        for process in reversed(list(self.processes.values())):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in reversed(list(self.processes.values())):
            try:
                process.wait(timeout=2)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_ready(plane: ControlPlane, deadline: float) -> None:
    admin = plane.admin()
    try:
        while True:
            for name, process in plane.processes.items():
                if process.poll() is not None:
                    raise RuntimeError(f"{name} exited ({process.returncode}) while starting:\n"
                                       + plane.log(name)[-3000:])
            try:
                response = admin.client.get("/readyz")
                if response.status_code == 200:
                    # The service-account controller makes `default` in each namespace; RBAC's
                    # bootstrap roles exist once the default namespace's account does.
                    admin.get("/api/v1/namespaces/default/serviceaccounts/default")
                    return
            except (httpx.HTTPError, ApiError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the control plane was not ready in time:\n"
                                   + plane.log("kube-apiserver")[-3000:])
            time.sleep(0.25)
    finally:
        admin.close()


def start(directory: Path, binaries: Path, *, timeout: float = 120.0) -> ControlPlane:
    """Start etcd, kube-apiserver, kube-controller-manager and kube-scheduler; return once
    the apiserver is ready and the default namespace has its service account."""
    began = time.monotonic()
    directory.mkdir(parents=True, exist_ok=True)
    pki = directory / "pki"
    pki.mkdir(mode=0o700)
    ca = Ca.create()
    ca_cert, ca_key = ca.write(pki)
    serving = ca.issue(pki, "apiserver", "kube-apiserver", server=True)
    admin_cert = ca.issue(pki, "admin", "admin", organizations=("system:masters",))
    controller_cert = ca.issue(pki, "controller-manager", "system:kube-controller-manager")
    scheduler_cert = ca.issue(pki, "scheduler", "system:kube-scheduler")
    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    sa_path = pki / "service-accounts.key"
    sa_path.write_bytes(_pem(sa_key))
    sa_path.chmod(0o600)
    tokens = {user: secrets.token_hex(16) for user in TEST_USERS}
    token_file = pki / "tokens.csv"
    token_file.write_text("".join(f"{token},{user},uid-{user}\n" for user, token in tokens.items()))
    token_file.chmod(0o600)

    etcd_port, etcd_peer, port = free_port(), free_port(), free_port()
    server = f"https://127.0.0.1:{port}"
    admin_kubeconfig = kubeconfig(directory / "admin.kubeconfig", server, ca_cert, cert=admin_cert)
    controller_kubeconfig = kubeconfig(directory / "controller-manager.kubeconfig", server,
                                       ca_cert, cert=controller_cert)
    scheduler_kubeconfig = kubeconfig(directory / "scheduler.kubeconfig", server, ca_cert,
                                      cert=scheduler_cert)
    commands = {
        "etcd": [
            "--name=test", f"--data-dir={directory / 'etcd'}",
            f"--listen-client-urls=http://127.0.0.1:{etcd_port}",
            f"--advertise-client-urls=http://127.0.0.1:{etcd_port}",
            f"--listen-peer-urls=http://127.0.0.1:{etcd_peer}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}",
            f"--initial-cluster=test=http://127.0.0.1:{etcd_peer}"],
        "kube-apiserver": [
            f"--etcd-servers=http://127.0.0.1:{etcd_port}", "--bind-address=127.0.0.1",
            f"--secure-port={port}", f"--tls-cert-file={serving[0]}",
            f"--tls-private-key-file={serving[1]}", f"--client-ca-file={ca_cert}",
            f"--service-account-key-file={sa_path}",
            f"--service-account-signing-key-file={sa_path}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            "--service-cluster-ip-range=10.0.0.0/24", "--authorization-mode=RBAC",
            "--allow-privileged=true", f"--token-auth-file={token_file}",
            "--kubelet-preferred-address-types=InternalIP", "--profiling=false"],
        "kube-controller-manager": [
            f"--kubeconfig={controller_kubeconfig}",
            f"--authentication-kubeconfig={controller_kubeconfig}",
            f"--authorization-kubeconfig={controller_kubeconfig}",
            "--use-service-account-credentials=true", "--leader-elect=false",
            f"--root-ca-file={ca_cert}", f"--service-account-private-key-file={sa_path}",
            f"--cluster-signing-cert-file={ca_cert}", f"--cluster-signing-key-file={ca_key}",
            # No node lifecycle (no kubelets to heartbeat), no garbage collector (test pods
            # name owners, as FakeKube's do, that need not exist), no TTL annotation on
            # Nodes (a hint for kubelets, which there are none of).
            "--controllers=*,-node-lifecycle-controller,-node-ipam-controller,"
            "-service-lb-controller,-node-route-controller,-cloud-node-lifecycle-controller,"
            "-garbage-collector-controller,-ttl-controller",
            "--secure-port=0", "--profiling=false"],
        "kube-scheduler": [
            f"--kubeconfig={scheduler_kubeconfig}",
            f"--authentication-kubeconfig={scheduler_kubeconfig}",
            f"--authorization-kubeconfig={scheduler_kubeconfig}",
            "--leader-elect=false", "--secure-port=0", "--profiling=false"],
    }
    plane = ControlPlane(directory, binaries, server, ca_cert, admin_cert, admin_kubeconfig,
                         tokens)
    try:
        for name, args in commands.items():
            log = (directory / f"{name}.log").open("wb")
            plane.processes[name] = subprocess.Popen(
                [str(binaries / name), *args], stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)
            log.close()
        _wait_ready(plane, began + timeout)
    except BaseException:
        plane.stop()
        raise
    plane.started_in = time.monotonic() - began
    return plane


@contextlib.contextmanager
def control_plane(directory: Path) -> Iterator[ControlPlane]:
    plane = start(directory, assets())
    try:
        yield plane
    finally:
        plane.stop()


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()
