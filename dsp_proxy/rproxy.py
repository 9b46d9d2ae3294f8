"""Receiver threads: RPROXY[P] for every remote node, and the put2lcl thread of the LB pair.

RPROXY[P] listens on the local address at `rport`, accepts only P's address, reads frames with
large buffered reads, validates every header (ARCHITECTURE §4: a bad frame closes only this
link, with the reason logged), and delivers.  Delivery errors never tear the link down: the
kernel already answered the sender where it does (§4.6), and where it does not, the DSP sends the
error ACK itself (D3), so no remote caller waits forever.
"""

from __future__ import annotations

import logging
import queue
import selectors
import socket
import struct
import time

import lz4.frame

from dvk_cffi import consts as C
from dvk_cffi import errors as E
from dvk_cffi.wire import HEADER_SIZE, ROUTE_STRUCT, Header, unpack_batch

from .link import COPY_DATA, Link, cork, uncork
from .misc import resolve, tune_socket

log = logging.getLogger("dsp.rproxy")

READ_BUFFER = 1 << 18
_I32 = struct.Struct("<i")
#: How long a delivery waits for a busy remote descriptor (EDVSENQUEUED) before it fails.
ENQUEUED_PATIENCE = 2.0
MAX_FRAME = HEADER_SIZE + C.MAXCOPYBUF
VALID_CMDS = frozenset(c for c in C.CMD_NAMES if c != C.CMD_LAST_CMD)
MESSAGE_CMDS = frozenset({C.CMD_SEND_MSG, C.CMD_SNDREC_MSG, C.CMD_REPLY_MSG})
COPY_CMDS = frozenset({C.CMD_COPYIN_DATA, C.CMD_COPYOUT_RQST, C.CMD_COPYLCL_RQST,
                       C.CMD_COPYRMT_RQST, C.CMD_COPYIN_RQST})
#: put2lcl errors for which the kernel itself queued an error ACK (dvk_abi.md §4.6).
KERNEL_ACKED = frozenset({E.EDVSTRAPDENIED, E.EDVSRMTPROC, E.EDVSDSTDIED, E.EDVSMIGRATE})
KERNEL_ACKED_COPY = {
    C.CMD_COPYIN_DATA: frozenset({E.EDVSPROCSTS, E.EDVS2BIG, E.EDVSFAULT}),
    C.CMD_COPYOUT_RQST: frozenset({E.EDVSPROCSTS, E.EDVSBUSY}),
}
#: Binding errors that autobind (and D4 for balanced traffic) repairs.
BINDING_ERRORS = frozenset({E.EDVSNOTBIND, E.EDVSNONODE, E.EDVSENDPOINT})
ERROR_ACK_CMD = {
    C.CMD_SEND_MSG: C.CMD_SEND_ACK, C.CMD_REPLY_MSG: C.CMD_SEND_ACK,
    C.CMD_SNDREC_MSG: C.CMD_SNDREC_ACK, C.CMD_COPYIN_DATA: C.CMD_COPYIN_ACK,
    C.CMD_COPYOUT_RQST: C.CMD_COPYOUT_DATA, C.CMD_COPYLCL_RQST: C.CMD_COPYLCL_ACK,
    C.CMD_COPYRMT_RQST: C.CMD_COPYRMT_ACK, C.CMD_COPYIN_RQST: C.CMD_COPYRMT_ACK,
}


class FrameError(Exception):
    """A frame that breaks the wire rules; the link is closed with this reason."""


