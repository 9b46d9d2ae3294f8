"""Receiver threads: RPROXY[P] for every remote node, and the put2lcl thread of the LB pair.

RPROXY[P] reads the frames of P's connection with large buffered reads, checks every header
(batch sub-headers included) before anything uses it (a bad frame closes only this link, with the
reason logged), routes each command through the router and carries out the actions.  Delivery
errors never tear the link down: the kernel already answered the sender where it does, and where
it does not, the DSP sends the error ACK itself, so no remote caller waits for ever.  A delivery
that finds the source's remote descriptor busy (EDVSENQUEUED) is parked and retried between reads,
in order per remote descriptor: the receiver never sleeps.
"""

from __future__ import annotations

import collections
import functools
import itertools
import logging
import mmap
import queue
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import lz4.frame

from dvk_cffi import consts as C
from dvk_cffi import errors as E
from dvk_cffi.wire import (
    HEADER_SIZE,
    R_BATCH_NR,
    R_CMD,
    R_DCID,
    R_FLAGS,
    R_LEN,
    ROUTE_SIZE,
    ROUTE_STRUCT,
    RUN_KEY,
    Header,
    cmd_name,
    error_ack,
    frame_length,
)

from .fastpath import Receiver, Relay
from .group import DELIVER, SEND
from .link import MAXBATCMD, Link, cork, ease, uncork
from .linkstate import Event
from .misc import delay_acks

log = logging.getLogger("dsp.rproxy")

#: A link's read buffer.  1 MiB against 256 KiB: 64 KiB frames through the LB host's relay
#: 1.3x-1.5x faster (fewer, larger reads and writes; docs/performance.md, "Pure ACKs and
#: reads of 1 MiB").  An anonymous mapping (`FrameReader`): only the pages reads reach are
#: memory.
READ_BUFFER = 1 << 20
#: How long a parked delivery (EDVSENQUEUED) is retried before it fails.
ENQUEUED_PATIENCE = 2.0
#: At most this many deliveries, holding at most MAX_PARKED_BYTES of payload, parked per
#: receiver; more fail at once with EDVSAGAIN (1,024 COPY frames of 64 KiB were 64 MiB).
MAX_PARKED = 1024
MAX_PARKED_BYTES = 16 << 20
#: Retry interval of parked deliveries while the socket is quiet.
PARK_RETRY = 0.002
#: At most this many frames, and this many bytes with their headers, wait for the put2lcl
#: thread (8,192 COPY frames of 64 KiB a peer sends into a local client's session would be
#: half a gigabyte).
PUT2LCL_QUEUE_MAX = 8192
PUT2LCL_QUEUE_BYTES = 16 << 20
#: How long a thread waits for room in the put2lcl thread's full queue before the frame is
#: dropped (counted, logged once per episode).
PUT2LCL_WAIT = 0.5
MAX_FRAME = HEADER_SIZE + C.MAXCOPYBUF
#: At most this many payload-less frames with equal routing fields are routed as one run.
MAX_RUN = 4096
#: put2lcl errors for which the kernel itself queued an error ACK to the requester.
KERNEL_ACKED = frozenset({E.EDVSTRAPDENIED, E.EDVSRMTPROC, E.EDVSDSTDIED, E.EDVSMIGRATE})
KERNEL_ACKED_COPY = {
    C.CMD_COPYIN_DATA: frozenset({E.EDVSPROCSTS, E.EDVS2BIG, E.EDVSFAULT}),
    C.CMD_COPYOUT_RQST: frozenset({E.EDVSPROCSTS, E.EDVSBUSY}),
}
#: Binding errors that autobind (and CHECK_HDR for balanced traffic) repairs.
BINDING_ERRORS = frozenset({E.EDVSNOTBIND, E.EDVSNONODE, E.EDVSENDPOINT})


class FrameError(Exception):
    """A frame that breaks the wire rules; the link is closed with this reason."""


