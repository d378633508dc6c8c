"""ISPyB emulator: the part of the py-ispyb core REST API mirrord reads, as the real server answers it.

Two sources of data behind one set of handlers: the shared synthetic `Campaign` (demo, benchmarks,
growth over time: a collection added to the campaign shows up at the next request), or the rows the
real server held while it was recorded (`IspybEmulator.from_seed`, `tests/data/recordings/ispyb/seed.json`),
which the differential conformance test replays every recorded request against.

What the recordings show and this emulator does (numbers are the recorded exchanges):
- login answers 201 with an HS256 JWT (002); lists page with `skip`/`limit`, defaults 0/25, `limit=0`
  a 422 (012, 020); datetimes are naive (fact 21); authentication runs before validation (117);
- `/events` folds a data collection GROUP into one event (id = MAX(dataCollectionId), count, MIN start,
  MAX end ignoring running collections, Item = the collection whose id is `id`) unless a
  `dataCollectionGroupId` is given (029, 033, 073); `eventType` filters on the group's
  `experimentType` (`OSC`, `Mesh`), never "dc" (028, 040); `blSample`/`blSampleId` are the group's (073);
  `status=failed` is "runStatus not like %success%", NULL matching neither (046-049);
- the `session=`/`proposal=` name filters apply when the name exists (even when not visible) and are
  silently ignored otherwise (056-061);
- what the login cannot see is `200 total 0` in lists, 404 by id (018, 025, 105).
"""

from __future__ import annotations

import datetime as dt
import re
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from aiohttp import web

from mirrord.emulators.base import REQUEST_LOG_KEY, Faults, make_app
from mirrord.emulators.campaign import EPOCH, Campaign, Collection, Target

DEFAULT_USERS: dict[str, str | None] = {"mirrord": "mirrord-password"}
PLUGINS = ("dummy",)
STAFF_PERMISSIONS = ["all_proposals"]  # the campaign's account: every session is visible to it
FIRST_SESSION_ID = 55_001
FIRST_PROPOSAL_ID = 4_001
JWT_ALGORITHM = "HS256"
DEFAULT_LIMIT = 25
STATUSES = ("success", "failed", "processed", "processerror")
SESSION_NAME = r"^(\w|-)+\d+-\d+$"  # the server's regex for `session=` (058)
NO_SNAPSHOTS = {"1": False, "2": False, "3": False, "4": False, "analysis": False}  # fact 18

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
    name: str  # "lb32627-66"; "lb90001-None" for a visit without number, as `/sessions` names it (008)
    beamline: str
    start: dt.datetime
    end: dt.datetime
    operator: str | None = None
    scheduled: bool = True
    comments: str | None = None

    @property
    def proposal(self) -> str:
        return _proposal_of(self.name)

    @property
    def visit_number(self) -> int | None:
        tail = self.name.rsplit("-", 1)[-1]
        return int(tail) if tail.isdigit() else None


@dataclass
class Row:
    """One data collection as the API joins it: its group's sample and experiment type, its Item fields."""

    collection_id: int
    group_id: int
    session: str  # the visit name, a key of the emulator's sessions
    run_status: str | None
    start: dt.datetime
    end: dt.datetime | None
    group_sample_id: int | None
    group_sample: str | None
    experiment_type: str
    item: Json  # the Item's own fields, runStatus … objAperture
    attachments: int = 0
    grid_info: list[Json] = field(default_factory=list)

    @property
    def seconds(self) -> float | None:
        return (self.end - self.start).total_seconds() if self.end is not None else None


@dataclass
class SampleRow:
    sample_id: int
    name: str
    proposal: str
    protein_id: int
    body: Json  # the answer of `/samples/{id}` without `_metadata`


