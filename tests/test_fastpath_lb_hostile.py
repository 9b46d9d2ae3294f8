"""Local clients' sessions in the compiled code under the moments that hurt (dsp_proxy/fastpath.py
`Receiver`'s LB rule, `LbPump`; fastrelay.c `lb_rewrite`, `rt_lb_send_pump`), beside
tests/test_fastpath_lb.py.

- Two servers' receivers and one remote descriptor: every reply of a service comes from
  (LB node, ext_ep), whichever server sent it.  A reply whose put2lcl a receiver made and the
  kernel refused (EDVSENQUEUED: that descriptor is busy) goes to the put2lcl thread, which
  parks it; a reply another receiver reads before that thread holds it must not be put past
  it.  The backlog the deliverers read therefore counts the refused frame from the moment its
  put2lcl came back, not from when the Python side got round to queueing it.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
from test_fastpath_lb import CLIENT, LB_ID, LOCAL, PEER, SERVER_EP, SERVICE, _Kernel, _reply

from dsp_proxy import fastpath
from dsp_proxy.group import SERVER_GONE, SERVICE_DOWN
from dsp_proxy.misc import Counters
from dvk_cffi import consts as C
from dvk_cffi import errors as E
from dvk_cffi.wire import HEADER_SIZE, Header

pytestmark = pytest.mark.skipif(fastpath.lib is None, reason="the compiled code is not built")

PEER2, CLIENT2 = 3, 51      # a second server, serving another local client of the service


def _receiver(table, kernel, peer: int, lb_put):
    """A compiled deliverer on the link to `peer` (its own read buffer and payload), whose
    LB node traffic goes to `lb_put` when its put2lcl does not plainly succeed; returns
    (receiver, feed)."""
    payload = SimpleNamespace(addr=1 << 20, view=memoryview(bytearray(C.MAXCOPYBUF)))
    buf = bytearray(HEADER_SIZE + C.MAXCOPYBUF)
    reader = SimpleNamespace(buf=buf, view=memoryview(buf), start=0, end=0,
                             has_frame=lambda: reader.end - reader.start >= HEADER_SIZE)
    link = SimpleNamespace(peer=peer, spec=SimpleNamespace(autobind=True),
                           received=Counters(), last_rx=0.0)
    deliverer = SimpleNamespace(payload=payload, parked={})
    receiver = fastpath.Receiver(table, reader, link, kernel, deliverer, lb_put)

    def feed(frame: bytes) -> bool:
        buf[:len(frame)] = frame
        reader.start, reader.end = 0, len(frame)
        return receiver()

    return receiver, feed


@pytest.fixture
def two_servers():
    """Node 1's table with two local clients' sessions of one service handed over: CLIENT's
    on server node 2, CLIENT2's on server node 3 (both serve it at SERVER_EP); a compiled
    deliverer on each link, one node kernel answering both (`kernel.result`)."""
    table = fastpath.FlowTable(LOCAL, LB_ID, C.NR_NODES, C.NR_DCS, SERVER_GONE | SERVICE_DOWN)
    table.set_dc(0, (C.NR_TASKS, C.NR_PROCS))
    for peer, client in ((PEER, CLIENT), (PEER2, CLIENT2)):
        table.set_raw_ok(peer, True)
        table.set_reverse(peer, True)
        sess = SimpleNamespace(clt_node=LOCAL, svr_node=peer, dcid=0, clt_ep=client,
                               lbsvr_ep=client, clt_pid=0, svr_pid=0, pending=C.CMD_SNDREC_MSG,
                               to_server={SERVICE: SERVER_EP})
        assert table.give(sess) >= 0
    kernel = _Kernel(SimpleNamespace(addr=1 << 20, view=memoryview(bytearray(C.MAXCOPYBUF))))
    answering = threading.Thread(target=kernel.answer, daemon=True)
    answering.start()
    try:
        yield SimpleNamespace(table=table, kernel=kernel)
    finally:
        kernel.theirs.close()
        answering.join(10)
        kernel.mine.close()
        table.free()


def test_a_refused_reply_holds_back_another_servers_reply_until_the_put2lcl_thread_has_it(
        two_servers):
    """Node 2's reply to CLIENT is refused (EDVSENQUEUED: the service's descriptor at the LB
    node is busy).  While it is on its way to the put2lcl thread, node 3's receiver reads the
    reply to CLIENT2, from the same descriptor: it is left to the Python path (the put2lcl
    thread, behind the refused one), never put past it.  Once the thread holds the refused
    frame, the backlog counts it exactly once."""
    rig = two_servers
    table, kernel = rig.table, rig.kernel
    seen: list[tuple[bool, int]] = []      # (node 3's frame left to Python, put2lcl calls)
    handed: list[tuple[Header, bytes, int]] = []

    def lb_put(h: Header, data: bytes, code: int) -> None:
        handed.append((h, data, code))
        if len(handed) == 1:    # the other receiver reads its server's reply at this moment
            seen.append((feed3(_reply(c_snode=PEER2, c_dst=CLIENT2, m1_i1=2)),
                         len(kernel.calls)))
        table.lb_backlog(1)         # the put2lcl thread holds it now (Put2lclThread._queue)

    _, feed2 = _receiver(table, kernel, PEER, lb_put)
    _, feed3 = _receiver(table, kernel, PEER2, lb_put)
    kernel.result = E.EDVSENQUEUED
    assert not feed2(_reply(m1_i1=1))
    assert seen == [(True, 1)], "node 3's reply was put past the refused one"
    ((h, _, code),) = handed
    assert (h.c_snode, h.c_src, h.c_dst, h.c_msg.m1_i1, code) == \
        (LB_ID, SERVICE, CLIENT, 1, E.EDVSENQUEUED)
    assert table.lb_backlog(0) == 1
