"""The statistics server as an operator and a Prometheus server see it: the /metrics families
read by the real `prometheus_client` parser, the page's structure (refresh, pause, time of the
data, coloured states, captions), the /cluster view, and a bounded number of threads however
many idle connections arrive.
"""

from __future__ import annotations

import gc
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import pytest

from cluster_helpers import cluster_from, wait_for
from dsp_proxy import stats as statsmod
from dsp_proxy.cluster import REPO_ROOT, module_argv, python_env
from dsp_proxy.misc import Counters
from dvk_cffi import consts as C

parser = pytest.importorskip("prometheus_client.parser")

OPS = """
lb node0 { nodeid 0; period 2; };
server node1 { nodeid 1; rname {net}.1; };
server node2 { nodeid 2; rname {net}.2; };
client node3 { nodeid 3; rname {net}.3; };
service latency { dcid 0; ext_ep 10; min_ep 10; max_ep 19; bind external; };
"""

#: Every family /metrics may carry, with its type.
FAMILIES = {
    "dsp_info": "gauge", "dsp_uptime_seconds": "gauge", "dsp_config_reloads": "counter",
    "dsp_config_last_reload_successful": "gauge", "dsp_link_up": "gauge",
    "dsp_link_downs": "counter", "dsp_link_frames": "counter", "dsp_link_commands": "counter",
    "dsp_link_bytes": "counter", "dsp_link_errors": "counter", "dsp_link_hellos": "counter",
    "dsp_dc_messages": "counter", "dsp_dc_data_bytes": "counter", "dsp_dc_commands": "counter",
    "dsp_put2lcl_errors": "counter", "dsp_dropped_frames": "counter", "dsp_sessions": "gauge",
    "dsp_sessions_started": "counter",
    "dsp_sessions_ended": "counter", "dsp_sessions_taken_back": "counter",
    "dsp_lb_failures": "counter",
    "dsp_load_cpu_percent": "gauge", "dsp_load_level": "gauge", "dsp_server_up": "gauge",
    "dsp_server_load_level": "gauge", "dsp_server_cpu_percent": "gauge",
    "dsp_server_sessions": "gauge", "dsp_server_commands": "counter",
    "dsp_server_bytes": "counter", "dsp_programs_running": "gauge",
    "dsp_program_starts": "counter", "dsp_vm_starts": "counter", "dsp_vm_stops": "counter",
    "dsp_vm_failures": "counter",
}

FULL = {
    "node": 3, "lb_node": 0, "pid": 42, "version": "0.2.0", "taken": "2026-11-30 03:00:00 UTC",
    "uptime": 12.5, "reloads": {"ok": 1, "failed": 1, "last_error": "x.cfg:1:1: error: y"},
    "links": {
        "1": {"name": "node1", "up": True, "downs": 0,
              "sent": {"frames": 5, "commands": 6, "bytes": 700, "errors": 0, "hellos": 1,
                       "by_dc": {"0": {"messages": 2, "data_bytes": 9, "commands": 4}}},
              "received": {"frames": 4, "by_dc": {"0": {"messages": 2, "data_bytes": 0,
                                                         "commands": 3}}}},
        "2": {"name": "node2", "up": False, "downs": 3, "sent": {}, "received": {}},
    },
    "put2lcl_errors": {"EDVSNOTBIND": 3, "EDVSDSTDIED": 1},
    "dropped_frames": 2,
    "group": {
        "sessions": [{"dcid": 0, "client": "50@3", "service": "latency", "server": "10@1",
                      "relayed": False, "commands": 7, "bytes": 840}],
        "servers": {"1": {"name": "node1", "cpu": 12, "level": "BUSY", "live": True,
                          "sessions": 1, "commands": 7, "bytes": 840},
                    "2": {"name": "node2", "cpu": 0, "level": "NOTINIT", "live": False,
                          "sessions": 0, "commands": 0, "bytes": 0}},
        "load": {"cpu": 3, "level": "IDLE"}, "sessions_started": 4, "sessions_ended": 3,
        "sessions_taken_back": 1, "errors": 0, "no_server": 1, "no_service": 0, "table_full": 0,
    },
    "programs": {"running": 1, "started": 4, "failed": 2,
                 "last_error": "EDVSTIMEDOUT for endpoint 10 of DC 0"},
    "autoscaler": {"2": {"name": "node2", "starting": False, "stopping": False, "starts": 3,
                         "stops": 1, "failures": 2, "idle_for": 0, "command_running": False,
                         "last_error": "vm_start failed (status 3): domain not found"}},
}
NODES = [{"node": 0, "name": "node0", "role": "lb", "rname": ""},
         {"node": 1, "name": "node1", "role": "server", "rname": "127.0.0.1"},
         {"node": 2, "name": "node2", "role": "server", "rname": "127.0.0.2"},
         {"node": 3, "name": "node3", "role": "client", "rname": "127.0.0.3"}]


