"""A faithful Fragalysis emulator: the REST views mirrord reads, quirks included.

Two backend versions (`version=`):

- `"2024-10"`: what the recordings in `tests/data/recordings/fragalysis/` show of the 2024-10 staging
  backend: no `/api/user/` (HTML 404; the landing page's `DJANGO_CONTEXT` says who you are), upload
  rows with `id` and `status` `LOADING` but no `target_name`/`proposal_number`, experiments without
  `pdb_code`, short observation codes, synchronous builds answering `200 {file_url}` with a `.zip`
  whose members have no `./`, `README.pdf`, `metadata.csv` only with `metadata_info`.
- `"newer"` (the default): the contract's newer behaviour: `/api/user/`, `202 {task_status_url}`
  builds (or `protocol="sync"`), rows without `id`/`status` carrying `target_name`, experiments with
  `pdb_code`, `./`-prefixed tar.gz archives with `README.md`. The demo and the pipeline suites use it,
  as their deposits are linked through PDB codes the 2024-10 backend does not serve (fact 7).

Both share what the recordings show is not a version matter: a bad `sessionid` is silently anonymous,
CSRF failures are DRF JSON and Referer is not checked over http, paging ignores a bad `limit`,
`?target=` of an unknown id is `200 count 0` (non-numeric: 500), task status refuses anonymous callers,
the download GET is not access-checked, 301 for a missing trailing slash. The emulator keeps its extra
powers: faults, 429 throttling, failing and expiring builds, hostile archives, a growing campaign.
Its data is a synthetic `Campaign`, or (`from_seed`) the recordings' `seed.json`.

Archives are written to temporary files, never held in memory, so a benchmark can ask for a
gigabyte of incompressible padding.
"""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
import json
import random
import re
import secrets
import shutil
import tarfile
import tempfile
import time
import uuid
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from aiohttp import web

from mirrord.emulators.base import Faults, make_app
from mirrord.emulators.campaign import Campaign, Experiment, Target, pdb_text, sdf_text

V2024 = "2024-10"
NEWER = "newer"
KEYCLOAK_AUTH_URL = "https://keycloak.example/auth/realms/xchem/protocol/openid-connect/auth"
RECORDED_PAGE_SIZE = 5000  # DRF PAGE_SIZE of the recorded backend (fact 5)
# Django's pages with DEBUG off (recordings 001, 032).
NOT_FOUND_HTML = ("\n<!doctype html>\n<html lang=\"en\">\n<head>\n  <title>Not Found</title>\n</head>\n<body>\n"
                  "  <h1>Not Found</h1><p>The requested resource was not found on this server.</p>\n</body>\n"
                  "</html>\n")
SERVER_ERROR_HTML = ("\n<!doctype html>\n<html lang=\"en\">\n<head>\n  <title>Server Error (500)</title>\n"
                     "</head>\n<body>\n  <h1>Server Error (500)</h1><p></p>\n</body>\n</html>\n")
DOWNLOADS_PREFIX = "/code/media/downloads/"
LANDING_PATH = "/viewer/react/landing/"
ANONYMOUS = "AnonymousUser"
CHUNK = 1024 * 1024

# Download flags with their server-side defaults (the contract's list).
DOWNLOAD_FLAGS: dict[str, bool] = {
    "all_aligned_structures": True, "pdb_info": False, "cif_info": False, "mtz_info": False,
    "diff_file": False, "event_file": False, "sigmaa_file": False, "map_info": False,
    "single_sdf_file": False, "metadata_info": False, "trans_matrix_info": False, "static_link": False,
    "use_zip": False, "compound_sets": False, "soakdb_files": False,
}
TRANSFORM_FILES = ("neighbourhood_transforms.yaml", "conformer_site_transforms.yaml",
                   "reference_structure_transforms.yaml")
@dataclass
class UserSession:
    token: str
    user: str
    user_id: str
    tas: list[str]
    expired: bool = False


SESSION_KEY = web.RequestKey("fragalysis_session", UserSession | None)


@dataclass
class Build:
    """One archive build, keyed by everything that determines its content."""

    key: tuple
    task_id: str
    target: Target
    upload_index: int
    flags: dict[str, bool]
    proteins: list[str]
    status: str = "UNKNOWN"
    started: bool = False
    finished: bool = False
    messages: list[str] = field(default_factory=list)
    file_url: str | None = None
    path: Path | None = None
    finished_at: float | None = None

    @property
    def in_flight(self) -> bool:
        return not self.finished


