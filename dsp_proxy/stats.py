"""Statistics of a running DSP (the C `dsp_pws`, which never ran, made real).

`dsp_proxy --stats [ADDR:]PORT` serves, on 127.0.0.1 unless ADDR says otherwise (GET, and HEAD
for the headers alone):

- `/`            a human page: links (state, frames, commands, bytes, errors per direction and
                 per DC), put2lcl errors, LB sessions and servers (load levels), uptime; it
                 reloads itself every REFRESH seconds (`?pause=1` stops that);
- `/cluster`     every node of the config as this DSP knows it: its link, load and sessions
                 (on the LB host: the whole cluster on one page);
- `/stats.json`  the same figures as JSON (`Dsp.snapshot()`, the status file's content);
- `/metrics`     the Prometheus text exposition format (version 0.0.4), written here by hand.

Counts use one vocabulary everywhere (page, JSON, metrics, `dsp_proxy stats`, the demo):
*frames* are what crosses a TCP link; *commands* are DVK commands (one 120-byte header each:
requests, replies, copies, ACKs; a batch frame carries several); *messages* are the commands
that carry a message (SEND, SNDREC, REPLY: the C `nr_msgs`); a *round trip* is a request and
its reply; a *session* is one client endpoint pinned to one server.

The server is a bounded pool: one thread accepts, one reads (with a selector, no thread per
connection) until a connection has sent its whole request head, HANDLERS threads answer; at
most MAX_WAITING connections wait (beyond them the oldest goes: answered if its head has
arrived, else closed), each at most IDLE_TIMEOUT seconds from its connect for its head (at
most MAX_HEAD bytes), and a handler gives a slow reader at most REQUEST_TIMEOUT
seconds to take the answer.  A handler never waits for a client's bytes, so a few clients
that trickle their requests a byte at a time cannot hold the handlers.  A failure in any of
these threads' work (a bug, out of descriptors or memory) is logged and costs the connection
it hit; the thread goes on after a pause.

No output carries a secret: the snapshot holds no ssh_* value of the config at all.

`dsp_proxy stats [ADDR:PORT]` (also `python -m dsp_proxy.stats`) prints the figures of a
running DSP on the terminal, read from its `/stats.json` (or from a `--status-file` with
`--file PATH`); it ends with an error line when the whole answer has not come within 5 s, or
when what came is not the figures of a DSP.
"""

from __future__ import annotations

import argparse
import html
import http.client
import io
import json
import logging
import os
import queue
import re
import selectors
import socket
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, HTTPServer

from .misc import EXHAUSTED, read_regular_file, runs_dsp_proxy

log = logging.getLogger("dsp.stats")

DEFAULT_HOST = "127.0.0.1"
#: The C statistics servers listened on 4000 + node id (sender); the default of the client.
DEFAULT_ADDRESS = "127.0.0.1:4000"
LEVELS = {"NOTINIT": -1, "IDLE": 0, "BUSY": 1, "SATURATED": 2}
#: Seconds between the page's own reloads.
REFRESH = 2
HANDLERS = 4
MAX_WAITING = 64
IDLE_TIMEOUT = 10.0
#: After accept() failed for want of descriptors or memory, the server waits this long.
EXHAUSTED_PAUSE = 0.5
#: After a failure of a server thread's own work (a bug), it goes on after this long.
FAILURE_PAUSE = 0.5
REQUEST_TIMEOUT = 5.0
#: Bytes of a request head (request line and headers) the server reads before it answers 431.
MAX_HEAD = 16384
_HEAD_ENDS = (b"\r\n\r\n", b"\n\n")
_TOO_LARGE_BODY = f"request head over {MAX_HEAD} bytes\n".encode()
_TOO_LARGE = (b"HTTP/1.0 431 Request Header Fields Too Large\r\nContent-Type: text/plain\r\n"
              + f"Content-Length: {len(_TOO_LARGE_BODY)}\r\n\r\n".encode() + _TOO_LARGE_BODY)
DIRECTIONS = (("sent", "out"), ("received", "in"))


