"""A `Link` is both TCP directions between this node and one peer (D10).

SPROXY[P] owns the outgoing connection, RPROXY[P] the incoming one.  The link carries traffic
only when both are up: the second direction to come up reports CONNECT_RPROXY and CONNECT_SPROXY
to the kernel; losing either direction tears down both (DISCONNECT_SPROXY, DISCONNECT_RPROXY, both
sockets closed), so blocked callers get EDVSNOTCONN and both threads start over.  The state lives
under one `threading.Condition` (the C `px_conn_mtx` with bits SCONNECTED/RCONNECTED, done
right: nobody waits on a lost wake-up).
"""

from __future__ import annotations

import collections
import logging
import selectors
import socket
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import lz4.frame

from dvk_cffi import consts as C
from dvk_cffi.api import Dvk
from dvk_cffi.errors import DvkError
from dvk_cffi.wire import HEADER_SIZE

from .misc import Counters

log = logging.getLogger("dsp.link")

SCONNECTED = 1 << C.PX_BIT_SCONNECTED
RCONNECTED = 1 << C.PX_BIT_RCONNECTED

#: At most this many extra headers in one batch frame (c_len = n x 120 <= MAXCOPYBUF).
MAXBATCMD = C.MAXCOPYBUF // HEADER_SIZE
#: COPY data frames: never batched; the only frames LZ4 compresses (ARCHITECTURE §4).
COPY_DATA = frozenset({C.CMD_COPYIN_DATA, C.CMD_COPYOUT_DATA})
#: A submitter that finds the writer busy and more than this much queued writes (waits) itself.
QUEUE_HIGH_WATER = 512
#: At most this many buffers in one sendmsg (IOV_MAX is 1024 on Linux).
MAX_IOV = 1000
_HEAD = struct.Struct("<iiiiiiiiiiI")        # c_cmd .. c_flags, as ROUTE_STRUCT
_LEN_FLAGS_OFF = 28                          # c_len at 28, c_flags at 40
_I32 = struct.Struct("<i")
_U32 = struct.Struct("<I")

#: Per-thread cork: while set, `Link.submit` only queues and remembers the link; `uncork`
#: writes every corked link's queue (one sendmsg, batches built from what is queued).
_cork = threading.local()


def cork() -> None:
    """Start collecting this thread's frames (e.g. while a read buffer holds more frames)."""
    if getattr(_cork, "links", None) is None:
        _cork.links = {}


def uncork() -> None:
    """Write what this thread queued while corked (no-op when not corked)."""
    links = getattr(_cork, "links", None)
    if links is None:
        return
    _cork.links = None
    for link in links:
        link.flush()


def corked() -> bool:
    return getattr(_cork, "links", None) is not None


def compress_frame(hbuf: bytearray, data, length: int):
    """LZ4-frame compress COPY data when that shrinks it: sets c_len and FLAG_LZ4 in `hbuf`
    and returns the bytes to send (else `data` unchanged).  lz4 releases the GIL; call it
    outside any lock."""
    packed = lz4.frame.compress(data[:length] if len(data) != length else data)
    if len(packed) >= length:
        return data
    _I32.pack_into(hbuf, 28, len(packed))
    _U32.pack_into(hbuf, 40, _U32.unpack_from(hbuf, 40)[0] | C.FLAG_LZ4)
    return packed


@dataclass
class PeerSpec:
    """What a link needs to know about its peer (from the config)."""

    nodeid: int
    name: str
    host: str           # rname: where the peer listens
    sport: int          # port on the peer this node's SPROXY connects to
    rport: int          # port this node's RPROXY listens on for the peer
    batch: bool = False
    compress: bool = False
    autobind: bool = False


