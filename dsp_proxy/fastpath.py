"""The compiled relay of established relayed sessions on the LB host (docs/design.md,
"The compiled relay"; its figures in docs/performance.md).

The router stays the one place of the session rules.  It hands a relayed session to the
`FlowTable` once the session is established (its first request answered, no program being
started, neither of its links with `batch` or `compress`), and takes it back, with the state
the relay kept (pending request, last use, counters), before its own path reads or changes the
session.  Meanwhile each receiver's `Relay` reads its link and walks its read buffer in C:
every frame of a handed-over session is checked, rewritten in place and written to its output
link's socket by the relay itself while that link has nothing of its own waiting (`Wire`: the
link's send lock is the relay's too), else handed to the link as a view of the buffer; the
first frame the relay is not sure of stops the walk and takes the Python path.  Without the
compiled module (not built, built from another fastrelay.c, or `DSP_FASTPATH=0`) every frame
takes the Python path, which is complete on its own.

On the other nodes, with the emulated DVK, the same module carries a node DSP's own frames
(docs/design.md, "The compiled sender and deliverer"): `Sender` makes SPROXY's get2rmt calls
and writes what they fetch, `Receiver` reads RPROXY's link and makes the put2lcl calls of the
frames for the node, each on its thread's connection to the node kernel (`_Channel`), and
hands everything else to the Python path.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterable
from typing import NoReturn

from dvk_cffi import consts as C
from dvk_cffi import errors as E
from dvk_cffi.emu import protocol as P
from dvk_cffi.wire import HEADER_SIZE, Header, frame_length

from . import fastrelay_build
from .link import cork
from .misc import Counters

#: "0" turns the compiled relay off (the Python path then carries every frame).
ENV = "DSP_FASTPATH"
#: "1" loads the relay built with AddressSanitizer and UBSan (`fastrelay_build --sanitize`,
#: which needs the ASan runtime preloaded: `make fuzz-relay-asan`) instead of the normal one.
SANITIZED = "DSP_FASTRELAY_SANITIZED"


def stale(module_ffi: object, module_lib: object) -> str | None:
    """Why a built module may not be used (None: it may): it must have been compiled from
    the fastrelay.c and declarations beside it, or its functions may be missing or differ."""
    try:
        expected = fastrelay_build.source_id()
    except (OSError, ValueError) as exc:     # missing, unreadable, not UTF-8
        return f"its source cannot be read to check the build ({exc})"
    built_from = getattr(module_lib, "rt_source_id", None)
    if built_from is None or module_ffi.string(built_from()).decode() != expected:
        return (f"the module in {fastrelay_build.HERE} was built from another version of "
                "fastrelay.c; run `make venv` (or `python -m dsp_proxy.fastrelay_build` "
                "there) to rebuild it")
    return None


#: Why the compiled relay is not used although it is installed (None: it is used, or it is
#: not built); the LB host logs it.
UNUSABLE: str | None = None

if os.environ.get(SANITIZED) == "1":    # asked for: missing or stale is an error
    from ._fastrelay_san import ffi, lib
    UNUSABLE = stale(ffi, lib)
    if UNUSABLE is not None:
        raise ImportError(f"dsp_proxy.{fastrelay_build.SANITIZED_MODULE}: {UNUSABLE}")
else:
    try:
        from ._fastrelay import ffi, lib
    except ImportError:       # not built: the Python path only
        ffi = lib = None
    if lib is not None:
        UNUSABLE = stale(ffi, lib)
        if UNUSABLE is not None:
            ffi = lib = None

#: Segments (runs of frames for one node) one walk may produce.
MAX_SEGS = 256
#: How long the relay may read and write in C before the receiver's loop runs again (its
#: silence and state checks, parked deliveries, the link's last receive time).
PUMP_BUDGET = 0.02

#: The directions of the relay's link counters (fastrelay.c `tally`).
RECEIVED, SENT = 0, 1

#: What the compiled sender's loop returns (fastrelay.c `rt_send_pump`): `until` came, a reply
#: is for the Python path, a command was written in part.
RS_DUE, RS_REPLY, RS_HELD = 0, 1, 2
#: Room for a get2rmt reply's body in the compiled sender (a successful one is 147 bytes).
REPLY_ROOM = 4096

# Command classes of fastrelay.c.
K_VALID, K_DATA, K_REQUEST, K_MSG, K_MSG_ACK, K_VCOPY, K_MESSAGE = (1 << i for i in range(7))


def enabled() -> bool:
    """The compiled relay is built and not turned off."""
    return lib is not None and os.environ.get(ENV, "1") != "0"


def _cmd_class(cmd: int) -> int:
    """The classes of a command, from the sets the Python path uses."""
    return (K_VALID
            | (K_DATA if cmd in C.DATA_CMDS else 0)
            | (K_REQUEST if cmd in C.REQUEST_CMDS else 0)
            | (K_MSG if cmd in C.MSG_CMDS else 0)
            | (K_MSG_ACK if cmd in C.MSG_ACK_CMDS else 0)
            | (K_VCOPY if cmd in C.VCOPY_CMDS else 0)
            | (K_MESSAGE if cmd in C.MESSAGE_CMDS else 0))


def _slot(cmd: int) -> int:
    """The index of a command in the relay's per-command counters."""
    return (cmd & 0x1F) | (32 if cmd & C.MASK_ACKNOWLEDGE else 0)


