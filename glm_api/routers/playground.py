"""The web playground: ``/`` serves the page, ``/static/<version>/...`` its files (``glm_api/static``).

The page is a browser client of the public ``/v1`` API like any other; nothing here touches the
engines. Both the page and its files are public (they hold no secrets): with API keys set, the
page asks the user for one and sends it on its own ``/v1`` calls.

- **Caching.** Static files live under a URL that names a hash of their content, so they are
  cached for a year (``immutable``); the page itself is revalidated on every load and points at
  the current hash.
- **Compression.** Only this static mount is wrapped in gzip; API responses, and streamed (SSE)
  ones above all, never pass through a compressor. The page is compressed once, at start-up.
- **Content-Security-Policy.** Scripts, styles, images and connections from this origin only;
  no inline script or style, no frames, no form posts, no ``<base>``.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path
from types import SimpleNamespace

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response
from starlette.middleware.gzip import GZipMiddleware
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
PAGE = "index.html"
STATIC_PREFIX = "/static/"

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "manifest-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

#: Sent with the page and with every static file.
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
}

#: Paths the API-key check lets through when the playground is on (exact paths, then prefixes).
PUBLIC_PATHS = frozenset({"/"})
PUBLIC_PREFIXES = (STATIC_PREFIX,)


def static_version(directory: Path = STATIC_DIR) -> str:
    """A short hash of every file's path and content: it changes whenever any file does."""
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(path.relative_to(directory).as_posix().encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


#: What /metrics labels static-file requests with (a mount leaves no route in the scope).
STATIC_ROUTE = SimpleNamespace(path=f"{STATIC_PREFIX}{{path}}")


class ImmutableStaticFiles(StaticFiles):
    """Starlette's StaticFiles with a year of caching (the URL changes with the content) and the
    playground's security headers."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["route"] = STATIC_ROUTE
        await super().__call__(scope, receive, send)

    def file_response(self, full_path: str | os.PathLike[str], stat_result: os.stat_result, scope: Scope,
                      status_code: int = 200) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers["Cache-Control"] = "public, max-age=31536000, immutable"
        response.headers.update(SECURITY_HEADERS)
        return response


class _Page:
    """index.html with its asset URLs filled in, plain and gzipped, built once."""

    def __init__(self, asset_base: str) -> None:
        self.body = (STATIC_DIR / PAGE).read_text(encoding="utf-8").replace("{{static}}", asset_base).encode()
        self.gzipped = gzip.compress(self.body, compresslevel=9, mtime=0)

    def response(self, request: Request) -> Response:
        headers = {**SECURITY_HEADERS, "Cache-Control": "no-cache", "Vary": "Accept-Encoding"}
        if "gzip" in request.headers.get("accept-encoding", ""):
            headers["Content-Encoding"] = "gzip"
            return Response(self.gzipped, media_type="text/html; charset=utf-8", headers=headers)
        return Response(self.body, media_type="text/html; charset=utf-8", headers=headers)


def install(app: FastAPI) -> None:
    """Serve the page at ``/`` and its files under ``/static/<content hash>/``."""
    asset_base = f"{STATIC_PREFIX}{static_version()}"
    page = _Page(asset_base.lstrip("/"))  # relative URLs: the page also works under a proxy's prefix
    router = APIRouter(tags=["playground"], include_in_schema=False)

    @router.get("/")
    async def playground_page(request: Request) -> Response:
        return page.response(request)

    app.include_router(router)
    app.mount(asset_base, GZipMiddleware(ImmutableStaticFiles(directory=STATIC_DIR), minimum_size=512), name="playground-static")
