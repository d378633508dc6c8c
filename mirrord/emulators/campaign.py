"""A deterministic synthetic fragment-screening campaign shared by the four emulators.

The same science seen from four services: Fragalysis targets whose Target Access String (TAS) is
the ISPyB session name, experiments whose codes are the ISPyB sample names, ligands whose SMILES
are Design Hub compounds, and raw image files on disk that PDIS validates. Everything derives from
a seed, so two runs of the demo or of a test see the same campaign.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from zoneinfo import ZoneInfo

import h5py
import numpy as np

# Real fragment-like molecules (small, drug-like, valid SMILES).
FRAGMENT_SMILES = [
    "O=C(Nc1ccccc1)c1ccco1",
    "CC(=O)Nc1ccc(O)cc1",
    "Cc1ccc(S(N)(=O)=O)cc1",
    "O=C(O)c1ccc2[nH]ccc2c1",
    "NC(=O)c1cccnc1",
    "c1ccc2c(c1)CCN2",
    "OC1CCN(Cc2ccccc2)CC1",
    "Cn1cnc2c1c(=O)n(C)c(=O)n2C",
    "O=S(=O)(Nc1cccnc1)c1ccccc1",
    "CC(C)Nc1ncccn1",
    "O=C1CCCN1c1ccccc1",
    "Nc1nc2ccccc2s1",
    "COc1ccc(CC(N)=O)cc1",
    "Oc1ccc2ncccc2c1",
    "CC1=NN(C(=O)C1)c1ccccc1",
    "N#Cc1ccc(N2CCOCC2)cc1",
]
# Design Hub compounds that never reached a crystal: the mirror must carry them, evidence must not.
UNRELATED_SMILES = ["CCOC(=O)c1ccccc1N", "Clc1ccc(cc1)C(=O)N1CCCC1", "CC(C)(C)OC(=O)N1CCNCC1",
                    "O=C(O)CCc1ccccc1"]

FACILITY_ROOT = "/dls"  # where ISPyB says the raw data lives; sites map it to their own mount
EPOCH = dt.datetime(2026, 9, 1, 8, 0, 0)
FACILITY_ZONE = "Europe/London"  # ISPyB's naive times are this zone's; file mtimes are written to match
FRAMES_PER_DATA_FILE = 100  # HDF5: frames in each data file a master links to
DETECTOR_CBF = "PILATUS 6M, S/N 60-0100 Diamond"
DETECTOR_HDF5 = "Dectris EIGER2 XE 16M"


@dataclass
class Ligand:
    compound_code: str  # the supplier code Fragalysis carries, e.g. Enamine "Z1234567890"
    smiles: str
    designhub_id: str  # "CXN-100001"; opaque string


@dataclass
class Experiment:
    code: str  # "A71EV2A-x0152": Fragalysis experiment code == ISPyB sample name
    ligand: Ligand
    pdb_code: str | None  # deposited structure, or None (not yet deposited)
    resolution: float

    @property
    def observation_codes(self) -> list[str]:
        return [self.code + "a"]


@dataclass
class Collection:
    """One ISPyB data collection (raw images on disk)."""

    session: str  # the visit name == TAS
    sample: str  # sample name == experiment code (or an unrelated sample)
    group_id: int
    collection_id: int
    sample_id: int
    style: str  # "cbf" (printf template), "cbf#" (hash template) or "h5" (master + data files)
    images: int
    run_status: str
    start: dt.datetime
    end: dt.datetime | None
    beamline: str
    corrupt: bool = False  # images whose headers no reader can parse (a detector fault)
    experiment_type: str = "OSC"  # the group's: "OSC" (rotation), "Mesh" (grid scan), "Screening", ...
    # ISPyB's dataCollectionNumber: the sample's n-th run in the visit, written into the template as
    # `<sample>_<run>_…` like every recorded row (seed.json). Two collections given the same run share
    # directory and template (ISPyB recording, fact 19: 90403 and 90404 are both run 1).
    run: int = 1
    frames_left: int = 0  # frames a failed run left on disk (a successful run writes all of them)

    @property
    def prefix(self) -> str:
        return f"{self.sample}_{self.run}"

    @property
    def succeeded(self) -> bool:
        return "success" in self.run_status.lower()

    @property
    def facility_dir(self) -> str:
        return f"{FACILITY_ROOT}/{self.beamline}/data/2026/{self.session}/{self.sample}"

    @property
    def file_template(self) -> str:
        if self.style == "h5":
            return f"{self.prefix}_master.h5"
        if self.style == "cbf#":
            return f"{self.prefix}_####.cbf"
        return f"{self.prefix}_%04d.cbf"

    def file_names(self) -> list[str]:
        """In the order the detector writes them (an HDF5 master last, once its data files are closed)."""
        if self.style == "h5":
            data_files = max(1, -(-self.images // FRAMES_PER_DATA_FILE))
            return [f"{self.prefix}_data_{i:06d}.h5" for i in range(1, data_files + 1)] + [f"{self.prefix}_master.h5"]
        return [f"{self.prefix}_{i:04d}.cbf" for i in range(1, self.images + 1)]

    def written_at(self, index: int, count: int, zone: ZoneInfo) -> float:
        """The mtime (epoch seconds) of the index-th of `count` files: spread over the run, in `zone`."""
        span = (self.end - self.start) if self.end is not None else dt.timedelta(seconds=count)
        naive = self.start + span * index / (count + 1)
        return naive.replace(tzinfo=zone).timestamp()


@dataclass
class Target:
    name: str
    tas: str
    target_id: int
    project_id: int
    beamline: str
    experiments: list[Experiment]
    # Upload history: (upload_version, commit_datetime). Tests append to it.
    uploads: list[tuple[int, dt.datetime]] = field(default_factory=list)

    @property
    def proposal(self) -> str:
        return self.tas.split("-")[0]

    @property
    def visit_number(self) -> int:
        return int(self.tas.split("-")[1])

    def experiment(self, code: str) -> Experiment | None:
        return next((e for e in self.experiments if e.code == code), None)


@dataclass
class Campaign:
    targets: list[Target]
    collections: list[Collection]
    unrelated: list[Ligand]
    image_size: int = 8 * 1024  # bytes of pixel payload per CBF image
    seed: int = 0
    timezone: str = FACILITY_ZONE
    _next_collection_id: int = 1_000_000

    @classmethod
    def demo(cls, seed: int = 0, *, targets: int = 2, experiments: int = 6, image_size: int = 8 * 1024,
             images_per_collection: int = 12, now: dt.datetime | None = None, with_problem: bool = False) -> Campaign:
        """Two targets of six experiments each by default: about a dozen data collections.

        `with_problem` adds what a real visit holds besides clean rotations: a re-collection of a
        deposited crystal whose image headers are corrupt (it needs a person), a good re-collection of
        another crystal (one deposition per PDB code: the older run is superseded), a grid scan, a
        screening shot, a failed run overwritten by its re-collection (deposited), and two successful
        runs writing the same file names (neither can be attributed: both need a person).
        """
        rng = random.Random(seed)
        names = ["A71EV2A", "NSP3A", "Mpro", "D68EV3C", "Zika_NS3", "PHIPA"]
        now = now or dt.datetime.now(dt.UTC).replace(tzinfo=None)
        smiles = FRAGMENT_SMILES[:]
        rng.shuffle(smiles)
        camp = cls(targets=[], collections=[], unrelated=[], image_size=image_size, seed=seed)
        dh = 100_001
        for t in range(targets):
            name = names[t % len(names)] + ("" if t < len(names) else str(t))
            tas = f"lb{32627 + t * 6}-{66 + t}"
            exps = []
            for e in range(experiments):
                x = 100 + t * 50 + e * 7 + rng.randrange(0, 5)
                smi = smiles[(t * experiments + e) % len(smiles)]
                lig = Ligand(f"Z{rng.randrange(10**9, 10**10)}", smi, f"CXN-{dh}")
                dh += 1
                # Most hits were deposited in the PDB; a few are not yet (no PDB code).
                pdb = None if e % 3 == 2 else f"{5 + t}{_alnum(rng)}{_alnum(rng)}{_alnum(rng)}"
                exps.append(Experiment(f"{name}-x{x:04d}", lig, pdb, round(rng.uniform(1.1, 2.4), 2)))
            target = Target(name, tas, target_id=31 + t, project_id=1 + t,
                            beamline="i04-1" if t % 2 == 0 else "i03", experiments=exps)
            # First upload two hours ago: old enough to be past any settle period.
            target.uploads.append((1, now - dt.timedelta(hours=2)))
            camp.targets.append(target)
        for i, smi in enumerate(UNRELATED_SMILES):
            camp.unrelated.append(Ligand(f"Z{rng.randrange(10**9, 10**10)}", smi, f"CXN-{dh + i}"))
        for target in camp.targets:
            for i, exp in enumerate(target.experiments):
                style = ("cbf", "cbf#", "h5")[i % 3]
                camp.add_collection(target.tas, exp.code, beamline=target.beamline, style=style,
                                    images=images_per_collection)
            # One failed run and one unrelated sample per session: recorded, never deposited.
            camp.add_collection(target.tas, target.experiments[0].code, beamline=target.beamline,
                                run_status="Data collection failed", images=2)
        if with_problem:
            camp._add_problems(images_per_collection)
        return camp

    def _add_problems(self, images: int) -> None:
        target = self.targets[-1]
        crystals = [e for e in target.experiments if e.pdb_code]
        tas, beamline = target.tas, target.beamline
        self.add_collection(tas, crystals[0].code, beamline=beamline, images=images).corrupt = True
        self.add_collection(tas, crystals[1].code, beamline=beamline, images=images)  # a better run
        self.add_collection(tas, crystals[2].code, beamline=beamline, images=100, experiment_type="Mesh")
        self.add_collection(tas, crystals[2].code, beamline=beamline, images=5)  # a screening shot
        # Runs sharing a template start an hour apart, so their windows cannot overlap.
        later = max(c.end or c.start for c in self.collections) + dt.timedelta(hours=1)
        failed = self.add_collection(tas, crystals[3].code, beamline=beamline, images=images, start=later,
                                     run_status="Data collection failed", frames_left=images // 2)
        self.add_collection(tas, crystals[3].code, beamline=beamline, images=images, run=failed.run,
                            start=later + dt.timedelta(hours=1))
        shared = f"{target.name}-x0991"  # not a Fragalysis experiment: recorded, never deposited
        first = self.add_collection(tas, shared, beamline=beamline, images=images, start=later + dt.timedelta(hours=2))
        self.add_collection(tas, shared, beamline=beamline, images=images, run=first.run,
                            start=later + dt.timedelta(hours=3))

    # -- growth over time (tests and the demo call these) ----------------------------------------
    def add_collection(self, session: str, sample: str, *, beamline: str = "i04-1", style: str = "cbf",
                       images: int = 12, run_status: str = "Data collection successful",
                       group_id: int | None = None, finished: bool = True, start: dt.datetime | None = None,
                       experiment_type: str = "OSC", run: int | None = None,
                       frames_left: int = 0) -> Collection:
        """A new collection; `start` (naive facility-local) defaults to one minute after the previous one,
        `run` to the sample's next run in the visit (a run already taken re-uses its template)."""
        self._next_collection_id += 1
        cid = self._next_collection_id
        start = start or EPOCH + dt.timedelta(minutes=cid - 1_000_000)
        col = Collection(session=session, sample=sample, group_id=group_id or cid + 5_000_000, collection_id=cid,
                         sample_id=200_000 + _stable_int(sample) % 100_000, style=style, images=images,
                         run_status=run_status, start=start,
                         end=start + dt.timedelta(minutes=3) if finished else None, beamline=beamline,
                         experiment_type=experiment_type, frames_left=frames_left,
                         run=run or 1 + max((c.run for c in self.collections
                                             if (c.session, c.sample) == (session, sample)), default=0))
        self.collections.append(col)
        return col

    def add_upload(self, target_name: str, when: dt.datetime | None = None) -> int:
        target = self.target(target_name)
        version = target.uploads[-1][0] + 1 if target.uploads else 1
        target.uploads.append((version, when or dt.datetime.now(dt.UTC).replace(tzinfo=None)))
        return version

    def target(self, name: str) -> Target:
        return next(t for t in self.targets if t.name == name)

    def target_by_tas(self, tas: str) -> Target | None:
        return next((t for t in self.targets if t.tas == tas), None)

    def experiment(self, code: str) -> tuple[Target, Experiment] | None:
        for t in self.targets:
            if (e := t.experiment(code)) is not None:
                return t, e
        return None

    def expected_depositions(self, *, min_images: int = 10) -> list[Collection]:
        """What the default policy publishes: per PDB code, the newest run of the crystal that is a
        successful rotation of at least `min_images` frames, alone on its file names, with readable images."""
        chosen: dict[str, Collection] = {}
        for col in self.collections:
            found = self.experiment(col.sample)
            if not (found and found[1].pdb_code and col.succeeded and not col.corrupt
                    and col.experiment_type == "OSC" and col.images >= min_images):
                continue
            if any(o is not col and o.succeeded and o.facility_dir == col.facility_dir and o.prefix == col.prefix
                   for o in self.collections):
                continue  # two successful runs wrote these names: neither is attributable
            code = found[1].pdb_code
            if code not in chosen or (col.end or col.start, col.collection_id) > (
                    chosen[code].end or chosen[code].start, chosen[code].collection_id):
                chosen[code] = col
        return list(chosen.values())

    def ligands(self) -> list[Ligand]:
        return [e.ligand for t in self.targets for e in t.experiments] + self.unrelated

    # -- raw data on disk ----------------------------------------------------------------------
    def write_images(self, root: Path, collection: Collection, *, count: int | None = None,
                     overwrite: bool = False) -> Path:
        """Write the collection's image files under `root` (the local mount of FACILITY_ROOT), each
        with an mtime within the run (in the campaign's time zone), as the detector would have.

        `count` writes only the first files, to model a collection still being written.
        """
        directory = root / collection.facility_dir.removeprefix(FACILITY_ROOT + "/")
        directory.mkdir(parents=True, exist_ok=True)
        names = collection.file_names()
        zone = ZoneInfo(self.timezone)
        for i, name in enumerate(names[: count if count is not None else len(names)], start=1):
            path = directory / name
            if overwrite or not path.exists():
                write_image(path, collection, i, self.image_size)
                when = collection.written_at(i, len(names), zone)
                os.utime(path, (when, when))
        return directory

    def write_all_images(self, root: Path) -> None:
        """Every run's files in the order they ran: a later run sharing a template overwrites them."""
        for col in sorted(self.collections, key=lambda c: (c.start, c.collection_id)):
            if col.succeeded or col.frames_left:
                self.write_images(root, col, count=None if col.succeeded else col.frames_left, overwrite=True)


