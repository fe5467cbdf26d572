"""The review page: the static bundle ``make viewer`` builds (viewer/ → services/review_ui/), at ``/review/ui/``.

The page is code, not data: its three files (``SHELL_FILES``) are served without a credential,
so that a browser can open the page at all (a browser sends no ``Authorization`` header when it
navigates). Everything the page then shows or changes — the queue, a case's scan and label map,
``POST /feedback`` — goes through the review API, which authenticates every request like the
rest of the service (services/auth.py): the page asks the reviewer for an API key or an OIDC
token once, keeps it in the tab's ``sessionStorage`` and sends it as ``Authorization: Bearer``.
A header (never a cookie) also means another site cannot make the reviewer's browser approve
anything (no CSRF), and the Content-Security-Policy below lets the page talk to this origin only.

Only the listed files are served (no directory listing, no path from the request reaches the
file system). ``mount(service)`` adds the page to the BentoML service as a Starlette app at
``/review``; Starlette apps mounted by BentoML match only their own routes, so the review API
mounted at the same prefix keeps its routes.
"""

from __future__ import annotations

from pathlib import Path

BUNDLE = Path(__file__).resolve().parent / "review_ui"
PREFIX = "/review"
PAGE = "/ui/"
# file name -> media type: the whole page (viewer/build.mjs writes exactly these)
SHELL_FILES = {"index.html": "text/html; charset=utf-8", "review.js": "text/javascript; charset=utf-8",
               "review.css": "text/css; charset=utf-8"}
# the paths the authentication middleware lets through without a credential (services/settings.py)
SHELL_PATHS = (f"{PREFIX}/ui", f"{PREFIX}{PAGE}") + tuple(f"{PREFIX}{PAGE}{f}" for f in SHELL_FILES)

# the page may talk to its own origin only; NiiVue keeps decoded volumes in blob: URLs and draws
# its font from a data: image; no inline script, no framing (the approve button cannot be clickjacked)
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
       "connect-src 'self' blob: data:; worker-src 'self' blob:; object-src 'none'; base-uri 'none'; "
       "frame-ancestors 'none'; form-action 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "Cache-Control": "no-cache"}


def built() -> bool:
    return all((BUNDLE / f).is_file() for f in SHELL_FILES)


def ui_app():
    """The Starlette app serving the page's files (``GET /ui/`` and its files; ``/ui`` redirects)."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.gzip import GZipMiddleware
    from starlette.responses import FileResponse, JSONResponse, RedirectResponse
    from starlette.routing import Route

    def serve(name: str):
        async def endpoint(request):
            path = BUNDLE / name
            if not path.is_file():
                return JSONResponse({"error": f"the review page is not built ({path} is missing): run `make viewer`"},
                                    status_code=503)
            return FileResponse(path, media_type=SHELL_FILES[name], headers=HEADERS)
        return endpoint

    async def to_page(request):
        return RedirectResponse(url=f"{request.url.path}/", status_code=308)

    routes = [Route("/ui", to_page, methods=["GET", "HEAD"]),
              Route(PAGE, serve("index.html"), methods=["GET", "HEAD"])]
    routes += [Route(f"{PAGE}{name}", serve(name), methods=["GET", "HEAD"]) for name in SHELL_FILES]
    # the bundle is 2.3 MB, 0.8 MB gzipped
    return Starlette(routes=routes, middleware=[Middleware(GZipMiddleware, minimum_size=1024)])


def mount(service) -> None:
    """Add the page to a BentoML service class (``Segmentation``) at ``/review/ui/``."""
    service.mount_asgi_app(ui_app(), path=PREFIX, name="review-page")