def families_of(text: str) -> dict[str, object]:
    """The families as Prometheus reads them; a name twice is an error of the exposition."""
    seen: dict[str, object] = {}
    for fam in parser.text_string_to_metric_families(text):
        assert fam.name not in seen, f"two families named {fam.name}"
        seen[fam.name] = fam
    return seen


def check_families(text: str) -> dict[str, object]:
    fams = families_of(text)
    docs = (Path(REPO_ROOT) / "docs" / "operations.md").read_text()
    for name, fam in fams.items():
        assert name in FAMILIES, f"unexpected family {name}"
        assert fam.type == FAMILIES[name], (name, fam.type)
        assert fam.documentation.strip(), f"{name} has no HELP"
        exposed = name + "_total" if fam.type == "counter" else name
        assert f"`{exposed}" in docs, f"{exposed} is not documented in docs/operations.md"
        for sample in fam.samples:
            if fam.type == "counter":
                assert sample.name == name + "_total", sample.name
            else:
                assert not sample.name.endswith("_total"), sample.name
        if "bytes" in name:
            assert name.endswith("_bytes"), name
    return fams


def test_metrics_parse_as_prometheus_families_with_help_and_types():
    fams = check_families(statsmod.render_metrics(FULL))
    assert set(fams) == set(FAMILIES)  # FULL carries every family
    put2lcl = {s.labels["code"]: s.value for s in fams["dsp_put2lcl_errors"].samples}
    assert put2lcl == {"EDVSNOTBIND": 3, "EDVSDSTDIED": 1}
    assert [s.value for s in fams["dsp_dropped_frames"].samples] == [2]
    up = {s.labels["server"]: s.value for s in fams["dsp_server_up"].samples}
    assert up == {"1": 1, "2": 0}
    assert [s.value for s in fams["dsp_config_last_reload_successful"].samples] == [0]
    info = fams["dsp_info"].samples[0].labels
    assert info == {"node": "3", "lb_node": "0", "version": "0.2.0"}
    # failed program starts and VM commands were in the status only, out of an alert's reach
    starts = {s.labels["result"]: s.value for s in fams["dsp_program_starts"].samples}
    assert starts == {"ok": 4, "failed": 2}
    assert [s.value for s in fams["dsp_programs_running"].samples] == [1]
    vm = {name: [(s.labels, s.value) for s in fams[name].samples]
          for name in ("dsp_vm_starts", "dsp_vm_stops", "dsp_vm_failures")}
    assert vm == {"dsp_vm_starts": [({"server": "2", "name": "node2"}, 3)],
                  "dsp_vm_stops": [({"server": "2", "name": "node2"}, 1)],
                  "dsp_vm_failures": [({"server": "2", "name": "node2"}, 2)]}, vm
    # and an empty DSP (no links, no LB) is valid too
    check_families(statsmod.render_metrics({"node": 1, "lb_node": -1}))


class _Page(HTMLParser):
    """The parts of a page the tests look at."""

    def __init__(self) -> None:
        super().__init__()
        self.meta_refresh = None
        self.headings: list[str] = []
        self.tables = 0
        self.captions: list[str] = []
        self.cells: list[tuple[str, str]] = []   # (class, text)
        self.links: list[str] = []
        self.time = ""
        self._in: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "meta" and a.get("http-equiv") == "refresh":
            self.meta_refresh = a.get("content")
        if tag == "table":
            self.tables += 1
        if tag == "a":
            self.links.append(a.get("href", ""))
        if tag != "meta":
            self._in.append((tag, a))

    def handle_endtag(self, tag):
        while self._in:
            if self._in.pop()[0] == tag:
                break

    def handle_data(self, data):
        if not self._in or not data.strip():
            return
        tag, a = self._in[-1]
        if tag in ("h1", "h2"):
            self.headings.append(data.strip())
        elif tag == "caption":
            self.captions.append(data.strip())
        elif tag == "td":
            self.cells.append((a.get("class", ""), data.strip()))
        elif tag == "time":
            self.time = data.strip()


