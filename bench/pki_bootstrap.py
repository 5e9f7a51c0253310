"""Print PKI and bootstrap build figures.

    .venv/bin/python bench/pki_bootstrap.py [--nodes N] [--runs R]

- `pki generate` (in-process) of a catalog with a CA, an apiserver certificate, a
  service-account keypair and one kubelet certificate per node: first run (everything created),
  second run (everything reused, the idempotent check), for ECDSA P-256 and RSA-2048.
- `pki check` of that directory.
- Building every node's join script (render + archive), and one script's size.
Medians of R runs, in a temporary directory. Nothing outside it is touched.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from divingbell.bootstrap.build import build_all
from divingbell.bootstrap.design import parse_design
from divingbell.pki.catalog import load_catalog
from divingbell.pki.check import check
from divingbell.pki.generate import generate


def catalog_text(nodes: int, algorithm: str) -> str:
    lines = [f"algorithm: {algorithm}", "certificate_authorities:", "  kubernetes:",
             "    certificates:",
             "      - {document_name: apiserver, common_name: apiserver, hosts: [10.96.0.1],"
             " kubernetes_service_names: [kubernetes.default.svc.cluster.local]}"]
    lines += [f"      - {{document_name: kubelet-n{i}, common_name: 'system:node:n{i}', "
              f"groups: [system:nodes], hosts: [n{i}]}}" for i in range(nodes)]
    lines += ["keypairs:", "  - name: service-account"]
    return "\n".join(lines) + "\n"


def design_text(nodes: int) -> str:
    head = """\
cluster: {name: bench, api_endpoints: ['https://10.0.0.1:6443'], pod_cidr: 10.97.0.0/16,
          service_cidr: 10.96.0.0/16, cluster_dns: 10.96.0.10, kubernetes_version: 1.30.2}
roles:
  worker:
    packages: [containerd, kubelet]
    labels: {static: {rack: r1}, dynamic: {team: blue}}
nodes:
"""
    return head + "".join(f"  - {{hostname: n{i}, ip: 10.0.{i // 250}.{i % 250 + 2}, "
                          "role: worker}\n" for i in range(nodes))


def timed(action: Callable[[], object], runs: int, reset: Callable[[], None] | None = None
          ) -> float:
    samples = []
    for _ in range(runs):
        if reset:
            reset()
        start = time.perf_counter()
        action()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", type=int, default=50)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temp:
        base = Path(temp)
        for algorithm in ("ecdsa-p256", "rsa-2048"):
            path = base / f"{algorithm}.yaml"
            path.write_text(catalog_text(args.nodes, algorithm))
            catalog = load_catalog([path])
            out = base / algorithm

            def reset(out: Path = out) -> None:
                for file in out.glob("*") if out.exists() else []:
                    file.unlink()

            first = timed(lambda: generate(catalog, out), args.runs, reset)  # noqa: B023
            again = timed(lambda: generate(catalog, out), args.runs)  # noqa: B023
            checked = timed(lambda: check(out, datetime.timedelta(days=30)), args.runs)  # noqa: B023
            total = args.nodes + 3
            print(f"pki generate {algorithm}: {total} items: first {first:.2f} s "
                  f"({first / total * 1000:.1f} ms/item), reuse {again:.2f} s, "
                  f"check {checked:.2f} s")
        design = parse_design(design_text(args.nodes))
        scripts = base / "scripts"
        built = timed(lambda: build_all(design, base / "ecdsa-p256", scripts), args.runs)
        size = (scripts / "join-n1.sh").stat().st_size
        print(f"bootstrap build: {args.nodes} join scripts in {built:.2f} s "
              f"({built / args.nodes * 1000:.1f} ms/script); one script {size / 1024:.1f} KiB")


if __name__ == "__main__":
    main()
