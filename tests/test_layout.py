"""Struct layouts of the DVK boundary against the layout tables of the DVK module's headers.

The expected values below are transcribed from the module's i386 and x86_64 layouts (verified
against gcc -m32/-m64
DWARF), never computed from the code under test.  `ffi_i386` is always checked against the i386
column; `ffi_native` against the column of the host (chosen by sizeof(long)).  The hand-written
struct formats of wire.py and info.py are checked against `ffi_i386`.
"""

from __future__ import annotations

import dataclasses
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from dvk_cffi import info, wire
from dvk_cffi.cdefs import ffi_i386, ffi_native, message_fields, native_message_fields

HOST_64 = ffi_native.sizeof("long") == 8
NATIVE_COL = 1 if HOST_64 else 0  # column index into (i386, x86_64) pairs

# --- message: top level and union variants (offsets relative to m_u) -----------------------
MESSAGE_SIZE = (36, 48)
MESSAGE_TOP = {"m_source": (0, 0), "m_type": (4, 4), "m_u": (8, 8)}
M_U_SIZE = (28, 40)
# variant -> (fields (i386 offsets), (x86_64 offsets), size i386, size x86_64)
MESS_VARIANTS = {
    "m_m1": (("m1i1", "m1i2", "m1i3", "m1p1", "m1p2", "m1p3"),
             (0, 4, 8, 12, 16, 20), (0, 4, 8, 16, 24, 32), 24, 40),
    "m_m2": (("m2i1", "m2i2", "m2i3", "m2l1", "m2l2", "m2p1"),
             (0, 4, 8, 12, 16, 20), (0, 4, 8, 16, 24, 32), 24, 40),
    "m_m3": (("m3i1", "m3i2", "m3p1", "m3ca1"), (0, 4, 8, 12), (0, 4, 8, 16), 28, 32),
    "m_m4": (("m4l1", "m4l2", "m4l3", "m4l4", "m4l5"),
             (0, 4, 8, 12, 16), (0, 8, 16, 24, 32), 20, 40),
    "m_m5": (("m5c1", "m5c2", "m5i1", "m5i2", "m5l1", "m5l2", "m5l3"),
             (0, 2, 4, 8, 12, 16, 20), (0, 2, 4, 8, 16, 24, 32), 24, 40),
    "m_m6": (("m6ca1",), (0,), (0,), 28, 32),
    "m_m7": (("m7i1", "m7i2", "m7i3", "m7i4", "m7p1", "m7p2"),
             (0, 4, 8, 12, 16, 20), (0, 4, 8, 12, 16, 24), 24, 32),
    "m_m8": (("m8i1", "m8i2", "m8p1", "m8p2", "m8p3", "m8p4"),
             (0, 4, 8, 12, 16, 20), (0, 4, 8, 16, 24, 32), 24, 40),
    "m_m9": (("m9i1", "m9l1", "m9t1"), (0, 4, 8), (0, 4, 8), 16, 24),
    "m_mA": (("mAdst", "mAnr", "mAia"), (0, 4, 8), (0, 4, 8), 24, 24),
    "m_mB": (("mBnr", "mBmd5"), (0, 4), (0, 8), 20, 24),
    "m_mC": (("mCi1", "mCi2", "mCi3", "mCi4", "mCca1"),
             (0, 4, 8, 12, 16), (0, 4, 8, 12, 16), 28, 28),
}

