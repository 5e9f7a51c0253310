"""A minimal Pod Security admission check: the `baseline` level of the Pod Security Standards
(https://kubernetes.io/docs/concepts/security/pod-security-standards/), and `privileged`, which
allows everything. No Python library implements Pod Security admission (PyPI has none), so this
follows the standard's baseline table control by control; `restricted` is not implemented (a
privileged host agent can never meet it).

What kube-apiserver adds that matters here: with hostNetwork, every containerPort gets a
hostPort equal to it (API defaulting), which baseline forbids.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

BASELINE_CAPABILITIES = frozenset({
    "AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
    "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"})
SAFE_SYSCTLS = frozenset({
    "kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes"})
SELINUX_TYPES = frozenset({"", "container_t", "container_init_t", "container_kvm_t",
                           "container_engine_t"})
LEVELS = ("privileged", "baseline")


def violations(pod_spec: Mapping[str, Any], level: str) -> list[str]:
    """Why a pod with `pod_spec` is refused at `level` (empty: admitted)."""
    if level not in LEVELS:
        raise ValueError(f"level {level!r}: this check knows {', '.join(LEVELS)}")
    if level == "privileged":
        return []
    found: list[str] = []
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod_spec.get(key):
            found.append(f"host namespaces: {key}=true")
    for volume in pod_spec.get("volumes") or []:
        if "hostPath" in volume:
            found.append(f"hostPath volumes: {volume['name']!r}")
    pod_context = pod_spec.get("securityContext") or {}
    found.extend(_context_violations("pod", pod_context))
    for sysctl in pod_context.get("sysctls") or []:
        if sysctl["name"] not in SAFE_SYSCTLS:
            found.append(f"sysctls: {sysctl['name']}")
    for kind in ("initContainers", "containers", "ephemeralContainers"):
        for container in pod_spec.get(kind) or []:
            where = f"container {container['name']!r}"
            context = container.get("securityContext") or {}
            if context.get("privileged"):
                found.append(f"privileged containers: {where}")
            added = set((context.get("capabilities") or {}).get("add") or [])
            if added - BASELINE_CAPABILITIES:
                found.append(f"capabilities: {where} adds {sorted(added - BASELINE_CAPABILITIES)}")
            if context.get("procMount", "Default") != "Default":
                found.append(f"/proc mount type: {where}")
            found.extend(_context_violations(where, context))
            for port in container.get("ports") or []:
                host_port = port.get("hostPort") or (
                    port["containerPort"] if pod_spec.get("hostNetwork") else 0)
                if host_port:
                    found.append(f"host ports: {where} port {host_port}")
    return found


def _context_violations(where: str, context: Mapping[str, Any]) -> list[str]:
    found = []
    if (context.get("windowsOptions") or {}).get("hostProcess"):
        found.append(f"HostProcess: {where}")
    if (context.get("seccompProfile") or {}).get("type") == "Unconfined":
        found.append(f"seccomp: {where} is Unconfined")
    apparmor = (context.get("appArmorProfile") or {}).get("type")
    if apparmor == "Unconfined":
        found.append(f"AppArmor: {where} is Unconfined")
    selinux = context.get("seLinuxOptions") or {}
    if selinux.get("type", "") not in SELINUX_TYPES or selinux.get("user") or selinux.get("role"):
        found.append(f"SELinux: {where}")
    return found
