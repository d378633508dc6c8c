"""The pieces of a person's decisions alone, on a real store: what a decision ends, what binds it, what the
jobs ask before packing, uploading and submitting, and the one table of what a person can do.

Each test names in its docstring the mistake (mutant) it is there to catch."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from sqlalchemy import select

from mirrord.config import PdisSection
from mirrord.jobs import person
from mirrord.jobs.datafiles import scan_dataset
from mirrord.jobs.deposit_policy import Decision
from mirrord.store import Store, decisions
from mirrord.store.models import Dataset, Deposition, PersonDecision
from mirrord.store.models import Session as SessionRow
from mirrord.ui import remedies
from tests.test_deposit_job import facts


async def rows(store: Store) -> list[PersonDecision]:
    async with store.read() as session:
        return await decisions.history(session)


# -- recording ----------------------------------------------------------------------------------------
async def test_a_decision_ends_the_ones_it_replaces_or_undoes_and_no_others(store):
    """Kills: ENDS tables swapped or emptied (a reopen leaving the dismissal in force, an approval ending
    a hold), `active` set for one-off actions, the new row ending itself."""
    async with store.write() as session:
        await decisions.record(session, "dataset", 7, "dismiss", reason="not ours", actor="ada")
        await decisions.record(session, "dataset", 8, "dismiss", reason="not ours either", actor="ada")
        await decisions.record(session, "job", "pdis", "hold", reason="maintenance", actor="bo")
    async with store.write() as session:
        reopened = await decisions.record(session, "dataset", 7, "reopen", reason="second look", actor="cy")
    found = {(r.kind, r.item_id, r.action): r for r in await rows(store)}
    assert not found["dataset", "7", "dismiss"].active
    assert found["dataset", "7", "dismiss"].ended_why == f"ended by decision {reopened.id} (reopen)"
    assert found["dataset", "8", "dismiss"].active  # another item's decision is untouched
    assert found["job", "pdis", "hold"].active  # another kind's too
    assert not found["dataset", "7", "reopen"].active and found["dataset", "7", "reopen"].ended_at is None
    async with store.write() as session:
        await decisions.record(session, "job", "pdis", "hold", reason="longer", actor="bo")
    async with store.read() as session:
        holds = await decisions.holds(session)
    assert [(h.item_id, h.reason) for h in holds.values()] == [("pdis", "longer")]  # replaced, not doubled
    assert any(r.ended_why and r.ended_why.startswith("replaced by decision") for r in await rows(store))


@pytest.mark.parametrize(("reason", "actor", "message"), [
    ("", "ada", "needs a reason"), ("   ", "ada", "needs a reason"), ("why", "", "needs the name"),
    ("why", " ", "needs the name")])
async def test_a_decision_needs_a_reason_and_a_person(store, reason, actor, message):
    """Kills: the empty-reason or empty-actor check dropped, or done before stripping."""
    async with store.write() as session:
        with pytest.raises(decisions.DecisionError, match=message):
            await decisions.record(session, "dataset", 1, "accept", reason=reason, actor=actor)
    assert await rows(store) == []


async def test_an_unknown_action_is_refused(store):
    async with store.write() as session:
        with pytest.raises(decisions.DecisionError, match="unknown action"):
            await decisions.record(session, "dataset", 1, "approve-all", reason="x", actor="y")


def test_the_default_actor_is_the_person_behind_sudo(monkeypatch):
    """Kills: SUDO_USER ignored (every decision under sudo recorded as root)."""
    monkeypatch.setenv("SUDO_USER", "ada")
    assert decisions.default_actor() == "ada"
    monkeypatch.delenv("SUDO_USER")
    assert decisions.default_actor()  # the login name


async def test_as_dict_names_the_item_and_the_person(store):
    async with store.write() as session:
        row = await decisions.record(session, "job", "pdis", "hold", reason="embargo", actor="ada")
        item = await decisions.record(session, "deposition", 12, "approve", reason="ok", actor="bo",
                                      bound={"tar_md5": "x"})
    assert decisions.as_dict(row) | {"at": None} == {
        "kind": "job", "id": "pdis", "decision": row.id, "action": "hold", "reason": "embargo", "by": "ada",
        "at": None, "bound": {}, "active": True, "ended_at": None, "ended_why": None}
    assert decisions.as_dict(item)["id"] == 12  # an item's id is a number, as `show` takes it


# -- what the deposit job asks ------------------------------------------------------------------------------
async def seeded(store: Store, tmp_path: Path, *, state: str = "complete") -> tuple[Dataset, Deposition]:
    directory = tmp_path / "data"
    directory.mkdir()
    for n in range(1, 4):
        (directory / f"x_{n:04d}.cbf").write_bytes(b"frame %d" % n)
    scan = scan_dataset(directory, "x_%04d.cbf", 3)
    async with store.write() as session:
        session.add(SessionRow(id=1, name="lb1-1", proposal="lb1"))
        await session.flush()
        dataset = Dataset(group_id=1, collection_id=1, session_id=1, session_name="lb1-1", proposal="lb1",
                          local_dir=str(directory), file_template="x_%04d.cbf", number_of_images=3, state=state,
                          files=list(scan.files), files_signature=scan.signature)
        session.add(dataset)
        await session.flush()
        dep = Deposition(dataset_id=dataset.id, state="packed", pdb_code="5ABC", tar_md5="m1")
        session.add(dep)
    return dataset, dep


def deposit(dataset: Dataset, code: str | None = "5ABC") -> tuple:
    return facts(dataset_id=dataset.id), Decision(True, "linked", "pdb", code)


async def test_an_approval_lets_only_what_it_was_bound_to_go(store, tmp_path):
    """Kills: the bound compared loosely (md5 or PDB code ignored), a mismatching approval kept in force,
    the gate asked before packing, the gate asked with approval = "none"."""
    dataset, dep = await seeded(store, tmp_path)
    gate = PdisSection(approval="required")
    f, decision = deposit(dataset)
    stop = await person.stop_for(store, gate, dep, f, decision, step="upload", instance="i")
    assert stop == person.Stop("awaiting_approval", 'waiting for a person\'s approval ([pdis] approval = "required")')
    assert await person.stop_for(store, gate, dep, f, decision, step="pack", instance="i") is None
    assert await person.stop_for(store, PdisSection(), dep, f, decision, step="submit", instance="i") is None
    async with store.write() as session:
        await decisions.record(session, "deposition", dep.id, "approve", reason="ok", actor="ada",
                               bound=person.approval_bound(dep, decision))
    for step in ("upload", "submit"):
        assert await person.stop_for(store, gate, dep, f, decision, step=step, instance="i") is None
    dep.tar_md5 = "m2"  # packed again from other bytes
    stop = await person.stop_for(store, gate, dep, f, decision, step="submit", instance="i")
    assert stop.state == "awaiting_approval" and stop.reason.startswith("the approval lapsed")
    [approval] = await rows(store)
    assert not approval.active and approval.ended_why.startswith("lapsed: approved for")
    dep.tar_md5 = "m1"  # lapsed stays lapsed, even if the md5 came back
    assert (await person.stop_for(store, gate, dep, f, decision, step="upload", instance="i")).state == \
        "awaiting_approval"


async def test_an_accepted_datasets_files_are_checked_at_every_step(store, tmp_path):
    """Kills: the fingerprint check skipped at a step, compared with the dataset's own (changing) signature
    instead of the accept's, or the lapse not recorded on the dataset."""
    dataset, dep = await seeded(store, tmp_path, state="complete")
    f, decision = deposit(dataset)
    async with store.write() as session:
        await decisions.record(session, "dataset", dataset.id, "accept", reason="checked", actor="ada",
                               bound={"files_signature": dataset.files_signature})
    for step in person.STEPS:
        assert await person.stop_for(store, PdisSection(), dep, f, decision, step=step, instance="i") is None
    (Path(dataset.local_dir) / "x_0002.cbf").write_bytes(b"rewritten")  # a size changes
    stop = await person.stop_for(store, PdisSection(), dep, f, decision, step="submit", instance="i")
    assert stop.state == "not_deposited"
    assert stop.reason.startswith(f"dataset {dataset.id} needs attention: the files changed after they were "
                                  "accepted by ada on ")
    async with store.read() as session:
        row = await session.get(Dataset, dataset.id)
        accept = await decisions.active(session, "dataset", dataset.id, "accept")
    assert row.state == "needs_attention" and row.reason.startswith("the files changed after they were accepted")
    assert row.files_signature == scan_dataset(Path(row.local_dir), "x_%04d.cbf", 3).signature  # what is there now
    assert accept is None


