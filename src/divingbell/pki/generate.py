"""Generate a catalog's PKI into a directory, reusing what is already there and still right.

Layout: `<ca>.pem`/`<ca>-key.pem` per CA, `<document_name>.pem`/`-key.pem` per certificate,
`<keypair>.pem` (public) / `<keypair>-key.pem` per keypair, and `certificates.yaml`: every file
as Promenade-style documents, for a Secret or for `divingbell bootstrap build`.
Nothing is written until every existing file has been read and checked.
"""

from __future__ import annotations

import datetime
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml
from cryptography import x509

from divingbell.pki import crypto
from divingbell.pki.catalog import Authority, Catalog, Certificate, Keypair
from divingbell.pki.crypto import PkiError, PrivateKey

BUNDLE = "certificates.yaml"
DEFAULT_RENEWAL_DAYS = 30


@dataclass(frozen=True)
class Outcome:
    kind: str      # "ca" | "certificate" | "keypair" | "mode"
    name: str
    action: str    # "created" | "reused" | "reissued" | "restored"
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "name": self.name, "action": self.action,
                "reason": self.reason}


@dataclass
class _Pending:
    """What will be written once everything has been decided."""

    files: dict[Path, tuple[bytes, int]]

    def add(self, path: Path, data: bytes, mode: int) -> None:
        self.files[path] = (data, mode)


def pair_paths(out: Path, name: str) -> tuple[Path, Path]:
    return out / f"{name}.pem", out / f"{name}-key.pem"


def generate(catalog: Catalog, out: Path, *, renewal_days: float = DEFAULT_RENEWAL_DAYS,
             now: Callable[[], datetime.datetime] | None = None) -> list[Outcome]:
    moment = (now or (lambda: datetime.datetime.now(datetime.UTC)))()
    window = moment + datetime.timedelta(days=renewal_days)
    names = [*catalog.authorities, *(c.spec.document_name for c in catalog.certificates),
             *(k.name for k in catalog.keypairs)]
    _check_half_pairs(out, names)
    modes = _mode_fixes(out, names)
    pending = _Pending({})
    outcomes: list[Outcome] = []
    authorities: dict[str, tuple[x509.Certificate, PrivateKey]] = {}
    for authority in catalog.authorities.values():
        cert, key, outcome = _authority(out, authority, moment, window, pending)
        authorities[authority.name] = (cert, key)
        outcomes.append(outcome)
    for certificate in catalog.certificates:
        ca_cert, ca_key = authorities[certificate.authority]
        outcomes.append(_certificate(out, certificate, ca_cert, ca_key, moment, window, pending))
    for keypair in catalog.keypairs:
        outcomes.append(_keypair(out, keypair, pending))
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    for path, mode, was in modes:
        path.chmod(mode)
        outcomes.append(Outcome("mode", str(path), "restored",
                                f"was {was:04o}, now {mode:04o}"))
    for path, (data, mode) in pending.files.items():
        crypto.write_file(path, data, mode)
    write_bundle(out)
    return outcomes


def _check_half_pairs(out: Path, names: list[str]) -> None:
    problems = []
    for name in names:
        cert, key = pair_paths(out, name)
        if cert.exists() != key.exists():
            have, missing = (cert, key) if cert.exists() else (key, cert)
            problems.append(f"{have} exists but {missing} does not: restore {missing.name}, or "
                            f"remove {have.name} to generate a new pair")
    if problems:
        raise PkiError(problems)


def _mode_fixes(out: Path, names: list[str]) -> list[tuple[Path, int, int]]:
    """The directory (0700) and every private key and the bundle (0600) someone loosened:
    (path, mode wanted, mode found), restored once everything is decided. A key this user does
    not own, or a link, is refused: its owner or the link's target can be read by others no
    matter what mode this sets."""
    if not out.exists():
        return []
    problems: list[str] = []
    fixes: list[tuple[Path, int, int]] = []
    secrets = [out / f"{name}-key.pem" for name in names] + [out / BUNDLE]
    for path, wanted in [(out, 0o700), *((p, 0o600) for p in secrets)]:
        try:
            found = path.lstat()
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(found.st_mode):
            problems.append(f"{path} is a symbolic link: keys must be regular files in the "
                            "directory; replace the link with the file")
            continue
        if found.st_uid != os.geteuid():
            problems.append(f"{path} is owned by uid {found.st_uid}, not by the user generating "
                            f"(uid {os.geteuid()}): chown it, or remove it to generate anew")
            continue
        mode = stat.S_IMODE(found.st_mode)
        if mode & 0o077:
            fixes.append((path, wanted, mode))
    if problems:
        raise PkiError(problems)
    return fixes


