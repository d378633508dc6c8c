"""Archives in and out: deterministic tar.zst packing for PDIS, defensive extraction of downloads.

Everything here is synchronous and streams in bounded memory: callers run it in a thread
(`asyncio.to_thread`). Three parts:

- packing (`pack_dataset`): same files → same tar bytes → same md5, because PDIS answers a duplicate
  upload with 409 and the only way to adopt the earlier submission is to find it by that md5;
- extraction (`safe_extract`): archives come from remote servers, so every member is validated before
  anything is written and every write is checked again against the destination;
- preflight (`preflight_images`): a dataset without readable diffraction images is refused by PDIS
  after a multi-gigabyte upload, so look at the first bytes of each file before packing.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import os
import queue
import shutil
import stat
import tarfile
import tempfile
import threading
import time
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import zstandard

CHUNK = 2 * 1024 * 1024  # large reads: few syscalls and hash calls, still bounded memory
QUEUE_DEPTH = 4  # chunks waiting for each worker thread
ZSTD_JOB_SIZE = 4 * 1024 * 1024  # per multithreaded job; zstd's default (4 windows) costs ~70 MiB RSS
BLOCK = tarfile.BLOCKSIZE
RECORD = tarfile.RECORDSIZE

GiB = 1024**3


class ArchiveError(Exception):
    """Base class of everything this module raises on purpose."""


class DatasetChanged(ArchiveError):
    """A file changed (size or mtime) while it was being packed: the directory is still being written."""

    def __init__(self, path: Path | str, detail: str = "") -> None:
        self.path = Path(path)
        super().__init__(f"file changed while packing: {path}" + (f" ({detail})" if detail else ""))


class UnsupportedFile(ArchiveError, ValueError):
    """A dataset entry that is not a regular file (symlink, socket, fifo, device, directory)."""

    def __init__(self, path: Path | str, kind: str) -> None:
        self.path = Path(path)
        self.kind = kind
        super().__init__(f"not a regular file ({kind}): {path}")


class UnreadableFile(ArchiveError, OSError):
    """A dataset file that exists but cannot be opened or read (permissions, I/O error)."""

    def __init__(self, path: Path | str, cause: OSError) -> None:
        self.path = Path(path)
        super().__init__(f"cannot read {path}: {cause.strerror or cause}")


class UnsafeArchive(ArchiveError, ValueError):
    """An archive refused by `safe_extract`; `reason` names the offending member."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"unsafe archive: {reason}")


# ============================================================================================
# Packing
# ============================================================================================

@dataclass(frozen=True)
class PackResult:
    path: Path
    tar_md5: str  # of the inner tar stream: what PDIS reports back as `md5hash`
    tar_size: int
    zst_sha256: str  # of the file on disk: to verify the spool file before upload
    zst_size: int
    member_count: int  # tar members, directories included
    source_bytes: int  # file content bytes read


@dataclass(frozen=True)
class _Member:
    arcname: str
    source: Path | None  # None for a directory entry
    mtime: int


_STOP = object()


class _Worker:
    """A thread applying `handle` to queued items in order.

    hashlib, zstd and file writes release the GIL, so md5 of the tar stream, compression and
    sha256 + writing of the output overlap instead of adding up. An error in the worker surfaces
    in the producer at its next `put` or at `close`.
    """

    def __init__(self, name: str, handle: Callable[[object], None], maxsize: int) -> None:
        self._queue: queue.Queue[object] = queue.Queue(maxsize)
        self._handle = handle
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, item: object) -> None:
        while True:
            if self._error is not None:
                raise self._error
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def close(self, *, check: bool = True) -> None:
        """Drain, stop and join; re-raise the worker's error when `check`."""
        self._queue.put(_STOP)  # the worker keeps draining even after an error, so this never blocks for long
        self._thread.join()
        if check and self._error is not None:
            raise self._error

    def _run(self) -> None:
        while (item := self._queue.get()) is not _STOP:
            if self._error is None:
                try:
                    self._handle(item)
                except BaseException as exc:  # handed to the producer
                    self._error = exc