# --- the other structs: struct -> ((size i386, size x86_64), {field: (off i386, off x86_64)})
STRUCTS = {
    "vcopy_t": ((24, 40), {
        "v_src": (0, 0), "v_dst": (4, 4), "v_rqtr": (8, 8), "v_saddr": (12, 16),
        "v_daddr": (16, 24), "v_bytes": (20, 32)}),
    "cmd_t": ((120, 168), {
        "c_cmd": (0, 0), "c_dcid": (4, 4), "c_src": (8, 8), "c_dst": (12, 12),
        "c_snode": (16, 16), "c_dnode": (20, 20), "c_rcode": (24, 24), "c_len": (28, 28),
        "c_pid": (32, 32), "c_batch_nr": (36, 36), "c_flags": (40, 40), "c_snd_seq": (44, 48),
        "c_ack_seq": (48, 56), "c_timestamp": (52, 64), "c_msg": (60, 80),
        "c_vcopy": (96, 128)}),
    "proxy_payload_t": ((65536, 65536), {"pay_cmd": (0, 0), "pay_data": (0, 0)}),
    "dvs_usr_t": ((60, 80), {
        "d_name": (0, 0), "d_nr_dcs": (16, 16), "d_nr_nodes": (20, 20), "d_nr_procs": (24, 24),
        "d_nr_tasks": (28, 28), "d_nr_sysprocs": (32, 32), "d_max_copybuf": (36, 36),
        "d_max_copylen": (40, 40), "d_dbglvl": (44, 48), "d_version": (48, 56),
        "d_flags": (52, 64), "d_size_proc": (56, 72)}),
    "dc_usr_t": ((184, 192), {
        "dc_dcid": (0, 0), "dc_flags": (4, 4), "dc_nr_procs": (8, 8), "dc_nr_tasks": (12, 12),
        "dc_nr_sysprocs": (16, 16), "dc_nr_nodes": (20, 20), "dc_nodes": (24, 24),
        "dc_warn2proc": (28, 32), "dc_warnmsg": (32, 36), "dc_pid": (36, 40),
        "dc_name": (40, 44), "dc_cpumask": (56, 64)}),
    "node_usr_t": ((56, 96), {
        "n_nodeid": (0, 0), "n_flags": (4, 8), "n_proxies": (8, 16), "n_dcs": (12, 24),
        "n_stimestamp": (16, 32), "n_rtimestamp": (24, 48), "n_pxsent": (32, 64),
        "n_pxrcvd": (36, 72), "n_name": (40, 80)}),
    "proxies_usr_t": ((32, 40), {
        "px_id": (0, 0), "px_flags": (4, 8), "px_maxbytes": (8, 16), "px_maxbcmds": (12, 20),
        "px_name": (16, 24)}),
    "proc_usr_t": ((216, 256), {
        "p_nr": (0, 0), "p_endpoint": (4, 4), "p_dcid": (8, 8), "p_rts_flags": (12, 16),
        "p_lpid": (16, 24), "p_vpid": (20, 28), "p_nodeid": (24, 32), "p_nodemap": (28, 40),
        "p_misc_flags": (32, 48), "p_getfrom": (36, 56), "p_sendto": (40, 60),
        "p_waitmigr": (44, 64), "p_waitunbind": (48, 68), "p_proxy": (52, 72),
        "p_lclsent": (56, 80), "p_rmtsent": (60, 88), "p_lclcopy": (64, 96),
        "p_rmtcopy": (68, 104), "p_name": (72, 112), "p_cpumask": (88, 128)}),
    "priv_usr_t": ((52, 72), {
        "priv_id": (0, 0), "priv_warn": (4, 4), "priv_level": (8, 8),
        "priv_trap_mask": (12, 12), "priv_ipc_from": (14, 14), "priv_ipc_to": (22, 22),
        "priv_dvk_allowed": (30, 30), "priv_alarm_timer": (36, 40)}),
    # ioctl parameter structs
    "parm_rcvrqst_t": ((8, 16), {"parm_mptr": (0, 0), "parm_tout": (4, 8)}),
    "parm_getdcinfo_t": ((8, 16), {"parm_dcid": (0, 0), "parm_dc": (4, 8)}),
    "parm_getnodeinfo_t": ((8, 16), {"parm_nodeid": (0, 0), "parm_node": (4, 8)}),
    "parm_relay_t": ((8, 16), {"parm_ep": (0, 0), "parm_mptr": (4, 8)}),
    "parm_wakeup_t": ((8, 8), {"parm_dcid": (0, 0), "parm_ep": (4, 4)}),
    "parm_put2lcl_t": ((8, 16), {"parm_cmd": (0, 0), "parm_pay": (4, 8)}),
    "parm_dcnode_t": ((8, 8), {"parm_dcid": (0, 0), "parm_nodeid": (4, 4)}),
    "parm_dvsinit_t": ((8, 16), {"parm_nodeid": (0, 0), "parm_dvs": (4, 8)}),
    "parm_pxconn_t": ((8, 8), {"parm_pxid": (0, 0), "parm_sts": (4, 4)}),
    "parm_wait4bind_t": ((12, 16), {"parm_cmd": (0, 0), "parm_ep": (4, 4), "parm_tout": (8, 8)}),
    "parm_unbind_t": ((12, 16), {"parm_dcid": (0, 0), "parm_ep": (4, 4), "parm_tout": (8, 8)}),
    "parm_ipc_t": ((12, 24), {"parm_ep": (0, 0), "parm_mptr": (4, 8), "parm_tout": (8, 16)}),
    "parm_notify_t": ((12, 12), {"parm_nr": (0, 0), "parm_ep": (4, 4), "parm_val": (8, 8)}),
    "parm_priv_t": ((12, 16), {"parm_dcid": (0, 0), "parm_ep": (4, 4), "parm_priv": (8, 8)}),
    "parm_get2rmt_t": ((12, 24), {"parm_cmd": (0, 0), "parm_pay": (4, 8), "parm_tout": (8, 16)}),
    "parm_nodeup_t": ((12, 16), {"parm_name": (0, 0), "parm_nodeid": (4, 8),
                                 "parm_pxid": (8, 12)}),
    "parm_proxyinfo_t": ((12, 24), {"parm_pxid": (0, 0), "parm_spx": (4, 8),
                                    "parm_rpx": (8, 16)}),
    "parm_bind_t": ((20, 20), {"parm_cmd": (0, 0), "parm_dcid": (4, 4), "parm_pid": (8, 8),
                               "parm_ep": (12, 12), "parm_nodeid": (16, 16)}),
    "parm_pxbind_t": ((20, 24), {"parm_name": (0, 0), "parm_pxid": (4, 8), "parm_spid": (8, 12),
                                 "parm_rpid": (12, 16), "parm_maxbuf": (16, 20)}),
    "parm_procinfo_t": ((12, 16), {"parm_dcid": (0, 0), "parm_nr": (4, 4),
                                   "parm_proc": (8, 8)}),
    "parm_vcopy_t": ((24, 40), {
        "v_src": (0, 0), "v_dst": (4, 4), "v_rqtr": (8, 8), "v_saddr": (12, 16),
        "v_daddr": (16, 24), "v_bytes": (20, 32)}),
}
# sizes of a few members stated in the tables: (struct, field) -> (i386, x86_64)
MEMBER_SIZES = {
    ("cmd_t", "c_timestamp"): (8, 16), ("cmd_t", "c_msg"): (36, 48),
    ("cmd_t", "c_vcopy"): (24, 40), ("dc_usr_t", "dc_cpumask"): (128, 128),
    ("proc_usr_t", "p_cpumask"): (128, 128), ("priv_usr_t", "priv_ipc_from"): (8, 8),
    ("priv_usr_t", "priv_ipc_to"): (8, 8), ("priv_usr_t", "priv_dvk_allowed"): (6, 6),
    ("priv_usr_t", "priv_alarm_timer"): (16, 32),
}
# i386 kernel sizes: the CPU mask is 4 bytes in the kernel
I386_KERNEL_SIZES = {"dc_kusr_t": 60, "proc_kusr_t": 92}
MAXBATCMD = (546, 390)

