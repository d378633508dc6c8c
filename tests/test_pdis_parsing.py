"""What the PDIS client makes of PDIS's answers, field by field, and what a malformed answer becomes.

Pure parser cases, table-driven; the answers are shaped as PDIS sends them (the emulator's `as_json`,
`_store` and `_equipment`, which follow the recorded contract). A malformed answer is a `ProtocolError`
that names what was wrong (the job logs it and shows it on the item) and keeps the answer, cut short
and redacted, as its detail. The mutants each case kills are named in its docstring or comment.
"""

from __future__ import annotations

import datetime as dt

import pytest

from mirrord.clients.errors import ProtocolError
from mirrord.clients.pdis import (
    Beamline,
    EquipmentRef,
    Submission,
    Synchrotron,
    UploadResult,
    parse_equipment,
    parse_submission,
    parse_upload,
)
from mirrord.redact import register_secret

UTC = dt.UTC
FULL_SUBMISSION = {
    "token": "9f" * 20, "original_filename": "ds_5ABC.tar", "md5hash": "0123456789ABCDEF" * 2, "pdbid": "5ABC",
    "dataset_type": "other", "project_title": "Fragment screen of NSP3 macrodomain",
    "project_authors": "Smith J., Doe A.", "synchrotron": {"id": 12, "short": "Diamond"},
    "beamline": {"id": 32, "short": "I04-1"}, "equipment_other": "home source", "status": "error_no_data",
    "status_details": "No diffraction images found.", "inserted": "2026-03-04T10:11:12Z",
    "updated": "2026-03-05T00:00:01Z",
}


def test_a_whole_submission_is_parsed_field_by_field():
    """Every field lands where it belongs (kills the mutants of parse_submission that drop a field, read
    another key or misspell one: pdbid, project_title, project_authors, equipment_other and the rest);
    the md5 is lower-cased, the `Z` times are UTC."""
    assert parse_submission(FULL_SUBMISSION) == Submission(
        token="9f" * 20, original_filename="ds_5ABC.tar", md5hash="0123456789abcdef" * 2, pdbid="5ABC",
        dataset_type="other", status="error_no_data", status_details="No diffraction images found.",
        inserted=dt.datetime(2026, 3, 4, 10, 11, 12, tzinfo=UTC), updated=dt.datetime(2026, 3, 5, 0, 0, 1, tzinfo=UTC),
        project_title="Fragment screen of NSP3 macrodomain", project_authors="Smith J., Doe A.",
        synchrotron=EquipmentRef(12, "Diamond"), beamline=EquipmentRef(32, "I04-1"), equipment_other="home source")


def test_what_pdis_leaves_empty_is_none():
    """PDIS sends null, "" or nothing for an unset text; all three are None (kills _optional_str_4, _5
    and _7, which keep "" or a non-string), and an equipment reference without a name keeps its id
    with an empty name (_equipment_ref_13)."""
    answer = {"token": "t", "status": "uploaded", "original_filename": "", "md5hash": None, "pdbid": "",
              "dataset_type": None, "project_title": "", "project_authors": 7, "equipment_other": "",
              "status_details": "", "synchrotron": {"id": 12, "short": None}, "beamline": {"id": "32"}}
    assert parse_submission(answer) == Submission(
        token="t", original_filename=None, md5hash=None, pdbid=None, dataset_type=None, status="uploaded",
        status_details=None, inserted=None, updated=None, synchrotron=EquipmentRef(12, ""), beamline=None)


@pytest.mark.parametrize(("answer", "message"), [
    (["t", "uploaded"], "submission is not an object"),  # kills parse_submission_3, _6, _7
    ({"status": "uploaded"}, "submission has no valid 'token'"),  # _46, _53, _54
    ({"token": 40, "status": "uploaded"}, "submission has no valid 'token'"),
    ({"token": "t"}, "submission has no valid 'status'"),  # _79, _86, _87
    ({"token": "t", "status": True}, "submission has no valid 'status'"),
])
def test_a_malformed_submission_names_what_is_wrong_and_keeps_the_answer(answer, message):
    """The message names the record and the key; the detail is the answer itself (kills _object_3 and
    _required_8, which drop it, and _protocol_3 and _6 to _8)."""
    with pytest.raises(ProtocolError) as caught:
        parse_submission(answer)
    assert str(caught.value) == f"pdis: {message} - {answer!r}"
    assert (caught.value.service, caught.value.detail) == ("pdis", repr(answer))


def test_the_detail_is_cut_at_200_characters_and_redacted():
    """A huge answer (a proxy's page as JSON, a listing) is kept to its first 200 characters (kills
    _protocol_9, 201), and a secret in it, such as our token echoed back, is masked."""
    register_secret("tok-3c1d9a7e55b0")
    answer = {"token": None, "status": "x" * 500}
    with pytest.raises(ProtocolError) as caught:
        parse_submission(answer)
    assert caught.value.detail == repr(answer)[:200] and len(caught.value.detail) == 200
    with pytest.raises(ProtocolError) as caught:
        parse_submission({"echo": "tok-3c1d9a7e55b0"})
    assert caught.value.detail == "{'echo': '***'}"


