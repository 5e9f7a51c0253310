"""Tenant client certificates: a key made here, a CSR, and a signer.

`KubernetesSigner` submits the CSR to the Kubernetes CSR API with the
`kubernetes.io/kube-apiserver-client` signer, approves it and waits for the certificate the
controller-manager issues. `LocalCaSigner` signs with a CA certificate and key on disk (the
PKI's tenant CA, or any CA the API server trusts for client certificates). The private key
never leaves this process except into the tenant's kubeconfig.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from divingbell.core.errors import DivingbellError
from divingbell.kube import KubeError, ObjectApi

SIGNER = "kubernetes.io/kube-apiserver-client"
Clock = Callable[[], datetime.datetime]


class CredentialError(DivingbellError):
    pass


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def subject(user: str, groups: Sequence[str]) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, user),
                      *(x509.NameAttribute(NameOID.ORGANIZATION_NAME, g) for g in groups)])


def make_csr(key: ec.EllipticCurvePrivateKey, user: str, groups: Sequence[str]) -> bytes:
    csr = (x509.CertificateSigningRequestBuilder().subject_name(subject(user, groups))
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class CertInfo:
    common_name: str
    not_after: datetime.datetime
    matches_key: bool


def inspect(cert_pem: bytes, key_pem_bytes: bytes | None) -> CertInfo | None:
    """What a kubeconfig's certificate says, or None if it cannot be read."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        common_name = str(names[0].value) if names else ""
        matches = False
        if key_pem_bytes is not None:
            key = serialization.load_pem_private_key(key_pem_bytes, password=None)
            matches = key.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            ) == cert.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    except (ValueError, TypeError):
        return None
    return CertInfo(common_name, cert.not_valid_after_utc, matches)


class Signer(Protocol):
    def sign(self, user: str, csr_pem: bytes) -> bytes:
        """The PEM certificate for `csr_pem`."""


@dataclass
class LocalCaSigner:
    ca_cert: x509.Certificate
    ca_key: CertificateIssuerPrivateKeyTypes
    groups: Sequence[str] = ()
    validity: datetime.timedelta = datetime.timedelta(days=365)
    clock: Clock = utcnow

    @classmethod
    def from_files(cls, cert: Path, key: Path, groups: Sequence[str], validity_days: int,
                   clock: Clock = utcnow) -> LocalCaSigner:
        try:
            ca_cert = x509.load_pem_x509_certificate(cert.read_bytes())
            ca_key = serialization.load_pem_private_key(key.read_bytes(), password=None)
            if not isinstance(ca_key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
                              | ed25519.Ed25519PrivateKey):
                raise ValueError(f"unsupported key type {type(ca_key).__name__}")
        except OSError as exc:
            raise CredentialError(f"cannot read the tenant CA: {exc}") from None
        except ValueError as exc:
            raise CredentialError(f"the tenant CA files are not PEM: {exc}") from None
        return cls(ca_cert, ca_key, groups, datetime.timedelta(days=validity_days), clock)

    def sign(self, user: str, csr_pem: bytes) -> bytes:
        csr = x509.load_pem_x509_csr(csr_pem)
        now = self.clock()
        # The subject is ours, not the CSR's: a tenant is exactly its user and groups.
        cert = (x509.CertificateBuilder().subject_name(subject(user, self.groups))
                .issuer_name(self.ca_cert.subject).public_key(csr.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + self.validity)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False,
                                             content_commitment=False, data_encipherment=False,
                                             key_agreement=False, key_cert_sign=False,
                                             crl_sign=False, encipher_only=False,
                                             decipher_only=False), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                               critical=False)
                .sign(self.ca_key, None if isinstance(self.ca_key, ed25519.Ed25519PrivateKey)
                      else hashes.SHA256()))
        return cert.public_bytes(serialization.Encoding.PEM)


@dataclass
class KubernetesSigner:
    """The CSR API: create, approve, wait for the certificate, delete the request."""

    api: ObjectApi
    validity: datetime.timedelta = datetime.timedelta(days=365)
    timeout: float = 60.0
    clock: Clock = utcnow
    sleep: Callable[[float], None] = time.sleep

    def sign(self, user: str, csr_pem: bytes) -> bytes:
        name = f"divingbell-tenant-{user}-{int(self.clock().timestamp())}"
        created = self.api.create({
            "apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequest",
            "metadata": {"name": name,
                         "labels": {"app.kubernetes.io/managed-by": "divingbell-tenants"}},
            "spec": {"request": base64.b64encode(csr_pem).decode(), "signerName": SIGNER,
                     "expirationSeconds": int(self.validity.total_seconds()),
                     "usages": ["digital signature", "client auth"]},
        })
        try:
            self.api.approve_csr({
                "apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequest",
                "metadata": {"name": name,
                             "resourceVersion": created["metadata"]["resourceVersion"]},
                "spec": created["spec"],
                "status": {"conditions": [{
                    "type": "Approved", "status": "True", "reason": "DivingbellTenant",
                    "message": f"tenant {user}, from the tenant source of truth"}]},
            })
            return self._wait(name)
        finally:
            # Approved requests are garbage-collected by the cluster anyway.
            with contextlib.suppress(KubeError):
                self.api.delete("CertificateSigningRequest", name)

    def _wait(self, name: str) -> bytes:
        deadline = time.monotonic() + self.timeout
        while True:
            csr = self.api.get("CertificateSigningRequest", name)
            status = csr.get("status") or {}
            for condition in status.get("conditions") or []:
                if condition.get("type") in ("Denied", "Failed") and (
                        condition.get("status") == "True"):
                    raise CredentialError(
                        f"CSR {name} {condition['type'].lower()}: "
                        f"{condition.get('message') or condition.get('reason') or ''}")
            if status.get("certificate"):
                return base64.b64decode(status["certificate"])
            if time.monotonic() >= deadline:
                raise CredentialError(
                    f"CSR {name} was approved but no certificate was issued within "
                    f"{self.timeout:.0f}s: is the controller-manager's {SIGNER} signer on?")
            self.sleep(0.5)