async def test_a_dataset_nobody_accepted_is_not_rescanned(store, tmp_path, monkeypatch):
    """Kills: the file check run for every deposition (a stat per file, per step, for every dataset)."""
    dataset, dep = await seeded(store, tmp_path)
    monkeypatch.setattr(person, "scan_dataset", lambda *a: pytest.fail("scanned a dataset nobody accepted"))
    f, decision = deposit(dataset)
    assert await person.stop_for(store, PdisSection(), dep, f, decision, step="upload", instance="i") is None


# -- the table of remedies ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("kind", "state", "actions"), [
    ("dataset", "needs_attention", ["accept", "dismiss"]), ("dataset", "missing", ["retry", "dismiss"]),
    ("deposition", "awaiting_approval", ["approve", "reject"]), ("deposition", "needs_attention", ["retry", "dismiss"]),
    ("upload", "failed", ["retry", "dismiss"]), ("annotation", "unmatched", ["retry", "dismiss"]),
    ("dataset", "dismissed", ["reopen"]), ("deposition", "published", []), ("dataset", "complete", [])])
def test_what_a_person_can_do_follows_the_state(kind, state, actions):
    assert [r.action for r in remedies.remedies(kind, 8, state)] == actions


def test_every_reason_ends_with_the_commands():
    found = remedies.remedies("dataset", 8, "needs_attention")
    assert remedies.explain("two runs wrote the same names.", found) == (
        "two runs wrote the same names. What you can do: `mirrord accept dataset 8 --reason TEXT` once you "
        "have checked that the files are this collection's, or `mirrord dismiss dataset 8 --reason TEXT` if "
        "they are not to be deposited")
    assert remedies.explain("all fine", []) == "all fine"
    assert remedies.remedies("deposition", 3, "failed")[0].command == "mirrord retry deposition 3"


