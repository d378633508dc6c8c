"""Each safety layer of `safe_extract`, tested alone (issue 23).

The extraction refuses a hostile member in layers: the member's name (`_member_parts`), its kind and
link target (`_check_tar_member`, `_symlink_stays_inside`, `_Tree`), tarfile's own "data" filter
(`_second_opinion`), the writer's checks of each real path (`_SafeWriter`) and the size budget. A
test that only asks for *some* refusal passes with any one layer switched off, because a later one
still refuses. So here each refusal is matched by its own reason, and each later layer is driven on
its own, with the layers before it out of the way.
"""

from __future__ import annotations

import io
import os
import tarfile
from itertools import pairwise
from pathlib import Path

import pytest

from mirrord.archive import UnsafeArchive, extract, safe_extract
from mirrord.archive.extract import (
    BOMB_FLOOR,
    _Budget,
    _member_parts,
    _SafeWriter,
    _symlink_stays_inside,
    _Tree,
)


def member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"pwned", linkname: str = ""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, (data if kind == tarfile.REGTYPE else None)


def write_tar(path: Path, members) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, None if data is None else io.BytesIO(data))
    return path


def refusal(archive: Path, dest: Path) -> str:
    with pytest.raises(UnsafeArchive) as caught:
        safe_extract(archive, dest)
    assert not dest.exists() or not any(dest.iterdir()), "a refusal leaves nothing behind"
    return caught.value.reason


# -- the first layer, end to end: each refusal by its own reason ------------------------------------------
FIRST_LAYER = {
    # name: (members, the reason the first layer gives)
    "absolute": ([member("/tmp/escaped.txt")], "absolute path: '/tmp/escaped.txt'"),
    "dotdot": ([member("../escaped.txt")], "parent directory component: '../escaped.txt'"),
    "dotdot_inside": ([member("./a/../../escaped.txt")], "parent directory component: './a/../../escaped.txt'"),
    "backslash_dotdot": ([member("a\\..\\..\\escaped.txt")],
                         "parent directory component: 'a\\\\..\\\\..\\\\escaped.txt'"),
    "symlink_up": ([member("up", tarfile.SYMTYPE, linkname="../")], "symlink leaves the tree: 'up' -> '../'"),
    "symlink_up_from_below": ([member("a/b", tarfile.SYMTYPE, linkname="../../x")],
                              "symlink leaves the tree: 'a/b' -> '../../x'"),
    "symlink_absolute": ([member("etc", tarfile.SYMTYPE, linkname="/etc")],
                         "symlink leaves the tree: 'etc' -> '/etc'"),
    "hardlink_up": ([member("hl", tarfile.LNKTYPE, linkname="../outside.txt")],
                    "parent directory component: '../outside.txt'"),
    "hardlink_absolute": ([member("hl", tarfile.LNKTYPE, linkname="/etc/passwd")], "absolute path: '/etc/passwd'"),
    "hardlink_to_nothing": ([member("hl", tarfile.LNKTYPE, linkname="missing.txt")],
                            "hardlink to a path outside the tree or not an earlier file: 'hl' -> 'missing.txt'"),
    "hardlink_to_a_later_file": ([member("hl", tarfile.LNKTYPE, linkname="later.txt"), member("later.txt")],
                                 "hardlink to a path outside the tree or not an earlier file: 'hl' -> 'later.txt'"),
    "hardlink_to_a_directory": ([member("d", tarfile.DIRTYPE), member("hl", tarfile.LNKTYPE, linkname="d")],
                                "hardlink to a path outside the tree or not an earlier file: 'hl' -> 'd'"),
    "hardlink_to_a_symlink": ([member("s", tarfile.SYMTYPE, linkname="ok.txt"),
                               member("hl", tarfile.LNKTYPE, linkname="s")],
                              "hardlink to a path outside the tree or not an earlier file: 'hl' -> 's'"),
    "below_a_symlink": ([member("d", tarfile.DIRTYPE), member("s", tarfile.SYMTYPE, linkname="d"),
                         member("s/x.txt")], "member below a symlink: 's/x.txt'"),
    "below_a_file": ([member("f"), member("f/x.txt")], "member below a file: 'f/x.txt'"),
    "file_over_a_directory": ([member("d", tarfile.DIRTYPE), member("d")], "file 'd' clashes with an earlier dir"),
    "symlink_over_a_file": ([member("f"), member("f", tarfile.SYMTYPE, linkname="ok.txt")],
                            "symlink 'f' clashes with an earlier file"),
    "fifo": ([member("pipe", tarfile.FIFOTYPE)], "device or fifo: 'pipe'"),
    "char_device": ([member("null", tarfile.CHRTYPE)], "device or fifo: 'null'"),
    "block_device": ([member("sda", tarfile.BLKTYPE)], "device or fifo: 'sda'"),
    "root_as_a_file": ([member("./")], "the archive root is not a directory: './'"),
    "dir_over_a_file": ([member("f"), member("f/", tarfile.DIRTYPE)], "dir 'f' clashes with an earlier file"),
    "below_a_hardlink": ([member("f"), member("hl", tarfile.LNKTYPE, linkname="f"), member("hl/x")],
                         "member below a file: 'hl/x'"),
    "hardlink_over_a_directory": ([member("f"), member("d", tarfile.DIRTYPE), member("d", tarfile.LNKTYPE, linkname="f")],
                                  "file 'd' clashes with an earlier dir"),
    "volume_label": ([member("label", b"V")], "unsupported member type b'V': 'label'"),
}