@dataclass
class SeedData:
    """The recorded server's rows (`seed.json` `tables`), joined the way the API joins them."""

    sessions: dict[str, EmulatedSession]
    rows: list[Row]
    samples: dict[int, SampleRow]
    people: dict[str, Json]  # login -> {personId, givenName, familyName, permissions, proposals}

    @classmethod
    def from_seed(cls, seed: Mapping[str, Any]) -> SeedData:
        t = seed["tables"]
        proposals = {p["proposalId"]: p["proposalCode"] + p["proposalNumber"] for p in t["Proposal"]}
        sessions = {}
        for s in t["BLSession"]:
            name = f"{proposals[s['proposalId']]}-{s['visit_number']}"  # Python's "None" for NULL (008)
            sessions[name] = EmulatedSession(
                s["sessionId"], s["proposalId"], name, s["beamLineName"], _parse(s["startDate"]),
                _parse(s["endDate"]), operator=s["beamLineOperator"], scheduled=bool(s["scheduled"]),
                comments=s["comments"])
        by_id = {s.session_id: s.name for s in sessions.values()}
        groups = {g["dataCollectionGroupId"]: g for g in t["DataCollectionGroup"]}
        sample_names = {s["blSampleId"]: s["name"] for s in t["BLSample"]}
        attachments = Counter(a["dataCollectionId"] for a in t.get("DataCollectionFileAttachment", []))
        rows = []
        for c in t["DataCollection"]:
            group = groups[c["dataCollectionGroupId"]]
            keys = list(c)
            item = {k: c[k] for k in keys[keys.index("runStatus"): keys.index("objAperture") + 1]}
            rows.append(Row(c["dataCollectionId"], group["dataCollectionGroupId"], by_id[group["sessionId"]],
                            c["runStatus"], _parse(c["startTime"]), _parse(c["endTime"]), group["blSampleId"],
                            sample_names.get(group["blSampleId"]), group["experimentType"], item, attachments[c["dataCollectionId"]]))
        return cls(sessions, rows, _seed_samples(t, proposals), _seed_people(t, seed.get("visibility", {})))


def _seed_samples(t: Mapping[str, Any], proposals: dict[int, str]) -> dict[int, SampleRow]:
    crystals = {c["crystalId"]: c for c in t["Crystal"]}
    proteins = {p["proteinId"]: p for p in t["Protein"]}
    containers = {c["containerId"]: c for c in t["Container"]}
    samples = {}
    for s in t["BLSample"]:
        crystal = crystals[s["crystalId"]]
        protein = proteins[crystal["proteinId"]]
        container = containers[s["containerId"]]
        cell = {k: v for k, v in crystal.items() if k.startswith("cell_")}
        body = {
            "name": s["name"], "comments": s["comments"], "location": int(s["location"]),  # an integer (fact 14)
            "containerId": s["containerId"],
            "Crystal": {**cell, "Protein": {"proposalId": str(protein["proposalId"]), "name": protein["name"],
                                            "acronym": protein["acronym"]},
                        "crystalId": crystal["crystalId"], "proteinId": protein["proteinId"]},
            "blSampleId": s["blSampleId"],
            "Container": {"code": container["code"], "sampleChangerLocation": container["sampleChangerLocation"],
                          "beamlineLocation": container["beamlineLocation"]},
        }
        samples[s["blSampleId"]] = SampleRow(s["blSampleId"], s["name"], proposals[protein["proposalId"]],
                                             protein["proteinId"], body)
    return samples


def _seed_people(t: Mapping[str, Any], visibility: Mapping[str, Any]) -> dict[str, Json]:
    proposals = {p["proposalId"]: p["proposalCode"] + p["proposalNumber"] for p in t["Proposal"]}
    people = {}
    for person in t["Person"]:
        pid = person["personId"]
        sees = {proposals[link["proposalId"]] for link in t["ProposalHasPerson"] if link["personId"] == pid}
        sees |= {proposals[p["proposalId"]] for p in t["Proposal"] if p["personId"] == pid}
        people[person["login"]] = {
            "personId": pid, "givenName": person["givenName"], "familyName": person["familyName"],
            "permissions": list(visibility.get(person["login"], {}).get("permissions", [])), "proposals": sees}
    return people


class Unauthorized(Exception):
    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class InvalidRequest(Exception):
    """A FastAPI-style 422: `errors` are pydantic v1 error objects (`loc`, `msg`, `type`, `ctx`)."""

    def __init__(self, errors: list[Json]) -> None:
        super().__init__(errors)
        self.errors = errors


