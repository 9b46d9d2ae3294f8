"""Sender threads: SPROXY[P] for every remote node, and the get2rmt thread of the LB pair.

SPROXY[P] takes the commands the kernel queued for node P (`get2rmt`), writes each as one frame
on its outgoing connection, sends a HELLO (or a due load report) when the link was idle for
`fd_interval`, and reconnects with capped backoff after any failure (the C sender could not).
"""

from __future__ import annotations

import logging
import socket
import threading
import time

from dvk_cffi import consts as C
from dvk_cffi import errors as E
from dvk_cffi.wire import Header, hello_header

from .link import MAXBATCMD, Link, cork, uncork
from .misc import Backoff, tune_socket

log = logging.getLogger("dsp.sproxy")

CONNECT_TIMEOUT = 2.0
#: At most this many commands fetched without waiting after one get2rmt (one batch's worth).
MAX_DRAIN = MAXBATCMD


class SProxy:
    """The sender of the link to one peer."""

    def __init__(self, dsp, link: Link, gate) -> None:
        self.dsp = dsp
        self.link = link
        self.gate = gate
        self.name = f"SPROXY({link.peer})"

    def run(self) -> None:
        dsp, link = self.dsp, self.link
        if not self.gate.enter(dsp.dvk):
            return
        self.hdr = Header()
        self.payload = dsp.dvk.alloc(C.MAXCOPYBUF)
        backoff = Backoff()
        while not dsp.stopping.is_set():
            sock = self._connect(backoff)
            if sock is None:
                return
            if not link.set_out(sock):
                return
            while not dsp.stopping.is_set() and link.status and not link.up:
                link.wait_up(0.5)
            if not link.up:
                continue
            backoff.reset()
            self._serve(link.generation)

    def _connect(self, backoff: Backoff) -> socket.socket | None:
        spec = self.link.spec
        while not self.dsp.stopping.is_set():
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                if self.dsp.bind_addr:
                    sock.bind((self.dsp.bind_addr, 0))  # D9: leave from our own address
                sock.settimeout(CONNECT_TIMEOUT)
                sock.connect((spec.host, spec.sport))
                sock.settimeout(None)
                tune_socket(sock, self.dsp.user_timeout_ms)
                log.debug("%s connected to %s:%d", self.name, spec.host, spec.sport)
                return sock
            except OSError as exc:
                sock.close()
                delay = backoff.next()
                log.debug("%s connect to %s:%d failed (%s), retry in %.2f s", self.name,
                          spec.host, spec.sport, exc, delay)
                self.dsp.stopping.wait(delay)
        return None

    def _serve(self, gen: int) -> None:
        """get2rmt loop.  Every command is written at once, unless the kernel says more are
        queued for this link: then those are fetched too (without waiting) and the lot is
        written together, as one batch frame of the batchable ones when `batch YES`.  A lone
        command is never delayed."""
        dsp, link, hdr, payload = self.dsp, self.link, self.hdr, self.payload
        interval = dsp.fd_interval_ms
        hello_after = interval / 1000.0 * 0.8
        next_report = 0.0
        get2rmt, view = dsp.dvk.get2rmt, payload.view
        # The emulator tells how many commands wait; on a real DVK, drain like the C sender.
        hinted = getattr(dsp.dvk, "backend", "") == "emu"
        monotonic = time.monotonic
        while link.up and link.generation == gen and not dsp.stopping.is_set():
            now = monotonic()
            if now >= next_report:  # D11: at link start and every period, busy or idle
                self._hello(gen, report=True)
                next_report = now + dsp.period
            try:
                more = get2rmt(hdr, payload, interval)
            except E.DvkError as err:
                if err.code == E.EDVSTIMEDOUT:
                    if monotonic() - link.last_tx >= hello_after:
                        self._hello(gen)
                    continue
                if err.code == E.EDVSNOTCONN:
                    return
                link.sent.errors += 1
                log.debug("%s get2rmt: %s", self.name, err)
                continue
            if not hinted:
                more = MAX_DRAIN if link.batch else 0
            if not more:
                if not link.submit(hdr.buf, view, gen):
                    return
                continue
            cork()
            try:
                link.submit(hdr.buf, view, gen)
                drained = 0
                while more > 0 and drained < MAX_DRAIN:
                    try:
                        more = get2rmt(hdr, payload, C.TIMEOUT_NOWAIT)
                    except E.DvkError as err:
                        if err.code == E.EDVSNOTCONN:
                            return
                        break
                    drained += 1
                    link.submit(hdr.buf, view, gen)
            finally:
                uncork()
            if not link.up:
                return

    def send(self, hdr: Header, data: memoryview, gen: int) -> bool:
        """Write one command (with its `c_len` payload bytes) to the peer."""
        return self.link.submit(hdr.buf, data, gen)

    def _hello(self, gen: int, report: bool = False) -> None:
        h = self.dsp.hello_for(self.link.peer, report)
        self.link.submit(h.buf, None, gen, copy=False)


def hello_frame(local: int, peer: int, body: bytes | None = None) -> Header:
    """A HELLO, optionally carrying a message body (load report or control, D11/D12)."""
    h = hello_header(local, peer, threading.get_native_id())
    if body:
        h.c_msg.load(body)
    return h


class LbSender:
    """The LB pair's sender (the get2rmt thread): every command local processes address to the
    virtual LB node goes to the router; it never writes to a socket itself (D1)."""

    def __init__(self, dsp, gate) -> None:
        self.dsp = dsp
        self.gate = gate

    def run(self) -> None:
        dsp = self.dsp
        if not self.gate.enter(dsp.dvk):
            return
        hdr = Header()
        payload = dsp.dvk.alloc(C.MAXCOPYBUF)
        while not dsp.stopping.is_set():
            try:
                dsp.dvk.get2rmt(hdr, payload, 500)
            except E.DvkError as err:
                if err.code not in (E.EDVSTIMEDOUT, E.EDVSNOTCONN):
                    log.debug("LB get2rmt: %s", err)
                if err.code == E.EDVSNOTCONN:
                    dsp.stopping.wait(0.5)
                continue
            dsp.from_local(hdr.copy(), bytes(payload.view[:hdr.c_len]))
