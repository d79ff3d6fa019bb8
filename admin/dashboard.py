"""The operator dashboard at the admin listener's ``/``: three static files, no build step.

The page is one more client of the admin API, like the CLI: an overview of every service
(``GET /services``, ``GET /events``) and one view per service, chosen by the URL's hash
(``/#/services/shop``: ``GET /services/shop/status``, ``.../events``, ``.../history``),
sending the same JSON ``POST``\\s with an ``Authorization: Bearer`` header. Only ``/`` and
the static files are served: the hash never reaches the server. The files themselves
are public (a browser cannot attach a bearer header to a navigation) because they hold
no state; every byte of state comes from the API, which
keeps its own auth and origin checks. Nothing is fetched from a CDN, so the dashboard
works on an air-gapped admin network.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

STATIC_DIR = Path(__file__).with_name("static")

# URL path -> (file in admin/static/, content type). Exact paths, no directory serving:
# nothing else under admin/ can leak through a crafted path.
_FILES: dict[str, tuple[str, str]] = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/style.css": ("style.css", "text/css; charset=utf-8"),
}
DASHBOARD_PATHS = frozenset(_FILES)

# The page runs only its own script and talks only to its own origin: an injected
# event reason can neither run code nor send the token elsewhere. frame-ancestors
# stops a hostile page from framing the switch buttons (clickjacking).
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    # Always revalidate: after an upgrade the page must not run a stale app.js.
    "Cache-Control": "no-cache",
}


Handler = Callable[[web.Request], Awaitable[web.Response]]


def _static_handler(body: bytes, content_type: str) -> Handler:
    headers = {**_HEADERS, "Content-Type": content_type}

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=body, headers=headers)

    return handler


def add_dashboard(app: web.Application, static_dir: Path = STATIC_DIR) -> None:
    """Register the dashboard's routes on the admin app; files are read once, here."""
    for path, (name, content_type) in _FILES.items():
        body = (static_dir / name).read_bytes()
        app.router.add_get(path, _static_handler(body, content_type))
