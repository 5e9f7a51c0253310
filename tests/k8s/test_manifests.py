"""`divingbell manifests` as a Kubernetes operator reviews it: valid objects (kubernetes-validate,
strict), the document in an immutable Secret named by its digest and mounted by name (so a new
document is a new pod template), Pod Security, priority, memory, least-privilege RBAC with the
events Role in one namespace, readable YAML without anchors, and the command's own checks."""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from divingbell.agent.manifests import (
    DIGEST_LABEL,
    DOCUMENT_LABEL,
    build,
    check_image,
    document_digest,
    parse_max_unavailable,
    to_yaml,
    unreadable_reason,
)
from tests.k8s.conftest import kind
from tests.k8s.podsecurity import violations

SITE = "conf:\n  sysctl:\n    net.ipv4.ip_forward: 1\n"


def template(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return dict(kind(objects, "DaemonSet")["spec"]["template"])


@pytest.mark.parametrize("existing_secret", [None, "site-document-v7"])
def test_every_object_is_valid_kubernetes(existing_secret: str | None) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    objects = build({"site.yaml": SITE}, namespace="ops", existing_secret=existing_secret)
    kinds = [o["kind"] for o in objects]
    assert kinds == ["Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role",
                     "RoleBinding", "Role", "RoleBinding",
                     *["ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"] * 5,
                     *(["Secret"] if existing_secret is None else []), "DaemonSet"]
    for obj in objects:
        for version in ("1.30", "1.36"):
            kubernetes_validate.validate(obj, version, strict=True)


def test_the_document_is_an_immutable_secret_named_by_its_digest(
        objects: list[dict[str, Any]]) -> None:
    secret = kind(objects, "Secret")
    digest = document_digest({"site.yaml": SITE})
    assert secret["metadata"]["name"] == f"divingbell-document-{digest}"
    assert secret["immutable"] is True
    assert {k: base64.b64decode(v).decode() for k, v in secret["data"].items()} == {
        "site.yaml": SITE}
    assert secret["metadata"]["labels"][DOCUMENT_LABEL] == "true"
    assert secret["metadata"]["labels"][DIGEST_LABEL] == digest
    assert not any(o["kind"] == "ConfigMap" for o in objects)
    spec = template(objects)["spec"]
    assert {"name": "document", "secret": {"secretName": secret["metadata"]["name"],
                                           "defaultMode": 0o400}} in spec["volumes"]
    assert template(objects)["metadata"]["annotations"][DIGEST_LABEL] == digest


def test_a_new_document_is_a_new_pod_template_and_the_old_secret_is_left_for_undo() -> None:
    first = build({"site.yaml": SITE})
    second = build({"site.yaml": SITE.replace(": 1", ": 0")})
    assert template(first) != template(second)
    old, new = kind(first, "Secret")["metadata"]["name"], kind(second, "Secret")["metadata"][
        "name"]
    assert old != new
    # Applying the second set never touches the first Secret (a different name), so the
    # previous template, brought back by `rollout undo`, still mounts the previous document.
    assert old not in to_yaml(second)
    assert kind(second, "DaemonSet")["spec"]["revisionHistoryLimit"] >= 2
    assert build({"site.yaml": SITE}) == first, "the same document gives the same objects"


def test_an_operator_named_secret_is_mounted_and_no_document_is_printed() -> None:
    objects = build({"site.yaml": SITE}, existing_secret="site-v7")
    assert "net.ipv4.ip_forward" not in to_yaml(objects)
    volume = template(objects)["spec"]["volumes"][1]
    assert volume["secret"]["secretName"] == "site-v7"
    with pytest.raises(ValueError, match="not a Secret name"):
        build({"site.yaml": SITE}, existing_secret="Site_V7")


def test_pod_security_admits_the_agent_only_where_the_namespace_says_privileged(
        objects: list[dict[str, Any]]) -> None:
    namespace = kind(objects, "Namespace")
    level = namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"]
    spec = template(objects)["spec"]
    assert violations(spec, level) == []
    # The check is real: at baseline (a cluster's usual default) the agent's pod is refused
    # for exactly what it needs, and an ordinary pod is not.
    refused = violations(spec, "baseline")
    assert refused == [
        "host namespaces: hostNetwork=true", "host namespaces: hostPID=true",
        "hostPath volumes: 'host'", "privileged containers: container 'agent'",
        "host ports: container 'agent' port 9114"]
    assert violations({"containers": [{"name": "web", "ports": [{"containerPort": 80}]}]},
                      "baseline") == []


def test_priority_memory_and_probes(objects: list[dict[str, Any]]) -> None:
    spec = template(objects)["spec"]
    assert spec["priorityClassName"] == "system-node-critical"
    container = spec["containers"][0]
    assert container["resources"]["limits"]["memory"] == "1Gi"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in container["env"]}
    assert env == {"NODE_NAME": "spec.nodeName",
                   "DIVINGBELL_DOCUMENT_DIGEST": f"metadata.annotations['{DIGEST_LABEL}']",
                   "POD_NAMESPACE": "metadata.namespace"}
    assert "--follow-document-changes" not in container["args"]


