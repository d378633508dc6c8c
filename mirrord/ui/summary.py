"""What the store says about the pipeline, as JSON-ready data (`summary`), and the item gauges of /metrics.

`mirrord status`, the web page and /metrics all read the store the same way, so they never disagree.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from sqlalchemy import desc, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from mirrord.redact import redact
from mirrord.store import Store, decisions
from mirrord.store.counts import item_counts
from mirrord.store.items import why
from mirrord.store.keyvalue import IDENTITY_KEY
from mirrord.store.models import (
    AWAITING_APPROVAL,
    DISMISSED,
    FAILED_STATES,
    ITEM_MODELS,
    Annotation,
    Dataset,
    Deposition,
    Event,
    Experiment,
    JobRun,
    KeyValue,
    Target,
    Upload,
    utcnow,
)
from mirrord.store.scans import short_sessions
from mirrord.ui import remedies

# The order work flows in, so tables read top to bottom; problems first, unknown states last.
PIPELINE = ("needs_attention", "failed", "waiting_settle", "building", "fetching", "extracting", "mirrored",
            "discovered", "waiting", "missing", "complete", "eligible", "skipped", "queued", "packing",
            "packed", AWAITING_APPROVAL, "uploading", "uploaded", "withdrawing", "submitted", "pending",
            "validated", "published", "already_in_pdis", "dry_run", "not_deposited", "attaching", "tagging",
            "attached", "unmatched", "superseded", DISMISSED)
_RANK = {state: n for n, state in enumerate(PIPELINE)}
# How a state reads at a glance, on the page and in the terminal: a problem, or work done.
PROBLEM_STATES = ("failed", "needs_attention", "failing", "identity", "unmatched", "short_scan")
DONE_STATES = ("published", "mirrored", "attached", "ok")


def state_rank(state: str | None) -> int:
    return _RANK.get(state or "", len(PIPELINE))


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _text(value: str | None) -> str:
    return redact(value) if value else ""


# -- data -------------------------------------------------------------------------------------------
async def summary(store: Store, *, health: Mapping[str, Any] | None = None, instance: str | None = None,
                  recent: int = 20, rows: int = 25) -> dict[str, Any]:
    """Everything an operator looks at, as JSON-ready data.

    `health` is the runner's per-job `Health` (a live daemon knows which jobs are failing right now);
    without it (the `status` command) a job's state is read from its most recent recorded run.
    Lists hold the `rows` most recent entries (a year leaves thousands: reading and drawing them all
    made every look slower each month); `attention_total` counts every one that needs a person.
    """
    async with store.read() as session:
        jobs = _jobs_from_health(health) if health is not None else await _jobs_from_runs(session)
        counts = await _counts(session)
        attention = [*await _attention_items(session, rows), *await _unmatched(session, rows),
                     *await _identity_problems(session), *await _short_scans(session), *_failing_jobs(jobs)]
        attention.sort(key=lambda a: a["since"] or "", reverse=True)
        listed = {kind: sum(a["kind"] == kind and a["state"] in (*FAILED_STATES, "unmatched") for a in attention)
                  for kind in ITEM_MODELS}
        unlisted = sum(n for kind, states in counts.items() for state, n in states.items()
                       if state in FAILED_STATES or (kind, state) == ("annotation", "unmatched")) - sum(listed.values())
        return {
            "generated_at": utcnow().isoformat(),
            "instance": instance,
            "attention_total": len(attention) + unlisted,
            "items": counts,
            "targets": await _targets(session),
            "depositions": await _depositions(session, rows),
            "datasets": await _datasets(session, rows),
            "attention": attention[:rows],
            "approvals": await approvals(session, rows),
            "holds": [decisions.as_dict(h) for h in (await decisions.holds(session)).values()],
            "decisions": [decisions.as_dict(d) for d in await decisions.history(session, limit=recent)],
            "jobs": jobs,
            "runs": await _runs(session, recent),
            "events": await _events(session, recent),
        }


def empty_summary(note: str) -> dict[str, Any]:
    """The shape of `summary` when there is no store to read yet; `note` says why."""
    return {"generated_at": utcnow().isoformat(), "instance": None, "note": note, "attention_total": 0,
            "items": {}, "targets": [],
            "depositions": [], "datasets": [], "attention": [], "approvals": [], "holds": [], "decisions": [],
            "jobs": [], "runs": [], "events": []}


async def approvals(session: AsyncSession, limit: int | None = None) -> list[dict[str, Any]]:
    """Depositions waiting for a person's approval, oldest first: what `mirrord approve` lets go."""
    rows = (await session.execute(
        select(Deposition, Dataset).join(Dataset, Dataset.id == Deposition.dataset_id)
        .where(Deposition.state == AWAITING_APPROVAL).order_by(Deposition.updated_at).limit(limit))).all()
    return [{"id": d.id, "pdb_code": d.pdb_code, "sample": ds.sample_name, "session": ds.session_name,
             "proposal": ds.proposal, "dataset": ds.id, "archive_bytes": d.zst_size, "tar_md5": d.tar_md5,
             "since": _iso(d.updated_at), "command": f"mirrord approve deposition {d.id} --reason TEXT"}
            for d, ds in rows]


