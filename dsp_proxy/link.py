"""A `Link` is both TCP directions between this node and one peer (docs/design.md, "Links").

SPROXY[P] owns the outgoing connection, RPROXY[P] the incoming one.  Their state is the machine of
linkstate.py, carried out here under one `threading.Condition` (the C connection mutex with the
SCONNECTED/RCONNECTED bits, done right: nobody waits on a lost wake-up, no state waits for ever).

Sending: any thread may queue a frame for the peer, none ever blocks on the peer's socket.  The
outgoing socket is non-blocking; the thread that queues writes what the socket takes at once
(one `sendmsg` for everything queued, batches built from it), and what does not fit waits in the
link until the `OutMonitor` sees the socket writable.  The queue is bounded: a full queue refuses
new frames with EDVSAGAIN, and their senders get an error reply (a frozen peer delays only its own
traffic).  A refused frame of a link that is down gets EDVSNOTCONN.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import lz4.frame

from dvk_cffi import consts as C
from dvk_cffi import errors as E
from dvk_cffi.api import Dvk
from dvk_cffi.errors import DvkError
from dvk_cffi.wire import (
    HEADER_SIZE,
    R_CMD,
    R_DCID,
    R_FLAGS,
    R_LEN,
    R_SNODE,
    ROUTE_STRUCT,
    set_batch,
    set_lz4,
)

from .linkstate import HALF_OPEN, Effect, Event, State, transition
from .misc import Counters

log = logging.getLogger("dsp.link")

#: At most this many extra headers in one batch frame (c_len = n x 120 <= MAXCOPYBUF).
MAXBATCMD = C.MAXCOPYBUF // HEADER_SIZE
#: Bounds of a link's output queue (frames and bytes not yet taken by the socket).
QUEUE_MAX_FRAMES = 4096
QUEUE_MAX_BYTES = 8 << 20
#: At most this many buffers in one sendmsg (IOV_MAX is 1024 on Linux).
MAX_IOV = 1000
#: What the kernel answers a proxy call of a pair it no longer has (another program unbound it):
#: the pair must be registered again, no retry of the call can succeed.
PAIR_GONE = frozenset({E.EDVSNOTBIND, E.EDVSNOPROXY, E.EDVSPROXYFREE})
#: Silence after which a peer that never announced itself as a DSP of this project (a C DSP,
#: which HELLOs only after 30 s idle) is declared dead: three of its HELLO periods.
C_PEER_SILENCE = 95.0

#: How much of a connection held aside is looked at for the peer's announcing HELLO (which a
#: DSP of this project sends first, unless a frame or two queued at link-up went before it).
CANDIDATE_PEEK = 2 * (HEADER_SIZE + C.MAXCOPYBUF)

OK = 0
#: Receivers wait (bounded) for a half-full queue whose socket wrote within PROGRESS_WINDOW.
PROGRESS_WINDOW = 0.05
EASE_LIMIT = 0.5
EASE_STEP = 0.0005

#: Per-thread cork: while set, `Link.submit` only queues and remembers the link; `uncork`
#: writes every corked link's queue (one sendmsg per link, batches built from what is queued).
_cork = threading.local()


def cork() -> None:
    """Start collecting this thread's frames (e.g. while a read buffer holds more frames)."""
    if getattr(_cork, "links", None) is None:
        _cork.links = {}


def uncork() -> list:
    """Write what this thread queued while corked (no-op when not corked).  Returns the links
    that kept frames; when none did, no queued frame refers to the caller's buffers any more
    (a receiver that queued views of its read buffer may reuse it)."""
    links = getattr(_cork, "links", None)
    if links is None:
        return []
    _cork.links = None
    kept = []
    for link in links:
        if not link.flush():
            kept.append(link)
    return kept


def _corked(link) -> bool:
    """When this thread is corked, remember `link` for `uncork` and say so."""
    links = getattr(_cork, "links", None)
    if links is None:
        return False
    links[link] = None
    return True


def ease(links: list) -> None:
    """Bounded backpressure for a receiver that fed `links`: while one of them is more than
    half full and its socket still takes data (it wrote within PROGRESS_WINDOW), wait before
    reading more, at most EASE_LIMIT.  A peer that stopped taking data is not waited for: its
    queue fills and refuses, so a frozen peer delays only its own traffic."""
    deadline = None
    for link in links:
        while link.backlogged() and time.monotonic() - link.last_progress < PROGRESS_WINDOW:
            now = time.monotonic()
            if deadline is None:
                deadline = now + EASE_LIMIT
            elif now >= deadline:
                return
            time.sleep(EASE_STEP)


