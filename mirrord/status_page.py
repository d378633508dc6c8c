"""What the store says about the pipeline, as data (`summary`) and as views (/status, /api/status).

`mirrord status`, the web page and /metrics all read `summary`, so they never disagree.
"""

from __future__ import annotations

import html
from typing import Any

from aiohttp import web
from sqlalchemy import desc, func, select

from mirrord import metrics
from mirrord.store import Store
from mirrord.store.models import ITEM_MODELS, Event, JobRun, Target


async def summary(store: Store, *, recent: int = 20) -> dict[str, Any]:
    async with store.read() as session:
        counts: dict[str, dict[str, int]] = {}
        for kind, model in ITEM_MODELS.items():
            rows = (await session.execute(select(model.state, func.count()).group_by(model.state))).all()
            counts[kind] = {state: n for state, n in rows}
        targets = [
            {"name": t.name, "tas": t.tas, "latest_upload": t.latest_upload, "mirrored_upload": t.mirrored_upload,
             "mirrored_at": t.mirrored_at.isoformat() if t.mirrored_at else None}
            for t in (await session.scalars(select(Target).order_by(Target.tas, Target.name))).all()
        ]
        attention = []
        for kind, model in ITEM_MODELS.items():
            for item in (await session.scalars(
                    select(model).where(model.state.in_(("failed", "needs_attention")))
                    .order_by(desc(model.updated_at)).limit(recent))).all():
                attention.append({"kind": kind, "id": item.id, "state": item.state,
                                  "reason": item.last_error or getattr(item, "reason", None) or
                                  getattr(item, "status_details", None) or "",
                                  "updated_at": item.updated_at.isoformat()})
        attention.sort(key=lambda a: a["updated_at"], reverse=True)
        runs = [
            {"job": r.job, "run_id": r.run_id, "instance": r.instance, "started_at": r.started_at.isoformat(),
             "finished_at": r.finished_at.isoformat() if r.finished_at else None, "outcome": r.outcome,
             "counters": r.counters, "error": r.error}
            for r in (await session.scalars(select(JobRun).order_by(desc(JobRun.id)).limit(recent))).all()
        ]
        events = [
            {"at": e.at.isoformat(), "item": f"{e.item_type} {e.item_id}", "from": e.from_state, "to": e.to_state,
             "reason": e.reason, "instance": e.instance}
            for e in (await session.scalars(select(Event).order_by(desc(Event.id)).limit(recent))).all()
        ]
    return {"items": counts, "targets": targets, "attention": attention, "runs": runs, "events": events}


async def refresh_item_gauges(store: Store) -> None:
    async with store.read() as session:
        for kind, model in ITEM_MODELS.items():
            for state, n in (await session.execute(select(model.state, func.count()).group_by(model.state))).all():
                metrics.items_by_state.labels(kind, state).set(n)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/status", status_html)
    app.router.add_get("/api/status", status_json)


def _store(request: web.Request) -> Store:
    from mirrord.web import MIRRORD_KEY

    return request.app[MIRRORD_KEY].store


async def status_json(request: web.Request) -> web.Response:
    return web.json_response(await summary(_store(request)))


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c if c is not None else ''))}</td>" for c in row)
                   + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body or '<tr><td>none</td></tr>'}</tbody></table>"


async def status_html(request: web.Request) -> web.Response:
    data = await summary(_store(request))
    sections = [
        "<h2>Targets</h2>" + _table(["target", "TAS", "latest upload", "mirrored", "mirrored at"],
                                    [[t["name"], t["tas"], t["latest_upload"], t["mirrored_upload"], t["mirrored_at"]]
                                     for t in data["targets"]]),
        "<h2>Items by state</h2>" + _table(["kind", "state", "count"],
                                           [[k, s, n] for k, states in data["items"].items()
                                            for s, n in sorted(states.items())]),
        "<h2>Needs attention</h2>" + _table(["item", "state", "why", "since"],
                                            [[f"{a['kind']} {a['id']}", a["state"], a["reason"], a["updated_at"]]
                                             for a in data["attention"]]),
        "<h2>Recent job runs</h2>" + _table(["job", "instance", "started", "outcome", "counters", "error"],
                                            [[r["job"], r["instance"], r["started_at"], r["outcome"], r["counters"],
                                              r["error"]] for r in data["runs"]]),
    ]
    page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>mirrord status</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;color:#222}}table{{border-collapse:collapse;margin-bottom:1.5em}}
th,td{{border:1px solid #ccc;padding:.3em .6em;text-align:left;font-size:.9em}}th{{background:#f2f2f2}}</style>
</head><body><h1>mirrord</h1>{''.join(sections)}</body></html>"""
    return web.Response(text=page, content_type="text/html")
