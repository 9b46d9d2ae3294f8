"""`make run`: a four-node DVS cluster on this machine, real traffic through the DSPs and the
virtual LB node, and a readable summary.

Nodes 1 and 2 are servers (latency_server on endpoint 10, m3ftpd on endpoint 20, one shared
export directory), nodes 3 and 4 are clients; node 0 is the virtual load balancer of
examples/cluster.cfg.  Clients address the services at (node 0, ext_ep); each client node's
DSP pins every client session to a server.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .cluster import REPO_ROOT, Cluster, module_argv

DEFAULT_CONFIG = REPO_ROOT / "examples" / "cluster.cfg"
AVG_RE = re.compile(r"Total average latency in (\d+) loops: ([0-9.]+)")
RATE_RE = re.compile(r"Message throughput in \d+ loops: ([0-9.]+)")
LOOP_RE = re.compile(r"Time total elapsed in loop \d+: ([0-9.]+)")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def run_demo(config: Path, loops: int, mib: int, keep: bool) -> int:
    work = Path(tempfile.mkdtemp(prefix="dsp-demo-"))
    logs = work / "logs"
    logs.mkdir()
    export = work / "export"
    export.mkdir()
    rundir = tempfile.mkdtemp(prefix="dvk")
    print(f"Starting the cluster of {config.name} (logs in {logs}) ...", flush=True)
    t0 = time.monotonic()
    cluster = Cluster(config, rundir=rundir, log_dir=str(logs))
    servers: list[subprocess.Popen] = []
    try:
        cluster.start()
        up_time = time.monotonic() - t0
        nodes = cluster.nodes
        roles = {n.nodeid: n.role for n in cluster.cfg.nodes}
        srv_nodes = [n for n in nodes if roles[n] == "server"]
        clt_nodes = [n for n in nodes if roles[n] == "client"]
        lb = cluster.cfg.lb.nodeid
        for n in srv_nodes:
            env = {"M3FTPD_DIR": str(export)}
            for argv in (module_argv("dvs_apps.latency", "server", 0, 10),
                         module_argv("dvs_apps.m3ftp", "server", 0, 20)):
                servers.append(cluster.popen(n, argv, env=env,
                                             stdout=subprocess.DEVNULL,
                                             stderr=subprocess.DEVNULL))
        _wait_bound(cluster, srv_nodes, (10, 20))

        print(f"Running {loops} sendrec round trips from {2 * len(clt_nodes)} clients through "
              f"the virtual LB node {lb} ...", flush=True)
        clients = []
        ep = 50
        for n in clt_nodes:
            for _ in range(2):
                clients.append((n, ep, cluster.popen(
                    n, module_argv("dvs_apps.latency", "client", 0, ep, 10, loops, 0, 0),
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
                ep += 1
        lat_rows = []
        for n, ep, proc in clients:
            out, _ = proc.communicate(timeout=300)
            times = [float(x) for x in LOOP_RE.findall(out)]
            avg = AVG_RE.search(out)
            rate = RATE_RE.search(out)
            lat_rows.append((n, ep, proc.returncode, len(times), _percentile(times, 0.5),
                             _percentile(times, 0.99), float(avg.group(2)) if avg else 0.0,
                             float(rate.group(1)) if rate else 0.0, out.count("ERROR")))

        print(f"Moving a {mib} MiB file with m3ftp through the LB (PUT from node "
              f"{clt_nodes[0]}, GET from node {clt_nodes[-1]}) ...", flush=True)
        src = work / "upload.dat"
        src.write_bytes(os.urandom(mib << 20))
        back = work / "download.dat"
        ftp = []
        for n, flag, local in ((clt_nodes[0], "-p", src), (clt_nodes[-1], "-g", back)):
            t1 = time.monotonic()
            res = cluster.run(n, module_argv("dvs_apps.m3ftp", flag, 0, 11, 20, "demo.dat",
                                             str(local)), timeout=300)
            secs = time.monotonic() - t1
            ftp.append((n, "PUT" if flag == "-p" else "GET", res.returncode,
                        "verified" in res.stdout, secs))
        same = (back.exists() and hashlib.sha256(back.read_bytes()).digest()
                == hashlib.sha256(src.read_bytes()).digest())

        time.sleep(1.2)  # let every DSP write its figures once more
        status = {n: cluster.status(n) for n in nodes}
        links = cluster.link_state()
        ok = _summary(cluster, up_time, lat_rows, ftp, mib, same, status, links, srv_nodes,
                      clt_nodes)
    finally:
        for p in servers:
            p.terminate()
        for p in servers:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
        cluster.stop()
        shutil.rmtree(rundir, ignore_errors=True)
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


def _wait_bound(cluster: Cluster, nodes: list[int], eps: tuple[int, ...]) -> None:
    deadline = time.monotonic() + 20
    for n in nodes:
        for ep in eps:
            while cluster.dvk(n).getprocinfo(0, ep).p_rts_flags & 0x1:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"endpoint {ep} not bound on node {n}")
                time.sleep(0.05)


def _summary(cluster, up_time, lat_rows, ftp, mib, same, status, links, srv_nodes,
             clt_nodes) -> bool:
    line = "=" * 78
    print(f"\n{line}\n DSP demo: {len(cluster.nodes)} nodes + virtual LB node "
          f"{cluster.cfg.lb.nodeid}, all links up in {up_time:.1f} s\n{line}")
    print("\nLinks (as each node's DVK sees them):")
    for n in cluster.nodes:
        peers = sorted(p for (a, p) in links if a == n)
        marks = "  ".join(f"{p}:{'up' if links[(n, p)] else 'DOWN'}" for p in peers)
        print(f"  node {n}: {marks}")
    print("\nLatency through the LB (sendrec to ext_ep 10 on node 0, 120-byte headers):")
    print(f"  {'client':>9} {'loops':>6} {'p50 us':>8} {'p99 us':>8} {'avg us':>8} "
          f"{'msg/s':>8} {'errors':>6}")
    ok = True
    for n, ep, rc, count, p50, p99, avg, rate, errors in lat_rows:
        print(f"  {f'{ep}@{n}':>9} {count:>6} {p50 * 1e6:>8.0f} {p99 * 1e6:>8.0f} "
              f"{avg * 1e6:>8.0f} {rate:>8.0f} {errors:>6}")
        ok &= rc == 0 and errors == 0
    print("\nHow the client nodes' DSPs spread the work over the servers:")
    for n in clt_nodes:
        group = (status.get(n) or {}).get("group") or {}
        per = group.get("servers", {})
        spread = ", ".join(f"node {s}: {v['commands']} cmds" for s, v in sorted(per.items()))
        print(f"  node {n}: {group.get('sessions_started', 0)} sessions started; {spread}")
    print("\nServer load as last reported:")
    for s in srv_nodes:
        load = ((status.get(s) or {}).get("group") or {}).get("load", {})
        print(f"  node {s}: cpu {load.get('cpu', '?')}% level {load.get('level', '?')}")
    print(f"\nm3ftp through the LB ({mib} MiB, 64 KiB vcopy chunks, content verified):")
    for n, op, rc, verified, secs in ftp:
        rate = (mib << 20) / secs / 1e6 if secs else 0
        print(f"  {op} from node {n}: {secs:6.2f} s  {rate:7.1f} MB/s  "
              f"{'verified' if verified else 'NOT VERIFIED'}")
        ok &= rc == 0 and verified
    print(f"  downloaded file {'equals' if same else 'DIFFERS FROM'} the uploaded one")
    ok &= same and all(links.values())
    print(f"\n{line}\n {'OK' if ok else 'FAILED'}: the cluster was stopped cleanly.\n{line}")
    return ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsp_proxy.demo", description=__doc__)
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    p.add_argument("--loops", type=int, default=300)
    p.add_argument("--mib", type=int, default=10)
    p.add_argument("--keep", action="store_true", help="keep the logs and files")
    args = p.parse_args(argv)
    return run_demo(args.config, args.loops, args.mib, args.keep)


if __name__ == "__main__":
    sys.exit(main())
