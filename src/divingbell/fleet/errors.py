"""The one error type routes raise: a status and a JSON `detail` naming what is wrong."""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    def __init__(self, status: int, detail: Any, headers: dict[str, str] | None = None) -> None:
        super().__init__(str(detail))
        self.status = status
        self.detail = detail
        self.headers = headers or {}


def not_found(what: str, ident: object) -> ApiError:
    return ApiError(404, {"error": "not-found", "message": f"no {what} {ident}"})
