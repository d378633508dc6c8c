"""Read-only HTTP views of a running daemon: /healthz, /readyz, /metrics, /status, /api/status.

Served on loopback unless configured otherwise. An optional bearer token protects all but /healthz.
"""

from __future__ import annotations

import hmac
import ipaddress
import time
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from mirrord import metrics
from mirrord.clients.errors import UpstreamError
from mirrord.store.models import Annotation, Experiment, utcnow
from mirrord.ui import page
from mirrord.ui.summary import refresh_item_gauges, summary

if TYPE_CHECKING:
    from mirrord.daemon import Mirrord

log = structlog.get_logger("mirrord.web")
MIRRORD_KEY = web.AppKey("mirrord", object)
STARTED_KEY = web.AppKey("started", float)
TOKEN_KEY = web.AppKey("token", str)


@web.middleware
async def _auth(request: web.Request, handler):
    token = request.app[TOKEN_KEY]
    if token and request.path != "/healthz":
        supplied = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(supplied.encode(), token.encode()):
            raise web.HTTPUnauthorized(text='{"error": "bearer token required"}', content_type="application/json")
    return await handler(request)


def make_app(app_state: Mirrord, *, token: str | None = None) -> web.Application:
    app = web.Application(middlewares=[_auth])
    app[TOKEN_KEY] = token or ""
    app[MIRRORD_KEY] = app_state
    app[STARTED_KEY] = time.monotonic()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_view)
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
        window = 3 * (section.interval if not section.cron else 3600)
        if health.failing_since is not None:
            problems.append(f"{name}: failing since {health.failing_since.isoformat(timespec='seconds')}: "
                            f"{health.last_error}")
        elif not health.started:
            problems.append(f"{name}: starting")
        elif health.last_success is None:
            if uptime > window:
                problems.append(f"{name}: no successful run since start")
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
    return web.Response(text=page.render_html(await _summary_for(request)), content_type="text/html")


class WebServer:
    def __init__(self, app: web.Application, host: str, port: int) -> None:
        self.app, self.host, self.port = app, host, port
        self._runner: web.AppRunner | None = None

    async def start(self) -> str:
        if not _is_loopback(self.host) and not self.app.get(TOKEN_KEY):
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


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