class FragalysisEmulator:
    """Serves one `Campaign` (or the recordings' seed) the way a Fragalysis stack does. Use `.app` with `Served`."""

    def __init__(self, campaign: Campaign, *, version: str = NEWER, protocol: str = "async",
                 build_seconds: float = 0.2, max_builds: int = 2, expiry_seconds: float = 5400,
                 faults: Faults | None = None, page_size: int | None = None, padding_bytes: int = 0,
                 seed: Catalogue | None = None) -> None:
        if version not in (V2024, NEWER):
            raise ValueError(f"version must be {V2024!r} or {NEWER!r}, not {version!r}")
        if protocol not in ("async", "sync"):
            raise ValueError(f"protocol must be 'async' or 'sync', not {protocol!r}")
        self.campaign = campaign
        self.version = version
        self.protocol = "sync" if version == V2024 else protocol  # 2024-10 builds are synchronous (fact 11)
        self.build_seconds = build_seconds
        self.max_builds = max_builds
        self.expiry_seconds = expiry_seconds
        self.page_size = page_size or (RECORDED_PAGE_SIZE if version == V2024 else 3)
        self.padding_bytes = padding_bytes
        self.seed = seed
        self.ping = "OK"
        self.build_count = 0
        self.download_count = 0
        self.throttled_count = 0
        self.csrf_rejections = 0
        self._sessions: dict[str, UserSession] = {}
        self._closed_tas: set[str] = set(seed.closed_tas) if seed else set()
        self._csrf_tokens: set[str] = set()
        self._builds: dict[tuple, Build] = {}
        self._by_task: dict[str, Build] = {}
        self._by_file_url: dict[str, Build] = {}
        self._failures: list[str] = []
        self._overrides: dict[str, Path] = {}
        self._tasks: set[asyncio.Task] = set()
        self._workdir = Path(tempfile.mkdtemp(prefix="fragalysis-emulator-"))
        self.app = self._make_app(faults)

    @classmethod
    def from_seed(cls, seed: dict[str, Any], **options: Any) -> FragalysisEmulator:
        """The data the recorded server held (`seed.json`), served as the 2024-10 backend serves it."""
        catalogue = Catalogue.from_seed(seed)
        return cls(Campaign(targets=[], collections=[], unrelated=[]), version=V2024, seed=catalogue, **options)

    # -- test helpers ----------------------------------------------------------------------------
    def add_session(self, token: str, user: str, tas_list: list[str], *, user_id: str | None = None) -> None:
        """A logged-in user: `token` works as the `sessionid` cookie and as a Bearer token."""
        self._sessions[token] = UserSession(token, user, user_id or str(len(self._sessions) + 2), list(tas_list))

    def login(self, username: str) -> str:
        """A session for a user of the seed (with its proposal memberships); returns the `sessionid`."""
        assert self.seed is not None, "login() needs from_seed(); use add_session() with a campaign"
        token = secrets.token_hex(16)
        self.add_session(token, username, self.seed.memberships.get(username, []),
                         user_id=str(self.seed.user_ids[username]))
        return token

    def expire_session(self, token: str) -> None:
        """From now on GETs with this token are redirected to Keycloak (session refresh)."""
        self._sessions[token].expired = True

    def set_open(self, tas: str, is_open: bool) -> None:
        """Open projects are visible to everyone; closed ones only to their members. Default: open."""
        (self._closed_tas.discard if is_open else self._closed_tas.add)(tas)

    def expire_builds(self) -> None:
        """Every file_url built so far answers 404, as after the ~90 min expiry."""
        for build in list(self._by_file_url.values()):
            self._forget(build)

    def fail_next_build(self, reason: str = "Task lost: worker restarted") -> None:
        self._failures.append(reason)

    def override_archive(self, target_name: str, archive: Path | bytes) -> None:
        """Serve these bytes (a crafted, possibly hostile archive) for every new build of the target."""
        path = self._workdir / f"override-{uuid.uuid4().hex}"
        if isinstance(archive, bytes):
            path.write_bytes(archive)
        else:
            shutil.copyfile(archive, path)
        self._overrides[target_name] = path

    @property
    def builds_in_flight(self) -> int:
        return sum(1 for b in self._builds.values() if b.in_flight)

    # -- application -----------------------------------------------------------------------------
    def _make_app(self, faults: Faults | None) -> web.Application:
        app = make_app(faults)
        app.middlewares.append(self._auth_middleware)
        r = app.router
        if self.version == NEWER:  # the 2024-10 backend has none (recordings 001, 002)
            r.add_get("/api/user/", self._user)
        r.add_get(LANDING_PATH, self._landing)
        r.add_get("/api/target_experiment_uploads/", self._list_view("uploads"))
        r.add_get("/api/targets/", self._list_view("targets"))
        r.add_get("/api/projects/", self._list_view("projects"))
        r.add_get("/api/experiments/", self._list_view("experiments"))
        r.add_get("/api/compounds/", self._list_view("compounds"))
        r.add_get("/api/site_observations/", self._list_view("observations"))
        r.add_post("/api/download_structures/", self._build)
        r.add_get("/api/download_structures/", self._download)
        r.add_get(r"/viewer/task_status/{task_id:[0-9a-fA-F-]{36}}/", self._task_status)
        r.add_route("*", "/{tail:.*}", self._append_slash)
        app.on_cleanup.append(self._cleanup)
        return app

    async def _cleanup(self, _app: web.Application) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.to_thread(shutil.rmtree, self._workdir, True)

    @web.middleware
    async def _auth_middleware(self, request: web.Request, handler):
        session = self._session_for(request)
        # The OIDC session-refresh middleware only redirects GETs; POSTs still pass as the user.
        if session is not None and session.expired and request.method == "GET":
            target = f"{KEYCLOAK_AUTH_URL}?client_id=fragalysis&response_type=code&scope=openid" \
                     f"&redirect_uri={quote(str(request.url), safe='')}"
            raise web.HTTPFound(target)
        request[SESSION_KEY] = session
        if request.method == "POST" and session is not None and "sessionid" in request.cookies:
            problem = self._csrf_problem(request)
            if problem:  # DRF's SessionAuthentication (recordings 054, 055)
                self.csrf_rejections += 1
                return web.json_response({"detail": f"CSRF Failed: {problem}"}, status=403)
        response = await handler(request)
        if session is None and request.cookies.get("sessionid") and not response.prepared:
            response.del_cookie("sessionid")  # Django drops a session it does not know (recordings 006, 016)
        return response

    def _session_for(self, request: web.Request) -> UserSession | None:
        """A bad token is silently anonymous, exactly like Django."""
        auth = request.headers.get("Authorization", "")
        token = auth[len("Bearer "):].strip() if auth.startswith("Bearer ") else request.cookies.get("sessionid")
        return self._sessions.get(token) if token else None

    def _csrf_problem(self, request: web.Request) -> str | None:
        """Django's check; Referer only matters over https (recording 056)."""
        cookie = request.cookies.get("csrftoken")
        if not cookie or cookie not in self._csrf_tokens:
            return "CSRF cookie not set."
        if request.headers.get("X-CSRFToken") != cookie:
            return "CSRF token missing or incorrect."
        if request.scheme == "https" and not request.headers.get("Referer", "").startswith(
                f"https://{request.host}/"):
            return "Referer checking failed - no Referer or not same origin."
        return None

    async def _append_slash(self, request: web.Request) -> web.StreamResponse:
        # Django's APPEND_SLASH: a 301 with a relative Location and an empty body (recordings 046, 059, 080).
        if not request.path.endswith("/"):
            location = request.path + "/" + (f"?{request.query_string}" if request.query_string else "")
            return web.Response(status=301, headers={"Location": location}, content_type="text/html",
                                charset="utf-8")
        return web.Response(status=404, text=NOT_FOUND_HTML, content_type="text/html")

    # -- visibility ------------------------------------------------------------------------------
    def _user_name(self, request: web.Request) -> str:
        session: UserSession | None = request[SESSION_KEY]
        return session.user if session else ""

    def _can_see(self, request: web.Request, tas: str) -> bool:
        session: UserSession | None = request[SESSION_KEY]
        return tas not in self._closed_tas or (session is not None and tas in session.tas)

    def _catalogue(self, request: web.Request) -> Catalogue:
        """Everything, as a member of every project sees it; views filter by visibility."""
        if self.seed is not None:
            return self.seed
        return Catalogue.from_campaign(self.campaign, f"{request.scheme}://{request.host}", self._closed_tas,
                                       self.version)

    def _paginate(self, request: web.Request, rows: list[dict]) -> web.Response:
        """DRF's LimitOffsetPagination: a bad limit or offset is ignored, never a 400 (fact 5)."""
        limit = _positive_int(request.query.get("limit")) or self.page_size
        offset = _positive_int(request.query.get("offset")) or 0

        def link(new_offset: int) -> str:
            query = {**request.query, "limit": str(limit), "offset": str(new_offset)}
            if new_offset <= 0:
                del query["offset"]
            return str(request.url.with_query(sorted(query.items())))

        return web.json_response({
            "count": len(rows),
            "next": link(offset + limit) if offset + limit < len(rows) else None,
            "previous": link(offset - limit) if offset > 0 else None,
            "results": rows[offset: offset + limit],
        })

    # -- read views ------------------------------------------------------------------------------
    async def _landing(self, request: web.Request) -> web.Response:
        token = secrets.token_urlsafe(24)
        self._csrf_tokens.add(token)
        session: UserSession | None = request[SESSION_KEY]
        response = web.Response(text=landing_page(session, secrets.token_urlsafe(48)), content_type="text/html",
                                charset="utf-8")
        response.set_cookie("csrftoken", token, path="/", samesite="Lax")
        return response

    async def _user(self, request: web.Request) -> web.Response:
        session: UserSession | None = request[SESSION_KEY]
        body: dict[str, Any] = {
            "user": session.user if session else ANONYMOUS,
            "user_id": session.user_id if session else None,
            "authenticator": {"kind": "ISPYB", "name": "XChem Python FastAPI TAS Authenticator",
                              "version": "1.4.4", "location": "http://auth.ta-authenticator.svc"},
            "ping": self.ping,
        }
        if session:
            body["target_access"] = list(session.tas)
        return web.json_response(body)

    def _list_view(self, kind: str):
        async def view(request: web.Request) -> web.Response:
            catalogue = self._catalogue(request)
            visible = {p["id"] for p in catalogue.projects if self._can_see(request, p["target_access_string"])}
            raw_target = request.query.get("target")
            if raw_target is not None and not raw_target.isdigit():
                # django-filter hands it to an integer lookup: a 500 (recording 032).
                return web.Response(status=500, text=SERVER_ERROR_HTML, content_type="text/html")
            rows = catalogue.rows(kind, visible, None if raw_target is None else int(raw_target), request.query)
            return self._paginate(request, rows)
        return view

    # -- download builds -------------------------------------------------------------------------
    async def _build(self, request: web.Request) -> web.Response:
        params = await read_body(request)
        if "file_url" not in params:  # the view reads it unconditionally (recording 064)
            return web.Response(status=500, text=SERVER_ERROR_HTML, content_type="text/html")
        if str(params.get("file_url") or ""):
            return self._static_link(params)
        target_name = str(params.get("target_name") or "")
        tas = str(params.get("target_access_string") or "")
        catalogue = self._catalogue(request)
        if not any(p["target_access_string"] == tas for p in catalogue.projects):
            return web.json_response({"message": f'Project "{tas}" does not exist'}, status=404)
        if not self._can_see(request, tas):
            return web.json_response(
                {"message": f'User "{self._user_name(request)}" is not a member of {tas}'}, status=404)
        target = self._target(target_name, tas)
        if target is None:
            return web.json_response(
                {"message": f'Target "{target_name}" does not exist under project {tas}'}, status=404)
        flags = {name: as_bool(params.get(name), default) for name, default in DOWNLOAD_FLAGS.items()}
        proteins = [p.strip() for p in str(params.get("proteins") or "").split(",") if p.strip()]
        known = set(catalogue.observation_codes(target_name, tas))
        if proteins and not known & set(proteins):
            return web.json_response({"message": f"Please enter list of valid protein codes for target: "
                                                 f"{target_name}, proteins: {proteins}"}, status=404)
        return await self._start_or_join(target, flags, proteins)

    def _static_link(self, params: dict[str, Any]) -> web.Response:
        """A non-empty file_url asks for a previously compiled archive."""
        if self.version == V2024:  # (recording 063)
            return web.json_response({"message": "file_url should only be provided for static files"}, status=400)
        existing = self._by_file_url.get(str(params["file_url"]))
        if existing is None or self._expired(existing):
            return web.json_response({"message": "file_url is not found"}, status=404)
        return web.json_response({"file_url": existing.file_url})

    def _target(self, name: str, tas: str) -> Target | None:
        if self.seed is not None:
            return self.seed.target(name, tas)
        return next((t for t in self.campaign.targets if t.tas == tas and t.name == name), None)

    async def _start_or_join(self, target: Target, flags: dict[str, bool], proteins: list[str]) -> web.Response:
        upload_index = target.uploads[-1][0] if target.uploads else 0
        # use_zip is not part of a build's identity on the 2024-10 backend: it always zips (fact 12).
        identity = {k: v for k, v in flags.items() if k != "use_zip" or self.version == NEWER}
        key = (target.name, target.tas, upload_index, tuple(sorted(identity.items())), tuple(sorted(proteins)))
        build = self._builds.get(key)
        if build is not None and self._expired(build):
            self._forget(build)
            build = None
        if build is not None and build.status == "SUCCESS":
            return web.json_response({"file_url": build.file_url})
        if build is not None and build.in_flight:
            return self._build_pending(build)
        if self.builds_in_flight >= self.max_builds:
            self.throttled_count += 1
            return web.json_response({"detail": "Too many downloads in progress, try again later."}, status=429)

        build = Build(key, str(uuid.uuid4()), target, upload_index, flags, proteins)
        self._forget_key(key)
        self._builds[key] = build
        self._by_task[build.task_id] = build
        self.build_count += 1
        if self.protocol == "sync":
            await self._run_build(build)
            if build.status != "SUCCESS":
                return web.json_response({"error": build.messages[-1]}, status=500)
            return web.json_response({"file_url": build.file_url})
        task = asyncio.create_task(self._run_build(build))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return self._build_pending(build)

    @staticmethod
    def _build_pending(build: Build) -> web.Response:
        return web.json_response({"task_status_url": f"/viewer/task_status/{build.task_id}/"}, status=202)

    async def _run_build(self, build: Build) -> None:
        build.started, build.status = True, "RUNNING"
        failure = self._failures.pop(0) if self._failures else None
        steps = 4
        try:
            for step in range(steps):
                build.messages.append(f"Compressing tarball: {100.0 * step / steps:.1f}%")
                await asyncio.sleep(self.build_seconds / steps)
            if failure is not None:
                build.status, build.finished = "FAILED", True
                build.messages.append(failure)
                return
            build.path = await asyncio.to_thread(self._write_archive, build)
        except Exception as exc:  # a broken build must finish FAILED, not hang RUNNING forever
            build.status, build.finished = "FAILED", True
            build.messages.append(f"Build failed: {exc}")
            return
        suffix = "zip" if build.flags["use_zip"] or self.version == V2024 else "tar.gz"
        build.file_url = f"{DOWNLOADS_PREFIX}{uuid.uuid4()}/{build.target.name}.{suffix}"
        self._by_file_url[build.file_url] = build
        build.messages += ["Compressing tarball: 100.0%", build.file_url]
        build.status, build.finished, build.finished_at = "SUCCESS", True, time.monotonic()

    def _write_archive(self, build: Build) -> Path:
        dest = self._workdir / f"{build.task_id}.archive"
        override = self._overrides.get(build.target.name)
        if override is not None:
            shutil.copyfile(override, dest)
            return dest
        if self.version == V2024:
            observations = self._archive_observations(build.target)
            members = recorded_archive_members(build.target, observations, build.flags, build.proteins)
            write_archive(dest, members, use_zip=True, padding_bytes=self.padding_bytes, prefix="")
            return dest
        members = archive_members(build.target, build.upload_index, build.flags, build.proteins)
        write_archive(dest, members, use_zip=build.flags["use_zip"], padding_bytes=self.padding_bytes)
        return dest

    def _archive_observations(self, target: Target) -> list[ArchiveObservation]:
        if self.seed is not None:
            return self.seed.archive_observations(target)
        return [ArchiveObservation(short_code(target, e), recorded_long_code(e), e.code, e.ligand.compound_code,
                                   e.ligand.smiles, pdb_text(target, e), sdf_text(e)) for e in target.experiments]

    def _expired(self, build: Build) -> bool:
        return build.finished_at is not None and time.monotonic() - build.finished_at > self.expiry_seconds

    def _forget_key(self, key: tuple) -> None:
        old = self._builds.pop(key, None)
        if old is not None:
            self._forget(old)

    def _forget(self, build: Build) -> None:
        if build.file_url:
            self._by_file_url.pop(build.file_url, None)
        if self._builds.get(build.key) is build:
            del self._builds[build.key]
        if build.path is not None:
            build.path.unlink(missing_ok=True)

    async def _task_status(self, request: web.Request) -> web.Response:
        """Celery's view of a task; anonymous callers and non-members are refused (recordings 073, 077)."""
        session: UserSession | None = request[SESSION_KEY]
        if session is None:
            return web.json_response({"error": "Only authenticated users can check the task status"}, status=403)
        task_id = request.match_info["task_id"]
        build = self._by_task.get(task_id)
        upload = self.seed.tasks.get(task_id) if self.seed else None
        tas = build.target.tas if build else upload[0] if upload else None
        if tas is not None and tas not in session.tas:
            return web.json_response({"error": 'You are not a member of the proposal f"proposal"'}, status=403)
        if upload is not None:
            return web.json_response({"started": True, "finished": True, "status": "SUCCESS",
                                      "messages": list(upload[1])})
        if build is None:  # Celery knows nothing of the id: it reports PENDING, shown as UNKNOWN
            return web.json_response({"started": False, "finished": False, "status": "UNKNOWN", "messages": []})
        return web.json_response({"started": build.started, "finished": build.finished, "status": build.status,
                                  "messages": list(build.messages)})

    async def _download(self, request: web.Request) -> web.StreamResponse:
        """The archive of a build: the link alone grants access, there is no user check (recording 069)."""
        if "file_url" not in request.query:
            return web.json_response({"message": "Please provide file_url parameter from post response"},
                                     status=404)
        file_url = request.query["file_url"]
        build = self._by_file_url.get(file_url)
        if build is None or self._expired(build) or build.path is None or not build.path.exists():
            return web.json_response({"message": "file_url is not found"}, status=404)
        self.download_count += 1
        name = file_url.rsplit("/", 1)[-1]
        response = web.StreamResponse(headers={
            # The real server says zip whatever the format: clients must sniff the magic bytes.
            "Content-Type": "application/zip",
            "Content-Disposition": f'attachment; filename="{name}"',
        })
        response.content_length = build.path.stat().st_size
        await response.prepare(request)
        with build.path.open("rb") as source:
            while chunk := await asyncio.to_thread(source.read, CHUNK):
                await response.write(chunk)
        await response.write_eof()
        return response


