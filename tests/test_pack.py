"""Parts of mirrord/archive/pack.py that test_archive.py reaches only through a whole pack: the tar's
exact length, what the walk refuses, the hash thread's last error, the spool check's memory and the
free-space rule. Written for the survivors of its mutation run; each test names the mutants it kills.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections import namedtuple
from pathlib import Path

import pytest
import zstandard

from mirrord.archive import pack as pack_module
from mirrord.archive.common import BLOCK, CHUNK, RECORD, ArchiveError, DatasetChanged, UnsupportedFile
from mirrord.archive.pack import free_space_ok, pack_dataset, verify_spool
from tests.test_archive import _status_kib, leftovers, reset_peak_rss

MiB = 1024 * 1024


def inner_tar(result) -> bytes:
    return zstandard.ZstdDecompressor().stream_reader(result.path.read_bytes()).read()


def test_the_tar_ends_with_two_zero_blocks_padded_to_a_whole_record(tmp_path: Path) -> None:
    """As tar(1) and tarfile write it: a 512-byte header and 17 blocks of data end the first record
    exactly with the two zero blocks, and nothing follows (mutant finish_4 writes three zero blocks,
    _5 a whole record of padding more)."""
    src = tmp_path / "ds"
    src.mkdir()
    (src / "a.cbf").write_bytes(b"x" * (17 * BLOCK))
    result = pack_dataset(src, tmp_path / "a.tar.zst")
    data = inner_tar(result)
    assert result.tar_size == len(data) == RECORD
    assert data[-2 * BLOCK:] == bytes(2 * BLOCK)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert [(m.name, m.size) for m in tar.getmembers()] == [("a.cbf", 17 * BLOCK)]


def test_a_missing_source_is_an_error_not_an_empty_walk(tmp_path: Path) -> None:
    """os.walk keeps quiet about a directory it cannot list unless told (mutants _walk_regular_files_2, _4):
    the error must surface, not "nothing to pack" (nor, for an unreadable subdirectory, a pack without it)."""
    with pytest.raises(FileNotFoundError):
        pack_dataset(tmp_path / "absent", tmp_path / "a.tar.zst")
    assert leftovers(tmp_path) == []


def test_a_symlinked_directory_is_refused_by_name(tmp_path: Path) -> None:
    """os.walk does not follow it, so without this check its files would silently be left out (mutants
    _walk_regular_files_8 to _19: the check, the path and the kind named)."""
    src = tmp_path / "ds"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "a.cbf").write_bytes(b"x")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "b.cbf").write_bytes(b"y")
    (src / "sub" / "linked").symlink_to(tmp_path / "outside")
    with pytest.raises(UnsupportedFile) as caught:
        pack_dataset(src, tmp_path / "a.tar.zst")
    assert (caught.value.path, caught.value.kind) == (src / "sub" / "linked", "symlink")
    assert str(caught.value) == f"not a regular file (symlink): {src / 'sub' / 'linked'}"


def test_a_hash_failure_on_the_last_buffer_fails_the_pack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A one-buffer dataset: the md5 thread fails only after the producer's last `put`, so the error
    surfaces at `finish` or not at all (mutant _Worker.close_1 does not check it by default, and the
    pack succeeds with a wrong md5)."""
    class BrokenMd5:
        def update(self, data):
            raise MemoryError("md5 failed")

        def hexdigest(self):
            return "0" * 32

    monkeypatch.setattr(pack_module.hashlib, "md5", lambda **kw: BrokenMd5())
    src = tmp_path / "ds"
    src.mkdir()
    (src / "a.cbf").write_bytes(b"x" * 1000)
    with pytest.raises(MemoryError, match="md5 failed"):
        pack_dataset(src, tmp_path / "a.tar.zst")
    assert leftovers(tmp_path) == ["ds"]