@pytest.mark.parametrize("case", sorted(FIRST_LAYER))
def test_each_hostile_member_is_refused_by_the_first_layer_with_its_reason(tmp_path, case):
    """Kills the mutants that switch a check of `_member_parts` / `_check_tar_member` off (or turn
    `_symlink_stays_inside` true): a later layer would still refuse, but with another reason."""
    members, reason = FIRST_LAYER[case]
    archive = write_tar(tmp_path / "hostile.tar", [member("ok.txt", data=b"fine"), *members])
    assert refusal(archive, tmp_path / "extract") == reason


def test_the_first_layer_alone_without_tarfiles_filter(tmp_path, monkeypatch):
    """With the second layer (tarfile's data filter) switched off, the first still refuses the link
    cases the issue names, by the same reasons."""
    monkeypatch.setattr(extract, "_second_opinion", lambda member: None)
    for case in ("symlink_up", "symlink_absolute", "hardlink_up", "hardlink_to_nothing", "absolute", "dotdot"):
        members, reason = FIRST_LAYER[case]
        archive = write_tar(tmp_path / f"{case}.tar", members)
        assert refusal(archive, tmp_path / case) == reason, case


# -- the name layer alone -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "reason"), [
    ("a\0b", "member name with a NUL byte: 'a\\x00b'"),
    ("/a", "absolute path: '/a'"),
    ("\\a", "absolute path: '\\\\a'"),
    ("C:a", "absolute path: 'C:a'"),
    ("c:\\a", "absolute path: 'c:\\\\a'"),
    ("..", "parent directory component: '..'"),
    ("a/..", "parent directory component: 'a/..'"),
    ("a\\..", "parent directory component: 'a\\\\..'"),
    ("../", "parent directory component: '../'"),
    ("a:", "absolute path: 'a:'"),
])
def test_member_names_that_leave_the_tree(name, reason):
    with pytest.raises(UnsafeArchive) as caught:
        _member_parts(name)
    assert caught.value.reason == reason


@pytest.mark.parametrize(("name", "parts"), [
    ("a/b.txt", ("a", "b.txt")), ("./a//./b", ("a", "b")), ("a/", ("a",)), ("./", ()), ("", ()),
    ("...", ("...",)), ("a..b/..c", ("a..b", "..c")), ("1:x", ("1:x",)), ("x", ("x",)),
])
def test_member_names_that_stay(name, parts):
    """The boundaries of the name checks: a drive letter needs a letter and a colon, `..` must be whole."""
    assert _member_parts(name) == parts


# -- the link-target layer alone ------------------------------------------------------------------------------
@pytest.mark.parametrize(("parts", "target", "inside"), [
    (("l",), "x", True), (("a", "l"), "../x", True), (("a", "b", "l"), "../../x", True), (("l",), ".", True),
    (("l",), "a/../b", True),
    (("l",), "..", False), (("l",), "../", False), (("l",), "../x", False), (("a", "l"), "../..", False),
    (("a", "l"), "../../x", False), (("l",), "a/../../x", False), (("l",), "/etc", False), (("l",), "", False),
    (("l",), "x\0", False),
])
def test_symlink_targets(parts, target, inside):
    assert _symlink_stays_inside(parts, target) is inside


def test_the_tree_refuses_clashes_and_members_below_links_or_files():
    tree = _Tree()
    tree.claim("d", ("d",), "dir")
    tree.claim("d", ("d",), "dir")  # a directory twice is fine
    tree.claim("d/f", ("d", "f"), "file")
    tree.claim("d/f", ("d", "f"), "file")  # a file twice replaces it (tar append)
    tree.claim("s", ("s",), "symlink")
    for name, kind, reason in [
        ("s", "symlink", "symlink 's' clashes with an earlier symlink"),
        ("s/x", "file", "member below a symlink: 's/x'"),
        ("d/f/x", "file", "member below a file: 'd/f/x'"),
        ("d", "file", "file 'd' clashes with an earlier dir"),
        ("d/f", "dir", "dir 'd/f' clashes with an earlier file"),
    ]:
        with pytest.raises(UnsafeArchive) as caught:
            tree.claim(name, tuple(name.split("/")), kind)
        assert caught.value.reason == reason


