"""The deposition policy's edges, as pure functions (issue 23: mutants of deposit_policy.py that lived).

tests/test_deposit_job.py holds the policy's main table and runs it end to end; these are the
boundaries and branches a mutation run found unasserted: where a limit is exact, which competitor
wins a PDB code at each stage, how far a deposition has gone, and how equipment and names are made.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import replace
from typing import Any

import pytest

from mirrord.clients.pdis import Beamline, Synchrotron
from mirrord.config import TITLE_FIELDS, ConfigError, PdisSection, load_config
from mirrord.jobs.deposit_policy import (
    Decision,
    Equipment,
    decide,
    decide_all,
    decision_for,
    needs_equipment,
    plan,
    policy_fingerprint,
    render_title,
    resolve_equipment,
)
from mirrord.store.models import Dataset, Deposition, utcnow
from tests.test_deposit_job import (  # noqa: F401 - pytest fixtures
    add_datasets,
    campaign,
    config_for,
    emulator,
    facts,
    open_store,
    served,
)

T0 = dt.datetime(2026, 3, 10, 9, 31, tzinfo=dt.UTC)
ALL = {"deposit": "all", "authors": "Smith J."}


@pytest.mark.parametrize(("section", "overrides", "expected"), [
    ({}, {"pdb_code": "5ABC", "local_dir": None}, "not deposited: dataset has no files on disk"),
    ({}, {"pdb_code": "5ABC", "files": ()}, "not deposited: dataset has no files on disk"),
    ({}, {"pdb_code": "5ABC", "dataset_state": "eligible"}, "deposit as 5ABC"),
    ({"include_beamlines": ["i03"]}, {"pdb_code": "5ABC"}, "not deposited: beamline i04-1 is not in include_beamlines"),
    ({"include_beamlines": ["i03"]}, {"pdb_code": "5ABC", "beamline": None},
     "not deposited: beamline None is not in include_beamlines"),
    ({"exclude_beamlines": ["i03"]}, {"pdb_code": "5ABC", "beamline": None}, "deposit as 5ABC"),
    ({"include_proposals": ["LB32627"]}, {"pdb_code": "5ABC"}, "deposit as 5ABC"),
    ({}, {"pdb_code": "5ABC", "number_of_images": None},
     "not deposited: 0 images: a screening shot, not a dataset (min_images = 10)"),
    ({}, {"pdb_code": "5ABC", "number_of_images": 9},
     "not deposited: 9 images: a screening shot, not a dataset (min_images = 10)"),
    ({}, {"pdb_code": "5ABC", "number_of_images": 10}, "deposit as 5ABC"),
    ({"min_images": 1}, {"pdb_code": "5ABC", "number_of_images": None},
     "not deposited: 0 images: a screening shot, not a dataset (min_images = 1)"),
    ({"deposit": "none"}, {"pdb_code": "5ABC"}, "not deposited: policy: deposit = none"),
    ({}, {"pdb_code": "5ABC", "dataset_state": "waiting"}, "not deposited: dataset is waiting, not complete"),
    ({}, {}, "not deposited: not linked to a Fragalysis experiment (policy: linked)"),
    ({"experiment_types": ["OSC", "SAD"]}, {"pdb_code": "5ABC", "experiment_type": "Mesh"},
     "not deposited: experiment type Mesh is not a rotation dataset (deposited: OSC, SAD)"),
    ({"experiment_types": ["osc"]}, {"pdb_code": "5ABC", "experiment_type": "OSC"}, "deposit as 5ABC"),
    ({"deposit": "linked"}, {"pdb_code": None, "experiment_code": "X-1"},
     "not deposited: experiment X-1 has no PDB code yet (policy: linked)"),
    # A title of exactly the minimum length goes; one shorter does not.
    ({**ALL, "title_template": "{visit}"}, {"session_name": "lb1234-56"},
     "not deposited: title 'lb1234-56' is shorter than 10 characters"),
    ({**ALL, "title_template": "{visit}"}, {"session_name": "lb1234-567"}, "deposit as other: 'lb1234-567'"),
    ({**ALL, "authors": "   "}, {}, "not deposited: authors is not configured (required without a PDB code)"),
    # A person's file that agrees with Fragalysis, whatever the case, is no conflict; one that disagrees is.
    ({}, {"pdb_code": "5abc", "listed_pdb": "5ABC", "experiment_code": "X"}, "deposit as 5ABC"),
    ({}, {"pdb_code": "5abc", "listed_pdb": "6DEF", "experiment_code": "X"},
     "not deposited: Fragalysis gives experiment X PDB code 5ABC, the pdb_codes_file gives 6DEF: correct the file, "
     "or dismiss the deposition"),
])
def test_policy_edges(section, overrides, expected):
    """Also kills `decide`'s `.lower()` for `.upper()` in the comparison with the file, and the conflict's
    words and its `deposit=None`."""
    decision = decide(facts(**overrides), PdisSection(**section))
    assert decision.summary == expected
    assert decision.deposit is expected.startswith("deposit as")  # a bool: `plan --json` prints it


def test_a_deposit_without_pdb_code_carries_title_and_stripped_authors():
    decision = decide(facts(), PdisSection(deposit="all", authors="  Smith J., Doe A.  "))
    assert decision == Decision(True, "complete dataset (policy: all)", "other", None,
                                "Raw diffraction data for A71EV2A-x0152 (lb32627, i04-1, collection 7)",
                                "Smith J., Doe A.")
    assert needs_equipment(decision) and not needs_equipment(replace(decision, deposit=False))
    linked = decide(facts(pdb_code="5abc", experiment_code="X"), PdisSection())
    assert (linked.dataset_type, linked.pdb_code, linked.title, linked.authors) == ("pdb", "5ABC", None, None)
    assert linked.reason == "linked to X with PDB code 5abc" and not needs_equipment(linked)
    # A code from the person's file is a PDB deposition too (kills its "pdb" dataset type changed).
    listed = decide(facts(listed_pdb="6ABC"), PdisSection())
    assert (listed.dataset_type, listed.pdb_code, listed.title, listed.authors) == ("pdb", "6ABC", None, None)
    assert listed.reason == "A71EV2A-x0152 has PDB code 6ABC in the pdb_codes_file" and not needs_equipment(listed)


def test_the_default_title_tells_two_sweeps_of_one_sample_apart():
    """Collections 40514 and 40515 of one sample got the same PDIS title: the default names the collection."""
    first, second = (decide(facts(collection_id=cid, run_number=run), PdisSection(**ALL)).title
                     for cid, run in ((40514, 1), (40515, 2)))
    assert first == "Raw diffraction data for A71EV2A-x0152 (lb32627, i04-1, collection 40514)"
    assert second == "Raw diffraction data for A71EV2A-x0152 (lb32627, i04-1, collection 40515)"
    # Even two that ISPyB gave the same run number (a re-collection over a failed run's template).
    assert render_title(PdisSection().title_template, facts(collection_id=1, run_number=1)) != \
        render_title(PdisSection().title_template, facts(collection_id=2, run_number=1))


@pytest.mark.parametrize(("template", "problem"), [
    ("{nope}", "unknown placeholder {nope}"),
    ("{sample!r:>{width}}", "unknown placeholder {width}"),
    ("{0}", "placeholders are named, not numbered or empty"),
    ("{}", "placeholders are named, not numbered or empty"),
    ("{sample", "not a valid template (expected '}' before end of string)"),
    ("{run:d}", "not a valid template (Unknown format code 'd'"),
])
def test_an_unknown_title_placeholder_is_a_config_error_naming_the_key(tmp_path, template, problem):
    path = tmp_path / "c.toml"
    path.write_text(f"[pdis]\ntitle_template = {json.dumps(template)}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    [said] = err.value.problems
    assert said.startswith("pdis.title_template: ") and problem in said, said
    assert "{collection}" in said and "{run}" in said  # and says what it may name


def test_every_offered_placeholder_is_filled_in():
    title = render_title(" ".join(f"<{{{name}}}>" for name in TITLE_FIELDS), facts(collection_id=40515, run_number=2))
    assert title == "<A71EV2A-x0152> <2> <40515> <lb32627> <lb32627-66> <i04-1> <A71EV2A>"
    assert render_title("{sample} run {run}", facts(run_number=None)) == "A71EV2A-x0152 run"


def test_a_template_that_escaped_validation_never_crashes_the_decision():
    section = PdisSection(**ALL).model_copy(update={"title_template": "{nope}"})
    """Also kills its `deposit=None` (`plan --json` prints a bool)."""
    decision = decide(facts(), section)
    assert decision.summary == "not deposited: title_template cannot be filled in: 'nope'"
    assert decision.deposit is False


def test_titles_collapse_the_blanks_that_empty_fields_leave():
    assert render_title("  {protein}   {sample}  ", facts(protein_acronym=None)) == "A71EV2A-x0152"
    assert render_title("{sample}|{protein}", facts(sample_name=None)) == "|A71EV2A"
    assert render_title("{beamline}|{protein}", facts(beamline=None, protein_acronym=None)) == "|"


# -- how far a deposition has gone, and who wins a PDB code ------------------------------------------------
@pytest.mark.parametrize(("state", "flags", "stage"), [
    (None, {}, 0), ("queued", {}, 0), ("packing", {}, 0), ("dry_run", {}, 0), ("not_deposited", {}, 0),
    ("needs_attention", {}, -1), ("failed", {}, -1),
    ("uploading", {}, 1), ("uploaded", {"uploaded": True}, 1), ("withdrawing", {"uploaded": True}, 1),
    ("needs_attention", {"uploaded": True}, 1), ("failed", {"uploaded": True}, 1),
    ("queued", {"uploaded": True}, 0),  # uploaded once, then back to packing: still ours to change
    ("submitted", {}, 2), ("published", {}, 2), ("already_in_pdis", {"uploaded": True}, 2),
    ("needs_attention", {"uploaded": True, "submitted": True}, 2), ("failed", {"submitted": True}, 2),
])
def test_how_far_a_deposition_has_gone(state, flags, stage):
    assert facts(deposition_state=state, **flags).stage == stage


def rival(dataset_id: int, minutes: int, **overrides: Any):
    base = dict(dataset_id=dataset_id, collection_id=90400 + dataset_id, pdb_code="5ABC",
                collected_at=T0 + dt.timedelta(minutes=minutes))
    return facts(**{**base, **overrides})


def winners(group, **section: Any) -> list[int]:
    return sorted(i for i, d in decide_all(group, PdisSection(**section)).items() if d.deposit)


def test_one_winner_per_pdb_code_by_stage_then_preference():
    """Also kills `decide_all`'s `stage >= 2` as `> 2` or `>= 3`, and `_superseded`'s words for a person's
    choice: what cannot be taken back beats a person's choice, which beats every preference."""
    older, newer = rival(1, 0), rival(2, 15)
    assert winners([older, newer]) == [2] and winners([older, newer], prefer="oldest") == [1]
    # The same end time: the higher collection id is the newer one.
    same = rival(3, 0, collection_id=90500)
    assert winners([older, same]) == [3] and winners([older, same], prefer="oldest") == [1]
    # No end time counts as the oldest.
    unknown = rival(4, 0, collected_at=None)
    assert winners([older, unknown]) == [1] and winners([older, unknown], prefer="oldest") == [4]
    # A later stage beats any preference: on PDIS (1) beats local (0), final (2) beats on PDIS.
    sent = replace(older, deposition_state="uploading", deposition_id=11)
    assert winners([sent, newer]) == [1]
    final = replace(newer, deposition_state="submitted", deposition_id=12)
    assert winners([sent, final]) == [2]
    chosen = replace(older, deposition_state="queued", deposition_id=14, chosen=True)
    assert winners([chosen, newer]) == [1] and winners([chosen, final]) == [2]
    assert decide_all([chosen, newer], PdisSection())[2].reason == \
        "superseded by collection 90401 (chosen by a person) for PDB 5ABC"
    # One that stopped locally (-1) competes no more (it supersedes nobody; the job leaves it where it
    # rests), nor does one the policy refuses.
    stopped = replace(newer, deposition_state="needs_attention", deposition_id=13)
    assert winners([older, stopped]) == [1, 2]
    shot = replace(newer, number_of_images=3)
    assert winners([older, shot]) == [1]
    # Codes are compared without case; different codes do not compete.
    assert winners([rival(1, 0, pdb_code="5abc"), rival(2, 15, pdb_code="5ABC")]) == [2]
    assert winners([rival(1, 0), rival(2, 15, pdb_code="6DEF")]) == [1, 2]
    assert decide_all([older, newer], PdisSection())[1].deposit is False
    # Without a PDB code nothing competes: every unlinked dataset goes (policy: all).
    unlinked = [rival(1, 0, pdb_code=None), rival(2, 15, pdb_code=None)]
    assert winners(unlinked, **ALL) == [1, 2]


