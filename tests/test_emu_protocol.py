"""The emulator protocol's packed fast paths give exactly what the general codec gives.

The node kernel decodes a request whose arguments all have a fixed size with one unpack, and
the client and kernel pack the common requests and replies in one step; these tests hold them
to the general tagged-value codec: the same bytes on the wire and the same verdict (arguments,
EDVSINVAL) for every operation, for valid requests and for mutated ones.
"""

from __future__ import annotations

import random
import struct

import pytest

from dvk_cffi.emu import protocol as P
from dvk_cffi.wire import HEADER_SIZE, MESSAGE_SIZE

EDGE_INTS = [0, 1, -1, 0x7FFFFFFF, 0x80000000, -0x80000000, -0x80000001, 0xFFFFFFFF,
             1 << 32, -(1 << 63), (1 << 63) - 1]


def _general(body: bytes):
    """The verdict of the general path: (op, args, match) or the exception type."""
    try:
        op, args = P.decode_request(body)
    except P.ProtocolError as exc:
        return type(exc)
    return op, list(args), P.args_match(op, args)


def _fast(body: bytes, pos: int = 0):
    try:
        op, args, ok = P.decode_checked(body, pos)
    except P.ProtocolError as exc:
        return type(exc)
    return op, list(args), ok


def _value(rng: random.Random, kind: str):
    if kind in "iu":
        return rng.choice(EDGE_INTS + [rng.randrange(-300, 300)])
    if kind == "m":
        return rng.randbytes(MESSAGE_SIZE)
    if kind == "h":
        return rng.randbytes(HEADER_SIZE)
    return rng.choice([None, b"", rng.randbytes(rng.randrange(0, 40))])


def _mutations(rng: random.Random, body: bytes):
    yield body
    yield body[:-1]
    yield body + b"\0"
    for _ in range(6):
        i = rng.randrange(2, len(body)) if len(body) > 2 else 0
        yield body[:i] + bytes([rng.randrange(256)]) + body[i + 1:]


@pytest.mark.parametrize("op", P.OPS)
def test_decode_checked_agrees_with_the_general_path(op):
    rng = random.Random(op)
    sig = P.SIGNATURES[op]
    for _ in range(60):
        args = [_value(rng, k) for k in sig]
        if rng.random() < 0.2 and sig:           # a value of the wrong type
            args[rng.randrange(len(sig))] = rng.choice([None, 7, b"x" * MESSAGE_SIZE])
        body = struct.pack("<H", P.OP[op]) + P.encode_values(args)
        for mutated in _mutations(rng, body):
            assert _fast(mutated) == _general(mutated), (op, mutated)
            assert _fast(b"\xaa" * 4 + mutated, 4) == _general(mutated)


def test_decode_checked_short_and_unknown():
    assert _fast(b"") is P.ProtocolError
    assert _fast(b"\x01") is P.ProtocolError
    assert _fast(struct.pack("<H", len(P.OPS))) is P.UnknownOperation
    assert _fast(struct.pack("<H", 60000) + b"i" + bytes(8)) is P.UnknownOperation


def test_decode_checked_fast_layout_answers_valid_message_calls():
    msg = bytes(range(MESSAGE_SIZE))
    body = P.encode_imi(P.OP["SENDREC"], 10, msg, -1)[4:]
    assert P.decode_checked(body) == ("SENDREC", (10, msg, -1), True)
    body = P.encode_imi(P.OP["SEND"], 1 << 31, msg, 0)[4:]        # endpoint out of range
    assert P.decode_checked(body)[2] is False
    body = P.encode_request("GET2RMT", [-1, 0])[4:]                # negative address
    assert P.decode_checked(body)[2] is False


@pytest.mark.parametrize("a,b", [(0, 0), (10, -1), (-(1 << 63), (1 << 63) - 1), (1 << 40, 5)])
def test_packed_requests_are_the_general_encoding(a, b):
    msg = bytes(range(MESSAGE_SIZE))
    for op in ("SEND", "SENDREC", "REPLY"):
        assert P.encode_imi(P.OP[op], a, msg, b) == P.encode_request(op, [a, msg, b])
    assert P.encode_ii(P.OP["RECEIVE"], a, b) == P.encode_request("RECEIVE", [a, b])
    assert P.encode_i(P.OP["RCVRQST"], a) == P.encode_request("RCVRQST", [a])
    assert P.encode_ii(P.OP["GET2RMT"], a, b) == P.encode_request("GET2RMT", [a, b])
    hdr = bytes(range(HEADER_SIZE))
    assert P.encode_hu(P.OP["PUT2LCL"], hdr, a) == P.encode_request("PUT2LCL", [hdr, a])


def _general_reply(rc: int, values: list) -> bytes:
    out = bytearray(struct.pack("<Ii", 0, rc)) + P.encode_values(values)
    struct.pack_into("<I", out, 0, len(out) - 4)
    return bytes(out)


REPLIES = [
    (0, []), (-305, []), (0, [7]), (0, [-(1 << 63)]), (-1, [(1 << 63) - 1]),
    (0, [0, bytes(range(MESSAGE_SIZE))]), (0, [3, b"x" * (MESSAGE_SIZE - 1)]),
    (0, [3, b"x" * HEADER_SIZE, 2]), (0, [0, bytes(HEADER_SIZE), -(1 << 63)]),
    (0, [0, b"x" * (HEADER_SIZE + 1), 2]), (0, [0, bytes(HEADER_SIZE), None]),
    (0, [None]), (0, [b"text"]), (0, [1, 2]),
    (0, (5, bytes(MESSAGE_SIZE))),
]


@pytest.mark.parametrize("rc,values", REPLIES)
def test_reply_fast_paths_are_the_general_codec(rc, values):
    frame = P.encode_reply(rc, values)
    assert frame == _general_reply(rc, list(values))
    assert P.decode_reply(frame[4:]) == (rc, list(values))
    assert P.decode_values(frame, 8) == list(values)


def test_decode_reply_rejects_bad_bodies_like_the_general_path():
    good = P.encode_reply(0, [1, bytes(MESSAGE_SIZE)])[4:]
    bad_len = good[:14] + struct.pack("<I", MESSAGE_SIZE + 1) + good[18:]  # past the end
    with pytest.raises(P.ProtocolError):
        P.decode_reply(bad_len)
    with pytest.raises(P.ProtocolError):
        P.decode_reply(b"\0\0")
    odd_tag = P.encode_reply(0, [1])[4:]
    odd_tag = odd_tag[:4] + b"z" + odd_tag[5:]
    with pytest.raises(P.ProtocolError):
        P.decode_reply(odd_tag)
