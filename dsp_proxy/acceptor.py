"""The acceptor: one thread takes every peer's incoming connections (docs/design.md, "Links").

A connection is handed to the link of the port it came in on only when it comes from one of that
peer's addresses (every address its name resolves to, plus the config's extra addresses); any
other is closed at once, even while the peer's link is busy.  Bursts are drained in one go (each
readiness event accepts until the backlog is empty) and refusals are logged at most once a minute
per source address, with the count of the refused connections.
"""

from __future__ import annotations

import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable

from .link import Link
from .linkstate import Event
from .misc import EXHAUSTED, tune_socket

log = logging.getLogger("dsp.rproxy")

#: Listen backlog of every peer's port.
BACKLOG = 128
#: Refused connections of one source address are logged at most once per this many seconds.
REFUSAL_LOG_INTERVAL = 60.0
#: At most this many source addresses are remembered for the refusal log.
REFUSAL_SOURCES_MAX = 1024
#: After accept() failed for want of descriptors or memory (`misc.EXHAUSTED`) the acceptor
#: pauses this long: the waiting connection stays in the backlog and the listener stays
#: readable, so accepting again at once would spin (the peers' connects wait in the backlog,
#: or are retried by their senders).
EXHAUSTED_PAUSE = 0.5


class RefusalLog:
    """Counts refused connections per source address; logs a line per address at most once
    per interval, with the count since the last line."""

    def __init__(self, interval: float = REFUSAL_LOG_INTERVAL,
                 clock=time.monotonic) -> None:
        self.interval = interval
        self.clock = clock
        self.sources: dict[str, list] = {}   # address -> [last logged, count since]
        self.total = 0

    def refused(self, addr: str, what: str) -> None:
        self.total += 1
        now = self.clock()
        entry = self.sources.get(addr)
        if entry is None:
            if len(self.sources) >= REFUSAL_SOURCES_MAX:
                self._prune(now)
            self.sources[addr] = [now, 0]
            log.warning("refused a connection from %s (%s); further refusals of this address "
                        "are counted and logged once a minute", addr, what)
            return
        entry[1] += 1
        if now - entry[0] >= self.interval:
            log.warning("refused %d connections from %s in the last %.0f s (%s)", entry[1],
                        addr, now - entry[0], what)
            entry[0], entry[1] = now, 0

    def _prune(self, now: float) -> None:
        for addr in [a for a, e in self.sources.items() if now - e[0] >= self.interval]:
            del self.sources[addr]
        while len(self.sources) >= REFUSAL_SOURCES_MAX:
            del self.sources[next(iter(self.sources))]


class Acceptor:
    """Listens on every peer's port and hands valid connections to the links."""

    def __init__(self, bind_addr: str, stopping: threading.Event,
                 allow_any_peer: bool = False,
                 tune: Callable[[socket.socket], None] = tune_socket) -> None:
        self.bind_addr = bind_addr
        self.stopping = stopping
        self.allow_any_peer = allow_any_peer
        self.tune = tune
        self.sel = selectors.DefaultSelector()
        self.pending: list[Link] = []
        self.lock = threading.Lock()
        self.refusals = RefusalLog()

    def add(self, link: Link) -> None:
        with self.lock:
            self.pending.append(link)

    def remove(self, link: Link) -> None:
        """Stop listening for a peer a config reload removed."""
        with self.lock:
            self.pending = [x for x in self.pending if x is not link]
            for key in list(self.sel.get_map().values()):
                if key.data is link:
                    try:
                        self.sel.unregister(key.fileobj)
                    except (KeyError, ValueError):
                        pass
                    key.fileobj.close()

    def run(self) -> None:
        while not self.stopping.is_set():
            with self.lock:
                if self.pending:
                    self.pending = [link for link in self.pending if not self._listen(link)]
            if not self.sel.get_map():
                self.stopping.wait(0.5)
                continue
            try:
                events = self.sel.select(0.5)
            except (OSError, ValueError):
                continue
            exhausted = False
            for key, _ in events:
                exhausted |= self._accept_all(key.fileobj, key.data)
            if exhausted:
                self.stopping.wait(EXHAUSTED_PAUSE)
        for key in list(self.sel.get_map().values()):
            key.fileobj.close()

    def _listen(self, link: Link) -> bool:
        spec, addr = link.spec, self.bind_addr
        s = None
        try:   # the socket itself may fail too: no descriptor left (EMFILE) is retried
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((addr or "", spec.rport))
            s.listen(BACKLOG)
        except OSError as exc:
            log.error("RPROXY(%d) cannot listen on %s:%d: %s (retrying)", link.peer,
                      addr or "*", spec.rport, exc)
            if s is not None:
                s.close()
            return False
        s.setblocking(False)
        self.sel.register(s, selectors.EVENT_READ, link)
        log.debug("RPROXY(%d) listening on %s:%d", link.peer, addr or "*", spec.rport)
        return True

    def _accept_all(self, listener: socket.socket, link: Link) -> bool:
        """Accept every connection waiting on `listener` (a burst drains at once).  True when
        accept() failed for want of descriptors or memory (the caller pauses: the connection
        stays in the backlog, and accepting again at once would spin)."""
        while True:
            try:
                sock, (addr, _port) = listener.accept()
            except (BlockingIOError, InterruptedError):
                return False
            except OSError as exc:
                if exc.errno in EXHAUSTED:
                    log.error("RPROXY(%d) cannot accept a connection on port %d: %s; "
                              "accepting again in %.1f s", link.peer, link.spec.rport,
                              exc.strerror, EXHAUSTED_PAUSE)
                    return True
                log.debug("RPROXY(%d) accept: %s", link.peer, exc)
                return False
            if not self.allow_any_peer and addr not in link.spec.addresses:
                self.refusals.refused(addr, f"port {link.spec.rport} is node {link.peer}'s, "
                                            f"which connects from "
                                            f"{', '.join(sorted(link.spec.addresses)) or '?'}")
                sock.close()
                continue
            sock.setblocking(True)
            self.tune(sock)
            link.peer_addr = addr
            link.event(Event.IN_ACCEPTED, sock)