def parse_page(text: str) -> _Page:
    p = _Page()
    p.feed(text)
    return p


def classes_of(page: _Page, text: str) -> list[str]:
    return [cls for cls, t in page.cells if t == text]


def test_page_structure_refresh_time_colours_and_captions():
    page = parse_page(statsmod.render_html(FULL))
    assert page.meta_refresh == str(statsmod.REFRESH)
    assert "/?pause=1" in page.links and "/cluster" in page.links
    assert page.time == "2026-11-30 03:00:00 UTC"
    assert page.headings[:2] == ["DSP of node 3", "Links"]
    assert {"Traffic per DC", "put2lcl errors", "Load balancer"} <= set(page.headings)
    assert page.tables == len(page.captions) == 5  # every table is labelled
    assert "Active sessions" in page.captions and "Servers as this DSP knows them" in \
        page.captions
    # link states coloured; the dead server is DOWN (not its stale NOTINIT), coloured too
    assert all("up" in c.split() for c in classes_of(page, "UP"))
    assert len(classes_of(page, "DOWN")) == 2  # link 2 and server 2
    assert all("down" in c.split() or "DOWN" in c.split() for c in classes_of(page, "DOWN"))
    assert classes_of(page, "BUSY") == ["l BUSY"]
    assert not classes_of(page, "NOTINIT")
    # failed program starts and VM commands, with their reasons (the text figures had them)
    html_text = statsmod.render_html(FULL)
    assert "Service programs and VMs" in page.headings
    assert "1 running, 4 started, 2 failed (last: EDVSTIMEDOUT" in html_text, html_text
    assert "VM of server node 2 (node2): 3 starts, 1 stops, 2 failed (last: vm_start " \
        "failed (status 3): domain not found)" in html_text, html_text
    paused = parse_page(statsmod.render_html(FULL, paused=True))
    assert paused.meta_refresh is None and "/" in paused.links


def test_cluster_view_lists_every_node_with_its_link_and_load():
    page = parse_page(statsmod.render_cluster(FULL, NODES))
    assert page.captions == ["Nodes of the cluster"] and page.meta_refresh
    head, rows = statsmod.cluster_rows(FULL, NODES)
    by_node = {r[0]: dict(zip(head, r)) for r in rows}
    assert set(by_node) == {"0", "1", "2", "3"}
    assert (by_node["1"]["link"], by_node["1"]["state"], by_node["1"]["cpu %"]) == \
        ("UP", "BUSY", 12)
    assert (by_node["2"]["link"], by_node["2"]["state"]) == ("DOWN", "DOWN")
    assert (by_node["3"]["link"], by_node["3"]["state"]) == ("this node", "IDLE")
    assert by_node["0"]["sessions"] == 1 and by_node["0"]["commands"] == 7


# ------------------------------------------------------------------------------ live
def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read().decode()


def threads_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"^Threads:\s+(\d+)", f.read(), re.M).group(1))