def test_verify_spool_reads_in_bounded_memory(tmp_path: Path) -> None:
    """Mutant verify_spool_18 reads the whole file at once: the same answer, 200 MiB more memory."""
    path = tmp_path / "big.tar.zst"
    with open(path, "wb") as fh:
        fh.truncate(200 * MiB)  # sparse: quick to make, still read in full
    before = reset_peak_rss()
    assert not verify_spool(path, "xxh3_128:" + "0" * 32, 200 * MiB)
    growth_mib = (_status_kib("VmHWM") - before) / 1024
    assert growth_mib < 64, f"peak RSS grew by {growth_mib:.0f} MiB"


Usage = namedtuple("Usage", "total used free")


def test_free_space_keeps_the_margin_and_the_reserve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Room for the bytes, 5% more and the reserve, measured on the nearest existing directory (mutants
    free_space_ok_1: a 105% margin; _4: always the root's disk; _10: exactly enough is refused; _12: 5%
    less instead of more)."""
    asked: list[Path] = []
    free = 0

    def disk_usage(path):
        asked.append(Path(path))
        return Usage(10**12, 0, free)

    monkeypatch.setattr(pack_module.shutil, "disk_usage", disk_usage)
    needed, reserve = 1000 * MiB, 256 * MiB
    exactly = needed + int(needed * 0.05) + reserve
    free = exactly
    assert free_space_ok(tmp_path / "spool" / "not-yet", needed)
    assert asked == [tmp_path]
    free = exactly - 1
    assert not free_space_ok(tmp_path, needed)
    free = needed + reserve
    assert not free_space_ok(tmp_path, needed)
    assert free_space_ok(tmp_path, needed, margin=0.0)


def test_names_that_are_not_utf8_and_directory_entries(tmp_path: Path) -> None:
    """A file name with a byte that is not UTF-8 is packed as it is (mutants _tar_header_15 and _20: no
    or an unknown encoding); a directory entry has no size (_11)."""
    src = tmp_path / "ds"
    (src / "sub").mkdir(parents=True)
    raw = os.fsencode(src / "sub") + b"/bad\xff.cbf"
    with open(raw, "wb") as fh:
        fh.write(b"x")
    result = pack_dataset(src, tmp_path / "a.tar.zst")
    with tarfile.open(fileobj=io.BytesIO(inner_tar(result)), encoding="utf-8", errors="surrogateescape") as tar:
        members = [(m.name, m.type, m.size) for m in tar.getmembers()]
    assert members == [("sub", tarfile.DIRTYPE, 0), ("sub/bad\udcff.cbf", tarfile.REGTYPE, 1)]
    assert inner_tar(result)[BLOCK - 512 + 124:BLOCK - 512 + 136] == b"00000000000\0"  # the directory's size field


def test_a_header_across_two_buffers(tmp_path: Path) -> None:
    """The first file ends 512 bytes short of a buffer, so the next member's 1.5 KiB PAX header (a long
    name) is split across two buffers (mutants _emit_3, _4 overfill the first, _9 drops the rest)."""
    src = tmp_path / "ds"
    src.mkdir()
    (src / "a.cbf").write_bytes(os.urandom(CHUNK - 2 * BLOCK))
    long_name = "b" * 150 + ".cbf"
    (src / long_name).write_bytes(os.urandom(3000))
    result = pack_dataset(src, tmp_path / "a.tar.zst")
    with tarfile.open(fileobj=io.BytesIO(inner_tar(result))) as tar:
        got = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    assert got == {"a.cbf": (src / "a.cbf").read_bytes(), long_name: (src / long_name).read_bytes()}


def _swap_second_file_while_packing(tmp_path: Path, swap) -> pytest.ExceptionInfo:
    """Pack two files; while the first is read (its first progress call), `swap` replaces the second,
    which was planned (lstat) as a regular file and is not opened yet."""
    src = tmp_path / "ds"
    src.mkdir()
    (src / "a.cbf").write_bytes(b"a" * (3 * CHUNK))
    second = src / "b.cbf"
    second.write_bytes(b"b" * 100)
    done = []

    def progress(_: int) -> None:
        if not done:
            done.append(swap(second))

    with pytest.raises(ArchiveError) as caught:
        pack_dataset(src, tmp_path / "a.tar.zst", progress=progress)
    assert not list(tmp_path.glob("*.part")) and not (tmp_path / "a.tar.zst").exists()
    return caught


def test_a_file_swapped_for_a_symlink_after_planning_is_not_followed(tmp_path: Path) -> None:
    """O_NOFOLLOW is the layer that refuses it at open: the target has the same size and mtime, so no
    later check would notice (mutants _copy_file_8, _9 drop O_NOFOLLOW; _20 to _25 the path and kind)."""
    foreign = tmp_path / "foreign"

    def swap(second: Path) -> None:
        st = second.stat()
        foreign.write_bytes(b"f" * 100)
        os.utime(foreign, ns=(st.st_atime_ns, st.st_mtime_ns))
        second.unlink()
        second.symlink_to(foreign)

    caught = _swap_second_file_while_packing(tmp_path, swap)
    assert isinstance(caught.value, UnsupportedFile)
    assert (caught.value.path, caught.value.kind) == (tmp_path / "ds" / "b.cbf", "symlink")


def test_a_file_swapped_for_a_directory_after_planning_is_refused(tmp_path: Path) -> None:
    """The descriptor's own type is checked after open (mutants _copy_file_34 to _38)."""
    def swap(second: Path) -> None:
        second.unlink()
        second.mkdir()

    caught = _swap_second_file_while_packing(tmp_path, swap)
    assert isinstance(caught.value, UnsupportedFile)
    assert (caught.value.path, caught.value.kind) == (tmp_path / "ds" / "b.cbf", "directory")


