"""The PDIS decision pass is incremental: a tick with nothing new decides (almost) nothing, on a store
holding many datasets that are never deposited; what changed since the last pass, and its rivals
for a PDB code, are decided again; a policy change decides everything again. Real SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

import pytest
from sqlalchemy import insert, select, update
from structlog.testing import capture_logs

from mirrord.jobs import deposit_policy
from mirrord.jobs.base import JobContext, NoNotifier, Notifier, RunResult
from mirrord.jobs.deposit import DepositJob
from mirrord.jobs.deposit_policy import DECIDED_KEY, WATERMARK_MARGIN, decided_since
from mirrord.store import Store, migrate
from mirrord.store.models import Dataset, Deposition, Event, Experiment, KeyValue, Target, utcnow
from mirrord.store.models import Session as SessionRow
from tests.conftest import make_config
from tests.test_deposit_steps import Notified

# Complete collections never deposited (screening shots, unlinked crystals): more than two of the pass's
# pages, so that paging is crossed, and no more, since every test here decides them all at least once.
QUIET = 2 * deposit_policy.PAGE + 200


def config_for(tmp_path: Path, db_url: str, **pdis):
    return make_config(tmp_path, daemon={"database_url": db_url},
                       pdis={"enabled": True, "url": "http://127.0.0.1:9", "username": "u", "password": "p", **pdis})


def job_on(store: Store, tmp_path: Path, db_url: str, *, instance: str = "test", notifier: Notifier | None = None,
           **pdis) -> DepositJob:
    """The deposit job deciding on `store` under the policy `pdis` sets, as replica `instance`."""
    return DepositJob(JobContext(config=config_for(tmp_path, db_url, **pdis), store=store, instance=instance,
                                 notifier=notifier or NoNotifier()))


def dataset_row(n: int, **values) -> dict:
    t0 = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)
    return {"group_id": n, "collection_id": 10_000 + n, "session_id": 1, "session_name": "lb1-1", "proposal": "lb1",
            "beamline": "i04-1", "sample_name": f"X{n:05d}", "local_dir": f"/data/X{n:05d}", "files": ["a.cbf"],
            "state": "complete", "experiment_type": "OSC", "number_of_images": 900,
            "start": t0 + dt.timedelta(minutes=n), "end": t0 + dt.timedelta(minutes=n, seconds=50),
            **values}


async def add_visit(session, pdb_codes: dict[int, str | None]) -> None:
    """Visit lb1-1 (session 1) of target A71, and its experiments E<id> with these PDB codes, by id."""
    session.add(SessionRow(id=1, name="lb1-1", proposal="lb1"))
    session.add(Target(id=1, name="A71", tas="lb1-1"))
    await session.flush()
    if pdb_codes:
        await session.execute(insert(Experiment), [{"id": i, "target_id": 1, "upload_index": 1, "code": f"E{i}",
                                                    "pdb_code": code} for i, code in pdb_codes.items()])


@pytest.fixture
async def year(tmp_path: Path, db_url: str):
    """A store with QUIET unlinked collections, 3 experiments without a PDB code yet (one collection
    each) and a crystal (PDB 5ABC) collected twice; the job deciding on it."""
    store = Store(db_url)
    await migrate.upgrade(store)
    async with store.write() as session:
        await add_visit(session, {1: None, 2: None, 3: None, 4: "5ABC"})
        await session.execute(insert(Dataset), [dataset_row(n) for n in range(1, QUIET + 1)] + [
            dataset_row(QUIET + i, experiment_id=i) for i in (1, 2, 3, 4)] + [dataset_row(QUIET + 5, experiment_id=4)])
    try:
        yield job_on(store, tmp_path, db_url)
    finally:
        await store.close()


async def decide(job: DepositJob) -> RunResult:
    result = RunResult()
    await job._decide(result)
    return result


async def age(job: DepositJob, hours: float = 1.0) -> None:
    """Time passes: every row and the last pass's watermark are `hours` older (a tick is minutes apart,
    more than the watermark's margin; a test is quicker than that)."""
    shift = dt.timedelta(hours=hours)
    async with job.store.write() as session:
        for model in (Dataset, Experiment, Deposition):
            rows = (await session.execute(select(model.id, model.updated_at))).all()
            await session.execute(update(model), [{"id": i, "updated_at": at - shift} for i, at in rows])
        row = await session.get(KeyValue, DECIDED_KEY)
        since = dt.datetime.fromisoformat(row.value["since"]) - shift
        row.value = {**row.value, "since": since.isoformat()}


