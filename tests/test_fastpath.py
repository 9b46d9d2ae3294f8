"""The compiled relay (dsp_proxy/fastpath.py) against the router it stands in for.

Two LB hosts get the same frames (fuzz/relay_fuzz.py): one routes everything in Python, the
other hands its established sessions to the compiled relay.  Whatever the relay carries must
leave it exactly as the router would have sent it (same node, same bytes), every frame it leaves
must get the router's own answer, and the sessions must agree afterwards.  Then a real LB host
relays COPY data to a server that reads slowly, every byte checked.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import threading
import time

import pytest

from bench import wire_peers as W
from cluster_helpers import fresh_net
from dsp_proxy import fastpath
from dsp_proxy.cluster import REPO_ROOT, Cluster, python_env
from dsp_proxy.group import SEND
from dvk_cffi import consts as C
from dvk_cffi import errors as E
from dvk_cffi.wire import HEADER_SIZE, Header
from fuzz import relay_fuzz
from fuzz.relay_fuzz import CLIENT, LB_HOST, Twins, establish, frame


@pytest.fixture
def twins():
    t = Twins()
    yield t
    t.table.free()


def test_the_compiled_relay_is_built():
    """`make venv` builds it; without it every frame takes the Python path (still correct,
    but not what the benchmarks measure)."""
    assert fastpath.lib is not None, "dsp_proxy/_fastrelay is not built: run make venv"


def test_a_sendrec_session_is_relayed_as_the_router_would_send_it(twins):
    t = twins
    svr, lbsvr = establish(t)
    rng = random.Random(1)
    for _ in range(50):
        assert t.feed(frame(rng, C.CMD_SNDREC_MSG, 50, 10, CLIENT, 0, 77), CLIENT)
        assert t.feed(frame(rng, C.CMD_SEND_MSG, 10, lbsvr, svr, LB_HOST, 900), svr)
        assert t.feed(frame(rng, C.CMD_SEND_ACK, 50, 10, CLIENT, 0, 77), CLIENT)
    sess = t.ga.sessions[(0, CLIENT, 50, 10)]
    assert sess.pending == 0 and sess.commands == 1 + 100


def test_what_the_relay_cannot_decide_goes_to_the_router(twins):
    """A new PID, a session-ending error code, another endpoint of the service, a frame the
    check refuses: each leaves the relay and gets the router's answer."""
    t = twins
    svr, lbsvr = establish(t)
    rng = random.Random(2)
    assert not t.feed(frame(rng, C.CMD_SNDREC_MSG, 50, 11, CLIENT, 0, 77), CLIENT)  # new map
    assert t.feed(frame(rng, C.CMD_SNDREC_MSG, 50, 10, CLIENT, 0, 77), CLIENT)   # relayed again
    assert not t.feed(frame(rng, C.CMD_SNDREC_MSG, 50, 10, CLIENT, 7, 77), CLIENT)  # bad dnode
    assert not t.feed(frame(rng, C.CMD_SNDREC_MSG, 50, 10, 4, 0, 77), CLIENT)   # not the peer
    assert not t.feed(frame(rng, C.CMD_SEND_MSG, 10, lbsvr, svr, LB_HOST, 901), svr)  # new PID
    assert not t.feed(frame(rng, C.CMD_SNDREC_ACK, 10, lbsvr, svr, LB_HOST, 0, E.EDVSDSTDIED),
                      svr)
    assert (0, CLIENT, 50, 10) not in t.ga.sessions       # the server endpoint died
    establish(t)
    assert not t.feed(frame(rng, C.CMD_SNDREC_MSG, 50, 10, CLIENT, 0, 78), CLIENT)  # new PID
    assert t.refused == 1


def test_a_copy_naming_a_third_endpoint_goes_to_the_router(twins):
    """The relay carried a client's copy commands whatever endpoints they named; the router
    refuses those naming anything but the client and its service's endpoints (Session.
    may_send).  A copy that names only the client and the endpoint it addresses stays on
    the relay; one that names a third endpoint leaves it and gets the router's answer, the
    copy's error ACK."""
    t = twins
    establish(t)
    rng = random.Random(3)
    assert t.feed(frame(rng, C.CMD_COPYOUT_RQST, 50, 10, CLIENT, 0, 77, eps=(50, 10)), CLIENT)
    for third in (11, 100, 5):
        assert not t.feed(frame(rng, C.CMD_COPYLCL_RQST, 50, 10, CLIENT, 0, 77,
                                eps=(third,)), CLIENT), third


