"""`KernelDvk`: the DVK interface over the kernel module's calls, `ioctl` on `/dev/dvk`.

Every call builds its `dvk_ioparm.h` parameter struct and calls `ioctl(fd, request, arg)` with
the module's request numbers (see `REQUESTS`).  Results follow the C stub: glibc turns a
negative kernel value into -1/errno, which is turned back into the negative EDVS code and raised
as the `DvkError` subclass of that code; success values are returned as the stub returns them.

Two devices carry the calls:

* `/dev/dvk` through libc's `ioctl` (the default): structs in the host's native layout
  (`cdefs.ffi_native`) in C memory.  The wire and the emulator use the i386 layout.  On an
  i386 host the native layout is that one and every call works.  On a
  64-bit host no DVK exists; this class still serves the inspection calls (getdvsinfo,
  getdcinfo, getnodeinfo, getprocinfo, getproxyinfo) and the calls that carry no pointer
  through a 32-bit field, but `get2rmt` and `put2lcl` refuse (the message union can not be
  converted) and `rmtbind` refuses (the C macro smuggles the name pointer through the 32-bit
  `parm_pid`), both with EDVSNOSYS.
* an `IoctlDevice` (`KernelDvk(device=...)`), the emulator's `EmuDevice` (`--dvk emu-ioctl`):
  the same request numbers with the i386 parameter structs (`cdefs.ffi_i386`), placed in the
  device's memory and passed by their 32-bit addresses, as on an i386 node.  This layout
  proxies, so a whole DSP runs on this class against an emulated node.

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
import threading
import weakref
from collections.abc import Callable
from typing import Any, Protocol

from . import consts as C
from . import errors as E
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
# ioctl numbers (dvk_calls.h) and request encoding (the Linux _IOC scheme, magic 0xE3)
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


#: DVK_ call number -> ioctl request (DVK_VOID1 has none).
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

_POINTER_BITS = 8 * ffi_native.sizeof("void *")

_NO_64BIT_PROXY = ("no 64-bit DVK exists and the DSP wire/emulator layout is i386: this "
                   "host can inspect a DVK but not proxy; run the DSP on an i386 DVS node or "
                   "with the emulator (--dvk emu, or --dvk emu-ioctl for this ioctl path)")
_NO_64BIT_RMTBIND = ("rmtbind passes the name pointer in the 32-bit parm_pid field, which can "
                     "not hold a 64-bit address; use an i386 DVS node or the emulator "
                     "(--dvk emu, or --dvk emu-ioctl for this ioctl path)")


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


def info_from_native(cls: type, p: Any, ffi: Any = ffi_native) -> Any:
    """An info dataclass (DvsInfo, DcInfo, ...) from a struct pointer of `ffi`'s layout."""
    values = {}
    for f in dataclasses.fields(cls):
        obj, leaf = _walk(p, _INFO_PATHS.get(f.name, (f.name,)))
        v = obj[leaf] if isinstance(leaf, int) else getattr(obj, leaf)
        if isinstance(v, ffi.CData):                              # char[N]
            v = ffi.string(v).decode("latin-1")
        elif f.name.endswith("cpumask"):
            v &= 0xFFFFFFFF
        values[f.name] = v
    return cls(**values)


def info_to_native(obj: Any, ctype: str, ffi: Any = ffi_native, into: Any = None) -> Any:
    """A struct (`ctype *`) of `ffi`'s layout filled from an info dataclass: a new one, or
    `into` (zeroed memory the caller owns)."""
    p = ffi.new(ctype + " *") if into is None else into
    for f in dataclasses.fields(obj):
        target, leaf = _walk(p, _INFO_PATHS.get(f.name, (f.name,)))
        v = getattr(obj, f.name)
        if isinstance(v, str):
            size = ffi.sizeof(getattr(target, leaf))
            v = v.encode("latin-1")[:size - 1]
        if isinstance(leaf, int):
            target[leaf] = v
        else:
            setattr(target, leaf, v)
    return p


# ------------------------------------------------------------------------------------------------
# Where a call's parameter structs live
# ------------------------------------------------------------------------------------------------

