"""A `Link` is both TCP directions between this node and one peer (D10).

SPROXY[P] owns the outgoing connection, RPROXY[P] the incoming one.  The link carries traffic
only when both are up: the second direction to come up reports CONNECT_RPROXY and CONNECT_SPROXY
to the kernel; losing either direction tears down both (DISCONNECT_SPROXY, DISCONNECT_RPROXY, both
sockets closed), so blocked callers get EDVSNOTCONN and both threads start over.  The state lives
under one `threading.Condition` (the C `px_conn_mtx` with bits SCONNECTED/RCONNECTED, done
right: nobody waits on a lost wake-up).
"""

from __future__ import annotations

import logging
import selectors
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from dvk_cffi import consts as C
from dvk_cffi.api import Dvk
from dvk_cffi.errors import DvkError

from .misc import Counters

log = logging.getLogger("dsp.link")

SCONNECTED = 1 << C.PX_BIT_SCONNECTED
RCONNECTED = 1 << C.PX_BIT_RCONNECTED


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
        """Write one frame (or batch) with a single sendmsg under the send lock; a failure
        tears the link down and raises ConnectionError."""
        with self.send_lock:
            sock = self.out_sock
            if sock is None or generation != self.generation or not self.up:
                raise ConnectionError(f"link to node {self.peer} is down")
            try:
                total = sum(len(p) for p in parts)
                sent = sock.sendmsg(parts)
                if sent < total:
                    _send_rest(sock, parts, sent)
            except OSError as exc:
                self.down(f"send failed: {exc}", generation)
                raise ConnectionError(str(exc)) from None


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
