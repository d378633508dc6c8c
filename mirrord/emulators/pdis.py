"""A faithful PDIS (proteindiffraction.org) emulator: token auth, streamed uploads, submissions.

Uploads are streamed to disk (zstd decompressed on the fly) and never held in memory, because real
ones are many gigabytes. Submissions walk the status clock submitted → pending → validated →
published, one step per `step_seconds` (computed lazily, or moved by `advance()`); validation
really opens the stored archive, so an archive without images ends in `error_no_data`.
`submissions_by_md5` counts every accepted submit, which is how tests prove "published exactly once".
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import hashlib
import re
import secrets
import tarfile
import time
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import zstandard
from aiohttp import web

from mirrord.emulators.base import FAULT_KINDS, FAULTS_KEY, Faults, make_app

API = "/api/v1"
CHUNK = 256 * 1024
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
USER_KEY = web.RequestKey("pdis_user", str)

# Inner archive suffix → the magic its first bytes must carry (offset, bytes).
FORMATS: dict[str, tuple[int, tuple[bytes, ...]]] = {
    ".tar": (257, (b"ustar",)),
    ".tar.gz": (0, (b"\x1f\x8b",)),
    ".tgz": (0, (b"\x1f\x8b",)),
    ".tar.bz2": (0, (b"BZh",)),
    ".tbz2": (0, (b"BZh",)),
    ".zip": (0, (b"PK\x03\x04", b"PK\x05\x06")),
}
IMAGE_SUFFIXES = re.compile(r"\.(cbf|h5|hdf5|nxs|img|mccd|osc|sfrm|mar\d*)$", re.IGNORECASE)
PACKED_SUFFIXES = re.compile(r"\.(gz|bz2|xz)$", re.IGNORECASE)
PDB_LIKE = re.compile(r"^[1-9][A-Za-z0-9]{3}$")
FLOW = {"submitted": "pending", "pending": "validated", "validated": "published"}
DELETABLE = {"uploaded", "validated", "error_no_data"}
IN_PROGRESS = {"submitted", "pending"}

EQUIPMENT: list[dict[str, Any]] = [
    {"id": 12, "short": "Diamond", "fullname": "Diamond Light Source", "url": "https://www.diamond.ac.uk",
     "beamlines": [{"id": 30, "short": "I03"}, {"id": 31, "short": "I04"}, {"id": 32, "short": "I04-1"},
                   {"id": 33, "short": "I24"}]},
    {"id": 25, "short": "APS", "fullname": "Advanced Photon Source", "url": "http://www.aps.anl.gov",
     "beamlines": [{"id": 42, "short": "24-ID-C"}, {"id": 43, "short": "24-ID-E"}, {"id": 44, "short": "23-ID-B"},
                   {"id": 45, "short": "21-ID-D"}]},
    {"id": 7, "short": "ESRF", "fullname": "European Synchrotron Radiation Facility", "url": "https://www.esrf.fr",
     "beamlines": [{"id": 20, "short": "ID23-1"}, {"id": 21, "short": "ID30A-1"}, {"id": 22, "short": "ID30B"}]},
    {"id": 9, "short": "SLS", "fullname": "Swiss Light Source", "url": "https://www.psi.ch/sls",
     "beamlines": [{"id": 25, "short": "X06SA"}, {"id": 26, "short": "X10SA"}]},
    {"id": 5, "short": "BESSY II", "fullname": "Helmholtz-Zentrum Berlin BESSY II", "url": "https://www.helmholtz-berlin.de",
     "beamlines": [{"id": 10, "short": "14.1"}, {"id": 11, "short": "14.2"}]},
]


class ApiError(Exception):
    """Answered as `{"error": message}` with `status`, like every PDIS error."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Verdict:
    """What validation concluded about an archive: None status means it is fine."""

    status: str | None = None
    details: str | None = None