def test_a_deposition_whose_code_is_carried_is_offered_dismissal_only():
    carried = remedies.remedies("deposition", 11, "needs_attention", carrier="deposition 17 already carries PDB 6FU6")
    assert [(r.action, r.when) for r in carried] == [
        ("dismiss", "since deposition 17 already carries PDB 6FU6: retrying would only supersede it")]
    assert [r.action for r in remedies.remedies("deposition", 16, "not_deposited", superseded=True)] == ["choose"]
    assert remedies.remedies("deposition", 16, "not_deposited") == []


async def test_choose_is_offered_only_while_the_winner_can_be_taken_back(store):
    """Kills: FINAL_STATES ignored (a button that is always refused) or the carrier lookup dropped."""
    async with store.write() as session:
        session.add(SessionRow(id=1, name="lb1-1", proposal="lb1"))
        await session.flush()
        for n in (1, 2):
            session.add(Dataset(id=n, group_id=n, collection_id=n, session_id=1, session_name="lb1-1",
                                proposal="lb1", state="complete"))
        await session.flush()
        winner = Deposition(dataset_id=1, state="uploaded", pdb_code="5ABC")
        loser = Deposition(dataset_id=2, state="not_deposited", pdb_code="5ABC",
                           status_details="superseded by collection 1 (deposition 1, uploaded) for PDB 5ABC")
        session.add_all([winner, loser])
    async with store.read() as session:
        offered = (await remedies.for_items(session, "deposition", [loser]))[loser.id]
    assert [r.action for r in offered] == ["choose"]
    async with store.write() as session:
        (await session.get(Deposition, winner.id)).state = "submitted"
    async with store.read() as session:
        offered = await remedies.for_items(session, "deposition", [SimpleNamespace(
            id=loser.id, state="not_deposited", pdb_code="5ABC", status_details=loser.status_details)])
    assert offered[loser.id] == []


