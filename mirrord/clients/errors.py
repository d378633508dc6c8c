"""Typed errors every upstream client raises, so jobs decide by kind, never by status code."""

from __future__ import annotations


class UpstreamError(Exception):
    """An upstream call failed. `url` and `detail` are already redacted."""


    def __init__(self, service: str, message: str, *, status: int | None = None, url: str = "",
                 detail: str = "") -> None:
        self.service = service
        self.status = status
        self.url = url
        self.detail = detail
        parts = [f"{service}: {message}"]
        if status is not None:
            parts.append(f"(HTTP {status})")
        if url:
            parts.append(f"at {url}")
        if detail:
            parts.append(f"- {detail}")
        super().__init__(" ".join(parts))


class AuthError(UpstreamError):
    """Credentials missing, rejected or expired (401/403, or a redirect to a login page)."""


class NotFound(UpstreamError):
    """404: the resource does not exist (or is not visible to us)."""


class Conflict(UpstreamError):
    """409: the server already has this (duplicate, already processed)."""


class BadRequest(UpstreamError):
    """Any other 4xx: our request is wrong; retrying the same request will not help."""


class TransientError(UpstreamError):
    """Connection errors, timeouts, 5xx, 429: worth retrying later."""


    def __init__(self, *args, retry_after: float | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.retry_after = retry_after


class ProtocolError(UpstreamError):
    """The upstream answered, but not in the shape its contract promises (bad JSON, missing fields).

    Retryable: a malformed answer is usually a passing fault (a proxy error page, a truncated body).
    """

