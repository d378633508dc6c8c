"""A faithful Fragalysis emulator: the REST views mirrord reads, quirks included.

It follows the Fragalysis contract: silent anonymous fallback for a bad `sessionid`, CSRF on
authenticated POSTs, 301 for a missing trailing slash, absolute `next` links, two download
protocols (synchronous `200 {file_url}` and asynchronous `202 {task_status_url}`), 429 when too
many builds run, `application/zip` even for tar.gz, and builds that expire.

Archives are written to temporary files, never held in memory, so a benchmark can ask for a
gigabyte of incompressible padding.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import random
import secrets
import shutil
import tarfile
import tempfile
import time
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from aiohttp import web

from mirrord.emulators.base import Faults, make_app
from mirrord.emulators.campaign import Campaign, Experiment, Target, pdb_text, sdf_text

KEYCLOAK_AUTH_URL = "https://keycloak.example/auth/realms/xchem/protocol/openid-connect/auth"
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
CSRF_FAILURE_HTML = (
    "<!DOCTYPE html><html lang=\"en\"><head><title>403 Forbidden</title></head><body>"
    "<h1>Forbidden <span>(403)</span></h1><p>CSRF verification failed. Request aborted.</p>"
    "<p>{reason}</p></body></html>"
)


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
    """Serves one `Campaign` the way a Fragalysis stack does. Use `.app` with `Served`."""

    def __init__(self, campaign: Campaign, *, protocol: str = "async", build_seconds: float = 0.2,
                 max_builds: int = 2, expiry_seconds: float = 5400, faults: Faults | None = None,
                 page_size: int = 3, padding_bytes: int = 0, legacy_rows: bool = False) -> None:
        if protocol not in ("async", "sync"):
            raise ValueError(f"protocol must be 'async' or 'sync', not {protocol!r}")
        self.campaign = campaign
        self.protocol = protocol
        self.build_seconds = build_seconds
        self.max_builds = max_builds
        self.expiry_seconds = expiry_seconds
        self.page_size = page_size
        self.padding_bytes = padding_bytes
        self.legacy_rows = legacy_rows
        self.ping = "OK"
        self.build_count = 0
        self.download_count = 0
        self.throttled_count = 0
        self.csrf_rejections = 0
        self._sessions: dict[str, UserSession] = {}
        self._closed_tas: set[str] = set()
        self._csrf_tokens: set[str] = set()
        self._builds: dict[tuple, Build] = {}
        self._by_task: dict[str, Build] = {}
        self._by_file_url: dict[str, Build] = {}
        self._failures: list[str] = []
        self._overrides: dict[str, Path] = {}
        self._tasks: set[asyncio.Task] = set()
        self._workdir = Path(tempfile.mkdtemp(prefix="fragalysis-emulator-"))
        self.app = self._make_app(faults)

    # -- test helpers ----------------------------------------------------------------------------
    def add_session(self, token: str, user: str, tas_list: list[str], *, user_id: str | None = None) -> None:
        """A logged-in user: `token` works as the `sessionid` cookie and as a Bearer token."""
        self._sessions[token] = UserSession(token, user, user_id or str(len(self._sessions) + 2), list(tas_list))

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
        r.add_get("/api/user/", self._user)
        r.add_get(LANDING_PATH, self._landing)
        r.add_get("/api/target_experiment_uploads/", self._uploads)
        r.add_get("/api/targets/", self._targets)
        r.add_get("/api/projects/", self._projects)
        r.add_get("/api/experiments/", self._experiments)
        r.add_get("/api/compounds/", self._compounds)
        r.add_get("/api/site_observations/", self._site_observations)
        r.add_post("/api/download_structures/", self._build)
        r.add_get("/api/download_structures/", self._download)
        r.add_get("/viewer/task_status/{task_id}/", self._task_status)
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
            if problem:
                self.csrf_rejections += 1
                return web.Response(status=403, text=CSRF_FAILURE_HTML.format(reason=problem),
                                    content_type="text/html")
        return await handler(request)

    def _session_for(self, request: web.Request) -> UserSession | None:
        """A bad token is silently anonymous, exactly like Django."""
        auth = request.headers.get("Authorization", "")
        token = auth[len("Bearer "):].strip() if auth.startswith("Bearer ") else request.cookies.get("sessionid")
        return self._sessions.get(token) if token else None

    def _csrf_problem(self, request: web.Request) -> str | None:
        cookie = request.cookies.get("csrftoken")
        if not cookie or cookie not in self._csrf_tokens:
            return "CSRF cookie not set."
        if request.headers.get("X-CSRFToken") != cookie:
            return "CSRF token missing or incorrect."
        if not request.headers.get("Referer", "").startswith(f"{request.scheme}://{request.host}/"):
            return "Referer checking failed - no Referer or not same origin."
        return None

    async def _append_slash(self, request: web.Request) -> web.StreamResponse:
        # Django's APPEND_SLASH: a 301 that turns a POST into a GET in most clients.
        if not request.path.endswith("/"):
            location = request.path + "/" + (f"?{request.query_string}" if request.query_string else "")
            raise web.HTTPMovedPermanently(location)
        return web.Response(status=404, text="<html><body><h1>Not Found</h1></body></html>",
                            content_type="text/html")

    # -- visibility ------------------------------------------------------------------------------
    def _user_name(self, request: web.Request) -> str:
        session: UserSession | None = request[SESSION_KEY]
        return session.user if session else ANONYMOUS

    def _can_see(self, request: web.Request, tas: str) -> bool:
        session: UserSession | None = request[SESSION_KEY]
        return tas not in self._closed_tas or (session is not None and tas in session.tas)

    def _visible_targets(self, request: web.Request) -> list[Target]:
        return [t for t in self.campaign.targets if self._can_see(request, t.tas)]

    def _paginate(self, request: web.Request, rows: list[dict]) -> web.Response:
        try:
            limit = int(request.query.get("limit", self.page_size))
            offset = int(request.query.get("offset", 0))
        except ValueError:
            return web.json_response({"detail": "Invalid limit or offset."}, status=400)
        limit = max(1, limit)
        page = rows[offset: offset + limit]

        def link(new_offset: int) -> str:
            return str(request.url.update_query(limit=limit, offset=new_offset))

        return web.json_response({
            "count": len(rows),
            "next": link(offset + limit) if offset + limit < len(rows) else None,
            "previous": link(max(0, offset - limit)) if offset > 0 else None,
            "results": page,
        })

    # -- read views ------------------------------------------------------------------------------
    async def _landing(self, request: web.Request) -> web.Response:
        token = secrets.token_urlsafe(24)
        self._csrf_tokens.add(token)
        response = web.Response(text="<html><body><div id=\"app\">Fragalysis</div></body></html>",
                                content_type="text/html")
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

    async def _uploads(self, request: web.Request) -> web.Response:
        rows = []
        for target in self._visible_targets(request):
            for version, when in target.uploads:
                rows.append(self._upload_row(request, target, version, when))
        return self._paginate(request, rows)

    def _upload_row(self, request: web.Request, target: Target, version: int, when) -> dict:
        row: dict[str, Any] = {
            "target": target.target_id,
            "project": target.project_id,
            "commit_datetime": when.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "committer": 7,
            "committer_name": "uploader",
            "task_id": str(uuid.UUID(int=target.target_id * 1000 + version)),
            "upload_data_dir": f"upload_{version}",
            "upload_version": version,
            "data_version_major": 2,
            "data_version_minor": 4,
            "neighbourhood_transforms": f"{target.name}/upload_{version}/neighbourhood_transforms.yaml",
            "conformer_site_transforms": f"{target.name}/upload_{version}/conformer_site_transforms.yaml",
            "reference_structure_transforms": f"{target.name}/upload_{version}/reference_structure_transforms.yaml",
        }
        if self.legacy_rows:
            row.update(id=target.target_id * 1000 + version, status="SUCCESS")
        else:
            row.update(target_name=target.name, proposal_number=target.tas,
                       tarball=f"{request.scheme}://{request.host}/media/uploads/{target.name}_upload_{version}.tgz")
        return row

    async def _targets(self, request: web.Request) -> web.Response:
        title = request.query.get("title")
        rows = [{
            "id": t.target_id, "title": t.name, "display_name": t.name, "project": t.project_id,
            "template_protein": f"/media/targets/{t.name}/reference.pdb", "metadata": None,
            "zip_archive": None, "upload_status": "SUCCESS",
        } for t in self._visible_targets(request) if title is None or t.name == title]
        return self._paginate(request, rows)

    async def _projects(self, request: web.Request) -> web.Response:
        rows = [{
            "id": t.project_id, "target_access_string": t.tas, "init_date": "2026-01-05T09:00:00Z",
            "authority": "DIAMOND-ISPYB", "open_to_public": t.tas not in self._closed_tas,
            "user_can_use_squonk": False,
        } for t in self._visible_targets(request)]
        return self._paginate(request, rows)

    def _target_filter(self, request: web.Request) -> tuple[list[Target], web.Response | None]:
        """`?target=<id>` as django-filter does it: an unknown id is a 400 with a field dict."""
        visible = self._visible_targets(request)
        raw = request.query.get("target")
        if raw is None:
            return visible, None
        chosen = [t for t in visible if str(t.target_id) == raw]
        if not chosen:
            return [], web.json_response(
                {"target": ["Select a valid choice. That choice is not one of the available choices."]},
                status=400)
        return chosen, None

    async def _experiments(self, request: web.Request) -> web.Response:
        targets, error = self._target_filter(request)
        if error:
            return error
        rows = [experiment_row(t, e, i) for t in targets for i, e in enumerate(t.experiments)]
        return self._paginate(request, rows)

    async def _compounds(self, request: web.Request) -> web.Response:
        targets, error = self._target_filter(request)
        if error:
            return error
        rows = []
        for t in targets:
            for i, e in enumerate(t.experiments):
                lig = e.ligand
                rows.append({
                    "id": t.target_id * 100 + i, "smiles": lig.smiles, "inchi": f"InChI=1S/emulated/{lig.compound_code}",
                    "current_identifier": lig.compound_code, "all_identifiers": lig.compound_code,
                    "compound_code": lig.compound_code, "project_id": [t.project_id], "description": None,
                })
        for key in ("smiles", "current_identifier"):
            if key in request.query:
                rows = [r for r in rows if r[key] == request.query[key]]
        return self._paginate(request, rows)

    async def _site_observations(self, request: web.Request) -> web.Response:
        targets, error = self._target_filter(request)
        if error:
            return error
        rows = [{
            "id": t.target_id * 100 + i, "code": e.observation_codes[0], "smiles": e.ligand.smiles,
            "experiment": t.target_id * 100 + i, "cmpd": t.target_id * 100 + i, "longcode": long_code(e),
            "canon_site_conf": 1, "ligand_mol": f"aligned_files/{e.observation_codes[0]}_ligand.sdf",
        } for t in targets for i, e in enumerate(t.experiments)]
        return self._paginate(request, rows)

    # -- download builds -------------------------------------------------------------------------
    async def _build(self, request: web.Request) -> web.Response:
        params = await read_body(request)
        target_name = str(params.get("target_name") or "")
        tas = str(params.get("target_access_string") or "")
        if not target_name or not tas:
            return web.json_response({"message": "target_name and target_access_string are required"}, status=400)
        project = self.campaign.target_by_tas(tas)
        if project is None:
            return web.json_response({"message": f"Project {tas} does not exist"}, status=404)
        if not self._can_see(request, tas):
            return web.json_response(
                {"message": f"User {self._user_name(request)} is not a member of {tas}"}, status=404)
        target = next((t for t in self.campaign.targets if t.tas == tas and t.name == target_name), None)
        if target is None:
            return web.json_response(
                {"message": f"Target {target_name} does not exist under project {tas}"}, status=404)
        if str(params.get("file_url") or ""):
            # "Download a previously compiled archive": all other parameters are ignored.
            existing = self._by_file_url.get(str(params["file_url"]))
            if existing is None or self._expired(existing):
                return web.json_response({"message": "file_url is not found"}, status=404)
            return web.json_response({"file_url": existing.file_url})

        flags = {name: as_bool(params.get(name), default) for name, default in DOWNLOAD_FLAGS.items()}
        proteins = [p.strip() for p in str(params.get("proteins") or "").split(",") if p.strip()]
        upload_index = target.uploads[-1][0] if target.uploads else 0
        key = (target.name, tas, upload_index, tuple(sorted(flags.items())), tuple(sorted(proteins)))
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
        suffix = "zip" if build.flags["use_zip"] else "tar.gz"
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
        members = archive_members(build.target, build.upload_index, build.flags, build.proteins)
        write_archive(dest, members, use_zip=build.flags["use_zip"], padding_bytes=self.padding_bytes)
        return dest

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
        build = self._by_task.get(request.match_info["task_id"])
        if build is None:  # Celery knows nothing of the id: it reports PENDING, shown as UNKNOWN
            return web.json_response({"started": False, "finished": False, "status": "UNKNOWN", "messages": []})
        return web.json_response({"started": build.started, "finished": build.finished, "status": build.status,
                                  "messages": list(build.messages)})

    async def _download(self, request: web.Request) -> web.StreamResponse:
        file_url = request.query.get("file_url", "")
        build = self._by_file_url.get(file_url)
        if build is None or self._expired(build) or build.path is None or not build.path.exists():
            return web.json_response({"message": "file_url is not found"}, status=404)
        if not self._can_see(request, build.target.tas):
            return web.json_response(
                {"message": f"User {self._user_name(request)} is not a member of {build.target.tas}"}, status=404)
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


def write_archive(dest: Path, members: Iterator[tuple[str, bytes]], *, use_zip: bool, padding_bytes: int = 0) -> None:
    padding_name = "./extra_files_1/padding.bin"
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