def test_live_stats_server_metrics_cluster_view_dead_server_and_idle_connections(tmp_path):
    with cluster_from(OPS, tmp_path, dsp_args=["--stats", "127.0.0.1:0"]) as cl:
        def snapshot():
            with open(cl.status_path(3)) as f:
                return json.load(f)
        deadline = time.monotonic() + 20
        while not (cl.status(3).get("stats") and all(
                s.get("live") for s in (cl.status(3).get("group") or {})
                .get("servers", {}).values()) and cl.status(3)["group"]["servers"]):
            assert time.monotonic() < deadline, cl.status(3)
            time.sleep(0.2)
        base = f"http://{snapshot()['stats']}"
        check_families(get(base + "/metrics"))
        # JSON and page carry the same figures under the same names
        snap = json.loads(get(base + "/stats.json"))
        assert set(snap["group"]["servers"]["1"]) >= {"commands", "bytes", "live", "level"}
        assert "messages" not in snap["group"]["servers"]["1"]
        assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", snap["taken"])
        cluster_page = parse_page(get(base + "/cluster"))
        assert {"node0", "node1", "node2", "node3"} <= {t for _, t in cluster_page.cells}

        # 300 idle connections: the thread count stays bounded and the page still answers
        pid = cl.dsps[3].pid
        before = threads_of(pid)
        host, port = snapshot()["stats"].split(":")
        idle = []
        try:
            for _ in range(300):
                s = socket.create_connection((host, int(port)), timeout=5)
                idle.append(s)
            time.sleep(1.0)
            t0 = time.monotonic()
            page = get(base + "/")
            took = time.monotonic() - t0
            during = threads_of(pid)
            print(f"threads: {before} before, {during} with 300 idle connections; "
                  f"page answered in {took:.3f} s")
            assert "DSP of node 3" in page
            assert during <= before + 2, (before, during)
            # the oldest idle connections were closed to keep at most MAX_WAITING waiting
            closed = 0
            for s in idle[:50]:
                s.settimeout(2)
                try:
                    closed += s.recv(1) == b""
                except (TimeoutError, OSError):
                    pass
            assert closed == 50
            # every connection has a timeout: the newest idle one and one that sent half a
            # request are closed IDLE_TIMEOUT after their connect
            slow = socket.create_connection((host, int(port)), timeout=5)
            idle.append(slow)
            slow.sendall(b"GET / HTTP/1.0\r\n")
            t0 = time.monotonic()
            for s, bound in ((idle[-2], statsmod.IDLE_TIMEOUT), (slow, statsmod.REQUEST_TIMEOUT)):
                s.settimeout(bound + 10)
                assert s.recv(1) == b""
            took = time.monotonic() - t0
            print(f"idle connection closed after {took:.1f} s (IDLE_TIMEOUT "
                  f"{statsmod.IDLE_TIMEOUT:.0f} s)")
            assert took >= statsmod.IDLE_TIMEOUT - 2
        finally:
            for s in idle:
                s.close()

        # a dead server: DOWN on the page and in /cluster, coloured
        cl.kill_dsp(2)
        deadline = time.monotonic() + 20
        while cl.status(3)["group"]["servers"]["2"]["live"]:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        page = parse_page(get(base + "/?pause=1"))
        assert page.meta_refresh is None
        down = classes_of(page, "DOWN")
        assert len(down) == 2 and all("down" in c.split() or "DOWN" in c.split()
                                      for c in down), page.cells
        head, rows = statsmod.cluster_rows(json.loads(get(base + "/stats.json")),
                                           statsmod.config_nodes(cl))  # reads .cfg
        assert dict(zip(head, rows[2]))["link"] == dict(zip(head, rows[2]))["state"] == "DOWN"
        cells = parse_page(get(base + "/cluster")).cells
        assert cells.count(("l down", "DOWN")) == 2, cells  # node 2: link and state


class _Snapshots:
    """What the statistics server needs of a DSP: its figures."""

    stats_address = ""

    def snapshot(self) -> dict:
        return FULL


def _wakeups(thread: threading.Thread) -> int:
    """How often `thread` has gone to sleep and been woken (voluntary context switches)."""
    with open(f"/proc/self/task/{thread.native_id}/status") as f:
        return int(re.search(r"^voluntary_ctxt_switches:\s+(\d+)", f.read(), re.M).group(1))