def parse_address(text: str) -> tuple[str, int]:
    """`PORT` (on 127.0.0.1) or `ADDR:PORT`; port 0 asks the kernel for a free one."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host = DEFAULT_HOST
    host = host.strip("[]") or DEFAULT_HOST
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"{text!r} is not [ADDR:]PORT") from None
    if not 0 <= number <= 65535:
        raise ValueError(f"port {number} outside 0..65535")
    return host, number


# ------------------------------------------------------------------------------ the server
class _Handler(BaseHTTPRequestHandler):
    server_version = "dsp_proxy"
    protocol_version = "HTTP/1.0"
    timeout = REQUEST_TIMEOUT

    def setup(self) -> None:
        """The request is (socket, head): the head was read whole by the waiting thread."""
        self.request, head = self.request
        super().setup()
        self.rfile = io.BytesIO(head)

    def do_GET(self) -> None:  # the http.server naming
        self._answer(with_body=True)

    def do_HEAD(self) -> None:  # the http.server naming
        """What GET would answer, without the body (monitors that check a URL with HEAD)."""
        self._answer(with_body=False)

    def _answer(self, with_body: bool) -> None:
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query)
        path = url.path
        dsp = self.server.dsp
        snapshot = dsp.snapshot()
        if path in ("/", "/index.html"):
            paused = query.get("pause", ["0"])[0] not in ("", "0")
            body, ctype = render_html(snapshot, paused), "text/html; charset=utf-8"
        elif path == "/cluster":
            paused = query.get("pause", ["0"])[0] not in ("", "0")
            body = render_cluster(snapshot, config_nodes(dsp), paused)
            ctype = "text/html; charset=utf-8"
        elif path == "/stats.json":
            body = json.dumps(snapshot, indent=1, default=str, sort_keys=True)
            ctype = "application/json"
        elif path == "/metrics":
            body, ctype = render_metrics(snapshot), "text/plain; version=0.0.4; charset=utf-8"
        else:
            self.send_error(404, "not found (try /, /cluster, /stats.json, /metrics)")
            return
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        if with_body:
            self.wfile.write(data)

    def log_message(self, fmt: str, *args) -> None:
        log.debug("stats %s: " + fmt, self.client_address[0], *args)


class StatsServer(HTTPServer):
    """HTTP with a fixed number of threads however many clients connect (see the module
    docstring): connections wait in a selector until their request head is complete and are
    closed when it is not after IDLE_TIMEOUT."""

    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, dsp, address: tuple[str, int]) -> None:
        self.dsp = dsp
        self._stop = threading.Event()
        self._selector = selectors.DefaultSelector()
        self._waiting: dict[socket.socket, tuple[float, object, bytearray]] = {}
        self._wlock = threading.Lock()
        self._ready: queue.Queue = queue.Queue(maxsize=MAX_WAITING)
        # the accepting thread's nudge: the waiting thread sleeps in select() with no
        # timeout while no connection waits, and wakes at once for a new one
        self._wake_r, self._wake_w = socket.socketpair()
        for s in (self._wake_r, self._wake_w):
            s.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        try:
            super().__init__(address, _Handler)
        except OSError as exc:
            raise OSError(exc.errno, f"statistics server on {address[0]}:{address[1]}: "
                                     f"{exc.strerror}") from None
        self._threads = [threading.Thread(target=self._wait_loop, name="stats-wait",
                                          daemon=True)]
        self._threads += [threading.Thread(target=self._handle_loop, name=f"stats-{i}",
                                           daemon=True) for i in range(HANDLERS)]
        for t in self._threads:
            t.start()

    def get_request(self):
        """Accepting thread: accept(); out of descriptors or memory, pause before the next
        try (the connection stays in the backlog and the socket readable: retrying at once
        would spin)."""
        try:
            return super().get_request()
        except OSError as exc:
            if exc.errno in EXHAUSTED:
                log.error("stats: cannot accept a connection: %s; accepting again in %.1f s",
                          exc.strerror, EXHAUSTED_PAUSE)
                self._stop.wait(EXHAUSTED_PAUSE)
            raise

    def process_request(self, request, client_address) -> None:
        """Accepting thread: park the connection until it has sent its request head.  When
        MAX_WAITING already wait, the oldest goes: served if its whole head has arrived
        (the waiting thread may not have read it yet), else closed."""
        with self._wlock:
            if len(self._waiting) >= MAX_WAITING:
                oldest = min(self._waiting, key=lambda s: self._waiting[s][0])
                self._read_head(oldest)
                if oldest in self._waiting:
                    self._drop(oldest)
            request.setblocking(False)
            self._waiting[request] = (time.monotonic(), client_address, bytearray())
            self._selector.register(request, selectors.EVENT_READ)
            self._wake()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:     # full: a nudge is already pending; closed: shutting down
            pass

    def _drop(self, sock: socket.socket) -> None:
        self._waiting.pop(sock, None)
        try:
            self._selector.unregister(sock)
        except (KeyError, ValueError):
            pass
        self.shutdown_request(sock)

    def _wait_loop(self) -> None:
        """Waiting thread: read request heads until stopped.  A failure of one pass (a bug,
        ENOMEM from the selector) is logged and the loop goes on after a pause: a dead waiting
        thread would leave a server that accepts connections and never answers them."""
        while not self._stop.is_set():
            try:
                self._wait_once()
            except Exception:  # the server outlives a bug in one pass
                log.exception("stats: reading request heads failed; going on in %.1f s",
                              FAILURE_PAUSE)
                self._stop.wait(FAILURE_PAUSE)

    def _wait_once(self) -> None:
        with self._wlock:
            waiting = bool(self._waiting)
        events = self._selector.select(0.2 if waiting else None)
        now = time.monotonic()
        with self._wlock:
            for key, _ in events:
                sock = key.fileobj
                if sock is self._wake_r:
                    try:
                        sock.recv(4096)
                    except OSError:
                        pass
                elif sock in self._waiting:
                    try:
                        self._read_head(sock)
                    except Exception:   # that connection goes, the others stay
                        self._drop(sock)
                        raise
            for sock in [s for s, (t, _, _) in self._waiting.items()
                         if now - t > IDLE_TIMEOUT]:
                self._drop(sock)

    def serve(self) -> None:
        """Accepting thread: `serve_forever` until `shutdown`; a failure of it is logged and
        it starts again after a pause (a dead accepting thread would leave the port taking
        connections into its backlog for ever)."""
        while not self._stop.is_set():
            try:
                self.serve_forever(poll_interval=0.5)
                return
            except Exception:  # the server outlives a bug in one pass
                log.exception("stats: accepting failed; going on in %.1f s", FAILURE_PAUSE)
                self._stop.wait(FAILURE_PAUSE)

    def handle_error(self, request, client_address) -> None:
        """process_request failed: that connection is closed (socketserver's default prints
        to stderr, which a daemon's operator may never see)."""
        log.error("stats: a connection from %s failed", client_address[0], exc_info=True)

    def _read_head(self, sock: socket.socket) -> None:
        """Waiting thread, under _wlock: take what the client sent; a complete (or oversized)
        head goes to the handlers, a closed or failed connection is dropped."""
        _, addr, head = self._waiting[sock]
        try:
            data = sock.recv(MAX_HEAD + 1 - len(head))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(sock)
            return
        head += data
        if len(head) <= MAX_HEAD and not any(end in head for end in _HEAD_ENDS):
            return
        del self._waiting[sock]
        self._selector.unregister(sock)
        try:
            self._ready.put_nowait((sock, addr, bytes(head)))
        except queue.Full:
            self.shutdown_request(sock)

    def _handle_loop(self) -> None:
        while True:
            item = self._ready.get()
            if item is None:
                return
            sock, addr, head = item
            try:
                sock.settimeout(REQUEST_TIMEOUT)
                if len(head) > MAX_HEAD:
                    sock.sendall(_TOO_LARGE)
                else:
                    self.finish_request((sock, head), addr)
            except Exception:  # one bad client costs its connection, never the thread
                log.debug("stats: request from %s failed", addr[0], exc_info=True)
            finally:
                self.shutdown_request(sock)

    def shutdown(self) -> None:
        """Stop accepting, end the waiting and handler threads, close parked connections."""
        super().shutdown()
        if self._stop.is_set():
            return
        self._stop.set()
        self._wake()
        for _ in range(HANDLERS):
            self._ready.put(None)
        for t in self._threads:
            t.join(2.0)
        with self._wlock:
            for sock in list(self._waiting):
                self._drop(sock)
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()


def serve(dsp, host: str = DEFAULT_HOST, port: int = 0) -> StatsServer:
    """Start the statistics server on a daemon thread; `dsp` needs only `snapshot()` (and gets
    `stats_address`).  Raises OSError naming the address when it cannot be bound."""
    server = StatsServer(dsp, (host, port))
    addr = f"{server.server_address[0]}:{server.server_address[1]}"
    dsp.stats_address = addr
    threading.Thread(target=server.serve, name="stats", daemon=True).start()
    log.info("statistics on http://%s/ (/cluster, /stats.json, /metrics)", addr)
    return server


def config_nodes(dsp) -> list[dict]:
    """The nodes of the running config (id, name, role, rname) for the /cluster view."""
    cfg = getattr(dsp, "cfg", None)
    if cfg is None:
        return []
    nodes = [{"node": n.nodeid, "name": n.name, "role": n.role, "rname": n.rname}
             for n in cfg.nodes]
    if cfg.lb is not None:
        nodes.append({"node": cfg.lb.nodeid, "name": cfg.lb.name, "role": "lb",
                      "rname": ""})
    return sorted(nodes, key=lambda n: n["node"])


# ------------------------------------------------------------------------------ Prometheus
def _escape_label(value) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


class _Metrics:
    """Families in order, each with its HELP and TYPE once, then its samples."""

    def __init__(self) -> None:
        self.families: dict[str, tuple[str, str, list[str]]] = {}

    def add(self, name: str, mtype: str, help_text: str, value, /, **labels) -> None:
        fam = self.families.setdefault(name, (mtype, help_text, []))
        if labels:
            inner = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels.items())
            sample = f"{name}{{{inner}}}"
        else:
            sample = name
        fam[2].append(f"{sample} {_number(value)}")

    def text(self) -> str:
        out = []
        for name, (mtype, help_text, samples) in self.families.items():
            out.append(f"# HELP {name} {_escape_help(help_text)}")
            out.append(f"# TYPE {name} {mtype}")
            out.extend(samples)
        return "\n".join(out) + "\n"


