"""The deposition job's steps one at a time, each test written for mutants that lived (issue 23).

A mutation run of `mirrord/jobs/deposit.py` found steps whose details no test looked at, because the
job recovers by another path: the spool sweep removes an archive the step forgot, a later pass repeats
a step that left the row where it was. Each test says which mutants it was written for, and looks at the step's
own effect (a row's columns, a file, a counter, the requests PDIS received), not only the end state.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import select, update
from structlog.testing import capture_logs

from mirrord import metrics
from mirrord.clients.errors import UpstreamError
from mirrord.clients.pdis import PdisClient, SubmitMetadata
from mirrord.emulators.pdis import PdisEmulator
from mirrord.jobs.base import JobContext, LeaseLost, NoNotifier, NoProgress, RunResult
from mirrord.jobs.deposit import DepositJob, pack_for_deposit, upload_filename
from mirrord.jobs.deposit_policy import Decision, decision_for
from mirrord.jobs.person import Stop
from mirrord.store.models import Deposition, Event, utcnow
from tests.test_deposit_job import (  # noqa: F401 - pytest fixtures
    PASSWORD,
    USER,
    add_datasets,
    campaign,
    config_for,
    counted,
    depositions,
    emulator,
    last_reason,
    open_store,
    run,
    served,
    submits,
    uploads,
)
from tests.test_deposit_rechecks import linked_collection, stop_at_uploaded


async def decided(config, dataset_id: int):
    """The policy's facts and decision for a dataset, as the job sees them."""
    store = await open_store(config)
    try:
        async with store.read() as session:
            return await decision_for(session, dataset_id, config.pdis)
    finally:
        await store.close()


@contextlib.asynccontextmanager
async def deposit_job(config, *, instance: str = "test", notified: Notified | None = None,
                      progress: Progressed | None = None) -> AsyncIterator[DepositJob]:
    """The deposit job on the test's store, not started (no pass, no sweep); job and store closed after."""
    store = await open_store(config)
    job = DepositJob(JobContext(config=config, store=store, instance=instance, notifier=notified or NoNotifier(),
                                progress=progress or NoProgress()))
    try:
        yield job
    finally:
        await job.close()
        await store.close()


async def row_of(store, deposition_id: int) -> Deposition:
    """A deposition as a worker's claim hands it to a step."""
    async with store.read() as session:
        return await session.get(Deposition, deposition_id)


async def decide_now(config) -> None:
    """The job's decision pass alone: datasets get their depositions, nothing is packed."""
    async with deposit_job(config) as job:
        await job._decide(RunResult())


async def queued(config, campaign, tmp_path: Path) -> tuple[int, int]:  # noqa: F811
    """A dataset with a PDB code, decided: (its dataset id, its queued deposition's id)."""
    [dataset_id] = await add_datasets(config, campaign, tmp_path / "dls", [linked_collection(campaign)])
    await decide_now(config)
    row = (await depositions(config))[dataset_id]
    assert row.state == "queued"
    config.spool_dir.mkdir(parents=True, exist_ok=True)  # as the job's start leaves it
    return dataset_id, row.id


def pdis_client(server, tmp_path: Path) -> PdisClient:
    """A client of the test's PDIS account, as another replica or a person would use it."""
    return PdisClient(PdisEmulator.api_url(server.url), username=USER, password=PASSWORD, token_file=tmp_path / "t")


async def stop_at_packed(config, monkeypatch) -> None:
    """One run whose upload stage does nothing: the archive waits in the spool, `packed`."""
    with monkeypatch.context() as patch:
        patch.setattr(DepositJob, "_upload", lambda self, dep, result: asyncio.sleep(0))
        await run(config, horizon=0)


async def set_columns(config, deposition_id: int, **values) -> None:
    store = await open_store(config)
    try:
        async with store.write() as session:
            await session.execute(update(Deposition).where(Deposition.id == deposition_id).values(**values))
    finally:
        await store.close()


async def events_of(config, deposition_id: int) -> list[tuple[str, str]]:
    """A deposition's moves, in order: (the state it moved to, why)."""
    store = await open_store(config)
    try:
        async with store.read() as session:
            return [tuple(row) for row in (await session.execute(select(Event.to_state, Event.reason).where(
                Event.item_type == "deposition", Event.item_id == str(deposition_id)).order_by(Event.id))).all()]
    finally:
        await store.close()


async def states_of(config, deposition_id: int) -> list[str]:
    """The states a deposition moved through, in order."""
    return [state for state, _reason in await events_of(config, deposition_id)]


async def reasons_into(config, deposition_id: int, state: str) -> list[str]:
    """Why the deposition moved into `state`, each time it did."""
    return [reason for to_state, reason in await events_of(config, deposition_id) if to_state == state]


class Notified(NoNotifier):
    """The notifications a step queued, as (kind, item, state, detail)."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str, str, str]] = []

    def item(self, kind: str, item_id: str, state: str, detail: str) -> None:
        self.items.append((kind, item_id, state, detail))


def sample(name: str, **labels: str) -> float:
    """A sample of mirrord's /metrics registry (0 before the first)."""
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


class Progressed(NoProgress):
    """The progress a step showed: its tasks, the units each advanced by, and the tasks it closed."""

    def __init__(self) -> None:
        self.tasks: list[tuple[str, int | None]] = []
        self.advanced: list[int] = []
        self.closed: list[str] = []

    def task(self, description: str, total: int | None):
        self.tasks.append((description, total))
        return self.advanced.append

    def done(self, description: str) -> None:
        self.closed.append(description)


async def one_step(config, step: str, deposition_id: int, decision: Decision | None = None, *,
                   stop: Stop | None = None, notified: Notified | None = None,
                   progress: Progressed | None = None, repeat: int = 1) -> RunResult:
    """Run one of the job's item steps on one row, outside any pass (no sweep, no status poll after it).
    With `decision`, the policy answers that instead of deciding; with `stop`, a person's decisions do."""
    result = RunResult()
    async with deposit_job(config, notified=notified, progress=progress) as job:
        if decision is not None:
            async def current(dep):
                async with job.store.read() as session:
                    found, _ = await decision_for(session, dep.dataset_id, config.pdis)
                return found, decision
            job._current = current
        if stop is not None:
            async def person(dep, facts, decision, step):
                return stop
            job._person = person
        for _ in range(repeat):  # the same job again: what it remembers between runs
            await getattr(job, step)(await row_of(job.store, deposition_id), result)
    return result


