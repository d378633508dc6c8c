"""Does a dataset hold diffraction images with readable headers? Checked before packing."""

from __future__ import annotations

import bz2
import zlib
from dataclasses import dataclass, field
from pathlib import Path

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
IMAGE_HEAD = 4096  # every supported header identifies itself within this many bytes
IMAGE_SUFFIXES = {".cbf", ".img", ".h5", ".hdf5", ".nxs", ".mccd", ".tif", ".tiff", ".osc", ".sfrm", ".mar"}
_COMPRESSED_READ = {".gz": 64 * 1024, ".bz2": 1024 * 1024}  # bz2 emits nothing before a whole block


@dataclass(frozen=True)
class Preflight:
    ok: bool
    reason: str  # why not ok, or a one-line summary
    images: int  # image files; for HDF5, data files that have a master beside them
    formats: set[str] = field(default_factory=set)


def image_format(path: Path | str) -> str | None:
    """The diffraction image format from the file's first bytes (gzip/bzip2-compressed images too)."""
    path = Path(path)
    try:
        head = _image_head(path)
    except (OSError, EOFError, ValueError, zlib.error):
        return None
    return _image_format_of(head)


def image_header_readable(path: Path | str) -> bool:
    return image_format(path) is not None


def _image_head(path: Path) -> bytes:
    with open(path, "rb") as fh:
        head = fh.read(IMAGE_HEAD)
        if head.startswith(b"\x1f\x8b"):
            data = head + fh.read(_COMPRESSED_READ[".gz"] - len(head))
            return zlib.decompressobj(wbits=31).decompress(data, IMAGE_HEAD)
        if head.startswith(b"BZh"):
            data = head + fh.read(_COMPRESSED_READ[".bz2"] - len(head))
            return bz2.BZ2Decompressor().decompress(data, IMAGE_HEAD)
    return head


def _image_format_of(head: bytes) -> str | None:
    if head.startswith(b"###CBF"):
        return "cbf"
    # HDF5 allows a user block before the superblock: the signature sits at 0, 512, 1024, 2048...
    if any(head[offset:offset + 8] == HDF5_SIGNATURE for offset in (0, 512, 1024, 2048)):
        return "hdf5"
    if head.startswith(b"{") and b"HEADER_BYTES=" in head[:128]:
        return "smv"  # ADSC and the many detectors that write SMV .img
    if head[:4] in (b"\xd2\x04\x00\x00", b"\x00\x00\x04\xd2"):
        return "mar345"  # first int32 is 1234 in either byte order
    if head[:4] in (b"II*\x00", b"MM\x00*") and len(head) >= 3072:
        return "tiff"  # MarCCD/Rayonix: a TIFF with a 2048-byte frame header after 1024 bytes
    if head.startswith(b"RAXIS"):
        return "raxis"
    if head.startswith(b"FORMAT :"):
        return "bruker"
    return None


def _looks_like_image(path: Path) -> bool:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSED_READ:
        suffixes.pop()
    if not suffixes:
        return False
    last = suffixes[-1]
    return last in IMAGE_SUFFIXES or last.startswith(".mar")  # .mar2300, .mar3450...


def _hdf5_master_stem(name: str) -> str | None:
    for ending in ("_master.h5", "_master.hdf5", ".nxs"):
        if name.endswith(ending):
            return name[: -len(ending)]
    return None


def preflight_images(files: list[Path]) -> Preflight:
    """Check, from the first bytes of each file, that a dataset holds diffraction images PDIS can read.

    Fails (with the first reason found) on an image-named file whose header is not recognised, an
    HDF5 master without data files beside it, data files without a master, or no images at all.
    Other files (logs, processing output) are ignored.
    """
    images = 0
    formats: set[str] = set()
    problem = ""
    hdf5: dict[Path, list[str]] = {}  # directory -> HDF5 file names
    for path in map(Path, files):
        fmt = image_format(path)
        if fmt is None:
            if _looks_like_image(path) and not problem:
                problem = f"image header not readable: {path.name}"
            continue
        formats.add(fmt)
        if fmt == "hdf5":
            hdf5.setdefault(path.parent, []).append(path.name)
        else:
            images += 1
    for names in hdf5.values():
        found, reason = _pair_hdf5(names)
        images += found
        problem = problem or reason
    if not problem and images == 0:
        problem = "no diffraction images"
    if problem:
        return Preflight(False, problem, images, formats)
    return Preflight(True, f"{images} images ({', '.join(sorted(formats))})", images, formats)


def _pair_hdf5(names: list[str]) -> tuple[int, str]:
    """Count data files that travel with a master in one directory; report the first mismatch."""
    masters = {name: stem for name in names if (stem := _hdf5_master_stem(name)) is not None}
    data = [name for name in names if name not in masters]
    claimed: set[str] = set()
    problem = ""
    for master, stem in sorted(masters.items()):
        mine = [name for name in data if name.startswith(stem + "_")]
        claimed.update(mine)
        if not mine and not problem:
            problem = f"HDF5 master without data files: {master}"
    orphans = sorted(name for name in data if name not in claimed and "_data_" in name)
    if orphans and not problem:
        problem = f"HDF5 data files without a master: {orphans[0]}"
    return len(claimed), problem
