"""The emulated node kernel's socket protocol, version 1 (documented in docs/emulator.md).

Transport: a Unix stream socket per node (`<rundir>/node<N>.sock`); every client thread opens
its own connection, so the kernel knows the caller by its TID as the real module knows `current`.

Framing, both directions: `u32 length` (little-endian, bytes that follow) then the body.
- request body:  `u16 op`, then the arguments;
- reply body:    `i32 status` (0 success, < 0 the EDVS code of the failure), then the results;
  on success the first result is the call's return value (which may itself be negative, e.g. a
  task endpoint returned by bind).
Arguments and results are a sequence of tagged values: `b'i'` + i64, `b'b'` + u32 length + bytes,
`b'n'` (None).  The first request of a connection is HELLO(version, pid, tid, comm); ARENA
carries a memfd in SCM_RIGHTS ancillary data.
"""

from __future__ import annotations

import operator
import select
import socket
import struct
from collections.abc import Callable, Sequence

from ..wire import HEADER_SIZE, MESSAGE_SIZE

VERSION = 1

_LEN = struct.Struct("<I")
_OP = struct.Struct("<H")
_RC = struct.Struct("<i")
_INT = struct.Struct("<q")
_HEAD = struct.Struct("<IH")        # frame length, then a request's op
_REPLY_HEAD = struct.Struct("<Ii")  # frame length, then a reply's status
_TAG_INT = struct.Struct("<Bq")
_TAG_LEN = struct.Struct("<BI")
_T_INT, _T_BYTES, _T_NONE = b"i"[0], b"b"[0], b"n"[0]

# Operations: the DVK calls by their C names, plus the emulator's own.
OPS = [
    "HELLO", "ARENA", "PROCFS", "SHUTDOWN",
    "DVS_INIT", "DVS_END", "GETDVSINFO", "DC_INIT", "DC_END", "GETDCINFO", "GETNODEINFO",
    "GETPROCINFO", "GETPROXYINFO", "ADD_NODE", "DEL_NODE", "PROXIES_BIND", "PROXIES_UNBIND",
    "NODE_UP", "NODE_DOWN", "PROXY_CONN", "BIND", "UNBIND", "WAIT4BIND", "GETEP", "MIGRATE",
    "SEND", "RECEIVE", "SENDREC", "RCVRQST", "REPLY", "NOTIFY", "VCOPY", "RELAY", "WAKEUP",
    "GETPRIV", "SETPRIV", "GET2RMT", "PUT2LCL",
]
OP = {name: i for i, name in enumerate(OPS)}

#: The arguments each operation takes, one letter per value: `i` a C int (32-bit signed),
#: `u` an address or size (32-bit unsigned), `b` bytes, `B` bytes or None, `m` a message
#: (MESSAGE_SIZE bytes), `h` a cmd_t header (HEADER_SIZE bytes).  The node kernel answers a
#: request that does not match with EDVSINVAL before any kernel code runs.
SIGNATURES = {
    "HELLO": "iiiB", "ARENA": "u", "PROCFS": "b", "SHUTDOWN": "",
    "DVS_INIT": "iB", "DVS_END": "", "GETDVSINFO": "", "DC_INIT": "b", "DC_END": "i",
    "GETDCINFO": "i", "GETNODEINFO": "i", "GETPROCINFO": "ii", "GETPROXYINFO": "i",
    "ADD_NODE": "ii", "DEL_NODE": "ii", "PROXIES_BIND": "biiii", "PROXIES_UNBIND": "i",
    "NODE_UP": "bii", "NODE_DOWN": "i", "PROXY_CONN": "ii", "BIND": "iiiiiB",
    "UNBIND": "iii", "WAIT4BIND": "iii", "GETEP": "i", "MIGRATE": "iiiii",
    "SEND": "imi", "RECEIVE": "ii", "SENDREC": "imi", "RCVRQST": "i", "REPLY": "imi",
    "NOTIFY": "iii", "VCOPY": "iuiui", "RELAY": "im", "WAKEUP": "ii", "GETPRIV": "ii",
    "SETPRIV": "iib", "GET2RMT": "ui", "PUT2LCL": "hu",
}
assert set(SIGNATURES) == set(OPS)

