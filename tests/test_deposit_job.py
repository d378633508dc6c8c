"""The PDIS deposition job end to end: the real emulator over loopback, the real job through
`Mirrord.run_once`, real image files in tmp_path. Dataset/Experiment rows are written here the way the
ISPyB and Fragalysis jobs leave them; the last tests run those jobs too, and kill a real `mirrord once`."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import signal
import sqlite3
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import fabio
import numpy as np
import pytest
from sqlalchemy import select
from structlog.testing import capture_logs

from mirrord import cli
from mirrord.clients.pdis import PdisClient
from mirrord.config import PdisSection
from mirrord.daemon import Mirrord
from mirrord.emulators.base import Served
from mirrord.emulators.campaign import Campaign, Collection
from mirrord.emulators.pdis import PdisEmulator
from mirrord.jobs import deposit
from mirrord.jobs.base import aware
from mirrord.jobs.deposit import pack_for_deposit
from mirrord.jobs.deposit_policy import DatasetFacts, decide, decide_all, decision_for, render_title
from mirrord.store import Store, migrate
from mirrord.store.models import Dataset, Deposition, Event, Experiment, JobRun, Target
from mirrord.store.models import Session as SessionRow
from tests.conftest import make_config
from tests.ispyb_openapi import ispyb_emulator_factory  # noqa: F401 - pytest fixture

USER, PASSWORD = "you@lab.edu", "secret"


# -- fixtures and helpers ---------------------------------------------------------------------------
@pytest.fixture
def campaign() -> Campaign:
    return Campaign.demo(seed=0, targets=1, experiments=6)


@pytest.fixture
def emulator(tmp_path: Path) -> PdisEmulator:
    return PdisEmulator(storage_dir=tmp_path / "pdis", users={USER: PASSWORD}, step_seconds=0.02)


@pytest.fixture
async def served(emulator: PdisEmulator):
    async with Served(emulator.app) as served:
        yield served


def config_for(tmp_path: Path, served: Served, *, database_url: str = "", **pdis: Any):
    section = {"enabled": True, "url": PdisEmulator.api_url(served.url), "username": USER, "password": PASSWORD,
               "poll_interval": "20ms", "spool_margin": 0, **pdis}
    daemon = {"retry_base": "10ms", "retry_max": "50ms", "database_url": database_url}
    return make_config(tmp_path, pdis=section, daemon=daemon)


async def run(config, *, horizon: float = 3.0, max_passes: int = 200):
    async with Mirrord(config) as app:
        return await app.run_once(horizon=horizon, max_passes=max_passes)


async def open_store(config) -> Store:
    store = Store(config.daemon.resolved_database_url)
    await migrate.upgrade(store)
    return store


async def add_datasets(config, campaign: Campaign, root: Path, collections: list[Collection] | None = None, *,
                       link: bool = True) -> list[int]:
    """Complete Dataset rows with their image files on disk, linked to Experiment rows (as ISPyB leaves them)."""
    collections = collections if collections is not None else [
        c for c in campaign.collections if "success" in c.run_status.lower()]
    store = await open_store(config)
    ids = []
    try:
        async with store.write() as session:
            for col in collections:
                found = campaign.experiment(col.sample)
                target = found[0] if found else campaign.targets[0]
                directory = campaign.write_images(root, col)
                files = sorted(p.name for p in directory.iterdir() if p.name.startswith(col.prefix))
                target_row = await session.scalar(select(Target).where(Target.tas == target.tas))
                if target_row is None:
                    target_row = Target(name=target.name, tas=target.tas)
                    session.add(target_row)
                    await session.flush()
                experiment_id = None
                if link and found:
                    exp = await session.scalar(select(Experiment).where(Experiment.code == col.sample))
                    if exp is None:
                        exp = Experiment(target_id=target_row.id, upload_index=1, code=col.sample,
                                         pdb_code=found[1].pdb_code)
                        session.add(exp)
                        await session.flush()
                    experiment_id = exp.id
                sid = 9000 + target.visit_number
                if await session.get(SessionRow, sid) is None:
                    session.add(SessionRow(id=sid, name=target.tas, proposal=target.proposal, beamline=col.beamline))
                    await session.flush()
                row = Dataset(group_id=col.group_id, collection_id=col.collection_id, session_id=sid,
                              session_name=col.session, proposal=target.proposal, beamline=col.beamline,
                              sample_name=col.sample, protein_acronym=target.name, local_dir=str(directory),
                              files=files, total_bytes=sum((directory / f).stat().st_size for f in files),
                              experiment_id=experiment_id, state="complete", file_template=col.file_template,
                              number_of_images=col.images, run_status=col.run_status,
                              experiment_type=col.experiment_type, start=aware(col.start), end=aware(col.end))
                session.add(row)
                await session.flush()
                ids.append(row.id)
    finally:
        await store.close()
    return ids


async def depositions(config) -> dict[int, Deposition]:
    """Deposition rows by dataset id."""
    store = Store(config.daemon.resolved_database_url)
    try:
        async with store.read() as session:
            return {d.dataset_id: d for d in (await session.scalars(select(Deposition))).all()}
    finally:
        await store.close()


async def counted(config, key: str) -> int:
    """A counter of the deposition job, summed over every run so far."""
    store = Store(config.daemon.resolved_database_url)
    try:
        async with store.read() as session:
            counters = (await session.scalars(select(JobRun.counters).where(JobRun.job == "pdis"))).all()
    finally:
        await store.close()
    return sum(c.get(key, 0) for c in counters)


async def step_failures(config) -> int:
    """Item steps that failed in any run so far. The job recovers from most by another path, so a test
    that only looks at the end state does not see a step that broke."""
    return await counted(config, "failures")


async def last_reason(config, deposition_id: int) -> str:
    store = Store(config.daemon.resolved_database_url)
    try:
        async with store.read() as session:
            return (await session.scalars(select(Event.reason).where(
                Event.item_type == "deposition", Event.item_id == str(deposition_id)).order_by(Event.id.desc()))).first()
    finally:
        await store.close()


def spool_files(config) -> list[str]:
    return sorted(p.name for p in config.spool_dir.iterdir()) if config.spool_dir.exists() else []


def uploads(served: Served) -> int:
    return served.requests.count("POST", "/api/v1/upload/")


def submits(served: Served) -> int:
    """Submit requests PDIS received, accepted or not: the end state alone cannot tell a second submit
    that PDIS refused (409) from one never sent."""
    return served.requests.count("POST", "/api/v1/submit/")


def deletes(served: Served) -> int:
    return served.requests.count("DELETE", "/api/v1/submissions/")


def assert_exactly_once(emulator: PdisEmulator, rows: list[Deposition]) -> None:
    assert emulator.submissions_by_md5, "nothing was submitted"
    assert set(emulator.submissions_by_md5.values()) == {1}, emulator.submissions_by_md5
    assert {r.tar_md5 for r in rows} == set(emulator.submissions_by_md5)


# -- the policy, as a pure function ------------------------------------------------------------------
def facts(**overrides: Any) -> DatasetFacts:
    base = dict(dataset_id=1, dataset_state="complete", collection_id=7, proposal="lb32627", beamline="i04-1",
                session_name="lb32627-66", sample_name="A71EV2A-x0152", protein_acronym="A71EV2A",
                local_dir="/data/x", files=("a.cbf",), total_bytes=10, experiment_type="OSC", number_of_images=900)
    return DatasetFacts(**{**base, **overrides})


@pytest.mark.parametrize(("section", "overrides", "expected"), [
    ({}, {"experiment_code": "X", "pdb_code": "5abc"}, "deposit as 5ABC"),
    ({}, {"experiment_code": "X"}, "not deposited: experiment X has no PDB code yet (policy: linked)"),
    ({}, {}, "not deposited: not linked to a Fragalysis experiment (policy: linked)"),
    ({"deposit": "none"}, {"pdb_code": "5ABC"}, "not deposited: policy: deposit = none"),
    ({}, {"pdb_code": "5ABC", "dataset_state": "waiting"}, "not deposited: dataset is waiting, not complete"),
    ({"include_proposals": ["lb1"]}, {"pdb_code": "5ABC"}, "not deposited: proposal lb32627 is not in include_proposals"),
    ({"exclude_proposals": ["LB32627"]}, {"pdb_code": "5ABC"}, "not deposited: proposal lb32627 is in exclude_proposals"),
    ({"include_beamlines": ["I04-1"]}, {"pdb_code": "5ABC"}, "deposit as 5ABC"),
    ({"exclude_beamlines": ["I04-1"]}, {"pdb_code": "5ABC"}, "not deposited: beamline i04-1 is in exclude_beamlines"),
    ({"deposit": "all", "authors": "Smith J."}, {},
     "deposit as other: 'Raw diffraction data for A71EV2A-x0152 (lb32627, i04-1, collection 7)'"),
    ({"deposit": "all"}, {}, "not deposited: authors is not configured (required without a PDB code)"),
    ({"deposit": "all", "authors": "S", "title_template": "{visit}"}, {"session_name": "lb1-1"},
     "not deposited: title 'lb1-1' is shorter than 10 characters"),
    # Only rotation datasets (recorded py-ispyb, fact 2: a grid scan is an ordinary dc event).
    ({}, {"pdb_code": "5ABC", "experiment_type": "Mesh"},
     "not deposited: experiment type Mesh is not a rotation dataset (deposited: OSC)"),
    ({}, {"pdb_code": "5ABC", "experiment_type": "Characterization", "number_of_images": 4},
     "not deposited: experiment type Characterization is not a rotation dataset (deposited: OSC)"),
    ({}, {"pdb_code": "5ABC", "number_of_images": 5},
     "not deposited: 5 images: a screening shot, not a dataset (min_images = 10)"),
    ({"min_images": 5}, {"pdb_code": "5ABC", "number_of_images": 5}, "deposit as 5ABC"),
    ({}, {"pdb_code": "5ABC", "experiment_type": "osc"}, "deposit as 5ABC"),
    ({}, {"pdb_code": "5ABC", "experiment_type": None},
     "not deposited: ISPyB gives no experiment type: only rotation collections (OSC) are deposited"),
    ({"experiment_types": ["OSC", "SAD"]}, {"pdb_code": "5ABC", "experiment_type": "SAD"}, "deposit as 5ABC"),
])
def test_policy_decisions(section, overrides, expected):
    assert decide(facts(**overrides), PdisSection(**section)).summary == expected


def test_title_template_fields():
    title = render_title("{protein}: {sample} {visit} {beamline} {proposal} {collection} {run}", facts(run_number=3))
    assert title == "A71EV2A: A71EV2A-x0152 lb32627-66 i04-1 lb32627 7 3"


def test_one_deposition_per_pdb_code_by_rule():
    t0 = dt.datetime(2026, 3, 10, 9, 31, tzinfo=dt.UTC)
    older = facts(dataset_id=1, collection_id=90401, pdb_code="5ABC", collected_at=t0)
    newer = facts(dataset_id=2, collection_id=90402, pdb_code="5abc", collected_at=t0 + dt.timedelta(minutes=15))
    other = facts(dataset_id=3, collection_id=90403, pdb_code="6DEF", collected_at=t0)
    summaries = {i: d.summary for i, d in decide_all([older, newer, other], PdisSection()).items()}
    assert summaries == {1: "not deposited: superseded by collection 90402 for PDB 5ABC",
                         2: "deposit as 5ABC", 3: "deposit as 6DEF"}
    oldest = decide_all([older, newer], PdisSection(prefer="oldest"))
    assert oldest[1].deposit and oldest[2].reason == "superseded by collection 90401 for PDB 5ABC"
    # Whatever the rule prefers, one whose archive may be on PDIS keeps the code...
    sent = replace(older, deposition_state="uploaded", uploaded=True)
    assert decide_all([sent, newer], PdisSection())[2].reason == "superseded by collection 90401 for PDB 5ABC"
    # ...one submitted can never be taken back, even if PDIS then wanted a person...
    answered = replace(older, deposition_state="needs_attention", uploaded=True, submitted=True)
    racing = replace(newer, deposition_state="uploaded", uploaded=True)
    assert decide_all([answered, racing], PdisSection())[2].reason == "superseded by collection 90401 for PDB 5ABC"
    # ...one that stopped before anything left the host drops out...
    stopped = replace(newer, deposition_state="needs_attention", deposition_id=9)
    assert decide_all([older, stopped], PdisSection())[1].deposit
    # ...and PDIS saying it holds the code stops the others too.
    known = replace(older, deposition_state="already_in_pdis", uploaded=True)
    assert decide_all([known, newer], PdisSection())[2].reason == (
        "PDB 5ABC already has a dataset on PDIS (said when collection 90401 was uploaded)")
    # Only candidates compete: a grid scan of the crystal supersedes nothing.
    mesh = replace(newer, experiment_type="Mesh")
    assert decide_all([older, mesh], PdisSection())[1].deposit


# -- end to end against the emulator -----------------------------------------------------------------
async def test_linked_datasets_are_published_once_with_their_pdb_code(tmp_path, campaign, emulator, served, db_url):
    config = config_for(tmp_path, served, database_url=db_url)
    ids = await add_datasets(config, campaign, tmp_path / "dls")
    outcome = await run(config)
    assert outcome.exit_code == 0, outcome
    rows = await depositions(config)
    expected = {d: campaign.experiment(c.sample)[1].pdb_code for d, c in zip(ids, campaign.collections, strict=False)}
    published = {d: r.pdb_code for d, r in rows.items() if r.state == "published"}
    assert published == {d: p for d, p in expected.items() if p}
    unlinked = [r for r in rows.values() if r.state == "not_deposited"]
    assert len(unlinked) == 2 and all("has no PDB code yet" in r.status_details for r in unlinked)
    assert_exactly_once(emulator, [r for r in rows.values() if r.state == "published"])
    assert (submits(served), deletes(served)) == (4, 0) and await step_failures(config) == 0
    async with PdisClient(PdisEmulator.api_url(served.url), username=USER, password=PASSWORD,
                          token_file=tmp_path / "t") as client:
        remote = {s.md5hash: s for s in await client.submissions()}
    for row in rows.values():
        if row.state == "published":
            assert remote[row.tar_md5].pdbid == row.pdb_code and remote[row.tar_md5].status == "published"
            assert row.server_md5 == row.tar_md5 and row.server_size == row.tar_size
            assert row.spool_removed_at is not None
    assert spool_files(config) == []  # no retention: every archive is gone once published
    assert oct(config.pdis_token_cache.stat().st_mode & 0o777) == "0o600"

    # An experiment gains its PDB code later: the dataset is decided again and deposited.
    waiting = unlinked[0]
    store = await open_store(config)
    async with store.write() as session:
        dataset = await session.get(Dataset, waiting.dataset_id)
        (await session.get(Experiment, dataset.experiment_id)).pdb_code = "7ZZZ"
    await store.close()
    assert (await run(config)).exit_code == 0
    row = (await depositions(config))[waiting.dataset_id]
    assert (row.state, row.pdb_code) == ("published", "7ZZZ")
    assert set(emulator.submissions_by_md5.values()) == {1} and len(emulator.submissions_by_md5) == 5
    assert (submits(served), deletes(served)) == (5, 0)


async def test_one_deposition_per_pdb_code_the_others_superseded(tmp_path, campaign, emulator, served, capsys):
    config = config_for(tmp_path, served)
    target = campaign.targets[0]
    crystal = next(e for e in target.experiments if e.pdb_code)
    first = next(c for c in campaign.collections if c.sample == crystal.code)
    again = campaign.add_collection(target.tas, crystal.code, beamline=target.beamline)  # re-collected later
    ids = await add_datasets(config, campaign, tmp_path / "dls", [first, again])
    assert (await run(config)).exit_code == 0
    rows = await depositions(config)
    superseded = f"superseded by collection {again.collection_id} for PDB {crystal.pdb_code}"
    assert (rows[ids[1]].state, rows[ids[1]].pdb_code) == ("published", crystal.pdb_code)
    assert (rows[ids[0]].state, rows[ids[0]].status_details) == ("not_deposited", superseded)
    assert_exactly_once(emulator, [rows[ids[1]]])

    # A collection of the crystal linked later, newer still, never causes a second submission.
    latest = campaign.add_collection(target.tas, crystal.code, beamline=target.beamline)
    [latest_id] = await add_datasets(config, campaign, tmp_path / "dls", [latest])
    assert (await run(config)).exit_code == 0
    rows = await depositions(config)
    assert (rows[latest_id].state, rows[latest_id].status_details) == ("not_deposited", superseded)
    assert uploads(served) == submits(served) == 1 and list(emulator.submissions_by_md5.values()) == [1]
    assert await step_failures(config) == 0
    # `mirrord plan` shows each decision with its reason.
    path = tmp_path / "plan.toml"
    path.write_text(f'[daemon]\nstate_dir = "{config.daemon.state_dir}"\n')
    assert await asyncio.to_thread(cli.main, ["--config", str(path), "plan", "--all"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if crystal.code in line]
    assert sorted(line.rsplit(": ", 1)[-1] for line in lines) == [
        f"deposit as {crystal.pdb_code}", superseded, superseded]


async def test_grid_scans_and_screening_shots_are_not_deposited(tmp_path, campaign, emulator, served):
    config = config_for(tmp_path, served)
    target = campaign.targets[0]
    crystals = [e for e in target.experiments if e.pdb_code]
    mesh = campaign.add_collection(target.tas, crystals[0].code, images=100, experiment_type="Mesh")
    shot = campaign.add_collection(target.tas, crystals[1].code, images=5)
    ids = await add_datasets(config, campaign, tmp_path / "dls", [mesh, shot])
    assert (await run(config)).exit_code == 0
    rows = await depositions(config)
    assert [(rows[i].state, rows[i].status_details) for i in ids] == [
        ("not_deposited", "experiment type Mesh is not a rotation dataset (deposited: OSC)"),
        ("not_deposited", "5 images: a screening shot, not a dataset (min_images = 10)")]
    assert uploads(served) == 0 and spool_files(config) == []


@pytest.mark.parametrize("scenario", ["detected_another", "exists", "exists_allowed"])
async def test_pdis_upload_answer_is_heard_before_the_submit(tmp_path, campaign, emulator, served, scenario):
    """Seed 003: the upload answer's `pdbid` (detected from the data) and `is_pdb_exists`."""
    config = config_for(tmp_path, served, allow_additional_datasets=scenario == "exists_allowed")
    col = next(c for c in campaign.collections if campaign.experiment(c.sample)[1].pdb_code)
    code = campaign.experiment(col.sample)[1].pdb_code
    if scenario == "detected_another":
        emulator.detect_as[code] = "9ZZZ"
    else:
        emulator.existing_pdb_ids.add(code)
    [dataset_id] = await add_datasets(config, campaign, tmp_path / "dls", [col])
    with capture_logs() as logs:
        outcome = await run(config)
    row = (await depositions(config))[dataset_id]
    told = [(e["log_level"], e.get("deposition"), e.get("pdb_code")) for e in logs
            if e["event"] == "deposition.already_in_pdis"]
    assert told == ([("info", row.id, code)] if scenario == "exists" else [])
    if scenario == "exists_allowed":
        assert (row.state, row.pdb_exists) == ("published", True)
        assert_exactly_once(emulator, [row])
        assert (submits(served), deletes(served)) == (1, 0)
        return
    assert (submits(served), deletes(served)) == (0, 1) and not emulator.submissions_by_md5
    assert await step_failures(config) == 0 and await counted(config, "withdrawn") == 1
    assert await last_reason(config, row.id) == row.status_details  # why, in the record of the last step too
    assert emulator.held == {} and row.pdis_status == "deleted"  # the upload was withdrawn
    if scenario == "detected_another":
        assert (row.state, row.detected_pdb) == ("needs_attention", "9ZZZ") and outcome.attention
        assert row.status_details == (f"PDIS detected PDB 9ZZZ in the data, we would submit it as {code}: "
                                      "not submitted, upload withdrawn")
    else:
        assert (row.state, row.pdb_exists, outcome.exit_code) == ("already_in_pdis", True, 0)
        assert row.status_details == f"PDIS already holds a dataset for PDB {code}: not submitted, upload withdrawn"
        # Rests there; an operator who wants the additional dataset says so, and it goes.
        assert (await run(config)).exit_code == 0 and (await depositions(config))[dataset_id].state == "already_in_pdis"
        config = config_for(tmp_path, served, allow_additional_datasets=True)
        assert (await run(config)).exit_code == 0
        row = (await depositions(config))[dataset_id]
        assert (row.state, row.pdb_exists) == ("published", True)
        assert_exactly_once(emulator, [row])
        assert (submits(served), deletes(served)) == (1, 1)