class _HashingSink:
    """The compressor's output: sha256, count and write the compressed bytes in a worker thread."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self.sha256 = hashlib.sha256()
        self.size = 0
        self._worker = _Worker("zst-writer", self._consume, maxsize=QUEUE_DEPTH)

    def write(self, data: bytes) -> int:
        self._worker.put(data)  # python-zstandard hands us a fresh bytes object: safe to queue
        return len(data)

    def flush(self) -> None:
        pass

    def close(self, *, check: bool = True) -> None:
        self._worker.close(check=check)

    def _consume(self, data: object) -> None:
        assert isinstance(data, bytes)
        self.sha256.update(data)
        self.size += len(data)
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]


def pack_dataset(source_dir: Path, dest: Path, *, files: list[str] | None = None,
                 arcname_root: str | None = None, level: int = 3, threads: int = -1,
                 progress: Callable[[int], None] | None = None) -> PackResult:
    """Pack `source_dir` (or only the relative paths in `files`) into a deterministic `dest` .tar.zst.

    `arcname_root` prefixes every member (e.g. the dataset name). `threads=-1` compresses on all cores.
    `progress` receives the number of source bytes read since its previous call.
    Raises `DatasetChanged` if a file changes while being read, `UnsupportedFile` for anything that
    is not a regular file, `UnreadableFile` when a file cannot be read; `dest` is then left untouched.
    """
    source_dir = Path(source_dir)
    dest = Path(dest)
    members = _plan_members(source_dir, files, arcname_root)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with open(fd, "wb", buffering=0) as raw:
            tar, sink = _write_archive(members, raw.fileno(), level, threads, progress)
            os.fsync(raw.fileno())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(dest.parent)
    return PackResult(dest, tar.md5, tar.size, sink.sha256.hexdigest(), sink.size, len(members), tar.source_bytes)


def _write_archive(members: list[_Member], fd: int, level: int, threads: int,
                   progress: Callable[[int], None] | None) -> tuple[_TarStream, _HashingSink]:
    sink = _HashingSink(fd)
    tar: _TarStream | None = None
    try:
        params = zstandard.ZstdCompressionParameters.from_level(
            level, threads=threads, job_size=ZSTD_JOB_SIZE if threads else 0, write_checksum=1)
        compressor = zstandard.ZstdCompressor(compression_params=params)
        with compressor.stream_writer(sink, closefd=False, write_size=CHUNK) as zst:
            tar = _TarStream(zst, progress)  # type: ignore[arg-type]
            for member in members:
                tar.add(member)
            tar.finish()
    except BaseException:
        if tar is not None:
            tar.abort()
        sink.close(check=False)
        raise
    sink.close()
    assert tar is not None
    return tar, sink


def _plan_members(source_dir: Path, files: list[str] | None, arcname_root: str | None) -> list[_Member]:
    """The sorted member list: every file plus a directory entry for each of its ancestors."""
    rel_files = sorted(set(files)) if files is not None else list(_walk_regular_files(source_dir))
    if not rel_files:
        raise ArchiveError(f"nothing to pack in {source_dir}")
    root_parts = tuple(p for p in (arcname_root or "").split("/") if p)
    entries: dict[tuple[str, ...], _Member] = {}
    dir_mtimes: dict[tuple[str, ...], int] = {}
    for rel in rel_files:
        parts = _relative_parts(rel)
        path = source_dir.joinpath(*parts)
        st = _lstat_regular(path)
        full = root_parts + parts
        entries[full] = _Member("/".join(full), path, int(st.st_mtime))
        # A directory's mtime is that of its newest file: stable for the same files, unlike the real
        # directory mtime which moves whenever anything (a temp file) is created beside them.
        for depth in range(1, len(full)):
            key = full[:depth]
            dir_mtimes[key] = max(dir_mtimes.get(key, 0), int(st.st_mtime))
    for key, mtime in dir_mtimes.items():
        entries[key] = _Member("/".join(key), None, mtime)
    return [entries[key] for key in sorted(entries)]


def _relative_parts(rel: str) -> tuple[str, ...]:
    parts = tuple(p for p in str(rel).replace(os.sep, "/").split("/") if p not in ("", "."))
    if not parts or str(rel).startswith("/") or ".." in parts:
        raise ValueError(f"not a relative path inside the dataset: {rel!r}")
    return parts


def _walk_regular_files(source_dir: Path) -> Iterator[str]:
    for dirpath, dirnames, filenames in os.walk(source_dir, onerror=_raise):
        for name in dirnames:
            if os.path.islink(os.path.join(dirpath, name)):
                raise UnsupportedFile(os.path.join(dirpath, name), "symlink")
        rel_dir = os.path.relpath(dirpath, source_dir)
        for name in filenames:
            yield name if rel_dir == "." else f"{rel_dir}/{name}".replace(os.sep, "/")


def _raise(exc: OSError) -> None:
    raise exc


def _lstat_regular(path: Path) -> os.stat_result:
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        raise UnsupportedFile(path, _kind(st.st_mode))
    return st


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "symlink"), (stat.S_ISDIR, "directory"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISFIFO, "fifo"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "special file"


def _tar_header(member: _Member, size: int) -> bytes:
    info = tarfile.TarInfo(member.arcname)
    info.mtime = member.mtime  # an int: a float would add a PAX mtime record
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if member.source is None:
        info.type, info.mode, info.size = tarfile.DIRTYPE, 0o755, 0
    else:
        info.type, info.mode, info.size = tarfile.REGTYPE, 0o644, size
    return info.tobuf(tarfile.PAX_FORMAT, encoding="utf-8", errors="surrogateescape")


class _TarStream:
    """Feeds tar bytes to the compressor while a worker thread computes their md5 and size."""

    def __init__(self, out: BinaryIO, progress: Callable[[int], None] | None) -> None:
        self._out = out
        self._progress = progress
        self._md5 = hashlib.md5(usedforsecurity=False)
        self.size = 0
        self.source_bytes = 0
        self.md5 = ""  # set by finish()
        self._hasher = _Worker("tar-md5", self._md5.update, maxsize=QUEUE_DEPTH)

    def emit(self, data: bytes) -> None:
        self._out.write(data)
        self._hasher.put(data)
        self.size += len(data)

    def add(self, member: _Member) -> None:
        if member.source is None:
            self.emit(_tar_header(member, 0))
            return
        size = self._copy_file(member)
        self.source_bytes += size
        if size % BLOCK:
            self.emit(bytes(BLOCK - size % BLOCK))

    def finish(self) -> None:
        self.emit(bytes(2 * BLOCK))  # end-of-archive marker
        if self.size % RECORD:
            self.emit(bytes(RECORD - self.size % RECORD))  # a full last record, as tar(1) and tarfile write
        self._hasher.close()
        self.md5 = self._md5.hexdigest()

    def abort(self) -> None:
        self._hasher.close(check=False)

    def _copy_file(self, member: _Member) -> int:
        path = member.source
        assert path is not None
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            if os.path.islink(path):
                raise UnsupportedFile(path, "symlink") from None
            raise UnreadableFile(path, exc) from exc
        try:
            before = os.fstat(fd)
            if not stat.S_ISREG(before.st_mode):
                raise UnsupportedFile(path, _kind(before.st_mode))
            size = before.st_size
            self.emit(_tar_header(member, size))
            remaining = size
            while remaining:
                chunk = _read(fd, min(remaining, CHUNK), path)
                if not chunk:
                    raise DatasetChanged(path, f"shrank to {size - remaining} bytes")
                self.emit(chunk)
                remaining -= len(chunk)
                if self._progress:
                    self._progress(len(chunk))
            if _read(fd, 1, path):
                raise DatasetChanged(path, "grew while being read")
            after = os.fstat(fd)
        finally:
            os.close(fd)
        if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns) \
                or int(before.st_mtime) != member.mtime:
            raise DatasetChanged(path, "size or mtime changed")
        return size


def _read(fd: int, size: int, path: Path) -> bytes:
    try:
        return os.read(fd, size)
    except OSError as exc:
        raise UnreadableFile(path, exc) from exc


def fsync_dir(directory: Path) -> None:
    """Make the rename itself durable; not every file system allows opening a directory."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def verify_spool(path: Path, sha256: str, size: int) -> bool:
    """Whether the file at `path` still has exactly this size and sha256 (streamed, bounded memory)."""
    try:
        if os.stat(path).st_size != size:
            return False
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            while chunk := fh.read(CHUNK):
                digest.update(chunk)
    except FileNotFoundError:
        return False
    return digest.hexdigest() == sha256.lower()