class Link:
    """Connection state and the send side of the link to one peer."""

    def __init__(self, spec: PeerSpec, dvk: Dvk, monitor: OutMonitor | None = None) -> None:
        self.spec = spec
        self.peer = spec.nodeid
        self.dvk = dvk
        self.monitor = monitor
        self.cond = threading.Condition()
        self.status = 0                  # SCONNECTED | RCONNECTED
        self.up = False
        self.generation = 0              # bumped on every link-up and link-down
        self.out_sock: socket.socket | None = None
        self.in_sock: socket.socket | None = None
        self.in_serial = 0               # bumped for every accepted connection
        self.send_lock = threading.Lock()
        self.outq: collections.deque = collections.deque()
        self.batch = spec.batch
        self.compress = spec.compress
        self.stopping = False
        self.sent = Counters()
        self.received = Counters()
        self.peer_addr: str | None = None
        self.last_rx = 0.0
        self.last_tx = 0.0
        self.downs = 0
        self.on_down: list = []          # callbacks(peer) after a link-up ended
        self._down_pending = False

    # ------------------------------------------------------------------ state changes
    def set_out(self, sock: socket.socket) -> bool:
        """SPROXY connected; False when the link is shutting down."""
        with self.cond:
            if self.stopping:
                sock.close()
                return False
            self.out_sock = sock
            self.status |= SCONNECTED
            if self.monitor is not None:
                self.monitor.watch(sock, self)
            self._maybe_up()
            self.cond.notify_all()
        self.fire_down()
        return True

    def set_in(self, sock: socket.socket) -> bool:
        """RPROXY accepted the peer; False when the link is shutting down."""
        with self.cond:
            if self.stopping:
                sock.close()
                return False
            if self.in_sock is not None:  # the peer reconnected: the old link is dead
                self._down("the peer opened a new connection")
            self.in_sock = sock
            self.in_serial += 1
            self.status |= RCONNECTED
            self._maybe_up()
            self.cond.notify_all()
        self.fire_down()
        return True

    def _maybe_up(self) -> None:
        if self.up or self.status != SCONNECTED | RCONNECTED:
            return
        try:
            self.dvk.proxy_conn(self.peer, C.CONNECT_RPROXY)
            self.dvk.proxy_conn(self.peer, C.CONNECT_SPROXY)
        except DvkError as err:
            log.error("link to node %d: kernel refused the connection: %s", self.peer, err)
            self._down("kernel refused proxy_conn")
            return
        self.up = True
        self.generation += 1
        log.info("link to node %d (%s) up", self.peer, self.spec.name)

    def down(self, reason: str, generation: int | None = None) -> None:
        """Tear down both directions (no-op for a stale generation)."""
        with self.cond:
            if generation is not None and generation != self.generation:
                return
            self._down(reason)
            self.cond.notify_all()
        self.fire_down()

    def _down(self, reason: str) -> None:
        if not self.status and not self.up:
            return
        was_up = self.up
        self.up = False
        self.status = 0
        self.generation += 1  # a late down() for the old connections must not hit new ones
        for sock in (self.out_sock, self.in_sock):
            if sock is not None:
                if self.monitor is not None:
                    self.monitor.forget(sock)
                _close(sock)
        self.out_sock = self.in_sock = None
        if was_up:
            self.downs += 1
            self._down_pending = True
            for status in (C.DISCONNECT_SPROXY, C.DISCONNECT_RPROXY):
                try:
                    self.dvk.proxy_conn(self.peer, status)
                except DvkError as err:
                    log.debug("proxy_conn(%d, %d): %s", self.peer, status, err)
            log.info("link to node %d (%s) down: %s", self.peer, self.spec.name, reason)
        else:
            log.debug("link to node %d half-open, closed: %s", self.peer, reason)

    def fire_down(self) -> None:
        """Run the link-down callbacks outside the state lock (they may take other locks)."""
        with self.cond:
            pending, self._down_pending = self._down_pending, False
        if pending:
            for cb in self.on_down:
                cb(self.peer)

    def wait_in(self, serial: int, timeout: float) -> tuple[socket.socket | None, int]:
        """RPROXY side: the accepted connection newer than `serial` (None on timeout)."""
        with self.cond:
            self.cond.wait_for(lambda: self.stopping or (self.in_sock is not None
                                                         and self.in_serial != serial), timeout)
            if self.stopping or self.in_sock is None or self.in_serial == serial:
                return None, serial
            return self.in_sock, self.in_serial

    def wait_up(self, timeout: float) -> bool:
        """Wait until both directions are up (or the link went down/stopped)."""
        with self.cond:
            self.cond.wait_for(lambda: self.up or self.stopping or not self.status, timeout)
            return self.up

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self._down("shutting down")
            self.cond.notify_all()

    # ------------------------------------------------------------------ sending
    def send(self, parts: Sequence[bytes | bytearray | memoryview], generation: int) -> None:
        """Write one frame (header + payload) now; raises ConnectionError when the link is
        down or the write failed (the link is then torn down)."""
        hbuf = parts[0]
        data = parts[1] if len(parts) > 1 else None
        if not self.submit(hbuf, data, generation):
            raise ConnectionError(f"link to node {self.peer} is down")

    def submit(self, hbuf, data=None, generation: int | None = None,
               copy: bool = True) -> bool:
        """Queue one command (its 120-byte header and `c_len` payload bytes) for the peer and
        write the queue unless this thread is corked or another thread is writing (that one
        writes it).  Batchable commands that meet in the queue leave as one batch frame when
        `batch YES`; COPY data is compressed first when `compress YES` and that shrinks it.
        False when the link is down (the frame is dropped)."""
        if generation is None:
            generation = self.generation
        if not self.up or generation != self.generation:
            return False
        f = _HEAD.unpack_from(hbuf, 0)
        cmd, length = f[0], f[7]
        if copy or self.compress:
            hbuf = bytearray(hbuf)
        if length:
            if data is None or len(data) < length:
                raise ValueError(f"c_len {length} but {0 if data is None else len(data)} "
                                 "payload bytes")
            if len(data) != length:
                data = data[:length]
            raw = length
            if self.compress and cmd in COPY_DATA:
                data = compress_frame(hbuf, data, length)
                length = len(data)
            if copy and not isinstance(data, bytes):
                data = bytes(data)
        else:
            data, raw = None, 0
        self.outq.append((hbuf, data, generation, cmd, f[1], length, raw))
        links = getattr(_cork, "links", None)
        if links is not None:
            links[self] = None
            return True
        return self.flush()

    def flush(self) -> bool:
        """Write everything queued (flat combining: a thread that finds the writer busy
        leaves its frames to it; the writer re-checks the queue after releasing the lock)."""
        ok = True
        outq, lock = self.outq, self.send_lock
        while outq:
            if not lock.acquire(blocking=len(outq) > QUEUE_HIGH_WATER):
                return ok
            try:
                ok = self._write_queued() and ok
            finally:
                lock.release()
        return ok

    def _write_queued(self) -> bool:
        """(send lock held) Write the queue with as few sendmsg calls as possible."""
        outq = self.outq
        items = []
        try:
            while True:
                items.append(outq.popleft())
        except IndexError:
            pass
        gen = self.generation
        sock = self.out_sock
        if sock is None or not self.up:
            return False
        parts: list = []
        sent = self.sent
        batch = self.batch
        i, n = 0, len(items)
        while i < n:
            hbuf, data, g, cmd, dcid, length, raw = items[i]
            i += 1
            if g != gen:
                continue
            if batch and not length and cmd != C.CMD_NONE:
                j = i
                while (j < n and j - i < MAXBATCMD and not items[j][5]
                       and items[j][3] != C.CMD_NONE and items[j][2] == gen):
                    j += 1
                extra = j - i
                if extra:
                    head = bytearray(hbuf)
                    _I32.pack_into(head, 28, extra * HEADER_SIZE)         # c_len
                    _I32.pack_into(head, 36, extra)                        # c_batch_nr
                    _U32.pack_into(head, 40, _U32.unpack_from(head, 40)[0] | C.FLAG_BATCH)
                    parts.append(head)
                    parts.extend(items[k][0] for k in range(i, j))
                    sent.count(cmd, HEADER_SIZE * (extra + 1), extra + 1, dcid, 0)
                    sent.batches += 1
                    i = j
                    continue
            parts.append(hbuf)
            if length:
                parts.append(data)
                if length != raw:
                    sent.lz4_frames += 1
                    sent.lz4_raw += raw
                    sent.lz4_wire += length
            if cmd == C.CMD_NONE:
                sent.hellos += 1
                sent.frames += 1
                sent.bytes += HEADER_SIZE
            else:
                sent.count(cmd, HEADER_SIZE + length, 1, dcid, raw)
        if not parts:
            return True
        try:
            for k in range(0, len(parts), MAX_IOV):
                chunk = parts[k:k + MAX_IOV]
                total = sum(map(len, chunk))
                done = sock.sendmsg(chunk)
                if done < total:
                    _send_rest(sock, chunk, done)
        except OSError as exc:
            self.down(f"send failed: {exc}", gen)
            return False
        self.last_tx = time.monotonic()
        return True


