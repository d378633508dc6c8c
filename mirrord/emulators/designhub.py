"""A faithful Design Hub emulation serving the shared campaign's ligands as compounds.

One project per campaign target (plus one unrelated project), one hypothesis and one design set per
project, one compound per ligand (`ligand.designhub_id`). Writes (attach, tags, data, additional
fields) bump the compound's `modify_date`, as the real server does, so the incremental sync sees
its own writes come back. `legacy=True` emulates an older version without export, attach and the
public id list (404). With OpenID Connect, paths carry the auth domain: `/api/<domain>/...`.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import html
import json
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from xml.sax.saxutils import escape

from aiohttp import web

from mirrord.emulators.base import Faults, make_app
from mirrord.emulators.campaign import Campaign, Ligand

DEFAULT_API_KEYS = {"dh-demo-key": "chemist"}
DEFAULT_BEARER_TOKENS = {"dh-demo-token": "chemist"}
UNRELATED_PROJECT = "Library-QC"
MS = dt.timedelta(milliseconds=1)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class EmulatedCompound:
    id: str
    smiles: str
    project_id: int
    create_date: dt.datetime
    modify_date: dt.datetime
    author: str = "chemist"
    assignee: str = "chemist"
    status: str = "Design"
    private: bool = False
    previous_ids: list[str] = field(default_factory=list)
    calculated: dict[str, Any] = field(default_factory=dict)


@dataclass
class StoredFile:
    name: str
    content: bytes
    mime_type: str | None


@dataclass
class Attachment:
    content_url: str
    link: str | None
    comment: str | None
    files: list[StoredFile]
    visibility: str
    at: dt.datetime


@dataclass
class Upload:
    structures: str
    project: str | None
    expires_at: dt.datetime


def iso(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _parse_iso(value: str) -> dt.datetime:
    parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    return parsed.replace(tzinfo=dt.UTC) if parsed.tzinfo is None else parsed


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


@web.middleware
async def _unknown_is_404(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Design Hub answers 404 for an unknown path *or method* (aiohttp would say 405)."""
    try:
        return await handler(request)
    except (web.HTTPNotFound, web.HTTPMethodNotAllowed):
        return _error(404, f"Cannot {request.method} {request.path}")


