"""The i386 wire codec (wire.py) and the wire <-> native header conversion (cdefs.py).

Hand-made frames are built with `struct.pack` at the offsets of the i386 layout
(docs/design.md, "The wire")
(i386 column), transcribed here, so the codec is checked against the spec, not against itself.
"""

from __future__ import annotations

import struct

import pytest

from dvk_cffi import consts as C
from dvk_cffi import wire
from dvk_cffi.cdefs import ffi_i386, ffi_native, header_from_native, header_to_native
from dvk_cffi.info import NodeInfo, ProcInfo

HOST_64 = ffi_native.sizeof("void *") == 8

# the i386 cmd_t: field -> (offset, struct code)
CMD_I386 = {
    "c_cmd": (0, "i"), "c_dcid": (4, "i"), "c_src": (8, "i"), "c_dst": (12, "i"),
    "c_snode": (16, "i"), "c_dnode": (20, "i"), "c_rcode": (24, "i"), "c_len": (28, "i"),
    "c_pid": (32, "i"), "c_batch_nr": (36, "i"), "c_flags": (40, "I"), "c_snd_seq": (44, "I"),
    "c_ack_seq": (48, "I"), "c_tv_sec": (52, "i"), "c_tv_nsec": (56, "i"),
}
C_MSG = 60
# vcopy_t, i386, relative to c_vcopy at 96
VCOPY_I386 = {"v_src": (0, "i"), "v_dst": (4, "i"), "v_rqtr": (8, "i"), "v_saddr": (12, "I"),
              "v_daddr": (16, "I"), "v_bytes": (20, "i")}
C_VCOPY = 96
# mess_1 in the i386 message (m_u at +8)
MESS1_I386 = {"m1_i1": (8, "i"), "m1_i2": (12, "i"), "m1_i3": (16, "i"),
              "m1_p1": (20, "I"), "m1_p2": (24, "I"), "m1_p3": (28, "I")}

SAMPLE = {
    "c_cmd": C.CMD_SNDREC_MSG, "c_dcid": 3, "c_src": 50, "c_dst": -2, "c_snode": 1,
    "c_dnode": 0, "c_rcode": -319, "c_len": 65536, "c_pid": 4321, "c_batch_nr": 2,
    "c_flags": C.FLAG_BATCH | C.FLAG_CHECK_HDR, "c_snd_seq": 0xFFFFFFFF, "c_ack_seq": 7,
    "c_tv_sec": 1658000000, "c_tv_nsec": 999999999,
    "v_src": 10, "v_dst": 20, "v_rqtr": C.SELF, "v_saddr": 0xBF98A134, "v_daddr": 0x0804A000,
    "v_bytes": 1048576,
}


def hand_made_frame(values: dict[str, int], msg: dict[str, int], payload: bytes = b"") -> bytes:
    buf = bytearray(120)
    for name, (off, code) in CMD_I386.items():
        struct.pack_into("<" + code, buf, off, values[name])
    for name, (off, code) in VCOPY_I386.items():
        struct.pack_into("<" + code, buf, C_VCOPY + off, values[name])
    struct.pack_into("<ii", buf, C_MSG, msg["m_source"], msg["m_type"])
    for name, (off, code) in MESS1_I386.items():
        struct.pack_into("<" + code, buf, C_MSG + off, msg[name])
    return bytes(buf) + payload


MSG = {"m_source": 50, "m_type": 0x0A, "m1_i1": 1, "m1_i2": -2, "m1_i3": 3,
       "m1_p1": 4, "m1_p2": 0xFFFFFFF0, "m1_p3": 0}


def test_decode_hand_made_frame():
    frame = hand_made_frame(SAMPLE, MSG, b"xyz")
    h = wire.Header(frame[:120])
    for name, value in SAMPLE.items():
        assert getattr(h, name) == value, name
    m = h.c_msg
    for name, value in MSG.items():
        assert getattr(m, name) == value, name
    assert h.route() == tuple(SAMPLE[n] for n in list(CMD_I386)[:11])
    assert frame[120:] == b"xyz"
    # the struct that reads the whole header agrees
    vals = wire.HEADER_STRUCT.unpack(frame[:120])
    assert vals[:15] == tuple(SAMPLE[n] for n in CMD_I386)
    assert vals[15] == frame[60:96]
    assert vals[16:] == tuple(SAMPLE[n] for n in VCOPY_I386)


def test_encode_matches_hand_made_frame():
    h = wire.make_header(**SAMPLE)
    for name, value in MSG.items():
        setattr(h.c_msg, name, value)
    assert bytes(h) == hand_made_frame(SAMPLE, MSG)


