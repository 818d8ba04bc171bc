"""Config fragments: ``[services.<name>.settings]`` tables merged into the device's config file.

The fragment of a deployment is the desired overlay, not a patch on the previous one: the
file is rewritten as its *base* (the file as its owner last wrote it, kept in the fleet's
state directory) with the fragment's settings merged in, key by key (a table into a table,
any other value replacing the base's).  A file this module wrote starts with ``MARKER``; a
file that does not (its owner edited it since) becomes the new base.  Comments of the base are
not carried into the merged file (it says where the base is).
"""

from __future__ import annotations

import copy
import datetime
import json
import math
import re
import tomllib
from pathlib import Path
from typing import Any

from services import atomic_write

__all__ = ["ConfigFragmentError", "merge_fragment", "dumps"]

MARKER = "# Written by the edgebus fleet service"
_BARE = re.compile(r"^[A-Za-z0-9_-]+$")


class ConfigFragmentError(ValueError):
    pass


def merge_fragment(config_file: Path, base_file: Path, fragment: str) -> bytes:
    """Write ``config_file`` = its base with ``fragment`` merged; return its previous bytes
    (to put back if the kernel refuses the result)."""
    try:
        overlay = tomllib.loads(fragment)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigFragmentError(f"the config fragment is not valid TOML: {exc}") from None
    services = overlay.pop("services", {})
    if overlay or not isinstance(services, dict) or any(
            not isinstance(v, dict) or set(v) != {"settings"} or not isinstance(v["settings"], dict)
            for v in services.values()):
        raise ConfigFragmentError("a config fragment holds only [services.<name>.settings] tables")
    try:
        previous = config_file.read_bytes()
    except OSError as exc:
        raise ConfigFragmentError(f"cannot read the config file {config_file}: {exc.strerror}") from None
    if not previous.decode(errors="replace").startswith(MARKER):
        base_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write(base_file, previous)  # its owner's latest version is the base
    try:
        base = tomllib.loads(base_file.read_text())
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigFragmentError(f"cannot read the base config {base_file}: {exc}") from None
    merged = copy.deepcopy(base)
    for name, body in services.items():
        target = merged.get("services", {}).get(name)
        if not isinstance(target, dict):
            raise ConfigFragmentError(f"the config fragment sets service {name!r}, which this device's config "
                                      "does not have")
        target["settings"] = _merge(target.get("settings", {}), body["settings"])
    text = (f"{MARKER} from {base_file} and a deployment's config fragment;\n"
            f"# edit {config_file} itself (it becomes the base) or {base_file}.\n\n" + dumps(merged))
    atomic_write(config_file, text.encode())
    return previous


def _merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in overlay.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def dumps(doc: dict[str, Any]) -> str:
    """TOML text of a document as tomllib returns one."""
    lines: list[str] = []
    _table(lines, [], doc)
    return "\n".join(lines) + "\n"


def _is_table_array(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def _table(lines: list[str], path: list[str], table: dict[str, Any]) -> None:
    for k, v in table.items():
        if not isinstance(v, dict) and not _is_table_array(v):
            lines.append(f"{_key(k)} = {_value(v)}")
    for k, v in table.items():
        if isinstance(v, dict):
            if not v or any(not isinstance(x, dict) and not _is_table_array(x) for x in v.values()):
                lines += ["", f"[{'.'.join(_key(p) for p in [*path, k])}]"]  # else implied by its subtables
            _table(lines, [*path, k], v)
        elif _is_table_array(v):
            for item in v:
                lines += ["", f"[[{'.'.join(_key(p) for p in [*path, k])}]]"]
                _table(lines, [*path, k], item)


def _key(k: str) -> str:
    return k if _BARE.match(k) else _string(k)


def _string(s: str) -> str:
    return json.dumps(s, ensure_ascii=False).replace("\x7f", "\\u007f")


def _value(v: Any) -> str:
    match v:
        case bool():
            return "true" if v else "false"
        case int():
            return str(v)
        case float():
            return ("nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")) if not math.isfinite(v) else repr(v)
        case str():
            return _string(v)
        case datetime.datetime() | datetime.date() | datetime.time():
            return v.isoformat()
        case list():
            return "[" + ", ".join(_value(x) for x in v) + "]"
        case dict():
            return "{" + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items()) + "}"
    raise ConfigFragmentError(f"cannot write a {type(v).__name__} in TOML")
