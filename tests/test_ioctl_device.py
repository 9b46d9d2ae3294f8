"""The emulator's ioctl-level entry (`EmuDevice`): each request decoded from hand-built i386
parameter structs, against a real node kernel process.

The structs are written here field by field with `cdefs.ffi_i386` into the device's memory (not
by `KernelDvk`, so the encoder and the decoder are checked independently), and the request
numbers are the module's, transcribed from its `_IOW`/`_IOR`/`_IO` table.  `Recorder` sits
between the device and its real `EmuDvk` connection: it notes every call the decoder makes and
passes it on, so each test sees both the decoded arguments and the node kernel's real effect.
"""

from __future__ import annotations

import errno
import threading
import time
from concurrent.futures import Future

import pytest

from dvk_cffi import consts as C
from dvk_cffi import errors as E
from dvk_cffi.cdefs import ffi_i386 as ffi
from dvk_cffi.emu.client import EmuDvk
from dvk_cffi.emu.ioctl import EmuDevice
from dvk_cffi.info import DcInfo, DvsInfo, ProcInfo
from dvk_cffi.wire import Header, Message, make_header

REQ = {
    "DCINIT": 0x4004E301, "SEND": 0x4004E302, "RECEIVE": 0x4004E303, "NOTIFY": 0x4004E304,
    "SENDREC": 0x4004E305, "RCVRQST": 0x4004E306, "REPLY": 0x4004E307, "DCEND": 0x4004E308,
    "BIND": 0x4004E309, "UNBIND": 0x4004E30A, "GETPRIV": 0x8004E30B, "SETPRIV": 0x4004E30C,
    "VCOPY": 0x4004E30D, "GETDCINFO": 0x8004E30E, "GETPROCINFO": 0x8004E30F,
    "RELAY": 0x4004E310, "PROXYBIND": 0x4004E311, "PROXYUNBIND": 0x4004E312,
    "GETNODEINFO": 0x8004E313, "PUT2LCL": 0x4004E314, "GET2RMT": 0x8004E315,
    "ADDNODE": 0x4004E316, "DELNODE": 0x4004E317, "DVSINIT": 0x4004E318, "DVSEND": 0x0000E319,
    "GETEP": 0x8004E31A, "GETDVSINFO": 0x8004E31B, "PROXYCONN": 0x4004E31C,
    "WAIT4BIND": 0x4004E31D, "MIGRATE": 0x4004E31E, "NODEUP": 0x4004E31F,
    "NODEDOWN": 0x4004E320, "GETPROXYINFO": 0x8004E321, "WAKEUPEP": 0x4004E322,
}
FOREVER = 0xFFFFFFFF          # TIMEOUT_FOREVER as the 32-bit unsigned long field holds it
WAIT = 10.0                   # s, how long a test waits for a thread's call


class Recorder:
    """The device's EmuDvk: every DVK call is noted as (name, args), then performed."""

    def __init__(self, emu: EmuDvk) -> None:
        self.emu = emu
        self.calls: list[tuple[str, tuple]] = []

    def __getattr__(self, name: str):
        real = getattr(self.emu, name)
        if name in ("alloc", "close", "proc_text"):
            return real

        def call(*args):
            self.calls.append((name, args))
            return real(*args)
        return call

    def last(self, name: str) -> tuple:
        return next(args for n, args in reversed(self.calls) if n == name)


class Dev:
    """A device, its descriptor, and helpers to build i386 structs in its memory."""

    def __init__(self, emu: EmuDvk) -> None:
        self.rec = Recorder(emu)
        self.device = EmuDevice(self.rec)
        self.fd = self.device.open()

    def new(self, ctype: str, **fields):
        """(address, cdata) of a zeroed `ctype` in device memory with `fields` set."""
        buf = self.device.alloc(ffi.sizeof(ctype))
        p = ffi.from_buffer(ctype + " *", buf.view, require_writable=True)
        for k, v in fields.items():
            setattr(p, k, v)
        return buf.addr, p

    def text(self, value: bytes, size: int = 16) -> int:
        buf = self.device.alloc(size)
        buf.write(value.ljust(size, b"\0")[:size])
        return buf.addr

    def message(self, **fields) -> tuple[int, Message]:
        """(address, Message view) of a message in device memory."""
        buf = self.device.alloc(36)
        m = Message(buf.view)
        for k, v in fields.items():
            setattr(m, k, v)
        return buf.addr, m

    def ioctl(self, name: str, arg: int) -> int:
        return self.device.ioctl(self.fd, REQ[name], arg)

    def bind(self, ep: int) -> int:
        addr, _ = self.new("parm_bind_t", parm_cmd=C.SELF_BIND, parm_dcid=0, parm_pid=-1,
                           parm_ep=ep, parm_nodeid=C.LOCALNODE)
        return self.ioctl("BIND", addr)