async def test_an_item_a_worker_holds_is_not_dismissed_under_it(store, tmp_path):
    """Kills: the lease check dropped, so a packer's next step (`queued` -> `packing`) overwrote the
    dismissal and the deposition went on to PDIS."""
    import datetime as dt

    from mirrord.store.models import utcnow
    from mirrord.ui import actions

    _dataset, dep = await seeded(store, tmp_path)
    async with store.write() as session:
        row = await session.get(Deposition, dep.id)
        row.state, row.lease_owner, row.lease_until = "queued", "host:1", utcnow() + dt.timedelta(minutes=5)
    with pytest.raises(actions.InspectError, match="is being worked on by host:1"):
        await actions.dismiss(store, "deposition", str(dep.id), reason="no", actor="ada")
    assert await rows(store) == []
    async with store.write() as session:
        (await session.get(Deposition, dep.id)).lease_until = utcnow() - dt.timedelta(seconds=1)  # expired
    done = await actions.dismiss(store, "deposition", str(dep.id), reason="no", actor="ada")
    assert (done.from_state, done.to_state) == ("queued", "dismissed")


# -- what mutation testing showed untested (bench/mutation.sh on the three modules) -----------------------
async def test_active_decisions_are_an_items_own_of_its_own_kind_and_action(store):
    """Kills: `_active` without its kind, item or action filter (a dataset's dismissal read as the
    deposition of the same id's, or any item's accept as this one's), and `active_by_item` ignoring ids."""
    async with store.write() as session:
        await decisions.record(session, "dataset", 7, "dismiss", reason="r", actor="a")
        await decisions.record(session, "dataset", 8, "accept", reason="r", actor="a")
    async with store.read() as session:
        assert await decisions.active(session, "deposition", 7, "dismiss") is None
        assert await decisions.active(session, "dataset", 9, "dismiss") is None
        assert await decisions.active(session, "dataset", 7, "accept") is None
        assert (await decisions.active(session, "dataset", 7, "dismiss")).item_id == "7"
        assert list(await decisions.active_by_item(session, "dataset", "accept", [7, 9])) == []
        assert list(await decisions.active_by_item(session, "dataset", "accept", [8])) == ["8"]
        assert list(await decisions.active_by_item(session, "dataset", "accept", [])) == []
        assert list(await decisions.active_by_item(session, "dataset", "dismiss")) == ["7"]


async def test_history_is_newest_first_and_filters(store):
    """Kills: the order dropped or reversed, the kind or item filter dropped."""
    async with store.write() as session:
        for kind, item in (("dataset", 1), ("deposition", 1), ("dataset", 2)):
            await decisions.record(session, kind, item, "dismiss", reason=f"{kind} {item}", actor="a")
    async with store.read() as session:
        assert [r.reason for r in await decisions.history(session)] == ["dataset 2", "deposition 1", "dataset 1"]
        assert [r.reason for r in await decisions.history(session, "dataset")] == ["dataset 2", "dataset 1"]
        assert [r.reason for r in await decisions.history(session, "dataset", 1)] == ["dataset 1"]
        assert [r.reason for r in await decisions.history(session, limit=1)] == ["dataset 2"]


async def test_an_ended_decision_says_when_and_why_in_full_and_as_json(store):
    """Kills: `end` leaving ended_at unset, the why cut at another length; as_dict dropping the times."""
    async with store.write() as session:
        row = await decisions.record(session, "job", "pdis", "hold", reason="r", actor="a")
        decisions.end(row, "x" * 2500)
    assert row.ended_at is not None and row.ended_why == "x" * 2000
    shown = decisions.as_dict(row)
    assert shown["at"] == row.at.isoformat() and shown["ended_at"] == row.ended_at.isoformat()


@pytest.mark.parametrize(("reason", "actor", "message"), [
    ("", "ada", "a decision needs a reason (--reason TEXT): it is what the next person reads"),
    ("why", "", "a decision needs the name of the person deciding (--by NAME)")])
def test_what_a_refusal_to_record_says(reason, actor, message):
    with pytest.raises(decisions.DecisionError) as refused:
        decisions.check_who(reason, actor)
    assert str(refused.value) == message