# -- a decision against depositing, taken at the upload ----------------------------------------------------
@pytest.mark.parametrize("archive", ["in the spool", "gone already"])
async def test_a_packed_archive_decided_against_is_removed_at_once(tmp_path, campaign, emulator, served,  # noqa: F811
                                                                   monkeypatch, archive):
    """Kills `_not_deposited`'s `removed = None` and its `status_details=` mutants: the step itself removes
    the archive and records when (the spool sweep would only do it on a later pass), with the policy's
    reason as the row's details and the decision's summary as the event's reason. An archive removed
    already (by hand, or by another replica's sweep) is no failure: kills `_remove_spool_file`'s
    `missing_ok` mutants."""
    config = config_for(tmp_path, served)
    [dataset_id] = await add_datasets(config, campaign, tmp_path / "dls", [linked_collection(campaign)])
    await stop_at_packed(config, monkeypatch)
    row = (await depositions(config))[dataset_id]
    assert row.state == "packed" and Path(row.spool_path).exists()
    if archive == "gone already":
        Path(row.spool_path).unlink()
    before = utcnow()
    result = await one_step(config, "_upload", row.id, Decision(False, "proposal lb1 is in exclude_proposals"))
    after = (await depositions(config))[dataset_id]
    assert (after.state, after.status_details) == ("not_deposited", "proposal lb1 is in exclude_proposals")
    assert not Path(row.spool_path).exists() and before <= after.spool_removed_at <= utcnow()
    assert await last_reason(config, row.id) == "not deposited: proposal lb1 is in exclude_proposals"
    assert result.failures == [] and uploads(served) == 0


async def test_a_decision_a_person_must_settle_keeps_the_archive(tmp_path, campaign, emulator, served,  # noqa: F811
                                                                  monkeypatch):
    """Kills `_not_deposited`'s attention branch mutants (`self._attention(None, ...)`, `(dep.id, None)`,
    arguments dropped): a decision that needs a person (a PDB code file that disagrees with Fragalysis)
    moves this row to `needs_attention` with the decision's words, and keeps its archive for when the
    person settles it."""
    config = config_for(tmp_path, served)
    [dataset_id] = await add_datasets(config, campaign, tmp_path / "dls", [linked_collection(campaign)])
    await stop_at_packed(config, monkeypatch)
    row = (await depositions(config))[dataset_id]
    why = "Fragalysis gives experiment X PDB code 5ABC, the pdb_codes_file gives 6DEF: correct the file"
    notified = Notified()
    with capture_logs() as logs:
        result = await one_step(config, "_upload", row.id, Decision(False, why, attention=True), notified=notified)
    after = (await depositions(config))[dataset_id]
    assert (after.state, after.status_details, after.spool_removed_at) == ("needs_attention", why, None)
    assert Path(row.spool_path).exists() and result.failures == []
    assert await last_reason(config, row.id) == why
    # Kills `_attention`'s log and notification mutants: the operator is told which item, and why.
    told = [(e["log_level"], e.get("deposition"), e.get("detail")) for e in logs
            if e["event"] == "deposition.needs_attention"]
    assert told == [("warning", row.id, why)]
    assert notified.items == [("deposition", str(row.id), "needs_attention", why)]


# -- adopting what PDIS already holds -----------------------------------------------------------------------
async def test_an_archive_pdis_holds_as_another_deposition_s_is_not_adopted(tmp_path, campaign, emulator,  # noqa: F811
                                                                            served, monkeypatch):  # noqa: F811
    """Kills `_adopt`'s owner check mutants (`owner = None`, the query's conditions dropped or inverted,
    the attention's arguments): after an interrupted upload, PDIS holds this archive (same md5) as the
    submission another deposition owns. Adopting it would give two rows one submission; a person looks."""
    config = config_for(tmp_path, served)
    cols = [c for c in campaign.collections if campaign.experiment(c.sample)[1].pdb_code][:2]
    first_id, second_id = await add_datasets(config, campaign, tmp_path / "dls", cols)
    await stop_at_uploaded(config, monkeypatch)
    rows = await depositions(config)
    first, second = rows[first_id], rows[second_id]
    assert {first.state, second.state} == {"uploaded"}
    # The second row's upload was interrupted, and its archive's md5 is the first one's.
    await set_columns(config, second.id, state="uploading", tar_md5=first.tar_md5, upload_token=None)
    result = await one_step(config, "_upload", second.id)
    after = (await depositions(config))[second_id]
    assert (after.state, after.status_details) == (
        "needs_attention", f"PDIS holds this archive as deposition {first.id}'s submission")
    assert after.upload_token is None and result.counters.get("adopted", 0) == 0
    assert (await depositions(config))[first_id].upload_token == first.upload_token
    assert uploads(served) == 2 and submits(served) == 0  # the check is a lookup, nothing sent


@pytest.mark.parametrize("status", ["submitted", "published"])
async def test_an_upload_submitted_before_its_answer_was_lost_is_adopted_where_it_is(  # noqa: F811
        tmp_path, campaign, emulator, served, status):  # noqa: F811
    """Kills `_adopt`'s `result.count("adopted")`, `server_md5=sub.md5hash`, `_record_status(..., None)`
    and its owner query without the token condition: an earlier attempt uploaded and submitted this
    archive but mirrord heard neither answer. The upload answers 409; the submission is adopted where
    it is (submitted, or published already), with its token and md5, and never submitted again. Another
    deposition on the store (with an upload of its own) is not taken for the archive's owner."""
    config = config_for(tmp_path, served)
    col, other = [c for c in campaign.collections if campaign.experiment(c.sample)[1].pdb_code][:2]
    dataset_id, other_id = await add_datasets(config, campaign, tmp_path / "dls", [col, other])
    found, decision = await decided(config, dataset_id)
    packed = pack_for_deposit(found, tmp_path / "earlier.tar.zst", level=config.pdis.zstd_level)
    emulator.step_seconds = None  # statuses move only when the test says
    async with pdis_client(served, tmp_path) as client:
        earlier = await client.upload(packed.path)
        await client.submit(earlier.token, SubmitMetadata(pdb_code=decision.pdb_code))
    if status == "published":
        emulator.advance(3)
        assert emulator.status_of(earlier.token) == "published"
    # A submitted row's status is due every poll_interval (20 ms): without a bound `once` keeps asking.
    outcome = await run(config, horizon=0, max_passes=8)
    rows = await depositions(config)
    row = rows[dataset_id]
    assert (row.state, row.upload_token, row.server_md5) == (status, earlier.token, packed.tar_md5)
    assert row.pdis_status == status and await counted(config, "adopted") == 1
    assert await last_reason(config, row.id) == "PDIS already held this archive (409): adopted"
    assert (await counted(config, "published") == 1) == (status == "published")
    assert emulator.submissions_by_md5[packed.tar_md5] == 1 and not outcome.failed
    assert rows[other_id].state == "submitted" and rows[other_id].upload_token != earlier.token


