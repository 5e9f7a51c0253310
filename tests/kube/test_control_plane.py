"""The session's control plane is a real one: the version the suite pins, static test users
that RBAC refuses until bound, the controller-manager's CSR signer, and the unpacking of the
binaries into a cache that a second worker waits for."""

from __future__ import annotations

import base64
import hashlib
import subprocess
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.kube import controlplane
from tests.kube.controlplane import ApiError, AssetsMissing, ControlPlane, Rest

pytestmark = pytest.mark.kube


def test_the_pinned_version_answers(kube_cluster: ControlPlane) -> None:
    version = kube_cluster.kubectl("version", "-o", "json").stdout
    assert f'"gitVersion": "{controlplane.VERSION}"' in version


def test_a_static_test_user_authenticates_and_rbac_refuses_it(
        kube_cluster: ControlPlane, kube_namespace: str) -> None:
    alice = kube_cluster.as_token(kube_cluster.tokens["alice"])
    with pytest.raises(ApiError) as caught:
        alice.get(f"/api/v1/namespaces/{kube_namespace}/pods")
    assert caught.value.code == 403 and 'User "alice"' in caught.value.message
    review = alice.post("/apis/authentication.k8s.io/v1/selfsubjectreviews",
                        {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"})
    assert review["status"]["userInfo"]["username"] == "alice"


def test_the_csr_signer_issues_client_certificates(kube_admin: Rest) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    request = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, "signer-test")])).sign(key, hashes.SHA256()))
    name = f"signer-test-{time.monotonic_ns()}"
    kube_admin.post("/apis/certificates.k8s.io/v1/certificatesigningrequests", {
        "apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequest",
        "metadata": {"name": name},
        "spec": {"request": base64.b64encode(request.public_bytes(
            serialization.Encoding.PEM)).decode(), "usages": ["client auth"],
                 "signerName": "kubernetes.io/kube-apiserver-client", "expirationSeconds": 600}})
    path = f"/apis/certificates.k8s.io/v1/certificatesigningrequests/{name}"
    csr = kube_admin.get(path)
    csr["status"] = {"conditions": [{"type": "Approved", "status": "True", "reason": "Test",
                                     "message": "approved by the test"}]}
    kube_admin.put(f"{path}/approval", csr)
    deadline = time.monotonic() + 30
    while not kube_admin.get(path).get("status", {}).get("certificate"):
        assert time.monotonic() < deadline, "the controller-manager did not sign in 30 s"
        time.sleep(0.2)
    issued = x509.load_pem_x509_certificate(base64.b64decode(
        kube_admin.get(path)["status"]["certificate"]))
    assert issued.subject.rfc4514_string() == "CN=signer-test"
    kube_admin.delete(path)


def _packed(tmp_path: Path, contents: dict[str, bytes]) -> Path:
    shared = tmp_path / "shared"
    shared.mkdir()
    sums = []
    for name, data in contents.items():
        (shared / name).write_bytes(data)
        subprocess.run(["xz", "-z", shared / name], check=True)
        sums.append(f"{hashlib.sha256(data).hexdigest()}  {name}\n")
    (shared / "SHA256SUMS").write_text("".join(sums))
    return shared


def test_unpacking_checks_sums_and_is_safe_for_two_workers_at_once(tmp_path: Path) -> None:
    contents = {name: f"#!/bin/sh\necho {name}\n".encode() for name in controlplane.BINARIES}
    shared, cache = _packed(tmp_path, contents), tmp_path / "cache"
    errors: list[BaseException] = []

    def unpack() -> None:
        try:
            controlplane._unpack(shared, cache)
        except BaseException as error:  # re-raised in the test's thread
            errors.append(error)

    workers = [threading.Thread(target=unpack) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert errors == []
    for name, data in contents.items():
        assert (cache / name).read_bytes() == data
        assert (cache / name).stat().st_mode & 0o111
    assert sorted(p.name for p in cache.iterdir() if p.name.endswith(".partial")) == []

    (shared / "SHA256SUMS").write_text((shared / "SHA256SUMS").read_text().replace(
        hashlib.sha256(contents["etcd"]).hexdigest(), "0" * 64))
    with pytest.raises(AssetsMissing, match=r"etcd\.xz unpacks to sha256"):
        controlplane._unpack(shared, tmp_path / "other-cache")
    assert not (tmp_path / "other-cache" / "etcd").exists()
