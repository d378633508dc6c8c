"""PDB codes a person gives (`[pdis] pdb_codes_file`) where the Fragalysis experiments carry none.

A CSV of `sample or experiment code, PDB code` rows; a header row, blank lines and `#` comments are
allowed. It is read again whenever it changes (its size and mtime), so an edit counts on the next run.
A code that disagrees with Fragalysis's is not chosen between: the deposition needs a person.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from pathlib import Path

# Classic 4-character ids and the extended `pdb_` + 8 form wwPDB introduces.
PDB_CODE = re.compile(r"^(?:[0-9][A-Za-z0-9]{3}|pdb_[0-9A-Za-z]{8})$")


class PdbCodesError(ValueError):
    """The file cannot be read or has a line that is not `code, PDB code` (names the file and the line)."""


@dataclass(frozen=True)
class PdbCodes:
    """Upper-cased sample or experiment code -> upper-cased PDB code."""

    by_code: dict[str, str]
    source: str = ""  # the file, for messages
    fingerprint: str = ""  # size and mtime: changes when the file does

    def lookup(self, *codes: str | None) -> str | None:
        for code in codes:
            if code and (found := self.by_code.get(code.strip().upper())):
                return found
        return None


NONE = PdbCodes({})
_cache: dict[Path, PdbCodes] = {}


def load(path: Path | None) -> PdbCodes:
    """The file's codes, read again only when it changed; NONE without a file."""
    if path is None:
        return NONE
    try:
        info = path.stat()
        fingerprint = f"{info.st_size}:{info.st_mtime_ns}"
        cached = _cache.get(path)
        if cached is not None and cached.fingerprint == fingerprint:
            return cached
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise PdbCodesError(f"pdis.pdb_codes_file {path}: {exc.strerror or exc}") from None
    codes = PdbCodes(parse(text, str(path)), str(path), fingerprint)
    _cache[path] = codes
    return codes


def parse(text: str, source: str = "pdb_codes_file") -> dict[str, str]:
    found: dict[str, str] = {}
    for number, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        cells = [c.strip() for c in row]
        if not any(cells) or cells[0].startswith("#"):
            continue
        if len(cells) < 2 or not cells[0] or not PDB_CODE.match(cells[1]):
            if number == 1 and len(cells) >= 2:
                continue  # a header row
            raise PdbCodesError(f"pdis.pdb_codes_file {source}, line {number}: expected `sample or experiment "
                                f"code, PDB code`, got {','.join(row)!r}")
        key, code = cells[0].upper(), cells[1].upper()
        if found.get(key, code) != code:
            raise PdbCodesError(f"pdis.pdb_codes_file {source}, line {number}: {cells[0]} is given two PDB codes "
                                f"({found[key]} and {code})")
        found[key] = code
    return found