_INT32 = range(-(1 << 31), 1 << 31)
_UINT32 = range(0, 1 << 32)

Value = int | bytes | None


class ProtocolError(Exception):
    """The peer sent something that is not protocol version 1."""


class UnknownOperation(ProtocolError):
    """A well-framed request with an operation number this version does not have."""


_TYPE_OF_KIND = {"i": int, "u": int, "b": bytes, "B": bytes, "m": bytes, "h": bytes}
#: Per operation: the argument types of a request that passes without a closer look, and the
#: (index, kind) of the arguments whose range or length is to be checked.
_FAST = {
    op: (tuple(_TYPE_OF_KIND[k] for k in sig),
         tuple((i, k) for i, k in enumerate(sig) if k in "iumh"))
    for op, sig in SIGNATURES.items()
}


#: The tagged layout of one argument of a fixed size: tag, then the value (or its length and
#: the bytes).  An operation whose arguments all have one is decoded by a single unpack.
_FIXED_FMT = {"i": "Bq", "u": "Bq", "m": f"BI{MESSAGE_SIZE}s", "h": f"BI{HEADER_SIZE}s"}
_FIXED_TAGS = {"i": (_T_INT,), "u": (_T_INT,), "m": (_T_BYTES, MESSAGE_SIZE),
               "h": (_T_BYTES, HEADER_SIZE)}


def _picker(idx: Sequence[int]) -> Callable[[tuple], tuple]:
    """A function that takes the items at `idx` of a tuple, as a tuple."""
    if len(idx) > 1:
        return operator.itemgetter(*idx)
    if idx:
        i = idx[0]
        return lambda vals: (vals[i],)
    return lambda vals: ()


def _fixed_layout(sig: str) -> tuple | None:
    """(layout with the op in front, tags picker, expected tags and lengths, values picker,
    indexes of C ints, indexes of unsigned values) of a signature of fixed-size arguments."""
    if any(k not in _FIXED_FMT for k in sig):
        return None
    fmt, tag_at, expected, value_at, int_at, uint_at = "<H", [], [], [], [], []
    pos = 1
    for kind in sig:
        fmt += _FIXED_FMT[kind]
        tags = _FIXED_TAGS[kind]
        tag_at += range(pos, pos + len(tags))
        expected += tags
        pos += len(tags)
        value_at.append(pos)
        (int_at if kind == "i" else uint_at if kind == "u" else []).append(pos)
        pos += 1
    return (struct.Struct(fmt), _picker(tag_at), tuple(expected), _picker(value_at),
            tuple(int_at), tuple(uint_at))


_FIXED = [_fixed_layout(SIGNATURES[op]) for op in OPS]
#: Replies of one integer, and of an integer and a message (send, sendrec, receive, ...).
_REPLY_INT = struct.Struct("<IiBq")
_REPLY_INT_MSG = struct.Struct(f"<IiBqBI{MESSAGE_SIZE}s")
_INT_BODY = struct.Struct("<iBq")
_INT_MSG_BODY = struct.Struct(f"<iBqBI{MESSAGE_SIZE}s")
#: The reply of get2rmt: status, return value, the header, the queued count.
_REPLY_INT_HDR_INT = struct.Struct(f"<IiBqBI{HEADER_SIZE}sBq")
_INT_HDR_INT_BODY = struct.Struct(f"<iBqBI{HEADER_SIZE}sBq")
#: Requests of the message calls, framed: (ep, message, timeout) and (a, b) and (a).
_REQ_IMI = struct.Struct(f"<IHBqBI{MESSAGE_SIZE}sBq")
_REQ_II = struct.Struct("<IHBqBq")
_REQ_I = struct.Struct("<IHBq")
_REQ_HU = struct.Struct(f"<IHBI{HEADER_SIZE}sBq")