def _number(value) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    v = float(value)
    if v != v:
        return "NaN"
    if v in (float("inf"), float("-inf")):
        return "+Inf" if v > 0 else "-Inf"
    return repr(v)


def render_metrics(snap: dict) -> str:
    m = _Metrics()
    node = snap.get("node")
    m.add("dsp_info", "gauge", "Constant 1, labelled with this DSP's node, LB node and "
          "version.", 1, node=node, lb_node=snap.get("lb_node"),
          version=snap.get("version", ""))
    m.add("dsp_uptime_seconds", "gauge", "Seconds since this dsp_proxy started.",
          float(snap.get("uptime", 0)))
    reloads = snap.get("reloads") or {}
    for result in ("ok", "failed"):
        m.add("dsp_config_reloads_total", "counter", "Configuration reloads (SIGHUP) by result.",
              reloads.get(result, 0), result=result)
    m.add("dsp_config_last_reload_successful", "gauge",
          "1 when the last reload succeeded (or none was tried), 0 when it failed.",
          0 if reloads.get("last_error") else 1)
    links = snap.get("links") or {}
    for peer, link in links.items():
        m.add("dsp_link_up", "gauge", "1 when both directions of the link to the peer are up.",
              bool(link.get("up")), peer=peer, name=link.get("name", ""))
    for peer in _failed_pairs(snap):
        m.add("dsp_link_up", "gauge", "1 when both directions of the link to the peer are up.",
              0, peer=peer, name="")
    for peer in snap.get("failed_pairs") or ():
        m.add("dsp_pair_failed", "gauge", "1 while the peer's proxy pair is marked failed "
              "(its threads died too often; started again later or at a reload).", 1,
              peer=peer)
    for peer, link in links.items():
        m.add("dsp_link_downs_total", "counter", "Times the link to the peer went down.",
              link.get("downs", 0), peer=peer)
    counters = (("frames", "dsp_link_frames_total", "Frames on the link."),
                ("commands", "dsp_link_commands_total", "DVK commands on the link (a batch "
                 "frame carries several)."),
                ("bytes", "dsp_link_bytes_total", "Bytes on the link, headers included."),
                ("errors", "dsp_link_errors_total", "Errors on the link's sender or receiver."),
                ("hellos", "dsp_link_hellos_total", "HELLO and load-report frames (no DC "
                 "traffic)."))
    for key, name, help_text in counters:
        for peer, link in links.items():
            for field, direction in DIRECTIONS:
                figures = link.get(field) or {}
                m.add(name, "counter", help_text + " direction=out: sent to the peer.",
                      figures.get(key, 0), peer=peer, direction=direction)
    per_dc = (("messages", "dsp_dc_messages_total",
               "Commands that carry a message (SEND, SNDREC, REPLY) per DC (the C nr_msgs)."),
              ("data_bytes", "dsp_dc_data_bytes_total",
               "COPYIN/COPYOUT payload bytes per DC (the C nr_data)."),
              ("commands", "dsp_dc_commands_total", "Commands per DC (the C nr_cmd)."))
    for key, name, help_text in per_dc:
        for peer, link in links.items():
            for field, direction in DIRECTIONS:
                for dcid, fig in sorted(((link.get(field) or {}).get("by_dc") or {}).items(),
                                        key=lambda kv: int(kv[0])):
                    m.add(name, "counter", help_text, fig.get(key, 0), peer=peer,
                          direction=direction, dcid=dcid)
    errors = snap.get("put2lcl_errors") or {}
    for code, n in sorted(errors.items()):
        m.add("dsp_put2lcl_errors_total", "counter",
              "put2lcl deliveries that failed, by EDVS error code.", n, code=code)
    m.add("dsp_dropped_frames_total", "counter",
          "Routed frames with nowhere to go: refused by a link with no request to answer, "
          "or by the full put2lcl queue.", snap.get("dropped_frames", 0))
    group = snap.get("group")
    if group:
        m.add("dsp_sessions", "gauge", "Active LB sessions held by this DSP.",
              len(group.get("sessions") or ()))
        for key in ("sessions_started", "sessions_ended", "sessions_taken_back"):
            m.add(f"dsp_{key}_total", "counter", f"LB {key.replace('_', ' ')}.",
                  group.get(key, 0))
        for kind in ("errors", "no_server", "no_service", "table_full"):
            m.add("dsp_lb_failures_total", "counter",
                  "LB requests that got an error reply, by reason.", group.get(kind, 0),
                  reason=kind)
        load = group.get("load") or {}
        m.add("dsp_load_cpu_percent", "gauge", "This node's measured CPU use.",
              load.get("cpu", 0))
        m.add("dsp_load_level", "gauge",
              "This node's load level (-1 NOTINIT, 0 IDLE, 1 BUSY, 2 SATURATED).",
              LEVELS.get(load.get("level"), -1))
        servers = group.get("servers") or {}
        for sid, srv in servers.items():
            m.add("dsp_server_up", "gauge", "1 when the server is usable (link up, load "
                  "reported), 0 when it is DOWN.", bool(srv.get("live")), server=sid,
                  name=srv.get("name", ""))
        gauges = (("dsp_server_load_level", "level",
                   "Reported load level of a server (-1 NOTINIT, 0 IDLE, 1 BUSY, 2 SATURATED)."),
                  ("dsp_server_cpu_percent", "cpu", "Reported CPU use of a server."),
                  ("dsp_server_sessions", "sessions", "Active sessions on a server."))
        for name, key, help_text in gauges:
            for sid, srv in servers.items():
                value = LEVELS.get(srv.get(key), -1) if key == "level" else srv.get(key, 0)
                m.add(name, "gauge", help_text, value, server=sid, name=srv.get("name", ""))
        for name, key, help_text in (
                ("dsp_server_commands_total", "commands",
                 "Commands of clients this DSP forwarded to a server."),
                ("dsp_server_bytes_total", "bytes",
                 "Bytes (headers included) this DSP forwarded to a server.")):
            for sid, srv in servers.items():
                m.add(name, "counter", help_text, srv.get(key, 0), server=sid)
    _elastic_metrics(m, snap)
    return m.text()


