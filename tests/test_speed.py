"""Batching and LZ4 compression on the wire (issue: speed): the link's writer, the receiver,
and whole clusters with `batch YES` / `compress YES`, also mismatched between the two ends."""

from __future__ import annotations

import collections
import hashlib
import os
import signal
import socket
import subprocess
import threading
import time

import lz4.frame

from cluster_helpers import Background, cluster_from, start_latency_and_m3ftp
from dsp_proxy.cluster import module_argv
from dsp_proxy.link import (
    EASE_LIMIT,
    PROGRESS_WINDOW,
    QUEUE_MAX_BYTES,
    Link,
    PeerSpec,
    cork,
    ease,
    uncork,
)
from dsp_proxy.rproxy import FrameReader
from dvk_cffi import consts as C
from dvk_cffi import errors as E
from dvk_cffi.wire import make_header, unpack_batch


def _link(batch=False, compress=False):
    spec = PeerSpec(nodeid=2, name="n2", host="127.0.0.1", sport=1, rport=1, batch=batch,
                    compress=compress)
    link = Link(spec, dvk=None)
    a, b = socket.socketpair()
    link.out_sock, link.up, link.generation = a, True, 1
    return link, b


def _read_frames(sock, n):
    sock.settimeout(2)
    r = FrameReader(sock)
    return [(bytes(h), bytes(p)) for h, p in (r.next(lambda f: None) for _ in range(n))]


def _cmds(frames):
    """Unbatch like RPROXY: (c_cmd, c_src) of every command in order."""
    out = []
    for hb, pay in frames:
        h = make_header()
        h.buf[:] = hb
        out.append((h.c_cmd, h.c_src))
        if h.c_flags & C.FLAG_BATCH:
            out.extend((s.c_cmd, s.c_src) for s in unpack_batch(pay, h.c_batch_nr))
    return out


def test_queued_commands_leave_as_one_batch_in_order_copy_data_alone():
    link, peer = _link(batch=True)
    data = os.urandom(1000)
    cork()
    for i in range(5):
        link.submit(make_header(c_cmd=C.CMD_SEND_MSG, c_src=100 + i).buf)
    link.submit(make_header(c_cmd=C.CMD_COPYIN_DATA, c_src=200, c_len=1000).buf, data)
    for i in range(3):
        link.submit(make_header(c_cmd=C.CMD_SNDREC_MSG, c_src=300 + i,
                                c_flags=C.FLAG_CHECK_HDR).buf)
    uncork()
    frames = _read_frames(peer, 3)
    assert _cmds(frames) == [(C.CMD_SEND_MSG, 100 + i) for i in range(5)] + \
        [(C.CMD_COPYIN_DATA, 200)] + [(C.CMD_SNDREC_MSG, 300 + i) for i in range(3)]
    first = make_header()
    first.buf[:] = frames[2][0]
    assert first.c_flags == C.FLAG_BATCH | C.FLAG_CHECK_HDR  # the C code lost CHECK_HDR
    assert frames[1][1] == data
    assert (link.sent.frames, link.sent.commands, link.sent.batches) == (3, 9, 2)


def test_a_lone_command_is_written_at_once_and_batch_no_never_batches():
    link, peer = _link(batch=True)
    link.submit(make_header(c_cmd=C.CMD_SEND_MSG, c_src=7).buf)
    assert _cmds(_read_frames(peer, 1)) == [(C.CMD_SEND_MSG, 7)]
    link, peer = _link(batch=False)
    cork()
    for i in range(4):
        link.submit(make_header(c_cmd=C.CMD_SEND_MSG, c_src=i).buf)
    uncork()
    assert len(_read_frames(peer, 4)) == 4
    assert link.sent.batches == 0


def test_a_run_of_headers_leaves_as_it_is_or_as_batches_and_is_counted_per_command():
    run = b"".join(bytes(make_header(c_cmd=C.CMD_SEND_MSG, c_src=i).buf) for i in range(600))
    link, peer = _link(batch=False)
    assert link.submit_run(bytearray(run)) == 0
    assert [c for c in _cmds(_read_frames(peer, 600))] == \
        [(C.CMD_SEND_MSG, i) for i in range(600)]
    assert (link.sent.frames, link.sent.commands, link.sent.batches) == (600, 600, 0)
    assert link.sent.by_cmd[C.CMD_SEND_MSG] == 600
    link, peer = _link(batch=True)
    cork()
    link.submit(make_header(c_cmd=C.CMD_SEND_MSG, c_src=1000).buf)
    assert link.submit_run(bytearray(run)) == 0
    uncork()
    # the lone command before the run is not merged into it; the run is split at 547 commands
    frames = _read_frames(peer, 3)
    assert _cmds(frames) == [(C.CMD_SEND_MSG, 1000)] + [(C.CMD_SEND_MSG, i) for i in range(600)]
    assert (link.sent.frames, link.sent.commands, link.sent.batches) == (3, 601, 2)
    # a link that is down refuses the run
    link.up = False
    assert link.submit_run(bytearray(run)) == E.EDVSNOTCONN


