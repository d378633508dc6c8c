"""The /status page: plain server-side HTML of a `summary` (readable without JavaScript); every value is escaped."""

from __future__ import annotations

import datetime as dt
import html
import re
from collections.abc import Mapping
from typing import Any

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
