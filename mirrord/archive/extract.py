"""Defensive extraction of downloaded archives: nothing is ever written outside the destination."""

from __future__ import annotations

import bz2
import os
import stat
import tarfile
import time
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import zstandard

from mirrord.archive.common import BLOCK, CHUNK, CorruptArchive, GiB, UnsafeArchive, file_kind, write_all

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


DEFAULT_MAX_TOTAL_BYTES = 50 * GiB
DEFAULT_MAX_MEMBERS = 200_000
DEFAULT_MAX_RATIO = 200.0  # zip/gzip bombs reach ~1000:1; density maps and PDB text stay far below 100:1
BOMB_FLOOR = 64 * 1024**2  # below this many bytes no ratio is suspicious (tiny archives of zero-byte markers)


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

    One pass: each member is validated (absolute paths, `..`, links leaving the tree, devices and
    fifos, member count, declared sizes and their ratio to the archive size) before it is written,
    and its write counts real bytes against the same limits and checks the resolved path. A zip's
    central directory is validated as a whole before its first entry is written. Raises
    `UnsafeArchive` naming the member, or `CorruptArchive`; what was written before the refusal is
    removed again, and nothing is ever written outside `dest_dir` (extract into a temporary
    directory: a refusal can come after the first members landed). Symlinks that stay inside are
    created last; zip symlinks are always refused.
    """
    archive = Path(archive)
    fmt = fmt or sniff_format(_read_head(archive))
    if fmt not in _TAR_OPENERS and fmt != "zip":
        raise UnsafeArchive(f"{archive.name}: not a recognised archive format ({fmt or 'unknown magic bytes'})")
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    limits = (max_total_bytes, max_members, max_ratio, archive.stat().st_size)
    writer = _SafeWriter(dest_dir, _Budget(*limits))
    try:
        if fmt == "zip":
            _extract_zip(archive, _Budget(*limits), writer)
        else:
            _extract_tar(archive, fmt, _Budget(*limits), writer)
        return writer.finish()
    except BaseException as exc:
        writer.discard()
        if isinstance(exc, tarfile.TarError | zipfile.BadZipFile | EOFError | zlib.error | zstandard.ZstdError) \
                or (isinstance(exc, OSError) and exc.errno is None):  # gzip/bz2 raise errno-less OSError
            raise CorruptArchive(f"{archive.name}: {type(exc).__name__}: {exc}") from exc
        raise  # a refusal, or a real I/O error (disk full...)


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


class _GzipStream:
    """A gzip stream decoded in large reads, members one after another as gzip(1) does.

    GzipFile reads the compressed file 8 KiB at a time, a round of Python per 8 KiB: on a gigabyte
    that was a third of the extraction time. zlib checks each member's CRC and length.
    """

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._inflate = zlib.decompressobj(wbits=31)
        self._input = b""

    def read(self, size: int = CHUNK) -> bytes:
        size = size if size > 0 else CHUNK
        while True:
            if self._inflate.eof and not self._next_member():
                return b""
            if not self._input:
                self._input = self._raw.read(CHUNK)
                if not self._input:
                    raise EOFError("compressed file ended before the end-of-stream marker was reached")
            data = self._inflate.decompress(self._input, size)
            self._input = self._inflate.unconsumed_tail
            if data:
                return data

    def _next_member(self) -> bool:
        """After a member's end: start the next one, or report the end (zero padding may follow)."""
        rest = self._inflate.unused_data.lstrip(b"\0")
        while not rest:
            chunk = self._raw.read(CHUNK)
            if not chunk:
                return False
            rest = chunk.lstrip(b"\0")
        self._inflate = zlib.decompressobj(wbits=31)
        self._input = rest
        return True

    def __enter__(self) -> _GzipStream:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


_TAR_OPENERS: dict[str, Callable[[BinaryIO], BinaryIO]] = {
    "tar": lambda fh: fh,
    "tar.gz": _GzipStream,  # type: ignore[dict-item]
    "tar.bz2": lambda fh: bz2.BZ2File(fh, mode="rb"),  # type: ignore[dict-item]
    "tar.zst": lambda fh: zstandard.ZstdDecompressor().stream_reader(fh, read_across_frames=True),
}


def _extract_tar(archive: Path, fmt: str, budget: _Budget, writer: _SafeWriter) -> None:
    """One streaming pass over a tar: each member is validated, then written."""
    tree = _Tree()
    with open(archive, "rb") as raw, _TAR_OPENERS[fmt](raw) as stream:
        reader = _TarReader(stream)
        tar = tarfile.TarFile(fileobj=reader, mode="r")  # type: ignore[arg-type]
        while (member := tar.next()) is not None:
            tar.members.clear()  # TarFile keeps every TarInfo otherwise: bounded memory
            parts = _check_tar_member(member, budget, tree)
            if not parts:
                continue
            if member.isreg():
                writer.file(member.name, parts, _MemberData(reader, member.size), member.mtime)
            elif member.isdir():
                writer.directory(member.name, parts)
            elif member.issym():
                writer.symlink(member.name, parts, member.linkname)
            elif member.islnk():
                writer.hardlink(member.name, parts, _member_parts(member.linkname))