def test_rbac_is_least_privilege_and_events_stay_in_one_namespace(
        objects: list[dict[str, Any]]) -> None:
    def grants(role: dict[str, Any]) -> set[tuple[str, str]]:
        return {(r, v) for rule in role["rules"] for r in rule["resources"]
                for v in rule["verbs"]}

    # nodes: labels, status annotations, a maintenance cordon (the admission policies narrow
    # all three to the agent's own node); pods, evictions and budgets: a maintenance drain.
    assert grants(kind(objects, "ClusterRole")) == {
        ("nodes", "get"), ("nodes", "patch"), ("pods", "list"), ("pods", "delete"),
        ("pods/eviction", "create"), ("poddisruptionbudgets", "list")}
    roles = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Role"}
    bindings = {o["metadata"]["name"]: o for o in objects if o["kind"] == "RoleBinding"}
    slots = roles["divingbell-slots"]
    assert slots["metadata"]["namespace"] == "ops"  # maintenance slot Leases: its namespace
    assert grants(slots) == {("leases", v) for v in ("get", "list", "create", "update")}
    role, binding = roles["divingbell-events"], bindings["divingbell-events"]
    assert grants(role) == {("events", "create"), ("events", "get"), ("events", "patch")}
    # Events about a Node are only accepted in `default` by the API server; the Role grants
    # them there and nowhere else.
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == "default"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "divingbell",
                                    "namespace": "ops"}]


def test_the_yaml_has_no_anchors_and_the_document_reads_as_written(
        objects: list[dict[str, Any]]) -> None:
    text = to_yaml(objects)
    events = list(yaml.parse(text))
    assert not any(getattr(e, "anchor", None) for e in events)
    assert not any(isinstance(e, yaml.AliasEvent) for e in events)
    assert ("# --- site.yaml\n#   conf:\n#     sysctl:\n#       net.ipv4.ip_forward: 1\n"
            "apiVersion: v1\nkind: Secret\n" in text)
    assert list(yaml.safe_load_all(text)) == objects


def test_scripts_with_tabs_and_trailing_spaces_stay_readable_and_what_cannot_is_named() -> None:
    tabbed = "conf:\n  exec:\n    make.sh:\n      data: |\n        all:\n        \techo hi  \n"
    text = to_yaml(build({"site.yaml": tabbed}))
    assert "#           \techo hi  \n" in text
    assert unreadable_reason(tabbed) is None
    assert unreadable_reason("conf:\n  a: \x07\n") == (
        "line 2 holds U+0007, which a YAML comment cannot hold")
    # A line break YAML knows but "\n" is not would end the comment: the file is not shown.
    for breaking in ("\r", "\x85", "\u2028", "\u2029"):
        document = f"conf:\n  sysctl: {{}}\n# x{breaking}evil: 1\n"
        assert unreadable_reason(document), repr(breaking)
        objects = build({"site.yaml": document})
        text = to_yaml(objects)
        assert "site.yaml: not shown" in text
        assert list(yaml.safe_load_all(text)) == objects