@dataclass
class WireLimits:
    """What a received header is checked against: the DVS limits, the node's DC ranges (read
    from the DVK when first needed) and what the link may carry."""

    nr_nodes: int
    nr_dcs: int
    dc_ranges: dict = field(default_factory=dict)   # dcid -> (nr_tasks, nr_procs) or None
    #: Reads a DC's range into `dc_ranges` the first time a header names it and returns it
    #: (None: not a DC of the DVS).  The caller keeps that answer rather than reading
    #: `dc_ranges` again: the main loop empties it now and then.
    learn: Callable[[int], tuple[int, int] | None] | None = None

    def dc_range(self, dcid: int) -> tuple[int, int] | None:
        """(nr_tasks, nr_procs) of DC `dcid`, read from the DVK the first time; None when it
        is not a DC of the DVS."""
        rng = self.dc_ranges.get(dcid)
        if rng is None and self.learn is not None:
            rng = self.learn(dcid)
        return rng


def check_header(fields: tuple, peer: int, limits: WireLimits, batched: bool = False) -> None:
    """Check a received header before anything uses it.  HELLO/control frames (c_cmd 0) carry
    no DC, endpoints or nodes; every other command must name a DC of the node, endpoints inside
    that DC's range and `c_snode` = the link's peer (the only node a link may speak for: a
    relayed client's link to the LB host has the LB node's id).  `batched`: a sub-header of a
    batch, which has no payload of its own (a data command's `c_len` there counts data that
    did not come: the C sender batches COPYIN_RQST; `RProxy.dispatch` answers it)."""
    cmd, dcid, src, dst, snode, dnode, _rc, length, _pid, batch_nr, flags = fields
    if cmd not in C.VALID_CMDS:
        raise FrameError(f"unknown command {cmd:#x}")
    if batched:
        if (length and cmd not in C.DATA_CMDS) or batch_nr or flags & (C.FLAG_BATCH
                                                                       | C.FLAG_LZ4):
            raise FrameError(f"batch sub-header with c_len {length}, c_batch_nr {batch_nr}, "
                             f"flags {flags:#x}")
    elif not 0 <= length <= C.MAXCOPYBUF:
        raise FrameError(f"c_len {length} outside 0..{C.MAXCOPYBUF}")
    elif flags & C.FLAG_BATCH:
        # with the LZ4 flag c_len is the compressed length (the C sender compresses batches
        # too): the count is checked against the inflated payload (`RProxy._decompress`)
        if (not 1 <= batch_nr <= MAXBATCMD
                or (length != batch_nr * HEADER_SIZE and not flags & C.FLAG_LZ4)):
            raise FrameError(f"batch of {batch_nr} headers with c_len {length}")
    elif batch_nr:
        raise FrameError(f"c_batch_nr {batch_nr} without the batch flag")
    elif length and cmd not in C.DATA_CMDS:
        raise FrameError(f"{C.CMD_NAMES[cmd]} with a {length}-byte payload")
    if cmd == C.CMD_NONE:
        if length and not flags & C.FLAG_BATCH:
            raise FrameError("HELLO with a payload")
        return
    if not (0 <= snode < limits.nr_nodes and 0 <= dnode < limits.nr_nodes):
        raise FrameError(f"node id out of range (snode {snode}, dnode {dnode})")
    if snode != peer:
        raise FrameError(f"c_snode {snode} is not the peer {peer}")
    if not 0 <= dcid < limits.nr_dcs:
        raise FrameError(f"dcid {dcid} out of range")
    rng = limits.dc_range(dcid)
    if rng is None:
        raise FrameError(f"DC {dcid} is not running on this node")
    p_src, p_dst = C._ENDPOINT_P(src), C._ENDPOINT_P(dst)
    if not (-rng[0] <= p_src < rng[1] and -rng[0] <= p_dst < rng[1]):
        raise FrameError(f"endpoint out of the range of DC {dcid} (src {src}, dst {dst})")


