"""Whose files are these? The attribution rule of `mirrord.jobs.datafiles` on real files with real mtimes,
then the whole campaign of problem cases through the Fragalysis, ISPyB and PDIS emulators and the real jobs."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import select

from mirrord.daemon import Mirrord
from mirrord.emulators.campaign import Campaign
from mirrord.jobs.datafiles import Run, attribution_problem, scan_dataset, sharing
from mirrord.store import Store
from mirrord.store.models import Dataset, Deposition
from tests.ispyb_openapi import ispyb_emulator_factory  # noqa: F401 - pytest fixture
from tests.recordings import seed
from tests.test_deposit_job import linked_pipeline

UTC_ZONE = ZoneInfo("UTC")  # the recorded py-ispyb ran in UTC: its naive times are UTC
SLACK = 120.0


# -- the recorded ambiguous pair: failed 90403 and its re-collection 90404 (fact 19) ---------------------
def recorded_run(collection_id: int) -> Run:
    row = next(r for r in seed("ispyb")["tables"]["DataCollection"] if r["dataCollectionId"] == collection_id)
    return Run(collection_id, row["fileTemplate"], row["runStatus"], dt.datetime.fromisoformat(row["startTime"]),
               dt.datetime.fromisoformat(row["endTime"]))


@pytest.fixture
def pair() -> tuple[Run, Run]:
    failed, again = recorded_run(90403), recorded_run(90404)
    assert failed.template == again.template == "A71EV2A-x0153_1_%04d.cbf" and failed.failed and not again.failed
    return failed, again


def write_frames(directory: Path, frames: range, at: dt.datetime, *, zone: ZoneInfo = UTC_ZONE) -> None:
    """Frames of the shared template, each written a second after the previous one from `at` (local)."""
    directory.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(frames):
        path = directory / f"A71EV2A-x0153_1_{frame:04d}.cbf"
        path.write_bytes(b"###CBF: frame %d\n" % frame)
        when = (at + dt.timedelta(seconds=i)).replace(tzinfo=zone).timestamp()
        os.utime(path, (when, when))


def verdict(directory: Path, own: Run, other: Run) -> str | None:
    scan = scan_dataset(directory, own.template, 20)
    assert scan.shortfall is None
    return attribution_problem(scan, own, sharing(scan, [other]), UTC_ZONE, SLACK)


def test_recorded_pair_the_failed_runs_frames_are_not_the_recollections(tmp_path, pair):
    """What the recorded server gives (seed.json times) with the failed run's files still on disk."""
    failed, again = pair
    write_frames(tmp_path, range(1, 21), failed.start)  # 10:00:00..10:00:19, inside 90403's run
    assert verdict(tmp_path, again, failed) == (
        "20 of collection 90404's 20 files were last written during collection 90403 (Data collection failed) "
        "(2026-03-10 09:58:00 UTC to 2026-03-10 10:02:20 UTC), e.g. A71EV2A-x0153_1_0001.cbf")


def test_recorded_pair_a_partly_overwritten_failed_run_is_not_attributable(tmp_path, pair):
    failed, again = pair
    write_frames(tmp_path, range(1, 21), failed.start)
    write_frames(tmp_path, range(1, 20), again.start + dt.timedelta(seconds=5))  # frame 20 was never rewritten
    assert verdict(tmp_path, again, failed).startswith(
        "1 of collection 90404's 20 files were last written during collection 90403 (Data collection failed)")


def test_recorded_pair_a_fully_overwritten_failed_run_is_the_recollections(tmp_path, pair):
    failed, again = pair
    write_frames(tmp_path, range(1, 11), failed.start)  # the failed run got half way
    write_frames(tmp_path, range(1, 21), again.start + dt.timedelta(seconds=5))
    assert verdict(tmp_path, again, failed) is None


def test_recorded_pair_overwrites_not_trusted_by_config(tmp_path, pair):
    """`ispyb.trust_overwrites = false`: the same files as above need a person, naming 90403."""
    failed, again = pair
    write_frames(tmp_path, range(1, 21), failed.start)
    write_frames(tmp_path, range(1, 21), again.start + dt.timedelta(seconds=5))
    scan = scan_dataset(tmp_path, again.template, 20)
    assert attribution_problem(scan, again, sharing(scan, [failed]), UTC_ZONE, SLACK, trust_overwrites=False) == (
        "collection 90404 (DataCollection Successful) and collection 90403 (Data collection failed) name the "
        "same files (A71EV2A-x0153_1_%04d.cbf): which run wrote them cannot be shown (ispyb.trust_overwrites = false)")


def test_recorded_pair_files_copied_later_cannot_be_attributed(tmp_path, pair):
    failed, again = pair
    write_frames(tmp_path, range(1, 21), dt.datetime(2026, 12, 7, 1, 0))  # an rsync without -t, say
    assert verdict(tmp_path, again, failed) == (
        "20 of 20 files were modified outside collection 90404's run (2026-03-10 10:08:00 UTC to "
        "2026-03-10 10:13:05 UTC), e.g. A71EV2A-x0153_1_0001.cbf at 2026-12-07 01:00:00 UTC; "
        "collection 90404 shares its file names with collection 90403 (Data collection failed)")


def test_two_successful_runs_writing_the_same_names_are_never_attributable(tmp_path, pair):
    _failed, again = pair
    earlier = Run(90402, again.template, "DataCollection Successful", again.start - dt.timedelta(hours=1),
                  again.end - dt.timedelta(hours=1))
    write_frames(tmp_path, range(1, 21), again.start + dt.timedelta(seconds=5))  # all within 90404's run
    assert verdict(tmp_path, again, earlier) == (
        "collection 90404 (DataCollection Successful) and collection 90402 (DataCollection Successful) name the "
        "same files (A71EV2A-x0153_1_%04d.cbf): which run wrote them cannot be shown")


