"""Terminal renderings of the store's summary (`mirrord status`, the demo's closing table)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def print_status(data: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    targets = Table(title="Targets")
    for col in ("target", "TAS", "latest upload", "mirrored", "mirrored at"):
        targets.add_column(col)
    for t in data["targets"]:
        targets.add_row(t["name"], t["tas"], str(t["latest_upload"] or ""), str(t["mirrored_upload"] or ""),
                        t["mirrored_at"] or "")
    console.print(targets)
    items = Table(title="Items by state")
    for col in ("kind", "state", "count"):
        items.add_column(col)
    for kind, states in data["items"].items():
        for state, n in sorted(states.items()):
            items.add_row(kind, state, str(n))
    console.print(items)
    if data["attention"]:
        attention = Table(title="Needs attention", title_style="bold red")
        for col in ("item", "state", "why", "since"):
            attention.add_column(col)
        for a in data["attention"]:
            attention.add_row(f"{a['kind']} {a['id']}", a["state"], a["reason"], a["updated_at"])
        console.print(attention)
    runs = Table(title="Recent job runs")
    for col in ("job", "instance", "started", "outcome", "error"):
        runs.add_column(col)
    for r in data["runs"][:10]:
        runs.add_row(r["job"], r["instance"], r["started_at"], r["outcome"], r["error"] or "")
    console.print(runs)