class FrameReader:
    """Buffered frame parser: one large recv_into, then every complete frame in the buffer."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        # not a bytearray, which writes all its zeros at once: a link of small frames keeps
        # reading into the first pages, and the rest never becomes memory
        self.buf = mmap.mmap(-1, READ_BUFFER)
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
        n = frame_length(self.buf, self.start)
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
        total = HEADER_SIZE + fields[R_LEN]
        if self.end - self.start < total:
            self._fill(total)
        s = self.start
        self.start += total
        return self.view[s:s + HEADER_SIZE], self.view[s + HEADER_SIZE:s + total]


    def take_run(self, first: memoryview) -> int:
        """After `next` returned the payload-less header `first`: take the whole frames that
        follow it in the buffer with the same routing fields (so they too are payload-less and
        pass the same checks); returns how many.  Compared in C, no loop per frame."""
        start = self.start
        n = min((self.end - start) // HEADER_SIZE, MAX_RUN)
        if not n:
            return 0
        key = (bytes(first[:ROUTE_SIZE]),)
        heads = RUN_KEY.iter_unpack(self.view[start:start + n * HEADER_SIZE])
        k = len(list(itertools.takewhile(key.__eq__, heads)))
        self.start = start + k * HEADER_SIZE
        return k


def needs_dsp_ack(cmd: int, code: int) -> bool:
    """The DSP answers the put2lcl failures for which the kernel sent no ACK."""
    if cmd not in C.PROXY_ERROR_ACK or code in KERNEL_ACKED:
        return False
    return code not in KERNEL_ACKED_COPY.get(cmd, ())


class Deliverer:
    """put2lcl with the DSP's repairs: the binding of remote endpoints, error ACKs where the
    kernel sends none, SEND_ACK -> SNDREC_ACK, and parked retries of EDVSENQUEUED.

    One per thread that calls put2lcl (each RPROXY and the put2lcl thread), because the
    payload buffer belongs to the caller.
    """

    def __init__(self, ctx, peer: int | None) -> None:
        self.ctx = ctx
        self.peer = peer            # the link whose frames this deliverer serves (None: LB)
        self.payload = ctx.dvk.alloc(C.MAXCOPYBUF)
        self.errors = 0
        # (dcid, c_src) -> deque of (deadline, header, payload) waiting for that descriptor
        self.parked: dict[tuple[int, int], collections.deque] = {}
        self.nparked = 0
        self.parked_bytes = 0

    def deliver(self, h: Header, data, autobind: bool) -> int:
        """put2lcl of one command; 0, or the negative code of a failure it answered (a parked
        command returns EDVSENQUEUED and is answered later)."""
        key = (h.c_dcid, h.c_src)
        if key in self.parked:      # keep the order of the commands of one descriptor
            return self._park(key, h, data)
        return self.put_done(h, data, self._put(h, data), autobind)

    def put_done(self, h: Header, data, code: int, autobind: bool) -> int:
        """After the put2lcl of a command returned `code` (here, or in the compiled receiver):
        parked when the kernel said EDVSENQUEUED, else `deliver`'s result and repairs."""
        if code == E.EDVSENQUEUED:
            return self._park((h.c_dcid, h.c_src), h, data)
        return self._finish(h, data, code, autobind)

    def _put(self, h: Header, data) -> int:
        length = h.c_len
        if length:
            self.payload.view[:length] = data[:length]
        try:
            return self.ctx.dvk.put2lcl(h, self.payload)
        except E.DvkError as err:
            return err.code

    def _finish(self, h: Header, data, code: int, autobind: bool) -> int:
        """The repairs and the error reply for a put2lcl that returned `code`."""
        if code >= 0:
            return code
        if code in BINDING_ERRORS and (autobind or h.c_flags & C.FLAG_CHECK_HDR):
            code = self._bind_remote(h, code)
            if code == 0:
                code = self._put(h, data)
                if code >= 0:
                    return code
        if code == E.EDVSACKDST and h.c_cmd == C.CMD_SEND_ACK and h.c_rcode < 0:
            h.c_cmd = C.CMD_SNDREC_ACK  # the error was for a caller waiting in sendrec
            code = self._put(h, data)
            if code >= 0:
                return code
        self.refuse(h, code)
        return code

    def refuse(self, h: Header, code: int) -> None:
        """A command from the peer that fails with `code`: counted, and its sender answered
        with the error ACK the DVK would send."""
        self.errors += 1
        self.ctx.count_error(code)
        log.debug("put2lcl %r: %s", h, E.error_name(code))
        if needs_dsp_ack(h.c_cmd, code) and self.peer is not None:
            ack = error_ack(h, code)
            if ack is not None:
                self.ctx.execute((SEND, self.peer, ack.buf, None, None, False))

    def _park(self, key: tuple[int, int], h: Header, data) -> int:
        length = h.c_len
        if self.nparked >= MAX_PARKED or self.parked_bytes + length > MAX_PARKED_BYTES:
            return self._finish(h, data, E.EDVSAGAIN, False)
        q = self.parked.get(key)
        if q is None:
            q = self.parked[key] = collections.deque()
        stored = bytes(data[:length]) if length else b""
        q.append((time.monotonic() + ENQUEUED_PATIENCE, Header(bytearray(h.buf)), stored))
        self.nparked += 1
        self.parked_bytes += len(stored)     # what retry_parked takes off again
        return E.EDVSENQUEUED

    def retry_parked(self) -> None:
        """Retry the head of every parked queue (between reads; never sleeps)."""
        now = time.monotonic()
        for key in list(self.parked):
            q = self.parked[key]
            while q:
                deadline, h, data = q[0]
                code = self._put(h, data)
                if code == E.EDVSENQUEUED and now < deadline:
                    break
                q.popleft()
                self.nparked -= 1
                self.parked_bytes -= len(data)
                self._finish(h, data, code, True)
            if not q:
                del self.parked[key]

    def _bind_remote(self, h: Header, code: int) -> int:
        """Make c_src a REMOTE endpoint on c_snode before delivering a balanced (CHECK_HDR) or
        autobind frame whose put2lcl failed with `code`; 0 when it is bound so, else the code
        to answer the frame with.  Only for the node the link speaks for; never touches a
        LOCAL slot or a binding this DSP made itself (a service endpoint bound to the LB
        node), and never binds a configured service's ext_ep (a server's program, down for a
        moment, could not bind it again).  Never moves an endpoint that another node's
        process is using (a request of it waits here for its reply, until the reply, the
        server's end or the loss of that node's link; or a local process's reply to it waits
        for that node's ACK): the reply would go to the newcomer's node, into its process's
        wait, or its ACK be refused (EDVSAGAIN to the newcomer instead).  The same node's
        endpoint of another generation is moved: the LB host gave the slot to a new session."""
        ctx, dcid, ep, node = self.ctx, h.c_dcid, h.c_src, h.c_snode
        # the slot of `ep`, which may carry a generation (the LB host gives a translated
        # endpoint a new one for each session): what is bound there may be another one
        slot = C._ENDPOINT_P(ep)
        if self.peer is not None and node != self.peer:
            return code
        if node != ctx.lb_node and ctx.service_ep(dcid, slot):
            return code         # (the LB node's own service bindings are this DSP's to repair)
        dvk = ctx.dvk
        try:
            info = dvk.getprocinfo(dcid, slot)
            if not info.p_rts_flags & C.SLOT_FREE:
                if not info.p_rts_flags & C.REMOTE or info.p_nodeid == ctx.lb_node:
                    return code
                if info.p_nodeid == node and info.p_endpoint == ep:
                    return 0
                if info.p_nodeid != node and (info.p_rts_flags & (C.SENDING | C.RECEIVING)
                                              or self._awaited(dcid, info.p_endpoint)):
                    log.warning("endpoint %d of DC %d is in use by node %d's process: a "
                                "request from node %d for that endpoint is refused "
                                "(EDVSAGAIN); client endpoints must differ across client "
                                "nodes", info.p_endpoint, dcid, info.p_nodeid, node)
                    return E.EDVSAGAIN
                dvk.unbind(dcid, info.p_endpoint)
            dvk.rmtbind(dcid, "rclient", ep, node)
            log.debug("bound endpoint %d of DC %d to node %d", ep, dcid, node)
            return 0
        except E.DvkError as err:
            log.debug("autobind of %d@%d in DC %d: %s", ep, node, dcid, err)
            return code

    def _awaited(self, dcid: int, ep: int) -> bool:
        """Whether a local process sends to the REMOTE endpoint `ep` or receives from it alone:
        a reply on its way (its descriptor shows nothing then: the reply cleared the request)
        waits for the ACK of ep's node, which a move would refuse, and a receive would get the
        newcomer's message.  Read on the rare move only (every slot of the DC)."""
        rng = self.ctx.limits.dc_range(dcid)
        if rng is None:
            return False
        for slot in range(-rng[0], rng[1]):
            try:
                info = self.ctx.dvk.getprocinfo(dcid, slot)
            except E.DvkError:
                continue
            flags = info.p_rts_flags
            if flags & (C.SLOT_FREE | C.REMOTE):
                continue
            if (flags & C.SENDING and info.p_sendto == ep) or \
                    (flags & C.RECEIVING and info.p_getfrom == ep):
                return True
        return False


