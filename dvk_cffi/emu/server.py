"""The node kernel process: a `NodeKernel` served on a Unix socket.

`run_node()` is what `dvsctl node start` runs: it initialises the DVS with the given node id
and DC0 with the reference parameters, then serves every process of the node until SIGTERM,
SIGINT or a SHUTDOWN request.

One thread serves every connection from one epoll loop (each client thread has its own
connection).  A call that must block is parked (the kernel hands back a generator, tasks.py)
and resumed when a later call wakes its task or when its timeout, kept in a heap, expires; the
kernel code itself never touches a socket.  The loop holds the kernel lock while it works, so
another thread of the same process (the tests) may look at the kernel state under that lock.
"""

from __future__ import annotations

import array
import errno
import heapq
import itertools
import logging
import os
import select
import signal
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable, Sequence
from types import GeneratorType

from .. import consts as C
from .. import errors as E
from ..info import DcInfo, DvsInfo
from ..logs import RepeatLimit, report_suppressed
from . import protocol as P
from .kernel import NodeKernel, Task, TaskGone

log = logging.getLogger("dvk.emu.server")

REAP_INTERVAL = 1.0
#: A connection that has not said HELLO this long after it was accepted is closed: a process
#: that opens connections and never speaks would otherwise hold descriptors for good.
HELLO_TIMEOUT = 10.0
#: Bytes read per recvmsg; descriptors a connection may have waiting for its next request.
READ_SIZE = 1 << 16
MAX_FDS = 16
#: Ancillary space for as many descriptors as one message can carry (the kernel's
#: SCM_MAX_FD): descriptors that do not fit are dropped by the kernel, which closes them on
#: this thread where `_release_fd` cannot make their close harmless.
SCM_MAX_FD = 253
ANC_SPACE = socket.CMSG_SPACE(SCM_MAX_FD * 4)
#: A socket's linger turned off: its close returns at once and sends what is queued later.
_NO_LINGER = struct.pack("ii", 0, 0)
#: Reads a closing connection is drained with, at most (what its peer had queued, which is
#: bounded by the peer's send buffer once the connection is shut down).
DRAIN_READS = 1024
#: The longest request frame read: far more than any request (the longest carry a name or a
#: 60-byte struct), little enough that no connection makes the kernel buffer much.
MAX_FRAME = 1 << 20
#: Connections accepted per readiness of the listener (the next select takes the rest).
ACCEPT_BURST = 64
#: How long the listener rests when accept finds no descriptor or memory for a connection (a
#: connection that closes ends the rest at once); it stays readable meanwhile.
ACCEPT_PAUSE = 0.5
_ACCEPT_SHORTAGE = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_NO_DESCRIPTOR = frozenset({errno.EMFILE, errno.ENFILE})
#: Descriptors (connections and arenas) a process may hold in the node kernel and keep when
#: they run out: past this, its newest connection is closed for a process waiting to connect.
FAIR_SHARE = 256
#: Timer entries kept before the ones of ended calls are swept out.
TIMER_COMPACT = 4096
#: Replies a client may leave unread before its requests are no longer read.
WBUF_LIMIT = 1 << 20
#: Request bytes a client may have waiting (behind its parked call, or for their turn) before
#: its connection is no longer read.
RBUF_LIMIT = 1 << 20
#: Bytes all connections together may hold (requests not yet served, replies not yet taken).
#: The limits above are per connection, and one process may open thousands: past this, a
#: connection that holds bytes is not read until the total is below it again, and the others
#: are read SMALL_READ bytes at a time (more than any whole request).
BUFFER_BUDGET = 64 << 20
SMALL_READ = 4096
#: Requests of one connection served in a turn; the rest wait until every other connection
#: ready meanwhile had its turn (a read may bring thousands of pipelined requests).
SERVE_BURST = 16
_IN = select.EPOLLIN
_LEN = struct.Struct("<I")
_READABLE = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR
_EPOLLOUT = select.EPOLLOUT
_NO_FDS: tuple[int, ...] = ()


def _not_get2rmt(conn: _Conn) -> bool:
    """Sort key that puts parked GET2RMT calls first (`NodeServer._run_woken`)."""
    return conn.op != "GET2RMT"


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


