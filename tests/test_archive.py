"""Packing, safe extraction and preflight, on real files and real archives in tmp_path."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import os
import stat
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import fabio
import numpy as np
import pytest
import xxhash
import zstandard

from mirrord.archive import (
    CorruptArchive,
    DatasetChanged,
    UnreadableFile,
    UnsafeArchive,
    UnsupportedFile,
    dataset_size,
    extract,
    free_space_ok,
    image_format,
    image_header_readable,
    pack_dataset,
    preflight_images,
    room_for,
    safe_extract,
    sniff_format,
    verify_spool,
)
from mirrord.archive import pack as pack_mod
from mirrord.archive.common import CHUNK
from mirrord.emulators.campaign import Campaign, cbf_image, pdb_text, sdf_text
from tests.recordings import archive, recordings_dir

MiB = 1024 * 1024
LONG_NAME = "a_rather_long_detector_image_name_" + "x" * 90 + ".cbf"  # over ustar's 100 bytes: PAX path


def make_dataset(root: Path) -> Path:
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "img_0001.cbf").write_bytes(b"###CBF: VERSION 1.5\n" + os.urandom(3000))
    (root / "img_0002.cbf").write_bytes(b"###CBF: VERSION 1.5\n" + os.urandom(700))
    (root / "sub" / "notes_é.txt").write_text("non-ASCII name\n")
    (root / "sub" / "deeper" / LONG_NAME).write_bytes(b"x" * 512)
    (root / "empty.log").write_bytes(b"")
    for i, path in enumerate(sorted(root.rglob("*"))):
        if path.is_file():
            os.utime(path, (1_700_000_000 + i, 1_700_000_000.75 + i))
    return root


def tar_bytes(path: Path) -> bytes:
    return zstandard.ZstdDecompressor().stream_reader(path.read_bytes(), read_across_frames=True).read()


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# -- packing -----------------------------------------------------------------------------------

def test_pack_is_deterministic_and_mtime_sensitive(tmp_path):
    src = make_dataset(tmp_path / "ds")
    first = pack_dataset(src, tmp_path / "a.tar.zst")
    (src / "sub" / "unrelated.tmp").write_text("appears and disappears")  # moves the directory mtime
    (src / "sub" / "unrelated.tmp").unlink()
    second = pack_dataset(src, tmp_path / "b.tar.zst", threads=0)
    assert first.tar_md5 == second.tar_md5
    assert tar_bytes(first.path) == tar_bytes(second.path)

    os.utime(src / "img_0002.cbf", (1_800_000_000, 1_800_000_000))
    third = pack_dataset(src, tmp_path / "c.tar.zst")
    assert third.tar_md5 != first.tar_md5


@pytest.mark.parametrize("data, workers", [
    ("incompressible", 3),  # one core of four left to the md5, the critical path then
    ("count_like", -1),  # every core compresses
    ("empty", -1),
])
def test_compression_threads_follow_a_sample_of_the_largest_file(tmp_path, monkeypatch, data, workers):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    src = tmp_path / "ds"
    src.mkdir()
    (src / "header.txt").write_bytes(b"text compresses well " * 100)
    body = {"incompressible": os.urandom(3 * MiB), "empty": b"",
            "count_like": os.urandom(3 * MiB).translate(bytes(min(255, i // 16) for i in range(256)))}[data]
    (src / "frame.cbf").write_bytes(body)
    members = pack_mod._plan_members(src, None, None)
    assert pack_mod.compression_threads(members, 3) == workers
    # the chosen count changes the time, never the archive's content
    chosen = pack_dataset(src, tmp_path / "auto.tar.zst")
    single = pack_dataset(src, tmp_path / "single.tar.zst", threads=0)
    assert tar_bytes(chosen.path) == tar_bytes(single.path)
    assert chosen.tar_md5 == single.tar_md5


def test_digests_and_normalised_members(tmp_path):
    src = make_dataset(tmp_path / "ds")
    result = pack_dataset(src, tmp_path / "out.tar.zst", level=1)
    raw = tar_bytes(result.path)
    assert (result.tar_size, result.tar_md5) == (len(raw), hashlib.md5(raw).hexdigest())
    packed = result.path.read_bytes()
    assert (result.zst_size, result.zst_digest) == (len(packed), f"xxh3_128:{xxhash.xxh3_128(packed).hexdigest()}")
    assert result.tar_size % tarfile.RECORDSIZE == 0
    assert result.source_bytes == dataset_size(p for p in src.rglob("*") if p.is_file())

    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        members = tar.getmembers()
        names = [m.name for m in members]
        assert names == ["empty.log", "img_0001.cbf", "img_0002.cbf", "sub", "sub/deeper",
                         f"sub/deeper/{LONG_NAME}", "sub/notes_é.txt"]
        assert result.member_count == len(members)
        for m in members:
            assert (m.uid, m.gid, m.uname, m.gname) == (0, 0, "", "")
            assert m.mode == (0o755 if m.isdir() else 0o644)
            assert set(m.pax_headers) <= {"path"}  # no atime/ctime/mtime records
            if m.isfile():
                source = src / m.name
                assert m.mtime == int(source.stat().st_mtime)
                assert tar.extractfile(m).read() == source.read_bytes()


def test_files_subset_and_arcname_root(tmp_path):
    src = make_dataset(tmp_path / "ds")
    result = pack_dataset(src, tmp_path / "out.tar.zst", files=["img_0002.cbf", "sub/notes_é.txt"],
                          arcname_root="A71EV2A-x0152")
    with tarfile.open(fileobj=io.BytesIO(tar_bytes(result.path))) as tar:
        assert tar.getnames() == ["A71EV2A-x0152", "A71EV2A-x0152/img_0002.cbf", "A71EV2A-x0152/sub",
                                  "A71EV2A-x0152/sub/notes_é.txt"]
    with pytest.raises(ValueError):
        pack_dataset(src, tmp_path / "bad.tar.zst", files=["../ds/img_0001.cbf"])


def test_progress_reports_every_byte(tmp_path):
    src = tmp_path / "ds"
    src.mkdir()
    with open(src / "big.h5", "wb") as fh:
        fh.truncate(9 * MiB)
    seen: list[int] = []
    result = pack_dataset(src, tmp_path / "out.tar.zst", progress=seen.append)
    assert sum(seen) == result.source_bytes == 9 * MiB
    assert len(seen) >= 3  # large reads, but more than one


@pytest.mark.parametrize("change", ["grow", "touch", "shrink"])
def test_dataset_changed_during_packing_leaves_nothing(tmp_path, change):
    src = tmp_path / "ds"
    src.mkdir()
    growing = src / "growing_0001.cbf"
    with open(growing, "wb") as fh:
        fh.truncate(9 * MiB)  # several reads, so the callback runs before the file is finished
    out = tmp_path / "spool"
    out.mkdir()

    def modify(_: int) -> None:
        if change == "grow":
            with open(growing, "ab") as fh:
                fh.write(b"more frames")
        elif change == "touch":
            os.utime(growing, (1_900_000_000, 1_900_000_000))
        else:
            os.truncate(growing, 1 * MiB)

    with pytest.raises(DatasetChanged) as caught:
        pack_dataset(src, out / "ds.tar.zst", progress=modify)
    assert caught.value.path == growing
    assert leftovers(out) == []


def test_links_and_unreadable_files_are_refused(tmp_path, monkeypatch):
    src = make_dataset(tmp_path / "ds")
    out = tmp_path / "spool"
    out.mkdir()
    (src / "link.cbf").symlink_to(src / "img_0001.cbf")
    with pytest.raises(UnsupportedFile, match="symlink"):
        pack_dataset(src, out / "a.tar.zst")
    with pytest.raises(UnsupportedFile, match="directory"):
        pack_dataset(src, out / "a.tar.zst", files=["sub"])
    (src / "link.cbf").unlink()

    real_open = os.open
    victim = str(src / "img_0002.cbf")

    def denying_open(path, *args, **kwargs):  # tests run as root, so chmod 000 would not stop a read
        if str(path) == victim:
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", denying_open)
    with pytest.raises(UnreadableFile, match="img_0002.cbf"):
        pack_dataset(src, out / "a.tar.zst")
    assert leftovers(out) == []


def test_failed_pack_keeps_an_existing_dest(tmp_path):
    src = make_dataset(tmp_path / "ds")
    dest = tmp_path / "ds.tar.zst"
    dest.write_bytes(b"previous spool")
    with pytest.raises(FileNotFoundError):
        pack_dataset(src, dest, files=["missing.cbf"])
    assert dest.read_bytes() == b"previous spool"
    assert leftovers(tmp_path) == ["ds", "ds.tar.zst"]


def test_a_failing_hash_thread_fails_the_pack_without_hanging(tmp_path, monkeypatch):
    """The md5 runs in its own thread; its error must reach the caller, not stall the buffer pool."""
    import mirrord.archive.pack as pack_module

    class BrokenMd5:
        def update(self, data):
            time.sleep(0.3)  # long enough for the reader to queue every buffer of the pool
            raise MemoryError("md5 failed")

    monkeypatch.setattr(pack_module.hashlib, "md5", lambda **kw: BrokenMd5())
    src = tmp_path / "ds"
    src.mkdir()
    (src / "big.cbf").write_bytes(os.urandom(20 * CHUNK))  # more buffers than the pool holds
    with pytest.raises(MemoryError, match="md5 failed"):
        pack_dataset(src, tmp_path / "out.tar.zst")
    assert leftovers(tmp_path) == ["ds"]


def test_a_failing_spool_write_fails_the_pack_without_hanging(tmp_path, monkeypatch):
    """The spool file is written by its own thread; a full disk must reach the caller, not block the compressor."""
    import errno

    import mirrord.archive.pack as pack_module

    def disk_full(fd, data):
        time.sleep(0.1)  # long enough for the compressor to fill the writer's queue
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pack_module, "write_all", disk_full)
    src = tmp_path / "ds"
    src.mkdir()
    (src / "big.cbf").write_bytes(os.urandom(40 * CHUNK))  # more compressed chunks than the queue holds
    with pytest.raises(OSError, match="No space left"):
        pack_dataset(src, tmp_path / "out.tar.zst")
    assert leftovers(tmp_path) == ["ds"]


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(field)


def reset_peak_rss() -> int:
    """Reset this process's peak RSS to its current RSS (or skip where that cannot be done); the RSS, KiB."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pytest.skip("cannot reset the peak RSS here")
    before = _status_kib("VmRSS")
    if _status_kib("VmHWM") - before > 8 * 1024:
        pytest.skip("this kernel does not reset the peak RSS")
    return before


