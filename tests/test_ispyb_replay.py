"""A real `mirrord once` against a server that answers only from the real py-ispyb's recordings.

The image files of the recorded collections are written on disk (CBF frames per template, the Eiger
x0155 as an HDF5 master with external links to its data files), with mtimes inside each collection's
start/end window read in the facility's time zone. mirrord must end with the states the seed's truth
implies (`tests/data/recordings/ispyb/README.md`), having made no request the recordings cannot answer.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from zoneinfo import ZoneInfo

import h5py
import numpy as np
import pytest
from sqlalchemy import select

from mirrord.cli import EXIT_ATTENTION
from mirrord.config import load_config
from mirrord.emulators.base import Served
from mirrord.emulators.campaign import cbf_image
from mirrord.store import Store
from mirrord.store.models import Dataset
from tests.recordings import seed
from tests.replay_ispyb import ReplayIspyb

FACILITY_ZONE = ZoneInfo("Europe/London")  # ISPyB's naive times are the facility's local time
EIGER_IMAGES_PER_FILE = 1000
PARTIAL = {90407: 8, 90414: 5, 90415: 3}  # stopped and running collections: only their first frames
# Fact 19: the successful 90404 re-used the failed 90403's directory and template. The recordings do not say
# what is on disk, so the replay writes the state in which the files cannot be told apart: 90403's frames,
# of which 90404's copy to the lab mount has replaced only the first 10 so far. A complete overwrite, which
# is attributable, is covered with the same pair in tests/test_attribution.py.
OVERWRITES = {90404: 10}
COMPLETE = {90401, 90402, 90405, 90406, 90408, 90409, 90410, 90411, 90412, 90413, 90416}


def _epoch(naive: dt.datetime) -> float:
    return naive.replace(tzinfo=FACILITY_ZONE).timestamp()


def _frame_names(template: str, count: int) -> list[str]:
    if "%04d" in template:
        return [template % i for i in range(1, count + 1)]
    return [template.replace("####", f"{i:04d}") for i in range(1, count + 1)]


def _write_eiger(directory: Path, template: str, images: int) -> list[Path]:
    """A real Eiger layout: the master links each data file's `/entry/data/data` as `data_00000N`."""
    prefix = template.removesuffix("_master.h5")
    paths = []
    with h5py.File(directory / template, "w") as master:
        group = master.create_group("entry/data")
        for n, first in enumerate(range(0, images, EIGER_IMAGES_PER_FILE), start=1):
            name = f"{prefix}_data_{n:06d}.h5"
            with h5py.File(directory / name, "w") as data:
                count = min(EIGER_IMAGES_PER_FILE, images - first)
                data.create_dataset("entry/data/data", data=np.zeros((count, 4, 4), dtype=np.uint16))
            group[f"data_{n:06d}"] = h5py.ExternalLink(name, "/entry/data/data")
            paths.append(directory / name)
    return [directory / template, *paths]


def write_recorded_images(root: Path) -> None:
    """The files of every recorded collection of lb90001 under `root` (the local mount of /dls)."""
    for c in seed("ispyb")["tables"]["DataCollection"]:
        if not c["imageDirectory"].startswith("/dls/i04-1/data/2026/lb90001"):
            continue
        directory = root / c["imageDirectory"].removeprefix("/dls/")
        directory.mkdir(parents=True, exist_ok=True)
        start = dt.datetime.fromisoformat(c["startTime"])
        end = dt.datetime.fromisoformat(c["endTime"]) if c["endTime"] else None
        count = OVERWRITES.get(c["dataCollectionId"]) or PARTIAL.get(c["dataCollectionId"], c["numberOfImages"])
        if c["fileTemplate"].endswith("_master.h5"):
            paths = _write_eiger(directory, c["fileTemplate"], count)
        else:
            frame = SimpleNamespace(prefix=c["fileTemplate"].split("_%")[0].split("_#")[0], start=start,
                                    collection_id=c["dataCollectionId"])
            paths = []
            for index, name in enumerate(_frame_names(c["fileTemplate"], count), start=1):
                (directory / name).write_bytes(cbf_image(frame, index, 256))
                paths.append(directory / name)
        # Written over the run: inside its start/end window (a running one: a second a frame).
        span = (end - start).total_seconds() if end else len(paths) + 1
        for index, path in enumerate(paths, start=1):
            mtime = _epoch(start) + span * index / (len(paths) + 1)
            os.utime(path, (mtime, mtime))


