"""The deposition job's checks right before the irreversible steps, each tested on its own (issue 23).

A mutation run showed that switching any of these off failed no test: the re-check of the policy
before the submit, the status read before the submit, and the decision pass leaving leased rows
alone. Each test here names the mutant it kills; each counts the requests PDIS received, because the
end state alone does not tell a second submit that PDIS refused from one never sent.
"""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest
from sqlalchemy import select
from structlog.testing import capture_logs

from mirrord.clients.http import HttpClient
from mirrord.clients.pdis import PdisClient
from mirrord.emulators.pdis import PdisEmulator
from mirrord.jobs.base import JobContext, RunResult
from mirrord.jobs.deposit import DepositJob, pack_for_deposit
from mirrord.jobs.deposit_policy import decision_for
from mirrord.store.models import Dataset, Deposition, Event, Experiment, utcnow
from tests.test_deposit_job import (  # noqa: F401 - pytest fixtures
    PASSWORD,
    USER,
    add_datasets,
    campaign,
    config_for,
    depositions,
    emulator,
    last_reason,
    open_store,
    run,
    served,
    step_failures,
)

SUBMIT, DELETE = "/api/v1/submit/", "/api/v1/submissions/"


async def stop_at_uploaded(config, monkeypatch: pytest.MonkeyPatch) -> None:
    """One run whose submitting stage does nothing: the archive is on PDIS, not submitted."""
    with monkeypatch.context() as patch:
        patch.setattr(DepositJob, "_submit", lambda self, dep, result: asyncio.sleep(0))
        await run(config, horizon=0)


def linked_collection(demo):
    return next(c for c in demo.collections if demo.experiment(c.sample)[1].pdb_code)


# -- the policy is asked again right before the submit -------------------------------------------------
@pytest.mark.parametrize("change", ["pdb_code_unlinked", "rival_submitted"])
async def test_a_decision_changed_after_the_upload_stops_the_submit(tmp_path, campaign, emulator, served,  # noqa: F811
                                                                    monkeypatch, change):
    """Kills the mutants of `_submit`'s re-check (`facts, decision = await self._current(dep)` /
    `if not decision.deposit:` negated or its body skipped): between the upload and the submit the
    experiment loses its PDB code, or a rival collection of the crystal is submitted first. No submit
    request may reach PDIS, and the upload is deleted, once."""
    config = config_for(tmp_path, served)
    col = linked_collection(campaign)
    [dataset_id] = await add_datasets(config, campaign, tmp_path / "dls", [col])
    await stop_at_uploaded(config, monkeypatch)
    row = (await depositions(config))[dataset_id]
    assert row.state == "uploaded" and row.upload_token in emulator.held

    store = await open_store(config)
    try:
        if change == "pdb_code_unlinked":
            async with store.write() as session:
                dataset = await session.get(Dataset, dataset_id)
                (await session.get(Experiment, dataset.experiment_id)).pdb_code = None
            reason = f"experiment {col.sample} has no PDB code yet (policy: linked)"
        else:
            target = campaign.targets[0]
            rival = campaign.add_collection(target.tas, col.sample, beamline=target.beamline)
            [rival_id] = await add_datasets(config, campaign, tmp_path / "dls", [rival])
            async with store.write() as session:  # another replica submitted it meanwhile
                session.add(Deposition(dataset_id=rival_id, state="submitted", submitted_at=utcnow(),
                                       pdb_code=row.pdb_code, upload_token="elsewhere"))
            reason = f"superseded by collection {rival.collection_id} for PDB {row.pdb_code}"
    finally:
        await store.close()

    emulator.step_seconds = None  # the rival's made-up token is never read: keep its clock still
    served.requests.clear()
    outcome = await run(config, horizon=0)
    row = (await depositions(config))[dataset_id]
    assert (row.state, row.status_details) == ("not_deposited", reason)
    # In one step, not by a failure and the paths that recover from it, and recorded with its reason.
    assert not outcome.failed and (row.attempts, row.last_error) == (0, None)
    # Kills `_not_deposited(None, ...)` and its other arguments broken in `_submit`: a step that failed
    # would reach the same end by the upload's own re-check a pass later; it must not fail at all.
    assert await step_failures(config) == 0
    assert await last_reason(config, row.id) == f"not deposited: {reason}"
    assert served.requests.count("POST", SUBMIT) == 0 and not emulator.submissions_by_md5
    assert served.requests.count("DELETE", DELETE) == 1 and emulator.held == {}
    assert row.spool_removed_at is not None


