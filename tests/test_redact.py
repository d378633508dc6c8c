"""Secrets scrubbed from text (`mirrord.redact`): the rules that a mutation run found untested (issue 23).

Registered secrets stay registered for the whole process: each test starts from none (one registered
by an earlier test would hide a registration that no longer happens) and puts the others' back after.
"""

from __future__ import annotations

import pytest

from mirrord import redact as redact_module
from mirrord.redact import MASK, redact, register_secret


@pytest.fixture
def no_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redact_module, "_ordered", ())


def test_secret_query_parameters_are_masked_and_the_rest_kept():
    """Kills the mutant that replaces the query match by nothing (`lambda m: None`)."""
    url = "https://pdis.example/api?Token=tk-41a9&page=2&api_key=k#frag"
    assert redact(url) == f"https://pdis.example/api?Token={MASK}&page=2&api_key={MASK}#frag"
    assert redact("GET /x?sessionid=s1 HTTP/1.1") == f"GET /x?sessionid={MASK} HTTP/1.1"
    assert redact("?pagetoken=1&notkey=2") == "?pagetoken=1&notkey=2"  # a whole parameter name only


def test_a_secret_is_registered_from_four_characters(no_secrets):
    """Kills `len(value) >= 4` → `> 4` / `>= 5`: a four-character password is a secret too; shorter
    values are not registered, or every log line would lose its common words."""
    register_secret("q7Z!")
    register_secret("w3#")
    register_secret("")
    register_secret(None)
    assert redact("user q7Z! w3#") == f"user {MASK} w3#"


def test_a_secret_containing_another_is_masked_whole(no_secrets):
    """Kills the mutants of the longest-first order (`key=len`, `reverse=True` dropped or flipped):
    the shorter secret, masked first, would leave the longer one's ends in the text."""
    register_secret("mm9Kq")  # sorts after the longer one by text, before it by length
    register_secret("Ax-mm9Kq-Zr")
    assert redact("token Ax-mm9Kq-Zr and mm9Kq") == f"token {MASK} and {MASK}"


def test_empty_text_is_returned_as_it_is():
    assert redact("") == ""