def _pin(buf) -> tuple[object, object]:
    """A pointer to the memory of `buf` for the compiled code to keep, and the cdata that
    keeps that memory valid (hold both).  Of a memoryview (the DVK's payload buffers), the
    buffer is taken from the object that owns the memory, not from the view: cffi's hold on
    a memoryview crashes the interpreter (SIGSEGV) when the collector clears a cycle that
    holds both."""
    owner = buf.obj if isinstance(buf, memoryview) else buf
    whole = ffi.from_buffer(owner)
    if owner is buf:
        return whole, whole
    part = ffi.from_buffer(buf)
    try:
        off = int(ffi.cast("uintptr_t", part)) - int(ffi.cast("uintptr_t", whole))
        size = len(part)
    finally:
        ffi.release(part)
    if not 0 <= off <= len(whole) - size:
        raise ValueError("a buffer outside the memory of its owner")
    return ffi.cast("unsigned char *", whole) + off, whole


def _bits(mask: int) -> list[int]:
    """The positions of the set bits of `mask`, lowest first."""
    out = []
    while mask:
        low = mask & -mask
        out.append(low.bit_length() - 1)
        mask ^= low
    return out


class FlowTable:
    """The relay's sessions and flows, and its share of the link counters."""

    def __init__(self, local: int, lb_id: int, nr_nodes: int, nr_dcs: int,
                 session_ending_codes: Iterable[int]) -> None:
        table = lib.rt_new(local, lb_id, nr_nodes, nr_dcs, C.NR_TASKS, C._ENDPOINT_GEN_SIZE,
                           C.BIT_ACKNOWLEDGE, C.MAXCOPYBUF, C.FLAG_BATCH, C.FLAG_LZ4,
                           C.FLAG_CHECK_HDR, C.CMD_SEND_MSG, C.CMD_SNDREC_MSG, C.CMD_REPLY_MSG)
        if table == ffi.NULL:
            raise ValueError(f"no compiled relay for {nr_nodes} nodes and {nr_dcs} DCs")
        self.table = table     # lives as long as the process: receivers may be in it
        self.nr_dcs = nr_dcs
        self._slots = {_slot(cmd): cmd for cmd in C.VALID_CMDS}
        for cmd in C.VALID_CMDS:
            if lib.rt_set_cmd(table, cmd, _cmd_class(cmd)):
                raise ValueError(f"command {cmd:#x} has no slot in the compiled relay")
        for code in sorted(set(session_ending_codes)):
            if lib.rt_set_code(table, code):
                raise ValueError("too many session-ending codes for the compiled relay")
        lib.rt_set_raw_ok(table, local, True)   # a local client's session ends here
        self._take = ffi.new("int64_t[4]")

    def free(self) -> None:
        """Release a table no receiver uses (tests and fuzzers; a daemon's lives with it)."""
        if self.table is not None:
            lib.rt_free(self.table)
            self.table = None

    # ------------------------------------------------------------------ what the DSP sets
    def set_dc(self, dcid: int, rng: tuple[int, int] | None) -> None:
        """The endpoint range of a DC, as the Python check knows it (None: unknown)."""
        if rng is None:
            lib.rt_set_dc(self.table, dcid, 0, 0, 0)
        else:
            lib.rt_set_dc(self.table, dcid, 1, rng[0], rng[1])

    def forget_dcs(self) -> None:
        """Every DC unknown again: their frames take the Python path until it learned them."""
        for dcid in range(self.nr_dcs):
            lib.rt_set_dc(self.table, dcid, 0, 0, 0)

    def set_reverse(self, node: int, on: bool) -> None:
        """Whether frames from `node` may be a server's traffic in a session the router
        rewrites (`Group.reverse`): the compiled deliverer leaves them to the Python path."""
        lib.rt_set_reverse(self.table, node, on)

    def lb_backlog(self, delta: int) -> int:
        """The put2lcl thread holds `delta` frames more (queued, being put or parked): while
        it holds any, the deliverers leave the LB node's traffic to it.  Returns how many it
        holds now."""
        return lib.rt_lb_backlog(self.table, delta)

    def set_raw_ok(self, node: int, ok: bool) -> None:
        """Whether the link to `node` takes frames as they are (no batching, no LZ4)."""
        lib.rt_set_raw_ok(self.table, node, ok)

    # ------------------------------------------------------------------ what the router does
    def give(self, sess) -> int:
        """Hand an established session over (router lock held): a relayed one, or a local
        client's (whose client node is this one and lbsvr_ep its own endpoint, so that the
        rewrite leaves its source as it is).  Its id, or -1 when the table is full or a link
        of the session does not take raw frames."""
        t = self.table
        sid = lib.rt_give(t, sess.clt_node, sess.svr_node, sess.dcid, sess.clt_ep,
                          sess.lbsvr_ep, sess.clt_pid, sess.svr_pid, sess.pending)
        if sid < 0:
            return -1
        for client_side, server_side in sess.to_server.items():
            if lib.rt_map(t, sid, client_side, server_side):
                self.take(sid, True)
                return -1
        return sid

    def take(self, sid: int, drop: bool) -> tuple[int, int, int, int]:
        """The session's (pending, uses, commands, bytes) since the last take; `drop`: the
        session and its flows leave the table."""
        out = self._take
        if lib.rt_take(self.table, sid, drop, out):
            raise KeyError(f"no session {sid} in the compiled relay")
        return out[0], out[1], out[2], out[3]

    # ------------------------------------------------------------------ counters
    def fold(self, node: int, direction: int, counters: Counters, tally: object) -> None:
        """Add what the relay counted for the link to `node` in `direction` (RECEIVED or
        SENT) to `counters`.  `Counters` has no lock: only the thread that may change the
        figures the fold adds to may fold (`Link.fold_relay` and `Relay.fold_received` say
        which); `tally`: the caller's own "relay_tally *", reused."""
        if not lib.rt_fold(self.table, node, direction, tally):
            return
        by_cmd = {}
        for slot in _bits(tally.cmd_mask):
            if tally.by_cmd[slot]:
                by_cmd[self._slots[slot]] = tally.by_cmd[slot]
        by_dc = {}
        for dcid in _bits(tally.dc_mask):
            fig = (tally.dc_cmds[dcid], tally.dc_msgs[dcid], tally.dc_data[dcid])
            if any(fig):
                by_dc[dcid] = fig
        counters.add(tally.frames, tally.bytes, by_cmd, by_dc)

    def untally(self, node: int, span) -> None:
        """Frames the relay counted as sent to `node` that its link refused."""
        lib.rt_untally(self.table, node, ffi.from_buffer(span), len(span))

    def wire(self, node: int) -> Wire:
        """The send lock and socket of the link to `node`, shared with the relay."""
        return Wire(self, node)


