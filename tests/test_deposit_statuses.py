"""The deposition job's round of status checks (`_check_statuses`), for the mutants that lived (issue 23).

The end-to-end tests follow submissions until they are published, and a broken round still gets there
a pass later. These tests run one round alone and look at what it did: which submissions PDIS was asked
about and how often, what each row holds after, and what an outage leaves behind.
"""
from __future__ import annotations

import asyncio
import datetime as dt

from sqlalchemy import func, select, update

from mirrord.clients.errors import UpstreamError
from mirrord.clients.pdis import PdisClient
from mirrord.jobs.base import RunResult
from mirrord.store.models import Dataset, Deposition, utcnow
from tests.test_deposit_job import (  # noqa: F401 - pytest fixtures
    add_datasets,
    campaign,
    config_for,
    depositions,
    emulator,
    last_reason,
    open_store,
    run,
    served,
)
from tests.test_deposit_steps import Notified, deposit_job, set_columns

POLL = 600.0  # seconds between two checks of one submission


async def submitted(config, campaign, emulator, tmp_path, count: int) -> list[int]:  # noqa: F811
    """`count` datasets with PDB codes, packed, uploaded and submitted, their status frozen at `submitted`:
    their depositions' ids."""
    collections = [c for c in campaign.collections if campaign.experiment(c.sample)[1].pdb_code][:count]
    dataset_ids = await add_datasets(config, campaign, tmp_path / "dls", collections)
    emulator.step_seconds = None
    await run(config, horizon=0, max_passes=2)
    rows = await depositions(config)
    assert [rows[i].state for i in dataset_ids] == ["submitted"] * count
    return [rows[i].id for i in dataset_ids]


async def check_round(config, *, notified: Notified | None = None, due_at_once: bool = False) -> RunResult:
    """One round of status checks, all of them due. With `due_at_once`, each submission checked is due
    again at once (a round that takes longer than `poll_interval`)."""
    result = RunResult()
    async with deposit_job(config, notified=notified) as job:
        if due_at_once:
            job._next_check = lambda: utcnow() - dt.timedelta(seconds=1)
        await asyncio.wait_for(job._check_statuses(result), 60)
    return result


async def all_due(config) -> None:
    """Every deposition's next status check due now."""
    store = await open_store(config)
    try:
        async with store.write() as session:
            await session.execute(update(Deposition).values(next_attempt_at=None))
    finally:
        await store.close()


def asked(server) -> list[str]:
    """The submissions PDIS was asked about, in order (their tokens)."""
    prefix = "/api/v1/submissions/"
    return [path.removeprefix(prefix).strip("/") for method, path in server.requests.entries
            if method == "GET" and path.startswith(prefix) and path != prefix]


async def test_a_round_asks_about_each_submission_once(tmp_path, campaign, emulator, served):  # noqa: F811
    """Kills `_check_statuses`' `seen` mutants (the exclusion dropped or inverted) and its record's: a
    round asks PDIS about each submission once, even when a submission is due again before the round
    ends (each checked one is here), then schedules the next check `poll_interval` later; a status that
    moved is recorded with PDIS's words and counted."""
    config = config_for(tmp_path, served, poll_interval=POLL)
    await submitted(config, campaign, emulator, tmp_path, 3)
    await all_due(config)
    tokens = {r.upload_token for r in (await depositions(config)).values()}
    served.requests.clear()
    await check_round(config, due_at_once=True)
    assert sorted(asked(served)) == sorted(tokens)

    served.requests.clear()
    before = utcnow()
    await check_round(config)
    rows = (await depositions(config)).values()
    assert sorted(asked(served)) == sorted(tokens)
    assert all(r.state == "submitted" and r.next_attempt_at >= before + dt.timedelta(seconds=POLL - 1)
               and r.lease_owner is None for r in rows)
    served.requests.clear()
    await check_round(config)  # none is due
    assert asked(served) == []

    # What PDIS says is recorded with its words, and counted (`_record_status(dep, sub, None, ...)`,
    # `(..., None)` for the run's result).
    published, validated, _ = rows
    emulator.set_status(published.upload_token, "published")
    emulator.set_status(validated.upload_token, "validated")
    await all_due(config)
    result = await check_round(config)
    assert await last_reason(config, published.id) == "PDIS status published"
    assert await last_reason(config, validated.id) == "PDIS status validated"
    assert result.counters["published"] == 1