def test_a_stopped_deposition_that_reached_pdis_still_holds_its_code():
    """It was uploaded before it stopped (stage 1): its archive may be on PDIS, so no rival goes."""
    held = rival(1, 0, deposition_state="needs_attention", deposition_id=11, uploaded=True)
    decisions = decide_all([held, rival(2, 15)], PdisSection())
    assert decisions[2].reason == "superseded by collection 90401 for PDB 5ABC"


# -- equipment and archive names -------------------------------------------------------------------------------
SYNCHROTRONS = [Synchrotron(25, "APS", beamlines=[Beamline(42, "I04-1")]),
                Synchrotron(12, "Diamond", beamlines=[Beamline(30, "I03"), Beamline(32, "I04-1")])]


@pytest.mark.parametrize(("beamline", "section", "expected"), [
    ("i04-1", {}, Equipment(12, 32)),  # the configured synchrotron's beamline, not APS's of that name
    (" I03 ", {}, Equipment(12, 30)),
    ("i04-1", {"synchrotron": "aps"}, Equipment(25, 42)),
    ("I99", {"equipment": {"i99": {"synchrotron_id": 7, "beamline_id": 21}}}, Equipment(7, 21)),
    ("i03", {"equipment": {"I03": {"synchrotron_id": 25, "beamline_id": 43}}}, Equipment(25, 43)),
    ("i99", {}, Equipment(other="Diamond i99")),
    (None, {}, Equipment(other="Diamond")),
    ("i03", {"synchrotron": "ESRF"}, Equipment(other="ESRF i03")),
])
def test_equipment_is_resolved_override_first_then_by_name(beamline, section, expected):
    assert resolve_equipment(beamline, PdisSection(**section), SYNCHROTRONS) == expected


