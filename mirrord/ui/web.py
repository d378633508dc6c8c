"""HTTP views of a running daemon: /healthz, /readyz, /metrics, /status, /api/status, /item/<kind>/<ref>.

Served on loopback unless configured otherwise. An optional token protects all but /healthz and /login:
scripts and probes send it as `Authorization: Bearer`; a browser signs in once at /login, which sets an
HttpOnly, SameSite=Strict cookie holding an HMAC of the token (never the token itself).
"""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from mirrord import __version__, metrics
from mirrord.clients.errors import UpstreamError
from mirrord.config import is_loopback
from mirrord.store.models import Annotation, Experiment, utcnow
from mirrord.ui import page
from mirrord.ui.summary import refresh_item_gauges, summary

if TYPE_CHECKING:
    from mirrord.daemon import Mirrord

log = structlog.get_logger("mirrord.web")
MIRRORD_KEY = web.AppKey("mirrord", object)
STARTED_KEY = web.AppKey("started", float)
TOKEN_KEY = web.AppKey("token", str)


SESSION_COOKIE = "mirrord_session"
OPEN_PATHS = {"/healthz", "/login"}


def session_value(token: str) -> str:
    """The cookie a signed-in browser holds: derived from the token, so a new token signs everyone out."""
    return hmac.new(token.encode(), b"mirrord status page session", hashlib.sha256).hexdigest()


def _authorised(request: web.Request, token: str) -> bool:
    bearer = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
    cookie = request.cookies.get(SESSION_COOKIE, "")
    return (hmac.compare_digest(bearer.encode(), token.encode())
            or hmac.compare_digest(cookie.encode(), session_value(token).encode()))


@web.middleware
async def _auth(request: web.Request, handler):
    token = request.app[TOKEN_KEY]
    if token and request.path not in OPEN_PATHS and not _authorised(request, token):
        if request.method == "GET" and "text/html" in request.headers.get("Accept", ""):
            raise web.HTTPSeeOther(location=f"/login?{urlencode({'next': request.path_qs})}")
        raise web.HTTPUnauthorized(text='{"error": "token required: Authorization: Bearer <token>"}',
                                   content_type="application/json")
    return await handler(request)


async def home(request: web.Request) -> web.Response:
    raise web.HTTPSeeOther(location="/status")


async def login_form(request: web.Request) -> web.Response:
    return web.Response(text=page.render_login(_next(request.query.get("next"))), content_type="text/html")


async def login(request: web.Request) -> web.Response:
    form = await request.post()
    token, target = request.app[TOKEN_KEY], _next(str(form.get("next", "")))
    if not token:
        raise web.HTTPSeeOther(location=target)
    if not hmac.compare_digest(str(form.get("token", "")).encode(), token.encode()):
        log.warning("web.login_refused", peer=request.remote)
        return web.Response(text=page.render_login(target, refused=True), content_type="text/html", status=401)
    response = web.HTTPSeeOther(location=target)
    response.set_cookie(SESSION_COOKIE, session_value(token), httponly=True, samesite="Strict", path="/",
                        secure=request.secure, max_age=30 * 86400)
    raise response


async def logout(request: web.Request) -> web.Response:
    response = web.HTTPSeeOther(location="/login")
    response.del_cookie(SESSION_COOKIE, path="/")
    raise response


def _next(value: str | None) -> str:
    """Where to go after signing in: a path on this server only (never another site). Browsers read a
    backslash as a slash and drop tabs and newlines, so `/\\host` and `/<tab>/host` mean `//host`."""
    if value and value.startswith("/") and value[1:2] not in ("/", "\\") and value.isprintable():
        return value
    return "/status"


def make_app(app_state: Mirrord, *, token: str | None = None) -> web.Application:
    app = web.Application(middlewares=[_auth])
    app[TOKEN_KEY] = token or ""
    app[MIRRORD_KEY] = app_state
    app[STARTED_KEY] = time.monotonic()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_view)
    app.router.add_get("/", home)
    app.router.add_get("/login", login_form)
    app.router.add_post("/login", login)
    app.router.add_post("/logout", logout)
    app.router.add_get("/item/{kind}/{ref}", item_html)
    app.router.add_get("/status", status_html)
    app.router.add_get("/api/status", status_json)
    app.router.add_post("/designhub/open/{annotation_id:\\d+}", open_in_designhub)
    return app


async def healthz(request: web.Request) -> web.Response:
    # Answering at all proves the loop runs; the scheduler's ticks are covered by /readyz.
    return web.json_response({"status": "ok"})


