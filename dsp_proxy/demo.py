"""`make run`: a four-node DVS cluster on this machine, real traffic through the DSPs and the
virtual LB node, and a readable summary.

Nodes 1 and 2 are servers (latency_server on endpoint 10, m3ftpd on endpoint 20, one shared
export directory), nodes 3 and 4 are clients; node 0 is the virtual load balancer of
examples/cluster.cfg.  Clients address the services at (node 0, ext_ep); each client node's
DSP pins every client session to a server.  Every DSP serves its statistics on its own address
at port 4000 + node id while the demo runs; `--screenshot FILE` saves the page of the first
client node (an LB host: it balances its clients) and its /cluster view with headless
Chromium before stopping.

Counts: a *round trip* is one request answered (what a server served, from its node kernel's
counters); *commands* are DVK commands a DSP forwarded (requests, copies and their ACKs).
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

from dvs_apps.latency import loop_times, p50_p99, throughput

from .cluster import REPO_ROOT, STATS_BASE, Cluster, module_argv

DEFAULT_CONFIG = REPO_ROOT / "examples" / "cluster.cfg"
AVG_RE = re.compile(r"Total average latency in (\d+) loops: ([0-9.]+)")
SESSION_RE = re.compile(r"session: client \S+ -> service \S+ \(ep \d+\) on server node (\d+)")
#: Chromium's flags for a screenshot that talks to nothing but the page.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


def run_demo(config: Path, loops: int, mib: int, keep: bool,
             screenshot: Path | None = None) -> int:
    work = Path(tempfile.mkdtemp(prefix="dsp-demo-"))
    logs = work / "logs"
    logs.mkdir()
    export = work / "export"
    export.mkdir()
    rundir = tempfile.mkdtemp(prefix="dvk")
    print(f"Starting the cluster of {config.name} (logs in {logs}) ...", flush=True)
    t0 = time.monotonic()
    cluster = Cluster(config, rundir=rundir, log_dir=str(logs), stats_base=STATS_BASE)
    servers: list[subprocess.Popen] = []
    dsps: dict[int, subprocess.Popen] = {}
    ok = False
    try:
        cluster.start()
        up_time = time.monotonic() - t0
        dsps = dict(cluster.dsps)
        nodes = cluster.nodes
        roles = {n.nodeid: n.role for n in cluster.cfg.nodes}
        srv_nodes = [n for n in nodes if roles[n] == "server"]
        clt_nodes = [n for n in nodes if roles[n] == "client"]
        lb = cluster.cfg.lb.nodeid
        print(f"Statistics of the LB host node {clt_nodes[0]}: "
              f"http://{cluster.stats_address(clt_nodes[0])}/ (and /cluster)", flush=True)
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
        clients = [(n, 50 + 2 * i + k) for i, n in enumerate(clt_nodes) for k in range(2)]
        done = cluster.run_together([(n, module_argv("dvs_apps.latency", "client", 0, ep, 10,
                                                     loops, 0, 0)) for n, ep in clients],
                                    timeout=max(300.0, loops * 0.02))
        lat_rows = []
        for (n, ep), res in zip(clients, done):
            out = res.stdout
            times = loop_times(out)
            avg = AVG_RE.search(out)
            p50, p99 = p50_p99(times) if times else (0.0, 0.0)
            lat_rows.append((n, ep, res.returncode, len(times), p50, p99,
                             float(avg.group(2)) if avg else 0.0, throughput(out) or 0.0,
                             out.count("ERROR")))

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
        served = {n: round_trips_served(cluster, n) for n in srv_nodes}
        sessions = sessions_per_server(logs, clt_nodes)
        ok = _summary(cluster, up_time, lat_rows, ftp, mib, same, status, links, srv_nodes,
                      clt_nodes, served, sessions)
        if screenshot is not None:
            base = f"http://{cluster.stats_address(clt_nodes[0])}"
            ok &= take_screenshot(f"{base}/", screenshot)
            ok &= take_screenshot(f"{base}/cluster",
                                  screenshot.with_name(f"{screenshot.stem}-cluster.png"))
        print("\nStopping the cluster ...", flush=True)
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
    codes = {n: p.returncode for n, p in dsps.items()}
    clean = bool(codes) and all(c == 0 for c in codes.values())
    line = "=" * 78
    if clean:
        verdict = "the cluster was stopped cleanly (every DSP exited with status 0)"
    else:
        verdict = "the cluster did not stop cleanly: DSP exit statuses " + ", ".join(
            f"node {n}: {c}" for n, c in sorted(codes.items()))
    ok &= clean
    print(f"\n{line}\n {'OK' if ok else 'FAILED'}: {verdict}.\n{line}")
    if keep:
        print(f"logs and files kept in {work}")
    return 0 if ok else 1


def round_trips_served(cluster: Cluster, node: int) -> int:
    """Requests a server node answered to other nodes: the messages its processes sent to
    remote nodes (the `rsnt` column of its node kernel's DC 0 statistics)."""
    dvk = cluster.dvk(node)
    text = dvk.proc_text(f"{dvk.getdcinfo(0).dc_name}/stats")
    total = 0
    for row in text.splitlines()[1:]:
        cols = row.split()
        if len(cols) >= 8 and cols[2] != "-" and int(cols[2]) >= 0:
            total += int(cols[6])
    return total


def sessions_per_server(logs: Path, clt_nodes: list[int]) -> dict[int, int]:
    """Sessions the client nodes' DSPs pinned to each server (their "session:" log lines)."""
    count: dict[int, int] = {}
    for n in clt_nodes:
        path = logs / f"dsp{n}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        for m in SESSION_RE.finditer(text):
            count[int(m.group(1))] = count.get(int(m.group(1)), 0) + 1
    return count


def take_screenshot(url: str, path: Path) -> bool:
    """A PNG of `url` with headless Chromium (its own throw-away profile)."""
    chrome = shutil.which("chromium") or shutil.which("chromium-browser") or \
        shutil.which("google-chrome")
    if chrome is None:
        print("no chromium on PATH: no screenshot (apt-get install chromium)")
        return False
    profile = tempfile.mkdtemp(prefix="dsp-chromium-")
    try:
        res = subprocess.run([chrome, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                              "--window-size=1100,1000", f"--screenshot={path.resolve()}",
                              url], capture_output=True, text=True, timeout=120)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    if res.returncode != 0 or not path.exists():
        print(f"screenshot of {url} failed: {res.stderr.strip()[-300:]}")
        return False
    print(f"screenshot of {url} saved as {path}")
    return True


def _wait_bound(cluster: Cluster, nodes: list[int], eps: tuple[int, ...]) -> None:
    deadline = time.monotonic() + 20
    for n in nodes:
        for ep in eps:
            while cluster.dvk(n).getprocinfo(0, ep).p_rts_flags & 0x1:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"endpoint {ep} not bound on node {n}")
                time.sleep(0.05)


