"""``busctl introspect``'s reading of the JSON Schema documents a peer sends in ``Hello.schema``
and ``Hello.reply_schema`` (PROTOCOL.md 5.2, "Schemas"): any JSON Schema whose message types
it can find, not only msgspec's.

A document describes a union of message types.  busctl finds them as the spec says: the
root, after following local ``$ref`` s (``#/$defs/X``, ``#/definitions/X``, any ``#/...``
pointer), is one object schema or a ``oneOf``/``anyOf`` of them; each names its type by
``properties.type`` (``const`` or a one-value ``enum``), else its ``title``, else the name of
the definition it refers to.  A request type is also found as the definition named after it.
What it cannot read it says so, in one line, instead of listing nothing.
"""

from __future__ import annotations

from typing import Any

__all__ = ["interface_lines", "field_type"]

#: How many ``$ref`` s are followed in a row before a document is taken as circular.
_REF_DEPTH = 32


class _Doc:
    def __init__(self, doc: Any) -> None:
        self.doc = doc if isinstance(doc, dict) else {}

    def resolve(self, node: Any) -> tuple[dict[str, Any] | None, str]:
        """``node`` with its ``$ref`` s followed, and the name of the last definition one
        pointed at ("" when none); (None, why) when a reference does not resolve."""
        name = ""
        for _ in range(_REF_DEPTH):
            if not isinstance(node, dict):
                return None, "a schema that is not a JSON object"
            ref = node.get("$ref")
            if ref is None:
                return node, name
            if not isinstance(ref, str) or not ref.startswith("#"):
                return None, f"the reference {ref!r} is not within the document (only '#/...' ones are followed)"
            target: Any = self.doc
            for part in ref[1:].lstrip("/").split("/") if ref not in ("#", "#/") else []:
                part = part.replace("~1", "/").replace("~0", "~")
                if not isinstance(target, dict) or part not in target:
                    return None, f"the reference {ref!r} points at nothing"
                target = target[part]
            name, node = ref.rsplit("/", 1)[-1], target
        return None, f"references nested over {_REF_DEPTH} deep (circular?)"

    def definition(self, name: str) -> dict[str, Any] | None:
        for key in ("$defs", "definitions"):
            defs = self.doc.get(key)
            if isinstance(defs, dict) and isinstance(defs.get(name), dict):
                return self.resolve(defs[name])[0]
        return None

    def alternatives(self) -> tuple[list[tuple[str, dict[str, Any]]], str]:
        """The message types the document's root describes, with their names; and, when it
        names none, why."""
        found: list[tuple[str, dict[str, Any]]] = []
        problems: list[str] = []

        def walk(node: Any, depth: int) -> None:
            schema, ref_name = self.resolve(node)
            if schema is None:
                problems.append(ref_name)
                return
            union = schema.get("oneOf", schema.get("anyOf"))
            if isinstance(union, list) and depth < _REF_DEPTH:
                for alt in union:
                    walk(alt, depth + 1)
                return
            if not _is_object(schema):
                problems.append(f"a {schema.get('type', 'schema without a type')!r} where an object schema "
                                "(a message) was expected")
                return
            name = _tag(self, schema) or schema.get("title") or ref_name
            if isinstance(name, str) and name:
                found.append((name, schema))
            else:
                problems.append("an object schema without a name (no properties.type const or enum, "
                                "no title, not a named definition)")

        if self.doc:
            walk(self.doc, 0)
        return found, "; ".join(dict.fromkeys(problems))


def _is_object(schema: dict[str, Any]) -> bool:
    return schema.get("type") == "object" or isinstance(schema.get("properties"), dict)


def _tag(doc: _Doc, schema: dict[str, Any]) -> str:
    props = schema.get("properties")
    if not isinstance(props, dict) or "type" not in props:
        return ""
    tag, _ = doc.resolve(props["type"])
    if tag is None:
        return ""
    if isinstance(tag.get("const"), str):
        return tag["const"]
    enum = tag.get("enum")
    return enum[0] if isinstance(enum, list) and len(enum) == 1 and isinstance(enum[0], str) else ""


def field_type(doc: _Doc, node: Any, depth: int = 0) -> str:
    """A field's type as busctl shows it: ``int``-like JSON Schema names, ``[item]``,
    ``{str: value}``, ``A | B``, a referenced definition by its name."""
    if not isinstance(node, dict) or depth > 8:
        return "any"
    if "$ref" in node:
        target, name = doc.resolve(node)
        if target is None or not name:
            return "any"
        # a structure by its definition's name; an alias of a plain type as that type
        return name if _is_object(target) or "$ref" in target else field_type(doc, target, depth + 1)
    for key in ("anyOf", "oneOf"):
        if isinstance(node.get(key), list):
            return " | ".join(field_type(doc, s, depth + 1) for s in node[key]) or "any"
    if "const" in node:
        return repr(node["const"])
    if isinstance(node.get("enum"), list):
        return " | ".join(map(repr, node["enum"])) or "any"
    t = node.get("type", "any")
    if isinstance(t, list):
        return " | ".join(field_type(doc, {**node, "type": x}, depth + 1) for x in t)
    if t == "array":
        items = node.get("items")
        return f"[{field_type(doc, items, depth + 1) if items is not None else 'any'}]"
    if t == "object" and not isinstance(node.get("properties"), dict):
        extra = node.get("additionalProperties")
        return f"{{str: {field_type(doc, extra, depth + 1)}}}" if isinstance(extra, dict) else "object"
    return str(t)


def _fields(doc: _Doc, schema: dict[str, Any], optional_marks: bool) -> str:
    props = schema.get("properties")
    if not isinstance(props, dict):
        return ""
    required = schema.get("required")
    required = set(required) if isinstance(required, list) else set()
    return ", ".join(f"{k}{'?' if optional_marks and k not in required else ''}: {field_type(doc, v)}"
                     for k, v in props.items() if k != "type")


def interface_lines(types: list[str], schema: dict[str, Any], reply_schema: dict[str, Any]) -> list[str]:
    """What ``busctl introspect`` prints of a service's types (after its name)."""
    lines: list[str] = []
    req = _Doc(schema)
    alts, problem = req.alternatives()
    by_name = dict(alts)
    if len(types) == 1 and len(alts) == 1 and types[0] not in by_name:
        by_name[types[0]] = alts[0][1]  # one type, one schema: whatever the schema calls it
    unread = []
    for t in types:
        found = req.definition(t) or by_name.get(t)
        if found is not None:
            lines.append(f"  request {t}({_fields(req, found, True)})")
        else:
            lines.append(f"  request {t}")
            unread.append(t)
    if not schema:
        if types:
            lines.append("  (no request schema: the service sent none)")
    elif unread:
        why = problem or f"it describes {', '.join(sorted(by_name)) or 'no message type'}"
        lines.append(f"  (cannot render the request schema for {', '.join(unread)}: {why}; "
                     "busctl introspect -o json shows it as sent)")
    rep = _Doc(reply_schema)
    replies, problem = rep.alternatives()
    for name, found in replies:
        lines.append(f"  reply   {name}({_fields(rep, found, False)})")
    if reply_schema and problem:
        lines.append(f"  (cannot render {'all of ' if replies else ''}the reply schema: {problem}; "
                     "busctl introspect -o json shows it as sent)")
    return lines
