"""What packing, extraction and preflight share: sizes, errors, durable renames."""

from __future__ import annotations

import ctypes
import os
import stat
import tarfile
from pathlib import Path

CHUNK = 2 * 1024 * 1024  # large reads: few syscalls and hash calls, still bounded memory
BUFFERS = 6  # tar buffers of CHUNK bytes in flight between the reader and the md5 thread
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


class CorruptArchive(ArchiveError):
    """The archive cannot be read (truncated download, bad checksum, not really this format)."""


def file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "symlink"), (stat.S_ISDIR, "directory"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISFIFO, "fifo"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "special file"


def write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is written (a single write may take only part)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def sync_tree(directory: Path) -> None:
    """Make every file written under `directory` durable, before a rename presents it as complete.

    One syncfs(2) of the file system that holds it flushes them all at once: an fsync per file costs
    a disk flush each, and a mirror version holds thousands of small files. Where syncfs cannot be
    had, sync(2), which flushes every file system.
    """
    fd = os.open(directory, os.O_RDONLY)
    try:
        if _libc_syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


def _libc_syncfs(fd: int) -> int:
    try:
        return ctypes.CDLL(None, use_errno=True).syncfs(fd)
    except (OSError, AttributeError):  # not Linux, or no syncfs in this libc
        return -1


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