# -- retries are later, not now --------------------------------------------------------------------------------
async def test_a_dataset_that_changed_while_packed_is_packed_again_after_the_retry_delay(  # noqa: F811
        tmp_path, campaign, emulator, served, monkeypatch):  # noqa: F811
    """Kills `_retry_later`'s `utcnow() - timedelta(...)`: a dataset still being written is packed again
    `retry_base` later, not at once (which would re-read a growing dataset in a loop)."""
    from mirrord.jobs import deposit

    config = config_for(tmp_path, served)
    config.daemon.retry_base = 600.0
    [dataset_id] = await add_datasets(config, campaign, tmp_path / "dls", campaign.collections[:1])

    def changed(*args, **kwargs):
        raise deposit.DatasetChanged("x.cbf", "grew while being read")

    monkeypatch.setattr(deposit, "pack_for_deposit", changed)
    before = utcnow()
    await run(config, horizon=0)
    row = (await depositions(config))[dataset_id]
    assert row.state == "queued" and row.attempts == 0
    assert before + dt.timedelta(seconds=590) <= row.next_attempt_at <= utcnow() + dt.timedelta(seconds=610)


# -- forgetting an upload whose verdict was not heard ---------------------------------------------------------
async def test_a_withdrawal_without_recorded_words_still_says_why(tmp_path, campaign, emulator, served,  # noqa: F811
                                                                  monkeypatch):
    """Kills `_withdraw`'s default reason mutants: a row left `withdrawing` without details (by a version
    that did not record them) is withdrawn, and its event says so in the words "upload withdrawn"."""
    config = config_for(tmp_path, served)
    [dataset_id] = await add_datasets(config, campaign, tmp_path / "dls", [linked_collection(campaign)])
    await stop_at_uploaded(config, monkeypatch)
    row = (await depositions(config))[dataset_id]
    await set_columns(config, row.id, state="withdrawing", status_details=None, pdb_exists=True,
                      detected_pdb=row.pdb_code)
    result = await one_step(config, "_submit_or_withdraw", row.id)
    after = (await depositions(config))[dataset_id]
    assert (after.state, after.pdis_status) == ("already_in_pdis", "deleted")
    assert await last_reason(config, row.id) == "upload withdrawn" and result.counters["withdrawn"] == 1
    assert row.upload_token not in emulator.held and submits(served) == 0
    assert (await run(config, horizon=0)).exit_code == 0 and submits(served) == 0



# -- a person's decisions stop the deposition ------------------------------------------------------------------
async def test_a_stop_before_the_submit_deletes_the_upload_and_forgets_it(tmp_path, campaign, emulator,  # noqa: F811
                                                                          served, monkeypatch):  # noqa: F811
    """Kills `_stop`'s mutants for an uploaded row (`_delete_upload(None)`, the forgotten columns left
    out or misnamed, the event's reason, the awaiting-approval log): an approval that lapsed after the
    upload stops the submit. The upload is deleted from PDIS (it must not wait there for metadata), the
    row forgets it entirely and waits for a person, and the archive stays for when they approve."""
    config = config_for(tmp_path, served)
    [dataset_id] = await add_datasets(config, campaign, tmp_path / "dls", [linked_collection(campaign)])
    await stop_at_uploaded(config, monkeypatch)
    row = (await depositions(config))[dataset_id]
    assert row.upload_token in emulator.held and row.server_md5 and row.pdb_exists is not None
    why = "the approval lapsed: what was approved changed"
    served.requests.clear()
    with capture_logs() as logs:
        result = await one_step(config, "_submit_or_withdraw", row.id, stop=Stop("awaiting_approval", why))
    after = (await depositions(config))[dataset_id]
    assert (after.state, after.status_details) == ("awaiting_approval", why)
    forgotten = (after.upload_token, after.server_md5, after.server_size, after.pdis_status, after.detected_pdb,
                 after.pdb_exists)
    assert forgotten == (None,) * 6
    assert served.requests.count("DELETE", f"/api/v1/submissions/{row.upload_token}/") == 1
    assert row.upload_token not in emulator.held and submits(served) == 0
    assert Path(row.spool_path).exists() and after.spool_removed_at is None
    assert await last_reason(config, row.id) == why and result.failures == []
    assert [e.get("deposition") for e in logs if e["event"] == "deposition.awaiting_approval"] == [row.id]


async def test_a_stop_before_the_upload_deletes_nothing_and_drops_the_archive_it_rejects(  # noqa: F811
        tmp_path, campaign, emulator, served, monkeypatch):  # noqa: F811
    """Kills `_stop`'s `uploaded=True` default and its not-deposited branch mutants: the files a person
    accepted changed, so the packed archive is not deposited. Nothing was uploaded, so nothing is
    deleted on PDIS; the archive is removed at once and when is recorded; no approval is awaited."""
    config = config_for(tmp_path, served)
    [dataset_id] = await add_datasets(config, campaign, tmp_path / "dls", [linked_collection(campaign)])
    await stop_at_packed(config, monkeypatch)
    row = (await depositions(config))[dataset_id]
    why = f"dataset {dataset_id} needs attention: the files changed since they were accepted"
    served.requests.clear()
    before = utcnow()
    with capture_logs() as logs:
        await one_step(config, "_upload", row.id, stop=Stop("not_deposited", why))
    after = (await depositions(config))[dataset_id]
    assert (after.state, after.status_details) == ("not_deposited", why)
    assert not Path(row.spool_path).exists() and before <= after.spool_removed_at <= utcnow()
    assert served.requests.entries == []  # no delete of an upload that never was, no upload
    assert not [e for e in logs if e["event"] == "deposition.awaiting_approval"]


