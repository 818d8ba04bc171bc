"""The byte-exact test vectors in protocols/PROTOCOL.md match our encoder and decoder."""

from __future__ import annotations

import re
from pathlib import Path

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