def test_reader_takes_a_run_of_equal_routing_fields_and_stops_at_the_first_difference():
    a, b = socket.socketpair()
    with a, b:
        same = make_header(c_cmd=C.CMD_SEND_MSG, c_src=5, c_dst=6)
        other = make_header(c_cmd=C.CMD_SEND_MSG, c_src=5, c_dst=6, c_len=3)
        seq = bytearray(same.buf)
        seq[44] = 9              # c_snd_seq differs: not a routing field, still one run
        a.sendall(bytes(same.buf) * 3 + bytes(seq) + bytes(other.buf) + b"xyz"
                  + bytes(same.buf))
        r = FrameReader(b)
        r.fill()
        while r.end - r.start < 6 * 120 + 3:
            r.fill()
        h, _ = r.next(lambda f: None)
        assert r.take_run(h) == 3
        h, p = r.next(lambda f: None)
        assert r.fields[7] == 3 and bytes(p) == b"xyz"
        h, _ = r.next(lambda f: None)
        assert r.take_run(h) == 0


def test_a_receiver_leaves_its_read_buffer_to_the_views_a_link_still_holds():
    """Forwarded payloads are views of the read buffer: when a link could not write them all,
    it copies what is left before the receiver reads on, and the frames keep their bytes."""
    link, peer = _link()
    link.out_sock.setblocking(False)     # as the link keeps its outgoing socket
    a, b = socket.socketpair()
    with a, b, peer:
        payload = os.urandom(60000)
        hdr = make_header(c_cmd=C.CMD_COPYIN_DATA, c_len=len(payload)).buf
        a.sendall(bytes(hdr) + payload)
        r = FrameReader(b)
        while not r.has_frame():
            r.fill()
        h, p = r.next(lambda f: None)
        cork()
        for _ in range(40):            # 2.4 MB: more than the socket takes at once
            assert link.submit(h, p, copy=False) == 0
        assert uncork() == [link]
        link.settle()
        a.sendall(bytes(hdr) + bytes(len(payload)))   # the next read reuses the buffer
        while not r.has_frame():
            r.fill()
        assert bytes(r.next(lambda f: None)[1]) == bytes(len(payload))
        got = bytearray()
        peer.setblocking(False)
        want = 40 * (120 + len(payload))
        deadline = time.monotonic() + 10
        while len(got) < want and time.monotonic() < deadline:
            link.flush()
            try:
                got += peer.recv(1 << 20)
            except BlockingIOError:
                time.sleep(0.001)
        assert len(got) == want
        for k in range(40):
            base = k * (120 + len(payload))
            assert got[base + 120:base + 120 + len(payload)] == payload
    link.out_sock.close()


def test_a_receiver_eases_off_only_for_a_half_full_link_that_still_writes():
    link, peer = _link()
    with peer:
        link.queued_bytes = QUEUE_MAX_BYTES // 2
        link.last_progress = 0.0               # stalled: not waited for
        t0 = time.monotonic()
        ease([link])
        assert time.monotonic() - t0 < 0.2
        link.last_progress = time.monotonic()  # moving: waited for, at most EASE_LIMIT
        t0 = time.monotonic()
        ease([link])
        assert PROGRESS_WINDOW * 0.5 <= time.monotonic() - t0 <= EASE_LIMIT + 1
        link.queued_bytes = 0                  # not backlogged
        link.last_progress = time.monotonic()
        t0 = time.monotonic()
        ease([link])
        assert time.monotonic() - t0 < 0.2
    link.out_sock.close()


