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
