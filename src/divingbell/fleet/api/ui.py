"""The operator's web UI at /ui: Jinja2 page shells and one small script that renders the JSON
API, all served by the service itself (no asset from the internet).

Logging in exchanges an admin or reader token for a session cookie (HttpOnly, SameSite=Strict,
Secure over TLS); the session is a row tied to the token, so revoking the token ends it. Reader
sessions see everything and can act on nothing; every action goes through the same API routes
(and their logs) as the CLI, with a CSRF token on top of the cookie.
"""

from __future__ import annotations

import hmac
import logging
import secrets
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path as FsPath
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Form, Path, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, select_autoescape

from divingbell.fleet.auth import (
    SESSION_COOKIE,
    TOKEN_PREFIX,
    Principal,
    hash_secret,
    parse_token,
    session_principal,
)
from divingbell.fleet.models import Token, UiSession, utcnow

log = logging.getLogger("divingbell.fleet.ui")
HERE = FsPath(__file__).resolve().parent.parent / "ui"
SESSION_HOURS = 12
router = APIRouter(include_in_schema=False)
templates = Environment(loader=FileSystemLoader(HERE / "templates"),
                        autoescape=select_autoescape(["html"]), auto_reload=False)
static = StaticFiles(directory=HERE / "static")
PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin"}
"""Every page, the login page included."""
LOGIN_COOKIE = "divingbell_login"
LOGIN_MINUTES = 60


def _page(request: Request, template: str, page: str, title: str, principal: Principal,
          data: dict[str, Any] | None = None) -> HTMLResponse:
    html = templates.get_template(template).render(
        page=page, title=title, role=principal.role, who=principal.id,
        csrf=getattr(request.state, "csrf", ""), url_prefix=request.scope.get("root_path", ""),
        data=data or {})
    return HTMLResponse(html, headers=PAGE_HEADERS)


def _who(request: Request) -> Principal | None:
    return session_principal(request)


def _login_redirect(request: Request) -> RedirectResponse:
    return RedirectResponse(f"{request.scope.get('root_path', '')}/ui/login", status_code=303)


@router.get("/ui/login", response_class=HTMLResponse)
def login_page(request: Request, error: Annotated[str, Query(max_length=200)] = ""
               ) -> HTMLResponse:
    return login_form(request, error)


def login_form(request: Request, error: str = "", status_code: int = 200) -> HTMLResponse:
    """The form carries a login token that must come back with the cookie set here (SameSite
    Strict, HttpOnly): a page elsewhere can post a form, but can neither read this token nor
    make the browser send the cookie, so it cannot log the browser in under its own token."""
    login_csrf = secrets.token_urlsafe(24)
    html = templates.get_template("login.html").render(
        error=error, url_prefix=request.scope.get("root_path", ""), login_csrf=login_csrf)
    response = HTMLResponse(html, status_code=status_code, headers=PAGE_HEADERS)
    response.set_cookie(LOGIN_COOKIE, login_csrf, max_age=LOGIN_MINUTES * 60, httponly=True,
                        samesite="strict", secure=request.url.scheme == "https",
                        path=f"{request.scope.get('root_path', '')}/ui/login")
    return response


def _same_origin(request: Request) -> bool:
    """A browser's Origin, when sent, names this service: the address the request came to, or
    the configured public URL (behind a proxy)."""
    origin = request.headers.get("origin")
    if origin is None:
        return True  # not from a browser form (browsers send Origin on every POST)
    netloc = urlsplit(origin).netloc
    public_url = request.app.state.settings.public_url
    return netloc != "" and (netloc == request.headers.get("host")
                             or (public_url is not None and netloc == urlsplit(public_url).netloc))