# -- the data a backend serves ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ArchiveObservation:
    """One site observation as an archive build needs it."""

    code: str  # short on the 2024-10 backend: "x0001a" (fact 8)
    long_code: str
    experiment_code: str
    compound_code: str
    smiles: str
    pdb: str
    sdf: str


@dataclass
class Catalogue:
    """Rows as the API returns them to a member of every project; the views filter by visibility."""

    projects: list[dict]
    targets: list[dict]
    uploads: list[dict]
    experiments: dict[int, list[dict]]  # by target id
    observations: dict[int, list[dict]]  # by target id
    compounds: list[dict]
    closed_tas: set[str] = field(default_factory=set)
    memberships: dict[str, list[str]] = field(default_factory=dict)  # username -> TAS
    user_ids: dict[str, int] = field(default_factory=dict)
    tasks: dict[str, tuple[str, list[str]]] = field(default_factory=dict)  # upload task id -> (TAS, messages)

    @classmethod
    def from_seed(cls, seed: dict[str, Any]) -> Catalogue:
        """The recordings' `seed.json`, served verbatim."""
        tas_of = {p["id"]: p["target_access_string"] for p in seed["projects"]}
        memberships: dict[str, list[str]] = {}
        for member in seed["project_members"]:
            memberships.setdefault(member["username"], []).append(member["target_access_string"])
        return cls(projects=seed["projects"], targets=seed["targets"], uploads=seed["target_experiment_uploads"],
                   experiments={int(k): v for k, v in seed["experiments"].items()},
                   observations={int(k): v for k, v in seed["site_observations"].items()},
                   compounds=seed["compounds"],
                   closed_tas={p["target_access_string"] for p in seed["projects"] if not p["open_to_public"]},
                   memberships=memberships, user_ids={u["username"]: u["id"] for u in seed["users"]},
                   tasks={u["task_id"]: (tas_of[u["project"]], u["message"]) for u in seed["target_experiment_uploads"]
                          if u.get("task_id")})

    @classmethod
    def from_campaign(cls, campaign: Campaign, base: str, closed_tas: set[str], version: str) -> Catalogue:
        """A synthetic campaign in the shapes of `version`."""
        targets = campaign.targets
        projects = [{"id": t.project_id, "target_access_string": t.tas, "init_date": "2026-01-05T09:00:00Z",
                     "authority": "DIAMOND-ISPYB", "open_to_public": t.tas not in closed_tas,
                     "user_can_use_squonk": False} for t in targets]
        rows = recorded_rows if version == V2024 else newer_rows
        uploads, experiments, observations, compounds = rows(targets, base)
        return cls(projects=projects, targets=[target_row(t, base, version) for t in targets], uploads=uploads,
                   experiments=experiments, observations=observations, compounds=compounds, closed_tas=closed_tas)

    def rows(self, kind: str, visible: set[int], target_id: int | None, query: Mapping[str, str]) -> list[dict]:
        seen_targets = {t["id"] for t in self.targets if t["project"] in visible}
        chosen = seen_targets if target_id is None else seen_targets & {target_id}
        if kind == "projects":
            return [p for p in self.projects if p["id"] in visible]
        if kind == "targets":
            return [t for t in self.targets if t["id"] in seen_targets and query.get("title", t["title"]) == t["title"]]
        if kind == "uploads":
            return [u for u in self.uploads if u["target"] in chosen]
        if kind in ("experiments", "observations"):
            by_target = self.experiments if kind == "experiments" else self.observations
            return [row for tid, rows in sorted(by_target.items()) if tid in chosen for row in rows]
        compound_ids = {c for tid in chosen for e in self.experiments.get(tid, []) for c in e.get("compounds", [])}
        return [c for c in self.compounds if set(c["project_id"]) & visible
                and (target_id is None or c["id"] in compound_ids)
                and all(query.get(key, c[key]) == c[key] for key in ("smiles", "current_identifier", "inchi"))]

    def target(self, name: str, tas: str) -> Target | None:
        """A seed target as a campaign `Target` (what a build needs: name, TAS, ids, uploads)."""
        project = next((p for p in self.projects if p["target_access_string"] == tas), None)
        row = next((t for t in self.targets if project and t["title"] == name and t["project"] == project["id"]),
                   None)
        if row is None:
            return None
        uploads = sorted((u["upload_version"], dt.datetime.fromisoformat(u["commit_datetime"]))
                         for u in self.uploads if u["target"] == row["id"])
        return Target(name, tas, row["id"], row["project"], beamline="", experiments=[], uploads=uploads)

    def observation_codes(self, name: str, tas: str) -> list[str]:
        target = self.target(name, tas)
        return [o["code"] for o in self.observations.get(target.target_id, [])] if target else []

    def archive_observations(self, target: Target) -> list[ArchiveObservation]:
        codes = {e["id"]: e["code"] for e in self.experiments.get(target.target_id, [])}
        return [ArchiveObservation(o["code"], o["longcode"], codes.get(o["experiment"], ""), o["compound_code"],
                                   o["smiles"], f"HEADER    {o['longcode']}\nEND\n", o["ligand_mol_file"])
                for o in self.observations.get(target.target_id, [])]


