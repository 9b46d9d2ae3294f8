"""`make bench`: the DSP data path against HAProxy and the Python limit, on loopback.

    python -m bench.run [--runs N] [--secs S] [--quick] [--only hop,local,e2e,demo,scale]
                        [--json FILE]

1-3. One proxy hop (see bench/wire_peers.py): ping-pong of 120-byte frames (round trips/s,
     p50/p99 µs), 64 KiB COPY frames one way (MB/s), 120-byte frames pipelined one way
     (messages/s) -- through the DSP (as the relaying LB host, batch NO and YES), HAProxy in TCP
     mode (installed with apt-get when missing) and a minimal threaded Python forwarder, and
     with no relay at all.  Every figure is the median of --runs runs, measured in one run side
     by side.
4.   End to end on an emulated cluster (bench/e2e.py): latency_client p50 and messages/s,
     m3ftp PUT/GET MB/s (compressible and random files) through the virtual LB in relayed
     mode, with and without LZ4, beside the same programs with no LB in the same cluster,
     and the CPU per round trip of every node kernel, DSP and server on each path.  Also 8
     concurrent relayed clients doing sendrec through the LB host, and the relayed round
     trip's floor: its processes, sockets and messages with no logic (bench/chain_floor.py).
5.   Scale (bench/e2e.py): start-up of an N-node cluster and memory per daemon; many
     concurrent sessions through one LB host (node kernels with several DCs).
6.   Local: sendrec on one emulated node with no DSP (bench/local_sendrec.py) beside a raw
     Unix-socket ping-pong between two Python processes (bench/unix_pingpong.py), and the
     server node kernel's five calls of a relayed round trip timed in one process, as kernel
     logic and through the node server's request path (bench/kernel_calls.py).
7.   The `make run` demo (dsp_proxy.demo): p50 of its 4 concurrent clients through the LB.

At the end every target of bench/targets.py is printed with its measured figure or ratio and
PASS, FAIL or NOT RUN.  The defaults are the targets' sizes (100 MiB files with one PUT and one
GET per path, 32 nodes, 1,000 sessions, 8 clients x 10,000 sendrec); `--quick` uses small
sizes (then the sized targets FAIL).

Every process the benchmark starts is stopped; it fails with a message when an anchor cannot
run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dsp_proxy.cluster import Cluster, python_env

from . import e2e as E2E
from . import kernel_calls, local_sendrec, unix_pingpong
from . import targets as T
from . import wire_peers as W

HAPROXY_PORT = 4000
#: A part that fails is tried once more when the run is younger than this (seconds).
RETRY_BEFORE = 240.0


class BenchError(RuntimeError):
    pass


# ----------------------------------------------------------------------------- anchors
def ensure_haproxy() -> str:
    path = shutil.which("haproxy")
    if path:
        return path
    print("haproxy missing: apt-get install -y haproxy", flush=True)
    cmd = ["apt-get", "install", "-y", "-q", "haproxy"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if res.returncode != 0:
            raise BenchError(f"cannot install haproxy (the HAProxy anchor cannot run):\n"
                             f"{res.stdout[-2000:]}{res.stderr[-2000:]}")
    path = shutil.which("haproxy")
    if not path:
        raise BenchError("haproxy installed but not on PATH")
    return path


def start_haproxy(tmp: Path, listen: str, target: str, tport: int) -> subprocess.Popen:
    exe = ensure_haproxy()
    cfg = tmp / "haproxy.cfg"
    cfg.write_text(f"""global
    maxconn 4096
    tune.bufsize 131072
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
listen hop
    bind {listen}:{HAPROXY_PORT}
    option tcp-smart-accept
    server s1 {target}:{tport}
