"""The Fragalysis mirror on disk: versions, the `current` link, manifests, temp space, metadata.

    <mirror_root>/<TAS>/<target>/upload_<N>/      one complete version (with .mirrord-version.json)
    <mirror_root>/<TAS>/<target>/current -> upload_<N>
    <mirror_root>/.tmp/upload-<id>.archive        the download of upload row <id>
    <mirror_root>/.tmp/upload-<id>.extract/       its extraction, renamed to upload_<N> when complete

A reader never sees a half-written version: only a directory that holds everything, manifest
included, is ever renamed to `upload_<N>`, and pruning renames a version away before deleting it.
`.tmp` lives inside the mirror root so both renames stay on one file system (atomic).

Everything here is synchronous file-system work: the job calls it through `asyncio.to_thread`.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mirrord.archive import fsync_dir, sync_tree

MANIFEST_NAME = ".mirrord-version.json"
MANIFEST_FORMAT = 1
CURRENT_LINK = "current"
TMP_DIR_NAME = ".tmp"
VERSION_PATTERN = re.compile(r"^upload_(\d+)$")
TEMP_ENTRY_PATTERN = re.compile(r"^upload-(\d+)\.(archive|extract)$")
DISCARD_PREFIX = "discard-"  # versions and leftovers being deleted
# The ligand's SDF: `<obs>_ligand.sdf` on newer backends, `<obs>.sdf` on the 2024-10 one (its archives).
LIGAND_SDF = ("aligned_files/{o}/{o}_ligand.sdf", "aligned_files/{o}/{o}.sdf")


@dataclass(frozen=True)
class ExperimentRecord:
    """One crystallographic experiment of a version, as the store's `Experiment` row wants it."""

    code: str
    pdb_code: str | None = None
    smiles: str | None = None
    compound_code: str | None = None
    resolution: float | None = None
    observations: tuple[str, ...] = ()
    ligand_sdf: str | None = None  # relative to the version directory
    bound_pdb: str | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ExperimentRecord:
        return cls(code=str(data["code"]), pdb_code=data.get("pdb_code"), smiles=data.get("smiles"),
                   compound_code=data.get("compound_code"), resolution=data.get("resolution"),
                   observations=tuple(data.get("observations") or ()), ligand_sdf=data.get("ligand_sdf"),
                   bound_pdb=data.get("bound_pdb"))


