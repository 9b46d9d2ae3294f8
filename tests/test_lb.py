"""The virtual load-balancer node through real DSPs on emulated nodes (issue: the LB node)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from cluster_helpers import Background, cluster_from, dvsctl, wait_bound, wait_for
from dsp_proxy.cluster import module_argv
from dvk_cffi import Message
from dvk_cffi import consts as C
from dvk_cffi.errors import DvkError

LB = """
lb node0 {{ nodeid 0; period {period}; lowwater {low}; highwater {high};
           max_sessions {maxs}; session_timeout 60; {extra} }};
server node1 {{ nodeid 1; rname {{net}}.1; }};
server node2 {{ nodeid 2; rname {{net}}.2; }};
client node3 {{ nodeid 3; rname {{net}}.3; }};
client node4 {{ nodeid 4; rname {{net}}.4; }};
{more}
service latency {{ dcid 0; ext_ep 10; min_ep 10; max_ep 19; bind external; }};
service m3ftp {{ dcid 0; ext_ep 20; min_ep 20; max_ep 28; bind external; }};
"""


def lb_config(period=30, low=30, high=70, maxs=157, extra="", more=""):
    return LB.format(period=period, low=low, high=high, maxs=maxs, extra=extra, more=more) \
        .replace("{{", "{").replace("}}", "}")


def relayed_lb_config(lb_eps: tuple[int, int] = (100, 150)) -> str:
    """`lb_config` with node 5 as the LB host (`cltname lbhost`): it relays the other client
    nodes' sessions as its translated endpoints `lb_eps`."""
    return lb_config(extra=f"cltname lbhost; lb_eps {lb_eps[0]} {lb_eps[1]};",
                     more="client lbhost { nodeid 5; rname {net}.5; };")


LOOP_RE = re.compile(r"Time total elapsed in loop (\d+): ([0-9.]+)")


def start_servers(cl, b, nodes=(1, 2), ep=10, module="dvs_apps.latency", env=None):
    for n in nodes:
        b.start(n, module, "server", 0, ep, env=env)
    for n in nodes:
        wait_bound(cl, n, 0, ep)


def server_messages(cl, client_node) -> dict[int, int]:
    """Commands the client node's DSP forwarded to each server."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        st = cl.status(client_node)
        if st.get("group"):
            return {int(k): v["commands"] for k, v in st["group"]["servers"].items()}
        time.sleep(0.2)
    raise AssertionError(f"no status from node {client_node}")


def wait_status(cl, node, predicate, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = cl.status(node)
        if st and predicate(st):
            return st
        time.sleep(0.2)
    raise AssertionError(f"node {node}: {what} not reached in {timeout} s: {cl.status(node)}")


class Client:
    """A client endpoint bound by the test process itself on a node (to see replies raw)."""

    def __init__(self, cl, node, ep):
        self.dvk = cl.dvk(node)
        self.ep = self.dvk.bind(0, ep)

    def call(self, dst, m_type=0x0A, timeout=5000):
        m = Message()
        m.m_type, m.m1_i1 = m_type, 1
        t0 = time.monotonic()
        try:
            self.dvk.sendrec(dst, m, timeout)
            return m, None, time.monotonic() - t0
        except DvkError as err:
            return m, err, time.monotonic() - t0

    def close(self):
        try:
            self.dvk.unbind(0, self.ep)
        except DvkError:
            pass


def test_seed_scenario_sessions_spread_over_two_servers(tmp_path, bg):
    with cluster_from(lb_config(), tmp_path) as cl:
        b = Background(cl, tmp_path)
        bg.append(b)
        start_servers(cl, b)
        for n in (3, 4):  # the client nodes' DSPs bound the services to the LB node
            info = cl.dvk(n).getprocinfo(0, 10)
            assert info.p_rts_flags & C.REMOTE and info.p_nodeid == 0
        # local-client sessions: the servers see the clients' own endpoints, which must
        # therefore differ across client nodes (relayed mode translates them, see below)
        procs = [(n, ep, cl.popen(n, module_argv("dvs_apps.latency", "client", 0, ep, 10, 40,
                                                 0, 0), stdout=subprocess.PIPE, text=True))
                 for n, ep in ((3, 50), (3, 51), (4, 52), (4, 53))]
        for n, ep, p in procs:
            out, _ = p.communicate(timeout=120)
            assert p.returncode == 0, f"client {ep}@{n}: {out}"
            assert [int(i) for i, _ in LOOP_RE.findall(out)] == list(range(40))
        def spread():
            total = {1: 0, 2: 0}
            for n in (3, 4):
                for srv, count in server_messages(cl, n).items():
                    total[srv] += count
            return total
        deadline = time.monotonic() + 10
        while min(spread().values()) == 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert min(spread().values()) > 0, spread()
        # the reply comes from node 0 / endpoint 10 as far as the client is concerned
        c = Client(cl, 3, 60)
        try:
            m, err, _ = c.call(10)
            assert err is None
            assert (m.m_source, m.m_type, m.m1_i1) == (10, 0x0B, 1)
        finally:
            c.close()


ONE_SERVER = """
lb node0 { nodeid 0; period 1; };
server node1 { nodeid 1; rname {net}.1; };
client node3 { nodeid 3; rname {net}.3; };
client node4 { nodeid 4; rname {net}.4; };
service latency { dcid 0; ext_ep 10; min_ep 10; max_ep 19; bind external; };
"""


def marked_call(c, marker, busy=0, timeout=10000):
    """sendrec to the service with `marker` in m1_i1 (the server echoes it, after `busy` s):
    the marker of the reply, or the error's name."""
    m = Message()
    m.m_type, m.m1_i1, m.m1_i2 = 0x0A, marker, busy
    try:
        c.dvk.sendrec(10, m, timeout)
    except DvkError as err:
        return err.name
    return m.m1_i1 if m.m_type == 0x0B else f"type {m.m_type:#x}"