def target_row(t: Target, base: str, version: str) -> dict[str, Any]:
    """A target as both versions show it (recording 017: `zip_archive` is https even over http)."""
    template = f"{base}/media/target_loader_data/{t.name}_{t.tas}/upload_1/crystallographic_files/" \
               f"{t.experiments[0].code}/{t.experiments[0].code}.pdb" if t.experiments else None
    return {"id": t.target_id, "title": t.name, "display_name": t.name, "project": t.project_id,
            "default_squonk_project": None, "template_protein": template, "metadata": None,
            "zip_archive": base.replace("http://", "https://", 1) + f"/media/{t.name}_{t.tas}",
            "upload_status": None if version == V2024 else "SUCCESS"}


def short_code(target: Target, exp: Experiment) -> str:
    """The 2024-10 observation code: the experiment code without its target, plus `a` (fact 8)."""
    return exp.code.removeprefix(f"{target.name}-") + "a"


def recorded_long_code(exp: Experiment) -> str:
    return f"{exp.code}_A_501_v1"


def recorded_rows(targets: list[Target], base: str) -> tuple[list, dict, dict, list]:
    """Uploads, experiments, observations and compounds in the 2024-10 shapes (recordings 007, 027, 033, 040)."""
    uploads, experiments, observations, compounds = [], {}, {}, []
    for t in targets:
        media = f"{base}/media/target_loader_data/{t.name}_{t.tas}"
        for version, when in t.uploads:
            uploads.append({
                "id": t.target_id * 1000 + version, "file": f"{base}/media/{t.name}_upload_{version}.tgz",
                "commit_datetime": when.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), "complete_datetime": None,
                "task_id": None, "status": "LOADING",  # even when the load finished (fact 3)
                "message": [f"INFO: Created TargetLoader for '{t.name}_upload_{version}.tgz' proposal_ref='{t.tas}'",
                            f"{t.name}_upload_{version}.tgz uploaded successfully", "SUCCESS"],
                **{name.removesuffix(".yaml"): f"{media}/upload_{version}/{name}" for name in TRANSFORM_FILES},
                "upload_data_dir": f"upload_{version}", "upload_version": version, "project": t.project_id,
                "target": t.target_id, "committer": 3})
        experiments[t.target_id], observations[t.target_id] = [], []
        for i, e in enumerate(t.experiments):
            row_id = t.target_id * 100 + i
            files = f"{media}/upload_{t.uploads[-1][0] if t.uploads else 1}/crystallographic_files/{e.code}/{e.code}"
            experiments[t.target_id].append({
                "id": row_id, "code": e.code, "status": 0, "pdb_info": f"{files}.pdb", "pdb_info_source_file": None,
                "mtz_info": f"{files}.mtz", "mtz_info_source_file": None, "cif_info": f"{files}.cif",
                "cif_info_source_file": None, "map_info": [None], "map_info_source_files": [None], "type": 0,
                "pdb_sha256": None, "prefix_tooltip": f"{t.name} data", "code_prefix": "x",
                "experiment_upload": t.target_id * 1000 + 1, "xtalform": t.target_id, "compounds": [row_id]})
            observations[t.target_id].append({
                "id": row_id, "compound_code": e.ligand.compound_code, "prefix_tooltip": f"{t.name} data",
                "ligand_mol_file": sdf_text(e), "code": short_code(t, e), "longcode": recorded_long_code(e),
                "smiles": e.ligand.smiles, "chain_id": "A", "seq_id": 501, "experiment": row_id, "cmpd": row_id,
                "canon_site_conf": t.target_id, "pose": row_id})
            compounds.append({"id": row_id, "inchi": "", "smiles": e.ligand.smiles, "current_identifier": None,
                              "all_identifiers": None, "project_id": [t.project_id],
                              "compound_code": e.ligand.compound_code, "inspirations": [], "description": None,
                              "comments": None})
    return uploads, experiments, observations, compounds