def encode_imi(op: int, a: int, msg: bytes, b: int) -> bytes:
    """The request frame of operation number `op` taking (int, message, int), as
    `encode_request` builds it; `msg` must be MESSAGE_SIZE bytes."""
    return _REQ_IMI.pack(_REQ_IMI.size - 4, op, _T_INT, a, _T_BYTES, MESSAGE_SIZE, msg,
                         _T_INT, b)


def encode_ii(op: int, a: int, b: int) -> bytes:
    """The request frame of operation number `op` taking two integers."""
    return _REQ_II.pack(_REQ_II.size - 4, op, _T_INT, a, _T_INT, b)


def encode_hu(op: int, hdr: bytes, a: int) -> bytes:
    """The request frame of operation number `op` taking (header, address); `hdr` must be
    HEADER_SIZE bytes."""
    return _REQ_HU.pack(_REQ_HU.size - 4, op, _T_BYTES, HEADER_SIZE, hdr, _T_INT, a)


def encode_i(op: int, a: int) -> bytes:
    """The request frame of operation number `op` taking one integer."""
    return _REQ_I.pack(_REQ_I.size - 4, op, _T_INT, a)


def args_match(op: str, args: Sequence[Value]) -> bool:
    """Whether `args` are what `op` takes (count, types, integer ranges, fixed lengths)."""
    types, checks = _FAST[op]
    if tuple(map(type, args)) != types:
        return _args_match_slow(op, args)
    for i, kind in checks:
        v = args[i]
        if kind == "i":
            if not -0x80000000 <= v <= 0x7FFFFFFF:
                return False
        elif kind == "u":
            if not 0 <= v <= 0xFFFFFFFF:
                return False
        elif len(v) != (MESSAGE_SIZE if kind == "m" else HEADER_SIZE):
            return False
    return True


def _args_match_slow(op: str, args: Sequence[Value]) -> bool:
    sig = SIGNATURES[op]
    if len(args) != len(sig):
        return False
    for kind, v in zip(sig, args):
        if kind == "i":
            ok = type(v) is int and v in _INT32
        elif kind == "u":
            ok = type(v) is int and v in _UINT32
        elif kind == "B":
            ok = v is None or type(v) is bytes
        elif kind == "m":
            ok = type(v) is bytes and len(v) == MESSAGE_SIZE
        elif kind == "h":
            ok = type(v) is bytes and len(v) == HEADER_SIZE
        else:
            ok = type(v) is bytes
        if not ok:
            return False
    return True


def _encode_into(out: bytearray, values: Sequence[Value]) -> None:
    for v in values:
        t = type(v)
        if t is int:
            out += _TAG_INT.pack(_T_INT, v)
        elif t is bytes:
            out += _TAG_LEN.pack(_T_BYTES, len(v))
            out += v
        elif v is None:
            out += b"n"
        elif isinstance(v, int):
            out += _TAG_INT.pack(_T_INT, int(v))
        elif isinstance(v, (bytearray, memoryview)):
            out += _TAG_LEN.pack(_T_BYTES, len(v))
            out += v
        elif isinstance(v, str):
            raw = v.encode()
            out += _TAG_LEN.pack(_T_BYTES, len(raw))
            out += raw
        else:
            raise TypeError(f"cannot encode {type(v).__name__}")


def encode_values(values: Sequence[Value]) -> bytes:
    out = bytearray()
    _encode_into(out, values)
    return bytes(out)


def decode_values(body: bytes | memoryview, pos: int) -> list[Value]:
    values: list[Value] = []
    append = values.append
    end = len(body)
    while pos < end:
        tag = body[pos]
        pos += 1
        if tag == _T_INT:
            if pos + 8 > end:
                raise ProtocolError("truncated integer value")
            append(_INT.unpack_from(body, pos)[0])
            pos += 8
        elif tag == _T_BYTES:
            if pos + 4 > end:
                raise ProtocolError("truncated bytes length")
            (n,) = _LEN.unpack_from(body, pos)
            pos += 4
            if pos + n > end:
                raise ProtocolError("truncated bytes value")
            append(bytes(body[pos:pos + n]))
            pos += n
        elif tag == _T_NONE:
            append(None)
        else:
            raise ProtocolError(f"bad value tag {bytes([tag])!r}")
    return values


