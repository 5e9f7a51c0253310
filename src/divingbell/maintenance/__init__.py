"""Node maintenance: reboots and drains rolled through the fleet a few nodes at a time.

`decide` is the pure decision logic (window, blockers, slot choice, cordon ownership, what to
evict, what to do on a drain timeout, the phases and their transitions); `sequence` the state
machine each agent steps after its pass, with its record on the host; `slots` the fleet
semaphore with two backends (Kubernetes Leases, the fleet service's `/v1/slots`); `operator`
what `divingbell node ...` does; `selectors` Kubernetes label selectors; `alerts` the
Prometheus blocker. Stdlib and lightkube only: the agent imports it.
"""

from __future__ import annotations

from typing import Any


class DrainIncomplete(RuntimeError):
    """Pods are still on the node after the drain's timeout (their budgets name why)."""


def drain(api: Any, node: str, *, grace_seconds: int = 60, timeout: float = 900.0,
          **options: Any) -> None:
    """Cordon `node` (recorded as divingbell's) and evict its pods through the Eviction API,
    respecting PodDisruptionBudgets: what `divingbell bootstrap teardown` runs before it takes
    a node apart. Raises DrainIncomplete, naming the blocking pods, if the timeout passes."""
    from divingbell.maintenance import operator

    operator.cordon(api, node, operator.operator_name(), "bootstrap teardown")
    report = operator.drain(api, node, grace_seconds=grace_seconds, timeout=timeout, **options)
    if not report.done:
        blocking = "; ".join(f"{pod} (budget {', '.join(budgets) or 'none'})"
                             for pod, budgets in report.blocking)
        raise DrainIncomplete(f"{node} still runs pods after {timeout:.0f}s: {blocking}")