def test_more_frames_than_the_collection_took_are_not_its_own(tmp_path, pair):
    _failed, again = pair
    write_frames(tmp_path, range(1, 3601), again.start)  # another run's 3600 frames under the same template
    scan = scan_dataset(tmp_path, again.template, 5)
    assert scan.shortfall is None and scan.mismatch == (
        "3600 files match the template where ISPyB says 5 images (frames 1..3600): other runs' frames are among them")
    assert attribution_problem(scan, again, [], UTC_ZONE, SLACK) == scan.mismatch


def test_the_run_window_is_read_in_the_facility_zone_both_ways_round_a_dst_change():
    london = ZoneInfo("Europe/London")
    summer = Run(1, "x_%04d.cbf", "Successful", dt.datetime(2026, 7, 1, 10, 0), dt.datetime(2026, 7, 1, 10, 1))
    start, end = summer.window(london, 0)
    assert (start, end) == (dt.datetime(2026, 7, 1, 9, 0, tzinfo=dt.UTC), dt.datetime(2026, 7, 1, 9, 1, tzinfo=dt.UTC))
    # 01:30 happens twice on 25 October: either reading is inside the window.
    repeated = Run(2, "x_%04d.cbf", "Successful", dt.datetime(2026, 10, 25, 1, 30), dt.datetime(2026, 10, 25, 1, 40))
    start, end = repeated.window(london, 0)
    assert (start, end) == (dt.datetime(2026, 10, 25, 0, 30, tzinfo=dt.UTC), dt.datetime(2026, 10, 25, 1, 40, tzinfo=dt.UTC))


# -- the campaign's problem cases, end to end -------------------------------------------------------
async def test_problem_cases_of_a_visit_end_to_end(tmp_path, ispyb_emulator_factory):  # noqa: F811
    """One deposition per PDB code; the re-collection over a failed run deposits; two successful runs
    sharing a template need a person and pack nothing; a grid scan and a screening shot are recorded,
    never deposited; a corrupt re-collection stops in preflight and its crystal's good run goes."""
    campaign = Campaign.demo(seed=0, with_problem=True)
    target = campaign.targets[-1]
    async with linked_pipeline(tmp_path, campaign, ispyb_emulator_factory) as (config, pdis):
        async with Mirrord(config) as app:
            await app.run_once(horizon=3.0)
        store = Store(config.daemon.resolved_database_url)
        async with store.read() as session:
            datasets = {d.collection_id: d for d in (await session.scalars(select(Dataset))).all()}
            deposits = {d.dataset_id: d for d in (await session.scalars(select(Deposition))).all()}
        await store.close()

    def outcome(col) -> tuple[str, str | None]:
        row = datasets[col.collection_id]
        dep = deposits.get(row.id)
        return (dep.state, dep.status_details) if dep else (row.state, row.reason)

    by_sample: dict[str, list] = {}  # the successful runs of each sample, oldest first
    for col in campaign.collections:
        if col.session == target.tas and col.succeeded:
            by_sample.setdefault(col.sample, []).append(col)
    crystals = [e for e in target.experiments if e.pdb_code]
    # One publication per PDB code, and PDIS took each exactly once.
    published = sorted(d.pdb_code for d in deposits.values() if d.state == "published")
    assert published == sorted(e.pdb_code for e in crystals)
    assert set(pdis.submissions_by_md5.values()) == {1}
    # The corrupt re-collection is the newest of its crystal: it stops in preflight, the earlier run goes.
    original, corrupt = by_sample[crystals[0].code]
    assert outcome(corrupt)[0] == "needs_attention" and outcome(corrupt)[1].startswith("preflight: image header")
    assert outcome(original)[0] == "published"
    # A better run of a crystal: the newest goes, the first is superseded, with the reason.
    first, better = by_sample[crystals[1].code]
    assert outcome(better)[0] == "published"
    assert outcome(first) == ("not_deposited", f"superseded by collection {better.collection_id} for PDB "
                                               f"{crystals[1].pdb_code}")
    # A grid scan and a screening shot of a crystal are not datasets.
    _rotation, mesh, shot = by_sample[crystals[2].code]
    assert outcome(mesh) == ("not_deposited", "experiment type Mesh is not a rotation dataset (deposited: OSC)")
    assert outcome(shot) == ("not_deposited", "5 images: a screening shot, not a dataset (min_images = 10)")
    # A failed run whose files its re-collection overwrote: the failed run is skipped, the re-collection
    # is attributable and, as the crystal's newest run, deposited.
    earliest, again = by_sample[crystals[3].code]
    failed = next(c for c in campaign.collections if c.prefix == again.prefix and not c.succeeded)
    assert outcome(failed)[0] == "skipped" and outcome(again)[0] == "published"
    assert outcome(earliest)[1] == f"superseded by collection {again.collection_id} for PDB {crystals[3].pdb_code}"
    # Two successful runs writing the same names: neither is attributable, nothing of theirs is packed.
    one, two = by_sample[f"{target.name}-x0991"]
    for col, other in ((one, two), (two, one)):
        state, reason = outcome(col)
        # The dataset's own collection first: the reason is read beside the dataset's id.
        assert state == "needs_attention" and reason.startswith(
            f"collection {col.collection_id} (Data collection successful) and collection {other.collection_id} "
            f"(Data collection successful) name the same files ({one.file_template})")
        assert datasets[col.collection_id].id not in deposits
