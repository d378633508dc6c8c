"""The Design Hub job end to end: the real emulator over loopback, the real job through `Mirrord.run_once`,
real files in tmp_path. Fragalysis rows and files are written here exactly as the Fragalysis job lays them out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from sqlalchemy import func, select
from structlog.testing import capture_logs

from mirrord.daemon import Mirrord
from mirrord.emulators.base import Served
from mirrord.emulators.campaign import Campaign, pdb_text, sdf_text
from mirrord.emulators.designhub import DesignHubEmulator
from mirrord.jobs.designhub import DesignHubJob, open_in_designhub_url, unmatched_compounds
from mirrord.store import Store, migrate
from mirrord.store.models import Annotation, Compound, Event, Experiment, JobRun, KeyValue, Target
from tests.conftest import make_config

FRAGALYSIS = "https://fragalysis.example.org"


@pytest.fixture
def campaign() -> Campaign:
    return Campaign.demo(seed=0)


@pytest.fixture
def emulator(campaign: Campaign) -> DesignHubEmulator:
    return DesignHubEmulator(campaign)


@pytest.fixture
async def served(emulator: DesignHubEmulator):
    async with Served(emulator.app) as served:
        yield served


def config_for(tmp_path: Path, url: str, *, database_url: str = "", **designhub: Any):
    section = {"enabled": True, "url": url, "api_key": "dh-demo-key", **designhub}
    daemon = {"retry_base": "10ms", "retry_max": "50ms", "database_url": database_url}
    return make_config(tmp_path, designhub=section, daemon=daemon, fragalysis={"url": FRAGALYSIS})


async def run(config, *, horizon: float = 2.0):
    async with Mirrord(config) as app:
        return await app.run_once(horizon=horizon)


async def mirror_upload(config, campaign: Campaign, upload_index: int, *,
                        sdf_override: dict[str, str] | None = None, extra: list[dict[str, Any]] | None = None) -> None:
    """What the Fragalysis job leaves behind: Target/Experiment rows and the files of one mirrored version."""
    sdf_override = sdf_override or {}
    store = Store(config.daemon.resolved_database_url)
    try:
        await migrate.upgrade(store)
        async with store.write() as session:
            for t in campaign.targets:
                target = await session.scalar(select(Target).where(Target.name == t.name, Target.tas == t.tas))
                if target is None:
                    target = Target(name=t.name, tas=t.tas)
                    session.add(target)
                    await session.flush()
                version = config.mirror_root / t.tas / t.name / f"upload_{upload_index}"
                rows = [dict(code=e.code, pdb_code=e.pdb_code, smiles=e.ligand.smiles,
                             compound_code=e.ligand.compound_code, resolution=e.resolution,
                             sdf=sdf_override.get(e.code, sdf_text(e)), pdb=pdb_text(t, e)) for e in t.experiments]
                rows += [r for r in (extra or []) if r["target"] == t.name]
                for r in rows:
                    sdf_rel, pdb_rel = f"aligned_files/{r['code']}/{r['code']}_ligand.sdf", \
                        f"aligned_files/{r['code']}/{r['code']}_bound.pdb"
                    (version / sdf_rel).parent.mkdir(parents=True, exist_ok=True)
                    (version / sdf_rel).write_text(r["sdf"])
                    (version / pdb_rel).write_text(r["pdb"])
                    exp = await session.scalar(select(Experiment).where(Experiment.target_id == target.id,
                                                                        Experiment.code == r["code"]))
                    if exp is None:
                        exp = Experiment(target_id=target.id, code=r["code"], upload_index=upload_index)
                        session.add(exp)
                    exp.upload_index, exp.pdb_code, exp.smiles = upload_index, r["pdb_code"], r["smiles"]
                    exp.compound_code, exp.resolution = r["compound_code"], r["resolution"]
                    exp.ligand_sdf, exp.bound_pdb = sdf_rel, pdb_rel
                current = version.parent / "current"
                current.unlink(missing_ok=True)
                current.symlink_to(version.name)
                target.mirrored_upload = upload_index
    finally:
        await store.close()


async def query(config, statement):
    store = Store(config.daemon.resolved_database_url)
    try:
        async with store.read() as session:
            return (await session.execute(statement)).all()
    finally:
        await store.close()


async def counters(config, after_run_id: int = 0) -> dict[str, int]:
    total: dict[str, int] = {}
    for (c,) in await query(config, select(JobRun.counters).where(JobRun.job == "designhub", JobRun.id > after_run_id)):
        for key, value in c.items():
            total[key] = total.get(key, 0) + value
    return total


async def last_run_id(config) -> int:
    return (await query(config, select(func.max(JobRun.id))))[0][0] or 0


def attachments(emulator: DesignHubEmulator) -> int:
    """Every attachment Design Hub holds."""
    return sum(len(v) for v in emulator.attachments.values())


def attach_requests(served: Served) -> int:
    """Every attach request Design Hub received, landed or not: an attach cannot be taken back, so the
    tests count the sends as well as what was kept."""
    return served.requests.count("POST", "/api/compounds/", "/attach")


def experiment_compounds(campaign: Campaign) -> list[str]:
    return [e.ligand.designhub_id for t in campaign.targets for e in t.experiments]


# -- the compound mirror ----------------------------------------------------------------------------
async def test_first_full_mirror(tmp_path, served, emulator):
    config = config_for(tmp_path, served.url)
    outcome = await run(config)
    assert outcome.exit_code == 0
    rows = {r.id: r for (r,) in await query(config, select(Compound))}
    assert set(rows) == {c.id for c in emulator.compounds}
    first = emulator.compounds[0]
    assert rows[first.id].smiles == first.smiles
    assert rows[first.id].fields["supplier_code"] == first.calculated["supplier_code"]
    assert rows[first.id].modify_date == first.modify_date
    (state,) = (await query(config, select(KeyValue.value).where(KeyValue.key == "designhub.compounds")))[0]
    assert state["watermark"] == max(c.modify_date for c in emulator.compounds).isoformat(
        timespec="milliseconds").replace("+00:00", "Z")


async def test_incremental_pass_rereads_only_changed_rows(tmp_path, served, emulator):
    config = config_for(tmp_path, served.url, overlap="1s")
    async with Mirrord(config) as app:
        await app.run_once()
        edited = emulator.compounds[3].id
        emulator.edit(edited)
        exports, mark = served.requests.count("GET", "/api/compounds/export"), await last_run_id(config)
        await app.run_once()
        assert served.requests.count("GET", "/api/compounds/export") - exports == 1  # one page
        got = await counters(config, mark)
        # The edited row, plus the previous newest row that the overlap re-reads (and the dedupe ignores).
        assert got["compounds_read"] == 2 and got["compounds_changed"] == 1
        # Nothing new: the overlap re-reads the edited row only, and it is unchanged.
        mark = await last_run_id(config)
        await app.run_once()
        got = await counters(config, mark)
        assert got["compounds_read"] == 1 and got.get("compounds_changed", 0) == 0
    (row,) = (await query(config, select(Compound).where(Compound.id == edited)))[0]
    assert row.modify_date == emulator.compound(edited).modify_date


async def test_full_reconcile_drops_deleted_compounds(tmp_path, served, emulator):
    config = config_for(tmp_path, served.url, full_reconcile="0s")
    await run(config)
    gone = emulator.compounds.pop()  # deleted in Design Hub: no modify_date tells an incremental pass
    await run(config)
    ids = {i for (i,) in await query(config, select(Compound.id))}
    assert gone.id not in ids and len(ids) == len(emulator.compounds)


# -- evidence ---------------------------------------------------------------------------------------
async def test_attaches_evidence_once_across_restarts_and_unchanged_uploads(tmp_path, served, emulator, campaign,
                                                                             db_url):
    config = config_for(tmp_path, served.url, database_url=db_url)
    await mirror_upload(config, campaign, 1)
    outcome = await run(config)
    assert outcome.exit_code == 0, outcome.failed
    ids = experiment_compounds(campaign)
    assert all(len(emulator.attachments[i]) == 1 for i in ids)
    assert not any(emulator.attachments[c.id] for c in emulator.compounds if c.id not in ids)
    target, exp = campaign.targets[0], campaign.targets[0].experiments[0]
    attachment = emulator.attachments[exp.ligand.designhub_id][0]
    assert attachment.link == f"{FRAGALYSIS}/viewer/react/preview/target/{target.name}/tas/{target.tas}"
    assert exp.pdb_code in attachment.comment and f"{exp.resolution:.2f}" in attachment.comment
    assert {f.name: f.content.decode() for f in attachment.files} == {
        f"{exp.code}_ligand.sdf": sdf_text(exp), f"{exp.code}_bound.pdb": pdb_text(target, exp)}
    assert attachment.visibility == "internal"
    assert emulator.tags[exp.ligand.designhub_id] == ["crystal-structure"]
    total = attachments(emulator)
    assert attach_requests(served) == total

    await run(config)  # a restart: new process, same state
    await mirror_upload(config, campaign, 2)  # a new upload with the same evidence
    await run(config)
    assert attachments(emulator) == total == len(ids) == attach_requests(served)
    assert all(len(emulator.attachments[i]) == 1 for i in ids)
    rows = await query(config, select(Annotation.state, Annotation.compound_id, Annotation.match_method))
    assert len(rows) == len(ids) and {r.state for r in rows} == {"attached"}
    assert {r.compound_id for r in rows} == set(ids) and {r.match_method for r in rows} == {"field:supplier_code"}


async def test_changed_evidence_attaches_the_new_version_once(tmp_path, served, emulator, campaign):
    config = config_for(tmp_path, served.url)
    async with Mirrord(config) as app:
        await mirror_upload(config, campaign, 1)
        await app.run_once()
        exp = campaign.targets[1].experiments[2]
        await mirror_upload(config, campaign, 2, sdf_override={exp.code: sdf_text(exp) + "> <note>\nrefined\n\n$$$$\n"})
        await app.run_once()
        await app.run_once()
    compound = exp.ligand.designhub_id
    assert len(emulator.attachments[compound]) == 2
    assert attachments(emulator) == len(experiment_compounds(campaign)) + 1 == attach_requests(served)
    assert "refined" in next(f.content.decode() for f in emulator.attachments[compound][1].files
                             if f.name.endswith(".sdf"))
    states = [s for (s,) in await query(config, select(Annotation.state).where(
        Annotation.evidence_key == f"{campaign.targets[1].tas}/{campaign.targets[1].name}/{exp.code}"))]
    assert states == ["attached", "attached"]


async def test_unmatched_compounds_are_reported_then_matched_by_structure(tmp_path, served, emulator, campaign):
    config = config_for(tmp_path, served.url)
    stranger = {"target": campaign.targets[0].name, "code": f"{campaign.targets[0].name}-x0999", "pdb_code": None,
                "smiles": "CCCCCCCCCC(=O)O", "compound_code": "Z0000000001", "resolution": 1.9, "sdf": "x\n$$$$\n",
                "pdb": "END\n"}
    async with Mirrord(config) as app:
        await mirror_upload(config, campaign, 1, extra=[stranger])
        outcome = await app.run_once()
        assert outcome.exit_code == 0  # unmatched is a resting state, not a failure
        (unmatched,) = await unmatched_compounds(app.store)
        assert unmatched.evidence_key.endswith("-x0999") and unmatched.compound_code == "Z0000000001"
        assert "Z0000000001" in unmatched.reason and "CCCCCCCCCC(=O)O" in unmatched.reason
        # A chemist registers the compound (no supplier code): the mirror changes, matching runs again.
        new_id = emulator.add_compound("CCCCCCCCCC(=O)O", project_label=campaign.targets[0].name)
        await app.run_once()
        assert await unmatched_compounds(app.store) == []
    assert len(emulator.attachments[new_id]) == 1
    (row,) = await query(config, select(Annotation.compound_id, Annotation.match_method).where(
        Annotation.evidence_key.endswith("-x0999")))
    assert row.compound_id == new_id and row.match_method == "mirror_smiles"


async def test_renamed_compound_is_not_attached_twice(tmp_path, served, emulator, campaign):
    config = config_for(tmp_path, served.url)
    exp = campaign.targets[0].experiments[1]
    old_id, new_id = exp.ligand.designhub_id, "REG-000777"
    async with Mirrord(config) as app:
        await mirror_upload(config, campaign, 1)
        await app.run_once()
        emulator.rename(old_id, new_id)
        await mirror_upload(config, campaign, 2)
        await app.run_once()
        assert len(emulator.attachments[new_id]) == 1 and old_id not in emulator.attachments
        (row,) = await query(config, select(Annotation.compound_id).where(Annotation.evidence_key.endswith(exp.code)))
        assert row.compound_id == new_id
        # New evidence for the renamed compound goes to its current id.
        await mirror_upload(config, campaign, 3, sdf_override={exp.code: sdf_text(exp) + "> <v>\n2\n\n$$$$\n"})
        await app.run_once()
    assert len(emulator.attachments[new_id]) == 2
    assert attach_requests(served) == len(experiment_compounds(campaign)) + 1
    aliases = dict(await query(config, select(Compound.id, Compound.current_id).where(Compound.id == old_id)))
    assert aliases == {old_id: new_id}


async def test_data_columns_are_written(tmp_path, served, emulator, campaign):
    config = config_for(tmp_path, served.url, data_columns={"pdb_code": "PDB code", "resolution": "Resolution (A)"})
    await mirror_upload(config, campaign, 1)
    assert (await run(config)).exit_code == 0
    for exp in campaign.targets[0].experiments:
        data = emulator.data[exp.ligand.designhub_id]
        assert data["Resolution (A)"] == exp.resolution
        assert data.get("PDB code") == exp.pdb_code  # not deposited yet: no column written


# -- crashes and faults around the attach -----------------------------------------------------------
class _Crash(BaseException):
    """The process dies (not an error the job handles)."""


async def test_crash_between_attach_and_record_does_not_attach_twice(tmp_path, served, emulator, campaign,
                                                                    monkeypatch):
    config = config_for(tmp_path, served.url)
    await mirror_upload(config, campaign, 1)
    original = DesignHubJob._record_attached

    async def crash_once(self, *args, **kwargs):
        monkeypatch.setattr(DesignHubJob, "_record_attached", original)
        raise _Crash()

    monkeypatch.setattr(DesignHubJob, "_record_attached", crash_once)
    with pytest.raises(_Crash):
        await run(config)
    assert attachments(emulator) == 1 == attach_requests(served)  # it landed, and was not recorded
    assert await query(config, select(Annotation.state).where(Annotation.state == "attaching"))

    outcome = await run(config)  # the restart
    assert outcome.exit_code == 0
    ids = experiment_compounds(campaign)
    assert all(len(emulator.attachments[i]) == 1 for i in ids)
    assert attachments(emulator) == len(ids) == attach_requests(served)  # the landed one was not sent again
    reasons = [r for (r,) in await query(config, select(Event.reason).where(Event.to_state == "tagging"))]
    assert sum("at-most-once" in r for r in reasons) == 1
    assert not await query(config, select(KeyValue.key).where(KeyValue.key.like("designhub.attach.%")))


async def test_attach_that_never_landed_is_sent_again(tmp_path, served, emulator, campaign):
    config = config_for(tmp_path, served.url)
    compound = campaign.targets[0].experiments[4].ligand.designhub_id
    async with Mirrord(config) as app:
        await mirror_upload(config, campaign, 1)
        served.faults.inject(f"/api/compounds/{compound}/attach", "reset")  # the connection dies: outcome unknown
        outcome = await app.run_once(horizon=2)
    assert outcome.exit_code == 0
    assert served.requests.count("POST", f"/api/compounds/{compound}/attach") == 2
    assert len(emulator.attachments[compound]) == 1


# -- degraded upstreams and credentials -------------------------------------------------------------
async def test_older_design_hub_degrades_with_one_message(tmp_path, campaign):
    emulator = DesignHubEmulator(campaign, legacy=True)
    async with Served(emulator.app) as served:
        config = config_for(tmp_path, served.url)
        await mirror_upload(config, campaign, 1)
        with capture_logs() as logs:
            async with Mirrord(config) as app:
                first = await app.run_once()
                second = await app.run_once()
    assert first.exit_code == second.exit_code == 0
    degraded = [entry for entry in logs if entry["event"] == "designhub.degraded"]
    assert len(degraded) == 1
    assert "export" in degraded[0]["message"] and "public_ids" in degraded[0]["message"]
    assert "no evidence is written" in degraded[0]["cannot"]
    outcomes = {o for (o,) in await query(config, select(JobRun.outcome))}
    assert outcomes == {"ok"}
    assert not await query(config, select(Annotation.id)) and not emulator.attachments


@pytest.mark.parametrize(("api_key", "message"), [("not-a-key", "credential rejected"), (None, "no credential sent")])
async def test_rejected_or_missing_key_fails_the_run_clearly(tmp_path, served, api_key, message):
    config = config_for(tmp_path, served.url, api_key=api_key)
    outcome = await run(config)
    assert outcome.exit_code == 1  # no item failed, but the job itself did not do its work
    assert [line for line in outcome.failed if line.startswith("job designhub: start failed: AuthError")]
    ((run_outcome, error),) = await query(config, select(JobRun.outcome, JobRun.error))
    assert run_outcome == "failed" and "AuthError" in error and message in error
    if api_key:
        assert api_key not in error
    # One credential check, in the start that the run begins with: no retry storm, nothing else asked.
    assert served.requests.count("GET", "/api/user") == 1
    assert served.requests.count("GET", "/api/compounds") == 0


async def test_open_in_designhub_url(tmp_path, served, emulator):
    config = config_for(tmp_path, served.url)
    url = await open_in_designhub_url(config, "CCO")
    assert url.startswith(f"{served.url}/new/compound/?cache=")
    assert [u.structures for u in emulator.uploads.values()] == ["CCO"]



# -- never write to learn (issue 14) ----------------------------------------------------------------
async def test_start_and_a_quiet_run_write_nothing(tmp_path, served, emulator):
    """Start and a run with no evidence to write send GETs only: no restart ever writes to a compound."""
    config = config_for(tmp_path, served.url)
    before = {c.id: c.modify_date for c in emulator.compounds}
    for _ in range(2):  # two process starts
        outcome = await run(config)
        assert outcome.exit_code == 0, outcome.failed
    writes = [(m, p) for m, p in served.requests.entries if m != "GET"]
    assert served.requests.entries and writes == []
    assert not emulator.attachments and not emulator.data and not emulator.uploads
    assert {c.id: c.modify_date for c in emulator.compounds} == before


def _answer_404(suffix: str):
    @web.middleware
    async def middleware(request, handler):
        if request.method == "POST" and request.path.endswith(suffix):
            raise web.HTTPNotFound(text="Cannot POST " + request.path)
        return await handler(request)
    return middleware


@pytest.mark.parametrize(("suffix", "feature"), [("/attach", "attach"), ("/data", "data_columns")])
async def test_a_missing_write_endpoint_turns_its_feature_off_on_first_use(tmp_path, campaign, suffix, feature):
    """A Design Hub without attach (or data) answers the first real call 404: said once, never asked again."""
    emulator = DesignHubEmulator(campaign)
    emulator.app.middlewares.append(_answer_404(suffix))
    async with Served(emulator.app) as served:
        config = config_for(tmp_path, served.url, data_columns={"pdb_code": "PDB code"})
        await mirror_upload(config, campaign, 1)
        with capture_logs() as logs:
            async with Mirrord(config) as app:
                first = await app.run_once(horizon=0)
                second = await app.run_once(horizon=0)
        posts = served.requests.count("POST", "/api/compounds/")
    assert first.exit_code == second.exit_code == 0, first.failed + second.failed
    degraded = [e for e in logs if e["event"] == "designhub.degraded"]
    assert len(degraded) == 1 and feature in degraded[0]["message"]
    states = {state for (state,) in await query(config, select(Annotation.state))}
    if feature == "attach":
        assert posts == 1 and states == {"pending"} and not emulator.attachments
    else:  # evidence is attached and tagged; only the columns are off
        assert states == {"attached"} and not emulator.data
        assert served.requests.count("POST", "/api/compounds/") == posts
        assert sum(1 for m, p in served.requests.entries if m == "POST" and p.endswith("/data")) == 1


async def test_a_plain_http_link_goes_into_the_comment(tmp_path, served, emulator, campaign):
    """Design Hub takes https:// links only (seed 004, attach `link`): an http one would fail every attach."""
    config = config_for(tmp_path, served.url)
    config.fragalysis.url = "http://fragalysis.lab"
    await mirror_upload(config, campaign, 1)
    assert (await run(config)).exit_code == 0
    target, exp = campaign.targets[0], campaign.targets[0].experiments[0]
    attachment = emulator.attachments[exp.ligand.designhub_id][0]
    assert attachment.link is None
    assert f"http://fragalysis.lab/viewer/react/preview/target/{target.name}/tas/{target.tas}" in attachment.comment
