"""Typed settings: each service declares a ``Settings`` Struct; the config's
``[services.<name>.settings]`` table is decoded into it before ``setup()``.

    class SchedulerSettings(Settings):
        max_batch: int = 16
        pipelines: list[Pipeline] = []

    class Scheduler(Service):
        Settings = SchedulerSettings

        async def setup(self) -> None:
            self.settings.max_batch ...

A field typed ``pathlib.Path`` holds a path; a relative one is taken from the config
file's directory.  ``edgebus config check`` and a reload check every service's table
against its type without starting it: :func:`service_class` finds the type from the
service's command (``python -m module``).
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Any

import msgspec

from protocols.runtime import ENV_CONFIG_DIR, validation_key

from ._exceptions import SettingsError

__all__ = ["Settings", "decode_settings", "service_class", "config_dir"]


class Settings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Base class of a service's settings: unknown keys are errors, every field by name."""


def config_dir() -> Path:
    """Where relative paths in this service's settings resolve (the kernel says)."""
    return Path(os.environ.get(ENV_CONFIG_DIR) or os.getcwd())


def decode_settings(raw: dict[str, Any], type_: type | None, *, base: Path | None = None,
                    service: str = "") -> Any:
    """``raw`` (the config's table) as ``type_``; relative ``Path`` fields against ``base``.

    Raises SettingsError naming the key (``settings.pipelines[0].model``)."""
    if type_ is None:
        if raw:
            raise SettingsError(service, "settings", f"this service takes no settings, got {', '.join(sorted(raw))}")
        return None
    root = base if base is not None else config_dir()

    def dec_hook(t: type, value: Any) -> Any:
        if t is Path:
            if not isinstance(value, str) or not value:
                raise TypeError(f"Expected a path (a non-empty `str`), got `{type(value).__name__}`")
            return root / value  # an absolute value stays as it is
        raise NotImplementedError(f"{t!r} is not a supported settings type")

    try:
        return msgspec.convert(raw, type_, dec_hook=dec_hook)
    except msgspec.ValidationError as exc:
        raise SettingsError(service, *validation_key(exc, "settings")) from None


def service_class(command: list[str], working_directory: str = "") -> tuple[type | None, str]:
    """The SDK Service class a command runs, found without running it: for
    ``python -m module`` the one Service subclass the module defines or exports (the
    module is looked up as ``python -m`` would in ``working_directory``).  A script is not
    imported (that could run it): its settings are checked when it starts.
    Returns ``(class, "")`` or ``(None, why it cannot be known)``."""
    from ._service import Service

    if "-m" not in command[:-1]:
        return None, "not a `python -m module` command; the service checks its settings when it starts"
    module_name = command[command.index("-m") + 1]
    if working_directory:
        sys.path.insert(0, working_directory)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        return None, f"module {module_name!r} cannot be imported: {exc}"
    finally:
        if working_directory:
            sys.path.remove(working_directory)
    found = {
        obj for obj in vars(module).values()
        if isinstance(obj, type) and issubclass(obj, Service) and obj is not Service
        and obj.__module__.startswith(module_name)
    }
    if len(found) != 1:
        names = ", ".join(sorted(c.__name__ for c in found)) or "none"
        return None, f"module {module_name!r} defines one Service subclass to check against, not {names}"
    return found.pop(), ""