def test_a_file_that_shrinks_while_read_says_how_far_it_got(tmp_path: Path) -> None:
    """Mutants _copy_file_63, _65 (no detail) and _66 (the wrong count)."""
    src = tmp_path / "ds"
    src.mkdir()
    big = src / "a.cbf"
    big.write_bytes(b"a" * (3 * CHUNK))
    first_read = CHUNK - BLOCK  # the first buffer holds the header, then this much of the file

    def progress(_: int) -> None:
        os.truncate(big, first_read)

    with pytest.raises(DatasetChanged) as caught:
        pack_dataset(src, tmp_path / "a.tar.zst", progress=progress)
    assert str(caught.value) == f"file changed while packing: {big} (shrank to {first_read} bytes)"


def test_the_spool_file_is_written_beside_its_destination_as_a_hidden_part(tmp_path: Path) -> None:
    """The deposit job removes `.deposition-*.part` leftovers after a crash: a partial archive must be
    named so and sit in the spool directory (mutants pack_dataset_14 to _21); the finished one has the
    size and digest it reports, over every write (_SpoolSink.write_2 counts only the last)."""
    src = tmp_path / "ds"
    src.mkdir()
    (src / "a.cbf").write_bytes(os.urandom(3 * CHUNK))
    spool = tmp_path / "spool"
    spool.mkdir()
    seen: list[list[str]] = []
    result = pack_dataset(src, spool / "deposition-7.tar.zst",
                          progress=lambda _: seen.append(sorted(p.name for p in spool.iterdir())))
    assert seen and all(len(names) == 1 and names[0].startswith(".deposition-7.tar.zst.")
                        and names[0].endswith(".part") for names in seen)
    assert sorted(p.name for p in spool.iterdir()) == ["deposition-7.tar.zst"]
    assert result.zst_size == result.path.stat().st_size > 3 * CHUNK
    assert verify_spool(result.path, result.zst_digest, result.zst_size)


