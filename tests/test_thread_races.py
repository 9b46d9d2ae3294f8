"""Figures and decisions that several threads share: a reader on one thread must not fail or
lose counts while another thread changes what it reads.  A garbage collection can run Python
code (a finalizer, here a gc callback that yields) in the middle of a comprehension or a
read-modify-write, so each race is forced with such a callback and a tiny switch interval."""

from __future__ import annotations

import gc
import socket
import sys
import threading
import time
from contextlib import contextmanager
from types import SimpleNamespace

from dsp_proxy.config import parse_text
from dsp_proxy.elastic import Autoscaler
from dsp_proxy.group import Group
from dsp_proxy.link import OutMonitor
from dsp_proxy.main import Dsp
from dsp_proxy.misc import Counters
from dsp_proxy.rproxy import WireLimits, check_header
from dvk_cffi import consts as C
from dvk_cffi import errors as E
from dvk_cffi.wire import ROUTE_STRUCT, Header


@contextmanager
def frequent_switches():
    """Hand the GIL over as often as the interpreter can, and at every garbage collection."""
    def yield_gil(phase: str, _info: dict) -> None:
        if phase == "start":
            time.sleep(0)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    gc.callbacks.append(yield_gil)
    try:
        yield
    finally:
        gc.callbacks.remove(yield_gil)
        sys.setswitchinterval(old)


def _servers(n: int) -> str:
    text = "lb lb0 { nodeid 0; min_servers 1; max_servers 3; };\n"
    text += "".join(f"server s{i} {{ nodeid {i}; }};\n" for i in range(1, n + 1))
    return text + "client c { nodeid 30; };\n"


def test_the_autoscaler_decides_while_a_reload_changes_the_servers():
    """A session with no server asks the autoscaler who decides (a receiver thread) while the
    main loop reloads a configuration that adds and removes servers: the question must not
    fail ("dictionary changed size during iteration" killed the receiver)."""
    small, big = parse_text(_servers(3)), parse_text(_servers(28))
    group = Group(small, 30, SimpleNamespace(up=lambda n: True, frames=lambda n: 0,
                                              c_peer=lambda n: False), None)
    for s in group.servers.values():
        s.reported, s.level = 1.0, C.LVL_IDLE
    auto = Autoscaler(SimpleNamespace(cfg=small, local=30, group=group),
                      runner=SimpleNamespace(run=lambda *a: None))
    stop = threading.Event()
    failures: list[str] = []

    def receiver() -> None:
        while not stop.is_set():
            try:
                auto.decider()
            except Exception as exc:   # any failure, not only the one this test found first
                failures.append(repr(exc))
                return

    t = threading.Thread(target=receiver, name="receiver")
    reloads = 0
    with frequent_switches():
        t.start()
        try:
            deadline = time.monotonic() + 3
            while t.is_alive() and reloads < 2_000 and time.monotonic() < deadline:
                group.reload(big if reloads % 2 == 0 else small)
                reloads += 1
        finally:
            stop.set()
            t.join(10)
    assert reloads and not failures, failures[:1]


def test_a_header_is_checked_against_the_range_just_learned():
    """The main loop forgets every DC's range now and then (a DC may have started or
    stopped); when that lands between a receiver's learning a DC and its check, the frame
    must still be checked against what was learned, not refused and its link closed."""
    info = SimpleNamespace(dc_flags=C.DC_RUNNING, dc_nr_tasks=C.NR_TASKS,
                           dc_nr_procs=C.NR_PROCS)
    limits = WireLimits(8, 4)
    host = SimpleNamespace(dvs=SimpleNamespace(d_nr_dcs=4, d_nr_tasks=C.NR_TASKS,
                                               d_nr_procs=C.NR_PROCS),
                           dvk=SimpleNamespace(getdcinfo=lambda dcid: info),
                           wires=None, limits=limits)

    def learn_then_forget(dcid: int):
        rng = Dsp.learn_dc(host, dcid)
        limits.dc_ranges.clear()            # the main loop's recheck, at the worst moment
        return rng

    limits.learn = learn_then_forget
    h = Header()
    h.c_cmd, h.c_dcid, h.c_src, h.c_dst, h.c_snode, h.c_dnode = C.CMD_SEND_MSG, 0, 10, 11, 1, 2
    check_header(ROUTE_STRUCT.unpack_from(h.buf), 1, limits)
    h.c_dcid = 3
    check_header(ROUTE_STRUCT.unpack_from(h.buf), 1, limits)


def test_put2lcl_errors_counted_by_several_threads_are_all_counted():
    host = SimpleNamespace(errors={}, _errors_lock=threading.Lock())
    n, threads = 20_000, 3

    def count() -> None:
        for _ in range(n):
            Dsp.count_error(host, E.EDVSNOTCONN)

    workers = [threading.Thread(target=count) for _ in range(threads)]
    with frequent_switches():
        for w in workers:
            w.start()
        for w in workers:
            w.join(60)
    assert sum(host.errors.values()) == n * threads


def test_each_peers_load_report_carries_the_traffic_of_its_own_period():
    """A DSP reports its traffic to every peer once a period: the quiet-server rule reads it,
    so a server moving traffic must not report 0 to all but the first peer of a period."""
    link = SimpleNamespace(sent=Counters(), received=Counters())
    host = SimpleNamespace(fast=None, links={1: link}, _activity_marks={})
    host.fold_fast = lambda: None
    for _ in range(5):
        link.sent.count(C.CMD_SEND_MSG, 100, dcid=0)
    assert Dsp.activity(host, 1) == 5
    assert Dsp.activity(host, 2) == 5
    assert Dsp.activity(host, 1) == 0
    link.received.count(C.CMD_SEND_MSG, 100, dcid=0)
    assert Dsp.activity(host, 2) == 1
    assert Dsp.activity(host, 1) == 1


def test_the_outgoing_monitor_ignores_an_event_for_a_socket_closed_after_select():
    """The chaos run in local mode (`python -m fuzz.chaos --mode local`): after a server node
    was frozen and thawed, its outmon thread died with ValueError('Invalid file descriptor:
    -1'): a link's thread retired and closed an outgoing socket (under the monitor's lock)
    between the monitor's select and its handling of that socket's event, and the monitor
    looked the closed socket's descriptor (-1) up.  Such an event is stale: the monitor skips
    it and goes on watching the other sockets."""
    monitor = OutMonitor()
    lost: list[tuple[object, str]] = []
    link = SimpleNamespace(event=lambda _ev, sock, reason: lost.append((sock, reason)))
    a, a_peer = socket.socketpair()
    b, b_peer = socket.socketpair()
    select = monitor.sel.select

    def select_then_close(timeout=None):
        """The race, forced: the socket is retired and closed once select has reported it."""
        events = select(timeout)
        for key, _mask in events:
            if key.fileobj is a and a.fileno() >= 0:
                monitor.forget(a)
                with monitor.lock:
                    a.close()
        return events

    monitor.sel.select = select_then_close
    errors: list[BaseException] = []

    def run() -> None:
        try:
            monitor.run()
        except BaseException as exc:  # the thread's death is the failure
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    try:
        monitor.watch(a, link)
        monitor.watch(b, link)
        thread.start()
        a_peer.close()                    # a becomes readable (EOF) and is closed meanwhile
        deadline = time.monotonic() + 5
        while a.fileno() >= 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        b_peer.close()                    # the monitor still watches the other socket
        while not lost and not errors and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not errors, errors
        assert lost == [(b, "the peer closed the connection")]
    finally:
        monitor.stop()
        thread.join(5)
        for s in (a, a_peer, b, b_peer):
            s.close()
