"""The main loop supervises its threads (docs/design.md, "Supervision"): an exception in any
proxy thread is logged with its traceback and the peer's link comes back and carries traffic;
the LB pair's death or a lost DVK ends the daemon with a non-zero status within 2 s.

Node 1's DSP runs inside the test process (so that an exception can be injected into one of its
threads); node 2's DSP and every node kernel are real processes."""

from __future__ import annotations

import logging
import signal
import threading
import time

import pytest

from cluster_helpers import Background, cluster_from, wait_bound
from dsp_proxy import config as cfgmod
from dsp_proxy.acceptor import Acceptor
from dsp_proxy.cluster import module_argv
from dsp_proxy.fastpath import LbPump
from dsp_proxy.group import Group
from dsp_proxy.link import Link
from dsp_proxy.main import KERNEL_ANSWER_LIMIT, TICK, Dsp
from dsp_proxy.rproxy import Deliverer, FrameReader
from dsp_proxy.sproxy import SProxy
from dvk_cffi.emu import node as emunode
from dvk_cffi.emu.client import EmuDvk
from dvk_cffi.emu.server import socket_path

CFG = """
lb node0 { nodeid 0; period 1; };
client node1 { nodeid 1; rname {net}.1; };
server node2 { nodeid 2; rname {net}.2; };
service latency { dcid 0; ext_ep 10; min_ep 10; max_ep 19; bind external; };
"""


class InProcess:
    """Node 1's DSP on threads of the test process."""

    def __init__(self, cl):
        cl.kill_dsp(1)
        dvk = EmuDvk(path=socket_path(1, cl.rundir))
        local, dvs = dvk.getdvsinfo()
        cfg = cfgmod.load(cl.cfg_path, dvs, local_node=local)
        self.dsp = Dsp(dvk, cfg, local, dvs)
        self.dsp.start()
        self.status = None
        self.thread = threading.Thread(target=self._run, name="test-main-loop", daemon=True)
        self.thread.start()

    def _run(self):
        self.status = self.dsp.run()

    def close(self):
        self.dsp.stop()
        self.thread.join(10)
        self.dsp.shutdown()


@pytest.fixture
def node1(tmp_path):
    with cluster_from(CFG, tmp_path) as cl:
        b = Background(cl, tmp_path)
        inproc = None
        try:
            b.start(2, "dvs_apps.latency", "server", 0, 10)
            wait_bound(cl, 2, 0, 10)
            inproc = InProcess(cl)
            cl.wait_links_up(30)
            yield cl, inproc
        finally:
            if inproc is not None:
                inproc.close()
            b.close()


