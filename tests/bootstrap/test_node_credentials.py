"""No shared node credential (issue 22, finding 14): a join script carries only its node's own
certificate, which the API server (NodeRestriction) lets label that Node alone; a design naming
a credential for every script is refused; the fleet never hands out one node key twice."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import httpx

from tests.bootstrap.test_build import DESIGN, embedded_archive, workspace
from tests.bootstrap.test_fleet_routes import server
from tests.conftest import Cli
from tests.fleet.servers import ThreadServer

__all__ = ["server", "workspace"]  # fixtures, used by name


def test_a_design_naming_a_credential_for_every_script_is_refused(cli: Cli, workspace: Path
                                                                  ) -> None:
    design = workspace / "design.yaml"
    design.write_text(DESIGN + "pki: {api_certificate: bootstrap-labeller}\n")
    built = cli("bootstrap", "build", design, "--pki", workspace / "pki", "-o",
                workspace / "scripts")
    assert built.returncode == 2
    assert "pki.api_certificate: every join script would carry this one credential" in (
        built.stderr)
    assert not (workspace / "scripts").exists()


def test_a_script_asks_as_its_node_and_leaves_protected_labels_to_the_fleet(
        cli: Cli, workspace: Path) -> None:
    design = workspace / "design.yaml"
    design.write_text(DESIGN.replace("dynamic: {team: blue}", "dynamic: {team: blue, "
                                     "node-role.kubernetes.io/worker: ''}"))
    out = workspace / "scripts"
    assert cli("bootstrap", "build", design, "--pki", workspace / "pki", "-o", out
               ).returncode == 0
    script = (out / "join-n1.sh").read_text()
    assert "readonly API_CERT_FILE=/etc/kubernetes/pki/kubelet.pem\n" in script
    assert "readonly API_KEY_FILE=/etc/kubernetes/pki/kubelet-key.pem\n" in script
    patch = re.search(r"^readonly LABEL_PATCH=(.*)$", script, re.M)
    assert patch and '"team":"blue"' in patch.group(1)
    assert "node-role.kubernetes.io/worker" not in patch.group(1)
    left = re.search(r"^readonly LABELS_LEFT=(.*)$", script, re.M)
    assert left and '"node-role.kubernetes.io/worker":""' in left.group(1)
    archive = embedded_archive(out / "join-n1.sh", workspace / "unpacked")
    assert not [m.name for m in archive.getmembers() if "bootstrap-api" in m.name]


def test_the_fleet_never_hands_out_a_node_key_twice(server: ThreadServer, tmp_path: Path
                                                    ) -> None:
    pki = Path(server.settings.bootstrap_pki or "")
    keys = []
    for attempt in range(2):
        reply = httpx.get(f"{server.url}/v1/join-scripts", timeout=30,
                          params={"hostname": "n1", "ip": "10.0.0.11"},
                          headers={"Authorization": f"Bearer {server.admin_token}"})
        assert reply.status_code == 200, reply.text
        script = tmp_path / f"join-{attempt}.sh"
        script.write_text(reply.text)
        files = tmp_path / f"unpacked-{attempt}"
        embedded_archive(script, files)
        key = files / "files/etc/kubernetes/pki/kubelet-key.pem"
        cert = files / "files/etc/kubernetes/pki/kubelet.pem"
        subprocess.run(["openssl", "verify", "-CAfile", pki / "kubernetes.pem", cert],
                       check=True, capture_output=True)
        public = subprocess.run(["openssl", "pkey", "-in", key, "-pubout"], check=True,
                                capture_output=True).stdout
        assert public == subprocess.run(["openssl", "x509", "-in", cert, "-noout", "-pubkey"],
                                        check=True, capture_output=True).stdout
        keys.append(key.read_bytes())
    assert keys[0] != keys[1]
    assert (pki / "kubelet-n1-key.pem").read_bytes() not in keys