# ============================================================================================
# Disk space
# ============================================================================================

def dataset_size(files: Iterable[Path | str]) -> int:
    """Total content bytes of `files` (tar adds about 1 KiB per file on top)."""
    return sum(os.stat(path).st_size for path in files)


def free_space_ok(directory: Path | str, needed_bytes: int, margin: float = 0.05,
                  reserve_bytes: int = 256 * 1024**2) -> bool:
    """Whether `directory` (or its nearest existing ancestor) has room for `needed_bytes`.

    Keeps `margin` (a fraction of `needed_bytes`: tar headers, padding) and `reserve_bytes` free on
    top, so a spool never fills the disk the lab's other software writes to.
    """
    path = Path(directory).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    free = shutil.disk_usage(path).free
    return free >= needed_bytes + int(needed_bytes * margin) + reserve_bytes


# ============================================================================================
# Format sniffing
# ============================================================================================

_MAGICS = (
    (b"PK\x03\x04", "zip"),
    (b"PK\x05\x06", "zip"),  # an empty zip: only the end-of-central-directory record
    (b"\x1f\x8b", "tar.gz"),
    (b"\x28\xb5\x2f\xfd", "tar.zst"),
    (b"BZh", "tar.bz2"),
)


def sniff_format(head: bytes) -> str | None:
    """The archive format from its first bytes (512 or more recognise a plain tar), or None.

    Servers mislabel archives (Fragalysis sends `application/zip` for tar.gz): trust the bytes.
    Compressed formats are assumed to hold a tar.
    """
    for magic, name in _MAGICS:
        if head.startswith(magic):
            return name
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    if len(head) >= BLOCK and _is_v7_tar_header(head[:BLOCK]):
        return "tar"
    return None


