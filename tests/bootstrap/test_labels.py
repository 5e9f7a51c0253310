"""`divingbell bootstrap labels` and `teardown` through the real Kubernetes adapter against the
API stand-in: the desired map, protected domains, the owned-labels annotation, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from divingbell.bootstrap.labels import plan_labels, remove_owned_labels, set_labels
from divingbell.bootstrap.teardown import TeardownError, run_teardown
from divingbell.core.host import Host
from divingbell.kube import FakeKube, NodeView
from tests.bootstrap.kubeapi import KubeApiStandIn
from tests.conftest import Cli

OWNED = "divingbell.io/bootstrap-labels"
START = {"kubernetes.io/hostname": "n1", "topology.kubernetes.io/zone": "a",
         "node-role.kubernetes.io/worker": "", "old": "x", "rack": "r0"}


def patches(api: KubeApiStandIn) -> int:
    return sum(r["method"] == "PATCH" for r in api.requests)


def test_labels_command_sets_the_desired_map_and_keeps_protected_labels(
        cli: Cli, kube_api: KubeApiStandIn) -> None:
    kube_api.add_node("n1", START)
    dry = cli("bootstrap", "labels", "n1", "rack=r1", "team=blue", "--dry-run",
              "--server", kube_api.url, "--format", "json")
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout) == {
        "node": "n1", "set": {"rack": "r1", "team": "blue"}, "removed": ["old"],
        "kept_protected": ["kubernetes.io/hostname", "node-role.kubernetes.io/worker",
                           "topology.kubernetes.io/zone"], "changed": True, "dry_run": True}
    assert patches(kube_api) == 0
    assert kube_api.nodes["n1"]["labels"] == START

    result = cli("bootstrap", "labels", "n1", "rack=r1", "team=blue", "--server", kube_api.url)
    assert result.returncode == 0, result.stderr
    assert "  + rack=r1\n  + team=blue\n  - old\n" in result.stdout
    assert kube_api.nodes["n1"]["labels"] == {
        "kubernetes.io/hostname": "n1", "topology.kubernetes.io/zone": "a",
        "node-role.kubernetes.io/worker": "", "rack": "r1", "team": "blue"}
    assert kube_api.nodes["n1"]["annotations"] == {OWNED: "rack,team"}

    again = cli("bootstrap", "labels", "n1", "rack=r1", "team=blue", "--server", kube_api.url)
    assert "labels already as desired" in again.stdout
    assert patches(kube_api) == 1

    # No KEY=VALUE: every label outside Kubernetes' domains goes.
    cli("bootstrap", "labels", "n1", "--server", kube_api.url)
    assert set(kube_api.nodes["n1"]["labels"]) == {
        "kubernetes.io/hostname", "topology.kubernetes.io/zone", "node-role.kubernetes.io/worker"}


def test_labels_command_errors(cli: Cli, kube_api: KubeApiStandIn) -> None:
    missing = cli("bootstrap", "labels", "ghost", "a=b", "--server", kube_api.url)
    assert missing.returncode == 1
    assert "404" in missing.stderr and "ghost" in missing.stderr
    assert "Traceback" not in missing.stderr
    bad = cli("bootstrap", "labels", "n1", "no-equals", "bad key=v", "--server", kube_api.url)
    assert bad.returncode == 2
    assert "'no-equals': expected KEY=VALUE" in bad.stderr
    assert "'bad key' is not a valid label key" in bad.stderr
    assert len(kube_api.requests) == 1, "bad arguments never reach the API server"


def test_an_unusable_kubeconfig_is_one_line_naming_it(cli: Cli, tmp_path: Path,
                                                       debian_host: Host) -> None:
    kubeconfig = tmp_path / "admin.conf"
    kubeconfig.write_text("apiVersion: v1\nkind: Config\n")  # no clusters, no users
    for argv in (("labels", "n1", "a=b"),
                 ("teardown", "--node", "n1", "--root", str(debian_host.root))):
        result = cli("bootstrap", *argv, "--kubeconfig", kubeconfig)
        assert result.returncode == 1, result.stderr
        assert "Traceback" not in result.stderr
        assert result.stderr.startswith("error: cannot configure the Kubernetes client from "
                                        f"{kubeconfig}"), result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_plan_is_pure_and_protected_domains_are_exact() -> None:
    view = NodeView("n1", {"example.com/kubernetes.io": "x", "k8s.io/x": "1",
                           "sub.k8s.io/y": "2", "notk8s.io/z": "3"}, {})
    change = plan_labels(view, {})
    assert change.removed == ["example.com/kubernetes.io", "notk8s.io/z"]
    assert change.kept_protected == ["k8s.io/x", "sub.k8s.io/y"]


def test_teardown_removes_only_what_divingbell_set_and_stops_the_kubelet(
        debian_host: Host) -> None:
    kube = FakeKube()
    kube.add_node("n1", START)
    set_labels(kube, "n1", {"rack": "r1", "team": "blue", "topology.kubernetes.io/zone": "b"})
    kube.patch_node("n1", labels={"someone-else": "keep"}, annotations={})
    unit = debian_host.path("/etc/systemd/system/kubelet.service")
    unit.write_text("[Service]\nExecStart=/bin/true\n[Install]\nWantedBy=multi-user.target\n")
    debian_host.run(["systemctl", "enable", "kubelet.service"])
    wants = debian_host.path("/etc/systemd/system/multi-user.target.wants/kubelet.service")
    assert wants.is_symlink()

    sent = len(kube.sent)

    def blocked(api: object, node: str) -> None:
        raise RuntimeError("shop/web-2 (budget shop/web)")

    with pytest.raises(TeardownError, match=r"did not finish: shop/web-2 .*--no-drain"):
        run_teardown(kube, debian_host, "n1", drainer=blocked)
    assert len(kube.sent) == sent and wants.is_symlink()  # labels and kubelet untouched

    drained: list[str] = []
    steps = run_teardown(kube, debian_host, "n1", drainer=lambda api, node: drained.append(node),
                         delete_node=False)
    assert drained == ["n1"]
    assert [s["step"] for s in steps] == ["drain", "labels", "kubelet", "files"]
    assert kube.node_objects["n1"].labels == {
        "kubernetes.io/hostname": "n1", "topology.kubernetes.io/zone": "b",
        "node-role.kubernetes.io/worker": "", "someone-else": "keep"}
    assert OWNED not in kube.node_objects["n1"].annotations
    assert not wants.exists()
    assert remove_owned_labels(kube, "n1").removed == []


def test_teardown_deletes_the_node_and_the_kubelet_files_but_not_a_control_plane(
        debian_host: Host) -> None:
    kube = FakeKube()
    kube.add_node("n1", START)
    kubelet_files = ("/etc/kubernetes/pki/kubelet.pem", "/etc/kubernetes/pki/kubelet-key.pem",
                     "/etc/kubernetes/pki/ca.pem", "/etc/kubernetes/kubelet/config.yaml",
                     "/etc/kubernetes/kubelet/kubeconfig",
                     "/etc/systemd/system/kubelet.service.d/10-divingbell.conf")
    for path in (*kubelet_files, "/etc/containerd/config.toml",
                 "/etc/kubernetes/manifests/kube-apiserver.yaml"):
        debian_host.path(path).parent.mkdir(parents=True, exist_ok=True)
        debian_host.path(path).write_text("x\n")
    with pytest.raises(TeardownError, match="runs the control plane"):
        run_teardown(kube, debian_host, "n1", drain=False)
    assert "n1" in kube.node_objects and debian_host.path(kubelet_files[0]).exists()

    debian_host.path("/etc/kubernetes/manifests/kube-apiserver.yaml").unlink()
    steps = run_teardown(kube, debian_host, "n1", drain=False)
    assert [s["step"] for s in steps] == ["drain", "labels", "kubelet", "node", "files"]
    assert "n1" not in kube.node_objects
    assert not any(debian_host.path(p).exists() for p in kubelet_files)
    assert debian_host.path("/etc/containerd/config.toml").exists()
    # Run again (the Node gone, the files gone): nothing left to do, no error.
    again = run_teardown(kube, debian_host, "n1", drain=False)
    assert again[3:] == [{"step": "node", "result": "already gone"},
                         {"step": "files", "result": "none left"}]


def test_teardown_command(cli: Cli, kube_api: KubeApiStandIn, debian_host: Host) -> None:
    kube_api.add_node("n1", {"rack": "r1", "kubernetes.io/hostname": "n1"}, {OWNED: "rack"})
    debian_host.path("/etc/systemd/system/kubelet.service").write_text(
        "[Service]\nExecStart=/bin/true\n[Install]\nWantedBy=multi-user.target\n")
    debian_host.run(["systemctl", "enable", "kubelet.service"])
    wants = debian_host.path("/etc/systemd/system/multi-user.target.wants/kubelet.service")
    refused = cli("bootstrap", "teardown", "--node", "n1", "--root", debian_host.root,
                  "--server", kube_api.url)
    # The drain runs through the maintenance code; this API stand-in serves no pods, so it
    # cannot finish: nothing else changes, and the error says how to go on.
    assert refused.returncode == 1
    assert "did not finish" in refused.stderr and "--no-drain" in refused.stderr
    assert kube_api.nodes["n1"]["labels"]["rack"] == "r1"
    assert wants.is_symlink()
    done = cli("bootstrap", "teardown", "--node", "n1", "--no-drain", "--root",
               debian_host.root, "--server", kube_api.url, "--format", "json")
    assert done.returncode == 0, done.stderr
    steps = json.loads(done.stdout)["steps"]
    assert steps[1] == {"step": "labels", "result": "removed rack"}
    assert steps[3] == {"step": "node", "result": "deleted"}
    assert "n1" not in kube_api.nodes
    assert ("DELETE", "/api/v1/nodes/n1") in [(r["method"], r["path"]) for r in kube_api.requests]
    assert not wants.exists()
    again = cli("bootstrap", "teardown", "--node", "n1", "--no-drain", "--root",
                debian_host.root, "--server", kube_api.url)
    assert again.returncode == 0, again.stderr
    assert "labels: the Node is already gone\n" in again.stdout
    assert "node: already gone\nfiles: none left\n" in again.stdout


def test_scripts_and_commands_are_documented(cli: Cli) -> None:
    for args in (("bootstrap", "--help"), ("bootstrap", "build", "--help"),
                 ("pki", "generate", "--help"), ("pki", "check", "--help")):
        shown = cli(*args)
        assert shown.returncode == 0
    assert "disables the unit that ran it" in " ".join(cli("bootstrap", "build", "--help")
                                                        .stdout.split())