def encode_request(op: str, values: Sequence[Value]) -> bytes:
    out = bytearray(_HEAD.pack(0, OP[op]))
    _encode_into(out, values)
    _LEN.pack_into(out, 0, len(out) - 4)
    return bytes(out)


def decode_request(body: bytes) -> tuple[str, list[Value]]:
    if len(body) < 2:
        raise ProtocolError("short request")
    (op,) = _OP.unpack_from(body, 0)
    if op >= len(OPS):
        raise UnknownOperation(f"unknown operation {op}")
    return OPS[op], decode_values(body, 2)


def decode_checked(body: bytes | memoryview, pos: int = 0) -> tuple[str, Sequence[Value], bool]:
    """`decode_request` and `args_match` in one step, for the body at `pos` of `body`: the
    operation, its arguments and whether they are what it takes.  A request whose arguments
    are all integers or fixed-size bytes is checked with one unpack of its whole layout; any
    other (or one that does not match that layout) takes the general path, so the verdict is
    always `args_match`'s."""
    if len(body) - pos < 2:
        raise ProtocolError("short request")
    (op,) = _OP.unpack_from(body, pos)
    fixed = _FIXED[op] if op < len(_FIXED) else None
    if fixed is not None and len(body) - pos == fixed[0].size:
        layout, tags, expected, values, int_at, uint_at = fixed
        vals = layout.unpack_from(body, pos)
        if tags(vals) == expected:
            for i in int_at:
                if not -0x80000000 <= vals[i] <= 0x7FFFFFFF:
                    return OPS[op], values(vals), False
            for i in uint_at:
                if not 0 <= vals[i] <= 0xFFFFFFFF:
                    return OPS[op], values(vals), False
            return OPS[op], values(vals), True
    if op >= len(OPS):
        raise UnknownOperation(f"unknown operation {op}")
    name = OPS[op]
    args = decode_values(body, pos + 2)
    return name, args, args_match(name, args)


def encode_reply(rc: int, values: Sequence[Value] = ()) -> bytes:
    n = len(values)
    if n == 0:
        return _REPLY_HEAD.pack(4, rc)
    first = values[0]
    if type(first) is int:
        if n == 1:
            return _REPLY_INT.pack(_REPLY_INT.size - 4, rc, _T_INT, first)
        second = values[1]
        if n == 2 and type(second) is bytes and len(second) == MESSAGE_SIZE:
            return _REPLY_INT_MSG.pack(_REPLY_INT_MSG.size - 4, rc, _T_INT, first,
                                       _T_BYTES, MESSAGE_SIZE, second)
        if n == 3 and type(second) is bytes and len(second) == HEADER_SIZE \
                and type(values[2]) is int:
            return _REPLY_INT_HDR_INT.pack(_REPLY_INT_HDR_INT.size - 4, rc, _T_INT, first,
                                           _T_BYTES, HEADER_SIZE, second, _T_INT, values[2])
    out = bytearray(_REPLY_HEAD.pack(0, rc))
    _encode_into(out, values)
    _LEN.pack_into(out, 0, len(out) - 4)
    return bytes(out)


def decode_reply(body: bytes) -> tuple[int, list[Value]]:
    n = len(body)
    if n == _INT_MSG_BODY.size and body[4] == _T_INT and body[13] == _T_BYTES:
        rc, _t, value, _t2, size, msg = _INT_MSG_BODY.unpack(body)
        if size == MESSAGE_SIZE:
            return rc, [value, msg]
    elif n == _INT_BODY.size and body[4] == _T_INT:
        rc, _t, value = _INT_BODY.unpack(body)
        return rc, [value]
    elif n == _INT_HDR_INT_BODY.size and body[4] == _T_INT and body[13] == _T_BYTES \
            and body[18 + HEADER_SIZE] == _T_INT:
        rc, _t, value, _t2, size, hdr, _t3, more = _INT_HDR_INT_BODY.unpack(body)
        if size == HEADER_SIZE:
            return rc, [value, hdr, more]
    if n < 4:
        raise ProtocolError("short reply")
    return _RC.unpack_from(body, 0)[0], decode_values(body, 4)


