"""The alert blocker: firing alerts from Prometheus's HTTP API (`/api/v1/alerts`), stdlib only."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from divingbell.maintenance.decide import firing_alerts


class AlertsUnavailable(Exception):
    """Prometheus could not be asked: the sequence treats that as blocking (fail safe)."""


def fetch_alerts(prometheus: str, timeout: float = 10.0) -> list[dict[str, Any]]:
    url = f"{prometheus.rstrip('/')}/api/v1/alerts"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            body = json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise AlertsUnavailable(f"cannot read alerts from {url}: "
                                f"{getattr(exc, 'reason', exc)}") from None
    if not isinstance(body, dict) or body.get("status") != "success":
        raise AlertsUnavailable(f"{url} answered {str(body)[:200]}")
    alerts = (body.get("data") or {}).get("alerts") or []
    return [a for a in alerts if isinstance(a, dict)]


def alert_blockers(prometheus: str, pattern: str, timeout: float = 10.0) -> list[str]:
    """Blocker descriptions: one per firing alert whose name matches, or why we cannot tell."""
    try:
        names = firing_alerts(fetch_alerts(prometheus, timeout), pattern)
    except AlertsUnavailable as exc:
        return [f"unknown alerts ({exc})"]
    return [f"alert {name} firing" for name in names]