def in_thread(fn) -> Future:
    """Run `fn` in a new thread (a task of its own to the node kernel)."""
    fut: Future = Future()

    def run():
        try:
            fut.set_result(fn())
        except BaseException as exc:  # handed to the test
            fut.set_exception(exc)
    threading.Thread(target=run, daemon=True).start()
    return fut


class Actor:
    """A thread with a stable TID running the calls handed to it (one task to the kernel)."""

    def __init__(self) -> None:
        self._jobs: list = []
        self._cv = threading.Condition()
        ready: Future = Future()
        threading.Thread(target=self._run, args=(ready,), daemon=True).start()
        self.tid = ready.result(WAIT)

    def _run(self, ready: Future) -> None:
        ready.set_result(threading.get_native_id())
        while True:
            with self._cv:
                while not self._jobs:
                    self._cv.wait()
                fut, fn = self._jobs.pop(0)
            if fn is None:
                return
            try:
                fut.set_result(fn())
            except BaseException as exc:  # handed to the test
                fut.set_exception(exc)

    def submit(self, fn) -> Future:
        fut: Future = Future()
        with self._cv:
            self._jobs.append((fut, fn))
            self._cv.notify()
        return fut

    def call(self, fn):
        return self.submit(fn).result(WAIT)

    def stop(self) -> None:
        self.submit(None)


def proxy_pair(dev: Dev, actors: list) -> tuple[Actor, Actor]:
    """Node 2's proxy pair on node 1, registered and connected through the device: two actor
    threads that have each talked to the kernel (proxies_bind names them by TID)."""
    sproxy, rproxy = Actor(), Actor()
    actors += [sproxy, rproxy]
    for actor in (sproxy, rproxy):
        out, _ = dev.new("dvs_usr_t")
        assert actor.call(lambda out=out: dev.ioctl("GETDVSINFO", out)) == 1
    name = dev.text(b"node2")
    bind, _ = dev.new("parm_pxbind_t", parm_name=name, parm_pxid=2, parm_spid=sproxy.tid,
                      parm_rpid=rproxy.tid, parm_maxbuf=C.MAXCOPYBUF)
    assert dev.ioctl("PROXYBIND", bind) == 0
    up, _ = dev.new("parm_nodeup_t", parm_name=name, parm_nodeid=2, parm_pxid=2)
    assert dev.ioctl("NODEUP", up) == 0
    for status in (C.CONNECT_SPROXY, C.CONNECT_RPROXY):
        conn, _ = dev.new("parm_pxconn_t", parm_pxid=2, parm_sts=status)
        assert dev.ioctl("PROXYCONN", conn) == 0
    return sproxy, rproxy


@pytest.fixture
def actors():
    holder: list[Actor] = []
    yield holder
    for actor in holder:
        actor.stop()


@pytest.fixture
def dev(start_node):
    start_node(1)
    emu = EmuDvk(nodeid=1)
    d = Dev(emu)
    try:
        yield d
    finally:
        emu.close()


# --- the dispatcher ---------------------------------------------------------------------------

def test_dispatcher_checks_fd_magic_and_number(dev):
    addr, _ = dev.new("dvs_usr_t")
    assert dev.device.ioctl(dev.fd + 1, REQ["GETDVSINFO"], addr) == -errno.EBADF
    assert dev.device.ioctl(dev.fd, (REQ["GETDVSINFO"] & ~0xFF00) | 0xE400, addr) == -errno.ENOTTY
    assert dev.device.ioctl(dev.fd, 0x4004E323, addr) == -errno.ENOTTY     # nr 35
    assert dev.device.ioctl(dev.fd, 0x4004E300, 0) == E.EDVSNOSYS         # DVK_VOID1
    assert dev.rec.calls == []
    fd2 = dev.device.open()
    dev.device.close(fd2)
    assert dev.device.ioctl(fd2, REQ["GETDVSINFO"], addr) == -errno.EBADF
    assert dev.ioctl("GETDVSINFO", addr) == 1                             # fd still open


