"""The web UI in a real headless Chromium (Debian's chromium, driven by Playwright): log in,
see the machines, watch a rollout progress live, pause it; readers see but cannot act."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from divingbell.fleet.settings import FleetSettings
from tests.fleet.servers import ThreadServer, thread_server, wait_for
from tests.fleet.test_api import seed_machines
from tests.fleet.test_rollouts_api import DOC, converge, fleet_of

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture
def ui_fleet(tmp_path: Path) -> Iterator[ThreadServer]:
    settings = FleetSettings(db_url=f"sqlite:///{tmp_path / 'fleet.db'}", control_plane_size=1)
    with thread_server(settings) as server:
        yield server


@pytest.fixture
def browser() -> Iterator[Any]:
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"needs Debian's chromium at {CHROMIUM} (.ci/run installs it)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            yield instance
        finally:
            instance.close()


def shots_dir(tmp_path: Path) -> Path:
    """Screenshots go to $DIVINGBELL_UI_SCREENSHOTS when set (the README's come from there)."""
    path = Path(os.environ.get("DIVINGBELL_UI_SCREENSHOTS", tmp_path / "screenshots"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def new_page(browser: Any, **options: Any) -> Any:
    """A page whose test probes may evaluate scripts: the UI's Content-Security-Policy forbids
    eval, which Playwright's waiting helpers use (the policy itself is checked below)."""
    return browser.new_context(bypass_csp=True, **options).new_page()


def login(page: Any, fleet: ThreadServer, token: str) -> None:
    page.goto(f"{fleet.url}/ui")
    assert page.url.endswith("/ui/login")
    page.fill("#token", token)
    page.click("button[type=submit]")
    page.wait_for_url(f"{fleet.url}/ui")


def test_log_in_see_machines_watch_a_rollout_and_pause_it(ui_fleet: ThreadServer, browser: Any,
                                                          tmp_path: Path) -> None:
    machines = fleet_of(ui_fleet, 4)
    shots = shots_dir(tmp_path)
    page = new_page(browser, viewport={"width": 1366, "height": 800})

    page.goto(f"{ui_fleet.url}/ui/login")
    page.fill("#token", "dbt_nope_wrong")
    page.click("button[type=submit]")
    assert "not valid" in page.inner_text(".error")
    page.fill("#token", ui_fleet.bootstrap_token)
    page.click("button[type=submit]")
    assert "admin or reader" in page.inner_text(".error")

    response = page.goto(f"{ui_fleet.url}/ui/login")
    assert response is not None and response.status == 200
    login(page, ui_fleet, ui_fleet.admin_token)
    headers = page.goto(f"{ui_fleet.url}/ui").headers
    assert "default-src 'self'" in headers["content-security-policy"]
    assert headers["cache-control"] == "no-store"
    page.wait_for_function("document.getElementById('machine-count').textContent === '4'")
    assert page.inner_text("#up-to-date") == "4"
    cookie = next(c for c in page.context.cookies() if c["name"] == "divingbell_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert ui_fleet.admin_token not in cookie["value"]

    page.click("text=Machines")
    page.wait_for_function("document.querySelectorAll('#machines tbody tr').length === 4")
    assert "52:54:00:00:00:03" in page.inner_text("#machines tbody")  # MACs and IPs shown
    assert "10.0.0.4" in page.inner_text("#machines tbody")
    page.fill("#filter", "node3")
    page.wait_for_function("document.querySelectorAll('#machines tbody tr').length === 1")
    assert "node3" in page.inner_text("#machines tbody")
    page.fill("#filter", "")
    page.click("th[data-key=name]")  # sorted by name already: a click reverses it
    page.wait_for_function(
        "document.querySelector('#machines tbody tr td').textContent === 'node4'")
    page.click("th[data-key=name]")
    page.wait_for_function(
        "document.querySelector('#machines tbody tr td').textContent === 'node1'")
    page.screenshot(path=str(shots / "ui-machines.png"))
    page.click("text=node2")
    page.wait_for_function("document.getElementById('machine-name').textContent === 'node2'")
    assert "52:54:00" in page.inner_text("#interfaces")
    assert "ready" in page.inner_text("#history")
    assert "sysctl: 1 change" in page.inner_text("#reports")

    # A rollout, watched live: the page is never reloaded.
    second = ui_fleet.admin.push_document(DOC.format(value=19).encode())["revision"]
    page.click("text=Rollout")
    page.wait_for_selector("#waves .wave")
    rollout = ui_fleet.reader.call("GET", "/v1/rollouts/current")
    order = [m for wave in rollout["waves"] for m in wave]
    first, following = order[0], order[1]
    page.wait_for_selector(f"[data-machine={first['name']}].updating")
    page.evaluate("window.__same_page = true")
    converge(machines[first["id"]], first["id"])
    page.wait_for_selector(f"[data-machine={first['name']}].done")
    page.wait_for_selector(f"[data-machine={following['name']}].updating")
    assert page.evaluate("window.__same_page") is True
    page.screenshot(path=str(shots / "ui-rollout.png"))

    page.click("#pause")
    page.wait_for_selector("#rollout-head .badge.paused")
    assert ui_fleet.reader.call("GET", "/v1/rollouts/current")["status"] == "paused"
    converge(machines[following["id"]], following["id"])
    assert machines[order[2]["id"]].config(order[2]["id"]).revision == second - 1
    page.wait_for_selector(f"[data-machine={following['name']}].done")
    assert page.is_enabled("#resume") and not page.is_enabled("#pause")
    page.screenshot(path=str(shots / "ui-rollout-paused.png"))

    page.click("text=Revisions")
    page.wait_for_function("document.querySelectorAll('#revisions tr').length === 2")
    page.click("text=Show diff")
    page.wait_for_selector("#diff .add")
    assert "+    net.ipv4.tcp_fin_timeout: 19" in page.inner_text("#diff")
    assert "tcp_fin_timeout: 19" in page.inner_text("#diff .add")

    page.click("text=Log out")
    page.wait_for_url(f"{ui_fleet.url}/ui/login")
    page.goto(f"{ui_fleet.url}/ui/rollout")
    assert page.url.endswith("/ui/login")


def test_a_reader_sees_but_cannot_act(ui_fleet: ThreadServer, browser: Any) -> None:
    fleet_of(ui_fleet, 2)
    ui_fleet.admin.push_document(DOC.format(value=18).encode())
    page = new_page(browser)
    login(page, ui_fleet, ui_fleet.reader_token)
    page.goto(f"{ui_fleet.url}/ui/rollout")
    page.wait_for_selector("#waves .wave")
    assert not page.is_visible("#rollout-actions")
    csrf = page.get_attribute("meta[name=csrf-token]", "content")
    status = page.evaluate("""async (csrf) => (await fetch('/v1/rollouts/current/pause',
        {method: 'POST', headers: {'X-CSRF-Token': csrf}})).status""", csrf)
    assert status == 403
    assert ui_fleet.reader.call("GET", "/v1/rollouts/current")["status"] == "running"


def test_a_session_cookie_alone_cannot_act_without_the_csrf_token(ui_fleet: ThreadServer,
                                                                 browser: Any) -> None:
    fleet_of(ui_fleet, 2)
    ui_fleet.admin.push_document(DOC.format(value=17).encode())
    page = new_page(browser)
    login(page, ui_fleet, ui_fleet.admin_token)
    status = page.evaluate("""async () => (await fetch('/v1/rollouts/current/pause',
        {method: 'POST'})).status""")
    assert status == 403
    # revoking the token ends its sessions
    token_id = ui_fleet.admin_token.split("_")[1]
    from divingbell.fleet.db import Database
    from divingbell.fleet.tokens import revoke_token

    page.goto("about:blank")  # no polling page left to redirect itself meanwhile
    db = Database(ui_fleet.settings.db_url)
    revoke_token(db, token_id)
    db.dispose()
    page.goto(f"{ui_fleet.url}/ui/machines")
    assert page.url.endswith("/ui/login")


def test_no_asset_comes_from_outside_the_service(ui_fleet: ThreadServer, browser: Any) -> None:
    page = new_page(browser)
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    login(page, ui_fleet, ui_fleet.reader_token)
    for path in ("/ui", "/ui/machines", "/ui/rollout", "/ui/revisions"):
        page.goto(f"{ui_fleet.url}{path}")
        wait_for(lambda: "updated" in page.inner_text("#status-line")
                 or "refresh" in page.inner_text("#status-line"), timeout=15)
    assert requested and all(url.startswith(ui_fleet.url) for url in requested), requested



def test_the_machine_pages_show_every_page_of_a_large_fleet(ui_fleet: ThreadServer,
                                                            browser: Any) -> None:
    """More machines than the UI asks for at once (1000): it follows the `next` cursor."""
    count = 1205
    seed_machines(ui_fleet.settings.db_url, [f"m{n:05d}" for n in range(count)],
                  datetime(2020, 1, 1))
    page = new_page(browser)
    login(page, ui_fleet, ui_fleet.reader_token)
    page.wait_for_function(
        f"document.getElementById('machine-count').textContent === '{count}'")
    page.goto(f"{ui_fleet.url}/ui/machines")
    page.wait_for_function(
        f"document.getElementById('machine-total').textContent === '{count} of {count}'")
    assert page.locator("#machines tbody tr").count() == count