LAYOUTS = [pytest.param(ffi_i386, 0, id="i386"),
           pytest.param(ffi_native, NATIVE_COL, id="native-x86_64" if HOST_64 else "native-i386")]


@pytest.mark.parametrize(("ffi", "col"), LAYOUTS)
@pytest.mark.parametrize("name", sorted(STRUCTS))
def test_struct_size_and_offsets(ffi, col, name):
    sizes, fields = STRUCTS[name]
    assert ffi.sizeof(name) == sizes[col]
    assert [f for f, _ in ffi.typeof(name).fields] == list(fields) or name == "proxy_payload_t"
    for field, offs in fields.items():
        assert ffi.offsetof(name, field) == offs[col], (name, field)


@pytest.mark.parametrize(("ffi", "col"), LAYOUTS)
def test_member_sizes(ffi, col):
    for (name, field), sizes in MEMBER_SIZES.items():
        ftype = dict(ffi.typeof(name).fields)[field].type
        assert ffi.sizeof(ftype) == sizes[col], (name, field)


@pytest.mark.parametrize(("ffi", "col"), LAYOUTS)
def test_message(ffi, col):
    assert ffi.sizeof("message") == MESSAGE_SIZE[col]
    for field, offs in MESSAGE_TOP.items():
        assert ffi.offsetof("message", field) == offs[col]
    union = dict(ffi.typeof("message").fields)["m_u"].type
    assert ffi.sizeof(union) == M_U_SIZE[col]
    assert [v for v, _ in union.fields] == list(MESS_VARIANTS)
    for variant, (names, off386, off64, size386, size64) in MESS_VARIANTS.items():
        vtype = dict(union.fields)[variant].type
        assert ffi.sizeof(vtype) == (size386, size64)[col], variant
        assert [n for n, _ in vtype.fields] == list(names), variant
        for fname, o in zip(names, (off386, off64)[col]):
            assert ffi.offsetof("message", "m_u", variant, fname) == 8 + o, (variant, fname)