async def test_all_policy_maps_equipment_with_override_and_fallback(tmp_path, campaign, emulator, served):
    target = campaign.targets[0]
    cols = [campaign.add_collection(target.tas, f"loose-{bl}", beamline=bl) for bl in ("i04-1", "i03", "i99")]
    config = config_for(tmp_path, served, deposit="all", authors="Smith J., Doe A.",
                        equipment={"I03": {"synchrotron_id": 25, "beamline_id": 42}})
    ids = await add_datasets(config, campaign, tmp_path / "dls", cols, link=False)
    assert (await run(config)).exit_code == 0
    rows = await depositions(config)
    assert all(rows[i].state == "published" and rows[i].dataset_type == "other" for i in ids)
    async with PdisClient(PdisEmulator.api_url(served.url), username=USER, password=PASSWORD,
                          token_file=tmp_path / "t") as client:
        remote = {s.md5hash: s for s in await client.submissions()}
    mapped, overridden, fallback = (remote[rows[i].tar_md5] for i in ids)
    assert (mapped.synchrotron.short, mapped.beamline.short) == ("Diamond", "I04-1")  # case-insensitive match
    assert (overridden.synchrotron.id, overridden.beamline.id) == (25, 42)  # the override table wins
    assert fallback.synchrotron is None and fallback.equipment_other == "Diamond i99"
    assert mapped.project_title == (f"Raw diffraction data for loose-i04-1 ({target.proposal}, i04-1, "
                                    f"collection {cols[0].collection_id})")
    assert mapped.project_authors == "Smith J., Doe A." and mapped.dataset_type == "other"


