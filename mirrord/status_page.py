"""What the store says about the pipeline, as data (`summary`) and as views (/status, /api/status).

`mirrord status`, the web page and /metrics all read the store the same way, so they never disagree.
The page is plain server-side HTML (readable without JavaScript); every value is escaped.
"""

from __future__ import annotations

import datetime as dt
import html
import re
from collections.abc import Mapping
from typing import Any

from aiohttp import web
from sqlalchemy import desc, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from mirrord import metrics
from mirrord.clients.errors import UpstreamError
from mirrord.redact import redact
from mirrord.store import Store
from mirrord.store.keyvalue import IDENTITY_KEY
from mirrord.store.models import (
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

# The order work flows in, so tables read top to bottom; problems first, unknown states last.
PIPELINE = ("needs_attention", "failed", "waiting_settle", "building", "fetching", "extracting", "mirrored",
            "discovered", "waiting", "missing", "complete", "eligible", "skipped", "queued", "packing",
            "packed", "uploading", "uploaded", "submitted", "pending", "validated", "published", "dry_run",
            "not_deposited", "attaching", "tagging", "attached", "unmatched", "superseded")
_RANK = {state: n for n, state in enumerate(PIPELINE)}


def state_rank(state: str | None) -> int:
    return _RANK.get(state or "", len(PIPELINE))


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _text(value: str | None) -> str:
    return redact(value) if value else ""


# -- data -------------------------------------------------------------------------------------------
async def summary(store: Store, *, health: Mapping[str, Any] | None = None, instance: str | None = None,
                  recent: int = 20, rows: int = 500) -> dict[str, Any]:
    """Everything an operator looks at, as JSON-ready data.

    `health` is the runner's per-job `Health` (a live daemon knows which jobs are failing right now);
    without it (the `status` command) a job's state is read from its most recent recorded run.
    """
    async with store.read() as session:
        jobs = _jobs_from_health(health) if health is not None else await _jobs_from_runs(session)
        attention = [*await _attention_items(session, rows), *await _unmatched(session, rows),
                     *await _identity_problems(session), *_failing_jobs(jobs)]
        attention.sort(key=lambda a: a["since"] or "", reverse=True)
        return {
            "generated_at": utcnow().isoformat(),
            "instance": instance,
            "items": await _counts(session),
            "targets": await _targets(session),
            "depositions": await _depositions(session, rows),
            "datasets": await _datasets(session, rows),
            "attention": attention,
            "jobs": jobs,
            "runs": await _runs(session, recent),
            "events": await _events(session, recent),
        }


async def _counts(session: AsyncSession) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for kind, model in ITEM_MODELS.items():
        rows = (await session.execute(select(model.state, func.count()).group_by(model.state))).all()
        counts[kind] = {state: n for state, n in sorted(rows, key=lambda r: state_rank(r[0]))}
    return counts


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


def _why(kind: str, item: Any) -> str:
    """The most specific explanation an item carries."""
    if kind == "deposition" and item.pdis_status and item.state == "needs_attention":
        details = f": {item.status_details}" if item.status_details else ""
        return _text(f"PDIS status {item.pdis_status}{details}")
    return _text(item.last_error or getattr(item, "reason", None) or getattr(item, "status_details", None))


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
        items = list((await session.scalars(
            select(model).where(model.state.in_(FAILED_STATES))
            .order_by(desc(model.updated_at)).limit(limit))).all())
        labels = await _labels(session, kind, items)
        found += [{"kind": kind, "id": item.id, "label": labels.get(item.id, ""), "state": item.state,
                   "reason": _why(kind, item), "since": _iso(item.updated_at)} for item in items]
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


def _jobs_from_health(health: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [{"job": name, "last_success": _iso(h.last_success), "failing_since": _iso(h.failing_since),
             "error": _text(h.last_error), "consecutive_failures": h.consecutive_failures}
            for name, h in health.items()]


async def _jobs_from_runs(session: AsyncSession) -> list[dict[str, Any]]:
    """Without a live runner: a job is failing when its most recent finished run failed."""
    last_ok = dict((await session.execute(
        select(JobRun.job, func.max(JobRun.finished_at)).where(JobRun.outcome == "ok").group_by(JobRun.job))).all())
    latest_ids = select(func.max(JobRun.id)).where(JobRun.finished_at.is_not(None)).group_by(JobRun.job)
    jobs = []
    for run in (await session.scalars(select(JobRun).where(JobRun.id.in_(latest_ids)).order_by(JobRun.job))).all():
        failing = run.outcome == "failed"
        jobs.append({"job": run.job, "last_success": _iso(last_ok.get(run.job)),
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


async def _events(session: AsyncSession, limit: int) -> list[dict[str, Any]]:
    events = (await session.scalars(select(Event).order_by(desc(Event.id)).limit(limit))).all()
    return [{"at": _iso(e.at), "item": f"{e.item_type} {e.item_id}", "from": e.from_state, "to": e.to_state,
             "reason": _text(e.reason), "instance": e.instance} for e in events]


async def refresh_item_gauges(store: Store) -> None:
    async with store.read() as session:
        counts = await _counts(session)
    # Cleared first: a state that emptied must read 0 (absent), not its last count.
    metrics.items_by_state.clear()
    for kind, states in counts.items():
        for state, n in states.items():
            metrics.items_by_state.labels(kind, state).set(n)


# -- web views --------------------------------------------------------------------------------------
def add_routes(app: web.Application) -> None:
    app.router.add_get("/status", status_html)
    app.router.add_get("/api/status", status_json)
    app.router.add_post("/designhub/open/{annotation_id:\\d+}", open_in_designhub)


async def open_in_designhub(request: web.Request) -> web.StreamResponse:
    """Post the ligand's structure to Design Hub and send the browser to the page it makes.

    Design Hub's link lives five minutes, so it is made on each click and never stored.
    """
    from mirrord.jobs.designhub import open_in_designhub_url
    from mirrord.web import MIRRORD_KEY

    app_state = request.app[MIRRORD_KEY]
    if not app_state.config.designhub.enabled:
        raise web.HTTPNotFound(text="Design Hub is not configured")
    async with app_state.store.read() as session:
        annotation = await session.get(Annotation, int(request.match_info["annotation_id"]))
        experiment = await session.get(Experiment, annotation.experiment_id) if annotation else None
    if experiment is None or not experiment.smiles:
        raise web.HTTPNotFound(text="no ligand structure for that item")
    try:
        url = await open_in_designhub_url(app_state.config, experiment.smiles)
    except UpstreamError as exc:
        raise web.HTTPBadGateway(text=f"Design Hub refused the structure: {exc}") from None
    raise web.HTTPSeeOther(location=url)


async def _summary_for(request: web.Request) -> dict[str, Any]:
    from mirrord.web import MIRRORD_KEY

    state = request.app[MIRRORD_KEY]
    runner = getattr(state, "runner", None)
    return await summary(state.store, health=runner.health if runner is not None else None,
                         instance=getattr(state, "instance", None))


async def status_json(request: web.Request) -> web.Response:
    return web.json_response(await _summary_for(request))


async def status_html(request: web.Request) -> web.Response:
    return web.Response(text=render_html(await _summary_for(request)), content_type="text/html")


# -- HTML -------------------------------------------------------------------------------------------
_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em 2em;color:#222;max-width:110em}
h1{margin-bottom:.1em}h2{margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}
.meta{color:#666;font-size:.9em}a{color:#0645ad}
table{border-collapse:collapse;margin:.5em 0 1em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;font-size:.88em;vertical-align:top}
th{background:#f2f2f2}td.why{max-width:50em}
.state{font-weight:600;white-space:nowrap}
.state-failed,.state-needs_attention,.state-failing,.state-identity,.state-unmatched{color:#b00020}
.state-published,.state-mirrored,.state-attached,.state-ok{color:#1b7f3b}
.ok{color:#1b7f3b}.bad{color:#b00020}
.none{color:#888;font-style:italic}
"""


def _esc(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _state(state: str | None) -> str:
    css = re.sub(r"[^a-z0-9_-]", "", (state or "").lower())
    return f'<span class="state state-{css}">{_esc(state)}</span>'


def _when(iso: str | None, now: dt.datetime) -> str:
    """A relative age for reading at a glance; the exact time on hover and in the markup."""
    if not iso:
        return ""
    try:
        at = dt.datetime.fromisoformat(iso)
    except ValueError:
        return _esc(iso)
    seconds = max(0, int((now - at).total_seconds())) if at.tzinfo else 0
    if seconds < 90:
        age = f"{seconds}s ago"
    elif seconds < 90 * 60:
        age = f"{seconds // 60} min ago"
    elif seconds < 48 * 3600:
        age = f"{seconds // 3600} h ago"
    else:
        age = f"{seconds // 86400} d ago"
    return f'<time datetime="{_esc(iso)}" title="{_esc(iso)}">{_esc(age)}</time>'


class _Raw(str):
    """Markup built here from escaped parts; inserted into a cell as is."""


def _table(headers: list[str], rows: list[list[Any]], empty: str = "none", css: str = "") -> str:
    if not rows:
        return f'<p class="none">{_esc(empty)}</p>'
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c if isinstance(c, _Raw) else _esc(c)}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f'<table class="{_esc(css)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _counters(counters: Mapping[str, Any] | None) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted((counters or {}).items()))


def _why_cell(item: Mapping[str, Any]) -> _Raw:
    """The reason, plus a button where mirrord can act on it (a plain form: works without JavaScript)."""
    cell = _esc(item["reason"])
    if item.get("open_in_designhub"):
        cell += (f'<form method="post" action="{_esc(item["open_in_designhub"])}">'
                 '<button type="submit">open in Design Hub</button></form>')
    return _Raw(cell)


def render_html(data: dict[str, Any]) -> str:
    now = dt.datetime.fromisoformat(data["generated_at"])

    def when(iso: str | None) -> _Raw:
        return _Raw(_when(iso, now))

    def state(value: str | None) -> _Raw:
        return _Raw(_state(value))

    attention = data["attention"]
    headline = (f'<p class="bad"><strong>{len(attention)} thing(s) need attention.</strong></p>' if attention
                else '<p class="ok"><strong>Nothing needs attention.</strong></p>')
    totals = "; ".join(f"{kind}: " + ", ".join(f"{n} {s}" for s, n in states.items())
                       for kind, states in data["items"].items() if states)
    sections = [
        headline,
        f'<p class="meta">{_esc(totals or "no items yet")}</p>',
        '<h2 id="attention">Needs attention</h2>' + _table(
            ["what", "item", "state", "why", "since"],
            [[a["kind"], f"{a['label'] or a['id']}", state(a["state"]), _why_cell(a), when(a["since"])]
             for a in attention], empty="nothing needs a person"),
        '<h2 id="targets">Targets</h2>' + _table(
            ["target", "TAS", "latest upload", "mirrored version", "mirrored"],
            [[t["name"], t["tas"], t["latest_upload"], t["mirrored_upload"], when(t["mirrored_at"])]
             for t in data["targets"]], empty="no targets mirrored yet"),
        '<h2 id="depositions">Depositions</h2>' + _table(
            ["state", "PDB code", "sample", "session", "PDIS status", "details", "updated"],
            [[state(d["state"]), d["pdb_code"], d["sample"], d["session"], d["pdis_status"],
              d["status_details"] or d["error"], when(d["updated_at"])] for d in data["depositions"]],
            empty="no depositions"),
        '<h2 id="datasets">Datasets</h2>' + _table(
            ["state", "sample", "session", "beamline", "experiment", "deposition", "reason", "updated"],
            [[state(d["state"]), d["sample"], d["session"], d["beamline"], d["experiment"],
              state(d["deposition_state"]) if d["deposition_state"] else "", d["reason"], when(d["updated_at"])]
             for d in data["datasets"]], empty="no datasets discovered"),
        '<h2 id="jobs">Jobs</h2>' + _table(
            ["job", "last success", "failing since", "error"],
            [[j["job"], when(j["last_success"]), when(j["failing_since"]), j["error"]] for j in data["jobs"]],
            empty="no job has run"),
        '<h2 id="items">Items by state</h2>' + _table(
            ["kind", "state", "count"],
            [[kind, state(s), n] for kind, states in data["items"].items() for s, n in states.items()]),
        '<h2 id="runs">Recent job runs</h2>' + _table(
            ["job", "instance", "started", "outcome", "counters", "error"],
            [[r["job"], r["instance"], when(r["started_at"]), state(r["outcome"]), _counters(r["counters"]),
              r["error"]] for r in data["runs"]], empty="no runs yet"),
        '<h2 id="events">Recent events</h2>' + _table(
            ["when", "item", "from", "to", "reason", "instance"],
            [[when(e["at"]), e["item"], e["from"], state(e["to"]), e["reason"], e["instance"]]
             for e in data["events"]], empty="no events yet"),
    ]
    instance = f"instance {_esc(data['instance'])} · " if data.get("instance") else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>mirrord status</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_CSS}</style></head>
<body><h1>mirrord</h1>
<p class="meta">{instance}generated {_esc(data['generated_at'])} ·
<a href="api/status">JSON</a> · <a href="metrics">metrics</a></p>
{''.join(sections)}
</body></html>"""