def _traffic(cl, inproc, loops=5):
    """Latency requests from node 1 through the LB to node 2, once node 1 sees node 2 as a
    live server again (after a link comes back, a server must be heard fd_rise times)."""
    _wait(lambda: 2 in inproc.dsp.group.levels(), 15, "server 2 live")
    res = cl.run(1, module_argv("dvs_apps.latency", "client", 0, 50, 10, loops, 0, 0),
                 timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"Total average latency in {loops} loops" in res.stdout


def _once(thread_name):
    """A wrapper of a method that raises once, in the thread called `thread_name`."""
    fired = threading.Event()

    def wrap(original):
        def method(*args, **kw):
            if threading.current_thread().name == thread_name and not fired.is_set():
                fired.set()
                raise RuntimeError("injected fault")
            return original(*args, **kw)
        return method
    return wrap, fired


def _wait(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} not reached in {timeout} s")


@pytest.mark.parametrize("thread_name, cls, method", [
    ("RPROXY(2)", FrameReader, "next"),      # runs for every frame from node 2
    ("SPROXY(2)", SProxy, "_hello"),         # runs for every HELLO to node 2
])
def test_a_dead_proxy_thread_is_logged_and_its_pair_restarted(node1, monkeypatch, caplog,
                                                               thread_name, cls, method):
    cl, inproc = node1
    _traffic(cl, inproc)
    wrap, fired = _once(thread_name)
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(cls, method, wrap(getattr(cls, method)))
    _wait(fired.is_set, 10, "the injected fault")
    _wait(lambda: "proxy pair restarted" in caplog.text, 15, "the restart")
    died = [r for r in caplog.records if f"thread {thread_name} died" in r.getMessage()]
    assert died and died[0].exc_info is not None          # the traceback is in the log
    cl.wait_links_up(30)
    _traffic(cl, inproc)
    assert inproc.thread.is_alive()
    # the restarted pair's node is a member of the DC again (plain traffic needs it)
    _wait(lambda: cl.dvk(1).getdcinfo(0).dc_nodes & (1 << 2), 5, "node 2 in DC 0 on node 1")


def test_a_dead_acceptor_is_restarted(node1, monkeypatch, caplog):
    cl, inproc = node1
    wrap, fired = _once("acceptor")
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(Acceptor, "_accept_all", wrap(Acceptor._accept_all))
    # make node 2 connect again: its DSP restarts, node 1's acceptor takes the connection
    cl.kill_dsp(2)
    cl.start_dsp(2)
    _wait(fired.is_set, 20, "the injected fault")
    _wait(lambda: "restarting the acceptor thread" in caplog.text, 10, "the restart")
    cl.wait_links_up(30)
    _traffic(cl, inproc)


def test_an_acceptor_that_keeps_dying_is_restarted_with_a_growing_delay(node1, monkeypatch,
                                                                       caplog):
    """A fault that stays (every accept raises) must not turn the supervisor into a tight
    loop of deaths and restarts: the delay grows per recent death (the first restart is at
    once); once the fault is gone the next restart takes the waiting connection."""
    cl, inproc = node1
    faulty = threading.Event()
    faulty.set()
    original = Acceptor._accept_all

    def accept_all(*args, **kw):
        if faulty.is_set():
            raise RuntimeError("injected lasting fault")
        return original(*args, **kw)

    caplog.set_level(logging.INFO)
    monkeypatch.setattr(Acceptor, "_accept_all", accept_all)
    cl.kill_dsp(2)
    cl.start_dsp(2)
    _wait(lambda: "thread acceptor died" in caplog.text, 20, "the first death")
    time.sleep(3.0)
    deaths = caplog.text.count("thread acceptor died")
    # at once, then 0.2, 0.4, 0.8, 1.6 s (rounded up to the 0.5 s tick): a handful in 3 s;
    # restarted at once, thousands
    assert 2 <= deaths <= 10, deaths
    assert "deaths in the last 60 s" in caplog.text
    faulty.clear()
    cl.wait_links_up(30)
    _traffic(cl, inproc)
    assert inproc.thread.is_alive()


def test_an_acceptor_restart_without_a_thread_to_be_had_is_tried_again(node1, monkeypatch,
                                                                      caplog):
    """Out of threads (RLIMIT_NPROC, memory), the restart of a dead acceptor cannot start its
    thread: logged and tried again after RESTART_RETRY, not forgotten (the node would never
    accept a peer's connection again)."""
    from dsp_proxy import main as dsp_main

    cl, inproc = node1
    monkeypatch.setattr(dsp_main, "RESTART_RETRY", 0.5)
    wrap, fired = _once("acceptor")
    refused = threading.Event()
    real_start = threading.Thread.start

    def start(self):
        if self.name == "acceptor" and not refused.is_set():
            refused.set()
            raise RuntimeError("can't start new thread")
        return real_start(self)

    caplog.set_level(logging.INFO)
    monkeypatch.setattr(Acceptor, "_accept_all", wrap(Acceptor._accept_all))
    monkeypatch.setattr(threading.Thread, "start", start)
    cl.kill_dsp(2)
    cl.start_dsp(2)
    _wait(refused.is_set, 20, "the refused thread")
    _wait(lambda: "cannot restart the acceptor thread" in caplog.text, 10, "the log line")
    cl.wait_links_up(30)
    _traffic(cl, inproc)


def test_a_pair_restart_whose_second_thread_cannot_start_leaves_no_thread_behind(
        node1, monkeypatch, caplog):
    """Out of threads, a pair restart may start its receiver and not its sender: the receiver,
    waiting at its start gate, must be let go (each retry left one more thread, and its
    node-kernel connection, waiting for ever: the shortage it ran into grew with every
    retry).  The restart is tried again and the link comes back."""
    from dsp_proxy import main as dsp_main

    cl, inproc = node1
    _traffic(cl, inproc)
    monkeypatch.setattr(dsp_main, "RESTART_RETRY", 0.5)
    wrap, fired = _once("RPROXY(2)")
    refused = {"left": 3}
    real_start = threading.Thread.start

    def start(self):
        if self.name == "SPROXY(2)" and refused["left"]:
            refused["left"] -= 1
            raise RuntimeError("can't start new thread")
        return real_start(self)

    caplog.set_level(logging.INFO)
    monkeypatch.setattr(threading.Thread, "start", start)
    monkeypatch.setattr(FrameReader, "next", wrap(FrameReader.next))
    _wait(fired.is_set, 10, "the injected fault")
    _wait(lambda: "proxy pair restarted" in caplog.text, 30, "the restart")
    assert refused["left"] == 0
    cl.wait_links_up(30)
    _traffic(cl, inproc)
    _wait(lambda: [t.name for t in threading.enumerate()].count("RPROXY(2)") == 1, 5,
          "one RPROXY(2) thread")


def test_a_pair_restart_that_fails_is_tried_again(node1, monkeypatch, caplog):
    """The restart of a dead pair can itself fail with any error (out of descriptors, its new
    threads cannot connect to the node kernel: OSError EMFILE).  It is logged and tried again,
    never left undone with the link dead for good."""
    import errno

    cl, inproc = node1
    _traffic(cl, inproc)
    wrap, fired = _once("RPROXY(2)")
    failures = {"left": 1}
    dsp = inproc.dsp
    original = dsp._start_pair

    def start_pair(name, nodeid, *args, **kw):
        if nodeid == 2 and failures["left"]:
            failures["left"] -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        return original(name, nodeid, *args, **kw)

    caplog.set_level(logging.INFO)
    monkeypatch.setattr(dsp, "_start_pair", start_pair)
    monkeypatch.setattr(FrameReader, "next", wrap(FrameReader.next))
    _wait(fired.is_set, 10, "the injected fault")
    _wait(lambda: "proxy pair restarted" in caplog.text, 20, "the second restart")
    assert "link to node 2: restart failed: [Errno 24]" in caplog.text
    cl.wait_links_up(30)
    _traffic(cl, inproc)
    assert inproc.thread.is_alive()


@pytest.mark.parametrize("thread_name", ["get2rmt", "put2lcl"])
def test_the_lb_pair_dying_ends_the_daemon_non_zero(node1, monkeypatch, thread_name):
    cl, inproc = node1
    wrap, fired = _once(thread_name)
    client = None
    try:
        if thread_name == "get2rmt":   # its get2rmt calls, made in C or in Python
            dvk = inproc.dsp.dvk
            monkeypatch.setattr(dvk, "get2rmt", wrap(dvk.get2rmt))
            monkeypatch.setattr(LbPump, "get2rmt", wrap(LbPump.get2rmt))
        else:
            # the put2lcl thread delivers the server's replies to the client
            monkeypatch.setattr(Deliverer, "deliver", wrap(Deliverer.deliver))
            client = cl.popen(1, module_argv("dvs_apps.latency", "client", 0, 51, 10, 3, 0, 0))
        _wait(fired.is_set, 10, "the injected fault")
        t0 = time.monotonic()
        inproc.thread.join(5)
        assert not inproc.thread.is_alive() and time.monotonic() - t0 < 2.5
        assert inproc.status == 1
    finally:
        if client is not None:
            client.kill()
            client.wait()


def test_a_lost_dvk_ends_the_daemon_non_zero(node1):
    cl, inproc = node1
    t0 = time.monotonic()
    emunode.stop_node(cl.kernels[1])
    inproc.thread.join(5)
    assert not inproc.thread.is_alive() and time.monotonic() - t0 < 2.5
    assert inproc.status == 1


def test_a_frozen_node_kernel_cannot_hold_the_daemon(tmp_path):
    """A node kernel that stops answering (SIGSTOP: its socket still accepts) counts as lost
    once the main loop's periodic call to it has waited KERNEL_ANSWER_LIMIT: the DSP exits
    non-zero with the reason logged, and a SIGTERM sent meanwhile is acted on within the init
    script's stop timeout (10 s by default), its shutdown making no more calls to the kernel."""
    with cluster_from(CFG, tmp_path) as cl:
        cl.wait_links_up(30)
        kernel, dsp = cl.kernels[2], cl.dsps[2]
        kernel.send_signal(signal.SIGSTOP)
        try:
            time.sleep(2 * TICK)        # the main loop is waiting for its periodic call now
            t0 = time.monotonic()
            dsp.send_signal(signal.SIGTERM)
            dsp.wait(KERNEL_ANSWER_LIMIT + 15)
            took = time.monotonic() - t0
        finally:
            kernel.send_signal(signal.SIGCONT)
        with open(cl.log_path("dsp2")) as f:
            text = f.read()
        assert dsp.returncode == 1, text
        assert "did not answer within" in text
        assert took < 10.0, f"the DSP took {took:.1f} s to stop"


def _mark_pair_2_failed(cl, inproc, monkeypatch, caplog, retry: float) -> None:
    """Node 1's RPROXY(2) dies more than MAX_RESTARTS times in a row: its pair is marked
    failed (to be retried after `retry` s); the faults end there."""
    from dsp_proxy import main as dsp_main
    _traffic(cl, inproc)
    monkeypatch.setattr(dsp_main, "FAILED_RETRY", retry)
    monkeypatch.setattr(dsp_main, "RESTART_BACKOFF", 0.05)
    faults = {"left": dsp_main.MAX_RESTARTS + 1}
    original = FrameReader.next

    def next_frame(*args, **kw):
        if threading.current_thread().name == "RPROXY(2)" and faults["left"] > 0:
            faults["left"] -= 1
            raise RuntimeError("injected fault")
        return original(*args, **kw)

    caplog.set_level(logging.INFO)
    monkeypatch.setattr(FrameReader, "next", next_frame)
    _wait(lambda: "marked failed" in caplog.text, 60, "the pair marked failed")
    assert faults["left"] == 0


def test_a_pair_marked_failed_is_started_again_after_a_while(node1, monkeypatch, caplog):
    """Threads that die again and again mark their pair failed; that costs the link
    FAILED_RETRY seconds, not the link for good: the pair is then started again with a fresh
    count, and traffic flows once the fault is gone."""
    cl, inproc = node1
    _mark_pair_2_failed(cl, inproc, monkeypatch, caplog, retry=2.0)
    _wait(lambda: not inproc.dsp.pairs[2].failed, 20, "the failed pair started again")
    cl.wait_links_up(30)
    _traffic(cl, inproc)
    assert inproc.thread.is_alive()


def test_a_reload_starts_a_pair_marked_failed_at_once(node1, monkeypatch, caplog):
    """The failure's log line promises a retry at a reload too: the operator who fixed the
    cause and sends SIGHUP gets the link back without waiting FAILED_RETRY."""
    cl, inproc = node1
    _mark_pair_2_failed(cl, inproc, monkeypatch, caplog, retry=3600.0)
    inproc.dsp.config_path = cl.cfg_path
    inproc.dsp.post(("signal", signal.SIGHUP))
    _wait(lambda: not inproc.dsp.pairs[2].failed, 20, "the failed pair started again")
    assert "link to node 2, marked failed, starts again" in caplog.text
    cl.wait_links_up(30)
    _traffic(cl, inproc)


def test_a_reload_that_fails_partway_gives_its_verdict_and_the_daemon_goes_on(node1,
                                                                              monkeypatch,
                                                                              caplog):
    """An unexpected error while a valid config is applied still ends in a verdict line (the
    init script's `reload` waits for one: without it, "no verdict" after its timeout) that
    says the configuration is partly applied; the figures carry it, the daemon carries on."""
    cl, inproc = node1
    caplog.set_level(logging.INFO)

    def broken(self):
        raise RuntimeError("injected fault")

    monkeypatch.setattr(Dsp, "_bind_services", broken)
    inproc.dsp.config_path = cl.cfg_path
    inproc.dsp.post(("signal", signal.SIGHUP))
    _wait(lambda: inproc.dsp.reloads["failed"] == 1, 20, "the reload's verdict")
    verdicts = [r for r in caplog.records if r.getMessage().startswith("reload of ")]
    assert [r.levelname for r in verdicts] == ["ERROR"]
    assert "failed partway" in verdicts[0].getMessage()
    assert "injected fault" in inproc.dsp.reloads["last_error"]
    monkeypatch.undo()
    inproc.dsp.post(("signal", signal.SIGHUP))
    _wait(lambda: inproc.dsp.reloads["ok"] == 1, 20, "a reload after it")
    _traffic(cl, inproc)


def test_a_tick_step_that_keeps_failing_holds_none_of_the_others(node1, monkeypatch, caplog):
    """A fault that stays in one periodic step (here every link's check of its held
    connections; a program name with a newline did it to the load sampling) is logged, and
    the steps after it still run every tick: sessions expire, the autoscaler decides.  It
    used to end the tick at that step, every tick, for as long as the fault lasted."""
    cl, inproc = node1
    ticks = []
    group_tick = Group.tick

    def counted(self):
        ticks.append(time.monotonic())
        return group_tick(self)

    def broken(self):
        raise RuntimeError("injected fault")

    monkeypatch.setattr(Group, "tick", counted)
    monkeypatch.setattr(Link, "check_candidate", broken)
    _wait(lambda: len(ticks) >= 3, 10 * TICK + 5, "three session ticks with the fault")
    assert "check links failed; the tick's other steps go on" in caplog.text
    monkeypatch.undo()
    _traffic(cl, inproc)
    assert inproc.thread.is_alive()


def test_reload_verdicts_pass_the_log_line_limit(node1, caplog):
    """The init script's `reload` waits for the daemon's verdict line: reloads past the limit
    of lines of one kind per minute must still log their verdict (an operator's own action,
    not an outsider's flood)."""
    from dvk_cffi.logs import LOG_BURST, RepeatLimit
    cl, inproc = node1
    caplog.set_level(logging.INFO)
    limit = RepeatLimit()          # the daemon's log handlers' filter
    caplog.handler.addFilter(limit)
    inproc.dsp.config_path = cl.cfg_path
    count = LOG_BURST + 5
    for _ in range(count):
        inproc.dsp.post(("signal", signal.SIGHUP))
    try:
        _wait(lambda: inproc.dsp.reloads["ok"] >= count, 60, f"{count} reloads")
    finally:
        caplog.handler.removeFilter(limit)
    done = [r for r in caplog.records if r.getMessage().startswith("reload of ")
            and "done" in r.getMessage()]
    assert len(done) == count


def test_a_pair_marked_failed_shows_in_the_figures(node1, monkeypatch, caplog):
    """A pair marked failed has no link for FAILED_RETRY seconds: its peer's row vanished
    from `dsp_proxy stats`, the page and /metrics (only the JSON's failed_pairs said it).
    The row stays, as FAILED, and /metrics says the link is down and the pair failed."""
    from dsp_proxy.stats import format_text, render_html, render_metrics
    cl, inproc = node1
    _mark_pair_2_failed(cl, inproc, monkeypatch, caplog, retry=3600.0)
    snap = inproc.dsp.snapshot()
    assert 2 not in snap["links"] and snap["failed_pairs"] == [2]
    rows = [line.split() for line in format_text(snap).splitlines()]
    assert ["2", "FAILED"] in [r[:2] for r in rows], format_text(snap)
    assert "FAILED" in render_html(snap)
    metrics = render_metrics(snap)
    assert 'dsp_link_up{peer="2",name=""} 0' in metrics
    assert 'dsp_pair_failed{peer="2"} 1' in metrics


def test_a_proxy_pair_unbound_by_another_program_is_registered_again(node1, caplog):
    """Another local program unbinds the DSP's proxy pair for node 2 (proxies_unbind is open
    to any program of the node): the link went down and every connection after that was
    refused by the kernel (proxy_conn: EDVSPROXYFREE), two log lines each time, for good;
    caught between two get2rmt calls, SPROXY(2) went round at full speed on EDVSNOTBIND
    while the link looked up.  The supervisor registers the pair again, traffic flows."""
    cl, inproc = node1
    _traffic(cl, inproc)
    caplog.set_level(logging.INFO)
    errors = inproc.dsp.links[2].sent.errors
    EmuDvk(path=socket_path(1, cl.rundir)).proxies_unbind(2)
    _wait(lambda: "proxy pair restarted" in caplog.text, 20, "the pair registered again")
    assert inproc.dsp.links[2].sent.errors - errors < 100, "the sender went round in a loop"
    cl.wait_links_up(30)
    _traffic(cl, inproc)


def test_the_lb_pair_unbound_by_another_program_ends_the_daemon_non_zero(node1):
    """The LB pair unbound by another program: its get2rmt thread went round at full speed on
    EDVSNOTBIND for good (local clients' requests went nowhere).  It is the LB pair's death:
    the daemon exits non-zero so that init starts it again (and it registers the pair)."""
    cl, inproc = node1
    EmuDvk(path=socket_path(1, cl.rundir)).proxies_unbind(inproc.dsp.lb_nodeid)
    inproc.thread.join(10)
    assert not inproc.thread.is_alive() and inproc.status == 1


def test_a_service_endpoint_unbound_by_another_program_is_bound_again(node1, caplog):
    """On a client node the DSP binds each service's ext_ep to the LB node, at start and at a
    reload only: another local program that unbound it (any program may) took the service
    from every client of the node for good, each request answered EDVSDEADSRCDST.  The DSP
    binds a free ext_ep again within its client check period."""
    cl, inproc = node1
    _traffic(cl, inproc)
    caplog.set_level(logging.INFO)
    EmuDvk(path=socket_path(1, cl.rundir)).unbind(0, 10)
    _wait(lambda: "bound again" in caplog.text, 15, "the service endpoint bound again")
    _traffic(cl, inproc)