async def waiting_for_a_person(session: AsyncSession, limit: int = 500) -> tuple[list[dict[str, Any]],
                                                                               list[dict[str, Any]]]:
    """The items that need a person (each reason ending with its commands) and the approvals waiting,
    as /status lists them (newest first; approvals oldest first): what the webhook's digest announces."""
    items = sorted(await _attention_items(session, limit), key=lambda a: a["since"] or "", reverse=True)
    return items, await approvals(session, limit)


async def _counts(session: AsyncSession) -> dict[str, dict[str, int]]:
    """Items by kind and state, in pipeline order: from the counts kept as items move (never by counting
    the item tables, which read every row a year leaves, on every look)."""
    return {kind: dict(sorted(states.items(), key=lambda s: state_rank(s[0])))
            for kind, states in (await item_counts(session)).items()}


async def _oldest_changes(session: AsyncSession, counts: dict[str, dict[str, int]]) -> dict[tuple[str, str], Any]:
    """The oldest change of each (kind, state) that holds items: one seek of the (state, updated_at) index
    each, all in one query a kind."""
    oldest: dict[tuple[str, str], Any] = {}
    for kind, states in counts.items():
        model = ITEM_MODELS[kind]
        names = [state for state, n in states.items() if n > 0]
        if names:
            row = (await session.execute(select(*(
                select(func.min(model.updated_at)).where(model.state == state).scalar_subquery()
                for state in names)))).one()
            oldest.update({(kind, state): when for state, when in zip(names, row, strict=True)})
    return oldest


async def _targets(session: AsyncSession) -> list[dict[str, Any]]:
    targets = (await session.scalars(select(Target).order_by(Target.tas, Target.name))).all()
    return [{"id": t.id, "name": t.name, "tas": t.tas, "latest_upload": t.latest_upload,
             "mirrored_upload": t.mirrored_upload, "mirrored_at": _iso(t.mirrored_at)} for t in targets]


async def _depositions(session: AsyncSession, limit: int) -> list[dict[str, Any]]:
    rows = (await session.execute(
        select(Deposition, Dataset).join(Dataset, Dataset.id == Deposition.dataset_id)
        .order_by(desc(Deposition.updated_at)).limit(limit))).all()
    result = [{"id": d.id, "state": d.state, "pdb_code": d.pdb_code, "sample": ds.sample_name,
               "session": ds.session_name, "dataset": ds.id, "pdis_status": d.pdis_status,
               "status_details": _text(d.status_details), "upload_token": d.upload_token,
               "error": _text(d.last_error), "updated_at": _iso(d.updated_at)} for d, ds in rows]
    result.sort(key=lambda r: state_rank(r["state"]))  # stable: newest first within a state
    return result


async def _datasets(session: AsyncSession, limit: int) -> list[dict[str, Any]]:
    rows = (await session.execute(
        select(Dataset, Experiment.code, Deposition.state)
        .outerjoin(Experiment, Experiment.id == Dataset.experiment_id)
        .outerjoin(Deposition, Deposition.dataset_id == Dataset.id)
        .order_by(desc(Dataset.updated_at)).limit(limit))).all()
    result = [{"id": d.id, "state": d.state, "sample": d.sample_name, "session": d.session_name,
               "beamline": d.beamline, "collection_id": d.collection_id, "experiment": code,
               "reason": _text(d.reason or d.last_error), "deposition_state": dep_state,
               "updated_at": _iso(d.updated_at)} for d, code, dep_state in rows]
    result.sort(key=lambda r: state_rank(r["state"]))
    return result