def newer_rows(targets: list[Target], base: str) -> tuple[list, dict, dict, list]:
    """The contract's newest shapes: rows without id/status but with target_name; experiments with pdb_code."""
    uploads, experiments, observations, compounds = [], {}, {}, []
    for t in targets:
        for version, when in t.uploads:
            uploads.append({
                "target": t.target_id, "target_name": t.name, "project": t.project_id, "proposal_number": t.tas,
                "tarball": f"{base}/media/uploads/{t.name}_upload_{version}.tgz",
                "commit_datetime": when.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), "committer": 7,
                "committer_name": "uploader", "task_id": str(uuid.UUID(int=t.target_id * 1000 + version)),
                "upload_data_dir": f"upload_{version}", "upload_version": version, "data_version_major": 2,
                "data_version_minor": 4,
                **{name.removesuffix(".yaml"): f"{t.name}/upload_{version}/{name}" for name in TRANSFORM_FILES}})
        experiments[t.target_id] = [experiment_row(t, e, i) for i, e in enumerate(t.experiments)]
        observations[t.target_id] = [{
            "id": t.target_id * 100 + i, "code": e.observation_codes[0], "smiles": e.ligand.smiles,
            "experiment": t.target_id * 100 + i, "cmpd": t.target_id * 100 + i, "longcode": long_code(e),
            "canon_site_conf": 1, "ligand_mol": f"aligned_files/{e.observation_codes[0]}_ligand.sdf",
        } for i, e in enumerate(t.experiments)]
        compounds += [{
            "id": t.target_id * 100 + i, "smiles": e.ligand.smiles, "inchi": f"InChI=1S/emulated/{e.ligand.compound_code}",
            "current_identifier": e.ligand.compound_code, "all_identifiers": e.ligand.compound_code,
            "compound_code": e.ligand.compound_code, "project_id": [t.project_id], "description": None,
        } for i, e in enumerate(t.experiments)]
    return uploads, experiments, observations, compounds