# -- the metadata of a dataset without a PDB code ----------------------------------------------------------------
async def test_the_upload_of_a_dataset_without_a_pdb_code_is_named_by_its_archive(tmp_path, campaign,  # noqa: F811
                                                                                     emulator, served):  # noqa: F811
    """Kills `upload_filename`'s `if decision.pdb_code or True` ("None_" before the name): PDIS shows the
    upload under the name sent; with a PDB code it leads, without one the archive's root alone."""
    config = config_for(tmp_path, served)
    [dataset_id] = await add_datasets(config, campaign, tmp_path / "dls", [linked_collection(campaign)])
    found, decision = await decided(config, dataset_id)
    other = Decision(True, "deposit = all", "other", None, title="A title long enough", authors="Smith J.")
    assert upload_filename(found, decision) == f"{decision.pdb_code}_{found.archive_root}.tar.zst"
    assert upload_filename(found, other) == f"{found.archive_root}.tar.zst"


async def test_the_decision_records_the_equipment_of_a_dataset_without_a_pdb_code(tmp_path, campaign, emulator,  # noqa: F811
                                                                                   served):  # noqa: F811
    """Kills `_decision_values`' equipment mutants (`synchrotron_id=None`, `equipment_other=None`, either
    left out): the decision pass records PDIS's ids for a beamline PDIS lists, and free text for one it
    does not, on the row where `plan` and `show` read them (the submit would only resolve them again)."""
    target = campaign.targets[0]
    cols = [campaign.add_collection(target.tas, f"loose-{bl}", beamline=bl) for bl in ("i04-1", "i99")]
    config = config_for(tmp_path, served, deposit="all", authors="Smith J.")
    mapped, fallback = await add_datasets(config, campaign, tmp_path / "dls", cols, link=False)
    await decide_now(config)
    async with pdis_client(served, tmp_path) as client:
        [diamond] = [s for s in await client.equipment() if s.named("Diamond")]
    rows = await depositions(config)
    equipment = {i: (rows[i].synchrotron_id, rows[i].beamline_id, rows[i].equipment_other) for i in (mapped, fallback)}
    assert equipment == {mapped: (diamond.id, diamond.beamline("i04-1").id, None), fallback: (None, None, "Diamond i99")}


@pytest.mark.parametrize(("recorded", "beamline", "expected"), [
    ("nothing", "i04-1", (12, 32, None)),  # PDIS's ids for Diamond I04-1
    ("nothing", "i99", (None, None, "Diamond i99")),  # a beamline PDIS does not list: the fallback text
    ("an override", "i04-1", (25, 42, None)),
    ("a fallback text", "i04-1", (None, None, "Diamond i04-1")),
])
async def test_the_equipment_sent_is_the_recorded_one_or_resolved_at_the_submit(  # noqa: F811
        tmp_path, campaign, emulator, served, monkeypatch, recorded, beamline, expected):  # noqa: F811
    """Kills `_metadata`'s equipment mutants: a deposition decided before its equipment was needed (none
    recorded) has it resolved from PDIS's list at the submit; one with equipment recorded (an override's
    ids, or the fallback text) is submitted with exactly that, without asking PDIS for its list. Either
    way the submission is of type "other", and the submit records on the row what it sent (`_submit`'s
    SUBMITTED columns mutants: the row's title, authors, type and equipment are blanked first)."""
    target = campaign.targets[0]
    col = campaign.add_collection(target.tas, f"loose-{beamline}", beamline=beamline)
    config = config_for(tmp_path, served, deposit="all", authors="Smith J.")
    [dataset_id] = await add_datasets(config, campaign, tmp_path / "dls", [col], link=False)
    await stop_at_uploaded(config, monkeypatch)
    row = (await depositions(config))[dataset_id]
    async with pdis_client(served, tmp_path) as client:
        assert (await client.submission(row.upload_token)).dataset_type == "other"  # uploaded as such
    values = {"nothing": dict(synchrotron_id=None, beamline_id=None, equipment_other=None),
              "an override": dict(synchrotron_id=25, beamline_id=42, equipment_other=None),
              "a fallback text": dict(synchrotron_id=None, beamline_id=None, equipment_other="Diamond i04-1")}
    await set_columns(config, row.id, title=None, authors=None, dataset_type="pdb", **values[recorded])
    served.requests.clear()
    before = utcnow()
    result = await one_step(config, "_submit_or_withdraw", row.id)
    after = (await depositions(config))[dataset_id]
    assert (after.state, after.dataset_type) == ("submitted", "other") and result.counters["submitted"] == 1
    assert (after.title, after.authors, after.pdis_status) == (row.title, "Smith J.", "submitted")
    assert row.title.startswith(f"Raw diffraction data for loose-{beamline}") and after.submitted_at >= before
    assert await last_reason(config, row.id) == "submitted as other"
    assert after.next_attempt_at >= before  # its status is read on the poll's schedule, not at once
    async with pdis_client(served, tmp_path) as client:
        sub = await client.submission(row.upload_token)
    sent = (sub.synchrotron and sub.synchrotron.id, sub.beamline and sub.beamline.id, sub.equipment_other)
    assert sent == expected == (after.synchrotron_id, after.beamline_id, after.equipment_other)
    assert served.requests.count("GET", "/api/v1/equipment/") == (recorded == "nothing")


