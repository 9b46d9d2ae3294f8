"""Benchmarks 4 and 5: end to end on an emulated cluster, and scale.

4. A cluster of node kernels and DSPs on this run's own 127.X.Y addresses, in relayed mode
   like the C set-up (client node -> LB host -> server node): node 3 a relayed client, node 5
   `lbhost` the LB host of the virtual LB node 0, node 1 the server.  `latency_client` and
   m3ftp PUT/GET (compressible text and random data, verified by SHA-256) through the LB, with
   and without `compress YES`, side by side with their anchors in the same cluster: the same
   programs from node 5 to node 1 with no LB (`direct`, one DSP pair), and node 5's own
   clients through the LB (local-client sessions).  For each path, the CPU each node kernel,
   DSP and latency server used per round trip (CpuMeter): where the round trip's time goes.
5. Scale: (a) an N-node cluster (by default 32 = the LB node and 31 real nodes, NR_NODES):
   time until every link is up, memory per DSP and node kernel; (b) many concurrent sessions
   through one LB host: node kernels with several DCs (`dvsctl node run --dcs N`), a service
   in every DC, one client process per DC on the relayed client node holding `per_dc` bound
   endpoints in a sendrec loop each (bench/many_clients.py), two servers; the LB host's DSP
   holds every session.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import time
from pathlib import Path

import psutil

from dsp_proxy import cpu_latency
from dsp_proxy.cluster import Cluster, module_argv
from dvs_apps.latency import loop_times, throughput

from . import chain_floor
from .figures import p50_p99_us
from .procstat import run_time

FTP_RE = re.compile(r"(\d+) bytes in ([0-9.]+) s, (\d+) bytes/s")

E2E_CONFIG = """
lb node0 {{ nodeid 0; cltname lbhost; lb_eps 100 200; max_sessions 150; session_timeout 600;
           period 30; }};
server node1 {{ nodeid 1; rname {net}.1; autobind YES; {opts} }};
client node3 {{ nodeid 3; rname {net}.3; {opts} }};
client lbhost {{ nodeid 5; rname {net}.5; autobind YES; {opts} }};
service latency {{ dcid 0; ext_ep 10; min_ep 10; max_ep 19; bind external; }};
service m3ftp {{ dcid 0; ext_ep 20; min_ep 20; max_ep 24; bind external; }};
"""
SRV, CLT, HOST = 1, 3, 5
RELAYED = "LB, relayed (node 3 -> lbhost -> node 1)"
DIRECT_LAT_EP, DIRECT_FTP_EP = 25, 27   # system endpoints outside both services
#: Seconds after a measured client ends before the CPU is sampled, so that the kernels' and
#: DSPs' work for its exit counts for its own path, not the next one.
SETTLE = 0.2


def _net(offset: int) -> str:
    pid = os.getpid()
    return f"127.{60 + (pid + offset) % 100}.{(pid // 100 + 3 * offset) % 250 + 1}"


class Programs:
    """Background programs on cluster nodes, all stopped at the end."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.procs: list[subprocess.Popen] = []

    def start(self, node: int, *argv, env=None, **kw) -> subprocess.Popen:
        p = self.cluster.popen(node, module_argv(*argv), env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, **kw)
        self.procs.append(p)
        return p

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()


def wait_bound(cluster: Cluster, node: int, dcid: int, ep: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    dvk = cluster.dvk(node)
    while time.monotonic() < deadline:
        try:
            if not dvk.getprocinfo(dcid, ep).p_rts_flags & 0x1:   # not SLOT_FREE
                return
        except Exception:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"endpoint {ep} of DC {dcid} not bound on node {node}")


def _ctl(cluster: Cluster, node: int, *args) -> None:
    res = cluster.run(node, module_argv("dvs_apps.dvsctl", *args), timeout=30)
    if res.returncode != 0:
        raise RuntimeError(f"dvsctl {args} on node {node}: {res.stdout}{res.stderr}")


def _sha(path: Path) -> str:
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------- part 4
def latency(cluster: Cluster, node: int, clt_ep: int, svr_ep: int, loops: int) -> dict:
    res = cluster.run(node, module_argv("dvs_apps.latency", "client", 0, clt_ep, svr_ep, loops,
                                        0, 0), timeout=300)
    if res.returncode != 0:
        raise RuntimeError(f"latency_client on node {node} -> {svr_ep}: "
                           f"{res.stdout[-500:]}{res.stderr[-500:]}")
    return {"p50_us": statistics.median(loop_times(res.stdout)) * 1e6,
            "msgs_per_s": throughput(res.stdout) or 0.0}


