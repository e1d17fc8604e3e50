"""Logging, configured once at start-up: JSON lines for journald, a console renderer for people.

Everything goes to stdout. Under systemd stdout is not a TTY and journald keeps one
JSON object per line (``journalctl -u zeta-agent@otto -o cat | jq``); in a terminal the
console renderer is easier to read. Context (``persona``, ``tick``) is bound with
contextvars, so every line a tick produces carries it without passing loggers around.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal, TextIO

import structlog
from structlog.typing import Processor

LogFormat = Literal["json", "console"]
LEVELS = ("debug", "info", "warning", "error")


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