@contextlib.contextmanager
def one_endpoint_on_two_client_nodes(tmp_path, bg, ep):
    """ONE_SERVER running its server program, and a process on each client node (a thread
    each: its endpoint is bound and used there) bound to `ep`: (cluster, {node: (client,
    its thread)})."""
    with cluster_from(ONE_SERVER, tmp_path) as cl, \
            ThreadPoolExecutor(1) as on3, ThreadPoolExecutor(1) as on4:
        b = Background(cl, tmp_path)
        bg.append(b)
        start_servers(cl, b, nodes=(1,))
        procs = {n: (on.submit(Client, cl, n, ep).result(), on) for n, on in ((3, on3), (4, on4))}
        try:
            yield cl, procs
        finally:
            for c, on in procs.values():
                on.submit(c.close).result()


def test_local_mode_an_endpoint_on_two_client_nodes_never_gets_the_others_reply(tmp_path, bg):
    """Local mode: a server sees its clients' own endpoints, which should differ across client
    nodes.  When two client nodes' processes share one anyway, the server's binding repair
    moved the endpoint to whichever node used it last, also while the other node's request
    was being served: that reply went to the newcomer, into its process's wait (misrouted),
    and the first client waited for ever.  Now the newcomer gets EDVSAGAIN while the
    endpoint is busy, each gets its own reply, and taking turns works."""
    with one_endpoint_on_two_client_nodes(tmp_path, bg, 50) as (cl, procs):
        (c3, on3), (c4, on4) = procs[3], procs[4]
        for marker in (31, 41, 32, 42):     # taking turns: the binding follows the user
            c, on = procs[3] if marker < 40 else procs[4]
            assert on.submit(marked_call, c, marker).result() == marker
        first = on3.submit(marked_call, c3, 33, 4)     # the server is busy with it for 4 s
        srv = cl.dvk(1)
        wait_for(lambda: srv.getprocinfo(0, 50).p_nodeid == 3 and
                 srv.getprocinfo(0, 50).p_rts_flags & C.RECEIVING, timeout=10,
                 what="node 3's request at the server")
        assert on4.submit(marked_call, c4, 43).result() == "EDVSAGAIN"
        assert first.result(30) == 33
        assert on4.submit(marked_call, c4, 44).result() == 44
        assert "is in use by node 3's process" in open(cl.log_path("dsp1")).read()


