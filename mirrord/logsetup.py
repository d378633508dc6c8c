"""structlog for mirrord and, through the same renderer, for every library logger.

Formats: `console` (human, for a terminal), `json` (one object per line, for containers and log
shippers), `journald` (JSON prefixed with the `<N>` syslog priority systemd understands), `auto`
(console on a TTY, JSON otherwise). Every line passes the redactor last, so a secret that slipped
into a message or an exception is masked anyway.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

from mirrord.redact import redact

_PRIORITY = {"critical": 2, "error": 3, "warning": 4, "info": 6, "debug": 7}
LIBRARY_LOGGERS = ("aiohttp", "apscheduler", "sqlalchemy", "alembic", "asyncio", "tenacity")


def _redact_event(_: Any, __: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    for key, value in list(event_dict.items()):
        if isinstance(value, str):
            event_dict[key] = redact(value)
        elif isinstance(value, BaseException):
            event_dict[key] = redact(str(value))
    return event_dict


class _RedactingRenderer:
    """Wraps the final renderer: masks secrets in the rendered line (tracebacks included)."""

    def __init__(self, renderer: Any, journald: bool = False) -> None:
        self.renderer = renderer
        self.journald = journald

    def __call__(self, logger: Any, name: str, event_dict: dict[str, Any]) -> str:
        level = event_dict.get("level", "info")
        line = redact(self.renderer(logger, name, event_dict))
        if self.journald:
            line = f"<{_PRIORITY.get(level, 6)}>{line}"
        return line


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time, so rich progress bars, which swap it for a
    proxy while they are shown, can print log lines above the bars instead of through them."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def _one_line_exceptions(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    """On a console below debug level, a failure is one line: the exception's type and message, no traceback
    (`--log-level debug` shows it)."""
    exc_info = event.pop("exc_info", None)
    if exc_info:
        if exc_info is True:
            exc_info = sys.exc_info()
        elif isinstance(exc_info, BaseException):
            exc_info = (type(exc_info), exc_info, exc_info.__traceback__)
        if exc_info[0] is not None:
            event.setdefault("error", f"{exc_info[0].__name__}: {exc_info[1]}")
    return event


def configure(level: str = "info", fmt: str = "auto", stream: Any = None) -> None:
    handler = logging.StreamHandler(stream) if stream is not None else _CurrentStderr()
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "console" if hasattr(stream, "isatty") and stream.isatty() else "json"
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redact_event,
    ]
    if fmt == "console":
        # Plain tracebacks, never rich's with every local (a config object is hundreds of lines).
        renderer: Any = structlog.dev.ConsoleRenderer(colors=stream.isatty() if hasattr(stream, "isatty") else False,
                                                      exception_formatter=structlog.dev.plain_traceback)
    else:
        renderer = structlog.processors.JSONRenderer()
    brief = fmt == "console" and level.lower() != "debug"
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *([_one_line_exceptions] if brief else []),
            structlog.processors.format_exc_info if fmt != "console" else (lambda _l, _n, e: e),
            _RedactingRenderer(renderer, journald=fmt == "journald"),
        ],
    )
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in LIBRARY_LOGGERS:
        lib = logging.getLogger(name)
        lib.handlers[:] = []
        lib.propagate = True
        # Libraries are chatty at INFO (SQL echo, every APScheduler run); warnings and up are what matter.
        lib.setLevel(logging.WARNING if level.lower() != "debug" else logging.DEBUG)
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
