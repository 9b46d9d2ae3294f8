"""`EmuDvk`: the `Dvk` interface over a connection to an emulated node kernel.

Programs choose their node with `DVK_SOCKET` (a path) or `DVK_NODE` (a node id, socket
`<rundir>/node<N>.sock`); with neither, the only node kernel in the run directory is used.
Each thread gets its own connection (the kernel knows callers by TID), and memory for vcopy and
proxy payloads comes from shared-memory arenas (`alloc`).
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import weakref
from typing import NoReturn

from .. import consts as C
from .. import errors as E
from ..api import Buffer, Dvk
from ..info import DcInfo, DvsInfo, NodeInfo, ProcInfo
from ..wire import HEADER_SIZE, MESSAGE_SIZE, Header, Message
from . import protocol as P
from .memory import ArenaAllocator
from .server import default_rundir, socket_path

_RECEIVE, _RCVRQST = P.OP["RECEIVE"], P.OP["RCVRQST"]
_GET2RMT, _PUT2LCL = P.OP["GET2RMT"], P.OP["PUT2LCL"]


class DvkUnavailable(OSError):
    """No node kernel answers at the socket this process was pointed to."""


def resolve_socket(path: str | None = None, nodeid: int | None = None) -> str:
    """The node kernel socket for this process (argument, DVK_SOCKET, DVK_NODE, only one)."""
    if path:
        return path
    if nodeid is not None:
        return socket_path(nodeid)
    if os.environ.get("DVK_SOCKET"):
        return os.environ["DVK_SOCKET"]
    if os.environ.get("DVK_NODE"):
        return socket_path(int(os.environ["DVK_NODE"]))
    rundir = default_rundir()
    try:
        found = sorted(f for f in os.listdir(rundir)
                       if f.startswith("node") and f.endswith(".sock"))
    except FileNotFoundError:
        found = []
    if len(found) == 1:
        return os.path.join(rundir, found[0])
    if not found:
        raise DvkUnavailable(f"no DVK node kernel in {rundir} (start one with "
                             f"'dvsctl node start N', or set DVK_SOCKET / DVK_NODE)")
    raise DvkUnavailable(f"{len(found)} node kernels in {rundir}: choose one with DVK_NODE "
                         f"or DVK_SOCKET")


class _ThreadConn:
    """A thread's connection to its node kernel, kept in the thread's local storage only: when
    the thread ends, its storage goes and the connection is closed, and the kernel sees the
    thread's exit (a task exit, as the DVK's exit hook).  A strong reference anywhere else would
    keep the socket, the kernel's task and a descriptor on both sides for the process's life:
    one more for every short-lived thread that ever made a call."""

    __slots__ = ("sock", "__weakref__")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def __del__(self) -> None:
        self.sock.close()


class EmuDvk(Dvk):
    """A process's view of its emulated node kernel."""

    backend = "emu"

    def __init__(self, path: str | None = None, nodeid: int | None = None,
                 answer_limit: float | None = None) -> None:
        """`answer_limit`: `limit_answers` for the thread that opens it, from its first call
        on (the HELLO that checks the kernel is there)."""
        self.path = resolve_socket(path, nodeid)
        self._pid = os.getpid()
        self._local = threading.local()
        self._conns: weakref.WeakSet[_ThreadConn] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._arena = ArenaAllocator(self._register_arena)
        self._comm = os.path.basename(sys.argv[0] or "python")[:15] or "python"
        ref = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: (dvk := ref()) and dvk._forked())
        self._local.limit = answer_limit
        self._conn()  # fail early when no kernel is there

    def _forked(self) -> None:
        """In a forked child: a new process to the kernel, with connections of its own."""
        self._pid = os.getpid()
        self._local = threading.local()
        self._conns = weakref.WeakSet()
        self._lock = threading.Lock()
        self._arena = ArenaAllocator(self._register_arena)

    # ------------------------------------------------------------------ transport
    def _conn(self) -> socket.socket:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.settimeout(getattr(self._local, "limit", None))
        try:
            conn.connect(self.path)
        except OSError as exc:
            conn.close()
            raise DvkUnavailable(f"no DVK node kernel at {self.path}: "
                                 f"{exc.strerror or exc}") from None
        hello = P.encode_request("HELLO", [P.VERSION, self._pid, threading.get_native_id(),
                                           self._comm.encode()])
        conn.sendall(hello)
        status, values = self._reply(conn)
        if status < 0:
            conn.close()
            raise E.DvkError.for_code(status, "node kernel refused the connection")
        holder = _ThreadConn(conn)
        self._local.holder, self._local.conn = holder, conn
        with self._lock:
            self._conns.add(holder)
        return conn

    def _reply(self, conn: socket.socket) -> tuple[int, list]:
        try:
            body = P.recv_frame(conn)
        except (OSError, P.ProtocolError) as exc:
            self._lost(conn, exc)
        if body is None:
            self._lost(conn, None)
        return P.decode_reply(body)

    def _lost(self, conn: socket.socket, exc: BaseException | None) -> NoReturn:
        """The connection is of no more use (closed, broken, or a reply not read in time
        would arrive as the next call's): dropped, and the call fails as for a kernel gone."""
        why = (f"the node kernel did not answer within {conn.gettimeout():g} s"
               if isinstance(exc, TimeoutError) else "the node kernel stopped")
        self._drop(conn)
        raise E.DvkError.for_code(E.EDVSSHUTDOWN, why) from None

    def _drop(self, conn: socket.socket) -> None:
        if getattr(self._local, "conn", None) is conn:
            self._local.conn = self._local.holder = None
        conn.close()

    def _call(self, op: str, *args, fds: list[int] | None = None) -> list:
        return self._rpc(P.encode_request(op, args), op, fds)

    def _rpc(self, data: bytes, op: str, fds: list[int] | None = None) -> list:
        """Send one request frame and return the reply's values (DvkError on a failure)."""
        conn = getattr(self._local, "conn", None) or self._conn()
        try:
            if fds:
                socket.send_fds(conn, [data], fds)
            else:
                conn.sendall(data)
        except OSError as exc:
            self._lost(conn, exc)
        status, values = self._reply(conn)
        if status < 0:
            raise E.DvkError.for_code(status, op.lower())
        return values

    def _msg_call(self, op: str, ep: int, m: Message, timeout: int) -> list:
        """A call taking (endpoint, message, timeout), framed in one pack."""
        raw = bytes(m)
        if len(raw) != MESSAGE_SIZE:
            return self._call(op, ep, raw, timeout)
        return self._rpc(P.encode_imi(P.OP[op], ep, raw, timeout), op)

    def _value(self, op: str, *args) -> int:
        return self._call(op, *args)[0]

    def limit_answers(self, seconds: float | None) -> None:
        self._local.limit = seconds
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.settimeout(seconds)

    def close(self) -> None:
        """Close every connection of this process (the kernel treats it as the tasks' exit)."""
        with self._lock:
            for holder in list(self._conns):
                holder.sock.close()
            self._conns.clear()
        self._local = threading.local()

    # ------------------------------------------------------------------ memory
    def _register_arena(self, fd: int, size: int) -> int:
        return self._call("ARENA", size, fds=[fd])[0]

    def alloc(self, size: int) -> Buffer:
        """Arena memory; given back for reuse when the Buffer is gone (its owner, a thread's
        proxy object, ended)."""
        view, addr = self._arena.alloc(size)
        buf = Buffer(view, addr, self)
        weakref.finalize(buf, self._arena.free, addr).atexit = False
        return buf

    def proc_text(self, path: str) -> str:
        """A /proc/dvs view rendered by the node kernel (e.g. "nodes", "DC0/procs")."""
        return self._call("PROCFS", path)[1].decode()

    def shutdown_kernel(self) -> None:
        """Ask the node kernel to stop (every waiter gets an error)."""
        self._call("SHUTDOWN")

    # ------------------------------------------------------------------ administration
    def dvs_init(self, nodeid: int, params: DvsInfo | None = None) -> int:
        return self._value("DVS_INIT", nodeid, params.pack() if params else None)

    def dvs_end(self) -> int:
        return self._value("DVS_END")

    def getdvsinfo(self) -> tuple[int, DvsInfo]:
        nodeid, raw = self._call("GETDVSINFO")
        return nodeid, DvsInfo.unpack(raw)

    def dc_init(self, params: DcInfo) -> int:
        return self._value("DC_INIT", params.pack())

    def dc_end(self, dcid: int) -> int:
        return self._value("DC_END", dcid)

    def getdcinfo(self, dcid: int) -> DcInfo:
        return DcInfo.unpack(self._call("GETDCINFO", dcid)[1])

    def getnodeinfo(self, nodeid: int) -> NodeInfo:
        return NodeInfo.unpack(self._call("GETNODEINFO", nodeid)[1])

    def getprocinfo(self, dcid: int, p_nr: int) -> ProcInfo:
        return ProcInfo.unpack(self._call("GETPROCINFO", dcid, p_nr)[1])

    def getproxyinfo(self, pxid: int) -> tuple[ProcInfo, ProcInfo]:
        _rc, s, r = self._call("GETPROXYINFO", pxid)
        return ProcInfo.unpack(s), ProcInfo.unpack(r)

    def add_node(self, dcid: int, nodeid: int) -> int:
        return self._value("ADD_NODE", dcid, nodeid)

    def del_node(self, dcid: int, nodeid: int) -> int:
        return self._value("DEL_NODE", dcid, nodeid)

    def proxies_bind(self, name: str, pxid: int, spid: int, rpid: int,
                     maxcopybuf: int = C.MAXCOPYBUF) -> int:
        return self._value("PROXIES_BIND", name.encode(), pxid, spid, rpid, maxcopybuf)

    def proxies_unbind(self, pxid: int) -> int:
        return self._value("PROXIES_UNBIND", pxid)

    def node_up(self, name: str, nodeid: int, pxid: int) -> int:
        return self._value("NODE_UP", name.encode(), nodeid, pxid)

    def node_down(self, nodeid: int) -> int:
        return self._value("NODE_DOWN", nodeid)

    def proxy_conn(self, pxid: int, status: int) -> int:
        return self._value("PROXY_CONN", pxid, status)

    # ------------------------------------------------------------------ binding
    def bind_X(self, cmd: int, dcid: int, pid: int, ep: int, nodeid: int,
               name: str = "") -> int:
        return self._value("BIND", cmd, dcid, pid, ep, nodeid, name.encode())

    def unbind(self, dcid: int, ep: int, timeout: int = C.TIMEOUT_FOREVER) -> int:
        return self._value("UNBIND", dcid, ep, timeout)

    def wait4bindep_X(self, cmd: int, ep: int, timeout: int = C.TIMEOUT_FOREVER) -> int:
        return self._value("WAIT4BIND", cmd, ep, timeout)

    def getep(self, pid: int) -> int:
        return self._value("GETEP", pid)

    def migrate_X(self, cmd: int, pid: int, dcid: int, ep: int, nodeid: int) -> int:
        return self._value("MIGRATE", cmd, pid, dcid, ep, nodeid)

    # ------------------------------------------------------------------ IPC
    def send(self, ep: int, m: Message, timeout: int = C.TIMEOUT_FOREVER) -> int:
        self._msg_call("SEND", ep, m, timeout)
        return 0

    def receive(self, ep: int, m: Message, timeout: int = C.TIMEOUT_FOREVER) -> int:
        m.load(self._rpc(P.encode_ii(_RECEIVE, ep, timeout), "RECEIVE")[1])
        return 0

    def sendrec(self, ep: int, m: Message, timeout: int = C.TIMEOUT_FOREVER) -> int:
        m.load(self._msg_call("SENDREC", ep, m, timeout)[1])
        return 0

    def rcvrqst(self, m: Message, timeout: int = C.TIMEOUT_FOREVER) -> int:
        m.load(self._rpc(P.encode_i(_RCVRQST, timeout), "RCVRQST")[1])
        return 0

    def reply(self, ep: int, m: Message, timeout: int = C.TIMEOUT_FOREVER) -> int:
        self._msg_call("REPLY", ep, m, timeout)
        return 0

    def notify_X(self, src_nr: int, dst: int, value: int) -> int:
        self._call("NOTIFY", src_nr, dst, value)
        return 0

    def vcopy(self, src_ep: int, saddr: int, dst_ep: int, daddr: int, nbytes: int) -> int:
        return self._value("VCOPY", src_ep, saddr, dst_ep, daddr, nbytes)

    def relay(self, ep: int, m: Message) -> int:
        return self._value("RELAY", ep, bytes(m))

    def wakeup(self, dcid: int, ep: int) -> int:
        return self._value("WAKEUP", dcid, ep)

    def getpriv(self, dcid: int, ep: int) -> bytes:
        return self._call("GETPRIV", dcid, ep)[1]

    def setpriv(self, dcid: int, ep: int, priv: bytes) -> int:
        return self._value("SETPRIV", dcid, ep, priv)

    # ------------------------------------------------------------------ proxies
    def get2rmt(self, hdr: Header, payload: Buffer, timeout: int = C.HELLO_PERIOD) -> int:
        """Returns how many more commands were queued for this proxy (a hint for batching;
        0 when the kernel did not say)."""
        return _command(hdr, self._rpc(P.encode_ii(_GET2RMT, payload.addr, timeout), "GET2RMT"))

    # For a caller that makes this thread's get2rmt calls itself, outside Python (the DSP's
    # compiled sender): it writes the request on the thread's connection, reads the reply,
    # and hands back what it does not handle itself.
    def get2rmt_request(self, payload: Buffer, timeout: int = C.HELLO_PERIOD) -> bytes:
        """The request frame of `get2rmt(hdr, payload, timeout)`."""
        return P.encode_ii(_GET2RMT, payload.addr, timeout)

    def thread_channel(self) -> tuple[int, float | None]:
        """The calling thread's connection to the node kernel (opened when it has none): its
        descriptor and how long the kernel may take to answer (None: no limit).  Valid until
        a call of this thread fails (`channel_failed`)."""
        conn = getattr(self._local, "conn", None) or self._conn()
        return conn.fileno(), conn.gettimeout()

    def get2rmt_reply(self, hdr: Header, body: bytes) -> int:
        """The result of a get2rmt whose reply `body` such a caller read: as `get2rmt`."""
        return _command(hdr, self._reply_values(body, "get2rmt"))

    def put2lcl_reply(self, body: bytes) -> int:
        """The result of a put2lcl whose reply `body` such a caller read: as `put2lcl`."""
        return self._reply_values(body, "put2lcl")[0]

    def _reply_values(self, body: bytes, op: str) -> list:
        """The values of such a reply (DvkError for a failure, as `_rpc` raises)."""
        try:
            status, values = P.decode_reply(body)
        except P.ProtocolError as exc:
            self.channel_failed(exc)
        if status < 0:
            raise E.DvkError.for_code(status, op)
        return values

    def channel_failed(self, exc: BaseException) -> NoReturn:
        """Such a caller's call failed on the thread's connection (`exc`: TimeoutError when
        the kernel did not answer in time): dropped, and DvkError as for a kernel gone."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            raise E.DvkError.for_code(E.EDVSSHUTDOWN, "the node kernel stopped")
        self._lost(conn, exc)

    def put2lcl(self, hdr: Header, payload: Buffer | None) -> int:
        raw = bytes(hdr.buf)
        addr = payload.addr if payload else 0
        if len(raw) != HEADER_SIZE:
            return self._value("PUT2LCL", raw, addr)
        return self._rpc(P.encode_hu(_PUT2LCL, raw, addr), "PUT2LCL")[0]


def _command(hdr: Header, values: list) -> int:
    """A get2rmt's command into `hdr`; how many more wait (0 when the kernel did not say)."""
    hdr.load(values[1])
    return values[2] if len(values) > 2 else 0