async def states(job: DepositJob) -> dict[int, tuple[str, str | None]]:
    """Deposition (state, status_details) by dataset id."""
    async with job.store.read() as session:
        rows = (await session.scalars(select(Deposition))).all()
    return {d.dataset_id: (d.state, d.status_details) for d in rows}


async def test_a_quiet_tick_decides_only_what_changed(year: DepositJob) -> None:
    job = year
    first = await decide(job)
    assert first.counters["considered"] == QUIET + 5  # the first pass decides everything
    decided = await states(job)
    assert decided[QUIET + 5] == ("queued", "linked to E4 with PDB code 5ABC")  # the newer of the two goes
    assert decided[QUIET + 4] == ("not_deposited", f"superseded by collection {10_000 + QUIET + 5} for PDB 5ABC")
    assert sum(state == "not_deposited" for state, _ in decided.values()) == QUIET + 4

    # Nothing new: only the queued one, re-checked on every pass (after the pass following the first,
    # which looks again at what the first wrote, within the watermark's margin).
    await age(job)
    assert (await decide(job)).counters["considered"] == QUIET + 5
    await age(job)
    quiet = await decide(job)
    assert quiet.counters["considered"] == 1, quiet.counters
    assert await states(job) == decided

    # An experiment gains its PDB code: its collection is decided again, and goes.
    async with job.store.write() as session:
        (await session.get(Experiment, 1)).pdb_code = "6DEF"
    changed = await decide(job)
    assert changed.counters["considered"] <= 10, changed.counters
    assert (await states(job))[QUIET + 1] == ("queued", "linked to E1 with PDB code 6DEF")

    # The winner for 5ABC stops before anything left the host (its preflight failed): its rival goes.
    async with job.store.write() as session:
        await session.execute(update(Deposition).where(Deposition.dataset_id == QUIET + 5)
                              .values(state="needs_attention"))
    await decide(job)
    assert (await states(job))[QUIET + 4] == ("queued", "linked to E4 with PDB code 5ABC")

    # A new collection of the 5ABC crystal completes: decided, and superseded by nothing sent yet but
    # preferred as the newest, it takes the code from the queued one.
    async with job.store.write() as session:
        await session.execute(insert(Dataset), [dataset_row(QUIET + 6, experiment_id=4)])
    await decide(job)
    now = await states(job)
    assert now[QUIET + 6][0] == "queued" and now[QUIET + 4][0] == "not_deposited"


def deciding_all(logs: list[dict]) -> list[int]:
    """How many datasets each pass that decided everything said it would decide."""
    return [e["datasets"] for e in logs if e["event"] == "deposition.deciding_all"]


async def test_a_policy_change_decides_everything_again(year: DepositJob, tmp_path: Path, db_url: str) -> None:
    """Also kills `_decide`'s `if since is not None` and `datasets=None` for its log: the first pass and
    the first after a policy change say they decide every dataset, and how many; other passes say nothing."""
    with capture_logs() as logs:
        for _ in range(2):
            await decide(year)
            await age(year)
        assert (await decide(year)).counters["considered"] < 10
    assert deciding_all(logs) == [QUIET + 5]
    changed = job_on(year.store, tmp_path, db_url, min_images=1000)
    with capture_logs() as logs:
        assert (await decide(changed)).counters["considered"] == QUIET + 5
    assert deciding_all(logs) == [QUIET + 5]
    assert (await states(changed))[QUIET + 5][1] == "900 images: a screening shot, not a dataset (min_images = 1000)"
    # Settings that decide nothing (how fast, where the spool is) keep the watermark.
    faster = config_for(tmp_path, db_url, min_images=1000, pack_concurrency=4, poll_interval="1m", spool_margin=0)
    async with year.store.read() as session:
        assert await decided_since(session, faster.pdis) is not None
        assert await decided_since(session, year.section) is None