class Wire:
    """The relay's side of one link's socket.  The link uses it as its send lock (a mutex
    of the relay's table, same use as a `threading.Lock`), publishes the socket the relay may
    write while the link is up, and says when frames of its own wait (queued or unsent): the
    relay then hands its frames to the link, behind them, instead of writing them itself."""

    def __init__(self, flows: FlowTable, node: int) -> None:
        self.flows = flows
        self.table = flows.table
        self.node = node
        self._tally = ffi.new("relay_tally *")

    def acquire(self, blocking: bool = True) -> bool:
        if blocking:
            lib.rt_wire_lock(self.table, self.node)
            return True
        return bool(lib.rt_wire_trylock(self.table, self.node))

    def release(self) -> None:
        lib.rt_wire_unlock(self.table, self.node)

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def publish(self, sock) -> None:
        """The socket the relay may write (None: none).  A socket withdrawn here is closed
        only under the send lock, so the relay never writes a descriptor after its close."""
        lib.rt_wire_fd(self.table, self.node, -1 if sock is None else sock.fileno())

    def enqueued(self) -> None:
        """The link queued a frame (any thread, no lock)."""
        lib.rt_wire_enqueued(self.table, self.node)

    def seq(self) -> int:
        """How many frames the link queued so far: read before looking at the queue."""
        return lib.rt_wire_seq(self.table, self.node)

    def settled(self, seq: int, empty: bool) -> None:
        """(send lock held) After a write: nothing of the link waits (`empty`), and nothing
        was queued since `seq`: the relay may write again."""
        lib.rt_wire_settled(self.table, self.node, seq, empty)

    def last_tx(self) -> float:
        """When the relay last wrote frames to this link's socket itself (time.monotonic's
        clock; 0.0: never)."""
        return lib.rt_wire_last_tx(self.table, self.node)

    def fold_sent(self, sent: Counters) -> None:
        """(send lock held: the counts of the figures this adds to run under it) Add what
        the relay counted as sent to this link."""
        self.flows.fold(self.node, SENT, sent, self._tally)