def _authority(out: Path, authority: Authority, now: datetime.datetime,
               window: datetime.datetime, pending: _Pending
               ) -> tuple[x509.Certificate, PrivateKey, Outcome]:
    cert_path, key_path = pair_paths(out, authority.name)
    key: PrivateKey | None = None
    reason = "new"
    if cert_path.exists():
        cert, key = crypto.read_cert(cert_path), crypto.read_key(key_path)
        reason = _ca_mismatch(cert, key, authority, window)
        if reason == "":
            return cert, key, Outcome("ca", authority.name, "reused", "matches the catalog")
        if _algorithm_differs(key, authority.algorithm, authority.algorithm_stated):
            key = None
    fresh = key is None
    if key is None:
        key = crypto.new_key(authority.algorithm)
        pending.add(key_path, crypto.key_pem(key), 0o600)
    cert = crypto.issue_ca(authority.name, key, authority.validity_days, now)
    pending.add(cert_path, crypto.cert_pem(cert), 0o644)
    action = "created" if reason == "new" else "reissued"
    if action == "reissued" and fresh:
        reason += "; new key"
    return cert, key, Outcome("ca", authority.name, action, reason)


def _ca_mismatch(cert: x509.Certificate, key: PrivateKey, authority: Authority,
                 window: datetime.datetime) -> str:
    if not crypto.same_public_key(crypto.public_key_of(cert), key.public_key()):
        return "its key does not match the certificate"
    if cert.subject != crypto.name(authority.name) or not crypto.is_ca(cert):
        return f"not a CA with subject CN={authority.name}"
    if not crypto.signed_by(cert, cert):
        return "not self-signed"
    if _algorithm_differs(key, authority.algorithm, authority.algorithm_stated):
        return f"key is {crypto.key_algorithm(key)}, the catalog asks for {authority.algorithm}"
    return _expiry(cert, window)


def _algorithm_differs(key: PrivateKey, wanted: str, stated: bool) -> bool:
    """Only an algorithm the catalog names replaces a key: the default is for new keys (keys
    made under an older default are kept, never rotated by an upgrade)."""
    return stated and crypto.key_algorithm(key) != wanted


def _expiry(cert: x509.Certificate, window: datetime.datetime) -> str:
    if cert.not_valid_after_utc <= window:
        return f"expires {cert.not_valid_after_utc:%Y-%m-%d %H:%M}Z, within the renewal window"
    return ""


def _certificate(out: Path, certificate: Certificate, ca_cert: x509.Certificate,
                 ca_key: PrivateKey, now: datetime.datetime, window: datetime.datetime,
                 pending: _Pending) -> Outcome:
    spec = certificate.spec
    cert_path, key_path = pair_paths(out, spec.document_name)
    dns, ips = spec.subject_alt_names()
    profile = crypto.LeafProfile(crypto.name(spec.common_name, spec.groups), tuple(dns),
                                 tuple(ips), tuple(u for u in ("server", "client")
                                                   if u in spec.usages))
    key: PrivateKey | None = None
    reason = "new"
    if cert_path.exists():
        cert, key = crypto.read_cert(cert_path), crypto.read_key(key_path)
        reason = _leaf_mismatch(cert, key, profile, ca_cert, certificate, window)
        if reason == "":
            return Outcome("certificate", spec.document_name, "reused", "matches the catalog")
        if _algorithm_differs(key, certificate.algorithm, certificate.algorithm_stated):
            key = None
    if key is None:
        key = crypto.new_key(certificate.algorithm)
        pending.add(key_path, crypto.key_pem(key), 0o600)
    cert = crypto.issue_leaf(profile, key.public_key(), ca_cert, ca_key,
                             certificate.validity_days, now)
    pending.add(cert_path, crypto.cert_pem(cert), 0o644)
    return Outcome("certificate", spec.document_name,
                   "created" if reason == "new" else "reissued", reason)


