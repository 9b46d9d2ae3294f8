"""The one Python interface to a DVK, implemented by `KernelDvk` (ioctl on /dev/dvk) and
`EmuDvk` (the user-space node kernel).

Method names are the C stub names without the `dvk_` prefix.  Return values
follow the C stub conventions (endpoint for bind/getep, local node id for the init/info
calls, 0 otherwise); a negative EDVS result raises `DvkError` instead of being returned.
Timeouts are milliseconds (TIMEOUT_FOREVER = -1, TIMEOUT_NOWAIT = 0).

Memory that `vcopy`, `get2rmt` and `put2lcl` touch is a `Buffer`: a writable view plus the
address the DVK knows it by (a pointer for the kernel, an arena address for the emulator).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

from . import consts as C
from .info import DcInfo, DvsInfo, NodeInfo, ProcInfo
from .wire import Header, Message


@dataclass
class Buffer:
    """Process memory the DVK can copy to/from: `view` for Python, `addr` for DVK calls."""

    view: memoryview
    addr: int
    owner: object = None

    def __len__(self) -> int:
        return len(self.view)

    def write(self, data: bytes, offset: int = 0) -> None:
        self.view[offset:offset + len(data)] = data

    def read(self, size: int | None = None, offset: int = 0) -> bytes:
        end = len(self.view) if size is None else offset + size
        return bytes(self.view[offset:end])


class Dvk(abc.ABC):
    """A DVK node as seen by one process (all its threads)."""

    #: backend name, "kernel" or "emu"
    backend: str = ""

    # --- memory --------------------------------------------------------------------------------
    @abc.abstractmethod
    def alloc(self, size: int) -> Buffer:
        """Memory this process can hand to vcopy / get2rmt / put2lcl."""

    def message(self) -> Message:
        """A zeroed message in this backend's layout."""
        return Message()

    def close(self) -> None:  # noqa: B027 - optional for backends, a no-op by default
        """Release the connection to the DVK (a process exit does the same)."""

    def limit_answers(self, seconds: float | None) -> None:  # noqa: B027 - a no-op by default
        """From now on, a call of the calling thread that the DVK leaves unanswered for
        `seconds` fails with EDVSSHUTDOWN (None: it waits as long as the DVK takes).  A thread
        that supervises others sets it, so that a wedged DVK cannot hold it for good.  The
        module's ioctls always return; only an emulated node kernel, a process of its own,
        can be stopped or wedged, so only that backend has anything to limit."""

    # --- DVS, DC, node, proxy administration -----------------------------------------------------
    @abc.abstractmethod
    def dvs_init(self, nodeid: int, params: DvsInfo | None = None) -> int: ...

    @abc.abstractmethod
    def dvs_end(self) -> int: ...

    @abc.abstractmethod
    def getdvsinfo(self) -> tuple[int, DvsInfo]:
        """(local node id, DVS parameters); the id is -1 before dvs_init."""

    @abc.abstractmethod
    def dc_init(self, params: DcInfo) -> int: ...

    @abc.abstractmethod
    def dc_end(self, dcid: int) -> int: ...

    @abc.abstractmethod
    def getdcinfo(self, dcid: int) -> DcInfo: ...

    @abc.abstractmethod
    def getnodeinfo(self, nodeid: int) -> NodeInfo: ...

    @abc.abstractmethod
    def getprocinfo(self, dcid: int, p_nr: int) -> ProcInfo: ...

    @abc.abstractmethod
    def getproxyinfo(self, pxid: int) -> tuple[ProcInfo, ProcInfo]:
        """(sender proxy, receiver proxy) descriptors of a proxy pair."""

    @abc.abstractmethod
    def add_node(self, dcid: int, nodeid: int) -> int: ...

    @abc.abstractmethod
    def del_node(self, dcid: int, nodeid: int) -> int: ...

    @abc.abstractmethod
    def proxies_bind(self, name: str, pxid: int, spid: int, rpid: int,
                     maxcopybuf: int = C.MAXCOPYBUF) -> int: ...

    @abc.abstractmethod
    def proxies_unbind(self, pxid: int) -> int: ...

    @abc.abstractmethod
    def node_up(self, name: str, nodeid: int, pxid: int) -> int: ...

    @abc.abstractmethod
    def node_down(self, nodeid: int) -> int: ...

    @abc.abstractmethod
    def proxy_conn(self, pxid: int, status: int) -> int: ...

    # --- binding -------------------------------------------------------------------------------
    @abc.abstractmethod
    def bind_X(self, cmd: int, dcid: int, pid: int, ep: int, nodeid: int,
               name: str = "") -> int:
        """Bind an endpoint; `name` is the RMT_BIND name the C macro passes in `parm_pid`."""

    @abc.abstractmethod
    def unbind(self, dcid: int, ep: int, timeout: int = C.TIMEOUT_FOREVER) -> int: ...

    @abc.abstractmethod
    def wait4bindep_X(self, cmd: int, ep: int, timeout: int = C.TIMEOUT_FOREVER) -> int: ...

    @abc.abstractmethod
    def getep(self, pid: int) -> int: ...

    @abc.abstractmethod
    def migrate_X(self, cmd: int, pid: int, dcid: int, ep: int, nodeid: int) -> int: ...

    # --- IPC -----------------------------------------------------------------------------------
    @abc.abstractmethod
    def send(self, ep: int, m: Message, timeout: int = C.TIMEOUT_FOREVER) -> int: ...

    @abc.abstractmethod
    def receive(self, ep: int, m: Message, timeout: int = C.TIMEOUT_FOREVER) -> int: ...

    @abc.abstractmethod
    def sendrec(self, ep: int, m: Message, timeout: int = C.TIMEOUT_FOREVER) -> int: ...

    @abc.abstractmethod
    def rcvrqst(self, m: Message, timeout: int = C.TIMEOUT_FOREVER) -> int: ...

    @abc.abstractmethod
    def reply(self, ep: int, m: Message, timeout: int = C.TIMEOUT_FOREVER) -> int: ...

    @abc.abstractmethod
    def notify_X(self, src_nr: int, dst: int, value: int) -> int: ...

    @abc.abstractmethod
    def vcopy(self, src_ep: int, saddr: int, dst_ep: int, daddr: int, nbytes: int) -> int: ...

    @abc.abstractmethod
    def relay(self, ep: int, m: Message) -> int: ...

    @abc.abstractmethod
    def wakeup(self, dcid: int, ep: int) -> int: ...

    @abc.abstractmethod
    def getpriv(self, dcid: int, ep: int) -> bytes: ...

    @abc.abstractmethod
    def setpriv(self, dcid: int, ep: int, priv: bytes) -> int: ...

    # --- proxies -------------------------------------------------------------------------------
    @abc.abstractmethod
    def get2rmt(self, hdr: Header, payload: Buffer, timeout: int = C.HELLO_PERIOD) -> int:
        """Take the next command for this sender proxy's node(s) into `hdr` (and its data into
        `payload`); EDVSTIMEDOUT when nothing arrived within `timeout`."""

    @abc.abstractmethod
    def put2lcl(self, hdr: Header, payload: Buffer | None) -> int:
        """Deliver a command from the network to this node (its check order: docs/emulator.md)."""

    # --- the C convenience macros (stub_dvkcall.h) ---------------------------------------------
    def bind(self, dcid: int, ep: int) -> int:
        return self.bind_X(C.SELF_BIND, dcid, -1, ep, C.LOCALNODE)

    def tbind(self, dcid: int, ep: int) -> int:
        import threading
        return self.bind_X(C.SELF_BIND, dcid, threading.get_native_id(), ep, C.LOCALNODE)

    def lclbind(self, dcid: int, pid: int, ep: int) -> int:
        return self.bind_X(C.LCL_BIND, dcid, pid, ep, C.LOCALNODE)

    def rmtbind(self, dcid: int, name: str, ep: int, nodeid: int) -> int:
        return self.bind_X(C.RMT_BIND, dcid, -1, ep, nodeid, name)

    def bkupbind(self, dcid: int, pid: int, ep: int, nodeid: int) -> int:
        return self.bind_X(C.BKUP_BIND, dcid, pid, ep, nodeid)

    def replbind(self, dcid: int, pid: int, ep: int) -> int:
        return self.bind_X(C.REPLICA_BIND, dcid, pid, ep, C.LOCALNODE)

    def notify(self, dst: int) -> int:
        return self.notify_X(C.SELF, dst, C.HARDWARE)

    def hdw_notify(self, dcid: int, dst: int) -> int:
        return self.notify_X(C.HARDWARE, dst, dcid)

    def ntfy_value(self, src_nr: int, dst: int, value: int) -> int:
        return self.notify_X(src_nr, dst, value)

    def wait4bind(self, timeout: int = C.TIMEOUT_FOREVER) -> int:
        return self.wait4bindep_X(C.WAIT_BIND, C.SELF, timeout)

    def wait4bindep(self, ep: int, timeout: int = C.TIMEOUT_FOREVER) -> int:
        return self.wait4bindep_X(C.WAIT_BIND, ep, timeout)

    def wait4unbind(self, ep: int, timeout: int = C.TIMEOUT_FOREVER) -> int:
        return self.wait4bindep_X(C.WAIT_UNBIND, ep, timeout)

    def local_nodeid(self) -> int:
        """The node id of this DVK (-1 before dvs_init)."""
        return self.getdvsinfo()[0]