@pytest.mark.parametrize(("action", "verb"), [
    ("accept", "accepted"), ("dismiss", "dismissed"), ("reopen", "reopened"), ("choose", "chosen"),
    ("approve", "approved"), ("reject", "rejected"), ("hold", "held"), ("resume", "resumed"), ("other", "other")])
def test_describe_says_who_did_what_when_and_why(action, verb):
    import datetime as dt

    row = PersonDecision(action=action, actor="ada", at=dt.datetime(2026, 12, 7, 10, 15, tzinfo=dt.UTC),
                         reason="checked")
    assert decisions.describe(row) == f"{verb} by ada on 2026-12-07 10:15 UTC: 'checked'"


async def test_a_lapse_is_recorded_as_this_instance_s_and_leaves_the_dataset_s_lease(store, tmp_path):
    """Kills: the lapse's event without its instance, the dataset's lease released by the deposit job
    (it is not the deposit job's to release), the lapse's reason reworded."""
    import datetime as dt

    from mirrord.store.models import Event, utcnow

    dataset, dep = await seeded(store, tmp_path)
    until = utcnow() + dt.timedelta(minutes=5)
    async with store.write() as session:
        row = await session.get(Dataset, dataset.id)
        row.lease_owner, row.lease_until = "ispyb@h", until
        await decisions.record(session, "dataset", dataset.id, "accept", reason="ok", actor="ada",
                               bound={"files_signature": dataset.files_signature})
    (Path(dataset.local_dir) / "x_0001.cbf").write_bytes(b"other")
    f, decision = deposit(dataset)
    assert (await person.stop_for(store, PdisSection(), dep, f, decision, step="pack", instance="pdis@h")).state \
        == "not_deposited"
    async with store.read() as session:
        row = await session.get(Dataset, dataset.id)
        [event] = (await session.scalars(select(Event).where(Event.item_type == "dataset"))).all()
        [accept] = await decisions.history(session, "dataset", dataset.id)
    assert row.lease_owner == "ispyb@h" and event.instance == "pdis@h"
    assert accept.ended_why == "lapsed: the files changed"


async def test_an_accept_of_a_dataset_since_removed_stops_nothing(store, tmp_path):
    """Kills: `accept is None or dataset is None` weakened to `and` (a crash on a removed dataset)."""
    dataset, dep = await seeded(store, tmp_path)
    async with store.write() as session:
        await decisions.record(session, "dataset", 999, "accept", reason="ok", actor="ada", bound={})
    f, decision = deposit(dataset)
    other = facts(dataset_id=999)
    assert await person.stop_for(store, PdisSection(), dep, other, decision, step="upload", instance="i") is None


async def test_an_approval_given_by_the_command_is_the_one_the_job_asks_for(store, tmp_path):
    """Kills: approval_bound's keys or values drifting from what `mirrord approve` records."""
    from mirrord.ui import actions

    dataset, dep = await seeded(store, tmp_path)
    async with store.write() as session:
        (await session.get(Deposition, dep.id)).state = "awaiting_approval"
    await actions.approve(store, ref=str(dep.id), reason="ok", actor="ada")
    f, decision = deposit(dataset)
    gate = PdisSection(approval="required")
    assert await person.stop_for(store, gate, dep, f, decision, step="upload", instance="i") is None
    stop = await person.stop_for(store, gate, dep, f, Decision(True, "x", "other", None), step="upload",
                                 instance="i")
    assert "now PDB other, archive md5 m1" in stop.reason


