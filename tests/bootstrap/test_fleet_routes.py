"""The fleet service's bootstrap routes, on the real service (uvicorn on loopback, SQLite
store) with the real Kubernetes adapter talking to the API stand-in: join scripts, design
validation, node labels, and bad input answered with 4xx naming the field."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from divingbell.fleet.settings import FleetSettings
from tests.bootstrap.kubeapi import KubeApiStandIn
from tests.bootstrap.test_build import CATALOG, DESIGN
from tests.conftest import Cli
from tests.fleet.servers import ProcessServer, ThreadServer, thread_server


@pytest.fixture
def server(cli: Cli, tmp_path: Path, kube_api: KubeApiStandIn) -> Iterator[ThreadServer]:
    (tmp_path / "catalog.yaml").write_text(CATALOG)
    (tmp_path / "design.yaml").write_text(DESIGN)
    assert cli("pki", "generate", tmp_path / "catalog.yaml", "-o", tmp_path / "pki"
               ).returncode == 0
    settings = FleetSettings(db_url=f"sqlite:///{tmp_path / 'fleet.db'}", control_plane_size=1,
                             bootstrap_design=(str(tmp_path / "design.yaml"),),
                             bootstrap_pki=str(tmp_path / "pki"), kube_server=kube_api.url)
    with thread_server(settings) as running:
        yield running


def call(server: ThreadServer, method: str, path: str, token: str | None,
         headers: dict[str, str] | None = None, **kwargs: object) -> httpx.Response:
    sent = {**(headers or {}), **({"Authorization": f"Bearer {token}"} if token else {})}
    return httpx.request(method, server.url + path, headers=sent, timeout=30,
                         **kwargs)  # type: ignore[arg-type]


def test_join_scripts(server: ThreadServer, tmp_path: Path) -> None:
    reply = call(server, "GET", "/v1/join-scripts", server.admin_token,
                 params=[("hostname", "n1"), ("ip", "10.0.0.11"), ("labels.static", "disk=ssd"),
                         ("labels.dynamic", "tier=gold")])
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"].startswith("text/x-shellscript")
    script = tmp_path / "join-n1.sh"
    script.write_text(reply.text)
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    assert '"labels":{"team":"blue","tier":"gold"}' in reply.text

    # A machine the fleet discovered and made a worker: its role and the fleet's labels.
    machine = server.bootstrap.discover({
        "uuid": "8c6f0a1e-0000-4000-8000-000000000009", "hostname": "n9",
        "interfaces": [{"name": "eth0", "mac": "52:54:00:00:00:09",
                        "addresses": [{"address": "10.0.0.19", "prefix": 24}]}]})
    server.admin.set_roles(machine["machine_id"], ["worker"])
    fleet = call(server, "GET", "/v1/join-scripts", server.admin_token,
                 params={"hostname": "n9", "ip": "10.0.0.19"})
    assert fleet.status_code == 200, fleet.text
    assert '"node-role.kubernetes.io/worker":""' in fleet.text
    assert "readonly NODE_NAME=n9\n" in fleet.text


def test_join_scripts_bad_input(server: ThreadServer) -> None:
    conflict = call(server, "GET", "/v1/join-scripts", server.admin_token,
                    params={"hostname": "n1", "ip": "10.0.0.10"})
    assert conflict.status_code == 400
    assert conflict.json()["detail"]["error"] == "conflict"
    messages = [p["message"] for p in conflict.json()["detail"]["problems"]]
    assert messages == ["the design gives n1 the address 10.0.0.11, not 10.0.0.10",
                        "10.0.0.10 is the address of n0 in the design"]
    bad = call(server, "GET", "/v1/join-scripts", server.admin_token,
               params=[("hostname", "Bad_Name"), ("labels.dynamic", "oops")])
    assert bad.status_code == 400
    assert {p["field"] for p in bad.json()["detail"]["problems"]} == {
        "hostname", "ip", "labels.dynamic"}
    assert call(server, "GET", "/v1/join-scripts", None,
                params={"hostname": "n1", "ip": "10.0.0.11"}).status_code == 401
    assert call(server, "GET", "/v1/join-scripts", server.reader_token,
                params={"hostname": "n1", "ip": "10.0.0.11"}).status_code == 403


def test_designs_validate(server: ThreadServer) -> None:
    ok = call(server, "POST", "/v1/designs/validate", server.reader_token, content=DESIGN,
              headers={"Content-Type": "application/yaml"})
    assert ok.status_code == 200, ok.text
    assert ok.json()["status"] == "Success"
    bad = call(server, "POST", "/v1/designs/validate", server.reader_token,
               content=DESIGN.replace("role: worker}", "role: wroker}").replace(
                   "cluster_dns: 10.96.0.10", "cluster_dns: nowhere"))
    assert bad.status_code == 422
    detail = bad.json()["detail"]
    assert detail["status"] == "Failure"
    assert [p["path"] for p in detail["problems"]] == ["cluster.cluster_dns"]
    garbage = call(server, "POST", "/v1/designs/validate", server.reader_token,
                   content=b"\xff\xfe")
    assert garbage.status_code == 422
    assert garbage.json()["detail"]["field"] == "body"
    assert call(server, "POST", "/v1/designs/validate", server.reader_token,
                content="- a list\n").status_code == 422
    assert call(server, "POST", "/v1/designs/validate", None,
                content=DESIGN).status_code == 401


def test_node_labels(server: ThreadServer, kube_api: KubeApiStandIn) -> None:
    kube_api.add_node("n1", {"kubernetes.io/hostname": "n1", "old": "x"})
    done = call(server, "PUT", "/v1/nodes/n1/labels", server.admin_token,
                json={"labels": {"team": "blue"}})
    assert done.status_code == 200, done.text
    assert done.json()["removed"] == ["old"]
    assert kube_api.nodes["n1"]["labels"] == {"kubernetes.io/hostname": "n1", "team": "blue"}

    missing = call(server, "PUT", "/v1/nodes/ghost/labels", server.admin_token,
                   json={"labels": {}})
    assert missing.status_code == 404
    assert missing.json()["detail"] == {"error": "node-not-found", "node": "ghost"}
    for body, field in (({"labels": {"a b": "c"}}, "labels.a b"), ({"labels": "x"}, "labels"),
                        ([], "labels")):
        reply = call(server, "PUT", "/v1/nodes/n1/labels", server.admin_token, json=body)
        assert reply.status_code == 422, reply.text
        assert reply.json()["detail"]["problems"][0]["field"] == field
    not_json = call(server, "PUT", "/v1/nodes/n1/labels", server.admin_token, content="{")
    assert not_json.status_code == 422
    assert not_json.json()["detail"]["field"] == "body"
    assert call(server, "PUT", "/v1/nodes/N!/labels", server.admin_token,
                json={"labels": {}}).status_code == 422
    assert call(server, "PUT", "/v1/nodes/n1/labels", server.bootstrap_token,
                json={"labels": {}}).status_code == 403
    assert kube_api.nodes["n1"]["labels"] == {"kubernetes.io/hostname": "n1", "team": "blue"}


def test_unconfigured_bootstrap_is_a_clear_404(tmp_path: Path) -> None:
    # Not a 5xx: nothing is broken, the service was started without a design (and the API
    # fuzzer holds every route to "never a server error").
    with thread_server(FleetSettings(db_url=f"sqlite:///{tmp_path / 'f.db'}",
                                     control_plane_size=1)) as bare:
        reply = call(bare, "GET", "/v1/join-scripts", bare.admin_token,
                     params={"hostname": "n1", "ip": "10.0.0.11"})
        assert reply.status_code == 404
        assert reply.json()["detail"]["error"] == "bootstrap-not-configured"
        assert "--bootstrap-design" in reply.json()["detail"]["message"]


def test_divingbell_serve_takes_the_bootstrap_options(cli: Cli, tmp_path: Path,
                                                      kube_api: KubeApiStandIn) -> None:
    (tmp_path / "catalog.yaml").write_text(CATALOG)
    (tmp_path / "design.yaml").write_text(DESIGN)
    assert cli("pki", "generate", tmp_path / "catalog.yaml", "-o", tmp_path / "pki"
               ).returncode == 0
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "stand-in",
        "clusters": [{"name": "stand-in", "cluster": {"server": kube_api.url}}],
        "users": [{"name": "stand-in", "user": {}}],
        "contexts": [{"name": "stand-in", "context": {"cluster": "stand-in",
                                                       "user": "stand-in"}}]}))
    db_url = f"sqlite:///{tmp_path / 'fleet.db'}"
    process = ProcessServer(db_url, args=(
        "--bootstrap-design", str(tmp_path / "design.yaml"), "--bootstrap-pki",
        str(tmp_path / "pki"), "--kubeconfig", str(kubeconfig))).start(tmp_path / "serve.log")
    try:
        created = cli("fleet", "token", "create", "--db", db_url, "--role", "admin")
        assert created.returncode == 0, created.stderr
        token = created.stdout.strip().splitlines()[-1]
        script = httpx.get(f"{process.url}/v1/join-scripts", timeout=30,
                           params={"hostname": "n1", "ip": "10.0.0.11"},
                           headers={"Authorization": f"Bearer {token}"})
        assert script.status_code == 200, script.text
        assert script.text.startswith("#!/bin/bash\n")
        kube_api.add_node("n1", {"old": "x"})
        labels = httpx.put(f"{process.url}/v1/nodes/n1/labels", timeout=30,
                           json={"labels": {"team": "blue"}},
                           headers={"Authorization": f"Bearer {token}"})
        assert labels.status_code == 200, labels.text
        assert kube_api.nodes["n1"]["labels"] == {"team": "blue"}
    finally:
        process.stop()