def _elastic_metrics(m: _Metrics, snap: dict) -> None:
    """Service programs and VM commands: their failures were in the status and the text
    figures only, out of reach of an alert on the metrics."""
    progs = snap.get("programs")
    if progs:
        m.add("dsp_programs_running", "gauge", "Service programs (prog) running on this "
              "server for sessions.", progs.get("running", 0))
        for result, key in (("ok", "started"), ("failed", "failed")):
            m.add("dsp_program_starts_total", "counter", "Service program starts by result "
                  "(failed: did not run, exited or did not bind within 5 s).",
                  progs.get(key, 0), result=result)
    vms = snap.get("autoscaler") or {}
    for what in ("starts", "stops"):
        for sid, vm in vms.items():
            m.add(f"dsp_vm_{what}_total", "counter", f"VM {what} (vm_{what[:-1]}) this DSP "
                  "ran for a server.", vm.get(what, 0), server=sid, name=vm.get("name", ""))
    for sid, vm in vms.items():
        m.add("dsp_vm_failures_total", "counter", "Failed VM commands of a server, and starts "
              "whose node never came up.", vm.get("failures", 0), server=sid,
              name=vm.get("name", ""))


# ------------------------------------------------------------------------------ HTML page
_CSS = """body{font-family:sans-serif;margin:1em;color:#222}
table{border-collapse:collapse;margin:.3em 0 1em}
caption{text-align:left;font-weight:bold;padding:.2em 0}
td,th{border:1px solid #999;padding:2px 8px;text-align:right}th{background:#ddd}
td.l,th.l{text-align:left}
.up,.IDLE{background:#cfc;color:#060;font-weight:bold}
.down,.DOWN,.SATURATED{background:#fcc;color:#a00;font-weight:bold}
.BUSY{background:#fe9;color:#850;font-weight:bold}.NOTINIT,.self{color:#777}
.meta{color:#555}nav a{margin-right:1em}"""

