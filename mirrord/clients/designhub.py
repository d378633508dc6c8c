"""ChemAxon Design Hub client: mirror the compound list, write crystallographic evidence back.

Auth is `X-API-KEY`, or an OpenID Connect `Authorization: Bearer` token, in which case every API
path carries the auth domain (`/api/<domain>/user`); `_api_path` is the one place that knows.
Compound IDs are opaque strings (`CXN-123456`, registry IDs) and are never parsed as numbers.
"""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import quote

from mirrord.clients.errors import AuthError, BadRequest, NotFound, ProtocolError
from mirrord.clients.http import HttpClient, Response, UpstreamClient, parse_datetime
from mirrord.redact import redact, register_secret

SERVICE = "designhub"
# Keys of an export record that have their own attribute on `Compound`; the rest go to `fields`.
_COMPOUND_CORE_KEYS = frozenset({"id", "project_label", "create_date", "modify_date", "source"})
_SMILES_FORMATS = frozenset({"smiles", "cxsmiles", "smi"})


@dataclass(frozen=True)
class DesignHubUser:
    user_id: str
    display_name: str


@dataclass(frozen=True)
class Project:
    project_id: int
    label: str
    last_used: dt.datetime | None


@dataclass(frozen=True)
class Hypothesis:
    content_id: str
    title: str
    project_id: int | None
    tags: list[str] = field(default_factory=list)
    create_date: dt.datetime | None = None
    modify_date: dt.datetime | None = None


@dataclass(frozen=True)
class DesignSet:
    content_id: str
    title: str
    parent_content_id: str | None = None
    parent_title: str | None = None
    tags: list[str] = field(default_factory=list)
    create_date: dt.datetime | None = None
    modify_date: dt.datetime | None = None


@dataclass(frozen=True)
class Compound:
    id: str
    project_label: str | None
    modify_date: dt.datetime  # always timezone-aware (UTC): the sync watermark compares these
    create_date: dt.datetime | None
    smiles: str | None
    source: str | None
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AttachmentFile:
    name: str
    content: bytes
    mime_type: str = "application/octet-stream"


@dataclass(frozen=True)
class Features:
    """Which optional endpoints this Design Hub has; older versions answer 404 for missing ones.

    `probe` learns the read endpoints (export, public_ids). The write endpoints (attach, data_columns,
    upload) are taken to exist until their first real use answers 404: nothing is written to learn.
    """

    export: bool = True
    attach: bool = True
    public_ids: bool = True
    data_columns: bool = True
    upload: bool = True

    @property
    def missing(self) -> list[str]:
        return [f.name for f in fields(self) if not getattr(self, f.name)]

    def summary(self) -> str:
        """One sentence for the log: what is off and why (empty when everything is there)."""
        if not self.missing:
            return ""
        return (f"Design Hub lacks {', '.join(self.missing)} (HTTP 404: an older version?); "
                "those features are disabled")


# -- lenient parsing ------------------------------------------------------------------------------
def format_datetime(value: dt.datetime | str) -> str:
    if isinstance(value, str):
        return value
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _tags(value: Any) -> list[str]:
    # The seed types tags as "string" but describes a list: accept both.
    if isinstance(value, list):
        return [str(t) for t in value]
    if isinstance(value, str) and value:
        return [t.strip() for t in value.split(",") if t.strip()]
    return []


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _opt_int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _records(payload: Any, what: str, url: str) -> list[dict[str, Any]]:
    if not isinstance(payload, list) or not all(isinstance(r, dict) for r in payload):
        raise ProtocolError(SERVICE, f"{what}: expected a list of objects", url=redact(url),
                            detail=redact(repr(payload)[:200]))
    return payload


