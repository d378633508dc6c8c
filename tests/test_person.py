"""A person in the loop, end to end through the CLI: accept, dismiss and reopen, choose, the approval gate,
holds and PDB codes from a person, on SQLite and PostgreSQL, against the real emulators and jobs.

Every test counts the irreversible requests PDIS received (uploads, submits), not only the end state."""
# ruff: noqa: F401, F811 - the PDIS fixtures come from test_deposit_job, and pytest passes them by name

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from mirrord import cli
from mirrord.emulators.base import REQUEST_LOG_KEY, Served
from mirrord.emulators.campaign import Campaign
from mirrord.emulators.pdis import PdisEmulator
from mirrord.store import Store
from mirrord.store.models import Dataset, Event, Experiment, PersonDecision
from tests.ispyb_openapi import ispyb_emulator_factory  # noqa: F401 - pytest fixture
from tests.test_deposit_job import (
    PASSWORD,
    USER,
    add_datasets,
    assert_exactly_once,
    config_for,
    depositions,
    emulator,
    first_reached,
    mirrord_once,
    once_config,
    run,
    served,
)

UPLOAD, SUBMIT = "/api/v1/upload/", "/api/v1/submit/"


def sent(served: Served, path: str) -> int:
    """How many requests of this irreversible kind PDIS received."""
    return served.app[REQUEST_LOG_KEY].count("POST", path)


