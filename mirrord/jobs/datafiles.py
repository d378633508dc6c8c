"""On-disk checks of a data collection's raw files: which files are its own, and a signature.

Blocking (directory scans, stats, HDF5 headers): call from `asyncio.to_thread`. Three template styles
exist: `x_%04d.cbf` (printf), `x_####.cbf` (hashes) and an HDF5 `x_master.h5`.

Which files a collection owns. ISPyB exposes neither `startImageNumber` nor the run number (recorded
py-ispyb, fact 18), and two collections may name the same directory and template (fact 19: the failed
90403 and its re-collection 90404). So a dataset is complete only when its files can be shown to be
its own, from what the API and the file system offer:

1. Exactly its frames. A frame template must match exactly `numberOfImages` files with consecutive
   frame numbers (the first need not be 1); fewer is "not there yet" (wait), more or a gap is not
   attributable. An HDF5 master must open (h5py: links and shapes, never pixel data), every data file
   its `/entry/data` external links (or virtual dataset sources) name must be beside it, open, and be
   at least as large as its datasets' stored bytes, and their frames must add up to `numberOfImages`.
2. Written during its own run. Every file's mtime lies within the collection's start..end, read in
   the facility's time zone (ISPyB's naive times are facility-local: `ispyb.timezone`), widened by
   `ispyb.mtime_slack` on both sides.
3. No other run could have written them. Every other known collection (a `datasets` row) in the same
   directory whose template names any of these files must have failed (run status without "success"),
   with known times, and no file's mtime may fall within that run's window. A re-collection that
   overwrote a failed run's files is therefore attributable; two successful (or running) collections
   writing the same names never are, whatever the mtimes say. A site whose detectors may leave part
   of a file in place when they overwrite sets `ispyb.trust_overwrites = false`: then any other run
   naming the same files needs a person.

When 2 or 3 fails the dataset needs a person; the reason names the dataset's own collection first, then
the other one (a reason is read beside the dataset's id, not its collection's).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from zoneinfo import ZoneInfo

from mirrord.archive.preflight import block_shape, master_blocks

_PRINTF = re.compile(r"%0?(\d*)d")
_HASHES = re.compile(r"#+")
_MASTER = re.compile(r"^(?P<prefix>.+)_master\.h5$")


@dataclass(frozen=True)
class Expectation:
    """What a template names: files matching `pattern` (the frame number is group `frame`), `count` of them."""

    pattern: re.Pattern[str]
    count: int
    # For HDF5: the master file, whose links name the data files.
    master: str | None = None


@dataclass(frozen=True)
class FileStat:
    name: str
    size: int
    mtime_ns: int

    @property
    def mtime(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.mtime_ns / 1e9, dt.UTC)


@dataclass(frozen=True)
class DirScan:
    """The dataset's files as found on disk (only those it would pack)."""

    exists: bool
    stats: tuple[FileStat, ...] = ()  # sorted by name
    shortfall: str | None = None  # why the files are not all there yet, or None when they are
    mismatch: str | None = None  # why these files cannot be exactly this collection's frames

    @property
    def files(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.stats)

    @property
    def total_bytes(self) -> int:
        return sum(s.size for s in self.stats)

    @property
    def signature(self) -> str | None:
        """Over names, sizes and mtimes: any change to the files changes it."""
        if not self.stats:
            return None
        digest = hashlib.sha256()
        for s in self.stats:
            digest.update(f"{s.name}\0{s.size}\0{s.mtime_ns}\n".encode())
        return digest.hexdigest()

    @property
    def last_change(self) -> dt.datetime | None:
        """The newest mtime among the files (UTC)."""
        return max((s.mtime for s in self.stats), default=None)