def _leaf_mismatch(cert: x509.Certificate, key: PrivateKey, profile: crypto.LeafProfile,
                   ca_cert: x509.Certificate, certificate: Certificate,
                   window: datetime.datetime) -> str:
    if not crypto.same_public_key(crypto.public_key_of(cert), key.public_key()):
        return "its key does not match the certificate"
    found = crypto.leaf_profile(cert)
    if found.subject != profile.subject:
        return (f"subject is {found.subject.rfc4514_string()}, the catalog asks for "
                f"{profile.subject.rfc4514_string()}")
    if (set(found.dns_names), set(found.ip_addresses)) != (set(profile.dns_names),
                                                           set(profile.ip_addresses)):
        return "its subject alternative names differ from the catalog's hosts"
    if set(found.usages) != set(profile.usages):
        return (f"usages are {', '.join(found.usages) or 'none'}, the catalog asks for "
                f"{', '.join(profile.usages)}")
    if cert.issuer != ca_cert.subject or not crypto.signed_by(cert, ca_cert):
        return f"not signed by the current CA {ca_cert.subject.rfc4514_string()}"
    if _algorithm_differs(key, certificate.algorithm, certificate.algorithm_stated):
        return (f"key is {crypto.key_algorithm(key)}, the catalog asks for "
                f"{certificate.algorithm}")
    return _expiry(cert, window)


def _keypair(out: Path, keypair: Keypair, pending: _Pending) -> Outcome:
    public_path, key_path = pair_paths(out, keypair.name)
    if public_path.exists():
        public, key = crypto.read_public(public_path), crypto.read_key(key_path)
        if not crypto.same_public_key(public, key.public_key()):
            raise PkiError([f"{public_path} is not the public half of {key_path}: restore the "
                            "right file, or remove both to generate a new keypair"])
        if _algorithm_differs(key, keypair.algorithm, keypair.algorithm_stated):
            # Rotating a signing key invalidates what it signed: never done silently.
            raise PkiError([f"{key_path} is {crypto.key_algorithm(key)}, the catalog asks for "
                            f"{keypair.algorithm}: remove {public_path.name} and "
                            f"{key_path.name} to rotate it"])
        return Outcome("keypair", keypair.name, "reused", "matches the catalog")
    key = crypto.new_key(keypair.algorithm)
    pending.add(key_path, crypto.key_pem(key), 0o600)
    pending.add(public_path, crypto.public_pem(key.public_key()), 0o644)
    return Outcome("keypair", keypair.name, "created", "new")


# The bundle ---------------------------------------------------------------------------------

_SCHEMAS = {
    ("ca", False): "deckhand/CertificateAuthority/v1",
    ("ca", True): "deckhand/CertificateAuthorityKey/v1",
    ("certificate", False): "deckhand/Certificate/v1",
    ("certificate", True): "deckhand/CertificateKey/v1",
    ("keypair", False): "deckhand/PublicKey/v1",
    ("keypair", True): "deckhand/PrivateKey/v1",
}


def classify(out: Path) -> dict[str, str]:
    """Every pair in `out` by name: "ca", "certificate" or "keypair"."""
    kinds: dict[str, str] = {}
    for path in sorted(out.glob("*.pem")):
        if path.name.endswith("-key.pem"):
            continue
        text = path.read_text()
        if "BEGIN PUBLIC KEY" in text:
            kinds[path.stem] = "keypair"
        elif "BEGIN CERTIFICATE" in text:
            kinds[path.stem] = "ca" if crypto.is_ca(crypto.read_cert(path)) else "certificate"
    return kinds


def write_bundle(out: Path) -> Path:
    """`certificates.yaml`: every file in `out` as one YAML document each (0600: it holds the
    private keys)."""
    documents = []
    for stem, kind in classify(out).items():
        for secret in (False, True):
            path = out / (f"{stem}-key.pem" if secret else f"{stem}.pem")
            if not path.exists():
                continue
            documents.append({
                "schema": _SCHEMAS[(kind, secret)],
                "metadata": {"schema": "metadata/Document/v1", "name": stem,
                             "layeringDefinition": {"abstract": False, "layer": "site"},
                             "storagePolicy": "encrypted" if secret else "cleartext"},
                "data": path.read_text(),
            })
    bundle = out / BUNDLE
    text = yaml.safe_dump_all(documents, sort_keys=False, explicit_start=True)
    crypto.write_file(bundle, text.encode(), 0o600)
    return bundle