def _is_v7_tar_header(block: bytes) -> bool:
    """A pre-POSIX tar header has no magic: recognise it by its checksum."""
    try:
        stored = int(block[148:156].split(b"\0", 1)[0].strip() or b"-1", 8)
    except ValueError:
        return False
    if stored < 0 or not block[0]:
        return False
    unsigned = sum(block[:148]) + 8 * 32 + sum(block[156:])
    return stored == unsigned


def _read_head(path: Path, size: int = BLOCK) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(size)


# ============================================================================================
# Safe extraction
# ============================================================================================

DEFAULT_MAX_TOTAL_BYTES = 50 * GiB
DEFAULT_MAX_MEMBERS = 200_000
DEFAULT_MAX_RATIO = 200.0  # zip/gzip bombs reach ~1000:1; density maps and PDB text stay far below 100:1
BOMB_FLOOR = 64 * 1024**2  # below this many bytes no ratio is suspicious (tiny archives of zero-byte markers)


class CorruptArchive(ArchiveError):
    """The archive cannot be read (truncated download, bad checksum, not really this format)."""


@dataclass(frozen=True)
class ExtractResult:
    files: list[str]  # regular files written (hardlinks included), relative POSIX paths, archive order
    total_bytes: int  # bytes actually written


@dataclass
class _Budget:
    """Limits on member count, total size and expansion ratio, checked as sizes accrue."""

    max_total_bytes: int
    max_members: int
    max_ratio: float
    compressed_size: int
    members: int = 0
    total: int = 0

    def member(self, name: str) -> None:
        self.members += 1
        if self.members > self.max_members:
            raise UnsafeArchive(f"more than {self.max_members} members (at {name!r})")

    def add(self, name: str, size: int, what: str) -> None:
        self.total += size
        if self.total > self.max_total_bytes:
            raise UnsafeArchive(f"{what} size exceeds {self.max_total_bytes} bytes (at {name!r})")
        if self.total > BOMB_FLOOR and self.total > self.max_ratio * max(self.compressed_size, 1):
            raise UnsafeArchive(f"decompression bomb: {self.total} bytes {what} from {self.compressed_size} "
                                f"compressed, ratio over {self.max_ratio:g} (at {name!r})")


