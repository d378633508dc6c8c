"""The reliability promise as code: "nothing lost, nothing duplicated, never stuck".

`Pipeline` serves the four emulators for one demo campaign in the calling process and runs the real
`mirrord once` as a subprocess against them, so a test can SIGKILL it anywhere or let the emulators
misbehave. `check_invariants` then inspects what is left — emulator counters, the mirror on disk, the
spool and the store — and returns a `Summary` that two runs (say, with and without faults) can compare.

Shared by `test_chaos.py`, `test_faults.py`, `test_secrets_scan.py`, `bench/chaos.py` and `bench/soak.py`.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select

from mirrord.cli import EXIT_ATTENTION, EXIT_OK
from mirrord.config import Config, load_config
from mirrord.emulators.base import FAULTS_KEY, Faults
from mirrord.emulators.bundle import EmulatorBundle
from mirrord.emulators.campaign import Campaign
from mirrord.jobs.fragalysis_mirror import (
    CURRENT_LINK,
    MANIFEST_NAME,
    TMP_DIR_NAME,
    Manifest,
    current_version,
    published_versions,
)
from mirrord.store import Store
from mirrord.store.counts import item_counts
from mirrord.store.models import ITEM_MODELS, Annotation, Dataset, Deposition, Target, Upload, utcnow
from tests.ispyb_openapi import validating_middleware

ROOT = Path(__file__).resolve().parents[1]
# States an item passes through while a step is under way (a lease is held, or was when it died).
TRANSIENT_STATES = {"building", "fetching", "extracting", "packing", "uploading", "withdrawing"}

# `mirrord once` finished its work: nothing failed (items that need a person are a result, not a failure).
ONCE_DONE = (EXIT_OK, EXIT_ATTENTION)


def fast_campaign(seed: int = 0) -> Campaign:
    """The demo campaign (with its problem cases) with tiny images, so a run takes seconds."""
    return Campaign.demo(seed=seed, with_problem=True, image_size=1024)


# -- one pipeline: emulators in this process, mirrord in a subprocess ---------------------------------
@dataclass
class RunRecord:
    exit_code: int | None  # None: we killed it
    seconds: float
    log: Path


@dataclass
class Convergence:
    runs: list[RunRecord] = field(default_factory=list)

    @property
    def kills(self) -> int:
        return sum(1 for r in self.runs if r.exit_code is None)

    @property
    def restarts(self) -> int:
        return len(self.runs) - 1

    @property
    def converged(self) -> bool:
        return bool(self.runs) and self.runs[-1].exit_code in ONCE_DONE


class Pipeline:
    """A campaign, its emulators on loopback and a config with test-sized intervals.

    `retry_base`/`retry_max` are small so that a run with faults converges in seconds.
    """

    def __init__(self, root: Path, *, campaign: Campaign | None = None, fault_rate: float = 0.0, seed: int = 0,
                 stall_seconds: float = 0.5, retry_base: str = "0.3s", retry_max: str = "2s",
                 log_level: str = "info", extra_config: str = "", env: dict[str, str] | None = None) -> None:
        self.root = root
        self.campaign = campaign or fast_campaign()
        # Every ISPyB exchange of these suites is checked against the real OpenAPI spec too.
        self.spec_violations: list[str] = []
        self.bundle = EmulatorBundle(self.campaign, root / "upstreams", fault_rate=fault_rate, seed=seed,
                                     pdis_step=0.05,
                                     ispyb_middlewares=(validating_middleware(self.spec_violations),))
        self.bundle.fragalysis.build_seconds = 0.05
        for served_faults in self.faults:
            served_faults.stall_seconds = stall_seconds
            served_faults.retry_after = 0.05
        self.retry = (retry_base, retry_max)
        self.extra_config = f'[log]\nformat = "json"\nlevel = "{log_level}"\n' + extra_config
        self.env = env or {}
        self.state_dir = root / "state"
        self.config_path = root / "mirrord.toml"
        self.run_count = 0

    @property
    def faults(self) -> list[Faults]:
        b = self.bundle
        return [e.app[FAULTS_KEY] for e in (b.fragalysis, b.ispyb, b.pdis, b.designhub)]

    def injected(self) -> Counter:
        """Faults the four emulators injected so far, by kind."""
        return sum((f.injected for f in self.faults), start=Counter())

    async def __aenter__(self) -> Pipeline:
        await self.bundle.start()
        self.campaign.write_all_images(self.bundle.data_root)
        text = self.bundle.config_toml(self.state_dir, extra=self.extra_config)
        base, cap = self.retry
        text = (text.replace('retry_base = "1s"', f'retry_base = "{base}"')
                .replace('retry_max = "10s"', f'retry_max = "{cap}"')
                .replace("[fragalysis]\nenabled = true\n", '[fragalysis]\nenabled = true\nbuild_poll_interval = "0.05s"\n')
                .replace('poll_interval = "0.5s"', 'poll_interval = "0.1s"'))
        self.config_path.write_text(text)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.bundle.stop()

    @property
    def config(self) -> Config:
        return load_config(self.config_path, env={})

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "mirrord.cli", "--config", str(self.config_path), *args]

    async def spawn(self, *args: str, **streams: object) -> asyncio.subprocess.Process:
        """`mirrord <args>` on this pipeline's config and environment; `streams` are stdout/stderr."""
        return await asyncio.create_subprocess_exec(*self.command(*args), cwd=ROOT,
                                                    env={**os.environ, "MIRRORD_CONFIG": "", **self.env},
                                                    **streams)  # type: ignore[arg-type]

    async def run_once(self, *, kill_after: float | None = None, wait: float = 10.0,
                       timeout: float = 120.0) -> RunRecord:
        """One `mirrord once`; SIGKILLed after `kill_after` seconds if it is still running then."""
        self.run_count += 1
        log = self.root / f"run-{self.run_count:03d}.log"
        started = time.monotonic()
        with open(log, "wb") as out:
            proc = await self.spawn("once", "--wait", f"{wait:g}", stdout=out, stderr=asyncio.subprocess.STDOUT)
            try:
                code = await asyncio.wait_for(proc.wait(), kill_after if kill_after is not None else timeout)
            except TimeoutError:
                proc.send_signal(signal.SIGKILL)
                await proc.wait()
                if kill_after is None:
                    raise AssertionError(f"mirrord once did not finish within {timeout}s; see {log}") from None
                code = None
        return RunRecord(code, time.monotonic() - started, log)

    async def converge(self, kill_after: list[float] = (), *, max_runs: int = 8, wait: float = 10.0) -> Convergence:
        """Run `once` killing it after each delay in turn, then until it exits 0 (at most `max_runs` runs)."""
        result = Convergence()
        for delay in kill_after:
            result.runs.append(await self.run_once(kill_after=delay, wait=wait))
            if result.runs[-1].exit_code in ONCE_DONE:
                return result  # finished before the kill came
        while len(result.runs) < max_runs:
            result.runs.append(await self.run_once(wait=wait))
            if result.runs[-1].exit_code in ONCE_DONE:
                break
        return result

    def tail(self, record: RunRecord, chars: int = 3000) -> str:
        return record.log.read_text(errors="replace")[-chars:]