def check_header(fields: tuple, peer: int, nr_nodes: int, nr_dcs: int, lb_node: int) -> None:
    """Validate a received header (ARCHITECTURE §4, D14) before anything uses it."""
    cmd, dcid, _src, _dst, snode, dnode, _rc, length, _pid, batch_nr, flags = fields
    if cmd not in VALID_CMDS:
        raise FrameError(f"unknown command {cmd:#x}")
    if not 0 <= length <= C.MAXCOPYBUF:
        raise FrameError(f"c_len {length} outside 0..{C.MAXCOPYBUF}")
    if flags & C.FLAG_BATCH:
        if batch_nr < 1 or length != batch_nr * HEADER_SIZE:
            raise FrameError(f"batch of {batch_nr} headers with c_len {length}")
    elif batch_nr:
        raise FrameError(f"c_batch_nr {batch_nr} without the batch flag")
    elif length and cmd not in C.DATA_CMDS:
        raise FrameError(f"{C.CMD_NAMES[cmd]} with a {length}-byte payload")
    if cmd == C.CMD_NONE:
        if length and not flags & C.FLAG_BATCH:
            raise FrameError("HELLO with a payload")
        return
    if not (0 <= snode < nr_nodes and 0 <= dnode < nr_nodes):
        raise FrameError(f"node id out of range (snode {snode}, dnode {dnode})")
    if not 0 <= dcid < nr_dcs:
        raise FrameError(f"dcid {dcid} out of range")
    if snode != peer and snode != lb_node:
        raise FrameError(f"c_snode {snode} is neither the peer {peer} nor the LB node")


class FrameReader:
    """Buffered frame parser: one large recv_into, then every complete frame in the buffer."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray(READ_BUFFER)
        self.view = memoryview(self.buf)
        self.start = 0
        self.end = 0

    def _fill(self, need: int) -> None:
        if self.start + need > len(self.buf):
            pending = self.end - self.start
            self.buf[:pending] = self.buf[self.start:self.end]
            self.start, self.end = 0, pending
        while self.end - self.start < need:
            n = self.sock.recv_into(self.view[self.end:])
            if n == 0:
                raise ConnectionResetError("the peer closed the connection"
                                           + (" inside a frame" if self.end > self.start else ""))
            self.end += n

    def has_frame(self) -> bool:
        """True when the buffer holds a whole frame (parse it without reading)."""
        avail = self.end - self.start
        if avail < HEADER_SIZE:
            return False
        n = _I32.unpack_from(self.buf, self.start + 28)[0]
        return avail >= HEADER_SIZE + n or not 0 <= n <= C.MAXCOPYBUF  # bad: next() says so

    def fill(self) -> None:
        """Read once more (blocking) into the buffer: at least one byte."""
        if self.start == self.end:
            self.start = self.end = 0
        elif len(self.buf) - self.end < HEADER_SIZE + C.MAXCOPYBUF:
            pending = self.end - self.start
            self.buf[:pending] = self.buf[self.start:self.end]
            self.start, self.end = 0, pending
        n = self.sock.recv_into(self.view[self.end:])
        if n == 0:
            raise ConnectionResetError("the peer closed the connection"
                                       + (" inside a frame" if self.end > self.start else ""))
        self.end += n

    def next(self, check) -> tuple[memoryview, memoryview]:
        """The next (header, payload) views; valid until the next call.  `self.fields` holds
        the header's first 11 fields (ROUTE_STRUCT)."""
        if self.end - self.start < HEADER_SIZE:
            self._fill(HEADER_SIZE)
        self.fields = fields = ROUTE_STRUCT.unpack_from(self.buf, self.start)
        check(fields)
        total = HEADER_SIZE + fields[7]
        if self.end - self.start < total:
            self._fill(total)
        s = self.start
        self.start += total
        return self.view[s:s + HEADER_SIZE], self.view[s + HEADER_SIZE:s + total]


def error_ack(h: Header, rcode: int) -> Header | None:
    """The ACK that answers request `h` with error `rcode` (None when nobody waits for one)."""
    cmd = ERROR_ACK_CMD.get(h.c_cmd)
    if cmd is None:
        return None
    a = Header()
    a.buf[96:120] = h.buf[96:120]  # c_vcopy: the requester finds its copy by it
    a.c_cmd, a.c_dcid, a.c_src, a.c_dst = cmd, h.c_dcid, h.c_dst, h.c_src
    a.c_snode, a.c_dnode, a.c_rcode = h.c_dnode, h.c_snode, rcode
    a.v_bytes = 0
    return a


def needs_dsp_ack(cmd: int, code: int) -> bool:
    """D3: the DSP answers the put2lcl failures for which the kernel sent no ACK."""
    if cmd not in ERROR_ACK_CMD or code in KERNEL_ACKED:
        return False
    return code not in KERNEL_ACKED_COPY.get(cmd, ())