@dataclass
class Record:
    token: str
    owner: str
    original_filename: str
    stored: Path
    md5hash: str
    size: int
    pdbid: str | None
    dataset_type: str
    seq: int
    inserted: dt.datetime
    updated: dt.datetime
    changed_at: float  # monotonic time of the last status change: the clock counts from here
    status: str = "uploaded"
    status_details: str | None = None
    project_title: str | None = None
    project_authors: str | None = None
    synchrotron: dict[str, Any] | None = None
    beamline: dict[str, Any] | None = None
    equipment_other: str | None = None
    verdict: Verdict | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "token": self.token, "original_filename": self.original_filename, "md5hash": self.md5hash,
            "pdbid": self.pdbid, "dataset_type": self.dataset_type, "project_title": self.project_title,
            "project_authors": self.project_authors, "synchrotron": self.synchrotron, "beamline": self.beamline,
            "equipment_other": self.equipment_other, "status": self.status, "status_details": self.status_details,
            "inserted": _iso(self.inserted), "updated": _iso(self.updated),
        }


def _iso(when: dt.datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# -- archive handling -------------------------------------------------------------------------------
def archive_suffix(name: str) -> str | None:
    lowered = name.lower()
    return next((s for s in sorted(FORMATS, key=len, reverse=True) if lowered.endswith(s)), None)


def pdb_id_in(filename: str) -> str | None:
    """A PDB-like code ("1ABC": a digit then three characters, at least one a letter) in a file name."""
    for word in re.split(r"[^A-Za-z0-9]+", filename):
        if PDB_LIKE.match(word) and any(c.isalpha() for c in word[1:]):
            return word.upper()
    return None


def _is_image(name: str) -> bool:
    return bool(IMAGE_SUFFIXES.search(PACKED_SUFFIXES.sub("", name)))


def _header_problem(name: str, head: bytes) -> str | None:
    if PACKED_SUFFIXES.search(name):
        return None  # a compressed image: its header is checked after unpacking, not here
    lowered = name.lower()
    if lowered.endswith(".cbf") and not head.startswith(b"###CBF"):
        return f"{name}: not a CBF header"
    if lowered.endswith((".h5", ".hdf5", ".nxs")) and not head.startswith(HDF5_SIGNATURE):
        return f"{name}: no HDF5 signature"
    return None


def validate_archive(path: Path) -> Verdict:
    """Open the stored archive member by member (never whole) and judge its diffraction images."""
    images = 0
    try:
        for name, read_head in _members(path):
            if not _is_image(name):
                continue
            images += 1
            if (problem := _header_problem(name, read_head())) is not None:
                return Verdict("header_not_readable", problem)
    except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as exc:
        return Verdict("header_not_readable", f"archive could not be read: {exc}")
    if images == 0:
        return Verdict("error_no_data", "No diffraction images found in the archive")
    return Verdict()


def _members(path: Path) -> Iterator[tuple[str, Callable[[], bytes]]]:
    """(name, read-its-first-bytes) for each regular file of a tar (any compression) or a zip."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if not info.is_dir():
                    yield info.filename, functools.partial(_zip_head, archive, info)
        return
    # Member by member: a plain tar is walked by seeking past the data, a compressed one by streaming.
    with tarfile.open(path, mode="r:*") as archive:
        while (member := archive.next()) is not None:
            if member.isfile():
                yield member.name, functools.partial(_tar_head, archive, member)


def _zip_head(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    with archive.open(info) as member:
        return member.read(16)


def _tar_head(archive: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    extracted = archive.extractfile(member)
    return extracted.read(16) if extracted is not None else b""


class _DigestingSink:
    """Where the (decompressed) upload lands: a file, its md5 and size, and its first bytes."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.md5 = hashlib.md5()  # noqa: S324 - PDIS identifies files by md5; not a security use
        self.size = 0
        self.head = b""

    def write(self, data: bytes) -> int:
        if len(self.head) < 512:
            self.head += bytes(data[: 512 - len(self.head)])
        self.md5.update(data)
        self.size += len(data)
        self.out.write(data)
        return len(data)

    def flush(self) -> None:
        self.out.flush()


@dataclass
class _Received:
    path: Path
    inner_name: str
    suffix: str
    md5hash: str
    size: int


# -- the emulator -----------------------------------------------------------------------------------
class PdisEmulator:
    """Serve `.app` (e.g. with `base.Served`); point a client at `PdisEmulator.api_url(served.url)`.

    `step_seconds=None` stops the clock: only `advance()` moves it. `bandwidth` caps upload speed
    in bytes/s (benchmarks); `max_upload_bytes` answers 413 beyond it; `existing_pdb_ids` are PDB
    ids the repository already holds (`is_pdb_exists`); `detect_as` maps a PDB id to the one the
    server detects instead (the data is another crystal's: the answer's `pdbid` is not the sender's).
    """

    def __init__(self, *, storage_dir: Path, users: Mapping[str, str] | None = None,
                 step_seconds: float | None = 0.2, faults: Faults | None = None, bandwidth: float | None = None,
                 max_upload_bytes: int | None = None, existing_pdb_ids: set[str] | None = None,
                 detect_as: Mapping[str, str] | None = None) -> None:
        self.storage_dir = Path(storage_dir)
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        self.users = dict(users if users is not None else {"you@lab.edu": "secret"})
        self.step_seconds = step_seconds
        self.bandwidth = bandwidth
        self.max_upload_bytes = max_upload_bytes
        self.existing_pdb_ids = {p.upper() for p in existing_pdb_ids or ()}
        self.detect_as = {k.upper(): v.upper() for k, v in (detect_as or {}).items()}
        self.uploads_by_md5: Counter[str] = Counter()  # accepted (201) uploads per md5
        self.submissions_by_md5: Counter[str] = Counter()  # accepted submits per md5: exactly once?
        # The next N uploads are stored damaged (as if corrupted in transit): their md5 is not the sent one.
        self.damage_next_uploads = 0
        self._records: dict[str, Record] = {}
        self._tokens: dict[str, str] = {}  # API token → user email
        self._forced: dict[str, list[int]] = {}
        self._seq = 0
        # Uploads stream through the multipart reader; this bound only applies to JSON and form bodies.
        self.app = make_app(faults, client_max_size=64 * 1024**2)
        self.faults = self.app[FAULTS_KEY]
        self.app.middlewares.append(self._api_middleware)
        routes = [
            web.post(f"{API}/auth/token/", self._auth_token),
            web.post(f"{API}/upload/", self._upload),
            web.post(f"{API}/submit/", self._submit),
            web.get(f"{API}/submissions/", self._list),
            web.get(f"{API}/submissions/{{token}}/", self._detail),
            web.delete(f"{API}/submissions/{{token}}/", self._delete),
            web.get(f"{API}/equipment/", self._equipment),
        ]
        self.app.add_routes(routes)

    @staticmethod
    def api_url(root_url: str) -> str:
        """The client's base URL for an emulator served at `root_url`."""
        return root_url.rstrip("/") + API + "/"

    # -- test helpers -----------------------------------------------------------------------------
    def advance(self, n: int = 1) -> None:
        """Move every submission in flight `n` steps along the status clock."""
        for record in self._records.values():
            for _ in range(n):
                if record.status in FLOW:
                    self._step(record, time.monotonic())

    def set_status(self, token: str, status: str, details: str | None = None) -> None:
        record = self._records[token]
        record.status, record.status_details = status, details
        record.changed_at, record.updated = time.monotonic(), _now()

    def status_of(self, token: str) -> str:
        record = self._records[token]
        self._tick(record)
        return record.status

    def stored_path(self, token: str) -> Path:
        return self._records[token].stored

    @property
    def held(self) -> dict[str, str]:
        """Status by token of every upload the server still holds (deleted ones are gone)."""
        return {token: self.status_of(token) for token in list(self._records)}

    def fail_next(self, path: str, status: int | str) -> None:
        """Fail the next request under `path` ("/upload/" or a full path).

        A status (401, 409, 413, ...) answers `{"error": ...}`; a base fault kind ("500", "503", "reset",
        "stall", "truncate", ...) behaves like a proxy or a network fault, as in `base.Faults`.
        """
        prefix = path if path.startswith(API) else API + "/" + path.lstrip("/")
        if str(status) in FAULT_KINDS:
            self.faults.inject(prefix, str(status))
        else:
            self._forced.setdefault(prefix, []).append(int(status))

    def regenerate_token(self, email: str) -> None:
        """Like "Regenerate" on the profile page: the old token answers 401 from now on."""
        for token, owner in list(self._tokens.items()):
            if owner == email:
                del self._tokens[token]

    # -- plumbing ---------------------------------------------------------------------------------
    @web.middleware
    async def _api_middleware(self, request: web.Request, handler):
        try:
            for prefix, queue in self._forced.items():
                if request.path.startswith(prefix) and queue:
                    status = queue.pop(0)
                    raise ApiError(status, f"Injected failure (HTTP {status})")
            if request.path != f"{API}/auth/token/":
                request[USER_KEY] = self._authenticate(request)
            return await handler(request)
        except ApiError as exc:
            return web.json_response({"error": exc.message}, status=exc.status)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return web.json_response({"error": exc.reason}, status=exc.status)

    def _authenticate(self, request: web.Request) -> str:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme != "Token" or not token:
            raise ApiError(401, "Authentication credentials were not provided.")
        user = self._tokens.get(token.strip())
        if user is None:
            raise ApiError(401, "Invalid token.")
        return user

    def _owned(self, token: str, user: str) -> Record:
        record = self._records.get(token)
        if record is None:
            raise ApiError(404, "Submission not found.")
        if record.owner != user:
            raise ApiError(403, "You do not have permission to access this submission.")
        self._tick(record)
        return record

    def _tick(self, record: Record) -> None:
        """Apply the status steps that are due by now (the clock is computed lazily on every read)."""
        if not self.step_seconds:
            return
        now = time.monotonic()
        while record.status in FLOW and now - record.changed_at >= self.step_seconds:
            self._step(record, record.changed_at + self.step_seconds)

    def _step(self, record: Record, at: float) -> None:
        following = FLOW[record.status]
        if record.status == "pending":
            record.verdict = record.verdict or validate_archive(record.stored)
            if record.verdict.status is not None:
                following = record.verdict.status
                record.status_details = record.verdict.details
        record.status, record.changed_at, record.updated = following, at, _now()

    # -- handlers ---------------------------------------------------------------------------------
    async def _auth_token(self, request: web.Request) -> web.Response:
        if request.content_type == "application/json":
            try:
                body = await request.json()
            except ValueError:
                raise ApiError(400, "Malformed JSON.") from None
            body = body if isinstance(body, dict) else {}
        else:
            body = dict(await request.post())
        username, password = body.get("username"), body.get("password")
        if not username or not password:
            raise ApiError(400, "Both username and password are required.")
        if self.users.get(str(username)) != password:
            raise ApiError(401, "Unable to log in with provided credentials.")
        # One token per account, the same on every exchange, until it is regenerated.
        token = next((t for t, u in self._tokens.items() if u == username), None)
        if token is None:
            token = secrets.token_hex(20)
            self._tokens[token] = str(username)
        user_id = 42 + list(self.users).index(str(username))
        return web.json_response({"token": token, "user_id": user_id, "email": username})

    async def _upload(self, request: web.Request) -> web.Response:
        if self.max_upload_bytes is not None and (request.content_length or 0) > self.max_upload_bytes:
            raise ApiError(413, "Request entity too large.")
        if not request.content_type.startswith("multipart/"):
            raise ApiError(400, "Expected multipart/form-data with a dataset_file field.")
        reader = await request.multipart()
        dataset_type, received = "pdb", None
        try:
            while (part := await reader.next()) is not None:
                if part.name == "dataset_type":
                    dataset_type = (await part.text()).strip() or "pdb"
                elif part.name == "dataset_file" and received is None:
                    received = await self._receive(part)
                else:
                    await part.release()
            if received is None:
                raise ApiError(400, "dataset_file is required.")
            if dataset_type not in ("pdb", "other"):
                raise ApiError(400, f"Unsupported dataset_type {dataset_type!r}: use 'pdb' or 'other'.")
            if any(r.md5hash == received.md5hash for r in self._records.values()):
                raise ApiError(409, f"Duplicate file hash {received.md5hash}: this file was already uploaded.")
        except BaseException:
            if received is not None:
                received.path.unlink(missing_ok=True)
            raise
        return web.json_response(self._store(request[USER_KEY], received, dataset_type), status=201)

    def _store(self, user: str, received: _Received, dataset_type: str) -> dict[str, Any]:
        token = secrets.token_hex(20)
        if self.damage_next_uploads > 0:
            self.damage_next_uploads -= 1
            received.md5hash = hashlib.md5(received.md5hash.encode()).hexdigest()  # noqa: S324 - a fake digest
        stored = received.path.rename(self.storage_dir / f"{token}{received.suffix}")
        pdbid = pdb_id_in(received.inner_name)
        pdbid = self.detect_as.get(pdbid, pdbid) if pdbid else None
        published = {r.pdbid for r in self._records.values() if r.status == "published"}
        now = _now()
        self._seq += 1
        self._records[token] = Record(token, user, received.inner_name, stored, received.md5hash, received.size,
                                      pdbid, dataset_type, self._seq, now, now, time.monotonic())
        self.uploads_by_md5[received.md5hash] += 1
        return {"token": token, "md5hash": received.md5hash, "filename": received.inner_name,
                "size": received.size, "pdbid": pdbid,
                "is_pdb_exists": pdbid is not None and (pdbid in published or pdbid in self.existing_pdb_ids)}

    async def _receive(self, part) -> _Received:
        """Stream one file part to disk, unpacking zstd on the fly; md5/size describe what is stored."""
        filename = Path(part.filename or "upload").name
        is_zstd = filename.lower().endswith(".zst")
        inner_name = filename[:-4] if is_zstd else filename
        suffix = archive_suffix(inner_name)
        if suffix is None:
            await part.release()
            raise ApiError(400, f"Unsupported file format: {filename}. Use .tar, .tar.gz, .tar.bz2, .zip "
                                "or any of those compressed with zstd.")
        tmp = self.storage_dir / f".incoming-{secrets.token_hex(8)}"
        try:
            sink_md5, size, head = await self._spool(part, tmp, is_zstd)
            offset, magics = FORMATS[suffix]
            if not any(head[offset:offset + len(m)] == m for m in magics):
                raise ApiError(400, f"{inner_name} is not a valid {suffix} archive.")
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return _Received(tmp, inner_name, suffix, sink_md5, size)

    async def _spool(self, part, tmp: Path, is_zstd: bool) -> tuple[str, int, bytes]:
        received, started = 0, time.monotonic()
        with open(tmp, "wb") as out:  # noqa: ASYNC230 - local writes of one chunk are page-cache copies
            sink = _DigestingSink(out)
            writer: Any = sink
            first = True
            try:
                while chunk := await part.read_chunk(CHUNK):
                    if first:
                        first = False
                        # zstd is recognised by name or by magic, as the real server does.
                        if is_zstd or chunk.startswith(ZSTD_MAGIC):
                            if not chunk.startswith(ZSTD_MAGIC):
                                raise ApiError(400, "The file is named .zst but is not zstd-compressed.")
                            writer = zstandard.ZstdDecompressor().stream_writer(sink, write_size=CHUNK,
                                                                                closefd=False)
                    received += len(chunk)
                    if self.max_upload_bytes is not None and received > self.max_upload_bytes:
                        raise ApiError(413, "Request entity too large.")
                    writer.write(chunk)
                    await self._throttle(received, started)
                writer.flush()
            except zstandard.ZstdError as exc:
                raise ApiError(400, f"Corrupt zstd stream: {exc}") from None
        if sink.size == 0:
            raise ApiError(400, "The uploaded file is empty.")
        return sink.md5.hexdigest(), sink.size, sink.head

    async def _throttle(self, received: int, started: float) -> None:
        if self.bandwidth:
            ahead = received / self.bandwidth - (time.monotonic() - started)
            if ahead > 0:
                await asyncio.sleep(ahead)

    async def _submit(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            raise ApiError(400, "Malformed JSON.") from None
        if not isinstance(body, dict):
            raise ApiError(400, "Expected a JSON object.")
        token = body.get("token")
        if not isinstance(token, str) or not token:
            raise ApiError(400, "token is required.")
        record = self._owned(token, request[USER_KEY])
        if record.status != "uploaded":
            raise ApiError(409, f"Submission already processed (status: {record.status}).")
        fields = _validated_metadata(body, record.dataset_type)
        # Validation reads the archive: do it off the event loop now, so the clock's step is instant.
        if record.verdict is None:
            record.verdict = await asyncio.to_thread(validate_archive, record.stored)
        for name, value in fields.items():
            setattr(record, name, value)
        record.status, record.changed_at, record.updated = "submitted", time.monotonic(), _now()
        self.submissions_by_md5[record.md5hash] += 1
        return web.json_response({"status": "submitted", "token": token})

    async def _list(self, request: web.Request) -> web.Response:
        mine = [r for r in self._records.values() if r.owner == request[USER_KEY]]
        for record in mine:
            self._tick(record)
        return web.json_response([r.as_json() for r in sorted(mine, key=lambda r: r.seq, reverse=True)])

    async def _detail(self, request: web.Request) -> web.Response:
        return web.json_response(self._owned(request.match_info["token"], request[USER_KEY]).as_json())

    async def _delete(self, request: web.Request) -> web.Response:
        record = self._owned(request.match_info["token"], request[USER_KEY])
        if record.status in IN_PROGRESS:
            raise ApiError(409, f"Submission is being processed (status: {record.status}).")
        if record.status not in DELETABLE:
            raise ApiError(400, f"A submission in status {record.status!r} cannot be deleted.")
        del self._records[record.token]
        record.stored.unlink(missing_ok=True)
        return web.Response(status=204)

    async def _equipment(self, request: web.Request) -> web.Response:
        return web.json_response([
            {**s, "beamlines": [{"fullname": None, "url": None, **b} for b in s["beamlines"]]} for s in EQUIPMENT
        ])


def _validated_metadata(body: Mapping[str, Any], upload_type: str) -> dict[str, Any]:
    """Check a submit body against the PDIS rules; returns the record fields to set."""
    dataset_type = body.get("dataset_type") or upload_type
    if dataset_type not in ("pdb", "other"):
        raise ApiError(400, "dataset_type must be 'pdb' or 'other'.")
    pdb_code = body.get("pdb_code") or None
    if pdb_code is not None and (not isinstance(pdb_code, str) or not PDB_LIKE.match(pdb_code)):
        raise ApiError(400, f"Invalid pdb_code {pdb_code!r}: expected a 4-character PDB ID.")
    if pdb_code is None and dataset_type != "other":
        raise ApiError(400, "pdb_code is required unless dataset_type is 'other'.")
    texts = {}
    for name in ("project_title", "project_authors", "equipment_other"):
        value = body.get(name)
        if value is not None and not isinstance(value, str):
            raise ApiError(400, f"{name} must be a string.")
        texts[name] = value.strip() if value and value.strip() else None
    if texts["project_title"] is not None and len(texts["project_title"]) < 10:
        raise ApiError(400, "project_title must be at least 10 characters long.")
    synchrotron, beamline = _equipment_choice(body.get("synchrotron_id"), body.get("beamline_id"))
    if pdb_code is None:
        if texts["project_title"] is None:
            raise ApiError(400, "project_title is required when no pdb_code is given.")
        if texts["project_authors"] is None:
            raise ApiError(400, "project_authors is required when no pdb_code is given.")
        if synchrotron is None and texts["equipment_other"] is None:
            raise ApiError(400, "Give synchrotron_id and beamline_id, or equipment_other.")
    fields = {**texts, "dataset_type": dataset_type, "synchrotron": synchrotron, "beamline": beamline}
    if pdb_code is not None:
        fields["pdbid"] = pdb_code.upper()
        # The real server harvests missing metadata from RCSB.
        fields["project_title"] = texts["project_title"] or f"Crystal structure {pdb_code.upper()} (from RCSB)"
        fields["project_authors"] = texts["project_authors"] or "RCSB depositors"
    return fields


def _equipment_choice(synchrotron_id: Any, beamline_id: Any) -> tuple[dict | None, dict | None]:
    if synchrotron_id is None and beamline_id is None:
        return None, None
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (synchrotron_id, beamline_id)):
        raise ApiError(400, "synchrotron_id and beamline_id must be given together, as integers.")
    sync = next((s for s in EQUIPMENT if s["id"] == synchrotron_id), None)
    if sync is None:
        raise ApiError(400, f"Unknown synchrotron_id {synchrotron_id}.")
    line = next((b for b in sync["beamlines"] if b["id"] == beamline_id), None)
    if line is None:
        raise ApiError(400, f"Beamline {beamline_id} does not belong to synchrotron {synchrotron_id}.")
    return {"id": sync["id"], "short": sync["short"]}, {"id": line["id"], "short": line["short"]}