@pytest.mark.parametrize(("overrides", "root"), [
    ({}, "A71EV2A-x0152_7"),
    ({"sample_name": "odd name/with:chars"}, "odd_name_with_chars_7"),
    ({"sample_name": None, "local_dir": "/data/visit/run_3/"}, "run_3_7"),
    ({"sample_name": None, "local_dir": None}, "dataset_7"),
])
def test_the_archive_root_is_stable_and_safe(overrides, root):
    assert facts(**overrides).archive_root == root


# -- the policy over the store: which datasets are considered -----------------------------------------------
async def test_a_submitted_rival_holds_its_code_after_its_dataset_changed(tmp_path, campaign, served):  # noqa: F811
    """Kills the mutants of `_considered` that keep only complete datasets: a collection submitted to
    PDIS, whose files were then found missing, still holds its PDB code; `plan` lists it, and an
    incomplete dataset without a deposition only when it has one."""
    config = config_for(tmp_path, served)
    target = campaign.targets[0]
    crystal = next(e for e in target.experiments if e.pdb_code)
    first = next(c for c in campaign.collections if c.sample == crystal.code)
    again = campaign.add_collection(target.tas, crystal.code, beamline=target.beamline)
    ours, theirs = await add_datasets(config, campaign, tmp_path / "dls", [again, first])
    other = next(c for c in campaign.collections if c.sample != crystal.code)
    [waiting] = await add_datasets(config, campaign, tmp_path / "dls", [other])
    store = await open_store(config)
    try:
        async with store.write() as session:
            session.add(Deposition(dataset_id=theirs, state="submitted", submitted_at=utcnow(),
                                   pdb_code=crystal.pdb_code, upload_token="t"))
            (await session.get(Dataset, theirs)).state = "missing"
            (await session.get(Dataset, waiting)).state = "waiting"
        async with store.read() as session:
            _facts, decision = await decision_for(session, ours, config.pdis)
            listed = {entry.facts.dataset_id async for entry in plan(session, config.pdis)}
    finally:
        await store.close()
    assert decision.reason == f"superseded by collection {first.collection_id} for PDB {crystal.pdb_code}"
    assert theirs in listed and ours in listed and waiting not in listed