def test_local_mode_a_reply_on_its_way_keeps_the_endpoint_on_its_node(tmp_path, bg):
    """A client that gave up (its sendrec timed out) leaves the server's reply waiting at the
    client's node until that process receives; meanwhile the endpoint's descriptor at the
    server shows no request (the reply cleared it), and a request of the same endpoint from
    another node's process moved it there: the first node's ACK of the reply was then
    refused, the server waited for it until its send timed out (for ever without a timeout),
    and the first node's every request was refused behind the newcomer's.  Now the
    endpoint stays while a local process sends to it (or receives from it alone)."""
    def late_reply(c):
        m = Message()
        c.dvk.receive(C.ANY, m, 10000)
        return m.m1_i1

    # system endpoints (27): a user process may not receive, and node 3's must
    with one_endpoint_on_two_client_nodes(tmp_path, bg, 27) as (cl, procs):
        (c3, on3), (c4, on4) = procs[3], procs[4]
        assert on3.submit(marked_call, c3, 31).result() == 31
        # the server is busy 1 s with it; node 3's process gives up before
        assert on3.submit(marked_call, c3, 33, 1, 300).result() == "EDVSTIMEDOUT"
        srv = cl.dvk(1)

        def replying() -> bool:
            info = srv.getprocinfo(0, 10)
            return bool(info.p_rts_flags & C.SENDING) and info.p_sendto == 27
        wait_for(replying, timeout=10, what="the server's reply waiting at node 3")
        assert srv.getprocinfo(0, 27).p_nodeid == 3
        assert on4.submit(marked_call, c4, 43, 0, 2000).result() == "EDVSAGAIN"
        assert on3.submit(late_reply, c3).result() == 33    # node 3 ACKs the reply
        assert on3.submit(marked_call, c3, 34).result() == 34
        assert on4.submit(marked_call, c4, 44).result() == 44


@pytest.mark.parametrize("mode", ["local", "relayed"])
def test_m3ftp_through_the_lb(tmp_path, bg, mode):
    """Also through the LB host (relayed mode): the servers' copies from and to the client,
    whose answers name the client and the service's endpoint, pass the LB host's rule for a
    client's copies (Session.may_send)."""
    cfg = lb_config() if mode == "local" else relayed_lb_config()
    with cluster_from(cfg, tmp_path) as cl:
        b = Background(cl, tmp_path)
        bg.append(b)
        shared = tmp_path / "export"  # both servers serve one directory (shared storage)
        shared.mkdir()
        start_servers(cl, b, ep=20, module="dvs_apps.m3ftp", env={"M3FTPD_DIR": str(shared)})
        src = tmp_path / "data10M"
        src.write_bytes(os.urandom(10 << 20))
        put = cl.run(3, module_argv("dvs_apps.m3ftp", "-p", 0, 11, 20, "f10M", str(src)),
                     timeout=180)
        assert put.returncode == 0, put.stdout + put.stderr
        assert "verified" in put.stdout
        back = tmp_path / "back10M"
        get = cl.run(4, module_argv("dvs_apps.m3ftp", "-g", 0, 11, 20, "f10M", str(back)),
                     timeout=180)
        assert get.returncode == 0, get.stdout + get.stderr
        assert "verified" in get.stdout
        digest = hashlib.sha256(src.read_bytes()).hexdigest()
        assert hashlib.sha256(back.read_bytes()).hexdigest() == digest
        assert hashlib.sha256((shared / "f10M").read_bytes()).hexdigest() == digest


BURNER = ("import os, time\n"
          "from dvk_cffi import open_dvk\n"
          "d = open_dvk('emu'); d.getdvsinfo()\n"
          "end = time.time() + 90\n"
          "while time.time() < end:\n"
          "    pass\n")


def msgs(st, server):
    return st["group"]["servers"][str(server)]["commands"]


def level_of(st, server):
    return st["group"]["servers"][str(server)]["level"]


