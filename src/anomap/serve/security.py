"""Response headers for the service and the offline API docs page.

The web page and its static files get a strict Content-Security-Policy (same-origin scripts, styles and
requests; images also from data:/blob: URLs, which is how overlays and local previews are shown). Every
response gets ``nosniff`` and ``no-referrer``. The docs page at ``/docs`` uses Swagger UI files from the
``fastapi-offline`` package when it is installed (no CDN, works without a network) and FastAPI's default
page otherwise.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

PAGE_CSP = ("default-src 'self'; img-src 'self' data: blob:; script-src 'self'; style-src 'self'; "
            "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
DOCS_ASSETS = "/docs-assets"


class SecurityHeaders:
    """Pure ASGI middleware adding the headers above (it never buffers bodies)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        page = path == "/" or path.startswith("/static/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((b"x-content-type-options", b"nosniff"))
                headers.append((b"referrer-policy", b"no-referrer"))
                if page:
                    headers.append((b"content-security-policy", PAGE_CSP.encode()))
                    headers.append((b"x-frame-options", b"DENY"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _offline_assets() -> Path | None:
    try:
        import fastapi_offline
    except ImportError:
        return None
    folder = Path(fastapi_offline.__file__).parent / "static"
    return folder if (folder / "swagger-ui-bundle.js").is_file() else None


def docs_routes(app: FastAPI) -> None:
    """Serve Swagger UI at ``/docs`` for ``app.openapi_url``, from local files when available."""
    assets = _offline_assets()
    if assets is not None:
        app.mount(DOCS_ASSETS, StaticFiles(directory=assets), name="docs-assets")
    # without local assets FastAPI's defaults (a CDN) are used: the page needs a network then
    js, css = f"{DOCS_ASSETS}/swagger-ui-bundle.js", f"{DOCS_ASSETS}/swagger-ui.css"
    icon = f"{DOCS_ASSETS}/favicon.png"

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        url, title = app.openapi_url or "/openapi.json", "anomap API"
        if assets is None:
            return get_swagger_ui_html(openapi_url=url, title=title)
        return get_swagger_ui_html(openapi_url=url, title=title, swagger_js_url=js, swagger_css_url=css,
                                   swagger_favicon_url=icon)