# -- PDIS's verdict on an adopted upload -----------------------------------------------------------------------------
async def test_an_adopted_upload_is_judged_by_the_id_pdis_detected_in_it(tmp_path, campaign, emulator,  # noqa: F811
                                                                         served):  # noqa: F811
    """Kills `_submit`'s `found = (dep.detected_pdb if dep.pdb_exists is not None else sub.pdbid)` mutants:
    an adopted upload (its answer lost, so no verdict recorded) allowed as an additional dataset is
    judged by the PDB id PDIS's submission record says it detected. Here PDIS found 5XYZ in a dataset we
    would send as "other": withdrawn for a person, never submitted."""
    target = campaign.targets[0]
    col = campaign.add_collection(target.tas, "5XYZ-soak", beamline=target.beamline)
    config = config_for(tmp_path, served, deposit="all", authors="Smith J.", allow_additional_datasets=True)
    [dataset_id] = await add_datasets(config, campaign, tmp_path / "dls", [col], link=False)
    found, decision = await decided(config, dataset_id)
    packed = pack_for_deposit(found, tmp_path / "earlier.tar.zst", level=config.pdis.zstd_level)
    async with pdis_client(served, tmp_path) as client:
        earlier = await client.upload(packed.path, dataset_type="other",
                                      filename=upload_filename(found, decision))
    assert earlier.pdbid == "5XYZ"
    outcome = await run(config, horizon=0)
    row = (await depositions(config))[dataset_id]
    assert (row.state, row.detected_pdb, row.pdis_status) == ("needs_attention", "5XYZ", "deleted")
    assert row.status_details == ("PDIS detected PDB 5XYZ in the data, we would submit it as other: "
                                  "not submitted, upload withdrawn")
    assert outcome.attention and submits(served) == 0 and earlier.token not in emulator.held
    # Straight there, the detected id recorded on the way (`_submit`'s `detected_pdb=found` mutant went
    # by `already_in_pdis` and a second upload first).
    assert (await states_of(config, row.id))[-3:] == ["uploaded", "withdrawing", "needs_attention"]
    assert uploads(served) == 2  # ours (answered 409) and the earlier one


async def test_a_withdrawal_is_recorded_first_and_its_row_stays_leased(tmp_path, campaign, emulator, served,  # noqa: F811
                                                                       monkeypatch):
    """Kills `_submit`'s mutants of the `withdrawing` step (its state or reason left out, `release=None`):
    PDIS says it holds this structure already. Before the upload is deleted, the row is `withdrawing` with
    the reason, in an event of its own (a restart resumes the delete from there), and still leased to
    this worker (a replica must not take the row while its upload is being deleted)."""
    col = linked_collection(campaign)
    code = campaign.experiment(col.sample)[1].pdb_code.upper()
    emulator.existing_pdb_ids.add(code)
    config = config_for(tmp_path, served)
    [dataset_id] = await add_datasets(config, campaign, tmp_path / "dls", [col])
    await stop_at_uploaded(config, monkeypatch)
    row = (await depositions(config))[dataset_id]
    assert (row.state, row.pdb_exists) == ("uploaded", True)
    # The row's PDB code blanked: the withdrawal records the one it withdrew for (a mutant that did not
    # would take the detected id for another crystal's).
    await set_columns(config, row.id, lease_owner="test", lease_until=utcnow() + dt.timedelta(minutes=5),
                      pdb_code=None)
    seen = []
    delete = DepositJob._delete_upload

    async def delete_and_look(self, token):
        async with self.store.read() as session:
            now = await session.get(Deposition, row.id)
            seen.append((now.state, now.lease_owner, now.status_details))
        await delete(self, token)

    monkeypatch.setattr(DepositJob, "_delete_upload", delete_and_look)
    await one_step(config, "_submit_or_withdraw", row.id)
    why = f"PDIS already holds a dataset for PDB {code}: not submitted, upload withdrawn"
    assert seen == [("withdrawing", "test", why)]
    assert (await states_of(config, row.id))[-2:] == ["withdrawing", "already_in_pdis"]
    assert await reasons_into(config, row.id, "withdrawing") == [why] and submits(served) == 0
    assert (await depositions(config))[dataset_id].pdb_code == code


# -- the submit's own refusals -----------------------------------------------------------------------------------
@pytest.mark.parametrize("status", ["submitted", "published"])
async def test_a_submit_another_replica_sent_first_is_followed_not_repeated(tmp_path, campaign, emulator,  # noqa: F811
                                                                            served, monkeypatch, status):  # noqa: F811
    """Kills the mutants of `_submit`'s Conflict branch (the submission read again, its status recorded,
    the run's counters passed on): between our status read and our submit, another replica submitted
    the same upload. PDIS answers our submit 409; the row follows the submission where it is (submitted,
    or published already), without a failure and without another submit."""
    config = config_for(tmp_path, served)
    [dataset_id] = await add_datasets(config, campaign, tmp_path / "dls", [linked_collection(campaign)])
    await stop_at_uploaded(config, monkeypatch)
    row = (await depositions(config))[dataset_id]
    emulator.step_seconds = None
    real_submit = PdisClient.submit

    async def another_replica_first(self, token, metadata):
        await real_submit(self, token, metadata)  # the other replica's, a moment before ours
        if status == "published":
            emulator.advance(3)
        return await real_submit(self, token, metadata)

    monkeypatch.setattr(PdisClient, "submit", another_replica_first)
    result = await one_step(config, "_submit_or_withdraw", row.id)
    after = (await depositions(config))[dataset_id]
    assert (after.state, after.pdis_status, after.attempts) == (status, status, 0)
    assert await last_reason(config, row.id) == f"PDIS says already processed ({status})"
    assert result.failures == [] and "submitted" not in result.counters
    assert result.counters["published"] == (status == "published")
    assert submits(served) == 2 and emulator.submissions_by_md5 == {row.tar_md5: 1}


async def test_a_submit_pdis_refuses_needs_a_person(tmp_path, campaign, emulator, served,  # noqa: F811
                                                    monkeypatch):
    """Kills the mutants of `_submit`'s BadRequest branch: PDIS refuses the metadata (400). Sending it
    again would not help, so the row needs a person, with PDIS's words, and is not retried."""
    config = config_for(tmp_path, served)
    [dataset_id] = await add_datasets(config, campaign, tmp_path / "dls", [linked_collection(campaign)])
    await stop_at_uploaded(config, monkeypatch)
    row = (await depositions(config))[dataset_id]
    emulator.fail_next("/submit/", 400)
    result = await one_step(config, "_submit_or_withdraw", row.id)
    after = (await depositions(config))[dataset_id]
    assert after.state == "needs_attention" and after.attempts == 0
    assert after.status_details.startswith("submit refused: ") and "Injected failure (HTTP 400)" in after.status_details
    assert result.failures == [] and submits(served) == 1 and not emulator.submissions_by_md5