def cli_config(tmp_path: Path, config: Any, **pdis: Any) -> Path:
    """The config file the person's commands read: the same store (and the PDIS policy, for `choose`)."""
    path = tmp_path / "person.toml"
    lines = ["[daemon]", f"state_dir = {json.dumps(str(config.daemon.state_dir))}",
             f"database_url = {json.dumps(config.daemon.database_url)}", "[pdis]"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in pdis.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


async def mirrord(path: Path, *args: str, capsys: pytest.CaptureFixture[str] | None = None) -> tuple[int, str]:
    """Run a `mirrord` command as a person would; its exit code and what it printed."""
    if capsys is not None:
        capsys.readouterr()
    code = await asyncio.to_thread(cli.main, [*args, "-c", str(path)])
    out = capsys.readouterr() if capsys is not None else None
    return code, (out.out + out.err) if out else ""


async def decision_rows(config: Any) -> list[PersonDecision]:
    store = Store(config.daemon.resolved_database_url)
    try:
        async with store.read() as session:
            return list((await session.scalars(select(PersonDecision).order_by(PersonDecision.id))).all())
    finally:
        await store.close()


async def write(config: Any, statement: Any) -> None:
    store = Store(config.daemon.resolved_database_url)
    try:
        async with store.write() as session:
            await session.execute(statement)
    finally:
        await store.close()


def crystals(campaign: Campaign, n: int) -> list[Any]:
    """The first successful collection of `n` crystals with a PDB code each."""
    target = campaign.targets[0]
    samples = [e.code for e in target.experiments if e.pdb_code][:n]
    return [next(c for c in campaign.collections if c.sample == s and c.succeeded) for s in samples]


# -- the approval gate ----------------------------------------------------------------------------------
async def test_approval_gate_nothing_leaves_the_host_before_a_person_approves(tmp_path, served, emulator, db_url,
                                                                             capsys):
    campaign = Campaign.demo(seed=0, targets=1, experiments=6)
    config = config_for(tmp_path, served, database_url=db_url, approval="required")
    ids = await add_datasets(config, campaign, tmp_path / "dls", crystals(campaign, 3))
    path = cli_config(tmp_path, config)

    outcome = await run(config)
    rows = await depositions(config)
    assert {rows[i].state for i in ids} == {"awaiting_approval"}
    assert all(rows[i].tar_md5 for i in ids)  # preflighted and packed already, waiting only for the person
    assert (sent(served, UPLOAD), sent(served, SUBMIT)) == (0, 0)
    assert outcome.exit_code == 0 and not outcome.attention  # waiting for approval is not a problem
    code, out = await mirrord(path, "status", "--json", capsys=capsys)
    status = json.loads(out)
    assert status["items"]["deposition"]["awaiting_approval"] == 3
    assert [a["id"] for a in status["approvals"]] == sorted(rows[i].id for i in ids)

    first = rows[ids[0]]
    code, out = await mirrord(path, "approve", "deposition", str(first.id), "--reason", "checked the frames",
                              "--by", "ada", capsys=capsys)
    assert code == 0 and f"deposition {first.id} approve" in out
    await run(config)
    rows = await depositions(config)
    assert [rows[i].state for i in ids] == ["published", "awaiting_approval", "awaiting_approval"]
    assert (sent(served, UPLOAD), sent(served, SUBMIT)) == (1, 1)

    code, out = await mirrord(path, "reject", "deposition", str(rows[ids[1]].id), "--reason", "embargoed",
                              capsys=capsys)
    assert code == 0
    code, _ = await mirrord(path, "approve", "--all", "--reason", "the rest is fine", "--by", "bo", capsys=capsys)
    assert code == 0
    await run(config)
    rows = await depositions(config)
    assert [rows[i].state for i in ids] == ["published", "dismissed", "published"]
    assert (sent(served, UPLOAD), sent(served, SUBMIT)) == (2, 2)
    assert_exactly_once(emulator, [rows[ids[0]], rows[ids[2]]])

    code, out = await mirrord(path, "decisions", "--json", capsys=capsys)
    listed = json.loads(out)
    assert [(d["kind"], d["id"], d["action"], d["by"]) for d in reversed(listed)] == [
        ("deposition", first.id, "approve", "ada"), ("deposition", rows[ids[1]].id, "reject", os.environ.get(
            "SUDO_USER") or __import__("getpass").getuser()), ("deposition", rows[ids[2]].id, "approve", "bo")]
    assert all(d["reason"] and d["at"] for d in listed)


async def test_an_approval_lapses_when_what_was_approved_changes(tmp_path, served, emulator, capsys):
    campaign = Campaign.demo(seed=0, targets=1, experiments=6)
    config = config_for(tmp_path, served, approval="required")
    [dataset_id] = await add_datasets(config, campaign, tmp_path / "dls", crystals(campaign, 1))
    path = cli_config(tmp_path, config)
    await run(config)
    dep = (await depositions(config))[dataset_id]
    assert (await mirrord(path, "approve", "--pdb", dep.pdb_code, "--reason", "ok", capsys=capsys))[0] == 0
    # Between the approval and the upload, Fragalysis gives the experiment another PDB code.
    await write(config, update(Experiment).values(pdb_code="9ZZZ"))
    await run(config)
    dep = (await depositions(config))[dataset_id]
    assert (dep.state, dep.pdb_code) == ("awaiting_approval", "9ZZZ")
    assert dep.status_details.startswith("the approval lapsed: what was approved changed (now PDB 9ZZZ")
    assert (sent(served, UPLOAD), sent(served, SUBMIT)) == (0, 0)
    [approval] = await decision_rows(config)
    assert not approval.active and approval.ended_why.startswith("lapsed")
    code, out = await mirrord(path, "approve", "deposition", str(dep.id), "--reason", "9ZZZ is right",
                              capsys=capsys)
    assert code == 0
    await run(config)
    assert (await depositions(config))[dataset_id].state == "published"
    assert (sent(served, UPLOAD), sent(served, SUBMIT)) == (1, 1)


async def test_approve_refuses_what_is_not_waiting_and_needs_a_reason(tmp_path, served, capsys):
    campaign = Campaign.demo(seed=0, targets=1, experiments=6)
    config = config_for(tmp_path, served)  # no gate: nothing waits
    await add_datasets(config, campaign, tmp_path / "dls", crystals(campaign, 1))
    path = cli_config(tmp_path, config)
    await run(config)
    code, out = await mirrord(path, "approve", "--all", "--reason", "x", capsys=capsys)
    assert code == 1 and "no deposition awaiting approval matches" in out
    code, out = await mirrord(path, "approve", "deposition", "1", "--reason", "x", capsys=capsys)
    assert code == 1 and "deposition 1 is published, not awaiting approval" in out
    code, out = await mirrord(path, "approve", "deposition", "1", "--reason", "  ", capsys=capsys)
    assert code == 2 and "needs a reason" in out
    assert await decision_rows(config) == []


# -- holds ------------------------------------------------------------------------------------------------
async def test_a_hold_stops_uploads_while_polling_goes_on(tmp_path, served, emulator, db_url, capsys):
    campaign = Campaign.demo(seed=0, targets=1, experiments=6)
    config = config_for(tmp_path, served, database_url=db_url)
    ids = await add_datasets(config, campaign, tmp_path / "dls", crystals(campaign, 2))
    path = cli_config(tmp_path, config)
    code, out = await mirrord(path, "hold", "pdis", "--reason", "PDIS maintenance", "--by", "ada", capsys=capsys)
    assert code == 0 and "job pdis hold" in out

    outcome = await run(config)
    rows = await depositions(config)
    assert outcome.exit_code == 0
    assert {rows[i].state for i in ids} == {"packed"}  # decided and packed: the poll and local work go on
    assert (sent(served, UPLOAD), sent(served, SUBMIT)) == (0, 0)
    status = json.loads((await mirrord(path, "status", "--json", capsys=capsys))[1])
    assert [(h["id"], h["by"], h["reason"]) for h in status["holds"]] == [("pdis", "ada", "PDIS maintenance")]

    assert (await mirrord(path, "resume", "pdis", "--reason", "PDIS is back", capsys=capsys))[0] == 0
    await run(config)
    rows = await depositions(config)
    assert {rows[i].state for i in ids} == {"published"}
    assert (sent(served, UPLOAD), sent(served, SUBMIT)) == (2, 2)
    assert (await mirrord(path, "resume", "pdis", "--reason", "again", capsys=capsys))[0] == 1  # not held
    with pytest.raises(SystemExit) as refused:  # ISPyB writes nothing upstream: nothing to hold
        await mirrord(path, "hold", "ispyb", "--reason", "x")
    assert refused.value.code == 2 and "invalid choice: 'ispyb'" in capsys.readouterr().err


# -- choose ------------------------------------------------------------------------------------------------
async def test_choose_a_deposition_for_its_pdb_code_and_refused_against_an_irrevocable_winner(
        tmp_path, served, emulator, db_url, capsys):
    campaign = Campaign.demo(seed=0, targets=1, experiments=6)
    target = campaign.targets[0]
    crystal = next(e for e in target.experiments if e.pdb_code)
    first = next(c for c in campaign.collections if c.sample == crystal.code)
    again = campaign.add_collection(target.tas, crystal.code, beamline=target.beamline)  # newer: preferred
    config = config_for(tmp_path, served, database_url=db_url)
    older_id, newer_id = await add_datasets(config, campaign, tmp_path / "dls", [first, again])
    path = cli_config(tmp_path, config)
    await mirrord(path, "hold", "pdis", "--reason", "look first", capsys=capsys)
    await run(config)
    rows = await depositions(config)
    assert (rows[older_id].state, rows[newer_id].state) == ("not_deposited", "packed")
    assert "superseded by collection" in rows[older_id].status_details

    code, out = await mirrord(path, "choose", "deposition", str(rows[older_id].id), "--reason",
                              "the first run has the better diffraction", "--by", "ada", capsys=capsys)
    assert code == 0, out
    await run(config)  # still held: the decision pass swaps them before anything leaves
    rows = await depositions(config)
    assert (rows[older_id].state, rows[newer_id].state) == ("packed", "not_deposited")
    assert rows[newer_id].status_details == (f"superseded by collection {first.collection_id} (chosen by a "
                                             f"person) for PDB {crystal.pdb_code}")
    await mirrord(path, "resume", "pdis", "--reason", "go", capsys=capsys)
    await run(config)
    rows = await depositions(config)
    assert (rows[older_id].state, rows[newer_id].state) == ("published", "not_deposited")
    assert (sent(served, UPLOAD), sent(served, SUBMIT)) == (1, 1)
    assert_exactly_once(emulator, [rows[older_id]])

    # Now the code is on PDIS: choosing the other is refused, naming the one that cannot be taken back.
    code, out = await mirrord(path, "choose", "deposition", str(rows[newer_id].id), "--reason", "x", capsys=capsys)
    assert code == 1
    assert (f"deposition {rows[older_id].id} (published) already carries PDB {crystal.pdb_code} on PDIS and can "
            "no longer be taken back") in out
    assert [d.action for d in await decision_rows(config)] == ["hold", "choose", "resume"]


# -- the whole pipeline: accept, dismiss, reopen ------------------------------------------------------------
@contextlib.asynccontextmanager
async def problem_pipeline(tmp_path: Path, ispyb_factory: Any, db_url: str = "", **pdis: Any):
    """The demo's problem campaign through the Fragalysis, ISPyB and PDIS emulators and the real jobs."""
    from mirrord.emulators.fragalysis import FragalysisEmulator

    campaign = Campaign.demo(seed=0, with_problem=True)
    target = campaign.targets[-1]
    ispyb = await ispyb_factory(campaign, data_root=tmp_path / "dls")
    emulator = PdisEmulator(storage_dir=tmp_path / "pdis", users={USER: PASSWORD}, step_seconds=0.02)
    async with Served(FragalysisEmulator(campaign, build_seconds=0.02).app) as fragalysis, \
            Served(emulator.app) as pdis_served:
        config = config_for(tmp_path, pdis_served, database_url=db_url, **pdis)
        follow(config, campaign, target, fragalysis.url, ispyb.url, tmp_path / "dls")
        yield campaign, config, emulator, pdis_served


def follow(config: Any, campaign: Campaign, target: Any, fragalysis_url: str, ispyb_url: str, dls: Path) -> None:
    """Add the Fragalysis and ISPyB jobs to `config`, following `target` (its TAS and proposal)."""
    config.fragalysis = type(config.fragalysis).model_validate(
        {"enabled": True, "url": fragalysis_url, "settle": "0s", "build_poll_interval": "10ms",
         "targets": [{"name": target.name, "tas": target.tas}]})
    config.ispyb = type(config.ispyb).model_validate(
        {"enabled": True, "url": ispyb_url, "login": "mirrord", "password": "mirrord-password",
         "proposals": [target.proposal], "lookback": "3650d", "quiet_period": 0, "missing_deadline": "1h",
         "path_map": {"/dls": str(dls)}, "timezone": campaign.timezone})


async def shared_file_datasets(config: Any, campaign: Campaign) -> list[Dataset]:
    """The two successful runs that wrote the same file names (needs_attention: whose are they?)."""
    sample = f"{campaign.targets[-1].name}-x0991"
    store = Store(config.daemon.resolved_database_url)
    try:
        async with store.read() as session:
            return list((await session.scalars(select(Dataset).where(Dataset.sample_name == sample)
                                               .order_by(Dataset.collection_id))).all())
    finally:
        await store.close()


def touch(dataset: Dataset, seconds: float = 7.0) -> None:
    """Change one file's mtime, as a copy or a re-processing run would."""
    path = Path(dataset.local_dir) / dataset.files[0]
    info = path.stat()
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns + int(seconds * 1e9)))