def _header_offset(layout: struct.Struct) -> int:
    """Where the cmd_t header of a fixed layout starts."""
    fmt = layout.format
    return struct.calcsize(fmt[:fmt.index(f"{HEADER_SIZE}s")])


def _fixed(a: bytes, b: bytes) -> list[tuple[int, int]]:
    """The (offset, byte) pairs where two encodings of different values agree."""
    return [(i, x) for i, (x, y) in enumerate(zip(a, b)) if x == y]


# For readers and writers of these frames outside Python (the DSP's compiled sender and
# deliverer), so that the layouts have one source: this module's.
def get2rmt_reply_layout() -> tuple[int, int, list[tuple[int, int]]]:
    """Where a successful GET2RMT reply (status 0; a value, the command's header and the
    hint of how many more wait) holds the header, as `encode_reply` makes it: (body length,
    offset of the header, the (offset, byte) pairs every such body has: the status, the
    values' tags, the header's length)."""
    zero = encode_reply(0, [0, bytes(HEADER_SIZE), 0])[4:]
    ones = encode_reply(0, [-1, b"\xff" * HEADER_SIZE, -1])[4:]
    return len(zero), _header_offset(_INT_HDR_INT_BODY), _fixed(zero, ones)


def put2lcl_layout(addr: int) -> tuple[bytes, int, int, int, list[tuple[int, int]]]:
    """A PUT2LCL request for payload address `addr` with a zeroed header and where its header
    goes, and where a reply with status 0 and one value holds it: (request, offset of the
    header in it, reply body length, offset of the value, the reply's fixed bytes)."""
    request = encode_hu(OP["PUT2LCL"], bytes(HEADER_SIZE), addr)
    zero, ones = encode_reply(0, [0])[4:], encode_reply(0, [-1])[4:]
    return request, _header_offset(_REQ_HU), len(zero), len(zero) - _INT.size, _fixed(zero, ones)


def wait_readable(sock: socket.socket) -> None:
    """Wait in poll until `sock` has something to read.  A caller waiting for the answer to
    what it sent waits here rather than in a blocking recv: Linux wakes every task blocked in
    recv on a Unix stream socket each time the peer reads what was sent on it (the write-space
    wake-up), which would cost each call a wake-up for nothing; poll's wait answers only the
    readiness it asked for.  (A socket with a timeout already polls before its recv.)"""
    fd = sock.fileno()
    if fd < 0:
        return      # closed (by another thread): the recv that follows fails as it always did
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    poller.poll()


def recv_frame(sock: socket.socket, fds: list[int] | None = None) -> bytes | None:
    """One frame body from a peer that sends one frame and then waits (a reply, or a request
    of a client): read with as few calls as it takes, usually one (after `wait_readable` on a
    socket without a timeout).  File descriptors sent along with it are appended to `fds`.
    None on EOF before the first byte."""
    if sock.gettimeout() is None:
        wait_readable(sock)
    if fds is None:
        data = sock.recv(65536)
    else:
        data, got, _flags, _addr = socket.recv_fds(sock, 65536, 16)
        fds.extend(got)
    if not data:
        return None
    while len(data) < 4:
        more = sock.recv(65536)
        if not more:
            raise ProtocolError("connection closed inside a frame")
        data += more
    (n,) = _LEN.unpack_from(data, 0)
    if n > (64 << 20):
        raise ProtocolError(f"frame of {n} bytes")
    if len(data) < 4 + n:
        buf = bytearray(data)
        while len(buf) < 4 + n:
            more = sock.recv(4 + n - len(buf))
            if not more:
                raise ProtocolError("connection closed inside a frame")
            buf += more
        data = bytes(buf)
    if len(data) != 4 + n:
        raise ProtocolError("bytes after the frame")
    return data[4:]