def test_copy_data_is_compressed_only_when_it_shrinks():
    link, peer = _link(compress=True)
    text = b"all work and no play " * 3000
    text = text[:C.MAXCOPYBUF]
    noise = os.urandom(C.MAXCOPYBUF)
    for payload in (text, noise):
        link.submit(make_header(c_cmd=C.CMD_COPYIN_DATA, c_len=len(payload),
                                v_bytes=len(payload)).buf, payload)
    (h1, p1), (h2, p2) = _read_frames(peer, 2)
    a, b = make_header(), make_header()
    a.buf[:], b.buf[:] = h1, h2
    assert a.c_flags & C.FLAG_LZ4 and a.c_len == len(p1) < len(text)
    assert lz4.frame.decompress(p1) == text
    assert not b.c_flags & C.FLAG_LZ4 and p2 == noise
    assert link.sent.lz4_frames == 1 and link.sent.lz4_wire < link.sent.lz4_raw
    # never a non-COPY payload or a HELLO
    link.submit(make_header(c_cmd=C.CMD_NONE).buf)
    (h3, _), = _read_frames(peer, 1)
    assert h3[40] == 0


TWO = """
server node1 {{ nodeid 1; rname {{net}}.1; autobind YES; {opt1} }};
server node2 {{ nodeid 2; rname {{net}}.2; autobind YES; {opt2} }};
"""


def _config(opt1, opt2):
    return TWO.format(opt1=opt1, opt2=opt2).replace("{{", "{").replace("}}", "}")


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _sent(cl, node, peer, settle=3.0):
    time.sleep(settle)  # the status file is rewritten every second
    return cl.status(node)["links"][str(peer)]["sent"]


def _run_clients(cl, node, eps, svr_ep, loops):
    procs = [cl.popen(node, module_argv("dvs_apps.latency", "client", 0, ep, svr_ep, loops,
                                        0, 0), stdout=subprocess.PIPE, text=True)
             for ep in eps]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out
        assert f"Total average latency in {loops} loops" in out


def _ftp(cl, node, tmp_path, srvdir, name, data):
    src = tmp_path / f"{name}.src"
    src.write_bytes(data)
    put = cl.run(node, module_argv("dvs_apps.m3ftp", "-p", 0, 11, 20, name, str(src)),
                 timeout=120)
    assert put.returncode == 0, put.stdout + put.stderr
    assert _sha(srvdir / name) == _sha(src)
    back = tmp_path / f"{name}.back"
    get = cl.run(node, module_argv("dvs_apps.m3ftp", "-g", 0, 11, 20, name, str(back)),
                 timeout=120)
    assert get.returncode == 0, get.stdout + get.stderr
    assert _sha(back) == _sha(src)


def test_batch_and_compress_yes_between_two_nodes(tmp_path):
    cfg = _config("batch YES; compress YES;", "batch YES; compress YES;")
    with cluster_from(cfg, tmp_path) as cl:
        b = Background(cl, tmp_path)
        try:
            srvdir = start_latency_and_m3ftp(cl, b, tmp_path)
            # 12 concurrent clients, each checks its loops come back in order; node 1's DSP
            # is paused a moment so that their requests queue up in its kernel
            procs = [cl.popen(1, module_argv("dvs_apps.latency", "client", 0, ep, 10, 40, 0, 0),
                              stdout=subprocess.PIPE, text=True) for ep in range(50, 62)]
            time.sleep(1.0)
            cl.dsps[1].send_signal(signal.SIGSTOP)
            time.sleep(0.3)
            cl.dsps[1].send_signal(signal.SIGCONT)
            for p in procs:
                out, _ = p.communicate(timeout=120)
                assert p.returncode == 0, out
                assert "Total average latency in 40 loops" in out
            batched = _sent(cl, 1, 2, settle=1.5)
            # fewer frames carried commands than there were commands (HELLOs are frames too:
            # a run with few batches and a few HELLOs once had frames == commands)
            assert batched["batches"] > 0
            assert batched["frames"] - batched["hellos"] < batched["commands"], batched
            back = _sent(cl, 2, 1, settle=0)
            before = _sent(cl, 1, 2, settle=0)
            _ftp(cl, 1, tmp_path, srvdir, "text", b"compressible line of text\n" * 160000)
            st1, st2 = _sent(cl, 1, 2), _sent(cl, 2, 1)
            assert st1["lz4_frames"] > before["lz4_frames"]           # PUT data compressed
            assert st2["lz4_frames"] > back["lz4_frames"]             # GET data compressed
            assert st1["lz4_wire"] * 4 < st1["lz4_raw"]
            _ftp(cl, 1, tmp_path, srvdir, "noise", os.urandom(2 << 20))
            after = _sent(cl, 1, 2)
            assert after["lz4_frames"] == st1["lz4_frames"]            # random data sent raw
        finally:
            b.close()


