"""Node maintenance: reboots and drains rolled through the fleet a few nodes at a time.

`decide` is the pure decision logic (window, blockers, slot choice, cordon ownership, what to
evict, what to do on a drain timeout, the phases and their transitions); `sequence` the state
machine each agent steps after its pass, with its record on the host; `slots` the fleet
semaphore with two backends (Kubernetes Leases, the fleet service's `/v1/slots`); `operator`
what `divingbell node ...` does; `selectors` Kubernetes label selectors; `alerts` the
Prometheus blocker. Stdlib and lightkube only: the agent imports it.
"""