async def lapse_signed(config, dataset_id: int) -> str:
    """The replica that recorded the dataset's last move into needs_attention (an accept's lapse)."""
    store = Store(config.daemon.resolved_database_url)
    try:
        async with store.read() as session:
            return await session.scalar(select(Event.instance).where(
                Event.item_type == "dataset", Event.item_id == str(dataset_id),
                Event.to_state == "needs_attention").order_by(Event.id.desc()).limit(1))
    finally:
        await store.close()


async def test_accept_binds_to_the_files_and_lapses_when_one_changes(tmp_path, ispyb_emulator_factory,
                                                                      db_url, capsys):
    # x0991 is linked to no Fragalysis experiment: deposited, once its files are vouched for, as "other".
    async with problem_pipeline(tmp_path, ispyb_emulator_factory, db_url, deposit="all",
                                authors="A. Person") as (campaign, config, emulator, served):
        path = cli_config(tmp_path, config)
        assert (await run(config)).attention
        one, _two = await shared_file_datasets(config, campaign)
        assert one.state == "needs_attention"
        baseline = sent(served, UPLOAD)

        # Accepted, then a file changes before mirrord looks again: the ISPyB check sees it and asks again.
        code, out = await mirrord(path, "accept", "dataset", str(one.id), "--reason", "run 2 rewrote nothing",
                                  "--by", "ada", capsys=capsys)
        assert code == 0 and "needs_attention -> discovered" in out
        touch(one)
        await run(config)
        one, _ = await shared_file_datasets(config, campaign)
        assert one.state == "needs_attention"
        assert one.reason.startswith("the files changed after they were accepted by ada on ")

        # Accepted again and packed while PDIS is held; a file changes before the upload: nothing leaves.
        assert (await mirrord(path, "accept", "dataset", str(one.id), "--reason", "checked again",
                              capsys=capsys))[0] == 0
        await mirrord(path, "hold", "pdis", "--reason", "wait", capsys=capsys)
        await run(config)
        dep = (await depositions(config))[one.id]
        assert dep.state == "packed", dep.status_details
        touch(one)
        await mirrord(path, "resume", "pdis", "--reason", "go", capsys=capsys)
        await run(config)
        one, _ = await shared_file_datasets(config, campaign)
        dep = (await depositions(config))[one.id]
        assert one.state == "needs_attention" and "the files changed after they were accepted" in one.reason
        assert dep.state == "not_deposited" and "needs_attention" in dep.status_details
        assert sent(served, UPLOAD) == baseline  # nothing of these files was uploaded
        assert await lapse_signed(config, one.id)  # by the replica whose upload found it (`instance=None`)

        # Accepted a third time, files left alone: deposited, exactly once.
        assert (await mirrord(path, "accept", "dataset", str(one.id), "--reason", "final check",
                              capsys=capsys))[0] == 0
        await run(config)
        dep = (await depositions(config))[one.id]
        assert dep.state == "published"
        assert sent(served, UPLOAD) == baseline + 1
        actions = [(d.action, d.active, (d.ended_why or "")[:6]) for d in await decision_rows(config)]
        assert actions == [("accept", False, "lapsed"), ("accept", False, "lapsed"), ("hold", False, "ended "),
                           ("resume", False, ""), ("accept", True, "")]