class Relay:
    """One receiver's use of the compiled relay on its read buffer."""

    def __init__(self, table: FlowTable, reader, peer: int, links: dict,
                 refused: Callable[[bytes, int], None], link=None) -> None:
        self.table = table.table
        self.flows = table
        self.reader = reader
        #: the link read: its last receive time is kept, and what the relay counted as
        #: received from it joins its counters on this (its receiver's) thread
        self.link = link
        self.cbuf = ffi.from_buffer(reader.buf)    # the buffer is never resized
        self.peer = peer
        self.links = links
        self.refused = refused
        self.segs = ffi.new("relay_seg[]", MAX_SEGS)
        self.nsegs = ffi.new("int *")
        self.python = ffi.new("int *")
        self.pos = ffi.new("int[2]")
        self.held = ffi.new("int *", -1)
        self.held_fd = ffi.new("int *", -1)
        self.sent = ffi.new("int *")
        self.flush = ffi.new("int *", -1)
        self.last_rx = ffi.new("double *")
        self.tally = ffi.new("relay_tally *")

    def read(self, budget: float = PUMP_BUDGET) -> bool:
        """`FrameReader.fill` done in C with the relay of what comes: reads, relays and
        writes until a frame needs the Python path, frames are left for the links, or
        `budget` seconds passed (0: one read).  True when a whole frame for the Python path is
        next.  Raises as `recv_into` would (BlockingIOError when the socket's timeout
        passed)."""
        reader, pos, last_rx, link = self.reader, self.pos, self.last_rx, self.link
        pos[0], pos[1] = reader.start, reader.end
        last_rx[0] = link.last_rx if link is not None else 0.0
        got = lib.rt_pump(self.table, self.peer, reader.sock.fileno(), self.cbuf,
                          len(reader.buf), pos, pos + 1, self.segs, MAX_SEGS, self.nsegs,
                          self.python, self.held, self.held_fd, self.sent, self.flush, last_rx,
                          budget)
        reader.start, reader.end = pos[0], pos[1]
        if link is not None:
            link.last_rx = last_rx[0]
        try:
            if got <= 0:
                if got == 0:
                    raise ConnectionResetError("the peer closed the connection" + (
                        " inside a frame" if reader.end > reader.start else ""))
                raise OSError(-got, os.strerror(-got))
            if self.nsegs[0] or self.held[0] >= 0:
                cork()  # what a socket does not take stays a view of the buffer until uncork
                self._write()   # first: it releases a send lock the relay kept
        finally:
            self.fold_received()
        node = self.flush[0]
        if node >= 0:   # a writer left its frames to the relay, which held the send lock
            out = self.links.get(node)
            if out is not None:
                out.flush()
        return bool(self.python[0])

    def fold_received(self) -> None:
        """(the link's receiver thread: the only one that counts what the link receives)
        Add what the relay counted as received since the last fold, by its reads and its
        walks, to the link's counters."""
        if self.link is not None:
            self.flows.fold(self.peer, RECEIVED, self.link.received, self.tally)

    def __call__(self) -> bool:
        """Relay the frames at the head of the buffer that belong to handed-over sessions,
        written to their links as views of the buffer (what a socket does not take at once
        is queued; the receiver's cork keeps it valid).  True when a whole frame for the
        Python path is next in the buffer."""
        reader = self.reader
        start = reader.start
        new = lib.rt_relay(self.table, self.peer, self.cbuf, start, reader.end, self.segs,
                           MAX_SEGS, self.nsegs, self.python)
        if new != start:
            reader.start = new
            self._write()
        return bool(self.python[0])

    def _write(self) -> None:
        view, links, segs = self.reader.view, self.links, self.segs
        first = 0
        node = self.held[0]
        if node >= 0:      # the relay wrote part of segs[0] and holds that link's send lock
            self.held[0] = -1
            seg = segs[0]
            try:
                link = links.get(node)
                if link is not None:
                    link.keep_unsent(view[seg.off + self.sent[0]:seg.off + seg.len],
                                     self.held_fd[0])
            finally:
                lib.rt_wire_unlock(self.table, node)
            first = 1
        for i in range(first, self.nsegs[0]):
            seg = segs[i]
            span = view[seg.off:seg.off + seg.len]
            link = links.get(seg.node)
            code = E.EDVSNOTCONN if link is None else link.submit_span(span, seg.nframes)
            if code:
                self._refused(seg.node, span, code)

    def _refused(self, node: int, span, code: int) -> None:
        """The link refused a segment: take its count back and answer its requests."""
        self.flows.untally(node, span)
        off = 0
        while off < len(span):
            header = bytes(span[off:off + HEADER_SIZE])
            self.refused(header, code)
            off += HEADER_SIZE + frame_length(header)