async def test_a_submission_gone_from_pdis_needs_a_person(tmp_path, campaign, emulator, served):  # noqa: F811
    """Kills the mutants of `_check_statuses`' NotFound branch (its words, `pdis_status="missing"`,
    `continue` as `break`, the row's id): PDIS no longer knows one submission. That row needs a person,
    who is told why; the round goes on to the others and nothing fails."""
    config = config_for(tmp_path, served, poll_interval=POLL)
    gone, other = await submitted(config, campaign, emulator, tmp_path, 2)
    await all_due(config)
    await set_columns(config, gone, upload_token="0" * 32)  # a token PDIS never gave (or deleted since)
    notified = Notified()
    result = await check_round(config, notified=notified)
    rows = {r.id: r for r in (await depositions(config)).values()}
    why = "the submission is no longer on PDIS"
    assert (rows[gone].state, rows[gone].status_details, rows[gone].pdis_status) == ("needs_attention", why, "missing")
    assert notified.items == [("deposition", str(gone), "needs_attention", why)]
    assert rows[other].state == "submitted" and rows[other].next_attempt_at is not None
    assert result.failures == []


async def test_an_outage_mid_round_hands_the_rest_back_for_the_next_interval(tmp_path, campaign, emulator,  # noqa: F811
                                                                             served, monkeypatch):  # noqa: F811
    """Kills the mutants of `_check_statuses`' UpstreamError branch (`items[index:]` narrowed, the state,
    the reason or `next_attempt_at` changed, the error swallowed): PDIS fails on the second of three
    submissions. The round stops with the error (the job's run records the outage); the one checked is
    recorded; it and the two not checked stay `submitted`, released, asked about `poll_interval` later,
    no attempt spent on any."""
    config = config_for(tmp_path, served, poll_interval=POLL)
    await submitted(config, campaign, emulator, tmp_path, 3)
    await all_due(config)
    calls = []
    real = PdisClient.submission

    async def failing_second(self, token):
        calls.append(token)
        if len(calls) == 2:
            raise UpstreamError("pdis", "unavailable", status=503)
        return await real(self, token)

    monkeypatch.setattr(PdisClient, "submission", failing_second)
    before = utcnow()
    try:
        await check_round(config)
    except UpstreamError as exc:
        assert exc.status == 503
    else:
        raise AssertionError("the outage was swallowed")
    rows = (await depositions(config)).values()
    assert len(calls) == 2
    assert all((r.state, r.attempts, r.lease_owner) == ("submitted", 0, None) for r in rows)
    assert all(r.next_attempt_at >= before + dt.timedelta(seconds=POLL - 1) for r in rows)


async def test_a_round_leases_its_submissions_a_batch_at_a_time(tmp_path, campaign, emulator,  # noqa: F811
                                                                served, monkeypatch):  # noqa: F811
    """Kills `_check_statuses`' `claim(..., None)` (every submission in flight leased at once) and
    `seen.add(None)` (`id NOT IN (NULL)` claims nothing more: the second batch waits a whole interval):
    with more submissions in flight than a batch (`STATUS_BATCH`, 20), a round leases at most a batch
    at a time and asks about every one of them once."""
    config = config_for(tmp_path, served, poll_interval=POLL)
    [dep_id] = await submitted(config, campaign, emulator, tmp_path, 1)
    store = await open_store(config)
    try:
        async with store.write() as session:  # 24 more in flight (rows like the first; PDIS answers for each)
            dep = await session.get(Deposition, dep_id)
            dataset = await session.get(Dataset, dep.dataset_id)
            for n in range(1, 25):
                copy = Dataset(**{c.key: getattr(dataset, c.key) for c in Dataset.__table__.columns
                                  if c.key != "id"})
                copy.collection_id += n
                session.add(copy)
                await session.flush()
                session.add(Deposition(**{c.key: getattr(dep, c.key) for c in Deposition.__table__.columns
                                          if c.key not in ("id", "dataset_id")}, dataset_id=copy.id))
        await all_due(config)
        leased = []
        real = PdisClient.submission

        async def counting(self, token):
            async with store.read() as session:
                leased.append(await session.scalar(
                    select(func.count()).select_from(Deposition).where(Deposition.lease_owner == "test")))
            return await real(self, token)

        monkeypatch.setattr(PdisClient, "submission", counting)
        served.requests.clear()
        await check_round(config)
    finally:
        await store.close()
    assert len(leased) == 25 and max(leased) <= 20
    assert len(asked(served)) == 25


async def test_a_poll_counts_the_publications_it_hears_of(tmp_path, campaign, emulator, served):  # noqa: F811
    """Kills `poll`'s `_check_statuses(None)` (the run's result not passed: the first publication heard
    crashed the poll after recording it, and the run's counters and job_runs lost it): a poll that hears
    of a publication records it and counts it, and fails nothing."""
    config = config_for(tmp_path, served, poll_interval=POLL)
    [dep_id] = await submitted(config, campaign, emulator, tmp_path, 1)
    [row] = (await depositions(config)).values()
    emulator.set_status(row.upload_token, "published")
    await all_due(config)
    result = RunResult()
    async with deposit_job(config) as job:
        await job.poll(result)
    assert [r.state for r in (await depositions(config)).values()] == ["published"]
    assert result.counters["published"] == 1 and result.failures == []