#: States that get a colour: (text, CSS class) cells.
STATE_CLASSES = {"UP": "up", "DOWN": "down", "IDLE": "IDLE", "BUSY": "BUSY",
                 "SATURATED": "SATURATED", "NOTINIT": "NOTINIT", "this node": "self"}


def _cell(x, first: bool) -> str:
    text = str(x)
    cls = STATE_CLASSES.get(text)
    if cls is None and (first or isinstance(x, str)):
        cls = "l"
    elif cls is not None:
        cls = f"l {cls}"
    attr = f' class="{cls}"' if cls else ""
    return f"<td{attr}>{html.escape(text)}</td>"


def _table(head: list[str], rows: list[list], caption: str = "") -> str:
    h = "".join(f"<th>{html.escape(str(x))}</th>" for x in head)
    body = ["<tr>" + "".join(_cell(x, i == 0) for i, x in enumerate(row)) + "</tr>"
            for row in rows]
    if not rows:
        body.append(f"<tr><td class='l' colspan='{len(head)}'>(none)</td></tr>")
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return f"<table>{cap}<tr>{h}</tr>{''.join(body)}</table>"


def _page(title: str, snap: dict, paused: bool, here: str, body: list[str]) -> str:
    """The frame of every page: title, refresh (unless paused), when the data was taken."""
    e = html.escape
    refresh = "" if paused else f"<meta http-equiv='refresh' content='{REFRESH}'>"
    toggle = (f"<a href='{here}'>resume auto-refresh</a> (paused)" if paused else
              f"<a href='{here}?pause=1'>pause</a> (refreshes every {REFRESH} s)")
    taken = snap.get("taken") or time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    return "\n".join(
        [f"<!DOCTYPE html><html><head><meta charset='utf-8'>{refresh}"
         f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
         f"<h1>{e(title)}</h1>",
         f"<p class='meta'>data taken at <time id='taken'>{e(str(taken))}</time> &middot; "
         f"{toggle}</p>",
         "<nav><a href='/'>this node</a><a href='/cluster'>cluster</a>"
         "<a href='/stats.json'>/stats.json</a><a href='/metrics'>/metrics</a></nav>",
         *body, "</body></html>"])


