"""Print the admission webhook's throughput and latency on this machine.

    .venv/bin/python bench/admission.py [--requests N] [--connections 1,4]

The real server (`policy.server`, HTTPS with a certificate made here) runs in its own process
with the four policies of the issue's example and a fake API server for namespace lookups
(cached, as in production). Clients are separate processes, each holding one keep-alive TLS
connection like the API server does, sending a mix of AdmissionReviews: a Pod with an init
container to /mutate/uid and /mutate/automount, a Deployment to /validate/registry, a Pod with
hostPath volumes to /validate/hostpath. Latency is measured by the client, request sent to
answer read. Goal: p99 under 5 ms.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import ipaddress
import json
import multiprocessing
import ssl
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

POLICY = {
    "uid_enforcer": {"enabled": True},
    "registry_enforcer": {"enabled": True, "registries": ["docker-registry.tools.example.org"]},
    "host_path_enforcer": {"enabled": True, "paths": ["/etc/ldap.conf", "/var/run/nslcd/socket"],
                           "prefixes": ["/data/project/", "/data/scratch/", "/public/dumps/"]},
    "host_auto_mounter": {"enabled": True, "paths": ["/etc/ldap.conf", "/var/run/nslcd/socket"]},
    "namespace_selector": {"matchLabels": {"tenancy": "tool"}},
}
IMAGE = "docker-registry.tools.example.org/toolforge-python311:latest"


def certificates(directory: Path) -> tuple[Path, Path, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    pem = cert.public_bytes(serialization.Encoding.PEM)
    (directory / "tls.crt").write_bytes(pem)
    (directory / "tls.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return directory / "tls.crt", directory / "tls.key", pem


def serve(cert: Path, key: Path, ready: Any) -> None:
    from divingbell.kube import FakeKube
    from divingbell.policy.config import PolicyConfig
    from divingbell.policy.server import ClusterNamespaces, make_server

    cluster = FakeKube()
    for index in range(20):
        cluster.put({"apiVersion": "v1", "kind": "Namespace", "metadata": {
            "name": f"tool-{index}", "labels": {"tenancy": "tool"},
            "annotations": {"RunAsUser": str(52000 + index)}}})
    server = make_server(PolicyConfig.model_validate(POLICY), ClusterNamespaces(cluster),
                         cert=cert, key=key, host="127.0.0.1", port=0)
    ready.send(server.port)
    server.serve_forever()


def reviews() -> list[tuple[str, bytes]]:
    containers = [{"name": "web", "image": IMAGE, "ports": [{"containerPort": 8000}],
                   "env": [{"name": f"VAR{i}", "value": "x" * 20} for i in range(10)],
                   "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}}}]
    pod_spec = {"containers": containers,
                "initContainers": [{"name": "setup", "image": IMAGE}],
                "volumes": [{"name": "home", "hostPath": {"path": "/data/project/tool-1"}}]}
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"generateName": "web-", "namespace": "tool-1",
                        "labels": {"app": "web"}}, "spec": pod_spec}
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment",
                  "metadata": {"name": "web", "namespace": "tool-1"},
                  "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}},
                           "template": {"metadata": {"labels": {"app": "web"}},
                                        "spec": pod_spec}}}

    def review(obj: dict[str, Any], group: str, kind: str, resource: str, index: int) -> bytes:
        gvk = {"group": group, "version": "v1", "kind": kind}
        gvr = {"group": group, "version": "v1", "resource": resource}
        return json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                           "request": {
                               "uid": f"bench-{index}", "kind": gvk, "resource": gvr,
                               "requestKind": gvk, "requestResource": gvr,
                               "namespace": f"tool-{index % 20}", "operation": "CREATE",
                               "userInfo": {"username": "tool", "groups": []},
                               "object": obj, "oldObject": None, "dryRun": False,
                               "options": {"apiVersion": "meta.k8s.io/v1",
                                           "kind": "CreateOptions"}}}).encode()

    out = []
    for index in range(40):
        out += [("/mutate/uid", review(pod, "", "Pod", "pods", index)),
                ("/mutate/automount", review(pod, "", "Pod", "pods", index)),
                ("/validate/registry", review(deployment, "apps", "Deployment", "deployments",
                                              index)),
                ("/validate/hostpath", review(pod, "", "Pod", "pods", index))]
    return out


def client(port: int, ca: bytes, count: int, results: Any) -> None:
    context = ssl.create_default_context(cadata=ca.decode())
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=30)
    mix = reviews()
    latencies = []
    for index in range(count + 50):
        path, body = mix[index % len(mix)]
        started = time.perf_counter()
        connection.request("POST", path + "?timeout=5s", body=body,
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        data = response.read()
        elapsed = time.perf_counter() - started
        if response.status != 200 or b'"uid"' not in data:
            raise SystemExit(f"unexpected answer {response.status}: {data[:200]!r}")
        if index >= 50:  # warm-up: handshake, namespace cache
            latencies.append(elapsed)
    connection.close()
    results.put(latencies)


def run(port: int, ca: bytes, connections: int, requests: int) -> dict[str, float]:
    results: Any = multiprocessing.Queue()
    per_client = requests // connections
    workers = [multiprocessing.Process(target=client, args=(port, ca, per_client, results))
               for _ in range(connections)]
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    latencies: list[float] = []
    for _ in workers:
        latencies += results.get(timeout=600)
    wall = time.perf_counter() - started
    for worker in workers:
        worker.join()
    latencies.sort()
    return {"connections": connections, "reviews": len(latencies),
            "reviews_per_s": round(len(latencies) / wall),
            "p50_ms": round(statistics.median(latencies) * 1000, 3),
            "p99_ms": round(latencies[int(len(latencies) * 0.99) - 1] * 1000, 3),
            "max_ms": round(latencies[-1] * 1000, 3)}


def in_process(count: int) -> dict[str, float]:
    """The server's own work per review, without sockets: parse, decide, encode."""
    from divingbell.kube import FakeKube
    from divingbell.policy.config import PolicyConfig
    from divingbell.policy.server import (
        ClusterNamespaces,
        NamespaceCache,
        Reviewer,
        parse_review,
        review_response,
    )
    from divingbell.policy.server import routes as policy_routes

    cluster = FakeKube()
    for index in range(20):
        cluster.put({"apiVersion": "v1", "kind": "Namespace", "metadata": {
            "name": f"tool-{index}", "labels": {"tenancy": "tool"},
            "annotations": {"RunAsUser": str(52000 + index)}}})
    config = PolicyConfig.model_validate(POLICY)
    reviewer = Reviewer(policy_routes(config), NamespaceCache(ClusterNamespaces(cluster), 60))
    mix = reviews()
    latencies = []
    for index in range(count + 50):
        path, body = mix[index % len(mix)]
        started = time.perf_counter()
        request = parse_review(body)
        verdict = reviewer.decide(reviewer.routes[path], request)
        json.dumps(review_response(request.uid, verdict)).encode()
        if index >= 50:
            latencies.append(time.perf_counter() - started)
    latencies.sort()
    return {"in_process_reviews": len(latencies),
            "p50_ms": round(statistics.median(latencies) * 1000, 3),
            "p99_ms": round(latencies[int(len(latencies) * 0.99) - 1] * 1000, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--connections", default="1,4")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cert, key, pem = certificates(Path(tmp))
        ours, theirs = multiprocessing.Pipe()
        server = multiprocessing.Process(target=serve, args=(cert, key, theirs), daemon=True)
        server.start()
        port = ours.recv()
        print(f"admission webhook, {multiprocessing.cpu_count()} CPU(s); "
              "mix: uid + automount (Pod), registry (Deployment), hostpath (Pod)")
        print(json.dumps(in_process(args.requests)))
        try:
            for connections in (int(c) for c in args.connections.split(",")):
                result = run(port, pem, connections, args.requests)
                print(json.dumps(result))
        finally:
            server.terminate()
            server.join()


if __name__ == "__main__":
    main()
