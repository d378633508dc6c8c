"""Does a dataset hold diffraction images whose headers PDIS can read, and do they agree? Checked before packing.

PDIS answers an archive it cannot read with `header_not_readable` and one mixing detectors or frame
sizes with `inconsistent_datasets`, after a multi-gigabyte upload. So the real headers are read here,
with the field's own libraries, of the first, a middle and the last frame of each image series:

- fabio (`fabio.openheader`, the header only) for single-frame formats: CBF, SMV, MarCCD, mar345,
  Rayonix, Bruker, ... Where fabio's reader learns the dimensions from the pixels only (SMV, MarCCD),
  the sampled frame is read whole. It installs from wheels, unlike dxtbx (cctbx's, from conda), and
  what it reads (detector, dimensions) is what a consistency check needs.
- h5py for HDF5 (Eiger/NeXus): the master's `/entry/data` links and the linked datasets' shapes and
  types, never pixel data; fabio's Eiger reader would open the frames.

Their detector and frame dimensions must agree. Files that are not images (logs) are ignored.
"""

from __future__ import annotations

import bz2
import gzip
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

# Headers are read, never any linear algebra: numpy (under fabio and h5py) need not start a BLAS
# thread per core in the daemon.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import fabio  # noqa: E402
import h5py  # noqa: E402
from fabio.cbfimage import CbfImage  # noqa: E402

IMAGE_SUFFIXES = {".cbf", ".img", ".mccd", ".tif", ".tiff", ".osc", ".sfrm", ".mar", ".mar2300", ".mar3450",
                  ".edf"}
HDF5_SUFFIXES = {".h5", ".hdf5", ".nxs"}
OPENERS = {".gz": gzip.open, ".bz2": bz2.open}  # compressed frames, by their last suffix
COMPRESSED = set(OPENERS)
CBF_HEADER_LIMIT = 256 * 1024  # a miniCBF header is a few KiB; a full imgCIF one some tens
DATA_GROUP = "/entry/data"
DETECTOR_PATH = "/entry/instrument/detector/description"


@dataclass(frozen=True)
class Preflight:
    ok: bool
    reason: str  # why not ok, or a one-line summary
    images: int  # frames: one per single-frame file, a master's linked frames for HDF5
    formats: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class Header:
    """What must agree between the frames of one dataset."""

    format: str
    detector: str
    shape: tuple[int, ...]

    def __str__(self) -> str:
        return f"{self.detector or 'unknown detector'} {'x'.join(map(str, self.shape))}"


class Problem(Exception):
    """Why the dataset would be refused, as the preflight's reason."""


def _unreadable(what: str) -> Problem:
    return Problem(f"image header not readable: {what}")


# -- HDF5: links and shapes (also used by the dataset completeness check) -----------------------------
@dataclass(frozen=True)
class Block:
    """One frame dataset a master refers to: in which file (beside the master), at which path."""

    file: str
    path: str


def master_blocks(master: Path) -> list[Block]:
    """The frame datasets `/entry/data` refers to: external links, virtual dataset sources, or itself.

    Reads the link table and dataset layouts only; no pixel data, and no linked file is opened.
    """
    blocks: list[Block] = []
    with h5py.File(master, "r") as f:
        group = f.get(DATA_GROUP)
        if not isinstance(group, h5py.Group):
            raise OSError(f"{master.name} has no {DATA_GROUP} group")
        for key in sorted(group):
            link = group.get(key, getlink=True)
            if isinstance(link, h5py.ExternalLink):
                blocks.append(Block(PurePosixPath(link.filename).name, link.path))
                continue
            item = group.get(key)
            if isinstance(item, h5py.Dataset) and item.is_virtual:
                blocks += [Block(master.name if s.file_name == "." else PurePosixPath(s.file_name).name, s.dset_name)
                           for s in item.virtual_sources()]
            elif isinstance(item, h5py.Dataset):
                blocks.append(Block(master.name, item.name))
    return blocks