def _recv_timeout(sock: socket.socket, timeout: float) -> None:
    """A blocking socket whose reads give up after `timeout` (SO_RCVTIMEO, BlockingIOError
    then): one recv per read, where a Python socket timeout polls before every recv."""
    sock.settimeout(None)
    sec = int(timeout)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                    struct.pack("@ll", sec, int((timeout - sec) * 1e6)))


class RProxy:
    """The receiver of the link to one peer."""

    def __init__(self, ctx, link: Link, gate) -> None:
        self.ctx = ctx
        self.link = link
        self.gate = gate
        self.name = f"RPROXY({link.peer})"

    def run(self) -> None:
        ctx = self.ctx
        if not self.gate.enter(ctx.dvk):
            return
        self.deliverer = Deliverer(ctx, self.link.peer)
        self.reader: FrameReader | None = None
        serial = 0
        while not ctx.stopping.is_set():
            self.link.close_retired(incoming=True)     # this thread uses no socket now
            sock, serial = self.link.wait_in(serial, 0.5)
            if sock is not None and self._wait_up(sock):
                self._serve(sock, self.link.generation)

    def _wait_up(self, sock: socket.socket) -> bool:
        """Both directions must be up before any frame is read; meanwhile notice a
        connection that dies."""
        link = self.link
        while not self.ctx.stopping.is_set():
            if link.wait_up(0.2):
                return link.in_sock is sock
            if link.in_sock is not sock:
                return False
            try:
                if sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
                    link.event(Event.IN_LOST, sock,
                               "the peer closed the connection before the link was up")
                    return False
            except BlockingIOError:
                pass
            except OSError as exc:
                link.event(Event.IN_LOST, sock, f"connection error: {exc}")
                return False
        return False

    def _serve(self, sock: socket.socket, gen: int) -> None:
        ctx, link = self.ctx, self.link
        reader = self.reader
        if reader is None or reader.sock is not sock:
            # one reader per connection: a connection kept while the link was down (a C
            # peer's) is served again from the byte where its last serving stopped
            reader = self.reader = FrameReader(sock)
        peer = link.peer
        check = functools.partial(check_header, peer=peer, limits=ctx.limits)
        received = link.received
        dispatch = self.dispatch
        monotonic = time.monotonic
        route = ctx.router.from_network
        route_run = ctx.router.from_network_run
        execute = ctx.execute
        deliverer = self.deliverer
        autobind = link.spec.autobind
        slow = C.FLAG_LZ4 | C.FLAG_BATCH
        relay = None
        read = reader.fill
        if ctx.fast is not None:
            relay = Relay(ctx.fast, reader, peer, ctx.execute.links, self._refused, link)
            read = relay.read
        elif Receiver.usable(ctx.wires, ctx.dvk):   # a node's frames delivered in C
            relay = Receiver(ctx.wires, reader, link, ctx.dvk, deliverer, ctx.lb_put)
            read = relay.read
        if relay is not None:        # (its reads set it again after a silence)
            delay_acks(sock)
        link.last_rx = monotonic()
        self._timeout = None
        try:
            while link.generation == gen and link.up:
                if not reader.has_frame():
                    # write what the frames of the last read produced; payloads travel as
                    # views of the read buffer, so a link that kept some copies the rest
                    kept = uncork()
                    if kept:
                        for k in kept:
                            k.settle()
                        ease(kept)
                    whole = self._fill(read, sock, deliverer)
                    link.last_rx = monotonic()
                    cork()
                    if link.generation != gen or not link.up:
                        break   # went down meanwhile: what came waits for the next serving
                    if relay is not None and not whole:
                        continue    # the compiled relay carried every whole frame
                elif relay is not None and not relay():
                    continue
                hview, payload = reader.next(check)
                f = reader.fields
                length = f[R_LEN]
                if f[R_CMD] == C.CMD_NONE or f[R_FLAGS] & slow:
                    if f[R_CMD] == C.CMD_NONE:
                        received.hello(HEADER_SIZE + length)
                    else:
                        received.count(f[R_CMD], HEADER_SIZE + length, 1 + f[R_BATCH_NR],
                                       f[R_DCID], length)
                    dispatch(hview, f, payload)
                    continue
                if not length and reader.end - reader.start >= HEADER_SIZE:
                    s0 = reader.start - HEADER_SIZE
                    more = reader.take_run(hview)
                    if more:
                        n = more + 1
                        received.count(f[R_CMD], HEADER_SIZE * n, n, f[R_DCID], 0, n)
                        execute(route_run(reader.view[s0:s0 + n * HEADER_SIZE], f, n, peer,
                                          autobind), deliverer)
                        continue
                received.count(f[R_CMD], HEADER_SIZE + length, 1, f[R_DCID], length)
                act = route(hview, f, payload, peer, autobind)
                if act is not None:
                    if type(act) is tuple and act[0] == DELIVER:
                        deliverer.deliver(Header(bytearray(hview)), payload, autobind)
                    else:
                        execute(act, deliverer)
        except FrameError as exc:
            log.warning("%s: bad frame, closing the link: %s", self.name, exc)
            link.down(f"bad frame: {exc}", gen)
        except TimeoutError:
            link.down(f"nothing received for {link.silence_limit():.1f} s", gen)
        except OSError as exc:
            link.down(str(exc) or type(exc).__name__, gen)
        finally:
            for k in uncork():       # the reader's buffer may be read into again
                k.settle()
            if relay is not None:    # what its last walks counted, before the link ends
                relay.fold_received()

    def _refused(self, hbuf: bytes, code: int) -> None:
        """A frame of the compiled relay that its link refused: the client's error reply."""
        ctx = self.ctx
        if ctx.router.group is not None:
            ctx.execute(ctx.router.group.fast_refused(hbuf, code), self.deliverer)

    def _fill(self, read: Callable[[], object], sock: socket.socket,
              deliverer: Deliverer) -> object:
        """Read more (blocking) with `read` (the reader's, or the compiled relay's, which
        also relays what came); meanwhile retry parked deliveries.  Returns what `read`
        returns; TimeoutError when the peer has been silent for the link's silence limit."""
        link = self.link
        while True:
            if deliverer.parked:
                deliverer.retry_parked()
            timeout = PARK_RETRY if deliverer.parked else link.silence_limit()
            if timeout != self._timeout:
                _recv_timeout(sock, timeout)
                self._timeout = timeout
            try:
                return read()
            except (TimeoutError, BlockingIOError):
                if time.monotonic() - link.last_rx >= link.silence_limit():
                    raise TimeoutError from None

    def _decompress(self, h: Header, payload: memoryview) -> memoryview:
        """An LZ4 frame payload, whatever this node's own `compress` setting (the flag says
        what the frame is): COPY data of `v_bytes` bytes, or the further headers of a batch
        (a C sender with `compress YES` and `batch YES` compresses those too), exactly
        `c_batch_nr` of them, as the C receiver checks.  At most MAXCOPYBUF + 1 bytes are
        inflated: the size the frame claims is the peer's word (one that claims 2**62 bytes
        made the one-shot decompress allocate them and fail with MemoryError), and a bomb
        stops at the bound."""
        if h.c_flags & C.FLAG_BATCH:
            expected, what = h.c_batch_nr * HEADER_SIZE, f"c_batch_nr {h.c_batch_nr}"
        elif h.c_cmd in C.COPY_DATA_CMDS:
            expected, what = h.v_bytes, f"v_bytes {h.v_bytes}"
        else:
            raise FrameError(f"LZ4 flag on {C.CMD_NAMES.get(h.c_cmd, h.c_cmd)}")
        inflater = lz4.frame.LZ4FrameDecompressor()
        try:
            raw = inflater.decompress(payload, max_length=C.MAXCOPYBUF + 1)
        except RuntimeError as exc:
            raise FrameError(f"LZ4 payload does not decompress: {exc}") from None
        if not inflater.eof or inflater.unused_data:
            raise FrameError(f"LZ4 payload is not one whole frame of at most {C.MAXCOPYBUF} "
                             "bytes")
        if len(raw) > C.MAXCOPYBUF or len(raw) != expected:
            raise FrameError(f"LZ4 payload of {len(raw)} bytes, {what}")
        self.link.received.lz4_frames += 1
        self.link.received.lz4_raw += len(raw)
        self.link.received.lz4_wire += len(payload)
        h.c_len = len(raw)
        h.c_flags &= ~C.FLAG_LZ4
        return memoryview(raw)

    def dispatch(self, hview, f: tuple, payload) -> None:
        """The frames the hot path leaves: HELLO/control, batches, LZ4 payloads."""
        ctx, link = self.ctx, self.link
        if f[R_CMD] == C.CMD_NONE:
            if f[R_FLAGS] & C.FLAG_BATCH:
                raise FrameError("HELLO at the head of a batch")
            if f[R_FLAGS] & C.FLAG_DSP_PEER:
                link.announced = True
                ctx.control(link.peer, Header(bytearray(hview)).c_msg)
            return
        if f[R_FLAGS] & C.FLAG_BATCH:
            first = bytearray(hview)
            h = Header(first)
            if f[R_FLAGS] & C.FLAG_LZ4:
                payload = self._decompress(h, payload)
            extra = memoryview(bytes(payload))
            h.c_flags &= ~C.FLAG_BATCH
            h.c_batch_nr, h.c_len = 0, 0
            # the sub-headers in runs of equal routing fields: each run checked once
            runs = [(first, ROUTE_STRUCT.unpack_from(first), 1)]
            off = 0
            for (key,), same in itertools.groupby(RUN_KEY.iter_unpack(extra)):
                fields = ROUTE_STRUCT.unpack(key)
                check_header(fields, link.peer, ctx.limits, batched=True)
                if fields[R_CMD] == C.CMD_NONE:
                    raise FrameError("HELLO inside a batch")
                n = sum(1 for _ in same)
                runs.append((extra[off:off + n * HEADER_SIZE], fields, n))
                off += n * HEADER_SIZE
            router, peer, autobind = ctx.router, link.peer, link.spec.autobind
            for block, fields, n in runs:
                if fields[R_CMD] in C.DATA_CMDS:
                    self._data_lost(block, n)
                elif n == 1:
                    self._route_one(block, fields, memoryview(b""))
                else:
                    ctx.execute(router.from_network_run(block, fields, n, peer, autobind),
                                self.deliverer)
            return
        h = Header(bytearray(hview))
        payload = self._decompress(h, payload)
        self._route_one(h.buf, h.route(), payload)

    def _data_lost(self, block, n: int) -> None:
        """Copy commands in a batch, whose data did not come with them: the C sender batches
        every command but the COPY data ones, COPYIN_RQST included, and sends a batch as
        headers only.  Each is answered with an error (its requester does not wait for good,
        and no copy is made of data that is not there); the rest of the batch is delivered."""
        for i in range(n):
            h = Header(bytearray(block[i * HEADER_SIZE:(i + 1) * HEADER_SIZE]))
            log.warning("%s: %s in a batch came without its data: answered %s", self.name,
                        cmd_name(h.c_cmd), E.error_name(E.EDVSINVAL))
            h.c_flags, h.c_batch_nr, h.c_len = 0, 0, 0
            self.deliverer.refuse(h, E.EDVSINVAL)

    def _route_one(self, hbuf, f: tuple, payload) -> None:
        ctx = self.ctx
        autobind = self.link.spec.autobind
        act = ctx.router.from_network(hbuf, f, payload, self.link.peer, autobind)
        if act is not None:
            ctx.execute(act, self.deliverer)