# -- the invariants ---------------------------------------------------------------------------------
@dataclass
class Summary:
    """The end state in comparable form (no ids or timestamps that differ between runs)."""

    published_collections: list[int]
    published_md5s: list[str]
    submissions_per_md5: dict[str, int]
    attachments_per_compound: dict[str, int]
    mirrored_versions: dict[str, list[int]]
    states: dict[str, dict[str, int]]
    violations: list[str]

    def comparable(self) -> dict:
        # md5s depend on the image files' mtimes, which differ between two pipelines: compare counts.
        return {"published_collections": self.published_collections,
                "submissions": sorted(self.submissions_per_md5.values()),
                "attachments_per_compound": self.attachments_per_compound,
                "mirrored_versions": self.mirrored_versions, "states": self.states}


def expected_publications(campaign: Campaign) -> set[int]:
    """Collection ids that must end published: one per PDB code (see `Campaign.expected_depositions`)."""
    return {col.collection_id for col in campaign.expected_depositions()}


async def check_invariants(pipeline: Pipeline) -> Summary:
    config = pipeline.config
    bundle, campaign = pipeline.bundle, pipeline.campaign
    violations: list[str] = [f"ISPyB spec: {v}" for v in pipeline.spec_violations]
    store = Store(config.daemon.resolved_database_url)
    try:
        async with store.read() as s:
            deps = (await s.execute(select(Deposition, Dataset.collection_id)
                                    .join(Dataset, Dataset.id == Deposition.dataset_id))).all()
            annotations = (await s.scalars(select(Annotation))).all()
            targets = (await s.scalars(select(Target))).all()
            uploads = (await s.scalars(select(Upload))).all()
            states = {}
            leased = []
            now = utcnow()
            for kind, model in ITEM_MODELS.items():
                rows = (await s.scalars(select(model))).all()
                states[kind] = dict(sorted(Counter(r.state for r in rows).items()))
                for r in rows:
                    if r.lease_owner is not None or r.lease_until is not None:
                        leased.append(f"{kind} {r.id} [{r.state}] leased by {r.lease_owner}")
                    if r.state in TRANSIENT_STATES and r.lease_until is not None and r.lease_until < now:
                        violations.append(f"{kind} {r.id} stuck in {r.state} with an expired lease")
            # The counts /status and /metrics show are kept by triggers: whatever moved, however it died.
            kept = await item_counts(s)
            violations += [f"item counts {kind}: kept {kept[kind]} != rows {states[kind]}"
                           for kind in ITEM_MODELS if kept[kind] != states[kind]]
    finally:
        await store.close()
    violations += [f"still leased after exit: {line}" for line in leased]

    # Depositions: exactly one submission per eligible dataset, each published once.
    submissions = dict(bundle.pdis.submissions_by_md5)
    published = {cid: d for d, cid in deps if d.state == "published"}
    wanted = expected_publications(campaign)
    if set(published) != wanted:
        violations.append(f"published collections {sorted(published)} != expected {sorted(wanted)}")
    per_dataset = Counter(cid for _, cid in deps)
    violations += [f"collection {cid} has {n} depositions" for cid, n in per_dataset.items() if n != 1]
    for cid, dep in published.items():
        if submissions.get(dep.tar_md5) != 1:
            violations.append(f"collection {cid} (md5 {dep.tar_md5}) submitted {submissions.get(dep.tar_md5)} times")
    extra = set(submissions) - {d.tar_md5 for d in published.values()}
    if extra or any(n != 1 for n in submissions.values()):
        violations.append(f"PDIS submissions not exactly once per published dataset: {submissions}")

    # The mirror: every version complete and verified, `current` at the newest, no temp files.
    mirror = config.mirror_root
    versions: dict[str, list[int]] = {}
    for target in campaign.targets:
        target_dir = mirror / target.tas / target.name
        have = published_versions(target_dir) if target_dir.exists() else []
        versions[target.name] = have
        newest = target.uploads[-1][0]
        if current_version(target_dir) != newest or not (target_dir / CURRENT_LINK).is_symlink():
            violations.append(f"{target.name}: current -> {current_version(target_dir)}, newest is {newest}")
        for index in have:
            violations += _version_problems(target_dir / f"upload_{index}", target.name, target.tas, index)
    for t in targets:
        spec = next((ct for ct in campaign.targets if ct.name == t.name), None)
        if spec and t.mirrored_upload != spec.uploads[-1][0]:
            violations.append(f"store: {t.name} mirrored_upload {t.mirrored_upload}, newest {spec.uploads[-1][0]}")
    for u in uploads:
        # Versions beyond `keep_versions` are recorded as `pruned`; every `mirrored` one is on disk.
        if u.state == "mirrored" and not (u.mirror_path and Path(u.mirror_path).is_dir()):
            violations.append(f"upload {u.id} mirrored but {u.mirror_path} is missing")
    leftovers = sorted(os.listdir(mirror / TMP_DIR_NAME)) if (mirror / TMP_DIR_NAME).exists() else []
    if leftovers:
        violations.append(f"mirror temp files left: {leftovers}")
    spool = sorted(os.listdir(config.spool_dir)) if config.spool_dir.exists() else []
    if spool:
        violations.append(f"spool files left after publishing: {spool}")

    # Design Hub: each evidence attached exactly once, to the compound the ledger says.
    attached = Counter(a.compound_id for a in annotations if a.state == "attached")
    upstream = {cid: len(atts) for cid, atts in bundle.designhub.attachments.items() if atts}
    if upstream != dict(attached):
        violations.append(f"Design Hub attachments {upstream} != ledger {dict(attached)}")
    for target in campaign.targets:
        for exp in target.experiments:
            if attached.get(exp.ligand.designhub_id, 0) != 1:
                violations.append(f"evidence for {exp.code} attached {attached.get(exp.ligand.designhub_id, 0)} times")

    return Summary(
        published_collections=sorted(published),
        published_md5s=sorted(d.tar_md5 for d in published.values()),
        submissions_per_md5=dict(sorted(submissions.items())),
        attachments_per_compound=dict(sorted(upstream.items())),
        mirrored_versions=versions, states=states, violations=violations)


def _version_problems(version_dir: Path, target: str, tas: str, index: int) -> list[str]:
    try:
        manifest = Manifest.from_json((version_dir / MANIFEST_NAME).read_text())
    except (OSError, ValueError, KeyError) as exc:
        return [f"{version_dir}: no valid manifest ({exc})"]
    if (manifest.target, manifest.tas, manifest.upload_index) != (target, tas, index):
        return [f"{version_dir}: manifest is for {manifest.target}/{manifest.tas}/{manifest.upload_index}"]
    files = [p for p in version_dir.rglob("*") if p.is_file() and p.name != MANIFEST_NAME]
    if len(files) != manifest.file_count:
        return [f"{version_dir}: {len(files)} files, manifest says {manifest.file_count}"]
    return []