def landing_page(session: UserSession | None, csrf_form_token: str) -> str:
    """The bare Django landing template (no React build), as recorded (003 anonymous, 004 member)."""
    if session is None:
        context = ("var DJANGO_CONTEXT = {\n         \n         legacy_url: '',\n         username: 'NOT_LOGGED_IN',"
                   "\n         email: \"noemail\",\n         pk: undefined,\n         authenticated: false,\n"
                   "         discourse_available: false,\n         squonk_available: false\n     }")
    else:
        context = ("var DJANGO_CONTEXT ={\n         \n         legacy_url: '',\n"
                   f"         username: '{session.user}',\n         email: '{session.user}@example.org',\n"
                   f"         pk: {session.user_id},\n         authenticated: true,\n"
                   "         discourse_available: false,\n         user_present_on_discourse: false,\n"
                   "         discourse_host: '',\n         squonk_available: false,\n         squonk_ui_url: ''\n     }")
    return ("\n<!DOCTYPE html>\n<html>\n <head>\n     <link rel=\"stylesheet\" "
            "href=\"https://bootswatch.com/3/simplex/bootstrap.min.css\" crossorigin=\"anonymous\">\n"
            " <meta charset=\"UTF-8\">\n <title>XChem @ Diamond</title>\n </head>\n <body>\n"
            f" <input type=\"hidden\" name=\"csrfmiddlewaretoken\" value=\"{csrf_form_token}\">\n"
            " <div id=\"app\"></div>\n\n\n <script type=\"text/javascript\">\n\n \n     "
            f"{context}\n \n\n</script>\n\n \n </body>\n</html>\n")