class _FrameQueue(queue.Queue):
    """A queue of (header, payload) that is full at `maxsize` frames or once its frames hold
    `maxbytes` bytes, headers included (the queue's own waits and wake-ups, one bound more)."""

    def __init__(self, maxsize: int, maxbytes: int) -> None:
        super().__init__(maxsize)
        self.maxbytes = maxbytes
        self.nbytes = 0

    def _qsize(self) -> int:
        n = len(self.queue)
        return self.maxsize if n and self.nbytes >= self.maxbytes else n

    def _put(self, item: tuple) -> None:
        self.queue.append(item)
        self.nbytes += HEADER_SIZE + len(item[1])

    def _get(self) -> tuple:
        item = self.queue.popleft()
        self.nbytes -= HEADER_SIZE + len(item[1])
        return item


class Put2lclThread:
    """The LB pair's receiver: delivers what the router queued for local processes (session
    traffic rewritten to come from the LB node, error replies for local clients).  The queue is
    bounded in frames and in bytes: a full queue holds the thread that queues back (the put2lcl
    thread drains it at the kernel's pace, so the link behind that thread slows down instead of
    losing frames); a frame that finds no room within PUT2LCL_WAIT is counted and dropped,
    logged once per episode, and until a frame fits again the others are dropped at once (a
    stuck queue costs the threads that feed it one wait, not one per frame).

    With the compiled deliverer, a receiver puts a server's session traffic itself while this
    thread holds no frame of the LB node's traffic (`backlog`: every frame it holds is counted
    in the table, queued, being put or parked), and hands it here only when that put2lcl did
    not plainly succeed (`put_done`): every parking and repair of the LB node's traffic stays
    in this thread's one deliverer, in order."""

    def __init__(self, ctx, gate) -> None:
        self.ctx = ctx
        self.gate = gate
        self.queue: queue.Queue = _FrameQueue(PUT2LCL_QUEUE_MAX, PUT2LCL_QUEUE_BYTES)
        self.refused = 0
        self._full = False
        #: the backlog the compiled deliverers read before they put the LB node's traffic
        #: (None: no deliverer does, `ProxyContext.lb_put`)
        self.backlog = ctx.wires.lb_backlog if ctx is not None and ctx.lb_put is not None \
            else None

    def put(self, h: Header, data=b"") -> bool:
        """Queue a frame for a local process; False when it was dropped."""
        return self._queue((h, data, None))

    def put_done(self, h: Header, data, code: int) -> None:
        """A frame whose put2lcl a receiver made and that returned `code`: this thread
        parks, repairs or answers it as if it had made the call itself."""
        self._queue((h, data, code))

    def _queue(self, item: tuple) -> bool:
        backlog = self.backlog
        if backlog is not None:
            backlog(1)
        try:
            if self._full:
                self.queue.put_nowait(item)
            else:
                self.queue.put(item, timeout=PUT2LCL_WAIT)
        except queue.Full:
            if backlog is not None:
                backlog(-1)
            self.refused += 1
            if not self._full:
                self._full = True
                log.warning("put2lcl queue full (%d frames, %d bytes) for %.1f s: frames for "
                            "local processes are dropped until it drains", len(self.queue.queue),
                            self.queue.nbytes, PUT2LCL_WAIT)
            return False
        self._full = False
        return True

    def run(self) -> None:
        ctx = self.ctx
        if not self.gate.enter(ctx.dvk):
            return
        deliverer = Deliverer(ctx, None)
        get = self.queue.get
        backlog = self.backlog
        held = 0       # parked frames counted in the backlog
        while not ctx.stopping.is_set():
            taken = 0
            try:
                h, data, code = get(timeout=PARK_RETRY if deliverer.parked else 0.5)
            except queue.Empty:
                pass
            else:
                taken = 1
                if code is None:
                    deliverer.deliver(h, data, autobind=True)
                else:
                    deliverer.put_done(h, data, code, True)
            if deliverer.parked:
                deliverer.retry_parked()
            if backlog is not None and (taken or held != deliverer.nparked):
                backlog(deliverer.nparked - held - taken)
                held = deliverer.nparked