class Deliverer:
    """put2lcl with the DSP's repairs: autobind / D4 binding, D3 error ACKs, SEND_ACK → SNDREC_ACK.

    One per thread that calls put2lcl (each RPROXY and the put2lcl thread), because the
    payload buffer belongs to the caller.
    """

    def __init__(self, dsp) -> None:
        self.dsp = dsp
        self.payload = dsp.dvk.alloc(C.MAXCOPYBUF)
        self.errors = 0

    def deliver(self, h: Header, data: memoryview | bytes | None, autobind: bool) -> int:
        """put2lcl of one command; returns 0 or the negative code of a failure it answered."""
        dsp = self.dsp
        length = h.c_len
        if length:
            self.payload.view[:length] = data[:length]
        try:
            return dsp.dvk.put2lcl(h, self.payload)
        except E.DvkError as err:
            code = err.code
        if code == E.EDVSENQUEUED:
            code = self._retry_enqueued(h)
            if code >= 0:
                return code
        if code in BINDING_ERRORS and (autobind or h.c_flags & C.FLAG_CHECK_HDR):
            if self._bind_remote(h):
                try:
                    return dsp.dvk.put2lcl(h, self.payload)
                except E.DvkError as err:
                    code = err.code
        if code == E.EDVSACKDST and h.c_cmd == C.CMD_SEND_ACK and h.c_rcode < 0:
            h.c_cmd = C.CMD_SNDREC_ACK  # D3: the error was for a caller waiting in sendrec
            try:
                return dsp.dvk.put2lcl(h, self.payload)
            except E.DvkError as err:
                code = err.code
        self.errors += 1
        dsp.count_error(h, code)
        log.debug("put2lcl %r: %s", h, E.error_name(code))
        if needs_dsp_ack(h.c_cmd, code):
            ack = error_ack(h, code)
            if ack is not None:
                dsp.send_to_node(h.c_snode, ack)
        return code

    def _retry_enqueued(self, h: Header) -> int:
        """EDVSENQUEUED: the source's remote descriptor still holds the ACK of its previous
        command (one pending command per descriptor, §4.6 row 11).  Many processes share one
        remote endpoint (a server's replies to several clients, the LB's ext_ep), and the
        sender proxy drains that ACK within moments, so wait for it instead of failing."""
        delay, deadline = 0.0005, time.monotonic() + ENQUEUED_PATIENCE
        while time.monotonic() < deadline and not self.dsp.stopping.is_set():
            time.sleep(delay)
            delay = min(delay * 2, 0.01)
            try:
                return self.dsp.dvk.put2lcl(h, self.payload)
            except E.DvkError as err:
                if err.code != E.EDVSENQUEUED:
                    return err.code
        return E.EDVSENQUEUED

    def _bind_remote(self, h: Header) -> bool:
        """Make c_src a REMOTE endpoint on c_snode (D4); never touches a LOCAL slot."""
        dvk, dcid, ep, node = self.dsp.dvk, h.c_dcid, h.c_src, h.c_snode
        try:
            info = dvk.getprocinfo(dcid, ep)
            if not info.p_rts_flags & C.SLOT_FREE:
                if not info.p_rts_flags & C.REMOTE:
                    return False
                if info.p_nodeid == node and info.p_endpoint == ep:
                    return True
                dvk.unbind(dcid, ep)
            dvk.rmtbind(dcid, "rclient", ep, node)
            log.debug("bound endpoint %d of DC %d to node %d", ep, dcid, node)
            return True
        except E.DvkError as err:
            log.debug("autobind of %d@%d in DC %d: %s", ep, node, dcid, err)
            return False