def _page(payload: Any, url: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    if not isinstance(payload, dict) or not isinstance(payload.get("compounds"), list):
        raise ProtocolError(SERVICE, "expected an object with a 'compounds' list", url=redact(url),
                            detail=redact(repr(payload)[:200]))
    return _records(payload["compounds"], "compounds", url), payload


def compound_from_record(record: Mapping[str, Any], *, smiles_source: bool, url: str = "") -> Compound:
    ident = record.get("id")
    modified = parse_datetime(record.get("modify_date"))
    if ident in (None, "") or modified is None:
        raise ProtocolError(SERVICE, "compound without id or a valid modify_date", url=redact(url),
                            detail=redact(repr(dict(record))[:200]))
    source = _opt_str(record.get("source"))
    extra = {k: v for k, v in record.items() if k not in _COMPOUND_CORE_KEYS}
    smiles = source if smiles_source and source else _opt_str(extra.get("smiles") or extra.get("SMILES"))
    return Compound(id=str(ident), project_label=_opt_str(record.get("project_label")), modify_date=modified,
                    create_date=parse_datetime(record.get("create_date")), smiles=smiles, source=source,
                    fields=extra)


# -- the client -----------------------------------------------------------------------------------
class DesignHubClient(UpstreamClient):
    """Typed access to the Design Hub REST API (one instance per Design Hub, used as a context manager)."""

    def __init__(self, base_url: str, *, api_key: str | None = None, bearer_token: str | None = None,
                 auth_domain: str | None = None, http: HttpClient | Mapping[str, Any] | None = None) -> None:
        if api_key and bearer_token:
            raise ValueError("give either api_key or bearer_token, not both")
        register_secret(api_key)
        register_secret(bearer_token)
        self.base_url = base_url
        self.auth_mode = "api-key" if api_key else "bearer" if bearer_token else "none"
        if api_key:
            self._auth_headers = {"X-API-KEY": api_key}
        elif bearer_token:
            self._auth_headers = {"Authorization": f"Bearer {bearer_token}"}
        else:
            self._auth_headers = {}  # allowed, so `check` can report the missing credential clearly
        # With OpenID Connect tokens the API lives under the auth domain; API keys use the plain root.
        domain = (auth_domain or "").strip("/") if bearer_token else ""
        self._api_root = f"/api/{quote(domain)}" if domain else "/api"
        super().__init__(SERVICE, base_url, http)

    def __repr__(self) -> str:
        return f"DesignHubClient(base_url={redact(self.base_url)!r}, auth={self.auth_mode!r})"

    # -- plumbing -------------------------------------------------------------------------------
    def _api_path(self, path: str) -> str:
        return f"{self._api_root}/{path.lstrip('/')}"

    @staticmethod
    def _compound_path(compound_id: str, action: str) -> str:
        return f"compounds/{quote(str(compound_id), safe='')}/{action}"

    async def _request(self, method: str, path: str, *, api: bool = True, **kwargs: Any) -> Response:
        try:
            return await self.http.request(method, self._api_path(path) if api else path,
                                           headers=self._auth_headers, **kwargs)
        except AuthError as exc:
            raise AuthError(SERVICE, "credential rejected", status=exc.status, url=exc.url,
                            detail=exc.detail) from None
        except BadRequest as exc:
            if exc.status is not None and 300 <= exc.status < 400:
                # An SSO proxy in front of Design Hub sends unauthenticated API calls to a login page.
                raise AuthError(SERVICE, "redirected to a login page: credential rejected", status=exc.status,
                                url=exc.url, detail=exc.detail) from None
            raise

    async def _get_json(self, path: str, params: Mapping[str, Any] | None = None) -> tuple[Any, str]:
        resp = await self._request("GET", path, params=params)
        return resp.json(SERVICE), resp.url

    # -- identity and probing -------------------------------------------------------------------
    async def user(self) -> DesignHubUser:
        """The credential check: who the key or token belongs to."""
        try:
            payload, url = await self._get_json("user")
        except BadRequest as exc:
            if exc.status == 400:
                raise BadRequest(SERVICE, "no credentials sent (configure an API key or bearer token)",
                                 status=400, url=exc.url, detail=exc.detail) from None
            raise
        if not isinstance(payload, dict) or payload.get("user_id") is None:
            raise ProtocolError(SERVICE, "user: expected an object with user_id", url=redact(url),
                                detail=redact(repr(payload)[:200]))
        return DesignHubUser(user_id=str(payload["user_id"]),
                             display_name=str(payload.get("displayName") or payload["user_id"]))

    async def probe(self) -> Features:
        """Find which optional read endpoints exist, with GETs only. A 404 turns a feature off;
        other errors propagate. Write endpoints are never probed (see `Features`)."""
        return Features(export=await self._exists("compounds/export"), public_ids=await self._exists("compounds/public"))

    async def _exists(self, path: str) -> bool:
        try:
            await self._request("GET", path, params={"offset": 0, "limit": 1}, retry=True)
        except NotFound:
            return False
        return True

    # -- listings -------------------------------------------------------------------------------
    async def projects(self) -> list[Project]:
        payload, url = await self._get_json("projects")
        return [Project(project_id=int(r["project_id"]), label=str(r.get("label", "")),
                        last_used=parse_datetime(r.get("last_used")))
                for r in _records(payload, "projects", url) if _opt_int(r.get("project_id")) is not None]

    async def hypotheses(self, project_ids: Iterable[int] | None = None, *,
                         my_projects: bool = False) -> list[Hypothesis]:
        params: dict[str, str] = {}
        if project_ids is not None:
            params["project_id"] = ",".join(str(p) for p in project_ids)
        if my_projects:
            params["myprojects"] = "true"
        payload, url = await self._get_json("hypotheses", params)
        return [Hypothesis(content_id=str(r["content_id"]), title=str(r.get("title", "")),
                           project_id=_opt_int(r.get("project_id")), tags=_tags(r.get("tags")),
                           create_date=parse_datetime(r.get("create_date")),
                           modify_date=parse_datetime(r.get("modify_date")))
                for r in _records(payload, "hypotheses", url) if r.get("content_id") is not None]

    async def designsets(self, project_id: int | Iterable[int] | None = None) -> list[DesignSet]:
        params: dict[str, str] = {}
        if project_id is not None:
            ids = [project_id] if isinstance(project_id, int) else list(project_id)
            params["project_id"] = ",".join(str(p) for p in ids)
        payload, url = await self._get_json("designsets", params)
        return [DesignSet(content_id=str(r["content_id"]), title=str(r.get("title", "")),
                          parent_content_id=_opt_str(r.get("parent_content_id") or r.get("parent_id")),
                          parent_title=_opt_str(r.get("parent_title")), tags=_tags(r.get("tags")),
                          create_date=parse_datetime(r.get("create_date")),
                          modify_date=parse_datetime(r.get("modify_date")))
                for r in _records(payload, "design sets", url) if r.get("content_id") is not None]

    # -- compounds ------------------------------------------------------------------------------
    async def export(self, *, modify_date_after: dt.datetime | str | None = None,
                     project_label: str | None = None, structure: str | None = None,
                     search_type: str | None = None, registration_ids: Iterable[str] | None = None,
                     page_size: int = 100, source_format: str = "smiles") -> AsyncIterator[Compound]:
        """Every compound matching the filters, paging with offset/limit until `hasMore` is false.

        `modify_date_after` is strict; the caller subtracts its overlap and dedupes by
        `(id, modify_date)`. With a SMILES `source_format` (the default) `Compound.smiles` is the source.
        `registration_ids` reads given compounds by their latest known id (a fresh look at a few).
        """
        params: dict[str, Any] = {"format": source_format}
        if modify_date_after is not None:
            params["modify_date_after"] = format_datetime(modify_date_after)
        if project_label is not None:
            params["project_label"] = project_label
        if structure is not None:
            params["structure"] = structure
        if search_type is not None:
            params["searchType"] = search_type
        if registration_ids is not None:
            params["registration_ids"] = ",".join(str(i) for i in registration_ids)
        smiles_source = source_format.lower() in _SMILES_FORMATS
        offset = 0
        while True:
            payload, url = await self._get_json("compounds/export", {**params, "offset": offset, "limit": page_size})
            records, page = _page(payload, url)
            for record in records:
                yield compound_from_record(record, smiles_source=smiles_source, url=url)
            offset += len(records)
            if not _has_more(page, offset, len(records), page_size):
                return
            if not records:
                raise ProtocolError(SERVICE, "export: hasMore with an empty page", url=redact(url))

    async def find_by_structure(self, smiles: str) -> list[Compound]:
        """Compounds whose structure is exactly `smiles` (duplicate search)."""
        return [c async for c in self.export(structure=smiles, search_type="dup")]

    async def public_ids(self, *, page_size: int = 500) -> dict[str, str]:
        """Every previous compound id mapped to the compound's current id."""
        mapping: dict[str, str] = {}
        offset = 0
        while True:
            payload, url = await self._get_json("compounds/public",
                                                {"offset": offset, "limit": page_size, "format": "smiles"})
            records, page = _page(payload, url)
            for record in records:
                current = record.get("currentId")
                if current in (None, ""):
                    raise ProtocolError(SERVICE, "public compound without currentId", url=redact(url),
                                        detail=redact(repr(record)[:200]))
                for previous in record.get("previousIds") or []:
                    mapping[str(previous)] = str(current)
            offset += len(records)
            if not records or not _has_more(page, offset, len(records), page_size):
                return mapping

    # -- write-back -----------------------------------------------------------------------------
    async def attach(self, compound_id: str, *, link: str | None = None, comment: str | None = None,
                     files: Iterable[AttachmentFile] = (), visibility: str = "internal") -> str:
        """Attach files, a link and/or a comment; returns the `contentUrl`.

        Never retried here: attach is not idempotent, so the caller keeps a ledger and decides.
        """
        body: dict[str, Any] = {"visibility": visibility, "files": [
            {"fileName": f.name, "contentBase64": base64.b64encode(f.content).decode("ascii"),
             "mimeType": f.mime_type} for f in files]}
        if link is not None:
            body["link"] = link
        if comment is not None:
            body["comment"] = comment
        if not (body["files"] or link or comment):
            raise ValueError("attach needs a link, a comment or at least one file")
        resp = await self._request("POST", self._compound_path(compound_id, "attach"), json_body=body, retry=False)
        payload = resp.json(SERVICE)
        if not isinstance(payload, dict) or not isinstance(payload.get("contentUrl"), str):
            raise ProtocolError(SERVICE, "attach: answer without contentUrl", url=redact(resp.url),
                                detail=redact(resp.text[:200]))
        return payload["contentUrl"]

    async def add_tags(self, compound_id: str, tags: Iterable[str]) -> None:
        """Add tags, keeping the ones users set (never `ReplaceAll`). Adding twice is harmless: retried."""
        await self._request("POST", f"tags/{quote(str(compound_id), safe='')}",
                            json_body={"command": "Add", "tags": list(tags)}, retry=True)

    async def set_data(self, compound_id: str, column: str, value: str | float) -> None:
        await self._request("POST", self._compound_path(compound_id, "data"),
                            json_body={"column": column, "value": value}, retry=True)

    async def set_additional_field(self, compound_id: str, name: str, value: str | float) -> None:
        await self._request("POST", self._compound_path(compound_id, "additionalfield"),
                            json_body={"name": name, "value": value}, retry=True)

    async def upload_structure(self, smiles_or_molfile: str, *, project: str | None = None) -> str:
        """Send a structure to the new-compound page; returns the absolute URL (valid for minutes)."""
        body: dict[str, Any] = {"structures": smiles_or_molfile}
        if project is not None:
            body["project"] = project
        # The JSON form answers 200 {"url"}; some versions answer the multipart way, a 302 Location.
        resp = await self._request("POST", "/upload/api", api=False, json_body=body, ok=(200, 201, 302, 303),
                                   retry=True)
        location = resp.headers.get("Location") if resp.status in (302, 303) else None
        if location is None:
            payload = resp.json(SERVICE)
            location = payload.get("url") if isinstance(payload, dict) else None
        if not isinstance(location, str) or not location:
            raise ProtocolError(SERVICE, "upload: answer without url", url=redact(resp.url),
                                detail=redact(resp.text[:200]))
        return self.http.url(location)


def _has_more(page: Mapping[str, Any], offset: int, got: int, limit: int) -> bool:
    """`hasMore` when present; else `total`; else a short page ends the listing."""
    if isinstance(page.get("hasMore"), bool):
        return page["hasMore"]
    total = _opt_int(page.get("total"))
    if total is not None:
        return offset < total
    return got >= limit
