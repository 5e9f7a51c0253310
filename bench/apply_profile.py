"""Print apply timings for a profile of 40 net.* sysctls, inside a throwaway network namespace.

    sudo .venv/bin/python bench/apply_profile.py [--runs N]

Figures: first apply (values change, drop-in written) and no-op apply (nothing to do), measured
in-process (engine only, and document load+validate+resolve) and as whole `divingbell apply`
processes. Medians of N runs; the first-apply runs each get a fresh namespace and root.
Nothing on this machine changes: every write happens in the namespace or a temp directory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

PROFILE = {
    "net.ipv4.ip_forward": 1, "net.ipv4.tcp_syncookies": 0, "net.ipv4.tcp_timestamps": 0,
    "net.ipv4.tcp_sack": 0, "net.ipv4.tcp_window_scaling": 0, "net.ipv4.tcp_fin_timeout": 30,
    "net.ipv4.tcp_keepalive_time": 600, "net.ipv4.tcp_keepalive_intvl": 30,
    "net.ipv4.tcp_keepalive_probes": 5, "net.ipv4.tcp_max_syn_backlog": 8192,
    "net.ipv4.tcp_max_tw_buckets": 262144, "net.ipv4.tcp_syn_retries": 3,
    "net.ipv4.tcp_synack_retries": 3, "net.ipv4.tcp_retries2": 8, "net.ipv4.tcp_mtu_probing": 1,
    "net.ipv4.tcp_slow_start_after_idle": 0, "net.ipv4.tcp_no_metrics_save": 1,
    "net.ipv4.tcp_rfc1337": 1, "net.ipv4.tcp_tw_reuse": 1, "net.ipv4.tcp_fastopen": 3,
    "net.ipv4.tcp_rmem": "4096 87380 6291456", "net.ipv4.tcp_wmem": "4096 65536 6291456",
    "net.ipv4.ip_local_port_range": "10000 65000", "net.ipv4.ip_default_ttl": 128,
    "net.ipv4.ip_nonlocal_bind": 1, "net.ipv4.icmp_echo_ignore_all": 1,
    "net.ipv4.icmp_ratelimit": 500, "net.ipv4.icmp_msgs_per_sec": 500,
    "net.ipv4.igmp_max_memberships": 40, "net.ipv4.ipfrag_time": 15,
    "net.ipv4.ipfrag_high_thresh": 8388608, "net.ipv4.ipfrag_low_thresh": 6291456,
    "net.ipv4.tcp_reordering": 5, "net.ipv4.tcp_ecn": 1, "net.ipv4.tcp_autocorking": 0,
    "net.ipv4.tcp_app_win": 16, "net.ipv4.tcp_orphan_retries": 2,
    "net.ipv4.tcp_min_snd_mss": 64, "net.core.somaxconn": 8192,
    "net.ipv6.conf.all.forwarding": 1,
}
assert len(PROFILE) == 40

DOCUMENT = {"conf": {"sysctl": PROFILE}}


@contextlib.contextmanager
def namespace() -> Iterator[str]:
    name = f"dbbench-{os.getpid()}-{time.monotonic_ns()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def in_process(doc_path: Path, runs: int) -> dict[str, float]:
    """Runs inside the namespace (re-executed there by main)."""
    from divingbell.document.api import load_document, node_config, revision
    from divingbell.engine.runner import apply_node
    from divingbell.host import Host

    started = time.perf_counter()
    document = load_document([doc_path])
    config = node_config(document, "bench", {})
    load_ms = (time.perf_counter() - started) * 1000
    root = Path(tempfile.mkdtemp(prefix="dbbench-root-"))
    try:
        host = Host(root=root)
        started = time.perf_counter()
        report = apply_node(host, config, revision(document))
        first_ms = (time.perf_counter() - started) * 1000
        assert report.ok and len(report.applied) == 41, report.as_dict()
        noop = []
        for _ in range(runs):
            started = time.perf_counter()
            again = apply_node(host, config, revision(document))
            noop.append((time.perf_counter() - started) * 1000)
            assert again.ok and not again.applied
        loads = []
        for _ in range(runs):
            started = time.perf_counter()
            node_config(load_document([doc_path]), "bench", {})
            loads.append((time.perf_counter() - started) * 1000)
    finally:
        shutil.rmtree(root)
    return {"first_apply_ms": first_ms, "noop_apply_ms": statistics.median(noop),
            "document_load_validate_resolve_ms": statistics.median(loads),
            "first_document_load_ms": load_ms}


def whole_process(doc_path: Path, runs: int) -> dict[str, float]:
    divingbell = str(Path(sys.executable).with_name("divingbell"))
    first, noop = [], []
    for _ in range(max(3, runs // 4)):
        with namespace() as ns:
            root = tempfile.mkdtemp(prefix="dbbench-root-")
            argv = ["ip", "netns", "exec", ns, divingbell, "apply", str(doc_path),
                    "--root", root, "--node", "bench"]
            started = time.perf_counter()
            subprocess.run(argv, check=True, capture_output=True)
            first.append((time.perf_counter() - started) * 1000)
            for _ in range(runs):
                started = time.perf_counter()
                out = subprocess.run(argv, check=True, capture_output=True, text=True)
                noop.append((time.perf_counter() - started) * 1000)
                assert "No changes" in out.stdout
            shutil.rmtree(root)
    # `ip netns exec` itself costs a few ms; measure it so the figure can be read either way.
    with namespace() as ns:
        overhead = []
        for _ in range(runs):
            started = time.perf_counter()
            subprocess.run(["ip", "netns", "exec", ns, "true"], check=True)
            overhead.append((time.perf_counter() - started) * 1000)
    return {"first_apply_ms": statistics.median(first), "noop_apply_ms": statistics.median(noop),
            "ip_netns_exec_overhead_ms": statistics.median(overhead)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--inside", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside:
        print(json.dumps(in_process(args.inside, args.runs)))
        return
    if os.geteuid() != 0:
        sys.exit("run as root: the bench creates network namespaces")
    with tempfile.TemporaryDirectory() as tmp:
        doc = Path(tmp) / "profile.yaml"
        doc.write_text(json.dumps(DOCUMENT))  # JSON is YAML
        with namespace() as ns:
            out = subprocess.run(
                ["ip", "netns", "exec", ns, sys.executable, __file__, "--inside", str(doc),
                 "--runs", str(args.runs)], check=True, capture_output=True, text=True)
        inproc = json.loads(out.stdout)
        whole = whole_process(doc, args.runs)
    print(f"profile: {len(PROFILE)} net.* sysctls in a network namespace; medians of "
          f"{args.runs} runs")
    print(f"in-process  first apply (engine)          {inproc['first_apply_ms']:8.2f} ms")
    print(f"in-process  no-op apply (engine)          {inproc['noop_apply_ms']:8.2f} ms")
    print(f"in-process  load+validate+resolve         "
          f"{inproc['document_load_validate_resolve_ms']:8.2f} ms")
    print(f"process     first `divingbell apply`      {whole['first_apply_ms']:8.2f} ms")
    print(f"process     no-op `divingbell apply`      {whole['noop_apply_ms']:8.2f} ms")
    overhead = whole["ip_netns_exec_overhead_ms"]
    print(f"            (of which `ip netns exec`     {overhead:8.2f} ms)")


if __name__ == "__main__":
    main()