class _Conn:
    """One client connection: its buffers, its task and the call it has parked, if any."""

    __slots__ = ("sock", "rbuf", "wbuf", "fds", "task", "call", "shape", "op", "seq",
                 "closed", "events", "accepted", "held", "pid")

    def __init__(self, sock: socket.socket, pid: int) -> None:
        self.sock = sock
        self.pid = pid                   # the connecting process (SO_PEERCRED)
        self.accepted = time.monotonic()
        self.rbuf = bytearray()
        self.wbuf = bytearray()
        self.fds: list[int] = []
        self.task: Task | None = None
        self.call = None                 # the parked generator
        self.shape: Callable | None = None
        self.op = ""
        self.seq = 0                     # which park a timer entry belongs to
        self.closed = False
        self.events = _IN
        self.held = 0                    # its bytes counted in NodeServer.held


class NodeServer:
    """Serves `kernel` on the Unix socket `path` from one selector loop."""

    def __init__(self, kernel: NodeKernel, path: str,
                 log_limit: RepeatLimit | None = None) -> None:
        """`log_limit`: the repeat limit of this server's log lines, whose held-back counts
        the loop reports as each window ends."""
        self.kernel = kernel
        self.path = path
        self.log_limit = log_limit
        self.stopping = threading.Event()
        self.conns: set[_Conn] = set()
        self.timers: list[tuple[float, int, _Conn, int]] = []
        self.backlog: set[_Conn] = set()
        self.held = 0                    # bytes in every connection's rbuf and wbuf
        self.starved: set[_Conn] = set()   # not read while `held` is over BUFFER_BUDGET
        self._compact_at = TIMER_COMPACT
        self._resuming = False
        self._accept_resume: float | None = None   # when a resting listener is polled again
        self._tick = itertools.count()
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
        self.listener.setblocking(False)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.epoll = select.epoll()
        self.fdmap: dict[int, object] = {self.listener.fileno(): "accept",
                                         self._wake_r.fileno(): "wakeup"}
        for fd in self.fdmap:
            self.epoll.register(fd, _IN)
        self.handlers = self._handlers()

    # ------------------------------------------------------------------ the loop
    def serve_forever(self) -> None:
        monotonic = time.monotonic
        next_reap = monotonic() + REAP_INTERVAL
        k = self.kernel
        poll, fdmap, event, stopping = self.epoll.poll, self.fdmap, self._event, self.stopping
        try:
            while not stopping.is_set():
                now = monotonic()
                wait = next_reap - now
                if self.timers:
                    wait = min(wait, self.timers[0][0] - now)
                if self._accept_resume is not None:
                    wait = min(wait, self._accept_resume - now)
                if self.backlog:
                    wait = 0.0   # requests wait for their turn: look for others, go on
                events = poll(wait if wait > 0.0 else 0.0)
                with k.lock:
                    for fd, mask in events:
                        data = fdmap.get(fd)
                        if data.__class__ is _Conn:
                            event(data, mask)
                        elif data == "accept":
                            self._accept()
                        elif data == "wakeup":
                            _drain(self._wake_r)
                    now = monotonic()
                    if now >= next_reap:
                        next_reap = now + REAP_INTERVAL
                        self._guarded(k.reap)
                        self._guarded(self._drop_silent, now)
                        if self.log_limit is not None:
                            self._guarded(report_suppressed, self.log_limit, log)
                    if self.timers and self.timers[0][0] <= now:
                        self._guarded(self._expire, now)
                    if k.runnable:
                        self._guarded(self._run_woken)
                    if self.backlog:
                        self._guarded(self._run_backlog)
                    if self._accept_resume is not None and now >= self._accept_resume:
                        self._guarded(self._resume_accept)
        finally:
            self._close()

    def _event(self, conn: _Conn, mask: int) -> None:
        """One connection's readiness; a fault of the server code costs that connection only."""
        try:
            if mask & _EPOLLOUT:
                self._flush(conn)
            if mask & _READABLE:
                self._read(conn)
        except Exception:
            log.exception("node kernel fault serving task %s; its connection is closed",
                          conn.task and conn.task.tid)
            self._drop(conn)

    def _guarded(self, fn, *args) -> None:
        """Run one of the loop's own steps; a fault is logged and the loop goes on."""
        try:
            fn(*args)
        except Exception:
            log.exception("node kernel fault in %s", getattr(fn, "__name__", fn))

    def stop(self) -> None:
        self.stopping.set()
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def _close(self) -> None:
        self._accept_resume = None  # the listener is gone: nothing to resume
        try:
            self.listener.close()
        finally:
            if os.path.exists(self.path):
                os.unlink(self.path)
        with self.kernel.lock:
            for conn in list(self.conns):
                if conn.task is not None:
                    conn.task.dead = True
            for conn in list(self.conns):
                self._drop(conn)
        self.epoll.close()
        self._wake_r.close()
        self._wake_w.close()

    # ------------------------------------------------------------------ sockets
    def _accept(self) -> None:
        for _ in range(ACCEPT_BURST):
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _NO_DESCRIPTOR and self._evict_hog(exc):
                    continue
                if exc.errno in _ACCEPT_SHORTAGE:
                    self._pause_accept(exc)
                else:
                    log.warning("accept: %s", exc)
                return
            sock.setblocking(False)
            try:
                pid = _peer_pid(sock)
            except OSError:
                sock.close()
                continue
            conn = _Conn(sock, pid)
            self.conns.add(conn)
            self.fdmap[sock.fileno()] = conn
            self.epoll.register(sock.fileno(), _IN)

    def _drop_silent(self, now: float) -> None:
        """Close the connections that have not said HELLO within HELLO_TIMEOUT."""
        for conn in [c for c in self.conns
                     if c.task is None and now - c.accepted > HELLO_TIMEOUT]:
            log.warning("a connection said no HELLO within %.0f s: closed", HELLO_TIMEOUT)
            self._drop(conn)

    def _evict_hog(self, exc: OSError) -> bool:
        """Descriptors ran out: close the newest connection of the process that holds the
        most of them (connections and arenas), when that is more than FAIR_SHARE, so that a
        process waiting to connect gets one; True when one was closed.  Otherwise one process
        opening thousands of connections kept every other one of the node from connecting
        for as long as it held them."""
        held: dict[int, int] = {}
        for c in self.conns:
            held[c.pid] = held.get(c.pid, 0) + 1
        if not held:
            return False
        for pid in held:
            space = self.kernel.spaces.get(pid)
            if space is not None:
                held[pid] += len(space.arenas)
        hog = max(held, key=held.__getitem__)
        if held[hog] <= FAIR_SHARE:
            return False
        newest = max((c for c in self.conns if c.pid == hog), key=lambda c: c.accepted)
        log.warning("accept: %s; closed the newest connection of process %d, which holds %d "
                    "descriptors (connections and arenas)", exc, hog, held[hog])
        self._drop(newest)
        return True

    def _pause_accept(self, exc: OSError) -> None:
        """Stop polling the listener for ACCEPT_PAUSE: accept fails while it stays readable,
        and the loop would go round at full speed (the connections wait in the backlog)."""
        self._accept_resume = time.monotonic() + ACCEPT_PAUSE
        self.epoll.modify(self.listener.fileno(), 0)
        log.warning("accept: %s; new connections wait until one closes or %.1f s passed",
                    exc, ACCEPT_PAUSE)

    def _resume_accept(self) -> None:
        if self._accept_resume is not None:
            self._accept_resume = None
            self.epoll.modify(self.listener.fileno(), _IN)

    def _read(self, conn: _Conn) -> None:
        if conn.closed:
            return
        try:
            size = READ_SIZE if self.held <= BUFFER_BUDGET else SMALL_READ
            data, anc, _flags, _addr = conn.sock.recvmsg(size, ANC_SPACE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.debug("connection of task %s: %s", conn.task and conn.task.tid, exc)
            self._drop(conn)
            return
        if anc:
            conn.fds.extend(_passed_fds(anc))
        while len(conn.fds) > MAX_FDS:  # more than any request carries: not kept open
            _release_fd(conn.fds.pop())
        if not data:
            self._drop(conn)  # the thread exited (or closed its connection)
            return
        if not conn.rbuf and conn.call is None and conn.task is not None and len(data) >= 4 \
                and _LEN.unpack_from(data, 0)[0] == len(data) - 4:
            if not conn.fds:  # the usual case: one whole request
                self._request(conn, data, 4, _NO_FDS)
                return
            fds, conn.fds = conn.fds, []
            try:
                self._request(conn, data, 4, fds)
            finally:
                for fd in fds:
                    _release_fd(fd)
            return
        conn.rbuf += data
        if conn.call is not None:  # behind a parked call: kept, read only up to RBUF_LIMIT
            self._update_events(conn)
            return
        self._serve(conn)

    def _serve(self, conn: _Conn) -> None:
        """Run the complete requests in the connection's buffer, one at a time: a parked call
        holds the ones behind it until it is answered.  SERVE_BURST of them a turn; the
        connection goes to the backlog for the rest."""
        buf = conn.rbuf
        turn = SERVE_BURST
        while conn.call is None and not conn.closed and len(buf) >= 4 \
                and len(conn.wbuf) <= WBUF_LIMIT:
            if turn == 0:
                self.backlog.add(conn)
                break
            turn -= 1
            (n,) = _LEN.unpack_from(buf, 0)
            if n > MAX_FRAME:
                log.warning("connection of task %s: frame of %d bytes",
                            conn.task and conn.task.tid, n)
                self._drop(conn)
                return
            if len(buf) < 4 + n:
                break
            body = bytes(buf[4:4 + n])
            del buf[:4 + n]
            fds, conn.fds = conn.fds, []
            try:
                if conn.task is None:
                    self._hello(conn, body)
                else:
                    self._request(conn, body, 0, fds)
            finally:
                for fd in fds:
                    _release_fd(fd)
        self._update_events(conn)

    def _send(self, conn: _Conn, data: bytes) -> None:
        if conn.closed:
            return
        if not conn.wbuf:
            try:
                sent = conn.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self._drop(conn)
                return
            if sent == len(data):
                return
            data = data[sent:]
        conn.wbuf += data
        self._update_events(conn)

    def _flush(self, conn: _Conn) -> None:
        if conn.closed or not conn.wbuf:
            return
        try:
            sent = conn.sock.send(conn.wbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        del conn.wbuf[:sent]
        self._update_events(conn)
        if conn.rbuf and conn.call is None and len(conn.wbuf) <= WBUF_LIMIT:
            self.backlog.add(conn)

    def _update_events(self, conn: _Conn) -> None:
        """Wait for room to write while replies are pending; stop reading from a client that
        does not read its replies until they are below WBUF_LIMIT, and from one whose requests
        waiting (behind its parked call, or for their turns) are over RBUF_LIMIT (a hang-up is
        reported all the same, so the end of a parked client is still seen); and while all
        connections together hold more than BUFFER_BUDGET, from every one that holds bytes."""
        if conn.closed:
            return
        held = len(conn.rbuf) + len(conn.wbuf)
        if held != conn.held:
            self.held += held - conn.held
            conn.held = held
        starved = held > 0 and self.held > BUFFER_BUDGET
        if starved:
            if conn not in self.starved:
                self.starved.add(conn)
                log.warning("connections hold %d bytes, over the budget of %d: the one of "
                            "task %s (%d bytes) is not read until they hold less", self.held,
                            BUFFER_BUDGET, conn.task and conn.task.tid, held)
        elif self.starved:
            self.starved.discard(conn)
        if starved or len(conn.wbuf) > WBUF_LIMIT or len(conn.rbuf) > RBUF_LIMIT:
            events = _EPOLLOUT if conn.wbuf else 0
        elif conn.wbuf:
            events = _IN | _EPOLLOUT
        else:
            events = _IN
        if events != conn.events:
            conn.events = events
            self.epoll.modify(conn.sock.fileno(), events)
        if self.starved and self.held <= BUFFER_BUDGET:
            self._feed_starved()

    def _feed_starved(self) -> None:
        """The total is below BUFFER_BUDGET again: read the connections it had stopped."""
        starved, self.starved = self.starved, set()
        for conn in starved:
            self._update_events(conn)

    def _drop(self, conn: _Conn) -> None:
        """Close a connection: its thread is gone, so is its task (the kernel's exit hook)."""
        if conn.closed:
            return
        conn.closed = True
        self.conns.discard(conn)
        self.held -= conn.held
        conn.held = 0
        self.starved.discard(conn)
        fd = conn.sock.fileno()
        self.fdmap.pop(fd, None)
        try:
            self.epoll.unregister(fd)
        except (OSError, ValueError):
            pass
        _close_connection(conn.sock)
        for fd in conn.fds:
            _release_fd(fd)
        conn.fds = []
        self._resume_accept()  # a descriptor is free for a waiting connection
        if self.starved and self.held <= BUFFER_BUDGET:
            self._feed_starved()
        call, conn.call = conn.call, None
        task = conn.task
        if task is not None:
            if conn in task.parked:
                task.parked.remove(conn)
            try:
                self.kernel.detach(task)
            except Exception:
                log.exception("node kernel fault in the exit of task %d", task.tid)
        if call is not None:
            try:
                call.close()
            except Exception:
                log.exception("node kernel fault unwinding %s of task %d", conn.op,
                              task.tid if task else -1)

    # ------------------------------------------------------------------ requests
    def _hello(self, conn: _Conn, body: bytes) -> None:
        """The first request must be a valid HELLO; anything else is refused (kept open)."""
        try:
            op, args = P.decode_request(body)
        except P.ProtocolError:
            op, args = "", []
        if op != "HELLO" or not P.args_match(op, args) or args[0] != P.VERSION:
            self._send(conn, P.encode_reply(E.EDVSBADVALUE))
            return
        _version, _pid, tid, comm = args
        pid = conn.pid
        if not _thread_of(pid, tid):  # the kernel signals tasks by TID: it must be theirs
            log.warning("HELLO of process %d names TID %d, not one of its threads", pid, tid)
            self._send(conn, P.encode_reply(E.EDVSBADVALUE))
            return
        conn.task = self.kernel.attach(pid, tid, _text(comm or b""))
        self._send(conn, P.encode_reply(0, [self.kernel.local_nodeid]))

    def _request(self, conn: _Conn, body: bytes, pos: int, fds: Sequence[int]) -> None:
        """Decode and start the call at `pos` of `body`; whatever the bytes were, it is
        answered (or parked)."""
        task = conn.task
        if task.dead:  # another connection of its thread closed, which was the thread's exit
            task = conn.task = self.kernel.attach(task.pid, task.tid, task.comm)
        if task.parked:
            # A thread is in one call at a time; another connection of it has one waiting in
            # the kernel.  Two at once would put its descriptor twice in the queues (a
            # senders FIFO) that the kernel code keeps it in once.
            log.warning("task %d: a call while another of its calls waits; refused", task.tid)
            self._answer(conn, "", E.EDVSBUSY, [])
            return
        try:
            op, args, ok = P.decode_checked(body, pos)
        except P.UnknownOperation as exc:
            log.warning("task %d: %s", task.tid, exc)
            self._answer(conn, "", E.EDVSNOSYS, [])
            return
        except P.ProtocolError as exc:
            log.warning("task %d: malformed request: %s", task.tid, exc)
            self._answer(conn, "", E.EDVSINVAL, [])
            return
        entry = self.handlers.get(op)
        if entry is None:
            self._answer(conn, op, E.EDVSNOSYS, [])
            return
        if not ok:
            log.warning("task %d: bad arguments for %s", task.tid, op)
            self._answer(conn, op, E.EDVSINVAL, [])
            return
        handler, shape = entry
        conn.op, conn.shape = op, shape
        try:
            result = handler(task, args, fds)
        except E.DvkError as err:
            self._answer(conn, op, err.code, [])
            return
        except TaskGone:
            self._drop(conn)
            return
        except Exception:
            log.exception("node kernel fault in %s of task %d", op, task.tid)
            self._answer(conn, op, E.EDVSGENERIC, [])
            return
        if result.__class__ is GeneratorType:
            self._step(conn, result)
        else:
            self._done(conn, result)

    def _step(self, conn: _Conn, call) -> None:
        """Run a blocking call until it parks again or ends (then it is answered)."""
        task = conn.task
        try:
            deadline = call.send(None)
        except StopIteration as stop:
            if conn.call is not None:
                self._unpark(conn)
            self._done(conn, stop.value)
            return
        except E.DvkError as err:
            self._unpark(conn)
            self._answer(conn, conn.op, err.code, [])
            return
        except TaskGone:
            self._unpark(conn)
            self._drop(conn)
            return
        except Exception:
            self._unpark(conn)
            log.exception("node kernel fault in %s of task %d", conn.op, task.tid)
            self._answer(conn, conn.op, E.EDVSGENERIC, [])
            return
        conn.call = call
        conn.seq += 1
        if conn not in task.parked:
            task.parked.append(conn)
        if deadline is not None:
            heapq.heappush(self.timers, (deadline, next(self._tick), conn, conn.seq))
            if len(self.timers) > self._compact_at:
                self._compact_timers()

    def _compact_timers(self) -> None:
        """Drop the entries of calls that ended before their timeout (a server receiving with
        a 30 s timeout thousands of times a second would otherwise pile them up)."""
        self.timers = [t for t in self.timers
                       if t[2].call is not None and t[2].seq == t[3] and not t[2].closed]
        heapq.heapify(self.timers)
        self._compact_at = max(TIMER_COMPACT, 2 * len(self.timers))

    def _unpark(self, conn: _Conn) -> None:
        conn.call = None
        task = conn.task
        if task is not None and conn in task.parked:
            task.parked.remove(conn)
        if conn.rbuf:
            self.backlog.add(conn)  # requests that waited behind the parked call

    def _done(self, conn: _Conn, result) -> None:
        if conn.shape is not None:
            result = conn.shape(result)
        self._answer(conn, conn.op, 0, result if result.__class__ is tuple else (result,))

    def _answer(self, conn: _Conn, op: str, rc: int, results: Sequence) -> None:
        # The calls this one woke are answered first: a woken caller (a sendrec waiting for
        # its reply) is usually the one somebody waits for, the caller of this one is not.
        if self.kernel.runnable:
            self._run_woken()
        self._send(conn, _reply(op, rc, results))
        if op == "SHUTDOWN" and rc == 0:
            self.stop()

    def _expire(self, now: float) -> None:
        """Resume the parked calls whose time has come."""
        timers = self.timers
        while timers and timers[0][0] <= now:
            _deadline, _tick, conn, seq = heapq.heappop(timers)
            if conn.call is not None and conn.seq == seq and not conn.closed:
                self._step(conn, conn.call)

    def _run_woken(self) -> None:
        """Resume the parked calls of the tasks that calls woke, until none is left (one level:
        a call answered meanwhile leaves its wake-ups to the loop already running).  A sender
        proxy's GET2RMT goes first: the command it takes goes on to another node, where a
        process waits for it (the SEND_ACK that ends a remote SEND, a request), while a local
        caller woken with it has only its own answer to take."""
        if self._resuming:
            return
        self._resuming = True
        try:
            runnable = self.kernel.runnable
            while runnable:
                conns = [conn for task in runnable for conn in task.parked]
                runnable.clear()
                if len(conns) > 1:
                    conns.sort(key=_not_get2rmt)
                for conn in conns:
                    if conn.call is not None and not conn.closed:
                        self._step(conn, conn.call)
        finally:
            self._resuming = False

    def _run_backlog(self) -> None:
        """Serve the requests that waited behind calls which have ended, or for their turn:
        a turn each (a connection with more goes back for the next one)."""
        backlog, self.backlog = self.backlog, set()
        for conn in backlog:
            if not conn.closed:
                self._serve(conn)
            self._run_woken()

    # ------------------------------------------------------------------ dispatch table
    def _handlers(self) -> dict[str, tuple[Callable, Callable | None]]:
        """op -> (call, shape): `call(task, args, fds)` returns the kernel's result or a
        blocking call (generator); `shape` turns that result into the reply's values."""
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
            "ARENA": (arena, None),
            "PROCFS": (lambda t, a, f: (0, k.proc_text(_text(a[0])).encode()), None),
            "SHUTDOWN": (shutdown, None),
            "DVS_INIT": (lambda t, a, f: k.dvs_init(
                t, a[0], _unpack(DvsInfo, a[1]) if a[1] is not None else None), None),
            "DVS_END": (lambda t, a, f: k.dvs_end(t), None),
            "GETDVSINFO": (lambda t, a, f: info_reply(k.getdvsinfo(t)), None),
            "DC_INIT": (lambda t, a, f: k.dc_init(t, _unpack(DcInfo, a[0])), None),
            "DC_END": (lambda t, a, f: k.dc_end(t, a[0]), None),
            "GETDCINFO": (lambda t, a, f: (0, k.getdcinfo(t, a[0]).pack()), None),
            "GETNODEINFO": (lambda t, a, f: (0, k.getnodeinfo(t, a[0]).pack()), None),
            "GETPROCINFO": (lambda t, a, f: (0, k.getprocinfo(t, a[0], a[1]).pack()), None),
            "GETPROXYINFO": (lambda t, a, f: (0, *[i.pack() for i in k.getproxyinfo(t, a[0])]),
                             None),
            "ADD_NODE": (lambda t, a, f: k.add_node(t, a[0], a[1]), None),
            "DEL_NODE": (lambda t, a, f: k.del_node(t, a[0], a[1]), None),
            "PROXIES_BIND": (lambda t, a, f: k.proxies_bind(t, _text(a[0]), *a[1:5]), None),
            "PROXIES_UNBIND": (lambda t, a, f: k.proxies_unbind(t, a[0]), None),
            "NODE_UP": (lambda t, a, f: k.node_up(t, _text(a[0]), a[1], a[2]), None),
            "NODE_DOWN": (lambda t, a, f: k.node_down(t, a[0]), None),
            "PROXY_CONN": (lambda t, a, f: k.proxy_conn(t, a[0], a[1]), None),
            "BIND": (lambda t, a, f: k.bind(t, *a[0:5], _text(a[5] or b"")), None),
            "UNBIND": (lambda t, a, f: k.unbind(t, a[0], a[1], a[2]), None),
            "WAIT4BIND": (lambda t, a, f: k.wait4bind(t, a[0], a[1], a[2]), None),
            "GETEP": (lambda t, a, f: k.getep(t, a[0]), None),
            "MIGRATE": (_nosys, None),
            "SEND": (lambda t, a, f: k.send(t, a[0], a[1], a[2]), None),
            "RECEIVE": (lambda t, a, f: k.receive(t, a[0], a[1]), _after_status),
            "SENDREC": (lambda t, a, f: k.sendrec(t, a[0], a[1], a[2]), _after_status),
            "RCVRQST": (lambda t, a, f: k.receive(t, C.ANY, a[0], rqst_only=True),
                        _after_status),
            "REPLY": (lambda t, a, f: k.reply(t, a[0], a[1], a[2]), None),
            "NOTIFY": (lambda t, a, f: k.notify(t, a[0], a[1], a[2]), None),
            "VCOPY": (lambda t, a, f: k.vcopy(t, *a[0:5]), None),
            "RELAY": (lambda t, a, f: 0, None),
            "WAKEUP": (lambda t, a, f: k.wakeup(t, a[0], a[1]), None),
            "GETPRIV": (lambda t, a, f: (0, k.getpriv(t, a[0], a[1])), None),
            "SETPRIV": (lambda t, a, f: k.setpriv(t, a[0], a[1], a[2]), None),
            "GET2RMT": (lambda t, a, f: k.get2rmt_more(t, a[0], a[1]), _status_first),
            "PUT2LCL": (lambda t, a, f: k.put2lcl(t, a[0], a[1]), None),
        }

def _text(raw: bytes) -> str:
    """A C string of a request (a name, a /proc path): its bytes as they are, one character
    each (latin-1), so the info structs pack a name back into the same bytes."""
    return raw.decode("latin-1")


def _after_status(result):
    """The reply values of a call that returns a message: status 0, then the message."""
    return 0, result


def _status_first(result: tuple):
    """The reply values of get2rmt: status 0, the header, the queued count."""
    return (0, *result)


def _drain(sock: socket.socket) -> None:
    try:
        while sock.recv(4096):
            pass
    except (BlockingIOError, InterruptedError):
        pass


def _release_fd(fd: int) -> None:
    """Close a descriptor a client passed (SCM_RIGHTS).  The client may have closed its own
    copy, so this close can be the last one and its release runs here, on the loop: a TCP
    socket with SO_LINGER waits there until its peer took the queued bytes or the linger time
    (any length its owner chose) passed, and every call of the node stopped meanwhile.  A
    socket's linger is turned off before the close, which then returns at once."""
    try:
        is_socket = stat.S_ISSOCK(os.fstat(fd).st_mode)
    except OSError:
        is_socket = False
    if is_socket:
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            pass
        else:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _NO_LINGER)
            except OSError:
                pass
            sock.close()
            return
    try:
        os.close(fd)
    except OSError:
        pass