# -- the second layer alone: tarfile's data filter ---------------------------------------------------------
@pytest.mark.parametrize(("name", "kind", "linkname", "says"), [
    ("../x", tarfile.REGTYPE, "", "outside the destination"),
    ("l", tarfile.SYMTYPE, "../x", "outside the destination"),
    ("l", tarfile.SYMTYPE, "/etc", "a link to an absolute path"),
    ("h", tarfile.LNKTYPE, "../x", "outside the destination"),
    ("p", tarfile.FIFOTYPE, "", "special file"),
])
def test_the_second_opinion_refuses_alone(name, kind, linkname, says):
    info, _data = member(name, kind, linkname=linkname)
    with pytest.raises(UnsafeArchive) as caught:
        extract._second_opinion(info)
    assert caught.value.reason.startswith(f"{name!r}: ") and says in caught.value.reason


def test_the_second_opinion_passes_what_is_safe():
    for name, kind, linkname in [("a/b", tarfile.REGTYPE, ""), ("l", tarfile.SYMTYPE, "a/b"),
                                 ("h", tarfile.LNKTYPE, "a/b"), ("d", tarfile.DIRTYPE, "")]:
        extract._second_opinion(member(name, kind, linkname=linkname)[0])


def test_the_second_opinion_is_consulted(tmp_path, monkeypatch):
    """A member the first layer passes and tarfile's filter refuses is refused with the filter's reason."""
    def strict(member, dest_path):
        raise tarfile.FilterError(f"{member.name!r} refused by the filter")

    monkeypatch.setattr(tarfile, "data_filter", strict)
    archive = write_tar(tmp_path / "fine.tar", [member("ok.txt", data=b"fine")])
    assert refusal(archive, tmp_path / "extract") == "'ok.txt': 'ok.txt' refused by the filter"


# -- the writer alone: each real path is checked as it is written -------------------------------------------
def writer(root: Path, **limits) -> _SafeWriter:
    root.mkdir(exist_ok=True)
    return _SafeWriter(root, _Budget(**{"max_total_bytes": 10**9, "max_members": 100, "max_ratio": 200.0,
                                        "compressed_size": 10**6, **limits}))


def test_the_writer_refuses_a_directory_swapped_for_a_symlink(tmp_path):
    """A directory the writer made, replaced by a symlink before the next write (a race): the parent no
    longer resolves to itself, so nothing is written through it."""
    outside = tmp_path / "outside"
    outside.mkdir()
    w = writer(tmp_path / "root")
    w.directory("d", ("d",))
    os.rmdir(tmp_path / "root" / "d")
    os.symlink(outside, tmp_path / "root" / "d")
    with pytest.raises(UnsafeArchive) as caught:
        w.file("d/x", ("d", "x"), io.BytesIO(b"pwned"), 0)
    assert caught.value.reason == "path resolves outside the destination: 'd/x'"
    assert list(outside.iterdir()) == []