class IoctlDevice(Protocol):
    """A DVK device other than /dev/dvk + libc (the emulator's `EmuDevice`).

    `ioctl(fd, request, arg)` takes the module's request numbers with `arg` the 32-bit address
    of a parameter struct of `ffi`'s layout (or a plain value) and returns the module handler's
    result (>= 0, or the negative EDVS code: no glibc errno in between).  Every struct a call
    passes must live in memory from `alloc`, the only memory the device can address.
    """

    ffi: Any
    address_bits: int
    emulated: bool

    def open(self) -> int: ...

    def close(self, fd: int) -> None: ...

    def ioctl(self, fd: int, request: int, arg: int) -> int: ...

    def alloc(self, size: int) -> Buffer: ...

    def proc_text(self, path: str) -> str: ...

    def limit_answers(self, seconds: float | None) -> None: ...


class _NativeParams:
    """Parameter memory of a call on the host layout: C memory that cffi owns."""

    __slots__ = ()

    @staticmethod
    def new(ctype: str, init: dict[str, Any] | None = None) -> Any:
        return ffi_native.new(ctype, init)

    @staticmethod
    def ref(p: Any) -> Any:
        """The value a pointer field takes to point at `p`."""
        return p

    @staticmethod
    def at(addr: int) -> Any:
        """The value a pointer field takes to point at address `addr`."""
        return ffi_native.cast("void *", addr)

    @staticmethod
    def arg(p: Any) -> Any:
        """The ioctl argument that passes `p`."""
        return ffi_native.cast("void *", p)

    @staticmethod
    def value(v: int) -> Any:
        """The ioctl argument that passes a plain value."""
        return ffi_native.cast("long", v)

    def __enter__(self) -> _NativeParams:
        return self

    def __exit__(self, *exc: object) -> None:
        """Nothing to give back: cffi frees the structs with their last reference."""


_NATIVE_PARAMS = _NativeParams()


class _DeviceParams:
    """Parameter memory of a call through an `IoctlDevice`: a block of the device's memory,
    carved per struct.  The block is mapped into cffi only while a call uses it (`with`), then
    released and given back to the pool: no cffi view of the memory outlives the call, so
    garbage collection can never free the memory under one."""

    SIZE = 2048   # the largest call (getproxyinfo: two proc_usr_t and the parm) fits many times

    __slots__ = ("ffi", "block", "raw", "local", "used", "mask", "types", "uintptr", "pool",
                 "generation")

    _ZEROS = bytes(SIZE)

    def __init__(self, ffi: Any, block: Buffer, address_bits: int,
                 types: dict[str, tuple[Any, int]], pool: _ParamsPool) -> None:
        self.pool = pool
        self.generation = pool.generation
        self.ffi = ffi
        self.block = block
        self.raw: Any = None
        self.local = 0
        self.uintptr = ffi.typeof("uintptr_t")
        self.used = 0
        self.mask = (1 << address_bits) - 1
        self.types = types         # ctype text -> (pointer ctype, size), shared by the pool

    def __enter__(self) -> _DeviceParams:
        self.raw = self.ffi.from_buffer(self.block.view, require_writable=True)
        self.local = int(self.ffi.cast(self.uintptr, self.raw))
        self.used = 0
        return self

    def __exit__(self, *exc: object) -> None:
        raw, self.raw = self.raw, None
        self.ffi.release(raw)
        self.pool.give(self)

    def _type(self, ctype: str) -> tuple[Any, int]:
        ffi = self.ffi
        t = ffi.typeof(ctype)
        if t.kind == "pointer":
            entry = (t, ffi.sizeof(t.item))
        else:
            entry = (ffi.typeof(t.item.cname + " *"), ffi.sizeof(t))
        self.types[ctype] = entry
        return entry

    def new(self, ctype: str, init: dict[str, Any] | None = None) -> Any:
        """A zeroed `ctype` ("T *" or "char[N]") in the block, fields from `init`."""
        ptr, size = self.types.get(ctype) or self._type(ctype)
        off = self.used
        if off + size > self.SIZE:
            raise MemoryError(f"DVK call parameters exceed {self.SIZE} bytes")
        self.used = (off + size + 7) & ~7
        p = self.ffi.cast(ptr, self.raw + off)
        self.ffi.memmove(p, self._ZEROS, size)
        if init:
            for name, v in init.items():
                setattr(p, name, v)
        return p

    def ref(self, p: Any) -> int:
        return self.block.addr + int(self.ffi.cast(self.uintptr, p)) - self.local

    def at(self, addr: int) -> int:
        return addr & self.mask

    arg = ref

    def value(self, v: int) -> int:
        return v & self.mask