class _Refused(Exception):
    """A request the emulator answers with an error status (raised from deep in a handler)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class DesignHubEmulator:
    def __init__(self, campaign: Campaign, *, api_keys: Mapping[str, str] | None = None,
                 bearer_tokens: Mapping[str, str] | None = None, auth_domain: str = "oidc",
                 legacy: bool = False, faults: Faults | None = None, upload_ttl: float = 300.0,
                 max_page: int = 1000, clock: Callable[[], dt.datetime] | None = None) -> None:
        self.campaign = campaign
        self.api_keys = dict(DEFAULT_API_KEYS if api_keys is None else api_keys)
        self.bearer_tokens = dict(DEFAULT_BEARER_TOKENS if bearer_tokens is None else bearer_tokens)
        self.auth_domain = auth_domain
        self.legacy = legacy
        self.upload_ttl = dt.timedelta(seconds=upload_ttl)
        self.max_page = max_page
        self._clock = clock or (lambda: dt.datetime.now(dt.UTC))
        # What tests inspect: keyed by the compound's current id (moved along on rename).
        self.attachments: dict[str, list[Attachment]] = defaultdict(list)
        self.tags: dict[str, list[str]] = defaultdict(list)
        self.data: dict[str, dict[str, Any]] = defaultdict(dict)
        self.additional_fields: dict[str, dict[str, Any]] = defaultdict(dict)
        self.uploads: dict[str, Upload] = {}
        self.projects: dict[int, str] = {}  # project_id -> label
        self.compounds: list[EmulatedCompound] = []  # in creation order, as the API lists them
        self._latest = self._now() - dt.timedelta(days=60)
        self._build(campaign)
        self.app = make_app(faults, client_max_size=64 * 1024**2)
        self.app.middlewares.append(_unknown_is_404)
        self._routes()

    # -- the data set ----------------------------------------------------------------------------
    def _now(self) -> dt.datetime:
        now = self._clock()
        now = now.replace(tzinfo=dt.UTC) if now.tzinfo is None else now.astimezone(dt.UTC)
        return now.replace(microsecond=now.microsecond // 1000 * 1000)  # the API's millisecond precision

    def _build(self, campaign: Campaign) -> None:
        base = self._now() - dt.timedelta(days=30)
        for target in campaign.targets:
            self.projects[target.project_id] = target.name
        self.unrelated_project_id = max(self.projects, default=0) + 1
        self.projects[self.unrelated_project_id] = UNRELATED_PROJECT
        ligands: list[tuple[Ligand, int]] = [(e.ligand, t.project_id) for t in campaign.targets for e in t.experiments]
        ligands += [(lig, self.unrelated_project_id) for lig in campaign.unrelated]
        for i, (ligand, project_id) in enumerate(ligands):
            created = base + dt.timedelta(hours=i)
            self.compounds.append(EmulatedCompound(
                id=ligand.designhub_id, smiles=ligand.smiles, project_id=project_id, create_date=created,
                modify_date=created + dt.timedelta(minutes=10), calculated={"supplier_code": ligand.compound_code}))
        self._latest = max([self._latest, *(c.modify_date for c in self.compounds)])

    @staticmethod
    def hypothesis_id(project_id: int) -> str:
        return f"hyp-{project_id:04d}"

    @staticmethod
    def designset_id(project_id: int) -> str:
        return f"ds-{project_id:04d}"

    def _next_stamp(self) -> dt.datetime:
        # Strictly increasing, even if the clock stalls or steps back: the sync relies on it.
        self._latest = max(self._now(), self._latest + MS)
        return self._latest

    def _bump(self, compound: EmulatedCompound) -> dt.datetime:
        compound.modify_date = self._next_stamp()
        return compound.modify_date

    def compound(self, compound_id: str, *, aliases: bool = False) -> EmulatedCompound | None:
        for c in self.compounds:
            if c.id == compound_id or (aliases and compound_id in c.previous_ids):
                return c
        return None

    def _require(self, compound_id: str, *, aliases: bool = False) -> EmulatedCompound:
        found = self.compound(compound_id, aliases=aliases)
        if found is None:
            raise _Refused(404, f"compound {compound_id} not found")
        return found

    # -- test helpers ----------------------------------------------------------------------------
    def edit(self, compound_id: str) -> dt.datetime:
        """A chemist edits the compound: its modify_date moves forward."""
        return self._bump(self._require(compound_id))

    def rename(self, old_id: str, new_id: str) -> None:
        """Registration gives the compound a new id; the old one becomes a previous id."""
        compound = self._require(old_id)
        compound.previous_ids.append(old_id)
        compound.id = new_id
        for store in (self.attachments, self.tags, self.data, self.additional_fields):
            if old_id in store:
                store[new_id] = store.pop(old_id)
        self._bump(compound)

    def add_compound(self, smiles: str, *, project_label: str | None = None, compound_id: str | None = None,
                     private: bool = False, fields: Mapping[str, Any] | None = None) -> str:
        project_id = next((pid for pid, label in self.projects.items() if label == project_label),
                          self.unrelated_project_id)
        if compound_id is None:
            numbers = [int(c.id.split("-")[1]) for c in self.compounds
                       if c.id.startswith("CXN-") and c.id.split("-")[1].isdigit()]
            compound_id = f"CXN-{max(numbers, default=100_000) + 1}"
        created = self._next_stamp()
        self.compounds.append(EmulatedCompound(id=compound_id, smiles=smiles, project_id=project_id,
                                               create_date=created, modify_date=created, private=private,
                                               calculated=dict(fields or {})))
        return compound_id

    # -- routing and auth ------------------------------------------------------------------------
    def _routes(self) -> None:
        api: list[tuple[str, str, Handler]] = [
            ("GET", "/user", self._user),
            ("GET", "/projects", self._projects),
            ("GET", "/hypotheses", self._hypotheses),
            ("GET", "/designsets", self._designsets),
            ("POST", "/compounds/{id}/data", self._data),
            ("POST", "/compounds/{id}/additionalfield", self._additional_field),
            ("POST", "/tags/{id}", self._tags),
        ]
        if not self.legacy:
            api += [
                ("GET", "/compounds/export", self._export),
                ("GET", "/compounds/public", self._public),
                ("POST", "/compounds/internal/{id}/attach", self._attach_internal),
                ("POST", "/compounds/{id}/attach", self._attach),
            ]
        router = self.app.router
        for method, path, handler in api:
            router.add_route(method, "/api" + path, self._guarded(handler, "key"))
            router.add_route(method, f"/api/{self.auth_domain}" + path, self._guarded(handler, "bearer"))
        router.add_post("/upload/api", self._guarded(self._upload, "any"))
        router.add_get("/new/compound/", self._new_compound_page)

    def _guarded(self, handler: Handler, scheme: str) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            key = request.headers.get("X-API-KEY")
            authorization = request.headers.get("Authorization", "")
            token = authorization[7:].strip() if authorization.lower().startswith("bearer ") else None
            if scheme == "key" or (scheme == "any" and key is not None):
                if key is None:
                    return _error(400, "X-API-KEY header not specified")
                if key not in self.api_keys:
                    return _error(401, "invalid API key")
            else:
                if not authorization:
                    return _error(400, "Authorization header not specified")
                if token not in self.bearer_tokens:
                    return _error(401, "invalid bearer token")
            try:
                return await handler(request)
            except _Refused as exc:
                return _error(exc.status, str(exc))
        return guarded

    def _user_of(self, request: web.Request) -> str:
        key = request.headers.get("X-API-KEY")
        if key in self.api_keys:
            return self.api_keys[key]
        return self.bearer_tokens.get(request.headers.get("Authorization", "")[7:].strip(), "")

    # -- request parsing helpers -----------------------------------------------------------------
    @staticmethod
    async def _json_object(request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise _Refused(400, "body is not JSON") from None
        if not isinstance(body, dict):
            raise _Refused(400, "body must be a JSON object")
        return body

    def _paging(self, request: web.Request) -> tuple[int, int]:
        try:
            offset = int(request.query.get("offset", "0"))
            limit = int(request.query.get("limit", str(self.max_page)))
        except ValueError:
            raise _Refused(400, "offset and limit must be numbers") from None
        if offset < 0 or limit < 1:
            raise _Refused(400, "offset must be >= 0 and limit >= 1")
        return offset, min(limit, self.max_page)

    @staticmethod
    def _date_param(request: web.Request, name: str) -> dt.datetime | None:
        value = request.query.get(name)
        if not value:
            return None
        try:
            return _parse_iso(value)
        except ValueError:
            raise _Refused(400, f"{name} is not an ISO 8601 date") from None

    @staticmethod
    def _id_list(request: web.Request, name: str) -> set[int] | None:
        value = request.query.get(name)
        if not value:
            return None
        try:
            return {int(v) for v in value.split(",") if v.strip()}
        except ValueError:
            raise _Refused(400, f"{name} must be a comma separated list of numbers") from None

    # -- read endpoints --------------------------------------------------------------------------
    async def _user(self, request: web.Request) -> web.Response:
        name = self._user_of(request)
        users = sorted({*self.api_keys.values(), *self.bearer_tokens.values()})
        return web.json_response({"user_id": users.index(name) + 1, "displayName": name.title()})

    def _last_used(self, project_id: int) -> dt.datetime:
        dates = [c.modify_date for c in self.compounds if c.project_id == project_id]
        return max(dates, default=self._latest)

    async def _projects(self, request: web.Request) -> web.Response:
        return web.json_response([{"project_id": pid, "label": label, "last_used": iso(self._last_used(pid))}
                                  for pid, label in self.projects.items()])

    def _selected_projects(self, request: web.Request) -> list[int]:
        wanted = self._id_list(request, "project_id")
        mine = request.query.get("myprojects", "").lower() in ("1", "true", "yes")
        return [pid for pid in self.projects if (wanted is None or pid in wanted)
                and not (mine and pid == self.unrelated_project_id)]  # the user is not on the QC project

    def _content_dates(self, project_id: int) -> dict[str, str]:
        created = min((c.create_date for c in self.compounds if c.project_id == project_id), default=self._latest)
        return {"create_date": iso(created - dt.timedelta(days=1)), "modify_date": iso(created)}

    async def _hypotheses(self, request: web.Request) -> web.Response:
        return web.json_response([
            {"content_id": self.hypothesis_id(pid), "title": f"{self.projects[pid]} fragment hits",
             "tags": self.tags.get(self.hypothesis_id(pid), []), "project_id": pid, **self._content_dates(pid)}
            for pid in self._selected_projects(request)])

    async def _designsets(self, request: web.Request) -> web.Response:
        return web.json_response([
            {"content_id": self.designset_id(pid), "parent_id": self.hypothesis_id(pid),
             "title": f"{self.projects[pid]} follow-ups", "tags": self.tags.get(self.designset_id(pid), []),
             "parent_title": f"{self.projects[pid]} fragment hits",
             "parent_content_id": self.hypothesis_id(pid), **self._content_dates(pid)}
            for pid in self._selected_projects(request)])

    @staticmethod
    def _source(compound: EmulatedCompound, fmt: str) -> str | None:
        fmt = fmt.lower()
        if fmt in ("smiles", "smi", "cxsmiles"):
            return compound.smiles
        if fmt in ("mol", "molfile", "sdf", "mol:v2", "sdf:v2"):
            # No toolkit here: a header-only molfile that carries the SMILES in its comment line.
            molfile = f"{compound.id}\n  mirrord-emulator\n{compound.smiles}\n  0  0  0  0  0  0  0  0  0  0999 V2000\nM  END\n"
            return molfile + ("$$$$\n" if fmt.startswith("sdf") else "")
        if fmt in ("", "mrv"):
            return ('<?xml version="1.0" encoding="UTF-8"?><cml><MDocument><MChemicalStruct>'
                    f'<molecule title="{escape(compound.id)}"><propertyList><property dictRef="SMILES" '
                    f'title="SMILES"><scalar>{escape(compound.smiles)}</scalar></property></propertyList>'
                    '</molecule></MChemicalStruct></MDocument></cml>')
        return None

    def _source_fields(self, compound: EmulatedCompound, fmt: str) -> dict[str, Any]:
        source = self._source(compound, fmt)
        if source is None:
            return {"formattedSourceError": f"Unsupported format: {fmt}"}
        return {"source": source}

    def _export_record(self, c: EmulatedCompound, fmt: str) -> dict[str, Any]:
        label = self.projects[c.project_id]
        record: dict[str, Any] = {
            **c.calculated, **self.additional_fields.get(c.id, {}), **self.data.get(c.id, {}),
            "status": c.status,
        }
        record.update({
            "id": c.id, "private": c.private, "project_label": label, "project_key": f"PRJ-{c.project_id}",
            "designset": f"{label} follow-ups", "designset_title": f"{label} follow-ups",
            "designset_content_id": self.designset_id(c.project_id),
            "hypothesis": f"{label} fragment hits", "hypothesis_title": f"{label} fragment hits",
            "hypothesis_content_id": self.hypothesis_id(c.project_id),
            "author": c.author, "assignee": c.assignee,
            "create_date": iso(c.create_date), "modify_date": iso(c.modify_date),
            **self._source_fields(c, fmt),
        })
        return record

    def _export_matches(self, request: web.Request) -> list[EmulatedCompound]:
        q = request.query
        modified_after = self._date_param(request, "modify_date_after")
        modified_before = self._date_param(request, "modify_date_before")
        created_after = self._date_param(request, "create_date_after")
        created_before = self._date_param(request, "create_date_before")
        ids = {i.strip() for i in q.get("registration_ids", "").split(",") if i.strip()}
        structure = q.get("structure")
        if structure is not None and q.get("searchType", "sub") != "dup":
            raise _Refused(400, "this emulator implements searchType=dup only")
        visibility = q.get("visibility", "mixed")
        rows = []
        for c in self.compounds:
            if ((modified_after and not c.modify_date > modified_after)
                    or (modified_before and not c.modify_date < modified_before)
                    or (created_after and not c.create_date > created_after)
                    or (created_before and not c.create_date < created_before)
                    or (ids and c.id not in ids)
                    or ("project_label" in q and self.projects[c.project_id] != q["project_label"])
                    or (structure is not None and c.smiles != structure)
                    or (visibility == "private" and not c.private)
                    or (visibility == "public" and c.private)):
                continue
            rows.append(c)
        return rows

    async def _export(self, request: web.Request) -> web.Response:
        offset, limit = self._paging(request)
        rows = self._export_matches(request)
        page = rows[offset: offset + limit]
        fmt = request.query.get("format", "mrv")
        return web.json_response({"compounds": [self._export_record(c, fmt) for c in page], "total": len(rows),
                                  "limit": limit, "offset": offset, "hasMore": offset + len(page) < len(rows)})

    async def _public(self, request: web.Request) -> web.Response:
        offset, limit = self._paging(request)
        rows = [c for c in self.compounds if not c.private]
        fmt = request.query.get("format", "mrv")
        return web.json_response({
            "compounds": [{"currentId": c.id, "previousIds": list(c.previous_ids),
                           "url": f"/compounds/find/{c.id}", **self._source_fields(c, fmt)}
                          for c in rows[offset: offset + limit]],
            "total": len(rows), "limit": limit, "offset": offset})

    # -- write endpoints -------------------------------------------------------------------------
    @staticmethod
    def _attached_file(entry: Any) -> StoredFile:
        if not isinstance(entry, dict) or not isinstance(entry.get("fileName"), str) or not entry["fileName"]:
            raise _Refused(400, "every file needs a fileName")
        text, encoded = entry.get("content"), entry.get("contentBase64")
        if (text is None) == (encoded is None):
            raise _Refused(400, "every file needs exactly one of content or contentBase64")
        if text is not None:
            if not isinstance(text, str):
                raise _Refused(400, "content must be a string")
            content = text.encode()
        else:
            try:
                content = base64.b64decode(encoded, validate=True)
            except (binascii.Error, TypeError, ValueError):
                raise _Refused(400, "contentBase64 is not valid base64") from None
        mime = entry.get("mimeType")
        return StoredFile(entry["fileName"], content, mime if isinstance(mime, str) else None)

    async def _attach(self, request: web.Request, *, visibility: str | None = None) -> web.Response:
        # The body is checked before the compound, so an empty probe body gets 400, not 404.
        body = await self._json_object(request)
        link, comment, files = body.get("link"), body.get("comment"), body.get("files") or []
        if link is not None and (not isinstance(link, str) or not link.startswith(("https://", "http://"))):
            raise _Refused(400, "link must be an http(s) URL")
        if comment is not None and not isinstance(comment, str):
            raise _Refused(400, "comment must be a string")
        if not isinstance(files, list):
            raise _Refused(400, "files must be a list")
        stored = [self._attached_file(f) for f in files]
        if not (link or comment or stored):
            raise _Refused(400, "nothing to attach")
        visibility = visibility or body.get("visibility", "public")
        if visibility not in ("public", "internal"):
            raise _Refused(400, "visibility must be public or internal")
        compound = self._require(request.match_info["id"])
        content_url = f"/compounds/find/{compound.id}/content/{uuid.uuid4().hex[:24]}"
        at = self._bump(compound)
        self.attachments[compound.id].append(Attachment(content_url, link, comment, stored, visibility, at))
        return web.json_response({"contentUrl": content_url})

    async def _attach_internal(self, request: web.Request) -> web.Response:
        return await self._attach(request, visibility="internal")

    async def _tags(self, request: web.Request) -> web.Response:
        body = await self._json_object(request)
        command, tags = body.get("command"), body.get("tags")
        if command not in ("Add", "ReplaceAll"):
            raise _Refused(400, "command must be Add or ReplaceAll")
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise _Refused(400, "tags must be a list of strings")
        target_id = request.match_info["id"]
        compound = self.compound(target_id, aliases=True)
        content_ids = {f(pid) for pid in self.projects for f in (self.hypothesis_id, self.designset_id)}
        if compound is None and target_id not in content_ids:
            raise _Refused(404, f"{target_id} not found")
        key = compound.id if compound else target_id
        current = [] if command == "ReplaceAll" else self.tags[key]
        self.tags[key] = current + [t for t in dict.fromkeys(tags) if t not in current]
        if compound is not None:
            self._bump(compound)
        return web.json_response({})

    async def _set_value(self, request: web.Request, name_key: str, store: dict[str, dict[str, Any]]) -> web.Response:
        body = await self._json_object(request)
        name, value = body.get(name_key), body.get("value")
        if not isinstance(name, str) or not name:
            raise _Refused(400, f"{name_key} is required")
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise _Refused(400, "value must be a string or a number")
        compound = self._require(request.match_info["id"], aliases=True)
        store[compound.id][name] = value
        self._bump(compound)
        return web.json_response({})

    async def _data(self, request: web.Request) -> web.Response:
        return await self._set_value(request, "column", self.data)

    async def _additional_field(self, request: web.Request) -> web.Response:
        return await self._set_value(request, "name", self.additional_fields)

    # -- structure upload ------------------------------------------------------------------------
    def _cache(self, structures: str, project: str | None) -> str:
        key = uuid.uuid4().hex[:24]
        self.uploads[key] = Upload(structures, project, self._now() + self.upload_ttl)
        return f"/new/compound/?cache={key}"

    async def _upload(self, request: web.Request) -> web.Response:
        if request.content_type.startswith("multipart/"):
            form = await request.post()
            part = form.get("structures")
            if part is None:
                raise _Refused(400, "multipart field 'structures' is required")
            text = part.file.read().decode("utf-8", "replace") if isinstance(part, web.FileField) else str(part)
            # The browser flow: a redirect the user's browser follows.
            return web.Response(status=302, headers={"Location": self._cache(text, None)})
        body = await self._json_object(request)
        structures, project = body.get("structures"), body.get("project")
        if not isinstance(structures, str) or not structures.strip():
            raise _Refused(400, "structures is required")
        return web.json_response({"url": self._cache(structures, project if isinstance(project, str) else None)})

    async def _new_compound_page(self, request: web.Request) -> web.Response:
        upload = self.uploads.get(request.query.get("cache", ""))
        if upload is None or self._now() >= upload.expires_at:
            return web.Response(status=404, text="<html><body>This link has expired.</body></html>",
                                content_type="text/html")
        return web.Response(text=f"<html><body><h1>New compound</h1><pre>{html.escape(upload.structures)}</pre>"
                                 "</body></html>", content_type="text/html")
