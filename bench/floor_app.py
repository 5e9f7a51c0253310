"""The floor for bench/fleet_load.py's CPU figures: an ASGI app that does nothing (reads the
body, answers 204), served by uvicorn with the service's loop and parser. What it costs per
request at a given rate on this machine is what any Python HTTP service pays before doing any
work: the wake-up, the socket, the parser, uvicorn's request cycle."""

from __future__ import annotations

from typing import Any


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False) and message["type"] == "http.request"
    await send({"type": "http.response.start", "status": 204, "headers": []})
    await send({"type": "http.response.body", "body": b""})
