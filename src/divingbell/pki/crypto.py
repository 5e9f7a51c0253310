"""Keys and X.509 certificates with the `cryptography` library, and the PEM files they live in.

Only this module touches key material. Private keys are written 0600 through a file created
with that mode (never widened after the fact), and are never part of any message.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from divingbell.core.errors import DivingbellError

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey
USAGE_OIDS = {"server": ExtendedKeyUsageOID.SERVER_AUTH, "client": ExtendedKeyUsageOID.CLIENT_AUTH}
# Issued a little in the past so a node whose clock lags the generator's accepts them at once.
BACKDATE = datetime.timedelta(minutes=5)


class PkiError(DivingbellError):
    """PKI files that cannot be used as they are; the message names every file concerned."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def new_key(algorithm: str) -> PrivateKey:
    if algorithm == "ecdsa-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if algorithm.startswith("rsa-"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(algorithm[4:]))
    raise ValueError(f"unknown key algorithm {algorithm!r}")


def key_algorithm(key: PrivateKey | PublicKey) -> str:
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        return "ecdsa-p256" if isinstance(key.curve, ec.SECP256R1) else f"ecdsa-{key.curve.name}"
    return f"rsa-{key.key_size}"


def same_public_key(a: PublicKey, b: PublicKey) -> bool:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return a.public_bytes(*fmt) == b.public_bytes(*fmt)


def name(common_name: str, organizations: Sequence[str] = ()) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org) for org in organizations]
    attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attributes)


@dataclass(frozen=True)
class LeafProfile:
    """What a leaf certificate must say: checked on reuse, written on issue."""

    subject: x509.Name
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    usages: tuple[str, ...]

    def san(self) -> x509.SubjectAlternativeName | None:
        general: list[x509.GeneralName] = [x509.DNSName(n) for n in self.dns_names]
        general += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in self.ip_addresses]
        return x509.SubjectAlternativeName(general) if general else None


def _new_certificate(subject: x509.Name, issuer: x509.Name, public: PublicKey, days: int,
                     now: datetime.datetime, *, ca: bool) -> x509.CertificateBuilder:
    """A new certificate's fields and constraints: a CA signs certificates and CRLs, a leaf
    signs (and enciphers keys when its key is RSA)."""
    return (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(issuer).public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE).not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False,
            key_encipherment=not ca and isinstance(public, rsa.RSAPublicKey),
            data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
            encipher_only=False, decipher_only=False), critical=True)
    )


def issue_ca(common_name: str, key: PrivateKey, days: int, now: datetime.datetime
             ) -> x509.Certificate:
    subject = name(common_name)
    public = key.public_key()
    builder = (
        _new_certificate(subject, subject, public, days, now, ca=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
    )
    return builder.sign(key, hashes.SHA256())


def issue_leaf(profile: LeafProfile, public: PublicKey, ca_cert: x509.Certificate,
               ca_key: PrivateKey, days: int, now: datetime.datetime) -> x509.Certificate:
    builder = (
        _new_certificate(profile.subject, ca_cert.subject, public, days, now, ca=False)
        .add_extension(x509.ExtendedKeyUsage([USAGE_OIDS[u] for u in profile.usages]),
                       critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            ca_key.public_key()), critical=False)
    )
    san = profile.san()
    if san is not None:
        builder = builder.add_extension(san, critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def reissue(cert: x509.Certificate, public: PublicKey, issuer_cert: x509.Certificate | None,
            issuer_key: PrivateKey, now: datetime.datetime) -> x509.Certificate:
    """`cert` again, for the same lifetime from now: same subject and extensions, a new serial.
    `issuer_cert` None means self-signed (a CA renewing itself)."""
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    issuer = cert.subject if issuer_cert is None else issuer_cert.subject
    builder = (
        x509.CertificateBuilder()
        .subject_name(cert.subject).issuer_name(issuer).public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE).not_valid_after(now - BACKDATE + lifetime)
    )
    for extension in cert.extensions:
        value = extension.value
        if isinstance(value, x509.SubjectKeyIdentifier):
            value = x509.SubjectKeyIdentifier.from_public_key(public)
        elif isinstance(value, x509.AuthorityKeyIdentifier):
            value = x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key())
        builder = builder.add_extension(value, critical=extension.critical)
    return builder.sign(issuer_key, hashes.SHA256())


def leaf_profile(cert: x509.Certificate) -> LeafProfile:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = tuple(san.get_values_for_type(x509.DNSName))
        ips = tuple(str(ip) for ip in san.get_values_for_type(x509.IPAddress))
    except x509.ExtensionNotFound:
        dns, ips = (), ()
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        usages = tuple(u for u, oid in USAGE_OIDS.items() if oid in eku)
    except x509.ExtensionNotFound:
        usages = ()
    return LeafProfile(cert.subject, dns, ips, usages)


def is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def public_key_of(cert: x509.Certificate) -> PublicKey:
    public = cert.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise PkiError([f"unsupported public key type {type(public).__name__}"])
    return public


# PEM files ----------------------------------------------------------------------------------

def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def public_pem(key: PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def read_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise PkiError([f"{path}: not a PEM certificate ({_reason(exc)})"]) from None


def read_key(path: Path) -> PrivateKey:
    try:
        # The expensive RSA consistency check (~0.1 s a key) is skipped: these are keys this
        # tool wrote, and every reuse compares the key with its certificate's public key.
        key = serialization.load_pem_private_key(path.read_bytes(), password=None,
                                                 unsafe_skip_rsa_key_validation=True)
    except (OSError, ValueError, TypeError) as exc:
        # The reason never quotes the file: it holds a secret.
        raise PkiError([f"{path}: not an unencrypted PEM private key ({_reason(exc)})"]
                       ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise PkiError([f"{path}: unsupported key type {type(key).__name__}"])
    return key


def read_public(path: Path) -> PublicKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise PkiError([f"{path}: not a PEM public key ({_reason(exc)})"]) from None
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise PkiError([f"{path}: unsupported key type {type(key).__name__}"])
    return key


def _reason(exc: Exception) -> str:
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__


def write_file(path: Path, data: bytes, mode: int) -> None:
    """Atomically, created with `mode` from the start (a key is never briefly world-readable)."""
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