@dataclass(frozen=True)
class Run:
    """One data collection as the attribution rule sees it (ISPyB's naive facility-local times)."""

    collection_id: int
    template: str
    run_status: str | None
    start: dt.datetime | None
    end: dt.datetime | None

    @property
    def failed(self) -> bool:
        """Ended without success: ISPyB's "failed" means "not success" (fact 10), never a running one."""
        return bool(self.run_status) and "success" not in (self.run_status or "").lower()

    def window(self, zone: ZoneInfo, slack: float) -> tuple[dt.datetime, dt.datetime] | None:
        """Start..end as aware UTC times, widened by `slack`; both readings of an hour a DST change repeats."""
        if self.start is None or self.end is None:
            return None
        start = min(_local(self.start, zone, fold) for fold in (0, 1))
        end = max(_local(self.end, zone, fold) for fold in (0, 1))
        margin = dt.timedelta(seconds=slack)
        return start - margin, end + margin

    def describe(self) -> str:
        return f"collection {self.collection_id} ({self.run_status or 'still running'})"


def _local(naive: dt.datetime, zone: ZoneInfo, fold: int) -> dt.datetime:
    return naive.replace(tzinfo=None, fold=fold).replace(tzinfo=zone).astimezone(dt.UTC)


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
    images = max(0, number_of_images or 0)
    if (master := _MASTER.match(template)) is not None:
        prefix = re.escape(master["prefix"])
        return Expectation(re.compile(rf"^{prefix}_(master|meta|data_\d+)\.h5$"), images, master=template)
    if _PRINTF.search(template):
        regex = _PRINTF.sub(lambda m: rf"(?P<frame>\d{{{m[1]}}})" if m[1] else r"(?P<frame>\d+)",
                            re.escape(template), count=1)
        return Expectation(re.compile(f"^{regex}$"), images)
    if _HASHES.search(template):
        escaped = re.escape(template).replace(r"\#", "#")
        regex = _HASHES.sub(lambda m: rf"(?P<frame>\d{{{len(m.group())}}})", escaped, count=1)
        return Expectation(re.compile(f"^{regex}$"), images)
    return Expectation(re.compile(f"^{re.escape(template)}$"), 1)  # one file named as it is


def _stat(directory: Path, names: Iterable[str]) -> tuple[FileStat, ...]:
    # os.path, not a Path per file: for a 3,600-frame collection pathlib's parsing cost more than the stats.
    base = os.fspath(directory)
    stats = []
    for name in sorted(set(names)):
        st = os.stat(os.path.join(base, name))
        stats.append(FileStat(name, st.st_size, st.st_mtime_ns))
    return tuple(stats)


def scan_dataset(directory: Path, template: str, number_of_images: int | None) -> DirScan:
    """Find the files `template` names in `directory`, with their sizes and mtimes."""
    expected = expectation(template, number_of_images)
    try:
        entries = [e.name for e in os.scandir(directory) if expected.pattern.match(e.name) and e.is_file()]
    except FileNotFoundError:
        return DirScan(exists=False)
    if expected.master is not None:
        return _scan_hdf5(directory, expected.master, entries, number_of_images)
    stats = _stat(directory, entries)
    return DirScan(exists=True, stats=stats, **_frame_verdict(expected, [s.name for s in stats], number_of_images))


def _frame_verdict(expected: Expectation, names: list[str], number_of_images: int | None) -> dict[str, str]:
    if "frame" not in expected.pattern.groupindex:
        return {} if names else {"shortfall": "the file is not on disk yet"}
    if not number_of_images:
        return {"mismatch": "ISPyB gives no number of images: which frames are this collection's cannot be shown"}
    frames = sorted(int(expected.pattern.match(name)["frame"]) for name in names)
    if len(frames) < number_of_images:
        return {"shortfall": f"{len(frames)} of {number_of_images} image files on disk"}
    if len(frames) > number_of_images:
        return {"mismatch": f"{len(frames)} files match the template where ISPyB says {number_of_images} images "
                            f"(frames {frames[0]}..{frames[-1]}): other runs' frames are among them"}
    if frames[-1] - frames[0] + 1 != len(frames):
        return {"mismatch": f"frames {frames[0]}..{frames[-1]} have gaps: {len(frames)} files are not "
                            "one run's consecutive frames"}
    return {}


