"""Resource limits reached by a running DSP (docs/reliability.md, "Resource limits"): each
gives a logged reason, costs no thread and no spinning CPU, and the daemon recovers by itself
once the pressure is gone.

The descriptor limit is lowered on the real daemon of node 1 (`prlimit` of a running process);
its descriptors are then used up by idle connections to its statistics server, the cheapest
thing an outsider on the network can hold open."""

from __future__ import annotations

import os
import resource
import socket
import time

import pytest

from cluster_helpers import cluster_from, wait_for
from dsp_proxy import stats
from dsp_proxy.misc import resolve

CONFIG = """
lb node0 { nodeid 0; period 1; fd_interval 250; fd_fall 4; fd_rise 1; };
server node1 { nodeid 1; rname {net}.1; };
server node2 { nodeid 2; rname {net}.2; };
service latency { dcid 0; ext_ep 10; min_ep 10; max_ep 19; bind external; };
"""
STATS_BASE = 4000
#: Descriptors left above what the daemon holds when the limit is lowered.
MARGIN = 6


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _log(cl, n: int) -> str:
    with open(cl.log_path(f"dsp{n}"), errors="replace") as f:
        return f.read()


def _use_up_descriptors(pid: int, limit: int, addr: tuple[str, int],
                        held: list[socket.socket]) -> None:
    """Open idle connections to the daemon's statistics server until it holds `limit`
    descriptors (a connection beyond them waits in its backlog)."""
    for _ in range(limit):
        if _fds(pid) >= limit:
            return
        before = _fds(pid)
        s = socket.create_connection(addr, timeout=5)
        held.append(s)
        deadline = time.monotonic() + 1.0
        while _fds(pid) <= before and time.monotonic() < deadline:
            time.sleep(0.02)
    assert _fds(pid) >= limit, f"the daemon holds {_fds(pid)} descriptors, not {limit}"


def test_out_of_descriptors_the_daemon_waits_logs_and_recovers(tmp_path):
    """Node 1 out of descriptors while node 2's DSP connects again: its acceptor and
    statistics server cannot accept, its sender cannot make a socket, a pair restart cannot
    connect to the node kernel.  Each is logged and retried after a pause (no thread dies, the
    daemon does not spin); once the descriptors are free again the link comes back by itself
    and the statistics answer."""
    with cluster_from(CONFIG, tmp_path, stats_base=STATS_BASE) as cl:
        pid = cl.dsps[1].pid
        stats_addr = (resolve(cl.cfg.nodes_by_id[1].rname), STATS_BASE + 1)
        held: list[socket.socket] = []
        try:
            cl.kill_dsp(2)
            wait_for(lambda: "link to node 2 (node2) down" in _log(cl, 1), 15, "link down")
            time.sleep(0.5)      # the old connections are closed
            limit = _fds(pid) + MARGIN
            _, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, hard))
            _use_up_descriptors(pid, limit, stats_addr, held)
            held.append(socket.create_connection(stats_addr, timeout=5))   # in the backlog
            cl.start_dsp(2)
            # (the statistics server closes idle connections 10 s after their connect: what
            # needs the descriptors used up is checked well within that)
            wait_for(lambda: "cannot accept a connection on port" in _log(cl, 1), 5,
                     "the acceptor's reason in the log")
            cpu0, t0 = _cpu_seconds(pid), time.monotonic()
            time.sleep(3.0)
            used = _cpu_seconds(pid) - cpu0
            # a thread retrying at once uses a whole core for the 3 s; the pauses, almost none
            assert used < 0.5 * (time.monotonic() - t0), f"{used:.2f} s of CPU in 3 s"
            assert "stats: cannot accept a connection" in _log(cl, 1)
            wait_for(lambda: "SPROXY(2) cannot connect" in _log(cl, 1), 20,
                     "the sender's reason in the log")
        finally:
            for s in held:
                s.close()
        cl.wait_links_up(30)
        snap = stats.fetch(f"{stats_addr[0]}:{stats_addr[1]}")
        assert snap["links"]["2"]["up"] is True
        log = _log(cl, 1)
        assert " died" not in log, log[-3000:]
        assert cl.dsps[1].poll() is None


@pytest.mark.parametrize("whole_machine", [False, True])
def test_a_load_measure_without_descriptors_keeps_the_last_figures(monkeypatch, caplog,
                                                                   whole_machine):
    """Reading /proc needs a descriptor: out of them, the load meter keeps its last figures
    with a logged reason instead of raising into the main loop's tick (which skipped the
    session expiry and the autoscaler behind it, every tick, with a traceback)."""
    import errno

    import psutil

    from dsp_proxy.group import LoadMeter

    meter = LoadMeter(20, 80, None if whole_machine else (lambda: {os.getpid()}))
    meter.sample()
    meter.cpu, meter.level = 42, 1

    def exhausted(*args, **kw):
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(psutil, "cpu_percent", exhausted)
    monkeypatch.setattr(psutil, "Process", exhausted)
    assert meter.sample() == (42, 1)
    assert "cannot measure this node's load" in caplog.text


@pytest.mark.parametrize("code", ["EADDRNOTAVAIL", "EMFILE"])
def test_a_sender_that_cannot_connect_for_this_hosts_reason_says_why(monkeypatch, caplog, code):
    """No local port to be had (the ephemeral ports used up: EADDRNOTAVAIL) or no descriptor:
    the link never comes up, and the reason is this host's, so it is logged at ERROR (a peer
    that is down only at DEBUG: its link's state shows it); the sender retries with its
    backoff."""
    import errno
    import logging
    import threading
    from types import SimpleNamespace

    from dsp_proxy.misc import Backoff
    from dsp_proxy.sproxy import SProxy

    attempts = []

    def connect(self, address):
        attempts.append(address)
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))

    monkeypatch.setattr(socket.socket, "connect", connect)
    stopping = threading.Event()
    ctx = SimpleNamespace(stopping=stopping, source_addr="127.0.0.1", tune_out=lambda s: None)
    link = SimpleNamespace(peer=2, spec=SimpleNamespace(host="127.0.0.2", sport=3001))
    sender = SProxy(ctx, link, gate=None)
    caplog.set_level(logging.DEBUG)
    worker = threading.Thread(target=sender._connect, args=(Backoff(0.01, 0.05),),
                              daemon=True)
    worker.start()
    try:
        deadline = time.monotonic() + 10
        while len(attempts) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        stopping.set()
        worker.join(5)
    assert len(attempts) >= 3 and not worker.is_alive()
    errors = [r for r in caplog.records if r.levelno == logging.ERROR
              and "SPROXY(2) cannot connect to 127.0.0.2:3001" in r.getMessage()]
    assert errors and os.strerror(getattr(errno, code)) in errors[0].getMessage()


if __name__ == "__main__":       # pragma: no cover
    pytest.main([__file__, "-q"])