async def test_carriers_name_the_deposition_that_carries_a_code_even_for_a_row_without_one(store):
    """Kills: the experiment's code not read for a not-deposited row (its own pdb_code is None), the
    carrier's state or id misreported, a carrier in a local state, or the row itself, counted."""
    from mirrord.store.models import Experiment, Target

    async with store.write() as session:
        session.add(SessionRow(id=1, name="lb1-1", proposal="lb1"))
        session.add(Target(id=1, name="T", tas="lb1-1"))
        await session.flush()
        session.add(Experiment(id=1, target_id=1, upload_index=1, code="E1", pdb_code="5abc"))
        await session.flush()
        for n in (1, 2, 3, 4):
            session.add(Dataset(id=n, group_id=n, collection_id=n, session_id=1, session_name="lb1-1",
                                proposal="lb1", state="complete", experiment_id=1))
        await session.flush()
        session.add_all([Deposition(id=10, dataset_id=1, state="queued", pdb_code="5ABC"),
                         Deposition(id=11, dataset_id=2, state="published", pdb_code="5ABC"),
                         Deposition(id=12, dataset_id=3, state="not_deposited", pdb_code=None,
                                    status_details="superseded by collection 2 for PDB 5ABC"),
                         Deposition(id=13, dataset_id=4, state="needs_attention", pdb_code="5ABC")])
    async with store.read() as session:
        rows = (await session.scalars(select(Deposition).order_by(Deposition.id))).all()
        carried = await remedies.carriers(session, rows)
        offered = await remedies.for_items(session, "deposition", rows)
        assert await remedies.carriers(session, [SimpleNamespace(id=1, pdb_code=None)]) == {}
    assert carried == {10: (11, "published", "5ABC"), 12: (11, "published", "5ABC"), 13: (11, "published", "5ABC")}
    assert offered[12] == []  # superseded by a published winner: nothing to choose
    assert [(r.action, r.when) for r in offered[13]] == [
        ("dismiss", "since deposition 11 already carries PDB 5ABC (published): retrying would only supersede it")]


def test_a_failed_deposition_whose_code_is_carried_and_reasons_without_text():
    """Kills: the carried case limited to needs_attention; explain with no reason or a trailing stop."""
    carried = remedies.remedies("deposition", 5, "failed", carrier="deposition 2 already carries PDB 5ABC")
    assert [r.action for r in carried] == ["dismiss"]
    found = remedies.remedies("dataset", 3, "missing")
    assert remedies.explain("", found).startswith("no reason recorded. What you can do: `mirrord retry dataset 3`")
    assert remedies.explain("gone. ", found).startswith("gone. What you can do:")
    assert remedies.advice([remedies.Remedy("retry", "upload", "1", "")]) == "`mirrord retry upload 1`"


async def test_carriers_match_each_row_to_its_own_code(store):
    """Kills: the carrier query without its code filter (another code's publication taken for this
    one's), the experiment read through a wrong join or for another dataset, the command without its id,
    and carriers looked up for items that are not depositions."""
    from mirrord.store.models import Experiment, Target

    async with store.write() as session:
        session.add(SessionRow(id=1, name="lb1-1", proposal="lb1"))
        session.add(Target(id=1, name="T", tas="lb1-1"))
        await session.flush()
        session.add_all([Experiment(id=1, target_id=1, upload_index=1, code="E1", pdb_code="5abc"),
                         Experiment(id=2, target_id=1, upload_index=1, code="E2", pdb_code="6DEF")])
        await session.flush()
        for n, experiment in ((1, 1), (2, 2), (3, 2), (4, None)):
            session.add(Dataset(id=n, group_id=n, collection_id=n, session_id=1, session_name="lb1-1",
                                proposal="lb1", state="needs_attention", experiment_id=experiment))
        await session.flush()
        session.add_all([Deposition(id=21, dataset_id=1, state="published", pdb_code="5ABC"),
                         Deposition(id=22, dataset_id=2, state="needs_attention", pdb_code=None),
                         Deposition(id=23, dataset_id=3, state="published", pdb_code="6DEF"),
                         Deposition(id=24, dataset_id=4, state="failed", pdb_code=None)])  # no code at all
    async with store.read() as session:
        rows = (await session.scalars(select(Deposition).order_by(Deposition.id))).all()
        assert await remedies.carriers(session, rows) == {22: (23, "published", "6DEF")}
        offered = await remedies.for_items(session, "deposition", rows)
        datasets = (await session.scalars(select(Dataset).order_by(Dataset.id))).all()
        by_dataset = await remedies.for_items(session, "dataset", datasets)
    assert [r.command for r in offered[22]] == ["mirrord dismiss deposition 22 --reason TEXT"]
    assert [r.command for r in by_dataset[1]] == ["mirrord accept dataset 1 --reason TEXT",
                                                  "mirrord dismiss dataset 1 --reason TEXT"]
