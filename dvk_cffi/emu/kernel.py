"""The emulated DVK node kernel: the DVK's calls and their semantics in user space.

One `NodeKernel` is one DVS node.  It keeps the kernel's object model (model.py: DCs with slot
tables of process descriptors, nodes, proxy pairs with their outgoing FIFO).  Calls run one
at a time (the server's loop holds `lock` while it runs them), the way the module serialises on
its own locks.  A call that must block is a generator that yields until the call that satisfies
it wakes its task with a result code (tasks.py); the kernel code touches no socket.

The calls are grouped by subsystem, one module each, all working on the state held here:
tasks.py (threads, exit, sleeping), checks.py (shared checks), admin.py (DVS, DCs, nodes, info
views), bindings.py, ipc.py (messages), copies.py (vcopy), proxies.py (pairs, node links, the
sender FIFO, get2rmt) and put2lcl.py (the receiver proxy's check table and delivery).

Callers are `Task`s (one per Linux thread that talks to the kernel, identified by its TID).  The
server (`server.py`) creates them from socket connections; the memory of their process lives in
an `AddressSpace` of shared-memory arenas.

Deviations from the kernel, each deliberate, are listed in docs/emulator.md.
"""

from __future__ import annotations

import threading
import time

from .. import consts as C
from ..info import DvsInfo, NodeInfo
from .admin import Admin
from .bindings import Bindings
from .checks import Checks
from .copies import Copies
from .ipc import Ipc
from .memory import AddressSpace
from .model import DC, Desc, ProxyPair, Task, TaskGone
from .proxies import Proxies
from .put2lcl import Put2lcl
from .tasks import Tasks

__all__ = ["DC", "Desc", "NodeKernel", "ProxyPair", "Task", "TaskGone"]


class NodeKernel(Tasks, Checks, Admin, Proxies, Bindings, Ipc, Copies, Put2lcl):
    """The DVK of one node.  All public methods take the calling `Task` first and return the
    stub's result or raise `DvkError` (the server turns it into the negative code).

    This object is the one place of the kernel state; the subsystem mixins read and change it.
    """

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.local_nodeid = C.DVS_NO_INIT
        self.dvs = DvsInfo()
        self.dcs: list[DC] = []
        self.nodes: list[NodeInfo] = []
        self.proxies: list[ProxyPair] = []
        self.tasks: dict[int, Task] = {}
        self.spaces: dict[int, AddressSpace] = {}
        self.bind_waiters: set[Task] = set()
        self.runnable: set[Task] = set()   # tasks woken since the server last looked
        self.started = time.time()