def render_html(snap: dict, paused: bool = False) -> str:
    e = html.escape
    node = snap.get("node")
    held = _cpu_latency(snap)
    parts = [f"<p>LB node {e(str(snap.get('lb_node')))} &middot; pid {e(str(snap.get('pid')))}"
             f" &middot; up {e(_duration(snap.get('uptime', 0)))} &middot; version "
             f"{e(str(snap.get('version', '?')))} &middot; config "
             f"{e(str((snap.get('config') or {}).get('path', '')))}"
             f"{f' &middot; {e(held)}' if held else ''}</p>"]
    reloads = snap.get("reloads") or {}
    parts.append(f"<p>reloads: {reloads.get('ok', 0)} ok, {reloads.get('failed', 0)} failed"
                 + (f" (last error: {e(str(reloads['last_error']))})"
                    if reloads.get("last_error") else "") + "</p>")
    parts.append("<h2>Links</h2>")
    parts.append(_table(*link_rows(snap), caption="Links to the peers: frames, commands and "
                        "bytes each way"))
    parts.append("<h2>Traffic per DC</h2>")
    parts.append(_table(*dc_rows(snap), caption="Per DC and direction (the C dsp_pws table)"))
    errors = snap.get("put2lcl_errors") or {}
    if errors:
        parts.append("<h2>put2lcl errors</h2>")
        parts.append(_table(["code", "count"], [[k, v] for k, v in sorted(errors.items())],
                            caption="Local deliveries that failed, by error code"))
    group = snap.get("group")
    if group:
        parts.append("<h2>Load balancer</h2>")
        load = group.get("load") or {}
        parts.append(f"<p>this node: cpu {e(str(load.get('cpu')))}% level "
                     f"{e(str(load.get('level')))}; sessions started "
                     f"{group.get('sessions_started', 0)}, ended {group.get('sessions_ended', 0)}"
                     f", no server {group.get('no_server', 0)}</p>")
        parts.append(_table(*server_rows(snap), caption="Servers as this DSP knows them"))
        parts.append(_table(*session_rows(snap), caption="Active sessions"))
    elastic = [line for line in _elastic_lines(snap) if line]
    if elastic:     # failed program starts and VM commands: the text figures had them only
        parts.append("<h2>Service programs and VMs</h2>")
        parts.extend(f"<p>{e(line)}</p>" for line in elastic)
    return _page(f"DSP of node {node}", snap, paused, "/", parts)


def render_cluster(snap: dict, nodes: list[dict], paused: bool = False) -> str:
    """Every node of the config as this DSP knows it (its links and the servers' loads)."""
    parts = ["<p>Each node's link is this DSP's link to it; the load of a server is the one it "
             "last reported to this DSP.</p>",
             _table(*cluster_rows(snap, nodes), caption="Nodes of the cluster")]
    return _page(f"DVS cluster seen from node {snap.get('node')}", snap, paused, "/cluster",
                 parts)


# ------------------------------------------------------------------------------ tables
def _duration(seconds) -> str:
    s = int(float(seconds or 0))
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    mi, s = divmod(s, 60)
    return (f"{d}d " if d else "") + f"{h:02d}:{mi:02d}:{s:02d}"


def link_rows(snap: dict) -> tuple[list[str], list[list]]:
    head = ["peer", "name", "state", "downs", "frames out", "commands out", "bytes out",
            "frames in", "commands in", "bytes in", "errors"]
    rows = []
    for peer, link in sorted((snap.get("links") or {}).items(), key=lambda kv: int(kv[0])):
        s, r = link.get("sent") or {}, link.get("received") or {}
        rows.append([str(peer), link.get("name", ""), "UP" if link.get("up") else "DOWN",
                     link.get("downs", 0), s.get("frames", 0), s.get("commands", 0),
                     s.get("bytes", 0), r.get("frames", 0), r.get("commands", 0),
                     r.get("bytes", 0), s.get("errors", 0) + r.get("errors", 0)])
    for peer in _failed_pairs(snap):   # a failed pair's link is gone: its row says why
        rows.append([str(peer), "", "FAILED"] + [""] * (len(head) - 3))
    return head, rows


def _failed_pairs(snap: dict) -> list[int]:
    """The peers whose proxy pair the supervisor marked failed and that have no link now
    (it is started again later, or at a reload)."""
    links = {str(peer) for peer in snap.get("links") or {}}
    return [p for p in snap.get("failed_pairs") or () if str(p) not in links]


def dc_rows(snap: dict) -> tuple[list[str], list[list]]:
    """The C dsp_pws table (snode, dnode, dcid, nr_msgs, nr_data, nr_cmd), both directions."""
    head = ["snode", "dnode", "dcid", "messages", "data bytes", "commands"]
    rows = []
    node = snap.get("node")
    for peer, link in sorted((snap.get("links") or {}).items(), key=lambda kv: int(kv[0])):
        for field, _ in DIRECTIONS:
            ends = (node, peer) if field == "sent" else (peer, node)
            for dcid, fig in sorted(((link.get(field) or {}).get("by_dc") or {}).items(),
                                    key=lambda kv: int(kv[0])):
                rows.append([str(ends[0]), str(ends[1]), int(dcid), fig.get("messages", 0),
                             fig.get("data_bytes", 0), fig.get("commands", 0)])
    return head, rows


def server_state(srv: dict) -> str:
    """A server's state for people: DOWN when it is not usable, else its load level."""
    return str(srv.get("level", "")) if srv.get("live", True) else "DOWN"


def server_rows(snap: dict) -> tuple[list[str], list[list]]:
    head = ["server", "name", "state", "cpu %", "sessions", "commands", "bytes"]
    servers = ((snap.get("group") or {}).get("servers") or {})
    rows = [[str(sid), s.get("name", ""), server_state(s), s.get("cpu", 0),
             s.get("sessions", 0), s.get("commands", 0), s.get("bytes", 0)]
            for sid, s in sorted(servers.items(), key=lambda kv: int(kv[0]))]
    return head, rows


def session_rows(snap: dict) -> tuple[list[str], list[list]]:
    head = ["client", "dcid", "service", "server", "relayed", "commands", "bytes"]
    sessions = ((snap.get("group") or {}).get("sessions") or [])
    rows = [[s.get("client", ""), s.get("dcid", 0), s.get("service", ""), s.get("server", ""),
             "yes" if s.get("relayed") else "no", s.get("commands", 0), s.get("bytes", 0)]
            for s in sessions]
    return head, rows


