"""The node kernel process: a `NodeKernel` served on a Unix socket.

`run_node()` is what `dvsctl node start` runs: it initialises the DVS with the given node id
and DC0 with the reference parameters, then serves every process of the node until SIGTERM,
SIGINT or a SHUTDOWN request.  One thread serves each client connection (each client thread has
its own); a caller that blocks in the kernel blocks that thread only.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import struct
import threading
from collections.abc import Callable

from .. import consts as C
from .. import errors as E
from ..info import DcInfo, DvsInfo
from . import protocol as P
from .kernel import NodeKernel, Task, TaskGone

log = logging.getLogger("dvk.emu.server")

REAP_INTERVAL = 1.0


def default_rundir() -> str:
    """Where node kernel sockets live: $DVK_RUNDIR, else /run/dvk for root, else /tmp."""
    env = os.environ.get("DVK_RUNDIR")
    if env:
        return env
    if os.geteuid() == 0 and os.path.isdir("/run"):
        return "/run/dvk"
    return f"/tmp/dvk-{os.getuid()}"


def socket_path(nodeid: int, rundir: str | None = None) -> str:
    return os.path.join(rundir or default_rundir(), f"node{nodeid}.sock")


class NodeServer:
    """Accepts connections on `path` and runs each client's calls on its own thread."""

    def __init__(self, kernel: NodeKernel, path: str) -> None:
        self.kernel = kernel
        self.path = path
        self.stopping = threading.Event()
        self.conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        if os.path.exists(path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # left behind by a kernel that died
            else:
                probe.close()
                raise RuntimeError(f"a node kernel is already serving {path}")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        os.chmod(path, 0o600)
        self.listener.listen(128)
        self.handlers = self._handlers()

    # ------------------------------------------------------------------ serving
    def serve_forever(self) -> None:
        reaper = threading.Thread(target=self._reap_loop, name="reaper", daemon=True)
        reaper.start()
        self.listener.settimeout(0.5)
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self.stopping.is_set():
                    break
                raise
            conn.settimeout(None)
            with self._lock:
                self.conns.add(conn)
            threading.Thread(target=self._serve_conn, args=(conn,), daemon=True,
                             name="conn").start()
        self._close()

    def stop(self) -> None:
        self.stopping.set()

    def _close(self) -> None:
        try:
            self.listener.close()
        finally:
            if os.path.exists(self.path):
                os.unlink(self.path)
        with self.kernel.lock:
            for task in list(self.kernel.tasks.values()):
                task.dead = True
                task.cond.notify_all()
        with self._lock:
            for conn in list(self.conns):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _reap_loop(self) -> None:
        while not self.stopping.wait(REAP_INTERVAL):
            self.kernel.reap()

    def _serve_conn(self, conn: socket.socket) -> None:
        task: Task | None = None
        try:
            task = self._hello(conn)
            while task is not None and not self.stopping.is_set():
                fds: list[int] = []
                body = P.recv_frame(conn, fds)
                if body is None:
                    return
                try:
                    op, rc, results = self._request(task, body, fds)
                finally:
                    for fd in fds:
                        os.close(fd)
                conn.sendall(_reply(op, rc, results))
                if op == "SHUTDOWN" and rc == 0:
                    self.stop()
        except TaskGone:
            pass
        except (OSError, P.ProtocolError) as exc:
            if not self.stopping.is_set():
                log.debug("connection of task %s closed: %s", task and task.tid, exc)
        finally:
            with self._lock:
                self.conns.discard(conn)
            conn.close()
            if task is not None:
                self.kernel.detach(task)

    def _hello(self, conn: socket.socket) -> Task | None:
        """Answer requests until a valid HELLO attaches the caller; None when it hangs up."""
        while not self.stopping.is_set():
            fds: list[int] = []
            body = P.recv_frame(conn, fds)
            for fd in fds:
                os.close(fd)
            if body is None:
                return None
            try:
                op, args = P.decode_request(body)
            except P.ProtocolError:
                op, args = "", []
            if op != "HELLO" or not P.args_match(op, args) or args[0] != P.VERSION:
                conn.sendall(P.encode_reply(E.EDVSBADVALUE))
                continue
            _version, _pid, tid, comm = args
            task = self.kernel.attach(_peer_pid(conn), tid,
                                      (comm or b"").decode(errors="replace"),
                                      probe=_probe(conn))
            conn.sendall(P.encode_reply(0, [self.kernel.local_nodeid]))
            return task
        return None

    def _request(self, task: Task, body: bytes, fds: list[int]) -> tuple[str, int, list]:
        """Decode and run one request: (operation, status, results), whatever the bytes were."""
        try:
            op, args = P.decode_request(body)
        except P.UnknownOperation as exc:
            log.warning("task %d: %s", task.tid, exc)
            return "", E.EDVSNOSYS, []
        except P.ProtocolError as exc:
            log.warning("task %d: malformed request: %s", task.tid, exc)
            return "", E.EDVSINVAL, []
        rc, results = self._call(task, op, args, fds)
        return op, rc, results

    def _call(self, task: Task, op: str, args: list, fds: list[int]) -> tuple[int, list]:
        """Run one call; a bad request is EDVSINVAL, a fault of the kernel code EDVSGENERIC
        (logged with its traceback): a call never costs the connection."""
        handler = self.handlers.get(op)
        if handler is None:
            return E.EDVSNOSYS, []
        if not P.args_match(op, args):
            log.warning("task %d: bad arguments for %s", task.tid, op)
            return E.EDVSINVAL, []
        try:
            result = handler(task, args, fds)
        except E.DvkError as err:
            return err.code, []
        except TaskGone:
            raise
        except Exception:
            log.exception("node kernel fault in %s of task %d", op, task.tid)
            return E.EDVSGENERIC, []
        return 0, list(result) if isinstance(result, tuple) else [result]

    # ------------------------------------------------------------------ dispatch table
    def _handlers(self) -> dict[str, Callable]:
        k = self.kernel

        def info_reply(nodeid_and_info):
            nodeid, info = nodeid_and_info
            return nodeid, info.pack()

        def arena(t, a, fds):
            if len(fds) != 1:
                raise E.DvkError.for_code(E.EDVSBADF)
            return k.add_arena(t, fds[0], int(a[0]))

        def shutdown(t, a, fds):
            return 0

        return {
            "ARENA": arena,
            "PROCFS": lambda t, a, f: (0, k.proc_text(a[0].decode(errors="replace")).encode()),
            "SHUTDOWN": shutdown,
            "DVS_INIT": lambda t, a, f: k.dvs_init(
                t, a[0], _unpack(DvsInfo, a[1]) if a[1] is not None else None),
            "DVS_END": lambda t, a, f: k.dvs_end(t),
            "GETDVSINFO": lambda t, a, f: info_reply(k.getdvsinfo(t)),
            "DC_INIT": lambda t, a, f: k.dc_init(t, _unpack(DcInfo, a[0])),
            "DC_END": lambda t, a, f: k.dc_end(t, a[0]),
            "GETDCINFO": lambda t, a, f: (0, k.getdcinfo(t, a[0]).pack()),
            "GETNODEINFO": lambda t, a, f: (0, k.getnodeinfo(t, a[0]).pack()),
            "GETPROCINFO": lambda t, a, f: (0, k.getprocinfo(t, a[0], a[1]).pack()),
            "GETPROXYINFO": lambda t, a, f: (0, *[i.pack() for i in k.getproxyinfo(t, a[0])]),
            "ADD_NODE": lambda t, a, f: k.add_node(t, a[0], a[1]),
            "DEL_NODE": lambda t, a, f: k.del_node(t, a[0], a[1]),
            "PROXIES_BIND": lambda t, a, f: k.proxies_bind(t, a[0].decode(errors="replace"),
                                                           *a[1:5]),
            "PROXIES_UNBIND": lambda t, a, f: k.proxies_unbind(t, a[0]),
            "NODE_UP": lambda t, a, f: k.node_up(t, a[0].decode(errors="replace"), a[1], a[2]),
            "NODE_DOWN": lambda t, a, f: k.node_down(t, a[0]),
            "PROXY_CONN": lambda t, a, f: k.proxy_conn(t, a[0], a[1]),
            "BIND": lambda t, a, f: k.bind(t, *a[0:5], (a[5] or b"").decode(errors="replace")),
            "UNBIND": lambda t, a, f: k.unbind(t, a[0], a[1], a[2]),
            "WAIT4BIND": lambda t, a, f: k.wait4bind(t, a[0], a[1], a[2]),
            "GETEP": lambda t, a, f: k.getep(t, a[0]),
            "MIGRATE": _nosys,
            "SEND": lambda t, a, f: k.send(t, a[0], a[1], a[2]),
            "RECEIVE": lambda t, a, f: (0, k.receive(t, a[0], a[1])),
            "SENDREC": lambda t, a, f: (0, k.sendrec(t, a[0], a[1], a[2])),
            "RCVRQST": lambda t, a, f: (0, k.receive(t, C.ANY, a[0], rqst_only=True)),
            "REPLY": lambda t, a, f: k.reply(t, a[0], a[1], a[2]),
            "NOTIFY": lambda t, a, f: k.notify(t, a[0], a[1], a[2]),
            "VCOPY": lambda t, a, f: k.vcopy(t, *a[0:5]),
            "RELAY": lambda t, a, f: 0,
            "WAKEUP": lambda t, a, f: k.wakeup(t, a[0], a[1]),
            "GETPRIV": lambda t, a, f: (0, k.getpriv(t, a[0], a[1])),
            "SETPRIV": lambda t, a, f: k.setpriv(t, a[0], a[1], a[2]),
            "GET2RMT": lambda t, a, f: (0, *k.get2rmt_more(t, a[0], a[1])),
            "PUT2LCL": lambda t, a, f: k.put2lcl(t, a[0], a[1]),
        }


def _unpack(cls, raw: bytes):
    """An info struct from a request; EDVSINVAL when the bytes are not one."""
    if len(raw) != cls.STRUCT.size:
        raise E.DvkError.for_code(E.EDVSINVAL)
    return cls.unpack(raw)


def _reply(op: str, rc: int, results: list) -> bytes:
    """The reply frame; results that cannot be encoded are a kernel fault (EDVSGENERIC)."""
    try:
        return P.encode_reply(rc, results)
    except (TypeError, struct.error):
        log.exception("node kernel fault encoding the result of %s", op)
        return P.encode_reply(E.EDVSGENERIC)


def _nosys(task, args, fds):
    """Migration is not emulated (docs/emulator.md)."""
    raise E.DvkError.for_code(E.EDVSNOSYS)


def _peer_pid(conn: socket.socket) -> int:
    cred = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", cred)[0]


def _probe(conn: socket.socket) -> Callable[[], bool]:
    """A check that the client end of `conn` is still open (used while its caller sleeps)."""
    def alive() -> bool:
        try:
            return conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
        except BlockingIOError:
            return True
        except OSError:
            return False
    return alive


def run_node(nodeid: int, path: str | None = None, dvs: DvsInfo | None = None,
             dcs: list[DcInfo] | None = None, ready: Callable[[], None] | None = None) -> int:
    """Run a node kernel in this process until SIGTERM/SIGINT/SHUTDOWN; returns an exit code."""
    path = path or socket_path(nodeid)
    kernel = NodeKernel()
    boot = Task(tid=0, pid=os.getpid(), comm="dvk-node")
    kernel.dvs_init(boot, nodeid, dvs or DvsInfo())
    for dc in dcs if dcs is not None else [DcInfo(dc_flags=C.DC_RUNNING)]:
        kernel.dc_init(boot, dc)
    server = NodeServer(kernel, path)

    def on_signal(signum, _frame):
        log.info("node %d: signal %d, stopping", nodeid, signum)
        server.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("node %d kernel serving %s", nodeid, path)
    if ready is not None:
        ready()
    server.serve_forever()
    log.info("node %d kernel stopped", nodeid)
    return 0
