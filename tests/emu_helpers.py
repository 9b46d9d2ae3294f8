"""Shared helpers for the emulator tests (test_emu_*.py).

- `InProcNode`: a `NodeKernel` served on a Unix socket by a thread of the test process (so a
  test can also look at the kernel's state); `ProcNode`: a node kernel in a child process
  (`run_node`), as in a real deployment.
- `Actor`: a thread with a stable TID that runs the DVK calls handed to it; to the node kernel
  each actor is one task (one Linux thread), like one thread of a C program.
- `Child`: a small DVK program in a child process (bind, then sleep/receive/sendrec/...), for
  the process-exit paths (kill -9) and the cross-process vcopy.
- `FakeProxy`: the test process playing the proxy pair of a remote node (get2rmt / put2lcl).
- `Raw`: a connection to a node kernel driven by hand, for requests no `EmuDvk` would send.

Everything started here is stopped by `Cleanup`, also when a test fails.
"""

from __future__ import annotations

import contextlib
import os
import queue
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future

from dvk_cffi import consts as C
from dvk_cffi import errors as E
from dvk_cffi.emu import protocol as P
from dvk_cffi.emu.client import EmuDvk
from dvk_cffi.emu.kernel import NodeKernel, Task
from dvk_cffi.emu.node import wait_for_socket
from dvk_cffi.emu.server import NodeServer
from dvk_cffi.info import DcInfo, DvsInfo
from dvk_cffi.wire import Header, Message, make_header

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DC0 = 0
#: DC0 defaults of a node kernel process: nr_procs 221, nr_tasks 34, nr_sysprocs 64.
NR_PROCS, NR_TASKS, NR_SYSPROCS = 221, 34, 64
FIRST_USER = NR_SYSPROCS - NR_TASKS  # 30: first user process number

# Endpoints of the put2lcl tests (node 1 is local, nodes 2 and 3 remote, via pair 2), and the
# put2lcl check table, row by row: (name, header fields, error, the kernel's error ACK as
# (command, c_src, c_dst, c_pid) or None).  Driven through sockets (test_emu_kernel.py) and
# in-process (test_emu_put2lcl.py).
LSYS, LSYS2, LUSR = 10, 11, 40          # local system, local system, local user
RSYS, RUSR, RSYS3 = 20, 50, 21          # remote system (node 2), remote user (node 2), node 3
FREE_EP = 12                            # never bound
U_PID, L_PID = "U", "L"                 # placeholders for the lpid of the local destination
PUT2LCL_ROWS = [
    ("01_dcid_range", dict(c_dcid=32), E.EDVSBADDCID, None),
    ("01_dcid_negative", dict(c_dcid=-1), E.EDVSBADDCID, None),
    ("02_dc_not_running", dict(c_dcid=1), E.EDVSDCNOTRUN, None),
    ("03_src_range", dict(c_src=NR_PROCS), E.EDVSRANGE, None),
    ("03_dst_range", dict(c_dst=-NR_TASKS - 1), E.EDVSRANGE, None),
    ("04_snode_range", dict(c_snode=99), E.EDVSNODCNODE, None),
    ("04_snode_not_in_dc", dict(c_snode=5), E.EDVSNODCNODE, None),
    ("05_dnode_not_local", dict(c_dnode=3), E.EDVSBADNODEID, None),
    ("06_src_not_bound", dict(c_src=22), E.EDVSNOTBIND, None),
    ("07_src_endpoint", dict(c_src=C._ENDPOINT(1, RSYS)), E.EDVSENDPOINT, None),
    ("08_src_other_node", dict(c_snode=3), E.EDVSNONODE, None),
    ("09_user_to_user", dict(c_src=RUSR, c_dst=LUSR), E.EDVSTRAPDENIED,
     (C.CMD_SEND_ACK, LUSR, RUSR, U_PID)),
    ("10_src_is_local", dict(c_src=LSYS2), E.EDVSLCLPROC, None),
    ("12_dst_is_remote", dict(c_dst=RSYS3), E.EDVSRMTPROC, (C.CMD_SEND_ACK, RSYS3, RSYS, -1)),
    ("13_dst_free", dict(c_dst=FREE_EP), E.EDVSDSTDIED, (C.CMD_SEND_ACK, FREE_EP, RSYS, -1)),
    ("14_dst_endpoint", dict(c_dst=C._ENDPOINT(1, LSYS)), E.EDVSENDPOINT, None),
    ("16_user_send", dict(c_src=RUSR), E.EDVSBADCALL, None),
    ("16_user_notify", dict(c_src=RUSR, c_cmd=C.CMD_NTFY_MSG), E.EDVSBADCALL, None),
    ("16_user_reply", dict(c_src=RUSR, c_cmd=C.CMD_REPLY_MSG), E.EDVSBADCALL, None),
    ("16_user_vcopy", dict(c_src=RUSR, c_cmd=C.CMD_COPYIN_DATA, v_rqtr=RUSR), E.EDVSBADCALL,
     None),
    ("17_cmd_none", dict(c_cmd=C.CMD_NONE), E.EDVSBADREQUEST, None),
    ("17_cmd_hello", dict(c_cmd=C.CMD_HELLO), E.EDVSBADREQUEST, None),
    ("17_cmd_shutdown", dict(c_cmd=C.CMD_SHUTDOWN), E.EDVSBADREQUEST, None),
    ("17_ntfy_ack", dict(c_cmd=C.CMD_NTFY_ACK), E.EDVSBADREQUEST, None),
    ("17_reply_ack", dict(c_cmd=C.CMD_REPLY_ACK), E.EDVSBADREQUEST, None),
    ("17_procinfo", dict(c_cmd=C.CMD_PROCINFO), E.EDVSBADREQUEST, None),
    ("17_unknown", dict(c_cmd=0x1234), E.EDVSBADREQUEST, None),
]
CALL_TIMEOUT = 20.0                  # s, how long a test waits for any one call
SHORT = 150                          # ms, "nothing comes" timeouts