class CpuMeter:
    """CPU time of processes over a measured run: where a round trip's time goes, per
    process.  The total is the scheduler's exact run time of the process's threads (a thread
    that ends between two samples takes its whole run time out of the figure: the node
    kernels' and DSPs' threads live as long as the cluster); the system share comes from the
    coarser tick counts."""

    def __init__(self, procs: dict[str, subprocess.Popen]) -> None:
        self.procs = {name: psutil.Process(p.pid) for name, p in procs.items()}

    def sample(self) -> dict[str, tuple[float, float, float]]:
        """name -> (run time s, user s, system s); zeros for a process that has gone (it is
        then left out of the figures: no run time between two samples)."""
        out = {}
        for name, p in self.procs.items():
            try:
                out[name] = (run_time(p.pid), *p.cpu_times()[:2])
            except (ProcessLookupError, FileNotFoundError, psutil.NoSuchProcess):
                out[name] = (0.0, 0.0, 0.0)
        return out

    @staticmethod
    def per_round_trip(before: dict, after: dict, loops: int) -> dict[str, dict[str, float]]:
        """Each process that ran: µs of CPU per round trip (`us_per_rt`), and the user and
        system seconds behind its system share (`user_s`, `sys_s`)."""
        out = {}
        for name, b in before.items():
            run, user, sys_ = (a - x for a, x in zip(after[name], b))
            if run > 0:
                out[name] = {"us_per_rt": run / loops * 1e6, "user_s": user, "sys_s": sys_}
        return out


def cluster_processes(cluster: Cluster, servers: dict[str, subprocess.Popen],
                      roles: dict[int, str]) -> dict[str, subprocess.Popen]:
    """The processes of the DVS a round trip crosses: node kernels, DSPs and `servers`."""
    procs = {f"kernel {n} ({roles.get(n, 'node')})": p for n, p in cluster.kernels.items()}
    procs |= {f"DSP {n} ({roles.get(n, 'node')})": p for n, p in cluster.dsps.items()}
    return procs | servers


def ftp(cluster: Cluster, node: int, op: str, clt_ep: int, svr_ep: int, rmt: str,
        lcl: Path) -> float:
    res = cluster.run(node, module_argv("dvs_apps.m3ftp", op, 0, clt_ep, svr_ep, rmt,
                                        str(lcl)), timeout=600)
    m = FTP_RE.search(res.stdout)
    if res.returncode != 0 or m is None or "verified" not in res.stdout:
        raise RuntimeError(f"m3ftp {op} on node {node} -> {svr_ep}: "
                           f"{res.stdout[-500:]}{res.stderr[-500:]}")
    return int(m.group(3)) / 1e6


def concurrent_clients(cluster: Cluster, node: int, svr_ep: int, count: int,
                       loops: int) -> dict:
    """`count` latency_client processes on `node` at once, `loops` sendrec each (endpoints 70
    and up): p50/p99 of every loop time of every client."""
    done = cluster.run_together([(node, module_argv("dvs_apps.latency", "client", 0, 70 + i,
                                                     svr_ep, loops, 0, 0))
                                 for i in range(count)], timeout=600)
    times: list[float] = []
    failed = 0
    for res in done:
        got = loop_times(res.stdout)
        times += got
        failed += (res.returncode != 0) + (loops - len(got))
    figures = p50_p99_us(times) if times else {"p50_us": float("nan"), "p99_us": float("nan")}
    return {"clients": count, "loops": loops, "failed": failed, **figures}


