"""Inspect a PKI directory (`pki check`): each certificate's subject, SANs, issuer and expiry,
whether it chains to its CA, and re-issue (`--renew`) those that expire or no longer chain."""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from divingbell.pki import crypto
from divingbell.pki.crypto import PkiError
from divingbell.pki.generate import classify, pair_paths, write_bundle


@dataclass(frozen=True)
class CertStatus:
    name: str
    kind: str                 # "ca" | "certificate"
    subject: str
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    usages: tuple[str, ...]
    issuer: str
    issuer_file: str | None   # the CA file it chains to, None if none in the directory
    not_after: datetime.datetime
    problems: tuple[str, ...]
    renewed: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "subject": self.subject,
                "dns_names": list(self.dns_names), "ip_addresses": list(self.ip_addresses),
                "usages": list(self.usages), "issuer": self.issuer,
                "issuer_file": self.issuer_file,
                "not_after": self.not_after.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "problems": list(self.problems), "renewed": self.renewed}


def parse_window(text: str) -> datetime.timedelta:
    """'30d', '12h', '90m' or a plain number of days."""
    units = {"d": "days", "h": "hours", "m": "minutes"}
    value, unit = (text[:-1], text[-1]) if text[-1:] in units else (text, "d")
    try:
        amount = float(value)
        window = datetime.timedelta(**{units[unit]: amount})
    except (ValueError, OverflowError):  # not a number, nan, inf, or beyond what time holds
        raise ValueError(f"{text!r} is not a duration: use e.g. 30d, 12h or 90m") from None
    if amount < 0:
        raise ValueError(f"{text!r}: a window cannot be negative")
    return window


def check(out: Path, within: datetime.timedelta, *, renew: bool = False, rekey: bool = False,
          now: Callable[[], datetime.datetime] | None = None) -> list[CertStatus]:
    if not out.is_dir():
        raise PkiError([f"{out} is not a directory"])
    moment = (now or (lambda: datetime.datetime.now(datetime.UTC)))()
    kinds = classify(out)
    certs = {stem: crypto.read_cert(out / f"{stem}.pem") for stem, kind in kinds.items()
             if kind != "keypair"}
    if not certs:
        raise PkiError([f"no certificates in {out}"])
    statuses = [_status(stem, cert, certs, moment + within) for stem, cert in certs.items()]
    # CAs first: a renewed CA is what the leaves are then checked and re-signed against.
    statuses.sort(key=lambda s: (s.kind != "ca", s.name))
    if not renew or not any(s.problems for s in statuses):
        return statuses
    result = []
    for status in statuses:
        current = certs[status.name]
        fresh = _status(status.name, current, certs, moment + within)
        if fresh.problems:
            certs[status.name] = _renew(out, status.name, current, fresh, certs, rekey, moment)
            fresh = _status(status.name, certs[status.name], certs, moment + within)
            fresh = CertStatus(**{**fresh.__dict__, "renewed": True})
        result.append(fresh)
    write_bundle(out)
    return result


def _status(stem: str, cert: x509.Certificate, certs: dict[str, x509.Certificate],
            deadline: datetime.datetime) -> CertStatus:
    profile = crypto.leaf_profile(cert)
    problems = []
    issuer_file = _issuer_of(cert, certs)
    if issuer_file is None:
        problems.append(f"does not chain to a CA in this directory (issuer "
                        f"{cert.issuer.rfc4514_string()})")
    if cert.not_valid_after_utc <= deadline:
        problems.append(f"expires {cert.not_valid_after_utc:%Y-%m-%d %H:%M}Z")
    return CertStatus(stem, "ca" if crypto.is_ca(cert) else "certificate",
                      cert.subject.rfc4514_string(), profile.dns_names, profile.ip_addresses,
                      profile.usages, cert.issuer.rfc4514_string(), issuer_file,
                      cert.not_valid_after_utc, tuple(problems))


def _issuer_of(cert: x509.Certificate, certs: dict[str, x509.Certificate]) -> str | None:
    for stem, candidate in certs.items():
        if (crypto.is_ca(candidate) and candidate.subject == cert.issuer
                and crypto.signed_by(cert, candidate)):
            return stem
    return None


def _renew(out: Path, stem: str, cert: x509.Certificate, status: CertStatus,
           certs: dict[str, x509.Certificate], rekey: bool, now: datetime.datetime
           ) -> x509.Certificate:
    cert_path, key_path = pair_paths(out, stem)
    if not key_path.exists():
        raise PkiError([f"{cert_path} needs renewing ({'; '.join(status.problems)}) but "
                        f"{key_path} does not exist"])
    key = crypto.read_key(key_path)
    if rekey:
        key = crypto.new_key(crypto.key_algorithm(key))
    if status.kind == "ca" and cert.issuer == cert.subject:
        renewed = crypto.reissue(cert, key.public_key(), None, key, now)
    else:
        issuer_stem = status.issuer_file or _ca_named(cert.issuer, certs)
        if issuer_stem is None:
            raise PkiError([f"{cert_path}: no CA {cert.issuer.rfc4514_string()} in {out} "
                            "to re-issue it with"])
        _ca_cert_path, ca_key_path = pair_paths(out, issuer_stem)
        if not ca_key_path.exists():
            raise PkiError([f"{cert_path}: its CA's key {ca_key_path} does not exist"])
        renewed = crypto.reissue(cert, key.public_key(), certs[issuer_stem],
                                 crypto.read_key(ca_key_path), now)
    if rekey:
        crypto.write_file(key_path, crypto.key_pem(key), 0o600)
    crypto.write_file(cert_path, crypto.cert_pem(renewed), 0o644)
    return renewed


def _ca_named(subject: x509.Name, certs: dict[str, x509.Certificate]) -> str | None:
    for stem, candidate in certs.items():
        if crypto.is_ca(candidate) and candidate.subject == subject:
            return stem
    return None