def short_tmpdir() -> str:
    """A private directory with a short path (Unix socket paths are limited to 108 bytes)."""
    return tempfile.mkdtemp(prefix="dvk", dir="/tmp")


def child_env(path: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["DVK_SOCKET"] = path
    env.pop("DVK_NODE", None)
    return env


def wait_until(pred, timeout: float = CALL_TIMEOUT, interval: float = 0.01, what: str = ""):
    """Poll `pred` until it returns a true value (returned); AssertionError on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or pred}")
        time.sleep(interval)


def raises_code(code: int):
    """`with raises_code(E.EDVSxxx):` - the block must raise a DvkError carrying that code."""
    return _RaisesCode(code)


class _RaisesCode:
    def __init__(self, code: int) -> None:
        self.code = code
        self.value: E.DvkError | None = None

    def __enter__(self):
        return self

    def __exit__(self, et, ev, tb):
        want = f"{E.error_name(self.code)} ({self.code})"
        __tracebackhide__ = True
        if et is None:
            raise AssertionError(f"expected {want}, the call succeeded")
        if not issubclass(et, E.DvkError):
            return False
        assert ev.code == self.code, f"expected {want}, got {E.error_name(ev.code)}: {ev}"
        self.value = ev
        return True


def error_of(fut: Future, timeout: float = CALL_TIMEOUT) -> int:
    """The EDVS code a future's call failed with (AssertionError when it succeeded)."""
    exc = fut.exception(timeout)
    assert isinstance(exc, E.DvkError), f"expected a DvkError, got {exc!r} / {fut}"
    return exc.code


def msg(**fields) -> Message:
    m = Message()
    for k, v in fields.items():
        setattr(m, k, v)
    return m


# ================================================================================ node kernels
class InProcNode:
    """A node kernel served by threads of the test process (state visible as `.kernel`)."""

    def __init__(self, nodeid: int, rundir: str, init: bool = True,
                 dcs: list[DcInfo] | None = None) -> None:
        self.nodeid = nodeid
        self.kernel = NodeKernel()
        if init:
            boot = Task(tid=0, pid=os.getpid(), comm="dvk-node")
            self.kernel.dvs_init(boot, nodeid, DvsInfo())
            for dc in dcs if dcs is not None else [DcInfo(dc_flags=C.DC_RUNNING)]:
                self.kernel.dc_init(boot, dc)
        self.path = os.path.join(rundir, f"node{nodeid}.sock")
        self.server = NodeServer(self.kernel, self.path)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True,
                                       name=f"node{nodeid}")
        self.thread.start()

    def slot(self, p_nr: int, dcid: int = DC0):
        return self.kernel.dcs[dcid].slot(p_nr)

    def stop(self) -> None:
        self.server.stop()
        poke = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:  # wake the accept() at once instead of waiting for its 0.5 s timeout
            poke.connect(self.path)
        except OSError:
            pass
        finally:
            poke.close()
        self.thread.join(10)