def test_an_idle_statistics_server_sleeps_until_a_client_comes():
    """With no connection waiting, the thread that reads request heads sleeps until the next
    connection instead of polling (a daemon that is idle stays idle), and that connection is
    answered; HEAD gets GET's headers without the body."""
    dsp = _Snapshots()
    server = statsmod.serve(dsp)
    try:
        waiter = next(t for t in server._threads if t.name == "stats-wait")
        url = f"http://{dsp.stats_address}/stats.json"
        assert json.loads(get(url))["node"] == FULL["node"]
        time.sleep(0.5)                     # the last connection's idle check is over
        before = _wakeups(waiter)
        time.sleep(2)
        woken = _wakeups(waiter) - before
        print(f"the waiting thread was woken {woken} times in 2 s of no clients")
        assert woken <= 1
        assert json.loads(get(url))["node"] == FULL["node"]
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"),
                                    timeout=10) as resp:
            assert resp.status == 200
            assert int(resp.headers["Content-Length"]) == len(get(url).encode())
            assert resp.read() == b""
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("thread_name, method, logged", [
    ("stats-wait", "_read_head", "reading request heads failed"),   # every request head
    ("stats", "process_request", "a connection from 127.0.0.1 failed"),   # parks each one
    ("stats", "get_request", "accepting failed"),                   # accepts each one
])
def test_a_fault_in_a_server_thread_costs_one_connection_never_the_server(
        monkeypatch, caplog, thread_name, method, logged):
    """An exception in the work of the accepting or the waiting thread (a bug, ENOMEM) is
    logged with its traceback (not printed to a stderr the operator may never see) and the
    thread goes on: without that, one exception left a server that took connections into
    its backlog (or parked them) and never answered again."""
    fired = threading.Event()
    original = getattr(statsmod.StatsServer, method)

    def faulty(*args, **kw):
        if threading.current_thread().name == thread_name and not fired.is_set():
            fired.set()
            raise RuntimeError("injected fault")
        return original(*args, **kw)

    monkeypatch.setattr(statsmod.StatsServer, method, faulty)
    dsp = _Snapshots()
    server = statsmod.serve(dsp)
    try:
        url = f"http://{dsp.stats_address}/stats.json"
        try:
            get(url)                    # the connection the fault hit may be lost
        except OSError:
            pass
        assert fired.is_set()
        for _ in range(3):
            assert json.loads(get(url))["node"] == FULL["node"]
        assert any(logged in r.getMessage() and r.exc_info for r in caplog.records)
    finally:
        server.shutdown()
        server.server_close()


def test_clients_trickling_their_requests_cannot_hold_the_handlers():
    """More slow clients than handlers, each sending its request a byte per 0.3 s for longer
    than REQUEST_TIMEOUT: another client is answered meanwhile (the handlers only ever take
    complete request heads), a trickled request that completes is answered, a head over
    MAX_HEAD bytes gets 431, and the trickling connections are closed after IDLE_TIMEOUT."""
    dsp = _Snapshots()
    server = statsmod.serve(dsp)
    host, port = dsp.stats_address.split(":")
    slow: list[socket.socket] = []
    stop = threading.Event()
    request = b"GET /stats.json HTTP/1.0\r\nX-Pad: " + b"a" * 200 + b"\r\n\r\n"

    def trickle() -> None:
        for i in range(len(request) - 1):     # never the last byte
            for s in slow:
                try:
                    s.sendall(request[i:i + 1])
                except OSError:
                    pass
            if stop.wait(0.3):
                return

    feeder = threading.Thread(target=trickle, name="trickle")
    try:
        for _ in range(statsmod.HANDLERS + 2):
            slow.append(socket.create_connection((host, int(port)), timeout=5))
        feeder.start()
        time.sleep(statsmod.REQUEST_TIMEOUT + 1)      # past any per-read timeout
        t0 = time.monotonic()
        snap = json.loads(get(f"http://{dsp.stats_address}/stats.json"))
        print(f"answered in {time.monotonic() - t0:.3f} s beside {len(slow)} trickling clients")
        assert snap["node"] == FULL["node"]

        # a request trickled in small pieces, then completed, is answered
        with socket.create_connection((host, int(port)), timeout=10) as s:
            for i in range(0, len(request), 40):
                s.sendall(request[i:i + 40])
                time.sleep(0.05)
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.0 200 "), answer[:100]

        # a head that never ends within MAX_HEAD bytes is refused with 431
        with socket.create_connection((host, int(port)), timeout=10) as s:
            try:
                s.sendall(b"GET / HTTP/1.0\r\nX-Pad: " + b"a" * (statsmod.MAX_HEAD + 10))
            except OSError:
                pass
            assert s.recv(64).startswith(b"HTTP/1.0 431 ")

        # the trickling connections end IDLE_TIMEOUT after their connect, without an answer
        for s in slow:
            s.settimeout(statsmod.IDLE_TIMEOUT + 10)
            try:
                assert s.recv(1) == b""
            except ConnectionResetError:
                pass
    finally:
        stop.set()
        if feeder.ident is not None:
            feeder.join(10)
        for s in slow:
            s.close()
        server.shutdown()
        server.server_close()