def block_shape(path: Path, dataset: str) -> tuple[tuple[int, ...], str]:
    """(shape, dtype) of a frame stack; the file must hold the bytes its layout says it stores."""
    with h5py.File(path, "r") as f:
        item = f.get(dataset)
        if not isinstance(item, h5py.Dataset) or item.ndim < 3:
            raise OSError(f"{path.name} has no frame stack at {dataset}")
        stored = item.id.get_storage_size()
        if path.stat().st_size < stored:
            raise OSError(f"{path.name} is {path.stat().st_size} bytes, smaller than its {stored} stored bytes")
        return tuple(int(n) for n in item.shape), str(item.dtype)


def _master_detector(master: Path) -> str:
    with h5py.File(master, "r") as f:
        item = f.get(DETECTOR_PATH)
        if not isinstance(item, h5py.Dataset):
            return ""
        value = item[()]
        return value.decode() if isinstance(value, bytes) else str(value)


# -- single-frame formats through fabio ---------------------------------------------------------------
def _fabio_header(path: Path) -> Header:
    if _suffixes(path)[-1:] == [".cbf"]:
        _require_cbf_binary_start(path)
    try:
        image = fabio.openheader(str(path))
        shape = _known_shape(image)
        if not shape:  # this reader learns the frame's dimensions from its pixels only (SMV, MarCCD)
            image = fabio.open(str(path))
            shape = _known_shape(image)
    except Exception as exc:  # fabio raises whatever its codec meets (IOError, ValueError, KeyError...)
        raise _unreadable(f"{path.name} ({type(exc).__name__}: {exc})") from None
    if not shape or not all(shape):
        raise _unreadable(f"{path.name} (no frame dimensions in its header)")
    return Header(type(image).__name__.removesuffix("Image").lower(), _detector(image.header), shape)


def _known_shape(image: fabio.fabioimage.FabioImage) -> tuple[int, ...]:
    try:
        return tuple(int(n) for n in (image.shape or ()))
    except AttributeError:  # `shape` reads the pixels' shape when the header did not set it
        return ()


def _require_cbf_binary_start(path: Path) -> None:
    """fabio looks for a CBF's binary data start marker until it finds one, even past the end of the
    file: a CBF cut short before its pixels (still being written, or a failed copy) kept a thread at
    100% CPU for ever. So the marker must be in the file's first `CBF_HEADER_LIMIT` bytes."""
    opener = OPENERS.get(path.suffix.lower(), open)
    try:
        with opener(path, "rb") as fh:
            head = fh.read(CBF_HEADER_LIMIT)
    except (OSError, EOFError) as exc:
        raise _unreadable(f"{path.name} ({type(exc).__name__}: {exc})") from None
    if CbfImage.STARTER not in head:
        raise _unreadable(f"{path.name} (no CBF binary data start in its first {CBF_HEADER_LIMIT // 1024} KiB: "
                          "cut short, or not a CBF)")


def _detector(header: dict) -> str:
    """The detector a header names (miniCBF's "# Detector:" line, or a DETECTOR-like key), else ""."""
    contents = str(header.get("_array_data.header_contents", ""))
    for line in contents.splitlines():
        if line.strip().lstrip("#").strip().lower().startswith("detector:"):
            return line.split(":", 1)[1].strip()
    for key in ("DETECTOR_SN", "DETECTOR", "Detector", "detector"):
        if key in header:
            return str(header[key]).strip()
    return ""


def _suffixes(path: Path) -> list[str]:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSED:
        suffixes.pop()
    return suffixes


def _is_image(path: Path) -> bool:
    suffixes = _suffixes(path)
    return bool(suffixes) and (suffixes[-1] in IMAGE_SUFFIXES or suffixes[-1].startswith(".mar"))


def _is_hdf5(path: Path) -> bool:
    suffixes = _suffixes(path)
    return bool(suffixes) and suffixes[-1] in HDF5_SUFFIXES


def _is_master(path: Path) -> bool:
    return path.name.endswith(("_master.h5", "_master.hdf5", ".nxs"))


