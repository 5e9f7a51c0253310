"""The Kubernetes edge, the only one: node labels in, per-node status and events out;
maintenance (leases, pods, budgets, evictions, cordons); node labels for bootstrap; objects
as plain dicts for policy (the webhook's namespaces, the tenant controller's namespaces,
quotas, bindings and CSRs).

`KubeApi` (and `MaintenanceKube`, `NodeLabelApi`, `ObjectApi`) is the whole interface the rest
of divingbell uses, in `api`, with the views, errors and request builders. `LightkubeApi`
(`lightkube`) is the thin real adapter; `FakeKube` (`fake`) is the in-memory stand-in for
tests, where no API server runs. Both build their requests with the same functions, and
contract tests check that what lightkube puts on the wire is exactly what the fake records,
and that both answer as a real API server does.
"""

from divingbell.kube.api import (
    ANNOTATION_PREFIX,
    EVENTS_PATH,
    KINDS,
    BudgetView,
    EvictionRefused,
    KubeApi,
    KubeConflict,
    KubeError,
    KubeNotFound,
    LeaseView,
    MaintenanceKube,
    NodeLabelApi,
    NodeState,
    NodeView,
    Obj,
    ObjectApi,
    PodView,
    Request,
    lease_view,
    with_query,
)
from divingbell.kube.fake import FakeKube, FakePod
from divingbell.kube.lightkube import LightkubeApi

__all__ = [
    "ANNOTATION_PREFIX", "EVENTS_PATH", "KINDS", "BudgetView", "EvictionRefused", "FakeKube",
    "FakePod", "KubeApi", "KubeConflict", "KubeError", "KubeNotFound", "LeaseView",
    "LightkubeApi", "MaintenanceKube", "NodeLabelApi", "NodeState", "NodeView", "Obj",
    "ObjectApi", "PodView", "Request", "lease_view", "with_query",
]
