"""Logging, configured once at start-up: JSON lines for journald, a console renderer for people.

Everything goes to stdout. Under systemd stdout is not a TTY and journald keeps one
JSON object per line (``journalctl -u zeta-agent@otto -o cat | jq``); in a terminal the
console renderer is easier to read. Context (``persona``, ``tick``) is bound with
contextvars, so every line a tick produces carries it without passing loggers around.

When ``$JOURNAL_STREAM`` says the stream is the journal, each line starts with its
syslog priority as ``<N>`` (sd-daemon(3)), which journald strips and files the line
under, so ``journalctl -p err -u zeta-agent@otto`` shows the agent's errors; the JSON
after it is unchanged. An exception nothing caught is logged the same way (critical),
not printed as a bare traceback at priority info.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Literal, TextIO

import structlog
from structlog.typing import Processor

LogFormat = Literal["json", "console"]
LEVELS = ("debug", "info", "warning", "error")

# syslog(3) priorities of structlog's level names.
PRIORITIES = {"debug": 7, "info": 6, "warning": 4, "warn": 4, "error": 3, "exception": 3,
              "critical": 2}


def is_journal(stream: TextIO, environ: Mapping[str, str] = os.environ) -> bool:
    """Whether ``stream`` is the journal's stream socket: ``$JOURNAL_STREAM`` names the
    device and inode systemd connected, and a redirected stream no longer matches."""
    device, _, inode = environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        status = os.fstat(stream.fileno())
    except (OSError, ValueError):  # no file descriptor (a test's StringIO), or closed
        return False
    return f"{status.st_dev}:{status.st_ino}" == f"{device}:{inode}"


def journal_line(priority: int, text: str) -> str:
    """``text`` prefixed so journald files it at ``priority``."""
    return f"<{priority}>{text}"


class _Prioritized:
    """A renderer whose lines start with their record's journald priority."""

    def __init__(self, renderer: Processor) -> None:
        self._renderer = renderer

    def __call__(self, logger: Any, name: str, event: Any) -> Any:
        level = str(event.get("level", name)).lower()
        rendered = self._renderer(logger, name, event)
        return journal_line(PRIORITIES.get(level, 6), str(rendered))


def configure(fmt: LogFormat | None = None, *, level: str = "info",
              stream: TextIO | None = None) -> None:
    """Set up structlog (and route stdlib logging through it) for the whole process.

    ``fmt`` None picks JSON unless ``stream`` is a terminal.
    """
    out = sys.stdout if stream is None else stream
    if fmt is None:
        fmt = "console" if out.isatty() else "json"
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Processor
    if fmt == "json":
        shared.append(structlog.processors.format_exc_info)
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=out.isatty())
    if is_journal(out):
        renderer = _Prioritized(renderer)
    numeric = logging.getLevelNamesMapping()[level.upper()]
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.WriteLoggerFactory(file=out),
        # Ticks are seconds apart, so caching buys nothing; not caching keeps
        # structlog.testing.capture_logs() working for loggers created at import.
        cache_logger_on_first_use=False,
    )
    # Libraries (nats, kubernetes) log through the standard library: render their
    # records with the same processors so journald sees one format.
    handler = logging.StreamHandler(out)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        foreign_pre_chain=shared,
    ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # Library INFO lines (every HTTP request, every reconnect attempt) drown the
    # agent's own; they come through only when the operator asks for debug.
    root.setLevel(numeric if numeric == logging.DEBUG else max(numeric, logging.WARNING))


def log_uncaught() -> None:
    """Log an exception nothing caught as one critical record (with its traceback in
    it), so the journal files it at priority crit with the agent's other fields."""
    log = structlog.get_logger("zeta.agent")

    def hook(kind: type[BaseException], error: BaseException,
             trace: TracebackType | None) -> None:
        if issubclass(kind, KeyboardInterrupt):
            sys.__excepthook__(kind, error, trace)
            return
        log.critical("agent crashed", exc_info=(kind, error, trace))

    sys.excepthook = hook