async def test_dismissed_items_leave_the_attention_list_and_once_exits_0(tmp_path, ispyb_emulator_factory,
                                                                         db_url, capsys):
    async with problem_pipeline(tmp_path, ispyb_emulator_factory, db_url) as (campaign, config, emulator, served):
        path = cli_config(tmp_path, config)
        outcome = await run(config)
        assert len(outcome.attention) == 3
        # Each reason ends with the commands that settle it.
        one, two = await shared_file_datasets(config, campaign)
        line = next(a for a in outcome.attention if a.startswith(f"dataset {one.id} "))
        assert line.endswith(f"What you can do: `mirrord accept dataset {one.id} --reason TEXT` once you have "
                             f"checked that the files are this collection's, or `mirrord dismiss dataset {one.id} "
                             "--reason TEXT` if they are not to be deposited")
        corrupt = next(d for d in (await depositions(config)).values() if d.state == "needs_attention")
        line = next(a for a in outcome.attention if a.startswith(f"deposition {corrupt.id} "))
        assert f"`mirrord dismiss deposition {corrupt.id} --reason TEXT` since deposition " in line
        assert f"already carries PDB {corrupt.pdb_code} (published)" in line

        for kind, item in (("dataset", one.id), ("dataset", two.id), ("deposition", corrupt.id)):
            code, out = await mirrord(path, "dismiss", kind, str(item), "--reason", "not ours to deposit",
                                      capsys=capsys)
            assert code == 0, out
        uploads = sent(served, UPLOAD)
        outcome = await run(config)
        assert (outcome.failed, outcome.attention) == ([], [])
        assert sent(served, UPLOAD) == uploads  # dismissed: never deposited
        status = json.loads((await mirrord(path, "status", "--json", capsys=capsys))[1])
        assert status["attention"] == [] and status["items"]["dataset"]["dismissed"] == 2

        code, out = await mirrord(path, "reopen", "dataset", str(one.id), "--reason", "a second look", capsys=capsys)
        assert code == 0 and "dismissed -> needs_attention" in out
        assert (await run(config)).attention
        code, out = await mirrord(path, "show", "dataset", str(one.id), capsys=capsys)
        assert "Decided by a person" in out and "not ours to deposit" in out and "a second look" in out