def test_addresses_outside_the_devices_memory_fault(dev):
    assert dev.ioctl("GETDCINFO", 0x1000) == E.EDVS2BIG                   # the parm struct
    parm, _ = dev.new("parm_getdcinfo_t", parm_dcid=0, parm_dc=0x1000)
    assert dev.ioctl("GETDCINFO", parm) == E.EDVSFAULT                   # what it points at
    parm, _ = dev.new("parm_ipc_t", parm_ep=C.ANY, parm_mptr=0, parm_tout=0)
    assert dev.ioctl("RECEIVE", parm) == E.EDVSFAULT
    small = dev.device.alloc(8)                                           # too short a struct
    assert dev.ioctl("GETPROCINFO", small.addr) == E.EDVS2BIG
    assert [n for n, _ in dev.rec.calls] == []


# --- DVS / DC / node administration ------------------------------------------------------------

def test_getdvsinfo_writes_the_struct_and_returns_the_node(dev):
    addr, p = dev.new("dvs_usr_t")
    assert dev.ioctl("GETDVSINFO", addr) == 1
    assert (p.d_nr_nodes, p.d_nr_procs, p.d_nr_sysprocs, p.d_max_copybuf) == (32, 221, 64,
                                                                           C.MAXCOPYBUF)
    assert ffi.string(p.d_name) == b"DEFAULT"


def test_dvs_end_and_dvs_init(dev):
    assert dev.ioctl("DVSEND", 0) == 0
    addr, _ = dev.new("dvs_usr_t")
    assert dev.ioctl("GETDVSINFO", addr) == -1                            # not initialised
    dvs, _ = dev.new("dvs_usr_t", d_name=b"IOCTL", d_nr_dcs=4, d_nr_nodes=8, d_nr_procs=100,
                     d_nr_tasks=35, d_nr_sysprocs=64, d_max_copybuf=C.MAXCOPYBUF,
                     d_max_copylen=C.MAXCOPYLEN)
    parm, _ = dev.new("parm_dvsinit_t", parm_nodeid=1, parm_dvs=dvs)
    assert dev.ioctl("DVSINIT", parm) == 1
    nodeid, info = dev.rec.last("dvs_init")
    assert nodeid == 1 and (info.d_name, info.d_nr_dcs, info.d_nr_nodes) == ("IOCTL", 4, 8)
    out, p = dev.new("dvs_usr_t")
    assert dev.ioctl("GETDVSINFO", out) == 1
    assert (ffi.string(p.d_name), p.d_nr_procs) == (b"IOCTL", 100)
    assert dev.ioctl("DVSEND", 0) == 0
    parm, _ = dev.new("parm_dvsinit_t", parm_nodeid=1, parm_dvs=0)          # NULL: defaults
    assert dev.ioctl("DVSINIT", parm) == 1
    assert dev.rec.last("dvs_init") == (1, None)


def test_dc_init_getdcinfo_dc_end(dev):
    dc, _ = dev.new("dc_usr_t", dc_dcid=3, dc_flags=C.DC_FREE, dc_nr_procs=100, dc_nr_tasks=34,
                    dc_nr_sysprocs=64, dc_nr_nodes=32, dc_name=b"DC3")
    assert dev.ioctl("DCINIT", dc) == 1
    (info,) = dev.rec.last("dc_init")
    assert (info.dc_dcid, info.dc_nr_procs, info.dc_name) == (3, 100, "DC3")
    out, p = dev.new("dc_usr_t")
    parm, _ = dev.new("parm_getdcinfo_t", parm_dcid=3, parm_dc=out)
    assert dev.ioctl("GETDCINFO", parm) == 0
    assert (p.dc_dcid, p.dc_flags, p.dc_nr_procs, ffi.string(p.dc_name)) == (3, C.DC_RUNNING,
                                                                            100, b"DC3")
    assert p.dc_nodes == 1 << 1
    assert dev.ioctl("DCEND", 3) == 0
    assert dev.rec.last("dc_end") == (3,)
    assert dev.ioctl("GETDCINFO", parm) == 0 and p.dc_flags == C.DC_FREE
    assert dev.ioctl("DCEND", 0xFFFFFFFF) < 0                              # dcid -1
    assert dev.rec.last("dc_end") == (-1,)