class _ParamsPool:
    """The parameter blocks of one `KernelDvk` over a device: one per call in progress, reused
    by the next calls (a forked child drops its parent's: they are not its memory)."""

    def __init__(self, ffi: Any, device: IoctlDevice) -> None:
        self.ffi = ffi
        self.device = device
        self.free: list[_DeviceParams] = []
        self.lock = threading.Lock()
        self.generation = 0            # bumped in a forked child
        self.types: dict[str, tuple[Any, int]] = {}
        ref = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: (pool := ref()) and pool._forked())

    def _forked(self) -> None:
        self.lock = threading.Lock()
        self.free = []
        self.generation += 1

    def take(self) -> _DeviceParams:
        with self.lock:
            if self.free:
                return self.free.pop()
        return _DeviceParams(self.ffi, self.device.alloc(_DeviceParams.SIZE),
                             self.device.address_bits, self.types, self)

    def give(self, params: _DeviceParams) -> None:
        with self.lock:
            if params.generation == self.generation:
                self.free.append(params)


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
    """The DVK kernel module through `/dev/dvk` (one fd per process, shared by its threads),
    or through another `IoctlDevice` with the same calls (the emulator's `EmuDevice`)."""

    backend = "kernel"

    def __init__(self, path: str = C.DVK_FILE_NAME, *, fd: int | None = None,
                 ioctl: IoctlFunc | None = None, proxy_capable: bool | None = None,
                 device: IoctlDevice | None = None) -> None:
        """Open `path` read-only (as `dvk_open`), or use an already open `fd` (not closed by
        `close`).  A missing device raises FileNotFoundError (errno ENOENT, naming the path);
        other open failures raise the OSError of the open.

        `ioctl` replaces libc's ioctl (tests).  `proxy_capable` overrides the layout check that
        lets get2rmt/put2lcl run (default: the layout is i386); forcing it on a 64-bit host
        only serves tests of the parameter passing: the message union is lost.

        `device` replaces /dev/dvk and libc altogether: the calls use its layout (`device.ffi`)
        and its memory, and it is opened and closed through its own `open`/`close`.
        """
        self._device = device
        self._ioctl: IoctlFunc | None = None
        self.path = path
        if device is not None:
            self.ffi = device.ffi
            self.fd = device.open()
            self._own_fd = True
            self._address_bits = device.address_bits
        else:
            self.ffi = ffi_native
            self._ioctl = ioctl if ioctl is not None else libc_ioctl()
            self._address_bits = _POINTER_BITS
            self.fd = self._open_path(path) if fd is None else fd
            self._own_fd = fd is None
        layout_i386 = (self.ffi.sizeof("cmd_t") == wire.HEADER_SIZE
                       and self.ffi.sizeof("message") == wire.MESSAGE_SIZE)
        self.proxy_capable = layout_i386 if proxy_capable is None else proxy_capable
        self._msg_size = self.ffi.sizeof("message")
        self._message_cls = NativeMessage if device is None else Message
        self._ulong_mask = (1 << (8 * self.ffi.sizeof("unsigned long" if device is None
                                                      else "uint32_t"))) - 1
        self._pool = _ParamsPool(self.ffi, device) if device is not None else None

    @staticmethod
    def _open_path(path: str) -> int:
        try:
            return os.open(path, os.O_RDONLY)
        except FileNotFoundError as exc:
            raise FileNotFoundError(
                _errno.ENOENT,
                "no DVK device: is dvk.ko loaded and the node created "
                f"(mknod {path} c {C.DVK_MAJOR} 0)? Without a kernel DVK use the emulator "
                "(--dvk emu)", path) from exc

    @property
    def emulated(self) -> bool:
        """The node behind this device is an emulated one (not a real DVK module)."""
        return bool(getattr(self._device, "emulated", False))

    def proc_text(self, path: str) -> str:
        """The text of /proc/dvs/<path> of this node (rendered by an emulated device)."""
        if self._device is not None:
            return self._device.proc_text(path)
        with open(os.path.join("/proc/dvs", path)) as f:
            return f.read()

    # --- plumbing ------------------------------------------------------------------------------
    def _call(self, nr: int, arg: Any) -> int:
        """The device's result; libc's -1/errno is turned back into the negative kernel code."""
        if self._device is not None:
            rc = self._device.ioctl(self.fd, REQUESTS[nr], arg)
        else:
            rc = int(self._ioctl(self.fd, REQUESTS[nr], arg))
            if rc == -1:
                err = self.ffi.errno
                rc = -err if err else -1
        if log.isEnabledFor(logging.DEBUG):
            log.debug("ioctl nr=%d req=%#x rc=%d", nr, REQUESTS[nr], rc)
        return rc

    def _params(self) -> _NativeParams | _DeviceParams:
        """Memory for one call's structs (a context manager): C memory, or a pooled block of
        the device's memory."""
        return _NATIVE_PARAMS if self._pool is None else self._pool.take()

    def _ulong(self, value: int) -> int:
        """A C `unsigned long` parameter from a possibly negative value (TIMEOUT_FOREVER)."""
        return value & self._ulong_mask

    @staticmethod
    def _fail(rc: int, what: str) -> DvkError:
        return DvkError.for_code(rc, what)

    def _check(self, rc: int, what: str) -> int:
        if rc < 0:
            raise self._fail(rc, what)
        return rc

    def _msg(self, mem: Any, m: Message | Any) -> tuple[Any, Callable[[], None]]:
        """(value of a `message *` field, what to run after the call) for a message of this
        layout; through a device the message is copied into its memory and back."""
        if isinstance(m, self.ffi.CData):
            if self._device is None:
                return self.ffi.cast("message *", m), _nothing
            p = mem.new("message *")
            self.ffi.memmove(p, m, self._msg_size)
            return mem.ref(p), lambda: self.ffi.memmove(m, p, self._msg_size)
        size = getattr(m, "SIZE", None)
        if size != self._msg_size:
            raise TypeError(f"this DVK uses the native {self._msg_size}-byte message, got a "
                            f"{size}-byte {type(m).__name__}; create it with KernelDvk.message()")
        if self._device is not None:
            p = mem.new("message *")
            self.ffi.memmove(p, bytes(m), size)
            return mem.ref(p), lambda: m.load(self.ffi.buffer(p, size)[:])
        raw = self.ffi.from_buffer(m.buf, require_writable=True)
        if len(raw) < m.base + size:
            raise ValueError("message buffer too short")
        return self.ffi.cast("message *", raw + m.base), lambda: raw

    def _refuse_64bit(self, what: str) -> None:
        if not self.proxy_capable:
            raise DvkError.for_code(E.EDVSNOSYS, f"{what}: {_NO_64BIT_PROXY}")

    # --- memory --------------------------------------------------------------------------------
    def alloc(self, size: int) -> Buffer:
        """`size` bytes the DVK can address; `addr` is its address for vcopy / get2rmt /
        put2lcl (C memory, or the device's memory)."""
        if self._device is not None:
            return self._device.alloc(size)
        mem = self.ffi.new("char[]", size)
        return Buffer(view=memoryview(self.ffi.buffer(mem)),
                      addr=int(self.ffi.cast("uintptr_t", mem)), owner=mem)

    def message(self) -> Message:
        """A zeroed message in this DVK's layout (wire.Message on i386 and through a device,
        48 bytes on x86_64)."""
        return self._message_cls()

    def limit_answers(self, seconds: float | None) -> None:
        """The module always answers; a device (the emulator's) may not."""
        if self._device is not None:
            self._device.limit_answers(seconds)

    def close(self) -> None:
        if self._own_fd and self.fd >= 0:
            if self._device is not None:
                self._device.close(self.fd)
            else:
                os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> KernelDvk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- DVS, DC, node, proxy administration -----------------------------------------------------
    def dvs_init(self, nodeid: int, params: DvsInfo | None = None) -> int:
        with self._params() as mem:
            dvs = (mem.ref(info_to_native(params, "dvs_usr_t", self.ffi, mem.new("dvs_usr_t *")))
                   if params is not None else mem.at(0))
            parm = mem.new("parm_dvsinit_t *", {"parm_nodeid": nodeid, "parm_dvs": dvs})
            return self._check(self._call(DVK_DVSINIT, mem.arg(parm)), f"dvs_init({nodeid})")

    def dvs_end(self) -> int:
        with self._params() as mem:
            return self._check(self._call(DVK_DVSEND, mem.value(0)), "dvs_end()")

    def getdvsinfo(self) -> tuple[int, DvsInfo]:
        """(local node id, DvsInfo); the id is -1 before dvs_init (the kernel returns -1,
        which glibc reports as -1/EPERM: not an error here, as in the C stub)."""
        with self._params() as mem:
            p = mem.new("dvs_usr_t *")
            rc = self._call(DVK_GETDVSINFO, mem.arg(p))
            if rc < -1:
                raise self._fail(rc, "getdvsinfo()")
            return rc, info_from_native(DvsInfo, p, self.ffi)

    def dc_init(self, params: DcInfo) -> int:
        with self._params() as mem:
            p = info_to_native(params, "dc_usr_t", self.ffi, mem.new("dc_usr_t *"))
            return self._check(self._call(DVK_DCINIT, mem.arg(p)),
                               f"dc_init(dcid={params.dc_dcid})")

    def dc_end(self, dcid: int) -> int:
        with self._params() as mem:
            return self._check(self._call(DVK_DCEND, mem.value(dcid)), f"dc_end({dcid})")

    def getdcinfo(self, dcid: int) -> DcInfo:
        with self._params() as mem:
            dc = mem.new("dc_usr_t *")
            parm = mem.new("parm_getdcinfo_t *", {"parm_dcid": dcid, "parm_dc": mem.ref(dc)})
            self._check(self._call(DVK_GETDCINFO, mem.arg(parm)), f"getdcinfo({dcid})")
            return info_from_native(DcInfo, dc, self.ffi)

    def getnodeinfo(self, nodeid: int) -> NodeInfo:
        with self._params() as mem:
            node = mem.new("node_usr_t *")
            parm = mem.new("parm_getnodeinfo_t *",
                           {"parm_nodeid": nodeid, "parm_node": mem.ref(node)})
            self._check(self._call(DVK_GETNODEINFO, mem.arg(parm)), f"getnodeinfo({nodeid})")
            return info_from_native(NodeInfo, node, self.ffi)

    def getprocinfo(self, dcid: int, p_nr: int) -> ProcInfo:
        with self._params() as mem:
            proc = mem.new("proc_usr_t *")
            parm = mem.new("parm_procinfo_t *",
                           {"parm_dcid": dcid, "parm_nr": p_nr, "parm_proc": mem.ref(proc)})
            self._check(self._call(DVK_GETPROCINFO, mem.arg(parm)),
                        f"getprocinfo(dcid={dcid}, p_nr={p_nr})")
            return info_from_native(ProcInfo, proc, self.ffi)

    def getproxyinfo(self, pxid: int) -> tuple[ProcInfo, ProcInfo]:
        with self._params() as mem:
            spx = mem.new("proc_usr_t *")
            rpx = mem.new("proc_usr_t *")
            parm = mem.new("parm_proxyinfo_t *", {"parm_pxid": pxid, "parm_spx": mem.ref(spx),
                                                  "parm_rpx": mem.ref(rpx)})
            self._check(self._call(DVK_GETPROXYINFO, mem.arg(parm)), f"getproxyinfo({pxid})")
            return info_from_native(ProcInfo, spx, self.ffi), info_from_native(ProcInfo, rpx,
                                                                               self.ffi)

    def add_node(self, dcid: int, nodeid: int) -> int:
        with self._params() as mem:
            parm = mem.new("parm_dcnode_t *", {"parm_dcid": dcid, "parm_nodeid": nodeid})
            return self._check(self._call(DVK_ADDNODE, mem.arg(parm)),
                               f"add_node(dcid={dcid}, nodeid={nodeid})")

    def del_node(self, dcid: int, nodeid: int) -> int:
        with self._params() as mem:
            parm = mem.new("parm_dcnode_t *", {"parm_dcid": dcid, "parm_nodeid": nodeid})
            return self._check(self._call(DVK_DELNODE, mem.arg(parm)),
                               f"del_node(dcid={dcid}, nodeid={nodeid})")

    @staticmethod
    def _name(mem: Any, name: str, size: int = C.MAXPROXYNAME) -> Any:
        """A NUL-padded C name of `size` bytes (the kernel copies `size`), in `mem`."""
        raw = name.encode("latin-1")[:size - 1]
        p = mem.new(f"char[{size}]")
        p[0:len(raw)] = raw
        return p

    def proxies_bind(self, name: str, pxid: int, spid: int, rpid: int,
                     maxcopybuf: int = C.MAXCOPYBUF) -> int:
        with self._params() as mem:
            cname = self._name(mem, name)
            parm = mem.new("parm_pxbind_t *", {
                "parm_name": mem.ref(cname), "parm_pxid": pxid, "parm_spid": spid,
                "parm_rpid": rpid, "parm_maxbuf": maxcopybuf})
            return self._check(self._call(DVK_PROXYBIND, mem.arg(parm)),
                               f"proxies_bind({name!r}, pxid={pxid}, spid={spid}, rpid={rpid})")

    def proxies_unbind(self, pxid: int) -> int:
        with self._params() as mem:
            return self._check(self._call(DVK_PROXYUNBIND, mem.value(pxid)),
                               f"proxies_unbind({pxid})")

    def node_up(self, name: str, nodeid: int, pxid: int) -> int:
        with self._params() as mem:
            cname = self._name(mem, name, C.MAXNODENAME)
            parm = mem.new("parm_nodeup_t *", {"parm_name": mem.ref(cname),
                                               "parm_nodeid": nodeid, "parm_pxid": pxid})
            return self._check(self._call(DVK_NODEUP, mem.arg(parm)),
                               f"node_up({name!r}, nodeid={nodeid}, pxid={pxid})")

    def node_down(self, nodeid: int) -> int:
        with self._params() as mem:
            return self._check(self._call(DVK_NODEDOWN, mem.value(nodeid)),
                               f"node_down({nodeid})")

    def proxy_conn(self, pxid: int, status: int) -> int:
        with self._params() as mem:
            parm = mem.new("parm_pxconn_t *", {"parm_pxid": pxid, "parm_sts": status})
            return self._check(self._call(DVK_PROXYCONN, mem.arg(parm)),
                               f"proxy_conn(pxid={pxid}, status={status})")

    # --- binding -------------------------------------------------------------------------------
    def bind_X(self, cmd: int, dcid: int, pid: int, ep: int, nodeid: int,
               name: str = "") -> int:
        """Returns the bound endpoint.  A negative result equal to the requested endpoint is a
        task endpoint, not an error (the stub's rule); other results below EDVSERRCODE raise.
        RMT_BIND passes the address of `name` in `parm_pid` like the C macro (32-bit
        addresses only: an i386 node, or a device of that layout)."""
        with self._params() as mem:
            if cmd == C.RMT_BIND:
                if self._address_bits > 32:
                    raise DvkError.for_code(E.EDVSNOSYS, f"rmtbind(dcid={dcid}, ep={ep}): "
                                            + _NO_64BIT_RMTBIND)
                cname = self._name(mem, name, C.MAXPROCNAME)
                ref = mem.ref(cname)
                pid = int(self.ffi.cast("int32_t", ref if isinstance(ref, int)
                                        else self.ffi.cast("intptr_t", ref)))
            parm = mem.new("parm_bind_t *", {
                "parm_cmd": cmd, "parm_dcid": dcid, "parm_pid": pid, "parm_ep": ep,
                "parm_nodeid": nodeid})
            rc = self._call(DVK_BIND, mem.arg(parm))
        if rc >= 0 or rc == ep:
            return rc
        return E.check_ep(rc, f"bind_X(cmd={cmd}, dcid={dcid}, pid={pid}, ep={ep}, "
                              f"nodeid={nodeid})")

    def unbind(self, dcid: int, ep: int, timeout: int = C.TIMEOUT_FOREVER) -> int:
        with self._params() as mem:
            parm = mem.new("parm_unbind_t *", {"parm_dcid": dcid, "parm_ep": ep,
                                               "parm_tout": self._ulong(timeout)})
            return self._check(self._call(DVK_UNBIND, mem.arg(parm)),
                               f"unbind(dcid={dcid}, ep={ep})")

    def wait4bindep_X(self, cmd: int, ep: int, timeout: int = C.TIMEOUT_FOREVER) -> int:
        """WAIT_BIND: the endpoint (NONE for a proxy, possibly a negative task endpoint);
        WAIT_UNBIND: 0.  EDVSTIMEDOUT and codes below EDVSERRCODE raise."""
        with self._params() as mem:
            parm = mem.new("parm_wait4bind_t *", {"parm_cmd": cmd, "parm_ep": ep,
                                                  "parm_tout": self._ulong(timeout)})
            rc = self._call(DVK_WAIT4BIND, mem.arg(parm))
        if rc == E.EDVSTIMEDOUT:
            raise self._fail(rc, f"wait4bindep_X(cmd={cmd}, ep={ep}, timeout={timeout})")
        return E.check_ep(rc, f"wait4bindep_X(cmd={cmd}, ep={ep})")

    def getep(self, pid: int) -> int:
        """The endpoint bound by `pid`; any value above EDVSERRCODE is an endpoint."""
        with self._params() as mem:
            return E.check_ep(self._call(DVK_GETEP, mem.value(pid)), f"getep({pid})")

    def migrate_X(self, cmd: int, pid: int, dcid: int, ep: int, nodeid: int) -> int:
        with self._params() as mem:
            parm = mem.new("parm_bind_t *", {
                "parm_cmd": cmd, "parm_dcid": dcid, "parm_pid": pid, "parm_ep": ep,
                "parm_nodeid": nodeid})
            return self._check(self._call(DVK_MIGRATE, mem.arg(parm)),
                               f"migrate_X(cmd={cmd}, pid={pid}, dcid={dcid}, ep={ep})")

    # --- IPC -----------------------------------------------------------------------------------
    def _ipc(self, nr: int, what: str, ep: int, m: Message, timeout: int) -> int:
        with self._params() as mem:
            mptr, after = self._msg(mem, m)
            parm = mem.new("parm_ipc_t *", {"parm_ep": ep, "parm_mptr": mptr,
                                            "parm_tout": self._ulong(timeout)})
            rc = self._call(nr, mem.arg(parm))
            after()
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
        """Returns the kernel's value (normally 0), as the stub does."""
        with self._params() as mem:
            mptr, after = self._msg(mem, m)
            parm = mem.new("parm_rcvrqst_t *", {"parm_mptr": mptr,
                                                "parm_tout": self._ulong(timeout)})
            rc = self._call(DVK_RCVRQST, mem.arg(parm))
            after()
        return self._check(rc, f"rcvrqst(timeout={timeout})")

    def notify_X(self, src_nr: int, dst: int, value: int) -> int:
        with self._params() as mem:
            parm = mem.new("parm_notify_t *",
                           {"parm_nr": src_nr, "parm_ep": dst, "parm_val": value})
            rc = self._call(DVK_NOTIFY, mem.arg(parm))
        if rc < 0:
            raise self._fail(rc, f"notify_X(src_nr={src_nr}, dst={dst}, value={value})")
        return 0

    def vcopy(self, src_ep: int, saddr: int, dst_ep: int, daddr: int, nbytes: int) -> int:
        with self._params() as mem:
            parm = mem.new("vcopy_t *", {
                "v_src": src_ep, "v_dst": dst_ep, "v_rqtr": C.SELF, "v_saddr": mem.at(saddr),
                "v_daddr": mem.at(daddr), "v_bytes": nbytes})
            rc = self._call(DVK_VCOPY, mem.arg(parm))
        if rc < 0:
            raise self._fail(rc, f"vcopy(src={src_ep}, saddr={saddr:#x}, dst={dst_ep}, "
                                 f"daddr={daddr:#x}, bytes={nbytes})")
        return rc

    def relay(self, ep: int, m: Message) -> int:
        with self._params() as mem:
            mptr, after = self._msg(mem, m)
            parm = mem.new("parm_relay_t *", {"parm_ep": ep, "parm_mptr": mptr})
            rc = self._call(DVK_RELAY, mem.arg(parm))
            after()
        return self._check(rc, f"relay(ep={ep})")

    def wakeup(self, dcid: int, ep: int) -> int:
        with self._params() as mem:
            parm = mem.new("parm_wakeup_t *", {"parm_dcid": dcid, "parm_ep": ep})
            return self._check(self._call(DVK_WAKEUPEP, mem.arg(parm)),
                               f"wakeup(dcid={dcid}, ep={ep})")

    def getpriv(self, dcid: int, ep: int) -> bytes:
        """The raw `priv_usr_t` of this layout (52 bytes on i386, 72 on x86_64)."""
        with self._params() as mem:
            priv = mem.new("priv_usr_t *")
            parm = mem.new("parm_priv_t *", {"parm_dcid": dcid, "parm_ep": ep,
                                             "parm_priv": mem.ref(priv)})
            rc = self._call(DVK_GETPRIV, mem.arg(parm))
            if rc < 0:
                raise self._fail(rc, f"getpriv(dcid={dcid}, ep={ep})")
            return self.ffi.buffer(priv)[:]

    def setpriv(self, dcid: int, ep: int, priv: bytes) -> int:
        """`priv` is a raw `priv_usr_t` of this layout (as getpriv returns it)."""
        size = self.ffi.sizeof("priv_usr_t")
        if len(priv) != size:
            raise ValueError(f"priv_usr_t is {size} bytes here, got {len(priv)}")
        with self._params() as mem:
            p = mem.new("priv_usr_t *")
            self.ffi.memmove(p, priv, size)
            parm = mem.new("parm_priv_t *", {"parm_dcid": dcid, "parm_ep": ep,
                                             "parm_priv": mem.ref(p)})
            rc = self._call(DVK_SETPRIV, mem.arg(parm))
        if rc < 0:
            raise self._fail(rc, f"setpriv(dcid={dcid}, ep={ep})")
        return 0

    # --- proxies -------------------------------------------------------------------------------
    def _cmd(self, mem: Any, hdr: Header) -> tuple[Any, Callable[[], None] | None]:
        """(value of a `cmd_t *` field holding `hdr`, how to copy the result back into `hdr`).

        The host's own i386 layout aliases `hdr.buf` (nothing to copy back); a device gets a
        copy in its memory; a 64-bit layout a converted copy (tests only, see __init__)."""
        if self._device is not None:
            p = mem.new("cmd_t *")
            self.ffi.memmove(p, hdr.buf, wire.HEADER_SIZE)
            return mem.ref(p), lambda: hdr.load(self.ffi.buffer(p, wire.HEADER_SIZE)[:])
        if native_is_i386():
            return self.ffi.from_buffer("cmd_t *", hdr.buf, require_writable=True), None
        p = header_to_native(hdr, self.ffi)
        return p, lambda: header_from_native(p, self.ffi, into=hdr)

    def get2rmt(self, hdr: Header, payload: Buffer, timeout: int = C.HELLO_PERIOD) -> int:
        self._refuse_64bit("get2rmt")
        if len(payload) < C.MAXCOPYBUF:
            raise ValueError(f"get2rmt needs a payload buffer of {C.MAXCOPYBUF} bytes "
                             f"(proxy_payload_t), got {len(payload)}")
        with self._params() as mem:
            cmd, back = self._cmd(mem, hdr)
            parm = mem.new("parm_get2rmt_t *", {
                "parm_cmd": cmd, "parm_pay": mem.at(payload.addr),
                "parm_tout": self._ulong(timeout)})
            rc = self._call(DVK_GET2RMT, mem.arg(parm))
            if rc < 0:
                raise self._fail(rc, f"get2rmt(timeout={timeout})")
            if back is not None:
                back()
        return rc

    def put2lcl(self, hdr: Header, payload: Buffer | None) -> int:
        """Returns the kernel's non-negative value (0, or a byte count such as 36)."""
        self._refuse_64bit("put2lcl")
        with self._params() as mem:
            cmd, _ = self._cmd(mem, hdr)
            pay = mem.at(0 if payload is None else payload.addr)
            parm = mem.new("parm_put2lcl_t *", {"parm_cmd": cmd, "parm_pay": pay})
            rc = self._call(DVK_PUT2LCL, mem.arg(parm))
        if rc < 0:            # the header's text only for a failure: this is the hot path
            raise self._fail(rc, f"put2lcl({hdr!r})")
        return rc


def _nothing() -> None:
    """No copy back after a call."""
