"""The web page at ``GET /``: a chat playground for people who open the server in a browser.

The page is a few hand-written static files in ``webui/`` beside this module, served as they
are: no build step, and nothing fetched from the internet (an AutoDL box may have none). The
page talks to the server only through the guarded API (``/v1/chat/completions``,
``/v1/completions``, ``/stats``), so the page and its files themselves are open: a browser must
load them before the user can type a key. ``POST /`` (the tutorial's contract) is in app.py.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse

from openelm_server.serving.errors import ApiError

WEBUI_DIR = Path(__file__).resolve().parent / "webui"
ASSET_PREFIX = "/webui/"
# Every file the page loads, with its media type; nothing else under /webui/ is served.
ASSETS = {
    "app.js": "text/javascript; charset=utf-8",
    "markdown.js": "text/javascript; charset=utf-8",
    "sse.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
# A new version of the server must not run against an old cached script.
NO_CACHE = {"Cache-Control": "no-cache"}


def wants_html(accept: str) -> bool:
    """True when the client lists text/html, as a browser opening the address does; curl,
    requests and SDKs send */* or application/json and get the JSON description."""
    return any(item.split(";")[0].strip().lower() == "text/html" for item in accept.split(","))


def router(enabled: bool) -> APIRouter:
    routes = APIRouter(include_in_schema=False)

    @routes.get("/")
    async def landing(request: Request):
        if enabled and wants_html(request.headers.get("accept", "")):
            return FileResponse(
                WEBUI_DIR / "index.html", media_type="text/html; charset=utf-8", headers={**NO_CACHE, "Vary": "Accept"}
            )
        settings = request.app.state.settings
        description = {
            "name": "OpenELM server",
            "model": settings.model_name,
            "web_page": "open / in a browser" if enabled else "off (--no-webui)",
            "links": {"docs": "/docs", "models": "/v1/models", "health": "/health", "stats": "/stats"},
            "generate": 'POST / with {"prompt": ...}, or the OpenAI API under /v1',
        }
        return JSONResponse(description, headers={"Vary": "Accept"})

    if enabled:

        @routes.get(ASSET_PREFIX + "{name}")
        async def asset(name: str):
            if name not in ASSETS:
                raise ApiError(404, f"no such file of the web page: {name}")
            return FileResponse(WEBUI_DIR / name, media_type=ASSETS[name], headers=NO_CACHE)

    return routes