def test_hand_made_message_variants():
    """A few other union variants at their i386 offsets (m_u at 8)."""
    buf = bytearray(36)
    struct.pack_into("<ii", buf, 0, 7, 0x1000)
    struct.pack_into("<i", buf, 8 + 0, 5)            # m9i1
    struct.pack_into("<i", buf, 8 + 4, -6)           # m9l1 (an int)
    struct.pack_into("<ii", buf, 8 + 8, 100, 200)    # m9t1 tv_sec, tv_nsec
    m = wire.Message(buf)
    assert (m.m_source, m.m_type, m.m9_i1, m.m9_l1, m.m9_t1_sec, m.m9_t1_nsec) == (
        7, 0x1000, 5, -6, 100, 200)
    buf = bytearray(36)
    struct.pack_into("<hhii", buf, 8, -1, 2, 3, 4)   # m5c1, m5c2, m5i1, m5i2
    struct.pack_into("<3i", buf, 8 + 12, 5, 6, 7)    # m5l1..3
    m = wire.Message(buf)
    assert (m.m5_c1, m.m5_c2, m.m5_i1, m.m5_i2, m.m5_l1, m.m5_l2, m.m5_l3) == (
        -1, 2, 3, 4, 5, 6, 7)
    buf = bytearray(36)
    struct.pack_into("<4i", buf, 8, 1, 2, 3, 4)
    buf[8 + 16:8 + 26] = b"0123456789"                # mCca1[10]
    m = wire.Message(buf)
    assert (m.mC_i1, m.mC_i4, m.mC_ca1) == (1, 4, b"0123456789")
    buf = bytearray(36)
    struct.pack_into("<ii", buf, 8, 9, 8)
    struct.pack_into("<4i", buf, 8 + 8, 1, -1, 2, -2)
    m = wire.Message(buf)
    assert (m.mA_dst, m.mA_nr, m.mA_ia) == (9, 8, [1, -1, 2, -2])
    buf = bytearray(36)
    struct.pack_into("<i", buf, 8, 77)
    buf[12:28] = bytes(range(16))
    m = wire.Message(buf)
    assert (m.mB_nr, m.mB_md5) == (77, bytes(range(16)))


def test_header_roundtrip_all_fields():
    h = wire.make_header(**SAMPLE)
    h2 = wire.Header(bytes(h))
    assert h2.fields() == SAMPLE
    assert h2.copy().fields() == SAMPLE
    h3 = wire.Header()
    h3.load(bytes(h))
    assert h3.fields() == SAMPLE
    assert "CMD_SNDREC_MSG" in repr(h2)


def _value_for(fmt: str, i: int):
    if fmt.endswith("s"):
        n = int(fmt[:-1])
        return bytes((i + k) % 256 for k in range(n))
    if fmt[0].isdigit():
        return [i + k for k in range(int(fmt[:-1]))]
    return {"h": -i, "i": -1000 * i, "I": 0xF0000000 + i}[fmt]


@pytest.mark.parametrize("name", sorted(wire.I386_MESSAGE_FIELDS))
def test_message_field_roundtrip(name):
    off, fmt = wire.I386_MESSAGE_FIELDS[name]
    m = wire.Message()
    v = _value_for(fmt, 3)
    setattr(m, name, v)
    assert getattr(m, name) == v
    # only the field's bytes changed
    raw = bytes(m)
    size = struct.calcsize("<" + fmt)
    assert raw[:off] == bytes(off) and raw[off + size:] == bytes(36 - off - size)
    m2 = wire.Message()
    m2.load(raw)
    assert getattr(m2, name) == v
    m2.clear()
    assert bytes(m2) == bytes(36)


def test_message_inside_header_shares_buffer():
    h = wire.Header()
    h.c_msg.m1_i1 = 42
    assert struct.unpack_from("<i", bytes(h), C_MSG + 8)[0] == 42


def test_header_size_checked():
    with pytest.raises(ValueError):
        wire.Header(bytes(119))


def test_batch_roundtrip():
    hs = [wire.make_header(c_cmd=C.CMD_SEND_MSG, c_src=i, c_dst=i + 1) for i in range(5)]
    payload = wire.pack_batch(hs)
    assert len(payload) == 5 * 120
    assert wire.pack_batch([bytes(h) for h in hs]) == payload
    back = list(wire.unpack_batch(payload, 5))
    assert [b.fields() for b in back] == [h.fields() for h in hs]
    assert list(wire.unpack_batch(memoryview(payload), 5))[4].c_src == 4
    assert list(wire.unpack_batch(b"", 0)) == []


