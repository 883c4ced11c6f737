"""The public start page: what this is, where the API and the dashboard are (dashboard.py has the
signed-in pages), without revealing anything about tenants."""

from __future__ import annotations

import html
from typing import TYPE_CHECKING

from .http import Request, Response

if TYPE_CHECKING:
    from .app import App, Principal


def page(title: str, body_html: str, status: int = 200) -> Response:
    doc = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>"
           f"<body><h1>{html.escape(title)}</h1>{body_html}</body></html>")
    return Response(status, doc.encode(), "text/html; charset=utf-8")


def register(app: App) -> None:
    @app.route("GET", "/", roles=None, summary="Start page")
    async def index(req: Request, p: Principal | None) -> Response:
        return page("ihb appliance",
                    "<p>Backup appliance. Agents use the API at <code>/api/v1/</code>; its description is "
                    "<a href='/api/v1/openapi.json'>/api/v1/openapi.json</a>.</p>"
                    "<p>Operators and customers: <a href='/ui/'>sign in to the dashboard</a>.</p>")
