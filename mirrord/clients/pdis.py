"""PDIS (proteindiffraction.org) client: token auth, streamed archive uploads, submissions, equipment.

Publishing on PDIS is irreversible, so nothing here repeats a request that may have changed server
state: uploads and submits are sent once, and a caller that lost an answer reconciles through
`find_by_md5` (a re-upload answers 409 when the first attempt got through).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
from aiohttp import payload as aiohttp_payload

from mirrord.clients.errors import (
    AuthError,
    BadRequest,
    ProtocolError,
    TransientError,
    UpstreamError,
)
from mirrord.clients.http import (
    CHUNK,
    TRANSPORT_ERRORS,
    HttpClient,
    Response,
    UpstreamClient,
    error_for_status,
    read_bounded,
)
from mirrord.clients.token_file import TokenFile, account
from mirrord.redact import redact, register_secret

SERVICE = "pdis"
DEFAULT_BASE_URL = "https://proteindiffraction.org/api/v1/"

# Submission statuses, as the server spells them.
UPLOADED = "uploaded"
SUBMITTED = "submitted"
PENDING = "pending"
VALIDATED = "validated"
PUBLISHED = "published"
ERROR_NO_DATA = "error_no_data"
INCONSISTENT_DATASETS = "inconsistent_datasets"
HEADER_NOT_READABLE = "header_not_readable"
IN_FLIGHT = frozenset({SUBMITTED, PENDING, VALIDATED})
NEEDS_ATTENTION = frozenset({ERROR_NO_DATA, INCONSISTENT_DATASETS, HEADER_NOT_READABLE})
DELETABLE = frozenset({UPLOADED, VALIDATED, ERROR_NO_DATA})

T = TypeVar("T")


# -- typed results ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Beamline:
    id: int
    short: str
    fullname: str | None = None


@dataclass(frozen=True)
class Synchrotron:
    id: int
    short: str
    fullname: str | None = None
    url: str | None = None
    beamlines: list[Beamline] = field(default_factory=list)

    def named(self, name: str) -> bool:
        """Is `name` this synchrotron, by its short or its full name (any case)?"""
        wanted = name.strip().lower()
        return wanted in {self.short.lower(), (self.fullname or "").lower()} and bool(wanted)

    def beamline(self, short: str) -> Beamline | None:
        """Case-insensitive: ISPyB says "i04-1" where PDIS says "I04-1"."""
        wanted = short.strip().lower()
        return next((b for b in self.beamlines if b.short.lower() == wanted), None)


@dataclass(frozen=True)
class EquipmentRef:
    id: int
    short: str


@dataclass(frozen=True)
class UploadResult:
    token: str
    md5hash: str
    filename: str
    size: int
    pdbid: str | None
    is_pdb_exists: bool


@dataclass(frozen=True)
class SubmitMetadata:
    pdb_code: str | None = None
    dataset_type: str = "pdb"
    project_title: str | None = None
    project_authors: str | None = None
    synchrotron_id: int | None = None
    beamline_id: int | None = None
    equipment_other: str | None = None

    def to_json(self, upload_token: str) -> dict[str, Any]:
        """The `POST /submit/` body; unset fields are left out rather than sent as null."""
        body = {k: v for k, v in asdict(self).items() if v is not None}
        return {"token": upload_token, **body}


@dataclass(frozen=True)
class Submission:
    token: str
    original_filename: str | None
    md5hash: str | None
    pdbid: str | None
    dataset_type: str | None
    status: str
    status_details: str | None
    inserted: dt.datetime | None
    updated: dt.datetime | None
    project_title: str | None = None
    project_authors: str | None = None
    synchrotron: EquipmentRef | None = None
    beamline: EquipmentRef | None = None
    equipment_other: str | None = None

    @property
    def is_published(self) -> bool:
        return self.status == PUBLISHED

    @property
    def needs_attention(self) -> bool:
        return self.status in NEEDS_ATTENTION

    @property
    def deletable(self) -> bool:
        return self.status in DELETABLE

    @property
    def is_final(self) -> bool:
        """Published, or stopped for a person; an unknown status is not final: keep polling it."""
        return self.status == PUBLISHED or self.status in NEEDS_ATTENTION


# -- parsing (lenient on extra or missing optional keys, strict on what we act upon) -----------------
def _protocol(what: str, data: Any) -> ProtocolError:
    return ProtocolError(SERVICE, what, detail=redact(repr(data)[:200]))


def _required(data: Mapping[str, Any], key: str, kind: type[T], what: str) -> T:
    value = data.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise _protocol(f"{what} has no valid {key!r}", data)
    return value


def _optional_str(data: Mapping[str, Any], key: str) -> str | None:
    value = data.get(key)
    return value if isinstance(value, str) and value != "" else None


def _timestamp(value: Any) -> dt.datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return dt.datetime.fromisoformat(value)  # PDIS's `...Z` included: Python 3.11 reads it
    except ValueError:
        return None


def _equipment_ref(value: Any) -> EquipmentRef | None:
    if isinstance(value, Mapping) and isinstance(value.get("id"), int):
        return EquipmentRef(value["id"], str(value.get("short") or ""))
    return None


def _object(data: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise _protocol(f"{what} is not an object", data)
    return data


def parse_submission(data: Any) -> Submission:
    data = _object(data, "submission")
    md5 = _optional_str(data, "md5hash")
    return Submission(
        token=_required(data, "token", str, "submission"),
        original_filename=_optional_str(data, "original_filename"),
        md5hash=md5.lower() if md5 else None,
        pdbid=_optional_str(data, "pdbid"),
        dataset_type=_optional_str(data, "dataset_type"),
        status=_required(data, "status", str, "submission"),
        status_details=_optional_str(data, "status_details"),
        inserted=_timestamp(data.get("inserted")),
        updated=_timestamp(data.get("updated")),
        project_title=_optional_str(data, "project_title"),
        project_authors=_optional_str(data, "project_authors"),
        synchrotron=_equipment_ref(data.get("synchrotron")),
        beamline=_equipment_ref(data.get("beamline")),
        equipment_other=_optional_str(data, "equipment_other"),
    )


def parse_upload(data: Any) -> UploadResult:
    data = _object(data, "upload answer")
    size = _required(data, "size", int, "upload answer")
    return UploadResult(
        token=_required(data, "token", str, "upload answer"),
        md5hash=_required(data, "md5hash", str, "upload answer").lower(),
        filename=_optional_str(data, "filename") or "",
        size=size,
        pdbid=_optional_str(data, "pdbid"),
        is_pdb_exists=bool(data.get("is_pdb_exists")),
    )


def parse_equipment(data: Any) -> list[Synchrotron]:
    if not isinstance(data, list):
        raise _protocol("equipment list is not an array", data)
    result = []
    for item in data:
        item = _object(item, "synchrotron")
        beamlines = [
            Beamline(_required(b, "id", int, "beamline"), str(b.get("short") or ""), _optional_str(b, "fullname"))
            for b in (_object(b, "beamline") for b in item.get("beamlines") or [])
        ]
        result.append(Synchrotron(_required(item, "id", int, "synchrotron"), str(item.get("short") or ""),
                                  _optional_str(item, "fullname"), _optional_str(item, "url"), beamlines))
    return result


# -- errors: PDIS says what went wrong in {"error": "..."}; keep that as the error's detail ---------
_ERROR_FIELD = re.compile(r'"error"\s*:\s*"((?:[^"\\]|\\.)*)')


def server_message(body: str) -> str:
    """The `error` text of a PDIS error body, or the body itself when it is not that shape."""
    try:
        data = json.loads(body)
    except ValueError:
        match = _ERROR_FIELD.search(body)  # a detail already cut short by the HTTP layer
        return match.group(1) if match else body
    if isinstance(data, Mapping) and isinstance(data.get("error"), str):
        return data["error"]
    return body


def _with_server_message(exc: UpstreamError) -> UpstreamError:
    """The same kind of error, rebuilt so its detail is the server's own words."""
    if exc.status is None or exc.status < 400:
        return exc  # not an HTTP refusal (a lost connection, a malformed answer): nothing to rephrase
    detail = server_message(exc.detail)
    if exc.status == 413:
        return BadRequest(SERVICE, "archive too large for PDIS", status=413, url=exc.url, detail=redact(detail))
    if exc.status == 403:
        return AuthError(SERVICE, "forbidden: not this account's submission", status=403, url=exc.url,
                         detail=redact(detail))
    err = error_for_status(SERVICE, exc.status, exc.url, detail, {})
    if isinstance(exc, TransientError) and isinstance(err, TransientError):
        err.retry_after = exc.retry_after
    return err


