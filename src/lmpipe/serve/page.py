"""The chat page at `/`: one static HTML file with a little JavaScript (no build step, nothing to install), a
person's way to try the served model in a browser. It talks to the server through the same public API as any
client (`/v1/models`, `/health`, streamed `/v1/chat/completions`), so it needs no route of its own beyond this
one, and it holds no secret: with an API key set, the person types the key into the page.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

CHAT_PAGE = resources.files("lmpipe.serve") / "static" / "chat.html"
"""Shipped in the package (pyproject's package-data)."""

page_router = APIRouter()


@page_router.get("/", include_in_schema=False, response_class=HTMLResponse)
def chat_page() -> HTMLResponse:
    # Read per request (a plain def: in the threadpool): a few kB, and an edited page shows without a restart.
    return HTMLResponse(CHAT_PAGE.read_text(encoding="utf-8"), headers={"Cache-Control": "no-cache"})
