"""The node kernel's object model: tasks, process descriptors, DCs and proxy pairs.

The structures mirror the kernel's own (`struct proc` slots of a DC, a proxy pair with the
sender's FIFO of descriptors); the subsystems of `NodeKernel` work on them.
"""

from __future__ import annotations

import os
import struct
from collections import deque
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

from .. import consts as C
from ..info import DcInfo, ProcInfo, ProxiesInfo
from ..wire import MESSAGE_SIZE, Header
from .memory import AddressSpace

#: A call that may block: a generator that yields the monotonic time until which it may sleep
#: (None: no limit) and returns the call's result (tasks.py explains the protocol).
Parked = Generator[float | None, None, Any]


class TaskGone(Exception):
    """The calling task exited (its connection closed) while it slept in the kernel."""


@dataclass(eq=False)
class Task:
    """A Linux thread known to the node kernel."""

    tid: int
    pid: int
    comm: str = ""
    space: AddressSpace | None = None
    desc: Desc | None = None            # bound DC slot, if any
    proxy: Desc | None = None           # proxy descriptor, if this task is a proxy
    woken: bool = False
    wake_rc: int = 0
    inbox: bytes | None = None          # message delivered while it slept
    dead: bool = False
    attached: bool = False              # has a live connection
    parked: list = field(default_factory=list)  # its blocked calls (server-side objects)


@dataclass(eq=False)
class Desc:
    """A process descriptor: a DC slot (LOCAL or REMOTE) or one half of a proxy pair."""

    nr: int
    dcid: int
    endpoint: int
    rts: int = C.SLOT_FREE
    misc: int = 0
    lpid: int = -1
    vpid: int = -1
    nodeid: int = -1
    nodemap: int = 0
    getfrom: int = C.NONE
    sendto: int = C.NONE
    waitmigr: int = C.NONE
    waitunbind: int = C.NONE
    proxy: int = C.NONE
    lclsent: int = 0
    rmtsent: int = 0
    lclcopy: int = 0
    rmtcopy: int = 0
    name: str = "$noname"
    task: Task | None = None
    allowed: frozenset = frozenset()
    priv_id: int = 0
    msg: bytes = bytes(MESSAGE_SIZE)     # p_message: the message it is trying to send
    senders: deque = field(default_factory=deque)   # p_list: descriptors waiting to send to it
    notify_pending: set = field(default_factory=set)  # slot indexes of pending notifiers
    update_pending: int = 0
    rmtcmd: Header = field(default_factory=Header)  # p_rmtcmd
    unbind_waiters: list = field(default_factory=list)

    @property
    def is_remote(self) -> bool:
        return bool(self.rts & C.REMOTE)

    @property
    def is_free(self) -> bool:
        return bool(self.rts & C.SLOT_FREE)

    def info(self) -> ProcInfo:
        return ProcInfo(self.nr, self.endpoint, self.dcid, self.rts, self.lpid, self.vpid,
                        self.nodeid, self.nodemap, self.misc, self.getfrom, self.sendto,
                        self.waitmigr, self.waitunbind, self.proxy, self.lclsent, self.rmtsent,
                        self.lclcopy, self.rmtcopy, self.name, 0)


class DC:
    """A distributed container: its parameters and slot table."""

    def __init__(self, info: DcInfo) -> None:
        self.info = info
        self.slots: list[Desc] = []

    def reset(self) -> None:
        i = self.info
        self.slots = [Desc(nr=n, dcid=i.dc_dcid, endpoint=n)
                      for n in range(-i.dc_nr_tasks, i.dc_nr_procs)]

    def slot(self, p_nr: int) -> Desc | None:
        idx = p_nr + self.info.dc_nr_tasks
        if 0 <= idx < len(self.slots):
            return self.slots[idx]
        return None

    def in_range(self, p_nr: int) -> bool:
        return -self.info.dc_nr_tasks <= p_nr < self.info.dc_nr_procs

    def is_sys(self, p_nr: int) -> bool:
        return p_nr + self.info.dc_nr_tasks < self.info.dc_nr_sysprocs

    @property
    def running(self) -> bool:
        return self.info.dc_flags == C.DC_RUNNING


class ProxyPair:
    """A proxy pair: sender and receiver descriptors and the sender's outgoing FIFO."""

    def __init__(self, pxid: int) -> None:
        self.info = ProxiesInfo(px_id=pxid)
        self.sproxy: Desc | None = None
        self.rproxy: Desc | None = None
        self.queue: deque[Desc] = deque()

    @property
    def in_use(self) -> bool:
        return bool(self.info.px_flags & C.PROXIES_INUSE)


def ep_p(ep: int) -> int:
    return C._ENDPOINT_P(ep)


def bits(mask: int):
    i = 0
    while mask:
        if mask & 1:
            yield i
        mask >>= 1
        i += 1


def priv_bytes(desc: Desc) -> bytes:
    level = C.PROXY_PRIV if desc.misc & C.MIS_PROXY else (
        C.SERVER_PRIV if len(desc.allowed) > len(C.DVK_USER_CALLS) else C.USER_PRIV)
    return struct.pack("<hxxii", desc.priv_id, 0, level).ljust(52, b"\0")


def thread_alive(tid: int) -> bool:
    """The thread exists and is not a zombie (a zombie has exited: the kernel unbinds it).
    A thread whose /proc entry cannot be opened for another reason than its absence (no
    descriptor left, EMFILE) is not known to be gone: it counts as alive."""
    try:
        with open(f"/proc/{tid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    except OSError:
        return True


def unused_tids(n: int) -> list[int]:
    """`n` thread ids that no thread of this machine has, for tasks a test or a benchmark
    attaches in its own process: the kernel may signal a task's thread, and nobody gets it."""
    out, tid = [], 4_000_000
    while len(out) < n:
        if not os.path.exists(f"/proc/{tid}"):
            out.append(tid)
        tid -= 1
    return out


def signal_thread(tid: int, sig: int) -> None:
    """Signal the process of thread `tid`; never a process group (kill() of 0 or less), nor
    this process (a task of the node kernel's own process is not sent its SIGTERM)."""
    if tid <= 0 or os.path.exists(f"/proc/self/task/{tid}"):
        return
    try:
        os.kill(tid, sig)
    except OSError:
        pass