# -- streamed upload body ---------------------------------------------------------------------------
class _FilePayload(aiohttp_payload.Payload):
    """A file streamed chunk by chunk with a known size, reporting progress and detecting stalls.

    aiohttp's socket read timeout only watches the answer; a server that stops reading our body
    would block a write forever, so each chunk write gets its own stall deadline.
    """

    _autoclose = True  # the file is opened and closed inside write()

    def __init__(self, path: Path, size: int, *, stall_timeout: float,
                 progress: Callable[[int], None] | None) -> None:
        super().__init__(path, content_type="application/octet-stream")
        self._path = path
        self._size = size
        self._stall_timeout = stall_timeout
        self._progress = progress
        self.sent = 0
        self.stalled = False

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        raise TypeError("an upload body is streamed, never decoded whole")

    async def write(self, writer: Any) -> None:
        with open(self._path, "rb") as source:  # noqa: ASYNC230 - opening is instant; reads run in a thread
            # Never more than the announced Content-Length, and a shrunken file is an error, not a hang.
            while self.sent < self._size:
                chunk = await asyncio.to_thread(source.read, min(CHUNK, self._size - self.sent))
                if not chunk:
                    raise OSError(f"{self._path} shrank to {self.sent} bytes during the upload")
                try:
                    async with asyncio.timeout(self._stall_timeout):
                        await writer.write(chunk)
                except TimeoutError:
                    self.stalled = True
                    raise
                self.sent += len(chunk)
                if self._progress:
                    self._progress(len(chunk))