def test_idle_sessions_expire_as_with_the_router(twins):
    t = twins
    svr, lbsvr = establish(t)
    rng = random.Random(3)
    t.feed(frame(rng, C.CMD_SNDREC_MSG, 50, 10, CLIENT, 0, 77), CLIENT)
    t.advance(1.0)
    t.feed(frame(rng, C.CMD_SEND_MSG, 10, lbsvr, svr, LB_HOST, 900), svr)
    t.advance(t.ga.session_timeout + 1)
    assert not t.ga.sessions and not t.gb.sessions


@pytest.mark.parametrize("seed", range(6))
def test_mutated_session_traffic_agrees_with_the_router(seed):
    """Random commands, fields and flags around three established sessions (the bounded run
    of `make fuzz-relay`): every frame compared."""
    fig = relay_fuzz.run(frames=3000, seed=seed)
    assert not fig.mismatches, fig.mismatches
    assert fig.frames >= 3000 and fig.relayed > 300 and fig.python > 300, fig.line()


def test_a_refused_span_answers_the_clients_requests(twins):
    """A link that refuses what the relay wrote (down, full): the counted frames are taken
    back and every request in the span gets the router's error reply for its client."""
    t = twins
    svr, _ = establish(t)
    replies = []

    def refused(hbuf: bytes, code: int) -> None:
        replies.append(t.ga.fast_refused(hbuf, code))

    class Down:
        def submit_span(self, span, nframes):
            return E.EDVSNOTCONN

    links = {n: Down() for n in range(C.NR_NODES)}
    relay = fastpath.Relay(t.table, t.reader, CLIENT, links, refused)
    rng = random.Random(4)
    frames = [frame(rng, C.CMD_SNDREC_MSG, 50, 10, CLIENT, 0, 77),
              frame(rng, C.CMD_SEND_ACK, 50, 10, CLIENT, 0, 77)]
    t.reader.load(b"".join(frames))
    assert relay() is False and t.reader.start == t.reader.end
    (node, ack, _data, _request, _relayed) = replies[0][1:]
    assert replies[1] is None              # an ACK answers nobody
    expected = t.gb.error_reply(Header(bytearray(frames[0][:HEADER_SIZE])), E.EDVSNOTCONN,
                                True)
    assert (node, bytes(ack)) == (expected[1], bytes(expected[2])) == (CLIENT, bytes(ack))
    sent = fastpath.ffi.new("relay_tally *")
    assert not fastpath.lib.rt_fold(t.table.table, svr, fastpath.SENT, sent)   # nothing left
    # the refused request was answered: the session (still the relay's) owes its client
    # nothing when it ends
    sess = t.ga.sessions[(0, CLIENT, 50, 10)]
    assert sess.fast_sid >= 0
    t.advance(t.ga.session_timeout + 1)
    assert not [a for a in t.ga.tick() if a[0] == SEND] and not t.ga.sessions


