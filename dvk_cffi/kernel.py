"""`KernelDvk`: the DVK interface over the real kernel module, `ioctl` on `/dev/dvk` through cffi.

Every call builds its `dvk_ioparm.h` parameter struct in the host's native layout
(`cdefs.ffi_native`) and calls libc `ioctl(fd, request, arg)` with the request numbers of
dvk_abi.md §1.2.  Results follow the C stub (§1.3): glibc turns a negative kernel value into
-1/errno, which is turned back into the negative EDVS code and raised as the `DvkError` subclass
of that code; success values are returned as the stub returns them.

Layout (ARCHITECTURE D2): the wire and the emulator use the i386 layout.  On an i386 host the
native layout is that one and every call works.  On a 64-bit host no DVK exists; this class
still serves the inspection calls (getdvsinfo, getdcinfo, getnodeinfo, getprocinfo,
getproxyinfo) and the calls that carry no pointer through a 32-bit field, but `get2rmt` and
`put2lcl` refuse (the message union can not be converted) and `rmtbind` refuses (the C macro
smuggles the name pointer through the 32-bit `parm_pid`, §1.6), both with EDVSNOSYS.

Testing: the `ioctl` callable is injectable (`KernelDvk(fd=..., ioctl=fake)`).  It is called as
`ioctl(fd, request, arg)` with `arg` a cdata: `void *` pointing at the parameter struct, or a
`long` for the calls that pass a plain value.  It returns the C result; a fake reports an error
glibc-style (set `ffi_native.errno`, return -1) or returns the negative kernel code directly.
"""

from __future__ import annotations

import dataclasses
import errno as _errno
import logging
import os
from collections.abc import Callable
from typing import Any

from . import consts as C  # noqa: N812
from . import errors as E  # noqa: N812
from . import wire
from .api import Buffer, Dvk
from .cdefs import (
    ffi_native,
    header_from_native,
    header_to_native,
    native_is_i386,
    native_message_fields,
)
from .errors import DvkError
from .info import DcInfo, DvsInfo, NodeInfo, ProcInfo
from .wire import Header, Message

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------
# ioctl numbers (dvk_calls.h) and request encoding (dvk_abi.md §1.2)
# ------------------------------------------------------------------------------------------------

DVK_VOID1 = 0
DVK_DCINIT = 1
DVK_SEND = 2
DVK_RECEIVE = 3
DVK_NOTIFY = 4
DVK_SENDREC = 5
DVK_RCVRQST = 6
DVK_REPLY = 7
DVK_DCEND = 8
DVK_BIND = 9
DVK_UNBIND = 10
DVK_GETPRIV = 11
DVK_SETPRIV = 12
DVK_VCOPY = 13
DVK_GETDCINFO = 14
DVK_GETPROCINFO = 15
DVK_RELAY = 16
DVK_PROXYBIND = 17
DVK_PROXYUNBIND = 18
DVK_GETNODEINFO = 19
DVK_PUT2LCL = 20
DVK_GET2RMT = 21
DVK_ADDNODE = 22
DVK_DELNODE = 23
DVK_DVSINIT = 24
DVK_DVSEND = 25
DVK_GETEP = 26
DVK_GETDVSINFO = 27
DVK_PROXYCONN = 28
DVK_WAIT4BIND = 29
DVK_MIGRATE = 30
DVK_NODEUP = 31
DVK_NODEDOWN = 32
DVK_GETPROXYINFO = 33
DVK_WAKEUPEP = 34

_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2
_IOC_SIZE = 4  # the C macros always say sizeof(int), whatever is really passed


def _ioc(direction: int, nr: int) -> int:
    size = 0 if direction == _IOC_NONE else _IOC_SIZE
    return (direction << 30) | (size << 16) | (C.DVK_IOC_MAGIC << 8) | nr


def _IO(nr: int) -> int:
    return _ioc(_IOC_NONE, nr)


def _IOW(nr: int) -> int:
    return _ioc(_IOC_WRITE, nr)


