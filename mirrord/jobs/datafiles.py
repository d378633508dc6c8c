"""On-disk checks of a data collection's raw files: which files its template names, and a signature.

Blocking (directory scans and stats): call from `asyncio.to_thread`. Three template styles exist:
`x_%04d.cbf` (printf), `x_####.cbf` (hashes) and an HDF5 `x_master.h5` whose data files
`x_data_000001.h5`... sit beside it. The first image number is not always 1, so a printf or hash
template matches any number of its width and the files matching are counted.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

_PRINTF = re.compile(r"%0?(\d*)d")
_HASHES = re.compile(r"#+")
_MASTER = re.compile(r"^(?P<prefix>.+)_master\.h5$")


@dataclass(frozen=True)
class Expectation:
    """What a template asks for: files matching `pattern`, at least `count` of them."""

    pattern: re.Pattern[str]
    count: int
    # For HDF5: the master file that must be among them (data files are counted apart).
    master: str | None = None


@dataclass(frozen=True)
class DirScan:
    """The dataset's files as found on disk (only those its template names)."""

    exists: bool
    files: tuple[str, ...] = ()  # names relative to the directory, sorted
    total_bytes: int = 0
    signature: str | None = None  # over names, sizes and mtimes: any change to the files changes it
    last_change: dt.datetime | None = None  # newest mtime among the files (UTC)
    shortfall: str | None = None  # why the files are not all there yet, or None when they are


def map_path(facility_dir: str, path_map: dict[str, str]) -> str:
    """The local path of a facility directory: the longest matching prefix of `path_map` wins.

    Prefixes match whole path components ("/dls" maps "/dls/i04" but not "/dlsx"). Without a
    matching prefix the facility path is used as it is (the site mounts it at the same place).
    """
    path = PurePosixPath(facility_dir)
    best: tuple[PurePosixPath, str] | None = None
    for prefix, local in path_map.items():
        candidate = PurePosixPath(prefix)
        if (path == candidate or candidate in path.parents) and (best is None or len(candidate.parts) > len(best[0].parts)):
            best = (candidate, local)
    if best is None:
        return facility_dir
    return str(Path(best[1]).joinpath(*path.relative_to(best[0]).parts))


def expectation(template: str, number_of_images: int | None) -> Expectation:
    images = max(1, number_of_images or 1)
    if (master := _MASTER.match(template)) is not None:
        prefix = re.escape(master["prefix"])
        return Expectation(re.compile(rf"^{prefix}_(master|meta|data_\d+)\.h5$"), 2, master=template)
    if _PRINTF.search(template):
        parts = _PRINTF.split(template)  # literal, width, literal, width, ..., literal
        regex = "".join(re.escape(p) if i % 2 == 0 else (rf"\d{{{p}}}" if p else r"\d+") for i, p in enumerate(parts))
        return Expectation(re.compile(f"^{regex}$"), images)
    if _HASHES.search(template):
        regex = _HASHES.sub(lambda m: rf"\d{{{len(m.group())}}}", re.escape(template).replace(r"\#", "#"))
        return Expectation(re.compile(f"^{regex}$"), images)
    return Expectation(re.compile(f"^{re.escape(template)}$"), 1)  # one file named as it is


def _shortfall(expected: Expectation, names: list[str]) -> str | None:
    if expected.master is not None:
        if expected.master not in names:
            return f"HDF5 master file {expected.master} not on disk yet"
        if not any("_data_" in name for name in names):
            return f"no HDF5 data files beside {expected.master} yet"
        return None
    if len(names) < expected.count:
        return f"{len(names)} of {expected.count} image files on disk"
    return None


def scan_dataset(directory: Path, template: str, number_of_images: int | None) -> DirScan:
    """Find the files `template` names in `directory`, with their sizes, mtimes and a signature."""
    expected = expectation(template, number_of_images)
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return DirScan(exists=False)
    stats: list[tuple[str, int, int]] = []
    for entry in entries:
        if expected.pattern.match(entry.name) and entry.is_file():
            st = entry.stat()
            stats.append((entry.name, st.st_size, st.st_mtime_ns))
    stats.sort()
    digest = hashlib.sha256()
    for name, size, mtime_ns in stats:
        digest.update(f"{name}\0{size}\0{mtime_ns}\n".encode())
    newest = max((mtime_ns for _, _, mtime_ns in stats), default=None)
    names = [name for name, _, _ in stats]
    return DirScan(
        exists=True, files=tuple(names), total_bytes=sum(size for _, size, _ in stats),
        signature=digest.hexdigest() if stats else None,
        last_change=dt.datetime.fromtimestamp(newest / 1e9, dt.UTC) if newest is not None else None,
        shortfall=_shortfall(expected, names),
    )