class Acceptor:
    """Accepts every peer's connection on its own thread, so a stranger is refused at once
    even while the peer's link is busy, and hands valid connections to the links (ARCHITECTURE
    §7: only the configured peer's address is accepted)."""

    def __init__(self, dsp) -> None:
        self.dsp = dsp
        self.sel = selectors.DefaultSelector()
        self.pending: list[Link] = []

    def add(self, link: Link) -> None:
        self.pending.append(link)

    def remove(self, link: Link) -> None:
        """Stop listening for a peer a config reload removed (called from the main thread:
        the listener is unregistered before it is closed, so `run` never sees it again)."""
        self.pending = [x for x in self.pending if x is not link]
        for key in list(self.sel.get_map().values()):
            if key.data is link:
                try:
                    self.sel.unregister(key.fileobj)
                except (KeyError, ValueError):
                    pass
                key.fileobj.close()

    def run(self) -> None:
        dsp = self.dsp
        while not dsp.stopping.is_set():
            if self.pending:
                self.pending = [link for link in self.pending if not self._listen(link)]
            try:
                events = self.sel.select(0.5)
            except OSError:
                continue
            for key, _ in events:
                self._accept(key.fileobj, key.data)
        for key in list(self.sel.get_map().values()):
            key.fileobj.close()

    def _listen(self, link: Link) -> bool:
        spec, addr = link.spec, self.dsp.bind_addr
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((addr or "", spec.rport))
            s.listen(8)
        except OSError as exc:
            log.error("RPROXY(%d) cannot listen on %s:%d: %s (retrying)", link.peer,
                      addr or "*", spec.rport, exc)
            s.close()
            return False
        s.setblocking(False)
        self.sel.register(s, selectors.EVENT_READ, link)
        log.debug("RPROXY(%d) listening on %s:%d", link.peer, addr or "*", spec.rport)
        return True

    def _accept(self, listener: socket.socket, link: Link) -> None:
        try:
            sock, (addr, port) = listener.accept()
        except OSError:
            return
        try:
            expected = resolve(link.spec.host)
        except OSError as exc:
            log.warning("RPROXY(%d) cannot resolve %s: %s", link.peer, link.spec.host, exc)
            expected = None
        if addr != expected and not self.dsp.allow_any_peer:
            log.warning("RPROXY(%d) refused a connection from %s:%d (node %d is %s)",
                        link.peer, addr, port, link.peer, expected)
            sock.close()
            return
        sock.setblocking(True)
        tune_socket(sock)
        link.peer_addr = addr
        link.set_in(sock)


