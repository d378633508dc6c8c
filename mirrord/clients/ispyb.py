"""ISPyB client: sessions, their data collections (as events) and samples from the py-ispyb REST API.

What the real server does (recorded exchanges in `tests/data/recordings/ispyb`, numbers in comments):
`/events` without `dataCollectionGroupId` gives one event per data collection GROUP, with `count`
collections, `id` its highest collection id and an `endTime` that ignores a running collection
(029, 033); with it, one event per collection (073). `eventType` filters on the group's
`experimentType` (`OSC`, `Mesh`): we never send it, and tell a grid scan by its experiment type (031).
`blSample`/`blSampleId` are the GROUP's sample and may be null (073); a collection's own sample is not
exposed. What the login cannot see answers `200 total 0`, never an error (018, 051, 126).

Auth is a JWT from `POST /auth/login` with no refresh endpoint: we read its `exp` (unverified; only
the server can verify it), log in again shortly before it runs out, and on any 401 log in again once
and retry. With a `token_file` the JWT outlives the process (it is valid for 5 hours, fact 15): the
next run uses it while it is fresh and was stored for our login on this server, instead of logging in
again. Lists page with `skip`/`limit` until `skip >= total`. Parsing is lenient (site forks add fields,
and null appears where the spec says it cannot) but a missing key we rely on is a `ProtocolError`
naming the endpoint and the record.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import structlog

from mirrord.clients.errors import AuthError, ProtocolError
from mirrord.clients.http import HttpClient, UpstreamClient
from mirrord.clients.token_file import TokenFile, account
from mirrord.redact import redact, register_secret

log = structlog.get_logger("mirrord.ispyb")

SERVICE = "ispyb"
# `x_2_%04d.cbf`, `x_2_####.cbf`, `x_2_master.h5`: the run is the number before the frame field.
_RUN_IN_TEMPLATE = re.compile(r".+_(?P<run>\d+)_(?:%0?\d*d|#+|master)\.[^._]+")


def run_number(file_template: str | None) -> int | None:
    """ISPyB's `dataCollectionNumber`, read from the template: the API does not expose it (fact 18),
    and every recorded row's `fileTemplate` is `<imagePrefix>_<dataCollectionNumber>_<frames>`
    (seed.json); None for a template of another shape."""
    found = _RUN_IN_TEMPLATE.fullmatch(file_template or "")
    return int(found["run"]) if found else None


# -- typed results ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class IspybSession:
    session_id: int
    proposal_id: int | None
    name: str  # the visit, "lb32627-66" (== a Fragalysis Target Access String)
    proposal: str | None
    visit_number: int | None
    start: dt.datetime | None  # naive facility-local time, as the server sends it
    end: dt.datetime | None
    beamline: str | None
    datacollections: int | None  # a cheap change signal: re-scan events only when it moves
    active: bool | None


@dataclass(frozen=True)
class GroupEvent:
    """One data collection group as `/events` summarises it; `newest_collection_id` moves as it grows."""

    group_id: int
    newest_collection_id: int
    count: int
    start: dt.datetime | None
    end: dt.datetime | None
    sample_name: str | None  # the group's sample, null when the group has none (073)
    sample_id: int | None
    session_id: int | None
    # The group's only collection, parsed from the event's `Item`, when `count == 1`: then the event
    # describes it exactly and `group_collections` need not be asked (most groups hold one collection).
    single: DataCollection | None = None


@dataclass(frozen=True)
class DataCollection:
    collection_id: int
    group_id: int
    run_status: str | None
    image_directory: str | None  # on the facility file system; sites map its prefix to their mount
    file_template: str | None  # "x_%04d.cbf", "x_####.cbf" or "x_master.h5"
    number_of_images: int | None
    start: dt.datetime | None
    end: dt.datetime | None
    sample_name: str | None  # the GROUP's sample (the collection's own is not exposed): may be null
    sample_id: int | None
    image_container_sub_path: str | None
    wavelength: float | None
    resolution: float | None
    exposure_time: float | None
    number_of_passes: int | None
    experiment_type: str | None  # the group's: "OSC" a rotation, "Mesh" a grid scan (031)
    session_id: int | None

    @property
    def run_number(self) -> int | None:
        return run_number(self.file_template)

    @property
    def succeeded(self) -> bool:
        return "success" in (self.run_status or "").lower()

    @property
    def complete(self) -> bool:
        """Finished and successful: its images are all on disk."""
        return self.succeeded and self.end is not None


@dataclass(frozen=True)
class Sample:
    sample_id: int
    name: str
    protein_acronym: str | None


# -- lenient field readers ------------------------------------------------------------------------------
class _Record:
    """One JSON object from an answer, with readers that raise ProtocolError naming where it came from."""

    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, Mapping):
            raise ProtocolError(SERVICE, f"expected an object in {where}", detail=redact(repr(data)[:200]))
        self.data = data
        self.where = where

    def _bad(self, key: str, value: Any, expected: str) -> ProtocolError:
        return ProtocolError(SERVICE, f"{self.where}: field {key!r} is not {expected}",
                             detail=redact(repr(value)[:200]))

    def child(self, key: str, *, required: bool = False) -> _Record | None:
        value = self.data.get(key)
        if value is None:
            if required:
                raise self._bad(key, value, "an object")
            return None
        return _Record(value, f"{self.where}.{key}")

    def get_int(self, key: str, *, required: bool = False) -> int | None:
        value = self.data.get(key)
        if value is None:
            if required:
                raise self._bad(key, value, "an integer")
            return None
        if isinstance(value, bool):
            raise self._bad(key, value, "an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)  # some forks serialise ids as strings
        raise self._bad(key, value, "an integer")

    def get_float(self, key: str) -> float | None:
        value = self.data.get(key)
        if value is None:
            return None
        if isinstance(value, bool):
            raise self._bad(key, value, "a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise self._bad(key, value, "a number") from None

    def get_str(self, key: str, *, required: bool = False) -> str | None:
        value = self.data.get(key)
        if value is None:
            if required:
                raise self._bad(key, value, "a string")
            return None
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise self._bad(key, value, "a string")

    def get_bool(self, key: str) -> bool | None:
        value = self.data.get(key)
        if value is None or isinstance(value, bool):
            return value
        raise self._bad(key, value, "a boolean")

    def get_datetime(self, key: str) -> dt.datetime | None:
        value = self.data.get(key)
        if value is None or value == "":
            return None
        if not isinstance(value, str):
            raise self._bad(key, value, "an ISO date-time")
        try:
            # Naive stays naive: ISPyB sends facility-local time without a zone.
            return dt.datetime.fromisoformat(value)
        except ValueError:
            raise self._bad(key, value, "an ISO date-time") from None


def _parse_session(rec: _Record) -> IspybSession:
    meta = rec.child("_metadata")
    return IspybSession(
        session_id=rec.get_int("sessionId", required=True), proposal_id=rec.get_int("proposalId"),
        name=rec.get_str("session", required=True), proposal=rec.get_str("proposal"),
        visit_number=rec.get_int("visit_number"), start=rec.get_datetime("startDate"), end=rec.get_datetime("endDate"),
        beamline=rec.get_str("beamLineName"),
        datacollections=meta.get_int("datacollections") if meta else None,
        active=meta.get_bool("active") if meta else None,
    )


def _group_id(item: _Record) -> int:
    group = item.child("DataCollectionGroup", required=True)
    return group.get_int("dataCollectionGroupId", required=True)


def _parse_group_event(rec: _Record) -> GroupEvent:
    item = rec.child("Item", required=True)
    count = rec.get_int("count") or 1
    return GroupEvent(
        group_id=_group_id(item), newest_collection_id=rec.get_int("id", required=True),
        count=count, start=rec.get_datetime("startTime"), end=rec.get_datetime("endTime"),
        sample_name=rec.get_str("blSample"), sample_id=rec.get_int("blSampleId"), session_id=rec.get_int("sessionId"),
        single=_parse_collection(rec) if count == 1 else None,
    )


def _parse_collection(rec: _Record) -> DataCollection:
    item = rec.child("Item", required=True)
    group = item.child("DataCollectionGroup", required=True)
    return DataCollection(
        collection_id=item.get_int("dataCollectionId", required=True),
        group_id=group.get_int("dataCollectionGroupId", required=True),
        run_status=item.get_str("runStatus"), image_directory=item.get_str("imageDirectory"),
        file_template=item.get_str("fileTemplate"), number_of_images=item.get_int("numberOfImages"),
        start=rec.get_datetime("startTime"), end=rec.get_datetime("endTime"),
        sample_name=rec.get_str("blSample"), sample_id=rec.get_int("blSampleId"),
        image_container_sub_path=item.get_str("imageContainerSubPath"), wavelength=item.get_float("wavelength"),
        resolution=item.get_float("resolution"), exposure_time=item.get_float("exposureTime"),
        number_of_passes=item.get_int("numberOfPasses"), experiment_type=group.get_str("experimentType"),
        session_id=rec.get_int("sessionId"),
    )


def _parse_sample(rec: _Record) -> Sample:
    crystal = rec.child("Crystal")
    protein = crystal.child("Protein") if crystal else None
    return Sample(sample_id=rec.get_int("blSampleId", required=True), name=rec.get_str("name", required=True),
                  protein_acronym=protein.get_str("acronym") if protein else None)


# -- the client ------------------------------------------------------------------------------------------
class IspybClient(UpstreamClient):
    """`async with IspybClient(base_url, login=..., password=...) as ispyb:`; `base_url` ends in `/api/v1`."""

    def __init__(self, base_url: str, *, plugin: str = "dummy", login: str, password: str | None = None,
                 token: str | None = None, page_size: int = 100, refresh_margin: float = 60.0,
                 http: HttpClient | Mapping[str, Any] | None = None,
                 clock: Callable[[], float] = time.time, token_file: Path | None = None) -> None:
        if page_size < 1:
            raise ValueError("page_size must be at least 1 (the server refuses limit=0)")
        self.plugin = plugin
        self.login_name = login
        self._password = password
        self._sso_token = token  # a Keycloak access token, for plugins that take one
        register_secret(password)
        register_secret(token)
        self.page_size = page_size
        self.refresh_margin = refresh_margin
        self._clock = clock
        # An HttpClient handed in belongs to the caller; one built from keyword arguments is ours to close.
        super().__init__(SERVICE, base_url, http)
        self._jwt: str | None = None
        self._jwt_expires: float | None = None
        # The cache names our login on this server: another account's or server's JWT is never sent.
        self._tokens = None if token_file is None else TokenFile(token_file, account(login, self.http.base_url))
        self._login_lock = asyncio.Lock()
        self._samples: dict[int, Sample] = {}
        self.logins = 0

    # -- auth ------------------------------------------------------------------------------------------
    def _token_fresh(self) -> bool:
        if self._jwt is None:
            return False
        if self._jwt_expires is None:
            return True  # an opaque token: we learn it expired from a 401
        return self._clock() < self._jwt_expires - self.refresh_margin

    async def sign_in(self) -> None:
        """Log in unless a fresh token is held: a job's start proves the credentials, within its timeout."""
        if not self._token_fresh():
            await self._login(self._jwt)

    async def _login(self, stale: str | None) -> str:
        """Log in unless another task already replaced the `stale` token; return the token to use."""
        async with self._login_lock:
            if self._jwt is not None and self._jwt != stale:
                return self._jwt
            if stale is None and (cached := await self._cached_token()) is not None:
                return cached
            body = {"plugin": self.plugin, "login": self.login_name, "password": self._password,
                    "token": self._sso_token}
            try:
                # Logging in changes nothing on the server, so a lost answer may be retried.
                resp = await self.http.request("POST", "auth/login", json_body=body, ok=(200, 201), retry=True)
            except AuthError as exc:
                raise AuthError(SERVICE, f"login refused for {self.login_name!r} with plugin {self.plugin!r}",
                                status=exc.status, url=exc.url, detail=exc.detail) from None
            rec = _Record(resp.json(SERVICE), "POST /auth/login")
            token = rec.get_str("token", required=True)
            register_secret(token)
            self._jwt, self._jwt_expires = token, self._expiry(token)
            self.logins += 1
            log.debug("ispyb.login", login=self.login_name, plugin=self.plugin, expires=self._jwt_expires)
            if self._tokens is not None:
                await asyncio.to_thread(self._tokens.write, token)
            return token

    async def _cached_token(self) -> str | None:
        """The token a previous run stored, if it names our login and stays fresh for a while yet; it
        is taken as held (a 401 replaces it). Only a JWT qualifies: an opaque token's age is unknown."""
        if self._tokens is None or (token := await asyncio.to_thread(self._tokens.read)) is None:
            return None
        try:
            claims = jwt.decode(token, options={"verify_signature": False})
        except jwt.InvalidTokenError:
            return None
        expires = self._expiry(token)
        if claims.get("login", self.login_name) != self.login_name or expires is None \
                or self._clock() >= expires - self.refresh_margin:
            return None
        register_secret(token)
        self._jwt, self._jwt_expires = token, expires
        log.debug("ispyb.token_reused", login=self.login_name, expires=expires)
        return token

    @staticmethod
    def _expiry(token: str) -> float | None:
        try:
            claims = jwt.decode(token, options={"verify_signature": False})
        except jwt.InvalidTokenError:
            return None
        exp = claims.get("exp")
        return float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None

    async def _get(self, path: str, params: Mapping[str, Any] | None = None) -> Any:
        token = self._jwt if self._token_fresh() else await self._login(self._jwt)
        try:
            resp = await self.http.request("GET", path, params=params, headers=self._auth(token))
        except AuthError as exc:
            if exc.status != 401:
                raise
            log.info("ispyb.relogin", reason=exc.detail)
            token = await self._login(token)
            resp = await self.http.request("GET", path, params=params, headers=self._auth(token))
        return resp.json(SERVICE)

    @staticmethod
    def _auth(token: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    # -- paging ---------------------------------------------------------------------------------------
    async def _paged(self, path: str, params: Mapping[str, Any]) -> AsyncIterator[_Record]:
        skip = 0
        while True:
            query = {**{k: v for k, v in params.items() if v is not None}, "skip": skip, "limit": self.page_size}
            page = _Record(await self._get(path, query), f"GET {path} (skip={skip})")
            total = page.get_int("total", required=True)
            results = page.data.get("results")
            if not isinstance(results, list):
                raise ProtocolError(SERVICE, f"{page.where}: 'results' is not a list",
                                    detail=redact(repr(results)[:200]))
            for index, item in enumerate(results):
                yield _Record(item, f"{page.where} results[{index}]")
            skip += len(results)
            if skip >= total or not results:  # an empty page before `total` would otherwise loop forever
                return

    # -- API ------------------------------------------------------------------------------------------
    async def sessions(self, *, proposal: str | None = None,
                       beamline: str | None = None) -> AsyncIterator[IspybSession]:
        """Visits, newest first. A session seen twice (rows shifting between pages) is yielded once."""
        seen: set[int] = set()
        async for rec in self._paged("sessions", {"proposal": proposal, "beamLineName": beamline}):
            session = _parse_session(rec)
            if session.session_id not in seen:
                seen.add(session.session_id)
                yield session

    async def session_events(self, session_id: int) -> list[GroupEvent]:
        """One entry per data collection group of the session, grid scans included (by id: a name that
        names no session is ignored upstream, 057). No `eventType`: it names an experiment type (028)."""
        groups: dict[int, GroupEvent] = {}
        async for rec in self._paged("events", {"sessionId": session_id}):
            if rec.data.get("type") != "dc":
                continue
            event = _parse_group_event(rec)
            if event.session_id not in (None, session_id):
                # A server that ignored the filter (as it does `session=` names): never mix sessions.
                log.warning("ispyb.foreign_event", asked=session_id, got=event.session_id)
                continue
            groups.setdefault(event.group_id, event)
        return list(groups.values())

    async def group_collections(self, group_id: int) -> list[DataCollection]:
        """Every data collection of one group, newest first."""
        found: dict[int, DataCollection] = {}
        async for rec in self._paged("events", {"dataCollectionGroupId": group_id}):
            if rec.data.get("type") != "dc":
                continue
            col = _parse_collection(rec)
            if col.group_id != group_id:
                log.warning("ispyb.foreign_collection", asked=group_id, got=col.group_id)
                continue
            found.setdefault(col.collection_id, col)
        return list(found.values())

    async def proposal_samples(self, proposal: str) -> dict[int, Sample]:
        """Every sample of a proposal with its protein acronym, a page per request (121-124); cached.
        A proposal the login cannot see lists nothing (126)."""
        found: dict[int, Sample] = {}
        async for rec in self._paged("samples", {"proposal": proposal}):
            sample = _parse_sample(rec)
            found[sample.sample_id] = sample
        self._samples.update(found)
        return found

    def cached_sample(self, sample_id: int) -> Sample | None:
        return self._samples.get(sample_id)

    async def sample(self, sample_id: int) -> Sample:
        """A sample and its protein acronym; cached, as samples do not change once collected."""
        if sample_id not in self._samples:
            rec = _Record(await self._get(f"samples/{sample_id}"), f"GET /samples/{sample_id}")
            self._samples[sample_id] = _parse_sample(rec)
        return self._samples[sample_id]