def test_saturated_server_gets_no_new_sessions_until_it_recovers(tmp_path, bg):
    with cluster_from(lb_config(period=1, low=40, high=85), tmp_path) as cl:
        b = Background(cl, tmp_path)
        bg.append(b)
        start_servers(cl, b)
        wait_status(cl, 3, lambda st: level_of(st, 1) == "IDLE" and level_of(st, 2) == "IDLE",
                    what="both servers IDLE")
        burner = subprocess.Popen([sys.executable, "-c", BURNER], env=cl.env(1),
                                  stdin=subprocess.DEVNULL)
        try:
            wait_status(cl, 3, lambda st: level_of(st, 1) == "SATURATED",
                        what="server 1 SATURATED")
            before = server_messages(cl, 3)
            for ep in (50, 51, 52):
                res = cl.run(3, module_argv("dvs_apps.latency", "client", 0, ep, 10, 5, 0, 0))
                assert res.returncode == 0, res.stdout + res.stderr
            st = wait_status(cl, 3, lambda st: msgs(st, 2) > before.get(2, 0),
                             what="server 2 used")
            assert msgs(st, 1) == before.get(1, 0), st["group"]["servers"]
        finally:
            burner.kill()
            burner.wait()
        # recovered: back to IDLE like server 2, so that the choice by level may take it (a
        # server only out of SATURATED, still BUSY, loses every choice to an IDLE one)
        wait_status(cl, 3, lambda st: level_of(st, 1) == "IDLE",
                    what="server 1 recovered")
        before = server_messages(cl, 3)
        procs = [cl.popen(3, module_argv("dvs_apps.latency", "client", 0, ep, 10, 10, 0, 0),
                          stdout=subprocess.PIPE, text=True) for ep in (53, 54)]
        for p in procs:
            out, _ = p.communicate(timeout=60)
            assert p.returncode == 0, out
        wait_status(cl, 3, lambda st: msgs(st, 1) > before.get(1, 0), what="server 1 used")


@pytest.mark.parametrize("fast", ["1", "0"], ids=["compiled-relay", "python-path"])
def test_relayed_clients_with_the_same_endpoint(tmp_path, bg, monkeypatch, fast):
    """Also the LB host's two paths: with the compiled relay carrying the established
    sessions (counted in the link figures like the router's frames) and without it."""
    monkeypatch.setenv("DSP_FASTPATH", fast)
    cfg = relayed_lb_config()
    with cluster_from(cfg, tmp_path) as cl:
        b = Background(cl, tmp_path)
        bg.append(b)
        start_servers(cl, b)
        procs = [(n, cl.popen(n, module_argv("dvs_apps.latency", "client", 0, 50, 10, 30, 0, 0),
                              stdout=subprocess.PIPE, text=True)) for n in (3, 4)]
        for n, p in procs:
            out, _ = p.communicate(timeout=120)
            assert p.returncode == 0, f"node {n}: {out}"
            assert len(LOOP_RE.findall(out)) == 30
        # the servers saw the clients as translated endpoints of the LB host (node 5)
        seen = set()
        for n in (1, 2):
            for line in dvsctl(cl, n, "procs").stdout.splitlines()[1:]:
                f = line.split()
                if len(f) > 5 and f[4] == "5" and 100 <= int(f[1]) <= 150:
                    seen.add(int(f[1]))
        assert len(seen) >= 2, seen
        def requests(st):
            return sum(st["links"][str(n)]["sent"]["by_cmd"].get(str(C.CMD_SNDREC_MSG), 0)
                       for n in (1, 2))
        # the status file is written every tick: wait for the one after the last request
        st = wait_status(cl, 5, lambda st: st["group"]["sessions_started"] >= 2
                         and requests(st) >= 60, what="2 relayed sessions, 60 requests")
        assert st["fast_relay"] is (fast == "1")
        assert st["fast_links"] is (fast == "1")
        assert (st["group"]["fast_sessions"] == 2) is (fast == "1")
        assert requests(st) == 60, st["links"]

        # a relayed client node's own frames (on its link to the LB host, which has the LB
        # node's id): on the compiled sender and deliverer, counted in its link figures as
        # the Python path counts them (the deliverer's folds lag a read at most)
        def own(st, way, cmd):
            return st["links"]["0"][way]["by_cmd"].get(str(cmd), 0)
        st = wait_status(cl, 3, lambda st: own(st, "sent", C.CMD_SNDREC_MSG) >= 30
                         and own(st, "received", C.CMD_SEND_MSG) >= 30,
                         what="node 3's 30 requests and replies counted")
        assert st["fast_links"] is (fast == "1")
        assert (own(st, "sent", C.CMD_SNDREC_MSG), own(st, "received", C.CMD_SEND_MSG)) \
            == (30, 30), st["links"]["0"]


