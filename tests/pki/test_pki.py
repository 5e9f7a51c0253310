"""`divingbell pki`: certificates from a catalog, checked with the real openssl binary and used
in a real mutual-TLS handshake; reuse, half pairs, expiry and renewal; catalog errors."""

from __future__ import annotations

import json
import socket
import ssl
import stat
import threading
from pathlib import Path
from typing import Any

from tests.conftest import Cli
from tests.pki.conftest import openssl


def generate(cli: Cli, *args: str | Path) -> dict[str, Any]:
    result = cli("pki", "generate", *args, "--format", "json")
    assert result.returncode == 0, result.stdout + result.stderr
    return {item["name"]: item for item in json.loads(result.stdout)["items"]}


def text(cert: Path) -> str:
    return openssl("x509", "-in", cert, "-noout", "-text").stdout


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_generated_chain_sans_usages_and_modes(cli: Cli, catalog: Path, tmp_path: Path) -> None:
    out = tmp_path / "pki"
    result = cli("pki", "generate", catalog, "-o", out)
    assert result.returncode == 0, result.stderr
    assert "PRIVATE KEY" not in result.stdout + result.stderr
    for name in ("apiserver", "admin"):
        verified = openssl("verify", "-CAfile", out / "kubernetes.pem", out / f"{name}.pem")
        assert verified.stdout.strip() == f"{out}/{name}.pem: OK"
    api = text(out / "apiserver.pem")
    for san in ("DNS:localhost", "DNS:kubernetes,", "DNS:kubernetes.default,",
                "DNS:kubernetes.default.svc,", "DNS:kubernetes.default.svc.cluster.local",
                "IP Address:127.0.0.1", "IP Address:10.96.0.1", "IP Address:192.168.77.10"):
        assert san in api, san
    assert "TLS Web Server Authentication, TLS Web Client Authentication" in api
    assert "Subject: CN = apiserver" in api
    assert "Issuer: CN = kubernetes" in api
    assert "CA:FALSE" in api
    # Promenade's default (cfssl, kubeadm): RSA 2048, and so Key Encipherment on leaves.
    assert "Public Key Algorithm: rsaEncryption" in api and "Public-Key: (2048 bit)" in api
    assert "Digital Signature, Key Encipherment" in api
    assert "Subject: O = system:masters, CN = admin" in text(out / "admin.pem")
    ca = text(out / "kubernetes.pem")
    assert "Subject: CN = kubernetes" in ca
    assert "CA:TRUE" in ca
    assert "Public-Key: (2048 bit)" in ca
    assert "Certificate Sign, CRL Sign" in ca
    public = openssl("pkey", "-pubin", "-in", out / "service-account.pem", "-noout", "-text")
    assert "Public-Key: (2048 bit)" in public.stdout
    matching = openssl("pkey", "-in", out / "service-account-key.pem", "-pubout").stdout
    assert matching == (out / "service-account.pem").read_text()
    for path in out.iterdir():
        mode = stat.S_IMODE(path.stat().st_mode)
        secret = path.name.endswith("-key.pem") or path.name == "certificates.yaml"
        assert mode == (0o600 if secret else 0o644), path.name
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    bundle = (out / "certificates.yaml").read_text()
    assert bundle.count("schema: deckhand/CertificateKey/v1") == 2
    assert "schema: deckhand/CertificateAuthority/v1" in bundle
    assert "schema: deckhand/PrivateKey/v1" in bundle


def test_ecdsa_is_one_line_away(cli: Cli, tmp_path: Path) -> None:
    from tests.pki.conftest import CATALOG

    catalog = tmp_path / "catalog.yaml"
    catalog.write_text("algorithm: ecdsa-p256\n" + CATALOG)
    out = tmp_path / "pki"
    generate(cli, catalog, "-o", out)
    api = text(out / "apiserver.pem")
    assert "ASN1 OID: prime256v1" in api and "Key Encipherment" not in api
    assert "ASN1 OID: prime256v1" in text(out / "kubernetes.pem")