# -- the submission's status is read before the submit ---------------------------------------------------
async def test_a_submit_whose_answer_was_lost_is_not_sent_again(tmp_path, campaign, emulator, served):  # noqa: F811
    """Kills the mutants of `_submit`'s postcondition (`sub = await self.client.submission(...)` /
    `if sub.status != pdis.UPLOADED`): PDIS records the submit but the answer is cut off. The retry
    must read the status and stop there; without the read, a second submit goes out and only PDIS's
    409 stops it, which the end state alone would not show. So: exactly one submit request."""
    config = config_for(tmp_path, served)
    [dataset_id] = await add_datasets(config, campaign, tmp_path / "dls", [linked_collection(campaign)])
    emulator.faults.inject(SUBMIT, "truncate")  # the handler runs, its answer is cut in half
    assert (await run(config)).exit_code == 0
    row = (await depositions(config))[dataset_id]
    assert row.state == "published" and emulator.faults.injected["truncate"] == 1
    assert row.attempts == 0  # a published row's retries are cleared; the failure is in its events
    assert served.requests.count("POST", SUBMIT) == 1
    assert emulator.submissions_by_md5 == {row.tar_md5: 1}
    assert served.requests.count("DELETE", DELETE) == 0


# -- the decision pass leaves a leased row to its worker --------------------------------------------------
async def test_the_decision_pass_leaves_a_leased_deposition_alone(tmp_path, campaign, emulator, served):  # noqa: F811
    """Kills the mutants of `_decide`'s `row.lease_until is not None and row.lease_until > now` →
    `continue`: a worker holds one of two queued depositions when both lose their PDB code. The pass
    moves the free one to `not_deposited` and leaves the leased one as it is (its worker re-checks
    the policy itself before anything leaves the host)."""
    config = config_for(tmp_path, served)
    cols = [c for c in campaign.collections if campaign.experiment(c.sample)[1].pdb_code][:2]
    leased_id, free_id = await add_datasets(config, campaign, tmp_path / "dls", cols)
    store = await open_store(config)
    job = DepositJob(JobContext(config=config, store=store, instance="decider"))
    try:
        await job._decide(RunResult())
        until = utcnow() + dt.timedelta(minutes=5)
        async with store.write() as session:
            rows = {d.dataset_id: d for d in (await session.scalars(select(Deposition))).all()}
            assert {rows[leased_id].state, rows[free_id].state} == {"queued"}
            rows[leased_id].lease_owner, rows[leased_id].lease_until = "worker", until
            for dataset_id in (leased_id, free_id):
                dataset = await session.get(Dataset, dataset_id)
                (await session.get(Experiment, dataset.experiment_id)).pdb_code = None
        result = RunResult()
        await job._decide(result)
        async with store.read() as session:
            rows = {d.dataset_id: d for d in (await session.scalars(select(Deposition))).all()}
            moved = (await session.scalars(select(Event.item_id).where(Event.to_state == "not_deposited"))).all()
    finally:
        await job.close()
        await store.close()
    decided = {key: n for key, n in result.counters.items() if key.startswith("decided_")}
    assert rows[free_id].state == "not_deposited" and decided == {"decided_not_deposited": 1}
    leased = rows[leased_id]
    assert (leased.state, leased.lease_owner) == ("queued", "worker")
    assert leased.lease_until.replace(microsecond=0) == until.replace(microsecond=0)
    assert leased.pdb_code == campaign.experiment(cols[0].sample)[1].pdb_code.upper()  # not even the metadata
    assert list(moved) == [str(rows[free_id].id)]
    assert served.requests.entries == []  # a decision pass under the linked policy asks PDIS nothing



# -- an adopted upload whose verdict was never heard is deleted and sent again ------------------------------
async def test_an_adopted_upload_is_deleted_and_recorded_as_to_be_uploaded_again(  # noqa: F811
        tmp_path, campaign, emulator, served, monkeypatch):  # noqa: F811
    """Kills the mutants of `_upload_again`: an earlier upload whose answer was lost is adopted (409),
    but PDIS's verdict on it was never heard, so it is deleted and the row goes back to `packed` with
    everything of that upload forgotten, in one recorded step (no failure, no retry). The next upload
    is held back here to look at that step alone."""
    config = config_for(tmp_path, served)
    [dataset_id] = await add_datasets(config, campaign, tmp_path / "dls", campaign.collections[:1])
    store = await open_store(config)
    async with store.read() as session:
        found, _decision = await decision_for(session, dataset_id, config.pdis)
    packed = pack_for_deposit(found, tmp_path / "earlier.tar.zst", level=config.pdis.zstd_level)
    async with PdisClient(PdisEmulator.api_url(served.url), username=USER, password=PASSWORD,
                          token_file=tmp_path / "t") as client:
        earlier = await client.upload(packed.path)
    uploads = []
    original = DepositJob._upload

    async def first_upload_only(self, dep, result):
        uploads.append(dep.state)
        if len(uploads) == 1:
            await original(self, dep, result)

    monkeypatch.setattr(DepositJob, "_upload", first_upload_only)
    outcome = await run(config, horizon=0)
    row = (await depositions(config))[dataset_id]
    async with store.read() as session:
        reasons = (await session.scalars(select(Event.reason).where(Event.item_id == str(row.id))
                                         .order_by(Event.id))).all()
    await store.close()
    assert outcome.exit_code == 0 and not outcome.failed
    assert (row.state, row.attempts, row.last_error) == ("packed", 0, None)
    assert (row.upload_token, row.server_md5, row.server_size, row.pdis_status, row.detected_pdb) == (None,) * 5
    assert reasons[-1] == ("PDIS's upload answer was lost: deleted the upload and uploading again to hear "
                           "its verdict")
    assert served.requests.count("DELETE", DELETE) == 1 and earlier.token not in emulator.held
    assert served.requests.count("POST", SUBMIT) == 0 and uploads[1:] == ["packed"]


