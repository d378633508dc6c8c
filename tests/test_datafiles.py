"""The file checks of mirrord/jobs/datafiles.py on their own, on real files (CBF frames, real HDF5 written
with h5py): what a template names, what counts as complete, and the words each verdict gives a person.

The mutation run of datafiles.py found these unasserted by the ISPyB job's tests, which see the checks
only through a dataset's state: which files a waiting dataset's signature covers, each verdict's
message, the facility-local times in it. Each test names the mutants it was written for.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from zoneinfo import ZoneInfo

import h5py
import numpy as np
import pytest

from mirrord.jobs.datafiles import (
    DirScan,
    FileStat,
    Run,
    attribution_problem,
    expectation,
    map_path,
    scan_dataset,
    sharing,
)

LONDON = ZoneInfo("Europe/London")


def frames(directory: Path, template: str, numbers: range, *, at: float | None = None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for n in numbers:
        path = directory / (template % n)
        path.write_bytes(b"###CBF: frame %d\n" % n)
        if at is not None:
            os.utime(path, (at + n, at + n))


def eiger(directory: Path, prefix: str, per_file: list[int], *, meta: bool = False) -> None:
    """An Eiger layout: the master's /entry/data links `data_00000N` to each data file's frame stack."""
    directory.mkdir(parents=True, exist_ok=True)
    with h5py.File(directory / f"{prefix}_master.h5", "w") as master:
        group = master.create_group("entry/data")
        for n, count in enumerate(per_file, start=1):
            name = f"{prefix}_data_{n:06d}.h5"
            with h5py.File(directory / name, "w") as data:
                data.create_dataset("entry/data/data", data=np.zeros((count, 2, 2), dtype=np.uint16))
            group[f"data_{n:06d}"] = h5py.ExternalLink(name, "/entry/data/data")
    if meta:
        with h5py.File(directory / f"{prefix}_meta.h5", "w") as f:
            f.attrs["detector"] = "Eiger2 XE 16M"


# -- what a template names ------------------------------------------------------------------------------
def test_templates_name_exactly_their_frames() -> None:
    printf = expectation("x_%04d.cbf", 3)
    assert [n for n in ("x_0007.cbf", "x_007.cbf", "x_00007.cbf", "x_0007xcbf", "y_x_0007.cbf")
            if printf.pattern.match(n)] == ["x_0007.cbf"]
    assert printf.count == 3 and printf.master is None
    any_width = expectation("x_%d.cbf", 2)
    assert [n for n in ("x_7.cbf", "x_0123.cbf", "x_.cbf") if any_width.pattern.match(n)] == ["x_7.cbf", "x_0123.cbf"]
    assert any_width.pattern.match("x_0123.cbf")["frame"] == "0123"
    hashes = expectation("x_####.cbf", None)
    assert [n for n in ("x_0007.cbf", "x_007.cbf", "x_00007.cbf", "x_0007xcbf") if hashes.pattern.match(n)] == [
        "x_0007.cbf"]
    assert hashes.count == 0 and expectation("x_%04d.cbf", -5).count == 0
    master = expectation("a.b_master.h5", 900)
    assert master.master == "a.b_master.h5" and master.count == 900
    assert [n for n in ("a.b_master.h5", "a.b_meta.h5", "a.b_data_000001.h5", "axb_master.h5", "a.b_data_x.h5")
            if master.pattern.match(n)] == ["a.b_master.h5", "a.b_meta.h5", "a.b_data_000001.h5"]
    single = expectation("scan.nxs", 40)
    assert single.count == 1 and [n for n in ("scan.nxs", "scanxnxs", "scan.nxs.1") if single.pattern.match(n)] == [
        "scan.nxs"]


def test_only_the_first_placeholder_is_the_frame_number() -> None:
    """A template with a second placeholder compiles, and takes that one literally (mutants expectation_29,
    _39, _60 and _62 replace it too, and a second `frame` group is an error)."""
    assert expectation("x_%02d_%04d.cbf", 2).pattern.match("x_01_%04d.cbf")["frame"] == "01"
    assert expectation("x_##_####.cbf", 2).pattern.match("x_01_####.cbf")["frame"] == "01"


def test_facility_paths_map_by_whole_components_longest_prefix_first() -> None:
    path_map = {"/dls": "/mnt/dls", "/dls/i04-1": "/fast/i04-1", "/dl": "/wrong"}
    assert map_path("/dls/i04-1/data/2026", path_map) == "/fast/i04-1/data/2026"
    assert map_path("/dls/i03/data", path_map) == "/mnt/dls/i03/data"
    assert map_path("/dls", path_map) == "/mnt/dls"
    assert map_path("/dlsx/data", path_map) == "/dlsx/data"
    assert map_path("/other/data", {}) == "/other/data"


# -- what is on disk ------------------------------------------------------------------------------------
def test_scan_facts_signature_and_last_change() -> None:
    empty = DirScan(exists=True)
    assert (empty.files, empty.total_bytes, empty.signature, empty.last_change) == ((), 0, None, None)
    stats = (FileStat("a", 10, 1_700_000_000_500_000_000), FileStat("b", 5, 1_700_000_100_000_000_000))
    scan = DirScan(exists=True, stats=stats)
    assert scan.files == ("a", "b") and scan.total_bytes == 15
    assert scan.last_change == dt.datetime(2023, 11, 14, 22, 15, 0, tzinfo=dt.UTC)
    assert stats[0].mtime == dt.datetime(2023, 11, 14, 22, 13, 20, 500000, tzinfo=dt.UTC)
    changed = [(FileStat("a", 10, 1_700_000_000_500_000_001), stats[1]), (FileStat("a", 11, stats[0].mtime_ns), stats[1]),
               (FileStat("c", 10, stats[0].mtime_ns), stats[1]), stats[:1]]
    signatures = {scan.signature, *(DirScan(exists=True, stats=s).signature for s in changed)}
    assert len(signatures) == 5 and all(len(s) == 64 for s in signatures)
    assert DirScan(exists=True, stats=stats).signature == scan.signature


@pytest.mark.parametrize(("numbers", "images", "verdict"), [
    (range(1, 4), 3, {}),
    (range(5, 8), 3, {}),  # the first frame need not be 1
    (range(1, 3), 3, {"shortfall": "2 of 3 image files on disk"}),
    (range(1, 5), 3, {"mismatch": "4 files match the template where ISPyB says 3 images (frames 1..4): "
                                  "other runs' frames are among them"}),
    ([1, 2, 4], 3, {"mismatch": "frames 1..4 have gaps: 3 files are not one run's consecutive frames"}),
    (range(1, 4), None, {"mismatch": "ISPyB gives no number of images: which frames are this collection's "
                                     "cannot be shown"}),
])
def test_frame_verdicts(tmp_path: Path, numbers, images, verdict) -> None:
    frames(tmp_path, "x_%04d.cbf", numbers)
    (tmp_path / "x_0009.cbf.tmp").write_bytes(b"partial")  # not named by the template
    (tmp_path / "x_0010.cbf").mkdir()  # named, but not a file
    scan = scan_dataset(tmp_path, "x_%04d.cbf", images)
    assert scan.exists and scan.files == tuple(f"x_{n:04d}.cbf" for n in numbers)
    assert {k: v for k, v in (("shortfall", scan.shortfall), ("mismatch", scan.mismatch)) if v} == verdict


def test_a_single_file_template(tmp_path: Path) -> None:
    assert scan_dataset(tmp_path, "scan.nxs", 40).shortfall == "the file is not on disk yet"
    (tmp_path / "scan.nxs").write_bytes(b"x" * 7)
    scan = scan_dataset(tmp_path, "scan.nxs", 40)
    assert (scan.files, scan.total_bytes, scan.shortfall, scan.mismatch) == (("scan.nxs",), 7, None, None)


def test_hdf5_complete_counts_the_linked_frames(tmp_path: Path) -> None:
    eiger(tmp_path, "x", [4, 2], meta=True)
    eiger(tmp_path / "elsewhere", "y", [1])
    files = ("x_data_000001.h5", "x_data_000002.h5", "x_master.h5", "x_meta.h5")
    scan = scan_dataset(tmp_path, "x_master.h5", 6)
    assert (scan.exists, scan.files, scan.shortfall, scan.mismatch) == (True, files, None, None)
    # Too many or too few frames: the verdict, with every file in the scan (mutants _scan_hdf5_83 to _98).
    scan = scan_dataset(tmp_path, "x_master.h5", 5)
    assert (scan.exists, scan.files, scan.mismatch) == (True, files, "x_master.h5 names 6 frames where ISPyB says 5")
    scan = scan_dataset(tmp_path, "x_master.h5", 7)
    assert (scan.exists, scan.files, scan.shortfall) == (True, files, "x_master.h5 names 6 of 7 frames")
    # Without a number of images, the frames the master names are taken as they are.
    assert scan_dataset(tmp_path, "x_master.h5", None).shortfall is None


def test_hdf5_not_there_yet_keeps_the_files_present_in_the_scan(tmp_path: Path) -> None:
    """A waiting dataset's signature covers what has arrived, so it changes as files arrive, and the
    directory is there (mutants _scan_hdf5_6, _20 leave the stats out, _21 the reason; _16 to _80 say
    the directory does not exist)."""
    eiger(tmp_path, "x", [3, 3])
    (tmp_path / "x_master.h5").rename(tmp_path / "x_master.h5.hidden")
    scan = scan_dataset(tmp_path, "x_master.h5", 6)
    assert scan.shortfall == "HDF5 master file x_master.h5 not on disk yet"
    assert scan.files == ("x_data_000001.h5", "x_data_000002.h5") and scan.exists is True

    (tmp_path / "x_master.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 40)  # a master still being written
    scan = scan_dataset(tmp_path, "x_master.h5", 6)
    assert scan.shortfall.startswith("HDF5 master file x_master.h5 not readable yet: ")
    assert scan.files == ("x_data_000001.h5", "x_data_000002.h5", "x_master.h5") and scan.exists is True

    (tmp_path / "x_master.h5.hidden").replace(tmp_path / "x_master.h5")
    (tmp_path / "x_data_000002.h5").unlink()
    scan = scan_dataset(tmp_path, "x_master.h5", 6)
    assert scan.shortfall == "1 data file(s) named by x_master.h5 not on disk: x_data_000002.h5"
    assert scan.files == ("x_data_000001.h5", "x_master.h5") and scan.exists is True

    (tmp_path / "x_data_000002.h5").write_bytes(b"not yet hdf5")
    scan = scan_dataset(tmp_path, "x_master.h5", 6)
    assert scan.shortfall.startswith("data file x_data_000002.h5 not readable yet: ")
    assert scan.files == ("x_data_000001.h5", "x_data_000002.h5", "x_master.h5") and scan.exists is True


def test_hdf5_missing_data_files_are_named_three_at_most(tmp_path: Path) -> None:
    """Mutants _scan_hdf5_56 (joined wrongly) and _57 (four named)."""
    eiger(tmp_path, "x", [1] * 5)
    for n in (2, 3, 4, 5):
        (tmp_path / f"x_data_00000{n}.h5").unlink()
    assert scan_dataset(tmp_path, "x_master.h5", 5).shortfall == (
        "4 data file(s) named by x_master.h5 not on disk: x_data_000002.h5, x_data_000003.h5, x_data_000004.h5")


def test_hdf5_naming_no_frames_is_not_complete(tmp_path: Path) -> None:
    """Mutants _scan_hdf5_101 to _107: the scan keeps its files and says the directory is there."""
    eiger(tmp_path, "x", [0])
    scan = scan_dataset(tmp_path, "x_master.h5", None)
    assert (scan.exists, scan.files, scan.shortfall) == (
        True, ("x_data_000001.h5", "x_master.h5"), "x_master.h5 names no frames yet")


def test_a_missing_directory_is_not_there(tmp_path: Path) -> None:
    """Mutants scan_dataset_10, _11: `exists` is False, not merely falsy."""
    scan = scan_dataset(tmp_path / "absent", "x_%04d.cbf", 3)
    assert (scan.exists, scan.files, scan.shortfall, scan.mismatch) == (False, (), None, None)


# -- whose files --------------------------------------------------------------------------------------
def test_a_run_has_failed_only_when_it_ended_without_success() -> None:
    def run(status):
        return Run(1, "x_%04d.cbf", status, None, None)

    assert [run(s).failed for s in (None, "", "Data collection successful", "SUCCESS", "failed", "Aborted")] == [
        False, False, False, False, True, True]
    assert run(None).describe() == "collection 1 (still running)"
    assert run("Aborted").describe() == "collection 1 (Aborted)"
    assert run("failed").window(LONDON, 60) is None
    assert Run(1, "x", "failed", dt.datetime(2026, 7, 1, 10), None).window(LONDON, 60) is None


def test_sharing_names_the_others_whose_templates_match_a_file(tmp_path: Path) -> None:
    frames(tmp_path, "x_%04d.cbf", range(1, 3))
    scan = scan_dataset(tmp_path, "x_%04d.cbf", 2)
    hashes, other_prefix, single = (Run(2, "x_####.cbf", "failed", None, None), Run(3, "y_%04d.cbf", "failed", None, None),
                                    Run(4, "x_0002.cbf", "failed", None, None))
    assert sharing(scan, [hashes, other_prefix, single]) == [hashes, single]


START = dt.datetime(2026, 7, 1, 10, 0)  # facility-local (London, BST): 09:00 UTC


def _at_utc(naive_local: dt.datetime) -> float:
    return naive_local.replace(tzinfo=LONDON).timestamp()


def test_attribution_verdicts_in_the_facility_zone(tmp_path: Path) -> None:
    """Each refusal's words, with the times read in the facility's zone (mutants _at_2, _span_2 and _7
    print one end in the machine's zone; _naming_4 joins the names wrongly; describe_2, _3 for a
    collection still running)."""
    own = Run(10, "x_%04d.cbf", "Successful", START, START + dt.timedelta(minutes=1))
    frames(tmp_path, "x_%04d.cbf", range(1, 4), at=_at_utc(START))
    scan = scan_dataset(tmp_path, "x_%04d.cbf", 3)
    assert attribution_problem(scan, own, [], LONDON, 0) is None

    running = Run(11, "x_%04d.cbf", None, START, None)
    assert attribution_problem(scan, own, [running], LONDON, 0) == (
        "collection 10 (Successful) and collection 11 (still running) name the same files (x_%04d.cbf): "
        "which run wrote them cannot be shown")
    failed = Run(12, "x_%04d.cbf", "failed", START - dt.timedelta(hours=2), START - dt.timedelta(hours=1))
    assert attribution_problem(scan, own, [failed], LONDON, 0, trust_overwrites=False) == (
        "collection 10 (Successful) and collection 12 (failed) name the same files (x_%04d.cbf): which run "
        "wrote them cannot be shown (ispyb.trust_overwrites = false)")
    assert attribution_problem(scan, own, [failed], LONDON, 0) is None  # an overwritten failed run
    timeless = Run(13, "x_%04d.cbf", "failed", None, None)
    assert attribution_problem(scan, own, [timeless], LONDON, 0) == (
        "collection 10 (Successful) and collection 13 (failed) name the same files, and ISPyB gives "
        "collection 13 no start or end time")
    no_times = Run(10, "x_%04d.cbf", "Successful", START, None)
    assert attribution_problem(scan, no_times, [], LONDON, 0) == (
        "ISPyB gives collection 10 no start or end time: whether the files were written by its run cannot be "
        "shown")

    during = Run(14, "x_%04d.cbf", "Aborted", START, START + dt.timedelta(seconds=2))
    assert attribution_problem(scan, own, [during], LONDON, 0) == (
        "2 of collection 10's 3 files were last written during collection 14 (Aborted) "
        "(2026-07-01 10:00:00 BST to 2026-07-01 10:00:02 BST), e.g. x_0001.cbf")

    late = Run(10, "x_%04d.cbf", "Successful", START - dt.timedelta(minutes=5), START - dt.timedelta(seconds=58))
    assert attribution_problem(scan, late, [failed], LONDON, 60) == (
        "1 of 3 files were modified outside collection 10's run (2026-07-01 09:54:00 BST to "
        "2026-07-01 10:00:02 BST), e.g. x_0003.cbf at 2026-07-01 10:00:03 BST; "
        "collection 10 shares its file names with collection 12 (failed)")


def test_the_windows_include_their_ends(tmp_path: Path) -> None:
    """A file written at the very second a run starts is that run's (mutants attribution_problem_28 and
    _39 exclude the start)."""
    frames(tmp_path, "x_%04d.cbf", range(1, 4), at=_at_utc(START))  # at START + 1, 2, 3 s
    scan = scan_dataset(tmp_path, "x_%04d.cbf", 3)
    own = Run(10, "x_%04d.cbf", "Successful", START + dt.timedelta(seconds=1), START + dt.timedelta(seconds=3))
    assert attribution_problem(scan, own, [], LONDON, 0) is None
    other = Run(11, "x_%04d.cbf", "failed", START + dt.timedelta(seconds=3), START + dt.timedelta(seconds=9))
    assert attribution_problem(scan, own, [other], LONDON, 0).startswith(
        "1 of collection 10's 3 files were last written during collection 11 (failed)")


def test_a_mismatch_names_every_other_run(tmp_path: Path) -> None:
    frames(tmp_path, "x_%04d.cbf", range(1, 5))
    scan = scan_dataset(tmp_path, "x_%04d.cbf", 3)
    own = Run(10, "x_%04d.cbf", "Successful", START, START)
    others = [Run(11, "x_%04d.cbf", "failed", None, None), Run(12, "x_####.cbf", None, None, None)]
    assert attribution_problem(scan, own, others, LONDON, 0) == (
        "4 files match the template where ISPyB says 3 images (frames 1..4): other runs' frames are among them; "
        "collection 10 shares its file names with collection 11 (failed), collection 12 (still running)")
