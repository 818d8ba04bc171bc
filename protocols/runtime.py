"""The process contract between the kernel and a service it starts.

Besides the bus, a kernel and its services agree on a few process-level things; they are
defined here, once, so that the kernel and the SDK (which must not import each other's
private parts) share them:

* the environment the kernel sets for a service (``ENV_*``);
* exit statuses and what the supervisor makes of them (``EXIT_*``);
* where a run directory keeps the bus socket;
* log lines: structlog, one JSON object per line when not on a terminal, with the service
  name in every line.  The kernel reads its children's JSON lines and re-emits them with
  the service name, so a service in another language only has to print such lines.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, MutableMapping

import msgspec
import structlog

__all__ = [
    "ENV_SERVICE", "ENV_BUS", "ENV_RUN_DIR", "ENV_STATE_DIR", "ENV_CONFIG_DIR", "ENV_CREDENTIAL_FD",
    "ENV_CREDENTIAL_FILE", "ENV_LOG_LEVEL", "ENV_LOG_FORMAT", "ENV_BACKEND",
    "EXIT_OK", "EXIT_ERROR", "EXIT_GAVE_UP", "EXIT_BUS", "EXIT_CONFIG",
    "endpoint_for_run_dir", "configure_logging", "get_logger", "add_log_sink", "remove_log_sink",
    "validation_key",
]

#: The service's name (the kernel's, from the config, over the class's default).
ENV_SERVICE = "EDGEBUS_SERVICE"
#: The bus endpoint (``ipc://<run-dir>/bus.sock``).
ENV_BUS = "EDGEBUS_BUS"
ENV_RUN_DIR = "EDGEBUS_RUN_DIR"
#: The directory for the service's persistent state (it uses ``<state-dir>/<its name>``).
ENV_STATE_DIR = "EDGEBUS_STATE_DIR"
#: The directory of the config file: relative paths in a service's settings resolve here.
ENV_CONFIG_DIR = "EDGEBUS_CONFIG_DIR"
#: An inherited descriptor holding the bus credential (read once, then closed).
ENV_CREDENTIAL_FD = "EDGEBUS_CREDENTIAL_FD"
#: A file holding the bus credential (a service started by hand).
ENV_CREDENTIAL_FILE = "EDGEBUS_CREDENTIAL_FILE"
ENV_LOG_LEVEL = "EDGEBUS_LOG_LEVEL"
#: ``json`` or ``console``; unset: JSON when stderr is not a terminal.
ENV_LOG_FORMAT = "EDGEBUS_LOG_FORMAT"
#: The anyio backend of an SDK service: ``asyncio`` (default) or ``trio``.
ENV_BACKEND = "EDGEBUS_BACKEND"

#: Clean stop (after SIGTERM/SIGINT).
EXIT_OK = 0
#: ``edgebus boot``: the kernel could not start (run dir locked, bus cannot bind...).
EXIT_ERROR = 1
#: ``edgebus boot``: a critical service exceeded its restart intensity (restart the container).
EXIT_GAVE_UP = 2
#: A service could not join the bus, or lost the kernel.
EXIT_BUS = 3
#: EX_CONFIG: bad configuration or settings.  ``edgebus boot`` exits with it for an invalid
#: config; a service exiting with it is marked failed and not restarted (restarting the same
#: settings cannot help).
EXIT_CONFIG = 78


def endpoint_for_run_dir(run_dir: str | os.PathLike[str]) -> str:
    """The bus endpoint of the kernel using ``run_dir``."""
    return f"ipc://{Path(run_dir).resolve() / 'bus.sock'}"


_configured = False
#: Called with every line this process logs (see add_log_sink).
_sinks: list[Callable[[MutableMapping[str, Any]], None]] = []


def add_log_sink(sink: Callable[[MutableMapping[str, Any]], None]) -> None:
    """Have ``sink`` called with every line this process logs through structlog, once
    configure_logging ran: the event dict after the level filter, before rendering
    (``service``, ``level``, ``event``, ``timestamp``, ``exception`` as text, the other
    fields), in the thread that logs.  The sink must not change it, log, or block; what it
    raises is ignored.  (The kernel keeps each service's recent lines this way.)"""
    _sinks.append(sink)


def remove_log_sink(sink: Callable[[MutableMapping[str, Any]], None]) -> None:
    if sink in _sinks:
        _sinks.remove(sink)


def _to_sinks(logger: object, method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for sink in _sinks:
        try:
            sink(event_dict)
        except Exception:  # a sink's failure must not cost the line itself
            pass
    return event_dict


def configure_logging(service: str, *, level: str | None = None, json: bool | None = None) -> structlog.stdlib.BoundLogger:
    """Configure structlog for this process (once; later calls only rebind the name) and
    return a logger bound to ``service``.  ``EDGEBUS_LOG_LEVEL`` and ``EDGEBUS_LOG_FORMAT``
    (json|console) override the defaults."""
    global _configured
    if not _configured:
        level_name = (level or os.environ.get(ENV_LOG_LEVEL) or "info").upper()
        numeric = logging.getLevelName(level_name)
        if not isinstance(numeric, int):
            numeric = logging.INFO
        if json is None:
            fmt = os.environ.get(ENV_LOG_FORMAT, "")
            json = fmt == "json" or (fmt != "console" and not sys.stderr.isatty())
        renderer = (
            structlog.processors.JSONRenderer()
            if json
            else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty() and "NO_COLOR" not in os.environ)
        )
        structlog.configure(
            processors=[
                structlog.contextvars.merge_contextvars,
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
                structlog.processors.StackInfoRenderer(),
                structlog.processors.format_exc_info,
                _to_sinks,
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


_UNKNOWN_FIELD = re.compile(r"Object contains unknown field `([^`]*)`")


def validation_key(exc: msgspec.ValidationError, prefix: str = "") -> tuple[str, str]:
    """``(key, problem)`` of a msgspec validation error, the key written as in the TOML
    file (``services.scheduler.settings.pipelines[0].model``): configs and settings name
    the offending key itself, an unknown one included."""
    problem, sep, path = str(exc).partition(" - at `")
    path = path.rstrip("`").removeprefix("$") if sep else ""
    unknown = _UNKNOWN_FIELD.match(problem)
    if unknown:
        path += "." + unknown.group(1)
    key = prefix + path if path.startswith("[") else ".".join(filter(None, (prefix, path.lstrip("."))))
    return key, problem
