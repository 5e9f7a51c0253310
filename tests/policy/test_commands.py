"""The `divingbell policy` and `divingbell tenants` commands, run as processes: check,
manifests (valid Kubernetes objects), serve over HTTPS with namespace lookups through the real
adapter to an API server stub, and one tenant sync pass."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from divingbell.kube import FakeKube
from tests.policy.apistub import ApiStub
from tests.policy.conftest import namespace, tenant_cluster
from tests.policy.pki import ScratchCa, csr_signer
from tests.policy.reviews import Webhook, patched, pod, review
from tests.policy.tenantworld import World
from tests.policy.test_config import EXAMPLE


def divingbell(*args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "divingbell", *args], capture_output=True,
                          text=True, check=check, timeout=120)


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(EXAMPLE)
    return path


def kubeconfig_for(url: str, path: Path) -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "stub",
        "clusters": [{"name": "stub", "cluster": {"server": url}}],
        "users": [{"name": "stub", "user": {}}],
        "contexts": [{"name": "stub", "context": {"cluster": "stub", "user": "stub"}}]}))
    return path


def test_check(policy_file: Path, tmp_path: Path) -> None:
    run = divingbell("policy", "check", "--config", str(policy_file), check=True)
    assert "4 policies" in run.stdout and "/mutate/uid" in run.stdout
    run = divingbell("policy", "check", "--config", str(policy_file), "--format", "json",
                     check=True)
    assert json.loads(run.stdout)["routes"]["/validate/hostpath"] == "hostpath"
    bad = tmp_path / "bad.yaml"
    bad.write_text("uid_enforcer:\n  enabled: maybe\n")
    run = divingbell("policy", "check", "--config", str(bad))
    assert run.returncode == 2 and "uid_enforcer.enabled: must be true or false" in run.stderr
    assert f"{bad}:2" in run.stderr and "Traceback" not in run.stderr
    # A script asking for JSON gets JSON on stdout, errors included (as `validate`).
    run = divingbell("policy", "check", "--config", str(bad), "--format", "json")
    assert run.returncode == 2
    report = json.loads(run.stdout)
    assert report["valid"] is False
    assert report["problems"][0]["path"] == "uid_enforcer.enabled"
    assert report["problems"][0]["location"] == f"{bad}:2"


def test_manifests_refuse_an_image_reference_that_is_not_one(
        policy_file: Path, ca: ScratchCa, tmp_path: Path) -> None:
    bundle = tmp_path / "ca.crt"
    bundle.write_bytes(ca.pem)
    run = divingbell("policy", "manifests", "--config", str(policy_file), "--ca-bundle",
                     str(bundle), "--image", "registry.example/divingbell:1\nkind: Pod")
    assert run.returncode == 2
    assert "Invalid value for '--image'" in run.stderr and "kind: Pod" not in run.stdout


def test_manifests_are_valid_and_fail_closed(policy_file: Path, ca: ScratchCa,
                                             tmp_path: Path) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    bundle = tmp_path / "ca.crt"
    bundle.write_bytes(ca.pem)
    run = divingbell("policy", "manifests", "--config", str(policy_file), "--ca-bundle",
                     str(bundle), "--image", "registry.example/divingbell:1", check=True)
    objects = list(yaml.safe_load_all(run.stdout))
    for obj in objects:
        kubernetes_validate.validate(obj, "1.31", strict=True)
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for obj in objects:
        by_kind.setdefault(obj["kind"], []).append(obj)
    deployment = by_kind["Deployment"][0]
    assert deployment["spec"]["replicas"] == 2
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": 8443,
                                                      "scheme": "HTTPS"}
    assert container["image"] == "registry.example/divingbell:1"
    assert by_kind["ConfigMap"][0]["data"]["policy.yaml"] == EXAMPLE
    assert by_kind["Service"][0]["spec"]["ports"][0]["port"] == 443
    mutating = by_kind["MutatingWebhookConfiguration"][0]["webhooks"]
    validating = by_kind["ValidatingWebhookConfiguration"][0]["webhooks"]
    assert [w["clientConfig"]["service"]["path"] for w in mutating + validating] == [
        "/mutate/uid", "/mutate/automount", "/validate/registry", "/validate/hostpath"]
    for hook in mutating + validating:
        assert hook["failurePolicy"] == "Fail" and hook["timeoutSeconds"] == 5
        assert base64.b64decode(hook["clientConfig"]["caBundle"]) == ca.pem
        selector = hook["namespaceSelector"]
        assert selector["matchLabels"] == {"tenancy": "tool"}
        assert {"key": "kubernetes.io/metadata.name", "operator": "NotIn",
                "values": ["divingbell-policy", "kube-system"]} in selector["matchExpressions"]
    registry_resources = {r for rule in validating[0]["rules"] for r in rule["resources"]}
    assert {"pods", "deployments", "cronjobs", "jobs", "statefulsets", "daemonsets",
            "replicasets", "pods/ephemeralcontainers"} <= registry_resources
    tenant_role = next(r for r in by_kind["ClusterRole"] if r["metadata"]["name"] ==
                       "divingbell-tenant")
    assert all("namespaces" not in rule["resources"] for rule in tenant_role["rules"])


def test_manifests_have_no_anchors_and_the_policy_reads_as_written(policy_file: Path,
                                                                   ca: ScratchCa,
                                                                   tmp_path: Path) -> None:
    # Reviewers read these objects before giving them to the API server, and some tools
    # reject YAML aliases: repeated rules and labels are written out, the policy as a block.
    bundle = tmp_path / "ca.crt"
    bundle.write_bytes(ca.pem)
    run = divingbell("policy", "manifests", "--config", str(policy_file), "--ca-bundle",
                     str(bundle), check=True)
    events = list(yaml.parse(run.stdout))
    assert not [e for e in events if isinstance(e, yaml.AliasEvent)]
    assert not [e for e in events if getattr(e, "anchor", None)]
    config_map = next(o for o in yaml.safe_load_all(run.stdout) if o["kind"] == "ConfigMap")
    assert config_map["data"]["policy.yaml"] == EXAMPLE
    assert "  policy.yaml: |\n    uid_enforcer:" in run.stdout


def test_manifests_need_a_ca_and_only_enabled_policies_get_webhooks(
        tmp_path: Path, ca: ScratchCa) -> None:
    only = tmp_path / "only.yaml"
    only.write_text("registry_enforcer: {enabled: true, registries: [r.example.org]}\n")
    run = divingbell("policy", "manifests", "--config", str(only), "--pki-dir",
                     str(tmp_path / "nope"))
    assert run.returncode == 2 and "no CA bundle" in run.stderr
    (tmp_path / "pki").mkdir()
    (tmp_path / "pki" / "ca.crt").write_bytes(ca.pem)
    run = divingbell("policy", "manifests", "--config", str(only), "--pki-dir",
                     str(tmp_path / "pki"), "--no-tenants", check=True)
    kinds = [o["kind"] for o in yaml.safe_load_all(run.stdout)]
    assert "MutatingWebhookConfiguration" not in kinds
    assert kinds.count("ValidatingWebhookConfiguration") == 1
    assert "RoleBinding" not in kinds


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def api_stub() -> Iterator[ApiStub]:
    stub = ApiStub(tenant_cluster())
    yield stub
    stub.close()


def test_serve_answers_over_https_with_namespaces_from_the_api(
        policy_file: Path, tls_files: tuple[Path, Path], ca: ScratchCa, api_stub: ApiStub,
        tmp_path: Path) -> None:
    port = _free_port()
    kubeconfig = kubeconfig_for(api_stub.url, tmp_path / "kubeconfig")
    process = subprocess.Popen(
        [sys.executable, "-m", "divingbell", "policy", "serve", "--config", str(policy_file),
         "--tls-cert", str(tls_files[0]), "--tls-key", str(tls_files[1]),
         "--listen", f"127.0.0.1:{port}", "--kubeconfig", str(kubeconfig)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        client = Webhook(port, ca.pem)
        deadline = time.monotonic() + 30
        while True:
            try:
                assert client.raw("GET", "/healthz")[0] == 200
                break
            except OSError:
                client = Webhook(port, ca.pem)
                assert time.monotonic() < deadline and process.poll() is None
                time.sleep(0.1)
        submitted = pod()
        response = client.post("/mutate/uid", review(submitted))
        assert patched(submitted, response)["spec"]["securityContext"]["runAsUser"] == 52001
        refused = client.post("/mutate/uid", review(pod(), namespace="tool-noanno"))
        assert not refused["allowed"]
        assert [r.path for r in api_stub.received] == ["/api/v1/namespaces/tool-alice",
                                                       "/api/v1/namespaces/tool-noanno"]
        client.close()
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    assert "serving /mutate/automount, /mutate/uid" in stderr
    assert "uid refused Pod 'web' in tool-noanno" in stderr
    # Namespace lookups are the HTTP client's INFO lines: noise at every review (as in the agent).
    assert "HTTP Request:" not in stderr and "/api/v1/namespaces" not in stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown tenant homes")
def test_tenants_sync_once(tmp_path: Path, ca: ScratchCa) -> None:
    world = World(tmp_path, ca)
    backend = FakeKube(signer=csr_signer(ca, lambda: world.now[0]))
    backend.put(namespace("divingbell-policy"))
    stub = ApiStub(backend)
    try:
        kubeconfig = kubeconfig_for(stub.url, tmp_path / "kubeconfig")
        config = tmp_path / "tenants-config.yaml"
        config.write_text(yaml.safe_dump({
            "home": {"pattern": str(tmp_path / "home" / "{name}")},
            "cluster": {"server": "https://k8s.example:6443"},
            "credentials": {"csr_timeout_seconds": 5}}))
        run = divingbell("tenants", "sync", "--source", str(world.source_file), "--config",
                         str(config), "--kubeconfig", str(kubeconfig), "--once")
        assert run.returncode == 0, run.stdout + run.stderr
        lines = run.stdout.splitlines()
        assert lines[0].split()[:2] == ["alice", "active"]
        assert "created namespace tool-alice" in lines[0]
        assert lines[-1].endswith("2 active, 1 disabled")
        assert (world.home("alice") / ".kube" / "config").exists()
        run = divingbell("tenants", "sync", "--source", str(world.source_file), "--config",
                         str(config), "--kubeconfig", str(kubeconfig), "--once",
                         "--format", "json")
        report = json.loads(run.stdout)
        assert report["ok"] and all(t.get("actions") is None for t in report["tenants"])
        config.write_text("removal: {max_per_run: -1}\n")
        run = divingbell("tenants", "sync", "--source", str(world.source_file), "--config",
                         str(config), "--once")
        assert run.returncode == 2 and "removal.max_per_run" in run.stderr
        missing = divingbell("tenants", "sync", "--source", str(tmp_path / "none.yaml"),
                             "--kubeconfig", str(kubeconfig), "--once")
        assert missing.returncode == 1 and "nothing was changed" in missing.stderr
    finally:
        stub.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown tenant homes")
def test_tenants_sync_loop_serves_metrics_and_stops_on_sigterm(tmp_path: Path,
                                                                ca: ScratchCa) -> None:
    import urllib.request

    world = World(tmp_path, ca)
    backend = FakeKube(signer=csr_signer(ca, lambda: world.now[0]))
    backend.put(namespace("divingbell-policy"))
    stub = ApiStub(backend)
    port = _free_port()
    config = tmp_path / "tenants-config.yaml"
    config.write_text(yaml.safe_dump({"home": {"pattern": str(tmp_path / "home" / "{name}")}}))
    process = subprocess.Popen(
        [sys.executable, "-m", "divingbell", "tenants", "sync", "--source",
         str(world.source_file), "--config", str(config), "--kubeconfig",
         str(kubeconfig_for(stub.url, tmp_path / "kubeconfig")), "--listen",
         f"127.0.0.1:{port}", "--interval", "5"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        text = ""
        while 'divingbell_tenants{state="active"} 2.0' not in text:
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.2)
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as answer:
                    text = answer.read().decode()
            except OSError:
                continue
        assert 'divingbell_tenants_accounts_total{event="created"} 3.0' in text
        assert "divingbell_tenants_run_seconds_count 1.0" in text
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
        stub.close()
    assert process.returncode == 0, stderr
    assert "alice" in stderr and "2 active, 1 disabled" in stderr
    assert "HTTP Request:" not in stderr


def test_tenants_check_reads_the_source_without_a_cluster(tmp_path: Path) -> None:
    source = tmp_path / "tenants.yaml"
    source.write_text("tenants:\n  - {name: alice, uid: 52001}\n  - {name: bob, uid: 52001}\n"
                      "  - {name: carol, uid: 52003, disabled: true}\n")
    run = divingbell("tenants", "check", "--source", str(source), check=True)
    lines = run.stdout.splitlines()
    assert lines[0].split() == ["NAME", "NAMESPACE", "UID", "GID", "HOME", "STATE"]
    assert lines[1].split() == ["carol", "tool-carol", "52003", "52003", "/home/carol",
                                "disabled"]
    assert "skipped: alice, bob: share uid 52001; all held back" in run.stdout
    assert lines[-1] == "1 tenant(s), 1 skipped"
    bad = divingbell("tenants", "check", "--source", "ldap://127.0.0.1:9/ou=x,dc=example")
    assert bad.returncode == 1 and "error: LDAP" in bad.stderr and "Traceback" not in bad.stderr
    report = json.loads(divingbell("tenants", "check", "--source", str(source), "--format",
                                   "json", check=True).stdout)
    assert report["valid"] is True and [t["name"] for t in report["tenants"]] == ["carol"]
    bad = divingbell("tenants", "check", "--source", "ldap://127.0.0.1:9/ou=x,dc=example",
                     "--format", "json")
    assert bad.returncode == 1 and json.loads(bad.stdout)["valid"] is False
    assert "LDAP" in json.loads(bad.stdout)["error"]
    config = tmp_path / "tenants-config.yaml"
    config.write_text("removal: {max_per_run: -1}\n")
    bad = divingbell("tenants", "check", "--source", str(source), "--config", str(config),
                     "--format", "json")
    assert bad.returncode == 2
    assert json.loads(bad.stdout)["problems"][0]["path"] == "removal.max_per_run"


def test_tenants_sync_on_a_port_it_cannot_listen_on_says_so(tmp_path: Path) -> None:
    source = tmp_path / "tenants.yaml"
    source.write_text("tenants:\n  - {name: alice, uid: 52001}\n")
    kubeconfig = kubeconfig_for("http://127.0.0.1:9", tmp_path / "kubeconfig")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for listen, code, message in [
                (f"127.0.0.1:{port}", 1,
                 f"cannot listen on 127.0.0.1:{port}: Address already in use"),
                ("127.0.0.1:99999", 2, "'127.0.0.1:99999' is not ADDR:PORT")]:
            run = divingbell("tenants", "sync", "--source", str(source), "--kubeconfig",
                             str(kubeconfig), "--listen", listen)
            assert run.returncode == code, run.stderr
            assert message in run.stderr and "Traceback" not in run.stderr


def test_policy_check_refuses_a_registry_the_runtime_would_read_as_a_docker_hub_path(
        tmp_path: Path) -> None:
    dotless = tmp_path / "dotless.yaml"
    dotless.write_text("registry_enforcer: {enabled: true, registries: [internal]}\n")
    run = divingbell("policy", "check", "--config", str(dotless))
    assert run.returncode == 2, run.stdout
    assert "registry_enforcer.registries[0]" in run.stderr
    assert "docker.io/internal/x" in run.stderr


def test_an_invalid_tenants_config_is_said_with_its_paths_and_changes_nothing(
        tmp_path: Path) -> None:
    source = tmp_path / "tenants.yaml"
    source.write_text("tenants:\n  - {name: alice, uid: 52001}\n")
    config = tmp_path / "tenants-config.yaml"
    config.write_text("removal: {max_per_run: -1}\n")
    # No cluster is asked: the kubeconfig names a port nothing listens on.
    kubeconfig = kubeconfig_for("http://127.0.0.1:9", tmp_path / "kubeconfig")
    for command in (("check",), ("sync", "--once", "--kubeconfig", str(kubeconfig))):
        run = divingbell("tenants", *command, "--source", str(source), "--config", str(config))
        assert run.returncode == 2, run.stderr
        lines = run.stderr.splitlines()
        assert lines[0] == "error: the tenants config is invalid (1 problem(s)):", lines
        assert lines[1] == ("  removal.max_per_run: input should be greater than or equal to 0 "
                            f"(got -1) ({config}:1)"), lines
        assert run.stdout == "" and "Traceback" not in run.stderr


def test_an_unusable_kubeconfig_is_one_line_naming_it(policy_file: Path, tmp_path: Path,
                                                      tls_files: tuple[Path, Path]) -> None:
    source = tmp_path / "tenants.yaml"
    source.write_text("tenants:\n  - {name: alice, uid: 52001}\n")
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("apiVersion: v1\nkind: Config\n")  # no cluster, no context
    cert, key = tls_files
    for command in (("tenants", "sync", "--once", "--source", str(source)),
                    ("policy", "serve", "--config", str(policy_file), "--tls-cert", str(cert),
                     "--tls-key", str(key), "--listen", "127.0.0.1:0")):
        run = divingbell(*command, "--kubeconfig", str(kubeconfig))
        assert run.returncode == 1, run.stderr
        assert run.stderr.startswith(f"error: cannot configure the Kubernetes client from "
                                     f"{kubeconfig}: "), run.stderr
        assert len(run.stderr.splitlines()) == 1 and "--kubeconfig FILE" in run.stderr