class _Channel:
    """A thread's connection to its node kernel as the compiled sender and deliverer use it
    (fastrelay.c `rt_channel`): the request they send, the room for the reply, and what a
    plain successful reply looks like (from the protocol module)."""

    def __init__(self, ch, request: bytes, ok_len: int, fixed: list[tuple[int, int]]) -> None:
        self.ch = ch
        self.request = bytearray(request)
        self.reply = bytearray(4 + REPLY_ROOM)
        self._keep = (ffi.from_buffer(self.request), ffi.from_buffer(self.reply))
        ch.req, ch.req_len = self._keep[0], len(request)
        ch.reply, ch.reply_cap = self._keep[1], REPLY_ROOM
        ch.ok_len, ch.nfixed = ok_len, len(fixed)
        for i, (off, val) in enumerate(fixed):
            ch.fixed_off[i], ch.fixed_val[i] = off, val

    def attach(self, dvk) -> None:
        """Use the calling thread's connection (opened again after a failure)."""
        self.ch.kfd, limit = dvk.thread_channel()
        self.ch.answer_ms = -1 if limit is None else max(1, int(limit * 1000))

    def body(self) -> bytes:
        """The last reply's body."""
        return bytes(self.reply[4:4 + self.ch.reply_len])

    @staticmethod
    def failed(dvk, err: int) -> NoReturn:
        """The connection failed with errno `err`: dropped, DvkError as for any call."""
        dvk.channel_failed(TimeoutError() if err == errno.ETIMEDOUT
                           else OSError(err, os.strerror(err)))


