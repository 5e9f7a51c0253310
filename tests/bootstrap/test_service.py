"""The bootstrap routes' logic (bootstrap/service.py): join scripts for known and new hosts,
conflicts, design validation, node labels; the fleet's router is a thin layer over these."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509

from divingbell.bootstrap.service import FleetMachine, join_script, put_labels, validate_design
from divingbell.kube import FakeKube
from tests.bootstrap.test_build import CATALOG, DESIGN, embedded_archive
from tests.conftest import Cli


@pytest.fixture
def site(cli: Cli, tmp_path: Path) -> tuple[list[Path], Path]:
    (tmp_path / "catalog.yaml").write_text(CATALOG)
    (tmp_path / "design.yaml").write_text(DESIGN)
    assert cli("pki", "generate", tmp_path / "catalog.yaml", "-o", tmp_path / "pki"
               ).returncode == 0
    return [tmp_path / "design.yaml"], tmp_path / "pki"


def test_join_script_for_a_design_node_with_extra_labels(site: tuple[list[Path], Path]) -> None:
    design, pki = site
    reply = join_script(design, pki, hostname="n1", ip="10.0.0.11", static=["disk=ssd"],
                        dynamic=["tier=gold"])
    assert reply.status == 200, reply.body
    assert reply.media_type == "text/x-shellscript"
    assert "readonly NODE_NAME=n1\n" in reply.body
    assert '"labels":{"team":"blue","tier":"gold"}' in reply.body


def test_conflicts_and_bad_input_are_400_with_reasons(site: tuple[list[Path], Path]) -> None:
    design, pki = site
    moved = join_script(design, pki, hostname="n1", ip="10.0.0.50")
    assert moved.status == 400
    assert moved.body["detail"]["error"] == "conflict"
    assert moved.body["detail"]["problems"] == [
        {"field": "ip", "message": "the design gives n1 the address 10.0.0.11, not 10.0.0.50"}]
    taken = join_script(design, pki, hostname="n9", ip="10.0.0.10", role="worker")
    assert taken.status == 400
    assert taken.body["detail"]["problems"] == [
        {"field": "ip", "message": "10.0.0.10 is the address of n0 in the design"}]
    bad = join_script(design, pki, hostname="N_1", ip="x", static=["nolabel"])
    assert bad.status == 400
    assert {p["field"] for p in bad.body["detail"]["problems"]} == {
        "hostname", "ip", "labels.static"}
    roleless = join_script(design, pki, hostname="n9", ip="10.0.0.19")
    assert roleless.status == 400
    assert "has no role" in roleless.body["detail"]["problems"][0]["message"]
    unknown_role = join_script(design, pki, hostname="n9", ip="10.0.0.19", role="db")
    assert unknown_role.body["detail"]["problems"][0]["field"] == "role"


def test_a_new_fleet_machine_gets_a_certificate_issued_for_it(
        site: tuple[list[Path], Path], tmp_path: Path) -> None:
    design, pki = site
    reply = join_script(design, pki, hostname="n9", ip="10.0.0.19",
                        machine=lambda name: FleetMachine("worker", {"fleet/pool": "a"}))
    assert reply.status == 200, reply.body
    assert '"fleet/pool":"a"' in reply.body
    script = tmp_path / "join-n9.sh"
    script.write_text(reply.body)
    embedded_archive(script, tmp_path / "unpacked")
    cert = x509.load_pem_x509_certificate(
        (tmp_path / "unpacked/files/etc/kubernetes/pki/kubelet.pem").read_bytes())
    assert cert.subject.rfc4514_string() == "CN=system:node:n9,O=system:nodes"
    ca = x509.load_pem_x509_certificate((pki / "kubernetes.pem").read_bytes())
    cert.verify_directly_issued_by(ca)
    assert not (pki / "kubelet-n9.pem").exists(), "issued for the script, not stored"


def test_validate_design_lists_every_problem() -> None:
    ok = validate_design(DESIGN)
    assert ok.status == 200
    assert ok.body["nodes"] == ["n0", "n1"]
    bad = validate_design(DESIGN.replace("role: worker}", "role: wroker}")
                          .replace("pod_cidr: 10.97.0.0/16", "pod_cidr: nope"))
    assert bad.status == 422
    detail = bad.body["detail"]
    assert detail["error_count"] == 1
    assert detail["problems"][0]["path"] == "cluster.pod_cidr"
    assert detail["problems"][0]["location"] == "design:4"
    assert validate_design("cluster: [").status == 422


def test_put_labels() -> None:
    kube = FakeKube()
    kube.add_node("n1", {"kubernetes.io/hostname": "n1", "old": "x"})
    done = put_labels(kube, "n1", {"labels": {"team": "blue"}})
    assert done.status == 200
    assert done.body["removed"] == ["old"]
    assert kube.node_objects["n1"].labels == {"kubernetes.io/hostname": "n1", "team": "blue"}
    assert put_labels(kube, "ghost", {"labels": {}}).status == 404
    for body, field in (({}, "labels"), ({"labels": {"a": 1}}, "labels.a"),
                        ({"labels": {"bad key": "v"}}, "labels.bad key")):
        reply = put_labels(kube, "n1", body)
        assert reply.status == 422
        assert reply.body["detail"]["problems"][0]["field"] == field