def test_add_node_del_node_getnodeinfo(dev, actors):
    parm, _ = dev.new("parm_dcnode_t", parm_dcid=0, parm_nodeid=2)
    assert dev.ioctl("ADDNODE", parm) == E.EDVSNODEFREE                  # node 2 not up yet
    assert dev.rec.last("add_node") == (0, 2)
    proxy_pair(dev, actors)
    assert dev.ioctl("ADDNODE", parm) == 0
    out, p = dev.new("node_usr_t")
    info, _ = dev.new("parm_getnodeinfo_t", parm_nodeid=2, parm_node=out)
    assert dev.ioctl("GETNODEINFO", info) == 0
    assert (p.n_nodeid, p.n_proxies, ffi.string(p.n_name)) == (2, 2, b"node2")
    assert p.n_dcs & 1
    assert p.n_flags & (C.NODE_SCONNECTED | C.NODE_RCONNECTED) == (C.NODE_SCONNECTED
                                                                  | C.NODE_RCONNECTED)
    assert dev.ioctl("DELNODE", parm) == 0
    assert dev.rec.last("del_node") == (0, 2)
    assert dev.ioctl("GETNODEINFO", info) == 0 and not p.n_dcs & 1


# --- binding ----------------------------------------------------------------------------------

def test_bind_getprocinfo_getep_unbind(dev):
    assert dev.bind(10) == 10
    assert dev.rec.last("bind_X") == (C.SELF_BIND, 0, -1, 10, C.LOCALNODE, "")
    out, p = dev.new("proc_usr_t")
    parm, _ = dev.new("parm_procinfo_t", parm_dcid=0, parm_nr=10, parm_proc=out)
    assert dev.ioctl("GETPROCINFO", parm) == 0
    assert (p.p_nr, p.p_endpoint, p.p_rts_flags, p.p_nodeid) == (10, 10, 0, 1)
    assert p.p_lpid == threading.get_native_id()
    assert dev.ioctl("GETEP", threading.get_native_id()) == 10
    assert dev.rec.last("getep") == (threading.get_native_id(),)
    parm, _ = dev.new("parm_unbind_t", parm_dcid=0, parm_ep=10, parm_tout=FOREVER)
    assert dev.ioctl("UNBIND", parm) == 0
    assert dev.rec.last("unbind") == (0, 10, -1)
    assert dev.ioctl("GETPROCINFO", dev.new("parm_procinfo_t", parm_dcid=0, parm_nr=10,
                                            parm_proc=out)[0]) == 0
    assert p.p_rts_flags & C.SLOT_FREE


def test_rmtbind_name_travels_in_parm_pid(dev, actors):
    proxy_pair(dev, actors)
    parm, _ = dev.new("parm_dcnode_t", parm_dcid=0, parm_nodeid=2)
    assert dev.ioctl("ADDNODE", parm) == 0
    name = dev.text(b"rclient")
    bind, _ = dev.new("parm_bind_t", parm_cmd=C.RMT_BIND, parm_dcid=0,
                      parm_pid=ffi.cast("int32_t", name), parm_ep=50, parm_nodeid=2)
    assert dev.ioctl("BIND", bind) == 50
    assert dev.rec.last("bind_X") == (C.RMT_BIND, 0, -1, 50, 2, "rclient")
    out, p = dev.new("proc_usr_t")
    parm, _ = dev.new("parm_procinfo_t", parm_dcid=0, parm_nr=50, parm_proc=out)
    assert dev.ioctl("GETPROCINFO", parm) == 0
    assert p.p_rts_flags & C.REMOTE and p.p_nodeid == 2 and ffi.string(p.p_name) == b"rclient"
    bad, _ = dev.new("parm_bind_t", parm_cmd=C.RMT_BIND, parm_dcid=0, parm_pid=0x1000,
                     parm_ep=51, parm_nodeid=2)
    assert dev.ioctl("BIND", bad) == E.EDVSFAULT


def test_wait4bind(dev, actors):
    assert dev.bind(10) == 10
    parm, _ = dev.new("parm_wait4bind_t", parm_cmd=C.WAIT_BIND, parm_ep=12, parm_tout=50)
    assert dev.ioctl("WAIT4BIND", parm) == E.EDVSTIMEDOUT
    assert dev.rec.last("wait4bindep_X") == (C.WAIT_BIND, 12, 50)
    binder = Actor()                # a thread that lives on: a thread's exit unbinds its endpoint
    actors.append(binder)
    assert binder.call(lambda: dev.bind(12)) == 12
    parm, _ = dev.new("parm_wait4bind_t", parm_cmd=C.WAIT_BIND, parm_ep=12, parm_tout=FOREVER)
    assert dev.ioctl("WAIT4BIND", parm) == 12
    assert dev.rec.last("wait4bindep_X") == (C.WAIT_BIND, 12, -1)