def test_the_writer_never_writes_through_an_existing_symlink(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("precious")
    w = writer(tmp_path / "root")
    os.symlink(outside, tmp_path / "root" / "x")
    with pytest.raises(UnsafeArchive) as caught:
        w.file("x", ("x",), io.BytesIO(b"pwned"), 0)
    assert caught.value.reason == "'x' would replace an existing symlink"
    os.symlink(tmp_path, tmp_path / "root" / "sub")
    with pytest.raises(UnsafeArchive) as caught:
        w.file("sub/y", ("sub", "y"), io.BytesIO(b"pwned"), 0)
    assert caught.value.reason == "'sub/y': 'sub' exists and is not a directory"
    assert outside.read_text() == "precious" and not (tmp_path / "y").exists()


def test_the_writer_refuses_a_hardlink_to_anything_but_a_regular_file(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("precious")
    w = writer(tmp_path / "root")
    os.symlink(outside, tmp_path / "root" / "s")
    with pytest.raises(UnsafeArchive) as caught:
        w.hardlink("h", ("h",), ("s",))
    assert caught.value.reason == "hardlink target is not a regular file: 'h'"
    assert not (tmp_path / "root" / "h").exists() and os.stat(outside).st_nlink == 1
    w.file("f", ("f",), io.BytesIO(b"data"), 0)
    w.hardlink("h", ("h",), ("f",))
    assert os.path.samefile(tmp_path / "root" / "h", tmp_path / "root" / "f") and w.files == ["f", "h"]


def test_the_writer_checks_where_the_symlinks_resolve_together(tmp_path):
    """Each link's text stays inside; together they leave. Only the final check sees it."""
    w = writer(tmp_path / "root")
    w.symlink("here", ("here",), ".")
    w.symlink("away", ("away",), "here/../../escaped")
    assert not (tmp_path / "root" / "here").exists(), "symlinks are made last"
    with pytest.raises(UnsafeArchive) as caught:
        w.finish()
    assert caught.value.reason == "symlink resolves outside the tree: 'away' -> 'here/../../escaped'"
    w.discard()
    assert list((tmp_path / "root").iterdir()) == []


def test_the_writer_counts_the_bytes_it_writes_before_writing_them(tmp_path):
    w = writer(tmp_path / "root", max_total_bytes=10)
    w.file("a", ("a",), io.BytesIO(b"0123456789"), 0)
    with pytest.raises(UnsafeArchive) as caught:
        w.file("b", ("b",), io.BytesIO(b"x"), 0)
    assert caught.value.reason == "written size exceeds 10 bytes (at 'b')"
    assert (tmp_path / "root" / "b").read_bytes() == b""  # refused before the byte was written


# -- the budget alone: count, size and bombs ------------------------------------------------------------------
def test_the_member_count_limit_is_exact():
    budget = _Budget(max_total_bytes=10, max_members=2, max_ratio=1.0, compressed_size=1)
    budget.member("a")
    budget.member("b")
    with pytest.raises(UnsafeArchive) as caught:
        budget.member("c")
    assert caught.value.reason == "more than 2 members (at 'c')"


def test_the_size_limit_is_exact():
    budget = _Budget(max_total_bytes=100, max_members=10, max_ratio=1e9, compressed_size=1)
    budget.add("a", 100, "declared")
    with pytest.raises(UnsafeArchive) as caught:
        budget.add("b", 1, "declared")
    assert caught.value.reason == "declared size exceeds 100 bytes (at 'b')"


def test_a_bomb_is_judged_by_its_ratio_only_above_the_floor():
    """Below BOMB_FLOOR no ratio is suspicious (tiny archives of empty markers); above it, more than
    `max_ratio` times the compressed size is a bomb, exactly at the ratio is not."""
    tiny = _Budget(max_total_bytes=10**12, max_members=10, max_ratio=2.0, compressed_size=1)
    tiny.add("markers", BOMB_FLOOR, "declared")
    with pytest.raises(UnsafeArchive) as caught:
        tiny.add("one more", 1, "declared")
    assert caught.value.reason == (f"decompression bomb: {BOMB_FLOOR + 1} bytes declared from 1 compressed, "
                                   f"ratio over 2 (at 'one more')")
    compressed = BOMB_FLOOR  # twice that is allowed at a ratio of 2, one byte more is not
    fair = _Budget(max_total_bytes=10**12, max_members=10, max_ratio=2.0, compressed_size=compressed)
    fair.add("map", 2 * compressed, "written")
    with pytest.raises(UnsafeArchive) as caught:
        fair.add("map", 1, "written")
    assert caught.value.reason == (f"decompression bomb: {2 * compressed + 1} bytes written from {compressed} "
                                   f"compressed, ratio over 2 (at 'map')")
    empty = _Budget(max_total_bytes=10**12, max_members=10, max_ratio=2.0, compressed_size=0)
    with pytest.raises(UnsafeArchive, match="from 0 compressed"):  # an empty archive is judged as 1 byte
        empty.add("x", BOMB_FLOOR + 1, "declared")


def test_a_file_is_created_anew_even_if_the_path_check_were_skipped(tmp_path, monkeypatch):
    """The open itself refuses an existing path (O_EXCL, never following a link): a symlink planted
    after `_fresh_path` looked (a race) is not written through."""
    outside = tmp_path / "outside.txt"
    outside.write_text("precious")
    w = writer(tmp_path / "root")
    monkeypatch.setattr(w, "_fresh_path", lambda name, parts: w._path(parts))
    os.symlink(outside, tmp_path / "root" / "x")
    with pytest.raises(FileExistsError):
        w.file("x", ("x",), io.BytesIO(b"pwned"), 0)
    assert outside.read_text() == "precious"


def test_modes_of_what_is_written_do_not_come_from_the_archive(tmp_path):
    """Files 0644 and directories 0755 whatever the archive says (no set-uid, no world-writable)."""
    info, _ = member("d/run.sh", data=b"#!/bin/sh\n")
    info.mode = 0o6777
    archive = write_tar(tmp_path / "modes.tar", [member("d", tarfile.DIRTYPE), (info, b"#!/bin/sh\n")])
    old = os.umask(0)
    try:
        safe_extract(archive, tmp_path / "extract")
    finally:
        os.umask(old)
    assert oct(os.stat(tmp_path / "extract" / "d").st_mode & 0o7777) == "0o755"
    assert oct(os.stat(tmp_path / "extract" / "d" / "run.sh").st_mode & 0o7777) == "0o644"


def test_the_destination_is_made_with_its_parents(tmp_path):
    archive = write_tar(tmp_path / "ok.tar", [member("ok.txt", data=b"fine")])
    result = safe_extract(archive, tmp_path / "a" / "b" / "extract")
    assert result.files == ["ok.txt"] and (tmp_path / "a" / "b" / "extract" / "ok.txt").read_bytes() == b"fine"


def test_an_unknown_format_is_named(tmp_path):
    page = tmp_path / "download.tar.gz"
    page.write_bytes(b"<html><body>Please log in</body></html>")
    assert refusal(page, tmp_path / "a") == "download.tar.gz: not a recognised archive format (unknown magic bytes)"
    assert refusal(page, tmp_path / "b") == refusal(page, tmp_path / "b")
    with pytest.raises(UnsafeArchive) as caught:
        safe_extract(page, tmp_path / "c", fmt="rar")
    assert caught.value.reason == "download.tar.gz: not a recognised archive format (rar)"


def test_corrupt_streams_are_corrupt_archives_and_real_io_errors_stay_io_errors(tmp_path, monkeypatch):
    """bz2 and gzip report bad data as an OSError without errno: that is a corrupt archive. A real I/O
    error (errno set: a full disk) is not the archive's fault and is raised as it is."""
    from mirrord.archive import CorruptArchive

    broken = tmp_path / "broken.tar.bz2"
    broken.write_bytes(b"BZh91AY&SY" + bytes(range(256)) * 4)
    with pytest.raises(CorruptArchive) as caught:
        safe_extract(broken, tmp_path / "a")
    assert str(caught.value).startswith("broken.tar.bz2: OSError: ")
    archive = write_tar(tmp_path / "ok.tar", [member("ok.txt", data=b"fine")])

    def disk_full(fd, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(extract, "write_all", disk_full)
    with pytest.raises(OSError) as caught:
        safe_extract(archive, tmp_path / "b")
    assert caught.value.errno == 28 and not isinstance(caught.value, CorruptArchive)
    assert list((tmp_path / "b").iterdir()) == []


def zip_with(path: Path, name: str, data: bytes = b"x", flag_bits: int = 0) -> Path:
    """A zip of "ok.txt" and `name`, whose flag bits (zipfile writes none) are set in both headers."""
    import zipfile

    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("ok.txt", "fine")
        zf.writestr(name, data)
        offset = zf.getinfo(name).header_offset
    raw = bytearray(path.read_bytes())
    central = raw.rindex(b"PK\x01\x02")  # the last entry's record in the central directory
    assert raw[central + 46:central + 46 + len(name)] == name.encode()
    for flags_at in (offset + 6, central + 8):  # the local header's flags, then the central directory's
        raw[flags_at] |= flag_bits
    path.write_bytes(bytes(raw))
    return path


def test_zip_members_each_by_their_reason(tmp_path):
    encrypted = zip_with(tmp_path / "encrypted.zip", "secret.txt", flag_bits=0x1)
    assert refusal(encrypted, tmp_path / "a") == "encrypted member: 'secret.txt'"
    plain = zip_with(tmp_path / "plain.zip", "data.txt", flag_bits=0x2)  # another flag bit: fine
    assert safe_extract(plain, tmp_path / "b").files == ["ok.txt", "data.txt"]
    with pytest.raises(UnsafeArchive) as caught:
        safe_extract(plain, tmp_path / "c", max_total_bytes=4)
    assert caught.value.reason == "declared size exceeds 4 bytes (at 'data.txt')"
    with pytest.raises(UnsafeArchive) as caught:
        safe_extract(plain, tmp_path / "d", max_members=1)
    assert caught.value.reason == "more than 1 members (at 'data.txt')"
    clash = zip_with(tmp_path / "clash.zip", "ok.txt/inner")
    assert refusal(clash, tmp_path / "e") == "member below a file: 'ok.txt/inner'"


def test_zip_names_in_clashes_with_what_is_on_disk_and_zip_mtimes(tmp_path):
    """A destination that already holds a file where the zip wants a directory: refused by the writer,
    naming the member (files, and directory entries). Entry times are the zip's local times."""
    import time
    import zipfile

    for entry in ("d/x.txt", "d/"):
        dest = tmp_path / entry.replace("/", "_")
        dest.mkdir()
        (dest / "d").write_text("already here")
        with zipfile.ZipFile(tmp_path / "d.zip", "w") as zf:
            zf.writestr(entry, "" if entry.endswith("/") else "x")
        with pytest.raises(UnsafeArchive) as caught:
            safe_extract(tmp_path / "d.zip", dest)
        assert caught.value.reason == f"{entry!r}: 'd' exists and is not a directory"
    with zipfile.ZipFile(tmp_path / "t.zip", "w") as zf:
        zf.writestr("f.txt", "file")
        zf.writestr("f.txt/", "")
    assert refusal(tmp_path / "t.zip", tmp_path / "t") == "dir 'f.txt/' clashes with an earlier file"
    with zipfile.ZipFile(tmp_path / "when.zip", "w") as zf:
        zf.writestr(zipfile.ZipInfo("when.txt", date_time=(2021, 7, 1, 12, 30, 10)), "then")
    safe_extract(tmp_path / "when.zip", tmp_path / "when")
    assert os.stat(tmp_path / "when" / "when.txt").st_mtime == time.mktime((2021, 7, 1, 12, 30, 10, 0, 0, -1))


def test_a_hardlink_into_a_new_directory_and_over_a_directory(tmp_path):
    archive = write_tar(tmp_path / "links.tar", [member("f", data=b"data"),
                                                 member("new/sub/h", tarfile.LNKTYPE, linkname="f")])
    assert safe_extract(archive, tmp_path / "a").files == ["f", "new/sub/h"]
    assert os.path.samefile(tmp_path / "a" / "f", tmp_path / "a" / "new" / "sub" / "h")
    w = writer(tmp_path / "b")
    w.file("f", ("f",), io.BytesIO(b"data"), 0)
    (tmp_path / "b" / "h").mkdir()
    with pytest.raises(UnsafeArchive) as caught:
        w.hardlink("h", ("h",), ("f",))
    assert caught.value.reason == "'h' would replace an existing directory"


# -- reading the formats: gzip members one after another, pre-POSIX tar headers ------------------------------
class Trickle(io.BytesIO):
    """A raw file that hands out at most `step` bytes per read, as a slow pipe would."""

    def __init__(self, data: bytes, step: int) -> None:
        super().__init__(data)
        self.step = step

    def read(self, size: int = -1) -> bytes:
        return super().read(self.step if size < 0 else min(size, self.step))


@pytest.mark.parametrize("step", [1, 7, 1 << 20])
def test_gzip_members_one_after_another_with_zero_padding_between_and_after(step):
    import gzip

    parts = [b"first " * 50, b"second " * 3000, b"", b"third"]
    raw = b"".join(gzip.compress(p, mtime=0) + bytes(i * 300) for i, p in enumerate(parts)) + bytes(5000)
    stream = extract._GzipStream(Trickle(raw, step))
    out = b""
    while chunk := stream.read(4096):
        assert len(chunk) <= 4096
        out += chunk
    assert out == b"".join(parts) and stream.read(4096) == b"" and stream.read() == b""


def test_gzip_reads_honour_the_size_asked_and_a_cut_stream_is_an_error():
    import gzip

    data = bytes(8 * extract.CHUNK)  # one raw read holds all of it: each read must stop at the size asked
    packed = gzip.compress(data, mtime=0)
    stream = extract._GzipStream(io.BytesIO(packed))
    assert len(stream.read(1)) == 1
    assert 0 < len(stream.read(0)) <= extract.CHUNK and 0 < len(stream.read(-1)) <= extract.CHUNK
    cut = extract._GzipStream(io.BytesIO(packed[: len(packed) // 2]))
    with pytest.raises(EOFError):
        while cut.read():
            pass


def v7_header(name: str = "old.txt", checksum_format: bytes = b"%06o\0 ", linkname: str = "") -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.linkname = 5, linkname
    header = bytearray(info.tobuf(tarfile.USTAR_FORMAT, "latin-1"))
    header[257:265] = bytes(8)  # no "ustar" magic: a pre-POSIX header
    header[148:156] = b" " * 8
    header[148:156] = checksum_format % sum(header)
    return bytes(header)


def test_pre_posix_tar_headers_are_known_by_their_checksum():
    """Any layout of the octal checksum field that tar programs write, a one-letter name, a checksum
    whose first digit is not 0 (high bytes in the name); and what is not a header."""
    assert extract._is_v7_tar_header(v7_header())
    assert extract._is_v7_tar_header(v7_header("a"))
    assert extract._is_v7_tar_header(v7_header(checksum_format=b"%07o\0"))
    assert extract._is_v7_tar_header(v7_header(checksum_format=b" %06o\0"))
    assert extract._is_v7_tar_header(v7_header(checksum_format=b"%06o\0\0"))  # NUL-padded
    assert extract._is_v7_tar_header(v7_header(checksum_format=b"%07o "))  # no NUL at all
    high = v7_header("\xff" * 99, linkname="\xff" * 99)
    assert int(high[148:154], 8) >= 0o100000 and extract._is_v7_tar_header(high)
    assert extract.sniff_format(v7_header() + bytes(512)) == "tar"
    broken = bytearray(v7_header())
    broken[148:150] = b"zz"  # not octal
    assert not extract._is_v7_tar_header(bytes(broken)) and extract.sniff_format(bytes(broken)) is None
    wrong = bytearray(v7_header())
    wrong[0] ^= 1  # the sum no longer matches
    assert not extract._is_v7_tar_header(bytes(wrong))
    nameless = bytearray(v7_header())
    nameless[0:100] = bytes(100)
    nameless[148:156] = b"%06o\0 " % (sum(nameless[:148]) + 256 + sum(nameless[156:]))
    assert not extract._is_v7_tar_header(bytes(nameless))  # the checksum fits, but a header has a name
    assert not extract._is_v7_tar_header(bytes(512))


def test_a_hardlink_whose_parent_on_disk_is_a_file(tmp_path):
    dest = tmp_path / "extract"
    dest.mkdir()
    (dest / "d").write_text("already here")
    archive = write_tar(tmp_path / "l.tar", [member("f", data=b"data"), member("d/h", tarfile.LNKTYPE, linkname="f")])
    assert refusal_keeping(archive, dest) == "'d/h': 'd' exists and is not a directory"


def refusal_keeping(archive: Path, dest: Path) -> str:
    """The reason, for a destination that held something before (which the refusal leaves)."""
    with pytest.raises(UnsafeArchive) as caught:
        safe_extract(archive, dest)
    return caught.value.reason


def test_formats_are_known_from_as_few_bytes_as_they_need(tmp_path):
    """A POSIX tar from its first 262 bytes ("ustar" at 257), a pre-POSIX one from exactly one block;
    the head read for sniffing is one block, however large the archive."""
    posix = member("a.txt")[0].tobuf(tarfile.USTAR_FORMAT)
    assert extract.sniff_format(posix[:262]) == "tar" and extract.sniff_format(posix[:261]) is None
    assert extract.sniff_format(v7_header()) == "tar" and extract.sniff_format(v7_header()[:511]) is None
    big = tmp_path / "big.tar"
    big.write_bytes(posix + bytes(10 * 1024))
    assert extract._read_head(big) == posix[:512]


def test_a_cut_gzip_stream_is_corrupt_with_the_reason(tmp_path):
    import gzip

    whole = gzip.compress(write_tar(tmp_path / "t.tar", [member("ok.txt", data=bytes(range(256)) * 64)])
                          .read_bytes(), mtime=0)
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(whole[: len(whole) - 20])
    from mirrord.archive import CorruptArchive

    with pytest.raises(CorruptArchive) as caught:
        safe_extract(cut, tmp_path / "extract")
    assert str(caught.value).endswith(
        "cut.tar.gz: EOFError: compressed file ended before the end-of-stream marker was reached")


def test_zip_directory_entries_and_symlinks_in_new_directories(tmp_path):
    import zipfile

    with zipfile.ZipFile(tmp_path / "dirs.zip", "w") as zf:
        zf.writestr("d/", "")
        zf.writestr("d/x.txt", "x")
        zf.writestr("e/", "")
        zf.writestr("e/y.txt", "y")
    assert safe_extract(tmp_path / "dirs.zip", tmp_path / "z").files == ["d/x.txt", "e/y.txt"]
    archive = write_tar(tmp_path / "links.tar", [member("ok.txt", data=b"fine"),
                                                 member("new/sub/l", tarfile.SYMTYPE, linkname="../../ok.txt")])
    safe_extract(archive, tmp_path / "t")
    assert (tmp_path / "t" / "new" / "sub" / "l").read_bytes() == b"fine"


def test_symlinks_meeting_what_is_on_disk(tmp_path):
    for where, reason in [("x", "'x/l': 'x' exists and is not a directory"),
                          ("l", "'l' would replace an existing directory")]:
        dest = tmp_path / where
        dest.mkdir()
        (dest / where).mkdir() if where == "l" else (dest / where).write_text("already here")
        archive = write_tar(tmp_path / f"{where}.tar", [member("ok.txt", data=b"fine"),
                                                        member(f"{'x/' if where == 'x' else ''}l", tarfile.SYMTYPE,
                                                               linkname="ok.txt" if where == "l" else "../ok.txt")])
        assert refusal_keeping(archive, dest) == reason


def test_tar_limits_name_the_member_and_what_was_counted(tmp_path):
    archive = write_tar(tmp_path / "three.tar", [member(f"f{i}", data=b"x" * 10) for i in range(3)])
    with pytest.raises(UnsafeArchive) as caught:
        safe_extract(archive, tmp_path / "a", max_members=2)
    assert caught.value.reason == "more than 2 members (at 'f2')"
    with pytest.raises(UnsafeArchive) as caught:
        safe_extract(archive, tmp_path / "b", max_total_bytes=25)
    assert caught.value.reason == "declared size exceeds 25 bytes (at 'f2')"


def test_a_repeated_member_replaces_the_earlier_one_and_is_listed_once(tmp_path):
    archive = write_tar(tmp_path / "again.tar", [member("a", data=b"first"), member("b"), member("a", data=b"second")])
    assert safe_extract(archive, tmp_path / "x").files == ["a", "b"]
    assert (tmp_path / "x" / "a").read_bytes() == b"second"


def test_a_destination_whose_name_ends_in_a_blank(tmp_path):
    archive = write_tar(tmp_path / "ok.tar", [member("d/ok.txt", data=b"fine")])
    assert safe_extract(archive, tmp_path / "dest ").files == ["d/ok.txt"]


def test_tar_members_meeting_what_is_on_disk_are_named(tmp_path):
    for entry, kind, on_disk, reason in [
        ("x", tarfile.REGTYPE, "x/", "'x' would replace an existing directory"),
        ("d/", tarfile.DIRTYPE, "d", "'d': 'd' exists and is not a directory"),
        ("a/b/c", tarfile.REGTYPE, "a/b", "'a/b/c': 'a/b' exists and is not a directory"),
    ]:
        dest = tmp_path / entry.replace("/", "_")
        (dest / on_disk).parent.mkdir(parents=True)
        (dest / on_disk).mkdir() if on_disk.endswith("/") else (dest / on_disk).write_text("already here")
        archive = write_tar(tmp_path / "t.tar", [member(entry, kind)])
        assert refusal_keeping(archive, dest) == reason


def test_a_tar_gz_of_many_small_gzip_members_splits_headers_and_data_anywhere(tmp_path):
    """Each gzip member ends a read, so tar headers and data arrive in pieces at odd places."""
    import gzip

    plain = write_tar(tmp_path / "t.tar", [member("a.txt", data=b"A" * 700), member("b.txt", data=b"B" * 511),
                                           member("c.txt", data=b"C" * 1)]).read_bytes()
    cuts = [0, 100, 700, 1300, 1537, 2049, 2600, len(plain)]
    (tmp_path / "t.tar.gz").write_bytes(b"".join(gzip.compress(plain[a:b], mtime=0) for a, b in pairwise(cuts)))
    assert safe_extract(tmp_path / "t.tar.gz", tmp_path / "x").files == ["a.txt", "b.txt", "c.txt"]
    assert [(tmp_path / "x" / n).read_bytes() for n in ("a.txt", "b.txt", "c.txt")] == [b"A" * 700, b"B" * 511, b"C"]


def test_a_tar_cut_inside_a_member_is_corrupt_with_the_reason(tmp_path):
    from mirrord.archive import CorruptArchive

    plain = write_tar(tmp_path / "t.tar", [member("a.txt", data=b"A" * 5000)]).read_bytes()
    (tmp_path / "cut.tar").write_bytes(plain[:3000])
    with pytest.raises(CorruptArchive) as caught:
        safe_extract(tmp_path / "cut.tar", tmp_path / "x")
    assert str(caught.value).endswith("cut.tar: ReadError: unexpected end of data")


def test_a_zip_root_entry_is_skipped_not_the_end(tmp_path):
    import zipfile

    with zipfile.ZipFile(tmp_path / "root.zip", "w") as zf:
        zf.writestr("./", "")
        zf.writestr("a.txt", "a")
    assert safe_extract(tmp_path / "root.zip", tmp_path / "x").files == ["a.txt"]


def test_the_ustar_magic_alone_makes_a_tar(tmp_path):
    """Five bytes "ustar" at 257, whatever follows them and whatever the checksum says."""
    header = bytearray(member("a.txt")[0].tobuf(tarfile.USTAR_FORMAT))
    header[148:156] = b"0000000\0"  # a wrong checksum: only the magic can tell
    assert bytes(header[257:263]) == b"ustar\0" and extract.sniff_format(bytes(header)) == "tar"