# -- PDB codes from a person, on the 2024-10 Fragalysis ------------------------------------------------
async def test_pdb_codes_file_links_and_deposits_on_the_2024_10_fragalysis(tmp_path,  # noqa: PLR0915
                                                                            ispyb_emulator_factory):
    from mirrord.emulators.fragalysis import V2024, FragalysisEmulator

    campaign = Campaign.demo(seed=0, targets=1, experiments=6)
    target = campaign.targets[0]
    ispyb = await ispyb_emulator_factory(campaign, data_root=tmp_path / "dls")
    emulator = PdisEmulator(storage_dir=tmp_path / "pdis", users={USER: PASSWORD}, step_seconds=0.02)
    known = [e for e in target.experiments if e.pdb_code][:2]
    codes = tmp_path / "pdb-codes.csv"
    codes.write_text("code,pdb\n" + "".join(f"{e.code},{e.pdb_code.lower()}\n" for e in known))
    async with Served(FragalysisEmulator(campaign, version=V2024, build_seconds=0.02).app) as fragalysis, \
            Served(emulator.app) as served:
        config = config_for(tmp_path, served, pdb_codes_file=str(codes))
        follow(config, campaign, target, fragalysis.url, ispyb.url, tmp_path / "dls")
        outcome = await run(config)
        assert outcome.exit_code == 0, (outcome.failed, outcome.attention)
        store = Store(config.daemon.resolved_database_url)
        async with store.read() as session:
            assert not any((await session.scalars(select(Experiment.pdb_code))).all())  # the 2024-10 shape
        await store.close()
        rows = list((await depositions(config)).values())
        assert sorted(r.pdb_code for r in rows if r.state == "published") == sorted(e.pdb_code for e in known)
        assert_exactly_once(emulator, [r for r in rows if r.state == "published"])
        # Without the file the same store deposits nothing more: the codes came from the person.
        assert {r.state for r in rows} == {"published", "not_deposited"}