def e2e_cluster(tmp: Path, label: str, opts: str, offset: int, args,
                with_clients: bool = False, dsp_args: tuple[str, ...] = ()) -> dict:
    """One cluster of part 4: the latency of the three paths with each process's CPU, m3ftp
    on them and, `with_clients`, the concurrent clients; its DSPs get `dsp_args`."""
    d = tmp / label
    d.mkdir()
    cfg = d / "e2e.cfg"
    cfg.write_text(E2E_CONFIG.format(net=_net(offset), opts=opts))
    size = args.e2e_mib << 20
    files = {"text": d / "text.src", "random": d / "random.src"}
    line = b"compressible line of text for the m3ftp benchmark, 0123456789\n"
    with open(files["text"], "wb") as f:
        for _ in range(size // (1 << 20)):
            f.write((line * ((1 << 20) // len(line) + 1))[:1 << 20])
    with open(files["random"], "wb") as f:
        for _ in range(size // (1 << 20)):
            f.write(os.urandom(1 << 20))
    srvdir = d / "srv"
    srvdir.mkdir()
    out: dict = {"latency": {}, "ftp": {}, "size_mib": size >> 20}
    with Cluster(cfg, rundir=str(d), log_level="WARNING", dsp_args=dsp_args) as cl:
        progs = Programs(cl)
        try:
            servers = {f"latency server, ep {ep}": progs.start(SRV, "dvs_apps.latency", "server",
                                                            0, ep)
                       for ep in (10, DIRECT_LAT_EP)}
            for ep in (20, DIRECT_FTP_EP):
                progs.start(SRV, "dvs_apps.m3ftp", "server", 0, ep,
                            env={"M3FTPD_DIR": str(srvdir)})
            for ep in (10, DIRECT_LAT_EP, 20, DIRECT_FTP_EP):
                wait_bound(cl, SRV, 0, ep)
            _ctl(cl, HOST, "rmtbind", 0, DIRECT_LAT_EP, SRV, "latdirect")
            _ctl(cl, HOST, "rmtbind", 0, DIRECT_FTP_EP, SRV, "ftpdirect")
            paths = {"direct (node 5 -> node 1, no LB)": (HOST, DIRECT_LAT_EP, DIRECT_FTP_EP),
                     "LB, local client (node 5 -> LB -> node 1)": (HOST, 10, 20),
                     RELAYED: (CLT, 10, 20)}
            for i, (node, lep, _fep) in enumerate(paths.values()):
                latency(cl, node, 50 + i, lep, 20)   # warm-up: sessions, autobinds
            meter = CpuMeter(cluster_processes(cl, servers, {SRV: "server",
                                                             CLT: "relayed client",
                                                             HOST: "LB host"}))
            for _run in range(args.runs):
                for i, (name, (node, lep, _fep)) in enumerate(paths.items()):
                    before = meter.sample()
                    r = latency(cl, node, 50 + i, lep, args.e2e_loops)
                    time.sleep(SETTLE)  # the client's exit is part of its run
                    r["cpu"] = meter.per_round_trip(before, meter.sample(), args.e2e_loops)
                    out["latency"].setdefault(name, []).append(r)
            if with_clients and args.clients:
                out["clients"] = concurrent_clients(cl, CLT, 10, args.clients,
                                                    args.client_loops)
            ftp_runs = 1 if size >= 64 << 20 else max(1, args.runs)
            for _run in range(ftp_runs):
                for i, (name, (node, _lep, fep)) in enumerate(paths.items()):
                    for kind, src in files.items():
                        rmt = f"{kind}{i}"
                        back = d / f"{kind}{i}.back"
                        put = ftp(cl, node, "-p", 60 + i, fep, rmt, src)
                        get = ftp(cl, node, "-g", 60 + i, fep, rmt, back)
                        if _sha(back) != _sha(src):
                            raise RuntimeError(f"m3ftp GET {rmt}: content differs")
                        back.unlink()
                        (srvdir / rmt).unlink()
                        out["ftp"].setdefault(f"{name} {kind}", []).append(
                            {"put_MBps": put, "get_MBps": get})
            st = cl.status(HOST)
            link = st.get("links", {}).get(str(SRV), {}).get("sent", {})
            out["lbhost_to_server"] = {k: link.get(k) for k in
                                       ("frames", "commands", "batches", "lz4_frames",
                                        "lz4_raw", "lz4_wire")}
        finally:
            progs.close()
    for f in files.values():
        f.unlink()
    return out


#: Round trips of each run of the relayed path's floor (bench/chain_floor.py, about 1 s).
FLOOR_LOOPS = 3000


def e2e_benchmarks(args, tmp: Path) -> dict:
    res = {}
    for i, (label, opts) in enumerate((("compress NO", ""), ("compress YES", "compress YES;"))):
        print(f"   cluster with {label} ...", flush=True)
        res[label] = e2e_cluster(tmp, label.replace(" ", "_"), opts, 10 + i, args,
                                 with_clients=not opts)
    print("   the relayed round trip's message pattern alone ...", flush=True)
    try:      # an anchor: its failure is reported, the clusters' figures are kept
        res["compress NO"]["floor"] = [chain_floor.run(FLOOR_LOOPS) for _run in range(args.runs)]
    except (RuntimeError, OSError) as exc:
        res["compress NO"]["floor_error"] = str(exc)
    res["compress NO"]["cpu_latency_0"] = latency_mode(args, tmp)
    return res


def latency_mode(args, tmp: Path) -> dict:
    """The `compress NO` cluster again with every DSP started with `--cpu-latency 0` (idle
    CPUs poll instead of halting, docs/operations.md), and the floor with the same request
    held by this process: how much of each figure is waking halted CPUs.  Reported beside the
    targets, which are judged on the machine as it is."""
    if not os.access(cpu_latency.DEVICE, os.W_OK):
        return {"skipped": f"{cpu_latency.DEVICE} is missing or not writable"}
    print("   cluster with compress NO and --cpu-latency 0, and the floor with it ...",
          flush=True)
    try:      # beside the targets: its failure is reported, the other figures are kept
        out = e2e_cluster(tmp, "cpu_latency_0", "", 12, args, with_clients=True,
                          dsp_args=("--cpu-latency", "0"))
    except (RuntimeError, OSError) as exc:
        return {"error": str(exc)}
    try:
        with cpu_latency.CpuLatencyRequest(0):
            out["floor"] = [chain_floor.run(FLOOR_LOOPS) for _run in range(args.runs)]
    except (RuntimeError, OSError) as exc:
        out["floor_error"] = str(exc)
    return out


def _med(xs: list[dict], key: str) -> float:
    return statistics.median(x[key] for x in xs)


def print_e2e(res: dict) -> str:
    lines = ["| path | compression | latency p50 µs | msgs/s | ratio p50 vs direct |",
             "|---|---|---|---|---|"]
    for label, r in res.items():
        lat = r["latency"]
        direct = _med(next(iter(lat.values())), "p50_us")
        for name, runs in lat.items():
            p50 = _med(runs, "p50_us")
            lines.append(f"| {name} | {label} | {p50:,.0f} | {_med(runs, 'msgs_per_s'):,.0f} | "
                         f"{p50 / direct:.2f}x |")
    lines += ["", *latency_mode_lines(res.get("compress NO", {}))]
    size = next(iter(res.values()))["size_mib"]
    lines += ["", f"| m3ftp {size} MiB: path, file | compression | PUT MB/s | GET MB/s | "
              "PUT vs direct |", "|---|---|---|---|---|"]
    for label, r in res.items():
        f = r["ftp"]
        names = list(f)
        for name in names:
            kind = name.rsplit(" ", 1)[1]
            direct = next(n for n in names if n.startswith("direct") and n.endswith(kind))
            put = _med(f[name], "put_MBps")
            lines.append(f"| {name} | {label} | {put:,.1f} | {_med(f[name], 'get_MBps'):,.1f} | "
                         f"{put / _med(f[direct], 'put_MBps'):.2f}x |")
    for label, r in res.items():
        lines += ["", *cpu_table(label, r["latency"])]
    floor = res.get("compress NO", {}).get("floor")
    failed = res.get("compress NO", {}).get("floor_error")
    if failed:
        lines += ["", f"floor of the relayed round trip (bench/chain_floor.py): FAILED: {failed}"]
    if floor:
        relayed = _med(res["compress NO"]["latency"][RELAYED], "p50_us")
        base = _med(floor, "p50_us")
        cpu = ", ".join(f"{name} {statistics.median(f['cpu_us'][name] for f in floor):.0f}"
                        for name in floor[0]["cpu_us"])
        lines += ["", f"floor of the relayed round trip (bench/chain_floor.py: its processes, "
                  f"sockets and messages, no logic): p50 {base:,.0f} µs, p99 "
                  f"{_med(floor, 'p99_us'):,.0f} µs; CPU µs per round trip: {cpu}; "
                  f"the relayed path is {relayed - base:,.0f} µs above it"]
    for label, r in res.items():
        lines.append(f"\n{label}: LB host -> server link: {r['lbhost_to_server']}")
        c = r.get("clients")
        if c:
            lines.append(f"{label}: {c['clients']} concurrent relayed clients x {c['loops']} "
                         f"sendrec: p50 {c['p50_us']:,.0f} µs, p99 {c['p99_us']:,.0f} µs, "
                         f"{c['failed']} failed")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def latency_mode_lines(r: dict) -> list[str]:
    """Part 4's latency with `--cpu-latency 0` beside the default run's (compress NO)."""
    mode = r.get("cpu_latency_0")
    if not mode:
        return []
    if "skipped" in mode:
        return [f"with --cpu-latency 0: not measured ({mode['skipped']})"]
    if "error" in mode:
        return [f"with --cpu-latency 0: FAILED: {mode['error']}"]
    lines = ["| compress NO | as the machine is | with --cpu-latency 0 |", "|---|---|---|"]
    for name, runs in mode["latency"].items():
        lines.append(f"| latency p50 µs, {name} | {_med(r['latency'][name], 'p50_us'):,.0f} | "
                     f"{_med(runs, 'p50_us'):,.0f} |")
    for name, runs in mode["ftp"].items():
        if name in r["ftp"]:
            lines.append(f"| m3ftp PUT / GET MB/s, {name} | "
                         f"{_med(r['ftp'][name], 'put_MBps'):,.1f} / "
                         f"{_med(r['ftp'][name], 'get_MBps'):,.1f} | "
                         f"{_med(runs, 'put_MBps'):,.1f} / {_med(runs, 'get_MBps'):,.1f} |")
    if mode.get("clients") and r.get("clients"):
        c, m = r["clients"], mode["clients"]
        lines.append(f"| {c['clients']} concurrent relayed clients, p50 / p99 µs | "
                     f"{c['p50_us']:,.0f} / {c['p99_us']:,.0f} | "
                     f"{m['p50_us']:,.0f} / {m['p99_us']:,.0f} |")
    if mode.get("floor"):
        base = f"{_med(r['floor'], 'p50_us'):,.0f}" if r.get("floor") else "-"
        lines.append(f"| floor of the relayed round trip | {base} | "
                     f"{_med(mode['floor'], 'p50_us'):,.0f} |")
    elif mode.get("floor_error"):
        lines.append(f"floor with --cpu-latency 0: FAILED: {mode['floor_error']}")
    if all(x.get("cpu") for runs in mode["latency"].values() for x in runs):
        lines += ["", *cpu_table("compress NO, --cpu-latency 0", mode["latency"])]
    return lines


def cpu_table(label: str, lat: dict) -> list[str]:
    """CPU µs per round trip of every node kernel, DSP and latency server on each path (medians
    of the runs; the client programs are not metered), and each one's system (Linux kernel)
    share over all the paths' runs."""
    paths = list(lat)
    names = sorted({n for runs in lat.values() for r in runs for n in r["cpu"]})
    lines = [f"| CPU µs per round trip ({label}) | "
             + " | ".join(p.split(" (")[0] for p in paths) + " | system share (all paths) |",
             "|---|" + "---|" * (len(paths) + 1)]
    for n in names:
        cells = [_med_cpu(lat[p], n) for p in paths]
        used = [r["cpu"][n] for p in paths for r in lat[p] if n in r["cpu"]]
        user = sum(u["user_s"] for u in used)
        sys_ = sum(u["sys_s"] for u in used)
        share = f"{sys_ / (user + sys_):.0%}" if user + sys_ > 0 else "-"
        lines.append(f"| {n} | " + " | ".join(f"{c:,.0f}" if c >= 1 else "-" for c in cells)
                     + f" | {share} |")
    lines.append("| sum | " + " | ".join(
        f"{sum(_med_cpu(lat[p], n) for n in names):,.0f}" for p in paths) + " | |")
    return lines


def _med_cpu(runs: list[dict], name: str) -> float:
    """Median µs per round trip of `name` over `runs` (0 in a run it did not take part in)."""
    return statistics.median(r["cpu"].get(name, {"us_per_rt": 0.0})["us_per_rt"]
                             for r in runs)


# ---------------------------------------------------------------------------------- part 5
#: How long the N-node cluster may take until every link is up (then its count is reported).
STARTUP_TIMEOUT = 120.0


def scale_startup(args, tmp: Path, nodes: int) -> dict:
    """An N-node cluster: LB node 0, servers and clients 1..N-1 in full mesh."""
    d = tmp / f"mesh{nodes}"
    d.mkdir()
    net = _net(20)
    text = "lb node0 { nodeid 0; period 30; max_sessions 150; };\n"
    for n in range(1, nodes):
        role = "server" if n <= (nodes - 1) // 2 else "client"
        text += f"{role} node{n} {{ nodeid {n}; rname {net}.{n}; }};\n"
    text += "service latency { dcid 0; ext_ep 10; min_ep 10; max_ep 19; bind external; };\n"
    cfg = d / "mesh.cfg"
    cfg.write_text(text)
    cl = Cluster(cfg, rundir=str(d), log_level="WARNING")
    try:
        t0 = time.monotonic()
        for n in cl.nodes:
            cl.start_kernel(n)
        t1 = time.monotonic()
        for n in cl.nodes:
            cl.start_dsp(n)
        try:    # bounded: a cluster whose links do not all come up is a figure, not a hang
            cl.wait_links_up(timeout=STARTUP_TIMEOUT)
        except TimeoutError:
            pass
        t2 = time.monotonic()
        time.sleep(2)      # settle: every thread started
        dsp = [psutil.Process(p.pid) for p in cl.dsps.values()]
        ker = [psutil.Process(p.pid) for p in cl.kernels.values()]
        rss = [p.memory_info().rss / 2**20 for p in dsp]
        uss = [p.memory_full_info().uss / 2**20 for p in dsp]
        krss = [p.memory_info().rss / 2**20 for p in ker]
        state = cl.link_state()
        links = sum(1 for up in state.values() if up)
        downs = sum(link.get("downs", 0) for n in cl.nodes
                    for link in (cl.status(n).get("links") or {}).values())
        return {"nodes": nodes, "real_nodes": len(cl.nodes), "links_up": links,
                "links": len(state), "link_downs": downs,
                "kernels_s": t1 - t0, "links_up_s": t2 - t1, "total_s": t2 - t0,
                "dsp_rss_mib": statistics.median(rss), "dsp_rss_max_mib": max(rss),
                "dsp_uss_mib": statistics.median(uss),
                "dsp_threads": statistics.median(p.num_threads() for p in dsp),
                "kernel_rss_mib": statistics.median(krss)}
    finally:
        cl.stop()


SESS_CONFIG = """
lb node0 {{ nodeid 0; cltname lbhost; lb_eps 29 220; max_sessions 157; session_timeout 600;
           period 30; }};
server node1 {{ nodeid 1; rname {net}.1; autobind YES; }};
server node2 {{ nodeid 2; rname {net}.2; autobind YES; }};
client node3 {{ nodeid 3; rname {net}.3; }};
client lbhost {{ nodeid 5; rname {net}.5; }};
service latency {{ ext_ep 10; min_ep 10; max_ep 19; bind external; }};
"""
FIRST_CLT_EP = 30


def scale_sessions(args, tmp: Path, dcs: int, per_dc: int, rounds: int) -> dict:
    d = tmp / "sessions"
    d.mkdir()
    cfg = d / "sess.cfg"
    cfg.write_text(SESS_CONFIG.format(net=_net(30)))
    clients: list[subprocess.Popen] = []
    with Cluster(cfg, rundir=str(d), log_level="WARNING",
                 kernel_args=["--dcs", str(dcs)]) as cl:
        progs = Programs(cl)
        try:
            for dc in range(dcs):
                for n in (1, 2):
                    progs.start(n, "dvs_apps.latency", "server", dc, 10)
            for dc in range(dcs):
                for n in (1, 2):
                    wait_bound(cl, n, dc, 10)
                wait_bound(cl, CLT, dc, 10)      # ext_ep bound to the LB node
            lb = psutil.Process(cl.dsps[HOST].pid)
            cpu0, t0 = lb.cpu_times(), time.monotonic()
            rss0 = lb.memory_info().rss / 2**20
            for dc in range(dcs):
                clients.append(subprocess.Popen(
                    module_argv("bench.many_clients", dc, FIRST_CLT_EP, per_dc, 10, rounds),
                    env=cl.env(CLT), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, text=True))
            results = []
            for p in clients:
                line = p.stdout.readline()
                if not line:
                    raise RuntimeError(f"many_clients exited: {p.stderr.read()[-1000:]}")
                results.append(json.loads(line))
            t1 = time.monotonic()
            cpu1 = lb.cpu_times()
            rss1 = lb.memory_info().rss / 2**20
            # every client still holds its endpoints: the LB host's table must hold them all
            deadline = time.monotonic() + 5
            held = 0
            while time.monotonic() < deadline:
                st = cl.status(HOST)
                held = len((st.get("group") or {}).get("sessions") or ())
                if held >= dcs * per_dc:
                    break
                time.sleep(0.5)
            busy = (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / (t1 - t0)
            lbst = cl.status(HOST).get("group") or {}
            out = {"dcs": dcs, "per_dc": per_dc, "sessions": dcs * per_dc, "rounds": rounds,
                   "bound": sum(r["bound"] for r in results),
                   "served_clients": sum(r["served_clients"] for r in results),
                   "replies": sum(r["replies"] for r in results),
                   "failed": sum(r["failed"] for r in results),
                   "errors": [e for r in results for e in r["errors"]][:5],
                   "held_in_lb_table": held,
                   "sessions_started": lbst.get("sessions_started"),
                   "seconds": max(r["seconds"] for r in results),
                   "p50_ms": statistics.median(r["p50_ms"] for r in results if r["p50_ms"]),
                   "lb_cpu_pct": 100 * busy, "lb_rss_before_mib": rss0,
                   "lb_rss_mib": rss1,
                   "per_server": {n: s.get("sessions") for n, s in
                                  (lbst.get("servers") or {}).items()}}
            out["round_trips_per_s"] = out["replies"] / out["seconds"] if out["seconds"] else 0
            return out
        finally:
            for p in clients:
                try:
                    p.stdin.close()
                except OSError:
                    pass
            for p in clients:
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            progs.close()


def scale_benchmarks(args, tmp: Path) -> dict:
    nodes = args.scale_nodes
    print(f"   {nodes}-node cluster start-up ...", flush=True)
    res = {"startup": scale_startup(args, tmp, nodes)}
    dcs, per_dc = args.sess_dcs, args.sess_per_dc
    print(f"   {dcs * per_dc} concurrent sessions ({dcs} DCs x {per_dc}) ...", flush=True)
    res["sessions"] = scale_sessions(args, tmp, dcs, per_dc, args.sess_rounds)
    return res


def print_scale(res: dict) -> str:
    s, c = res["startup"], res["sessions"]
    lines = [
        "| scale | figure |", "|---|---|",
        f"| {s['nodes']}-node cluster ({s['real_nodes']} node kernels + DSPs, "
        f"{s['links']} node->peer links) | node kernels up {s['kernels_s']:.1f} s, then "
        f"{s['links_up']}/{s['links']} links up {s['links_up_s']:.1f} s after the DSPs started "
        f"(total {s['total_s']:.1f} s; {s['link_downs']} link downs meanwhile) |",
        f"| memory per DSP | RSS {s['dsp_rss_mib']:.1f} MiB median (max "
        f"{s['dsp_rss_max_mib']:.1f}), USS {s['dsp_uss_mib']:.1f} MiB, "
        f"{s['dsp_threads']:.0f} threads |",
        f"| memory per node kernel | RSS {s['kernel_rss_mib']:.1f} MiB median |",
        f"| {c['sessions']} concurrent sessions through one LB host ({c['dcs']} DCs x "
        f"{c['per_dc']}, {c['rounds']} sendrec each) | {c['served_clients']}/{c['sessions']} "
        f"clients served, {c['replies']} replies, {c['failed']} failed; "
        f"{c['held_in_lb_table']} sessions held in the LB table; "
        f"{c['round_trips_per_s']:,.0f} round trips/s, p50 {c['p50_ms']:.1f} ms |",
        f"| the LB host's DSP during it | CPU {c['lb_cpu_pct']:.0f} % of one core; RSS "
        f"{c['lb_rss_before_mib']:.1f} -> {c['lb_rss_mib']:.1f} MiB; sessions per server "
        f"{c['per_server']} |",
    ]
    if c["errors"]:
        lines.append(f"\nerrors: {c['errors']}")
    text = "\n".join(lines)
    print(text, flush=True)
    return text