def test_migrate_decodes_parm_bind(dev):
    parm, _ = dev.new("parm_bind_t", parm_cmd=C.MIGR_START, parm_dcid=0, parm_pid=-1,
                      parm_ep=10, parm_nodeid=-1)
    assert dev.ioctl("MIGRATE", parm) == E.EDVSNOSYS       # the emulator does not migrate
    assert dev.rec.last("migrate_X") == (C.MIGR_START, -1, 0, 10, -1)


def test_getpriv_setpriv(dev):
    assert dev.bind(10) == 10
    out, p = dev.new("priv_usr_t")
    parm, _ = dev.new("parm_priv_t", parm_dcid=0, parm_ep=10, parm_priv=out)
    assert dev.ioctl("GETPRIV", parm) == 0
    raw = bytes(ffi.buffer(p))
    assert len(raw) == 52 and p.priv_level == C.SERVER_PRIV
    p.priv_warn = 7
    assert dev.ioctl("SETPRIV", parm) == 0
    assert dev.rec.last("setpriv") == (0, 10, bytes(ffi.buffer(p)))
    nobody, _ = dev.new("parm_priv_t", parm_dcid=0, parm_ep=11, parm_priv=out)
    assert dev.ioctl("GETPRIV", nobody) == E.EDVSNOTBIND


# --- IPC --------------------------------------------------------------------------------------

def test_send_receive(dev):
    assert dev.bind(10) == 10

    def sender():
        assert dev.bind(11) == 11
        maddr, _ = dev.message(m_type=5, m1_i1=77, m1_p1=0x12345678)
        parm, _ = dev.new("parm_ipc_t", parm_ep=10, parm_mptr=maddr, parm_tout=5000)
        return dev.ioctl("SEND", parm)
    fut = in_thread(sender)
    maddr, m = dev.message()
    parm, _ = dev.new("parm_ipc_t", parm_ep=C.ANY, parm_mptr=maddr, parm_tout=FOREVER)
    assert dev.ioctl("RECEIVE", parm) == 0
    assert (m.m_source, m.m_type, m.m1_i1, m.m1_p1) == (11, 5, 77, 0x12345678)
    assert fut.result(WAIT) == 0
    ep, msg, tout = dev.rec.last("send")
    assert (ep, msg.m_type, tout) == (10, 5, 5000)
    assert dev.rec.last("receive")[0::2] == (C.ANY, -1)


def test_sendrec_rcvrqst_reply(dev):
    assert dev.bind(10) == 10
    got: dict = {}

    def client():
        assert dev.bind(11) == 11
        maddr, m = dev.message(m_type=6, m1_i1=1)
        parm, _ = dev.new("parm_ipc_t", parm_ep=10, parm_mptr=maddr, parm_tout=FOREVER)
        rc = dev.ioctl("SENDREC", parm)
        got["reply"] = (m.m_source, m.m_type, m.m1_i1)
        return rc
    fut = in_thread(client)
    maddr, m = dev.message()
    parm, _ = dev.new("parm_rcvrqst_t", parm_mptr=maddr, parm_tout=FOREVER)
    assert dev.ioctl("RCVRQST", parm) == 0
    assert (m.m_source, m.m_type, m.m1_i1) == (11, 6, 1)
    assert dev.rec.last("rcvrqst")[1] == -1
    m.m_type, m.m1_i1 = 7, 2
    rparm, _ = dev.new("parm_ipc_t", parm_ep=11, parm_mptr=maddr, parm_tout=FOREVER)
    assert dev.ioctl("REPLY", rparm) == 0
    assert fut.result(WAIT) == 0
    assert got["reply"] == (10, 7, 2)
    assert dev.rec.last("reply")[0] == 11
    timed, _ = dev.new("parm_rcvrqst_t", parm_mptr=maddr, parm_tout=0)
    assert dev.ioctl("RCVRQST", timed) == E.EDVSAGAIN