def cluster_rows(snap: dict, nodes: list[dict]) -> tuple[list[str], list[list]]:
    """One row per node of the config: role, this DSP's link to it, its reported load."""
    head = ["node", "name", "role", "address", "link", "state", "cpu %", "sessions",
            "commands"]
    links = {str(k): v for k, v in (snap.get("links") or {}).items()}
    servers = {str(k): v for k, v in ((snap.get("group") or {}).get("servers") or {}).items()}
    me = str(snap.get("node"))
    rows = []
    for n in nodes:
        nid = str(n["node"])
        if nid == me:
            link = "this node"
        elif nid in links:
            link = "UP" if links[nid].get("up") else "DOWN"
        else:
            link = "-"
        srv = servers.get(nid)
        state = server_state(srv) if srv else ("this node" if nid == me else "-")
        group = snap.get("group")
        if nid == me and group:
            state = str((group.get("load") or {}).get("level", "-"))
        if n.get("role") == "lb" and group:
            # this DSP balances its own clients: the virtual node's figures are its own
            link, state = "this node", "UP"
            srv = {"cpu": "-", "sessions": len(group.get("sessions") or ()),
                   "commands": sum(v.get("commands", 0) for v in servers.values())}
        rows.append([nid, n.get("name", ""), n.get("role", ""), n.get("rname", "") or "-",
                     link, state, srv.get("cpu", 0) if srv else "-",
                     srv.get("sessions", 0) if srv else "-",
                     srv.get("commands", 0) if srv else "-"])
    return head, rows