def _positive_int(value: str | None) -> int | None:
    return int(value) if value is not None and value.isdigit() and int(value) > 0 else None


# -- request parsing ---------------------------------------------------------------------------------
async def read_body(request: web.Request) -> dict[str, Any]:
    """The build POST accepts a form or a JSON body, as Django REST framework does."""
    if request.content_type == "application/json":
        try:
            body = await request.json()
        except json.JSONDecodeError:
            return {}
        return body if isinstance(body, dict) else {}
    return dict(await request.post())


def as_bool(value: Any, default: bool) -> bool:
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in ("1", "true", "yes", "on")


# -- archive content ---------------------------------------------------------------------------------
def long_code(exp: Experiment) -> str:
    return f"{exp.code}_A_501_1_{exp.code}a+A+501+1"


def experiment_row(target: Target, exp: Experiment, index: int) -> dict[str, Any]:
    return {
        "id": target.target_id * 100 + index, "code": exp.code, "pdb_code": exp.pdb_code,
        "type": 0, "status": 1, "high_resolution": exp.resolution, "space_group": "C 1 2 1",
        "data_collection_date": "2026-09-01", "refinement_rfree": 0.24, "refinement_rwork": 0.2,
        "experiment_status": "Deposited" if exp.pdb_code else "Analysed", "compounds": [target.target_id * 100 + index],
        "pdb_info": f"/media/target_loader_data/{target.name}/crystallographic_files/{exp.code}/{exp.code}.pdb",
    }


def archive_members(target: Target, upload_index: int, flags: dict[str, bool],
                    proteins: list[str]) -> Iterator[tuple[str, bytes]]:
    """(member name, bytes) per the contract's layout; names start with `./`, no top-level folder."""
    experiments = [e for e in target.experiments
                   if not proteins or any(code in proteins for code in e.observation_codes)]
    for exp in experiments:
        obs = exp.observation_codes[0]
        base = f"./aligned_files/{obs}/{obs}"
        if flags["all_aligned_structures"]:
            yield f"{base}.pdb", pdb_text(target, exp).encode()
            yield f"{base}_apo.pdb", pdb_text(target, exp, bound=False).encode()
            yield f"{base}_ligand.sdf", sdf_text(exp).encode()
            yield f"{base}_ligand.smi", (exp.ligand.smiles + "\n").encode()
        for flag, suffix in (("diff_file", "_diff.ccp4"), ("event_file", "_event.ccp4"),
                             ("sigmaa_file", "_sigmaa.ccp4")):
            if flags[flag]:
                yield f"{base}{suffix}_FILE_NOT_IN_UPLOAD", b""
        crystal = f"./crystallographic_files/{exp.code}/{exp.code}"
        if flags["pdb_info"]:
            yield f"{crystal}.pdb", pdb_text(target, exp).encode()
        for flag, suffix in (("cif_info", ".cif"), ("mtz_info", ".mtz"), ("map_info", ".ccp4")):
            if flags[flag]:
                yield f"{crystal}{suffix}_FILE_NOT_IN_UPLOAD", b""
    if flags["metadata_info"]:
        yield "./metadata.csv", metadata_csv(experiments).encode()
    if flags["all_aligned_structures"]:
        yield "./smiles.smi", "".join(e.ligand.smiles + "\n" for e in experiments).encode()
    if flags["single_sdf_file"]:
        yield f"./{target.name}_combined.sdf", "".join(sdf_text(e) for e in experiments).encode()
    if flags["trans_matrix_info"]:
        for name in TRANSFORM_FILES:
            yield f"./{name}", f"# {name} for upload {upload_index}\n{{}}\n".encode()
    yield f"./yaml_files/upload_{upload_index}/config.yaml", f"target_name: {target.name}\nupload: {upload_index}\n".encode()
    yield "./README.md", readme(target, upload_index, flags).encode()
    yield "./errors.csv", b"Param,Code,Invalid file reference\n"


# The recorded metadata.csv header (TESTTGT-metadata_info.zip), before the per-upload `[Other]` tags.
RECORDED_METADATA_HEADER = (
    "Code", "Long code", "Experiment code", "Compound code", "Smiles", "Centroid res", "Downloaded",
    *(f"{c} {kind}" for kind in ("upload name", "short tag", "alias")
      for c in ("ConformerSites", "CanonSites", "CrystalformSites", "Quatassemblies", "Crystalforms")),
    "Pose")
ALIGNED_STRUCTURES = ("_apo.pdb", "_apo-solv.pdb", "_apo-desolv.pdb", ".pdb")
ALIGNED_LIGAND = ("_ligand.pdb", "_ligand.mol", "_ligand.smi")
MAP_FLAGS = (("event_file", "event"), ("diff_file", "diff"), ("sigmaa_file", "sigmaa"))