def compress_frame(hbuf: bytearray, data, length: int):
    """LZ4-frame compress COPY data when that shrinks it: sets c_len and the LZ4 flag in `hbuf`
    and returns the bytes to send (else `data` unchanged).  lz4 releases the GIL; call it
    outside any lock."""
    packed = lz4.frame.compress(data[:length] if len(data) != length else data)
    if len(packed) >= length:
        return data
    set_lz4(hbuf, len(packed))
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
    addresses: frozenset = field(default_factory=frozenset)  # where its connections come from


class Link:
    """Connection state and the send side of the link to one peer."""

    def __init__(self, spec: PeerSpec, dvk: Dvk | None, monitor: OutMonitor | None = None,
                 post: Callable[[tuple], None] | None = None,
                 fd_silence: float = 1.5, wire=None) -> None:
        self.spec = spec
        self.peer = spec.nodeid
        self.dvk = dvk
        self.monitor = monitor
        self.post = post
        self.cond = threading.Condition()
        self.state = State.DOWN
        self.since = time.monotonic()    # when the state last changed
        self.up = False
        self.up_at = 0.0                 # when the link last came up (carries traffic)
        self.generation = 0              # bumped on every link-up and link-down
        self.out_sock: socket.socket | None = None
        self.in_sock: socket.socket | None = None
        self.in_serial = 0               # bumped for every connection RPROXY is to serve
        self.in_candidate: socket.socket | None = None   # held aside (HOLD_IN)
        #: The compiled relay's side of the socket (dsp_proxy/fastpath.py `Wire`), whose lock
        #: is then the send lock; None without the relay.
        self.wire = wire
        self.send_lock = wire if wire is not None else threading.Lock()
        self.outq: collections.deque = collections.deque()
        self.queued_bytes = 0
        self.unsent: list = []           # what the socket has not taken yet, in order
        self.unsent_sock: socket.socket | None = None   # the socket `unsent` belongs to
        self.batch = spec.batch
        self.compress = spec.compress
        self.stopping = False
        self.sent = Counters()
        self.received = Counters()
        self.peer_addr: str | None = None
        self.last_rx = 0.0
        self.last_tx = 0.0
        self.last_progress = 0.0         # when the socket last took bytes
        self.downs = 0
        self.refused_full = 0            # frames refused because the queue was full
        self._full_episode = False
        self.announced = False           # the peer said it is a DSP of this project
        #: it said so on an earlier connection too (a C DSP never does): only then may a
        #: connection held aside take over for announcing itself (`check_candidate`)
        self.dsp_peer = False
        self.retired_in: list[socket.socket] = []    # shut down, to be closed by RPROXY
        self.retired_out: list[socket.socket] = []   # shut down, to be closed by SPROXY
        self.fd_silence = fd_silence     # silence limit for announced peers
        #: proxy_conn calls the machine decided on and nobody made yet, in order:
        #: (Effect.CONNECT or Effect.DISCONNECT, serial); made outside `cond` (`_kernel_calls`)
        self.kernel_todo: collections.deque = collections.deque()
        self.kernel_serial = 0           # the serial of the newest call decided on
        self._kernel_turn = threading.Lock()

    # ------------------------------------------------------------------ state machine
    @property
    def status(self) -> int:
        """The C bits: SCONNECTED | RCONNECTED (for the statistics)."""
        bits = 0
        if self.out_sock is not None:
            bits |= 1 << C.PX_BIT_SCONNECTED
        if self.in_sock is not None:
            bits |= 1 << C.PX_BIT_RCONNECTED
        return bits

    def event(self, event: Event, sock: socket.socket | None = None, reason: str = "") -> bool:
        """Apply one event of the state machine; False when it was stale (a socket that is no
        longer the link's) or refused because the link stops.  Sockets the event hands over
        and the link does not keep are closed."""
        with self.cond:
            kept = self._apply(event, sock, reason)
            self.cond.notify_all()
        if sock is not None and not kept and event in (Event.OUT_CONNECTED, Event.IN_ACCEPTED):
            _close(sock)
        self._kernel_calls()
        return kept

    def _apply(self, event: Event, sock: socket.socket | None, reason: str) -> bool:
        """(cond held) The transition and its effects."""
        if self.stopping and event in (Event.OUT_CONNECTED, Event.IN_ACCEPTED):
            return False
        if event is Event.OUT_LOST and sock is not None and sock is not self.out_sock:
            return False
        if event is Event.IN_LOST and sock is not None and sock is not self.in_sock:
            return False
        was = self.state
        new, effects = transition(was, event, c_peer=not self.announced)
        if new is was and not effects:
            return False
        self.state, self.since = new, time.monotonic()
        for eff in effects:
            if eff is Effect.KEEP_OUT:
                self.out_sock = sock
                sock.setblocking(False)
                if self.monitor is not None:
                    self.monitor.watch(sock, self)
            elif eff is Effect.KEEP_IN:
                self.in_sock = sock
                self.in_serial += 1
            elif eff is Effect.CLOSE_OUT:
                self._close_out()
            elif eff is Effect.CLOSE_IN:
                if self.in_sock is not None:
                    self.retired_in.append(_shut(self.in_sock))
                self.in_sock = None
            elif eff is Effect.HOLD_IN:
                held = self.in_candidate
                if held is not None and _peek_announces(held, self.peer):
                    return False    # the held one is the peer's DSP: the newcomer is closed
                if held is not None:
                    _close(held)
                self.in_candidate = sock
                log.info("link to node %d: a new connection from the peer waits until the "
                         "current one is lost", self.peer)
            elif eff is Effect.CONNECT:
                self.kernel_serial += 1
                self.kernel_todo.append((eff, self.kernel_serial))
            elif eff is Effect.DISCONNECT:
                self._went_down(reason)
            elif eff is Effect.REPORT_DOWN and self.post is not None:
                self.post(("link_down", self.peer, reason))
        if new is not State.UP and was is not State.UP and new is State.DOWN:
            log.debug("link to node %d half-open (%s), closed: %s", self.peer, was.value,
                      reason)
        self._publish()
        if new is State.DOWN and self.in_candidate is not None:
            self._take_candidate()
        return True

    def _take_candidate(self) -> None:
        """(cond held, the link DOWN) The connection held aside takes over, unless it has
        been closed meanwhile."""
        sock, self.in_candidate = self.in_candidate, None
        try:
            closed = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            closed = False
        except OSError:
            closed = True
        if closed or self.stopping:
            _close(sock)
        elif not self._apply(Event.IN_ACCEPTED, sock, ""):
            _close(sock)

    def _publish(self) -> None:
        if self.wire is not None:
            self.wire.publish(self.out_sock if self.up else None)

    def _went_down(self, reason: str) -> None:
        """(cond held) The link carries nothing from now on; the kernel is told after."""
        self.up = False
        self.generation += 1  # frames queued for the old connections are dropped
        self.downs += 1
        self.outq.clear()
        self.queued_bytes = 0
        self.unsent = []
        self.kernel_serial += 1
        self.kernel_todo.append((Effect.DISCONNECT, self.kernel_serial))
        log.info("link to node %d (%s) down: %s", self.peer, self.spec.name, reason)

    def _kernel_calls(self) -> None:
        """Make the proxy_conn calls the machine decided on, in order and outside `cond`: the
        node kernel is another process, and one that is stopped or slow must not hold every
        thread that touches the link (the supervisor's stop among them).  One thread at a
        time makes them; one that finds the turn taken leaves its calls to the thread that
        has it, which looks for more once it gives the turn back."""
        while self.kernel_todo:
            if not self._kernel_turn.acquire(blocking=False):
                return
            try:
                while True:
                    with self.cond:
                        if not self.kernel_todo:
                            break
                        effect, serial = self.kernel_todo.popleft()
                    if effect is Effect.CONNECT:
                        self._connect_kernel(serial)
                    else:
                        self._disconnect_kernel()
            finally:
                self._kernel_turn.release()

    def _connect_kernel(self, serial: int) -> None:
        """The link is UP in the machine: the kernel is told, and the link carries traffic
        once it agreed, unless the machine has moved on meanwhile (a later call is due)."""
        try:
            if self.dvk is not None:
                self.dvk.proxy_conn(self.peer, C.CONNECT_RPROXY)
                self.dvk.proxy_conn(self.peer, C.CONNECT_SPROXY)
        except (DvkError, OSError) as err:
            log.error("link to node %d: kernel refused the connection: %s", self.peer, err)
            with self.cond:
                if serial == self.kernel_serial:   # its teardown disconnects what connected
                    self._apply(Event.KERNEL_REFUSED, None, f"kernel refused proxy_conn: {err}")
                self.cond.notify_all()
            if isinstance(err, DvkError) and err.code in PAIR_GONE:
                self.pair_lost(f"proxy_conn: {err}")
            return
        with self.cond:
            if serial == self.kernel_serial and self.state is State.UP:
                self.up, self.up_at = True, time.monotonic()
                self.generation += 1
                self.in_serial += 1      # RPROXY serves the incoming connection (again)
                self.dsp_peer = self.dsp_peer or self.announced
                self.announced = False
                log.info("link to node %d (%s) up", self.peer, self.spec.name)
                self._publish()
            self.cond.notify_all()

    def pair_lost(self, reason: str) -> None:
        """The kernel no longer has this link's proxy pair: the main loop registers it again
        (no connection can come up without it)."""
        if self.post is not None:
            self.post(("pair_lost", self.peer, self, reason))

    def _disconnect_kernel(self) -> None:
        if self.dvk is None:
            return
        for status in (C.DISCONNECT_SPROXY, C.DISCONNECT_RPROXY):
            try:
                self.dvk.proxy_conn(self.peer, status)
            except (DvkError, OSError) as err:   # OSError: the DVK itself is gone
                log.debug("proxy_conn(%d, %d): %s", self.peer, status, err)

    def _close_out(self) -> None:
        sock = self.out_sock
        if sock is not None:
            if self.monitor is not None:
                self.monitor.forget(sock)
            self.retired_out.append(_shut(sock))
        self.out_sock = None

    def close_retired(self, incoming: bool) -> None:
        """Close the incoming (RPROXY's) or outgoing (SPROXY's) sockets the link gave up.  The
        link only shuts a socket down, which wakes a thread blocked on it; the socket's own
        thread closes it at a point where it does not use it, because a descriptor closed
        under a thread that is about to read it may already be a new connection's when that
        thread does (writers write under the send lock, which is held here)."""
        with self._send_locked(), self.cond:
            if incoming:
                retired, self.retired_in = self.retired_in, []
            else:
                retired, self.retired_out = self.retired_out, []
        if not incoming and self.monitor is not None:
            with self.monitor.lock:        # the monitor never touches a closed descriptor
                for sock in retired:
                    sock.close()
            return
        for sock in retired:
            sock.close()

    def down(self, reason: str, generation: int | None = None, outgoing: bool = False) -> None:
        """The connection of one direction failed (the incoming one, or the `outgoing`
        one); no-op for a stale generation."""
        with self.cond:
            if generation is not None and generation != self.generation:
                return
            outgoing = outgoing or self.state is State.OUT_ONLY
            event = Event.OUT_LOST if outgoing else Event.IN_LOST
            self._apply(event, None, reason)
            self.cond.notify_all()
        self._kernel_calls()

    def check_candidate(self) -> bool:
        """(every tick) A connection held aside takes over from an incoming connection that
        never announced itself once the held one did (a HELLO with FLAG_DSP_PEER among its
        first frames), if the peer announced itself on an earlier connection: the peer is a
        DSP of this project, which sends that HELLO first thing, and the current connection
        is not its (one from the peer's address that said nothing held the peer's own
        connection aside for the C silence limit, 95 s).  A peer that never announced itself
        may be a C DSP, which never connects again: its connection is never ended for a
        newcomer, whatever that one says; nor is a connection that announced itself (a peer
        that really connected again lost that one, found within its silence limit).  A held
        connection that closed is dropped.  True when it took over."""
        with self.cond:
            sock = self.in_candidate
            if sock is None or self.state is not State.UP:
                return False
            said = _peek_announces(sock, self.peer)
            if said is None:
                self.in_candidate = None
                _close(sock)
                return False
            if not said or self.announced or not self.dsp_peer:
                return False
            self._apply(Event.IN_LOST, None, "a new connection from the peer announced itself "
                                             "as a DSP of this project, the current one had "
                                             "not: the new one takes over")
            self.cond.notify_all()
        self._kernel_calls()
        return True

    def c_peer(self) -> bool:
        """The link is up and its peer has not announced itself within the announced silence
        limit: a DSP of this project sends its announcing HELLO first thing and then every
        `fd_interval`, so this peer is a C DSP (which never does, and never reports its
        load).  Counted from the link-up, not from the last event of the machine: a
        connection held aside does not make a C peer look new."""
        return (self.up and not self.announced
                and time.monotonic() - self.up_at >= self.fd_silence)

    def half_open_for(self) -> float:
        """Seconds the link has been half-open (0 when it is not)."""
        if self.state in HALF_OPEN:
            return time.monotonic() - self.since
        return 0.0

    def silence_limit(self) -> float:
        """Silence after which the peer is dead: the failure-detection bound for a peer that
        announced itself as a DSP of this project, the C cadence bound for any other."""
        return self.fd_silence if self.announced else C_PEER_SILENCE

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
            self.cond.wait_for(lambda: self.up or self.stopping
                               or self.state is State.DOWN, timeout)
            return self.up

    def wait_room(self, timeout: float) -> bool:
        """The peer's own sender waits (bounded) until its queue has room again."""
        with self.cond:
            return self.cond.wait_for(lambda: not self.up or self.stopping
                                      or (len(self.outq) < QUEUE_MAX_FRAMES
                                          and self.queued_bytes < QUEUE_MAX_BYTES), timeout)

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self._apply(Event.STOP, None, "shutting down")
            if self.in_candidate is not None:
                _close(self.in_candidate)
                self.in_candidate = None
            self.cond.notify_all()
        self._kernel_calls()
        self.close_retired(incoming=False)
        self.close_retired(incoming=True)

    # ------------------------------------------------------------------ sending
    def submit(self, hbuf, data=None, generation: int | None = None,
               copy: bool = True) -> int:
        """Queue one command (its 120-byte header and `c_len` payload bytes) for the peer and
        write the queue unless this thread is corked or another thread is writing (that one
        writes it).  Returns 0, EDVSNOTCONN (the link is down or `generation` is over) or
        EDVSAGAIN (the queue is full); a refused frame is dropped."""
        if generation is None:
            generation = self.generation
        if not self.up or generation != self.generation:
            return E.EDVSNOTCONN
        f = ROUTE_STRUCT.unpack_from(hbuf, 0)
        cmd, length = f[R_CMD], f[R_LEN]
        if len(self.outq) >= QUEUE_MAX_FRAMES or self.queued_bytes >= QUEUE_MAX_BYTES:
            return self._refuse_full()
        self._full_episode = False
        if copy or self.compress:
            hbuf = bytearray(hbuf)
        if length:
            if data is None or len(data) < length:
                raise ValueError(f"c_len {length} but {0 if data is None else len(data)} "
                                 "payload bytes")
            if len(data) != length:
                data = data[:length]
            raw = length
            if self.compress and cmd in C.COPY_DATA_CMDS:
                data = compress_frame(hbuf, data, length)
                length = len(data)
            if copy and not isinstance(data, bytes):
                data = bytes(data)
        else:
            data, raw = None, 0
        self.queued_bytes += HEADER_SIZE + length
        return self._enqueue((hbuf, data, generation, cmd, f[R_DCID], length, raw, 1))

    def submit_run(self, block: bytearray) -> int:
        """Queue a run of payload-less commands (whole 120-byte headers, all with the routing
        fields of the first) that the caller hands over (no copy): one queue entry, written
        as one buffer (or as batch frames).  Same results as `submit`."""
        f = ROUTE_STRUCT.unpack_from(block, 0)
        return self._submit_block(block, f[R_CMD], f[R_DCID], len(block) // HEADER_SIZE)

    def submit_span(self, span, nframes: int) -> int:
        """Queue whole frames the compiled relay rewrote in a receiver's read buffer and
        counted itself (dsp_proxy/fastpath.py): one entry, written as it is (the receiver's
        cork and `settle` keep the buffer valid).  Same results as `submit`."""
        return self._submit_block(span, -1, -1, 0)

    def _submit_block(self, block, cmd: int, dcid: int, nframes: int) -> int:
        """Queue frames handed over as one buffer: one entry of `nframes` commands (0: a
        span of the compiled relay, counted by it)."""
        generation = self.generation
        if not self.up:
            return E.EDVSNOTCONN
        if len(self.outq) >= QUEUE_MAX_FRAMES or self.queued_bytes >= QUEUE_MAX_BYTES:
            return self._refuse_full()
        self._full_episode = False
        self.queued_bytes += len(block)
        return self._enqueue((block, None, generation, cmd, dcid, 0, 0, nframes))

    def _enqueue(self, item: tuple) -> int:
        """Queue one entry; write the queue now unless this thread is corked."""
        self.outq.append(item)
        if self.wire is not None:   # after the entry is visible (`Wire.settled` looks again)
            self.wire.enqueued()
        if not _corked(self):
            self.flush()
        return OK

    def settle(self) -> None:
        """After a receiver queued views of its read buffer: make sure no frame of this link
        refers to it any more before the buffer is reused.  Writes what the socket takes
        (waiting for a writer that holds the send lock; writers never block on the socket) and
        copies what is left unsent or queued (bounded by the queue's bound)."""
        with self._send_locked():
            self._write_queued()
            self.unsent = [_own(p) for p in self.unsent]
            outq = self.outq      # a full socket leaves the queue as it was: its views too
            try:                  # (others only append meanwhile, or a link-down empties it)
                for i, item in enumerate(list(outq)):
                    if (type(item[0]) is memoryview or type(item[1]) is memoryview) \
                            and outq[i] is item:
                        outq[i] = (_own(item[0]), _own(item[1])) + item[2:]
            except IndexError:
                pass

    def fold_relay(self) -> None:
        """(any thread) Bring what the compiled relay counted as sent to this link into
        `sent`, under the send lock that every count of the figures the fold adds to runs
        under (`Counters` has no lock: a fold racing a count would lose one of them).  What
        the relay counted as received is folded by the link's receiver thread
        (`Relay.fold_received`), the only thread that counts into `received`."""
        if self.wire is None:
            return
        with self._send_locked():
            self.wire.fold_sent(self.sent)

    @contextlib.contextmanager
    def _send_locked(self):
        """The send lock, waited for; once it is released, the frames that writers left to
        its holder meanwhile (a writer that finds it taken queues and goes on) are written."""
        with self.send_lock:
            yield
        if self.outq:
            self.flush()

    def last_write(self) -> float:
        """When the link's socket last took bytes: the link's own writes or the compiled
        relay's (its keep-alive is due only after both were idle)."""
        if self.wire is None:
            return self.last_tx
        return max(self.last_tx, self.wire.last_tx())

    def backlogged(self) -> bool:
        """More than half of the queue's bound is used."""
        return (self.queued_bytes >= QUEUE_MAX_BYTES // 2
                or len(self.outq) >= QUEUE_MAX_FRAMES // 2) and self.up

    def _refuse_full(self) -> int:
        self.refused_full += 1
        self.sent.errors += 1
        if not self._full_episode:
            self._full_episode = True
            log.warning("link to node %d: output queue full (%d frames, %d bytes): new frames "
                        "are refused with EDVSAGAIN until it drains", self.peer,
                        len(self.outq), self.queued_bytes)
        return E.EDVSAGAIN

    def flush(self) -> bool:
        """Write what the socket takes now (flat combining: a thread that finds the writer busy
        leaves its frames to it; the writer re-checks the queue after releasing the lock).
        Never blocks on the socket: the rest waits for the monitor's writable event.  True
        when nothing is left queued or unsent, seen under the send lock: a writer that holds it
        may still be sending frames it took from the queue (views of a receiver's buffer)."""
        outq, lock, wire = self.outq, self.send_lock, self.wire
        while lock.acquire(blocking=False):
            try:
                if not self.up or self.out_sock is None:
                    return False      # nothing can go now; a link-down empties the queue
                seq = wire.seq() if wire is not None else 0
                empty = not (outq or self.unsent)
                if empty:
                    if wire is not None:    # the compiled relay may write again
                        wire.settled(seq, True)
                else:
                    blocked = self._write_queued()
            finally:
                lock.release()
            if empty:
                if not (outq or self.unsent):
                    return True
            elif blocked:
                return False
            # else: written, or queued meanwhile by a writer that left it to us: look again
        return False

    def _write_queued(self) -> bool:
        """(send lock held) Write the unsent rest and then the queue, with as few sendmsg calls
        as possible; True when the socket is full (the rest waits in `unsent`)."""
        sock = self.out_sock
        if sock is None or not self.up:
            return False
        if self.unsent and self.unsent_sock is not sock:
            self.unsent = []          # the rest of a connection that is gone
        if self.unsent:
            if self._send(sock, self.unsent):
                return True
        parts = self._frames_to_parts()
        if not parts:
            return False
        return self._send(sock, parts)

    def _frames_to_parts(self) -> list:
        """(send lock held) Take the queue and turn it into the buffers to write: batch frames
        where `batch YES` lets commands that meet in the queue travel together."""
        outq = self.outq
        popleft = outq.popleft
        items = []
        try:
            for _ in range(len(outq)):
                items.append(popleft())
        except IndexError:    # the link went down meanwhile, which empties the queue
            pass
        gen = self.generation
        parts: list = []
        sent = self.sent
        batch = self.batch
        i, n = 0, len(items)
        taken = 0
        while i < n:
            hbuf, data, g, cmd, dcid, length, raw, nframes = items[i]
            i += 1
            taken += HEADER_SIZE + length if nframes == 1 else len(hbuf)
            if g != gen:
                continue
            if not nframes:     # a span of the compiled relay, counted by it
                parts.append(hbuf)
                continue
            if nframes > 1:
                self._run_to_parts(hbuf, nframes, cmd, dcid, parts)
                continue
            if batch and not length and cmd != C.CMD_NONE:
                j = i
                while (j < n and j - i < MAXBATCMD and not items[j][5] and items[j][7] == 1
                       and items[j][3] != C.CMD_NONE and items[j][2] == gen):
                    j += 1
                extra = j - i
                if extra:
                    head = bytearray(hbuf)
                    set_batch(head, extra)
                    parts.append(head)
                    parts.extend(items[k][0] for k in range(i, j))
                    sent.count(cmd, HEADER_SIZE * (extra + 1), extra + 1, dcid, 0)
                    sent.batches += 1
                    taken += HEADER_SIZE * extra
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
                sent.hello(HEADER_SIZE + length)
            else:
                sent.count(cmd, HEADER_SIZE + length, 1, dcid, raw)
        self.queued_bytes = max(0, self.queued_bytes - taken)
        return parts

    def _run_to_parts(self, block, nframes: int, cmd: int, dcid: int, parts: list) -> None:
        """(send lock held) The buffers of a run of payload-less commands: the block as it is,
        or with `batch YES` batch frames of up to 1 + MAXBATCMD commands (a copied first
        header with the batch fields, then a view of the others)."""
        sent = self.sent
        if not self.batch:
            parts.append(block)
            sent.count(cmd, len(block), nframes, dcid, 0, nframes)
            return
        view = memoryview(block)
        for k in range(0, nframes, MAXBATCMD + 1):
            m = min(nframes - k, MAXBATCMD + 1)
            base = k * HEADER_SIZE
            head = bytearray(view[base:base + HEADER_SIZE])
            if m > 1:
                set_batch(head, m - 1)
                sent.batches += 1
            parts.append(head)
            if m > 1:
                parts.append(view[base + HEADER_SIZE:base + m * HEADER_SIZE])
            sent.count(cmd, HEADER_SIZE * m, m, dcid, 0)

    def keep_unsent(self, rest, fd: int) -> None:
        """(send lock held) The compiled relay wrote part of a span to descriptor `fd`: the
        rest goes first, and the monitor waits for room.  When the link went down meanwhile
        (another socket, or none), the rest is dropped with the connection it belonged to."""
        sock = self.out_sock
        if not self.up or sock is None or sock.fileno() != fd:
            return
        self.unsent, self.unsent_sock = [rest], sock
        if self.monitor is not None:
            self.monitor.want_write(sock, self)
        _corked(self)

    def _send(self, sock: socket.socket, parts: list) -> bool:
        """(send lock held) sendmsg without blocking; True when the socket took less than all
        (the rest is kept in `unsent` and the monitor waits for room).  With the compiled
        relay, tell it afterwards whether the link is quiet."""
        wire = self.wire
        if wire is None:
            return self._sendmsg(sock, parts)
        seq = wire.seq()
        blocked = self._sendmsg(sock, parts)
        wire.settled(seq, not (blocked or self.unsent or self.outq))
        return blocked

    def _sendmsg(self, sock: socket.socket, parts: list) -> bool:
        gen = self.generation
        try:
            for k in range(0, len(parts), MAX_IOV):
                chunk = parts[k:k + MAX_IOV] if len(parts) > MAX_IOV else parts
                try:
                    done = sock.sendmsg(chunk)
                except BlockingIOError:
                    done = 0
                if done < sum(map(len, chunk)):
                    if done:
                        self.last_progress = time.monotonic()
                    self.unsent = _rest(chunk, done) + parts[k + MAX_IOV:]
                    self.unsent_sock = sock    # a rest is written to its own connection only
                    if self.monitor is not None:
                        self.monitor.want_write(sock, self)
                    return True
        except OSError as exc:
            self.unsent = []
            self.down(f"send failed: {exc}", gen, outgoing=True)
            return False
        if self.unsent:
            self.unsent = []
        self.last_tx = self.last_progress = time.monotonic()
        if self._full_episode:   # the peer's sender may wait for room
            with self.cond:
                self.cond.notify_all()
        return False


def _own(buf):
    """A copy of a view (of a receiver's read buffer); anything else as it is."""
    return bytes(buf) if type(buf) is memoryview else buf


def _rest(parts: list, done: int) -> list:
    """The buffers of `parts` after the first `done` bytes (views, no copies)."""
    for i, p in enumerate(parts):
        n = len(p)
        if done < n:
            return [memoryview(p)[done:]] + parts[i + 1:]
        done -= n
    return []


def announces(data: bytes, peer: int) -> bool:
    """Whether the whole frames at the start of `data` include a HELLO by which `peer`
    announces itself as a DSP of this project (c_snode the peer, FLAG_DSP_PEER)."""
    off = 0
    while off + HEADER_SIZE <= len(data):
        f = ROUTE_STRUCT.unpack_from(data, off)
        if f[R_CMD] == C.CMD_NONE and f[R_FLAGS] & C.FLAG_DSP_PEER and f[R_SNODE] == peer:
            return True
        if not 0 <= f[R_LEN] <= C.MAXCOPYBUF:
            return False
        off += HEADER_SIZE + f[R_LEN]
    return False


def _peek_announces(sock: socket.socket, peer: int) -> bool | None:
    """`announces` of what waits on `sock`, left there (None: the connection is closed)."""
    try:
        head = sock.recv(CANDIDATE_PEEK, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return None
    return announces(head, peer) if head else None


def _shut(sock: socket.socket) -> socket.socket:
    """Shut a socket down both ways (a thread blocked on it wakes up); it stays open."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    return sock


def _close(sock: socket.socket) -> None:
    _shut(sock).close()


class OutMonitor:
    """Watches every outgoing socket: for EOF or data, so a peer that closed its receiver is
    noticed at once (the C sender never read its socket and sat in CLOSE_WAIT), and for room
    when a link has unsent output, which it then writes."""

    def __init__(self) -> None:
        self.sel = selectors.DefaultSelector()
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.sel.register(self._wake_r, selectors.EVENT_READ, None)
        self.thread: threading.Thread | None = None

    def _set(self, sock: socket.socket, events: int, link: Link, register: bool = False) -> bool:
        """Register `sock` or change its events; False when it is not (or already) watched."""
        with self.lock:
            try:
                (self.sel.register if register else self.sel.modify)(sock, events, link)
            except (KeyError, ValueError):
                return False
        return True

    def watch(self, sock: socket.socket, link: Link) -> None:
        self._set(sock, selectors.EVENT_READ, link, register=True)
        self._wake()

    def want_write(self, sock: socket.socket, link: Link) -> None:
        if self._set(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, link):
            self._wake()

    def forget(self, sock: socket.socket) -> None:
        with self.lock:
            try:
                self.sel.unregister(sock)
            except (KeyError, ValueError):
                pass

    def stop(self) -> None:
        self.stopping.set()
        self._wake()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                events = self.sel.select(0.5)
            except (OSError, ValueError):
                time.sleep(0.01)
                continue
            for key, mask in events:
                link = key.data
                if link is None:
                    try:
                        while self._wake_r.recv(4096):
                            pass
                    except OSError:
                        pass
                    continue
                if mask & selectors.EVENT_WRITE:
                    self._writable(key.fileobj, link)
                if mask & selectors.EVENT_READ:
                    self._readable(key.fileobj, link)
        self._wake_r.close()
        self._wake_w.close()

    def _writable(self, sock: socket.socket, link: Link) -> None:
        if self._set(sock, selectors.EVENT_READ, link):
            link.flush()

    def _readable(self, sock: socket.socket, link: Link) -> None:
        with self.lock:      # still watched: not closed (closing takes this lock)
            fd = sock.fileno()   # -1 once closed: an event select returned before the close
            if fd < 0 or self.sel.get_map().get(fd) is None:
                return
            try:
                data = sock.recv(1, socket.MSG_DONTWAIT)
                reason = ("the peer closed the connection" if not data
                          else "the peer wrote on a send-only connection")
            except BlockingIOError:
                return
            except OSError as exc:
                reason = f"connection error: {exc}"
            try:
                self.sel.unregister(sock)
            except (KeyError, ValueError):
                pass
        link.event(Event.OUT_LOST, sock, reason)