_NODE_MAIN = ("import sys\n"
              "from dvk_cffi.emu.server import run_node\n"
              "sys.exit(run_node(int(sys.argv[1]), sys.argv[2]))\n")


class ProcNode:
    """A node kernel in a child process (`run_node`: DVS node `nodeid`, DC0 defaults)."""

    def __init__(self, nodeid: int, rundir: str) -> None:
        self.nodeid = nodeid
        self.path = os.path.join(rundir, f"node{nodeid}.sock")
        self.log = os.path.join(rundir, f"node{nodeid}.log")
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _NODE_MAIN, str(nodeid), self.path],
                env=child_env(self.path), stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT)
        try:
            wait_for_socket(self.path, timeout=CALL_TIMEOUT, proc=self.proc)
        except Exception:
            self.kill()
            raise

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.terminate()
            time.sleep(0.05)
            poke = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:  # wake its accept() at once instead of waiting for the 0.5 s timeout
                poke.connect(self.path)
            except OSError:
                pass
            finally:
                poke.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.kill()


# ================================================================================ raw protocol
class Raw:
    """A hand-driven connection to a node kernel: requests built byte by byte."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(CALL_TIMEOUT)
        self.sock.connect(path)

    def body(self, body: bytes) -> tuple[int, list]:
        self.sock.sendall(struct.pack("<I", len(body)) + body)
        reply = P.recv_frame(self.sock)
        assert reply is not None, "the node kernel closed the connection"
        return P.decode_reply(reply)

    def call(self, op: str, *args) -> tuple[int, list]:
        return self.body(struct.pack("<H", P.OP[op]) + P.encode_values(args))

    def hello(self) -> None:
        rc, _ = self.call("HELLO", P.VERSION, os.getpid(), threading.get_native_id(), b"raw")
        assert rc == 0

    def close(self) -> None:
        self.sock.close()



# ================================================================================ threads
class Actor:
    """A daemon thread with a stable TID running submitted calls one after the other."""

    def __init__(self, name: str = "actor") -> None:
        self.name = name
        self._q: queue.Queue = queue.Queue()
        self.tid = 0
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), name=name, daemon=True)
        self.thread.start()
        if not ready.wait(10):
            raise RuntimeError("actor thread did not start")

    def _run(self, ready: threading.Event) -> None:
        self.tid = threading.get_native_id()
        ready.set()
        while True:
            item = self._q.get()
            if item is None:
                return
            fut, fn, args, kwargs = item
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args, **kwargs))
            except BaseException as exc:  # handed to the test
                fut.set_exception(exc)

    def submit(self, fn, *args, **kwargs) -> Future:
        fut: Future = Future()
        self._q.put((fut, fn, args, kwargs))
        return fut

    def call(self, fn, *args, **kwargs):
        return self.submit(fn, *args, **kwargs).result(CALL_TIMEOUT)

    def stop(self) -> None:
        self._q.put(None)


class Loop:
    """A daemon thread running `body()` until `stop()` (used by the relay's proxy threads)."""

    def __init__(self, body, name: str) -> None:
        self.stopping = threading.Event()
        self.tid = 0
        self.error: BaseException | None = None
        ready = threading.Event()

        def run():
            self.tid = threading.get_native_id()
            ready.set()
            try:
                body(self)
            except BaseException as exc:  # reported by the test
                self.error = exc

        self.thread = threading.Thread(target=run, name=name, daemon=True)
        self.thread.start()
        ready.wait(10)

    def stop(self) -> None:
        self.stopping.set()


# ================================================================================ child programs
CHILD_MAIN = r"""
import os, sys, time
from dvk_cffi import consts as C
from dvk_cffi.emu.client import EmuDvk
from dvk_cffi.wire import Message

d = EmuDvk(os.environ["DVK_SOCKET"])
ep, mode, arg = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
d.bind(0, ep)
m = Message()
if mode == "sleep":
    print("READY", flush=True)
    time.sleep(120)
elif mode == "receive":           # block receiving from `arg`
    print("READY", flush=True)
    d.receive(arg, m)
    print("GOT", m.m_source, m.m_type, flush=True)
    time.sleep(120)
elif mode == "sendrec":           # block in sendrec to `arg`
    print("READY", flush=True)
    m.m_type = 77
    d.sendrec(arg, m)
    time.sleep(120)
elif mode == "send_noterm":       # ignore SIGTERM, block sending to `arg`, report
    import signal
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print("READY", flush=True)
    try:
        d.send(arg, m)
        print("SENT 0", flush=True)
    except Exception as exc:
        print("SENT", getattr(exc, "code", exc), flush=True)
    time.sleep(120)
elif mode == "wait4bind":         # block waiting for endpoint `arg` to be bound
    print("READY", flush=True)
    d.wait4bindep(arg)
    time.sleep(120)
elif mode == "vcopy":             # offer buffers to server `arg`, check what it wrote
    n = int(sys.argv[4])
    out, back = d.alloc(n), d.alloc(n)
    out.write(bytes((i * 7 + 3) & 0xFF for i in range(n)))
    m.m_type, m.m1_i1, m.m1_p1, m.m1_p2 = 5, n, out.addr, back.addr
    print("READY", flush=True)
    d.sendrec(arg, m)
    ok = back.read(n) == bytes((i * 13 + 1) & 0xFF for i in range(n))
    print("DONE", "ok" if ok else "bad", m.m_type, flush=True)
"""


class Child:
    """A DVK program in a child process: binds `ep` in DC0, then does `mode` (CHILD_MAIN)."""

    def __init__(self, path: str, ep: int, mode: str, arg: int = 0, *extra: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-u", "-c", CHILD_MAIN, str(ep), mode, str(arg),
             *map(str, extra)],
            env=child_env(path), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        self.pid = self.proc.pid

    def expect(self, prefix: str, timeout: float = CALL_TIMEOUT) -> str:
        """The next stdout line; it must start with `prefix`."""
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line.startswith(prefix):
            self.kill()
            err = self.proc.stderr.read()
            raise AssertionError(f"child: expected {prefix!r}, got {line!r}; stderr:\n{err}")
        return line.strip()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None and not f.closed:
                f.close()


# ================================================================================ cleanup
class Cleanup:
    """Stops what a test started, in reverse order, whatever happens."""

    def __init__(self) -> None:
        self._items: list = []

    def add(self, fn, *args):
        self._items.append((fn, args))
        return fn

    def run(self) -> None:
        errors = []
        while self._items:
            fn, args = self._items.pop()
            try:
                fn(*args)
            except Exception as exc:  # keep cleaning
                errors.append(exc)
        if errors:
            raise errors[0]


class World:
    """What a test works with: a temp dir, nodes, clients, actors, children, all cleaned up."""

    def __init__(self) -> None:
        self.cleanup = Cleanup()
        self.dir = short_tmpdir()
        self.cleanup.add(shutil.rmtree, self.dir, True)
        self._dvks: list[EmuDvk] = []
        self._late: list = []  # stopped after the nodes (actors unblock when a node stops)

    def inproc_node(self, nodeid: int = 1, **kw) -> InProcNode:
        node = InProcNode(nodeid, self.dir, **kw)
        self.cleanup.add(self._stop_node, node)
        return node

    def proc_node(self, nodeid: int) -> ProcNode:
        node = ProcNode(nodeid, self.dir)
        self.cleanup.add(self._stop_node, node)
        return node

    def _stop_node(self, node) -> None:
        node.stop()

    def dvk(self, node) -> EmuDvk:
        d = EmuDvk(path=node.path)
        self._dvks.append(d)
        return d

    def actor(self, name: str = "actor") -> Actor:
        a = Actor(name)
        self._late.append(a.stop)
        return a

    def loop(self, body, name: str) -> Loop:
        lp = Loop(body, name)
        self._late.append(lp.stop)
        return lp

    def child(self, node, ep: int, mode: str, arg: int = 0, *extra: int) -> Child:
        ch = Child(node.path, ep, mode, arg, *extra)
        self.cleanup.add(ch.kill)
        return ch

    def close(self) -> None:
        try:
            self.cleanup.run()
        finally:
            for stop in self._late:
                stop()
            for d in self._dvks:
                d.close()


@contextlib.contextmanager
def make_world():
    """The body of the test files' `world` fixture."""
    w = World()
    try:
        yield w
    finally:
        w.close()


# ================================================================================ fake proxy
class FakeProxy:
    """The test process as the proxy pair of remote node `rnode` on node kernel `node`.

    `sproxy` and `rproxy` are actor threads registered with proxies_bind; `put()` builds a
    header by hand and delivers it with put2lcl, `get()` takes the next command with get2rmt.
    """

    def __init__(self, world: World, node, dvk: EmuDvk, rnode: int = 2,
                 connect: tuple[int, ...] = (C.CONNECT_SPROXY, C.CONNECT_RPROXY),
                 extra_nodes: tuple[int, ...] = ()) -> None:
        self.node, self.dvk, self.rnode = node, dvk, rnode
        self.sproxy = world.actor("sproxy")
        self.rproxy = world.actor("rproxy")
        # the sender thread talks to the kernel first; the receiver is found through /proc
        self.sproxy.call(dvk.getdvsinfo)
        dvk.proxies_bind(f"node{rnode}", rnode, self.sproxy.tid, self.rproxy.tid,
                         C.MAXCOPYBUF)
        for n in (rnode, *extra_nodes):
            dvk.node_up(f"node{n}", n, rnode)
        for status in connect:
            dvk.proxy_conn(rnode, status)
        self.spay = dvk.alloc(C.MAXCOPYBUF)
        self.rpay = dvk.alloc(C.MAXCOPYBUF)

    def header(self, **fields) -> Header:
        base = dict(c_cmd=C.CMD_SEND_MSG, c_dcid=DC0, c_src=20, c_dst=10, c_snode=self.rnode,
                    c_dnode=self.node.nodeid)
        base.update({k: v for k, v in fields.items() if k not in ("m_type", "m1_i1")})
        h = make_header(**base)
        h.c_msg.m_source = base["c_src"]
        h.c_msg.m_type = fields.get("m_type", 0)
        h.c_msg.m1_i1 = fields.get("m1_i1", 0)
        return h

    def put(self, payload: bytes | None = None, **fields) -> int:
        h = fields.pop("hdr", None) or self.header(**fields)
        if payload is not None:
            self.rpay.write(payload)
        return self.rproxy.call(self.dvk.put2lcl, h, self.rpay)

    def get(self, timeout: int = 5000) -> Header:
        h = Header()
        self.sproxy.call(self.dvk.get2rmt, h, self.spay, timeout)
        return h

    def get_async(self, timeout: int = C.TIMEOUT_FOREVER) -> tuple[Header, Future]:
        h = Header()
        return h, self.sproxy.submit(self.dvk.get2rmt, h, self.spay, timeout)

    def assert_nothing(self, timeout: int = SHORT) -> None:
        """get2rmt of the sender proxy gives nothing (EDVSTIMEDOUT)."""
        with raises_code(E.EDVSTIMEDOUT):
            h = self.get(timeout)
            raise AssertionError(f"unexpected command from get2rmt: {h!r}")