def test_keys_made_before_the_rsa_default_are_kept(cli: Cli, tmp_path: Path) -> None:
    """A PKI generated when ECDSA was the default: generating again from the same catalog (no
    algorithm named) reuses every key and certificate; the default only shapes new keys. Only
    a catalog that names another algorithm re-issues."""
    from tests.pki.conftest import CATALOG

    catalog = tmp_path / "catalog.yaml"
    catalog.write_text("algorithm: ecdsa-p256\n" + CATALOG)
    out = tmp_path / "pki"
    generate(cli, catalog, "-o", out)
    before = snapshot(out)
    catalog.write_text(CATALOG)
    items = generate(cli, catalog, "-o", out)
    assert {item["action"] for item in items.values()} == {"reused"}
    assert snapshot(out) == before
    catalog.write_text("algorithm: rsa-2048\n" + CATALOG)
    named = cli("pki", "generate", catalog, "-o", out)
    assert named.returncode != 0  # a signing keypair is never rotated silently
    assert "service-account-key.pem is ecdsa-p256, the catalog asks for rsa-2048" in (
        named.stdout + named.stderr)
    catalog.write_text(CATALOG.replace("admin\n        groups", "admin\n        algorithm: "
                                       "rsa-2048\n        groups"))
    items = generate(cli, catalog, "-o", out)
    assert items["admin"]["action"] == "reissued" and items["apiserver"]["action"] == "reused"
    assert "Public-Key: (2048 bit)" in text(out / "admin.pem")