async def test_a_row_written_late_behind_the_watermark_is_still_decided(year: DepositJob) -> None:
    """A transaction that began before a pass and committed after it (or a replica whose clock is
    behind) writes an `updated_at` before the pass's start: the margin still catches it."""
    job = year
    await decide(job)
    async with job.store.read() as session:
        since = dt.datetime.fromisoformat((await session.get(KeyValue, DECIDED_KEY)).value["since"])
    assert utcnow() - WATERMARK_MARGIN - dt.timedelta(minutes=1) < since <= utcnow() - WATERMARK_MARGIN
    late = since + WATERMARK_MARGIN - dt.timedelta(seconds=30)  # before the pass began
    async with job.store.write() as session:
        await session.execute(update(Experiment).where(Experiment.id == 2).values(pdb_code="7GHI", updated_at=late))
    await decide(job)
    assert (await states(job))[QUIET + 2] == ("queued", "linked to E2 with PDB code 7GHI")


async def test_plan_pages_through_datasets_and_decides_rivals_across_pages(year: DepositJob, monkeypatch) -> None:
    """`plan` reads a page at a time (memory stays flat); a PDB code's rivals on two pages still
    leave exactly one that goes."""
    monkeypatch.setattr(deposit_policy, "PAGE", 4)
    async with year.store.write() as session:  # a rival of 5ABC on the first page, the others on the last
        await session.execute(update(Dataset).where(Dataset.id == 2).values(experiment_id=4))
    fetched: list[int] = []
    rows = deposit_policy._rows

    async def counting(*args, **kwargs):
        found = await rows(*args, **kwargs)
        fetched.append(len(found))
        return found

    monkeypatch.setattr(deposit_policy, "_rows", counting)
    async with year.store.read() as session:
        entries = [e async for e in deposit_policy.plan(session, year.section, everything=True)]
    assert [e.facts.dataset_id for e in entries] == list(range(1, QUIET + 6))
    assert max(fetched) <= 4 + 3  # a page, or a page's rivals (the three collections of 5ABC)
    going = [e.facts.dataset_id for e in entries if e.decision.deposit]
    assert going == [QUIET + 5]
    assert {e.decision.reason for e in entries if e.facts.dataset_id in (2, QUIET + 4)} == {
        f"superseded by collection {10_000 + QUIET + 5} for PDB 5ABC"}


async def test_a_person_s_pdb_codes_file_and_choice_are_changes_the_pass_sees(year: DepositJob, tmp_path: Path) -> None:
    """A quiet pass would never look at a not_deposited collection again: a PDB code a person adds in the
    pdb_codes_file (no row changes) and a choice they record must still reach it."""
    from mirrord.store import decisions

    job = year
    await decide(job)
    await age(job)
    await decide(job)
    await age(job)
    assert (await decide(job)).counters["considered"] == 1
    codes = tmp_path / "codes.csv"
    codes.write_text("X00007,7ABC\n")
    job.section.pdb_codes_file = codes
    assert (await decide(job)).counters["considered"] == QUIET + 5  # the file is part of the policy
    assert (await states(job))[7] == ("queued", "X00007 has PDB code 7ABC in the pdb_codes_file")

    await age(job)
    await decide(job)
    await age(job)
    async with job.store.write() as session:  # a person's choice, recorded without touching the rows
        loser = await session.scalar(select(Deposition.id).where(Deposition.dataset_id == QUIET + 4))
        await decisions.record(session, "deposition", loser, "choose", reason="better data", actor="ada",
                               bound={"pdb_code": "5ABC"})
    quiet = await decide(job)
    assert quiet.counters["considered"] <= 10, quiet.counters
    decided = await states(job)
    assert decided[QUIET + 4][0] == "queued" and decided[QUIET + 5][0] == "not_deposited"


def plan_lines(tmp_path: Path, db_url: str, capsys: pytest.CaptureFixture[str], *args: str, pdis: str = "") -> list[str]:
    from mirrord import cli

    path = tmp_path / "plan.toml"
    path.write_text(f'[daemon]\nstate_dir = "{tmp_path / "state"}"\ndatabase_url = "{db_url}"\n'
                    f'[pdis]\n{pdis}')
    assert cli.main(["--config", str(path), "plan", *args]) == 0
    return capsys.readouterr().out.splitlines()