@pytest.mark.parametrize("fast", ["1", "0"], ids=["compiled-relay", "python-path"])
def test_a_client_node_that_holds_every_relayed_endpoint_gives_one_back(tmp_path, bg,
                                                                          monkeypatch, fast):
    """The LB host has two translated endpoints (lb_eps 100 101) and node 3's clients hold
    both sessions (idle: relayed sessions end only by timeout).  A client of node 4 is under
    its share, so it takes one back and is served; node 3, at its share, is refused with
    EDVSNOSPC, at once.  Before, node 4 got EDVSNOSPC for the whole session timeout."""
    monkeypatch.setenv("DSP_FASTPATH", fast)
    cfg = relayed_lb_config((100, 101))
    with cluster_from(cfg, tmp_path) as cl:
        b = Background(cl, tmp_path)
        bg.append(b)
        start_servers(cl, b)

        def latency_client(node, ep):
            res = cl.run(node, module_argv("dvs_apps.latency", "client", 0, ep, 10, 3, 0, 0),
                         timeout=60)
            assert res.returncode == 0 and len(LOOP_RE.findall(res.stdout)) == 3, \
                f"client {ep}@{node}: {res.stdout}{res.stderr}"
        for ep in (50, 51):
            latency_client(3, ep)
        wait_status(cl, 5, lambda st: len(st["group"]["sessions"]) == 2, what="2 sessions")
        latency_client(4, 50)
        st = wait_status(cl, 5, lambda st: st["group"]["sessions_taken_back"] == 1,
                         what="one session taken back")
        assert sorted(s["client"] for s in st["group"]["sessions"]) == ["50@4", "51@3"]
        c = Client(cl, 3, 52)
        try:
            _, err, took = c.call(10)
            assert err is not None and err.name == "EDVSNOSPC" and took < 1.0, err
        finally:
            c.close()
        assert "whose node holds more than its share" in open(cl.log_path("dsp5")).read()


