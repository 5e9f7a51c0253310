"""The login page (issue 22, finding 12): the same Content-Security-Policy and framing rule as
every other page, and no login CSRF (a page elsewhere posting its own token to /ui/login, so
the victim's browser works under the attacker's session). Real headless Chromium."""

from __future__ import annotations

from typing import Any

import httpx

from tests.fleet.servers import ThreadServer
from tests.fleet.test_ui import browser, login, new_page, ui_fleet

__all__ = ["browser", "ui_fleet"]  # fixtures, used by name

ATTACKER = "http://attacker.test"


def test_the_login_page_has_the_same_policy_as_every_page(ui_fleet: ThreadServer,
                                                          browser: Any) -> None:
    page = new_page(browser)
    login_headers = page.goto(f"{ui_fleet.url}/ui/login").headers
    login(page, ui_fleet, ui_fleet.reader_token)
    page_headers = page.goto(f"{ui_fleet.url}/ui").headers
    for name in ("content-security-policy", "x-content-type-options", "referrer-policy",
                 "cache-control"):
        assert login_headers.get(name) == page_headers[name], name
    assert "frame-ancestors 'none'" in login_headers["content-security-policy"]


def test_a_login_posted_from_another_site_is_refused(ui_fleet: ThreadServer,
                                                     browser: Any) -> None:
    context = browser.new_context()
    page = context.new_page()
    form = (f'<form id="f" method="post" action="{ui_fleet.url}/ui/login">'
            f'<input name="token" value="{ui_fleet.reader_token}"></form>'
            '<script>document.getElementById("f").submit()</script>')
    page.route(f"{ATTACKER}/**", lambda route: route.fulfill(
        status=200, content_type="text/html", body=form))
    with page.expect_response(f"{ui_fleet.url}/ui/login") as posted:
        page.goto(f"{ATTACKER}/")
    assert posted.value.status == 403
    assert not [c for c in context.cookies() if c["name"] == "divingbell_session"]
    context.close()


def test_a_login_without_the_pages_token_is_refused_and_with_it_works(
        ui_fleet: ThreadServer) -> None:
    bare = httpx.post(f"{ui_fleet.url}/ui/login", data={"token": ui_fleet.reader_token},
                      timeout=10)
    assert bare.status_code == 403 and "divingbell_session" not in bare.cookies
    foreign = httpx.post(f"{ui_fleet.url}/ui/login", data={"token": ui_fleet.reader_token},
                         headers={"Origin": ATTACKER}, timeout=10)
    assert foreign.status_code == 403
    with httpx.Client(base_url=ui_fleet.url, timeout=10) as client:
        form = client.get("/ui/login").text
        marker = 'name="login_csrf" value="'
        token = form[form.index(marker) + len(marker):].split('"', 1)[0]
        done = client.post("/ui/login", data={"token": ui_fleet.reader_token,
                                              "login_csrf": token},
                           headers={"Origin": ui_fleet.url})
        assert done.status_code == 303 and "divingbell_session" in done.cookies
        other_origin = client.post("/ui/login", data={"token": ui_fleet.reader_token,
                                                      "login_csrf": token},
                                   headers={"Origin": ATTACKER})
        assert other_origin.status_code == 403
