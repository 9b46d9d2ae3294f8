"""The speed targets and how `make bench` reports them: one row per target with the measured
figure (a ratio against an anchor measured in the same run, or an absolute figure), the limit,
and PASS or FAIL.  A target whose part did not run (or failed) is reported as NOT RUN, never
as a pass.  See docs/performance.md, "How targets are reported".
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

from .e2e import RELAYED

MB = 1e6
MIB = 1 << 20


@dataclass
class Row:
    target: str
    measured: str
    limit: str
    result: str        # PASS | FAIL | NOT RUN


def _cmp(value: float, limit: float, at_most: bool) -> str:
    ok = value <= limit if at_most else value >= limit
    return "PASS" if ok else "FAIL"


def _med(xs) -> float:
    xs = list(xs)
    return statistics.median(xs) if xs else float("nan")


def _hop(out: dict, name: str) -> dict | None:
    return next((r for r in out.get("hop") or () if r["hop"] == name), None)


def _hop_pingpong(out: dict) -> Row:
    d, h = _hop(out, "DSP"), _hop(out, "HAProxy")
    ratio = d["p50_us"] / h["p50_us"]
    return Row("DSP hop ping-pong p50 vs HAProxy",
               f"{ratio:.2f}x ({d['p50_us']:.0f} / {h['p50_us']:.0f} µs)", "<= 1.1x",
               _cmp(ratio, 1.1, True))


def _hop_copy(out: dict) -> Row:
    d, h = _hop(out, "DSP"), _hop(out, "HAProxy")
    ratio = d["copy_MBps"] / h["copy_MBps"]
    return Row("DSP hop 64 KiB frames vs HAProxy",
               f"{ratio:.2f}x ({d['copy_MBps']:,.0f} / {h['copy_MBps']:,.0f} MB/s)", ">= 1.0x",
               _cmp(ratio, 1.0, False))


def _hop_rate(name: str, label: str) -> Callable[[dict], Row]:
    def row(out: dict) -> Row:
        rate = _hop(out, name)["rate_msgs"]
        return Row(f"120-byte frames through the LB host, {label}", f"{rate:,.0f} /s",
                   ">= 1,000,000 /s", _cmp(rate, 1e6, False))
    return row


def _local(out: dict) -> Row:
    loc = out["local"]
    ratio = loc["sendrec_p50_us"] / loc["unix_p50_us"]
    return Row("local emulated sendrec p50 vs raw Unix-socket ping-pong",
               f"{ratio:.1f}x ({loc['sendrec_p50_us']:.0f} / {loc['unix_p50_us']:.1f} µs)",
               "<= 4x", _cmp(ratio, 4.0, True))


def _with_request(r: dict) -> dict:
    """Part 4's `compress NO` cluster run again with `--cpu-latency 0` ({} if it did not run):
    its figures are shown beside a target's, which is judged without it."""
    return r.get("cpu_latency_0") or {}


def _e2e_latency(out: dict) -> Row:
    r = out["e2e"]["compress NO"]
    p50 = _med(x["p50_us"] for x in r["latency"][RELAYED])
    floor = r.get("floor")
    shown = f"{p50 / 1000:.2f} ms"
    if floor:
        shown += f" (its floor {_med(f['p50_us'] for f in floor) / 1000:.2f} ms)"
    mode = _with_request(r)
    relayed = mode.get("latency", {}).get(RELAYED)
    if relayed:
        shown += (f"; with --cpu-latency 0: "
                  f"{_med(x['p50_us'] for x in relayed) / 1000:.2f} ms")
        if mode.get("floor"):
            shown += f" (floor {_med(f['p50_us'] for f in mode['floor']) / 1000:.2f} ms)"
    return Row("end to end relayed latency p50", shown, "<= 0.5 ms", _cmp(p50, 500, True))


def _e2e_ftp(out: dict) -> Row:
    r = out["e2e"]["compress NO"]
    runs = r["ftp"][f"{RELAYED} random"]
    put, get = _med(x["put_MBps"] for x in runs), _med(x["get_MBps"] for x in runs)
    size = r["size_mib"]
    worst = min(put, get)
    result = _cmp(worst, 100, False)
    if size < 100 and result == "PASS":
        result = "FAIL"      # a smaller file does not show the target
    shown = f"{worst:.1f} MB/s (PUT {put:.1f}, GET {get:.1f})"
    mode = _with_request(r).get("ftp", {}).get(f"{RELAYED} random")
    if mode:
        slower = min(_med(x["put_MBps"] for x in mode), _med(x["get_MBps"] for x in mode))
        shown += f"; with --cpu-latency 0: {slower:.1f} MB/s"
    return Row(f"m3ftp {size} MiB through the LB host (random data, slower of PUT/GET)",
               shown, ">= 100 MB/s with 100 MiB", result)