def _summary(cluster, up_time, lat_rows, ftp, mib, same, status, links, srv_nodes,
             clt_nodes, served, sessions) -> bool:
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
    print("\nWhat each server served (sessions the client nodes' DSPs gave it; round trips "
          "its programs answered):")
    for s in srv_nodes:
        load = ((status.get(s) or {}).get("group") or {}).get("load", {})
        print(f"  server node {s}: {sessions.get(s, 0):>3} sessions {served.get(s, 0):>7} "
              f"round trips   load: cpu {load.get('cpu', '?')}% {load.get('level', '?')}")
    print("\nWhere each client node's DSP sent its clients (commands forwarded per server):")
    for n in clt_nodes:
        group = (status.get(n) or {}).get("group") or {}
        per = group.get("servers", {})
        spread = ", ".join(f"server node {s}: {v['commands']}" for s, v in sorted(per.items()))
        print(f"  client node {n}: {group.get('sessions_started', 0)} sessions started; "
              f"{spread}")
    print(f"\nm3ftp through the LB ({mib} MiB, 64 KiB vcopy chunks, content verified):")
    for n, op, rc, verified, secs in ftp:
        rate = (mib << 20) / secs / 1e6 if secs else 0
        print(f"  {op} from node {n}: {secs:6.2f} s  {rate:7.1f} MB/s  "
              f"{'verified' if verified else 'NOT VERIFIED'}")
        ok &= rc == 0 and verified
    print(f"  downloaded file {'equals' if same else 'DIFFERS FROM'} the uploaded one")
    ok &= same and all(links.values())
    return ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsp_proxy.demo", description=__doc__)
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    p.add_argument("--loops", type=int, default=300)
    p.add_argument("--mib", type=int, default=10)
    p.add_argument("--keep", action="store_true", help="keep the logs and files")
    p.add_argument("--screenshot", type=Path, metavar="PNG",
                   help="save the LB host's statistics page as PNG, and its /cluster "
                        "view as PNG-cluster.png (headless Chromium)")
    args = p.parse_args(argv)
    return run_demo(args.config, args.loops, args.mib, args.keep, args.screenshot)


if __name__ == "__main__":
    sys.exit(main())
