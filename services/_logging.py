"""structlog, configured once per process: JSON lines when stderr is not a terminal,
a readable console otherwise, and the service name bound in every line."""

from __future__ import annotations

import logging
import os
import sys

import structlog

__all__ = ["configure_logging", "get_logger"]

_configured = False


def configure_logging(service: str, *, level: str | None = None, json: bool | None = None) -> structlog.stdlib.BoundLogger:
    """Configure structlog for this process (idempotent) and return a logger bound to
    ``service``.  ``EDGEBUS_LOG_LEVEL`` and ``EDGEBUS_LOG_FORMAT`` (json|console) override."""
    global _configured
    level_name = (level or os.environ.get("EDGEBUS_LOG_LEVEL") or "info").upper()
    numeric = logging.getLevelName(level_name)
    if not isinstance(numeric, int):
        numeric = logging.INFO
    if json is None:
        fmt = os.environ.get("EDGEBUS_LOG_FORMAT", "")
        json = fmt == "json" or (fmt != "console" and not sys.stderr.isatty())
    if not _configured:
        renderer = (
            structlog.processors.JSONRenderer()
            if json
            else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        )
        structlog.configure(
            processors=[
                structlog.contextvars.merge_contextvars,
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
                structlog.processors.StackInfoRenderer(),
                structlog.processors.format_exc_info,
                renderer,
            ],
            wrapper_class=structlog.make_filtering_bound_logger(numeric),
            logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
            cache_logger_on_first_use=True,
        )
        _configured = True
    structlog.contextvars.bind_contextvars(service=service)
    return structlog.get_logger()


def get_logger(**bind: object) -> structlog.stdlib.BoundLogger:
    """A lazy logger: safe at import time, it picks up the configuration made later."""
    return structlog.get_logger(**bind)