def _demo(out: dict) -> Row:
    d = out["demo"]
    return Row(f"demo, {d['clients']} concurrent clients through the LB, p50",
               f"{d['p50_us'] / 1000:.2f} ms", "<= 1.5 ms", _cmp(d["p50_us"], 1500, True))


def _clients(out: dict) -> Row:
    r = out["e2e"]["compress NO"]
    c = r["clients"]
    shown = (f"{c['p50_us'] / 1000:.2f} ms (p99 {c['p99_us'] / 1000:.2f} ms, "
             f"{c['failed']} failed)")
    mode = _with_request(r).get("clients")
    if mode:
        shown += f"; with --cpu-latency 0: {mode['p50_us'] / 1000:.2f} ms"
    return Row(f"{c['clients']} clients x {c['loops']:,} sendrec through the LB, p50", shown,
               "<= 3 ms", "FAIL" if c["failed"] else _cmp(c["p50_us"], 3000, True))


def _memory(out: dict) -> Row:
    s = out["scale"]
    worst = max(s["startup"]["dsp_rss_max_mib"], s["sessions"]["lb_rss_mib"]) * MIB / MB
    return Row("memory per DSP (largest RSS: cluster start-up, LB host holding the sessions)",
               f"{worst:.1f} MB", "<= 50 MB", _cmp(worst, 50, True))


def _nodes_up(out: dict) -> Row:
    s = out["scale"]["startup"]
    want = s["links"]
    ok = s["nodes"] >= 32 and s["links_up"] == want
    return Row("scale: 32-node cluster, every link up",
               f"{s['nodes']} nodes, {s['links_up']}/{want} links up in "
               f"{s['total_s']:.1f} s ({s['link_downs']} link downs)", "32 nodes, all links",
               "PASS" if ok else "FAIL")


def _sessions(out: dict) -> Row:
    c = out["scale"]["sessions"]
    ok = (c["sessions"] >= 1000 and c["served_clients"] == c["sessions"] and not c["failed"]
          and c["held_in_lb_table"] >= c["sessions"])
    return Row("scale: concurrent sessions through one LB host",
               f"{c['served_clients']}/{c['sessions']} served, {c['held_in_lb_table']} held, "
               f"{c['failed']} failed", "1,000, all served and held",
               "PASS" if ok else "FAIL")


TARGETS: list[tuple[str, Callable[[dict], Row]]] = [
    ("DSP hop ping-pong p50 vs HAProxy", _hop_pingpong),
    ("DSP hop 64 KiB frames vs HAProxy", _hop_copy),
    ("120-byte frames through the LB host, batch NO", _hop_rate("DSP", "batch NO")),
    ("120-byte frames through the LB host, batch YES", _hop_rate("DSP batch", "batch YES")),
    ("local emulated sendrec p50 vs raw Unix-socket ping-pong", _local),
    ("end to end relayed latency p50", _e2e_latency),
    ("m3ftp 100 MiB through the LB host", _e2e_ftp),
    ("demo, 4 concurrent clients through the LB, p50", _demo),
    ("8 clients through the LB, p50", _clients),
    ("memory per DSP", _memory),
    ("scale: 32-node cluster, every link up", _nodes_up),
    ("scale: 1,000 concurrent sessions through one LB host", _sessions),
]


def evaluate(out: dict, elapsed_s: float | None = None) -> list[Row]:
    """One row per target from the figures of a run (`bench.run`'s output dict)."""
    rows = []
    for name, fn in TARGETS:
        try:
            rows.append(fn(out))
        except (KeyError, TypeError, ZeroDivisionError, StopIteration, ValueError):
            rows.append(Row(name, "-", "", "NOT RUN"))
    if elapsed_s is not None:
        rows.append(Row("full benchmark run", f"{elapsed_s / 60:.1f} min", "< 10 min",
                        _cmp(elapsed_s, 600, True)))
    return rows


def format_rows(rows: list[Row]) -> str:
    lines = ["| target | measured | limit | result |", "|---|---|---|---|"]
    lines += [f"| {r.target} | {r.measured} | {r.limit} | {r.result} |" for r in rows]
    passed = sum(r.result == "PASS" for r in rows)
    lines.append("")
    lines.append(f"{passed} of {len(rows)} targets PASS, "
                 f"{sum(r.result == 'FAIL' for r in rows)} FAIL, "
                 f"{sum(r.result == 'NOT RUN' for r in rows)} NOT RUN")
    return "\n".join(lines)