class _Get2rmtLoop:
    """What the compiled sender loops share (fastrelay.c `rt_sender`): the thread's get2rmt
    request on its kernel connection, the DVK's payload buffer the kernel fills, and what to
    do with the loop's answer."""

    def __init__(self, table: FlowTable, dvk, payload, timeout: int, node: int) -> None:
        self.table = table.table
        self.dvk = dvk
        self.payload = payload
        s = self.s = ffi.new("rt_sender *")
        ok_len, hdr_off, fixed = P.get2rmt_reply_layout()
        self.channel = _Channel(s.ch, dvk.get2rmt_request(payload, timeout), ok_len, fixed)
        pointer, self._payload = _pin(payload.view)
        s.node = node
        s.payload, s.payload_cap = pointer, len(payload.view)
        s.hdr_off = hdr_off

    def _after(self, code: int, hdr, link) -> int | None:
        """The loop's answer `code`: a reply for the Python path decoded into `hdr` (its
        `get2rmt` result, or raised as `get2rmt` raises); None after a command written in
        part (its rest goes first on `link`, then the send lock the loop kept is released)
        or when `until` came."""
        s = self.s
        if code == RS_REPLY:
            return self.dvk.get2rmt_reply(hdr, self.channel.body())
        if code == RS_HELD:
            try:
                if link is not None:
                    start = 4 + s.hdr_off
                    head = bytes(self.channel.reply[start:start + HEADER_SIZE])
                    frame = head + bytes(self.payload.view[:frame_length(head)])
                    link.keep_unsent(frame[s.sent:], s.held_fd)
            finally:
                lib.rt_wire_unlock(self.table, s.node)
        elif code < 0:
            self.channel.failed(self.dvk, -code)
        return None


class Sender(_Get2rmtLoop):
    """One SPROXY thread's use of the compiled sender (fastrelay.c `rt_send_pump`): on the
    emulated DVK, a node DSP's get2rmt calls and the writes of what they fetch, in C while
    the link is quiet.  What the loop does not handle itself comes back as the result of a
    `get2rmt`, for the Python path to queue on the link."""

    def __init__(self, table: FlowTable, link, dvk, payload, timeout: int) -> None:
        super().__init__(table, dvk, payload, timeout, link.peer)
        self.link = link

    @staticmethod
    def backend_ok(dvk) -> bool:
        """A DVK whose get2rmt and put2lcl calls a caller can make itself (the emulator's
        client)."""
        return hasattr(dvk, "thread_channel")

    @staticmethod
    def usable(table: FlowTable | None, link, dvk) -> bool:
        """Whether the link's sender may use it: the table, a link that writes frames as they
        are (no batches, no LZ4) and such a DVK."""
        return (table is not None and link.wire is not None
                and not (link.batch or link.compress) and Sender.backend_ok(dvk))

    def start(self) -> None:
        """(the link up, its `cond` held) The socket this serving writes to: the one the link
        published when it came up."""
        self.s.pubs = lib.rt_wire_pubs(self.table, self.link.peer)

    def get2rmt(self, hdr, until: float) -> int | None:
        """get2rmt calls, each fetched command written by the loop, until one is for the
        Python path: its hint (`get2rmt`'s result, the command in `hdr` and the payload),
        raised as `get2rmt` raises; None when `until` (time.monotonic) came or a command was
        written in part (the link writes the rest)."""
        self.channel.attach(self.dvk)
        return self._after(lib.rt_send_pump(self.table, self.s, until), hdr, self.link)


