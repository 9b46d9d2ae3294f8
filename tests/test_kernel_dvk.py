"""KernelDvk against a fake ioctl at the cffi boundary (no /dev/dvk on these machines), and
through the emulator's ioctl device (the i386 layout, real traffic) at the end.

The fake receives exactly what libc's ioctl would: (fd, request, arg) with `arg` a `void *`
to the parameter struct or a `long` value.  It decodes the struct through `ffi_native` at call
time, can write output structs through the pointers, and reports errors glibc-style (errno set
through `ffi_native.errno`, result -1).  Request numbers below are transcribed from the module's
request table (dvk_calls.h numbers, `_IOW`/`_IOR`/`_IO` with magic 0xE3).
"""

from __future__ import annotations

import errno
import os

import pytest

from dvk_cffi import consts as C
from dvk_cffi import errors as E
from dvk_cffi import kernel, wire
from dvk_cffi.cdefs import ffi_native as ffi
from dvk_cffi.cdefs import header_to_native
from dvk_cffi.errors import DvkError
from dvk_cffi.info import DcInfo, DvsInfo, NodeInfo, ProcInfo, ProxiesInfo
from dvk_cffi.kernel import KernelDvk

HOST_64 = ffi.sizeof("void *") == 8
ULONG_MAX = (1 << (8 * ffi.sizeof("unsigned long"))) - 1

# request -> (name, parameter struct or None for a plain value); the module's request table
REQUESTS = {
    0x4004E301: ("DVK_DCINIT", "dc_usr_t"),
    0x4004E302: ("DVK_SEND", "parm_ipc_t"),
    0x4004E303: ("DVK_RECEIVE", "parm_ipc_t"),
    0x4004E304: ("DVK_NOTIFY", "parm_notify_t"),
    0x4004E305: ("DVK_SENDREC", "parm_ipc_t"),
    0x4004E306: ("DVK_RCVRQST", "parm_rcvrqst_t"),
    0x4004E307: ("DVK_REPLY", "parm_ipc_t"),
    0x4004E308: ("DVK_DCEND", None),
    0x4004E309: ("DVK_BIND", "parm_bind_t"),
    0x4004E30A: ("DVK_UNBIND", "parm_unbind_t"),
    0x8004E30B: ("DVK_GETPRIV", "parm_priv_t"),
    0x4004E30C: ("DVK_SETPRIV", "parm_priv_t"),
    0x4004E30D: ("DVK_VCOPY", "vcopy_t"),
    0x8004E30E: ("DVK_GETDCINFO", "parm_getdcinfo_t"),
    0x8004E30F: ("DVK_GETPROCINFO", "parm_procinfo_t"),
    0x4004E310: ("DVK_RELAY", "parm_relay_t"),
    0x4004E311: ("DVK_PROXYBIND", "parm_pxbind_t"),
    0x4004E312: ("DVK_PROXYUNBIND", None),
    0x8004E313: ("DVK_GETNODEINFO", "parm_getnodeinfo_t"),
    0x4004E314: ("DVK_PUT2LCL", "parm_put2lcl_t"),
    0x8004E315: ("DVK_GET2RMT", "parm_get2rmt_t"),
    0x4004E316: ("DVK_ADDNODE", "parm_dcnode_t"),
    0x4004E317: ("DVK_DELNODE", "parm_dcnode_t"),
    0x4004E318: ("DVK_DVSINIT", "parm_dvsinit_t"),
    0x0000E319: ("DVK_DVSEND", None),
    0x8004E31A: ("DVK_GETEP", None),
    0x8004E31B: ("DVK_GETDVSINFO", "dvs_usr_t"),
    0x4004E31C: ("DVK_PROXYCONN", "parm_pxconn_t"),
    0x4004E31D: ("DVK_WAIT4BIND", "parm_wait4bind_t"),
    0x4004E31E: ("DVK_MIGRATE", "parm_bind_t"),
    0x4004E31F: ("DVK_NODEUP", "parm_nodeup_t"),
    0x4004E320: ("DVK_NODEDOWN", None),
    0x8004E321: ("DVK_GETPROXYINFO", "parm_proxyinfo_t"),
    0x4004E322: ("DVK_WAKEUPEP", "parm_wakeup_t"),
}
REQ = {name: req for req, (name, _) in REQUESTS.items()}


def addr(p) -> int:
    return int(ffi.cast("uintptr_t", p))


def decode(ctype: str, arg) -> dict:
    """Top-level scalar fields of the struct `arg` points at (pointers as ints, char[] as
    bytes); nested structs are left out."""
    p = ffi.cast(ctype + " *", arg)
    out = {}
    for name, f in ffi.typeof(ctype).fields:
        v = getattr(p, name)
        if f.type.kind == "pointer":
            out[name] = addr(v)
        elif f.type.kind == "array" and f.type.item.cname == "char":
            out[name] = ffi.string(v)
        elif f.type.kind == "primitive":
            out[name] = v
    return out


class Call:
    def __init__(self, fd: int, request: int, arg) -> None:
        self.fd = fd
        self.request = request
        self.name, ctype = REQUESTS[request]
        self.arg = arg
        self.ptr = addr(ffi.cast("void *", arg)) if ctype else None
        self.value = None if ctype else int(ffi.cast("long", arg))
        self.parm = decode(ctype, arg) if ctype else None


