"""Fragalysis client: who we are, which targets have new uploads, and building + downloading archives.

Follows the Fragalysis contract: trailing slashes everywhere, CSRF priming for cookie sessions,
never following redirects (a redirect to Keycloak means "log in again"), every page of every list,
both download protocols (synchronous `200 {file_url}` and asynchronous `202 {task_status_url}`),
and a format sniffed from magic bytes because the server calls every archive `application/zip`.
Older deployments (the recorded 2024-10 backend) have no `/api/user/`: identity then comes from the
landing page. Where task status is refused (anonymous callers, non-members), a build is awaited by
repeating the identical request, which answers `200 {file_url}` once the shared build is done.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import structlog
from yarl import URL

from mirrord.clients.errors import (
    AuthError,
    BadRequest,
    NotFound,
    ProtocolError,
    TransientError,
    UpstreamError,
)
from mirrord.clients.http import (
    USER_AGENT,
    HttpClient,
    Response,
    UpstreamClient,
    equal_jitter,
    parse_datetime,
)
from mirrord.redact import redact, register_secret

log = structlog.get_logger("mirrord.fragalysis")

SERVICE = "fragalysis"
LANDING_PATH = "viewer/react/landing/"
DOWNLOAD_PATH = "api/download_structures/"
# The server rejects clients that do not look like a browser; our own name rides along at the end.
BROWSER_USER_AGENT = ("Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
                      f"Chrome/120.0.0.0 Safari/537.36 {USER_AGENT}")
FILE_URL_PATTERN = re.compile(r"^/code/media/downloads/.*\.(tar\.gz|zip)$")
LOGIN_LOCATION = re.compile(r"(?i)keycloak|openid-connect|/oidc/|/auth/realms/|login")
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
# Build defaults as the server has them; `file_url` must be empty or the server skips the build.
DEFAULT_OPTIONS: dict[str, bool] = {
    "all_aligned_structures": True, "pdb_info": False, "cif_info": False, "mtz_info": False,
    "diff_file": False, "event_file": False, "sigmaa_file": False, "map_info": False,
    "single_sdf_file": False, "metadata_info": False, "trans_matrix_info": False, "static_link": False,
    "use_zip": False,
}
# What the mirror reads from every archive (fact 16 of the recordings: `metadata.csv` comes only with
# `metadata_info`): the aligned files hold the ligand and bound structures Design Hub evidence attaches,
# `metadata.csv` maps short observation codes (`x0001a`) to experiment and compound codes.
REQUIRED_OPTIONS: dict[str, bool] = {"all_aligned_structures": True, "metadata_info": True}
# The landing page's `DJANGO_CONTEXT`: the only "who am I" of backends without /api/user/ (recordings 003-006).
CONTEXT_FIELD = re.compile(r"\b(username|pk|authenticated):\s*('([^']*)'|\"([^\"]*)\"|[\w.-]+)")
MAGIC_FORMATS = ((b"\x1f\x8b", "tar.gz"), (b"PK\x03\x04", "zip"))


# -- typed results -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class FragalysisUser:
    user: str | None
    user_id: str | None
    authenticated: bool
    ping_ok: bool
    target_access: list[str]
    # True when read from the landing page (backends without /api/user/): no target access list then.
    from_landing_page: bool = False


@dataclass(frozen=True)
class TargetUpload:
    target_name: str
    tas: str
    target_id: int | None
    project_id: int | None
    last_upload_index: int
    last_upload_timestamp: dt.datetime  # aware, UTC


@dataclass(frozen=True)
class TargetInfo:
    id: int
    title: str
    display_name: str | None
    project_id: int | None


@dataclass(frozen=True)
class ProjectInfo:
    id: int
    tas: str
    open_to_public: bool | None


@dataclass(frozen=True)
class ExperimentInfo:
    id: int | None
    code: str
    pdb_code: str | None
    resolution: float | None
    data_collection_date: str | None
    space_group: str | None


@dataclass(frozen=True)
class DownloadedArchive:
    path: Path
    size: int
    sha256: str
    format: str  # "tar.gz" or "zip", from the magic bytes


@dataclass(frozen=True)
class _TaskOutcome:
    succeeded: bool
    messages: list[str]

    @property
    def reason(self) -> str:
        return self.messages[-1] if self.messages else "no reason given"


class FragalysisClient(UpstreamClient):
    """One Fragalysis stack, anonymous or with a `sessionid` or a Keycloak Bearer token."""

    def __init__(self, base_url: str, *, session_token: str | None = None, bearer_token: str | None = None,
                 poll_interval: float = 2.0, max_poll_interval: float = 30.0, build_timeout: float = 3600,
                 max_rebuilds: int = 3, http: HttpClient | Mapping[str, Any] | None = None) -> None:
        if session_token and bearer_token:
            raise ValueError("give a session token or a bearer token, not both")
        register_secret(session_token)
        register_secret(bearer_token)
        self.base_url = base_url.rstrip("/") + "/"
        self.poll_interval = poll_interval
        self.max_poll_interval = max_poll_interval
        self.build_timeout = build_timeout
        self.max_rebuilds = max_rebuilds
        self._session_token = session_token
        self._bearer_token = bearer_token
        self._csrf_primed = False
        self._user_endpoint_missing = False
        # Sent per request rather than as session defaults, so a shared HttpClient works too and
        # the token never goes to a `next` link on another host.
        self._headers = {"User-Agent": BROWSER_USER_AGENT}
        if bearer_token:
            self._headers["Authorization"] = f"Bearer {bearer_token}"
        super().__init__(SERVICE, self.base_url, http)

    def __repr__(self) -> str:
        return f"FragalysisClient(base_url={self.base_url!r}, auth={self.auth_kind!r})"

    @property
    def auth_kind(self) -> str:
        return "session" if self._session_token else "bearer" if self._bearer_token else "anonymous"

    # -- transport ---------------------------------------------------------------------------------
    def _ensure_session_cookie(self) -> None:
        if self._session_token:
            jar = self.http.session.cookie_jar
            if not any(c.key == "sessionid" for c in jar):
                jar.update_cookies({"sessionid": self._session_token}, response_url=URL(self.base_url))

    def _headers_for(self, path: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        headers = dict(self._headers)
        if not self.http.url(path).startswith(self.base_url):
            headers.pop("Authorization", None)
        return {**headers, **(extra or {})}

    async def _request(self, method: str, path: str, *, ok: tuple[int, ...] = (200,),
                       headers: Mapping[str, str] | None = None, **kwargs: Any) -> Response:
        """One request; a redirect is never followed: to a login page it means re-authentication."""
        self._ensure_session_cookie()
        response = await self.http.request(method, path, ok=ok + REDIRECT_STATUSES,
                                           headers=self._headers_for(path, headers), **kwargs)
        if response.status in REDIRECT_STATUSES:
            raise self._redirect_error(response.status, response.headers.get("Location", ""), response.url)
        return response

    def _redirect_error(self, status: int, location: str, url: str) -> UpstreamError:
        if not location or LOGIN_LOCATION.search(location):
            return AuthError(SERVICE, "re-authentication needed: redirected to a login page", status=status,
                             url=redact(url), detail=redact(location.split("?")[0]))
        return ProtocolError(SERVICE, "unexpected redirect (a missing trailing slash?)", status=status,
                             url=redact(url), detail=redact(location))

    async def _get_json(self, path: str, params: Mapping[str, Any] | None = None) -> Any:
        return (await self._request("GET", path, params=params)).json(SERVICE)

    async def _prime_csrf(self) -> None:
        """Fetch the landing page for a `csrftoken` cookie; tolerate the page failing."""
        try:
            await self._request("GET", LANDING_PATH, ok=(200,))
        except AuthError:
            raise
        except UpstreamError as exc:
            log.warning("fragalysis.csrf_priming_failed", error=str(exc))
        self._csrf_primed = True

    def _csrf_headers(self) -> dict[str, str]:
        jar = self.http.session.cookie_jar
        token = next((c.value for c in jar if c.key == "csrftoken"), None)
        headers = {"Referer": self.base_url + LANDING_PATH}
        if token:
            register_secret(token)
            headers["X-CSRFToken"] = token
        return headers

    async def _post(self, path: str, payload: Mapping[str, Any], *, ok: tuple[int, ...],
                    timeout: aiohttp.ClientTimeout | None = None) -> Response:
        """POST as JSON. Cookie sessions need CSRF; a 403 re-primes once (the cookie may have rotated)."""
        if not self._session_token:
            return await self._request("POST", path, json_body=dict(payload), ok=ok, retry=False, timeout=timeout)
        if not self._csrf_primed:
            await self._prime_csrf()
        try:
            return await self._request("POST", path, json_body=dict(payload), ok=ok, retry=False,
                                       timeout=timeout, headers=self._csrf_headers())
        except AuthError as exc:
            if exc.status != 403:
                raise
            log.info("fragalysis.csrf_retry", error=str(exc))
            await self._prime_csrf()
            return await self._request("POST", path, json_body=dict(payload), ok=ok, retry=False,
                                       timeout=timeout, headers=self._csrf_headers())

    # -- identity ----------------------------------------------------------------------------------
    async def user(self) -> FragalysisUser:
        """Who the server takes us for: `/api/user/`, or on backends without it the landing page."""
        try:
            body = await self._get_json("api/user/")
        except NotFound:
            return await self._user_from_landing_page()
        if not isinstance(body, dict):
            raise ProtocolError(SERVICE, "/api/user/ did not answer an object", detail=redact(str(body)[:200]))
        user = body.get("user")
        user_id = body.get("user_id")
        access = body.get("target_access")
        authenticated = bool(user) and user != "AnonymousUser" and user_id not in (None, "", "None")
        return FragalysisUser(
            user=str(user) if user is not None else None,
            user_id=str(user_id) if user_id is not None else None,
            authenticated=authenticated,
            ping_ok=body.get("ping") == "OK",
            target_access=[str(t) for t in access] if isinstance(access, list) else [],
        )

    async def _user_from_landing_page(self) -> FragalysisUser:
        """The 2024-10 backend answers /api/user/ with an HTML 404 (recordings 001, 002); its landing
        page names the user in `DJANGO_CONTEXT` (004, 005; `NOT_LOGGED_IN` when anonymous, 003, 006)."""
        if not self._user_endpoint_missing:
            self._user_endpoint_missing = True
            log.info("fragalysis.no_user_endpoint",
                     detail="this backend has no /api/user/: identity read from the landing page")
        response = await self._request("GET", LANDING_PATH)
        self._csrf_primed = True  # the same page primes the csrftoken cookie
        found = {m.group(1): m.group(3) if m.group(3) is not None else m.group(4) if m.group(4) is not None
                 else m.group(2) for m in CONTEXT_FIELD.finditer(response.text)}
        if "authenticated" not in found:
            raise ProtocolError(SERVICE, "neither /api/user/ nor a DJANGO_CONTEXT on the landing page",
                                detail=redact(response.text[:200]))
        authenticated = found["authenticated"] == "true"
        pk = found.get("pk")
        return FragalysisUser(user=found.get("username") if authenticated else None,
                              user_id=pk if authenticated and pk and pk.isdigit() else None,
                              authenticated=authenticated, ping_ok=True, target_access=[], from_landing_page=True)

    async def identity_problems(self, expected_tas: list[str], me: FragalysisUser | None = None) -> list[str]:
        """Sentences for a human: a token that silently became anonymous, missing TAS, a sick authenticator."""
        me = me or await self.user()
        problems = []
        if self.auth_kind != "anonymous" and not me.authenticated:
            problems.append(f"The configured Fragalysis {self.auth_kind} token is not accepted: the server treats "
                            "us as anonymous (expired or wrong token), so only open projects are visible.")
        if me.authenticated and not me.from_landing_page:
            # Open projects are visible to everyone without being in the user's list.
            visible = set(me.target_access) | {p.tas for p in await self.projects() if p.open_to_public}
            where = f"user {me.user}'s target access list"
        else:
            visible = {p.tas for p in await self.projects()}
            where = f"the projects user {me.user} can see" if me.authenticated else "the projects visible anonymously"
        for tas in expected_tas:
            if tas not in visible:
                problems.append(f"Target access string {tas} is not in {where}: its targets will not be mirrored.")
        if not me.ping_ok:
            problems.append("The Fragalysis authenticator cannot reach the proposal database (ping is not OK): "
                            "target access may be stale or incomplete.")
        return problems

    # -- lists -------------------------------------------------------------------------------------
    async def paginate(self, path: str, params: Mapping[str, Any] | None = None) -> AsyncIterator[dict]:
        """Every row of a DRF list, following the absolute `next` links verbatim until null."""
        page: Any = await self._get_json(path, params)
        seen: set[str] = set()
        while True:
            if isinstance(page, list):  # an unpaginated deployment answers the bare list
                rows, next_url = page, None
            elif isinstance(page, dict) and isinstance(page.get("results"), list):
                rows, next_url = page["results"], page.get("next")
            else:
                raise ProtocolError(SERVICE, f"{path} is not a paginated list", detail=redact(str(page)[:200]))
            for row in rows:
                if isinstance(row, dict):
                    yield row
            if not next_url:
                return
            if next_url in seen:
                raise ProtocolError(SERVICE, f"{path} pagination loops", detail=redact(next_url))
            seen.add(next_url)
            page = await self._get_json(next_url)

    async def _all(self, path: str, params: Mapping[str, Any] | None = None) -> list[dict]:
        return [row async for row in self.paginate(path, params)]

    async def targets(self) -> list[TargetInfo]:
        result = []
        for row in await self._all("api/targets/"):
            target_id, title = _int(row.get("id")), row.get("title")
            if target_id is None or not title:
                raise ProtocolError(SERVICE, "target without id or title", detail=redact(str(row)[:200]))
            result.append(TargetInfo(target_id, str(title), row.get("display_name"), _project_id(row)))
        return result

    async def projects(self) -> list[ProjectInfo]:
        result = []
        for row in await self._all("api/projects/"):
            project_id, tas = _int(row.get("id")), row.get("target_access_string")
            if project_id is None or not tas:
                raise ProtocolError(SERVICE, "project without id or target_access_string",
                                    detail=redact(str(row)[:200]))
            public = row.get("open_to_public")
            result.append(ProjectInfo(project_id, str(tas), public if isinstance(public, bool) else None))
        return result

    async def visible_targets(self) -> set[tuple[str, str]]:
        """(title, TAS) of every target we can see: one we cannot is simply absent (recording 021)."""
        tas_of = {p.id: p.tas for p in await self.projects()}
        return {(t.title, tas_of[t.project_id]) for t in await self.targets() if t.project_id in tas_of}

    async def experiments(self, target_id: int) -> list[ExperimentInfo]:
        result = []
        for row in await self._all("api/experiments/", {"target": target_id}):
            code = row.get("code")
            if not code:
                raise ProtocolError(SERVICE, "experiment without code", detail=redact(str(row)[:200]))
            result.append(ExperimentInfo(
                id=_int(row.get("id")), code=str(code), pdb_code=row.get("pdb_code") or None,
                resolution=_float(row.get("high_resolution", row.get("resolution"))),
                data_collection_date=row.get("data_collection_date"), space_group=row.get("space_group")))
        return result

    async def target_uploads(self) -> dict[tuple[str, str], TargetUpload]:
        """The newest upload per (target title, TAS). Older stacks' rows are mapped via targets/projects."""
        rows = await self._all("api/target_experiment_uploads/")
        titles: dict[int, str] | None = None
        tas_of: dict[int, str] | None = None
        if any(not row.get("target_name") or not row.get("proposal_number") for row in rows):
            titles = {t.id: t.title for t in await self.targets()}
            tas_of = {p.id: p.tas for p in await self.projects()}
        latest: dict[tuple[str, str], TargetUpload] = {}
        for row in rows:
            target_id, project_id = _int(row.get("target")), _project_id(row)
            name = row.get("target_name") or (titles or {}).get(target_id)
            tas = row.get("proposal_number") or (tas_of or {}).get(project_id)
            if not name or not tas:
                log.warning("fragalysis.upload_row_unmapped", target=target_id, project=project_id)
                continue
            version = _int(row.get("upload_version"))
            if version is None:
                raise ProtocolError(SERVICE, "upload row without an integer upload_version",
                                    detail=redact(str(row)[:200]))
            upload = TargetUpload(str(name), str(tas), target_id, project_id, version,
                                  _utc(row.get("commit_datetime"), row))
            current = latest.get((upload.target_name, upload.tas))
            if current is None or version > current.last_upload_index:
                latest[(upload.target_name, upload.tas)] = upload
        return latest

    # -- download builds ---------------------------------------------------------------------------
    def build_payload(self, target_name: str, tas: str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
        payload: dict[str, Any] = {"target_name": target_name, "target_access_string": tas, "proteins": "",
                                   **DEFAULT_OPTIONS, **dict(options or {}), **REQUIRED_OPTIONS}
        payload["file_url"] = ""  # a non-empty file_url turns the build request into a lookup
        return payload

    async def build_download(self, target_name: str, tas: str, options: Mapping[str, Any] | None = None) -> str:
        """Have the server build an archive; return its `file_url` (a server path)."""
        payload = self.build_payload(target_name, tas, options)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.build_timeout
        rebuilds = throttles = reposts = 0
        watch_task = True  # False once task_status refused us: then re-POSTing is how we wait
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TransientError(SERVICE, f"build of {target_name} ({tas}) did not finish in "
                                              f"{self.build_timeout:g} s")
            try:
                response = await self._post(DOWNLOAD_PATH, payload, ok=(200, 202), timeout=aiohttp.ClientTimeout(
                    total=remaining, connect=self.http.timeouts.connect))
            except TransientError as exc:
                if exc.status == 429:  # throttled: wait as told, it is not a failed build
                    throttles += 1
                    wait = exc.retry_after or self._backoff(throttles)
                    log.info("fragalysis.build_throttled", target=target_name, tas=tas, sleep=round(wait, 3))
                    await asyncio.sleep(min(wait, max(0.0, deadline - loop.time())))
                    continue
                # A synchronous build that died, or a lost connection.
                rebuilds = self._count_rebuild(rebuilds, target_name, tas, str(exc))
                await asyncio.sleep(self._backoff(rebuilds))
                continue
            except NotFound as exc:
                raise NotFound(SERVICE, _message(exc.detail) or "not found", status=404,
                               url=exc.url, detail=exc.detail) from None
            except BadRequest as exc:
                raise BadRequest(SERVICE, _message(exc.detail) or "request refused",
                                 status=exc.status, url=exc.url, detail=exc.detail) from None
            body = response.json(SERVICE)
            if not isinstance(body, dict):
                raise ProtocolError(SERVICE, "build answer is not an object", detail=redact(response.text[:200]))
            if response.status == 200:
                file_url = body.get("file_url")
                if not isinstance(file_url, str) or not file_url:
                    raise ProtocolError(SERVICE, "build answered 200 without file_url",
                                        detail=redact(response.text[:200]))
                return file_url
            task_url = body.get("task_status_url")
            if not isinstance(task_url, str) or not task_url:
                raise ProtocolError(SERVICE, "build answered 202 without task_status_url",
                                    detail=redact(response.text[:200]))
            outcome = await self._await_task(task_url, deadline) if watch_task else None
            if outcome is None:
                # Not allowed to watch the task (anonymous, or not a member of its proposal: recordings
                # 073, 077): builds are shared (fact 12), so the identical POST answers 200 once it is done.
                if watch_task:
                    watch_task = False
                    log.info("fragalysis.task_status_refused", target=target_name, tas=tas,
                             detail="waiting for the build by repeating the identical request")
                reposts += 1
                await asyncio.sleep(min(self._backoff(reposts), max(0.0, deadline - loop.time())))
                continue
            if outcome.succeeded:
                file_url = next((m for m in reversed(outcome.messages) if FILE_URL_PATTERN.match(m)), None)
                if file_url:
                    return file_url
                continue  # the identical payload is now answered 200 {file_url}
            rebuilds = self._count_rebuild(rebuilds, target_name, tas, outcome.reason)
            await asyncio.sleep(self._backoff(rebuilds))

    def _count_rebuild(self, rebuilds: int, target_name: str, tas: str, reason: str) -> int:
        rebuilds += 1
        log.warning("fragalysis.build_failed", target=target_name, tas=tas, attempt=rebuilds, reason=redact(reason))
        if rebuilds > self.max_rebuilds:
            raise TransientError(SERVICE, f"build of {target_name} ({tas}) failed {rebuilds} times",
                                 detail=redact(reason[:300]))
        return rebuilds

    def _backoff(self, attempt: int) -> float:
        """Doubling from poll_interval up to max_poll_interval, with equal jitter."""
        return equal_jitter(attempt, self.poll_interval, self.max_poll_interval)

    async def _await_task(self, task_url: str, deadline: float) -> _TaskOutcome | None:
        """Poll the task until it finishes; None when the server will not tell us (403).
        Noise (non-JSON, 404, 408, 5xx) means "not yet"."""
        loop = asyncio.get_running_loop()
        interval = self.poll_interval
        while True:
            try:
                body = await self._poll_once(task_url)
            except AuthError as exc:
                if exc.status != 403:
                    raise
                return None
            if isinstance(body, dict):
                status = str(body.get("status") or "").upper()
                messages = _messages(body.get("messages"))
                if status == "FAILED":
                    return _TaskOutcome(False, messages)
                if body.get("finished") is True:
                    return _TaskOutcome(status == "SUCCESS", messages or [f"finished with status {status}"])
            if loop.time() + interval > deadline:
                raise TransientError(SERVICE, "build did not finish before the deadline", url=redact(task_url))
            await asyncio.sleep(interval)
            interval = min(self.max_poll_interval, interval * 2)

    async def _poll_once(self, task_url: str) -> Any:
        try:
            return (await self._request("GET", task_url, retry=False)).json(SERVICE)
        except (TransientError, NotFound, ProtocolError) as exc:
            if isinstance(exc, ProtocolError) and exc.status in REDIRECT_STATUSES:
                raise
            log.debug("fragalysis.task_status_noise", error=str(exc))
            return None

    # -- downloads ---------------------------------------------------------------------------------
    async def download(self, file_url: str, dest: Path, progress: Callable[[int], None] | None = None,
                       max_bytes: int | None = None) -> DownloadedArchive:
        """Stream a built archive to `dest`. An expired build raises NotFound: build again."""
        self._ensure_session_cookie()
        try:
            result = await self.http.stream_to_file("GET", DOWNLOAD_PATH, dest, params={"file_url": file_url},
                                                    headers=self._headers_for(DOWNLOAD_PATH),
                                                    progress=progress, max_bytes=max_bytes)
        except NotFound as exc:
            raise NotFound(SERVICE, _message(exc.detail) or "file_url is not found",
                           status=404, url=exc.url, detail=exc.detail) from None
        except BadRequest as exc:
            if exc.status in REDIRECT_STATUSES:
                # stream_to_file keeps no Location; from this endpoint a redirect only ever means login.
                raise AuthError(SERVICE, "re-authentication needed: download redirected", status=exc.status,
                                url=exc.url) from None
            raise
        fmt = next((name for magic, name in MAGIC_FORMATS if result.head.startswith(magic)), None)
        if fmt is None:
            await asyncio.to_thread(dest.unlink, True)  # hostile or garbage: keep nothing
            raise ProtocolError(SERVICE, "downloaded file is neither tar.gz nor zip", url=redact(file_url),
                                detail=repr(result.head[:16]))
        return DownloadedArchive(result.path, result.size, result.sha256, fmt)

    async def fetch_archive(self, target_name: str, tas: str, options: Mapping[str, Any] | None, dest: Path,
                            progress: Callable[[int], None] | None = None) -> DownloadedArchive:
        """Build and download; when the file_url expired before the download, rebuild once."""
        file_url = await self.build_download(target_name, tas, options)
        try:
            return await self.download(file_url, dest, progress)
        except NotFound:
            log.info("fragalysis.file_url_expired", target=target_name, tas=tas)
        file_url = await self.build_download(target_name, tas, options)
        return await self.download(file_url, dest, progress)


# -- lenient field parsing ---------------------------------------------------------------------------
def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _float(value: Any) -> float | None:
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _project_id(row: Mapping[str, Any]) -> int | None:
    """`project` is an int on new stacks; older ones send `project_id` as a list or an object."""
    value = row.get("project", row.get("project_id"))
    if isinstance(value, list):
        value = value[0] if value else None
    if isinstance(value, dict):
        value = value.get("id")
    return _int(value)


def _utc(value: Any, row: Mapping[str, Any]) -> dt.datetime:
    when = parse_datetime(value)  # Django stores UTC: a naive value is UTC without its suffix
    if when is None:
        raise ProtocolError(SERVICE, "upload row with a bad commit_datetime", detail=redact(str(row)[:200]))
    return when


def _messages(value: Any) -> list[str]:
    if isinstance(value, list):
        return [str(m) for m in value]
    if isinstance(value, str) and value:
        return [value]
    return []


def _message(text: str) -> str | None:
    """The `message`/`error`/`detail` of an error body, if the body is JSON with one."""
    try:
        body = json.loads(text)
    except ValueError:
        return None
    if isinstance(body, dict):
        for key in ("message", "error", "detail"):
            if isinstance(body.get(key), str):
                return body[key]
    return None