def image_format(path: Path | str) -> str | None:
    """The image format its real header shows ("cbf", "hdf5", ...), or None when it cannot be read."""
    path = Path(path)
    try:
        if _is_hdf5(path):
            with h5py.File(path, "r"):  # the superblock and root group, not only the signature
                return "hdf5"
        return _fabio_header(path).format
    except (Problem, OSError):
        return None


def image_header_readable(path: Path | str) -> bool:
    return image_format(path) is not None


def _samples(items: list[Path]) -> list[Path]:
    """The first, a middle and the last of a sorted series."""
    return [items[i] for i in sorted({0, len(items) // 2, len(items) - 1})] if items else []


def _agree(headers: list[tuple[str, Header]]) -> str | None:
    first_name, first = headers[0]
    for name, header in headers[1:]:
        if (header.detector, header.shape) != (first.detector, first.shape):
            return f"inconsistent frames: {first_name} is {first}, {name} is {header}"
    return None


def preflight_images(files: list[Path]) -> Preflight:
    """Read the headers of the first, a middle and the last frame of each series; fail with the first
    reason found: an unreadable header, frames that disagree, an HDF5 master whose data files are not
    among `files` or unreadable, HDF5 data files no master links, or no images at all."""
    paths = sorted(map(Path, files))
    frames = [p for p in paths if _is_image(p)]
    masters = [p for p in paths if _is_hdf5(p) and _is_master(p)]
    images, formats = 0, set()
    try:
        if frames:
            headers = [(p.name, _fabio_header(p)) for p in _samples(frames)]
            formats = {h.format for _, h in headers}
            if (problem := _agree(headers)) is not None:
                raise Problem(problem)
            images = len(frames)
        linked: set[str] = set()
        for master in masters:
            count, names = _check_master(master, {p.name for p in paths})
            images += count
            linked |= names
            formats.add("hdf5")
    except Problem as exc:
        return Preflight(False, str(exc), images, formats)
    orphans = [p.name for p in paths if _is_hdf5(p) and not _is_master(p) and p.name not in linked
               and "_meta" not in p.name]
    if orphans:
        return Preflight(False, f"HDF5 data files without a master: {orphans[0]}", images, formats)
    if images == 0:
        return Preflight(False, "no diffraction images", 0, formats)
    return Preflight(True, f"{images} images ({', '.join(sorted(formats))})", images, formats)


def _check_master(master: Path, packed: set[str]) -> tuple[int, set[str]]:
    """Frames a master links, and the data files it names; raises Problem with the reason."""
    try:
        blocks = master_blocks(master)
        detector = _master_detector(master)
    except OSError as exc:
        raise _unreadable(f"{master.name} ({exc})") from None
    if not blocks:
        raise Problem(f"HDF5 master without data files: {master.name}")
    missing = sorted({b.file for b in blocks} - packed)
    if missing:
        raise Problem(f"HDF5 master without data files: {master.name} links {missing[0]}, which is not in the dataset")
    shapes: dict[Block, tuple[tuple[int, ...], str]] = {}
    for block in _samples(blocks):
        try:
            shapes[block] = block_shape(master.parent / block.file, block.path)
        except OSError as exc:
            raise _unreadable(f"{block.file} ({exc})") from None
    headers = [(b.file, Header("hdf5", detector, (*shape[1:],))) for b, (shape, _dtype) in shapes.items()]
    if (problem := _agree(headers)) is not None or len({d for _s, d in shapes.values()}) > 1:
        raise Problem(problem or f"inconsistent frames: {master.name} links data files of different pixel types")
    frames = 0
    for block in blocks:
        shape = shapes.get(block) or _shape_or_raise(master.parent / block.file, block.path)
        frames += shape[0][0]
    return frames, {b.file for b in blocks}


def _shape_or_raise(path: Path, dataset: str) -> tuple[tuple[int, ...], str]:
    try:
        return block_shape(path, dataset)
    except OSError as exc:
        raise _unreadable(f"{path.name} ({exc})") from None