def test_the_command_validates_the_document_and_the_namespace(tmp_path: Path) -> None:
    good = tmp_path / "site.yaml"
    good.write_text(SITE)

    def manifests(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "divingbell", "manifests", *args],
                              capture_output=True, text=True, check=False)

    run = manifests(str(good), "--max-unavailable", "25%", "--namespace", "node-config")
    assert run.returncode == 0, run.stderr
    docs = list(yaml.safe_load_all(run.stdout))
    assert docs[-1]["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"] == "25%"
    assert base64.b64decode(kind(docs, "Secret")["data"]["site.yaml"]).decode() == SITE
    assert {d["metadata"].get("namespace") for d in docs} == {None, "node-config", "default"}
    for bad_namespace in ("Ops", "ops_1", "-ops", "x" * 64, "ops\n"):
        run = manifests(str(good), "--namespace", bad_namespace)
        assert run.returncode == 2 and run.stdout == ""
        assert "--namespace" in run.stderr and "not a namespace name" in run.stderr
    spaced = tmp_path / "spaced.yaml"
    spaced.write_text(SITE.replace("sysctl:", "sysctl:  "))
    run = manifests(str(spaced))
    assert run.returncode == 0 and run.stderr == ""
    odd = tmp_path / "odd.yaml"
    odd.write_text(SITE.replace("sysctl:", "sysctl:  # a\u2028"))
    run = manifests(str(odd))
    assert run.returncode == 0, run.stderr
    assert "line 2 holds U+2028, which a YAML comment cannot hold" in run.stderr
    run = manifests(str(good), "--document-secret", "site-v7")
    assert run.returncode == 0 and "net.ipv4.ip_forward" not in run.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("conf:\n  sysctl: 3\n")
    run = manifests(str(bad))
    assert run.returncode == 2 and "nothing was changed" in run.stderr and run.stdout == ""
    with pytest.raises(ValueError):
        parse_max_unavailable("0")


DIGEST = "sha256:" + "0123456789abcdef" * 4
GOOD_IMAGES = [
    "divingbell",
    "divingbell:0.1.0",
    "registry.example/divingbell:1.0",
    "registry.example:5000/ops/node-config/divingbell:v1.2-rc_3",
    "localhost:5000/divingbell",
    "[fd00::1]:5000/divingbell:1",
    "Registry.Example/divingbell",  # a registry host is case-insensitive; a path is not
    "ghcr.io/o_r.g/a__b/c---d:TAG_1." ,
    f"registry.example/divingbell@{DIGEST}",
    f"registry.example/divingbell:1.0@{DIGEST}",
    "divingbell@sha512:" + "ab" * 64,
    "divingbell:" + "t" * 128,
    "r.example/" + "a" * 245,
]
BAD_IMAGES = [
    "",
    "Divingbell:1.0",  # upper case in the path
    "registry.example/Ops/divingbell",
    "divingbell 1.0",
    "divingbell:1.0\n",  # `$` would let this through
    "divingbell:1.0\n    securityContext: {}",
    "divingbell: {privileged: true}",
    "divingbell:",
    "divingbell:-1",
    "divingbell:.1",
    "divingbell:" + "t" * 129,
    "divingbell:1:2",
    "divingbell@sha256:abc",
    "divingbell@sha256:" + "A" * 64,
    "divingbell@md5:" + "a" * 32,
    "https://registry.example/divingbell",
    "/divingbell",
    "divingbell/",
    "ops//divingbell",
    "ops/-divingbell",
    "a_-b",
    "-registry.example/divingbell",
    "registry.example:port/divingbell",
    "r.example/" + "a" * 246,  # registry and path: 256 characters
    "divingbell:1.0é",
]


@pytest.mark.parametrize("image", GOOD_IMAGES)
def test_an_image_reference_a_runtime_accepts_goes_into_the_daemonset(image: str) -> None:
    assert check_image(image) == image
    containers = template(build({"site.yaml": SITE}, image=image))["spec"]["containers"]
    assert {c["image"] for c in containers} == {image}


@pytest.mark.parametrize("image", BAD_IMAGES)
def test_anything_else_is_refused_before_it_reaches_the_pod_spec(image: str) -> None:
    with pytest.raises(ValueError, match="is not an image reference"):
        check_image(image)
    with pytest.raises(ValueError, match="is not an image reference"):
        build({"site.yaml": SITE}, image=image)


