"""Sender threads: SPROXY[P] for every remote node, and the get2rmt thread of the LB pair.

SPROXY[P] takes the commands the kernel queued for node P (`get2rmt`), queues each on the link
(written at once when the socket takes it), sends a HELLO (or a due load report) when the link was
idle for `fd_interval`, and reconnects with capped backoff after any failure (the C sender could
not).  When the link's output queue is full it waits for room: it is P's own sender, so only P's
traffic waits (the kernel holds the rest).
"""

from __future__ import annotations

import errno
import logging
import socket
import time

from dvk_cffi import consts as C
from dvk_cffi import errors as E
from dvk_cffi.wire import Header

from .fastpath import LbPump, Sender
from .link import MAXBATCMD, PAIR_GONE, Link, cork, uncork
from .linkstate import Event, State
from .misc import EXHAUSTED, Backoff

log = logging.getLogger("dsp.sproxy")

CONNECT_TIMEOUT = 2.0
#: Connect errors that are this host's trouble, not the peer's (which the link's state
#: shows): out of descriptors or memory, no local port or source address to be had
#: (EADDRNOTAVAIL: the ephemeral ports are used up, or the source address is gone from this
#: host).  Logged at ERROR, where a peer that is down is logged at DEBUG.
LOCAL_TROUBLE = EXHAUSTED | {errno.EADDRNOTAVAIL, errno.EADDRINUSE}
#: At most this many commands fetched without waiting after one get2rmt (one batch's worth).
MAX_DRAIN = MAXBATCMD
#: How long the get2rmt thread's call waits (ms) before it looks at `stopping` again.
LB_WAIT_MS = 500


class SProxy:
    """The sender of the link to one peer."""

    def __init__(self, ctx, link: Link, gate) -> None:
        self.ctx = ctx
        self.link = link
        self.gate = gate
        self.name = f"SPROXY({link.peer})"

    def run(self) -> None:
        ctx, link = self.ctx, self.link
        if not self.gate.enter(ctx.dvk):
            return
        self.hdr = Header()
        self.payload = ctx.dvk.alloc(C.MAXCOPYBUF)
        backoff = Backoff()
        while not ctx.stopping.is_set():
            link.close_retired(incoming=False)
            sock = self._connect(backoff)
            if sock is None:
                return
            if not link.event(Event.OUT_CONNECTED, sock):
                if link.stopping:
                    return
                continue
            # half-open, or UP with the kernel not told yet (another thread may be making
            # the link's kernel calls): wait for the link to come up or go down
            while not ctx.stopping.is_set() and not link.up \
                    and link.state in (State.OUT_ONLY, State.UP):
                link.wait_up(0.5)
            if not link.up:
                ctx.stopping.wait(backoff.next())
                continue
            backoff.reset()
            self._serve(link.generation)

    def _connect(self, backoff: Backoff) -> socket.socket | None:
        spec = self.link.spec
        ctx = self.ctx
        while not ctx.stopping.is_set():
            sock = None
            try:   # the socket itself may fail too: no descriptor left (EMFILE) is retried
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                if ctx.source_addr:
                    sock.bind((ctx.source_addr, 0))  # leave from our own address
                sock.settimeout(CONNECT_TIMEOUT)
                sock.connect((spec.host, spec.sport))
                sock.settimeout(None)
                ctx.tune_out(sock)
                log.debug("%s connected to %s:%d", self.name, spec.host, spec.sport)
                return sock
            except OSError as exc:
                if sock is not None:
                    sock.close()
                delay = backoff.next()
                if exc.errno in LOCAL_TROUBLE:    # this host's, not the peer's: say so
                    log.error("%s cannot connect to %s:%d: %s; retry in %.2f s", self.name,
                              spec.host, spec.sport, exc.strerror, delay)
                    ctx.stopping.wait(delay)
                    continue
                log.debug("%s connect to %s:%d failed (%s), retry in %.2f s", self.name,
                          spec.host, spec.sport, exc, delay)
                ctx.stopping.wait(delay)
        return None

    def _submit(self, gen: int) -> bool:
        """Queue the fetched command; waits for room while the queue is full.  False when
        the link is down."""
        link = self.link
        while True:
            code = link.submit(self.hdr.buf, self.view, gen)
            if code != E.EDVSAGAIN:
                return code == 0
            uncork()
            if not link.wait_room(0.5) and self.ctx.stopping.is_set():
                return False

    def _serve(self, gen: int) -> None:
        """get2rmt loop.  Every command is queued at once, unless the kernel says more are
        queued for this link: then those are fetched too (without waiting) and the lot is
        written together, as one batch frame of the batchable ones when `batch YES`.  A lone
        command is never delayed."""
        ctx, link, hdr, payload = self.ctx, self.link, self.hdr, self.payload
        interval = ctx.fd_interval_ms
        hello_after = interval / 1000.0 * 0.8
        next_report = 0.0
        get2rmt = ctx.dvk.get2rmt
        self.view = payload.view
        # The emulator tells how many commands wait; on a real DVK, drain like the C sender.
        hinted = getattr(ctx.dvk, "backend", "") == "emu"
        monotonic = time.monotonic
        sender = None
        if Sender.usable(ctx.wires, link, ctx.dvk):   # fetches and writes in C while it can
            sender = Sender(ctx.wires, link, ctx.dvk, payload, interval)
            with link.cond:
                if not link.up or link.generation != gen:
                    return
                sender.start()
        while link.up and link.generation == gen and not ctx.stopping.is_set():
            now = monotonic()
            if now >= next_report:  # at link start and every period, busy or idle
                self._hello(gen, report=True)
                next_report = now + ctx.period
            try:
                if sender is None:
                    more = get2rmt(hdr, payload, interval)
                else:
                    more = sender.get2rmt(hdr, next_report)
                    if more is None:    # the report is due, or the link writes a rest
                        continue
            except E.DvkError as err:
                if err.code == E.EDVSTIMEDOUT:
                    if monotonic() - link.last_write() >= hello_after:
                        self._hello(gen)
                    continue
                if err.code == E.EDVSNOTCONN:
                    return
                if err.code in PAIR_GONE:   # every later call fails at once the same way
                    link.pair_lost(f"get2rmt: {err}")
                    ctx.stopping.wait(0.5)
                    return
                link.sent.errors += 1
                log.debug("%s get2rmt: %s", self.name, err)
                continue
            if not hinted:
                more = MAX_DRAIN if link.batch else 0
            if not more:
                if not self._submit(gen):
                    return
                continue
            cork()
            try:
                if not self._submit(gen):
                    return
                drained = 0
                while more > 0 and drained < MAX_DRAIN:
                    try:
                        more = get2rmt(hdr, payload, C.TIMEOUT_NOWAIT)
                    except E.DvkError as err:
                        if err.code == E.EDVSNOTCONN:
                            return
                        break
                    drained += 1
                    if not self._submit(gen):
                        return
            finally:
                uncork()
            if not link.up:
                return

    def _hello(self, gen: int, report: bool = False) -> None:
        h = self.ctx.hello(self.link.peer, report)
        self.link.submit(h.buf, None, gen, copy=False)