@pytest.mark.parametrize("fast", ["1", "0"], ids=["compiled-relay", "python-path"])
def test_relayed_copy_data_keeps_every_byte_while_the_server_reads_slowly(tmp_path, monkeypatch,
                                                                          fast):
    """A real LB host relays 8 MiB of 64 KiB COPY frames to a server peer that does not read
    for a while: its socket fills, writes stop halfway and what is left, sent or queued, stays
    a view of the read buffer until it is copied.  Every frame arrives whole, in order, with
    its own bytes, rewritten for the server; by the compiled relay and by the router alike."""
    monkeypatch.setenv(fastpath.ENV, fast)
    net = fresh_net()
    cfg = tmp_path / "hop.cfg"
    cfg.write_text(W.CONFIG.format(net=net, opts=""))
    cluster = Cluster(cfg, rundir=str(tmp_path), log_level="WARNING")
    hop = None
    try:
        cluster.start_kernel(W.HOST)
        hop = W.DspHop(net, lambda: cluster.start_dsp(W.HOST))
        frames = [W.copy_frame() for _ in range(128)]
        with hop.quiet():                      # no HELLOs between the frames meanwhile
            sender = threading.Thread(target=hop.c_tx.sendall, args=(b"".join(frames),))
            sender.start()
            time.sleep(1.0)                    # the server peer reads nothing yet
            hop.s_rx.settimeout(20)
            for k, frame in enumerate(frames):
                while True:
                    hdr = W.recv_exact(hop.s_rx, HEADER_SIZE)
                    h = Header(bytearray(hdr))
                    data = W.recv_exact(hop.s_rx, h.c_len) if h.c_len else b""
                    if h.c_cmd != C.CMD_NONE:
                        break
                assert (h.c_cmd, h.c_snode, h.c_dnode, h.c_dst) == \
                    (C.CMD_COPYIN_DATA, W.HOST, W.SRV, W.EXT_EP), k
                assert data == frame[HEADER_SIZE:], f"frame {k} changed on the way"
            sender.join(20)
        deadline = time.monotonic() + 10     # the status file is written every tick
        while True:
            st = cluster.status(W.HOST)
            sent = st["links"][str(W.SRV)]["sent"]["by_cmd"].get(str(C.CMD_COPYIN_DATA))
            if sent == len(frames) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert sent == len(frames)
        assert st["fast_relay"] is (fast == "1")
        assert st["group"]["fast_sessions"] == (fast == "1")
    finally:
        if hop is not None:
            hop.close()
        cluster.stop()


def test_a_module_built_from_another_fastrelay_c_is_not_used(tmp_path):
    """After an update whose `make venv` did not run, the module beside the new fastrelay.c
    is the old one's: the LB host must not call it (a function it lacks or that changed would
    kill its threads), but say so and carry every frame on the Python path."""
    tree = tmp_path / "tree"
    shutil.copytree(REPO_ROOT / "dsp_proxy", tree / "dsp_proxy",   # the normal module only
                    ignore=shutil.ignore_patterns("__pycache__", "_fastrelay_san*"))
    source = tree / "dsp_proxy" / "fastrelay.c"
    source.write_text(source.read_text() + "\n/* the next version */\n")
    net = fresh_net()
    cfg = tmp_path / "hop.cfg"
    cfg.write_text(W.CONFIG.format(net=net, opts=""))
    cluster = Cluster(cfg, rundir=str(tmp_path), log_level="INFO")
    log = tmp_path / "dsp-copy.log"

    def start_copy() -> subprocess.Popen:     # the DSP of the copied tree, stopped by cluster
        env = python_env({"DVK_RUNDIR": cluster.rundir,
                          "PYTHONPATH": f"{tree}{os.pathsep}{REPO_ROOT}"})
        for name in (fastpath.SANITIZED, "LD_PRELOAD"):   # under make fuzz-relay-asan
            env.pop(name, None)
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "dsp_proxy", "--dvk", "emu", "--node", str(W.HOST),
                 "--status-file", cluster.status_path(W.HOST), str(cfg)],
                env=env, cwd=tree, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL)
        cluster.dsps[W.HOST] = proc
        return proc

    hop = None
    try:
        cluster.start_kernel(W.HOST)
        hop = W.DspHop(net, start_copy)
        assert W.pingpong(hop, 50, 10.0), "no round trip through the LB host"
        text = log.read_text()
        assert f"the compiled relay is not used: the module in {tree / 'dsp_proxy'} was " \
            "built from another version of fastrelay.c; run `make venv`" in text, text
        assert "died" not in text and "Traceback" not in text, text
        assert cluster.status(W.HOST)["fast_relay"] is False
    finally:
        if hop is not None:
            hop.close()
        cluster.stop()


def test_a_module_whose_source_cannot_be_checked_is_not_used(monkeypatch):
    """No fastrelay.c to compare with: the module is not trusted either."""
    def unreadable() -> str:
        raise FileNotFoundError("fastrelay.c")
    monkeypatch.setattr(fastpath.fastrelay_build, "source_id", unreadable)
    assert "cannot be read" in fastpath.stale(fastpath.ffi, fastpath.lib)


def test_the_built_module_names_its_source():
    assert fastpath.UNUSABLE is None
    assert fastpath.stale(fastpath.ffi, fastpath.lib) is None
