"""The hot paths answer before the framework and its request log middleware (fleet/hotpath.py),
so they log and count their own requests: the same access line and metrics as every route,
for each of their answers (304, 201, and the errors they map)."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from tests.fleet.servers import ThreadServer, wait_for
from tests.fleet.test_api import DOC, register
from tests.fleet.test_hotpath import send

CONFIG = "/v1/machines/{machine_id}/config"
REPORTS = "/v1/machines/{machine_id}/reports"


def test_hot_answers_are_logged_and_counted_like_every_route(
        fleet: ThreadServer, caplog: pytest.LogCaptureFixture) -> None:
    fleet.admin.push_document(DOC.encode())
    machine, client = register(fleet, 1)
    token = str(client.token)
    etag = client.config(machine).etag
    assert etag is not None
    report = json.dumps({"revision": 1, "etag": etag, "state": "converged"}).encode()
    with caplog.at_level(logging.INFO, logger="divingbell.fleet"):
        answers = [
            send(fleet, "GET", f"/v1/machines/{machine}/config", token,
                 headers={"If-None-Match": etag})[0],
            send(fleet, "POST", f"/v1/machines/{machine}/reports", token, report)[0],
            send(fleet, "POST", f"/v1/machines/{machine}/reports", token + "x", report)[0],
        ]

        def access_lines() -> list[dict[str, Any]]:
            return [json.loads(r.getMessage()) for r in caplog.records
                    if r.name == "divingbell.fleet.access"]

        wait_for(lambda: len(access_lines()) >= 3, timeout=10)
    assert answers == [304, 201, 401]
    lines = access_lines()
    assert [(line["method"], line["route"], line["status"], line["caller"])
            for line in lines] == [("GET", CONFIG, 304, f"machine:{machine}"),
                                   ("POST", REPORTS, 201, f"machine:{machine}"),
                                   ("POST", REPORTS, 401, None)]
    assert all(line["path"].startswith(f"/v1/machines/{machine}/") for line in lines)
    assert token.split("_", 2)[2] not in "\n".join(r.getMessage() for r in caplog.records)
    metrics = fleet.client(None).request("GET", "/metrics").body.decode()
    for method, route, status in (("GET", CONFIG, 304), ("POST", REPORTS, 201),
                                  ("POST", REPORTS, 401)):
        assert (f'divingbell_fleet_requests_total{{method="{method}",route="{route}",'
                f'status="{status}"}} 1.0') in metrics
    assert f'divingbell_fleet_request_duration_seconds_count{{route="{REPORTS}"}} 2.0' in metrics