@dataclass(frozen=True)
class Manifest:
    """What a complete version holds; its presence under the final name proves the version is whole."""

    target: str
    tas: str
    upload_index: int
    archive_sha256: str
    archive_size: int
    archive_format: str
    file_count: int
    total_bytes: int
    experiments: tuple[ExperimentRecord, ...] = ()
    created_at: str = field(default_factory=lambda: dt.datetime.now(dt.UTC).isoformat())

    def to_json(self) -> str:
        data = asdict(self)
        data["format"] = MANIFEST_FORMAT
        return json.dumps(data, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        data = json.loads(text)
        return cls(target=str(data["target"]), tas=str(data["tas"]), upload_index=int(data["upload_index"]),
                   archive_sha256=str(data["archive_sha256"]), archive_size=int(data["archive_size"]),
                   archive_format=str(data.get("archive_format") or ""), file_count=int(data["file_count"]),
                   total_bytes=int(data.get("total_bytes") or 0),
                   experiments=tuple(ExperimentRecord.from_json(e) for e in data.get("experiments") or ()),
                   created_at=str(data.get("created_at") or ""))


@dataclass(frozen=True)
class MirrorLayout:
    """Where everything of the mirror lives."""

    root: Path

    @property
    def tmp_dir(self) -> Path:
        return self.root / TMP_DIR_NAME

    def target_dir(self, tas: str, target: str) -> Path:
        return self.root / tas / target

    def version_dir(self, tas: str, target: str, upload_index: int) -> Path:
        return self.target_dir(tas, target) / f"upload_{upload_index}"

    def archive_path(self, upload_id: int) -> Path:
        return self.tmp_dir / f"upload-{upload_id}.archive"

    def extract_dir(self, upload_id: int) -> Path:
        return self.tmp_dir / f"upload-{upload_id}.extract"


# -- versions ------------------------------------------------------------------------------------------
def read_manifest(version_dir: Path, *, target: str, tas: str, upload_index: int) -> Manifest | None:
    """The manifest of a complete version of exactly this upload, or None."""
    try:
        manifest = Manifest.from_json((version_dir / MANIFEST_NAME).read_text())
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if (manifest.target, manifest.tas, manifest.upload_index) != (target, tas, upload_index):
        return None
    return manifest


def write_manifest(directory: Path, manifest: Manifest) -> None:
    path = directory / MANIFEST_NAME
    with open(path, "w") as out:
        out.write(manifest.to_json())
        out.flush()
        os.fsync(out.fileno())


def publish_version(layout: MirrorLayout, extract_dir: Path, version_dir: Path) -> None:
    """Give a complete extraction its final name in one rename.

    Its files are made durable first: after a power cut the name must not stand for torn files.
    A directory already there without a valid manifest cannot be ours (we only ever rename complete
    ones), so it is moved away rather than trusted.
    """
    sync_tree(extract_dir)
    version_dir.parent.mkdir(parents=True, exist_ok=True)
    if version_dir.exists() or version_dir.is_symlink():
        discard(layout, version_dir)
    os.rename(extract_dir, version_dir)
    fsync_dir(version_dir.parent)


def published_versions(target_dir: Path) -> list[int]:
    """Upload indexes with a version directory, newest first."""
    try:
        names = os.listdir(target_dir)
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        match = VERSION_PATTERN.match(name)
        if match and (target_dir / name).is_dir() and not (target_dir / name).is_symlink():
            found.append(int(match.group(1)))
    return sorted(found, reverse=True)


def current_version(target_dir: Path) -> int | None:
    try:
        match = VERSION_PATTERN.match(os.readlink(target_dir / CURRENT_LINK))
    except OSError:
        return None
    return int(match.group(1)) if match else None


def point_current(target_dir: Path, upload_index: int) -> int:
    """Point `current` at the newest published version (never backwards); return what it points at.

    The new link is made under a temporary name and renamed over the old one: readers see either
    the old or the new version, never a missing link.
    """
    for name in os.listdir(target_dir):
        if name.startswith(f".{CURRENT_LINK}."):  # a link left by a crash between symlink and rename
            os.unlink(target_dir / name)
    newest = max([upload_index, *published_versions(target_dir)])
    if current_version(target_dir) != newest:
        temp = target_dir / f".{CURRENT_LINK}.{uuid.uuid4().hex}"
        os.symlink(f"upload_{newest}", temp)
        os.replace(temp, target_dir / CURRENT_LINK)
        fsync_dir(target_dir)
    return newest


def prune_versions(layout: MirrorLayout, target_dir: Path, keep: int) -> list[int]:
    """Remove all but the `keep` newest versions (never the current one); return the removed indexes."""
    current = current_version(target_dir)
    removed = []
    for index in published_versions(target_dir)[keep:]:
        if index != current:
            discard(layout, target_dir / f"upload_{index}")
            removed.append(index)
    return removed


def discard(layout: MirrorLayout, path: Path) -> None:
    """Rename away first (one atomic step), then delete at leisure."""
    layout.tmp_dir.mkdir(parents=True, exist_ok=True)
    doomed = layout.tmp_dir / f"{DISCARD_PREFIX}{uuid.uuid4().hex}"
    os.rename(path, doomed)
    remove(doomed)


def remove(path: Path) -> None:
    """Delete a file, link or directory tree if it exists."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


def clean_temp(layout: MirrorLayout, keep: Callable[[int, str], bool]) -> list[str]:
    """Remove leftovers in `.tmp`: discards always, `upload-<id>.*` entries unless `keep(id, kind)`."""
    try:
        names = os.listdir(layout.tmp_dir)
    except FileNotFoundError:
        return []
    removed = []
    for name in names:
        match = TEMP_ENTRY_PATTERN.match(name)
        if name.startswith(DISCARD_PREFIX) or (match and not keep(int(match.group(1)), match.group(2))):
            remove(layout.tmp_dir / name)
            removed.append(name)
    return removed


# -- metadata ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KnownExperiment:
    """What `/api/experiments/` says about an experiment (the archive carries no PDB code)."""

    code: str
    pdb_code: str | None
    resolution: float | None


def read_experiments(version_dir: Path, files: Iterable[str],
                     known: Iterable[KnownExperiment]) -> list[ExperimentRecord]:
    """The experiments of an extracted version: `metadata.csv` (one row per observation) joined with
    the API's experiment list; without a metadata.csv, the observation folders of `aligned_files/`."""
    file_set = set(files)
    by_code = {k.code: k for k in known}
    observations: dict[str, list[str]] = {}
    facts: dict[str, dict[str, str]] = {}
    metadata = version_dir / "metadata.csv"
    if "metadata.csv" in file_set and metadata.is_file():
        for row in _metadata_rows(metadata):
            obs = row.get("code", "")
            experiment = row.get("experiment code") or _experiment_of(obs, by_code)
            if not obs or not experiment:
                continue
            observations.setdefault(experiment, []).append(obs)
            facts.setdefault(experiment, row)
    else:
        for obs in sorted(_aligned_observations(file_set)):
            if experiment := _experiment_of(obs, by_code):
                observations.setdefault(experiment, []).append(obs)
    records = []
    for code, obs_list in observations.items():
        row = facts.get(code, {})
        api = by_code.get(code)
        smiles = row.get("smiles") or _first_smiles(version_dir, file_set, obs_list)
        records.append(ExperimentRecord(
            code=code, pdb_code=api.pdb_code if api else None, smiles=smiles or None,
            compound_code=row.get("compound code") or None, resolution=api.resolution if api else None,
            observations=tuple(obs_list),
            ligand_sdf=_first_existing(file_set, obs_list, *LIGAND_SDF),
            bound_pdb=_first_existing(file_set, obs_list, "aligned_files/{o}/{o}.pdb")))
    return sorted(records, key=lambda r: r.code)


def _metadata_rows(path: Path) -> Iterable[dict[str, str]]:
    """Rows keyed by lower-cased header names (deployments differ in case and spacing)."""
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as handle:
        reader = csv.reader(handle)
        header = [h.strip().lower() for h in next(reader, [])]
        for values in reader:
            yield {name: value.strip() for name, value in zip(header, values, strict=False)}


def _experiment_of(observation: str, known: dict[str, KnownExperiment]) -> str | None:
    """`A71EV2A-x0152a` belongs to `A71EV2A-x0152`: the longest known code it starts with. Short
    codes (`x0152a`, the 2024-10 backend, recording 040) belong to the one known code ending in
    `-x0152`. Otherwise the observation code without its trailing letters."""
    matches = [code for code in known if observation.startswith(code)]
    if matches:
        return max(matches, key=len)
    stripped = re.sub(r"[a-z]+$", "", observation)
    short = [code for code in known if code.endswith(f"-{stripped}")]
    return short[0] if len(short) == 1 else stripped or None


def _aligned_observations(files: set[str]) -> set[str]:
    return {parts[1] for name in files if (parts := name.split("/")) and len(parts) > 2
            and parts[0] == "aligned_files"}


def _first_existing(files: set[str], observations: list[str], *patterns: str) -> str | None:
    return next((path for obs in observations for pattern in patterns
                 if (path := pattern.format(o=obs)) in files), None)


def _first_smiles(version_dir: Path, files: set[str], observations: list[str]) -> str | None:
    rel = _first_existing(files, observations, "aligned_files/{o}/{o}_ligand.smi")
    if rel is None:
        return None
    try:
        text = (version_dir / rel).read_text(errors="replace").strip()
    except OSError:
        return None
    return text.split()[0] if text else None