# -- HDF5: the master names its data files ----------------------------------------------------------
def _scan_hdf5(directory: Path, master: str, entries: list[str], number_of_images: int | None) -> DirScan:
    if master not in entries:
        return DirScan(exists=True, stats=_stat(directory, entries),
                       shortfall=f"HDF5 master file {master} not on disk yet")
    try:
        blocks = master_blocks(directory / master)
    except OSError as exc:  # still being written, or damaged: h5py says which
        return DirScan(exists=True, stats=_stat(directory, entries),
                       shortfall=f"HDF5 master file {master} not readable yet: {exc}")
    names = {master, *(b.file for b in blocks)}
    meta = master.removesuffix("_master.h5") + "_meta.h5"
    if meta in entries:
        names.add(meta)
    missing = sorted(name for name in names if not (directory / name).is_file())
    if missing:
        present = [name for name in names if name not in missing]
        return DirScan(exists=True, stats=_stat(directory, present),
                       shortfall=f"{len(missing)} data file(s) named by {master} not on disk: {', '.join(missing[:3])}")
    stats = _stat(directory, names)
    frames = 0
    for block in blocks:
        try:
            frames += block_shape(directory / block.file, block.path)[0][0]
        except OSError as exc:
            return DirScan(exists=True, stats=stats, shortfall=f"data file {block.file} not readable yet: {exc}")
    if number_of_images and frames < number_of_images:
        return DirScan(exists=True, stats=stats,
                       shortfall=f"{master} names {frames} of {number_of_images} frames")
    if number_of_images and frames > number_of_images:
        return DirScan(exists=True, stats=stats,
                       mismatch=f"{master} names {frames} frames where ISPyB says {number_of_images}")
    if frames == 0:
        return DirScan(exists=True, stats=stats, shortfall=f"{master} names no frames yet")
    return DirScan(exists=True, stats=stats)


# -- attribution ------------------------------------------------------------------------------------
def sharing(scan: DirScan, others: Iterable[Run]) -> list[Run]:
    """The other collections whose template names any of the scanned files."""
    files = scan.files
    found = []
    for other in others:
        pattern = expectation(other.template, None).pattern
        if any(pattern.match(name) for name in files):
            found.append(other)
    return found


def attribution_problem(scan: DirScan, own: Run, others: list[Run], zone: ZoneInfo, slack: float, *,
                        trust_overwrites: bool = True) -> str | None:
    """Why the scanned files cannot be shown to be `own`'s, or None when they can (see the module doc).

    `others` are the other collections in the same directory whose template names these files. Without
    `trust_overwrites` a failed one is no different from a successful one: a person decides.
    """
    if scan.mismatch is not None:
        return scan.mismatch + _naming(own, others)
    for other in others:
        unknown = (f"{own.describe()} and {other.describe()} name the same files ({other.template}): "
                   "which run wrote them cannot be shown")
        if not other.failed:
            return unknown
        if not trust_overwrites:
            return unknown + " (ispyb.trust_overwrites = false)"
    window = own.window(zone, slack)
    if window is None:
        return (f"ISPyB gives collection {own.collection_id} no start or end time: whether the files were "
                "written by its run cannot be shown")
    for other in others:
        theirs = other.window(zone, slack)
        if theirs is None:
            return (f"{own.describe()} and {other.describe()} name the same files, and ISPyB gives collection "
                    f"{other.collection_id} no start or end time")
        written = [s for s in scan.stats if theirs[0] <= s.mtime <= theirs[1]]
        if written:
            return (f"{len(written)} of collection {own.collection_id}'s {len(scan.stats)} files were last written "
                    f"during {other.describe()} ({_span(theirs, zone)}), e.g. {written[0].name}")
    outside = [s for s in scan.stats if not window[0] <= s.mtime <= window[1]]
    if outside:
        return (f"{len(outside)} of {len(scan.stats)} files were modified outside collection {own.collection_id}'s "
                f"run ({_span(window, zone)}), e.g. {outside[0].name} at {_at(outside[0].mtime, zone)}"
                + _naming(own, others))
    return None


def _naming(own: Run, others: list[Run]) -> str:
    named = ", ".join(o.describe() for o in others)
    return f"; collection {own.collection_id} shares its file names with {named}" if others else ""


def _at(when: dt.datetime, zone: ZoneInfo) -> str:
    return when.astimezone(zone).strftime("%Y-%m-%d %H:%M:%S %Z")


def _span(window: tuple[dt.datetime, dt.datetime], zone: ZoneInfo) -> str:
    return f"{_at(window[0], zone)} to {_at(window[1], zone)}"