class FakeIoctl:
    """Records every call; `result(call)` (or a constant) gives the C return value."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.result = 0

    def __call__(self, fd: int, request: int, arg) -> int:
        assert isinstance(arg, ffi.CData)
        call = Call(fd, request, arg)
        self.calls.append(call)
        return self.result(call) if callable(self.result) else self.result

    @property
    def last(self) -> Call:
        return self.calls[-1]


def fail(err: int) -> int:
    """What libc returns for a negative kernel value: -1 with errno set."""
    ffi.errno = err
    return -1


@pytest.fixture
def fake() -> FakeIoctl:
    return FakeIoctl()


@pytest.fixture
def kd(fake: FakeIoctl) -> KernelDvk:
    return KernelDvk(fd=77, ioctl=fake)


# --- requests, device ----------------------------------------------------------------------------

def test_request_numbers_match_table():
    assert {kernel.REQUESTS[nr] for nr in kernel.REQUESTS} == set(REQUESTS)
    for req, (name, _) in REQUESTS.items():
        nr = getattr(kernel, name)
        assert kernel.REQUESTS[nr] == req, name
        assert req & 0xFF == nr
    assert kernel.DVK_VOID1 not in kernel.REQUESTS
    assert len(kernel.REQUESTS) == 34


def test_missing_device_raises_file_not_found(tmp_path):
    path = str(tmp_path / "dvk")
    with pytest.raises(FileNotFoundError) as info:
        KernelDvk(path, ioctl=FakeIoctl())
    assert info.value.errno == errno.ENOENT
    assert info.value.filename == path
    assert "dvk.ko" in str(info.value) and "--dvk emu" in str(info.value)


def test_default_device_path_missing_here():
    if os.path.exists(C.DVK_FILE_NAME):     # a real DVS node: opening must work
        KernelDvk().close()
    else:
        with pytest.raises(FileNotFoundError):
            KernelDvk()


def test_real_libc_ioctl_on_a_non_dvk_fd():
    """The real cffi path: ioctl on /dev/null fails with ENOTTY -> EDVSNOTTY (-25)."""
    with KernelDvk("/dev/null") as kd:
        fd = kd.fd
        with pytest.raises(E.EDVSNOTTY_Error) as info:
            kd.getdvsinfo()
        assert info.value.code == -25
        with pytest.raises(E.EDVSNOTTY_Error):
            kd.dc_end(0)
    assert kd.fd == -1
    with pytest.raises(OSError):
        os.fstat(fd)


def test_given_fd_is_not_closed(fake):
    r, w = os.pipe()
    try:
        kd = KernelDvk(fd=r, ioctl=fake)
        kd.close()
        os.fstat(r)  # still open
    finally:
        os.close(r)
        os.close(w)


# --- error mapping -------------------------------------------------------------------------------

def test_errno_319_maps_to_edvsnodcnode(kd, fake):
    fake.result = lambda call: fail(319)
    with pytest.raises(E.EDVSNODCNODE_Error) as info:
        kd.add_node(0, 5)
    assert info.value.code == -319
    assert info.value.name == "EDVSNODCNODE"
    assert "add_node" in str(info.value)
    assert isinstance(info.value, DvkError)


def test_raw_negative_result_also_maps(kd, fake):
    fake.result = E.EDVSNONODE          # a fake may return the kernel's code directly
    with pytest.raises(E.EDVSNONODE_Error):
        kd.proxy_conn(1, C.CONNECT_SPROXY)


@pytest.mark.parametrize(("err", "cls"), [(64, E.EDVSNOTCONN_Error), (316, E.EDVSNONODE_Error),
                                          (335, E.EDVSPRIVILEGES_Error), (4, E.EDVSINTR_Error)])
def test_errno_mapping_table(kd, fake, err, cls):
    fake.result = lambda call: fail(err)
    with pytest.raises(cls) as info:
        kd.unbind(0, 10)
    assert info.value.code == -err


# --- info structs ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("obj", "ctype"), [
    (DvsInfo(d_name="TEST_CLUSTER", d_nr_dcs=4, d_dbglvl=0xFF, d_version=202202, d_flags=0x102,
             d_size_proc=1234), "dvs_usr_t"),
    (DcInfo(dc_dcid=2, dc_flags=0, dc_nodes=0x7, dc_warn2proc=5, dc_warnmsg=-1, dc_pid=99,
            dc_name="DC2", dc_cpumask=0xF), "dc_usr_t"),
    (NodeInfo(n_nodeid=3, n_flags=0xE, n_proxies=3, n_dcs=1, n_stime_sec=10, n_stime_nsec=11,
              n_rtime_sec=12, n_rtime_nsec=13, n_pxsent=14, n_pxrcvd=15, n_name="node3"),
     "node_usr_t"),
    (ProxiesInfo(px_id=3, px_flags=0x7, px_maxbytes=32768, px_maxbcmds=0, px_name="px3"),
     "proxies_usr_t"),
    (ProcInfo(p_nr=-2, p_endpoint=-2, p_dcid=1, p_rts_flags=0x1000, p_lpid=-1, p_vpid=7,
              p_nodeid=2, p_nodemap=4, p_misc_flags=0x2001, p_getfrom=C.ANY, p_sendto=C.NONE,
              p_waitmigr=C.NONE, p_waitunbind=C.NONE, p_proxy=C.NONE, p_lclsent=1,
              p_rmtsent=2, p_lclcopy=3, p_rmtcopy=4, p_name="systask", p_cpumask=1),
     "proc_usr_t"),
])
def test_info_native_roundtrip(obj, ctype):
    p = kernel.info_to_native(obj, ctype)
    assert ffi.typeof(p) is ffi.typeof(ctype + " *")
    assert kernel.info_from_native(type(obj), p) == obj


def test_info_names_are_truncated_to_c_strings():
    p = kernel.info_to_native(DvsInfo(d_name="X" * 40), "dvs_usr_t")
    assert ffi.string(p.d_name) == b"X" * 15


# --- administration ------------------------------------------------------------------------------

def test_dvs_init_with_and_without_params(kd, fake):
    def result(call):
        assert call.parm["parm_nodeid"] == 3
        if call.parm["parm_dvs"]:
            dvs = decode("dvs_usr_t", ffi.cast("void *", call.parm["parm_dvs"]))
            assert dvs["d_name"] == b"CLUSTER"
            assert dvs["d_nr_nodes"] == 8 and dvs["d_nr_tasks"] == 35
        return 3
    fake.result = result
    assert kd.dvs_init(3, DvsInfo(d_name="CLUSTER", d_nr_nodes=8)) == 3
    assert fake.last.request == 0x4004E318
    assert fake.last.parm["parm_dvs"] != 0
    assert kd.dvs_init(3) == 3
    assert fake.last.parm["parm_dvs"] == 0
    assert fake.last.fd == 77


def test_dvs_end(kd, fake):
    assert kd.dvs_end() == 0
    assert fake.last.request == 0x0000E319 and fake.last.value == 0


def test_getdvsinfo(kd, fake):
    def result(call):
        p = ffi.cast("dvs_usr_t *", call.arg)
        p.d_name = b"TEST_CLUSTER"
        p.d_nr_dcs, p.d_nr_nodes, p.d_version, p.d_flags = 32, 32, 202202, 0x102
        return 2
    fake.result = result
    node, dvs = kd.getdvsinfo()
    assert fake.last.request == 0x8004E31B
    assert node == 2
    assert (dvs.d_name, dvs.d_nr_dcs, dvs.d_version, dvs.d_flags) == ("TEST_CLUSTER", 32,
                                                                       202202, 0x102)
    # before dvs_init the kernel returns -1, which glibc reports as -1/errno 1
    fake.result = lambda call: fail(1)
    assert kd.getdvsinfo()[0] == -1
    fake.result = lambda call: fail(335)
    with pytest.raises(E.EDVSPRIVILEGES_Error):
        kd.getdvsinfo()


def test_dc_init_and_end(kd, fake):
    masks = []

    def result(call):
        masks.append(getattr(ffi.cast("dc_usr_t *", call.arg).dc_cpumask, "__bits")[0])
        return 4
    fake.result = result
    dc = DcInfo(dc_dcid=1, dc_nr_procs=221, dc_nr_tasks=34, dc_nr_sysprocs=64, dc_nr_nodes=32,
                dc_name="DC1", dc_cpumask=0x3)
    assert kd.dc_init(dc) == 4
    call = fake.last
    assert call.request == 0x4004E301
    assert call.parm["dc_dcid"] == 1 and call.parm["dc_nr_tasks"] == 34
    assert call.parm["dc_nr_sysprocs"] == 64 and call.parm["dc_name"] == b"DC1"
    assert masks == [0x3]
    fake.result = 0
    assert kd.dc_end(7) == 0
    assert fake.last.request == 0x4004E308 and fake.last.value == 7


def test_getdcinfo(kd, fake):
    def result(call):
        assert call.parm["parm_dcid"] == -1
        p = ffi.cast("dc_usr_t *", call.parm["parm_dc"])
        p.dc_dcid, p.dc_flags, p.dc_nr_procs, p.dc_nodes, p.dc_pid = 0, 0, 221, 0x6, 123
        p.dc_name = b"DC0"
        return 0
    fake.result = result
    dc = kd.getdcinfo(-1)
    assert fake.last.request == 0x8004E30E
    assert (dc.dc_dcid, dc.dc_nr_procs, dc.dc_nodes, dc.dc_pid, dc.dc_name) == (
        0, 221, 0x6, 123, "DC0")


def test_getnodeinfo(kd, fake):
    def result(call):
        assert call.parm["parm_nodeid"] == 2
        p = ffi.cast("node_usr_t *", call.parm["parm_node"])
        p.n_nodeid, p.n_flags, p.n_proxies, p.n_dcs = 2, 0xE, 2, 1
        p.n_stimestamp.tv_sec, p.n_rtimestamp.tv_nsec = 1000, 999
        p.n_pxsent, p.n_name = 17, b"node2"
        return 0
    fake.result = result
    n = kd.getnodeinfo(2)
    assert fake.last.request == 0x8004E313
    assert (n.n_nodeid, n.n_flags, n.n_proxies, n.n_dcs, n.n_stime_sec, n.n_rtime_nsec,
            n.n_pxsent, n.n_name) == (2, 0xE, 2, 1, 1000, 999, 17, "node2")


def test_getprocinfo_and_getproxyinfo(kd, fake):
    def result(call):
        if call.request == 0x8004E30F:
            assert (call.parm["parm_dcid"], call.parm["parm_nr"]) == (0, 10)
            p = ffi.cast("proc_usr_t *", call.parm["parm_proc"])
            p.p_nr, p.p_endpoint, p.p_rts_flags, p.p_lpid, p.p_name = 10, 10, 0x1000, -1, b"rclient"
            return 0
        assert call.parm["parm_pxid"] == 2
        for key, name in (("parm_spx", b"px2_s"), ("parm_rpx", b"px2_r")):
            p = ffi.cast("proc_usr_t *", call.parm[key])
            p.p_nr, p.p_endpoint, p.p_misc_flags, p.p_name = 2, C.NONE, C.MIS_PROXY, name
        return 0
    fake.result = result
    p = kd.getprocinfo(0, 10)
    assert fake.last.request == 0x8004E30F
    assert (p.p_nr, p.p_rts_flags, p.p_lpid, p.p_name) == (10, C.REMOTE, -1, "rclient")
    s, r = kd.getproxyinfo(2)
    assert fake.last.request == 0x8004E321
    assert (s.p_endpoint, s.p_name, r.p_name, r.p_misc_flags) == (C.NONE, "px2_s", "px2_r", 1)


def test_node_and_proxy_calls(kd, fake):
    names = {}

    def result(call):
        if call.parm and "parm_name" in call.parm:
            names[call.name] = ffi.string(ffi.cast("char *", call.parm["parm_name"]))
        return 0
    fake.result = result
    assert kd.proxies_bind("node2", 2, 1001, 1002) == 0
    assert fake.last.request == 0x4004E311
    assert {k: v for k, v in fake.last.parm.items() if k != "parm_name"} == {
        "parm_pxid": 2, "parm_spid": 1001, "parm_rpid": 1002, "parm_maxbuf": C.MAXCOPYBUF}
    assert kd.proxies_unbind(2) == 0
    assert (fake.last.request, fake.last.value) == (0x4004E312, 2)
    assert kd.node_up("a-very-long-node-name", 2, 2) == 0
    assert fake.last.request == 0x4004E31F
    assert (fake.last.parm["parm_nodeid"], fake.last.parm["parm_pxid"]) == (2, 2)
    assert kd.node_down(2) == 0
    assert (fake.last.request, fake.last.value) == (0x4004E320, 2)
    assert kd.proxy_conn(2, C.DISCONNECT_RPROXY) == 0
    assert fake.last.request == 0x4004E31C
    assert fake.last.parm == {"parm_pxid": 2, "parm_sts": 4}
    assert kd.add_node(1, 2) == 0
    assert (fake.last.request, fake.last.parm) == (0x4004E316, {"parm_dcid": 1, "parm_nodeid": 2})
    assert kd.del_node(1, 2) == 0
    assert (fake.last.request, fake.last.parm) == (0x4004E317, {"parm_dcid": 1, "parm_nodeid": 2})
    assert names == {"DVK_PROXYBIND": b"node2", "DVK_NODEUP": b"a-very-long-nod"}  # 15 + NUL


# --- binding -------------------------------------------------------------------------------------

def test_bind_struct_and_result(kd, fake):
    fake.result = 10
    assert kd.bind(0, 10) == 10
    assert fake.last.request == 0x4004E309
    assert fake.last.parm == {"parm_cmd": C.SELF_BIND, "parm_dcid": 0, "parm_pid": -1,
                              "parm_ep": 10, "parm_nodeid": C.LOCALNODE}
    assert kd.lclbind(1, 4321, 20) == 10
    assert fake.last.parm == {"parm_cmd": C.LCL_BIND, "parm_dcid": 1, "parm_pid": 4321,
                              "parm_ep": 20, "parm_nodeid": C.LOCALNODE}
    assert kd.bkupbind(1, 55, 20, 3) == 10
    assert fake.last.parm["parm_cmd"] == C.BKUP_BIND and fake.last.parm["parm_nodeid"] == 3


def test_bind_negative_task_endpoint_is_success(kd, fake):
    # the kernel returns -2 (SYSTEM); glibc makes it -1 with errno 2
    fake.result = lambda call: fail(2)
    assert kd.bind(0, C.SYSTEM) == C.SYSTEM
    fake.result = lambda call: fail(1)
    assert kd.bind(0, C.HARDWARE) == C.HARDWARE


def test_bind_errors(kd, fake):
    fake.result = lambda call: fail(319)
    with pytest.raises(E.EDVSNODCNODE_Error) as info:
        kd.bind(0, 10)
    assert info.value.code == -319
    fake.result = lambda call: fail(337)
    with pytest.raises(E.EDVSSLOTUSED_Error):
        kd.bind(0, -2)


def test_rmtbind(kd, fake):
    fake.result = lambda call: (
        ffi.string(ffi.cast("char *", ffi.cast("intptr_t", call.parm["parm_pid"])))
        == b"rclient" and 50)
    if HOST_64:
        with pytest.raises(E.EDVSNOSYS_Error) as info:
            kd.rmtbind(0, "rclient", 50, 2)
        assert "parm_pid" in str(info.value) and "64-bit" in str(info.value)
        assert fake.calls == []
    else:  # pragma: no cover - i386 host
        assert kd.rmtbind(0, "rclient", 50, 2) == 50
        assert fake.last.parm["parm_cmd"] == C.RMT_BIND
        assert fake.last.parm["parm_nodeid"] == 2 and fake.last.parm["parm_ep"] == 50


def test_unbind(kd, fake):
    assert kd.unbind(0, 10) == 0
    assert fake.last.request == 0x4004E30A
    assert fake.last.parm == {"parm_dcid": 0, "parm_ep": 10, "parm_tout": ULONG_MAX}
    kd.unbind(0, 10, 5000)
    assert fake.last.parm["parm_tout"] == 5000


def test_wait4bind(kd, fake):
    fake.result = C.NONE                        # a proxy waits for its bind: NONE
    assert kd.wait4bind(C.RETRY_MS) == C.NONE
    assert fake.last.request == 0x4004E31D
    assert fake.last.parm == {"parm_cmd": C.WAIT_BIND, "parm_ep": C.SELF,
                              "parm_tout": C.RETRY_MS}
    fake.result = 0
    assert kd.wait4unbind(20) == 0
    assert fake.last.parm == {"parm_cmd": C.WAIT_UNBIND, "parm_ep": 20, "parm_tout": ULONG_MAX}
    fake.result = lambda call: fail(2)
    assert kd.wait4bindep(-2) == -2
    fake.result = lambda call: fail(61)
    with pytest.raises(E.EDVSTIMEDOUT_Error):
        kd.wait4bind(0)


def test_getep(kd, fake):
    fake.result = 42
    assert kd.getep(1234) == 42
    assert (fake.last.request, fake.last.value) == (0x8004E31A, 1234)
    fake.result = lambda call: fail(3)
    assert kd.getep(1) == -3                    # a task endpoint (SYSTASK(1))
    fake.result = lambda call: fail(310)
    with pytest.raises(E.EDVSNOTBIND_Error):
        kd.getep(1)


def test_migrate(kd, fake):
    assert kd.migrate_X(C.MIGR_COMMIT, 99, 0, 10, 3) == 0
    assert fake.last.request == 0x4004E31E
    assert fake.last.parm == {"parm_cmd": C.MIGR_COMMIT, "parm_dcid": 0, "parm_pid": 99,
                              "parm_ep": 10, "parm_nodeid": 3}


# --- IPC -----------------------------------------------------------------------------------------

def msg_addr(m) -> int:
    return addr(ffi.from_buffer(m.buf)) + m.base


@pytest.mark.parametrize(("method", "name"), [("send", "DVK_SEND"), ("receive", "DVK_RECEIVE"),
                                              ("sendrec", "DVK_SENDREC"),
                                              ("reply", "DVK_REPLY")])
def test_ipc_calls(kd, fake, method, name):
    m = kd.message()
    m.m_type = 0x0A
    m.m1_i1 = 7
    m.m1_p1 = 4

    def result(call):
        p = ffi.cast("message *", call.parm["parm_mptr"])
        assert (p.m_type, p.m_u.m_m1.m1i1, addr(p.m_u.m_m1.m1p1)) == (0x0A, 7, 4)
        p.m_source = 10                          # the kernel writes the reply in place
        p.m_type = 0x0B
        return 36                                # kernel values >= 0 are success
    fake.result = result
    assert getattr(kd, method)(10, m, 30000) == 0
    call = fake.last
    assert call.request == REQ[name]
    assert call.parm["parm_ep"] == 10 and call.parm["parm_tout"] == 30000
    assert call.parm["parm_mptr"] == msg_addr(m)
    assert (m.m_source, m.m_type) == (10, 0x0B)
    fake.result = 0
    getattr(kd, method)(C.ANY, m)
    assert fake.last.parm["parm_tout"] == ULONG_MAX  # TIMEOUT_FOREVER
    fake.result = lambda call: fail(11)
    with pytest.raises(E.EDVSAGAIN_Error):
        getattr(kd, method)(10, m, C.TIMEOUT_NOWAIT)


def test_native_message_layout(kd):
    m = kd.message()
    assert len(bytes(m)) == ffi.sizeof("message")
    m.m_source, m.m_type = 5, 6
    m.m1_i1, m.m1_i2, m.m1_i3 = 1, 2, 3
    m.m1_p1, m.m1_p2, m.m1_p3 = 0x1000, 0x2000, 0x3000
    p = ffi.cast("message *", ffi.from_buffer(m.buf))
    s = p.m_u.m_m1
    assert (p.m_source, p.m_type, s.m1i1, s.m1i2, s.m1i3) == (5, 6, 1, 2, 3)
    assert [addr(x) for x in (s.m1p1, s.m1p2, s.m1p3)] == [0x1000, 0x2000, 0x3000]
    p.m_u.m_m4.m4l5 = -77
    p.m_u.m_m9.m9t1.tv_nsec = 123
    assert m.m9_t1_nsec == 123
    p.m_u.m_m4.m4l5 = -77
    assert m.m4_l5 == -77
    m.mA_ia = [1, 2, 3, 4]
    assert list(p.m_u.m_mA.mAia) == [1, 2, 3, 4]
    m.clear()
    assert bytes(m) == bytes(ffi.sizeof("message"))
    if HOST_64:
        assert type(m) is not wire.Message and isinstance(m, wire.Message)
        assert type(m).SIZE == 48
    else:  # pragma: no cover - i386 host
        assert type(m) is wire.Message


def test_message_of_wrong_layout_is_refused(kd, fake):
    if HOST_64:
        with pytest.raises(TypeError, match="48-byte"):
            kd.send(10, wire.Message())
        assert fake.calls == []
    # a cdata message * is accepted as it is
    cm = ffi.new("message *")
    kd.send(10, cm)
    assert fake.last.parm["parm_mptr"] == addr(cm)


def test_notify(kd, fake):
    fake.result = 36
    assert kd.notify(20) == 0
    assert fake.last.request == 0x4004E304
    assert fake.last.parm == {"parm_nr": C.SELF, "parm_ep": 20, "parm_val": C.HARDWARE}
    kd.hdw_notify(1, 20)
    assert fake.last.parm == {"parm_nr": C.HARDWARE, "parm_ep": 20, "parm_val": 1}
    kd.ntfy_value(3, 20, 99)
    assert fake.last.parm == {"parm_nr": 3, "parm_ep": 20, "parm_val": 99}


def test_rcvrqst_returns_raw_value(kd, fake):
    m = kd.message()
    fake.result = 0
    assert kd.rcvrqst(m, 1000) == 0
    assert fake.last.request == 0x4004E306
    assert fake.last.parm == {"parm_mptr": msg_addr(m), "parm_tout": 1000}


def test_relay_and_wakeup(kd, fake):
    m = kd.message()
    assert kd.relay(20, m) == 0
    assert fake.last.request == 0x4004E310
    assert fake.last.parm == {"parm_ep": 20, "parm_mptr": msg_addr(m)}
    assert kd.wakeup(0, 20) == 0
    assert (fake.last.request, fake.last.parm) == (0x4004E322, {"parm_dcid": 0, "parm_ep": 20})
    fake.result = E.EDVSPROCRUN
    with pytest.raises(E.EDVSPROCRUN_Error):
        kd.wakeup(0, 20)


def test_vcopy(kd, fake):
    src = kd.alloc(64)
    dst = kd.alloc(64)
    src.write(b"hello")

    def result(call):
        ffi.memmove(ffi.cast("void *", call.parm["v_daddr"]),
                    ffi.cast("void *", call.parm["v_saddr"]), call.parm["v_bytes"])
        return 5
    fake.result = result
    assert kd.vcopy(10, src.addr, 20, dst.addr, 5) == 5
    assert fake.last.request == 0x4004E30D
    assert fake.last.parm == {"v_src": 10, "v_dst": 20, "v_rqtr": C.SELF, "v_saddr": src.addr,
                              "v_daddr": dst.addr, "v_bytes": 5}
    assert dst.read(5) == b"hello"


def test_alloc(kd):
    buf = kd.alloc(128)
    assert len(buf) == 128
    buf.write(b"abc", 10)
    assert ffi.buffer(ffi.cast("char *", buf.addr) + 10, 3)[:] == b"abc"


def test_getpriv_setpriv(kd, fake):
    size = ffi.sizeof("priv_usr_t")
    assert size == (72 if HOST_64 else 52)
    seen = {}

    def result(call):
        p = ffi.cast("priv_usr_t *", call.parm["parm_priv"])
        if call.request == 0x8004E30B:
            p.priv_id, p.priv_level = 7, C.SERVER_PRIV
            p.priv_dvk_allowed.chunk[0] = 0xFFFF
        else:
            seen["priv"] = ffi.buffer(p)[:]
        return 0
    fake.result = result
    raw = kd.getpriv(0, 10)
    assert fake.last.request == 0x8004E30B
    assert (fake.last.parm["parm_dcid"], fake.last.parm["parm_ep"]) == (0, 10)
    assert len(raw) == size
    p = ffi.cast("priv_usr_t *", ffi.from_buffer(raw))
    assert (p.priv_id, p.priv_level, p.priv_dvk_allowed.chunk[0]) == (7, 1, 0xFFFF)
    assert kd.setpriv(0, 10, raw) == 0
    assert fake.last.request == 0x4004E30C and seen["priv"] == raw
    with pytest.raises(ValueError):
        kd.setpriv(0, 10, raw[:-1])


# --- proxies -------------------------------------------------------------------------------------

def test_get2rmt_put2lcl_refused_on_64bit(kd, fake):
    if not HOST_64:  # pragma: no cover - i386 host
        assert kd.proxy_capable
        return
    assert not kd.proxy_capable
    pay = kd.alloc(C.MAXCOPYBUF)
    with pytest.raises(E.EDVSNOSYS_Error, match="i386"):
        kd.get2rmt(wire.Header(), pay)
    with pytest.raises(E.EDVSNOSYS_Error, match="layout is i386"):
        kd.put2lcl(wire.Header(), None)
    assert fake.calls == []
    # the inspection calls work on the same object
    kd.getnodeinfo(0)
    assert fake.last.request == 0x8004E313


@pytest.fixture
def kdp(fake) -> KernelDvk:
    """A KernelDvk that proxies whatever the host layout (parameter passing tests)."""
    return KernelDvk(fd=78, ioctl=fake, proxy_capable=True)


def test_get2rmt(kdp, fake):
    pay = kdp.alloc(C.MAXCOPYBUF)

    def result(call):
        assert call.parm["parm_pay"] == pay.addr
        cmd = ffi.cast("cmd_t *", call.parm["parm_cmd"])
        cmd.c_cmd, cmd.c_dcid, cmd.c_src, cmd.c_dst = C.CMD_COPYIN_DATA, 0, 10, 20
        cmd.c_snode, cmd.c_dnode, cmd.c_len, cmd.c_pid = 1, 2, 5, 4321
        cmd.c_timestamp.tv_sec, cmd.c_timestamp.tv_nsec = 1700000000, 5
        cmd.c_msg.m_source, cmd.c_msg.m_type = 10, 3
        cmd.c_vcopy.v_src, cmd.c_vcopy.v_dst, cmd.c_vcopy.v_rqtr = 10, 20, 10
        cmd.c_vcopy.v_saddr = ffi.cast("void *", 0x8000)
        cmd.c_vcopy.v_daddr = ffi.cast("void *", 0x9000)
        cmd.c_vcopy.v_bytes = 5
        ffi.memmove(ffi.cast("void *", call.parm["parm_pay"]), b"DATA!", 5)
        return 0
    fake.result = result
    hdr = wire.Header()
    assert kdp.get2rmt(hdr, pay) == 0
    assert fake.last.request == 0x8004E315
    assert fake.last.parm["parm_tout"] == C.HELLO_PERIOD
    assert (hdr.c_cmd, hdr.c_src, hdr.c_dst, hdr.c_snode, hdr.c_dnode, hdr.c_len, hdr.c_pid) == (
        C.CMD_COPYIN_DATA, 10, 20, 1, 2, 5, 4321)
    assert (hdr.c_tv_sec, hdr.c_tv_nsec) == (1700000000, 5)
    assert (hdr.c_msg.m_source, hdr.c_msg.m_type) == (10, 3)
    assert (hdr.v_saddr, hdr.v_daddr, hdr.v_bytes) == (0x8000, 0x9000, 5)
    assert pay.read(5) == b"DATA!"
    kdp.get2rmt(hdr, pay, C.TIMEOUT_NOWAIT)
    assert fake.last.parm["parm_tout"] == 0
    fake.result = lambda call: fail(61)
    with pytest.raises(E.EDVSTIMEDOUT_Error):
        kdp.get2rmt(hdr, pay)
    with pytest.raises(ValueError):
        kdp.get2rmt(hdr, kdp.alloc(100))


def test_put2lcl(kdp, fake):
    pay = kdp.alloc(C.MAXCOPYBUF)
    hdr = wire.make_header(c_cmd=C.CMD_SEND_MSG, c_dcid=0, c_src=50, c_dst=10, c_snode=1,
                           c_dnode=2, c_pid=77, c_flags=C.FLAG_CHECK_HDR)
    hdr.c_msg.m_source = 50
    hdr.c_msg.m_type = 0x0A

    def result(call):
        cmd = ffi.cast("cmd_t *", call.parm["parm_cmd"])
        assert (cmd.c_cmd, cmd.c_src, cmd.c_dst, cmd.c_snode, cmd.c_dnode, cmd.c_pid,
                cmd.c_flags) == (C.CMD_SEND_MSG, 50, 10, 1, 2, 77, C.FLAG_CHECK_HDR)
        assert (cmd.c_msg.m_source, cmd.c_msg.m_type) == (50, 0x0A)
        return 36                                 # put2lcl returns the raw kernel value
    fake.result = result
    assert kdp.put2lcl(hdr, pay) == 36
    assert fake.last.request == 0x4004E314
    assert fake.last.parm["parm_pay"] == pay.addr
    assert kdp.put2lcl(hdr, None) == 36
    assert fake.last.parm["parm_pay"] == 0
    fake.result = lambda call: fail(316)
    with pytest.raises(E.EDVSNONODE_Error) as info:
        kdp.put2lcl(hdr, pay)
    assert info.value.code == -316


def test_header_to_native_used_by_put2lcl_matches(kdp):
    h = wire.make_header(c_cmd=C.CMD_COPYOUT_DATA, v_saddr=0x1234, v_bytes=9)
    p = header_to_native(h)
    assert addr(p.c_vcopy.v_saddr) == 0x1234 and p.c_vcopy.v_bytes == 9


# --- through the emulator's ioctl device (i386 structs at 32-bit addresses) ------------------

@pytest.fixture
def kdev(start_node):
    """KernelDvk driving emulated node 1 through EmuDevice."""
    from dvk_cffi.emu.ioctl import EmuDevice
    start_node(1)
    kd = KernelDvk(device=EmuDevice(nodeid=1))
    try:
        yield kd
    finally:
        kd.close()


def test_device_layout_is_i386_and_proxies(kdev):
    assert kdev.ffi.sizeof("cmd_t") == wire.HEADER_SIZE
    assert kdev.proxy_capable and kdev.emulated
    assert type(kdev.message()) is wire.Message
    assert kdev.fd >= 0
    buf = kdev.alloc(64)
    assert buf.addr < 1 << 32 and len(buf) == 64


def test_device_info_and_binding_calls(kdev):
    import threading
    node, dvs = kdev.getdvsinfo()
    assert node == 1 and dvs.d_nr_procs == 221
    dc = kdev.getdcinfo(0)
    assert (dc.dc_name, dc.dc_nr_sysprocs, dc.dc_flags) == ("DC0", 64, C.DC_RUNNING)
    assert kdev.dc_init(DcInfo(dc_dcid=2, dc_name="DC2", dc_nr_procs=100)) == 1
    assert kdev.getdcinfo(2).dc_nr_procs == 100
    assert kdev.dc_end(2) == 0
    assert kdev.getnodeinfo(1).n_name == "node1"
    assert kdev.bind(0, 10) == 10
    p = kdev.getprocinfo(0, 10)
    assert (p.p_endpoint, p.p_lpid, p.p_nodeid) == (10, threading.get_native_id(), 1)
    assert kdev.getep(threading.get_native_id()) == 10
    raw = kdev.getpriv(0, 10)
    assert len(raw) == 52
    assert kdev.setpriv(0, 10, raw) == 0
    with pytest.raises(E.EDVSTIMEDOUT_Error):
        kdev.wait4bindep(12, 20)
    with pytest.raises(E.EDVSNOTBIND_Error):
        kdev.unbind(0, 11, 0)
    assert kdev.unbind(0, 10) == 0


def test_device_proxy_pair_rmtbind_put2lcl_get2rmt(kdev):
    """A proxy pair for node 2 run by two threads of this test, all on KernelDvk."""
    import threading
    from concurrent.futures import ThreadPoolExecutor
    sproxy, rproxy = ThreadPoolExecutor(1), ThreadPoolExecutor(1)
    try:
        stid = sproxy.submit(lambda: (kdev.getdvsinfo(), threading.get_native_id())[1]).result(10)
        rtid = rproxy.submit(lambda: (kdev.getdvsinfo(), threading.get_native_id())[1]).result(10)
        assert kdev.proxies_bind("node2", 2, stid, rtid) == 0
        assert kdev.node_up("node2", 2, 2) == 0
        kdev.proxy_conn(2, C.CONNECT_SPROXY)
        kdev.proxy_conn(2, C.CONNECT_RPROXY)
        s, r = kdev.getproxyinfo(2)
        assert (s.p_lpid, r.p_lpid) == (stid, rtid)
        assert kdev.add_node(0, 2) == 0
        assert kdev.rmtbind(0, "rsender", 20, 2) == 20      # the name through parm_pid
        info = kdev.getprocinfo(0, 20)
        assert info.p_rts_flags & C.REMOTE and (info.p_nodeid, info.p_name) == (2, "rsender")
        assert kdev.bind(0, 10) == 10
        h = wire.make_header(c_cmd=C.CMD_SEND_MSG, c_dcid=0, c_src=20, c_dst=10, c_snode=2,
                             c_dnode=1, c_pid=99)
        h.c_msg.m_source, h.c_msg.m_type = 20, 0x0A
        pay = kdev.alloc(C.MAXCOPYBUF)
        assert rproxy.submit(kdev.put2lcl, h, pay).result(10) >= 0
        m = kdev.message()
        kdev.receive(20, m, 5000)
        assert (m.m_source, m.m_type) == (20, 0x0A)
        got = wire.Header()
        spay = kdev.alloc(C.MAXCOPYBUF)
        assert sproxy.submit(kdev.get2rmt, got, spay, 5000).result(10) == 0
        assert (got.c_cmd, got.c_src, got.c_dst, got.c_dnode) == (C.CMD_SEND_ACK, 10, 20, 2)
        with pytest.raises(E.EDVSTIMEDOUT_Error):
            sproxy.submit(kdev.get2rmt, got, spay, C.TIMEOUT_NOWAIT).result(10)
        assert kdev.del_node(0, 2) == 0
        assert kdev.node_down(2) == 0
        assert kdev.proxies_unbind(2) == 0
    finally:
        sproxy.shutdown()
        rproxy.shutdown()


def test_device_parameter_blocks_are_reused_across_threads(kdev):
    """Each call borrows a block of device memory for its structs and gives it back: many
    calls from several threads use as many blocks as ran at once, not one per call."""
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: kdev.getnodeinfo(1), range(200)))
    assert 1 <= len(kdev._pool.free) <= 4


def test_device_in_a_forked_child_uses_its_own_memory(kdev):
    """A forked child is a new process to the node kernel: the parent's parameter blocks and
    buffers are not its memory, so it allocates its own and its calls work."""
    assert kdev.bind(0, 10) == 10
    assert kdev._pool.free
    pid = os.fork()
    if pid == 0:                                              # pragma: no cover - the child
        ok = False
        try:
            ok = (not kdev._pool.free and kdev.bind(0, 12) == 12
                  and kdev.getprocinfo(0, 12).p_lpid == os.getpid())
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert kdev.getprocinfo(0, 10).p_endpoint == 10           # the parent goes on as before