async def test_a_submit_records_the_pdb_code_it_was_sent_as(tmp_path, campaign, emulator, served,  # noqa: F811
                                                            monkeypatch):
    """Kills `_submit`'s mutants that leave the PDB code and type out of the SUBMITTED record: the row
    says what PDIS was told, whatever it held before."""
    col = linked_collection(campaign)
    code = campaign.experiment(col.sample)[1].pdb_code.upper()
    config = config_for(tmp_path, served)
    [dataset_id] = await add_datasets(config, campaign, tmp_path / "dls", [col])
    await stop_at_uploaded(config, monkeypatch)
    row = (await depositions(config))[dataset_id]
    await set_columns(config, row.id, pdb_code=None, dataset_type="other")
    await one_step(config, "_submit_or_withdraw", row.id)
    after = (await depositions(config))[dataset_id]
    assert (after.state, after.pdb_code, after.dataset_type) == ("submitted", code, "pdb")
    assert await last_reason(config, row.id) == f"submitted as {code}"


async def test_an_upload_whose_answer_was_lost_is_found_and_adopted(tmp_path, campaign, emulator, served,  # noqa: F811
                                                                    monkeypatch):
    """Kills the mutants of `_upload`'s resumed upload (`_adopt(dep, found, <reason>, result)`): the
    process died after the archive reached PDIS, before its answer was recorded. The next attempt finds
    it by md5 and adopts it, saying so, instead of uploading it again."""
    config = config_for(tmp_path, served)
    [dataset_id] = await add_datasets(config, campaign, tmp_path / "dls", [linked_collection(campaign)])
    await stop_at_uploaded(config, monkeypatch)
    row = (await depositions(config))[dataset_id]
    await set_columns(config, row.id, state="uploading", upload_token=None, server_md5=None, server_size=None)
    result = await one_step(config, "_upload", row.id)
    after = (await depositions(config))[dataset_id]
    assert (after.state, after.upload_token, after.server_md5) == ("uploaded", row.upload_token, row.tar_md5)
    assert await last_reason(config, row.id) == "found on PDIS after an interrupted upload"
    assert result.counters["adopted"] == 1 and uploads(served) == 1


async def test_a_packed_archive_gone_from_the_spool_is_packed_again(tmp_path, campaign, emulator, served,  # noqa: F811
                                                                    monkeypatch):
    """Kills the mutants of `_upload`'s spool check (the reason, `spool_path=None`): the archive of a
    packed row is gone (removed by hand, a disk swapped). Nothing is uploaded; the row goes back to
    be packed, saying why, and forgets the path it no longer has."""
    config = config_for(tmp_path, served)
    [dataset_id] = await add_datasets(config, campaign, tmp_path / "dls", [linked_collection(campaign)])
    await stop_at_packed(config, monkeypatch)
    row = (await depositions(config))[dataset_id]
    Path(row.spool_path).unlink()
    result = await one_step(config, "_upload", row.id)
    after = (await depositions(config))[dataset_id]
    assert (after.state, after.spool_path, after.attempts) == ("queued", None, 0)
    assert await last_reason(config, row.id) == "spool file missing or changed: packing again"
    assert result.failures == [] and uploads(served) == 0


async def test_an_upload_is_recorded_as_begun_before_a_byte_leaves(tmp_path, campaign, emulator, served,  # noqa: F811
                                                                   monkeypatch):
    """Kills the mutants of `_upload`'s UPLOADING step (skipped, its reason, `release=True`, the cleared
    verdict): while the archive is being sent, the row says `uploading` (so a restart looks the archive
    up on PDIS before sending it again), is still leased to this worker, and holds no verdict of an
    earlier upload (PDIS's answer to this one is the one that counts)."""
    config = config_for(tmp_path, served)
    [dataset_id] = await add_datasets(config, campaign, tmp_path / "dls", [linked_collection(campaign)])
    await stop_at_packed(config, monkeypatch)
    row = (await depositions(config))[dataset_id]
    await set_columns(config, row.id, lease_owner="test", lease_until=utcnow() + dt.timedelta(minutes=5),
                      detected_pdb="9ZZZ", pdb_exists=True)
    seen = []
    upload = PdisClient.upload

    async def look_then_upload(self, path, **kwargs):
        now = (await depositions(config))[dataset_id]
        seen.append((now.state, now.lease_owner, now.detected_pdb, now.pdb_exists))
        return await upload(self, path, **kwargs)

    monkeypatch.setattr(PdisClient, "upload", look_then_upload)
    await one_step(config, "_upload", row.id)
    assert seen == [("uploading", "test", None, None)]
    assert (await states_of(config, row.id))[-2:] == ["uploading", "uploaded"]
    assert await reasons_into(config, row.id, "uploading") == [f"uploading {row.zst_size} bytes"]



async def test_a_409_for_an_archive_none_of_ours_holds_needs_a_person(tmp_path, campaign, emulator,  # noqa: F811
                                                                      served, monkeypatch):  # noqa: F811
    """Kills the mutants of `_upload`'s 409 branch without a match: PDIS says the archive is a duplicate
    but none of this account's submissions has its md5 (another account holds it). Nothing is adopted
    or sent again: a person looks, told which md5."""
    config = config_for(tmp_path, served)
    [dataset_id] = await add_datasets(config, campaign, tmp_path / "dls", [linked_collection(campaign)])
    await stop_at_packed(config, monkeypatch)
    row = (await depositions(config))[dataset_id]
    emulator.fail_next("/upload/", 409)
    result = await one_step(config, "_upload", row.id)
    after = (await depositions(config))[dataset_id]
    assert (after.state, after.upload_token, after.attempts) == ("needs_attention", None, 0)
    assert after.status_details == (f"PDIS answered 409 (duplicate) but none of this account's submissions "
                                    f"has md5 {row.tar_md5}")
    assert result.failures == [] and uploads(served) == 1 and submits(served) == 0