def test_notify_and_wakeup(dev):
    assert dev.bind(10) == 10
    waiting = threading.Event()

    def receiver():
        assert dev.bind(11) == 11
        maddr, m = dev.message()
        parm, _ = dev.new("parm_ipc_t", parm_ep=C.ANY, parm_mptr=maddr, parm_tout=FOREVER)
        waiting.set()
        rc = dev.ioctl("RECEIVE", parm)
        return rc, m.m_source, m.m_type
    fut = in_thread(receiver)
    assert waiting.wait(WAIT)
    parm, _ = dev.new("parm_notify_t", parm_nr=C.SELF, parm_ep=11, parm_val=C.HARDWARE)
    assert dev.ioctl("NOTIFY", parm) == 0
    assert dev.rec.last("notify_X") == (C.SELF, 11, C.HARDWARE)
    rc, source, mtype = fut.result(WAIT)
    assert rc == 0 and source == 10
    # a wakeup of an endpoint that is not receiving
    parm, _ = dev.new("parm_wakeup_t", parm_dcid=0, parm_ep=11)
    assert dev.ioctl("WAKEUPEP", parm) < 0
    assert dev.rec.last("wakeup") == (0, 11)


def receiving(dev: Dev, ep: int) -> None:
    """Wait until endpoint `ep` is blocked receiving (the state vcopy needs of its peer)."""
    out, p = dev.new("proc_usr_t")
    parm, _ = dev.new("parm_procinfo_t", parm_dcid=0, parm_nr=ep, parm_proc=out)
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        assert dev.ioctl("GETPROCINFO", parm) == 0
        if p.p_rts_flags & C.RECEIVING:
            return
        time.sleep(0.01)
    raise AssertionError(f"endpoint {ep} never received")


def test_vcopy(dev):
    assert dev.bind(10) == 10
    src = dev.device.alloc(64)
    dst = dev.device.alloc(64)
    src.write(b"copied by the ioctl path")

    def peer():
        assert dev.bind(11) == 11
        maddr, m = dev.message()
        parm, _ = dev.new("parm_ipc_t", parm_ep=10, parm_mptr=maddr, parm_tout=FOREVER)
        return dev.ioctl("RECEIVE", parm), m.m_type
    fut = in_thread(peer)
    receiving(dev, 11)
    parm, _ = dev.new("vcopy_t", v_src=10, v_dst=11, v_rqtr=C.SELF, v_saddr=src.addr,
                      v_daddr=dst.addr, v_bytes=24)
    assert dev.ioctl("VCOPY", parm) >= 0
    assert dst.read(24) == b"copied by the ioctl path"
    assert dev.rec.last("vcopy") == (10, src.addr, 11, dst.addr, 24)
    maddr, _ = dev.message(m_type=3)
    send, _ = dev.new("parm_ipc_t", parm_ep=11, parm_mptr=maddr, parm_tout=5000)
    assert dev.ioctl("SEND", send) == 0
    assert fut.result(WAIT) == (0, 3)


def test_relay(dev):
    maddr, _ = dev.message(m_type=9)
    parm, _ = dev.new("parm_relay_t", parm_ep=10, parm_mptr=maddr)
    assert dev.ioctl("RELAY", parm) == 0
    ep, m = dev.rec.last("relay")
    assert ep == 10 and m.m_type == 9


# --- proxies ----------------------------------------------------------------------------------