def test_the_archive_is_zstd_level_3_with_a_checksum(tmp_path: Path) -> None:
    """Mutants pack_dataset_1 (level 4 by default), _write_archive_1, _9 and _15 (no content checksum)."""
    src = tmp_path / "ds"
    src.mkdir()
    (src / "notes.txt").write_bytes(b"".join(b"line %d of some text that compresses\n" % i for i in range(20000)))
    default = pack_dataset(src, tmp_path / "default.tar.zst")
    level3 = pack_dataset(src, tmp_path / "level3.tar.zst", level=3)
    level4 = pack_dataset(src, tmp_path / "level4.tar.zst", level=4)
    assert default.zst_digest == level3.zst_digest != level4.zst_digest
    assert zstandard.get_frame_parameters(default.path.read_bytes()).has_checksum


def test_explicit_file_lists_are_relative_paths_inside_the_dataset(tmp_path: Path) -> None:
    """Empty and "." components are dropped (mutants _relative_parts_12, _13); an absolute path or one
    leaving the dataset is refused with its name (_15, _18, _19, _22); an empty dataset says so (_plan_members_10)."""
    src = tmp_path / "ds"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "a.cbf").write_bytes(b"a")
    (src / "b.cbf").write_bytes(b"b")
    result = pack_dataset(src, tmp_path / "a.tar.zst", files=["sub//a.cbf", "./b.cbf"])
    with tarfile.open(fileobj=io.BytesIO(inner_tar(result))) as tar:
        assert tar.getnames() == ["b.cbf", "sub", "sub/a.cbf"]
    for bad in ("/etc/passwd", "../ds/b.cbf", "", "."):
        with pytest.raises(ValueError) as caught:
            pack_dataset(src, tmp_path / "a.tar.zst", files=[bad])
        assert str(caught.value) == f"not a relative path inside the dataset: {bad!r}"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArchiveError, match="^nothing to pack in "):
        pack_dataset(tmp_path / "empty", tmp_path / "a.tar.zst")


def test_directory_entries_under_the_root_and_their_mtimes(tmp_path: Path) -> None:
    """Every level of `arcname_root` gets its entry (mutants _plan_members_13, _16); a directory's mtime
    is its newest file's, whatever the order (_49), even the epoch (_53)."""
    src = tmp_path / "ds"
    (src / "sub").mkdir(parents=True)
    for name, mtime in (("a.cbf", 2_000_000_000), ("b.cbf", 1_000_000_000)):
        (src / "sub" / name).write_bytes(b"x")
        os.utime(src / "sub" / name, (mtime, mtime))
    (src / "old").mkdir()
    (src / "old" / "c.cbf").write_bytes(b"x")
    os.utime(src / "old" / "c.cbf", (0, 0))
    result = pack_dataset(src, tmp_path / "a.tar.zst", arcname_root="visit/x1")
    with tarfile.open(fileobj=io.BytesIO(inner_tar(result))) as tar:
        mtimes = {m.name: m.mtime for m in tar.getmembers() if m.isdir()}
    assert mtimes == {"visit": 2_000_000_000, "visit/x1": 2_000_000_000, "visit/x1/sub": 2_000_000_000,
                      "visit/x1/old": 0}


def _change_while_read(tmp_path: Path, change) -> DatasetChanged:
    src = tmp_path / "ds"
    src.mkdir(parents=True)
    path = src / "a.cbf"
    path.write_bytes(b"a" * 1000)  # one read: the progress call comes after the whole file was read
    with pytest.raises(DatasetChanged) as caught:
        pack_dataset(src, tmp_path / "a.tar.zst", progress=lambda _: change(path))
    return caught.value


def test_a_file_that_grows_or_is_touched_while_read_is_named_so(tmp_path: Path) -> None:
    """Mutants _copy_file_81 to _85 and _94 to _98: the two reasons, each in its own words."""
    def grow(path: Path) -> None:
        with open(path, "ab") as fh:
            fh.write(b"more")

    def touch(path: Path) -> None:
        os.utime(path, (1_000_000_000, 1_000_000_000))

    first = _change_while_read(tmp_path / "grow", grow)
    assert str(first).endswith("a.cbf (grew while being read)")
    second = _change_while_read(tmp_path / "touch", touch)
    assert str(second).endswith("a.cbf (size or mtime changed)")