@pytest.mark.parametrize("fast", ["1", "0"], ids=["compiled-relay", "python-path"])
def test_a_late_reply_for_a_session_taken_back_never_reaches_the_new_client(tmp_path,
                                                                           monkeypatch, fast):
    """Node 3's clients 50 and 51 hold both translated endpoints (lb_eps 100 101), each
    waiting for its reply, which the servers (this test, bound at ep 10) hold back.  Client
    60 of node 4 takes back 50's session and lands on the same server.  The server then
    answers 50's request, to the endpoint 50 had: that reply reached client 60 as the answer
    to its own request (one node's requests answered into another node's session).  Now 60
    has the slot in a new generation: the stale reply is refused to the server, and 60 gets
    the answer to its own request."""
    import queue
    import threading

    monkeypatch.setenv("DSP_FASTPATH", fast)
    cfg = relayed_lb_config((100, 101))
    with cluster_from(cfg, tmp_path) as cl:
        held: dict[int, list] = {1: [], 2: []}      # server -> [(source, value)] received
        todo: dict[int, queue.Queue] = {1: queue.Queue(), 2: queue.Queue()}
        stop = threading.Event()
        failures: list = []

        def hold(node):
            """The service on `node`: receive every request, answer one when told to."""
            dvk = cl.dvk(node)
            dvk.bind(0, 10)
            try:
                while not stop.is_set():
                    try:
                        dst, value, result = todo[node].get_nowait()
                        m = Message()
                        m.m_type, m.m1_i1 = 0x0A, value
                        try:
                            dvk.send(dst, m, 2000)
                            result.put(None)
                        except DvkError as err:
                            result.put(err.name)
                    except queue.Empty:
                        pass
                    m = Message()
                    try:
                        dvk.receive(C.ANY, m, 100)
                    except DvkError as err:
                        if err.name != "EDVSTIMEDOUT":
                            failures.append(err)
                        continue
                    held[node].append((m.m_source, m.m1_i1))
            finally:
                dvk.unbind(0, 10)

        def answer(node, dst, value):
            """What sending `value` to `dst` from the service on `node` gave (None: sent)."""
            result: queue.Queue = queue.Queue()
            todo[node].put((dst, value, result))
            return result.get(timeout=10)

        replies: dict[int, tuple] = {}

        def call(node, ep, value):
            dvk = cl.dvk(node)
            dvk.bind(0, ep)
            m = Message()
            m.m_type, m.m1_i1 = 0x0A, value
            try:
                dvk.sendrec(10, m, 20000)
                replies[ep] = (m.m1_i1, None)
            except DvkError as err:
                replies[ep] = (None, err.name)
            finally:
                dvk.unbind(0, ep)

        servers = [threading.Thread(target=hold, args=(n,), daemon=True) for n in (1, 2)]
        clients = []
        try:
            for t in servers:
                t.start()
            for n in (1, 2):
                wait_bound(cl, n, 0, 10)
            wait_status(cl, 5, lambda st: all(s["live"] for s in
                                              st["group"]["servers"].values()),
                        what="both servers live")
            for count, (node, ep, value) in enumerate(((3, 50, 1), (3, 51, 2), (4, 60, 3)), 1):
                clients.append(threading.Thread(target=call, args=(node, ep, value),
                                                daemon=True))
                clients[-1].start()
                wait_for(lambda count=count: sum(map(len, held.values())) == count, 20,
                         f"{count} requests at the servers")
            wait_for(lambda: 50 in replies, 10, "client 50's error")
            assert replies[50] == (None, "EDVSNOSPC")
            (server,) = [n for n, got in held.items() if len(got) == 2]
            (old_src, old_value), (new_src, new_value) = held[server]
            assert (old_value, new_value) == (1, 3)
            late = answer(server, old_src, old_value)   # the late reply to client 50
            sent = answer(server, new_src, new_value)
            (other,) = held[3 - server]
            assert answer(3 - server, *other) is None
            for t in clients:
                t.join(20)
            assert replies[60] == (3, None), (replies, late)      # (1: client 50's reply)
            assert sent is None, sent
            assert replies[51] == (2, None), replies
            assert late == "EDVSENDPOINT", late         # refused to the server at once
        finally:
            stop.set()
            for t in servers + clients:
                t.join(25)
        assert not failures, failures


def test_error_replies_reach_the_client_fast(tmp_path, bg):
    with cluster_from(lb_config(maxs=2), tmp_path) as cl:
        b = Background(cl, tmp_path)
        bg.append(b)
        start_servers(cl, b)
        # table full: two sessions held by slow clients, the third is refused
        for ep in (50, 51):
            b.start(4, "dvs_apps.latency", "client", 0, ep, 10, 100, 1, 0)
        wait_status(cl, 4, lambda st: len(st["group"]["sessions"]) == 2, what="2 sessions")
        c = Client(cl, 4, 60)
        try:
            _, err, took = c.call(10)
            assert err is not None and err.name == "EDVSNOSPC", err
            assert took < 1.0
        finally:
            c.close()
        # an endpoint no service covers
        dvsctl(cl, 3, "rmtbind", 0, 29, 0, "nosvc")
        c = Client(cl, 3, 60)
        try:
            _, err, took = c.call(29)
            assert err is not None and err.name == "EDVSDSTDIED", err
            assert took < 1.0
            # no server up
            cl.kill_dsp(1, signal.SIGKILL)
            cl.kill_dsp(2, signal.SIGKILL)
            wait_status(cl, 3, lambda st: not st["links"]["1"]["up"]
                        and not st["links"]["2"]["up"], what="servers down")
            _, err, took = c.call(10)
            assert err is not None and err.name == "EDVSAGAIN", err
            assert took < 1.0
        finally:
            c.close()