def safe_extract(archive: Path, dest_dir: Path, *, fmt: str | None = None,
                 max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES, max_members: int = DEFAULT_MAX_MEMBERS,
                 max_ratio: float = DEFAULT_MAX_RATIO) -> ExtractResult:
    """Extract a tar, tar.gz, tar.bz2, tar.zst or zip `archive` into `dest_dir`, refusing anything unsafe.

    Every member is validated before anything is written (absolute paths, `..`, links leaving the
    tree, devices and fifos, member count, declared sizes and their ratio to the archive size); the
    writes then count real bytes against the same limits and check each resolved path. Raises
    `UnsafeArchive` naming the member, or `CorruptArchive`. On failure `dest_dir` may hold part of
    the archive (extract into a temporary directory and discard it), but nothing is ever written
    outside it. Symlinks that stay inside are created last; zip symlinks are always refused.
    A tar is read twice (validate, then write): compressed streams cannot seek back.
    """
    archive = Path(archive)
    fmt = fmt or sniff_format(_read_head(archive))
    if fmt not in _TAR_OPENERS and fmt != "zip":
        raise UnsafeArchive(f"{archive.name}: not a recognised archive format ({fmt or 'unknown magic bytes'})")
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    limits = (max_total_bytes, max_members, max_ratio, archive.stat().st_size)
    try:
        if fmt == "zip":
            return _extract_zip(archive, dest_dir, limits)
        _scan_tar(archive, fmt, _Budget(*limits), None)
        return _scan_tar(archive, fmt, _Budget(*limits), _SafeWriter(dest_dir, _Budget(*limits)))
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, zstandard.ZstdError) as exc:
        raise CorruptArchive(f"{archive.name}: {type(exc).__name__}: {exc}") from exc
    except OSError as exc:
        if exc.errno is not None:  # a real I/O error (disk full...), not bad data
            raise
        raise CorruptArchive(f"{archive.name}: {exc}") from exc  # gzip/bz2 decoders raise errno-less OSError


def _member_parts(name: str) -> tuple[str, ...]:
    """Split a member name into safe components ("./" prefixes dropped); refuse escapes."""
    if "\0" in name:
        raise UnsafeArchive(f"member name with a NUL byte: {name!r}")
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":" and name[0].isalpha()):
        raise UnsafeArchive(f"absolute path: {name!r}")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    # A backslash is a plain character here, but another OS would read "..\\" as a parent step.
    if any(p == ".." for part in parts for p in part.split("\\")):
        raise UnsafeArchive(f"parent directory component: {name!r}")
    return parts


class _Tree:
    """What the archive has declared so far, to catch conflicts and writes through symlinks."""

    def __init__(self) -> None:
        self.kinds: dict[tuple[str, ...], str] = {}

    def claim(self, name: str, parts: tuple[str, ...], kind: str) -> None:
        for depth in range(1, len(parts)):
            above = self.kinds.get(parts[:depth])
            if above == "symlink":
                raise UnsafeArchive(f"member below a symlink: {name!r}")
            if above not in (None, "dir"):
                raise UnsafeArchive(f"member below a {above}: {name!r}")
        previous = self.kinds.get(parts)
        # A repeated file replaces the earlier one (tar append semantics); any other clash is refused.
        if previous is not None and not (previous == kind and kind in ("dir", "file")):
            raise UnsafeArchive(f"{kind} {name!r} clashes with an earlier {previous}")
        self.kinds[parts] = kind


def _symlink_stays_inside(parts: tuple[str, ...], target: str) -> bool:
    if not target or target.startswith("/") or "\0" in target:
        return False
    resolved = os.path.normpath(os.path.join(*parts[:-1], target) if len(parts) > 1 else target)
    return resolved != ".." and not resolved.startswith("../") and not os.path.isabs(resolved)


_TAR_OPENERS: dict[str, Callable[[BinaryIO], BinaryIO]] = {
    "tar": lambda fh: fh,
    "tar.gz": lambda fh: gzip.GzipFile(fileobj=fh, mode="rb"),  # type: ignore[dict-item]
    "tar.bz2": lambda fh: bz2.BZ2File(fh, mode="rb"),  # type: ignore[dict-item]
    "tar.zst": lambda fh: zstandard.ZstdDecompressor().stream_reader(fh, read_across_frames=True),
}