async def readiness(app_state: Mirrord, uptime: float) -> list[str]:
    """Reasons the daemon is not ready; empty when it is. Each names the job and says why."""
    problems = []
    try:
        async with app_state.store.read() as session:
            await session.execute(text("SELECT 1"))
    except Exception as exc:  # any database failure means not ready
        problems.append(f"store unreachable: {type(exc).__name__}")
    now = utcnow()
    for name, health in app_state.runner.health.items():
        section = app_state.config.jobs()[name]
        window = 3 * section.period
        if health.failing_since is not None:
            problems.append(f"{name}: failing since {health.failing_since.isoformat(timespec='seconds')}: "
                            f"{health.last_error}")
        elif health.last_success is None:  # a start that passed is no success yet
            problems.append(f"{name}: no successful run since start" if uptime > window else f"{name}: starting")
        elif (now - health.last_success).total_seconds() > window:
            problems.append(f"{name}: last success {health.last_success.isoformat()} (no run since)")
    return problems


async def readyz(request: web.Request) -> web.Response:
    problems = await readiness(request.app[MIRRORD_KEY], time.monotonic() - request.app[STARTED_KEY])
    if problems:
        return web.json_response({"status": "not ready", "reasons": problems}, status=503)
    return web.json_response({"status": "ready"})


async def metrics_view(request: web.Request) -> web.Response:
    await refresh_item_gauges(request.app[MIRRORD_KEY].store)
    return web.Response(body=generate_latest(metrics.REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})


# -- status views --------------------------------------------------------------------------------------
async def open_in_designhub(request: web.Request) -> web.StreamResponse:
    """Post the ligand's structure to Design Hub and send the browser to the page it makes.

    Design Hub's link lives five minutes, so it is made on each click and never stored.
    """
    from mirrord.jobs.designhub import open_in_designhub_url
    app_state = request.app[MIRRORD_KEY]
    if not app_state.config.designhub.enabled:
        raise web.HTTPNotFound(text="Design Hub is not configured")
    async with app_state.store.read() as session:
        annotation = await session.get(Annotation, int(request.match_info["annotation_id"]))
        experiment = await session.get(Experiment, annotation.experiment_id) if annotation else None
    if experiment is None or not experiment.smiles:
        raise web.HTTPNotFound(text="no ligand structure for that item")
    try:
        url = await open_in_designhub_url(app_state.config, experiment.smiles)
    except UpstreamError as exc:
        raise web.HTTPBadGateway(text=f"Design Hub refused the structure: {exc}") from None
    raise web.HTTPSeeOther(location=url)


async def _summary_for(request: web.Request) -> dict[str, Any]:
    state = request.app[MIRRORD_KEY]
    runner = getattr(state, "runner", None)
    return await summary(state.store, health=runner.health if runner is not None else None,
                         instance=getattr(state, "instance", None))


async def status_json(request: web.Request) -> web.Response:
    return web.json_response(await _summary_for(request))


async def status_html(request: web.Request) -> web.Response:
    app_state = request.app[MIRRORD_KEY]
    about = page.About(version=__version__, uptime=time.monotonic() - request.app[STARTED_KEY],
                       upstreams={name: section.url for name, section in app_state.config.jobs().items()
                                  if section.enabled},
                       signed_in=bool(request.app[TOKEN_KEY]) and SESSION_COOKIE in request.cookies)
    return web.Response(text=page.render_html(await _summary_for(request), about), content_type="text/html")


async def item_html(request: web.Request) -> web.Response:
    """One item's lineage and history, as `mirrord show` prints it, with its full error text."""
    from mirrord.ui.actions import InspectError, lineage

    kind, ref = request.match_info["kind"], request.match_info["ref"]
    try:
        found = await lineage(request.app[MIRRORD_KEY].store, kind, ref)
    except InspectError as exc:
        raise web.HTTPNotFound(text=str(exc)) from None
    return web.Response(text=page.render_lineage(found), content_type="text/html")


class WebServer:
    def __init__(self, app: web.Application, host: str, port: int) -> None:
        self.app, self.host, self.port = app, host, port
        self._runner: web.AppRunner | None = None

    async def start(self) -> str:
        if not is_loopback(self.host) and not self.app.get(TOKEN_KEY):
            log.warning("web.unprotected", listen=self.host,
                        problem="listening beyond loopback without [web] token: anyone who can reach "
                                "this port reads the status page")
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return f"http://{self.host}:{self.port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