def _parse(value: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(value) if value else None


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
                       "type": "value_error.number.not_ge", "ctx": {"limit_value": 0}})
    if limit <= 0:
        errors.append({"loc": ["query", "limit"], "msg": "ensure this value is greater than 0",
                       "type": "value_error.number.not_gt", "ctx": {"limit_value": 0}})
    if errors:
        raise InvalidRequest(errors)
    return skip, limit


def _page(request: web.Request, rows: list[Any], render: Callable[[Any], Json] = lambda row: row) -> web.Response:
    """One page of `rows`; only the rows on it are rendered to JSON."""
    skip, limit = _paging(request)
    return web.json_response({"total": len(rows), "results": [render(row) for row in rows[skip: skip + limit]],
                              "skip": skip, "limit": limit})


def _status_param(request: web.Request) -> str | None:
    status = request.query.get("status")
    if status is not None and status not in STATUSES:
        permitted = ", ".join(f"'{s}'" for s in STATUSES)
        raise InvalidRequest([{"loc": ["query", "status"],
                               "msg": f"value is not a valid enumeration member; permitted: {permitted}",
                               "type": "type_error.enum", "ctx": {"enum_values": list(STATUSES)}}])
    return status


def _session_name_param(request: web.Request) -> str | None:
    name = request.query.get("session")
    if name is not None and not re.match(SESSION_NAME, name):
        raise InvalidRequest([{"loc": ["query", "session"], "msg": f'string does not match regex "{SESSION_NAME}"',
                               "type": "value_error.str.regex", "ctx": {"pattern": SESSION_NAME}}])
    return name


def _status_matches(row: Row, status: str | None) -> bool:
    """Applied per collection before grouping; a running collection (NULL) matches neither (046-049)."""
    if status is None:
        return True
    if row.run_status is None:
        return False
    succeeded = "success" in row.run_status.lower()
    return succeeded if status == "success" else not succeeded if status == "failed" else False


def _newest_first_distinct(values: Iterable[tuple[int, str]]) -> list[str]:
    """Distinct values in order of descending id: how the server lists experiment types (041, 098)."""
    return list(dict.fromkeys(value for _, value in sorted(values, reverse=True)))


