"""Machine states and the transitions allowed between them, as data (one place to read the
whole lifecycle). Every change goes through `check_transition`; the service stores each one
with its time and reason in the machine's history.

Stable states change only on request or on a machine's report; `installing` is unstable: a
machine holding an install grant that expires without a result is moved to `failed`
("install grant expired"), never left hanging.
"""

from __future__ import annotations

from typing import Final

BOOTING: Final = "booting"
"""No credential: a network boot request was seen and the machine has not enrolled yet (or an
operator allowed it to enrol again)."""
DISCOVERED: Final = "discovered"
"""Facts reported; no role yet."""
SCHEDULED: Final = "scheduled"
"""Has a role (given by the scheduler or pinned by an operator)."""
INSTALLING: Final = "installing"
"""Holds an install grant (a lease with a TTL)."""
INSTALLED: Final = "installed"
"""The installer reported success; the agent has not reported a converged run yet."""
FAILED: Final = "failed"
"""The install failed (its output is kept) or its grant expired."""
READY: Final = "ready"
"""The agent's last report: converged on the current configuration."""
UPDATING: Final = "updating"
"""A newer configuration was fetched; not converged on it yet."""
DEGRADED: Final = "degraded"
"""The agent's last report: failed."""
DECOMMISSIONED: Final = "decommissioned"
"""Out of the fleet: no role, no grants, no slots. Registering again brings it back."""

STATES: Final = (BOOTING, DISCOVERED, SCHEDULED, INSTALLING, INSTALLED, FAILED, READY, UPDATING,
                 DEGRADED, DECOMMISSIONED)

# Any enrolled machine can be sent back to `booting` by an operator's `fleet reenroll` (its
# credential revoked; its next boot enrols it again).
# A converged or failed report can come from a host that joined without a network install
# (`divingbell discover` on an installed host), hence the edges from discovered/scheduled.
_RUNNING = (READY, UPDATING, DEGRADED)
TRANSITIONS: Final[dict[str, frozenset[str]]] = {
    BOOTING: frozenset({DISCOVERED, DECOMMISSIONED}),
    DISCOVERED: frozenset({DISCOVERED, SCHEDULED, *_RUNNING, DECOMMISSIONED, BOOTING}),
    SCHEDULED: frozenset({DISCOVERED, SCHEDULED, INSTALLING, *_RUNNING, DECOMMISSIONED,
                          BOOTING}),
    INSTALLING: frozenset({INSTALLED, FAILED, DECOMMISSIONED, BOOTING}),
    INSTALLED: frozenset({SCHEDULED, INSTALLING, *_RUNNING, DECOMMISSIONED, BOOTING}),
    FAILED: frozenset({SCHEDULED, INSTALLING, DISCOVERED, *_RUNNING, DECOMMISSIONED, BOOTING}),
    READY: frozenset({SCHEDULED, DISCOVERED, INSTALLING, *_RUNNING, DECOMMISSIONED, BOOTING}),
    UPDATING: frozenset({SCHEDULED, DISCOVERED, INSTALLING, *_RUNNING, DECOMMISSIONED,
                         BOOTING}),
    DEGRADED: frozenset({SCHEDULED, DISCOVERED, INSTALLING, *_RUNNING, DECOMMISSIONED,
                         BOOTING}),
    DECOMMISSIONED: frozenset({DISCOVERED, BOOTING}),
}

HAS_FACTS: Final = frozenset(set(STATES) - {BOOTING, DECOMMISSIONED})
"""States in which a machine counts for scheduling."""


class TransitionError(ValueError):
    def __init__(self, current: str, wanted: str) -> None:
        allowed = ", ".join(sorted(TRANSITIONS.get(current, ())))
        super().__init__(f"a machine in state {current!r} cannot become {wanted!r} "
                         f"(allowed: {allowed or 'none'})")
        self.current, self.wanted = current, wanted


def check_transition(current: str, wanted: str) -> None:
    if wanted not in TRANSITIONS.get(current, frozenset()):
        raise TransitionError(current, wanted)