def _text_table(head: list[str], rows: list[list]) -> str:
    cells = [head] + [[str(x) for x in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
    lines = []
    for n, r in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i < 2 or not c.replace("-", "").isdigit()
                               else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     .rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    if not rows:
        lines.append("(none)")
    return "\n".join(lines)


def _cpu_latency(snap: dict) -> str:
    """The CPU latency request the daemon holds (`--cpu-latency`), for the page and the text."""
    usec = snap.get("cpu_latency_us")
    return "" if usec is None else f"CPU latency request {usec} us held"


def format_text(snap: dict) -> str:
    """The figures of one DSP for a terminal (what `dsp_proxy stats` prints)."""
    reloads = snap.get("reloads") or {}
    held = _cpu_latency(snap)
    out = [f"DSP node {snap.get('node')}  LB node {snap.get('lb_node')}  pid {snap.get('pid')}"
           f"  up {_duration(snap.get('uptime', 0))}  reloads {reloads.get('ok', 0)} ok / "
           f"{reloads.get('failed', 0)} failed{f'  {held}' if held else ''}",
           "", "links:", _text_table(*link_rows(snap)),
           "", "traffic per DC:", _text_table(*dc_rows(snap))]
    errors = snap.get("put2lcl_errors") or {}
    out += ["", "put2lcl errors: " + (", ".join(f"{k} {v}" for k, v in sorted(errors.items()))
                                      or "none"),
            f"dropped frames: {snap.get('dropped_frames', 0)}"]
    group = snap.get("group")
    if group:
        load = group.get("load") or {}
        out += ["", f"load balancer: this node cpu {load.get('cpu')}% {load.get('level')}; "
                    f"sessions {len(group.get('sessions') or ())} active, "
                    f"{group.get('sessions_started', 0)} started, "
                    f"{group.get('sessions_ended', 0)} ended; "
                    f"no server {group.get('no_server', 0)}",
                "servers:", _text_table(*server_rows(snap)),
                "sessions:", _text_table(*session_rows(snap))]
    return "\n".join(out + _elastic_lines(snap))


def _elastic_lines(snap: dict) -> list[str]:
    """Service programs and VM commands, when this DSP ran any (their failures above all)."""
    out = []
    progs = snap.get("programs") or {}
    if progs.get("started") or progs.get("failed") or progs.get("running"):
        last = progs.get("last_error")
        out += ["", f"service programs: {progs.get('running', 0)} running, "
                    f"{progs.get('started', 0)} started, {progs.get('failed', 0)} failed"
                    + (f" (last: {last})" if last else "")]
    for nodeid, vm in sorted((snap.get("autoscaler") or {}).items(), key=lambda kv: int(kv[0])):
        if vm.get("starts") or vm.get("stops") or vm.get("failures"):
            last = vm.get("last_error")
            out.append(f"VM of server node {nodeid} ({vm.get('name')}): {vm.get('starts', 0)} "
                       f"starts, {vm.get('stops', 0)} stops, {vm.get('failures', 0)} failed"
                       + (f" (last: {last})" if last else ""))
    return out


# ------------------------------------------------------------------------------ the client
#: Bytes of an answer or a status file the client reads at most (a status of thousands of
#: sessions is a few MB).
MAX_SNAPSHOT = 64 * 1024 * 1024


class _Answer:
    """A received answer, handed to http.client's parser as if it were the socket."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def makefile(self, *_args, **_kw) -> io.BytesIO:
        return io.BytesIO(self.data)


def _http_get(host: str, port: int, path: str, timeout: float) -> bytes:
    """The body of a 200 answer to GET `path`, all of it within `timeout` seconds from the
    connect (a server that trickles its answer cannot hold the client longer) and at most
    MAX_SNAPSHOT bytes.  Raises OSError or ValueError."""
    deadline = time.monotonic() + timeout
    name = f"[{host}]" if ":" in host else host
    chunks, size = [], 0
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: {name}:{port}\r\n\r\n".encode())
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no complete answer within {timeout:g} s")
            sock.settimeout(left)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                raise TimeoutError(f"no complete answer within {timeout:g} s") from None
            if not chunk:
                break
            size += len(chunk)
            if size > MAX_SNAPSHOT:
                raise ValueError(f"answer over {MAX_SNAPSHOT} bytes")
            chunks.append(chunk)
    resp = http.client.HTTPResponse(_Answer(b"".join(chunks)))
    try:
        resp.begin()
        body = resp.read()
    except http.client.HTTPException as exc:   # the text is the peer's: shown escaped
        raise ValueError(f"not an HTTP answer: {ascii(str(exc))[:100]}") from None
    if resp.status != 200:
        raise ValueError(f"HTTP {resp.status} {ascii(resp.reason)[1:-1][:100]}".rstrip())
    return body


def parse_snapshot(data: bytes) -> dict:
    """The figures of a DSP from the bytes of /stats.json or a status file; ValueError for
    anything else (not UTF-8, not JSON, nested too deep, not an object)."""
    try:
        snap = json.loads(data.decode())
    except RecursionError:
        raise ValueError("JSON nested too deep") from None
    if not isinstance(snap, dict):
        raise ValueError(f"a JSON {type(snap).__name__}, not the figures of a dsp_proxy")
    return snap


def fetch(address: str, timeout: float = 5.0) -> dict:
    """The figures of the DSP whose statistics server is at `address`, within `timeout`."""
    host, port = parse_address(address)
    return parse_snapshot(_http_get(host, port, "/stats.json", timeout))


def read_status_file(path: str) -> dict:
    """The figures in a `--status-file`: a regular file (not a directory, FIFO or device,
    which could block or never end) of at most MAX_SNAPSHOT bytes."""
    data = read_regular_file(path, MAX_SNAPSHOT + 1)
    if len(data) > MAX_SNAPSHOT:
        raise ValueError(f"file over {MAX_SNAPSHOT} bytes")
    return parse_snapshot(data)


#: Control characters (but the newline) of the figures' text: names in the figures come from a
#: config or from whatever answered, and must not reach the terminal as escape sequences.
_TERMINAL_SAFE = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]")


def client_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dsp_proxy stats",
                                description="print the figures of a running dsp_proxy")
    p.add_argument("address", nargs="?", default=os.environ.get("DSP_STATS", DEFAULT_ADDRESS),
                   help="the daemon's --stats [ADDR:]PORT (default $DSP_STATS or "
                        f"{DEFAULT_ADDRESS})")
    p.add_argument("--file", help="read a --status-file instead of asking the daemon")
    p.add_argument("--json", action="store_true", help="print the raw JSON")
    args = p.parse_args(argv)
    where = args.file or args.address
    try:
        snap = read_status_file(args.file) if args.file else fetch(args.address)
        text = (json.dumps(snap, indent=1, sort_keys=True) if args.json
                else format_text(snap))
    except (OSError, ValueError) as exc:
        print(f"dsp_proxy stats: cannot read the statistics of {where}: {exc}",
              file=sys.stderr)
        return 1
    except (AttributeError, TypeError, KeyError):   # JSON, but not of the shape of a snapshot
        print(f"dsp_proxy stats: cannot read the statistics of {where}: not the figures of "
              "a dsp_proxy", file=sys.stderr)
        return 1
    try:
        print(_TERMINAL_SAFE.sub(lambda m: f"\\x{ord(m.group()):02x}", text), flush=True)
    except BrokenPipeError:         # `dsp_proxy stats | head`: a reader that stopped early
        devnull = os.open(os.devnull, os.O_WRONLY)   # no second error when Python exits
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    stale = _stale(args.file, snap) if args.file else None
    if stale:
        print(f"dsp_proxy stats: {args.file}: {stale}", file=sys.stderr)
        return 1
    return 0


#: A status file not rewritten for this long (ten ticks of the daemon's main loop, which
#: rewrites it every tick) no longer tells how the DSP is now.
STALE_AFTER = 5.0


def _stale(path: str, snap: dict) -> str | None:
    """Why the figures of a status file are not those of a running DSP (None: they are):
    the daemon writes it while it runs and leaves the last figures behind when it stops or
    dies, which read as a DSP with its links up."""
    pid = snap.get("pid")
    taken = snap.get("taken", "?")
    if not isinstance(pid, int) or not runs_dsp_proxy(pid):
        return f"the DSP that wrote these figures (pid {pid}) is not running: they are its " \
               f"last ones, taken {taken}"
    try:
        age = time.time() - os.stat(path).st_mtime
    except OSError:
        return None
    if age > STALE_AFTER:
        return f"not rewritten for {age:.0f} s (its DSP, pid {pid}, is stuck?): these " \
               f"figures were taken {taken}"
    return None


if __name__ == "__main__":
    sys.exit(client_main())
