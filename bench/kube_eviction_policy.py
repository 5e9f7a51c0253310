"""Print what the agent's eviction policy costs on a real kube-apiserver.

    .venv/bin/python bench/kube_eviction_policy.py [--pods 10,300,1000] [--evictions 20]

`divingbell-agent-own-evictions` takes the pods of the eviction's namespace as its parameters
(an eviction's admission request carries no pod), so the API server evaluates its CEL once
per pod of that namespace for each of the agent's evictions. This starts the tests' loopback
control plane (tests/kube/), applies `divingbell manifests`, fills one namespace with N pods
on another node, and times evictions of pods on the agent's own node with the agent's
pod-bound token (policy evaluated) against the same evictions by the admin (policy not
matched: its match condition is the agent's user). Run as root.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.kube.controlplane import Rest, assets, start
from tests.kube.kubelet import add_node, add_pod, pod_token, set_ready

from divingbell.agent.manifests import build, to_yaml

NAMESPACE = "divingbell"


def evict(client: Rest, namespace: str, pod: str) -> float:
    began = time.perf_counter()
    client.post(f"/api/v1/namespaces/{namespace}/pods/{pod}/eviction", {
        "apiVersion": "policy/v1", "kind": "Eviction",
        "metadata": {"name": pod, "namespace": namespace}})
    return (time.perf_counter() - began) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pods", default="10,300,1000")
    parser.add_argument("--evictions", type=int, default=20)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        plane = start(Path(directory) / "cp", assets())
        print(f"control plane ready in {plane.started_in:.1f} s")
        try:
            admin = plane.admin()
            plane.kubectl("apply", "--server-side", "-f", "-", input_text=to_yaml(build(
                {"site.yaml": "conf: {}\n"}, namespace=NAMESPACE, image="example/db:1")))
            for node in ("a", "b"):
                add_node(admin, node)
            agent = plane.as_token(pod_token(admin, NAMESPACE, "divingbell", add_pod(
                admin, NAMESPACE, "agent-a", "a", service_account="divingbell")))
            time.sleep(3)  # the policies reach the admission plugin
            print(f"{'pods in namespace':>18} {'agent p50 ms':>13} {'agent max':>10} "
                  f"{'admin p50 ms':>13}")
            for count in (int(n) for n in options.pods.split(",")):
                namespace = f"load-{count}"
                admin.post("/api/v1/namespaces", {"metadata": {"name": namespace}})
                for index in range(count):
                    add_pod(admin, namespace, f"other-{index}", "b")
                timings: dict[str, list[float]] = {"agent": [], "admin": []}
                for index in range(options.evictions):
                    for who, client in (("agent", agent), ("admin", admin)):
                        name = f"own-{who}-{index}"
                        add_pod(admin, namespace, name, "a")
                        set_ready(admin, namespace, name)
                        timings[who].append(evict(client, namespace, name))
                print(f"{count:>18} {statistics.median(timings['agent']):>13.1f} "
                      f"{max(timings['agent']):>10.1f} "
                      f"{statistics.median(timings['admin']):>13.1f}")
        finally:
            plane.stop()


if __name__ == "__main__":
    main()
