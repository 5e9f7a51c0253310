"""A small HTTP client for the fleet API: standard library only (urllib), so the node agent,
`divingbell discover` and the network-boot tools can use it without the service's extras.

JSON in and out, a bearer token, conditional GET with ETag, TLS with an optional CA file.
Errors raise `FleetApiError` with the status and the service's `detail`; the token never
appears in an error or a log line.
"""

from __future__ import annotations

import json
import os
import ssl
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_TIMEOUT = 10.0
MACHINES_PAGE = 1000
"""Machines asked for per request when listing (the service allows up to 5000)."""
CREDENTIAL_PATH = Path("/var/lib/divingbell/fleet-credential")
"""Where `divingbell discover --server` stores the machine credential (0600) and where the
agent's fleet mode looks for it by default."""


class FleetApiError(Exception):
    """The service answered with an error status, or could not be reached (status 0)."""

    def __init__(self, status: int, detail: Any, method: str = "", url: str = "") -> None:
        self.status = status
        self.detail = detail
        self.method = method
        self.url = url
        super().__init__(self._message())

    def _message(self) -> str:
        where = f"{self.method} {self.url}: " if self.method else ""
        if self.status == 0:
            return f"{where}cannot reach the fleet service: {self.detail}"
        detail = self.detail
        if isinstance(detail, dict):
            detail = detail.get("message") or detail.get("error") or json.dumps(detail)
        elif isinstance(detail, list):
            detail = "; ".join(
                f"{d.get('field') or d.get('loc')}: {d.get('msg')}" if isinstance(d, dict)
                else str(d) for d in detail)
        return f"{where}{self.status} {detail}"


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None

    @property
    def etag(self) -> str | None:
        return self.headers.get("etag")


@dataclass
class Config:
    """A machine's configuration as served: None text when not modified (304)."""

    status: int
    etag: str | None
    revision: int | None
    text: str | None


def read_token(path: str | Path) -> str:
    """A token from a file (first line), refusing files others can read."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
        text = path.read_text().strip()
    except OSError as exc:
        raise FleetApiError(0, f"cannot read the token file {path}: {exc.strerror}") from None
    if mode & 0o077:
        raise FleetApiError(0, f"the token file {path} is readable by others: chmod 600 {path}")
    if not text:
        raise FleetApiError(0, f"the token file {path} is empty")
    return text.splitlines()[0].strip()


def write_secret(path: str | Path, text: str) -> None:
    """Write a secret file readable by its owner only (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text if text.endswith("\n") else text + "\n")
    os.replace(tmp, path)


def machine_id_of(credential: str) -> str | None:
    """The machine id carried by a machine credential (`dbm_<id>_<secret>`)."""
    prefix, _, rest = credential.partition("_")
    ident, _, secret = rest.partition("_")
    return ident if prefix == "dbm" and ident and secret else None


