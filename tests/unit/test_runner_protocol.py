"""Pins runner/PROTOCOL.md (version 1): golden bytes, round trips, rejection rules."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tlimage.executor import protocol as P

text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=40)
texts = st.lists(text, max_size=6).map(tuple)


def test_version_is_one():
    assert P.PROTOCOL_VERSION == 1


def test_run_frame_golden_bytes_match_the_spec_example():
    frame = P.encode_run(P.RunRequestMsg(("true",), ("PATH=/bin",), "root", "/", False))
    wire = P.encode_frame(frame)
    expected = bytes.fromhex(
        "82 00 0000 0000002b"
        "00000001 00000004 74727565"
        "00000001 00000009 504154483d2f62696e"
        "00000004 726f6f74"
        "00000001 2f"
        "00".replace(" ", "")
    )
    assert wire == expected


def test_hello_golden_bytes():
    wire = P.encode_frame(P.encode_hello())
    assert wire == bytes.fromhex("01000000 0000000e 0001 00000008") + b"tl-agent"


@given(texts.filter(bool), texts, text, text, st.booleans())
def test_run_round_trip(argv, env, user, workdir, network):
    msg = P.RunRequestMsg(argv, env, user, workdir, network)
    frames, rest = P.decode_frames(P.encode_frame(P.encode_run(msg)))
    assert rest == b"" and len(frames) == 1
    assert P.decode_run(frames[0]) == msg


@given(texts.filter(bool), text, text, text)
def test_mount_round_trip(lowers, upper, work, target):
    m = P.MountRequest(lowers, upper, work, target)
    assert P.decode_mount(P.encode_mount(m)) == m


@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
def test_exit_round_trip(code, sig):
    assert P.decode_exit(P.encode_exit(P.Exit(code, sig))) == P.Exit(code, sig)


@given(texts, st.lists(st.tuples(text, text, st.binary(max_size=20)), max_size=5).map(tuple))
def test_export_end_round_trip(opaque, xattrs):
    e = P.ExportEnd(opaque, xattrs)
    assert P.decode_export_end(P.encode_export_end(e)) == e


@given(st.lists(st.tuples(st.sampled_from(list(P.FrameType)), st.binary(max_size=64)),
                max_size=8), st.integers(0, 200))
def test_decode_frames_handles_any_split(frames, cut):
    wire = b"".join(P.encode_frame(P.Frame(t, p)) for t, p in frames)
    cut = min(cut, len(wire))
    first, rest = P.decode_frames(wire[:cut])
    second, rest2 = P.decode_frames(rest + wire[cut:])
    assert rest2 == b""
    assert [(f.type, f.payload) for f in first + second] == frames


def test_version_mismatch_is_rejected():
    with pytest.raises(P.ProtocolError, match="version 2; this host speaks 1") as e:
        P.decode_hello(P.encode_hello(version=2))
    assert "stale" in (e.value.hint or "")


def test_first_frame_must_be_hello():
    with pytest.raises(P.ProtocolError, match="expected HELLO"):
        P.decode_hello(P.Frame(P.FrameType.OK))


@pytest.mark.parametrize(
    "header, match",
    [
        (struct.pack(">BBHI", 0x7F, 0, 0, 0), "unknown frame type 0x7f"),
        (struct.pack(">BBHI", 0x02, 1, 0, 0), "reserved"),
        (struct.pack(">BBHI", 0x02, 0, 0, P.MAX_PAYLOAD + 1), "exceeds"),
    ],
)
def test_bad_headers_are_rejected(header, match):
    with pytest.raises(P.ProtocolError, match=match):
        P.decode_header(header)


def test_trailing_and_truncated_payloads_are_rejected():
    good = P.encode_exit(P.Exit(1, 0))
    with pytest.raises(P.ProtocolError, match="trailing"):
        P.decode_exit(P.Frame(P.FrameType.EXIT, good.payload + b"x"))
    with pytest.raises(P.ProtocolError, match="truncated"):
        P.decode_exit(P.Frame(P.FrameType.EXIT, good.payload[:5]))


def test_nul_in_strings_is_refused_on_encode():
    with pytest.raises(P.ProtocolError, match="NUL"):
        P.encode_run(P.RunRequestMsg(("a\0b",), (), "root", "/", False))


def test_oversized_frame_is_refused_on_encode():
    with pytest.raises(P.ProtocolError, match="exceeds"):
        P.encode_frame(P.Frame(P.FrameType.TAR, b"x" * (P.MAX_PAYLOAD + 1)))
