"""A peer that behaves on the wire as the C DSP does, for the interop tests.

Written from the behaviour of the C daemon (docs/design.md, "The wire" and "Liveness"), not
from its code.  `CPeer` is the proxy pair of one emulated node for one peer node, driven through the
emulated kernel (`EmuDvk`) as the C threads drive the DVK:

- the receiver listens on all interfaces at `rport` (unless told an address), accepts whoever
  connects (no peer check), tolerates its 30 s receive timeout, delivers every frame with
  `put2lcl`, drops the connection on any `put2lcl` error (autobind NO) and accepts again;
  a HELLO (CMD_NONE) is never delivered, only recorded;
- the sender creates ONE socket, sleeps 5 s before every connect attempt (the first one too),
  connects to the first address of the peer's name, and then forwards what `get2rmt` gives;
  only when `get2rmt` had nothing for the HELLO period (30 s) does it send a HELLO, and only
  while both connection bits are set;
- the HELLO is the sender's reused header buffer with the header fields set as C sets them
  (CMD_NONE, dcid -1, src/dst NONE, snode/dnode, pid = sender TID, no flags/length, the
  realtime clock in c_timestamp, the sequence counters) and everything else left from the
  previous command: its message (any `m_type`), its rcode and its vcopy block;
- a failed send is counted and the message lost, the connection is kept (unbatched C); when
  `get2rmt` fails otherwise the sender disconnects and closes its socket, after which every
  connect attempt fails with EBADF, so it never reconnects;
- the connection bits behave as the C code's: either thread's connect sets both, a disconnect
  clears only its own.

Not reproduced: the receiver's self-deadlock when a HELLO asks it for a reply (MT_LOAD_THRESHOLDS,
MT_RMTBIND: recorded, not answered), the loss of a partly read frame at a receive timeout,
batching, LZ4 (tests/test_interop_wire.py sends a C sender's batch and LZ4 frames from a fake
peer instead), the LB redirection hack, autobind YES.  Also different: the C receiver keeps
its connection when `put2lcl` fails with EDVSAGAIN (this one drops it on any error); the C
sender sends with MSG_DONTWAIT and does not retry a header that meets a full socket buffer
(EAGAIN), so a receiver that falls a socket buffer behind can get a cut header and a stream out
of step (this one sends blocking, whole frames); a peer name that does not resolve ends the
C daemon (this one retries).  `python tests/c_peer.py --help` runs one on its own.
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
import threading
import time

from dvk_cffi import consts as C
from dvk_cffi import errors as E
from dvk_cffi.emu.client import EmuDvk
from dvk_cffi.wire import HEADER_SIZE, Header

log = logging.getLogger("c_peer")

#: get2rmt's timeout in the C sender: a HELLO only after this long without traffic.
HELLO_PERIOD_MS = C.HELLO_PERIOD
#: The C sender sleeps this long before every connect attempt (and after a get2rmt error).
CONNECT_SLEEP = 5.0
#: SO_RCVTIMEO of the C receiver; a timeout is tolerated (EAGAIN has EDVSAGAIN's value).
RECV_TIMEOUT = 30.0

SCONNECTED = 1 << C.PX_BIT_SCONNECTED
RCONNECTED = 1 << C.PX_BIT_RCONNECTED


class CPeer:
    """The C DSP's proxy pair for node `peer`, on the emulated node kernel at `dvk_path`."""

    def __init__(self, dvk_path: str, peer: int, peer_name: str, peer_host: str, sport: int,
                 rport: int, listen_host: str = "", hello_period_ms: int = HELLO_PERIOD_MS,
                 connect_sleep: float = CONNECT_SLEEP) -> None:
        self.dvk = EmuDvk(path=dvk_path)
        self.local, _ = self.dvk.getdvsinfo()
        self.peer = peer
        self.peer_name = peer_name
        self.peer_host = peer_host
        self.sport = sport
        self.rport = rport
        self.listen_host = listen_host
        self.hello_period_ms = hello_period_ms
        self.connect_sleep = connect_sleep
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.status = 0                 # px_status: SCONNECTED | RCONNECTED
        self.snd_seq = 0                # px_snd_seq
        self.ack_seq = 0                # px_ack_seq
        # what happened, for the tests
        self.hellos_sent: list[Header] = []
        self.hellos_received: list[Header] = []
        self.frames_sent = 0
        self.frames_received = 0
        self.send_failures = 0
        self.hello_failures = 0
        self.connects = 0
        self.connect_errors: list[int] = []
        self.accepts = 0
        self.disconnects: list[str] = []
        self.sender_gone = threading.Event()
        self.listening = threading.Event()
        self.error: OSError | None = None
        self._tids: dict[str, int] = {}
        self._ready = threading.Condition()
        self._go = threading.Event()
        self._sock: socket.socket | None = None
        self._conn: socket.socket | None = None
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------ start and stop
    def start(self, timeout: float = 10.0) -> None:
        """The C start-up for one slot: both threads report their TID, then the pair is
        registered (`proxies_bind`, `node_up`) before either touches the network."""
        for name, body in (("receiver", self._receiver), ("sender", self._sender)):
            t = threading.Thread(target=self._enter, args=(name, body), daemon=True,
                                 name=f"cpeer-{name}")
            t.start()
            self._threads.append(t)
        with self._ready:
            if not self._ready.wait_for(lambda: len(self._tids) == 2, timeout):
                raise TimeoutError("C peer threads did not start")
        self.dvk.proxies_bind(self.peer_name, self.peer, self._tids["sender"],
                              self._tids["receiver"], C.MAXCOPYBUF)
        self.dvk.node_up(self.peer_name, self.peer, self.peer)
        self._go.set()

    def stop(self) -> None:
        """End both threads (the C daemon has no stop; this is for the tests' cleanup)."""
        self.stopping.set()
        self._go.set()
        for s in (self._sock, self._conn):
            if s is not None:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        try:
            self.dvk.proxies_unbind(self.peer)
        except E.DvkError:
            pass
        for t in self._threads:
            t.join(2.0)
        self.dvk.close()

    def _enter(self, name: str, body) -> None:
        try:
            self.dvk.getdvsinfo()           # the thread's first DVK call makes it known
        except E.DvkError as err:
            log.error("C peer %s: %s", name, err)
            return
        with self._ready:
            self._tids[name] = threading.get_native_id()
            self._ready.notify_all()
        self._go.wait()
        if not self.stopping.is_set():
            try:
                body()
            except E.DvkError as err:   # the node kernel went away (end of a test)
                log.debug("C peer %s: %s", name, err)
            except OSError as exc:      # e.g. the listener's port is taken: C exits here
                self.error = exc
                log.error("C peer %s: %s", name, exc)

    @property
    def connected(self) -> bool:
        with self.lock:
            return self.status == SCONNECTED | RCONNECTED

    def _connected(self, status: int) -> None:
        """What the C code does on either side's connect: report it and set BOTH bits."""
        with self.lock:
            self.dvk.proxy_conn(self.peer, status)
            self.status |= SCONNECTED | RCONNECTED

    def _disconnected(self, bit: int, status: int, why: str) -> None:
        with self.lock:
            self.status &= ~bit
            self.disconnects.append(why)
            try:
                self.dvk.proxy_conn(self.peer, status)
            except E.DvkError:
                pass

    # ------------------------------------------------------------------ sender
    def _sender(self) -> None:
        hdr = Header()
        payload = self.dvk.alloc(C.MAXCOPYBUF)
        sock = self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # once
        while not self.stopping.is_set():
            while True:
                if self.stopping.wait(self.connect_sleep):
                    return
                try:
                    addr = socket.gethostbyname(self.peer_host)
                    sock.connect((addr, self.sport))
                    break
                except OSError as exc:
                    self.connect_errors.append(exc.errno or 0)
                    log.debug("C sender: connect to %s:%d: %s", self.peer_host, self.sport, exc)
            self.connects += 1
            self._connected(C.CONNECT_SPROXY)
            why = self._serve(sock, hdr, payload)
            self._disconnected(SCONNECTED, C.DISCONNECT_SPROXY, why)
            sock.close()      # and the same object is used again: EBADF for ever
            self.sender_gone.set()

    def _serve(self, sock: socket.socket, hdr: Header, payload) -> str:
        while not self.stopping.is_set():
            try:
                self.dvk.get2rmt(hdr, payload, self.hello_period_ms)
            except E.DvkError as err:
                if err.code == E.EDVSTIMEDOUT:
                    if self.connected:
                        self._hello(sock, hdr)
                    continue
                if self.stopping.wait(self.connect_sleep):
                    return "stopped"
                return f"get2rmt: {E.error_name(err.code)}"
            if self._send(sock, hdr, payload.view[:hdr.c_len] if hdr.c_len > 0 else None):
                self.frames_sent += 1
                self.snd_seq += 1
            else:
                self.send_failures += 1
        return "stopped"

    def _hello(self, sock: socket.socket, hdr: Header) -> None:
        """The header fields the C HELLO sets; message, rcode and vcopy stay as they were."""
        hdr.c_cmd, hdr.c_dcid, hdr.c_src, hdr.c_dst = C.CMD_NONE, -1, C.NONE, C.NONE
        hdr.c_snode, hdr.c_dnode, hdr.c_len = self.local, self.peer, 0
        hdr.c_pid, hdr.c_batch_nr, hdr.c_flags = self._tids["sender"], 0, 0
        now = time.clock_gettime_ns(time.CLOCK_REALTIME)
        hdr.c_tv_sec, hdr.c_tv_nsec = now // 1_000_000_000, now % 1_000_000_000
        if self._send(sock, hdr, None):
            self.hellos_sent.append(hdr.copy())
        else:                               # C only prints it; the connection is kept
            self.hello_failures += 1

    def _send(self, sock: socket.socket, hdr: Header, data) -> bool:
        hdr.c_snd_seq, hdr.c_ack_seq = self.snd_seq, self.ack_seq
        try:
            sock.sendall(bytes(hdr.buf), socket.MSG_NOSIGNAL)
            if data is not None:
                sock.sendall(data, socket.MSG_NOSIGNAL)
            return True
        except OSError as exc:
            log.debug("C sender: send: %s", exc)
            return False

    # ------------------------------------------------------------------ receiver
    def _receiver(self) -> None:
        lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            lst.bind((self.listen_host, self.rport))
            lst.listen(0)
            lst.settimeout(0.5)     # C waits 30 s per accept; shorter only to notice stop()
            self.listening.set()
            while not self.stopping.is_set():
                try:
                    conn, _addr = lst.accept()
                except TimeoutError:
                    continue
                self._conn = conn
                conn.settimeout(RECV_TIMEOUT)
                self.accepts += 1
                self._connected(C.CONNECT_RPROXY)
                why = self._deliver_all(conn, self.dvk.alloc(C.MAXCOPYBUF))
                self._disconnected(RCONNECTED, C.DISCONNECT_RPROXY, why)
                conn.close()
        finally:
            lst.close()

    def _deliver_all(self, conn: socket.socket, payload) -> str:
        while not self.stopping.is_set():
            try:
                raw = _read(conn, HEADER_SIZE, self.stopping)
            except ConnectionError as exc:
                return str(exc)
            h = Header(bytearray(raw))
            if h.c_cmd == C.CMD_NONE:
                self.hellos_received.append(h)
                continue
            if not 0 <= h.c_len <= C.MAXCOPYBUF:    # C would overflow its buffer here
                return f"c_len {h.c_len}"
            if h.c_len:
                try:
                    payload.view[:h.c_len] = _read(conn, h.c_len, self.stopping)
                except ConnectionError as exc:
                    return str(exc)
            try:
                self.dvk.put2lcl(h, payload)
            except E.DvkError as err:       # autobind NO: the error ends the connection
                return f"put2lcl: {E.error_name(err.code)}"
            self.frames_received += 1
            self.ack_seq += 1
        return "stopped"


