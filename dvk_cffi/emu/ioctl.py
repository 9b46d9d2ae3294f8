"""`EmuDevice`: the emulated node kernel behind the module's own call interface, `ioctl`.

`KernelDvk` drives a real node with `ioctl(fd, request, arg)` on /dev/dvk: `request` is one of
the module's request numbers and `arg` the address of an i386 parameter struct of
`dvk_ioparm.h` (or a plain value), whose pointers name the caller's memory.  This device takes
exactly that: it decodes the request number as the module's dispatcher does, reads the
parameter struct and the structs it points at with the project's i386 cffi definitions
(`cdefs.ffi_i386`), performs the call on the node kernel through an `EmuDvk` connection, and
writes the results back into the caller's memory.  Its return value is the module handler's:
>= 0 on success, the negative EDVS code of a failure (no glibc in between, so no errno).

Addresses are 32-bit values in the shared-memory arenas of `EmuDvk.alloc`, as on an i386
node: the caller's structs, messages, headers and payloads must live in memory allocated with
`EmuDevice.alloc`, which this device can read and write and the node kernel can copy to (the
arenas are the process memory of the emulated node, docs/emulator.md).  An address outside that
memory is a fault: EDVS2BIG for the parameter struct itself (the module's decoder reports any
copy failure so) and EDVSFAULT for the structs it points at.
"""

from __future__ import annotations

import bisect
import errno as _errno
import os
import threading
import weakref
from collections.abc import Callable
from typing import Any

from .. import consts as C
from .. import errors as E
from .. import kernel as K
from ..api import Buffer
from ..cdefs import NR_DVK_CALLS, ffi_i386
from ..errors import DvkError
from ..info import DcInfo, DvsInfo, NodeInfo, ProcInfo
from ..wire import HEADER_SIZE, MESSAGE_SIZE, Header, Message
from .client import EmuDvk

_FIRST_FD = 1000          # descriptors handed out by `open`, distinct from small real ones
_PRIV_SIZE = ffi_i386.sizeof("priv_usr_t")


class _Fault(Exception):
    """An address the caller does not own (or a struct that does not fit there)."""

    def __init__(self, code: int, what: str) -> None:
        super().__init__(what)
        self.code = code