@pytest.mark.parametrize(("ffi", "col"), LAYOUTS)
def test_payload_maxbatcmd(ffi, col):
    pay = dict(ffi.typeof("proxy_payload_t").fields)
    assert pay["pay_cmd"].type.length == MAXBATCMD[col]
    assert pay["pay_data"].type.length == 65536


def test_i386_kernel_sizes():
    for name, size in I386_KERNEL_SIZES.items():
        assert ffi_i386.sizeof(name) == size
    # same fields as the user versions, up to the mask
    for user, kern in (("dc_usr_t", "dc_kusr_t"), ("proc_usr_t", "proc_kusr_t")):
        uf = [(n, f.offset) for n, f in ffi_i386.typeof(user).fields]
        kf = [(n, f.offset) for n, f in ffi_i386.typeof(kern).fields]
        assert uf == kf


def test_timespec_and_long_sizes():
    assert ffi_i386.sizeof("struct timespec") == 8
    assert ffi_native.sizeof("struct timespec") == (16 if HOST_64 else 8)


# --- hand-written formats agree with ffi_i386 ---------------------------------------------------

def test_wire_constants_match_i386():
    assert wire.HEADER_SIZE == ffi_i386.sizeof("cmd_t") == 120
    assert wire.MESSAGE_SIZE == ffi_i386.sizeof("message") == 36
    assert wire.VCOPY_SIZE == ffi_i386.sizeof("vcopy_t") == 24
    assert wire.MSG_OFFSET == ffi_i386.offsetof("cmd_t", "c_msg")
    assert wire.VCOPY_OFFSET == ffi_i386.offsetof("cmd_t", "c_vcopy")
    assert wire.HEADER_STRUCT.size == 120


def _i386_header_path(name):
    if name in ("c_tv_sec", "c_tv_nsec"):
        return ("c_timestamp", name.replace("c_tv_", "tv_"))
    if name.startswith("v_"):
        return ("c_vcopy", name)
    return (name,)


def test_wire_header_fields_match_i386():
    for name, (off, fmt) in wire.HEADER_FIELDS.items():
        path = _i386_header_path(name)
        assert ffi_i386.offsetof("cmd_t", *path) == off, name
        ctype = ffi_i386.typeof("cmd_t")
        for p in path:
            ctype = dict(ctype.fields)[p].type
        assert struct.calcsize("<" + fmt) == ffi_i386.sizeof(ctype), name
        signed = not ctype.cname.startswith("uint")
        assert fmt == ("i" if signed else "I"), name
    # every scalar of cmd_t outside c_msg is covered
    assert len(wire.HEADER_FIELDS) == 10 + 3 + 2 + 6


def test_wire_message_fields_match_i386():
    assert message_fields(ffi_i386) == wire.I386_MESSAGE_FIELDS


