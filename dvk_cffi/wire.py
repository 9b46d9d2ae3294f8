"""The i386 `cmd_t` / `message` layout: the DVS wire header and the emulator's ABI.

A frame on the wire is a 120-byte little-endian `cmd_t` (docs/design.md, "The wire") followed by
`c_len` payload bytes.  `Header` and `Message` are views over bytearrays in that layout with
named fields, so the proxy can read and rewrite a few fields without decoding the whole struct.
Batches carry `c_batch_nr` further headers as the payload (`pack_batch` / `unpack_batch`).
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterable, Iterator
from typing import ClassVar

from . import consts as C

HEADER_SIZE = 120
MESSAGE_SIZE = 36
VCOPY_SIZE = 24
MSG_OFFSET = 60
VCOPY_OFFSET = 96

# The i386 message: m_source, m_type, then a 28-byte union.  Field -> (offset, struct fmt).
# Pointers and longs are 32-bit values here.
I386_MESSAGE_FIELDS: dict[str, tuple[int, str]] = {
    "m_source": (0, "i"), "m_type": (4, "i"),
    "m1_i1": (8, "i"), "m1_i2": (12, "i"), "m1_i3": (16, "i"),
    "m1_p1": (20, "I"), "m1_p2": (24, "I"), "m1_p3": (28, "I"),
    "m2_i1": (8, "i"), "m2_i2": (12, "i"), "m2_i3": (16, "i"),
    "m2_l1": (20, "i"), "m2_l2": (24, "i"), "m2_p1": (28, "I"),
    "m3_i1": (8, "i"), "m3_i2": (12, "i"), "m3_p1": (16, "I"), "m3_ca1": (20, "14s"),
    "m4_l1": (8, "i"), "m4_l2": (12, "i"), "m4_l3": (16, "i"), "m4_l4": (20, "i"),
    "m4_l5": (24, "i"),
    "m5_c1": (8, "h"), "m5_c2": (10, "h"), "m5_i1": (12, "i"), "m5_i2": (16, "i"),
    "m5_l1": (20, "i"), "m5_l2": (24, "i"), "m5_l3": (28, "i"),
    "m6_ca1": (8, "28s"),
    "m7_i1": (8, "i"), "m7_i2": (12, "i"), "m7_i3": (16, "i"), "m7_i4": (20, "i"),
    "m7_p1": (24, "I"), "m7_p2": (28, "I"),
    "m8_i1": (8, "i"), "m8_i2": (12, "i"), "m8_p1": (16, "I"), "m8_p2": (20, "I"),
    "m8_p3": (24, "I"), "m8_p4": (28, "I"),
    "m9_i1": (8, "i"), "m9_l1": (12, "i"), "m9_t1_sec": (16, "i"), "m9_t1_nsec": (20, "i"),
    "mA_dst": (8, "i"), "mA_nr": (12, "i"), "mA_ia": (16, "4i"),
    "mB_nr": (8, "i"), "mB_md5": (12, "16s"),
    "mC_i1": (8, "i"), "mC_i2": (12, "i"), "mC_i3": (16, "i"), "mC_i4": (20, "i"),
    "mC_ca1": (24, "10s"),
}

# Header fields: name -> (offset, fmt), the i386 layout.
HEADER_FIELDS: dict[str, tuple[int, str]] = {
    "c_cmd": (0, "i"), "c_dcid": (4, "i"), "c_src": (8, "i"), "c_dst": (12, "i"),
    "c_snode": (16, "i"), "c_dnode": (20, "i"), "c_rcode": (24, "i"), "c_len": (28, "i"),
    "c_pid": (32, "i"), "c_batch_nr": (36, "i"), "c_flags": (40, "I"), "c_snd_seq": (44, "I"),
    "c_ack_seq": (48, "I"), "c_tv_sec": (52, "i"), "c_tv_nsec": (56, "i"),
    "v_src": (96, "i"), "v_dst": (100, "i"), "v_rqtr": (104, "i"), "v_saddr": (108, "I"),
    "v_daddr": (112, "I"), "v_bytes": (116, "i"),
}

#: The fixed-position integer fields of the header in one struct (the message is raw bytes).
HEADER_STRUCT = struct.Struct("<10i3I2i36s3i2Ii")
assert HEADER_STRUCT.size == HEADER_SIZE
#: The first 11 fields, enough for routing decisions: c_cmd .. c_flags.
ROUTE_STRUCT = struct.Struct("<10iI")
#: Indices of the fields in a ROUTE_STRUCT tuple.
(R_CMD, R_DCID, R_SRC, R_DST, R_SNODE, R_DNODE, R_RCODE, R_LEN, R_PID, R_BATCH_NR,
 R_FLAGS) = range(11)


def _field_property(offset: int, fmt: str) -> property:
    """A property reading/writing one little-endian scalar at `offset` of `self.buf`."""
    st = struct.Struct("<" + fmt)

    def getter(self):
        return st.unpack_from(self.buf, offset)[0]

    def setter(self, value):
        st.pack_into(self.buf, offset, value)
    return property(getter, setter)


class Message:
    """A DVS `message` in the i386 layout (36 bytes), viewed over `buf` at offset `base`.

    Field names are the C accessor macros (`m1_i1`, `m1_p1`, `m3_ca1`, ...).
    """

    SIZE: ClassVar[int] = MESSAGE_SIZE
    FIELDS: ClassVar[dict[str, tuple[int, str]]] = I386_MESSAGE_FIELDS
    __slots__ = ("buf", "base")

    def __init__(self, buf: bytearray | memoryview | None = None, base: int = 0) -> None:
        self.buf = bytearray(self.SIZE) if buf is None else buf
        self.base = base

    def __bytes__(self) -> bytes:
        return bytes(self.buf[self.base:self.base + self.SIZE])

    def load(self, data: bytes) -> None:
        """Overwrite the whole message with `data` (SIZE bytes)."""
        self.buf[self.base:self.base + self.SIZE] = data

    def clear(self) -> None:
        self.load(bytes(self.SIZE))

    def __repr__(self) -> str:
        return (f"Message(source={self.m_source}, type={self.m_type:#x}, m1_i1={self.m1_i1}, "
                f"m1_i2={self.m1_i2}, m1_i3={self.m1_i3}, m1_p1={self.m1_p1:#x}, "
                f"m1_p2={self.m1_p2:#x}, m1_p3={self.m1_p3:#x})")


def install_message_fields(cls: type) -> None:
    """Give `cls` one property per C accessor of `cls.FIELDS`, relative to `self.base`
    (integer arrays as lists); a message class of another layout calls it too."""
    for name, (off, fmt) in cls.FIELDS.items():
        st = struct.Struct("<" + fmt)
        is_array = fmt[0].isdigit() and not fmt.endswith("s")

        def make(off=off, st=st, multi=is_array):
            def getter(self):
                v = st.unpack_from(self.buf, self.base + off)
                return list(v) if multi else v[0]

            def setter(self, value):
                if multi:
                    st.pack_into(self.buf, self.base + off, *value)
                else:
                    st.pack_into(self.buf, self.base + off, value)
            return property(getter, setter)
        setattr(cls, name, make())


install_message_fields(Message)


class Header:
    """A `cmd_t` in the i386 wire layout (120 bytes) over a bytearray, with named fields.

    `c_msg` is the embedded `Message`; `v_*` are the `c_vcopy` fields.
    """

    SIZE: ClassVar[int] = HEADER_SIZE
    __slots__ = ("buf",)

    def __init__(self, buf: bytearray | memoryview | bytes | None = None) -> None:
        if buf is None:
            buf = bytearray(HEADER_SIZE)
        elif isinstance(buf, bytes):
            buf = bytearray(buf)
        if len(buf) != HEADER_SIZE:
            raise ValueError(f"a header is {HEADER_SIZE} bytes, got {len(buf)}")
        self.buf = buf

    @property
    def c_msg(self) -> Message:
        return Message(self.buf, MSG_OFFSET)

    def __bytes__(self) -> bytes:
        return bytes(self.buf)

    def copy(self) -> Header:
        return Header(bytearray(self.buf))

    def load(self, data: bytes) -> None:
        self.buf[:] = data

    def fields(self) -> dict[str, int]:
        """All scalar fields as a dict (for logs and tests)."""
        return {name: getattr(self, name) for name in HEADER_FIELDS}

    def route(self) -> tuple[int, ...]:
        """(c_cmd, c_dcid, c_src, c_dst, c_snode, c_dnode, c_rcode, c_len, c_pid, c_batch_nr,
        c_flags) in one unpack."""
        return ROUTE_STRUCT.unpack_from(self.buf, 0)

    def __repr__(self) -> str:
        cmd = self.c_cmd
        return (f"Header({C.CMD_NAMES.get(cmd, hex(cmd))} dcid={self.c_dcid} src={self.c_src}"
                f"@{self.c_snode} dst={self.c_dst}@{self.c_dnode} rcode={self.c_rcode} "
                f"len={self.c_len} pid={self.c_pid} flags={self.c_flags:#x} "
                f"batch={self.c_batch_nr})")


for _name, (_off, _fmt) in HEADER_FIELDS.items():
    setattr(Header, _name, _field_property(_off, _fmt))


def make_header(**fields: int) -> Header:
    """A zeroed header with the given fields set."""
    h = Header()
    for k, v in fields.items():
        setattr(h, k, v)
    return h


def timestamp() -> tuple[int, int]:
    """The time now as the i386 kernel's `struct timespec` holds it (32-bit fields): past
    January 2038, or with a clock set that far ahead, the seconds wrap as a 32-bit `time_t`
    does instead of making the header or message unwritable."""
    now = time.time()
    return (int(now) + 2**31) % 2**32 - 2**31, int((now % 1) * 1e9)


def hello_header(snode: int, dnode: int, pid: int = 0) -> Header:
    """A clean HELLO (CMD_NONE, no payload) as this project's DSP sends it: the C HELLO's
    fields (c_dcid -1, endpoints NONE, the sender thread's id, the time of sending) plus the
    FLAG_DSP_PEER announcement (docs/design.md, "Liveness")."""
    sec, nsec = timestamp()
    return make_header(c_cmd=C.CMD_NONE, c_dcid=-1, c_src=C.NONE, c_dst=C.NONE,
                       c_snode=snode, c_dnode=dnode, c_pid=pid, c_flags=C.FLAG_DSP_PEER,
                       c_tv_sec=sec, c_tv_nsec=nsec)


def error_ack(h: Header, rcode: int) -> Header | None:
    """The ACK that answers request `h` with error `rcode` (None when nobody waits for one):
    addressed back to the requester, with the vcopy sub-header by which it finds its copy."""
    cmd = C.PROXY_ERROR_ACK.get(h.c_cmd)
    if cmd is None:
        return None
    a = Header()
    a.buf[VCOPY_OFFSET:HEADER_SIZE] = h.buf[VCOPY_OFFSET:HEADER_SIZE]
    a.c_cmd, a.c_dcid, a.c_src, a.c_dst = cmd, h.c_dcid, h.c_dst, h.c_src
    a.c_snode, a.c_dnode, a.c_rcode = h.c_dnode, h.c_snode, rcode
    a.v_bytes = 0
    return a


def pack_batch(headers: Iterable[Header | bytes]) -> bytes:
    """The payload of a batch: the extra headers back to back."""
    return b"".join(bytes(h) for h in headers)


def unpack_batch(payload: bytes | memoryview, count: int) -> Iterator[Header]:
    """The `count` headers of a batch payload; ValueError when the length disagrees."""
    if count * HEADER_SIZE != len(payload):
        raise ValueError(f"batch of {count} headers needs {count * HEADER_SIZE} bytes, "
                         f"payload has {len(payload)}")
    for i in range(count):
        yield Header(bytearray(payload[i * HEADER_SIZE:(i + 1) * HEADER_SIZE]))


def cmd_name(cmd: int) -> str:
    """C name of a command code."""
    return C.CMD_NAMES.get(cmd, f"CMD_{cmd:#x}")


# ------------------------------------------------------------------ raw-header helpers
# The proxy's hot paths rewrite a few fields of a raw 120-byte header without a Header object;
# these helpers are the only place (besides HEADER_FIELDS) that knows their offsets.
_I32 = struct.Struct("<i")
_U32 = struct.Struct("<I")
_V3 = struct.Struct("<3i")
_NODES = struct.Struct("<2i")      # c_snode, c_dnode (adjacent)
_OFF = {name: off for name, (off, _fmt) in HEADER_FIELDS.items()}
_C_SRC, _C_DST, _C_SNODE, _C_DNODE = _OFF["c_src"], _OFF["c_dst"], _OFF["c_snode"], _OFF["c_dnode"]
_C_LEN, _C_BATCH_NR, _C_FLAGS = _OFF["c_len"], _OFF["c_batch_nr"], _OFF["c_flags"]
_M_SOURCE_IN_MSG = I386_MESSAGE_FIELDS["m_source"][0]
_M_SOURCE = MSG_OFFSET + _M_SOURCE_IN_MSG
_V_SRC = _OFF["v_src"]
_ZERO_HEADER = bytes(HEADER_SIZE)
assert _C_DNODE == _C_SNODE + 4

def frame_length(buf, offset: int = 0) -> int:
    """`c_len` of the header at `offset` of `buf`."""
    return _I32.unpack_from(buf, offset + _C_LEN)[0]


def set_route(buf, snode: int, dnode: int, flags: int) -> None:
    """c_snode, c_dnode and c_flags of a header for its next hop, in one call (the routed
    frames' rewrite: two writes instead of three helper calls)."""
    _NODES.pack_into(buf, _C_SNODE, snode, dnode)
    _U32.pack_into(buf, _C_FLAGS, flags & 0xFFFFFFFF)


def set_batch(buf, extra: int) -> None:
    """Make the header the first of a batch frame carrying `extra` more headers."""
    _I32.pack_into(buf, _C_LEN, extra * HEADER_SIZE)
    _I32.pack_into(buf, _C_BATCH_NR, extra)
    _U32.pack_into(buf, _C_FLAGS, _U32.unpack_from(buf, _C_FLAGS)[0] | C.FLAG_BATCH)


def set_lz4(buf, length: int) -> None:
    """Mark the header's payload as an LZ4 frame of `length` bytes."""
    _I32.pack_into(buf, _C_LEN, length)
    _U32.pack_into(buf, _C_FLAGS, _U32.unpack_from(buf, _C_FLAGS)[0] | C.FLAG_LZ4)


#: c_cmd .. c_pid: the fields a kernel sets when it makes a command.
_NEW_COMMAND = struct.Struct("<9i")
#: c_batch_nr, c_flags, c_snd_seq, c_ack_seq, c_tv_sec, c_tv_nsec (adjacent).
_OUTGOING = struct.Struct("<iIIIii")
assert _OFF["c_pid"] == 32 and _OFF["c_tv_nsec"] == _C_BATCH_NR + 20


def new_command(buf, cmd: int, dcid: int, src: int, dst: int, snode: int, dnode: int,
                rcode: int, length: int, pid: int) -> None:
    """Zero the header in `buf` and set the fields of a new command, in two writes (the
    kernel makes one for every remote request and ACK)."""
    buf[:] = _ZERO_HEADER
    _NEW_COMMAND.pack_into(buf, 0, cmd, dcid, src, dst, snode, dnode, rcode, length, pid)


def stamp_outgoing(buf, tv_sec: int, tv_nsec: int) -> None:
    """A command leaving the kernel for its sender proxy: the time of sending, and no
    batch, flags or sequence numbers (the proxies' own fields)."""
    _OUTGOING.pack_into(buf, _C_BATCH_NR, 0, 0, 0, 0, tv_sec, tv_nsec)


def set_m_source(buf, ep: int) -> None:
    """The `m_source` of the message inside the header in `buf`."""
    _I32.pack_into(buf, _M_SOURCE, ep)


def message_with_source(msg: bytes, ep: int) -> bytes:
    """A copy of the raw message `msg` whose `m_source` is `ep` (what the kernel stamps on
    every message it passes on), without a Message object."""
    return msg[:_M_SOURCE_IN_MSG] + _I32.pack(ep) + msg[_M_SOURCE_IN_MSG + 4:]


def vcopy_endpoints(buf, off: int = 0) -> tuple[int, int, int]:
    """(v_src, v_dst, v_rqtr) of the header at `off` in `buf` (a copy command's)."""
    return _V3.unpack_from(buf, off + _V_SRC)


def swap_endpoint(buf, cmd: int, old: int, new: int, dst_field: bool) -> None:
    """Rewrite endpoint `old` as `new` everywhere a header of command `cmd` names it: `c_dst`
    (with `dst_field`) or `c_src` and the message's `m_source`, and the vcopy endpoints."""
    if old == new:
        return
    if dst_field:
        if _I32.unpack_from(buf, _C_DST)[0] == old:
            _I32.pack_into(buf, _C_DST, new)
    else:
        if _I32.unpack_from(buf, _C_SRC)[0] == old:
            _I32.pack_into(buf, _C_SRC, new)
        if cmd in C.MSG_CMDS and _I32.unpack_from(buf, _M_SOURCE)[0] == old:
            _I32.pack_into(buf, _M_SOURCE, new)
    if cmd in C.VCOPY_CMDS:
        v = _V3.unpack_from(buf, _V_SRC)
        if old in v:
            _V3.pack_into(buf, _V_SRC, *(new if x == old else x for x in v))


# ---------------------------------------------------------------------------- runs of headers
#: The routing fields of a header (c_cmd .. c_flags): frames whose first ROUTE_SIZE bytes are
#: equal are checked and routed as one run.
ROUTE_SIZE = ROUTE_STRUCT.size
RUN_KEY = struct.Struct(f"{ROUTE_SIZE}s{HEADER_SIZE - ROUTE_SIZE}x")


def _lanes_equal(block, n: int, off: int, packed: bytes) -> bool:
    """(helper) The 4-byte field at `off` of every one of the `n` headers of `block` holds
    `packed` (four strided byte compares in C, no loop per header)."""
    return all(block[off + k::HEADER_SIZE] == packed[k:k + 1] * n for k in range(4))


def set_run_field(block: bytearray, n: int, off: int, packed: bytes) -> None:
    """Write the 4 bytes `packed` at `off` in each of the `n` headers of `block`."""
    for k in range(4):
        block[off + k::HEADER_SIZE] = packed[k:k + 1] * n


def set_run_snode(block: bytearray, n: int, node: int) -> None:
    set_run_field(block, n, _C_SNODE, _I32.pack(node))


def set_run_dnode(block: bytearray, n: int, node: int) -> None:
    set_run_field(block, n, _C_DNODE, _I32.pack(node))


def set_run_flags(block: bytearray, n: int, flags: int) -> None:
    set_run_field(block, n, _C_FLAGS, _U32.pack(flags & 0xFFFFFFFF))


def swap_endpoint_run(block: bytearray, n: int, cmd: int, old: int, new: int,
                      dst_field: bool) -> None:
    """`swap_endpoint` on each of the `n` headers of command `cmd` in `block`: a field that
    holds `old` in every header is rewritten with strided writes, a field that holds it in
    only some headers header by header."""
    if old == new:
        return
    po, pn = _I32.pack(old), _I32.pack(new)
    offs = [_C_DST] if dst_field else [_C_SRC]
    if not dst_field and cmd in C.MSG_CMDS:
        offs.append(_M_SOURCE)
    if cmd in C.VCOPY_CMDS:
        offs += [_V_SRC, _V_SRC + 4, _V_SRC + 8]
    for off in offs:
        if _lanes_equal(block, n, off, po):
            set_run_field(block, n, off, pn)
            continue
        for base in range(off, n * HEADER_SIZE, HEADER_SIZE):
            if block[base:base + 4] == po:
                block[base:base + 4] = pn