def _IOR(nr: int) -> int:
    return _ioc(_IOC_READ, nr)


#: DVK_ call number -> ioctl request (the table of §1.2; DVK_VOID1 has none).
REQUESTS: dict[int, int] = {
    DVK_DCINIT: _IOW(DVK_DCINIT), DVK_SEND: _IOW(DVK_SEND), DVK_RECEIVE: _IOW(DVK_RECEIVE),
    DVK_NOTIFY: _IOW(DVK_NOTIFY), DVK_SENDREC: _IOW(DVK_SENDREC),
    DVK_RCVRQST: _IOW(DVK_RCVRQST), DVK_REPLY: _IOW(DVK_REPLY), DVK_DCEND: _IOW(DVK_DCEND),
    DVK_BIND: _IOW(DVK_BIND), DVK_UNBIND: _IOW(DVK_UNBIND), DVK_GETPRIV: _IOR(DVK_GETPRIV),
    DVK_SETPRIV: _IOW(DVK_SETPRIV), DVK_VCOPY: _IOW(DVK_VCOPY),
    DVK_GETDCINFO: _IOR(DVK_GETDCINFO), DVK_GETPROCINFO: _IOR(DVK_GETPROCINFO),
    DVK_RELAY: _IOW(DVK_RELAY), DVK_PROXYBIND: _IOW(DVK_PROXYBIND),
    DVK_PROXYUNBIND: _IOW(DVK_PROXYUNBIND), DVK_GETNODEINFO: _IOR(DVK_GETNODEINFO),
    DVK_PUT2LCL: _IOW(DVK_PUT2LCL), DVK_GET2RMT: _IOR(DVK_GET2RMT),
    DVK_ADDNODE: _IOW(DVK_ADDNODE), DVK_DELNODE: _IOW(DVK_DELNODE),
    DVK_DVSINIT: _IOW(DVK_DVSINIT), DVK_DVSEND: _IO(DVK_DVSEND), DVK_GETEP: _IOR(DVK_GETEP),
    DVK_GETDVSINFO: _IOR(DVK_GETDVSINFO), DVK_PROXYCONN: _IOW(DVK_PROXYCONN),
    DVK_WAIT4BIND: _IOW(DVK_WAIT4BIND), DVK_MIGRATE: _IOW(DVK_MIGRATE),
    DVK_NODEUP: _IOW(DVK_NODEUP), DVK_NODEDOWN: _IOW(DVK_NODEDOWN),
    DVK_GETPROXYINFO: _IOR(DVK_GETPROXYINFO), DVK_WAKEUPEP: _IOW(DVK_WAKEUPEP),
}

IoctlFunc = Callable[[int, int, Any], int]

_ULONG_MASK = (1 << (8 * ffi_native.sizeof("unsigned long"))) - 1
_POINTER_BITS = 8 * ffi_native.sizeof("void *")

_NO_64BIT_PROXY = ("no 64-bit DVK exists and the DSP wire/emulator layout is i386 (ARCHITECTURE "
                   "D2): this host can inspect a DVK but not proxy; run the DSP on an i386 DVS "
                   "node or with the emulator (--dvk emu)")
_NO_64BIT_RMTBIND = ("rmtbind passes the name pointer in the 32-bit parm_pid field "
                     "(dvk_abi.md §1.6), which can not hold a 64-bit address; use an i386 DVS "
                     "node or the emulator (--dvk emu)")


def _ulong(value: int) -> int:
    """A C `unsigned long` parameter from a possibly negative value (TIMEOUT_FOREVER = -1)."""
    return value & _ULONG_MASK


# ------------------------------------------------------------------------------------------------
# The native message (same accessors as wire.Message, host layout)
# ------------------------------------------------------------------------------------------------