class LbSender:
    """The LB pair's sender (the get2rmt thread): every command local processes address to the
    virtual LB node goes to the router.  Where local clients' sessions are handed to the
    compiled code (`Group.fast_local`), their commands are rewritten and written to their
    servers' links in C (`LbPump`) and only the rest comes to the router."""

    def __init__(self, ctx, gate) -> None:
        self.ctx = ctx
        self.gate = gate

    def run(self) -> None:
        ctx = self.ctx
        if not self.gate.enter(ctx.dvk):
            return
        hdr = Header()
        payload = ctx.dvk.alloc(C.MAXCOPYBUF)
        view = payload.view
        route, execute = ctx.router.from_local, ctx.execute
        group = ctx.router.group
        pump = None
        if group is not None and group.fast_local and Sender.backend_ok(ctx.dvk):
            pump = LbPump(group.fast, execute.links, ctx.dvk, payload, LB_WAIT_MS)
        while not ctx.stopping.is_set():
            try:
                if pump is None:
                    ctx.dvk.get2rmt(hdr, payload, LB_WAIT_MS)
                elif not pump.get2rmt(hdr):
                    continue
            except E.DvkError as err:
                if err.code in PAIR_GONE:   # only registering it again helps: a restart
                    raise RuntimeError(f"the kernel no longer has the LB pair: {err}") from None
                if err.code not in (E.EDVSTIMEDOUT, E.EDVSNOTCONN):
                    log.debug("LB get2rmt: %s", err)
                if err.code == E.EDVSNOTCONN:
                    ctx.stopping.wait(0.5)
                continue
            execute(route(hdr.buf, view[:hdr.c_len]))