async def test_a_long_upload_shows_its_progress_and_keeps_its_lease(tmp_path, campaign, emulator, served,  # noqa: F811
                                                                    monkeypatch):
    """Kills the mutants of `_upload`'s progress task and heartbeat (`with_heartbeat(None, ...)`, the id
    or the progress left out): an upload that takes longer than a third of the lease renews the row's
    lease while it runs (PDIS throttled to take about 2.5 s; lease 3 s), and shows its progress under
    the archive's name, up to every byte, then closes it."""
    config = config_for(tmp_path, served)
    config.daemon.lease = 3.0
    [dataset_id] = await add_datasets(config, campaign, tmp_path / "dls", [linked_collection(campaign)])
    await stop_at_packed(config, monkeypatch)
    row = (await depositions(config))[dataset_id]
    claimed = utcnow() + dt.timedelta(seconds=3)
    await set_columns(config, row.id, lease_owner="test", lease_until=claimed, status_details="waiting for spool space")
    emulator.bandwidth = row.zst_size / 2.5
    found, decision = await decided(config, dataset_id)
    leases = []
    upload = PdisClient.upload

    async def upload_then_look(self, path, **kwargs):
        answer = await upload(self, path, **kwargs)
        leases.append((await depositions(config))[dataset_id].lease_until)  # before the step records it
        return answer

    monkeypatch.setattr(PdisClient, "upload", upload_then_look)
    progress = Progressed()
    uploaded = sample("mirrord_uploaded_bytes_total", service="pdis")
    timed = sample("mirrord_transfer_duration_seconds_count", kind="upload")
    took = sample("mirrord_transfer_duration_seconds_sum", kind="upload")
    result = await one_step(config, "_upload", row.id, progress=progress)
    after = (await depositions(config))[dataset_id]
    assert after.state == "uploaded" and result.failures == []
    # What PDIS answered is recorded, and details of an earlier wait are gone (the UPLOADED step's mutants).
    assert (after.pdis_status, after.status_details) == ("uploaded", None)
    stored = upload_filename(found, decision).removesuffix(".zst")  # PDIS names the archive it unpacked
    assert await last_reason(config, row.id) == f"uploaded as {stored}"
    assert len(leases) == 1 and leases[0] > claimed + dt.timedelta(seconds=0.5)  # renewed while sending
    label = f"upload {found.archive_root}"
    assert progress.tasks == [(label, row.zst_size)] and progress.closed == [label]
    assert sum(progress.advanced) == row.zst_size
    # The run and /metrics count it (the count's and the upload metrics' mutants): its bytes, its time.
    assert result.counters["uploaded"] == 1
    assert sample("mirrord_uploaded_bytes_total", service="pdis") - uploaded == row.zst_size
    assert sample("mirrord_transfer_duration_seconds_count", kind="upload") - timed == 1
    assert 2 <= sample("mirrord_transfer_duration_seconds_sum", kind="upload") - took < 60



async def test_an_upload_pdis_refuses_needs_a_person(tmp_path, campaign, emulator, served,  # noqa: F811
                                                     monkeypatch):
    """Kills the mutants of `_upload`'s BadRequest branch: PDIS refuses the archive (413, too large).
    Sending it again would not help: a person looks, told PDIS's words; no failure, no retry."""
    config = config_for(tmp_path, served)
    [dataset_id] = await add_datasets(config, campaign, tmp_path / "dls", [linked_collection(campaign)])
    await stop_at_packed(config, monkeypatch)
    row = (await depositions(config))[dataset_id]
    emulator.fail_next("/upload/", 413)
    result = await one_step(config, "_upload", row.id)
    after = (await depositions(config))[dataset_id]
    assert (after.state, after.attempts) == ("needs_attention", 0)
    assert after.status_details.startswith("upload refused: ") and "archive too large for PDIS" in after.status_details
    assert result.failures == [] and uploads(served) == 1 and Path(row.spool_path).exists()


# -- following the submission ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("retention", "kept"), [("0s", False), ("500ms", True)])
async def test_a_publication_heard_removes_the_archive_unless_it_is_kept(tmp_path, campaign, emulator,  # noqa: F811
                                                                         served, monkeypatch, retention, kept):  # noqa: F811
    """Kills `_record_status`'s mutants of the published branch (the archive's removal and its
    `spool_retention <= 0` rule, PDIS's details, the time and the notification): a submission heard to be
    published has its
    archive removed at once, unless `spool_retention` keeps it a while (the sweep removes it then), and
    the row takes PDIS's words in place of its own."""
    config = config_for(tmp_path, served, spool_retention=retention)
    [dataset_id] = await add_datasets(config, campaign, tmp_path / "dls", [linked_collection(campaign)])
    await stop_at_uploaded(config, monkeypatch)
    row = (await depositions(config))[dataset_id]
    emulator.step_seconds = None
    async with pdis_client(served, tmp_path) as client:  # submitted meanwhile (another replica)
        await client.submit(row.upload_token, SubmitMetadata(pdb_code=row.pdb_code))
    emulator.advance(3)
    await set_columns(config, row.id, status_details="waiting for PDIS")
    before = utcnow()
    notified = Notified()
    result = await one_step(config, "_submit_or_withdraw", row.id, notified=notified)
    after = (await depositions(config))[dataset_id]
    assert (after.state, after.pdis_status, after.status_details) == ("published", "published", None)
    # When, and who is told (the published branch's record and notification mutants).
    assert after.published_at >= before
    assert notified.items == [("deposition", str(row.id), "published", row.pdb_code)]
    assert Path(row.spool_path).exists() == kept
    assert (after.spool_removed_at is None) == kept and (kept or after.spool_removed_at >= before)
    assert result.counters["published"] == 1 and submits(served) == 1