async def test_a_delete_that_fails_is_logged_with_its_error(tmp_path, campaign, emulator, served,  # noqa: F811
                                                           monkeypatch):
    """Kills the mutants of `_delete_remote`'s warning: a damaged upload is never submitted, and when
    PDIS will not delete it either, the operator is told why (the upload waits on PDIS)."""
    monkeypatch.setattr(HttpClient, "_wait", lambda self, state: 0.001)  # the client's retries, not their pauses
    config = config_for(tmp_path, served)
    [dataset_id] = await add_datasets(config, campaign, tmp_path / "dls", campaign.collections[:1])
    emulator.damage_next_uploads = 1
    served.faults.inject(DELETE, *["503"] * 10)  # more than the client's retries
    with capture_logs() as logs:
        await run(config, horizon=0)
    row = (await depositions(config))[dataset_id]
    assert row.state == "needs_attention" and row.status_details.startswith("integrity")
    failed = [entry for entry in logs if entry["event"] == "pdis.delete_failed"]
    assert len(failed) == 1 and "503" in failed[0]["error"] and failed[0]["log_level"] == "warning"
    assert served.requests.count("POST", SUBMIT) == 0


async def test_an_upload_gone_from_pdis_before_the_submit_is_uploaded_again(tmp_path, campaign, emulator,  # noqa: F811
                                                                            served, monkeypatch):  # noqa: F811
    """Kills the mutants of `_submit`'s NotFound branch: the upload vanished from PDIS (deleted by a
    person) between the upload and the submit. The row goes back to `packed` in one recorded step,
    everything of the gone upload forgotten; then the archive is uploaded again and submitted once."""
    config = config_for(tmp_path, served)
    [dataset_id] = await add_datasets(config, campaign, tmp_path / "dls", [linked_collection(campaign)])
    await stop_at_uploaded(config, monkeypatch)
    gone = (await depositions(config))[dataset_id]
    async with PdisClient(PdisEmulator.api_url(served.url), username=USER, password=PASSWORD,
                          token_file=tmp_path / "t") as client:
        await client.delete(gone.upload_token)
    with monkeypatch.context() as patch:
        patch.setattr(DepositJob, "_upload", lambda self, dep, result: asyncio.sleep(0))
        outcome = await run(config, horizon=0)
    row = (await depositions(config))[dataset_id]
    assert not outcome.failed and (row.state, row.attempts) == ("packed", 0)
    assert (row.upload_token, row.server_md5, row.server_size, row.pdis_status) == (None,) * 4
    assert await last_reason(config, row.id) == "the upload is no longer on PDIS: uploading again"
    assert (await run(config)).exit_code == 0
    row = (await depositions(config))[dataset_id]
    assert row.state == "published" and row.upload_token != gone.upload_token
    assert served.requests.count("POST", SUBMIT) == 1 and served.requests.count("POST", "/api/v1/upload/") == 2


async def test_a_pdb_id_detected_in_data_we_would_send_as_other(tmp_path, campaign, emulator, served):  # noqa: F811
    """Kills the mutants of `_pdis_says_stop`'s wording for a submission without a PDB code: PDIS finds
    one in the data (here in the sample's name), which needs a person, not an "other" dataset."""
    target = campaign.targets[0]
    col = campaign.add_collection(target.tas, "5XYZ-soak", beamline=target.beamline)
    config = config_for(tmp_path, served, deposit="all", authors="Smith J.")
    [dataset_id] = await add_datasets(config, campaign, tmp_path / "dls", [col], link=False)
    outcome = await run(config, horizon=0)
    row = (await depositions(config))[dataset_id]
    assert (row.state, row.detected_pdb, row.pdis_status) == ("needs_attention", "5XYZ", "deleted")
    assert row.status_details == ("PDIS detected PDB 5XYZ in the data, we would submit it as other: "
                                  "not submitted, upload withdrawn")
    assert outcome.attention and served.requests.count("POST", SUBMIT) == 0