def test_the_compression_probe(tmp_path: Path) -> None:
    """Every core when a 1 MiB sample from the middle of the largest file compresses, one fewer when it
    does not, every core when it cannot be read (mutants compression_threads_37 to _47, _61)."""
    cores = len(os.sched_getaffinity(0))
    middle_random = tmp_path / "middle.h5"  # zeros, but for the 1 MiB around its middle
    with open(middle_random, "wb") as fh:
        fh.truncate(8 * MiB)
        fh.seek(4 * MiB - MiB // 2)
        fh.write(os.urandom(MiB))
    zeros = tmp_path / "zeros.h5"
    with open(zeros, "wb") as fh:
        fh.truncate(MiB)
    empty = tmp_path / "empty.log"
    empty.write_bytes(b"")

    def member(path: Path, size: int) -> pack_module._Member:
        return pack_module._Member(path.name, path, 0, size)

    assert pack_module.compression_threads([member(zeros, MiB), member(middle_random, 8 * MiB)], 3) == max(1, cores - 1)
    assert pack_module.compression_threads([member(zeros, MiB)], 3) == -1
    assert pack_module.compression_threads([member(empty, 0)], 3) == -1
    assert pack_module.compression_threads([member(tmp_path / "gone.h5", 10)], 3) == -1


def test_the_probe_never_follows_a_symlink_and_reads_even_one_byte(tmp_path: Path) -> None:
    """The probe opens the file it samples without following a link (mutant compression_threads_24), and a
    file of one byte is a sample of one byte (_36 starts at the second byte, finds nothing, and gives up)."""
    cores = len(os.sched_getaffinity(0))
    outside = tmp_path / "outside.bin"
    outside.write_bytes(os.urandom(MiB))
    link = tmp_path / "link.h5"
    link.symlink_to(outside)
    assert pack_module.compression_threads([pack_module._Member("link.h5", link, 0, MiB)], 3) == -1
    one = tmp_path / "one.cbf"
    one.write_bytes(b"\x01")
    assert pack_module.compression_threads([pack_module._Member("one.cbf", one, 0, 1)], 3) == max(1, cores - 1)


def test_the_probe_is_given_each_file_s_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe samples the largest file, so the plan must carry each file's size (mutant _plan_members_34
    leaves it 0, and the probe samples the first file instead)."""
    src = tmp_path / "ds"
    src.mkdir()
    (src / "a.cbf").write_bytes(b"a" * 10)
    (src / "b.h5").write_bytes(b"b" * 3000)
    probed: list[list[tuple[str, int]]] = []
    real = pack_module.compression_threads

    def spy(members, level):
        probed.append([(m.arcname, m.size) for m in members])
        return real(members, level)

    monkeypatch.setattr(pack_module, "compression_threads", spy)
    pack_dataset(src, tmp_path / "a.tar.zst")
    assert probed == [[("a.cbf", 10), ("b.h5", 3000)]]


def test_the_md5_runs_in_a_named_daemon_thread(tmp_path: Path) -> None:
    """A thread dump names it, and it never holds up the interpreter's exit (mutants _Worker.__init___6 to
    _11, _TarStream.__init___11 to _16)."""
    import threading

    src = tmp_path / "ds"
    src.mkdir()
    (src / "a.cbf").write_bytes(b"a" * 1000)
    seen: list[tuple[str, bool]] = []
    pack_dataset(src, tmp_path / "a.tar.zst", progress=lambda _: seen.extend(
        (t.name, t.daemon) for t in threading.enumerate() if t.name == "tar-md5"))
    assert seen == [("tar-md5", True)]
