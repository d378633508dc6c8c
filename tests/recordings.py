"""The real servers' recorded exchanges (`tests/data/recordings/<service>/`): the referee of clients and emulators.

Each exchange file holds one request as sent and the real server's answer (see that folder's README, and
`tests/data/README.md` for where the copy came from). They are data of the suite, kept in the repo so that
a fresh clone tests itself; a run without them fails loudly rather than skipping, since a conformance test
that silently does not run proves nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest

RECORDINGS = Path(__file__).resolve().parent / "data" / "recordings"
# Where the recorded Fragalysis listened: its absolute URLs (paging links, fact 5) start so.
FRAGALYSIS_BASE = "http://127.0.0.1:8000"


@dataclass(frozen=True)
class Exchange:
    name: str  # "029-events-session90011"
    request: dict[str, Any]  # method, path, query, headers, body (and query_string where sent verbatim)
    response: dict[str, Any]  # status, headers, body
    note: str

    @property
    def number(self) -> int:
        return int(self.name.split("-", 1)[0])

    @property
    def caller(self) -> str:
        """Who sent it, as a Fragalysis note starts: `[member] …` -> "member"."""
        return self.note[1:self.note.index("]")]


def recordings_dir(service: str) -> Path:
    folder = RECORDINGS / service
    if not folder.is_dir():
        pytest.fail(f"no recordings at {folder}: the checkout is incomplete")
    return folder


@cache
def exchanges(service: str) -> tuple[Exchange, ...]:
    """Every recorded exchange of `service`, in file order."""
    found = []
    for path in sorted((recordings_dir(service) / "exchanges").glob("*.json")):
        data = json.loads(path.read_text())
        found.append(Exchange(path.stem, data["request"], data["response"], data.get("note", "")))
    return tuple(found)


def exchange(service: str, number: int) -> Exchange:
    return next(x for x in exchanges(service) if x.number == number)


@cache
def seed(service: str) -> dict[str, Any]:
    """The data the real server held while recording, as its API returns it."""
    return json.loads((recordings_dir(service) / "seed.json").read_text())


def archive(service: str, name: str) -> Path:
    """A recorded download body (`{"file": "archives/…"}` in an exchange)."""
    return recordings_dir(service) / name