@pytest.mark.parametrize(("text", "expected"), [
    ("2026-03-04T10:11:12Z", dt.datetime(2026, 3, 4, 10, 11, 12, tzinfo=UTC)),  # what PDIS sends
    ("2026-03-04T10:11:12.250Z", dt.datetime(2026, 3, 4, 10, 11, 12, 250000, tzinfo=UTC)),
    ("2026-03-04T12:11:12+02:00", dt.datetime(2026, 3, 4, 10, 11, 12, tzinfo=UTC)),
    ("yesterday", None),
    (1772619072, None),
    (None, None),
])
def test_times_are_read_as_utc_and_anything_else_is_none(text, expected):
    parsed = parse_submission({"token": "t", "status": "uploaded", "inserted": text}).inserted
    assert parsed == expected
    assert parsed is None or parsed.utcoffset() is not None  # aware: compared with the store's UTC times


def test_an_upload_answer_is_parsed_field_by_field():
    """As PDIS answers a 201 (kills parse_upload_26 and _72 to _75, is_pdb_exists lost or misread)."""
    answer = {"token": "ab" * 20, "md5hash": "ABCDEF" + "0" * 26, "filename": "ds_5ABC.tar", "size": 10240,
              "pdbid": "5ABC", "is_pdb_exists": True}
    assert parse_upload(answer) == UploadResult(token="ab" * 20, md5hash="abcdef" + "0" * 26,
                                                filename="ds_5ABC.tar", size=10240, pdbid="5ABC", is_pdb_exists=True)
    bare = parse_upload({"token": "t", "md5hash": "0" * 32, "size": 0, "filename": None, "pdbid": None,
                         "is_pdb_exists": False})
    assert (bare.filename, bare.pdbid, bare.is_pdb_exists) == ("", None, False)  # _65: "" not "XXXX"


@pytest.mark.parametrize(("answer", "message"), [
    ("<html>", "upload answer is not an object"),  # kills parse_upload_3, _6, _7
    ({"token": "t", "md5hash": "0" * 32}, "upload answer has no valid 'size'"),  # _12, _19, _20
    ({"token": "t", "md5hash": "0" * 32, "size": True}, "upload answer has no valid 'size'"),  # _required_6
    ({"token": "t", "md5hash": "0" * 32, "size": "10"}, "upload answer has no valid 'size'"),
    ({"md5hash": "0" * 32, "size": 10}, "upload answer has no valid 'token'"),  # _36, _43, _44
    ({"token": "t", "size": 10}, "upload answer has no valid 'md5hash'"),  # _49, _56, _57
])
def test_a_malformed_upload_answer_names_the_key(answer, message):
    """A size of `true` is not 1 byte: a bool is never taken for an int (kills _required_6)."""
    with pytest.raises(ProtocolError) as caught:
        parse_upload(answer)
    assert str(caught.value) == f"pdis: {message} - {answer!r}"


def test_the_equipment_list_is_parsed_whole():
    """As PDIS lists it, beamlines with their null fullname and url (kills the parse_equipment mutants
    that drop or misread a synchrotron's fullname or url, or a beamline's fullname)."""
    answer = [
        {"id": 12, "short": "Diamond", "fullname": "Diamond Light Source", "url": "https://www.diamond.ac.uk",
         "beamlines": [{"id": 32, "short": "I04-1", "fullname": "Macromolecular Crystallography I04-1",
                        "url": None},
                       {"id": 33, "short": None, "fullname": None, "url": None}]},
        {"id": 25, "short": None, "fullname": None, "url": None, "beamlines": None},
    ]
    assert parse_equipment(answer) == [
        Synchrotron(12, "Diamond", "Diamond Light Source", "https://www.diamond.ac.uk",
                    [Beamline(32, "I04-1", "Macromolecular Crystallography I04-1"), Beamline(33, "", None)]),
        Synchrotron(25, "", None, None, []),
    ]


@pytest.mark.parametrize(("answer", "message", "detail"), [
    ({"results": []}, "equipment list is not an array", {"results": []}),  # kills parse_equipment_2 to _7
    (["Diamond"], "synchrotron is not an object", "Diamond"),  # _11, _14, _15
    ([{"short": "Diamond"}], "synchrotron has no valid 'id'", {"short": "Diamond"}),  # _71, _78, _79
    ([{"id": 12, "beamlines": ["I04-1"]}], "beamline is not an object", "I04-1"),  # _48, _51, _52
    ([{"id": 12, "beamlines": [{"id": None}]}], "beamline has no valid 'id'", {"id": None}),  # _26, _33, _34
])
def test_a_malformed_equipment_list_names_the_record(answer, message, detail):
    """The record at fault is named and shown, not the whole list."""
    with pytest.raises(ProtocolError) as caught:
        parse_equipment(answer)
    assert str(caught.value) == f"pdis: {message} - {detail!r}"


@pytest.mark.parametrize(("name", "named"), [
    ("Diamond", True), (" diamond ", True), ("DIAMOND LIGHT SOURCE", True), ("diamond light source", True),
    ("Diamond Light", False), ("", False), ("   ", False),
])
def test_a_synchrotron_is_named_by_its_short_or_full_name_in_any_case(name, named):
    """How `[deposit] synchrotron` finds its PDIS entry (kills Synchrotron.named_6, the full name
    compared upper-cased)."""
    diamond = Synchrotron(12, "Diamond", "Diamond Light Source")
    assert diamond.named(name) is named


def test_a_synchrotron_without_a_full_name_answers_to_its_short_name_only():
    """Kills Synchrotron.named_7 and _8: a missing full name matches nothing, not even a made-up one."""
    aps = Synchrotron(25, "APS")
    assert aps.named("aps") and not aps.named("xxxx") and not aps.named("None")