def test_native_message_fields_offsets():
    fields = native_message_fields()
    assert set(fields) == set(wire.I386_MESSAGE_FIELDS)
    for name, (off, fmt) in fields.items():
        assert off + struct.calcsize("<" + fmt) <= ffi_native.sizeof("message"), name
    if HOST_64:
        assert fields["m1_p1"] == (24, "Q")
        assert fields["m4_l5"] == (40, "q")
        assert fields["m9_t1_nsec"] == (24, "q")
        assert fields["mB_md5"] == (16, "16s")
    else:
        assert fields == wire.I386_MESSAGE_FIELDS


def _struct_offsets(st: struct.Struct) -> list[tuple[int, str]]:
    """(offset, code) of every item of a '<' struct format, e.g. '4i' gives four items."""
    out, off, num = [], 0, ""
    for ch in st.format.lstrip("<"):
        if ch.isdigit():
            num += ch
            continue
        count = int(num or 1)
        if ch == "s":
            out.append((off, f"{count}s"))
            off += count
        else:
            for _ in range(count):
                out.append((off, ch))
                off += struct.calcsize("<" + ch)
        num = ""
    return out


def _flat_i386(name: str) -> list[tuple[int, str]]:
    """(offset, code) of every scalar of an ffi_i386 struct, nested timespecs flattened."""
    out = []

    def walk(ctype, base):
        for _n, f in ctype.fields:
            t = f.type
            if t.kind == "struct" and t.cname != "cpumask_t":
                walk(t, base + f.offset)
            elif t.kind == "array" and t.item.cname == "char":
                out.append((base + f.offset, f"{t.length}s"))
            elif t.cname == "cpumask_t":
                out.append((base + f.offset, "I"))
            else:
                signed = not t.cname.startswith(("uint", "unsigned"))
                out.append((base + f.offset, "i" if signed else "I"))
    walk(ffi_i386.typeof(name), 0)
    return out


@pytest.mark.parametrize(("cls", "cname"), [
    (info.DvsInfo, "dvs_usr_t"), (info.DcInfo, "dc_kusr_t"), (info.NodeInfo, "node_usr_t"),
    (info.ProxiesInfo, "proxies_usr_t"), (info.ProcInfo, "proc_kusr_t")])
def test_info_structs_match_i386(cls, cname):
    assert cls.STRUCT.size == ffi_i386.sizeof(cname)
    assert _struct_offsets(cls.STRUCT) == _flat_i386(cname)
    assert len(dataclasses.fields(cls)) == len(_flat_i386(cname))


def test_info_kernel_sizes_from_doc():
    # kernel sizes on i386
    assert [c.STRUCT.size for c in (info.DvsInfo, info.DcInfo, info.NodeInfo, info.ProxiesInfo,
                                    info.ProcInfo)] == [60, 60, 56, 32, 92]


# --- the CLI -------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "dvk_cffi", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60, check=False)


def test_cli_layout_native():
    res = _run("layout")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert f"cmd_t size={168 if HOST_64 else 120} align={8 if HOST_64 else 4}" in lines
    assert f"message size={48 if HOST_64 else 36} align={8 if HOST_64 else 4}" in lines
    c_msg = [ln.split() for ln in lines if ln.strip().startswith("c_msg ")]
    assert c_msg and c_msg[0][1] == f"offset={80 if HOST_64 else 60}"
    assert "dc_kusr_t" not in res.stdout


def test_cli_layout_i386():
    res = _run("layout", "--i386", "--struct", "cmd_t", "--struct", "proc_kusr_t", "--top")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert "cmd_t size=120 align=4" in lines
    assert "proc_kusr_t size=92 align=4" in lines
    vcopy = [ln.split() for ln in lines if ln.strip().startswith("c_vcopy ")]
    assert vcopy == [["c_vcopy", "offset=96", "size=24", "vcopy_t"]]
    assert not any(ln.strip().startswith("c_vcopy.") for ln in lines)  # --top


def test_cli_help_and_errors():
    res = _run("--help")
    assert res.returncode == 0 and "layout" in res.stdout
    res = _run("layout", "--help")
    assert res.returncode == 0 and "--i386" in res.stdout
    res = _run("layout", "--struct", "no_such_t")
    assert res.returncode == 2 and "unknown struct" in res.stderr
    res = _run()
    assert res.returncode == 2