def test_generate_restores_loosened_modes(cli: Cli, catalog: Path, tmp_path: Path) -> None:
    out = tmp_path / "pki"
    generate(cli, catalog, "-o", out)
    (out / "admin-key.pem").chmod(0o644)
    (out / "kubernetes-key.pem").chmod(0o640)
    out.chmod(0o755)
    result = cli("pki", "generate", catalog, "-o", out)
    assert result.returncode == 0, result.stderr
    assert f"restored  mode        {out / 'admin-key.pem'}  (was 0644, now 0600)" in result.stdout
    assert f"restored  mode        {out}  (was 0755, now 0700)" in result.stdout
    assert stat.S_IMODE((out / "admin-key.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE((out / "kubernetes-key.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    again = cli("pki", "generate", catalog, "-o", out)
    assert "restored" not in again.stdout


def test_generate_refuses_a_key_it_cannot_make_private(cli: Cli, catalog: Path,
                                                       tmp_path: Path) -> None:
    import os

    out = tmp_path / "pki"
    generate(cli, catalog, "-o", out)
    before = snapshot(out)
    os.chown(out / "admin-key.pem", 65534, 65534)  # another user owns it: it can read it
    refused = cli("pki", "generate", catalog, "-o", out)
    assert refused.returncode != 0
    assert f"{out / 'admin-key.pem'} is owned by uid 65534" in refused.stderr
    os.chown(out / "admin-key.pem", 0, 0)
    elsewhere = tmp_path / "elsewhere-key.pem"
    (out / "admin-key.pem").rename(elsewhere)
    (out / "admin-key.pem").symlink_to(elsewhere)
    refused = cli("pki", "generate", catalog, "-o", out)
    assert refused.returncode != 0 and "is a symbolic link" in refused.stderr
    (out / "admin-key.pem").unlink()
    elsewhere.rename(out / "admin-key.pem")
    assert snapshot(out) == before


def _serve_once(server_ctx: ssl.SSLContext, listener: socket.socket, seen: dict[str, Any]) -> None:
    conn, _ = listener.accept()
    try:
        with server_ctx.wrap_socket(conn, server_side=True) as tls:
            seen["peer"] = tls.getpeercert()
            tls.sendall(b"hello " + tls.recv(16))
    except (ssl.SSLError, OSError) as exc:
        seen["error"] = exc
        conn.close()


def handshake(out: Path, client_name: str | None, ca_dir: Path | None = None,
              server_name: str = "apiserver", hostname: str = "kubernetes.default"
              ) -> tuple[bytes | None, dict[str, Any]]:
    """A real TLS server on loopback that requires a client certificate from our CA."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(out / f"{server_name}.pem", out / f"{server_name}-key.pem")
    server_ctx.load_verify_locations(out / "kubernetes.pem")
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.load_verify_locations((ca_dir or out) / "kubernetes.pem")
    if client_name is not None:
        client_dir = ca_dir or out
        client_ctx.load_cert_chain(client_dir / f"{client_name}.pem",
                                   client_dir / f"{client_name}-key.pem")
    seen: dict[str, Any] = {}
    with socket.create_server(("127.0.0.1", 0)) as listener:
        thread = threading.Thread(target=_serve_once, args=(server_ctx, listener, seen))
        thread.start()
        reply = None
        try:
            with socket.create_connection(listener.getsockname()[:2], timeout=10) as raw, \
                    client_ctx.wrap_socket(raw, server_hostname=hostname) as tls:
                tls.sendall(b"admin")
                reply = tls.recv(64)
        except (ssl.SSLError, OSError) as exc:
            seen["client_error"] = exc
        thread.join(10)
    return reply, seen


def test_mutual_tls_handshake_with_the_generated_certificates(cli: Cli, catalog: Path,
                                                              tmp_path: Path) -> None:
    out = tmp_path / "pki"
    generate(cli, catalog, "-o", out)
    reply, seen = handshake(out, "admin")
    assert reply == b"hello admin"
    subject = dict(pair[0] for pair in seen["peer"]["subject"])
    assert subject == {"commonName": "admin", "organizationName": "system:masters"}

    # Without a client certificate the server refuses the connection.
    reply, seen = handshake(out, None)
    assert reply in (None, b"")
    assert "error" in seen
    # A client certificate from another CA with the same name is refused too.
    other = tmp_path / "other"
    generate(cli, catalog, "-o", other)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for name in ("admin.pem", "admin-key.pem"):
        (mixed / name).write_bytes((other / name).read_bytes())
    (mixed / "kubernetes.pem").write_bytes((out / "kubernetes.pem").read_bytes())
    reply, seen = handshake(out, "admin", ca_dir=mixed)
    assert reply in (None, b"")
    assert "certificate" in str(seen.get("error", "")) + str(seen.get("client_error", ""))
    # The server name is checked against the SANs the catalog asked for.
    reply, seen = handshake(out, "admin", hostname="not-in-the-sans.example")
    assert reply is None
    assert "mismatch" in str(seen["client_error"]) or "match" in str(seen["client_error"])


def test_a_second_run_reuses_everything_and_a_change_reissues_only_that(
        cli: Cli, catalog: Path, tmp_path: Path) -> None:
    out = tmp_path / "pki"
    first = generate(cli, catalog, "-o", out)
    assert {i["action"] for i in first.values()} == {"created"}
    before = snapshot(out)
    second = generate(cli, catalog, "-o", out)
    assert {i["action"] for i in second.values()} == {"reused"}
    assert snapshot(out) == before

    catalog.write_text(catalog.read_text().replace("10.96.0.1,", "10.96.0.1, 10.0.0.9,"))
    third = generate(cli, catalog, "-o", out)
    assert third["apiserver"]["action"] == "reissued"
    assert "subject alternative names" in third["apiserver"]["reason"]
    assert {n: i["action"] for n, i in third.items() if n != "apiserver"} == {
        "kubernetes": "reused", "admin": "reused", "service-account": "reused"}
    after = snapshot(out)
    assert after["apiserver-key.pem"] == before["apiserver-key.pem"], "key kept"
    assert after["apiserver.pem"] != before["apiserver.pem"]
    assert "IP Address:10.0.0.9" in text(out / "apiserver.pem")

    # Asking for client usage only re-issues with exactly that; openssl then refuses it as a
    # TLS server certificate.
    catalog.write_text(catalog.read_text().replace(
        "groups: [system:masters]", "groups: [system:masters]\n        usages: [client]"))
    fourth = generate(cli, catalog, "-o", out)
    assert fourth["admin"]["action"] == "reissued"
    assert "TLS Web Client Authentication" in text(out / "admin.pem")
    assert "TLS Web Server Authentication" not in text(out / "admin.pem")
    as_server = openssl("verify", "-purpose", "sslserver", "-CAfile", out / "kubernetes.pem",
                        out / "admin.pem", check=False)
    assert as_server.returncode != 0
    assert openssl("verify", "-purpose", "sslclient", "-CAfile", out / "kubernetes.pem",
                   out / "admin.pem").returncode == 0


def test_half_pairs_are_errors_naming_both_files_and_nothing_is_written(
        cli: Cli, catalog: Path, tmp_path: Path) -> None:
    out = tmp_path / "pki"
    generate(cli, catalog, "-o", out)
    (out / "admin-key.pem").unlink()
    (out / "kubernetes.pem").unlink()
    catalog.write_text(catalog.read_text() + "  - name: another\n")
    before = snapshot(out)
    result = cli("pki", "generate", catalog, "-o", out)
    assert result.returncode == 1
    assert f"{out}/admin.pem exists but {out}/admin-key.pem does not" in result.stderr
    assert f"{out}/kubernetes-key.pem exists but {out}/kubernetes.pem does not" in result.stderr
    assert "Traceback" not in result.stderr
    assert snapshot(out) == before


def test_expiry_check_renew_and_rekey(cli: Cli, catalog: Path, tmp_path: Path) -> None:
    out = tmp_path / "pki"
    catalog.write_text("validity_days: 20\n" + catalog.read_text())
    generate(cli, catalog, "-o", out, "--renewal-window", "10d")
    assert {i["action"] for i in generate(cli, catalog, "-o", out, "--renewal-window", "10d"
                                          ).values()} == {"reused"}
    assert cli("pki", "check", out, "--within", "10d").returncode == 0
    failing = cli("pki", "check", out, "--within", "30d", "--format", "json")
    assert failing.returncode == 1
    report = {c["name"]: c for c in json.loads(failing.stdout)["certificates"]}
    assert report["admin"]["problems"][0].startswith("expires ")
    assert report["kubernetes"]["problems"] == []   # CAs default to ten years
    assert report["apiserver"]["issuer_file"] == "kubernetes"

    keys = {n: (out / f"{n}-key.pem").read_bytes() for n in ("admin", "apiserver")}
    renewed = cli("pki", "check", out, "--within", "30d", "--renew", "--format", "json")
    # Re-issued for the same 20 days, so they still fall in a 30-day window: exit 1 tells so.
    assert renewed.returncode == 1
    assert {c["name"]: c["renewed"] for c in json.loads(renewed.stdout)["certificates"]} == {
        "kubernetes": False, "admin": True, "apiserver": True}
    assert {n: (out / f"{n}-key.pem").read_bytes() for n in keys} == keys, "keys reused"
    openssl("verify", "-CAfile", out / "kubernetes.pem", out / "admin.pem")

    # Within the renewal window, generate re-issues (the catalog now asks for a year).
    catalog.write_text(catalog.read_text().replace("validity_days: 20\n", ""))
    again = generate(cli, catalog, "-o", out, "--renewal-window", "30d")
    assert again["admin"]["action"] == "reissued"
    assert "within the renewal window" in again["admin"]["reason"]
    assert cli("pki", "check", out, "--within", "30d").returncode == 0

    rekeyed = cli("pki", "check", out, "--within", "400d", "--renew", "--rekey")
    assert "[renewed]" in rekeyed.stdout
    assert (out / "admin-key.pem").read_bytes() != keys["admin"]
    assert stat.S_IMODE((out / "admin-key.pem").stat().st_mode) == 0o600
    openssl("verify", "-CAfile", out / "kubernetes.pem", out / "admin.pem")
    reply, _ = handshake(out, "admin")
    assert reply == b"hello admin"


def test_check_finds_a_certificate_that_does_not_chain(cli: Cli, catalog: Path,
                                                       tmp_path: Path) -> None:
    out, other = tmp_path / "pki", tmp_path / "other"
    generate(cli, catalog, "-o", out)
    generate(cli, catalog, "-o", other)
    for name in ("admin.pem", "admin-key.pem"):
        (out / name).write_bytes((other / name).read_bytes())
    result = cli("pki", "check", out)
    assert result.returncode == 1
    assert "does not chain to a CA in this directory" in result.stdout
    fixed = cli("pki", "check", out, "--renew")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    openssl("verify", "-CAfile", out / "kubernetes.pem", out / "admin.pem")


def test_wrapped_catalogs_in_several_files_share_their_cas(cli: Cli, tmp_path: Path) -> None:
    wrapped = tmp_path / "site.yaml"
    wrapped.write_text("""\
---
schema: promenade/Genesis/v1
metadata: {name: genesis}
data: {hostname: n0}
---
schema: promenade/PKICatalog/v1
metadata:
  schema: metadata/Document/v1
  name: cluster-certificates
data:
  certificate_authorities:
    kubernetes:
      certificates:
        - document_name: kubelet-n0
          common_name: system:node:n0
          groups: [system:nodes]
""")
    bare = tmp_path / "more.yaml"
    bare.write_text("""\
certificate_authorities:
  kubernetes:
    certificates:
      - document_name: kubelet-n1
        common_name: system:node:n1
        groups: [system:nodes]
        algorithm: rsa-2048
  etcd:
    certificates:
      - document_name: etcd-n0
        common_name: etcd-n0
        hosts: [n0, 10.0.0.10]
""")
    out = tmp_path / "pki"
    items = generate(cli, wrapped, bare, "-o", out)
    assert sorted(items) == ["etcd", "etcd-n0", "kubelet-n0", "kubelet-n1", "kubernetes"]
    for name in ("kubelet-n0", "kubelet-n1"):
        openssl("verify", "-CAfile", out / "kubernetes.pem", out / f"{name}.pem")
    assert openssl("verify", "-CAfile", out / "etcd.pem", out / "kubelet-n0.pem",
                   check=False).returncode != 0
    rsa = text(out / "kubelet-n1.pem")
    assert "Public-Key: (2048 bit)" in rsa
    assert "Digital Signature, Key Encipherment" in rsa
    assert "Subject: O = system:nodes, CN = system:node:n1" in rsa


def test_catalog_problems_name_path_and_line(cli: Cli, tmp_path: Path) -> None:
    first = tmp_path / "a.yaml"
    first.write_text("""\
certificate_authorities:
  kubernetes:
    certificates:
      - document_name: admin
        common_name: admin
        host: [localhost]
      - document_name: web
        common_name: web
        hosts: ["not a host!"]
        usages: [peer]
""")
    second = tmp_path / "b.yaml"
    second.write_text("""\
schema: promenade/PKICatalog/v1
metadata: {name: more}
data:
  certificate_authorities:
    kubernetes:
      certificates:
        - document_name: apiserver
          common_name: apiserver
    front-proxy:
      certificates:
        - document_name: apiserver
          common_name: again
""")
    out = tmp_path / "pki"
    result = cli("pki", "generate", first, second, "-o", out)
    assert result.returncode == 2
    assert (f"certificate_authorities.kubernetes.certificates[0].host: unknown key 'host'; "
            f"did you mean 'hosts'? ({first}:6)") in result.stderr
    assert "certificate_authorities.kubernetes.certificates[1].hosts: " in result.stderr
    assert "'not a host!' is neither an IP address nor a DNS name" in result.stderr
    assert "certificates[1].usages[0]: 'peer' is not allowed" in result.stderr
    assert not out.exists()

    first.write_text(first.read_text().replace("host: [localhost]", "hosts: [localhost]")
                     .replace('["not a host!"]', "[web.example]").replace("[peer]", "[server]"))
    dup = cli("pki", "generate", first, second, "-o", out, "--format", "json")
    assert dup.returncode == 2
    problems = json.loads(dup.stdout)["problems"]
    assert problems == [{
        "path": "data.certificate_authorities.front-proxy.certificates[0].document_name",
        "message": f"'apiserver' is already defined at {second}:7; every CA, certificate and "
                   "keypair needs its own name",
        "location": f"{second}:11"}]
    assert not out.exists()


def test_a_window_that_is_not_a_finite_duration_is_refused_naming_the_option(
        cli: Cli, catalog: Path, tmp_path: Path) -> None:
    out = tmp_path / "pki"
    for window in ("inf", "nan", "1e400", "-1d", "30x", ""):
        generated = cli("pki", "generate", catalog, "-o", out, "--renewal-window", window)
        checked = cli("pki", "check", tmp_path, "--within", window)
        for result, option in ((generated, "--renewal-window"), (checked, "--within")):
            assert result.returncode == 2, (window, result.stderr)
            assert f"Invalid value for {option}: {window!r}" in result.stderr, result.stderr
            assert "Traceback" not in result.stderr
    assert not out.exists()
