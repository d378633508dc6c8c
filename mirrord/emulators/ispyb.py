"""ISPyB emulator: the part of the py-ispyb core REST API mirrord reads, served from the shared Campaign.

Shapes follow the real OpenAPI spec (the tests validate every exchange against it) and the quirks of
the real server: login answers 201 with an HS256 JWT, lists page with `skip`/`limit` (`limit=0` is a
422), datetimes are naive, `/events` folds a data collection group into one event unless asked for
the group, and the `session=`/`proposal=` name filters of `/events` are silently ignored.

Everything is derived from the Campaign at request time, so a collection a test adds to the campaign
directly shows up here as it does in the other emulators.
"""

from __future__ import annotations

import datetime as dt
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from aiohttp import web

from mirrord.emulators.base import REQUEST_LOG_KEY, Faults, make_app
from mirrord.emulators.campaign import EPOCH, Campaign, Collection, Target

DEFAULT_USERS = {"mirrord": "mirrord-password"}
PLUGINS = ("dummy",)
PERMISSIONS = ["all_proposals"]  # a staff account: every session is visible to it
FIRST_SESSION_ID = 55_001
FIRST_PROPOSAL_ID = 4_001
JWT_ALGORITHM = "HS256"
DEFAULT_LIMIT = 25

LOGIN_KEY = web.RequestKey("login", str)  # who the bearer token says is calling
Handler = Callable[[web.Request], Awaitable[web.Response]]
Json = dict[str, Any]


def _proposal_of(session: str) -> str:
    """"lb32627-66" -> "lb32627": a visit is its proposal plus a visit number."""
    return session.rsplit("-", 1)[0]


@dataclass
class EmulatedSession:
    """One ISPyB visit (BLSession). Campaign targets get one each; tests may add more."""

    session_id: int
    proposal_id: int
    name: str  # "lb32627-66"
    beamline: str
    start: dt.datetime
    end: dt.datetime

    @property
    def proposal(self) -> str:
        return _proposal_of(self.name)

    @property
    def visit_number(self) -> int | None:
        tail = self.name.rsplit("-", 1)[-1]
        return int(tail) if tail.isdigit() else None


class Unauthorized(Exception):
    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class InvalidRequest(Exception):
    """A FastAPI-style 422: `errors` are pydantic v1 error objects (`loc`, `msg`, `type`)."""

    def __init__(self, errors: list[Json]) -> None:
        super().__init__(errors)
        self.errors = errors


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _not_found(detail: str) -> web.Response:
    return web.json_response({"detail": detail}, status=404)


# -- query parameters, parsed the way FastAPI/pydantic v1 does -------------------------------------
def _int_param(request: web.Request, name: str, *, where: str = "query") -> int | None:
    raw = request.match_info.get(name) if where == "path" else request.query.get(name)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise InvalidRequest([{"loc": [where, name], "msg": "value is not a valid integer",
                               "type": "type_error.integer"}]) from None


def _paging(request: web.Request) -> tuple[int, int]:
    skip = _int_param(request, "skip")
    limit = _int_param(request, "limit")
    skip = 0 if skip is None else skip
    limit = DEFAULT_LIMIT if limit is None else limit
    errors = []
    if skip < 0:
        errors.append({"loc": ["query", "skip"], "msg": "ensure this value is greater than or equal to 0",
                       "type": "value_error.number.not_ge"})
    if limit <= 0:
        errors.append({"loc": ["query", "limit"], "msg": "ensure this value is greater than 0",
                       "type": "value_error.number.not_gt"})
    if errors:
        raise InvalidRequest(errors)
    return skip, limit


def _page(request: web.Request, rows: list[Any], render: Callable[[Any], Json] = lambda row: row) -> web.Response:
    """One page of `rows`; only the rows on it are rendered to JSON."""
    skip, limit = _paging(request)
    return web.json_response({"total": len(rows), "results": [render(row) for row in rows[skip: skip + limit]],
                              "skip": skip, "limit": limit})