# ------------------------------------------------------------------------------ the client
class _HostileServer:
    """A loopback server that answers every connection with `answer(conn)` on its own
    thread; closed (with every connection) at the end of the `with`."""

    def __init__(self, answer) -> None:
        self.answer = answer
        self.stop = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.threads: list[threading.Thread] = []
        self.conns: list[socket.socket] = []

    def __enter__(self) -> _HostileServer:
        t = threading.Thread(target=self._accept, name="hostile-accept")
        t.start()
        self.threads.append(t)
        return self

    def _accept(self) -> None:
        while not self.stop.is_set() and len(self.threads) < 20:
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.conns.append(conn)
            t = threading.Thread(target=self._serve, args=(conn,), name="hostile")
            t.start()
            self.threads.append(t)

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.recv(4096)
            self.answer(conn, self.stop)
        except OSError:
            pass

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in list(self.threads):
            t.join(10)
        for c in self.conns:
            c.close()
        self.listener.close()


def _trickle(data: bytes):
    """An answer sent a byte per 0.5 s: each read of the client gets something in time."""
    def answer(conn: socket.socket, stop: threading.Event) -> None:
        for i in range(len(data)):
            if stop.wait(0.5):
                return
            conn.sendall(data[i:i + 1])
    return answer


def _send(data: bytes):
    def answer(conn: socket.socket, stop: threading.Event) -> None:
        conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)
        stop.wait(30)
    return answer


def _endless(conn: socket.socket, stop: threading.Event) -> None:
    """A 200 answer whose body never ends (bounded by the test: at most 64 MiB)."""
    conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n")
    chunk = b" " * 65536
    for _ in range(1024):
        if stop.is_set():
            return
        conn.sendall(chunk)


def run_client(*args: str) -> subprocess.CompletedProcess:
    """`dsp_proxy stats ARGS` as an operator runs it; a hang fails the test (TimeoutExpired)."""
    return subprocess.run(module_argv("dsp_proxy", "stats", *args), env=python_env(),
                          capture_output=True, text=True, timeout=60)


def assert_refused(res: subprocess.CompletedProcess, where: str) -> None:
    assert res.returncode == 1, (res.returncode, res.stdout[-300:], res.stderr[-1500:])
    assert "Traceback" not in res.stderr, res.stderr[-1500:]
    assert f"dsp_proxy stats: cannot read the statistics of {where}" in res.stderr, res.stderr


