"""One place that knows how to scrub secrets from text: URLs, headers, exception messages, log lines."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable

_SECRET_QUERY = re.compile(
    r"(?i)([?&](?:token|key|api_key|apikey|password|secret|access_token|sessionid|csrftoken)=)[^&#\s]+"
)
MASK = "***"

_lock = threading.Lock()
_known: set[str] = set()


def register_secret(value: str | None) -> None:
    """Remember a secret value so `redact` removes it wherever it appears, in any text."""
    if value and len(value) >= 4:
        with _lock:
            _known.add(value)


def known_secrets() -> frozenset[str]:
    with _lock:
        return frozenset(_known)


def redact(text: str, extra: Iterable[str] = ()) -> str:
    if not text:
        return text
    text = _SECRET_QUERY.sub(lambda m: m.group(1) + MASK, text)
    # Longest first, so a secret that contains another is masked whole.
    for secret in sorted({*known_secrets(), *(s for s in extra if s)}, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, MASK)
    return text