class IspybEmulator:
    """`IspybEmulator(campaign).app` is an aiohttp app serving the ISPyB API under `prefix`."""

    def __init__(self, campaign: Campaign, *, data_root: Path | None = None, token_ttl: float = 18000,
                 prefix: str = "/ispyb/api/v1", users: Mapping[str, str] | None = None,
                 faults: Faults | None = None, extra_middlewares: Iterable[Any] = ()) -> None:
        self.campaign = campaign
        self.data_root = data_root
        self.token_ttl = token_ttl
        self.prefix = "/" + prefix.strip("/") if prefix.strip("/") else ""
        self.users = dict(DEFAULT_USERS if users is None else users)
        self.logins = 0  # successful logins, so tests can see re-logins
        self._secret = secrets.token_hex(32)
        # Tokens carry the generation they were issued in; expire_tokens() bumps it.
        self._token_generation = 0
        self._sessions: dict[str, EmulatedSession] = {}
        self._proposal_ids: dict[str, int] = {}
        self.app = make_app(faults)
        self.app.middlewares.extend(extra_middlewares)
        self._add_routes()
        self._sessions_by_name()  # the campaign's visits get the first ids, in campaign order
        if data_root is not None:
            campaign.write_all_images(data_root)

    # -- helpers for tests and the demo -----------------------------------------------------------
    @property
    def request_count(self) -> int:
        return len(self.app[REQUEST_LOG_KEY].entries)

    def expire_tokens(self) -> None:
        """Every token issued so far is now answered with "Token expired. Please log in again"."""
        self._token_generation += 1

    def add_session(self, name: str, *, beamline: str = "i04-1", start: dt.datetime | None = None,
                    end: dt.datetime | None = None) -> EmulatedSession:
        self._sessions_by_name()
        session = self._ensure_session(name, beamline, start=start, end=end)
        if start is not None:
            session.start = start
        if end is not None:
            session.end = end
        return session

    def add_collection(self, session: str, sample: str, *, beamline: str | None = None,
                       write_files: bool = True, **kwargs: Any) -> Collection:
        """Record a new data collection (see `Campaign.add_collection` for the keywords).

        The beamline defaults to the session's; with a `data_root` the image files are written too.
        """
        known = self._sessions_by_name().get(session)
        beamline = beamline or (known.beamline if known else "i04-1")
        collection = self.campaign.add_collection(session, sample, beamline=beamline, **kwargs)
        if self.data_root is not None and write_files:
            self.campaign.write_images(self.data_root, collection)
        return collection

    def issue_token(self, login: str, *, ttl: float | None = None) -> str:
        now = int(time.time())
        ttl = self.token_ttl if ttl is None else ttl
        payload = {"login": login, "permissions": PERMISSIONS, "gen": self._token_generation,
                   "iat": now, "exp": now + int(ttl)}
        return jwt.encode(payload, self._secret, algorithm=JWT_ALGORITHM)

    # -- the campaign seen as ISPyB rows -----------------------------------------------------------
    def _ensure_session(self, name: str, beamline: str, *, start: dt.datetime | None = None,
                        end: dt.datetime | None = None) -> EmulatedSession:
        if name not in self._sessions:
            index = len(self._sessions)
            proposal_id = self._proposal_ids.setdefault(_proposal_of(name), FIRST_PROPOSAL_ID + len(self._proposal_ids))
            # Each visit starts a little after the previous one, an hour before the first collections.
            start = start or EPOCH - dt.timedelta(hours=1) + dt.timedelta(minutes=index)
            self._sessions[name] = EmulatedSession(FIRST_SESSION_ID + index, proposal_id, name, beamline,
                                                   start, end or start + dt.timedelta(days=2))
        return self._sessions[name]

    def _sessions_by_name(self) -> dict[str, EmulatedSession]:
        for target in self.campaign.targets:
            self._ensure_session(target.tas, target.beamline)
        for col in self.campaign.collections:
            self._ensure_session(col.session, col.beamline)
        return self._sessions

    def _collections(self, session: str) -> list[Collection]:
        return [c for c in self.campaign.collections if c.session == session]

    def _target_of(self, col: Collection) -> Target | None:
        found = self.campaign.experiment(col.sample)
        return found[0] if found else self.campaign.target_by_tas(col.session)

    def _acronym(self, col: Collection) -> str:
        target = self._target_of(col)
        return target.name if target else col.sample.split("-")[0]

    def _protein_id(self, col: Collection) -> int:
        target = self._target_of(col)
        return 9_000 + (target.target_id if target else 0)

    def _resolution(self, col: Collection) -> float:
        found = self.campaign.experiment(col.sample)
        return found[1].resolution if found else 1.8

    # -- JSON shapes (every field of the spec's schema, nulls where the server has none) ---------------
    def _session_json(self, s: EmulatedSession, collections: int) -> Json:
        now = dt.datetime.now()
        soon = dt.timedelta(minutes=20)
        return {
            "sessionId": s.session_id, "proposalId": s.proposal_id, "session": s.name, "proposal": s.proposal,
            "BeamLineSetup": None, "visit_number": s.visit_number, "startDate": _iso(s.start),
            "endDate": _iso(s.end), "beamLineName": s.beamline, "beamLineOperator": None, "scheduled": True,
            "comments": None, "nbReimbDewars": None,
            "_metadata": {
                "datacollections": collections, "uiGroups": ["mx"], "persons": 1,
                "active": s.start <= now <= s.end, "active_soon": s.start - soon <= now <= s.end + soon,
                "sessionTypes": [],
            },
        }

    def _proposal_json(self, name: str, all_sessions: dict[str, EmulatedSession]) -> Json:
        sessions = [s for s in all_sessions.values() if s.proposal == name]
        code = name.rstrip("0123456789")
        return {
            "proposalCode": code, "proposalNumber": name[len(code):], "proposal": name,
            "title": f"Fragment screening {name}", "state": "Open",
            "_metadata": {"persons": 1, "sessions": len(sessions),
                          "beamLines": sorted({s.beamline for s in sessions}), "uiGroups": ["mx"]},
            "proposalId": self._proposal_ids[name],
        }

    @staticmethod
    def _collection_json(col: Collection, resolution: float) -> Json:
        axis_range = 0.1
        return {
            "runStatus": col.run_status, "imageDirectory": col.facility_dir, "fileTemplate": col.file_template,
            "imageContainerSubPath": "/entry/data/data" if col.style == "h5" else None,
            "numberOfImages": col.images, "numberOfPasses": 1, "wavelength": 0.97625, "exposureTime": 0.04,
            "flux": 2.1e12, "xBeam": 212.3, "yBeam": 219.8, "beamSizeAtSampleX": 0.08, "beamSizeAtSampleY": 0.02,
            "transmission": 20.0, "resolution": resolution, "detectorDistance": 298.0, "axisStart": 0.0,
            "axisEnd": round(col.images * axis_range, 4), "axisRange": axis_range, "rotationAxis": "Omega",
            "overlap": 0.0, "phiStart": 0.0, "kappaStart": 0.0, "omegaStart": 0.0, "chiStart": 0.0,
            "xBeamPix": None, "yBeamPix": None, "magnification": None, "binning": None,
            "particleDiameter": None, "defocusStepSize": None, "amountAstigmatism": None, "voltage": None,
            "objAperture": None, "dataCollectionId": col.collection_id,
            "DataCollectionGroup": {"dataCollectionGroupId": col.group_id, "experimentType": col.experiment_type,
                                    "Workflow": None},
            "GridInfo": [],
            "_metadata": {"snapshots": {"1": True, "2": False, "3": False, "4": False}},
        }

    def _event_json(self, members: list[Collection], sessions: dict[str, EmulatedSession]) -> Json:
        """One event: a single collection, or a whole group represented by its newest collection."""
        newest = max(members, key=lambda c: (c.start, c.collection_id))
        session = sessions[newest.session]
        start = min(c.start for c in members)
        ends = [c.end for c in members if c.end is not None]
        end = max(ends) if ends else None  # SQL MAX(): unfinished collections do not count
        return {
            "id": newest.collection_id, "type": "dc", "startTime": _iso(start), "endTime": _iso(end),
            "duration": round((end - start).total_seconds() / 60, 2) if end else None,
            "count": len(members), "session": session.name, "sessionId": session.session_id,
            "proposal": session.proposal, "blSample": newest.sample, "blSampleId": newest.sample_id,
            "attachments": 0, "Item": self._collection_json(newest, self._resolution(newest)),
        }

    def _sample_json(self, col: Collection) -> Json:
        session = self._sessions_by_name()[col.session]
        count = sum(1 for c in self.campaign.collections if c.sample_id == col.sample_id)
        return {
            "name": col.sample, "comments": None, "location": 1 + col.sample_id % 16,
            "containerId": 70_000 + session.session_id,
            "Crystal": {
                "cell_a": None, "cell_b": None, "cell_c": None,
                "cell_alpha": None, "cell_beta": None, "cell_gamma": None,
                "Protein": {"proposalId": str(session.proposal_id), "name": self._acronym(col),
                            "acronym": self._acronym(col)},
                "crystalId": col.sample_id + 100_000, "proteinId": self._protein_id(col),
            },
            "blSampleId": col.sample_id,
            "Container": {"code": f"puck-{session.name}", "sampleChangerLocation": None,
                          "beamlineLocation": None},
            "_metadata": {"subsamples": 0, "datacollections": count, "types": ["OSC"], "queued": False,
                          "strategies": 0, "autoIntegrations": 0, "integratedResolution": None,
                          "proposal": session.proposal},
        }

    # -- auth --------------------------------------------------------------------------------------
    def _authenticate(self, request: web.Request) -> str:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("No token provided.")
        try:
            claims = jwt.decode(token.strip(), self._secret, algorithms=[JWT_ALGORITHM])
        except jwt.ExpiredSignatureError:
            raise Unauthorized("Token expired. Please log in again") from None
        except jwt.InvalidTokenError:
            raise Unauthorized("Invalid token") from None
        if claims.get("gen") != self._token_generation:
            raise Unauthorized("Token expired. Please log in again")
        return str(claims.get("login"))

    def _endpoint(self, handler: Handler, *, auth: bool = True) -> Handler:
        async def endpoint(request: web.Request) -> web.Response:
            try:
                if auth:
                    request[LOGIN_KEY] = self._authenticate(request)
                return await handler(request)
            except Unauthorized as exc:
                return web.json_response({"detail": exc.detail}, status=401)
            except InvalidRequest as exc:
                return web.json_response({"detail": exc.errors}, status=422)

        return endpoint

    # -- routes -------------------------------------------------------------------------------------
    def _add_routes(self) -> None:
        p = self.prefix
        r = self.app.router
        r.add_post(f"{p}/auth/login", self._endpoint(self.login, auth=False))
        r.add_get(f"{p}/auth/config", self._endpoint(self.auth_config, auth=False))
        r.add_get(f"{p}/user/current", self._endpoint(self.current_user))
        r.add_get(f"{p}/proposals", self._endpoint(self.proposals))
        r.add_get(f"{p}/proposals/{{proposal}}", self._endpoint(self.proposal))
        r.add_get(f"{p}/sessions", self._endpoint(self.sessions))
        r.add_get(f"{p}/sessions/{{sessionId}}", self._endpoint(self.session))
        r.add_get(f"{p}/events", self._endpoint(self.events))
        r.add_get(f"{p}/samples/{{blSampleId}}", self._endpoint(self.sample))

    async def login(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise InvalidRequest([{"loc": ["body"], "msg": "value is not a valid dict", "type": "type_error.dict"}])
        login, plugin = body.get("login"), body.get("plugin")
        credential = body.get("password") or body.get("token")
        if plugin not in PLUGINS:
            raise Unauthorized("Could not verify")
        if login not in self.users:
            raise Unauthorized("User does not exist in database.")
        if not credential or not secrets.compare_digest(str(credential), self.users[login]):
            raise Unauthorized("Could not verify")
        self.logins += 1
        return web.json_response({"login": login, "token": self.issue_token(login), "permissions": PERMISSIONS},
                                 status=201)

    async def auth_config(self, request: web.Request) -> web.Response:
        return web.json_response({"plugins": [{"name": name, "config": {}} for name in PLUGINS]})

    async def current_user(self, request: web.Request) -> web.Response:
        login = request[LOGIN_KEY]
        return web.json_response({
            "givenName": login.title(), "familyName": "Mirror", "login": login, "Permissions": PERMISSIONS,
            "personId": 1_000 + (sorted(self.users).index(login) if login in self.users else 0),
            "beamLineGroups": [], "beamLines": [],
        })

    async def proposals(self, request: web.Request) -> web.Response:
        sessions = self._sessions_by_name()
        search = request.query.get("search", "").lower()
        names = sorted(self._proposal_ids, key=self._proposal_ids.__getitem__, reverse=True)
        items = [self._proposal_json(n, sessions) for n in names]
        items = [i for i in items if not search or search in i["proposal"].lower() or search in i["title"].lower()]
        return _page(request, items)

    async def proposal(self, request: web.Request) -> web.Response:
        sessions = self._sessions_by_name()
        name = request.match_info["proposal"]
        if name not in self._proposal_ids:
            return _not_found("No such proposal")
        return web.json_response(self._proposal_json(name, sessions))

    async def sessions(self, request: web.Request) -> web.Response:
        _paging(request)  # 422 before any work, like FastAPI
        proposal = request.query.get("proposal")
        beamline = request.query.get("beamLineName")
        rows = [s for s in self._sessions_by_name().values()
                if (proposal is None or s.proposal == proposal) and (beamline is None or s.beamline == beamline)]
        rows.sort(key=lambda s: (s.start, s.session_id), reverse=True)
        counts = Counter(c.session for c in self.campaign.collections)
        return _page(request, rows, lambda s: self._session_json(s, counts[s.name]))

    async def session(self, request: web.Request) -> web.Response:
        session_id = _int_param(request, "sessionId", where="path")
        found = next((s for s in self._sessions_by_name().values() if s.session_id == session_id), None)
        if found is None:
            return _not_found("Session not found")
        return web.json_response(self._session_json(found, len(self._collections(found.name))))

    async def events(self, request: web.Request) -> web.Response:
        _paging(request)
        wanted = {name: _int_param(request, name) for name in (
            "sessionId", "proposalId", "dataCollectionId", "dataCollectionGroupId", "blSampleId", "proteinId")}
        beamline = request.query.get("beamLineName")
        status = request.query.get("status")
        if status is not None and status not in ("success", "failed", "processed", "processerror"):
            raise InvalidRequest([{"loc": ["query", "status"], "msg": "value is not a valid enumeration member",
                                   "type": "type_error.enum"}])
        event_type = request.query.get("eventType")
        # `session=` and `proposal=` (names) are deliberately not read: the real server ignores them too.
        sessions = self._sessions_by_name()

        def keep(c: Collection) -> bool:
            s = sessions[c.session]
            checks = [
                (wanted["sessionId"], s.session_id), (wanted["proposalId"], s.proposal_id),
                (wanted["dataCollectionId"], c.collection_id), (wanted["dataCollectionGroupId"], c.group_id),
                (wanted["blSampleId"], c.sample_id), (beamline, s.beamline),
            ]
            if any(want is not None and want != have for want, have in checks):
                return False
            if wanted["proteinId"] is not None and wanted["proteinId"] != self._protein_id(c):
                return False  # checked last: finding the protein searches the campaign
            if event_type is not None and event_type != "dc":
                return False  # only data collections are emulated
            if status == "success":
                return "success" in c.run_status.lower()
            if status == "failed":
                return "fail" in c.run_status.lower()
            return status is None  # no processing is emulated

        cols = [c for c in self.campaign.collections if keep(c)]
        if wanted["dataCollectionGroupId"] is not None or wanted["dataCollectionId"] is not None:
            units = [[c] for c in cols]
        else:
            groups: dict[int, list[Collection]] = {}
            for c in cols:
                groups.setdefault(c.group_id, []).append(c)
            units = list(groups.values())
        # Newest first, as the server orders by startTime DESC.
        units.sort(key=lambda m: (min(c.start for c in m), max(c.collection_id for c in m)), reverse=True)
        return _page(request, units, lambda members: self._event_json(members, sessions))

    async def sample(self, request: web.Request) -> web.Response:
        sample_id = _int_param(request, "blSampleId", where="path")
        col = next((c for c in self.campaign.collections if c.sample_id == sample_id), None)
        if col is None:
            return _not_found("No such sample")
        return web.json_response(self._sample_json(col))