def _scan_tar(archive: Path, fmt: str, budget: _Budget, writer: _SafeWriter | None) -> ExtractResult:
    """One streaming pass over a tar: validate every member, and write it when a writer is given."""
    tree = _Tree()
    with open(archive, "rb") as raw, _TAR_OPENERS[fmt](raw) as stream, \
            tarfile.open(fileobj=stream, mode="r|") as tar:
        while (member := tar.next()) is not None:
            tar.members.clear()  # stream mode keeps every TarInfo otherwise: bounded memory
            parts = _check_tar_member(member, budget, tree)
            if writer is None or not parts:
                continue
            if member.isreg():
                source = tar.extractfile(member)
                assert source is not None
                writer.file(member.name, parts, source, member.mtime)
            elif member.isdir():
                writer.directory(member.name, parts)
            elif member.issym():
                writer.symlink(member.name, parts, member.linkname)
            elif member.islnk():
                writer.hardlink(member.name, parts, _member_parts(member.linkname))
    if writer is None:
        return ExtractResult([], 0)
    return writer.finish()


def _check_tar_member(member: tarfile.TarInfo, budget: _Budget, tree: _Tree) -> tuple[str, ...]:
    name = member.name
    budget.member(name)
    parts = _member_parts(name)
    if member.ischr() or member.isblk() or member.isfifo():
        raise UnsafeArchive(f"device or fifo: {name!r}")
    if not parts:
        if not member.isdir():
            raise UnsafeArchive(f"the archive root is not a directory: {name!r}")
        return parts
    if member.isreg():
        tree.claim(name, parts, "file")
        budget.add(name, member.size, "declared")
    elif member.isdir():
        tree.claim(name, parts, "dir")
    elif member.issym():
        if not _symlink_stays_inside(parts, member.linkname):
            raise UnsafeArchive(f"symlink leaves the tree: {name!r} -> {member.linkname!r}")
        tree.claim(name, parts, "symlink")
    elif member.islnk():
        target = _member_parts(member.linkname) if member.linkname else ()
        if tree.kinds.get(target) != "file":
            raise UnsafeArchive(f"hardlink to a path outside the tree or not an earlier file: "
                                f"{name!r} -> {member.linkname!r}")
        tree.claim(name, parts, "file")
    else:
        raise UnsafeArchive(f"unsupported member type {member.type!r}: {name!r}")
    _second_opinion(member)
    return parts


def _second_opinion(member: tarfile.TarInfo) -> None:
    """tarfile's own "data" filter (Python 3.11.4+) as a second layer behind the checks above."""
    data_filter = getattr(tarfile, "data_filter", None)
    if data_filter is None:
        return
    try:
        # A fictitious root: the checks above already refuse anything resolving outside it.
        data_filter(member, "/nonexistent-extract-root")
    except tarfile.TarError as exc:
        raise UnsafeArchive(f"{member.name!r}: {exc}") from exc


def _extract_zip(archive: Path, dest_dir: Path, limits: tuple[int, int, float, int]) -> ExtractResult:
    writer = _SafeWriter(dest_dir, _Budget(*limits))
    budget = _Budget(*limits)
    tree = _Tree()
    with zipfile.ZipFile(archive) as zf:
        plan = [(info, _check_zip_member(info, budget, tree)) for info in zf.infolist()]
        for info, parts in plan:
            if not parts:
                continue
            if info.is_dir():
                writer.directory(info.filename, parts)
                continue
            with zf.open(info) as source:
                writer.file(info.filename, parts, source, _zip_mtime(info))
    return writer.finish()


def _zip_mtime(info: zipfile.ZipInfo) -> float:
    try:
        return time.mktime((*info.date_time, 0, 0, -1))  # zip stores local time
    except (OverflowError, ValueError):
        return time.time()


def _check_zip_member(info: zipfile.ZipInfo, budget: _Budget, tree: _Tree) -> tuple[str, ...]:
    name = info.filename
    budget.member(name)
    parts = _member_parts(name)
    mode = info.external_attr >> 16  # Unix mode, when the creator stored one; the type bits may be absent
    if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise UnsafeArchive(f"{_kind(mode)} in a zip: {name!r}")
    if info.flag_bits & 0x1:
        raise UnsafeArchive(f"encrypted member: {name!r}")
    if parts:
        if info.is_dir():
            tree.claim(name, parts, "dir")
        else:
            tree.claim(name, parts, "file")
            budget.add(name, info.file_size, "declared")
    return parts