async def _labels(session: AsyncSession, kind: str, items: list[Any]) -> dict[int, str]:
    """Names a person recognises for each item (sample, target, evidence) rather than bare ids."""
    ids = [i.id for i in items]
    if not ids:
        return {}
    if kind == "upload":
        rows = await session.execute(select(Upload.id, Target.name, Target.tas, Upload.upload_index)
                                     .join(Target, Target.id == Upload.target_id).where(Upload.id.in_(ids)))
        return {i: f"{name} ({tas}) upload {n}" for i, name, tas, n in rows}
    if kind == "dataset":
        return {i.id: f"{i.sample_name or '?'} ({i.session_name}, collection {i.collection_id})" for i in items}
    if kind == "deposition":
        rows = await session.execute(select(Deposition.id, Dataset.sample_name, Dataset.session_name)
                                     .join(Dataset, Dataset.id == Deposition.dataset_id)
                                     .where(Deposition.id.in_(ids)))
        codes = {i.id: i.pdb_code for i in items}
        return {i: f"{sample or '?'} ({sess})" + (f" PDB {codes[i]}" if codes[i] else "")
                for i, sample, sess in rows}
    if kind == "annotation":
        return {i.id: i.evidence_key for i in items}
    return {}


async def _attention_items(session: AsyncSession, limit: int) -> list[dict[str, Any]]:
    found = []
    for kind, model in ITEM_MODELS.items():
        items = []
        for state in FAILED_STATES:  # a state at a time: each the newest `limit` by its (state, updated_at)
            items += (await session.scalars(select(model).where(model.state == state)  # index; an IN read all
                                            .order_by(desc(model.updated_at)).limit(limit))).all()
        items = sorted(items, key=lambda item: item.updated_at, reverse=True)[:limit]
        labels = await _labels(session, kind, items)
        advice = await remedies.for_items(session, kind, items)
        found += [{"kind": kind, "id": item.id, "label": labels.get(item.id, ""), "state": item.state,
                   "reason": remedies.explain(why(kind, item), advice[item.id]),
                   "actions": [r.action for r in advice[item.id]], "since": _iso(item.updated_at)}
                  for item in items]
    return found


async def _unmatched(session: AsyncSession, limit: int) -> list[dict[str, Any]]:
    """Fragalysis ligands with no Design Hub compound: a chemist registers it (or it is not ours)."""
    rows = (await session.execute(
        select(Annotation, Experiment.compound_code, Experiment.smiles)
        .join(Experiment, Experiment.id == Annotation.experiment_id)
        .where(Annotation.state == "unmatched")
        .order_by(desc(Annotation.updated_at)).limit(limit))).all()
    return [{"kind": "annotation", "id": a.id, "label": f"{a.evidence_key} ({code or smiles or 'no compound'})",
             "state": "unmatched", "reason": _text(a.reason) or "no matching Design Hub compound",
             "since": _iso(a.updated_at), "open_in_designhub": f"/designhub/open/{a.id}" if smiles else None}
            for a, code, smiles in rows]


async def _identity_problems(session: AsyncSession) -> list[dict[str, Any]]:
    row = await session.get(KeyValue, IDENTITY_KEY)
    if row is None or not isinstance(row.value, dict):
        return []
    problems = row.value.get("problems")
    since = row.value.get("checked_at") if isinstance(row.value.get("checked_at"), str) else _iso(row.updated_at)
    return [{"kind": "fragalysis", "id": "identity", "label": "Fragalysis identity", "state": "identity",
             "reason": _text(str(p)), "since": since} for p in (problems if isinstance(problems, list) else [])]


async def _short_scans(session: AsyncSession) -> list[dict[str, Any]]:
    """ISPyB sessions whose events hold fewer collections than the session counts (rescanned every poll)."""
    return [{"kind": "session", "id": s.session, "label": f"ISPyB session {s.session}", "state": "short_scan",
             "reason": f"its events show {s.seen} of the {s.expected} collections ISPyB counts for it; "
                       "read again every poll (collections this login cannot see?)",
             "since": _iso(s.since)} for s in await short_sessions(session)]


def _jobs_from_health(health: Mapping[str, Any]) -> list[dict[str, Any]]:
    # Never ok before a first success: a start that passed says nothing of a first poll stuck on an upstream.
    return [{"job": name, "state": _job_state(h.failing_since, h.last_success is not None),
             "last_success": _iso(h.last_success),
             "failing_since": _iso(h.failing_since), "error": _text(h.last_error),
             "consecutive_failures": h.consecutive_failures}
            for name, h in health.items()]


