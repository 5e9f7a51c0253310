"""Inputs that once ended in a 500 with a traceback (issue 22, finding 11) answer a 4xx naming
the field instead: the real service on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from divingbell.fleet.settings import FleetSettings
from tests.fleet.servers import ThreadServer, thread_server


@pytest.fixture
def service(tmp_path: Path) -> Iterator[ThreadServer]:
    assets = tmp_path / "assets"
    assets.mkdir()
    (assets / "vmlinuz").write_bytes(b"kernel bytes")
    settings = FleetSettings(db_url=f"sqlite:///{tmp_path / 'fleet.db'}", control_plane_size=1,
                             assets_dir=str(assets))
    with thread_server(settings) as server:
        yield server


def test_an_asset_path_component_too_long_for_a_file_name_is_a_4xx(
        service: ThreadServer) -> None:
    for path in ("a" * 256, "hooks/" + "b" * 300, "é" * 200):  # 400 bytes in UTF-8
        reply = httpx.get(f"{service.url}/v1/assets/{path}", timeout=10)
        assert reply.status_code == 404, (path, reply.text)
        assert reply.json()["detail"]["field"] == "path"
    assert httpx.get(f"{service.url}/v1/assets/vmlinuz", timeout=10).text == "kernel bytes"


@pytest.mark.parametrize("route", ["/v1/nodes/n1/labels", "/v1/slots/claim", "/v1/discovery"])
def test_json_nested_deeper_than_the_limit_is_a_422_naming_the_body(
        service: ThreadServer, route: str) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    method = "PUT" if route.endswith("labels") else "POST"
    reply = httpx.request(method, service.url + route, content=deep, timeout=30,
                          headers={"Authorization": f"Bearer {service.admin_token}",
                                   "Content-Type": "application/json"})
    assert reply.status_code == 422, reply.text
    assert reply.json()["detail"]["field"] == "body"
    assert "64" in reply.json()["detail"]["message"]


def test_json_at_the_limit_and_brackets_inside_strings_are_not_refused(
        service: ThreadServer) -> None:
    deep_in_a_string = '{"group": "default", "holder": "' + "[" * 500 + '"}'
    reply = httpx.post(service.url + "/v1/slots/claim", content=deep_in_a_string, timeout=10,
                       headers={"Authorization": f"Bearer {service.admin_token}",
                                "Content-Type": "application/json"})
    assert reply.status_code == 422  # the holder is too long: pydantic's answer, not depth
    assert reply.json()["detail"][0]["field"] == "holder"
    at_limit = "[" * 64 + "]" * 64
    reply = httpx.put(service.url + "/v1/nodes/n1/labels", content=at_limit, timeout=10,
                      headers={"Authorization": f"Bearer {service.admin_token}"})
    assert reply.status_code != 500 and "too-deep" not in reply.text