def test_batch_length_mismatch():
    payload = wire.pack_batch([wire.Header(), wire.Header()])
    with pytest.raises(ValueError, match="240"):
        list(wire.unpack_batch(payload, 3))
    with pytest.raises(ValueError):
        list(wire.unpack_batch(payload + b"x", 2))


def test_hello_header():
    h = wire.hello_header(1, 2, pid=99)
    assert (h.c_cmd, h.c_len, h.c_snode, h.c_dnode, h.c_pid) == (C.CMD_NONE, 0, 1, 2, 99)
    assert wire.cmd_name(C.CMD_COPYOUT_DATA) == "CMD_COPYOUT_DATA"


# --- wire <-> native -----------------------------------------------------------------------------

def _sample_header() -> wire.Header:
    h = wire.make_header(**SAMPLE)
    for name, value in MSG.items():
        setattr(h.c_msg, name, value)
    return h


def test_native_roundtrip_scalars_and_vcopy():
    h = _sample_header()
    p = header_to_native(h)
    assert ffi_native.typeof(p) is ffi_native.typeof("cmd_t *")
    assert p.c_rcode == -319 and p.c_timestamp.tv_nsec == 999999999
    assert int(ffi_native.cast("uintptr_t", p.c_vcopy.v_saddr)) == 0xBF98A134
    back = header_from_native(p)
    assert back.fields() == SAMPLE
    assert (back.c_msg.m_source, back.c_msg.m_type) == (50, 0x0A)
    if HOST_64:
        # the union body is not converted between layouts
        assert p.c_msg.m_u.m_m1.m1i1 == 0
        assert bytes(back.c_msg)[8:] == bytes(28)
    else:  # pragma: no cover - i386 host
        assert bytes(back) == bytes(h)


def test_i386_roundtrip_is_byte_exact():
    h = _sample_header()
    p = header_to_native(h, ffi_i386)
    assert ffi_i386.sizeof(p[0]) == 120
    assert bytes(ffi_i386.buffer(p)) == bytes(h)         # identical layout
    assert p.c_msg.m_u.m_m1.m1p2 == 0xFFFFFFF0
    assert bytes(header_from_native(p, ffi_i386)) == bytes(h)


def test_header_from_native_into_existing():
    h = _sample_header()
    p = header_to_native(wire.make_header(c_cmd=C.CMD_SEND_ACK, c_rcode=-64))
    out = header_from_native(p, into=h)
    assert out is h
    assert (h.c_cmd, h.c_rcode, h.c_src, h.c_msg.m1_i1) == (C.CMD_SEND_ACK, -64, 0, 0)


def test_native_value_too_wide_for_wire():
    """Only a 64-bit layout holds values wider than the 32-bit wire fields."""
    if not HOST_64:  # pragma: no cover - i386 host: every native value fits
        return
    p = ffi_native.new("cmd_t *")
    p.c_vcopy.v_saddr = ffi_native.cast("void *", 0x1_0000_0000)
    with pytest.raises(OverflowError, match="v_saddr"):
        header_from_native(p)
    p = ffi_native.new("cmd_t *")
    p.c_timestamp.tv_sec = 1 << 40
    with pytest.raises(OverflowError, match="c_tv_sec"):
        header_from_native(p)


def test_time_stamps_wrap_like_a_32_bit_time_t(monkeypatch):
    """Past January 2038 (or with the clock set that far ahead) a HELLO and the kernel's
    stamps are still written: the seconds wrap as the i386 kernel's 32-bit time_t does."""
    monkeypatch.setattr(wire.time, "time", lambda: 2**31 + 10.5)
    assert wire.timestamp() == (-2**31 + 10, 500_000_000)
    h = wire.hello_header(1, 2)
    assert (h.c_tv_sec, h.c_tv_nsec) == (-2**31 + 10, 500_000_000)


def test_info_counters_wrap_at_32_bits_instead_of_failing():
    """A busy endpoint's or node's counters pass 2**32 after days: the info structs report
    them modulo 2**32, as the kernel's unsigned fields do, rather than becoming unreadable."""
    p = ProcInfo(p_rmtsent=2**32 + 5, p_lclsent=2**33 - 1)
    back = ProcInfo.unpack(p.pack())
    assert (back.p_rmtsent, back.p_lclsent) == (5, 2**32 - 1)
    n = NodeInfo(n_pxsent=2**32, n_pxrcvd=2**32 + 7)
    back = NodeInfo.unpack(n.pack())
    assert (back.n_pxsent, back.n_pxrcvd) == (0, 7)
    assert ProcInfo.unpack(ProcInfo(p_endpoint=-5).pack()).p_endpoint == -5