def _s32(value: int) -> int:
    """A 32-bit field read as the kernel's signed `long` (TIMEOUT_FOREVER = 0xFFFFFFFF = -1)."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value & 0x80000000 else value


class EmuDevice:
    """An emulated /dev/dvk for one process: `open`, `ioctl`, `close`, and its memory."""

    #: The layout of the parameter structs this device decodes.
    ffi = ffi_i386
    #: Width of the addresses it takes (i386).
    address_bits = 32
    #: Behind this device is an emulated node (its load is that of its attached processes).
    emulated = True

    def __init__(self, emu: EmuDvk | None = None, *, path: str | None = None,
                 nodeid: int | None = None, answer_limit: float | None = None) -> None:
        """Use `emu`, or connect to the node kernel chosen by `path`/`nodeid` (as `EmuDvk`)."""
        self._own_emu = emu is None
        self.emu = emu if emu is not None else EmuDvk(path=path, nodeid=nodeid,
                                                      answer_limit=answer_limit)
        self._lock = threading.Lock()
        # (sorted bases, [(base, view)]) of the memory this process allocated, swapped whole
        self._map: tuple[list[int], list[tuple[int, memoryview]]] = ([], [])
        # its Buffers: a program addresses device memory by number, as C does its malloc'd
        # memory, so it lives as long as the device (never given back for reuse)
        self._held: list[Buffer] = []
        self._fds: set[int] = set()
        self._next_fd = _FIRST_FD
        self._types: dict[str, tuple[Any, int]] = {}
        ref = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: (dev := ref()) and dev._forked())

    # ------------------------------------------------------------------ the device file
    def open(self) -> int:
        """A descriptor for `ioctl` (open("/dev/dvk") of the module)."""
        with self._lock:
            fd = self._next_fd
            self._next_fd += 1
            self._fds.add(fd)
        return fd

    def close(self, fd: int) -> None:
        """Forget `fd`; with the last one gone, a device that made its own connection to the
        node kernel closes it (the kernel then treats the process's tasks as exited)."""
        with self._lock:
            self._fds.discard(fd)
            last = not self._fds
        if last and self._own_emu:
            self.emu.close()

    def limit_answers(self, seconds: float | None) -> None:
        """As `Dvk.limit_answers`: the node kernel behind the device may be wedged."""
        self.emu.limit_answers(seconds)

    def ioctl(self, fd: int, request: int, arg: int) -> int:
        """One DVK call: the module handler's result (>= 0, or a negative EDVS code)."""
        if fd not in self._fds:
            return -_errno.EBADF
        if (request >> 8) & 0xFF != C.DVK_IOC_MAGIC or request & 0xFF >= NR_DVK_CALLS:
            return -_errno.ENOTTY
        try:
            return _HANDLERS[request & 0xFF](self, arg & 0xFFFFFFFF)
        except DvkError as err:
            return err.code
        except _Fault as fault:
            return fault.code

    # ------------------------------------------------------------------ memory
    def alloc(self, size: int) -> Buffer:
        """Memory of this process the device (and the node kernel) can address."""
        buf = self.emu.alloc(size)
        with self._lock:
            self._held.append(buf)
            bases, spans = self._map
            i = bisect.bisect_left(bases, buf.addr)
            self._map = (bases[:i] + [buf.addr] + bases[i:],
                         spans[:i] + [(buf.addr, buf.view)] + spans[i:])
        return buf

    def proc_text(self, path: str) -> str:
        """A /proc/dvs view of the emulated node (the file a real node has)."""
        return self.emu.proc_text(path)

    def _forked(self) -> None:
        """In a forked child: a new process to the node kernel, the parent's memory not its."""
        self._lock = threading.Lock()
        self._map = ([], [])
        self._held = []

    def _span(self, addr: int, size: int, code: int = E.EDVSFAULT) -> memoryview:
        """The caller's `size` bytes at `addr` (from `addr` to the end of its allocation when
        `size` is -1)."""
        bases, spans = self._map
        i = bisect.bisect_right(bases, addr) - 1
        if i >= 0:
            base, view = spans[i]
            off = addr - base
            end = len(view) if size < 0 else off + size
            if off < len(view) and end <= len(view):
                return view[off:end]
        raise _Fault(code, f"address {addr:#x}+{size} is not this process's DVK memory")

    def _struct(self, ctype: str, addr: int, code: int = E.EDVSFAULT) -> Any:
        ptr, size = self._types.get(ctype) or self._type(ctype)
        return self.ffi.from_buffer(ptr, self._span(addr, size, code), require_writable=True)

    def _type(self, ctype: str) -> tuple[Any, int]:
        entry = self._types[ctype] = (self.ffi.typeof(ctype + " *"), self.ffi.sizeof(ctype))
        return entry

    def _parm(self, ctype: str, addr: int) -> Any:
        """The ioctl parameter struct at `addr` (the module copies it in first)."""
        return self._struct(ctype, addr, E.EDVS2BIG)

    def _read(self, addr: int, size: int) -> bytes:
        return bytes(self._span(addr, size))

    def _write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        self._span(addr, len(data))[:] = data

    def _name(self, addr: int, size: int) -> str:
        """A C name of at most `size` bytes (NUL-terminated, or cut at the caller's memory)."""
        raw = bytes(self._span(addr, -1)[:size])
        return raw.split(b"\0", 1)[0].decode("latin-1")

    def _message(self, addr: int) -> Message:
        return Message(bytearray(self._read(addr, MESSAGE_SIZE)))

    def _writable(self, *addrs_sizes: tuple[int, int]) -> None:
        """Fault before the call when an output struct is not the caller's memory."""
        for addr, size in addrs_sizes:
            self._span(addr, size)

    # ------------------------------------------------------------------ administration
    def _void(self, arg: int) -> int:
        return E.EDVSNOSYS

    def _dvs_init(self, arg: int) -> int:
        p = self._parm("parm_dvsinit_t", arg)
        nodeid, dvs = p.parm_nodeid, p.parm_dvs
        params = DvsInfo.unpack(self._read(dvs, DvsInfo.STRUCT.size)) if dvs else None
        return self.emu.dvs_init(nodeid, params)

    def _dvs_end(self, arg: int) -> int:
        return self.emu.dvs_end()

    def _getdvsinfo(self, arg: int) -> int:
        self._writable((arg, DvsInfo.STRUCT.size))
        nodeid, info = self.emu.getdvsinfo()
        self._write(arg, info.pack())
        return nodeid

    def _dc_init(self, arg: int) -> int:
        # the i386 module copies its own dc_usr_t: 60 bytes, a 4-byte CPU mask
        return self.emu.dc_init(DcInfo.unpack(self._span(arg, DcInfo.STRUCT.size, E.EDVS2BIG)))

    def _dc_end(self, arg: int) -> int:
        return self.emu.dc_end(_s32(arg))

    def _getdcinfo(self, arg: int) -> int:
        p = self._parm("parm_getdcinfo_t", arg)
        dcid, out = p.parm_dcid, p.parm_dc
        self._writable((out, DcInfo.STRUCT.size))
        self._write(out, self.emu.getdcinfo(dcid).pack())
        return 0

    def _getnodeinfo(self, arg: int) -> int:
        p = self._parm("parm_getnodeinfo_t", arg)
        nodeid, out = p.parm_nodeid, p.parm_node
        self._writable((out, NodeInfo.STRUCT.size))
        self._write(out, self.emu.getnodeinfo(nodeid).pack())
        return 0

    def _getprocinfo(self, arg: int) -> int:
        p = self._parm("parm_procinfo_t", arg)
        dcid, nr, out = p.parm_dcid, p.parm_nr, p.parm_proc
        self._writable((out, ProcInfo.STRUCT.size))
        self._write(out, self.emu.getprocinfo(dcid, nr).pack())
        return 0

    def _getproxyinfo(self, arg: int) -> int:
        p = self._parm("parm_proxyinfo_t", arg)
        pxid, spx, rpx = p.parm_pxid, p.parm_spx, p.parm_rpx
        self._writable((spx, ProcInfo.STRUCT.size), (rpx, ProcInfo.STRUCT.size))
        sender, receiver = self.emu.getproxyinfo(pxid)
        self._write(spx, sender.pack())
        self._write(rpx, receiver.pack())
        return 0

    def _add_node(self, arg: int) -> int:
        p = self._parm("parm_dcnode_t", arg)
        return self.emu.add_node(p.parm_dcid, p.parm_nodeid)

    def _del_node(self, arg: int) -> int:
        p = self._parm("parm_dcnode_t", arg)
        return self.emu.del_node(p.parm_dcid, p.parm_nodeid)

    def _proxies_bind(self, arg: int) -> int:
        p = self._parm("parm_pxbind_t", arg)
        name = self._name(p.parm_name, C.MAXPROXYNAME)
        return self.emu.proxies_bind(name, p.parm_pxid, p.parm_spid, p.parm_rpid,
                                     p.parm_maxbuf)

    def _proxies_unbind(self, arg: int) -> int:
        return self.emu.proxies_unbind(_s32(arg))

    def _node_up(self, arg: int) -> int:
        p = self._parm("parm_nodeup_t", arg)
        name = self._name(p.parm_name, C.MAXNODENAME)
        return self.emu.node_up(name, p.parm_nodeid, p.parm_pxid)

    def _node_down(self, arg: int) -> int:
        return self.emu.node_down(_s32(arg))

    def _proxy_conn(self, arg: int) -> int:
        p = self._parm("parm_pxconn_t", arg)
        return self.emu.proxy_conn(p.parm_pxid, p.parm_sts)

    # ------------------------------------------------------------------ binding
    def _bind(self, arg: int) -> int:
        p = self._parm("parm_bind_t", arg)
        cmd, dcid, pid, ep, nodeid = p.parm_cmd, p.parm_dcid, p.parm_pid, p.parm_ep, p.parm_nodeid
        name = ""
        if cmd == C.RMT_BIND:   # the C macro passes the name's address in parm_pid
            name = self._name(pid & 0xFFFFFFFF, C.MAXPROCNAME)
            pid = -1
        return self.emu.bind_X(cmd, dcid, pid, ep, nodeid, name)

    def _unbind(self, arg: int) -> int:
        p = self._parm("parm_unbind_t", arg)
        return self.emu.unbind(p.parm_dcid, p.parm_ep, _s32(p.parm_tout))

    def _wait4bind(self, arg: int) -> int:
        p = self._parm("parm_wait4bind_t", arg)
        return self.emu.wait4bindep_X(p.parm_cmd, p.parm_ep, _s32(p.parm_tout))

    def _getep(self, arg: int) -> int:
        return self.emu.getep(_s32(arg))

    def _migrate(self, arg: int) -> int:
        p = self._parm("parm_bind_t", arg)
        return self.emu.migrate_X(p.parm_cmd, p.parm_pid, p.parm_dcid, p.parm_ep, p.parm_nodeid)

    # ------------------------------------------------------------------ IPC
    def _ipc(self, arg: int, call: Callable[[int, Message, int], int], reply: bool) -> int:
        p = self._parm("parm_ipc_t", arg)
        ep, mptr, tout = p.parm_ep, p.parm_mptr, _s32(p.parm_tout)
        m = self._message(mptr)
        call(ep, m, tout)
        if reply:            # the kernel writes the received message in place
            self._write(mptr, m.buf)
        return 0

    def _send(self, arg: int) -> int:
        return self._ipc(arg, self.emu.send, False)

    def _receive(self, arg: int) -> int:
        return self._ipc(arg, self.emu.receive, True)

    def _sendrec(self, arg: int) -> int:
        return self._ipc(arg, self.emu.sendrec, True)

    def _reply(self, arg: int) -> int:
        return self._ipc(arg, self.emu.reply, False)

    def _rcvrqst(self, arg: int) -> int:
        p = self._parm("parm_rcvrqst_t", arg)
        mptr, tout = p.parm_mptr, _s32(p.parm_tout)
        m = self._message(mptr)
        rc = self.emu.rcvrqst(m, tout)
        self._write(mptr, m.buf)
        return rc

    def _notify(self, arg: int) -> int:
        p = self._parm("parm_notify_t", arg)
        return self.emu.notify_X(p.parm_nr, p.parm_ep, p.parm_val)

    def _vcopy(self, arg: int) -> int:
        v = self._parm("vcopy_t", arg)
        return self.emu.vcopy(v.v_src, v.v_saddr, v.v_dst, v.v_daddr, v.v_bytes)

    def _relay(self, arg: int) -> int:
        p = self._parm("parm_relay_t", arg)
        return self.emu.relay(p.parm_ep, self._message(p.parm_mptr))

    def _wakeup(self, arg: int) -> int:
        p = self._parm("parm_wakeup_t", arg)
        return self.emu.wakeup(p.parm_dcid, p.parm_ep)

    def _getpriv(self, arg: int) -> int:
        p = self._parm("parm_priv_t", arg)
        dcid, ep, out = p.parm_dcid, p.parm_ep, p.parm_priv
        self._writable((out, _PRIV_SIZE))
        self._write(out, self.emu.getpriv(dcid, ep)[:_PRIV_SIZE])
        return 0

    def _setpriv(self, arg: int) -> int:
        p = self._parm("parm_priv_t", arg)
        return self.emu.setpriv(p.parm_dcid, p.parm_ep, self._read(p.parm_priv, _PRIV_SIZE))

    # ------------------------------------------------------------------ proxies
    def _get2rmt(self, arg: int) -> int:
        """The module returns 0: the emulator's count of further queued commands is not part
        of the ioctl interface."""
        p = self._parm("parm_get2rmt_t", arg)
        cmd, pay, tout = p.parm_cmd, p.parm_pay, _s32(p.parm_tout)
        self._writable((cmd, HEADER_SIZE))
        hdr = Header()
        self.emu.get2rmt(hdr, Buffer(self._span(pay, -1), pay), tout)
        self._write(cmd, hdr.buf)
        return 0

    def _put2lcl(self, arg: int) -> int:
        p = self._parm("parm_put2lcl_t", arg)
        cmd, pay = p.parm_cmd, p.parm_pay
        hdr = Header(bytearray(self._read(cmd, HEADER_SIZE)))
        payload = Buffer(self._span(pay, -1), pay) if pay else None
        return self.emu.put2lcl(hdr, payload)


#: DVK_ call number -> the method that decodes and performs it (unbound: no reference cycle
#: through the device, whose memory views must be freed in order).
_D = EmuDevice
_HANDLERS: dict[int, Callable[[EmuDevice, int], int]] = {
    K.DVK_VOID1: _D._void, K.DVK_DCINIT: _D._dc_init, K.DVK_SEND: _D._send,
    K.DVK_RECEIVE: _D._receive, K.DVK_NOTIFY: _D._notify, K.DVK_SENDREC: _D._sendrec,
    K.DVK_RCVRQST: _D._rcvrqst, K.DVK_REPLY: _D._reply, K.DVK_DCEND: _D._dc_end,
    K.DVK_BIND: _D._bind, K.DVK_UNBIND: _D._unbind, K.DVK_GETPRIV: _D._getpriv,
    K.DVK_SETPRIV: _D._setpriv, K.DVK_VCOPY: _D._vcopy, K.DVK_GETDCINFO: _D._getdcinfo,
    K.DVK_GETPROCINFO: _D._getprocinfo, K.DVK_RELAY: _D._relay,
    K.DVK_PROXYBIND: _D._proxies_bind, K.DVK_PROXYUNBIND: _D._proxies_unbind,
    K.DVK_GETNODEINFO: _D._getnodeinfo, K.DVK_PUT2LCL: _D._put2lcl, K.DVK_GET2RMT: _D._get2rmt,
    K.DVK_ADDNODE: _D._add_node, K.DVK_DELNODE: _D._del_node, K.DVK_DVSINIT: _D._dvs_init,
    K.DVK_DVSEND: _D._dvs_end, K.DVK_GETEP: _D._getep, K.DVK_GETDVSINFO: _D._getdvsinfo,
    K.DVK_PROXYCONN: _D._proxy_conn, K.DVK_WAIT4BIND: _D._wait4bind,
    K.DVK_MIGRATE: _D._migrate, K.DVK_NODEUP: _D._node_up, K.DVK_NODEDOWN: _D._node_down,
    K.DVK_GETPROXYINFO: _D._getproxyinfo, K.DVK_WAKEUPEP: _D._wakeup,
}