def recorded_archive_members(target: Target, observations: list[ArchiveObservation], flags: dict[str, bool],
                             proteins: list[str]) -> Iterator[tuple[str, bytes]]:
    """The 2024-10 layout, in its order (recorded archives): each kind of file for every observation in
    turn, no `./`, `README.pdf`, `metadata.csv` only with `metadata_info`, transforms with `trans_matrix_info`."""
    chosen = [o for o in observations if not proteins or o.code in proteins]
    aligned = flags["all_aligned_structures"]

    def each(suffixes: tuple[str, ...], content) -> Iterator[tuple[str, bytes]]:
        for suffix in suffixes:
            for o in chosen:
                yield f"aligned_files/{o.code}/{o.code}{suffix}", content(o, suffix).encode()

    def crystal(suffix: str) -> Iterator[tuple[str, bytes]]:
        for o in chosen:
            yield f"crystallographic_files/{re.sub(r'[^0-9]', '', o.code)}/{o.code}{suffix}", b""

    if aligned:
        yield from each(ALIGNED_STRUCTURES, lambda o, _suffix: o.pdb)
    for flag, suffix in (("pdb_info", ".pdb"), ("cif_info", ".cif"), ("mtz_info", ".mtz"),
                         ("map_info", "_event_1.ccp4")):
        if flags[flag]:
            yield from crystal(suffix)
    for flag, kind in MAP_FLAGS:
        if flags[flag]:
            yield from each((f"_{kind}.ccp4",), lambda _o, _suffix: "")
    if aligned:
        yield from each(ALIGNED_LIGAND, lambda o, suffix: o.smiles + "\n" if suffix.endswith(".smi") else o.sdf)
    for flag, kind in MAP_FLAGS:
        if flags[flag]:
            yield from each((f"_{kind}_crystallographic.ccp4",), lambda _o, _suffix: "")
    if aligned:
        yield from each((".sdf",), lambda o, _suffix: o.sdf)
    if flags["single_sdf_file"]:
        yield f"{target.name}_combined.sdf", "".join(o.sdf + "$$$$\n" for o in chosen).encode()
    yield "smiles.smi", "".join(o.smiles + "," for o in chosen).encode()
    if flags["metadata_info"]:
        yield "metadata.csv", recorded_metadata_csv(target, chosen).encode()
    if flags["trans_matrix_info"]:
        for name in TRANSFORM_FILES:
            yield name, b"{}\n"
    yield "extra_files_1/notes.txt", f"extra file for {target.name}\n".encode()
    for version, _when in target.uploads:
        for name in ("assemblies.yaml", "meta_aligner.yaml", "config_1.yaml"):
            yield f"yaml_files/upload_{version}/{name}", f"target_name: {target.name}\n".encode()
    yield "README.pdf", b"%PDF-1.5\n%emulated Fragalysis download README\n%%EOF\n"


def recorded_metadata_csv(target: Target, observations: list[ArchiveObservation]) -> str:
    """Unquoted, booleans `True`/`False` (fact 16)."""
    tags = [f"[Other] upload_{version} {when:%Y-%m-%d}" for version, when in target.uploads]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*RECORDED_METADATA_HEADER, *tags])
    for o in observations:
        writer.writerow([o.code, o.long_code, o.experiment_code, o.compound_code, o.smiles, "GLY-1-A_v1", True,
                         *["1 - site"] * 15, o.code, *[True] * len(tags)])
    return out.getvalue()


def metadata_csv(experiments: list[Experiment]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, quoting=csv.QUOTE_NONNUMERIC, lineterminator="\n")
    writer.writerow(["Code", "Long code", "Experiment code", "Compound code", "Smiles", "Centroid res",
                     "Downloaded", "CanonSites upload name", "CanonSites short tag", "Pose", "[Other] hit"])
    for index, exp in enumerate(experiments):
        writer.writerow([exp.observation_codes[0], long_code(exp), exp.code, exp.ligand.compound_code,
                         exp.ligand.smiles, f"A/{501 + index}", "True", "1 - A-501", "A501", 1, "True"])
    return out.getvalue()


def readme(target: Target, upload_index: int, flags: dict[str, bool]) -> str:
    chosen = ", ".join(name for name, on in sorted(flags.items()) if on)
    return (f"# Fragalysis download: {target.name} ({target.tas})\n\nUpload: upload_{upload_index}\n"
            f"Options: {chosen}\n")


def padding_chunks(size: int) -> Iterator[bytes]:
    """Incompressible, reproducible bytes, generated a chunk at a time."""
    rng = random.Random(size)
    left = size
    while left > 0:
        n = min(CHUNK, left)
        yield rng.randbytes(n)
        left -= n


class _ChunkReader(io.RawIOBase):
    """A file-like view of a chunk iterator, so tarfile can stream padding without holding it."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._current = b""
        self._offset = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        # tarfile treats a short read as the end of data, so fill `size` across chunk boundaries.
        parts: list[bytes] = []
        wanted = size
        while wanted != 0:
            if self._offset >= len(self._current):
                self._current, self._offset = next(self._chunks, b""), 0
                if not self._current:
                    break
            end = len(self._current) if wanted < 0 else self._offset + wanted
            piece = self._current[self._offset:end]
            self._offset += len(piece)
            parts.append(piece)
            if wanted > 0:
                wanted -= len(piece)
        return b"".join(parts)


def write_archive(dest: Path, members: Iterator[tuple[str, bytes]], *, use_zip: bool, padding_bytes: int = 0,
                  prefix: str = "./") -> None:
    padding_name = f"{prefix}extra_files_1/padding.bin"
    if use_zip:
        with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for name, data in members:
                archive.writestr(name, data)
            if padding_bytes:
                info = zipfile.ZipInfo(padding_name)
                info.compress_type = zipfile.ZIP_STORED  # incompressible anyway
                with archive.open(info, "w", force_zip64=padding_bytes >= 2**31) as out:
                    for chunk in padding_chunks(padding_bytes):
                        out.write(chunk)
        return
    now = int(time.time())
    # Padding is incompressible: deflating a gigabyte of it takes minutes for nothing, so padded
    # archives use stored gzip blocks (still `\x1f\x8b`, still a valid tar.gz).
    level = 0 if padding_bytes else 6
    with tarfile.open(dest, "w:gz", compresslevel=level, copybufsize=CHUNK) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), now, 0o644
            archive.addfile(info, io.BytesIO(data))
        if padding_bytes:
            info = tarfile.TarInfo(padding_name)
            info.size, info.mtime, info.mode = padding_bytes, now, 0o644
            archive.addfile(info, _ChunkReader(padding_chunks(padding_bytes)))