def test_the_command_refuses_a_bad_image_in_one_line_naming_the_option(tmp_path: Path) -> None:
    good = tmp_path / "site.yaml"
    good.write_text(SITE)

    def manifests(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "divingbell", "manifests", str(good),
                               *args], capture_output=True, text=True, check=False)

    image = "registry.example:5000/ops/divingbell:1.0"
    run = manifests("--image", image)
    assert run.returncode == 0, run.stderr
    assert {c["image"] for c in template(list(yaml.safe_load_all(run.stdout)))["spec"][
        "containers"]} == {image}
    for bad in ("divingbell:1.0\n    securityContext: {}", "Divingbell", "div bell", ""):
        run = manifests("--image", bad)
        assert (run.returncode, run.stdout) == (2, ""), run.stderr
        error = run.stderr.strip().splitlines()[-1]
        assert "'--image'" in error and "is not an image reference" in error, run.stderr


def test_a_document_too_large_for_a_secret_or_for_client_side_apply_is_named(
        tmp_path: Path) -> None:
    # The API server refuses a Secret over 1 MiB, and a client-side `kubectl apply` copies
    # the object into an annotation of at most 256 KiB: say so before kubectl fails.
    def document(lines: int) -> Path:
        path = tmp_path / f"site-{lines}.yaml"
        body = "".join(f"        echo {i:07d} {'.' * 50}\n" for i in range(lines))
        path.write_text(f"conf:\n  exec:\n    big.sh:\n      data: |\n{body}")
        return path

    def manifests(path: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "divingbell", "manifests", str(path)],
                              capture_output=True, text=True, check=False)

    run = manifests(document(100))
    assert run.returncode == 0 and "note:" not in run.stderr
    large = document(5_000)  # about 360 KB
    run = manifests(large)
    assert run.returncode == 0 and "kubectl apply --server-side" in run.stderr
    assert kind(list(yaml.safe_load_all(run.stdout)), "Secret")
    huge = document(20_000)  # about 1.4 MB
    run = manifests(huge)
    assert run.returncode == 2 and run.stdout == ""
    assert f"{huge.stat().st_size} bytes" in run.stderr and "at most 1048576" in run.stderr


def test_against_the_previous_document_removals_are_shown_and_need_consent(
        tmp_path: Path) -> None:
    previous = tmp_path / "old" / "site.yaml"
    previous.parent.mkdir()
    previous.write_text("conf:\n  sysctl:\n    net.ipv4.ip_forward: 1\n    vm.swappiness: 10\n"
                        "  overrides:\n    divingbell_sysctl:\n      hosts:\n"
                        "        - name: big1\n          conf:\n            sysctl:\n"
                        "              net.core.somaxconn: 1024\n"
                        "              fs.file-max: 99999\n")
    new = tmp_path / "site.yaml"
    new.write_text(previous.read_text().replace("    vm.swappiness: 10\n", "")
                   .replace("    net.ipv4.ip_forward: 1\n", "    net.ipv4.ip_forward: 1\n"
                            "    kernel.panic: 5\n"))

    def manifests(*args: str | Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "divingbell", "manifests", *map(str, args)],
                              capture_output=True, text=True, check=False)

    # One of two leaves: kept 2 on other nodes, 4 on big1. Shown; no consent needed.
    shown = manifests(new, "--previous", previous)
    assert shown.returncode == 0, shown.stderr
    assert "- big1: removes 1, keeps 4" in shown.stderr
    assert "- any other node: removes 1, keeps 2" in shown.stderr
    assert "    sysctl: original values restored: vm.swappiness" in shown.stderr
    assert kind(list(yaml.safe_load_all(shown.stdout)), "DaemonSet")

    new.write_text("conf:\n  sysctl:\n    kernel.panic: 5\n")  # the override leaves too
    refused = manifests(new, "--previous", previous)
    assert refused.returncode == 1 and refused.stdout == ""
    assert "- big1: removes 4, keeps 1  MORE THAN IT KEEPS" in refused.stderr
    assert ("removes more than it keeps on big1, any other node; nothing was printed"
            in refused.stderr)
    allowed = manifests(new, "--previous", previous, "--allow-removals")
    assert allowed.returncode == 0 and kind(list(yaml.safe_load_all(allowed.stdout)),
                                            "DaemonSet")