class IspybEmulator:
    """`IspybEmulator(campaign).app` is an aiohttp app serving the ISPyB API under `prefix`."""

    def __init__(self, campaign: Campaign, *, data_root: Path | None = None, token_ttl: float = 18000,
                 prefix: str = "/ispyb/api/v1", users: Mapping[str, str | None] | None = None,
                 faults: Faults | None = None, extra_middlewares: Iterable[Any] = (),
                 seeded: SeedData | None = None) -> None:
        self.campaign = campaign
        self.seeded = seeded
        self.data_root = data_root
        self.token_ttl = token_ttl
        self.prefix = "/" + prefix.strip("/") if prefix.strip("/") else ""
        # login -> password; None: the dummy plugin takes any password or none (seeded logins, 006).
        if users is None:
            users = {login: None for login in seeded.people} if seeded else DEFAULT_USERS
        self.users = dict(users)
        self.logins = 0  # successful logins, so tests can see re-logins
        self._secret = secrets.token_hex(32)
        # Tokens carry the generation they were issued in; expire_tokens() bumps it.
        self._token_generation = 0
        self._sessions: dict[str, EmulatedSession] = {}
        self._proposal_ids: dict[str, int] = {}
        self._campaign_samples: dict[int, SampleRow] = {}
        # How much of the campaign (which only grows) is already indexed: each request reads only what is new.
        self._indexed = {"targets": 0, "sessions": 0, "samples": 0, "rows": 0}
        self._by_session: dict[str, list[Collection]] = {}
        self._usage: tuple[int, tuple[Counter[int], dict[int, list[str]]]] | None = None
        self.app = make_app(faults)
        self.app.middlewares.extend(extra_middlewares)
        self.app.middlewares.append(self._not_found_middleware)
        self._add_routes()
        self._sessions_by_name()  # the campaign's visits get the first ids, in campaign order
        if data_root is not None:
            campaign.write_all_images(data_root)

    @classmethod
    def from_seed(cls, seed: Mapping[str, Any], **kwargs: Any) -> IspybEmulator:
        """The data the real server held while recorded (`seed.json`), seen through logins of its `Person`s."""
        return cls(Campaign(targets=[], collections=[], unrelated=[]), seeded=SeedData.from_seed(seed), **kwargs)

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

    def issue_token(self, login: str, *, ttl: float | None = None, secret: str | None = None) -> str:
        """A token as the login answers it; `ttl` < 0 gives an expired one, `secret` a foreign signature."""
        now = int(time.time())
        ttl = self.token_ttl if ttl is None else ttl
        person = self._person(login)
        payload = {"login": login, "personId": person["personId"], "permissions": person["permissions"],
                   "gen": self._token_generation, "iat": now, "exp": now + int(ttl)}
        return jwt.encode(payload, secret or self._secret, algorithm=JWT_ALGORITHM)

    def _person(self, login: str) -> Json:
        if self.seeded is not None and login in self.seeded.people:
            return self.seeded.people[login]
        index = sorted(self.users).index(login) if login in self.users else 0
        return {"personId": 1_000 + index, "givenName": login.title(), "familyName": "Mirror",
                "permissions": STAFF_PERMISSIONS, "proposals": None}

    def _visible(self, request: web.Request) -> set[str] | None:
        """The proposals the caller may see; None: all of them (the campaign's staff account)."""
        return self._person(request[LOGIN_KEY])["proposals"]

    # -- the data, from the seed or the campaign ------------------------------------------------------
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
        if self.seeded is not None:
            return self.seeded.sessions
        for target in self._new("targets", self.campaign.targets):
            self._ensure_session(target.tas, target.beamline)
        for col in self._new("sessions", self.campaign.collections):
            self._ensure_session(col.session, col.beamline)
        return self._sessions

    def _new(self, index: str, items: list[Any]) -> list[Any]:
        """The items appended since `index` was last brought up to date."""
        start, self._indexed[index] = self._indexed[index], len(items)
        return items[start:]

    def _rows(self, *, sessions: set[str] | None = None, group_id: int | None = None,
              collection_id: int | None = None) -> list[Row]:
        """Collections narrowed by the cheap filters first; campaign ones are converted only when kept."""
        source: Iterable[Any] = self.seeded.rows if self.seeded is not None else self.campaign.collections
        if self.seeded is None and sessions is not None:
            for col in self._new("rows", self.campaign.collections):
                self._by_session.setdefault(col.session, []).append(col)
            source = [c for name in sessions for c in self._by_session.get(name, ())]
        kept = [c for c in source if (sessions is None or c.session in sessions)
                and (group_id is None or c.group_id == group_id)
                and (collection_id is None or c.collection_id == collection_id)]
        return kept if self.seeded is not None else [self._campaign_row(c) for c in kept]

    def _campaign_row(self, col: Collection) -> Row:
        # The campaign's groups hold one sample, so the group's sample is the collection's.
        return Row(col.collection_id, col.group_id, col.session, col.run_status, col.start, col.end, col.sample_id,
                   col.sample, col.experiment_type, self._campaign_item(col))

    def _samples(self) -> dict[int, SampleRow]:
        if self.seeded is not None:
            return self.seeded.samples
        for col in self._new("samples", self.campaign.collections):
            if col.sample_id not in self._campaign_samples:
                self._campaign_samples[col.sample_id] = self._campaign_sample(col)
        return self._campaign_samples

    def _sample_usage(self) -> tuple[Counter[int], dict[int, list[str]]]:
        """Per sample: collections reached through their GROUP's sample, and their experiment types (fact 14)."""
        if self.seeded is None:
            size = len(self.campaign.collections)
            if self._usage is None or self._usage[0] != size:  # the campaign only grows
                counts = Counter(c.sample_id for c in self.campaign.collections)
                self._usage = size, (counts, {sample_id: ["OSC"] for sample_id in counts})
            return self._usage[1]
        rows = self.seeded.rows
        counts = Counter(r.group_sample_id for r in rows if r.group_sample_id is not None)
        types: dict[int, list[tuple[int, str]]] = {}
        for r in rows:
            if r.group_sample_id is not None:
                types.setdefault(r.group_sample_id, []).append((r.group_id, r.experiment_type))
        return counts, {sid: _newest_first_distinct(found) for sid, found in types.items()}

    def _target_of(self, col: Collection) -> Target | None:
        found = self.campaign.experiment(col.sample)
        return found[0] if found else self.campaign.target_by_tas(col.session)

    def _campaign_item(self, col: Collection) -> Json:
        found = self.campaign.experiment(col.sample)
        axis_range = 0.1
        return {
            "runStatus": col.run_status, "imageDirectory": col.facility_dir, "fileTemplate": col.file_template,
            "imageContainerSubPath": "/entry/data/data" if col.style == "h5" else None,
            "numberOfImages": col.images, "numberOfPasses": 1, "wavelength": 0.97625, "exposureTime": 0.04,
            "flux": 2.1e12, "xBeam": 212.3, "yBeam": 219.8, "beamSizeAtSampleX": 0.08, "beamSizeAtSampleY": 0.02,
            "transmission": 20.0, "resolution": found[1].resolution if found else 1.8, "detectorDistance": 298.0,
            "axisStart": 0.0, "axisEnd": round(col.images * axis_range, 4), "axisRange": axis_range,
            "rotationAxis": "Omega", "overlap": 0.0, "phiStart": 0.0, "kappaStart": 0.0, "omegaStart": 0.0,
            "chiStart": 0.0, "xBeamPix": None, "yBeamPix": None, "magnification": None, "binning": 1,
            "particleDiameter": None, "defocusStepSize": None, "amountAstigmatism": None, "voltage": None,
            "objAperture": None,
        }

    def _campaign_sample(self, col: Collection) -> SampleRow:
        session = self._sessions_by_name()[col.session]
        target = self._target_of(col)
        acronym = target.name if target else col.sample.split("-")[0]
        protein_id = 9_000 + (target.target_id if target else 0)
        body = {
            "name": col.sample, "comments": None, "location": 1 + col.sample_id % 16,
            "containerId": 70_000 + session.session_id,
            "Crystal": {
                "cell_a": None, "cell_b": None, "cell_c": None, "cell_alpha": None, "cell_beta": None,
                "cell_gamma": None,
                "Protein": {"proposalId": str(session.proposal_id), "name": acronym, "acronym": acronym},
                "crystalId": col.sample_id + 100_000, "proteinId": protein_id,
            },
            "blSampleId": col.sample_id,
            "Container": {"code": f"puck-{session.name}", "sampleChangerLocation": None, "beamlineLocation": None},
        }
        return SampleRow(col.sample_id, col.sample, session.proposal, protein_id, body)

    # -- JSON shapes (every field of the spec's schema, nulls where the server has none) ---------------
    def _session_json(self, s: EmulatedSession, collections: int) -> Json:
        now = dt.datetime.now()
        soon = dt.timedelta(minutes=20)
        return {
            "sessionId": s.session_id, "proposalId": s.proposal_id, "session": s.name, "proposal": s.proposal,
            "BeamLineSetup": None, "visit_number": s.visit_number, "startDate": _iso(s.start),
            "endDate": _iso(s.end), "beamLineName": s.beamline, "beamLineOperator": s.operator,
            "scheduled": s.scheduled, "comments": s.comments, "nbReimbDewars": None,
            "_metadata": {
                # persons counts Session_has_Person and uiGroups the beamline's groups: none here (fact 13).
                "datacollections": collections, "uiGroups": [], "persons": 0,
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
                          "beamLines": sorted({s.beamline for s in sessions}), "uiGroups": []},
            "proposalId": self._proposal_ids[name],
        }

    @staticmethod
    def _item_json(row: Row) -> Json:
        return {**row.item, "dataCollectionId": row.collection_id,
                "DataCollectionGroup": {"dataCollectionGroupId": row.group_id, "experimentType": row.experiment_type,
                                        "Workflow": None},
                "GridInfo": row.grid_info, "_metadata": {"snapshots": dict(NO_SNAPSHOTS)}}

    def _event_json(self, members: list[Row], session: EmulatedSession, *, per_collection: bool,
                    sum_rounded: bool) -> Json:
        """One event: one collection, or a whole group shown through its highest collection id (facts 3-5)."""
        newest = max(members, key=lambda r: r.collection_id)
        ends = [r.end for r in members if r.end is not None]
        seconds = [r.seconds for r in members if r.seconds is not None]
        if not seconds:
            duration = None
        elif per_collection or sum_rounded:
            # Each collection's minutes to 4 decimals (063); with proposalId their sum (054).
            duration = round(sum(round(s / 60, 4) for s in seconds), 4)
        else:
            duration = round(sum(seconds) / 60, 8)  # by session or unfiltered: the summed seconds (029)
        return {
            "id": newest.collection_id, "type": "dc", "startTime": _iso(min(r.start for r in members)),
            "endTime": _iso(max(ends) if ends else None),  # SQL MAX(): a running collection does not count
            "duration": duration, "count": len(members),
            # SQL CONCAT with a NULL visit number is NULL (035), unlike `/sessions` (008).
            "session": session.name if session.visit_number is not None else None,
            "sessionId": session.session_id, "proposal": session.proposal,
            "blSample": newest.group_sample, "blSampleId": newest.group_sample_id,
            "attachments": sum(r.attachments for r in members), "Item": self._item_json(newest),
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

    @web.middleware
    async def _not_found_middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """FastAPI's answers for unknown routes: a 307 to the path without its trailing slash (119),
        else `{"detail": "Not Found"}` (118)."""
        try:
            return await handler(request)
        except web.HTTPNotFound:
            path = request.path
            if path.endswith("/") and path != "/":
                match = await self.app.router.resolve(request.clone(rel_url=request.rel_url.with_path(path[:-1])))
                if match.http_exception is None:
                    location = request.url.with_path(path[:-1]).with_query(request.query_string)
                    return web.Response(status=307, headers={"Location": str(location)})
            return _not_found("Not Found")

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
        r.add_get(f"{p}/events/types", self._endpoint(self.event_types))
        r.add_get(f"{p}/samples", self._endpoint(self.samples))
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
        expected = self.users[login]
        if expected is not None and (not credential or not secrets.compare_digest(str(credential), expected)):
            raise Unauthorized("Could not verify")
        self.logins += 1
        return web.json_response({"login": login, "token": self.issue_token(login),
                                  "permissions": self._person(login)["permissions"]}, status=201)

    async def auth_config(self, request: web.Request) -> web.Response:
        return web.json_response({"plugins": [{"name": name, "config": {}} for name in PLUGINS]})

    async def current_user(self, request: web.Request) -> web.Response:
        login = request[LOGIN_KEY]
        person = self._person(login)
        return web.json_response({
            "givenName": person["givenName"], "familyName": person["familyName"], "login": login,
            "Permissions": person["permissions"], "personId": person["personId"], "beamLineGroups": [],
            "beamLines": [],
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

    def _visible_sessions(self, request: web.Request) -> list[EmulatedSession]:
        visible = self._visible(request)
        return [s for s in self._sessions_by_name().values() if visible is None or s.proposal in visible]

    def _collection_counts(self) -> Counter[str]:
        source = self.seeded.rows if self.seeded is not None else self.campaign.collections
        return Counter(c.session for c in source)

    async def sessions(self, request: web.Request) -> web.Response:
        _paging(request)  # 422 before any work, like FastAPI
        proposal = request.query.get("proposal")
        beamline = request.query.get("beamLineName")
        rows = [s for s in self._visible_sessions(request)
                if (proposal is None or s.proposal == proposal) and (beamline is None or s.beamline == beamline)]
        rows.sort(key=lambda s: (s.start, s.session_id), reverse=True)
        counts = self._collection_counts()  # collections, not groups (fact 13)
        return _page(request, rows, lambda s: self._session_json(s, counts[s.name]))

    async def session(self, request: web.Request) -> web.Response:
        session_id = _int_param(request, "sessionId", where="path")
        found = next((s for s in self._visible_sessions(request) if s.session_id == session_id), None)
        if found is None:
            return _not_found("Session not found")
        return web.json_response(self._session_json(found, self._collection_counts()[found.name]))

    def _event_sessions(self, request: web.Request) -> set[str]:
        """The sessions `/events` may answer from: visible ones, narrowed by the session filters."""
        name = _session_name_param(request)
        session_id = _int_param(request, "sessionId")
        proposal_id = _int_param(request, "proposalId")
        proposal = request.query.get("proposal")
        beamline = request.query.get("beamLineName")
        every = self._sessions_by_name()
        # A name that names nothing is ignored; one that exists filters, visible or not (056-061).
        if name not in every:
            name = None
        if proposal is not None and not any(s.proposal == proposal for s in every.values()):
            proposal = None
        return {s.name for s in self._visible_sessions(request)
                if (name is None or s.name == name) and (session_id is None or s.session_id == session_id)
                and (proposal_id is None or s.proposal_id == proposal_id)
                and (proposal is None or s.proposal == proposal) and (beamline is None or s.beamline == beamline)}

    async def events(self, request: web.Request) -> web.Response:
        _paging(request)
        wanted = {name: _int_param(request, name) for name in (
            "dataCollectionId", "dataCollectionGroupId", "blSampleId", "proteinId")}
        status = _status_param(request)
        sessions = self._event_sessions(request)
        event_type = request.query.get("eventType")  # the group's experimentType (fact 1)
        group_id = wanted["dataCollectionGroupId"]
        rows = self._rows(sessions=sessions, group_id=group_id, collection_id=wanted["dataCollectionId"])
        samples = self._samples() if wanted["proteinId"] is not None else {}
        rows = [r for r in rows if (event_type is None or r.experiment_type == event_type)
                and (wanted["blSampleId"] is None or r.group_sample_id == wanted["blSampleId"])
                and (wanted["proteinId"] is None or (r.group_sample_id in samples
                                                     and samples[r.group_sample_id].protein_id == wanted["proteinId"]))
                and _status_matches(r, status)]
        per_collection = group_id is not None  # a group id lists its collections (fact 6)
        if per_collection:
            units = [[r] for r in rows]
        else:
            groups: dict[int, list[Row]] = {}
            for r in rows:
                groups.setdefault(r.group_id, []).append(r)
            units = list(groups.values())
        # Newest first, as the server orders by startTime DESC.
        units.sort(key=lambda m: (min(r.start for r in m), max(r.collection_id for r in m)), reverse=True)
        sum_rounded = request.query.get("proposalId") is not None
        every = self._sessions_by_name()
        return _page(request, units, lambda m: self._event_json(m, every[m[0].session], per_collection=per_collection,
                                                                sum_rounded=sum_rounded))

    async def event_types(self, request: web.Request) -> web.Response:
        rows = self._rows(sessions=self._event_sessions(request))
        types = _newest_first_distinct((r.group_id, r.experiment_type) for r in rows)
        # The server echoes skip 0 and limit = total (041).
        return web.json_response({"total": len(types), "results": [{"eventTypeName": t, "eventType": t}
                                                                   for t in types],
                                  "skip": 0, "limit": len(types)})

    def _sample_json(self, sample: SampleRow, usage: tuple[Counter[int], dict[int, list[str]]]) -> Json:
        counts, types = usage
        return {**sample.body, "_metadata": {
            "subsamples": 0, "datacollections": counts[sample.sample_id], "types": types.get(sample.sample_id),
            "queued": False, "strategies": 0, "autoIntegrations": 0, "integratedResolution": None,
            "proposal": sample.proposal}}

    def _visible_samples(self, request: web.Request) -> dict[int, SampleRow]:
        visible = self._visible(request)
        return {sid: s for sid, s in self._samples().items() if visible is None or s.proposal in visible}

    async def samples(self, request: web.Request) -> web.Response:
        _paging(request)
        proposal = request.query.get("proposal")
        protein_id = _int_param(request, "proteinId")
        rows = [s for s in self._visible_samples(request).values()
                if (proposal is None or s.proposal == proposal) and (protein_id is None or s.protein_id == protein_id)]
        rows.sort(key=lambda s: s.sample_id, reverse=True)  # newest first (121)
        usage = self._sample_usage()
        return _page(request, rows, lambda s: self._sample_json(s, usage))

    async def sample(self, request: web.Request) -> web.Response:
        sample_id = _int_param(request, "blSampleId", where="path")
        found = self._visible_samples(request).get(sample_id)
        if found is None:
            return _not_found("Sample not found")
        return web.json_response(self._sample_json(found, self._sample_usage()))