@pytest.mark.parametrize("answer", [
    _trickle(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n" + b" " * 200),
    _trickle(b"HTTP/1.0 200 OK\r\n" + b"X-Pad: a\r\n" * 40),
    _endless,
    _send(b"SSH-2.0-OpenSSH_9.6\r\n"),
    _send(b"HTTP/1.0 200 OK\r\n\r\n[1, 2]"),
    _send(b"HTTP/1.0 200 OK\r\n\r\n" + b"[" * 100000 + b"]" * 100000),
    _send(b'HTTP/1.0 200 OK\r\n\r\n{"node": 1, "links": {"1": "up"}}'),
    _send(b'HTTP/1.0 404 Not Found\r\n\r\nnothing here'),
], ids=["trickled-body", "trickled-headers", "endless-body", "not-http", "a-list",
        "deep", "wrong-shape", "not-found"])
def test_stats_client_ends_with_an_error_on_a_slow_or_hostile_server(answer):
    """Whatever answers at the address, `dsp_proxy stats` ends within its time limit with one
    line on stderr and status 1: never a hang, never a traceback."""
    with _HostileServer(answer) as server:
        t0 = time.monotonic()
        res = run_client(server.address)
        print(f"ended in {time.monotonic() - t0:.1f} s: {res.stderr.strip()[-200:]}")
    assert_refused(res, server.address)


def test_stats_client_refuses_files_that_are_not_a_status_file(tmp_path):
    """--file: truncated, binary, a directory, a device that never ends, a FIFO nobody writes,
    JSON of another shape, nesting deeper than the parser goes: status 1 and one line."""
    good = json.dumps(FULL)
    cases = {"truncated": good[:len(good) // 2], "list": "[1, 2]", "string": '"x"',
             "wrong-shape": '{"node": 1, "links": {"a": {}}, "uptime": "x"}',
             "deep": "[" * 100000 + "]" * 100000}
    paths = []
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        paths.append(str(tmp_path / name))
    (tmp_path / "binary").write_bytes(bytes(range(256)) * 8)
    (tmp_path / "a-directory").mkdir()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    paths += [str(tmp_path / "binary"), str(tmp_path / "a-directory"), str(fifo), "/dev/zero",
              str(tmp_path / "missing")]
    for path in paths:
        assert_refused(run_client("--file", path), path)
    # and the whole file of a real status is still read and shown (its writer, pid 42, is
    # not a running DSP: said on stderr, status 1)
    (tmp_path / "good").write_text(good)
    res = run_client("--file", str(tmp_path / "good"))
    assert res.returncode == 1 and "DSP node 3" in res.stdout, res.stderr
    assert "(pid 42) is not running" in res.stderr, res.stderr


def test_stats_of_a_status_file_whose_dsp_stopped_say_so(tmp_path):
    """A DSP leaves its last figures in its --status-file when it stops or dies, and
    `dsp_proxy stats --file` showed them as those of a running DSP (links up, exit 0).  They
    are still shown, with a line on stderr that says whose they are, and exit status 1; a
    file the running DSP no longer rewrites says so too."""
    cfg = "server node1 { nodeid 1; rname {net}.1; };\nserver node2 { nodeid 2; rname {net}.2; };"
    with cluster_from(cfg, tmp_path, only=[1]) as cl:
        path = cl.status_path(1)
        pid = cl.dsps[1].pid
        wait_for(lambda: os.path.exists(path), 20, "the status file written")
        res = run_client("--file", path)
        assert res.returncode == 0 and f"pid {pid}" in res.stdout, res.stdout + res.stderr
        cl.dsps[1].send_signal(signal.SIGSTOP)      # stuck: the file is no longer rewritten
        try:
            time.sleep(statsmod.STALE_AFTER + 1)
            res = run_client("--file", path)
        finally:
            cl.dsps[1].send_signal(signal.SIGCONT)
        assert res.returncode == 1 and "not rewritten for" in res.stderr, res.stderr
        cl.dsps[1].send_signal(signal.SIGTERM)
        assert cl.dsps[1].wait(30) == 0
        res = run_client("--file", path)
        assert res.returncode == 1 and f"pid {pid}" in res.stdout, res.stdout
        assert f"(pid {pid}) is not running: they are its last ones" in res.stderr, res.stderr
        # a reader that stops early costs no traceback
        piped = subprocess.run(" ".join(module_argv("dsp_proxy", "stats", "--file", path))
                               + " | head -n 1", shell=True, env=python_env(),
                               capture_output=True, text=True, timeout=60)
        assert "Traceback" not in piped.stderr and "BrokenPipe" not in piped.stderr, \
            piped.stderr


FLOOD = """
import collections, socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
held, made, end = collections.deque(), 0, time.monotonic() + float(sys.argv[3])
while time.monotonic() < end and made < 20000:
    try:
        held.append(socket.create_connection((host, port), timeout=2))
        made += 1
    except OSError:
        time.sleep(0.01)
    if len(held) > 300:
        held.popleft().close()
print(made)
"""


def test_a_complete_request_is_answered_beside_a_flood_of_idle_connections():
    """Two other processes open idle connections as fast as they can (at most 300 open each)
    for 5 s: the oldest idle ones are dropped to keep at most MAX_WAITING waiting, but a
    client whose request has arrived is answered, not dropped with them.  A client that was
    descheduled between its connect and its send is, until it sends, one more idle
    connection and may be dropped: it is answered when it asks again."""
    dsp = _Snapshots()
    server = statsmod.serve(dsp)
    host, port = dsp.stats_address.split(":")
    floods = [subprocess.Popen([sys.executable, "-c", FLOOD, host, port, "5"],
                               stdout=subprocess.PIPE, text=True) for _ in range(2)]
    failed, done, made, retried = [], 0, [], 0
    try:
        time.sleep(0.5)
        while done < 300 and any(f.poll() is None for f in floods):
            for attempt in range(2):
                try:
                    json.loads(get(f"http://{dsp.stats_address}/stats.json"))
                    break
                except (OSError, ValueError) as exc:
                    if attempt:
                        failed.append(repr(exc))
                    else:
                        retried += 1
            done += 1
            time.sleep(0.02)
        made = [f.communicate(timeout=15)[0].strip() for f in floods]
    finally:
        for f in floods:
            if f.poll() is None:
                f.kill()
                f.wait()
        server.shutdown()
        server.server_close()
    print(f"{len(failed)} of {done} requests failed beside the flood, {retried} asked twice "
          f"({made} connections)")
    assert not failed, failed[:3]


def test_figures_are_read_while_a_receiver_counts_its_first_frames_of_new_dcs():
    """The statistics (a handler thread, the status file on the main loop) read a link's
    counters while its receiver counts: a DC counted for the first time meanwhile must not
    make the read fail (the snapshot would be lost: no answer, no status file).  A garbage
    collection started while a read builds objects can run Python code (a finalizer, here a gc
    callback) and so hand the GIL to the receiver in the middle of the read: the callback makes
    that hand-off happen at every collection instead of now and then."""
    counters = Counters()
    stop = threading.Event()
    old = sys.getswitchinterval()

    def yield_gil(phase: str, _info: dict) -> None:
        if phase == "start":
            time.sleep(0)

    def receiver() -> None:
        for dcid in range(200_000):
            if stop.is_set():
                return
            counters.count(C.CMD_COPYIN_DATA, 100, dcid=dcid, data=80)

    t = threading.Thread(target=receiver, name="counting")
    failures = reads = 0
    sys.setswitchinterval(1e-6)
    gc.callbacks.append(yield_gil)
    try:
        t.start()
        deadline = time.monotonic() + 10
        while t.is_alive() and time.monotonic() < deadline:
            try:
                counters.as_dict()
            except RuntimeError:
                failures += 1
            reads += 1
    finally:
        stop.set()
        t.join(10)
        gc.callbacks.remove(yield_gil)
        sys.setswitchinterval(old)
    print(f"{failures} of {reads} reads failed")
    assert reads and not failures


def test_stats_client_never_prints_control_characters(tmp_path):
    """Names in the figures come from a config or from whatever answered: an escape sequence
    among them is shown escaped, never sent to the operator's terminal."""
    snap = json.loads(json.dumps(FULL))
    evil = "node\x1b]0;owned\x07\x1b[2J\x9b31m"
    for link in snap["links"].values():
        link["name"] = evil
    snap["version"] = "1.0\rX"
    (tmp_path / "evil").write_text(json.dumps(snap))
    res = run_client("--file", str(tmp_path / "evil"))
    assert res.returncode == 1 and "(pid 42) is not running" in res.stderr, res.stderr
    assert not re.search(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]", res.stdout), repr(res.stdout[:300])
    assert "node\\x1b]0;owned\\x07\\x1b[2J\\x9b31m" in res.stdout


IDLE_PAIR = """
server node1 { nodeid 1; rname {net}.1; };
client node2 { nodeid 2; rname {net}.2; };
"""


def test_hellos_are_frames_not_commands_on_both_sides(tmp_path):
    """An idle link carries only HELLOs: each side counts them as frames and hellos, never as
    DVK commands or a DC's traffic, whether it sent or received them."""
    from cluster_helpers import wait_for
    with cluster_from(IDLE_PAIR, tmp_path) as cl:
        def both_heard():
            sts = {n: cl.status(n) for n in (1, 2)}
            ok = all(st.get("links") and next(iter(st["links"].values()))["received"]["hellos"]
                     and next(iter(st["links"].values()))["sent"]["hellos"]
                     for st in sts.values())
            return sts if ok else None
        sts = wait_for(both_heard, 20, "HELLOs sent and received on both sides")
    for n, st in sts.items():
        (link,) = st["links"].values()
        for side in ("sent", "received"):
            c = link[side]
            assert c["hellos"] >= 1 and c["frames"] >= c["hellos"], (n, side, c)
            assert c["commands"] == 0 and c["by_dc"] == {}, (n, side, c)