def test_proxy_pair_put2lcl_get2rmt(dev, actors):
    """proxies_bind, node_up, proxy_conn (in `proxy_pair`), getproxyinfo, put2lcl, get2rmt,
    node_down and proxies_unbind, all through the device; node 2 is played by two threads."""
    sproxy, rproxy = proxy_pair(dev, actors)
    assert dev.rec.last("proxies_bind") == ("node2", 2, sproxy.tid, rproxy.tid, C.MAXCOPYBUF)
    assert dev.rec.last("node_up") == ("node2", 2, 2)
    assert dev.rec.last("proxy_conn") == (2, C.CONNECT_RPROXY)
    spx, s = dev.new("proc_usr_t")
    rpx, r = dev.new("proc_usr_t")
    info, _ = dev.new("parm_proxyinfo_t", parm_pxid=2, parm_spx=spx, parm_rpx=rpx)
    assert dev.ioctl("GETPROXYINFO", info) == 0
    assert (s.p_lpid, r.p_lpid) == (sproxy.tid, rproxy.tid)
    assert s.p_misc_flags & C.MIS_PROXY and r.p_misc_flags & C.MIS_PROXY
    add, _ = dev.new("parm_dcnode_t", parm_dcid=0, parm_nodeid=2)
    assert dev.ioctl("ADDNODE", add) == 0
    rname = dev.text(b"rsender")
    rb, _ = dev.new("parm_bind_t", parm_cmd=C.RMT_BIND, parm_dcid=0,
                    parm_pid=ffi.cast("int32_t", rname), parm_ep=20, parm_nodeid=2)
    assert dev.ioctl("BIND", rb) == 20
    assert dev.bind(10) == 10
    # node 2's endpoint 20 sends to local endpoint 10: put2lcl by the receiver proxy
    h = make_header(c_cmd=C.CMD_SEND_MSG, c_dcid=0, c_src=20, c_dst=10, c_snode=2, c_dnode=1,
                    c_pid=4321, c_flags=C.FLAG_CHECK_HDR)
    h.c_msg.m_source, h.c_msg.m_type, h.c_msg.m1_i1 = 20, 0x0A, 55
    cmd = dev.device.alloc(120)
    cmd.write(bytes(h))
    pay = dev.device.alloc(C.MAXCOPYBUF)
    put, _ = dev.new("parm_put2lcl_t", parm_cmd=cmd.addr, parm_pay=pay.addr)
    assert rproxy.call(lambda: dev.ioctl("PUT2LCL", put)) >= 0
    put_hdr, put_pay = dev.rec.last("put2lcl")
    assert bytes(put_hdr) == bytes(h) and put_pay.addr == pay.addr
    maddr, m = dev.message()
    parm, _ = dev.new("parm_ipc_t", parm_ep=20, parm_mptr=maddr, parm_tout=5000)
    assert dev.ioctl("RECEIVE", parm) == 0
    assert (m.m_source, m.m_type, m.m1_i1) == (20, 0x0A, 55)
    # the kernel acknowledges it to node 2: get2rmt by the sender proxy
    out = dev.device.alloc(120)
    get, _ = dev.new("parm_get2rmt_t", parm_cmd=out.addr, parm_pay=pay.addr, parm_tout=5000)
    assert sproxy.call(lambda: dev.ioctl("GET2RMT", get)) == 0
    _hdr, got_pay, tout = dev.rec.last("get2rmt")
    assert (got_pay.addr, tout) == (pay.addr, 5000)
    ack = Header(bytearray(out.read(120)))
    assert (ack.c_cmd, ack.c_src, ack.c_dst, ack.c_snode, ack.c_dnode) == (
        C.CMD_SEND_ACK, 10, 20, 1, 2)
    # nothing more: the 32-bit timeout reaches the kernel as it was given
    nowait, _ = dev.new("parm_get2rmt_t", parm_cmd=out.addr, parm_pay=pay.addr, parm_tout=0)
    assert sproxy.call(lambda: dev.ioctl("GET2RMT", nowait)) == E.EDVSTIMEDOUT
    # tear the pair down
    assert dev.ioctl("NODEDOWN", 2) == 0
    assert dev.rec.last("node_down") == (2,)
    assert dev.ioctl("PROXYUNBIND", 2) == 0
    assert dev.rec.last("proxies_unbind") == (2,)
    assert dev.ioctl("GETPROXYINFO", info) < 0


def test_get2rmt_timeout_and_unmapped_payload(dev):
    out, _ = dev.new("dvs_usr_t")
    hdr = dev.device.alloc(120)
    parm, _ = dev.new("parm_get2rmt_t", parm_cmd=hdr.addr, parm_pay=0x1000, parm_tout=10)
    assert dev.ioctl("GET2RMT", parm) == E.EDVSFAULT
    parm, _ = dev.new("parm_put2lcl_t", parm_cmd=0x1000, parm_pay=0)
    assert dev.ioctl("PUT2LCL", parm) == E.EDVSFAULT
    assert [n for n, _ in dev.rec.calls] == []


def test_info_sizes_are_the_i386_kernel_ones():
    """What the device writes for dc_usr_t / proc_usr_t is the i386 module's own size, which
    the user-size structs the callers allocate hold."""
    assert DcInfo.STRUCT.size == ffi.sizeof("dc_kusr_t") <= ffi.sizeof("dc_usr_t")
    assert ProcInfo.STRUCT.size == ffi.sizeof("proc_kusr_t") <= ffi.sizeof("proc_usr_t")
    assert DvsInfo.STRUCT.size == ffi.sizeof("dvs_usr_t")