def _send_rest(sock: socket.socket, parts: Sequence, sent: int) -> None:
    data = b"".join(bytes(p) for p in parts)[sent:]
    sock.sendall(data)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


class OutMonitor:
    """Watches every outgoing socket for EOF or data, so a peer that closed its receiver is
    noticed at once (the C SPROXY never read its socket and sat in CLOSE_WAIT)."""

    def __init__(self) -> None:
        self.sel = selectors.DefaultSelector()
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="outmon", daemon=True)
        self.thread.start()

    def watch(self, sock: socket.socket, link: Link) -> None:
        with self.lock:
            try:
                self.sel.register(sock, selectors.EVENT_READ, (link, link.generation))
            except (KeyError, ValueError):
                pass

    def forget(self, sock: socket.socket) -> None:
        with self.lock:
            try:
                self.sel.unregister(sock)
            except (KeyError, ValueError):
                pass

    def stop(self) -> None:
        self.stopping.set()

    def _run(self) -> None:
        while not self.stopping.is_set():
            with self.lock:
                empty = not self.sel.get_map()
            if empty:
                self.stopping.wait(0.1)
                continue
            try:
                events = self.sel.select(0.1)
            except (OSError, ValueError):
                continue
            for key, _mask in events:
                link, _gen = key.data
                sock = key.fileobj
                try:
                    data = sock.recv(1, socket.MSG_DONTWAIT)
                    reason = ("the peer closed the connection" if not data
                              else "the peer wrote on a send-only connection")
                except BlockingIOError:
                    continue
                except OSError as exc:
                    reason = f"connection error: {exc}"
                self.forget(sock)
                with link.cond:
                    if link.out_sock is sock:
                        link._down(reason)
                        link.cond.notify_all()
                link.fire_down()