def _message_class(fields: dict[str, tuple[int, str]], size: int) -> type[Message]:
    """wire.Message itself for the i386 layout, else a subclass over `size` bytes whose
    accessors sit at the native offsets."""
    if fields == wire.I386_MESSAGE_FIELDS and size == wire.MESSAGE_SIZE:
        return Message

    class NativeMessage(Message):
        """A DVS `message` in this host's native layout (48 bytes on x86_64)."""

        SIZE = size
        FIELDS = fields
        __slots__ = ()

    wire.install_message_fields(NativeMessage)
    return NativeMessage


#: The message class of this host's layout (wire.Message on i386).
NativeMessage: type[Message] = _message_class(native_message_fields(),
                                              ffi_native.sizeof("message"))

# ------------------------------------------------------------------------------------------------
# info dataclasses <-> native structs
# ------------------------------------------------------------------------------------------------

# dataclass field -> path in the native struct, where the names differ.
_INFO_PATHS: dict[str, tuple[str | int, ...]] = {
    "n_stime_sec": ("n_stimestamp", "tv_sec"), "n_stime_nsec": ("n_stimestamp", "tv_nsec"),
    "n_rtime_sec": ("n_rtimestamp", "tv_sec"), "n_rtime_nsec": ("n_rtimestamp", "tv_nsec"),
    # the CPU masks: the first word of cpu_set_t (the i386 kernel mask is 32 bits)
    "dc_cpumask": ("dc_cpumask", "__bits", 0), "p_cpumask": ("p_cpumask", "__bits", 0),
}


def _walk(obj: Any, path: tuple[str | int, ...]) -> tuple[Any, str | int]:
    for part in path[:-1]:
        obj = obj[part] if isinstance(part, int) else getattr(obj, part)
    return obj, path[-1]


def info_from_native(cls: type, p: Any) -> Any:
    """An info dataclass (DvsInfo, DcInfo, ...) from a native struct pointer."""
    values = {}
    for f in dataclasses.fields(cls):
        obj, leaf = _walk(p, _INFO_PATHS.get(f.name, (f.name,)))
        v = obj[leaf] if isinstance(leaf, int) else getattr(obj, leaf)
        if isinstance(v, ffi_native.CData):                       # char[N]
            v = ffi_native.string(v).decode("latin-1")
        elif f.name.endswith("cpumask"):
            v &= 0xFFFFFFFF
        values[f.name] = v
    return cls(**values)


def info_to_native(obj: Any, ctype: str) -> Any:
    """A new native struct (`ctype *`) filled from an info dataclass."""
    p = ffi_native.new(ctype + " *")
    for f in dataclasses.fields(obj):
        target, leaf = _walk(p, _INFO_PATHS.get(f.name, (f.name,)))
        v = getattr(obj, f.name)
        if isinstance(v, str):
            size = ffi_native.sizeof(getattr(target, leaf))
            v = v.encode("latin-1")[:size - 1]
        if isinstance(leaf, int):
            target[leaf] = v
        else:
            setattr(target, leaf, v)
    return p


# ------------------------------------------------------------------------------------------------
# KernelDvk
# ------------------------------------------------------------------------------------------------

_libc: Any = None


def libc_ioctl() -> IoctlFunc:
    """libc's `ioctl` through cffi (loaded on first use)."""
    global _libc
    if _libc is None:
        _libc = ffi_native.dlopen(None)
    return _libc.ioctl