@pytest.mark.parametrize(("status", "details", "state", "said"), [
    ("error_no_data", "no diffraction images", "needs_attention", "PDIS: error_no_data: no diffraction images"),
    ("header_not_readable", None, "needs_attention", "PDIS: header_not_readable"),
    ("validated", None, "validated", None),
    ("quarantined", None, "submitted", None),  # a status mirrord does not know: followed, never resubmitted
])
async def test_a_status_pdis_gives_is_followed_or_shown_to_a_person(tmp_path, campaign, emulator, served,  # noqa: F811
                                                                    monkeypatch, status, details, state, said):
    """Kills `_record_status`'s mutants of its needs-attention wording, its in-flight state and its
    unknown-status warning (logged once per status, with the deposition): the submission is found
    already in `status` on PDIS (submitted meanwhile by another replica) when the job looks twice.
    Also its in-flight move's (`next_attempt_at=None` or left out, `submitted_at` set to None, under
    another name, or to now over the time recorded already): a submission followed is asked about
    again later, and keeps the time it was first seen submitted."""
    config = config_for(tmp_path, served)
    [dataset_id] = await add_datasets(config, campaign, tmp_path / "dls", [linked_collection(campaign)])
    await stop_at_uploaded(config, monkeypatch)
    row = (await depositions(config))[dataset_id]
    emulator.step_seconds = None
    async with pdis_client(served, tmp_path) as client:
        await client.submit(row.upload_token, SubmitMetadata(pdb_code=row.pdb_code))
    emulator.set_status(row.upload_token, status, details)
    before = utcnow()
    earlier = before - dt.timedelta(hours=1)  # as another replica recorded it
    if status == "quarantined":
        await set_columns(config, row.id, submitted_at=earlier)
    with capture_logs() as logs:
        result = await one_step(config, "_submit_or_withdraw", row.id, repeat=2)
    after = (await depositions(config))[dataset_id]
    assert (after.state, after.pdis_status) == (state, status)
    if said is None:  # followed: asked again a poll interval later; submitted when first seen so, or before
        assert await last_reason(config, row.id) == f"already {status} on PDIS: not submitted again"
        assert after.next_attempt_at > before
        if status == "quarantined":
            assert after.submitted_at == earlier
        else:
            assert before <= after.submitted_at <= utcnow()
    if said is not None:  # the row keeps PDIS's own details; its event and notification say it whole
        assert (after.status_details, await last_reason(config, row.id)) == (details, said)
    warned = [(e["status"], e["deposition"]) for e in logs if e["event"] == "pdis.unknown_status"]
    assert warned == ([(status, row.id)] if status == "quarantined" else [])
    assert result.counters.get("unknown_status", 0) == (status == "quarantined") and submits(served) == 1


# -- a step's failure -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("error", "attempts", "said"), [
    (LeaseLost("lease on depositions 1 expired"), 0, None),
    (UpstreamError("pdis", "unavailable", status=503), 1, "pdis: unavailable (HTTP 503)"),
    (OSError(28, "No space left on device"), 1, "[Errno 28] No space left on device"),
    (KeyError("zst_size"), 1, "KeyError: 'zst_size'"),
])
async def test_a_failed_step_costs_its_item_an_attempt_and_a_lost_lease_none(tmp_path, campaign, emulator,  # noqa: F811
                                                                           served, error, attempts, said):  # noqa: F811
    """Kills `_step`'s mutants: a step that lost its lease (another replica took the item) leaves the
    item alone and says so, with the item and why; an upstream, archive or disk error fails the item
    (an attempt spent, the error recorded, the state kept for the retry); any other exception (a bug)
    too, named by its type, and logged with its traceback. None of them stops the loop."""
    config = config_for(tmp_path, served)
    dataset_id, dep_id = await queued(config, campaign, tmp_path)

    async def failing(dep, result):
        raise error

    result = RunResult()
    async with deposit_job(config) as job:
        dep = await row_of(job.store, dep_id)
        with capture_logs() as logs:
            await job._step(dep, failing, result)
    row = (await depositions(config))[dataset_id]
    assert (row.state, row.attempts, row.last_error) == ("queued", attempts, said)
    # The run counts each failure and lists it (job_runs, `once`'s problems): `fail(..., result=None)`.
    assert result.failures == ([f"deposition {dep_id}: {said}"] if said else [])
    assert result.counters["failures"] == attempts
    events = [(e["event"], e.get("deposition"), e.get("error"), e.get("exc_info")) for e in logs
              if e["event"].startswith("deposition.")]
    if isinstance(error, LeaseLost):
        assert events == [("deposition.lease_lost", dep_id, str(error), None)]
    elif isinstance(error, KeyError):
        assert events == [("deposition.step_crashed", dep_id, None, True)]
    else:
        assert events == []


# -- a person's hold ----------------------------------------------------------------------------------------------
async def test_a_hold_is_asked_before_each_write_and_said_once_a_run(tmp_path, served):  # noqa: F811
    """Kills `_held`'s mutants (its log said on every check, or never, or without the hold's words; the
    count left out): while a person holds PDIS writes each stage's check answers yes and is counted; the
    log says so once a run, with who held it and why; without a hold the check answers no."""
    from mirrord.store import decisions

    config = config_for(tmp_path, served)
    result = RunResult()
    async with deposit_job(config) as job:
        assert not await job._held(result)
        async with job.store.write() as session:
            await decisions.record(session, "job", "pdis", "hold", reason="PDIS maintenance", actor="ada")
        with capture_logs() as logs:
            assert [await job._held(result) for _ in range(3)] == [True] * 3
        with capture_logs() as again:
            assert await job._held(RunResult())  # a new run says it again
    [said] = [e["hold"] for e in logs if e["event"] == "pdis.held"]
    assert "ada" in said and "PDIS maintenance" in said
    assert [e["hold"] for e in again if e["event"] == "pdis.held"] == [said]
    assert result.counters["held"] == 3


async def test_a_step_whose_dataset_is_gone_says_which(tmp_path, served):  # noqa: F811
    """Kills `_current`'s `RuntimeError(None)`: a deposition whose dataset vanished between its claim and
    its step (deleted meanwhile) fails with words that name both, for the item's `last_error`."""
    config = config_for(tmp_path, served)
    async with deposit_job(config) as job:
        with pytest.raises(RuntimeError) as gone:
            await job._current(Deposition(id=7, dataset_id=70, state="queued"))
    assert str(gone.value) == "dataset 70 of deposition 7 is gone"
