"""The hot paths (fleet/hotpath.py) answer a machine's polls and reports exactly as the FastAPI
routes do: the same scenario is played by one machine through the hot paths and by a twin
machine with them switched off, on both stores, and the answers compared."""

from __future__ import annotations

import http.client
import json
import re
from typing import Any

import pytest

from divingbell.fleet import hotpath
from tests.fleet.front_helpers import count_hot_answers
from tests.fleet.servers import ProcessServer, ThreadServer
from tests.fleet.test_api import DOC, register

Answer = tuple[int, dict[str, str], Any]


def send(fleet: ThreadServer | ProcessServer, method: str, path: str, token: str,
         body: bytes | None = None,
         headers: dict[str, str] | None = None) -> Answer:
    connection = http.client.HTTPConnection(fleet.host, fleet.port, timeout=30)
    try:
        all_headers = {"Authorization": f"Bearer {token}", **(headers or {})}
        if body is not None:
            all_headers.setdefault("Content-Type", "application/json")
        connection.request(method, path, body=body, headers=all_headers)
        response = connection.getresponse()
        raw = response.read()
        kept = {name.lower(): value for name, value in response.getheaders()
                if name.lower() in ("etag", "x-divingbell-revision", "content-type",
                                    "retry-after", "www-authenticate")}
        content: Any = raw.decode()
        if kept.get("content-type") == "application/json":
            content = json.loads(raw)
        return response.status, kept, content
    finally:
        connection.close()


def scenario(fleet: ThreadServer, machine: str, token: str, other_token: str) -> list[Answer]:
    """Everything a machine's polls and reports can meet, good and bad."""
    config = f"/v1/machines/{machine}/config"
    reports = f"/v1/machines/{machine}/reports"
    answers = [send(fleet, "GET", config, token)]
    etag = answers[0][1]["etag"]
    report = {"revision": 1, "etag": etag, "state": "converged",
              "modules": {"sysctl": {"changes": 1, "failures": []}}}
    answers += [
        send(fleet, "GET", config, token, headers={"If-None-Match": etag}),
        send(fleet, "GET", config, token, headers={"If-None-Match": '"1-other", ' + etag}),
        send(fleet, "GET", config, token, headers={"If-None-Match": "x" * 1100}),
        send(fleet, "POST", reports, token, json.dumps(report).encode()),
        send(fleet, "POST", reports, token, json.dumps({**report, "state": "failed"}).encode()),
        send(fleet, "POST", reports, token, json.dumps(report).encode(),
             headers={"Content-Type": "application/json; charset=utf-8"}),
        send(fleet, "POST", reports, token, json.dumps({**report, "revision": 99}).encode()),
        send(fleet, "POST", reports, token, json.dumps({**report, "state": "maybe"}).encode()),
        send(fleet, "POST", reports, token, json.dumps({**report, "extra": 1}).encode()),
        send(fleet, "POST", reports, token, b"{not json"),
        send(fleet, "POST", reports, token, b"[" * 70 + b"]" * 70),
        send(fleet, "POST", reports, token, json.dumps(report).encode(),
             headers={"Content-Type": "text/plain"}),
        send(fleet, "GET", config, token + "x"),
        send(fleet, "POST", reports, token + "x", json.dumps(report).encode()),
        # Another machine's credential: a 403 from the framework's access check.
        send(fleet, "GET", config, other_token),
        send(fleet, "POST", reports, other_token, json.dumps(report).encode()),
    ]
    fleet.admin.reenroll(machine)  # the credential is revoked at once
    answers += [send(fleet, "GET", config, token, headers={"If-None-Match": etag}),
                send(fleet, "POST", reports, token, json.dumps(report).encode())]
    return answers


def normalised(answers: list[Answer], machine: str, etag: str) -> str:
    text = json.dumps(answers, sort_keys=True).replace(machine, "MACHINE").replace(
        etag.strip('"'), "ETAG")
    return re.sub(r'node\d+', "NODE", text)


@pytest.mark.parametrize("twin_first", [False, True])
def test_hot_paths_answer_as_the_framework_routes(
        fleet: ThreadServer, monkeypatch: pytest.MonkeyPatch, twin_first: bool) -> None:
    fleet.admin.push_document(DOC.encode())
    register(fleet, 1)  # the control plane: the twins below are both workers
    hot_machine, hot_client = register(fleet, 2)
    twin_machine, twin_client = register(fleet, 3)
    _, witness_client = register(fleet, 4)
    tokens = (hot_client.token, twin_client.token, witness_client.token)
    assert all(tokens)
    hot_token, twin_token, witness_token = (str(token) for token in tokens)
    served: list[str] = []

    count_hot_answers(monkeypatch, served)

    def through_framework() -> list[Answer]:
        with monkeypatch.context() as off:
            off.setattr(hotpath, "_HOT", re.compile(r"(?!)"))  # matches nothing
            return scenario(fleet, twin_machine, twin_token, witness_token)

    def through_hot_paths() -> list[Answer]:
        return scenario(fleet, hot_machine, hot_token, witness_token)

    if twin_first:
        framework = through_framework()
        assert served == []
        hot = through_hot_paths()
    else:
        hot = through_hot_paths()
        taken = len(served)
        framework = through_framework()
        assert len(served) == taken  # switched off: nothing went the hot way
    # The machine's own well-formed requests went the hot way (the rest fell through).
    assert served.count("config") >= 3 and served.count("report") >= 4
    assert [status for status, _, _ in hot][:5] == [200, 304, 304, 422, 201]
    assert normalised(hot, hot_machine, hot[0][1]["etag"]) == normalised(
        framework, twin_machine, framework[0][1]["etag"])
    # The state the hot reports left is what the framework's left.
    hot_view, twin_view = fleet.admin.machine(hot_machine), fleet.admin.machine(twin_machine)
    for key in ("state", "up_to_date", "revision"):
        assert hot_view[key] == twin_view[key], key
    assert ([h["to"] for h in hot_view["history"]]
            == [h["to"] for h in twin_view["history"]])