""")
    proc = subprocess.Popen([exe, "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    _wait_port(listen, HAPROXY_PORT, proc, "haproxy")
    return proc


def start_pyforward(listen: str, port: int, target: str, tport: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "bench.pyforward", listen, str(port), target,
                             str(tport)], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            env=python_env())
    _wait_port(listen, port, proc, "the Python forwarder")
    return proc


def _wait_port(host: str, port: int, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise BenchError(f"{what} exited with status {proc.returncode}: {err[-1000:]}")
        try:
            socket.create_connection((host, port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise BenchError(f"{what} is not listening on {host}:{port}")


def stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ----------------------------------------------------------------------------- the DSP hop
class DspUnderTest:
    """One DSP (node kernel + daemon) as the LB host, with its wire peers."""

    def __init__(self, tmp: Path, net: str, opts: str, label: str) -> None:
        self.dir = tmp / label
        self.dir.mkdir()
        cfg = self.dir / "hop.cfg"
        cfg.write_text(W.CONFIG.format(net=net, opts=opts))
        self.cluster = Cluster(cfg, rundir=str(self.dir), log_level="WARNING")
        self.hop = None
        try:
            self.cluster.start_kernel(W.HOST)
            self.hop = W.DspHop(net, lambda: self.cluster.start_dsp(W.HOST))
            self.hop.name = label
        except BaseException:
            self.close()
            raise

    @property
    def pid(self) -> int:
        return self.cluster.dsps[W.HOST].pid

    def status(self) -> dict:
        return self.cluster.status(W.HOST)

    def close(self) -> None:
        if self.hop is not None:
            self.hop.close()
        self.cluster.stop()


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p / 100))] if xs else float("nan")


def hop_benchmarks(args, tmp: Path) -> dict:
    net = f"127.{60 + os.getpid() % 100}.{os.getpid() // 100 % 250}"
    srv_addr = f"{net}.{W.SRV}"
    started: list = []
    hops: dict[str, W.Hop] = {}
    dsps: list[DspUnderTest] = []
    try:
        # anchors: a listener of the server peer per forwarder
        listeners = {}
        for name, port in (("direct", 4010), ("HAProxy", 4011), ("Python fwd", 4012)):
            listeners[name] = W._listen(srv_addr, port)
        hp = start_haproxy(tmp, f"{net}.9", srv_addr, 4011)
        started.append(hp)
        pf = start_pyforward(f"{net}.8", 4000, srv_addr, 4012)
        started.append(pf)
        hops["direct"] = W.TcpHop("direct", srv_addr, 4010, listeners["direct"])
        hops["HAProxy"] = W.TcpHop("HAProxy", f"{net}.9", HAPROXY_PORT, listeners["HAProxy"])
        hops["Python fwd"] = W.TcpHop("Python fwd", f"{net}.8", 4000, listeners["Python fwd"])
        for s in listeners.values():
            s.close()
        d = DspUnderTest(tmp, net, "", "DSP")
        dsps.append(d)
        hops["DSP"] = d.hop
        results: dict = {name: {"pingpong": [], "copy": [], "rate": []} for name in hops}
        results["DSP batch"] = {"pingpong": [], "copy": [], "rate": [], "rate_batched_in": []}
        for _run in range(args.runs):
            for name, hop in hops.items():
                _measure(hop, results[name], args)
        # the DSP with batch YES: its own daemon (both links batch)
        d.close()
        dsps.remove(d)
        del hops["DSP"]
        d2 = DspUnderTest(tmp, net, "batch YES;", "DSP-batch")
        dsps.append(d2)
        batched_in = _batched_blob(64, 8)
        for _run in range(args.runs):
            _measure(d2.hop, results["DSP batch"], args)
            rate, _ = W.stream(d2.hop, batched_in, args.secs, W.H)
            results["DSP batch"]["rate_batched_in"].append(rate)
        st = d2.status()
        link = st.get("links", {}).get(str(W.SRV), {})
        results["DSP batch"]["link_to_server"] = {
            k: link.get("sent", {}).get(k) for k in ("frames", "commands", "batches")}
        return results
    finally:
        for h in hops.values():
            h.close()
        for d in dsps:
            d.close()
        for p in started:
            stop(p)


def _batched_blob(per_frame: int, frames: int) -> bytes:
    """Client frames that are batches of `per_frame` SEND_MSG commands each."""
    import struct

    from dvk_cffi import consts as C
    one = W.request(C.CMD_SEND_MSG)
    head = bytearray(one)
    struct.pack_into("<i", head, 28, (per_frame - 1) * W.H)
    struct.pack_into("<i", head, 36, per_frame - 1)
    struct.pack_into("<I", head, 40, C.FLAG_BATCH)
    return (bytes(head) + one * (per_frame - 1)) * frames


def _measure(hop: W.Hop, res: dict, args) -> None:
    from dvk_cffi import consts as C
    rtts = W.pingpong(hop, args.rounds, args.secs)
    res["pingpong"].append((len(rtts) / (sum(rtts) / 1e6), median(rtts), pct(rtts, 99)))
    frame = W.copy_frame()
    _, bps = W.stream(hop, frame * 4, args.secs, len(frame))
    res["copy"].append(bps / 1e6)
    rate, _ = W.stream(hop, W.request(C.CMD_SEND_MSG) * 512, args.secs, W.H)
    res["rate"].append(rate)


def summarize_hops(results: dict) -> list[dict]:
    rows = []
    for name, r in results.items():
        pp = r["pingpong"]
        row = {"hop": name,
               "rt_per_s": median([x[0] for x in pp]),
               "p50_us": median([x[1] for x in pp]),
               "p99_us": median([x[2] for x in pp]),
               "copy_MBps": median(r["copy"]),
               "rate_msgs": median(r["rate"])}
        if "rate_batched_in" in r:
            row["rate_batched_in"] = median(r["rate_batched_in"])
            row["link_to_server"] = r.get("link_to_server")
        rows.append(row)
    return rows


def print_hops(rows: list[dict]) -> str:
    by = {r["hop"]: r for r in rows}
    lines = ["| hop | round trips/s | p50 µs | p99 µs | 64 KiB frames MB/s | "
             "120 B pipelined msgs/s |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['hop']} | {r['rt_per_s']:,.0f} | {r['p50_us']:.0f} | "
                     f"{r['p99_us']:.0f} | {r['copy_MBps']:,.0f} | {r['rate_msgs']:,.0f} |")
    for name in ("DSP", "DSP batch"):
        if name not in by:
            continue
        d = by[name]
        lines.append("")
        lines.append(f"{name} ratios: p50 round trip {d['p50_us'] / by['HAProxy']['p50_us']:.2f}x "
                     f"HAProxy, {d['p50_us'] / by['Python fwd']['p50_us']:.2f}x Python fwd; "
                     f"64 KiB {d['copy_MBps'] / by['HAProxy']['copy_MBps']:.2f}x HAProxy, "
                     f"{d['copy_MBps'] / by['Python fwd']['copy_MBps']:.2f}x Python fwd; "
                     f"small msgs {d['rate_msgs'] / by['HAProxy']['rate_msgs']:.3f}x HAProxy, "
                     f"{d['rate_msgs'] / by['Python fwd']['rate_msgs']:.2f}x Python fwd")
        if "rate_batched_in" in d:
            lines.append(f"{name}: batched client input (64 commands per frame): "
                         f"{d['rate_batched_in']:,.0f} msgs/s; link to the server "
                         f"{d['link_to_server']}")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


#: Round trips of each run of bench/kernel_calls.py (about 2 s).
KERNEL_CALL_ROUNDS = 20000


def local_benchmarks(args) -> dict:
    """Part 6: the emulator's local sendrec and its anchor, and a node kernel's calls of a
    relayed round trip measured apart; medians of --runs runs."""
    unix, local, calls = [], [], []
    for _run in range(args.runs):
        unix.append(unix_pingpong.run(args.unix_secs))
        local.append(local_sendrec.run(args.local_loops))
        calls.append(kernel_calls.run(KERNEL_CALL_ROUNDS))
    return {"kernel_logic_us": median([c["logic_us"] for c in calls]),
            "kernel_server_us": median([c["server_us"] for c in calls]),
            "unix_p50_us": median([u["p50_us"] for u in unix]),
            "unix_rt_per_s": median([u["rt_per_s"] for u in unix]),
            "sendrec_p50_us": median([x["p50_us"] for x in local]),
            "sendrec_p99_us": median([x["p99_us"] for x in local]),
            "sendrec_msgs_per_s": median([x["msgs_per_s"] for x in local])}


def print_local(res: dict) -> str:
    text = (f"| figure | p50 µs | rate |\n|---|---|---|\n"
            f"| raw Unix-socket ping-pong, two Python processes | {res['unix_p50_us']:.1f} | "
            f"{res['unix_rt_per_s']:,.0f} round trips/s |\n"
            f"| sendrec on one emulated node (latency_client, no DSP) | "
            f"{res['sendrec_p50_us']:.0f} | {res['sendrec_msgs_per_s']:,.0f} msgs/s |\n\n"
            f"ratio: {res['sendrec_p50_us'] / res['unix_p50_us']:.1f}x\n\n"
            f"node kernel 1's five calls of a relayed round trip, in this process "
            f"(bench/kernel_calls.py): kernel logic {res['kernel_logic_us']:.1f} µs, through "
            f"the node server's request path {res['kernel_server_us']:.1f} µs")
    print(text, flush=True)
    return text


DEMO_ROW = re.compile(r"^\s+(\d+)@(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+", re.M)


def demo_benchmark(args) -> dict:
    """Part 7: `make run`'s demo as it runs for a user; the p50 of its clients."""
    res = subprocess.run([sys.executable, "-m", "dsp_proxy.demo", "--loops",
                          str(args.demo_loops), "--mib", "10"], env=python_env(),
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
    rows = [(int(m[2]), int(m[3])) for m in DEMO_ROW.findall(res.stdout)]
    if res.returncode != 0 or not rows:
        raise BenchError(f"the demo failed:\n{res.stdout[-2000:]}{res.stderr[-2000:]}")
    return {"clients": len(rows), "loops": rows[0][0],
            "p50_us": median([r[1] for r in rows]),
            "client_p50s_us": [r[1] for r in rows]}


def machine() -> dict:
    cpu = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem = next(line.split()[1] for line in open("/proc/meminfo")
                   if line.startswith("MemTotal"))
    except OSError:
        mem = "?"
    hp = shutil.which("haproxy")
    hpv = subprocess.run([hp, "-v"], capture_output=True, text=True).stdout.split("\n")[0] \
        if hp else "not installed"
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_kib": mem,
            "kernel": platform.release(), "python": platform.python_version(),
            "haproxy": hpv}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run")
    p.add_argument("--runs", type=int, default=3, help="runs per figure (the median is shown)")
    p.add_argument("--secs", type=float, default=0.6, help="length of each load loop")
    p.add_argument("--rounds", type=int, default=4000, help="max ping-pong rounds per run")
    p.add_argument("--quick", action="store_true",
                   help="small sizes: 16 MiB files, 8 nodes, 200 sessions (sized targets FAIL)")
    p.add_argument("--only", default="hop,local,e2e,demo,scale",
                   help="parts: hop,local,e2e,demo,scale")
    p.add_argument("--e2e-loops", type=int, default=500, help="latency_client loops (part 4)")
    p.add_argument("--e2e-mib", type=int, default=None, help="m3ftp file size (part 4)")
    p.add_argument("--clients", type=int, default=8, help="concurrent relayed clients (4)")
    p.add_argument("--client-loops", type=int, default=10000, help="sendrec per client (4)")
    p.add_argument("--scale-nodes", type=int, default=None, help="cluster size (part 5)")
    p.add_argument("--sess-dcs", type=int, default=None, help="DCs for the sessions (part 5)")
    p.add_argument("--sess-per-dc", type=int, default=None, help="sessions per DC (part 5)")
    p.add_argument("--sess-rounds", type=int, default=10, help="sendrec per session")
    p.add_argument("--local-loops", type=int, default=2000, help="local sendrec loops (6)")
    p.add_argument("--unix-secs", type=float, default=1.0, help="Unix ping-pong length (6)")
    p.add_argument("--demo-loops", type=int, default=300, help="demo loops per client (7)")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    args = p.parse_args(argv)
    quick = args.quick
    if args.e2e_mib is None:
        args.e2e_mib = 16 if quick else 100
    if args.scale_nodes is None:
        args.scale_nodes = 8 if quick else 32
    if args.sess_dcs is None:
        args.sess_dcs = 2 if quick else 8
    if args.sess_per_dc is None:
        args.sess_per_dc = 100 if quick else 125
    parts = set(args.only.split(","))
    out: dict = {"machine": machine()}
    print("machine:", out["machine"], flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="dspbench"))
    t0 = time.monotonic()
    failed = False
    steps = [
        ("hop", f"1-3. one proxy hop (median of {args.runs} runs)",
         lambda d: summarize_hops(hop_benchmarks(args, d)), print_hops),
        ("local", f"6. local sendrec and its anchor (median of {args.runs} runs)",
         lambda d: local_benchmarks(args), print_local),
        ("e2e", f"4. end to end on an emulated cluster (median of {args.runs} runs)",
         lambda d: E2E.e2e_benchmarks(args, d), E2E.print_e2e),
        ("demo", "7. the make run demo", lambda d: demo_benchmark(args),
         lambda r: print(f"demo: {r['clients']} clients x {r['loops']} loops, p50 per client "
                         f"{r['client_p50s_us']} µs", flush=True)),
        ("scale", "5. scale", lambda d: E2E.scale_benchmarks(args, d), E2E.print_scale),
    ]
    try:
        for key, title, measure, show in steps:
            if key not in parts:
                continue
            print(f"\n== {title}", flush=True)
            for attempt in (1, 2):
                try:      # every attempt in a directory of its own
                    out[key] = measure(Path(tempfile.mkdtemp(prefix=f"{key}-", dir=tmp)))
                    out[f"{key}_table"] = show(out[key])
                    break
                except (BenchError, RuntimeError, TimeoutError, OSError,
                        subprocess.SubprocessError) as exc:
                    # one more try from scratch while the run is young: a transient failure
                    # (a link dropped on a busy machine) is reported, not hidden
                    again = attempt == 1 and time.monotonic() - t0 < RETRY_BEFORE
                    print(f"BENCHMARK PART {key} FAILED{' (trying once more)' if again else ''}"
                          f": {exc}", file=sys.stderr, flush=True)
                    out.setdefault("failures", []).append(f"{key}: {exc}")
                    if not again:
                        failed = True
                        break
    finally:
        if not os.environ.get("BENCH_KEEP"):
            shutil.rmtree(tmp, ignore_errors=True)
    elapsed = time.monotonic() - t0
    rows = T.evaluate(out, elapsed if parts >= {"hop", "local", "e2e", "demo", "scale"}
                      else None)
    out["targets"] = [vars(r) for r in rows]
    print(f"\n== targets (run took {elapsed / 60:.1f} min)", flush=True)
    print(T.format_rows(rows), flush=True)
    for failure in out.get("failures", ()):
        print(f"failed attempt: {failure}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    return 1 if failed else 0

if __name__ == "__main__":
    sys.exit(main())