def test_mismatched_batch_and_compress_lose_nothing(tmp_path):
    # links to node 2 batch and compress, links to node 1 do not: each receiver takes what
    # the flags say, whatever its own setting
    cfg = _config("", "batch YES; compress YES;")
    with cluster_from(cfg, tmp_path) as cl:
        b = Background(cl, tmp_path)
        try:
            srvdir = start_latency_and_m3ftp(cl, b, tmp_path)
            _run_clients(cl, 1, range(50, 56), 10, 40)
            _ftp(cl, 1, tmp_path, srvdir, "text", b"0123456789abcdef" * 65536)
            to2, to1 = _sent(cl, 1, 2), _sent(cl, 2, 1)
            assert to2["lz4_frames"] > 0
            assert to1["lz4_frames"] == 0 and to1["batches"] == 0
        finally:
            b.close()


def test_writer_survives_the_queue_emptied_by_a_link_down_while_it_takes_it():
    """A link going down clears its queue from another thread while the writer is taking it:
    the writer takes what is left and does not fail."""

    class ClearedMidway(collections.deque):
        def popleft(self):
            item = super().popleft()
            self.clear()          # what _disconnect_kernel does on another thread
            return item

    link, peer = _link()
    cork()
    for i in range(3):
        link.submit(make_header(c_cmd=C.CMD_SEND_MSG, c_src=100 + i).buf)
    link.outq = ClearedMidway(link.outq)
    uncork()
    assert _cmds(_read_frames(peer, 1)) == [(C.CMD_SEND_MSG, 100)]
    assert not link.outq


class _RacingWire:
    """A compiled relay's wire (its lock and quiet flag) whose `settled` lets another thread
    queue a frame at that moment, as a writer that finds the lock busy does: it leaves the
    frame to the lock's holder."""

    def __init__(self, on_settled) -> None:
        self.lock = threading.Lock()
        self.on_settled = on_settled

    def acquire(self, blocking=True):
        return self.lock.acquire(blocking)

    def release(self):
        self.lock.release()

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()

    def publish(self, sock):
        pass

    def enqueued(self):
        pass

    def seq(self):
        return 0

    def settled(self, seq, empty):
        self.on_settled()


def test_a_frame_left_to_the_writer_while_it_settles_is_written():
    """The writer saw the queue empty under the send lock; a frame queued before it released
    the lock (its writer found the lock busy and left) is written by it all the same."""
    link, peer = _link()
    pending = [make_header(c_cmd=C.CMD_SEND_MSG, c_src=77).buf]

    def queue_meanwhile():
        if pending:
            link.outq.append((bytes(pending.pop()), None, link.generation, C.CMD_SEND_MSG, 0,
                              0, 0, 1))
    link.wire = link.send_lock = _RacingWire(queue_meanwhile)
    assert link.flush() is True
    assert _cmds(_read_frames(peer, 1)) == [(C.CMD_SEND_MSG, 77)]
    assert not link.outq


def test_flush_of_a_link_that_is_down_returns_at_once():
    """A frame queued after the link went down (its queue was just emptied) waits for the
    generation check of the next connection; flush does not spin on it meanwhile."""
    link, peer = _link()
    link.up = False
    link.outq.append((bytes(make_header(c_cmd=C.CMD_SEND_MSG).buf), None, 1,
                      C.CMD_SEND_MSG, 0, 0, 0, 1))
    result = []
    t = threading.Thread(target=lambda: result.append(link.flush()), daemon=True)
    t.start()
    t.join(2)
    assert result == [False]
    peer.close()


def test_the_unsent_rest_of_a_gone_connection_never_starts_the_next_one():
    """A frame cut in the middle belongs to its connection: on a new one the rest is dropped,
    never written as the start of a frame."""
    link, peer = _link()
    old = link.out_sock
    link.unsent, link.unsent_sock = [b"tail of a frame"], old
    new, new_peer = socket.socketpair()
    link.out_sock = new
    link.submit(make_header(c_cmd=C.CMD_SEND_MSG, c_src=5).buf)
    assert _cmds(_read_frames(new_peer, 1)) == [(C.CMD_SEND_MSG, 5)]
    for s in (old, peer, new, new_peer):
        s.close()