def _job_state(failing_since: Any, succeeded: bool = True) -> str:
    return "failing" if failing_since else "ok" if succeeded else "starting"


async def _jobs_from_runs(session: AsyncSession) -> list[dict[str, Any]]:
    """Without a live runner: a job is failing when its most recent run that ended on its own failed.

    A run cut short by a shutdown (`interrupted`) says nothing of the job's health, so it is passed over:
    a job that failed every run until SIGTERM must not read as ok afterwards.
    """
    last_ok = dict((await session.execute(
        select(JobRun.job, func.max(JobRun.finished_at)).where(JobRun.outcome == "ok").group_by(JobRun.job))).all())
    latest_ids = (select(func.max(JobRun.id)).where(JobRun.outcome.in_(("ok", "failed")))
                  .group_by(JobRun.job))
    jobs = []
    for run in (await session.scalars(select(JobRun).where(JobRun.id.in_(latest_ids)).order_by(JobRun.job))).all():
        failing = run.outcome == "failed"
        jobs.append({"job": run.job, "state": _job_state(failing), "last_success": _iso(last_ok.get(run.job)),
                     "failing_since": _iso(run.started_at) if failing else None,
                     "error": _text(run.error) if failing else "", "consecutive_failures": None})
    return jobs


def _failing_jobs(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"kind": "job", "id": j["job"], "label": f"job {j['job']}", "state": "failing",
             "reason": j["error"], "since": j["failing_since"]} for j in jobs if j["failing_since"]]


async def _runs(session: AsyncSession, limit: int) -> list[dict[str, Any]]:
    runs = (await session.scalars(select(JobRun).order_by(desc(JobRun.id)).limit(limit))).all()
    return [{"job": r.job, "run_id": r.run_id, "instance": r.instance, "started_at": _iso(r.started_at),
             "finished_at": _iso(r.finished_at), "outcome": r.outcome, "polled": r.polled,
             "counters": r.counters, "error": _text(r.error)} for r in runs]


def collapsed_runs(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Recent runs, newest first, with a run of alike ones (same job, instance, outcome, counters and error:
    a quiet daemon's ticks) shown once, its `repeats` counted and `since` its oldest start."""
    rows: list[dict[str, Any]] = []
    for run in runs:
        last = rows[-1] if rows else None
        if last is not None and all(last[k] == run[k] for k in ("job", "instance", "outcome", "counters", "error")):
            last["repeats"] += 1
            last["since"] = run["started_at"]
        else:
            rows.append({**run, "repeats": 1, "since": run["started_at"]})
    return rows


async def _events(session: AsyncSession, limit: int) -> list[dict[str, Any]]:
    events = (await session.scalars(select(Event).order_by(desc(Event.id)).limit(limit))).all()
    return [{"at": _iso(e.at), "item": f"{e.item_type} {e.item_id}", "from": e.from_state, "to": e.to_state,
             "reason": _text(e.reason), "instance": e.instance} for e in events]


async def refresh_item_gauges(store: Store) -> None:
    from mirrord import metrics  # here, not at the top: `mirrord status` has no use for prometheus_client
    from mirrord.ui.actions import HOLDABLE_JOBS

    async with store.read() as session:
        counts = await item_counts(session)
        since = await _oldest_changes(session, counts)
        held = await decisions.holds(session)
    rows = [(kind, state, n, since.get((kind, state))) for kind, states in counts.items() for state, n in states.items()]
    for job in HOLDABLE_JOBS:
        metrics.job_held.labels(job).set(1 if job in held else 0)
    waiting = next(((n, oldest) for kind, state, n, oldest in rows
                    if (kind, state) == ("deposition", AWAITING_APPROVAL)), (0, None))
    metrics.depositions_awaiting_approval.set(waiting[0])
    # Cleared first: a state that emptied must read 0 (absent), not its last count.
    metrics.items_by_state.clear()
    metrics.oldest_item_age.clear()
    now = utcnow()
    metrics.oldest_approval_age.set(max(0.0, (now - waiting[1]).total_seconds()) if waiting[1] else 0)
    for kind, state, n, oldest in rows:
        metrics.items_by_state.labels(kind, state).set(n)
        if oldest is not None:
            metrics.oldest_item_age.labels(kind, state).set(max(0.0, (now - oldest).total_seconds()))