async def test_dry_run_records_decisions_and_uploads_nothing(tmp_path, campaign, emulator, served):
    config = config_for(tmp_path, served, dry_run=True)
    await add_datasets(config, campaign, tmp_path / "dls")
    assert (await run(config)).exit_code == 0
    states = sorted(r.state for r in (await depositions(config)).values())
    assert states == ["dry_run"] * 4 + ["not_deposited"] * 2
    assert uploads(served) == submits(served) == 0 and not emulator.uploads_by_md5 and spool_files(config) == []
    # Switching the dry run off deposits what was decided.
    config = config_for(tmp_path, served)
    assert (await run(config)).exit_code == 0
    assert sorted(r.state for r in (await depositions(config)).values()) == ["not_deposited"] * 2 + ["published"] * 4


@pytest.mark.parametrize("damage", ["junk", "binary_header"])
async def test_preflight_failure_needs_attention_without_upload(tmp_path, campaign, emulator, served, damage):
    """`binary_header`: the middle frame still starts with "###CBF" (magic-byte sniffing passed it), but
    its binary section lost its dimensions; the real header read (fabio) stops it before any upload."""
    config = config_for(tmp_path, served)
    [dataset_id] = await add_datasets(config, campaign, tmp_path / "dls", campaign.collections[:1])
    store = await open_store(config)
    async with store.read() as session:
        dataset = await session.get(Dataset, dataset_id)
    await store.close()
    frames = [Path(dataset.local_dir, name) for name in dataset.files]
    if damage == "junk":
        for frame in frames:
            frame.write_bytes(b"junk, not a detector image")
    else:
        middle = frames[len(frames) // 2]
        middle.write_bytes(middle.read_bytes().replace(b"X-Binary-Size-Second-Dimension", b"X-Binary-Lost"))
    outcome = await run(config)
    row = (await depositions(config))[dataset_id]
    assert row.state == "needs_attention" and "image header not readable" in row.status_details
    if damage == "binary_header":
        assert row.status_details.startswith(f"preflight: image header not readable: {middle.name}")
    assert outcome.attention and uploads(served) == 0 and spool_files(config) == []


async def test_error_no_data_from_pdis_needs_attention(tmp_path, campaign, emulator, served):
    config = config_for(tmp_path, served)
    col = campaign.collections[0]
    [dataset_id] = await add_datasets(config, campaign, tmp_path / "dls", [col])
    store = await open_store(config)
    async with store.write() as session:
        dataset = await session.get(Dataset, dataset_id)
        # An image format fabio reads (EDF) but the emulated PDIS does not take for diffraction images.
        directory = Path(dataset.local_dir)
        fabio.edfimage.EdfImage(data=np.zeros((16, 16), dtype=np.uint16)).write(str(directory / "frame_0001.edf"))
        dataset.files = ["frame_0001.edf"]
        dataset.total_bytes = (directory / "frame_0001.edf").stat().st_size
    await store.close()
    outcome = await run(config)
    row = (await depositions(config))[dataset_id]
    assert (row.state, row.pdis_status) == ("needs_attention", "error_no_data")
    assert "No diffraction images" in row.status_details and outcome.attention
    assert emulator.submissions_by_md5[row.tar_md5] == 1 == submits(served)
    assert await step_failures(config) == 0


async def test_md5_mismatch_is_never_submitted(tmp_path, campaign, emulator, served):
    config = config_for(tmp_path, served)
    [dataset_id] = await add_datasets(config, campaign, tmp_path / "dls", campaign.collections[:1])
    emulator.damage_next_uploads = 1
    outcome = await run(config)
    row = (await depositions(config))[dataset_id]
    assert row.state == "needs_attention" and row.status_details.startswith("integrity")
    assert row.server_md5 != row.tar_md5 and row.upload_token
    assert not emulator.submissions_by_md5 and submits(served) == 0
    assert deletes(served) == 1  # the damaged copy is not left behind
    assert await step_failures(config) == 0
    assert outcome.attention


async def test_revoked_token_is_exchanged_again(tmp_path, campaign, emulator, served):
    config = config_for(tmp_path, served)
    first, second = campaign.collections[0], campaign.collections[1]
    await add_datasets(config, campaign, tmp_path / "dls", [first])
    assert (await run(config)).exit_code == 0
    old_token = json.loads(config.pdis_token_cache.read_text())["token"]
    emulator.regenerate_token(USER)  # the stored token answers 401 from now on
    [dataset_id] = await add_datasets(config, campaign, tmp_path / "dls", [second])
    assert (await run(config)).exit_code == 0
    assert (await depositions(config))[dataset_id].state == "published"
    assert json.loads(config.pdis_token_cache.read_text())["token"] != old_token
    assert served.requests.count("POST", "/api/v1/auth/token/") == 2


async def test_conflict_adopts_the_earlier_upload_without_a_second_submission(tmp_path, campaign, emulator, served):
    config = config_for(tmp_path, served)
    [dataset_id] = await add_datasets(config, campaign, tmp_path / "dls", campaign.collections[:1])
    store = await open_store(config)
    async with store.read() as session:
        dataset_facts, _decision = await decision_for(session, dataset_id, config.pdis)
    await store.close()
    # An earlier attempt reached PDIS but its answer was lost: the same archive is there, unsubmitted.
    packed = pack_for_deposit(dataset_facts, tmp_path / "earlier.tar.zst", level=config.pdis.zstd_level)
    async with PdisClient(PdisEmulator.api_url(served.url), username=USER, password=PASSWORD,
                          token_file=tmp_path / "t") as client:
        earlier = await client.upload(packed.path)
    assert (await run(config)).exit_code == 0
    row = (await depositions(config))[dataset_id]
    assert (row.state, row.tar_md5) == ("published", packed.tar_md5)
    assert emulator.submissions_by_md5[packed.tar_md5] == 1
    # Ours answered 409 and adopted the earlier upload; its answer (is_pdb_exists) was never heard, so
    # the earlier upload was deleted and the archive uploaded once more to hear it, then submitted.
    assert served.requests.count("POST", "/api/v1/upload/") == 3
    assert row.upload_token != earlier.token and earlier.token not in emulator.held
    assert emulator.uploads_by_md5[packed.tar_md5] == 2 and row.pdb_exists is False
    assert (submits(served), deletes(served)) == (1, 1) and await step_failures(config) == 0


async def test_a_lost_submit_answer_is_recorded_not_repeated(tmp_path, campaign, emulator, served):
    """Killed after the submit reached PDIS, before `submitted` was recorded: the status is read first."""
    config = config_for(tmp_path, served)
    [dataset_id] = await add_datasets(config, campaign, tmp_path / "dls", campaign.collections[:1])
    emulator.step_seconds = None  # hold the clock so the row stops at `uploaded`
    original = deposit.DepositJob._submit
    deposit.DepositJob._submit = lambda self, dep, result: asyncio.sleep(0)  # type: ignore[method-assign]
    try:
        await run(config, horizon=0)
    finally:
        deposit.DepositJob._submit = original  # type: ignore[method-assign]
    row = (await depositions(config))[dataset_id]
    assert row.state == "uploaded" and row.upload_token
    async with PdisClient(PdisEmulator.api_url(served.url), username=USER, password=PASSWORD,
                          token_file=tmp_path / "t") as client:
        from mirrord.clients.pdis import SubmitMetadata

        await client.submit(row.upload_token, SubmitMetadata(pdb_code=row.pdb_code))
    emulator.step_seconds = 0.02
    assert (await run(config)).exit_code == 0
    assert (await depositions(config))[dataset_id].state == "published"
    assert emulator.submissions_by_md5[row.tar_md5] == 1
    assert submits(served) == 1  # the status was read; no second submit for PDIS to refuse
    assert await step_failures(config) == 0


async def test_packers_at_once_never_promise_the_same_spool_space_twice(tmp_path, campaign, emulator, served,
                                                                         monkeypatch):
    """Two packers (`pack_concurrency` 2) check the spool's free space at once, before either has written
    a byte: room for one archive is promised to one of them; the other waits, without spending an
    attempt. Before, each saw the space as its own and both packed (a full disk on a real spool)."""
    config = config_for(tmp_path, served, pack_concurrency=2, upload_concurrency=1)
    ids = await add_datasets(config, campaign, tmp_path / "dls", campaign.collections[:2])
    store = await open_store(config)
    try:
        async with store.read() as session:
            sizes = [sum(f.stat().st_size for f in Path((await session.get(Dataset, i)).local_dir).iterdir())
                     for i in ids]
    finally:
        await store.close()
    room = max(sizes) * 21 // 20 + 256 * 1024**2 + 4096  # one archive, its margin and the reserve: not two
    monkeypatch.setattr(deposit, "free_bytes", lambda directory: room)
    original = deposit.pack_for_deposit
    packing, most = [0], [0]

    def slow_pack(*args, **kwargs):  # the other packer checks while this one packs
        packing[0] += 1
        most[0] = max(most[0], packing[0])
        try:
            time.sleep(0.5)
            return original(*args, **kwargs)
        finally:
            packing[0] -= 1

    monkeypatch.setattr(deposit, "pack_for_deposit", slow_pack)
    await run(config, horizon=0)
    assert most == [1]
    rows = await depositions(config)
    assert [(rows[i].state, rows[i].attempts) for i in ids] == [("published", 0), ("published", 0)]
    store = await open_store(config)
    try:
        async with store.read() as session:
            runs = (await session.scalars(select(JobRun.counters).where(JobRun.job == "pdis"))).all()
            waited = sum(counters.get("waiting_for_space", 0) for counters in runs)
    finally:
        await store.close()
    assert waited >= 1 and await step_failures(config) == 0


async def test_a_group_larger_than_the_spool_is_packed_as_room_frees(tmp_path, campaign, emulator, served,
                                                                       monkeypatch):
    """Three datasets decided at once into a spool with room for one archive (its free space is what the
    spool directory holds less than that): each is packed when the one before is published and its
    archive removed, all in one `once`, the spool never holding two. Before, a pack that found no room
    left its item due again at once (a short retry_base), the packers kept claiming it for ever and the
    status poll that frees the spool never ran (bench/group_deposit.py found it: 11,000 waits a minute)."""
    config = config_for(tmp_path, served)
    ids = await add_datasets(config, campaign, tmp_path / "dls", campaign.collections[:4])
    largest = max(sum(f.stat().st_size for f in d.iterdir())
                  for d in (tmp_path / "dls").rglob("*") if d.is_dir() and any(p.is_file() for p in d.iterdir()))
    capacity = largest * 21 // 20 + 256 * 1024**2 + 64 * 1024  # one archive, its margin, the reserve
    peak = [0]

    def free_bytes(directory) -> int:  # noqa: ANN001
        held = sum(p.stat().st_size for p in Path(directory).glob("*") if p.is_file())
        peak[0] = max(peak[0], held)
        return capacity - held

    monkeypatch.setattr(deposit, "free_bytes", free_bytes)
    outcome = await asyncio.wait_for(run(config, horizon=5.0), 240)
    rows = await depositions(config)
    going = [rows[i] for i in ids if rows[i].state != "not_deposited"]  # one crystal collected twice
    assert len(going) == 3 and all(r.state == "published" for r in going), outcome
    assert peak[0] <= largest * 21 // 20
    store = await open_store(config)
    try:
        async with store.read() as session:
            runs = (await session.scalars(select(JobRun.counters).where(JobRun.job == "pdis"))).all()
    finally:
        await store.close()
    assert sum(counters.get("waiting_for_space", 0) for counters in runs) <= len(runs)  # one a pass at most
    assert_exactly_once(emulator, going)


async def test_waiting_for_spool_space_and_changed_files(tmp_path, campaign, emulator, served, monkeypatch):
    config = config_for(tmp_path, served)
    [dataset_id] = await add_datasets(config, campaign, tmp_path / "dls", campaign.collections[:1])
    monkeypatch.setattr(deposit, "free_bytes", lambda directory: 0)
    # The wait is due again within the tests' 10 ms retry, so a once run would look 200 times.
    outcome = await run(config, horizon=0, max_passes=3)
    row = (await depositions(config))[dataset_id]
    assert (row.state, row.attempts, row.status_details) == ("queued", 0, "waiting for spool space")
    assert outcome.exit_code == 0 and uploads(served) == 0
    monkeypatch.undo()

    calls = []
    real_pack = deposit.pack_for_deposit

    def pack_once_changed(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise deposit.DatasetChanged("x.cbf", "grew while being read")
        return real_pack(*args, **kwargs)

    monkeypatch.setattr(deposit, "pack_for_deposit", pack_once_changed)
    assert (await run(config)).exit_code == 0
    assert (await depositions(config))[dataset_id].state == "published" and len(calls) == 2
    store = await open_store(config)
    async with store.read() as session:
        reasons = (await session.scalars(select(Event.reason).where(Event.to_state == "queued"))).all()
    await store.close()
    assert any("packing again later" in r for r in reasons)


async def test_spool_torn_by_a_power_cut_is_packed_again_not_uploaded(tmp_path, campaign, emulator, served,
                                                                       monkeypatch):
    """Spool files are not fsynced: after a restart a damaged one must fail verification and be repacked."""
    config = config_for(tmp_path, served)
    [dataset_id] = await add_datasets(config, campaign, tmp_path / "dls", campaign.collections[:1])
    packs = []
    real_pack = deposit.pack_for_deposit
    monkeypatch.setattr(deposit, "pack_for_deposit", lambda *a, **kw: packs.append(1) or real_pack(*a, **kw))
    emulator.faults.inject("/api/v1/upload/", *["503"] * 50)  # PDIS down: the archive stays in the spool
    await run(config, horizon=0)
    row = (await depositions(config))[dataset_id]
    assert row.spool_path and not row.upload_token and len(packs) == 1
    spool = Path(row.spool_path)
    spool.write_bytes(spool.read_bytes()[: row.zst_size // 2])  # what a power cut can leave of unsynced pages

    emulator.faults.script.clear()
    assert (await run(config)).exit_code == 0  # a new process: nothing is trusted without a full check
    row = (await depositions(config))[dataset_id]
    assert row.state == "published" and len(packs) == 2
    assert (row.server_md5, row.server_size) == (row.tar_md5, row.tar_size)
    assert_exactly_once(emulator, [row])
    assert spool_files(config) == []


async def test_plan_lists_decisions_without_uploading(tmp_path, campaign, emulator, served, capsys):
    config = config_for(tmp_path, served)
    await add_datasets(config, campaign, tmp_path / "dls")
    path = tmp_path / "mirrord.toml"
    path.write_text(f'[daemon]\nstate_dir = "{config.daemon.state_dir}"\n[pdis]\ndeposit = "linked"\n')
    assert await asyncio.to_thread(cli.main, ["--config", str(path), "plan"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("PDIS deposition plan (policy linked)")
    assert sum("deposit as " in line for line in lines) == 4
    assert sum("has no PDB code yet" in line for line in lines) == 2
    assert await asyncio.to_thread(cli.main, ["--config", str(path), "plan", "--json"]) == 0
    entries = json.loads(capsys.readouterr().out)
    assert len(entries) == 6 and sum(e["deposit"] for e in entries) == 4
    assert uploads(served) == 0


# -- crash safety: SIGKILL a real `mirrord once` at each state boundary ----------------------------
def first_reached(db: Path, state: str) -> bool:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.1) as conn:
            return conn.execute("SELECT 1 FROM events WHERE item_type = 'deposition' AND to_state = ?",
                                (state,)).fetchone() is not None
    except sqlite3.Error:
        return False  # not created yet, or busy


async def mirrord_once(config_path: Path, db: Path, kill_at: str | None = None) -> int:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mirrord.cli", "--config", str(config_path), "--log-level", "warning", "once",
        "--wait", "5", stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    if kill_at is not None:
        deadline = time.monotonic() + 20
        while proc.returncode is None and time.monotonic() < deadline:
            if first_reached(db, kill_at):
                proc.send_signal(signal.SIGKILL)
                break
            await asyncio.sleep(0.002)
    return await proc.wait()


async def killed_then_restarted(tmp_path: Path, emulator: PdisEmulator, kill_at: str) -> list[Deposition]:
    """One linked dataset; `mirrord once` SIGKILLed when the deposition first reaches `kill_at`, then run
    again until it exits cleanly. Returns the deposition rows."""
    campaign = Campaign.demo(seed=1, targets=1, experiments=2, image_size=128 * 1024, images_per_collection=12)
    async with Served(emulator.app) as served:
        config = config_for(tmp_path, served)
        await add_datasets(config, campaign, tmp_path / "dls", campaign.collections[:1])
        config_path = once_config(tmp_path, config)
        db = config.daemon.state_dir / "mirrord.db"
        assert await mirrord_once(config_path, db, kill_at=kill_at) == -signal.SIGKILL
        for _ in range(3):
            if await mirrord_once(config_path, db) == 0:
                break
        assert spool_files(config) == []  # no temp file, no archive left behind
        return list((await depositions(config)).values())


def once_config(tmp_path: Path, config: Any, pdis: str = "") -> Path:
    """A config file for a `mirrord once` subprocess: `config`'s state and PDIS, a password file, `pdis` lines."""
    (tmp_path / "pdis.pass").write_text(PASSWORD)
    (tmp_path / "pdis.pass").chmod(0o600)
    config_path = tmp_path / "mirrord.toml"
    config_path.write_text(
        f'[daemon]\nstate_dir = "{config.daemon.state_dir}"\nretry_base = "10ms"\nretry_max = "50ms"\n'
        f'[log]\nformat = "json"\n'
        f'[pdis]\nenabled = true\nurl = "{config.pdis.url}"\nusername = "{USER}"\n'
        f'password_file = "{tmp_path / "pdis.pass"}"\npoll_interval = "50ms"\nspool_margin = 0\n{pdis}')
    return config_path


def slow_emulator(tmp_path: Path) -> PdisEmulator:
    """Slow enough uploads that "uploading" lasts a moment; a quick status clock."""
    return PdisEmulator(storage_dir=tmp_path / "pdis", users={USER: PASSWORD}, step_seconds=0.05,
                        bandwidth=8 * 1024**2)


@pytest.mark.parametrize("kill_at", ["packing", "packed", "uploading", "uploaded", "submitted"])
async def test_sigkill_at_each_boundary_then_restart_publishes_exactly_once(tmp_path, kill_at):
    emulator = slow_emulator(tmp_path)
    rows = await killed_then_restarted(tmp_path, emulator, kill_at)
    assert [r.state for r in rows] == ["published"]
    assert_exactly_once(emulator, rows)


@pytest.mark.parametrize("kill_at", ["uploading", "uploaded", "withdrawing"])
async def test_sigkill_between_upload_and_withdrawal_leaves_no_submission_and_no_upload(tmp_path, kill_at):
    """PDIS already holds the PDB code (`is_pdb_exists`, seed 003): wherever mirrord dies between the
    upload and the delete, the restart finishes the withdrawal. Killed while uploading, the answer is
    lost: the adopted upload is deleted and sent again to hear the verdict."""
    emulator = slow_emulator(tmp_path)
    campaign = Campaign.demo(seed=1, targets=1, experiments=2)
    emulator.existing_pdb_ids.add(campaign.targets[0].experiments[0].pdb_code)
    emulator.faults.stall_seconds = 1.0  # the status read and the delete take a second: time to kill
    emulator.faults.inject("/api/v1/submissions/", "stall", "stall")
    rows = await killed_then_restarted(tmp_path, emulator, kill_at)
    assert [(r.state, r.pdis_status, r.pdb_exists) for r in rows] == [("already_in_pdis", "deleted", True)]
    assert rows[0].status_details.startswith(f"PDIS already holds a dataset for PDB {rows[0].pdb_code}")
    assert not emulator.submissions_by_md5 and emulator.held == {}


# -- the whole pipeline: Fragalysis + ISPyB + PDIS emulators, the three real jobs ----------------------
@contextlib.asynccontextmanager
async def linked_pipeline(tmp_path: Path, campaign: Campaign, ispyb_factory: Any):
    """The Fragalysis, ISPyB and PDIS emulators serving `campaign`, and a config following its last target
    through all three; yields (config, the PDIS emulator)."""
    from mirrord.emulators.fragalysis import FragalysisEmulator

    target = campaign.targets[-1]
    ispyb = await ispyb_factory(campaign, data_root=tmp_path / "dls")
    emulator = PdisEmulator(storage_dir=tmp_path / "pdis", users={USER: PASSWORD}, step_seconds=0.02)
    async with Served(FragalysisEmulator(campaign, build_seconds=0.02).app) as fragalysis, \
            Served(emulator.app) as served:
        yield make_config(
            tmp_path, daemon={"retry_base": "10ms", "retry_max": "50ms"},
            fragalysis={"enabled": True, "url": fragalysis.url, "settle": "0s", "build_poll_interval": "10ms",
                        "targets": [{"name": target.name, "tas": target.tas}]},
            ispyb={"enabled": True, "url": ispyb.url, "login": "mirrord", "password": "mirrord-password",
                   "proposals": [target.proposal], "lookback": "3650d", "quiet_period": 0,
                   "missing_deadline": "1h", "path_map": {"/dls": str(tmp_path / "dls")},
                   "timezone": campaign.timezone},
            pdis={"enabled": True, "url": PdisEmulator.api_url(served.url), "username": USER, "password": PASSWORD,
                  "poll_interval": "20ms", "spool_margin": 0}), emulator


async def test_pipeline_fragalysis_ispyb_pdis_publishes_linked_datasets(
        tmp_path, ispyb_emulator_factory):  # noqa: F811 - the fixture, used
    campaign = Campaign.demo(seed=0, targets=1)
    target = campaign.targets[0]
    async with linked_pipeline(tmp_path, campaign, ispyb_emulator_factory) as (config, emulator):
        outcome = await run(config, horizon=3.0)
        assert outcome.exit_code == 0, outcome.failed
        rows = list((await depositions(config)).values())
    published = sorted(r.pdb_code for r in rows if r.state == "published")
    assert published == sorted(e.pdb_code for e in target.experiments if e.pdb_code)
    assert {r.state for r in rows} == {"published", "not_deposited"}
    assert_exactly_once(emulator, [r for r in rows if r.state == "published"])
    assert spool_files(config) == []