def _read(conn: socket.socket, n: int, stopping: threading.Event) -> bytes:
    """Exactly n bytes; receive timeouts are waited out (C tolerates them)."""
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = conn.recv(n - len(buf))
        except TimeoutError:
            if stopping.is_set():
                raise ConnectionError("stopped") from None
            continue
        except OSError as exc:
            raise ConnectionError(str(exc)) from None
        if not chunk:
            raise ConnectionError("the peer closed the connection")
        buf += chunk
    return bytes(buf)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="a C-like DSP proxy pair on an emulated node")
    p.add_argument("socket", help="the emulated node kernel's socket")
    p.add_argument("peer", type=int, help="the peer's node id")
    p.add_argument("peer_host", help="the peer's host name (its block name in C)")
    p.add_argument("--name", default=None, help="the pair's name (default node<peer>)")
    p.add_argument("--sport", type=int, default=None, help="default 3000 + local id")
    p.add_argument("--rport", type=int, default=None, help="default 3000 + peer id")
    p.add_argument("--listen", default="", help="listen address (default all interfaces)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    probe = EmuDvk(path=args.socket)
    local, _ = probe.getdvsinfo()
    probe.close()
    peer = CPeer(args.socket, args.peer, args.name or f"node{args.peer}", args.peer_host,
                 args.sport or 3000 + local, args.rport or 3000 + args.peer, args.listen)
    peer.start()
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        peer.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