# -- the client -------------------------------------------------------------------------------------
class PdisClient(UpstreamClient):
    """One PDIS account. Results are dataclasses; failures are `mirrord.clients.errors` types."""

    def __init__(self, base_url: str = DEFAULT_BASE_URL, *, username: str, password: str, token_file: Path,
                 http: HttpClient | Mapping[str, Any] | None = None, stall_timeout: float = 300.0) -> None:
        register_secret(password)
        self.base_url = base_url
        self.username = username
        self._password = password
        self._token: str | None = None
        self._token_lock = asyncio.Lock()
        super().__init__(SERVICE, base_url, http)
        self._tokens = TokenFile(token_file, account(username, self.http.base_url))
        self.stall_timeout = stall_timeout
        self._equipment: list[Synchrotron] | None = None

    def __repr__(self) -> str:
        return f"PdisClient(base_url={self.base_url!r}, username={self.username!r})"

    # -- authentication ---------------------------------------------------------------------------
    async def sign_in(self) -> None:
        """Hold a token: the cached one (no request; a 401 later replaces it), else exchange the
        credentials for one, which proves them."""
        await self._current_token()

    async def _current_token(self) -> str:
        async with self._token_lock:
            if self._token is None:
                stored = self._tokens.read()
                if stored:
                    register_secret(stored)
                    self._token = stored
                else:
                    self._token = await self._exchange()
            return self._token

    async def _replace_token(self, rejected: str) -> str:
        async with self._token_lock:
            if self._token == rejected:  # another task may have renewed it already
                self._token = await self._exchange()
            assert self._token is not None
            return self._token

    async def _exchange(self) -> str:
        """Trade the credentials for the (non-expiring) token and store it."""
        try:
            resp = await self.http.request("POST", "auth/token/", retry=True,
                                           data={"username": self.username, "password": self._password})
        except (AuthError, BadRequest) as exc:
            raise AuthError(SERVICE, "token exchange refused", status=exc.status, url=exc.url,
                            detail=redact(server_message(exc.detail))) from None
        token = _required(_object(resp.json(SERVICE), "token answer"), "token", str, "token answer")
        register_secret(token)
        await asyncio.to_thread(self._tokens.write, token)
        return token

    async def _authorized(self, call: Callable[[dict[str, str]], Awaitable[T]]) -> T:
        """Run `call` with the token; on a 401 exchange the credentials once and run it again."""
        token = await self._current_token()
        try:
            return await call({"Authorization": f"Token {token}"})
        except UpstreamError as exc:
            if not (isinstance(exc, AuthError) and exc.status == 401):
                raise _with_server_message(exc) from None
        token = await self._replace_token(token)
        try:
            return await call({"Authorization": f"Token {token}"})
        except UpstreamError as exc:
            raise _with_server_message(exc) from None

    async def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        async def call(headers: dict[str, str]) -> Any:
            return await self.http.request(method, path, headers=headers, **kwargs)

        return await self._authorized(call)

    # -- equipment --------------------------------------------------------------------------------
    async def equipment(self) -> list[Synchrotron]:
        """Synchrotrons and beamlines; fetched once per client (the list changes very rarely)."""
        if self._equipment is None:
            resp = await self._request("GET", "equipment/")
            self._equipment = parse_equipment(resp.json(SERVICE))
        return self._equipment

    async def find_beamline(self, beamline: str, synchrotron: str | None = None
                            ) -> tuple[Synchrotron, Beamline] | None:
        """The PDIS ids for a beamline name such as ISPyB's "i04-1" (names compared case-insensitively)."""
        for sync in await self.equipment():
            if synchrotron is not None and not sync.named(synchrotron):
                continue
            if (found := sync.beamline(beamline)) is not None:
                return sync, found
        return None

    # -- upload -----------------------------------------------------------------------------------
    async def upload(self, path: Path, *, dataset_type: str = "pdb", filename: str | None = None,
                     progress: Callable[[int], None] | None = None) -> UploadResult:
        """Stream one archive to `POST /upload/`.

        Never retried once the body may have reached the server: a lost answer surfaces as
        `TransientError` and the caller looks the file up by md5 (or re-uploads and gets 409).
        A 401 is the exception: the server refused before storing anything, so the upload is
        sent once more with a fresh token (`progress` then counts from zero again).
        """
        path = Path(path)
        size = path.stat().st_size
        name = filename or path.name

        async def call(headers: dict[str, str]) -> UploadResult:
            return await self._send_upload(path, size, name, dataset_type, headers, progress)

        return await self._authorized(call)

    async def _send_upload(self, path: Path, size: int, name: str, dataset_type: str,
                           headers: dict[str, str], progress: Callable[[int], None] | None) -> UploadResult:
        form = aiohttp.MultipartWriter("form-data")
        form.append(dataset_type).set_content_disposition("form-data", name="dataset_type")
        body = _FilePayload(path, size, stall_timeout=self.stall_timeout, progress=progress)
        form.append_payload(body).set_content_disposition("form-data", name="dataset_file", filename=name)
        url = self.http.url("upload/")
        timeout = self.http.transfer_timeout(self.stall_timeout)
        try:
            async with self.http.session.post(url, data=form, headers=headers, timeout=timeout,
                                              allow_redirects=False) as resp:
                answer = await read_bounded(resp.content, 1024 * 1024)
                status, resp_headers = resp.status, resp.headers
        except TRANSPORT_ERRORS as exc:
            if body.stalled:
                what = f"upload stalled: the server took nothing for {self.stall_timeout:g} s"
            elif isinstance(exc, TimeoutError):
                what = f"no answer {self.stall_timeout:g} s after sending {body.sent} of {size} bytes"
            else:
                what = f"upload interrupted after {body.sent} of {size} bytes"
            raise TransientError(SERVICE, f"{what}; it may have reached the server (look it up by md5)",
                                 url=redact(url), detail=redact(f"{type(exc).__name__}: {exc}")) from None
        result = Response(status, resp_headers, answer, url)
        if status != 201 and status != 200:
            raise error_for_status(SERVICE, status, url, result.text, resp_headers)
        return parse_upload(result.json(SERVICE))

    # -- submissions ------------------------------------------------------------------------------
    async def submit(self, upload_token: str, metadata: SubmitMetadata) -> str:
        """Confirm the metadata of an upload; returns the new status ("submitted").

        Sent once: a repeat answers 409 "already processed", so a caller that lost the answer
        reads `submission(token)` instead of submitting again.
        """
        resp = await self._request("POST", "submit/", json_body=metadata.to_json(upload_token), retry=False)
        data = _object(resp.json(SERVICE), "submit answer")
        return _required(data, "status", str, "submit answer")

    async def submission(self, token: str) -> Submission:
        resp = await self._request("GET", f"submissions/{token}/")
        return parse_submission(resp.json(SERVICE))

    async def submissions(self) -> list[Submission]:
        """All of this account's submissions, newest first."""
        data = (await self._request("GET", "submissions/")).json(SERVICE)
        if not isinstance(data, list):
            raise _protocol("submission list is not an array", data)
        return [parse_submission(item) for item in data]

    async def find_by_md5(self, md5: str) -> Submission | None:
        """The newest of our submissions holding this archive (how a lost upload answer is recovered)."""
        wanted = md5.lower()
        return next((s for s in await self.submissions() if s.md5hash == wanted), None)

    async def delete(self, token: str) -> None:
        await self._request("DELETE", f"submissions/{token}/", ok=(200, 202, 204))