@dataclass
class FleetClient:
    base_url: str
    token: str | None = None
    timeout: float = DEFAULT_TIMEOUT
    ca_file: str | None = None
    _context: ssl.SSLContext | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.base_url = self.base_url.rstrip("/")
        if not self.base_url.startswith(("http://", "https://")):
            raise FleetApiError(0, f"{self.base_url!r} is not an http(s):// URL")
        if self.base_url.startswith("https://"):
            self._context = ssl.create_default_context(cafile=self.ca_file)

    # Plumbing --------------------------------------------------------------------------------

    def request(self, method: str, path: str, body: Any = None, *,
                headers: dict[str, str] | None = None, data: bytes | None = None,
                content_type: str = "application/json", ok: tuple[int, ...] = ()) -> Response:
        url = self.base_url + path
        all_headers = {"Accept": "application/json", **(headers or {})}
        if self.token:
            all_headers["Authorization"] = f"Bearer {self.token}"
        if body is not None:
            data = json.dumps(body).encode()
        if data is not None:
            all_headers["Content-Type"] = content_type
        request = urllib.request.Request(url, data=data, method=method, headers=all_headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout,
                                        context=self._context) as answer:
                return Response(answer.status, {k.lower(): v for k, v in answer.headers.items()},
                                answer.read())
        except urllib.error.HTTPError as exc:
            payload = exc.read()
            response = Response(exc.code, {k.lower(): v for k, v in exc.headers.items()},
                                payload)
            if exc.code in ok:
                return response
            try:
                detail = json.loads(payload).get("detail")
            except (ValueError, AttributeError):
                detail = payload.decode(errors="replace")[:500]
            raise FleetApiError(exc.code, detail, method, path) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise FleetApiError(0, str(reason), method, path) from None

    def call(self, method: str, path: str, body: Any = None) -> Any:
        return self.request(method, path, body).json()

    # Machines --------------------------------------------------------------------------------

    def discover(self, facts: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self.call("POST", "/v1/discovery", facts)
        return result

    def reenroll(self, machine_id: str) -> dict[str, Any]:
        """Admin: revoke the machine's credential so that its next boot may enrol it again."""
        result: dict[str, Any] = self.call("POST", f"/v1/machines/{_q(machine_id)}/reenroll")
        return result

    def accept_hostname(self, machine_id: str, hostname: str | None = None) -> dict[str, Any]:
        """Admin: accept the machine's claimed host name (or this one)."""
        body = {} if hostname is None else {"hostname": hostname}
        result: dict[str, Any] = self.call("PUT", f"/v1/machines/{_q(machine_id)}/hostname",
                                           body)
        return result

    def accept_unadmitted(self) -> dict[str, Any]:
        """Admin: accept the claimed host name of every unadmitted machine (valid and free)."""
        result: dict[str, Any] = self.call("POST", "/v1/machines/accept",
                                           {"all_unadmitted": True})
        return result

    def machines(self, state: str | None = None, *, limit: int | None = None,
                 page_size: int = MACHINES_PAGE) -> list[dict[str, Any]]:
        """Every machine (or the first `limit`), in the order they were first seen, fetched a
        page at a time by following the service's `next` cursor."""
        found: list[dict[str, Any]] = []
        after: str | None = None
        while limit is None or len(found) < limit:
            size = page_size if limit is None else min(page_size, limit - len(found))
            body = self.machines_page(state, limit=size, after=after)
            if isinstance(body, list):  # a service from before pagination: all at once
                return body if limit is None else body[:limit]
            found.extend(body["machines"])
            if body["next"] is None:
                break
            if body["next"] == after:
                raise FleetApiError(0, "the service returned the same page twice",
                                    "GET", "/v1/machines")
            after = body["next"]
        return found

    def machines_page(self, state: str | None = None, *, limit: int | None = None,
                      after: str | None = None) -> Any:
        """One page: `{"machines": [...], "next": cursor or None}` (a bare list from a service
        that does not page)."""
        params = {name: value for name, value in
                  (("state", state), ("limit", limit), ("after", after)) if value is not None}
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        return self.call("GET", f"/v1/machines{query}")

    def machine(self, machine_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.call("GET", f"/v1/machines/{_q(machine_id)}")
        return result

    def set_roles(self, machine_id: str, roles: list[str], pinned: bool = True
                  ) -> dict[str, Any]:
        result: dict[str, Any] = self.call("PUT", f"/v1/machines/{_q(machine_id)}/roles",
                                           {"roles": roles, "pinned": pinned})
        return result

    def config(self, machine_id: str, etag: str | None = None) -> Config:
        headers = {"Accept": "application/yaml"}
        if etag:
            headers["If-None-Match"] = etag
        response = self.request("GET", f"/v1/machines/{_q(machine_id)}/config",
                                headers=headers, ok=(304,))
        revision = response.headers.get("x-divingbell-revision")
        return Config(response.status, response.etag,
                      int(revision) if revision and revision.isdigit() else None,
                      None if response.status == 304 else response.body.decode())

    def report(self, machine_id: str, report: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self.call("POST", f"/v1/machines/{_q(machine_id)}/reports",
                                           report)
        return result

    def install_grant(self, machine_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.call(
            "POST", f"/v1/machines/{_q(machine_id)}/install/grant")
        return result

    def install_result(self, machine_id: str, success: bool, output: str = ""
                       ) -> dict[str, Any]:
        result: dict[str, Any] = self.call(
            "POST", f"/v1/machines/{_q(machine_id)}/install/result",
            {"success": success, "output": output})
        return result

    # Documents -------------------------------------------------------------------------------

    def push_document(self, text: bytes, name: str = "document.yaml", *,
                      allow_removals: bool = False) -> dict[str, Any]:
        query = urllib.parse.urlencode({"name": name, **(
            {"allow_removals": "true"} if allow_removals else {})})
        result: dict[str, Any] = self.request("PUT", f"/v1/document?{query}", data=text,
                                              content_type="application/yaml").json()
        return result

    def revisions(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.call("GET", "/v1/revisions")
        return result

    def activate(self, number: int) -> dict[str, Any]:
        result: dict[str, Any] = self.call("POST", f"/v1/revisions/{int(number)}/activate")
        return result

    # Maintenance slots -----------------------------------------------------------------------

    def claim_slot(self, holder: str, group: str = "default", ttl_seconds: float = 600.0,
                   **extra: Any) -> dict[str, Any]:
        """The held slot; raises FleetApiError(409, {"error": "no-free-slot", ...}) if none.
        How many slots `group` has is the service's to say (`extra` only for tests that
        send what an older or hostile claimer would)."""
        result: dict[str, Any] = self.call("POST", "/v1/slots/claim", {
            "group": group, "holder": holder, "ttl_seconds": ttl_seconds, **extra})
        return result

    def renew_slot(self, slot: str, holder: str, ttl_seconds: float = 600.0,
                   rebooting: bool = False) -> dict[str, Any]:
        group, index = _slot(slot)
        result: dict[str, Any] = self.call("POST", f"/v1/slots/{group}/{index}/renew", {
            "holder": holder, "ttl_seconds": ttl_seconds, "rebooting": rebooting})
        return result

    def release_slot(self, slot: str, holder: str) -> dict[str, Any]:
        group, index = _slot(slot)
        result: dict[str, Any] = self.call("POST", f"/v1/slots/{group}/{index}/release",
                                           {"holder": holder})
        return result


def _q(value: str) -> str:
    return urllib.parse.quote(value, safe="")


def _slot(slot: str) -> tuple[str, int]:
    group, _, index = slot.rpartition("/")
    if not group or not index.isdigit():
        raise ValueError(f"{slot!r} is not a slot name like default/0")
    return _q(group), int(index)