async def test_the_facts_are_read_whole_from_the_store(tmp_path, campaign, served):  # noqa: F811
    """Kills the mutants of `_facts` that drop or replace one field (the run number too, which titles may
    name): every fact the policy (and the packer) reads, from the dataset, its experiment and its deposition."""
    config = config_for(tmp_path, served)
    col = next(c for c in campaign.collections if campaign.experiment(c.sample)[1].pdb_code)
    [dataset_id] = await add_datasets(config, campaign, tmp_path / "dls", [col])
    store = await open_store(config)
    try:
        async with store.write() as session:
            deposition = Deposition(dataset_id=dataset_id, state="uploaded", upload_token="tok",
                                    submitted_at=None)
            session.add(deposition)
            (await session.get(Dataset, dataset_id)).run_number = 3
            await session.flush()
            deposition_id = deposition.id
        async with store.read() as session:
            found, _decision = await decision_for(session, dataset_id, config.pdis)
            row = await session.get(Dataset, dataset_id)
        async with store.write() as session:
            (await session.get(Deposition, deposition_id)).submitted_at = utcnow()
        async with store.read() as session:
            submitted, _decision = await decision_for(session, dataset_id, config.pdis)
    finally:
        await store.close()
    assert submitted == replace(found, submitted=True)
    experiment = campaign.experiment(col.sample)[1]
    assert found == facts(
        dataset_id=dataset_id, dataset_state="complete", collection_id=col.collection_id, proposal=row.proposal,
        beamline=col.beamline, session_name=col.session, sample_name=col.sample, protein_acronym=row.protein_acronym,
        local_dir=row.local_dir, files=tuple(row.files), total_bytes=row.total_bytes,
        experiment_type=col.experiment_type, number_of_images=col.images, run_number=3, collected_at=row.end,
        experiment_code=col.sample, pdb_code=experiment.pdb_code, deposition_id=deposition_id,
        deposition_state="uploaded", uploaded=True, submitted=False)
    assert found.protein_acronym and found.total_bytes and found.files and found.collected_at is not None
    assert found.collected_at != row.start  # the end time, not the start


def test_a_policy_s_fingerprint_is_its_settings_not_their_order():
    """Kills `policy_fingerprint`'s `sort_keys` off: the same equipment table written in another order is
    the same policy (a full decision pass for nothing otherwise); a changed entry is another."""
    first = {"I04-1": {"synchrotron_id": 1, "beamline_id": 7}, "I03": {"synchrotron_id": 1, "beamline_id": 3}}
    again = dict(reversed(first.items()))
    assert list(again) != list(first)
    assert policy_fingerprint(PdisSection(equipment=first)) == policy_fingerprint(PdisSection(equipment=again))
    moved = {**first, "I03": {"synchrotron_id": 1, "beamline_id": 4}}
    assert policy_fingerprint(PdisSection(equipment=moved)) != policy_fingerprint(PdisSection(equipment=first))
