"""One place that knows how to scrub secrets from text: URLs, headers, exception messages, log lines."""

from __future__ import annotations

import re
import threading

_SECRET_QUERY = re.compile(
    r"(?i)([?&](?:token|key|api_key|apikey|password|secret|access_token|sessionid|csrftoken)=)[^&#\s]+"
)
MASK = "***"

_lock = threading.Lock()
# Longest first, so a secret that contains another is masked whole. Rebuilt on registration (rare),
# so `redact`, which runs on every log line, only reads it.
_ordered: tuple[str, ...] = ()


def register_secret(value: str | None) -> None:
    """Remember a secret value so `redact` removes it wherever it appears, in any text."""
    global _ordered
    if value and len(value) >= 4:
        with _lock:
            _ordered = tuple(sorted({*_ordered, value}, key=len, reverse=True))


def redact(text: str) -> str:
    if not text:
        return text
    text = _SECRET_QUERY.sub(lambda m: m.group(1) + MASK, text)
    for secret in _ordered:
        if secret in text:
            text = text.replace(secret, MASK)
    return text