class KernelDvk(Dvk):
    """The DVK kernel module through `/dev/dvk` (one fd per process, shared by its threads)."""

    backend = "kernel"
    ffi = ffi_native

    def __init__(self, path: str = C.DVK_FILE_NAME, *, fd: int | None = None,
                 ioctl: IoctlFunc | None = None, proxy_capable: bool | None = None) -> None:
        """Open `path` read-only (as `dvk_open`), or use an already open `fd` (not closed by
        `close`).  A missing device raises FileNotFoundError (errno ENOENT, naming the path);
        other open failures raise the OSError of the open.

        `ioctl` replaces libc's ioctl (tests).  `proxy_capable` overrides the layout check that
        lets get2rmt/put2lcl run (default: the native layout is i386, D2); forcing it on a
        64-bit host only serves tests of the parameter passing: the message union is lost.
        """
        self._ioctl: IoctlFunc = ioctl if ioctl is not None else libc_ioctl()
        self.path = path
        if fd is None:
            try:
                self.fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError as exc:
                raise FileNotFoundError(
                    _errno.ENOENT,
                    "no DVK device: is dvk.ko loaded and the node created "
                    f"(mknod {path} c {C.DVK_MAJOR} 0)? Without a kernel DVK use the emulator "
                    "(--dvk emu)", path) from exc
            self._own_fd = True
        else:
            self.fd = fd
            self._own_fd = False
        self.proxy_capable = native_is_i386() if proxy_capable is None else proxy_capable
        self._msg_size = self.ffi.sizeof("message")
        self._wire_native = native_is_i386()

    # --- plumbing ------------------------------------------------------------------------------
    def _call(self, nr: int, arg: Any) -> int:
        """ioctl, with glibc's -1/errno turned back into the negative kernel code (§1.3)."""
        rc = int(self._ioctl(self.fd, REQUESTS[nr], arg))
        if rc == -1:
            err = self.ffi.errno
            rc = -err if err else -1
        if log.isEnabledFor(logging.DEBUG):
            log.debug("ioctl nr=%d req=%#x rc=%d", nr, REQUESTS[nr], rc)
        return rc

    def _ptr(self, p: Any) -> Any:
        return self.ffi.cast("void *", p)

    def _val(self, v: int) -> Any:
        return self.ffi.cast("long", v)

    @staticmethod
    def _fail(rc: int, what: str) -> DvkError:
        return DvkError.for_code(rc, what)

    def _check(self, rc: int, what: str) -> int:
        if rc < 0:
            raise self._fail(rc, what)
        return rc

    def _msg(self, m: Message | Any) -> tuple[Any, Any]:
        """(message * for the kernel, object to keep alive) of a message in the native layout."""
        if isinstance(m, self.ffi.CData):
            return self.ffi.cast("message *", m), m
        size = getattr(m, "SIZE", None)
        if size != self._msg_size:
            raise TypeError(f"this DVK uses the native {self._msg_size}-byte message, got a "
                            f"{size}-byte {type(m).__name__}; create it with KernelDvk.message()")
        raw = self.ffi.from_buffer(m.buf, require_writable=True)
        if len(raw) < m.base + size:
            raise ValueError("message buffer too short")
        return self.ffi.cast("message *", raw + m.base), raw

    def _refuse_64bit(self, what: str) -> None:
        if not self.proxy_capable:
            raise DvkError.for_code(E.EDVSNOSYS, f"{what}: {_NO_64BIT_PROXY}")

    # --- memory --------------------------------------------------------------------------------
    def alloc(self, size: int) -> Buffer:
        """`size` bytes of C memory; `addr` is its address for vcopy / get2rmt / put2lcl."""
        mem = self.ffi.new("char[]", size)
        return Buffer(view=memoryview(self.ffi.buffer(mem)),
                      addr=int(self.ffi.cast("uintptr_t", mem)), owner=mem)

    def message(self) -> Message:
        """A zeroed message in the native layout (wire.Message on i386, 48 bytes on x86_64)."""
        return NativeMessage()

    def close(self) -> None:
        if self._own_fd and self.fd >= 0:
            os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> KernelDvk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- DVS, DC, node, proxy administration -----------------------------------------------------
    def dvs_init(self, nodeid: int, params: DvsInfo | None = None) -> int:
        dvs = info_to_native(params, "dvs_usr_t") if params is not None else self.ffi.NULL
        parm = self.ffi.new("parm_dvsinit_t *", {"parm_nodeid": nodeid, "parm_dvs": dvs})
        return self._check(self._call(DVK_DVSINIT, self._ptr(parm)), f"dvs_init({nodeid})")

    def dvs_end(self) -> int:
        return self._check(self._call(DVK_DVSEND, self._val(0)), "dvs_end()")

    def getdvsinfo(self) -> tuple[int, DvsInfo]:
        """(local node id, DvsInfo); the id is -1 before dvs_init (the kernel returns -1,
        which glibc reports as -1/EPERM: not an error here, as in the C stub)."""
        p = self.ffi.new("dvs_usr_t *")
        rc = self._call(DVK_GETDVSINFO, self._ptr(p))
        if rc < -1:
            raise self._fail(rc, "getdvsinfo()")
        return rc, info_from_native(DvsInfo, p)

    def dc_init(self, params: DcInfo) -> int:
        p = info_to_native(params, "dc_usr_t")
        return self._check(self._call(DVK_DCINIT, self._ptr(p)),
                           f"dc_init(dcid={params.dc_dcid})")

    def dc_end(self, dcid: int) -> int:
        return self._check(self._call(DVK_DCEND, self._val(dcid)), f"dc_end({dcid})")

    def getdcinfo(self, dcid: int) -> DcInfo:
        dc = self.ffi.new("dc_usr_t *")
        parm = self.ffi.new("parm_getdcinfo_t *", {"parm_dcid": dcid, "parm_dc": dc})
        self._check(self._call(DVK_GETDCINFO, self._ptr(parm)), f"getdcinfo({dcid})")
        return info_from_native(DcInfo, dc)

    def getnodeinfo(self, nodeid: int) -> NodeInfo:
        node = self.ffi.new("node_usr_t *")
        parm = self.ffi.new("parm_getnodeinfo_t *", {"parm_nodeid": nodeid, "parm_node": node})
        self._check(self._call(DVK_GETNODEINFO, self._ptr(parm)), f"getnodeinfo({nodeid})")
        return info_from_native(NodeInfo, node)

    def getprocinfo(self, dcid: int, p_nr: int) -> ProcInfo:
        proc = self.ffi.new("proc_usr_t *")
        parm = self.ffi.new("parm_procinfo_t *",
                            {"parm_dcid": dcid, "parm_nr": p_nr, "parm_proc": proc})
        self._check(self._call(DVK_GETPROCINFO, self._ptr(parm)),
                    f"getprocinfo(dcid={dcid}, p_nr={p_nr})")
        return info_from_native(ProcInfo, proc)

    def getproxyinfo(self, pxid: int) -> tuple[ProcInfo, ProcInfo]:
        spx = self.ffi.new("proc_usr_t *")
        rpx = self.ffi.new("proc_usr_t *")
        parm = self.ffi.new("parm_proxyinfo_t *",
                            {"parm_pxid": pxid, "parm_spx": spx, "parm_rpx": rpx})
        self._check(self._call(DVK_GETPROXYINFO, self._ptr(parm)), f"getproxyinfo({pxid})")
        return info_from_native(ProcInfo, spx), info_from_native(ProcInfo, rpx)

    def add_node(self, dcid: int, nodeid: int) -> int:
        parm = self.ffi.new("parm_dcnode_t *", {"parm_dcid": dcid, "parm_nodeid": nodeid})
        return self._check(self._call(DVK_ADDNODE, self._ptr(parm)),
                           f"add_node(dcid={dcid}, nodeid={nodeid})")

    def del_node(self, dcid: int, nodeid: int) -> int:
        parm = self.ffi.new("parm_dcnode_t *", {"parm_dcid": dcid, "parm_nodeid": nodeid})
        return self._check(self._call(DVK_DELNODE, self._ptr(parm)),
                           f"del_node(dcid={dcid}, nodeid={nodeid})")

    def _name(self, name: str, size: int = C.MAXPROXYNAME) -> Any:
        """A NUL-padded C name buffer of at least `size` bytes (the kernel copies `size`)."""
        raw = name.encode("latin-1")[:size - 1]
        return self.ffi.new("char[]", raw.ljust(size, b"\0"))

    def proxies_bind(self, name: str, pxid: int, spid: int, rpid: int,
                     maxcopybuf: int = C.MAXCOPYBUF) -> int:
        cname = self._name(name)
        parm = self.ffi.new("parm_pxbind_t *", {
            "parm_name": cname, "parm_pxid": pxid, "parm_spid": spid, "parm_rpid": rpid,
            "parm_maxbuf": maxcopybuf})
        return self._check(self._call(DVK_PROXYBIND, self._ptr(parm)),
                           f"proxies_bind({name!r}, pxid={pxid}, spid={spid}, rpid={rpid})")

    def proxies_unbind(self, pxid: int) -> int:
        return self._check(self._call(DVK_PROXYUNBIND, self._val(pxid)),
                           f"proxies_unbind({pxid})")

    def node_up(self, name: str, nodeid: int, pxid: int) -> int:
        cname = self._name(name, C.MAXNODENAME)
        parm = self.ffi.new("parm_nodeup_t *",
                            {"parm_name": cname, "parm_nodeid": nodeid, "parm_pxid": pxid})
        return self._check(self._call(DVK_NODEUP, self._ptr(parm)),
                           f"node_up({name!r}, nodeid={nodeid}, pxid={pxid})")

    def node_down(self, nodeid: int) -> int:
        return self._check(self._call(DVK_NODEDOWN, self._val(nodeid)), f"node_down({nodeid})")

    def proxy_conn(self, pxid: int, status: int) -> int:
        parm = self.ffi.new("parm_pxconn_t *", {"parm_pxid": pxid, "parm_sts": status})
        return self._check(self._call(DVK_PROXYCONN, self._ptr(parm)),
                           f"proxy_conn(pxid={pxid}, status={status})")

    # --- binding -------------------------------------------------------------------------------
    def bind_X(self, cmd: int, dcid: int, pid: int, ep: int, nodeid: int,
               name: str = "") -> int:
        """Returns the bound endpoint.  A negative result equal to the requested endpoint is a
        task endpoint, not an error (the stub's rule); other results below EDVSERRCODE raise.
        RMT_BIND passes the address of `name` in `parm_pid` like the C macro (i386 only)."""
        keep = None
        if cmd == C.RMT_BIND:
            if _POINTER_BITS > 32:
                raise DvkError.for_code(E.EDVSNOSYS, f"rmtbind(dcid={dcid}, ep={ep}): "
                                        + _NO_64BIT_RMTBIND)
            keep = self._name(name, C.MAXPROCNAME)
            pid = int(self.ffi.cast("intptr_t", keep))
        parm = self.ffi.new("parm_bind_t *", {
            "parm_cmd": cmd, "parm_dcid": dcid, "parm_pid": pid, "parm_ep": ep,
            "parm_nodeid": nodeid})
        rc = self._call(DVK_BIND, self._ptr(parm))
        del keep
        if rc >= 0 or rc == ep:
            return rc
        return E.check_ep(rc, f"bind_X(cmd={cmd}, dcid={dcid}, pid={pid}, ep={ep}, "
                              f"nodeid={nodeid})")

    def unbind(self, dcid: int, ep: int, timeout: int = C.TIMEOUT_FOREVER) -> int:
        parm = self.ffi.new("parm_unbind_t *",
                            {"parm_dcid": dcid, "parm_ep": ep, "parm_tout": _ulong(timeout)})
        return self._check(self._call(DVK_UNBIND, self._ptr(parm)),
                           f"unbind(dcid={dcid}, ep={ep})")

    def wait4bindep_X(self, cmd: int, ep: int, timeout: int = C.TIMEOUT_FOREVER) -> int:
        """WAIT_BIND: the endpoint (NONE for a proxy, possibly a negative task endpoint);
        WAIT_UNBIND: 0.  EDVSTIMEDOUT and codes below EDVSERRCODE raise."""
        parm = self.ffi.new("parm_wait4bind_t *",
                            {"parm_cmd": cmd, "parm_ep": ep, "parm_tout": _ulong(timeout)})
        rc = self._call(DVK_WAIT4BIND, self._ptr(parm))
        if rc == E.EDVSTIMEDOUT:
            raise self._fail(rc, f"wait4bindep_X(cmd={cmd}, ep={ep}, timeout={timeout})")
        return E.check_ep(rc, f"wait4bindep_X(cmd={cmd}, ep={ep})")

    def getep(self, pid: int) -> int:
        """The endpoint bound by `pid`; any value above EDVSERRCODE is an endpoint (§1.3)."""
        return E.check_ep(self._call(DVK_GETEP, self._val(pid)), f"getep({pid})")

    def migrate_X(self, cmd: int, pid: int, dcid: int, ep: int, nodeid: int) -> int:
        parm = self.ffi.new("parm_bind_t *", {
            "parm_cmd": cmd, "parm_dcid": dcid, "parm_pid": pid, "parm_ep": ep,
            "parm_nodeid": nodeid})
        return self._check(self._call(DVK_MIGRATE, self._ptr(parm)),
                           f"migrate_X(cmd={cmd}, pid={pid}, dcid={dcid}, ep={ep})")

    # --- IPC -----------------------------------------------------------------------------------
    def _ipc(self, nr: int, what: str, ep: int, m: Message, timeout: int) -> int:
        mptr, keep = self._msg(m)
        parm = self.ffi.new("parm_ipc_t *",
                            {"parm_ep": ep, "parm_mptr": mptr, "parm_tout": _ulong(timeout)})
        rc = self._call(nr, self._ptr(parm))
        del keep
        if rc < 0:
            raise self._fail(rc, f"{what}(ep={ep}, timeout={timeout})")
        return 0

    def send(self, ep: int, m: Message, timeout: int = C.TIMEOUT_FOREVER) -> int:
        return self._ipc(DVK_SEND, "send", ep, m, timeout)

    def receive(self, ep: int, m: Message, timeout: int = C.TIMEOUT_FOREVER) -> int:
        return self._ipc(DVK_RECEIVE, "receive", ep, m, timeout)

    def sendrec(self, ep: int, m: Message, timeout: int = C.TIMEOUT_FOREVER) -> int:
        return self._ipc(DVK_SENDREC, "sendrec", ep, m, timeout)

    def reply(self, ep: int, m: Message, timeout: int = C.TIMEOUT_FOREVER) -> int:
        return self._ipc(DVK_REPLY, "reply", ep, m, timeout)

    def rcvrqst(self, m: Message, timeout: int = C.TIMEOUT_FOREVER) -> int:
        """Returns the kernel's value (normally 0), as the stub does (§1.3)."""
        mptr, keep = self._msg(m)
        parm = self.ffi.new("parm_rcvrqst_t *", {"parm_mptr": mptr, "parm_tout": _ulong(timeout)})
        rc = self._call(DVK_RCVRQST, self._ptr(parm))
        del keep
        return self._check(rc, f"rcvrqst(timeout={timeout})")

    def notify_X(self, src_nr: int, dst: int, value: int) -> int:
        parm = self.ffi.new("parm_notify_t *",
                            {"parm_nr": src_nr, "parm_ep": dst, "parm_val": value})
        rc = self._call(DVK_NOTIFY, self._ptr(parm))
        if rc < 0:
            raise self._fail(rc, f"notify_X(src_nr={src_nr}, dst={dst}, value={value})")
        return 0

    def vcopy(self, src_ep: int, saddr: int, dst_ep: int, daddr: int, nbytes: int) -> int:
        parm = self.ffi.new("vcopy_t *", {
            "v_src": src_ep, "v_dst": dst_ep, "v_rqtr": C.SELF,
            "v_saddr": self.ffi.cast("void *", saddr), "v_daddr": self.ffi.cast("void *", daddr),
            "v_bytes": nbytes})
        return self._check(self._call(DVK_VCOPY, self._ptr(parm)),
                           f"vcopy(src={src_ep}, saddr={saddr:#x}, dst={dst_ep}, "
                           f"daddr={daddr:#x}, bytes={nbytes})")

    def relay(self, ep: int, m: Message) -> int:
        mptr, keep = self._msg(m)
        parm = self.ffi.new("parm_relay_t *", {"parm_ep": ep, "parm_mptr": mptr})
        rc = self._call(DVK_RELAY, self._ptr(parm))
        del keep
        return self._check(rc, f"relay(ep={ep})")

    def wakeup(self, dcid: int, ep: int) -> int:
        parm = self.ffi.new("parm_wakeup_t *", {"parm_dcid": dcid, "parm_ep": ep})
        return self._check(self._call(DVK_WAKEUPEP, self._ptr(parm)),
                           f"wakeup(dcid={dcid}, ep={ep})")

    def getpriv(self, dcid: int, ep: int) -> bytes:
        """The raw native `priv_usr_t` (52 bytes on i386, 72 on x86_64)."""
        priv = self.ffi.new("priv_usr_t *")
        parm = self.ffi.new("parm_priv_t *", {"parm_dcid": dcid, "parm_ep": ep, "parm_priv": priv})
        rc = self._call(DVK_GETPRIV, self._ptr(parm))
        if rc < 0:
            raise self._fail(rc, f"getpriv(dcid={dcid}, ep={ep})")
        return self.ffi.buffer(priv)[:]

    def setpriv(self, dcid: int, ep: int, priv: bytes) -> int:
        """`priv` is a raw native `priv_usr_t` (as getpriv returns it)."""
        size = self.ffi.sizeof("priv_usr_t")
        if len(priv) != size:
            raise ValueError(f"priv_usr_t is {size} bytes here, got {len(priv)}")
        p = self.ffi.new("priv_usr_t *")
        self.ffi.memmove(p, priv, size)
        parm = self.ffi.new("parm_priv_t *", {"parm_dcid": dcid, "parm_ep": ep, "parm_priv": p})
        rc = self._call(DVK_SETPRIV, self._ptr(parm))
        if rc < 0:
            raise self._fail(rc, f"setpriv(dcid={dcid}, ep={ep})")
        return 0

    # --- proxies -------------------------------------------------------------------------------
    def _native_header(self, hdr: Header) -> tuple[Any, bool]:
        """(cmd_t * for the kernel, True when it aliases `hdr.buf` and needs no copy back)."""
        if self._wire_native:
            return self.ffi.from_buffer("cmd_t *", hdr.buf, require_writable=True), True
        return header_to_native(hdr, self.ffi), False

    def get2rmt(self, hdr: Header, payload: Buffer, timeout: int = C.HELLO_PERIOD) -> int:
        self._refuse_64bit("get2rmt")
        if len(payload) < C.MAXCOPYBUF:
            raise ValueError(f"get2rmt needs a payload buffer of {C.MAXCOPYBUF} bytes "
                             f"(proxy_payload_t), got {len(payload)}")
        cmd, aliased = self._native_header(hdr)
        parm = self.ffi.new("parm_get2rmt_t *", {
            "parm_cmd": cmd, "parm_pay": self.ffi.cast("proxy_payload_t *", payload.addr),
            "parm_tout": _ulong(timeout)})
        rc = self._check(self._call(DVK_GET2RMT, self._ptr(parm)), f"get2rmt(timeout={timeout})")
        if not aliased:
            header_from_native(cmd, self.ffi, into=hdr)
        return rc

    def put2lcl(self, hdr: Header, payload: Buffer | None) -> int:
        """Returns the kernel's non-negative value (0, or a byte count such as 36)."""
        self._refuse_64bit("put2lcl")
        cmd, _ = self._native_header(hdr)
        pay = (self.ffi.NULL if payload is None
               else self.ffi.cast("proxy_payload_t *", payload.addr))
        parm = self.ffi.new("parm_put2lcl_t *", {"parm_cmd": cmd, "parm_pay": pay})
        return self._check(self._call(DVK_PUT2LCL, self._ptr(parm)), f"put2lcl({hdr!r})")