def test_packing_uses_bounded_memory(tmp_path):
    src = tmp_path / "ds"
    src.mkdir()
    for i in range(2):
        with open(src / f"sparse_{i}_data_000001.h5", "wb") as fh:
            fh.truncate(120 * MiB)  # sparse: quick to make, still read in full
    with open(src / "random.cbf", "wb") as fh:
        for _ in range(48):
            fh.write(os.urandom(MiB))  # incompressible: the output is as large as the input
    before = reset_peak_rss()
    result = pack_dataset(src, tmp_path / "big.tar.zst")
    growth_mib = (_status_kib("VmHWM") - before) / 1024
    assert result.source_bytes == 288 * MiB
    assert growth_mib < 100, f"peak RSS grew by {growth_mib:.0f} MiB"


def test_verify_spool(tmp_path):
    result = pack_dataset(make_dataset(tmp_path / "ds"), tmp_path / "out.tar.zst")
    assert verify_spool(result.path, result.zst_digest, result.zst_size)
    assert not verify_spool(result.path, result.zst_digest, result.zst_size + 1)
    sha256 = hashlib.sha256(result.path.read_bytes()).hexdigest()
    assert verify_spool(result.path, f"sha256:{sha256}", result.zst_size)  # packed before xxh3
    assert verify_spool(result.path, sha256, result.zst_size)  # a bare sha256 (Fragalysis downloads)
    data = bytearray(result.path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    result.path.write_bytes(bytes(data))
    assert not verify_spool(result.path, result.zst_digest, result.zst_size)
    assert not verify_spool(result.path, f"sha256:{sha256}", result.zst_size)
    assert not verify_spool(tmp_path / "gone.tar.zst", result.zst_digest, result.zst_size)


def test_files_across_buffer_boundaries_come_out_whole(tmp_path):
    """Members are assembled in reused CHUNK-sized buffers: sizes around the edges must not shift a byte."""
    src = tmp_path / "ds"
    src.mkdir()
    sizes = [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 517, 511, 513]
    contents = {f"f{i:02d}.cbf": os.urandom(size) for i, size in enumerate(sizes)}
    for name, data in contents.items():
        (src / name).write_bytes(data)
    result = pack_dataset(src, tmp_path / "out.tar.zst", arcname_root="ds")
    raw = tar_bytes(result.path)
    assert (result.tar_size, result.tar_md5) == (len(raw), hashlib.md5(raw).hexdigest())
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    assert files == {f"ds/{name}": data for name, data in contents.items()}


# -- disk space -------------------------------------------------------------------------------

def test_free_space_and_dataset_size(tmp_path):
    src = make_dataset(tmp_path / "ds")
    files = [p for p in src.rglob("*") if p.is_file()]
    assert dataset_size(files) == sum(p.stat().st_size for p in files) > 0
    assert free_space_ok(tmp_path, 1024, reserve_bytes=0)
    assert free_space_ok(tmp_path / "not" / "made" / "yet", 1024, reserve_bytes=0)
    assert not free_space_ok(tmp_path, 1 << 60)
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    assert not free_space_ok(tmp_path, free - 1024, margin=0.0, reserve_bytes=64 * MiB)


def test_room_for_keeps_a_margin_of_the_archive_and_the_reserve(tmp_path, monkeypatch):
    """The rule the packers apply to the free space they read: the archive, 5% of it, and the reserve.
    Kills `room_for`'s margin default changed (1.05: room for half the archives) and `free_space_ok`
    dropping the reserve it is given for the default."""
    assert room_for(1050, 1000, reserve_bytes=0) and not room_for(1049, 1000, reserve_bytes=0)
    assert room_for(1050 + 7, 1000, reserve_bytes=7) and not room_for(1050 + 6, 1000, reserve_bytes=7)
    monkeypatch.setattr(pack_mod, "free_bytes", lambda directory: 1024 * MiB)
    assert pack_mod.free_space_ok(tmp_path, 1000 * MiB, margin=0.0, reserve_bytes=0)
    assert not pack_mod.free_space_ok(tmp_path, 1000 * MiB, margin=0.0)  # the default reserve is 256 MiB


# -- sniffing ---------------------------------------------------------------------------------

def _v7_tar(payload: bytes = b"hello") -> bytes:
    info = tarfile.TarInfo("old.txt")
    info.size = len(payload)
    header = bytearray(info.tobuf(tarfile.USTAR_FORMAT))
    header[257:265] = bytes(8)  # no "ustar" magic: a pre-POSIX header
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header) + payload.ljust(512, b"\0")


