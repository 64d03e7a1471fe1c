"""Subject handles: deterministic, opaque, reversible only under the key."""

from __future__ import annotations

import re

import pytest

from veilface.client.handles import HandleCodec
from veilface.errors import InvalidArgument


@pytest.fixture()
def codec() -> HandleCodec:
    return HandleCodec(HandleCodec.new_key())


@pytest.mark.parametrize(
    "subject", ["alice", "Zoë Ñúñez", "x", "e" * 256, "id\x00with nul", "🙂" * 64]
)
def test_round_trip(codec: HandleCodec, subject: str) -> None:
    handle = codec.encode(subject)
    assert re.fullmatch(r"[A-Za-z0-9_-]+", handle)
    assert codec.decode(handle) == subject


def test_deterministic_and_distinct(codec: HandleCodec) -> None:
    assert codec.encode("alice") == codec.encode("alice")
    assert codec.encode("alice") != codec.encode("alicf")
    other = HandleCodec(HandleCodec.new_key())
    assert other.encode("alice") != codec.encode("alice")


def test_length_is_padded(codec: HandleCodec) -> None:
    assert len({len(codec.encode("a" * n)) for n in range(1, 32)}) == 1
    assert "alice" not in codec.encode("alice")


def test_wrong_key(codec: HandleCodec) -> None:
    other = HandleCodec(HandleCodec.new_key())
    with pytest.raises(InvalidArgument, match="another key"):
        other.decode(codec.encode("alice"))


@pytest.mark.parametrize("garbage", ["", "a", "!!!!", "abc=", "AAAA" * 12, "é" * 64])
def test_garbage(codec: HandleCodec, garbage: str) -> None:
    with pytest.raises(InvalidArgument):
        codec.decode(garbage)


def test_tampered(codec: HandleCodec) -> None:
    handle = codec.encode("alice")
    swapped = ("B" if handle[5] != "B" else "C").join([handle[:5], handle[6:]])
    with pytest.raises(InvalidArgument):
        codec.decode(swapped)
    with pytest.raises(InvalidArgument):
        codec.decode(handle[:-4])


def test_non_canonical_alias_rejected(codec: HandleCodec) -> None:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    handle = codec.encode("a" * 32)  # 80 bytes: the last character has 2 spare bits
    alias = handle[:-1] + alphabet[alphabet.index(handle[-1]) ^ 1]
    with pytest.raises(InvalidArgument):
        codec.decode(alias)
    with pytest.raises(InvalidArgument):
        codec.decode(handle + "=")


@pytest.mark.parametrize("subject", ["", "e" * 257, "\ud800"])
def test_bad_subject_ids(codec: HandleCodec, subject: str) -> None:
    with pytest.raises(InvalidArgument):
        codec.encode(subject)


def test_bad_key() -> None:
    with pytest.raises(InvalidArgument, match="64 bytes"):
        HandleCodec(b"\x00" * 32)
    assert "key" in repr(HandleCodec(HandleCodec.new_key()))
    assert len(HandleCodec.new_key()) == 64
