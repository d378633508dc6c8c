"""Terminal renderings for the operator commands: `status`, `show`, `check` (and the demo's closing table)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mirrord.ui.summary import DONE_STATES, PROBLEM_STATES

if TYPE_CHECKING:
    from mirrord.ui.actions import CheckResult, Lineage



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
    console = console or Console()
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
    failing = [j for j in data.get("jobs", []) if j["failing_since"]]
    if failing:
        console.print(_table("Failing jobs", ("job", "since", "error", "last success"),
                             [(j["job"], _t(j["failing_since"]), j["error"], _t(j["last_success"])) for j in failing],
                             title_style="bold red"))
    console.print(_table("Recent job runs", ("job", "instance", "started", "outcome", "error"),
                         [(r["job"], r["instance"], _t(r["started_at"]), _s(r["outcome"]), r["error"])
                          for r in data["runs"][:10]]))


def print_lineage(lineage: Lineage, console: Console | None = None) -> None:
    console = console or Console()
    console.print(f"[bold]{escape(lineage.title)}[/bold]" + (f"  {_state(lineage.state)}" if lineage.state else ""))
    for section in lineage.sections:
        table = _table(section.title, ("", ""), section.facts, show_header=False)
        console.print(table)
    console.print(_table("History", ("when", "item", "from", "to", "reason", "instance"),
                         [(_t(h.at), h.item, h.from_state, _s(h.to_state), h.reason, h.instance)
                          for h in lineage.history]))


def print_checks(results: list[CheckResult], console: Console | None = None) -> None:
    """One line per upstream, so the output reads well in a terminal and in a log."""
    console = console or Console()
    if not results:
        console.print("no upstream is enabled: nothing to check")
    width = max((len(r.upstream) for r in results), default=0)
    for result in results:
        mark = "[green]OK  [/green]" if result.ok else "[red]FAIL[/red]"
        console.print(f"{mark} {escape(result.upstream.ljust(width))}  {escape(result.detail)}", soft_wrap=True)