class _SafeWriter:
    """Writes members under one root, checking each resolved path and counting the bytes written.

    Directories are made one component at a time and never followed through a symlink; symlinks
    themselves are created only after every file is written, so no write can pass through one.
    """

    def __init__(self, root: Path, budget: _Budget) -> None:
        self.root = os.path.realpath(root)
        self.budget = budget
        self.files: list[str] = []
        self._recorded: set[str] = set()
        self._dirs: set[tuple[str, ...]] = {()}
        self._symlinks: list[tuple[str, tuple[str, ...], str]] = []

    def directory(self, name: str, parts: tuple[str, ...]) -> None:
        for depth in range(1, len(parts) + 1):
            key = parts[:depth]
            if key in self._dirs:
                continue
            path = self._path(key)
            try:
                os.mkdir(path, 0o755)
            except FileExistsError:
                if not stat.S_ISDIR(os.lstat(path).st_mode):
                    raise UnsafeArchive(f"{name!r}: {'/'.join(key)!r} exists and is not a directory") from None
            self._dirs.add(key)

    def file(self, name: str, parts: tuple[str, ...], source: BinaryIO, mtime: float) -> None:
        self.directory(name, parts[:-1])
        path = self._fresh_path(name, parts)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0),
                     0o644)
        try:
            while chunk := source.read(CHUNK):
                self.budget.add(name, len(chunk), "written")  # counted before writing: never past a limit
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
            os.utime(fd, (mtime, mtime))
        finally:
            os.close(fd)
        self._record(parts)

    def hardlink(self, name: str, parts: tuple[str, ...], target: tuple[str, ...]) -> None:
        source = self._path(target)
        if not stat.S_ISREG(os.lstat(source).st_mode):
            raise UnsafeArchive(f"hardlink target is not a regular file: {name!r}")
        self.directory(name, parts[:-1])
        os.link(source, self._fresh_path(name, parts), follow_symlinks=False)
        self._record(parts)

    def symlink(self, name: str, parts: tuple[str, ...], target: str) -> None:
        self._symlinks.append((name, parts, target))

    def finish(self) -> ExtractResult:
        created: list[str] = []
        try:
            for name, parts, target in self._symlinks:
                self.directory(name, parts[:-1])
                path = self._fresh_path(name, parts)
                os.symlink(target, path)
                created.append(path)
            # Chains of links can resolve differently from each link's text: check the final tree.
            for (name, _parts, target), path in zip(self._symlinks, created, strict=True):
                if not self._inside(os.path.realpath(path)):
                    raise UnsafeArchive(f"symlink resolves outside the tree: {name!r} -> {target!r}")
        except BaseException:
            for path in created:
                os.unlink(path)
            raise
        return ExtractResult(self.files, self.budget.total)

    def _record(self, parts: tuple[str, ...]) -> None:
        rel = "/".join(parts)
        if rel not in self._recorded:  # a repeated member replaced its earlier copy
            self._recorded.add(rel)
            self.files.append(rel)

    def _path(self, parts: tuple[str, ...]) -> str:
        path = os.path.join(self.root, *parts)
        # The parent must resolve to exactly where it should: no symlink anywhere on the way.
        parent = os.path.dirname(path)
        if os.path.realpath(parent) != parent or not self._inside(path):
            raise UnsafeArchive(f"path resolves outside the destination: {'/'.join(parts)!r}")
        return path

    def _fresh_path(self, name: str, parts: tuple[str, ...]) -> str:
        """The member's path, with an earlier regular file of the same name removed (tar append)."""
        path = self._path(parts)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return path
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeArchive(f"{name!r} would replace an existing {_kind(st.st_mode)}")
        os.unlink(path)
        return path

    def _inside(self, path: str) -> bool:
        return path == self.root or path.startswith(self.root.rstrip(os.sep) + os.sep)


# ============================================================================================
# Preflight: does the dataset hold diffraction images with readable headers?
# ============================================================================================

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
IMAGE_HEAD = 4096  # every supported header identifies itself within this many bytes
IMAGE_SUFFIXES = {".cbf", ".img", ".h5", ".hdf5", ".nxs", ".mccd", ".tif", ".tiff", ".osc", ".sfrm", ".mar"}
_COMPRESSED_READ = {".gz": 64 * 1024, ".bz2": 1024 * 1024}  # bz2 emits nothing before a whole block


@dataclass(frozen=True)
class Preflight:
    ok: bool
    reason: str  # why not ok, or a one-line summary
    images: int  # image files; for HDF5, data files that have a master beside them
    formats: set[str] = field(default_factory=set)


