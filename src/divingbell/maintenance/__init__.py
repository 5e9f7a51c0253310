"""Node maintenance: reboots and drains rolled through the fleet a few nodes at a time.

`decide` is the pure decision logic (window, blockers, slot choice, cordon ownership, what to
evict, what to do on a drain timeout); `slots` the fleet semaphore with two backends (Kubernetes
Leases, the fleet service); `sequence` the state machine the agent ticks; `selectors` Kubernetes
label selectors; `alerts` the Prometheus blocker. Stdlib and lightkube only: the agent imports it.
"""
