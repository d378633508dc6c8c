"""The pages of the web server: /status (a `summary`), /item/<kind>/<ref> (an item's lineage) and /login.

Plain server-side HTML, readable without JavaScript; every value is escaped. Links are relative, so the
pages work behind a reverse proxy that serves them under a sub-path.
"""

from __future__ import annotations

import datetime as dt
import html
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mirrord.ui.summary import DONE_STATES, PROBLEM_STATES, collapsed_runs

if TYPE_CHECKING:
    from mirrord.ui.actions import Lineage

# Kinds `mirrord show` (and so /item/<kind>/<ref>) knows.
ITEM_KINDS = ("target", "upload", "dataset", "deposition", "annotation")
REFRESH_SECONDS = 60


@dataclass(frozen=True)
class Flash:
    """The outcome of the decision the browser just sent, shown once on the page it comes back to."""

    ok: bool
    text: str


@dataclass(frozen=True)
class About:
    """What the page says about the daemon itself, and what the person viewing it may do."""

    version: str = ""
    uptime: float | None = None
    upstreams: dict[str, str] = field(default_factory=dict)
    signed_in: bool = False
    form_token: str = ""  # set when signed in with a web token: the page offers its decision forms
    flash: Flash | None = None

# -- HTML -------------------------------------------------------------------------------------------
_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em 2em;color:#222;max-width:110em}
h1{margin-bottom:.1em}h2{margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}
.meta{color:#666;font-size:.9em}a{color:#0645ad}
table{border-collapse:collapse;margin:.5em 0 1em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;font-size:.88em;vertical-align:top}
th{background:#f2f2f2}td.why{max-width:50em}
.state{font-weight:600;white-space:nowrap}
.ok{color:#1b7f3b}.bad{color:#b00020}
.none{color:#888;font-style:italic}
td.id,td.id a{white-space:nowrap}pre{white-space:pre-wrap;max-width:100em;background:#f7f7f7;padding:.5em}
form.inline{display:inline}
.held{background:#fff4e5;border:1px solid #e0a040;padding:.4em .8em}
.flash{padding:.4em .8em;border:1px solid}.flash.ok{background:#eef8f0}.flash.bad{background:#fdecee}
form.decide input[type=text]{margin-right:.6em}form.decide button{margin-right:.3em}
"""
# State colours from the lists the terminal colours by too.
_STATE_CSS = (",".join(f".state-{s}" for s in PROBLEM_STATES) + "{color:#b00020}\n"
              + ",".join(f".state-{s}" for s in DONE_STATES) + "{color:#1b7f3b}\n")


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


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 2 * 3600:
        return f"{seconds // 60} min"
    if seconds < 2 * 86400:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    return f"{seconds // 86400} d {seconds % 86400 // 3600} h"


def _clock(iso: str) -> str:
    """An ISO time as people read it: "2026-12-07 02:54 UTC"."""
    try:
        at = dt.datetime.fromisoformat(iso)
    except ValueError:
        return iso
    return at.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M UTC") if at.tzinfo else iso


def one_line(text: str | None, limit: int = 160) -> str:
    """An error as one readable line: its first line, spaces collapsed, cut at `limit` characters."""
    if not text:
        return ""
    first = " ".join(text.strip().splitlines()[0].split())
    return first if len(first) <= limit and "\n" not in text.strip() else first[:limit].rstrip() + " …"


def _item_href(kind: str, ref: Any) -> str | None:
    return f"item/{kind}/{ref}" if kind in ITEM_KINDS and ref not in (None, "") else None


class _Raw(str):
    """Markup built here from escaped parts; inserted into a cell as is."""


def _table(headers: list[str], rows: list[list[Any]], empty: str = "none", css: str = "") -> str:
    if not rows:
        return f'<p class="none">{_esc(empty)}</p>'
    # A key/value table (headers all blank) has no header row: it would show as an empty grey bar.
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers) if any(headers) else ""
    body = "".join("<tr>" + "".join(f"<td>{c if isinstance(c, _Raw) else _esc(c)}</td>" for c in row) + "</tr>"
                   for row in rows)
    thead = f"<thead><tr>{head}</tr></thead>" if head else ""
    return f'<table class="{_esc(css)}">{thead}<tbody>{body}</tbody></table>'


def _repeats(run: Mapping[str, Any]) -> str:
    return f"{run['repeats']} alike since {_clock(run['since'])}" if run["repeats"] > 1 else "1"


def _counters(counters: Mapping[str, Any] | None) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted((counters or {}).items()))


def _item_cell(kind: str, ref: Any, label: Any = None) -> _Raw:
    """`kind id` linked to the item's page (what `mirrord show <kind> <id>` prints)."""
    text = _esc(f"{kind} {ref}" if label is None else label)
    href = _item_href(kind, ref)
    return _Raw(f'<a href="{_esc(href)}">{text}</a>' if href else text)


def _error_cell(text: str | None, kind: str, ref: Any) -> _Raw:
    """One readable line; the full text is on the item's page (and in the title, on hover)."""
    line = one_line(text)
    if not line:
        return _Raw("")
    href = _item_href(kind, ref)
    more = f' <a href="{_esc(href)}">details</a>' if href and line != (text or "").strip() else ""
    return _Raw(f'<span title="{_esc(text)}">{_esc(line)}</span>{more}')


def _why_cell(item: Mapping[str, Any]) -> _Raw:
    """The reason, plus a button where mirrord can act on it (a plain form: works without JavaScript)."""
    cell = _error_cell(item["reason"], item["kind"], item["id"])
    if item.get("open_in_designhub"):
        cell += (f'<form method="post" action="{_esc(item["open_in_designhub"])}">'
                 '<button type="submit">open in Design Hub</button></form>')
    return _Raw(cell)


def _flash(about: About) -> str:
    if about.flash is None:
        return ""
    css, label = ("ok", "Done") if about.flash.ok else ("bad", "Refused")
    return f'<p class="flash {css}" role="status"><strong>{label}:</strong> {_esc(about.flash.text)}</p>'


def _decision_form(about: About, action: str, buttons: list[str], *, back: str = "", compact: bool = False) -> str:
    """A person's decision, as the CLI takes it: who decides, why, and one button per action that
    applies (each posts to `<action>/<button>`). Offered only to a signed-in browser."""
    if not about.form_token or not buttons:
        return ""
    size = 14 if compact else 40
    fields = (f'<input type="hidden" name="csrf" value="{_esc(about.form_token)}">'
              + (f'<input type="hidden" name="back" value="{_esc(back)}">' if back else "")
              + '<label>Your name <input type="text" name="by" size="12" required autocomplete="name"></label> '
              f'<label>Reason <input type="text" name="reason" size="{size}" required></label> ')
    pressed = "".join(f'<button type="submit" formaction="{_esc(f"{action}/{b}")}">'
                      f'{_esc(b)}</button>' for b in buttons)
    return f'<form class="decide" method="post" action="{_esc(f"{action}/{buttons[0]}")}">{fields}{pressed}</form>'


def _held_banner(data: dict[str, Any], about: About) -> str:
    """Held jobs, at the top: nothing they would write leaves the host until a person resumes them."""
    lines = []
    for h in data.get("holds", []):
        form = _decision_form(about, f"job/{h['id']}", ["resume"], compact=True)
        lines.append(f'<div class="held"><strong>job {_esc(h["id"])} is held</strong> by {_esc(h["by"])} since '
                     f'{_esc(_clock(h["at"]))}: {_esc(h["reason"])} · its uploads and other writes wait; polling '
                     f'goes on. <code>mirrord resume {_esc(h["id"])} --reason TEXT</code>{form}</div>')
    return "".join(lines)


def _approvals(data: dict[str, Any], about: About, when: Any) -> str:
    waiting = data.get("approvals", [])
    if not waiting:
        return ""
    rows = [[_item_cell("deposition", a["id"]), a["pdb_code"], a["sample"], a["session"], a["proposal"],
             _size(a["archive_bytes"]), when(a["since"]),
             _Raw(_decision_form(about, f"item/deposition/{a['id']}", ["approve", "reject"], back="status",
                                 compact=True) or f"<code>{_esc(a['command'])}</code>")] for a in waiting]
    return (f'<h2 id="approvals">Awaiting approval ({len(waiting)})</h2>'
            '<p class="meta">Packed and checked; nothing leaves the host until a person approves it.</p>'
            + _table(["deposition", "PDB code", "sample", "session", "proposal", "archive", "waiting since",
                      "decide"], rows))


def _size(value: int | None) -> str:
    if value is None:
        return ""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return ""


def _job_hold_cell(job: str, held: set[str], about: About) -> _Raw:
    from mirrord.ui.actions import HOLDABLE_JOBS

    if job not in HOLDABLE_JOBS:
        return _Raw("")
    state = '<span class="state state-failed">held</span> ' if job in held else ""
    return _Raw(state + _decision_form(about, f"job/{job}", ["resume" if job in held else "hold"], compact=True))


def render_html(data: dict[str, Any], about: About | None = None) -> str:
    about = about or About()
    now = dt.datetime.fromisoformat(data["generated_at"])

    def when(iso: str | None) -> _Raw:
        return _Raw(_when(iso, now))

    def state(value: str | None) -> _Raw:
        return _Raw(_state(value))

    attention = data["attention"]
    held = {str(h["id"]) for h in data.get("holds", [])}
    total = data.get("attention_total", len(attention))
    shown = f" (the {len(attention)} most recent below)" if total > len(attention) else ""
    headline = (f'<p class="bad"><strong>{total} thing(s) need attention{shown}.</strong></p>' if attention
                else '<p class="ok"><strong>Nothing needs attention.</strong></p>')
    totals = "; ".join(f"{kind}: " + ", ".join(f"{n} {s}" for s, n in states.items())
                       for kind, states in data["items"].items() if states)
    sections = [
        _flash(about),
        _held_banner(data, about),
        headline,
        f'<p class="meta">{_esc(totals or "no items yet")}</p>',
        _approvals(data, about, when),
        '<h2 id="attention">Needs attention</h2>' + _table(
            ["item", "what", "state", "why", "since"],
            [[_item_cell(a["kind"], a["id"]), a["label"], state(a["state"]), _why_cell(a), when(a["since"])]
             for a in attention], empty="nothing needs a person"),
        '<h2 id="jobs">Jobs</h2>' + _table(
            ["job", "state", "upstream", "last success", "failing since", "error", "hold"],
            [[j["job"], state(j.get("state")), about.upstreams.get(j["job"], ""), when(j["last_success"]),
              when(j["failing_since"]), _error_cell(j["error"], "job", j["job"]),
              _job_hold_cell(j["job"], held, about)] for j in data["jobs"]],
            empty="no job has run"),
        '<h2 id="decisions">Decided by a person</h2>' + _table(
            ["when", "item", "decision", "by", "reason", "in force"],
            [[when(d["at"]), _item_cell(d["kind"], d["id"]), d["action"], d["by"], d["reason"],
              "yes" if d["active"] else (f"ended: {d['ended_why']}" if d["ended_why"] else "")]
             for d in data.get("decisions", [])], empty="no decisions yet"),
        '<h2 id="targets">Targets</h2>' + _table(
            ["target", "TAS", "latest upload", "mirrored version", "mirrored"],
            [[_item_cell("target", t["id"], t["name"]), t["tas"], t["latest_upload"], t["mirrored_upload"],
              when(t["mirrored_at"])] for t in data["targets"]], empty="no targets mirrored yet"),
        '<h2 id="depositions">Depositions</h2>' + _table(
            ["item", "state", "PDB code", "sample", "session", "PDIS status", "details", "updated"],
            [[_item_cell("deposition", d["id"]), state(d["state"]), d["pdb_code"], d["sample"], d["session"],
              d["pdis_status"], _error_cell(d["status_details"] or d["error"], "deposition", d["id"]),
              when(d["updated_at"])] for d in data["depositions"]],
            empty="no depositions"),
        '<h2 id="datasets">Datasets</h2>' + _table(
            ["item", "state", "sample", "session", "beamline", "experiment", "deposition", "reason", "updated"],
            [[_item_cell("dataset", d["id"]), state(d["state"]), d["sample"], d["session"], d["beamline"],
              d["experiment"], state(d["deposition_state"]) if d["deposition_state"] else "",
              _error_cell(d["reason"], "dataset", d["id"]), when(d["updated_at"])]
             for d in data["datasets"]], empty="no datasets discovered"),
        '<h2 id="items">Items by state</h2>' + _table(
            ["kind", "state", "count"],
            [[kind, state(s), n] for kind, states in data["items"].items() for s, n in states.items()]),
        '<h2 id="runs">Recent job runs</h2>' + _table(
            ["job", "instance", "started", "outcome", "runs", "counters", "error"],
            [[r["job"], r["instance"], when(r["started_at"]), state(r["outcome"]), _repeats(r),
              _counters(r["counters"]), _error_cell(r["error"], "run", None)] for r in collapsed_runs(data["runs"])],
            empty="no runs yet"),
        '<h2 id="events">Recent events</h2>' + _table(
            ["when", "item", "from", "to", "reason", "instance"],
            [[when(e["at"]), _event_item(e["item"]), e["from"], state(e["to"]), _error_cell(e["reason"], "", None),
              e["instance"]] for e in data["events"]], empty="no events yet"),
    ]
    facts = [f"mirrord {about.version}" if about.version else "mirrord"]
    if about.uptime is not None:
        facts.append(f"up {_duration(about.uptime)}")
    if data.get("instance"):
        facts.append(f"instance {data['instance']}")
    facts.append(f"as of {_clock(data['generated_at'])}")
    upstreams = " · ".join(f"{name}: {url}" for name, url in about.upstreams.items())
    sign_out = ('<form class="inline" method="post" action="logout"><button type="submit">sign out</button></form>'
                if about.signed_in else "")
    # A page with decision forms is not reloaded under the person typing into it.
    refresh = None if about.form_token else REFRESH_SECONDS
    refreshing = f"refreshes every {REFRESH_SECONDS} s" if refresh else "reload to update"
    return _document("mirrord status", f"""<h1>mirrord</h1>
<p class="meta">{_esc(' · '.join(facts))} · <a href="api/status">JSON</a> · <a href="metrics">metrics</a>
· {refreshing} {sign_out}</p>
<p class="meta">{_esc(upstreams)}</p>
{''.join(sections)}""", refresh=refresh)


def _event_item(item: str) -> _Raw:
    kind, _, ref = item.partition(" ")
    return _item_cell(kind, ref) if kind in ITEM_KINDS else _Raw(_esc(item))


def render_lineage(lineage: Lineage, about: About | None = None) -> str:
    """An item's page: the facts each system holds, the full error text, what a person can do (as forms,
    when signed in), and its history."""
    about = about or About()
    sections = [f"<h2>{_esc(s.title)}</h2>" + _table(["", ""], [[label, _fact(value)] for label, value in s.facts])
                for s in lineage.sections]
    # Relative to /item/<kind>/<ref>: posts to /item/<kind>/<id>/<action>.
    form = _decision_form(about, str(lineage.id), lineage.actions)
    if form:
        sections.append(f'<h2 id="decide">Decide</h2>{form}')
    history = _table(["when", "item", "from", "to", "reason", "instance"],
                     [[_clock(h.at), _event_item(h.item), h.from_state, _Raw(_state(h.to_state)), h.reason,
                       h.instance] for h in lineage.history], empty="no events")
    state = f" {_state(lineage.state)}" if lineage.state else ""
    return _document(f"{lineage.title} - mirrord", f"""<p class="meta"><a href="../../status">status</a></p>
{_flash(about)}<h1>{_esc(lineage.title)}{state}</h1>
<p class="meta">{_esc(lineage.kind)} {_esc(lineage.id)} · the same as <code>mirrord show {_esc(lineage.kind)}
{_esc(lineage.id)}</code></p>
{''.join(sections)}<h2>History</h2>{history}""")


def _fact(value: str) -> Any:
    """Long or multi-line values (an upstream's raw error text) keep their shape."""
    return _Raw(f"<pre>{_esc(value)}</pre>") if "\n" in value or len(value) > 160 else value


def render_login(next_path: str, *, refused: bool = False) -> str:
    problem = '<p class="bad">That token is not the one configured ([web] token).</p>' if refused else ""
    return _document("mirrord: sign in", f"""<h1>mirrord</h1>
<p>This status page is protected by the token in the daemon's <code>[web] token_file</code>.</p>{problem}
<form method="post" action="login">
<input type="hidden" name="next" value="{_esc(next_path)}">
<label>Token <input type="password" name="token" autocomplete="current-password" autofocus required></label>
<button type="submit">Sign in</button></form>""")


def _document(title: str, body: str, *, refresh: int | None = None) -> str:
    meta = f'<meta http-equiv="refresh" content="{refresh}">' if refresh else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>{meta}
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_CSS}{_STATE_CSS}</style></head>
<body>{body}
</body></html>"""