class LbPump(_Get2rmtLoop):
    """The LB pair's get2rmt thread's use of the compiled code (fastrelay.c
    `rt_lb_send_pump`): on the emulated DVK, the get2rmt calls on the LB pair, and each
    command of a local client's session handed over (`Group.fast_local`) rewritten for its
    server and written to that server's link while the link is quiet.  Everything else comes
    back as the result of a `get2rmt`, as the client sent it, for the router."""

    def __init__(self, table: FlowTable, links: dict, dvk, payload, timeout: int) -> None:
        super().__init__(table, dvk, payload, timeout, -1)
        self.links = links

    def get2rmt(self, hdr) -> bool:
        """get2rmt calls until one is for the router: then True, with the command in `hdr`
        and the payload (raised as `get2rmt` raises); False after a command written in part
        (its link writes the rest)."""
        self.channel.attach(self.dvk)
        code = lib.rt_lb_send_pump(self.table, self.s, 0.0)
        self._after(code, hdr, self.links.get(self.s.node) if code == RS_HELD else None)
        return code == RS_REPLY


#: Why the compiled deliverer stopped (fastrelay.c `rt_deliver`): the frames ran out (or the
#: budget), a frame is for the Python path, a put2lcl reply is, the kernel connection failed
#: during a put2lcl (that frame's answer is the failure's, as for `put2lcl`).
RD_BUDGET, RD_PYTHON, RD_REPLY, RD_KERNEL = 0, 1, 2, 3