class _TarReader:
    """The decompressed tar stream as tarfile reads it (exact reads, its position, forward seeks),
    with member data handed out in the decompressor's own chunks.

    tarfile's stream mode copies every byte twice more (joining its buffer, then an io buffer):
    on a gigabyte, as long as decompressing it.
    """

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._buffer = memoryview(b"")
        self._position = 0

    def chunk(self, limit: int) -> memoryview:
        """Up to `limit` next bytes, without copying; empty only at the end of the stream."""
        if not self._buffer:
            self._buffer = memoryview(self._stream.read(CHUNK))
        piece, self._buffer = self._buffer[:limit], self._buffer[limit:]
        self._position += len(piece)
        return piece

    def read(self, size: int) -> bytes:
        pieces = []
        while size > 0 and (piece := self.chunk(size)):
            pieces.append(piece)
            size -= len(piece)
        return b"".join(pieces)

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence != os.SEEK_SET or offset < self._position:
            raise tarfile.ReadError("a compressed stream cannot seek backwards")
        while self._position < offset and self.chunk(offset - self._position):
            pass
        return self._position


class _MemberData:
    """A regular member's bytes, read straight from the stream (tarfile then skips the padding)."""

    def __init__(self, reader: _TarReader, size: int) -> None:
        self._reader = reader
        self._left = size

    def read(self, size: int) -> memoryview:
        if not self._left:
            return memoryview(b"")
        piece = self._reader.chunk(min(size, self._left))
        if not piece:
            raise tarfile.ReadError("unexpected end of data")
        self._left -= len(piece)
        return piece


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
    if member.issparse():  # its data is a map of holes; no Fragalysis or PDIS archive has one
        raise UnsafeArchive(f"sparse member: {name!r}")
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


def _extract_zip(archive: Path, budget: _Budget, writer: _SafeWriter) -> None:
    """The central directory is validated whole (it is read first anyway), then each entry written."""
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
        raise UnsafeArchive(f"{file_kind(mode)} in a zip: {name!r}")
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
    Everything it creates is remembered, so that a refusal half-way can take it all back.
    """

    def __init__(self, root: Path, budget: _Budget) -> None:
        self.root = os.path.realpath(root)
        self.budget = budget
        self.files: list[str] = []
        self._recorded: set[str] = set()
        self._dirs: set[tuple[str, ...]] = {()}
        self._symlinks: list[tuple[str, tuple[str, ...], str]] = []
        self._created: list[str] = []  # in creation order: directories before what is inside them

    def directory(self, name: str, parts: tuple[str, ...]) -> None:
        for depth in range(1, len(parts) + 1):
            key = parts[:depth]
            if key in self._dirs:
                continue
            path = self._path(key)
            try:
                os.mkdir(path, 0o755)
                self._created.append(path)
            except FileExistsError:
                if not stat.S_ISDIR(os.lstat(path).st_mode):
                    raise UnsafeArchive(f"{name!r}: {'/'.join(key)!r} exists and is not a directory") from None
            self._dirs.add(key)

    def file(self, name: str, parts: tuple[str, ...], source: BinaryIO, mtime: float) -> None:
        self.directory(name, parts[:-1])
        path = self._fresh_path(name, parts)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0),
                     0o644)
        self._created.append(path)
        try:
            while chunk := source.read(CHUNK):
                self.budget.add(name, len(chunk), "written")  # counted before writing: never past a limit
                write_all(fd, chunk)
            os.utime(fd, (mtime, mtime))
        finally:
            os.close(fd)
        self._record(parts)

    def hardlink(self, name: str, parts: tuple[str, ...], target: tuple[str, ...]) -> None:
        source = self._path(target)
        if not stat.S_ISREG(os.lstat(source).st_mode):
            raise UnsafeArchive(f"hardlink target is not a regular file: {name!r}")
        self.directory(name, parts[:-1])
        path = self._fresh_path(name, parts)
        os.link(source, path, follow_symlinks=False)
        self._created.append(path)
        self._record(parts)

    def symlink(self, name: str, parts: tuple[str, ...], target: str) -> None:
        self._symlinks.append((name, parts, target))

    def finish(self) -> ExtractResult:
        created: list[str] = []
        for name, parts, target in self._symlinks:
            self.directory(name, parts[:-1])
            path = self._fresh_path(name, parts)
            os.symlink(target, path)
            self._created.append(path)
            created.append(path)
        # Chains of links can resolve differently from each link's text: check the final tree.
        for (name, _parts, target), path in zip(self._symlinks, created, strict=True):
            if not self._inside(os.path.realpath(path)):
                raise UnsafeArchive(f"symlink resolves outside the tree: {name!r} -> {target!r}")
        return ExtractResult(self.files, self.budget.total)

    def discard(self) -> None:
        """Remove everything this writer created, newest first (best effort: a failure is being raised)."""
        for path in reversed(self._created):
            try:
                if stat.S_ISDIR(os.lstat(path).st_mode):
                    os.rmdir(path)
                else:
                    os.unlink(path)
            except OSError:
                pass
        self._created.clear()

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
            raise UnsafeArchive(f"{name!r} would replace an existing {file_kind(st.st_mode)}")
        os.unlink(path)
        return path

    def _inside(self, path: str) -> bool:
        return path == self.root or path.startswith(self.root.rstrip(os.sep) + os.sep)