# -- crash safety and replicas ------------------------------------------------------------------------
@pytest.mark.parametrize("kill_at", ["uploading", "uploaded", "submitted"])
async def test_sigkill_after_an_approval_then_restart_submits_once(tmp_path, kill_at, capsys):
    emulator = PdisEmulator(storage_dir=tmp_path / "pdis", users={USER: PASSWORD}, step_seconds=0.05,
                            bandwidth=8 * 1024**2)
    campaign = Campaign.demo(seed=1, targets=1, experiments=2, image_size=128 * 1024, images_per_collection=12)
    async with Served(emulator.app) as served:
        config = config_for(tmp_path, served, approval="required")
        await add_datasets(config, campaign, tmp_path / "dls", campaign.collections[:1])
        config_path = once_config(tmp_path, config, 'approval = "required"\n')
        db = config.daemon.state_dir / "mirrord.db"
        assert await mirrord_once(config_path, db) == 3  # done, but a deposition waits for a person
        assert not first_reached(db, "uploading") and sent(served, UPLOAD) == 0
        code, _ = await mirrord(config_path, "approve", "--all", "--reason", "go", capsys=capsys)
        assert code == 0
        assert await mirrord_once(config_path, db, kill_at=kill_at) == -signal.SIGKILL
        for _ in range(3):
            if await mirrord_once(config_path, db) == 0:
                break
        rows = list((await depositions(config)).values())
        assert [r.state for r in rows] == ["published"]
        assert_exactly_once(emulator, rows)
        assert sent(served, SUBMIT) == 1


@pytest.mark.postgres
async def test_two_replicas_never_both_act_on_one_approval(tmp_path, served, emulator, pg_url, capsys):
    campaign = Campaign.demo(seed=0, targets=1, experiments=6)
    config = config_for(tmp_path, served, database_url=pg_url, approval="required")
    ids = await add_datasets(config, campaign, tmp_path / "dls", crystals(campaign, 3))
    path = cli_config(tmp_path, config)
    await run(config)
    assert (await mirrord(path, "approve", "--all", "--reason", "go", capsys=capsys))[0] == 0
    replicas = [config.model_copy(deep=True) for _ in range(2)]
    for n, replica in enumerate(replicas):
        replica.daemon.instance_id = f"replica-{n}"
        replica.daemon.state_dir = tmp_path / f"replica-{n}"
    await asyncio.gather(*(run(replica) for replica in replicas))
    rows = await depositions(config)
    assert {rows[i].state for i in ids} == {"published"}
    assert (sent(served, UPLOAD), sent(served, SUBMIT)) == (3, 3)
    assert_exactly_once(emulator, [rows[i] for i in ids])


