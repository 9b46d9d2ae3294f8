"""Statistics of a running DSP (the C `dsp_pws`, which never ran, made real).

`dsp_proxy --stats [ADDR:]PORT` serves, on 127.0.0.1 unless ADDR says otherwise:

- `/`            a human page: links (state, frames, commands, bytes, errors per direction and
                 per DC), put2lcl errors, LB sessions and servers (load levels), uptime;
- `/stats.json`  the same figures as JSON (`Dsp.snapshot()`, the status file's content);
- `/metrics`     the Prometheus text exposition format (version 0.0.4), written here by hand.

No output carries a secret: the snapshot holds no ssh_* value of the config at all.

`dsp_proxy stats [ADDR:PORT]` (also `python -m dsp_proxy.stats`) prints the figures of a
running DSP on the terminal, read from its `/stats.json` (or from a `--status-file` with
`--file PATH`).
"""

from __future__ import annotations

import argparse
import html
import json
import logging
import os
import sys
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger("dsp.stats")

DEFAULT_HOST = "127.0.0.1"
#: The C statistics servers listened on 4000 + node id (sender); the default of the client.
DEFAULT_ADDRESS = "127.0.0.1:4000"
LEVELS = {"NOTINIT": -1, "IDLE": 0, "BUSY": 1, "SATURATED": 2}
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

    def do_GET(self) -> None:  # noqa: N802 - the http.server naming
        path = self.path.split("?", 1)[0]
        snapshot = self.server.dsp.snapshot()
        if path in ("/", "/index.html"):
            body, ctype = render_html(snapshot), "text/html; charset=utf-8"
        elif path == "/stats.json":
            body = json.dumps(snapshot, indent=1, default=str, sort_keys=True)
            ctype = "application/json"
        elif path == "/metrics":
            body, ctype = render_metrics(snapshot), "text/plain; version=0.0.4; charset=utf-8"
        else:
            self.send_error(404, "not found (try /, /stats.json, /metrics)")
            return
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, fmt: str, *args) -> None:
        log.debug("stats %s: " + fmt, self.client_address[0], *args)


class StatsServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, dsp, address: tuple[str, int]) -> None:
        self.dsp = dsp
        super().__init__(address, _Handler)


