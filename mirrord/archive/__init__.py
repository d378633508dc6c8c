"""Archives in and out: deterministic tar.zst packing for PDIS, defensive extraction of downloads.

Everything here is synchronous and streams in bounded memory: callers run it in a thread
(`asyncio.to_thread`). Three parts:

- packing (`pack_dataset`): same files → same tar bytes → same md5, because PDIS answers a duplicate
  upload with 409 and the only way to adopt the earlier submission is to find it by that md5;
- extraction (`safe_extract`): archives come from remote servers, so each member is validated before
  it is written, in one pass over the archive, every write is checked again against the destination,
  and a refusal half-way removes what was written;
- preflight (`preflight_images`): a dataset without readable diffraction images is refused by PDIS
  after a multi-gigabyte upload, so read the headers of sampled frames (fabio, h5py) before packing.
"""

from mirrord.archive.common import (
    ArchiveError,
    CorruptArchive,
    DatasetChanged,
    UnreadableFile,
    UnsafeArchive,
    UnsupportedFile,
    fsync_dir,
    sync_tree,
)
from mirrord.archive.extract import ExtractResult, safe_extract, sniff_format
from mirrord.archive.pack import (
    PackResult,
    dataset_size,
    free_bytes,
    free_space_ok,
    pack_dataset,
    room_for,
    verify_spool,
)

# The preflight loads fabio, h5py and numpy (about 35 MB and a tenth of a second): only for who uses it,
# not for every download, extraction or pack.
_PREFLIGHT = ("Preflight", "image_format", "image_header_readable", "preflight_images")


def __getattr__(name: str) -> object:
    if name in _PREFLIGHT:
        from mirrord.archive import preflight

        return getattr(preflight, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ArchiveError", "CorruptArchive", "DatasetChanged", "ExtractResult", "PackResult", "Preflight",
    "UnreadableFile", "UnsafeArchive", "UnsupportedFile", "dataset_size", "free_bytes", "free_space_ok", "fsync_dir",
    "image_format", "image_header_readable", "pack_dataset", "preflight_images", "room_for", "safe_extract",
    "sniff_format", "sync_tree", "verify_spool",
]
