"""A minimal stdlib HTTP client for the fleet service's slot routes (urllib, JSON in and out,
bearer token), for the agent, which must not import the service's dependencies.

Written here because `divingbell.fleet.client` was not in main yet; once it is, `FleetSlots`
can take that client instead (it needs only `request(method, path, body) -> (status, json)`).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any


class FleetError(Exception):
    """The fleet service could not be reached or answered something that is not JSON."""


class FleetClient:
    def __init__(self, base_url: str, token: str | None = None, timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._token = token
        self.timeout = timeout

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"{self.base_url}{path}", data=data, method=method)
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self._token:
            request.add_header("Authorization", f"Bearer {self._token}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.status, _json(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, _json(exc.read())
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise FleetError(f"cannot reach the fleet service at {self.base_url}: {reason}"
                             ) from None

    def __repr__(self) -> str:  # never show the token
        return f"FleetClient({self.base_url!r})"


def _json(raw: bytes) -> Any:
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except ValueError:
        return {"detail": raw[:200].decode(errors="replace")}