class Receiver:
    """One RPROXY's use of the compiled deliverer (fastrelay.c `rt_deliver_pump`): on a node
    DSP other than the LB host, with the emulated DVK, the reads of the link and the put2lcl
    calls of the frames for this node that pass the receiver's checks and that the router
    would not rewrite (`FlowTable.set_reverse`), in C.  The same contract as `Relay` for the
    receiver's loop; every frame it is not sure of, and every put2lcl reply other than a
    plain success, goes to the Python path (`Deliverer.put_done` with the code), as does a
    frame whose put2lcl the kernel connection failed (with the code the Python path's call
    fails with; never put again)."""

    def __init__(self, table: FlowTable, reader, link, dvk, deliverer, lb_put=None) -> None:
        self.table = table.table
        self.flows = table
        self.reader = reader
        self.link = link
        self.peer = link.peer
        self.dvk = dvk
        self.deliverer = deliverer
        self.autobind = link.spec.autobind
        payload = deliverer.payload
        request, hdr_off, ok_len, value_off, fixed = P.put2lcl_layout(payload.addr)
        r = self.r = ffi.new("rt_receiver *")
        self.channel = _Channel(r.ch, request, ok_len, fixed)
        pointer, self._payload = _pin(payload.view)
        r.peer, r.req_hdr_off, r.value_off = self.peer, hdr_off, value_off
        r.payload, r.payload_cap = pointer, len(payload.view)
        r.python_flags = C.FLAG_BATCH | C.FLAG_LZ4
        #: where the LB node's traffic goes after a put2lcl that did not plainly succeed:
        #: the put2lcl thread's `put_done` (None: the loop leaves that traffic to the router)
        self.lb_put = lb_put
        r.lb = lb_put is not None
        self.cbuf = ffi.from_buffer(reader.buf)    # the buffer is never resized
        self.pos = ffi.new("int[2]")
        self.got = ffi.new("int *")
        self.last_rx = ffi.new("double *")
        self.tally = ffi.new("relay_tally *")

    @staticmethod
    def usable(table: FlowTable | None, dvk) -> bool:
        """Whether a node's receivers may use it: the table, and a DVK whose calls a caller
        can make itself."""
        return table is not None and Sender.backend_ok(dvk)

    def _attach(self) -> None:
        """The thread's kernel connection for the loop, and whether the loop delivers at
        all: not while deliveries are parked (the Python path keeps their order), nor when
        no connection can be had (the kernel wedged or gone: the Python path makes the call
        and answers its failure as for any frame; reading never fails for the kernel's
        sake, where a DvkError here ended the RPROXY thread)."""
        r = self.r
        r.deliver = 0
        if self.deliverer.parked:
            return
        try:
            self.channel.attach(self.dvk)
        except (E.DvkError, OSError):
            return
        r.deliver = 1

    def read(self, budget: float = PUMP_BUDGET) -> bool:
        """`FrameReader.fill` done in C with the delivery of what comes, until a frame is for
        the Python path or `budget` seconds passed.  True when a whole frame for the Python
        path is next.  Raises as `recv_into` would."""
        reader, pos, last_rx, link = self.reader, self.pos, self.last_rx, self.link
        self._attach()
        if not self.r.deliver:    # one read: parked deliveries are retried between reads
            budget = 0.0
        pos[0], pos[1] = reader.start, reader.end
        last_rx[0] = link.last_rx
        try:
            why = lib.rt_deliver_pump(self.table, self.r, reader.sock.fileno(), self.cbuf,
                                      len(reader.buf), pos, pos + 1, last_rx, budget, self.got)
        finally:
            reader.start, reader.end = pos[0], pos[1]
            link.last_rx = last_rx[0]
            self.fold_received()
        got = self.got[0]
        if got <= 0:
            if got == 0:
                raise ConnectionResetError("the peer closed the connection" + (
                    " inside a frame" if reader.end > reader.start else ""))
            raise OSError(-got, os.strerror(-got))
        return self._after(why)

    def __call__(self) -> bool:
        """Deliver the whole frames at the head of the buffer; True when a whole frame for
        the Python path is next."""
        return self._after(self._walk())

    def _walk(self) -> int:
        reader, pos = self.reader, self.pos
        self._attach()
        pos[0] = reader.start
        try:
            return lib.rt_deliver(self.table, self.r, self.cbuf, pos, reader.end)
        finally:
            reader.start = pos[0]
            self.fold_received()

    def _after(self, why: int) -> bool:
        """The Python path's part of what stopped the loop, and the walk on after it; True
        when a whole frame for the Python path is next."""
        while why == RD_REPLY or why == RD_KERNEL:
            try:
                if why == RD_REPLY:
                    self._reply()
                else:
                    self._kernel_failed()
            finally:
                if self.r.done_lb:  # the loop counted the frame in the backlog until now:
                    self.r.done_lb = 0      # the put2lcl thread counts it (or dropped it)
                    self.flows.lb_backlog(-1)
            if not self.reader.has_frame():
                return False
            why = self._walk()
        return why == RD_PYTHON

    def _reply(self) -> None:
        """A put2lcl reply other than a plain success, for the frame the loop delivered."""
        try:
            code = self.dvk.put2lcl_reply(self.channel.body())
        except E.DvkError as err:
            code = err.code
        self._done(code)

    def _kernel_failed(self) -> None:
        """The kernel connection failed during the put2lcl of a frame (no answer within the
        limit, closed, a reply longer than the room for it): the connection is dropped, and
        the frame, which the kernel may have delivered, is answered as the Python path
        answers a put2lcl that failed so, and never put again."""
        try:
            self.channel.failed(self.dvk, self.r.kerr)
        except E.DvkError as err:
            self._done(err.code)

    def _done(self, code: int) -> None:
        """`Deliverer.put_done` for the frame the loop put (at done_off): parking, repairs
        and error replies as on the Python path; for the LB node's traffic, those of the
        put2lcl thread, which delivers that traffic on the Python path (the loop counted
        such a frame in the backlog when its put2lcl came back, so that no other receiver
        puts the LB node's traffic past it meanwhile; `_after` releases that count once
        `lb_put` returned)."""
        off, view = self.r.done_off, self.reader.view
        h = Header(bytearray(view[off:off + HEADER_SIZE]))
        payload = view[off + HEADER_SIZE:off + HEADER_SIZE + h.c_len]
        if self.r.done_lb:
            self.lb_put(h, bytes(payload), code)
        else:
            self.deliverer.put_done(h, payload, code, self.autobind)

    def fold_received(self) -> None:
        """(the link's receiver thread) Add what the loop counted as received to the link's
        counters."""
        self.flows.fold(self.peer, RECEIVED, self.link.received, self.tally)
