"""HTTP views of a running daemon: /healthz, /readyz, /metrics, /status, /api/status, /item/<kind>/<ref>.

Served on loopback unless configured otherwise. An optional token protects all but /healthz and /login:
scripts and probes send it as `Authorization: Bearer`; a browser signs in once at /login, which sets an
HttpOnly, SameSite=Strict cookie holding an HMAC of the token (never the token itself).

A person's decisions (approve, dismiss, hold...) are POSTs to /item/<kind>/<id>/<action> and
/job/<job>/<hold|resume>, taken only when a token is set: an open page never acts. A signed-in browser's
form carries a CSRF token; a script's bearer header is proof enough. Both go through ui/actions, as the
CLI does.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

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


def form_token(token: str) -> str:
    """The CSRF token every form of a signed-in page carries. Another site's page can neither read it
    nor derive it (it needs the web token), so a forged form is refused."""
    return hmac.new(token.encode(), b"mirrord form:" + session_value(token).encode(), hashlib.sha256).hexdigest()


def _by_bearer(request: web.Request, token: str) -> bool:
    bearer = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
    return bool(token) and hmac.compare_digest(bearer.encode(), token.encode())


def _signed_in(request: web.Request, token: str) -> bool:
    cookie = request.cookies.get(SESSION_COOKIE, "")
    return bool(token) and hmac.compare_digest(cookie.encode(), session_value(token).encode())


def _authorised(request: web.Request, token: str) -> bool:
    return _by_bearer(request, token) or _signed_in(request, token)


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
    app.router.add_post("/item/{kind}/{ref}/{action}", item_decision)
    app.router.add_post("/job/{job}/{action}", job_decision)
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


def _about(request: web.Request) -> page.About:
    """What the page says about the daemon and the person viewing it: whether its forms are offered."""
    app_state, token = request.app[MIRRORD_KEY], request.app[TOKEN_KEY]
    signed_in = _signed_in(request, token)
    return page.About(version=__version__, uptime=time.monotonic() - request.app[STARTED_KEY],
                      upstreams={name: section.url for name, section in app_state.config.jobs().items()
                                 if section.enabled},
                      signed_in=signed_in, form_token=form_token(token) if signed_in else "",
                      flash=_read_flash(request, token))


async def status_html(request: web.Request) -> web.Response:
    return web.Response(text=page.render_html(await _summary_for(request), _about(request)),
                        content_type="text/html")


async def item_html(request: web.Request) -> web.Response:
    """One item's lineage and history, as `mirrord show` prints it, with its full error text."""
    from mirrord.ui.actions import InspectError, lineage

    kind, ref = request.match_info["kind"], request.match_info["ref"]
    try:
        found = await lineage(request.app[MIRRORD_KEY].store, kind, ref)
    except InspectError as exc:
        raise web.HTTPNotFound(text=str(exc)) from None
    return web.Response(text=page.render_lineage(found, _about(request)), content_type="text/html")


# -- a person's decisions ------------------------------------------------------------------------------
async def item_decision(request: web.Request) -> web.Response:
    """One of the actions the item's page offers (its remedies), taken as the person typed it."""
    from mirrord.ui.actions import InspectError, lineage

    kind, ref, action = (request.match_info[k] for k in ("kind", "ref", "action"))
    form, by_script = await _decision_form(request)
    try:
        found = await lineage(request.app[MIRRORD_KEY].store, kind, ref)
    except InspectError as exc:
        raise web.HTTPNotFound(text=str(exc)) from None
    back = "../../../status" if form.get("back") == "status" else f"../{found.id}"
    return await _decided(request, by_script, back, form, lambda who: _decide_item(request, found, action, who))


async def job_decision(request: web.Request) -> web.Response:
    """Hold or resume a job's outgoing writes, from the Jobs table of /status."""
    from mirrord.ui import actions

    job, action = request.match_info["job"], request.match_info["action"]
    if action not in ("hold", "resume"):
        raise web.HTTPNotFound(text=f"a job is held or resumed, not {action!r}")
    form, by_script = await _decision_form(request)
    app_state = request.app[MIRRORD_KEY]
    return await _decided(request, by_script, "../../status", form,
                          lambda who: actions.take(app_state.store, app_state.config, action, "job", job, **who))


async def _decision_form(request: web.Request) -> tuple[Any, bool]:
    """The form of a person allowed to decide here: (its fields, whether a script sent it)."""
    token = request.app[TOKEN_KEY]
    if not token:
        raise web.HTTPForbidden(text="decisions are taken only with [web] token set: an open page never acts; "
                                     "use the mirrord commands on the host")
    form = await request.post()
    if _by_bearer(request, token):
        return form, True
    if not _signed_in(request, token) or not hmac.compare_digest(
            str(form.get("csrf", "")).encode(), form_token(token).encode()):
        log.warning("web.form_refused", peer=request.remote, path=request.path)
        raise web.HTTPForbidden(text="this form did not come from this status page (or the token changed): "
                                     "reload the page and try again")
    return form, False


async def _decided(request: web.Request, by_script: bool, back: str, form: Any, decide: Any) -> web.Response:
    """Take the decision; a script reads the outcome as JSON, a browser goes back to the page that shows it."""
    from mirrord.store.decisions import DecisionError
    from mirrord.ui.actions import InspectError

    who = {"actor": str(form.get("by", "")).strip(), "reason": str(form.get("reason", "")).strip()}
    try:
        if not who["actor"] or not who["reason"]:
            raise DecisionError("type your name and a reason: they are what the next person reads")
        done = await decide(who)
        ok, outcome = True, f"{_describe(done)}; recorded as decided by {who['actor']}; the next run acts on it"
    except (InspectError, DecisionError) as exc:
        ok, outcome = False, str(exc)
    log.info("web.decision", path=request.path, actor=who["actor"], ok=ok, outcome=outcome)
    if by_script:
        return web.json_response({"ok": ok, "outcome": outcome}, status=200 if ok else 409)
    raise web.HTTPSeeOther(location=f"{back}?{_flash_query(request.app[TOKEN_KEY], ok, outcome)}")


async def _decide_item(request: web.Request, found: Any, action: str, who: dict[str, str]) -> Any:
    """The ui/actions call behind each remedy; only the actions the item's remedies offer now."""
    from mirrord.ui import actions

    app_state = request.app[MIRRORD_KEY]
    if action not in found.actions:
        offered = ", ".join(found.actions) or "none"
        raise actions.InspectError(f"{found.kind} {found.id} is {found.state}: {action} does not apply to it now "
                                   f"(what applies: {offered})")
    return await actions.take(app_state.store, app_state.config, action, found.kind, str(found.id), **who)


def _describe(done: list[Any]) -> str:
    return "; ".join(d.describe() for d in done)


def _flash_query(token: str, ok: bool, text: str) -> str:
    """The outcome, for the page the browser goes back to; signed, so no link can make the page say
    something mirrord did not."""
    key = "done" if ok else "refused"
    return urlencode({key: text, "sig": _flash_sig(token, key, text)}, quote_via=quote)


def _flash_sig(token: str, key: str, text: str) -> str:
    return hmac.new(token.encode(), f"mirrord flash:{key}:{text}".encode(), hashlib.sha256).hexdigest()


def _read_flash(request: web.Request, token: str) -> page.Flash | None:
    for key in ("done", "refused"):
        text = request.query.get(key)
        if text and token and hmac.compare_digest(request.query.get("sig", "").encode(),
                                                  _flash_sig(token, key, text).encode()):
            return page.Flash(ok=key == "done", text=text)
    return None


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