async def test_plan_lists_what_is_open_and_counts_what_rests(year: DepositJob, tmp_path: Path, db_url: str,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """`plan` on a year's store lists what the next pass decides and what is under way, by the ids
    `status` and `show` take (a deposition's, with its dataset's), and counts the thousands at rest
    instead of deciding them all again (17 s and 1.5 GB a year, issue 22); `--all` and a policy change
    decide every one."""
    for _ in range(2):  # the second pass sees the first's writes as changes; then all is quiet
        await decide(year)
        await age(year)
    capsys.readouterr()
    async with year.store.read() as session:
        winner = await session.scalar(select(Deposition.id).where(Deposition.state == "queued"))
    lines = await asyncio.to_thread(plan_lines, tmp_path, db_url, capsys)
    assert lines[1:] == [
        f"deposition {winner} (dataset {QUIET + 5}) X{QUIET + 5:05d} (lb1, i04-1) [queued]: deposit as 5ABC",
        f"{QUIET + 4} deposition(s) at rest not listed (the next decision pass leaves them as they are): "
        f"{QUIET + 4} not_deposited; `mirrord plan --all` decides every dataset again"]
    assert len(await asyncio.to_thread(plan_lines, tmp_path, db_url, capsys, "--all")) == 1 + QUIET + 5
    # A policy change: the next pass decides every undecided dataset again, and `plan` shows them all.
    changed = await asyncio.to_thread(plan_lines, tmp_path, db_url, capsys, pdis='deposit = "all"\n')
    assert len(changed) == 1 + QUIET + 5 and sum("deposit as" in line for line in changed) == 1


# -- the watermark and `plan`, each on a small store (the mutants issue 23's run left) ------------------------
@pytest.fixture
async def small(store: Store) -> Store:
    """Three complete collections, one incomplete (no deposition), one experiment; nothing decided."""
    async with store.write() as session:
        await add_visit(session, {1: None})
        await session.execute(insert(Dataset), [dataset_row(1), dataset_row(2, experiment_id=1), dataset_row(3),
                                                dataset_row(4, state="waiting")])
    return store


async def test_a_change_at_the_watermark_itself_is_seen(small: Store, tmp_path: Path, db_url: str) -> None:
    """Kills the `>=` to `>` mutants of the change sources and `_decided_by_a_person` without its time
    filter: a dataset, an experiment or a deposition written at the very instant of the watermark, and a
    person's decision recorded then, are changes since it; a decision recorded before it is not."""
    from mirrord.store import decisions

    since = dt.datetime(2026, 6, 1, 12, tzinfo=dt.UTC)
    section = config_for(tmp_path, db_url).pdis
    async with small.write() as session:
        session.add(Deposition(dataset_id=3, state="queued"))
        await session.flush()
        older = await decisions.record(session, "dataset", 4, "dismiss", reason="bad", actor="ada")
        newer = await decisions.record(session, "dataset", 1, "dismiss", reason="bad", actor="ada")
    async with small.write() as session:
        everything = since - dt.timedelta(days=1)
        for model in (Dataset, Experiment, Deposition):
            await session.execute(update(model).values(updated_at=everything))
        await session.execute(update(Experiment).values(updated_at=since))  # E1: dataset 2
        await session.execute(update(Deposition).values(updated_at=since))  # dataset 3
        await session.execute(update(type(older)).where(type(older).id == older.id).values(at=everything))
        await session.execute(update(type(newer)).where(type(newer).id == newer.id).values(at=since))
    async with small.read() as session:
        assert await deposit_policy.changed_dataset_ids(session, section, since) == {1, 2, 3}
    async with small.write() as session:
        await session.execute(update(Dataset).where(Dataset.id == 4).values(updated_at=since))
    async with small.read() as session:
        assert await deposit_policy.changed_dataset_ids(session, section, since) == {1, 2, 3, 4}


async def test_a_pass_keeps_a_later_watermark_of_the_same_policy(small: Store, tmp_path: Path, db_url: str) -> None:
    """Kills `record_pass`'s mutants of its keep-the-later rule: a replica's pass that began earlier but
    committed later does not move the watermark back (the next pass would decide more than it must);
    a pass under another policy replaces it."""
    section = config_for(tmp_path, db_url).pdis
    t0 = dt.datetime(2026, 6, 1, 12, tzinfo=dt.UTC)
    for started in (t0, t0 - dt.timedelta(minutes=2)):
        async with small.write() as session:
            await deposit_policy.record_pass(session, section, started)
    async with small.read() as session:
        assert await decided_since(session, section) == t0 - WATERMARK_MARGIN
    changed = config_for(tmp_path, db_url, deposit="all").pdis
    async with small.write() as session:
        await deposit_policy.record_pass(session, changed, t0 - dt.timedelta(minutes=2))
    async with small.read() as session:
        assert await decided_since(session, changed) == t0 - dt.timedelta(minutes=2) - WATERMARK_MARGIN
        assert await decided_since(session, section) is None  # the policy changed: decide everything


async def test_plan_on_a_store_before_any_deposition_and_with_a_codes_file(small: Store, tmp_path: Path,
                                                                          db_url: str) -> None:
    """Kills `plan`'s codes file left unread and `--all` without `_considered()` (an incomplete collection
    without a deposition is not listed), on a store where nothing was decided yet (no deposition); and
    `decision_for` (the re-check before the upload and the submit) with the codes file left unread."""
    codes = tmp_path / "codes.csv"
    codes.write_text("X00003,6ABC\n")
    section = config_for(tmp_path, db_url, pdb_codes_file=str(codes)).pdis
    async with small.read() as session:
        assert await deposit_policy.open_dataset_ids(session, section) == [1, 2, 3]  # all undecided
        entries = [e async for e in deposit_policy.plan(session, section)]
        everything = [e async for e in deposit_policy.plan(session, section, everything=True)]
    assert [e.facts.dataset_id for e in entries] == [e.facts.dataset_id for e in everything] == [1, 2, 3]
    assert {e.facts.dataset_id: e.decision.pdb_code for e in entries} == {1: None, 2: None, 3: "6ABC"}
    async with small.read() as session:
        _facts, decision = await deposit_policy.decision_for(session, 3, section)
    assert decision.summary == "deposit as 6ABC"


# -- what a pass records (the mutants of `_record_decisions` that lived) --------------------------------------
async def test_a_pass_records_new_decisions_counts_them_and_tells_of_attention(small: Store, tmp_path: Path,
                                                                               db_url: str) -> None:
    """Kills `_record_decisions`' `result.count(None)`, the notification's `!= NEEDS_ATTENTION` and
    `append(None)`, and the creation event's `instance` as None: new depositions are counted by the state
    decided, each creation names the replica that decided it, and a person is told only of the one that
    needs them (a PDB code file that disagrees with Fragalysis)."""
    codes = tmp_path / "codes.csv"
    codes.write_text("E1,6DEF\nX00003,6ABC\n")
    async with small.write() as session:
        await session.execute(update(Experiment).values(pdb_code="5ABC"))
    notified = Notified()
    job = job_on(small, tmp_path, db_url, instance="replica-2", notifier=notified, pdb_codes_file=str(codes))
    result = await decide(job)
    assert {k: v for k, v in result.counters.items() if k.startswith("decided_")} == {
        "decided_not_deposited": 1, "decided_needs_attention": 1, "decided_queued": 1}
    async with small.read() as session:
        ids = dict((await session.execute(select(Deposition.dataset_id, Deposition.id))).all())
        made = (await session.execute(select(Event.item_id, Event.from_state, Event.instance)
                                      .where(Event.item_type == "deposition"))).all()
    assert sorted(made) == sorted((str(i), None, "replica-2") for i in ids.values())
    why = (await states(job))[2][1]
    assert why.startswith("Fragalysis gives experiment E1 PDB code 5ABC, the pdb_codes_file gives 6DEF")
    assert notified.items == [("deposition", str(ids[2]), "needs_attention", why)]


async def test_a_deposition_that_moved_since_it_was_read_is_left_to_its_worker(small: Store, tmp_path: Path,
                                                                              db_url: str) -> None:
    """Kills `_record_decisions`' `row is None and row.state != ...`: a deposition read `queued` that a
    worker packed before the decision was written keeps its state; the worker's own re-check decides it."""
    codes = tmp_path / "codes.csv"
    codes.write_text("X00003,6ABC\n")
    job = job_on(small, tmp_path, db_url, pdb_codes_file=str(codes))
    await decide(job)
    async with small.read() as session:
        facts, _ = await deposit_policy.decision_for(session, 3, job.section)
    assert facts.deposition_state == "queued"
    async with small.write() as session:
        await session.execute(update(Deposition).where(Deposition.dataset_id == 3).values(state="packed"))
    await job._record_decisions([(facts, deposit_policy.Decision(False, "policy: deposit = none"))], RunResult())
    assert (await states(job))[3] == ("packed", "X00003 has PDB code 6ABC in the pdb_codes_file")


async def test_lifting_the_approval_gate_sends_the_waiting_on_to_their_upload(small: Store, tmp_path: Path,
                                                                             db_url: str) -> None:
    """Kills `_record_decisions`' `approval == "XXnoneXX"` / `"NONE"`, `target = None` and the move's
    `instance=None`: a deposition waiting for a person's approval keeps waiting, with its words, while
    `approval = "required"`; once the gate is lifted (`approval = "none"`) the next pass moves it to
    `packed`, where its upload re-checks the rest, and signs the move."""
    codes = tmp_path / "codes.csv"
    codes.write_text("X00003,6ABC\n")
    gated = job_on(small, tmp_path, db_url, pdb_codes_file=str(codes), approval="required")
    await decide(gated)
    waiting = "waiting for a person's approval ([pdis] approval = \"required\")"
    async with small.write() as session:
        await session.execute(update(Deposition).where(Deposition.dataset_id == 3).values(
            state="awaiting_approval", status_details=waiting))
    await age(gated)
    await decide(gated)
    assert (await states(gated))[3] == ("awaiting_approval", waiting)

    lifted = job_on(small, tmp_path, db_url, instance="replica-2", pdb_codes_file=str(codes), approval="none")
    assert (await decide(lifted)).counters["decided_packed"] == 1
    assert (await states(lifted))[3] == ("packed", "X00003 has PDB code 6ABC in the pdb_codes_file")
    async with small.read() as session:
        moved = (await session.execute(select(Event.from_state, Event.to_state, Event.reason, Event.instance)
                                       .order_by(Event.id.desc()).limit(1))).one()
    assert tuple(moved) == ("awaiting_approval", "packed", "deposit as 6ABC", "replica-2")


async def test_a_decided_deposition_that_now_needs_a_person_is_told_of(small: Store, tmp_path: Path,
                                                                      db_url: str) -> None:
    """Kills `_record_decisions`' `!= NEEDS_ATTENTION` and `append(None)` for a deposition decided before:
    a queued deposition whose PDB code the person's file now contradicts moves to `needs_attention`, and
    the person is told of that one only, once."""
    async with small.write() as session:
        await session.execute(update(Experiment).values(pdb_code="5ABC"))
    codes = tmp_path / "codes.csv"
    codes.write_text("X00003,6ABC\n")
    notified = Notified()
    job = job_on(small, tmp_path, db_url, notifier=notified, pdb_codes_file=str(codes))
    await decide(job)
    assert (await states(job))[2][0] == (await states(job))[3][0] == "queued" and notified.items == []
    codes.write_text("X00003,6ABC\nE1,6DEF\n")
    await decide(job)
    async with small.read() as session:
        dep_id = await session.scalar(select(Deposition.id).where(Deposition.dataset_id == 2))
    state, why = (await states(job))[2]
    assert state == "needs_attention" and notified.items == [("deposition", str(dep_id), "needs_attention", why)]


# -- which datasets a pass decides again (the mutants of `_rival_ids`, `_always_states` and the fingerprint) ---
SINCE = dt.datetime(2026, 6, 1, 12, tzinfo=dt.UTC)


async def changed_only(store: Store, dataset_ids: set[int]) -> None:
    """Every row last written a day before SINCE, but these datasets, written at SINCE."""
    async with store.write() as session:
        for model in (Dataset, Experiment, Deposition):
            await session.execute(update(model).values(updated_at=SINCE - dt.timedelta(days=1)))
        await session.execute(update(Dataset).where(Dataset.id.in_(dataset_ids)).values(updated_at=SINCE))


async def test_a_changed_dataset_brings_every_rival_for_each_code_it_had(store: Store, tmp_path: Path,
                                                                       db_url: str) -> None:
    """Kills `_rival_ids`' `func.lower` (of the experiment's code and of the deposition's), its queries'
    `is_not(None)` as None (nothing found), `discard("")` changed, and its pdb_codes_file left unread; and
    `_competing`'s file codes taken for the wrong codes, with no filter, or by the wrong experiments.
    A dataset that changed brings back every unchanged one competing with it: by its experiment's code
    whatever its case, by the code its deposition was last decided for, and by the person's file (by
    sample and by experiment code). An empty code is no code and makes no rivals."""
    codes = tmp_path / "codes.csv"
    codes.write_text("X00008,5ABC\ne10,5ABC\n")
    section = config_for(tmp_path, db_url, pdb_codes_file=str(codes)).pdis
    pdb = {1: "5abc", 2: "5ABC", 3: None, 4: "", 5: "", 6: "6DEF", 7: "7OLD", 10: None}
    async with store.write() as session:
        await add_visit(session, pdb)
        await session.execute(insert(Dataset), [dataset_row(n, id=n, experiment_id=n) for n in pdb]
                              + [dataset_row(8, id=8), dataset_row(9, id=9)])
        # 6 was decided for 7OLD before its experiment's code changed; 3 was decided not to go (no code).
        session.add_all([Deposition(dataset_id=6, state="not_deposited", pdb_code="7OLD"),
                         Deposition(dataset_id=3, state="not_deposited")])
    await changed_only(store, {1, 3, 4, 6})
    async with store.read() as session:
        # 2, 8 and 10 compete with 1 for 5ABC (by the experiment; by the file, for the sample and for the
        # experiment), 7 with 6 for 7OLD; 5 and 9 with nobody.
        assert await deposit_policy.undecided_ids(session, section, SINCE) == [1, 2, 3, 4, 6, 7, 8, 10]


async def test_a_pass_always_decides_what_is_about_to_leave_the_host(store: Store, tmp_path: Path,
                                                                    db_url: str) -> None:
    """Kills every mutant of `_always_states`' names, and `undecided_ids` deciding again what changed
    without `_undecided_where`: a deposition queued, packed, waiting for approval or dry-run (and, with
    `allow_additional_datasets`, one PDIS said holds its code) is decided on every pass, changed or not,
    the last chance before its archive leaves; those at rest are not, even when they changed."""
    states = ["queued", "packed", "awaiting_approval", "dry_run",  # 1-4: always
              "not_deposited", "published", "needs_attention", "submitted", "already_in_pdis"]  # 5-9: at rest
    async with store.write() as session:
        await add_visit(session, {})
        await session.execute(insert(Dataset), [dataset_row(n) for n in range(1, len(states) + 1)])
        session.add_all([Deposition(dataset_id=n, state=state) for n, state in enumerate(states, start=1)])
    plain = config_for(tmp_path, db_url).pdis
    allowed = config_for(tmp_path, db_url, allow_additional_datasets=True).pdis
    await changed_only(store, set())
    async with store.read() as session:
        assert await deposit_policy.undecided_ids(session, plain, SINCE) == [1, 2, 3, 4]
        assert await deposit_policy.undecided_ids(session, allowed, SINCE) == [1, 2, 3, 4, 9]
    # Changed, those whose decision can no longer change stay out: a published or submitted deposition,
    # one waiting for a person (they settle it), and one PDIS holds the code of unless more are allowed.
    await changed_only(store, set(range(1, len(states) + 1)))
    async with store.read() as session:
        assert await deposit_policy.undecided_ids(session, plain, SINCE) == [1, 2, 3, 4, 5]
        assert await deposit_policy.undecided_ids(session, allowed, SINCE) == [1, 2, 3, 4, 5, 9]


async def test_an_edit_of_the_pdb_codes_file_decides_everything_again(small: Store, tmp_path: Path,
                                                                     db_url: str) -> None:
    """Kills `policy_fingerprint` without the file's own fingerprint (None, or the file left unread): the
    same file, edited, is a new policy (no row changes when a person adds a code), so the next pass
    decides everything; a pass recorded under it is then valid again."""
    codes = tmp_path / "codes.csv"
    codes.write_text("X00001,6ABC\n")
    section = config_for(tmp_path, db_url, pdb_codes_file=str(codes)).pdis
    async with small.write() as session:
        await deposit_policy.record_pass(session, section, SINCE)
    async with small.read() as session:
        assert await decided_since(session, section) == SINCE - WATERMARK_MARGIN
    codes.write_text("X00001,6ABC\nX00003,7ABC\n")
    async with small.read() as session:
        assert await decided_since(session, section) is None
    async with small.write() as session:
        await deposit_policy.record_pass(session, section, SINCE)
    async with small.read() as session:
        assert await decided_since(session, section) == SINCE - WATERMARK_MARGIN