class RProxy:
    """The receiver of the link to one peer."""

    def __init__(self, dsp, link: Link, gate) -> None:
        self.dsp = dsp
        self.link = link
        self.gate = gate
        self.name = f"RPROXY({link.peer})"

    def run(self) -> None:
        dsp = self.dsp
        if not self.gate.enter(dsp.dvk):
            return
        self.deliverer = Deliverer(dsp)
        serial = 0
        while not dsp.stopping.is_set():
            sock, serial = self.link.wait_in(serial, 0.5)
            if sock is not None and self._wait_up(sock):
                self._serve(sock, self.link.generation)

    def _wait_up(self, sock: socket.socket) -> bool:
        """Both directions must be up before any frame is read; meanwhile notice a
        connection that dies."""
        link = self.link
        while not self.dsp.stopping.is_set():
            if link.wait_up(0.2):
                return link.in_sock is sock
            if link.in_sock is not sock:
                return False
            try:
                if sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
                    link.down("the peer closed the connection before the link was up")
                    return False
            except BlockingIOError:
                pass
            except OSError as exc:
                link.down(f"connection error: {exc}")
                return False
        return False

    def _serve(self, sock: socket.socket, gen: int) -> None:
        dsp, link = self.dsp, self.link
        sock.settimeout(dsp.silence_timeout)
        reader = FrameReader(sock)
        peer, lb = link.peer, dsp.lb_nodeid
        nr_nodes, nr_dcs = dsp.dvs.d_nr_nodes, dsp.dvs.d_nr_dcs

        def check(fields):
            check_header(fields, peer, nr_nodes, nr_dcs, lb)

        received = link.received
        dispatch = self.dispatch
        monotonic = time.monotonic
        group = dsp.group
        fast = group.fast_path if group is not None else None
        slow_flags = C.FLAG_LZ4 | C.FLAG_BATCH
        try:
            while link.generation == gen and link.up:
                if not reader.has_frame():
                    uncork()         # write what the frames of the last read produced
                    reader.fill()
                    link.last_rx = monotonic()
                    cork()
                hview, payload = reader.next(check)
                f = reader.fields
                length = f[7]
                received.count(f[0], HEADER_SIZE + length, 1 + f[9], f[1], length)
                # LB traffic in an established session: routed on the raw header (no Header
                # object); everything else, batches and LZ4 frames take the full path
                if fast is not None and not f[10] & slow_flags and f[0] != C.CMD_NONE \
                        and fast(hview, f, payload):
                    continue
                h = Header(bytearray(hview))
                if f[10] & C.FLAG_LZ4:
                    payload = self._decompress(h, payload)
                dispatch(h, payload)
        except FrameError as exc:
            log.warning("%s: bad frame, closing the link: %s", self.name, exc)
            link.down(f"bad frame: {exc}", gen)
        except TimeoutError:
            link.down(f"nothing received for {dsp.silence_timeout:.1f} s", gen)
        except OSError as exc:
            link.down(str(exc) or type(exc).__name__, gen)
        finally:
            uncork()

    def _decompress(self, h: Header, payload: memoryview) -> memoryview:
        """An LZ4 frame payload, whatever this node's own `compress` setting (the flag says
        what the frame is; the C receiver passed it raw unless its own option was on)."""
        if h.c_cmd not in COPY_DATA:
            raise FrameError(f"LZ4 flag on {C.CMD_NAMES.get(h.c_cmd, h.c_cmd)}")
        try:
            raw = lz4.frame.decompress(payload)
        except RuntimeError as exc:
            raise FrameError(f"LZ4 payload does not decompress: {exc}") from None
        if len(raw) > C.MAXCOPYBUF or len(raw) != h.v_bytes:
            raise FrameError(f"LZ4 payload of {len(raw)} bytes, v_bytes {h.v_bytes}")
        self.link.received.lz4_frames += 1
        self.link.received.lz4_raw += len(raw)
        self.link.received.lz4_wire += len(payload)
        h.c_len = len(raw)
        h.c_flags &= ~C.FLAG_LZ4
        return memoryview(raw)

    def dispatch(self, h: Header, payload: memoryview) -> None:
        """Route one frame (ARCHITECTURE §5): HELLO/control, local delivery, the LB, relays."""
        if h.c_flags & C.FLAG_BATCH:
            extra = bytes(payload)
            h.c_flags &= ~C.FLAG_BATCH
            count, h.c_batch_nr, h.c_len = h.c_batch_nr, 0, 0
            self.dispatch(h, memoryview(b""))
            group = self.dsp.group
            if group is None:
                for sub in unpack_batch(extra, count):
                    self.dispatch(sub, memoryview(b""))
                return
            fast, empty = group.fast_path, memoryview(b"")
            if count * HEADER_SIZE != len(extra):
                raise FrameError(f"batch of {count} headers in {len(extra)} bytes")
            for off in range(0, count * HEADER_SIZE, HEADER_SIZE):
                sub = extra[off:off + HEADER_SIZE]
                f = ROUTE_STRUCT.unpack_from(sub)
                if f[10] & (C.FLAG_LZ4 | C.FLAG_BATCH) or f[0] == C.CMD_NONE \
                        or not fast(sub, f, empty):
                    self.dispatch(Header(bytearray(sub)), empty)
            return
        if h.c_cmd == C.CMD_NONE:
            self.link.received.hellos += 1
            self.dsp.on_control(self.link, h)
            return
        self.dsp.route(h, payload, self.deliverer, self.link)


class Put2lclThread:
    """The LB pair's receiver (D1): delivers what the router queued for local processes."""

    def __init__(self, dsp, gate) -> None:
        self.dsp = dsp
        self.gate = gate
        self.queue: queue.Queue = queue.Queue()

    def put(self, h: Header, data: bytes = b"") -> None:
        self.queue.put((h, data))

    def run(self) -> None:
        dsp = self.dsp
        if not self.gate.enter(dsp.dvk):
            return
        deliverer = Deliverer(dsp)
        while not dsp.stopping.is_set():
            try:
                h, data = self.queue.get(timeout=0.5)
            except queue.Empty:
                continue
            deliverer.deliver(h, data, autobind=True)