# -- the pieces, alone ------------------------------------------------------------------------------------
def test_pdb_codes_file_reads_codes_by_sample_or_experiment_and_names_bad_lines(tmp_path):
    from mirrord.jobs import pdb_codes

    path = tmp_path / "codes.csv"
    path.write_text("sample,pdb\n# a comment\nA71EV2A-x0152, 5rgx\n\nx0991,pdb_00006abc\n")
    codes = pdb_codes.load(path)
    assert codes.by_code == {"A71EV2A-X0152": "5RGX", "X0991": "PDB_00006ABC"}
    assert codes.lookup(None, "a71ev2a-x0152") == "5RGX" and codes.lookup("nope") is None
    path.write_text("A71EV2A-x0152,5RGX\nx0153,not-a-code\n")
    with pytest.raises(pdb_codes.PdbCodesError, match=r"codes.csv, line 2: expected"):
        pdb_codes.load(path)
    path.write_text("x1,5RGX\nx1,6ABC\n")
    with pytest.raises(pdb_codes.PdbCodesError, match="x1 is given two PDB codes"):
        pdb_codes.load(path)
    with pytest.raises(pdb_codes.PdbCodesError, match="missing.csv"):
        pdb_codes.load(tmp_path / "missing.csv")


def test_check_config_names_a_bad_pdb_codes_file(tmp_path, capsys, monkeypatch):
    bad = tmp_path / "codes.csv"
    bad.write_text("x1,5RGX\nx2,oops\n")
    path = tmp_path / "mirrord.toml"
    path.write_text(f'[daemon]\nstate_dir = "{tmp_path}"\n[pdis]\nenabled = true\nusername = "u"\n'
                    f'pdb_codes_file = "{bad}"\n')
    monkeypatch.setenv("MIRRORD_PDIS__PASSWORD", "pw")
    assert cli.main(["check-config", "-c", str(path)]) == 2
    assert f"pdis.pdb_codes_file {bad}, line 2" in capsys.readouterr().err


def test_a_pdb_code_from_the_file_that_disagrees_with_fragalysis_needs_a_person():
    from mirrord.config import PdisSection
    from tests.test_deposit_job import facts

    listed = decide_one(facts(experiment_code="A71EV2A-x0152", pdb_code="5rgx", listed_pdb="6ABC"))
    assert (listed.deposit, listed.attention) == (False, True)
    assert "Fragalysis gives experiment A71EV2A-x0152 PDB code 5RGX, the pdb_codes_file gives 6ABC" in listed.reason
    agreeing = decide_one(facts(experiment_code="A71EV2A-x0152", pdb_code="5rgx", listed_pdb="5RGX"))
    assert (agreeing.deposit, agreeing.pdb_code, agreeing.attention) == (True, "5RGX", False)
    from_file = decide_one(facts(sample_name="x7", listed_pdb="6ABC"), PdisSection())
    assert (from_file.deposit, from_file.pdb_code) == (True, "6ABC")


def decide_one(one: Any, section: Any = None) -> Any:
    from mirrord.config import PdisSection
    from mirrord.jobs.deposit_policy import decide

    return decide(one, section or PdisSection())


async def test_retry_says_when_it_would_only_repeat_and_what_settles_it(tmp_path, ispyb_emulator_factory,
                                                                        capsys):
    """`retry deposition` of the demo's corrupt re-collection turned it into not_deposited without a word,
    and `retry dataset` of a shared-file run went back to needs_attention: now each says so, and names
    the command that settles it."""
    async with problem_pipeline(tmp_path, ispyb_emulator_factory) as (campaign, config, emulator, served):
        path = cli_config(tmp_path, config)
        await run(config)
        one, _two = await shared_file_datasets(config, campaign)
        corrupt = next(d for d in (await depositions(config)).values() if d.state == "needs_attention")
        code, out = await mirrord(path, "retry", "deposition", str(corrupt.id), capsys=capsys)
        assert code == 0 and f"already carries PDB {corrupt.pdb_code} (published): the policy will supersede " \
            f"this one (not_deposited); `mirrord dismiss deposition {corrupt.id} --reason TEXT`" in out
        code, out = await mirrord(path, "retry", "dataset", str(one.id), capsys=capsys)
        assert code == 0 and f"`mirrord accept dataset {one.id} --reason TEXT` vouches for them" in out