def serve(dsp, host: str = DEFAULT_HOST, port: int = 0) -> StatsServer:
    """Start the statistics server on a daemon thread; `dsp` needs only `snapshot()` (and gets
    `stats_address`).  Raises OSError when the address cannot be bound."""
    server = StatsServer(dsp, (host, port))
    addr = f"{server.server_address[0]}:{server.server_address[1]}"
    dsp.stats_address = addr
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5},
                     name="stats", daemon=True).start()
    log.info("statistics on http://%s/ (/stats.json, /metrics)", addr)
    return server


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
    m.add("dsp_info", "gauge", "Constant 1, labelled with this DSP's node and LB node.", 1,
          node=node, lb_node=snap.get("lb_node"))
    m.add("dsp_uptime_seconds", "gauge", "Seconds since this dsp_proxy started.",
          float(snap.get("uptime", 0)))
    reloads = snap.get("reloads") or {}
    for result in ("ok", "failed"):
        m.add("dsp_config_reloads_total", "counter", "Configuration reloads (SIGHUP) by result.",
              reloads.get(result, 0), result=result)
    m.add("dsp_config_last_reload_ok", "gauge",
          "1 when the last reload succeeded (or none was tried), 0 when it failed.",
          0 if reloads.get("last_error") else 1)
    links = snap.get("links") or {}
    for peer, link in links.items():
        m.add("dsp_link_up", "gauge", "1 when both directions of the link to the peer are up.",
              bool(link.get("up")), peer=peer, name=link.get("name", ""))
    for peer, link in links.items():
        m.add("dsp_link_downs_total", "counter", "Times the link to the peer went down.",
              link.get("downs", 0), peer=peer)
    counters = (("frames", "dsp_link_frames_total", "Frames on the link."),
                ("commands", "dsp_link_commands_total", "DVK commands on the link (a batch "
                 "frame carries several)."),
                ("bytes", "dsp_link_bytes_total", "Bytes on the link, headers included."),
                ("errors", "dsp_link_errors_total", "Errors on the link's sender or receiver."),
                ("hellos", "dsp_link_hellos_total", "HELLO and load-report frames."))
    for key, name, help_text in counters:
        for peer, link in links.items():
            for field, direction in DIRECTIONS:
                figures = link.get(field) or {}
                m.add(name, "counter", help_text + " direction=out: sent to the peer.",
                      figures.get(key, 0), peer=peer, direction=direction)
    per_dc = (("messages", "dsp_dc_messages_total",
               "SEND/SNDREC/REPLY messages per DC (the C nr_msgs)."),
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
    m.add("dsp_put2lcl_errors", "gauge", "Kinds of put2lcl errors seen (labels: code).",
          len(errors))
    for code, n in sorted(errors.items()):
        m.add("dsp_put2lcl_errors_total", "counter",
              "put2lcl deliveries that failed, by EDVS error code.", n, code=code)
    group = snap.get("group")
    if group:
        m.add("dsp_sessions", "gauge", "Active LB sessions held by this DSP.",
              len(group.get("sessions") or ()))
        for key in ("sessions_started", "sessions_ended"):
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
        gauges = (("dsp_server_load_level", "level",
                   "Reported load level of a server (-1 NOTINIT, 0 IDLE, 1 BUSY, 2 SATURATED)."),
                  ("dsp_server_cpu_percent", "cpu", "Reported CPU use of a server."),
                  ("dsp_server_sessions", "sessions", "Active sessions on a server."))
        for name, key, help_text in gauges:
            for sid, srv in servers.items():
                value = LEVELS.get(srv.get(key), -1) if key == "level" else srv.get(key, 0)
                m.add(name, "gauge", help_text, value, server=sid, name=srv.get("name", ""))
        for name, key, help_text in (
                ("dsp_server_messages_total", "messages", "Commands forwarded to a server."),
                ("dsp_server_bytes_total", "bytes", "Bytes forwarded to a server.")):
            for sid, srv in servers.items():
                m.add(name, "counter", help_text, srv.get(key, 0), server=sid)
    return m.text()


# ------------------------------------------------------------------------------ HTML page
_CSS = """body{font-family:sans-serif;margin:1em}table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #999;padding:2px 8px;text-align:right}th{background:#ddd}
td.l,th.l{text-align:left}.up{color:#070}.down{color:#a00}"""


def _table(head: list[str], rows: list[list]) -> str:
    h = "".join(f"<th>{html.escape(str(x))}</th>" for x in head)
    body = []
    for row in rows:
        cells = []
        for i, x in enumerate(row):
            cls = ' class="l"' if i == 0 or isinstance(x, str) else ""
            cells.append(f"<td{cls}>{html.escape(str(x))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{h}</tr>{''.join(body)}</table>"


def render_html(snap: dict) -> str:
    e = html.escape
    node = snap.get("node")
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'>"
             f"<title>DSP node {e(str(node))}</title><style>{_CSS}</style></head><body>",
             f"<h1>DSP of node {e(str(node))}</h1>",
             f"<p>LB node {e(str(snap.get('lb_node')))} &middot; pid {e(str(snap.get('pid')))}"
             f" &middot; up {e(_duration(snap.get('uptime', 0)))} &middot; config "
             f"{e(str((snap.get('config') or {}).get('path', '')))}</p>"]
    reloads = snap.get("reloads") or {}
    parts.append(f"<p>reloads: {reloads.get('ok', 0)} ok, {reloads.get('failed', 0)} failed"
                 + (f" (last error: {e(str(reloads['last_error']))})"
                    if reloads.get("last_error") else "") + "</p>")
    parts.append("<h2>Links</h2>")
    parts.append(_table(*link_rows(snap)))
    parts.append("<h2>Traffic per DC</h2>")
    parts.append(_table(*dc_rows(snap)))
    errors = snap.get("put2lcl_errors") or {}
    if errors:
        parts.append("<h2>put2lcl errors</h2>")
        parts.append(_table(["code", "count"], [[k, v] for k, v in sorted(errors.items())]))
    group = snap.get("group")
    if group:
        parts.append("<h2>Load balancer</h2>")
        load = group.get("load") or {}
        parts.append(f"<p>this node: cpu {e(str(load.get('cpu')))}% level "
                     f"{e(str(load.get('level')))}; sessions started "
                     f"{group.get('sessions_started', 0)}, ended {group.get('sessions_ended', 0)}"
                     f", no server {group.get('no_server', 0)}</p>")
        parts.append(_table(*server_rows(snap)))
        parts.append(_table(*session_rows(snap)))
    parts.append("<p><a href='/stats.json'>/stats.json</a> &middot; "
                 "<a href='/metrics'>/metrics</a></p></body></html>")
    return "\n".join(parts)


# ------------------------------------------------------------------------------ tables
def _duration(seconds) -> str:
    s = int(float(seconds or 0))
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    mi, s = divmod(s, 60)
    return (f"{d}d " if d else "") + f"{h:02d}:{mi:02d}:{s:02d}"


def link_rows(snap: dict) -> tuple[list[str], list[list]]:
    head = ["peer", "name", "state", "downs", "frames out", "cmds out", "bytes out",
            "frames in", "cmds in", "bytes in", "errors"]
    rows = []
    for peer, link in sorted((snap.get("links") or {}).items(), key=lambda kv: int(kv[0])):
        s, r = link.get("sent") or {}, link.get("received") or {}
        rows.append([str(peer), link.get("name", ""), "UP" if link.get("up") else "DOWN",
                     link.get("downs", 0), s.get("frames", 0), s.get("commands", 0),
                     s.get("bytes", 0), r.get("frames", 0), r.get("commands", 0),
                     r.get("bytes", 0), s.get("errors", 0) + r.get("errors", 0)])
    return head, rows


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


def server_rows(snap: dict) -> tuple[list[str], list[list]]:
    head = ["server", "name", "level", "cpu %", "sessions", "messages", "bytes"]
    servers = ((snap.get("group") or {}).get("servers") or {})
    rows = [[str(sid), s.get("name", ""), s.get("level", ""), s.get("cpu", 0),
             s.get("sessions", 0), s.get("messages", 0), s.get("bytes", 0)]
            for sid, s in sorted(servers.items(), key=lambda kv: int(kv[0]))]
    return head, rows


def session_rows(snap: dict) -> tuple[list[str], list[list]]:
    head = ["client", "dcid", "service", "server", "relayed", "messages", "bytes"]
    sessions = ((snap.get("group") or {}).get("sessions") or [])
    rows = [[s.get("client", ""), s.get("dcid", 0), s.get("service", ""), s.get("server", ""),
             "yes" if s.get("relayed") else "no", s.get("messages", 0), s.get("bytes", 0)]
            for s in sessions]
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


def format_text(snap: dict) -> str:
    """The figures of one DSP for a terminal (what `dsp_proxy stats` prints)."""
    reloads = snap.get("reloads") or {}
    out = [f"DSP node {snap.get('node')}  LB node {snap.get('lb_node')}  pid {snap.get('pid')}"
           f"  up {_duration(snap.get('uptime', 0))}  reloads {reloads.get('ok', 0)} ok / "
           f"{reloads.get('failed', 0)} failed",
           "", "links:", _text_table(*link_rows(snap)),
           "", "traffic per DC:", _text_table(*dc_rows(snap))]
    errors = snap.get("put2lcl_errors") or {}
    out += ["", "put2lcl errors: " + (", ".join(f"{k} {v}" for k, v in sorted(errors.items()))
                                      or "none")]
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
    return "\n".join(out)


# ------------------------------------------------------------------------------ the client
def fetch(address: str, timeout: float = 5.0) -> dict:
    host, port = parse_address(address)
    url = f"http://{host}:{port}/stats.json"
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read().decode())


def client_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dsp_proxy stats",
                                description="print the figures of a running dsp_proxy")
    p.add_argument("address", nargs="?", default=os.environ.get("DSP_STATS", DEFAULT_ADDRESS),
                   help="the daemon's --stats [ADDR:]PORT (default $DSP_STATS or "
                        f"{DEFAULT_ADDRESS})")
    p.add_argument("--file", help="read a --status-file instead of asking the daemon")
    p.add_argument("--json", action="store_true", help="print the raw JSON")
    args = p.parse_args(argv)
    try:
        if args.file:
            with open(args.file) as f:
                snap = json.load(f)
        else:
            snap = fetch(args.address)
    except (OSError, ValueError, urllib.error.URLError) as exc:
        where = args.file or args.address
        print(f"dsp_proxy stats: cannot read the statistics of {where}: {exc}",
              file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(snap, indent=1, sort_keys=True))
    else:
        print(format_text(snap))
    return 0


if __name__ == "__main__":
    sys.exit(client_main())