def config_text(tmp_path: Path, url: str) -> str:
    return f"""
[daemon]
state_dir = "{tmp_path / 'state'}"

[fragalysis]
enabled = false

[pdis]
enabled = false

[designhub]
enabled = false

[ispyb]
enabled = true
url = "{url}"
plugin = "dummy"
login = "abcd"
password_file = "{tmp_path / 'ispyb.password'}"
proposals = ["lb90001"]
lookback = "3650d"
quiet_period = "10m"
missing_deadline = "2d"
path_map = {{ "/dls" = "{tmp_path / 'dls'}" }}
"""


@pytest.fixture(scope="module")
def replayed(tmp_path_factory) -> tuple[dict[int, Dataset], list[str], int, str]:
    """One `mirrord once` against the replay server: its datasets, unrecorded requests, exit code, output."""
    tmp_path = tmp_path_factory.mktemp("replay")
    write_recorded_images(tmp_path / "dls")
    replay = ReplayIspyb()

    async def run() -> tuple[dict[int, Dataset], int, str]:
        async with Served(replay.app) as served:
            config = tmp_path / "mirrord.toml"
            (tmp_path / "ispyb.password").write_text("any password: the dummy plugin takes any\n")
            (tmp_path / "ispyb.password").chmod(0o600)
            config.write_text(config_text(tmp_path, served.url + "/ispyb/api/v1"))
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "mirrord.cli", "--config", str(config), "--log-level", "warning", "once",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
            output, _ = await asyncio.wait_for(proc.communicate(), timeout=300)
        store = Store(load_config(config, env={}).daemon.resolved_database_url)
        try:
            async with store.read() as session:
                found = {d.collection_id: d for d in await session.scalars(select(Dataset))}
        finally:
            await store.close()
        return found, proc.returncode, output.decode()

    found, code, output = asyncio.run(run())
    return found, replay.unrecorded, code, output


def test_once_makes_no_request_the_recordings_cannot_answer(replayed):
    found, unrecorded, code, output = replayed
    assert unrecorded == []
    assert code == EXIT_ATTENTION, output  # 90404 needs a person, and nothing else went wrong
    assert "needs attention: dataset" in output and "1 need attention" in output
    # The line names the dataset's own collection first, then the one that shares its files.
    line = next(line for line in output.splitlines() if line.startswith("needs attention: dataset"))
    assert "90403" in line and line.index("90404") < line.index("90403"), line


def test_the_run_number_is_the_recorded_data_collection_number(replayed):
    """py-ispyb does not expose dataCollectionNumber (fact 18); read from the template it is the database's."""
    found = replayed[0]
    numbers = {row["dataCollectionId"]: row["dataCollectionNumber"] for row in seed("ispyb")["tables"]["DataCollection"]}
    assert {cid: row.run_number for cid, row in found.items()} == {cid: numbers[cid] for cid in found}
    assert sorted({row.run_number for row in found.values()}) == [1, 2, 3]  # not all 1: the comparison says something


def test_every_successful_rotation_is_complete(replayed):
    found = replayed[0]
    assert {c for c in COMPLETE if found[c].state == "complete"} == COMPLETE, {
        c: (found[c].state, found[c].reason) for c in COMPLETE}


def test_failed_and_stopped_runs_are_skipped_and_running_ones_wait(replayed):
    found = replayed[0]
    assert (found[90403].state, found[90407].state) == ("skipped", "skipped")
    assert "Data collection failed" in found[90403].reason and "Stopped" in found[90407].reason
    assert (found[90414].state, found[90415].state) == ("waiting", "waiting")


def test_the_grid_scan_is_recorded_as_mesh(replayed):
    found = replayed[0]
    assert found[90410].experiment_type == "Mesh"
    assert {d.experiment_type for c, d in found.items() if c != 90410} == {"OSC"}


def test_group_samples_as_the_api_gives_them(replayed):
    """Fact 7: the group's sample, null for group 90306; never guessed from file names."""
    found = replayed[0]
    assert {found[c].sample_name for c in (90406, 90407, 90408)} == {None}
    assert found[90409].sample_name == "A71EV2A-x0157"
    assert found[90416].session_name == "lb90001-None"


def test_files_that_cannot_be_told_from_another_runs_are_not_complete(replayed):
    """Fact 19: 90404 shares directory and template with the failed 90403; nothing tells whose files they are."""
    found = replayed[0]
    assert found[90404].state == "needs_attention", (found[90404].state, found[90404].reason)
    assert "90403" in found[90404].reason