def _close_connection(sock: socket.socket) -> None:
    """Close a client connection without letting a descriptor still queued on it (sent with
    bytes the loop had not read yet) be released on the loop: the connection is shut down,
    which ends the client's sends, and what it had queued is read and its descriptors are
    released by `_release_fd`."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
        for _ in range(DRAIN_READS):
            data, anc, _flags, _addr = sock.recvmsg(READ_SIZE, ANC_SPACE)
            _release_passed(anc)
            if not data and not anc:
                break
    except OSError:
        pass
    sock.close()


def _passed_fds(anc) -> list[int]:
    """The descriptors in the ancillary data of a recvmsg."""
    out: list[int] = []
    for level, kind, raw in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds = array.array("i")
            fds.frombytes(raw[:len(raw) - len(raw) % fds.itemsize])
            out.extend(fds)
    return out


def _release_passed(anc) -> None:
    for fd in _passed_fds(anc):
        _release_fd(fd)


def _unpack(cls, raw: bytes):
    """An info struct from a request; EDVSINVAL when the bytes are not one."""
    if len(raw) != cls.STRUCT.size:
        raise E.DvkError.for_code(E.EDVSINVAL)
    return cls.unpack(raw)


def _reply(op: str, rc: int, results: Sequence) -> bytes:
    """The reply frame; results that cannot be encoded are a kernel fault (EDVSGENERIC)."""
    try:
        return P.encode_reply(rc, results)
    except (TypeError, struct.error):
        log.exception("node kernel fault encoding the result of %s", op)
        return P.encode_reply(E.EDVSGENERIC)


def _nosys(task, args, fds):
    """Migration is not emulated (docs/emulator.md)."""
    raise E.DvkError.for_code(E.EDVSNOSYS)


def _thread_of(pid: int, tid: int) -> bool:
    """`tid` is a thread of process `pid` (0 and negative values name process groups)."""
    return tid > 0 and os.path.exists(f"/proc/{pid}/task/{tid}")


def _peer_pid(conn: socket.socket) -> int:
    cred = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", cred)[0]


def run_node(nodeid: int, path: str | None = None, dvs: DvsInfo | None = None,
             dcs: list[DcInfo] | None = None, ready: Callable[[], None] | None = None) -> int:
    """Run a node kernel in this process until SIGTERM/SIGINT/SHUTDOWN; returns an exit code."""
    path = path or socket_path(nodeid)
    kernel = NodeKernel()
    boot = Task(tid=0, pid=os.getpid(), comm="dvk-node")
    kernel.dvs_init(boot, nodeid, dvs or DvsInfo())
    for dc in dcs if dcs is not None else [DcInfo(dc_flags=C.DC_RUNNING)]:
        kernel.dc_init(boot, dc)
    limit = RepeatLimit()       # a program's every malformed request is a logged line
    log.addFilter(limit)
    server = NodeServer(kernel, path, log_limit=limit)

    def on_signal(signum, _frame):
        log.info("node %d: signal %d, stopping", nodeid, signum)
        server.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("node %d kernel serving %s", nodeid, path)
    if ready is not None:
        ready()
    try:
        server.serve_forever()
    finally:
        log.removeFilter(limit)
    log.info("node %d kernel stopped", nodeid)
    return 0
