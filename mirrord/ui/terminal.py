"""Terminal renderings for the operator commands: `status`, `show`, `check` (and the demo's closing table)."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mirrord.ui.summary import DONE_STATES, PROBLEM_STATES, collapsed_runs

if TYPE_CHECKING:
    from mirrord.ui.actions import CheckResult, Lineage



def _console() -> Console:
    """The terminal's width on a terminal; piped or redirected, no width at all: a line per row, whole,
    never wrapped at 80 columns nor a state cut to `needs_attent…` (a script or `grep` reads it)."""
    return Console() if sys.stdout.isatty() else Console(width=100_000, soft_wrap=True)


def _state(state: str | None) -> str:
    if not state:
        return ""
    style = "red" if state in PROBLEM_STATES else "green" if state in DONE_STATES else ""
    return f"[{style}]{escape(state)}[/{style}]" if style else escape(state)


def _table(title: str, columns: Iterable[str], rows: Iterable[Iterable[Any]], **kwargs: Any) -> Table:
    table = Table(title=title, title_justify="left", **kwargs)
    for column in columns:
        table.add_column(column)
    for row in rows:
        # Values come from upstreams and operators; escape them so "[x]" is never read as markup.
        table.add_row(*(cell if isinstance(cell, _Styled) else escape("" if cell is None else str(cell))
                        for cell in row))
    return table


class _Styled(str):
    """Markup made here (a coloured state), passed through unescaped."""


def _s(state: str | None) -> _Styled:
    return _Styled(_state(state))


def _t(iso: str | None) -> str:
    """An ISO timestamp cut to the second, UTC implied: narrow enough for a terminal column."""
    return iso[:19].replace("T", " ") if iso else ""


def print_status(data: dict[str, Any], console: Console | None = None) -> None:
    console = console or _console()
    if data.get("note"):
        console.print(escape(data["note"]))
        return
    if data.get("instance"):
        console.print(f"instance {escape(data['instance'])}")
    console.print(_table("Targets", ("target", "TAS", "latest upload", "mirrored", "mirrored at (UTC)"),
                         [(t["name"], t["tas"], t["latest_upload"], t["mirrored_upload"], _t(t["mirrored_at"]))
                          for t in data["targets"]]))
    console.print(_table("Items by state", ("kind", "state", "count"),
                         [(kind, _s(state), n) for kind, states in data["items"].items()
                          for state, n in states.items()]))
    if data.get("depositions"):
        console.print(_table("Depositions", ("id", "state", "PDB code", "sample", "PDIS status", "details"),
                             [(d["id"], _s(d["state"]), d["pdb_code"], d["sample"], d["pdis_status"],
                               d["status_details"] or d["error"]) for d in data["depositions"][:50]]))
    if data["attention"]:
        # "kind id" is what `mirrord show` and `mirrord retry` take.
        console.print(_table("Needs attention", ("item", "what", "state", "why", "since"),
                             [(f"{a['kind']} {a['id']}", a.get("label") or "", _s(a["state"]), a["reason"],
                               _t(a["since"])) for a in data["attention"]], title_style="bold red"))
        more = data.get("attention_total", 0) - len(data["attention"])
        if more > 0:
            console.print(f"[red]… and {more} more need attention[/red] (the {len(data['attention'])} most recent "
                          "are listed; `mirrord retry` and the status page take them by id)")
    else:
        console.print("[green]Nothing needs attention.[/green]")
    if data.get("approvals"):
        console.print(_table("Awaiting approval", ("deposition", "PDB code", "sample", "proposal", "since", "approve with"),
                             [(a["id"], a["pdb_code"], a["sample"], a["proposal"], _t(a["since"]), a["command"])
                              for a in data["approvals"]], title_style="bold yellow"))
    for hold in data.get("holds", []):
        console.print(f"[bold yellow]job {escape(hold['id'])} is held[/bold yellow] by {escape(hold['by'])} since "
                      f"{_t(hold['at'])}: {escape(hold['reason'])} (`mirrord resume {escape(hold['id'])} --reason TEXT`)")
    if data.get("decisions"):
        print_decisions(data["decisions"][:10], console, title="Decided by a person (latest)")
    failing = [j for j in data.get("jobs", []) if j["failing_since"]]
    if failing:
        console.print(_table("Failing jobs", ("job", "since", "error", "last success"),
                             [(j["job"], _t(j["failing_since"]), j["error"], _t(j["last_success"])) for j in failing],
                             title_style="bold red"))
    console.print(_table("Recent job runs", ("job", "instance", "started", "outcome", "runs", "error"),
                         [(r["job"], r["instance"], _t(r["started_at"]), _s(r["outcome"]),
                           f"{r['repeats']} alike since {_t(r['since'])}" if r["repeats"] > 1 else "1", r["error"])
                          for r in collapsed_runs(data["runs"])[:10]]))


def print_lineage(lineage: Lineage, console: Console | None = None) -> None:
    console = console or _console()
    console.print(f"[bold]{escape(lineage.title)}[/bold]" + (f"  {_state(lineage.state)}" if lineage.state else ""))
    for section in lineage.sections:
        table = _table(section.title, ("", ""), section.facts, show_header=False)
        console.print(table)
    console.print(_table("History", ("when", "item", "from", "to", "reason", "instance"),
                         [(_t(h.at), h.item, h.from_state, _s(h.to_state), h.reason, h.instance)
                          for h in lineage.history]))


def print_checks(results: list[CheckResult], console: Console | None = None) -> None:
    """One line per upstream, so the output reads well in a terminal and in a log."""
    console = console or _console()
    if not results:
        console.print("no upstream is enabled: nothing to check")
    width = max((len(r.upstream) for r in results), default=0)
    for result in results:
        mark = "[green]OK  [/green]" if result.ok else "[red]FAIL[/red]"
        console.print(f"{mark} {escape(result.upstream.ljust(width))}  {escape(result.detail)}", soft_wrap=True)


def print_decisions(rows: list[dict[str, Any]], console: Console | None = None, *,
                    title: str = "Decisions") -> None:
    console = console or _console()
    if not rows:
        console.print("no decisions recorded")
        return
    console.print(_table(title, ("when (UTC)", "item", "action", "by", "reason", "holds"),
                         [(_t(r["at"]), f"{r['kind']} {r['id']}", r["action"], r["by"], r["reason"],
                           "yes" if r["active"] else (r["ended_why"] or "no")) for r in rows]))
