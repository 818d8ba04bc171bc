"""The byte-exact test vectors in protocols/PROTOCOL.md match our encoder and decoder, and
their decoded forms (JSON, where 2.0 is a float and 2 an integer) match the frames."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import msgspec
import pytest

from protocols import BodyDecoder, Codec, Header

from protocol_vectors import VECTORS

SPEC = Path(__file__).resolve().parent.parent / "protocols" / "PROTOCOL.md"
BLOCK = re.compile(r"```text\nvector: (\S+)\n(.*?)```", re.S)


def documented() -> dict[str, list[bytes]]:
    vectors = {}
    for name, body in BLOCK.findall(SPEC.read_text()):
        frames = []
        for i, line in enumerate(body.strip().splitlines()):
            label, _, hexes = line.partition(":")
            assert label == f"frame {i}", f"vector {name}: line {line!r} should start 'frame {i}:'"
            frames.append(bytes.fromhex(hexes))
        vectors[name] = frames
    return vectors


DOCUMENTED = documented()

#: A vector's section: its name, then the code block of its decoded forms.
FORMS = re.compile(r"### `(\S+)`\n.*?```\n(header: .*?)```", re.S)


def decoded_forms(text: str) -> dict[str, dict[str, Any]]:
    """Each vector's ``header:`` and ``body:`` lines, read as JSON (a number with a decimal
    point is a float, one without an integer: section 18)."""
    forms = {}
    for name, block in FORMS.findall(text):
        lines = dict(line.split(":", 1) for line in block.strip().splitlines() if line.startswith(("header:", "body:")))
        forms[name] = {key: json.loads(value) for key, value in lines.items()}
    return forms


def differences(documented: Any, decoded: Any, path: str = "") -> list[str]:
    """Where ``decoded`` differs from ``documented``, comparing each number's kind as well as
    its value (2 is not 2.0), as section 18 says an implementation must."""
    if isinstance(documented, dict) and isinstance(decoded, dict):
        if documented.keys() != decoded.keys():
            return [f"{path or 'map'}: keys {sorted(documented)} != {sorted(decoded)}"]
        return [d for k in documented for d in differences(documented[k], decoded[k], f"{path}.{k}")]
    if isinstance(documented, list) and isinstance(decoded, list) and len(documented) == len(decoded):
        return [d for i, (a, b) in enumerate(zip(documented, decoded)) for d in differences(a, b, f"{path}[{i}]")]
    if type(documented) is not type(decoded) or documented != decoded:
        return [f"{path}: documented {documented!r} ({type(documented).__name__}), "
                f"decoded {decoded!r} ({type(decoded).__name__})"]
    return []


FORMS_DOCUMENTED = decoded_forms(SPEC.read_text())


def test_every_vector_is_documented_and_every_documented_vector_is_checked() -> None:
    assert set(DOCUMENTED) == set(VECTORS)
    assert len(VECTORS) >= 10


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_encoding_matches_the_spec(name: str) -> None:
    header, body, raw = VECTORS[name]
    assert [bytes(f) for f in Codec().pack(header, body, raw)] == DOCUMENTED[name]


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_decoding_the_spec_gives_the_objects(name: str) -> None:
    header, body, raw = VECTORS[name]
    got_header, got_body, got_raw = Codec().unpack(DOCUMENTED[name])
    assert got_header == header
    assert BodyDecoder(type(body)).decode(got_header.type, got_body) == body
    assert [bytes(f) for f in got_raw] == [bytes(f) for f in raw]
    assert msgspec.msgpack.decode(DOCUMENTED[name][1], type=Header) == header


def test_every_vector_has_its_decoded_forms() -> None:
    assert set(FORMS_DOCUMENTED) == set(VECTORS)


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_the_decoded_forms_are_the_frames_number_kinds_included(name: str) -> None:
    """The JSON shown above each block is frames 1 and 2 decoded, floats as floats."""
    forms, frames = FORMS_DOCUMENTED[name], DOCUMENTED[name]
    assert differences(forms["header"], msgspec.msgpack.decode(frames[1])) == []
    assert differences(forms["body"], msgspec.msgpack.decode(frames[2])) == []
    # and the typed decoding keeps the kind: the vector's objects as builtins
    header, body, _ = VECTORS[name]
    assert differences(forms["body"], msgspec.to_builtins(body)) == []


def test_a_float_field_shown_or_decoded_as_an_integer_fails() -> None:
    """``"factor": 2.0`` is a float64; a spec (or a decoder) that makes it the integer 2 is caught."""
    text = SPEC.read_text()
    assert '"factor": 2.0' in text
    wrong = decoded_forms(text.replace('"factor": 2.0', '"factor": 2'))["request_tensor"]
    frames = DOCUMENTED["request_tensor"]
    assert differences(wrong["body"], msgspec.msgpack.decode(frames[2])) == [
        ".factor: documented 2 (int), decoded 2.0 (float)"]
    as_int = msgspec.msgpack.decode(frames[2])
    as_int["factor"] = 2
    assert differences(FORMS_DOCUMENTED["request_tensor"]["body"], as_int) == [
        ".factor: documented 2.0 (float), decoded 2 (int)"]
    header, body, raw = VECTORS["request_tensor"]
    assert Codec().pack(header, msgspec.structs.replace(body, factor=2), raw)[2] != frames[2]
