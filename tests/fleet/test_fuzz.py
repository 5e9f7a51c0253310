"""Property-based fuzzing of the whole API from its own OpenAPI document (schemathesis):
whatever the generated input, authenticated as an admin or not at all, no 5xx."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok

from divingbell.fleet.settings import FleetSettings
from tests.fleet.servers import ThreadServer, thread_server
from tests.fleet.test_api import DOC, facts

EXAMPLES = 30


@pytest.fixture
def fuzz_target(store_url: str) -> Iterator[ThreadServer]:
    """On SQLite and on PostgreSQL (which refuses what SQLite stores: NUL, 64-bit ints)."""
    with thread_server(FleetSettings(db_url=store_url, control_plane_size=1)) as server:
        # Something to find: a machine, a document, a slot.
        machine = server.bootstrap.discover(facts(1))
        server.admin.push_document(DOC.encode())
        server.admin.claim_slot(machine["machine_id"], "default")
        yield server


def test_no_input_gets_a_server_error(fuzz_target: ThreadServer) -> None:
    schema = schemathesis.openapi.from_url(f"{fuzz_target.url}/openapi.json")
    results = list(schema.get_all_operations())
    assert all(isinstance(result, Ok) for result in results), results
    operations = [result.ok() for result in results if isinstance(result, Ok)]
    assert len(operations) >= 15
    failures: list[str] = []
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
                  database=None)
        def fuzz(case: Any) -> None:
            for token in (fuzz_target.admin_token, None):
                headers = {"Authorization": f"Bearer {token}"} if token else {}
                case.call_and_validate(base_url=fuzz_target.url, headers=headers,
                                       checks=[not_a_server_error])

        try:
            fuzz()
        except Exception as exc:
            failures.append(f"{operation.label}: {exc}")
    assert not failures, "\n\n".join(failures)
    # Not vacuous: every operation was called many times, and authenticated calls got past
    # authentication into validation and the store (422s and 2xx, not only 401s).
    metrics = fuzz_target.admin.request("GET", "/metrics").body.decode()
    served: dict[str, float] = {}
    for line in metrics.splitlines():
        if line.startswith("divingbell_fleet_requests_total{"):
            status = line.split('status="')[1].split('"')[0]
            served[status] = served.get(status, 0) + float(line.rsplit(" ", 1)[1])
    assert sum(served.values()) >= len(operations) * EXAMPLES
    assert served.get("422", 0) > 0 and served.get("200", 0) > 0 and served.get("401", 0) > 0
    assert not any(status.startswith("5") for status in served), served


def test_the_fuzzer_reaches_the_routes(fuzz_target: ThreadServer) -> None:
    # Guard against a vacuous fuzz: the schema it reads lists every /v1 route.
    paths = fuzz_target.admin.call("GET", "/openapi.json")["paths"]
    assert {"/v1/discovery", "/v1/document", "/v1/machines/{machine_id}/config",
            "/v1/machines/{machine_id}/reports", "/v1/slots/claim",
            "/v1/machines/{machine_id}/install/grant"} <= set(paths)
