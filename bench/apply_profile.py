"""Print apply timings for divingbell's bench profiles, inside a throwaway sandbox.

    sudo .venv/bin/python bench/apply_profile.py [--runs N]

Profiles:
  sysctl  40 net.* sysctls
  full    the sysctls, plus 4 tmpfs mounts, 2 veth interfaces x 5 offload features,
          5 limits, 10 perm paths, 20 users (keys; half with sudo) and 10 packages that
          are already installed (the settled dpkg check; no download is measured)
For each: first apply (everything changes) and no-op apply (nothing to do), in-process (the
engine, with the document already validated) and as whole `divingbell apply` processes (wall
time, and the no-op's CPU time). Whole no-op processes after the first find the document in
the validated-document cache; a first apply after a reset is a cache miss (another document).
Medians of N runs. Between first-apply runs the sandbox is reset by a document that restores
every original and deletes the users: each first apply starts from a clean host.

The sandbox: a network namespace (sysctls, veths), a private mount namespace and an overlay
of / as the host root (mounts, files, units, journal). Nothing on this machine changes.
divingbell's sources are byte-compiled first, as an installed package is.
To measure another checkout with this venv: PYTHONPATH=/path/to/checkout/src.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

SYSCTLS: dict[str, Any] = {
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
assert len(SYSCTLS) == 40

FEATURES = {"tx-tcp-segmentation": False, "generic-receive-offload": False,
            "tx-checksum-ip-generic": False, "scatter-gather": False,
            "rx-checksumming": False}
PERM_FILES = [f"/srv/dbbench/file{i}" for i in range(10)]
BENCH_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIF2bE1q62MELbuEAkqo2A527FrQdC95PpU9jOMAeVMsC bench"
USERS = [{"user_name": f"dbbench{i}", "user_sudo": i % 2 == 0, "user_sshkeys": [BENCH_KEY]}
         for i in range(20)]
# Installed on any Debian host: the profile measures the settled check, not a download.
PACKAGES = [{"name": name} for name in ("bash", "coreutils", "grep", "sed", "tar", "gzip",
                                        "findutils", "util-linux", "procps", "iproute2")]

PROFILES: dict[str, dict[str, Any]] = {
    "sysctl": {"conf": {"sysctl": SYSCTLS}},
    "full": {"conf": {
        "sysctl": SYSCTLS,
        "mounts": {f"m{i}": {"mnt_tgt": f"/mnt/dbbench{i}", "device": "tmpfs", "type": "tmpfs",
                             "options": "defaults,noatime,size=8M"} for i in range(4)},
        "ethtool": {iface: dict(FEATURES) for iface in ("va0", "va1")},
        "limits": {f"l{i}": {"domain": f"user{i}", "type": "soft", "item": "nofile",
                             "value": 1024 * (i + 1)} for i in range(5)},
        "perm": {"paths": [{"path": p, "owner": "root", "group": "root",
                            "permissions": "0600"} for p in PERM_FILES]},
        "uamlite": {"purge_expired_users": True, "users": USERS},
        "apt": {"packages": PACKAGES},
    }},
}
# Between first-apply runs: users created by the last run are deleted, so each run creates them.
RESET = {"conf": {"uamlite": {"purge_expired_users": True, "allow_lockout": True, "users": []}}}


# As deploy/install leaves a host: its virtualenv has no setuptools, so no distutils hook runs
# at every interpreter start (the development .venv has one; this switches it off).
PROCESS_ENV = {**os.environ, "SETUPTOOLS_USE_DISTUTILS": "stdlib"}


def median_ms(action: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        action()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def inside(runs: int) -> dict[str, dict[str, float]]:
    """Runs in the sandbox namespaces (main re-executes itself there)."""
    import compileall

    import divingbell as package
    from divingbell.core.host import Host

    # As installed (pip writes .pyc files): even under PYTHONDONTWRITEBYTECODE=1 no process
    # measured here spends its time compiling divingbell's sources.
    compileall.compile_dir(Path(package.__file__).parent, quiet=1)

    root = overlay_of_slash()
    for path in PERM_FILES:
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("x\n")
        target.chmod(0o644)
    host = Host(root=root)
    figures = {name: measure(host, name, document, runs) for name, document in PROFILES.items()}
    divingbell = str(Path(sys.executable).with_name("divingbell"))
    figures["startup"] = {"help_cli": median_ms(lambda: subprocess.run(
        [divingbell, "--help"], check=True, capture_output=True), runs)}
    return figures


def measure(host: Any, name: str, document: dict[str, Any], runs: int) -> dict[str, float]:
    from divingbell.core.document.api import node_config, revision
    from divingbell.core.document.loader import load_text
    from divingbell.core.document.validate import validate
    from divingbell.core.engine.runner import apply_node

    doc_path = host.root / f"tmp/dbbench-{name}.yaml"
    doc_path.write_text(json.dumps(document))
    valid = validate(load_text(doc_path.read_text()))
    config = node_config(valid, "bench", {})
    reset = node_config(validate(load_text(json.dumps(RESET))), "bench", {})
    rev = revision(valid)
    divingbell = str(Path(sys.executable).with_name("divingbell"))
    argv = [divingbell, "apply", str(doc_path), "--root", str(host.root), "--node", "bench"]

    def first_inproc() -> None:
        report = apply_node(host, config, rev)
        assert report.ok and report.applied, report.as_dict()

    def noop_inproc() -> None:
        report = apply_node(host, config, rev)
        assert report.ok and not report.applied, report.as_dict()

    def process() -> None:
        subprocess.run(argv, check=True, capture_output=True, text=True, env=PROCESS_ENV)

    cpu: list[float] = []
    wall: list[float] = []

    def process_cpu() -> None:
        # CPU time (user+sys) of the child: what the process costs, less sensitive than wall
        # time to other work on a shared machine.
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        process()
        wall.append((time.perf_counter() - started) * 1000)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu.append((after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime) * 1000)

    def validate_again() -> None:
        node_config(validate(load_text(doc_path.read_text())), "bench", {})

    first, first_cli = [], []
    for _ in range(max(3, runs // 4)):
        apply_node(host, reset, "reset")
        first.append(median_ms(first_inproc, 1))
        apply_node(host, reset, "reset")
        first_cli.append(median_ms(process, 1))
    figures = {
        "first_inproc": statistics.median(first),
        "noop_inproc": median_ms(noop_inproc, runs),
        "validate": median_ms(validate_again, runs),
        "first_cli": statistics.median(first_cli),
        "noop_cli": median_ms(process_cpu, runs),
    }
    figures["noop_cli_cpu"] = statistics.median(cpu)
    # The fastest run: the least disturbed by other work on a shared machine.
    figures["noop_cli_min"] = min(wall)
    restored = apply_node(host, reset, "reset")
    assert restored.ok, restored.as_dict()
    restored = apply_node(host, node_config(validate(load_text("conf: {}\n")), "bench", {}),
                          "reset")
    assert restored.ok, restored.as_dict()
    return figures


def overlay_of_slash() -> Path:
    base = Path(tempfile.mkdtemp(prefix="dbbench-"))
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(base)], check=True)
    for name in ("upper", "work", "merged"):
        (base / name).mkdir()
    merged = base / "merged"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir=/,upperdir={base}/upper,workdir={base}/work", str(merged)],
                   check=True)
    for name in ("proc", "dev", "sys"):
        subprocess.run(["mount", "--rbind", f"/{name}", str(merged / name)], check=True)
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside:
        print(json.dumps(inside(args.runs)))
        return
    if os.geteuid() != 0:
        sys.exit("run as root: the bench creates network and mount namespaces")
    ns = f"dbbench-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        for i in range(2):
            subprocess.run(["ip", "-n", ns, "link", "add", f"va{i}", "type", "veth", "peer",
                            "name", f"vb{i}"], check=True)
        out = subprocess.run(
            ["unshare", "-m", "--propagation", "private", "ip", "netns", "exec", ns,
             sys.executable, __file__, "--inside", "--runs", str(args.runs)],
            check=True, capture_output=True, text=True)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    figures = json.loads(out.stdout)
    print(f"medians of {args.runs} runs (first apply: {max(3, args.runs // 4)} runs)")
    print(f"{'profile':8} {'first(engine)':>14} {'no-op(engine)':>14} {'validate':>9} "
          f"{'first(process)':>15} {'no-op(process)':>15} {'no-op(process CPU)':>19}")
    for name in PROFILES:
        f = figures[name]
        print(f"{name:8} {f['first_inproc']:11.2f} ms {f['noop_inproc']:11.2f} ms "
              f"{f['validate']:6.2f} ms {f['first_cli']:12.2f} ms {f['noop_cli']:12.2f} ms "
              f"{f['noop_cli_cpu']:16.2f} ms")
    for name in PROFILES:
        print(f"{name}: fastest no-op process {figures[name]['noop_cli_min']:.2f} ms")
    print(f"`divingbell --help` process: {figures['startup']['help_cli']:.2f} ms")


if __name__ == "__main__":
    main()