def image_format(path: Path | str) -> str | None:
    """The diffraction image format from the file's first bytes (gzip/bzip2-compressed images too)."""
    path = Path(path)
    try:
        head = _image_head(path)
    except (OSError, EOFError, ValueError, zlib.error):
        return None
    return _image_format_of(head)


def image_header_readable(path: Path | str) -> bool:
    return image_format(path) is not None


def _image_head(path: Path) -> bytes:
    with open(path, "rb") as fh:
        head = fh.read(IMAGE_HEAD)
        if head.startswith(b"\x1f\x8b"):
            data = head + fh.read(_COMPRESSED_READ[".gz"] - len(head))
            return zlib.decompressobj(wbits=31).decompress(data, IMAGE_HEAD)
        if head.startswith(b"BZh"):
            data = head + fh.read(_COMPRESSED_READ[".bz2"] - len(head))
            return bz2.BZ2Decompressor().decompress(data, IMAGE_HEAD)
    return head


def _image_format_of(head: bytes) -> str | None:
    if head.startswith(b"###CBF"):
        return "cbf"
    # HDF5 allows a user block before the superblock: the signature sits at 0, 512, 1024, 2048...
    if any(head[offset:offset + 8] == HDF5_SIGNATURE for offset in (0, 512, 1024, 2048)):
        return "hdf5"
    if head.startswith(b"{") and b"HEADER_BYTES=" in head[:128]:
        return "smv"  # ADSC and the many detectors that write SMV .img
    if head[:4] in (b"\xd2\x04\x00\x00", b"\x00\x00\x04\xd2"):
        return "mar345"  # first int32 is 1234 in either byte order
    if head[:4] in (b"II*\x00", b"MM\x00*") and len(head) >= 3072:
        return "tiff"  # MarCCD/Rayonix: a TIFF with a 2048-byte frame header after 1024 bytes
    if head.startswith(b"RAXIS"):
        return "raxis"
    if head.startswith(b"FORMAT :"):
        return "bruker"
    return None


def _looks_like_image(path: Path) -> bool:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSED_READ:
        suffixes.pop()
    if not suffixes:
        return False
    last = suffixes[-1]
    return last in IMAGE_SUFFIXES or last.startswith(".mar")  # .mar2300, .mar3450...


def _hdf5_master_stem(name: str) -> str | None:
    for ending in ("_master.h5", "_master.hdf5", ".nxs"):
        if name.endswith(ending):
            return name[: -len(ending)]
    return None


def preflight_images(files: list[Path]) -> Preflight:
    """Check, from the first bytes of each file, that a dataset holds diffraction images PDIS can read.

    Fails (with the first reason found) on an image-named file whose header is not recognised, an
    HDF5 master without data files beside it, data files without a master, or no images at all.
    Other files (logs, processing output) are ignored.
    """
    images = 0
    formats: set[str] = set()
    problem = ""
    hdf5: dict[Path, list[str]] = {}  # directory -> HDF5 file names
    for path in map(Path, files):
        fmt = image_format(path)
        if fmt is None:
            if _looks_like_image(path) and not problem:
                problem = f"image header not readable: {path.name}"
            continue
        formats.add(fmt)
        if fmt == "hdf5":
            hdf5.setdefault(path.parent, []).append(path.name)
        else:
            images += 1
    for names in hdf5.values():
        found, reason = _pair_hdf5(names)
        images += found
        problem = problem or reason
    if not problem and images == 0:
        problem = "no diffraction images"
    if problem:
        return Preflight(False, problem, images, formats)
    return Preflight(True, f"{images} images ({', '.join(sorted(formats))})", images, formats)


def _pair_hdf5(names: list[str]) -> tuple[int, str]:
    """Count data files that travel with a master in one directory; report the first mismatch."""
    masters = {name: stem for name in names if (stem := _hdf5_master_stem(name)) is not None}
    data = [name for name in names if name not in masters]
    claimed: set[str] = set()
    problem = ""
    for master, stem in sorted(masters.items()):
        mine = [name for name in data if name.startswith(stem + "_")]
        claimed.update(mine)
        if not mine and not problem:
            problem = f"HDF5 master without data files: {master}"
    orphans = sorted(name for name in data if name not in claimed and "_data_" in name)
    if orphans and not problem:
        problem = f"HDF5 data files without a master: {orphans[0]}"
    return len(claimed), problem