# -- file content generators (deterministic) --------------------------------------------------
def _alnum(rng: random.Random) -> str:
    return rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")


def _stable_int(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:6], "big")


def _payload(key: str, size: int) -> bytes:
    """Deterministic pseudo-random pixel bytes: incompressible, like detector data after its own compression."""
    return random.Random(key).randbytes(size)


CBF_BINARY_MARKER = b"\x0c\x1a\x04\xd5"


def frame_shape(pixels: int) -> tuple[int, int]:
    """(slow, fast) dimensions of a frame of `pixels` pixels: near square, fast a power of two."""
    fast = 1 << max(0, (pixels.bit_length() - 1) // 2)
    while pixels % fast:
        fast //= 2
    return pixels // fast, fast


def cbf_image(collection: Collection, index: int, size: int) -> bytes:
    """A Pilatus miniCBF frame: a real header (fabio reads it) over `size` byte-offset pixels."""
    slow, fast = frame_shape(size)
    # Byte-offset compression: each byte is a pixel step, 0x80 would escape to a wider one.
    pixels = _payload(f"{collection.collection_id}:{index}", size).replace(b"\x80", b"\x7f")
    header = (
        "###CBF: VERSION 1.5, CBFlib v0.7.8 - PILATUS detectors\n\n"
        f"data_{collection.prefix}_{index:04d}\n\n"
        "_array_data.header_convention \"PILATUS_1.2\"\n"
        "_array_data.header_contents\n;\n"
        f"# Detector: {DETECTOR_CBF}\n"
        f"# {(collection.start + dt.timedelta(seconds=index)).isoformat()}\n"
        "# Pixel_size 172e-6 m x 172e-6 m\n# Silicon sensor, thickness 0.000450 m\n"
        "# Exposure_time 0.0400000 s\n# Wavelength 0.97625 A\n# Detector_distance 0.29800 m\n"
        f"# Start_angle {index * 0.1:.4f} deg.\n# Angle_increment 0.1000 deg.\n;\n\n"
        "_array_data.data\n;\n--CIF-BINARY-FORMAT-SECTION--\n"
        "Content-Type: application/octet-stream;\n     conversions=\"x-CBF_BYTE_OFFSET\"\n"
        "Content-Transfer-Encoding: BINARY\n"
        f"X-Binary-Size: {size}\nX-Binary-ID: 1\nX-Binary-Element-Type: \"signed 32-bit integer\"\n"
        "X-Binary-Element-Byte-Order: LITTLE_ENDIAN\n"
        f"X-Binary-Number-of-Elements: {size}\nX-Binary-Size-Fastest-Dimension: {fast}\n"
        f"X-Binary-Size-Second-Dimension: {slow}\nX-Binary-Size-Padding: 0\n\n"
    ).encode()
    trailer = b"\n--CIF-BINARY-FORMAT-SECTION----\n;\n"
    return header + CBF_BINARY_MARKER + pixels + trailer


def _hdf5_bytes(build: Callable[[h5py.File], None]) -> bytes:
    buffer = io.BytesIO()
    with h5py.File(buffer, "w", track_order=True) as f:
        build(f)
    return buffer.getvalue()


def _data_file_frames(collection: Collection, number: int) -> range:
    first = (number - 1) * FRAMES_PER_DATA_FILE
    return range(first, min(first + FRAMES_PER_DATA_FILE, collection.images))


def hdf5_data_file(collection: Collection, number: int, size: int) -> bytes:
    """An Eiger data file: `/entry/data/data` holds its frames (uint16, `size` bytes each)."""
    frames = _data_file_frames(collection, number)
    shape = (len(frames), *frame_shape(max(1, size // 2)))
    pixels = np.frombuffer(_payload(f"{collection.collection_id}:h5:{number}", 2 * int(np.prod(shape))),
                           dtype="<u2").reshape(shape)

    def build(f: h5py.File) -> None:
        f.create_dataset("/entry/data/data", data=pixels, track_times=False)
    return _hdf5_bytes(build)


def hdf5_master(collection: Collection) -> bytes:
    """An Eiger master file: detector metadata and `/entry/data` external links to its data files."""
    data_files = [n for n in collection.file_names() if "_data_" in n]

    def build(f: h5py.File) -> None:
        entry = f.create_group("entry")
        entry.attrs["NX_class"] = "NXentry"
        detector = entry.create_group("instrument/detector")
        detector.create_dataset("description", data=DETECTOR_HDF5, track_times=False)
        detector.create_dataset("count_time", data=0.002, track_times=False)
        data = entry.create_group("data")
        data.attrs["NX_class"] = "NXdata"
        for number, name in enumerate(data_files, start=1):
            data[f"data_{number:06d}"] = h5py.ExternalLink(name, "/entry/data/data")
    return _hdf5_bytes(build)


def image_bytes(collection: Collection, name: str, index: int, size: int) -> bytes:
    """The content of one of the collection's files (`index` counts from 1 in `file_names()`)."""
    if name.endswith("_master.h5"):
        return hdf5_master(collection)
    if name.endswith(".h5"):
        return hdf5_data_file(collection, int(name.rsplit("_", 1)[1].removesuffix(".h5")), size)
    return cbf_image(collection, index, size)


def write_image(path: Path, collection: Collection, index: int, size: int) -> None:
    data = image_bytes(collection, path.name, index, size)
    # A detector fault: the header is gone, the pixels are there.
    path.write_bytes(b"\x00" * 64 + data[64:] if collection.corrupt else data)


def pdb_text(target: Target, exp: Experiment, *, bound: bool = True) -> str:
    lines = [
        f"HEADER    {target.name.upper():<40}{EPOCH:%d-%b-%y}   {exp.pdb_code or 'XXXX'}",
        f"TITLE     PANDDA ANALYSIS OF {exp.code}",
        f"REMARK   2 RESOLUTION.    {exp.resolution:.2f} ANGSTROMS.",
        "CRYST1   86.120   56.440   65.910  90.00  94.28  90.00 C 1 2 1       4",
    ]
    rng = random.Random(_stable_int(exp.code))
    for i in range(1, 9):
        x, y, z = (rng.uniform(-20, 20) for _ in range(3))
        lines.append(f"ATOM  {i:5d}  CA  GLY A{i:4d}    {x:8.3f}{y:8.3f}{z:8.3f}  1.00 20.00           C")
    if bound:
        for i in range(9, 13):
            x, y, z = (rng.uniform(-5, 5) for _ in range(3))
            lines.append(f"HETATM{i:5d}  C{i - 8}  LIG A 501    {x:8.3f}{y:8.3f}{z:8.3f}  1.00 25.00           C")
    lines.append("END")
    return "\n".join(lines) + "\n"


def sdf_text(exp: Experiment) -> str:
    rng = random.Random(_stable_int(exp.code + "sdf"))
    atoms = [f"{rng.uniform(-5, 5):10.4f}{rng.uniform(-5, 5):10.4f}{rng.uniform(-5, 5):10.4f} C   0  0  0  0  0  0"
             for _ in range(4)]
    return "\n".join([
        exp.code + "a", "     mirrord-emulator 3D", "",
        f"{len(atoms):3d}  3  0  0  0  0  0  0  0  0999 V2000", *atoms,
        "  1  2  1  0", "  2  3  1  0", "  3  4  1  0", "M  END",
        "> <SMILES>", exp.ligand.smiles, "", "> <compound_code>", exp.ligand.compound_code, "", "$$$$",
    ]) + "\n"
