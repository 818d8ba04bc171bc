"""How busctl shows what it got: ``-o short`` (tables and lines for a person), ``-o json``
(one compact JSON document per object: a stream is JSON lines) and ``-o json-pretty``
(indented).  A JSON document holds what the human view shows, every field included (also
those at their default, which msgspec would omit), numbers as numbers.  Colour only on a
terminal, never with ``NO_COLOR`` set (https://no-color.org) or ``TERM=dumb``."""

from __future__ import annotations

import base64
import enum
import json
import math
import os
import shutil
import sys
from typing import Any, Callable, Sequence, TextIO

import msgspec

__all__ = ["OUTPUTS", "Output", "plain", "decode_body", "shorten"]

OUTPUTS = ("short", "json", "json-pretty")

_COLOURS = {"green": "32", "red": "31", "yellow": "33", "blue": "34", "dim": "2", "bold": "1"}
_STATE_COLOURS = {"ready": "green", "connected": "green", "failed": "red", "backoff": "yellow", "waiting": "yellow",
                  "starting": "yellow", "stopping": "yellow", "stopped": "dim", "configured": "dim"}


def plain(obj: Any) -> Any:
    """JSON-ready builtins of ``obj``: a Struct becomes a dict of *every* field (defaults
    included, the type tag left out), bytes base64 text, an enum its value, a float
    that is not finite ``None``."""
    if isinstance(obj, msgspec.Struct):
        return {f.encode_name: plain(getattr(obj, f.name)) for f in msgspec.structs.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [plain(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, enum.Enum):
        return plain(obj.value)
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(obj)).decode()
    if isinstance(obj, msgspec.msgpack.Ext):
        return {"ext": obj.code, "data": base64.b64encode(obj.data).decode()}
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    return msgspec.to_builtins(obj)


def decode_body(body: bytes) -> Any:
    """A msgpack body as JSON-ready builtins (its ``type`` tag kept), or None."""
    if not body:
        return None
    try:
        return plain(msgspec.msgpack.decode(body))
    except msgspec.DecodeError:
        return {"undecodable": base64.b64encode(body).decode()}


def shorten(text: str, width: int) -> str:
    if width <= 0:
        return ""
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


class Output:
    """Where and how one busctl command prints."""

    def __init__(self, mode: str = "short", stream: TextIO | None = None) -> None:
        self.mode = mode
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.colour = self.tty and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"

    @property
    def json(self) -> bool:
        return self.mode != "short"

    @property
    def width(self) -> int:
        """The terminal's width (COLUMNS first); 160 when printing to no terminal."""
        return shutil.get_terminal_size((160, 24)).columns

    def emit(self, obj: Any, *, flush: bool = False) -> None:
        """One JSON document (compact for ``json``, indented for ``json-pretty``)."""
        data = plain(obj)
        if self.mode == "json-pretty":
            text = json.dumps(data, indent=2, ensure_ascii=False)
        else:
            text = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
        print(text, file=self.stream, flush=flush)

    def pretty(self, obj: Any) -> None:
        """A JSON value shown to a person (``call``'s reply, ``attest``'s report)."""
        if self.mode == "json":
            self.emit(obj)
        else:
            print(json.dumps(plain(obj), indent=2, ensure_ascii=False), file=self.stream)

    def line(self, text: str = "", *, flush: bool = False) -> None:
        print(text, file=self.stream, flush=flush)

    def paint(self, text: str, colour: str) -> str:
        code = _COLOURS.get(colour)
        return f"\033[{code}m{text}\033[0m" if self.colour and code and text else text

    def state(self, text: str) -> str:
        return self.paint(text, _STATE_COLOURS.get(text, ""))

    def table(self, rows: Sequence[Sequence[Any]], headers: Sequence[str],
              styles: dict[int, Callable[[str], str]] | None = None) -> str:
        """Columns padded to their widest cell; an empty cell shows ``-``.  ``styles`` colour
        a column's cells (after padding, so escapes do not upset the widths)."""
        cells = [[str(c) for c in headers]] + [[("-" if c in ("", None) else str(c)) for c in r] for r in rows]
        widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
        lines = []
        for n, row in enumerate(cells):
            out = []
            for i, (c, w) in enumerate(zip(row, widths)):
                padded = c.ljust(w) if i < len(row) - 1 else c
                if n == 0:
                    padded = self.paint(padded, "bold")
                elif styles and i in styles and c != "-":
                    padded = styles[i](c) + " " * (len(padded) - len(c))
                out.append(padded)
            lines.append("  ".join(out).rstrip())
        return "\n".join(lines)