@router.post("/ui/login", response_model=None)
def login(request: Request, token: Annotated[str, Form(max_length=512)],
          login_csrf: Annotated[str, Form(max_length=128)] = ""
          ) -> HTMLResponse | RedirectResponse:
    expected = request.cookies.get(LOGIN_COOKIE, "")
    if not _same_origin(request) or not expected or not hmac.compare_digest(
            login_csrf.encode(), expected.encode()):
        log.info("ui login refused: not posted from this service's login page (origin %s)",
                 request.headers.get("origin", "none")[:100])
        return login_form(request, "This login did not come from this service's own login "
                          "page: log in here.", status_code=403)
    parsed = parse_token(token.strip())
    db = request.app.state.db
    failure = "That token is not valid (or has expired, or was revoked)."
    if parsed is None or parsed[0] != TOKEN_PREFIX:
        log.info("ui login refused: not an operator token")
        return login_form(request, failure)
    _, token_id, secret = parsed
    now = utcnow()
    with db.write() as session:
        row = session.get(Token, token_id)
        if (row is None or row.revoked_at is not None
                or (row.expires_at is not None and row.expires_at <= now)
                or not hmac.compare_digest(row.secret_hash, hash_secret(secret))):
            log.info("ui login refused for token %s", token_id)
            return login_form(request, failure)
        if row.role not in ("admin", "reader"):
            log.info("ui login refused for %s token %s", row.role, token_id)
            return login_form(request, "Log in with an admin or reader token.")
        session_id, session_secret = secrets.token_hex(8), secrets.token_urlsafe(32)
        session.add(UiSession(id=session_id, secret_hash=hash_secret(session_secret),
                              token_id=row.id, csrf=secrets.token_urlsafe(24), created_at=now,
                              expires_at=now + timedelta(hours=SESSION_HOURS)))
    log.info("ui login: token:%s (%s)", token_id, row.role)
    response = RedirectResponse(f"{request.scope.get('root_path', '')}/ui", status_code=303)
    response.delete_cookie(LOGIN_COOKIE, path=f"{request.scope.get('root_path', '')}/ui/login")
    response.set_cookie(SESSION_COOKIE, f"{session_id}_{session_secret}",
                        max_age=SESSION_HOURS * 3600, httponly=True, samesite="strict",
                        secure=request.url.scheme == "https", path="/")
    return response


@router.post("/ui/logout")
def logout(request: Request, csrf: Annotated[str, Form(max_length=128)] = "") -> Response:
    principal = _who(request)
    response = _login_redirect(request)
    response.delete_cookie(SESSION_COOKIE, path="/")
    session_id = getattr(request.state, "ui_session", None)
    if principal is not None and session_id and hmac.compare_digest(
            csrf, getattr(request.state, "csrf", "")):
        with request.app.state.db.write() as session:
            row = session.get(UiSession, session_id)
            if row is not None:
                session.delete(row)
        log.info("ui logout: %s", principal.label)
    return response


def _shell(request: Request, template: str, page: str, title: str,
           data: dict[str, Any] | None = None) -> Response:
    principal = _who(request)
    if principal is None:
        return _login_redirect(request)
    return _page(request, template, page, title, principal, data)


# Pages with nothing of their own in the URL (their scripts fetch the API): path -> the page
# (its template is <page>.html) and its title.
_PLAIN_PAGES = {
    "/ui": ("overview", "Overview"),
    "/ui/machines": ("machines", "Machines"),
    "/ui/rollout": ("rollout", "Rollout"),
    "/ui/revisions": ("revisions", "Revisions"),
}


def _plain_page(page: str, title: str) -> Callable[[Request], Response]:
    def show(request: Request) -> Response:
        return _shell(request, f"{page}.html", page, title)
    return show


for _path, (_name, _title) in _PLAIN_PAGES.items():
    router.add_api_route(_path, _plain_page(_name, _title), methods=["GET"], name=_name,
                         response_model=None)


@router.get("/ui/machines/{machine_id}", response_model=None)
def machine(request: Request, machine_id: Annotated[str, Path(max_length=64,
                                                              pattern=r"^[A-Za-z0-9_-]+$")]
            ) -> Response:
    return _shell(request, "machine.html", "machine", machine_id, {"machine": machine_id})


@router.get("/ui/revisions/diff", response_model=None)
def revision_diff(request: Request,
                  old: Annotated[int, Query(alias="from", ge=1, le=2**31 - 1)],
                  new: Annotated[int, Query(alias="to", ge=1, le=2**31 - 1)]) -> Response:
    return _shell(request, "diff.html", "diff", f"Revision {old} to {new}",
                  {"from": old, "to": new})