def test_sniff_format(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(tarfile.TarInfo("empty"))
    plain = buf.getvalue()
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as zf:
        zf.writestr("a.txt", "a")
    assert sniff_format(plain) == "tar"
    assert sniff_format(_v7_tar()) == "tar"
    assert sniff_format(gzip.compress(plain)) == "tar.gz"
    assert sniff_format(bz2.compress(plain)) == "tar.bz2"
    assert sniff_format(zstandard.ZstdCompressor().compress(plain)) == "tar.zst"
    assert sniff_format(zipped.getvalue()) == "zip"
    assert sniff_format(b"<!DOCTYPE html><html>login</html>") is None
    assert sniff_format(b"") is None
    assert sniff_format(b"x" * 512) is None


# -- safe extraction: benign ------------------------------------------------------------------

def _fragalysis_members() -> dict[str, bytes]:
    camp = Campaign.demo(seed=0)
    target = camp.targets[0]
    files: dict[str, bytes] = {}
    for exp in target.experiments[:3]:
        obs = exp.observation_codes[0]
        files[f"aligned_files/{obs}/{obs}.pdb"] = pdb_text(target, exp).encode()
        files[f"aligned_files/{obs}/{obs}_apo.pdb"] = pdb_text(target, exp, bound=False).encode()
        files[f"aligned_files/{obs}/{obs}_ligand.sdf"] = sdf_text(exp).encode()
        files[f"crystallographic_files/{exp.code}/{exp.code}.mtz_FILE_NOT_IN_UPLOAD"] = b""
    files["metadata.csv"] = b"Code,Long code,Experiment code\n"
    files["README.md"] = b"# download\n"
    return files


def _tar_gz_fragalysis(path: Path, files: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        root = tarfile.TarInfo(".")
        root.type = tarfile.DIRTYPE
        tar.addfile(root)
        for name, data in files.items():
            info = tarfile.TarInfo("./" + name)
            info.size = len(data)
            info.mtime = 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("./aligned_files/latest.pdb")  # links that stay inside are fine
        link.type, link.linkname = tarfile.SYMTYPE, next(n for n in files if n.endswith(".pdb")).split("/", 1)[1]
        tar.addfile(link)
        hard = tarfile.TarInfo("./README_copy.md")
        hard.type, hard.linkname = tarfile.LNKTYPE, "./README.md"
        tar.addfile(hard)


def test_extracts_a_fragalysis_like_tar_gz(tmp_path):
    files = _fragalysis_members()
    src = tmp_path / "Mpro.tar.gz"
    _tar_gz_fragalysis(src, files)
    dest = tmp_path / "extract"
    result = safe_extract(src, dest)
    assert result.files == [*files, "README_copy.md"]
    assert result.total_bytes == sum(len(d) for d in files.values())
    for name, data in files.items():
        assert (dest / name).read_bytes() == data
        assert (dest / name).stat().st_mtime == 1_700_000_000
    assert (dest / "aligned_files" / "latest.pdb").is_symlink()
    assert (dest / "aligned_files" / "latest.pdb").read_bytes() == files[next(n for n in files if n.endswith(".pdb"))]
    assert (dest / "README_copy.md").stat().st_ino == (dest / "README.md").stat().st_ino


def test_extracts_a_zip_with_a_wrong_suffix(tmp_path):
    files = _fragalysis_members()
    src = tmp_path / "Mpro.tar.gz"  # the name lies; the bytes decide
    with zipfile.ZipFile(src, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("aligned_files/", "")
        for name, data in files.items():
            zf.writestr(name, data)
    result = safe_extract(src, tmp_path / "extract")
    assert result.files == list(files)
    assert all((tmp_path / "extract" / n).read_bytes() == d for n, d in files.items())


def test_pack_then_extract_round_trip(tmp_path):
    src = make_dataset(tmp_path / "ds")
    packed = pack_dataset(src, tmp_path / "ds.tar.zst", arcname_root="ds")
    result = safe_extract(packed.path, tmp_path / "extract")
    originals = sorted(str(p.relative_to(tmp_path)) for p in src.rglob("*") if p.is_file())
    assert sorted(result.files) == originals
    assert all((tmp_path / "extract" / n).read_bytes() == (tmp_path / n).read_bytes() for n in originals)


# -- safe extraction: hostile -----------------------------------------------------------------

def _member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"pwned", linkname: str = ""):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, (io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def _write_tar_gz(path: Path, members) -> None:
    with tarfile.open(path, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        for info, fileobj in members:
            tar.addfile(info, fileobj)


def _snapshot(root: Path, skip: Path) -> dict[str, bytes | str]:
    seen: dict[str, bytes | str] = {}
    for path in root.rglob("*"):
        if skip in path.parents or path == skip:
            continue
        seen[str(path)] = "dir" if path.is_dir() and not path.is_symlink() else (
            f"link:{os.readlink(path)}" if path.is_symlink() else path.read_bytes())
    return seen


HOSTILE_TARS = {
    "absolute": lambda out: [_member(str(out / "escaped.txt"))],
    "dotdot": lambda out: [_member("../escaped.txt")],
    "dotdot_after_dot": lambda out: [_member("./aligned_files/../../escaped.txt")],
    "symlink_escape": lambda out: [_member("./up", tarfile.SYMTYPE, linkname="../"),
                                   _member("./up/escaped.txt")],
    "symlink_absolute": lambda out: [_member("etc", tarfile.SYMTYPE, linkname=str(out))],
    "symlink_chain": lambda out: [_member("here", tarfile.SYMTYPE, linkname="."),
                                  _member("away", tarfile.SYMTYPE, linkname="here/../escaped_dir")],
    "write_below_inner_symlink": lambda out: [_member("sub/", tarfile.DIRTYPE), _member("s", tarfile.SYMTYPE,
                                                                                       linkname="sub"),
                                              _member("s/file.txt")],
    "hardlink_escape": lambda out: [_member("hl", tarfile.LNKTYPE, linkname="../outside.txt")],
    "hardlink_absolute": lambda out: [_member("hl", tarfile.LNKTYPE, linkname=str(out / "outside.txt"))],
    "char_device": lambda out: [_member("null", tarfile.CHRTYPE)],
    "block_device": lambda out: [_member("sda", tarfile.BLKTYPE)],
    "fifo": lambda out: [_member("pipe", tarfile.FIFOTYPE)],
}


@pytest.mark.parametrize("case", sorted(HOSTILE_TARS))
def test_hostile_tar_is_refused_without_writing_outside(tmp_path, case):
    out = tmp_path / "workdir"
    dest = out / "extract"
    dest.mkdir(parents=True)
    (out / "outside.txt").write_text("precious")
    src = tmp_path / "hostile.tar.gz"
    _write_tar_gz(src, [_member("./ok.txt", data=b"fine"), *HOSTILE_TARS[case](out)])
    before = _snapshot(tmp_path, dest)
    with pytest.raises(UnsafeArchive) as caught:
        safe_extract(src, dest)
    assert "'" in caught.value.reason  # names the member
    assert _snapshot(tmp_path, dest) == before
    assert not any(p.is_symlink() for p in dest.rglob("*"))


def test_symlink_chain_resolving_outside_is_refused_after_validation(tmp_path):
    # Each link's text stays inside; together they leave: only the final check catches it.
    src = tmp_path / "chain.tar.gz"
    _write_tar_gz(src, HOSTILE_TARS["symlink_chain"](tmp_path))
    with pytest.raises(UnsafeArchive, match="resolves outside"):
        safe_extract(src, tmp_path / "extract")
    assert leftovers(tmp_path / "extract") == []


def test_too_many_members_and_too_large_are_refused_before_writing(tmp_path):
    src = tmp_path / "many.tar.gz"
    _write_tar_gz(src, [_member(f"./f{i:03d}.txt", data=b"x" * 100) for i in range(20)])
    with pytest.raises(UnsafeArchive, match="more than 10 members"):
        safe_extract(src, tmp_path / "a", max_members=10)
    with pytest.raises(UnsafeArchive, match=r"exceeds 1000 bytes \(at './f010.txt'\)"):
        safe_extract(src, tmp_path / "b", max_total_bytes=1000)
    assert leftovers(tmp_path / "a") == leftovers(tmp_path / "b") == []
    assert len(safe_extract(src, tmp_path / "c", max_members=20, max_total_bytes=2000).files) == 20


def _gzip_bomb(path: Path, size: int) -> None:
    """A tar.gz of `size` zero bytes, made of concatenated gzip members: written in milliseconds."""
    info = tarfile.TarInfo("./zeros.ccp4")
    info.size = size
    block = gzip.compress(bytes(MiB), compresslevel=9, mtime=0)
    with open(path, "wb") as fh:
        fh.write(gzip.compress(info.tobuf(tarfile.PAX_FORMAT), mtime=0))
        for _ in range(size // MiB):
            fh.write(block)
        fh.write(gzip.compress(bytes(tarfile.RECORDSIZE), mtime=0))


def test_gzip_bomb_is_refused_before_writing(tmp_path):
    src = tmp_path / "bomb.tar.gz"
    _gzip_bomb(src, 1024 * MiB)
    assert src.stat().st_size < 2 * MiB
    with tarfile.open(src) as tar:  # a well-formed archive, only a very large one
        assert tar.next().size == 1024 * MiB
    with pytest.raises(UnsafeArchive, match="decompression bomb.*zeros.ccp4"):
        safe_extract(src, tmp_path / "extract")
    assert leftovers(tmp_path / "extract") == []


def test_written_bytes_are_counted_not_trusted():
    budget = extract._Budget(max_total_bytes=10**12, max_members=10, max_ratio=100, compressed_size=MiB)
    budget.add("big.map", 100 * MiB, "written")
    with pytest.raises(UnsafeArchive, match="decompression bomb.*big.map"):
        budget.add("big.map", 1, "written")
    small = extract._Budget(max_total_bytes=100, max_members=10, max_ratio=100, compressed_size=10)
    small.add("a", 100, "written")
    with pytest.raises(UnsafeArchive, match="exceeds 100 bytes"):
        small.add("a", 1, "written")


def _zip_with(path: Path, name: str, data: bytes = b"x", mode: int | None = None) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("ok.txt", "fine")
        info = zipfile.ZipInfo(name)
        if mode is not None:
            info.create_system = 3
            info.external_attr = mode << 16
        zf.writestr(info, data)


@pytest.mark.parametrize("name,mode,reason", [
    ("../escaped.txt", None, "parent directory"),
    ("/absolute/escaped.txt", None, "absolute path"),
    ("..\\..\\escaped.txt", None, "parent directory"),
    ("C:/escaped.txt", None, "absolute path"),
    ("link", stat.S_IFLNK | 0o777, "symlink in a zip"),
    ("fifo", stat.S_IFIFO | 0o644, "fifo in a zip"),
])
def test_hostile_zip_is_refused(tmp_path, name, mode, reason):
    src = tmp_path / "hostile.zip"
    _zip_with(src, name, b"../../../../etc/passwd", mode)
    with pytest.raises(UnsafeArchive, match=reason):
        safe_extract(src, tmp_path / "extract")
    assert leftovers(tmp_path / "extract") == []
    assert leftovers(tmp_path) == ["extract", "hostile.zip"]


def test_zip_bomb_is_refused(tmp_path):
    src = tmp_path / "bomb.zip"
    with zipfile.ZipFile(src, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf, \
            zf.open("zeros.bin", "w", force_zip64=True) as entry:
        zero = bytes(MiB)
        for _ in range(80):
            entry.write(zero)
    with pytest.raises(UnsafeArchive, match="decompression bomb.*zeros.bin"):
        safe_extract(src, tmp_path / "extract")
    assert leftovers(tmp_path / "extract") == []


def test_unreadable_archives(tmp_path):
    html = tmp_path / "download.tar.gz"
    html.write_bytes(b"<html><body>Please log in</body></html>")
    with pytest.raises(UnsafeArchive, match="not a recognised archive"):
        safe_extract(html, tmp_path / "a")
    files = _fragalysis_members()
    good = tmp_path / "good.tar.gz"
    _tar_gz_fragalysis(good, files)
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CorruptArchive):
        safe_extract(truncated, tmp_path / "b")


# -- preflight --------------------------------------------------------------------------------

@pytest.fixture()
def campaign_images(tmp_path):
    camp = Campaign.demo(seed=0, image_size=2048)
    cbf = next(c for c in camp.collections if c.style == "cbf")
    h5 = next(c for c in camp.collections if c.style == "h5")
    return camp.write_images(tmp_path / "cbf", cbf), camp.write_images(tmp_path / "h5", h5), cbf, h5


def test_preflight_accepts_cbf_and_hdf5_datasets(campaign_images):
    cbf_dir, h5_dir, cbf, h5 = campaign_images
    cbf_files = sorted(cbf_dir.iterdir())
    (cbf_dir / "xds.log").write_text("processing output is not an image")
    result = preflight_images([*cbf_files, cbf_dir / "xds.log"])
    assert (result.ok, result.images, result.formats) == (True, cbf.images, {"cbf"})
    h5_files = sorted(h5_dir.iterdir())
    result = preflight_images(h5_files)
    assert (result.ok, result.images, result.formats) == (True, h5.images, {"hdf5"})  # frames the master links
    assert all(image_header_readable(p) for p in cbf_files + h5_files)


def test_preflight_refuses_incomplete_hdf5(campaign_images):
    _, h5_dir, _, _ = campaign_images
    master = next(h5_dir.glob("*_master.h5"))
    data = sorted(h5_dir.glob("*_data_*.h5"))
    only_master = preflight_images([master])
    assert not only_master.ok and "master without data" in only_master.reason
    only_data = preflight_images(data)
    assert not only_data.ok and "without a master" in only_data.reason
    data[0].write_bytes(data[0].read_bytes()[:1000])  # a truncated copy: HDF5 itself says so
    truncated = preflight_images([master, *data])
    assert not truncated.ok and truncated.reason.startswith(f"image header not readable: {data[0].name}")


def test_preflight_refuses_junk_and_unreadable_headers(tmp_path, campaign_images):
    cbf_dir, _, _, _ = campaign_images
    (tmp_path / "README.txt").write_text("no images here")
    (tmp_path / "process.log").write_bytes(os.urandom(100))
    junk = preflight_images([tmp_path / "README.txt", tmp_path / "process.log"])
    assert (junk.ok, junk.reason, junk.images) == (False, "no diffraction images", 0)

    frames = sorted(cbf_dir.iterdir())
    broken = tmp_path / "zz_broken_9999.cbf"  # sorts last: the last frame is always read
    broken.write_bytes(b"\0" * 4096)  # a detector crash left a zero-filled image
    empty = tmp_path / "zz_empty_9999.img"
    empty.write_bytes(b"")
    for bad in (broken, empty):
        result = preflight_images([*frames, bad])
        assert not result.ok and result.reason.startswith(f"image header not readable: {bad.name}"), result
        assert not image_header_readable(bad)


def test_preflight_reads_the_first_middle_and_last_frame_and_they_must_agree(campaign_images):
    """The header, not the magic: a CBF whose binary section lost its dimensions stops in preflight,
    and so does a series whose last frame comes from another detector geometry."""
    cbf_dir, _, cbf, _ = campaign_images
    frames = sorted(cbf_dir.iterdir())
    middle = frames[len(frames) // 2]
    good = middle.read_bytes()
    middle.write_bytes(good.replace(b"X-Binary-Size-Fastest-Dimension", b"X-Binary-Size-Lost"))
    assert image_format(frames[0]) == "cbf" and image_format(middle) is None
    result = preflight_images(frames)
    assert not result.ok and result.reason.startswith(f"image header not readable: {middle.name}"), result
    middle.write_bytes(good)
    last = frames[-1]
    last.write_bytes(cbf_image(cbf, len(frames), 4096))  # 4096 pixels where the others have 2048
    result = preflight_images(frames)
    assert not result.ok and result.reason.startswith(f"inconsistent frames: {frames[0].name} is "), result
    assert "64x32" in result.reason and "64x64" in result.reason


@pytest.mark.parametrize("suffix, compress", [(".cbf", bytes), (".cbf.gz", gzip.compress)])
def test_a_cbf_cut_short_before_its_pixels_is_refused_not_read_for_ever(tmp_path, campaign_images, suffix, compress):
    """fabio looks for the binary start marker past the end of the file, for ever: a frame cut short
    after its binary section header (still being written) kept the preflight thread spinning."""
    cbf_dir, _, _, _ = campaign_images
    frames = sorted(cbf_dir.iterdir())
    whole = frames[-1].read_bytes()
    cut = tmp_path / f"zz_cut_9999{suffix}"  # sorts last: the last frame is always read
    cut.write_bytes(compress(whole[:whole.index(b"X-Binary-Size-Padding")] + os.urandom(4 * MiB)))
    # in a child process: without the guard fabio's loop holds the GIL and never lets a thread time out
    script = ("import json, sys; from mirrord.archive import preflight_images; "
              "r = preflight_images(sys.argv[1:]); print(json.dumps([r.ok, r.reason]))")
    child = subprocess.run([sys.executable, "-c", script, *map(str, frames), str(cut)],
                           capture_output=True, text=True, timeout=60)
    ok, reason = json.loads(child.stdout)
    assert not ok
    assert reason.startswith(f"image header not readable: {cut.name} (no CBF binary data start"), reason


def test_image_formats_by_header(tmp_path, campaign_images):
    cbf_dir, h5_dir, _, _ = campaign_images
    first = sorted(cbf_dir.iterdir())[0]
    edf = tmp_path / "d.edf"
    fabio.edfimage.EdfImage(data=np.zeros((8, 8), dtype=np.uint16)).write(str(edf))
    samples = {
        "a.cbf.gz": (gzip.compress(first.read_bytes()), "cbf"),
        "b.cbf.bz2": (bz2.compress(first.read_bytes()), "cbf"),
        "c.h5": (next(h5_dir.glob("*_master.h5")).read_bytes(), "hdf5"),
        "d.edf": (edf.read_bytes(), "edf"),
        "e.cbf": (b"###CBF: VERSION 1.5\n" + bytes(200), None),  # the magic alone is not a header
        "f.h5": (b"\x89HDF\r\n\x1a\n" + bytes(100), None),
        "g.cbf": (b"<html>not an image</html>", None),
    }
    for name, (data, expected) in samples.items():
        (tmp_path / name).write_bytes(data)
        assert image_format(tmp_path / name) == expected, name
    assert image_format(tmp_path / "missing.cbf") is None


# -- safe extraction: one pass --------------------------------------------------------------------

def _counting_open(monkeypatch, archive: Path) -> dict[str, int]:
    """Count the opens of `archive` by the extractor and the bytes read from it."""
    seen = {"opens": 0, "bytes": 0}

    class Counted(io.FileIO):
        def read(self, size=-1):
            data = super().read(size)
            seen["bytes"] += len(data)
            return data

        def readinto(self, buffer):
            count = super().readinto(buffer)
            seen["bytes"] += count or 0
            return count

    def counted_open(path, mode="r", *args, **kwargs):
        if Path(path) == archive:
            seen["opens"] += 1
            return io.BufferedReader(Counted(path, "rb"), CHUNK) if "b" in mode else open(path, mode, *args, **kwargs)
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(extract, "open", counted_open, raising=False)
    return seen


@pytest.mark.parametrize("mode,fmt", [("w:gz", "tar.gz"), ("w", "tar"), ("w:bz2", "tar.bz2")])
def test_a_tar_is_read_once(tmp_path, monkeypatch, mode, fmt):
    src = tmp_path / "archive"
    files = {f"aligned_files/x{i}/x{i}.pdb": os.urandom(300_000) for i in range(8)}
    with tarfile.open(src, mode) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    seen = _counting_open(monkeypatch, src)
    result = safe_extract(src, tmp_path / "extract", fmt=fmt)
    assert result.files == list(files)
    assert seen["opens"] == 1 and seen["bytes"] <= src.stat().st_size  # no second pass, no byte read twice
    assert all((tmp_path / "extract" / name).read_bytes() == data for name, data in files.items())


def test_a_zip_entry_is_decompressed_once(tmp_path, monkeypatch):
    src = tmp_path / "archive.zip"
    with zipfile.ZipFile(src, "w", zipfile.ZIP_DEFLATED) as zf:
        for i in range(5):
            zf.writestr(f"aligned_files/x{i}.pdb", os.urandom(100_000))
    opened: list[str] = []
    real_open = zipfile.ZipFile.open
    monkeypatch.setattr(zipfile.ZipFile, "open",
                        lambda self, info, *a, **k: (opened.append(getattr(info, "filename", info)),
                                                     real_open(self, info, *a, **k))[1])
    safe_extract(src, tmp_path / "extract")
    assert opened == [f"aligned_files/x{i}.pdb" for i in range(5)]


def test_a_refusal_mid_archive_takes_back_everything_written(tmp_path):
    dest = tmp_path / "extract"
    src = tmp_path / "late.tar.gz"
    _write_tar_gz(src, [*(_member(f"./aligned_files/x{i}/x{i}.pdb", data=b"ATOM\n" * 1000) for i in range(30)),
                        _member("./aligned_files/latest", tarfile.SYMTYPE, linkname="x0"),
                        _member("./aligned_files/copy.pdb", tarfile.LNKTYPE, linkname="./aligned_files/x0/x0.pdb"),
                        _member("../escaped.txt")])
    with pytest.raises(UnsafeArchive, match="escaped.txt"):
        safe_extract(src, dest)
    assert leftovers(dest) == [] and not (tmp_path / "escaped.txt").exists()
    # Over the size limit at the 11th file, after ten were written.
    with pytest.raises(UnsafeArchive, match="x10"):
        safe_extract(src, dest, max_total_bytes=10 * 5000 + 1)
    assert leftovers(dest) == []


def test_a_corrupt_stream_mid_archive_takes_back_everything_written(tmp_path):
    src = tmp_path / "big.tar.gz"
    _write_tar_gz(src, [_member(f"./f{i}.bin", data=os.urandom(MiB)) for i in range(6)])
    damaged = bytearray(src.read_bytes())
    damaged[len(damaged) * 3 // 4] ^= 0xFF  # stored blocks of random data: the CRC catches it
    src.write_bytes(bytes(damaged))
    with pytest.raises(CorruptArchive):
        safe_extract(src, tmp_path / "extract")
    assert leftovers(tmp_path / "extract") == []


def test_concatenated_and_zero_padded_gzip_members_extract(tmp_path):
    """As gzip(1) reads them: members one after another, trailing zeros ignored; anything else between them refused."""
    payload = io.BytesIO()
    with tarfile.open(fileobj=payload, mode="w") as tar:
        for i in range(3):
            info = tarfile.TarInfo(f"f{i}.txt")
            info.size = 6
            tar.addfile(info, io.BytesIO(b"hello\n"))
    raw = payload.getvalue()
    src = tmp_path / "multi.tar.gz"
    src.write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]) + bytes(4096))
    assert safe_extract(src, tmp_path / "a").files == ["f0.txt", "f1.txt", "f2.txt"]
    src.write_bytes(gzip.compress(raw[:1000]) + b"garbage" + gzip.compress(raw[1000:]))
    with pytest.raises(CorruptArchive):
        safe_extract(src, tmp_path / "b")
    assert leftovers(tmp_path / "b") == []


def test_recorded_fragalysis_zips_extract(tmp_path):
    """The real backend's zips (recordings/fragalysis facts 11, 16): entries without "./" nor a top folder."""
    names = sorted(p.name for p in recordings_dir("fragalysis").joinpath("archives").glob("*.zip"))
    assert len(names) == 7
    for name in names:
        src = archive("fragalysis", f"archives/{name}")
        with zipfile.ZipFile(src) as zf:
            expected = {info.filename: zf.read(info) for info in zf.infolist() if not info.is_dir()}
        assert not any(n.startswith("./") for n in expected) and "metadata.csv" in expected or "-metadata" not in name
        dest = tmp_path / name
        result = safe_extract(src, dest)
        assert sorted(result.files) == sorted(expected), name
        assert all((dest / n).read_bytes() == data for n, data in expected.items()), name


def test_a_sparse_member_is_refused(tmp_path):
    """Its archive data is a map of holes, not `size` bytes: refused rather than written wrongly."""
    sparse = tarfile.TarInfo("holes.img")
    sparse.type, sparse.size = tarfile.GNUTYPE_SPARSE, 0
    src = tmp_path / "sparse.tar"
    with tarfile.open(src, "w", format=tarfile.GNU_FORMAT) as tar:
        tar.addfile(sparse)
    with pytest.raises(UnsafeArchive, match="sparse member: 'holes.img'"):
        safe_extract(src, tmp_path / "extract")
    assert leftovers(tmp_path / "extract") == []


def test_downloads_and_packing_do_not_load_the_image_libraries():
    """fabio, h5py and numpy (35 MB, a BLAS thread per core) load only with the preflight that reads headers."""
    script = ("import sys; from mirrord.archive import pack_dataset, safe_extract, verify_spool; "
              "before = sorted({'fabio', 'h5py', 'numpy'} & set(sys.modules)); "
              "from mirrord.archive import preflight_images; import os; "
              "print(before, preflight_images.__module__, os.environ.get('OPENBLAS_NUM_THREADS'))")
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    assert child.stdout.split() == ["[]", "mirrord.archive.preflight", "1"]


@pytest.mark.parametrize("suffix, writer", [(".img", "adscimage.AdscImage"), (".mccd", "marccdimage.MarccdImage")])
def test_frames_whose_reader_learns_the_dimensions_from_the_pixels(tmp_path, suffix, writer):
    """SMV and MarCCD headers read alone leave fabio without a shape, and asking for it raised
    AttributeError out of the preflight (a crash, not a verdict): such frames are read whole."""
    module, name = writer.split(".")
    pixels = np.arange(48 * 64, dtype=np.uint16).reshape(48, 64)
    frames = [tmp_path / f"series_{i:04d}{suffix}" for i in range(1, 4)]
    for frame in frames:
        getattr(getattr(fabio, module), name)(data=pixels).write(str(frame))
    result = preflight_images(frames)
    assert (result.ok, result.images) == (True, 3), result
    frames[-1].write_bytes(frames[-1].read_bytes()[:600])  # cut short
    result = preflight_images(frames)
    assert not result.ok and result.reason.startswith(f"image header not readable: {frames[-1].name}"), result
