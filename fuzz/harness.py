"""Pieces the frame fuzzer, the chaos run and their tests share: a cluster on this run's own
loopback subnet, per-process figures from /proc, and link probes that send one request over a
link and wait for its reply.

Everything here drives real processes (emulated node kernels, `dsp_proxy`, the demo programs);
nothing is simulated.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

from dsp_proxy.cluster import Cluster, module_argv, render_config
from dvk_cffi import Message
from dvk_cffi import consts as C
from dvk_cffi.errors import DvkError

#: Endpoint of the probe server on node n (system endpoints are 0..28; the services of the
#: harness configs use 10..19, so 20 + n stays outside them).
PROBE_SERVER_BASE = 20
#: Endpoint the harness process binds on node n to send probes from.
PROBE_CLIENT_BASE = 90
#: The probes that check the links after a fuzzing run use endpoints the fuzzer never names on
#: purpose (only a random bit flip reaches them).  A well-formed fuzzed frame from a peer speaks
#: for a process of that peer (the probe endpoints above), and the kernel takes it as such: it
#: may leave that process's descriptor waiting for an answer that never comes.  What must hold
#: is that every link carries requests again, which these fresh endpoints show.  (Servers must
#: be system endpoints: 0..28.)
CHECK_SERVER_BASE = 24
CHECK_CLIENT_BASE = 100
REQUEST_TYPE, REPLY_TYPE = 0x0A, 0x0B
#: A probe server that spent more than this share of a CPU since the harness last looked is
#: spinning: the latency server busy-loops `m1_i2` seconds when a request asks it to, and a
#: fuzzed request may ask for years.  Answering probes costs it about 1 %; a spinning one
#: gets more than this even when twenty busy processes share two CPUs (0.22 was measured
#: with eight).
SPINNING_CPU_SHARE = 0.1


def run_net() -> str:
    """A 127.X.Y prefix for a command-line run (tests take theirs from cluster_helpers)."""
    pid = os.getpid()
    return f"127.{200 + pid % 50}.{(pid // 50) % 250 + 1}"


@contextlib.contextmanager
def local_cluster(template: str, workdir: str | None = None,
                  **kw) -> Iterator[Cluster]:
    """Write `template` for a fresh subnet, run the cluster, always stop it.  Logs stay in
    `workdir` (a new temporary directory when None, printed by the callers)."""
    workdir = workdir or tempfile.mkdtemp(prefix="dspfuzz")
    os.makedirs(workdir, exist_ok=True)
    net = run_net()
    cfg = Path(workdir) / "cluster.cfg"
    cfg.write_text(render_config(template, net))
    rundir = tempfile.mkdtemp(prefix="dvk")
    logs = Path(workdir) / "logs"
    logs.mkdir(exist_ok=True)
    cluster = None
    try:
        cluster = Cluster(cfg, rundir=rundir, log_dir=str(logs), **kw)
        cluster.cfg_path = cfg
        cluster.net = net
        cluster.start()
        yield cluster
    finally:
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(rundir, ignore_errors=True)


# ------------------------------------------------------------------------------ process figures
def proc_figures(pid: int) -> tuple[int, int]:
    """(RSS in KiB, thread count) of a live process."""
    rss = threads = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
    return rss, threads


def dsp_figures(cluster: Cluster, samples: int = 3) -> dict[int, tuple[int, int, int]]:
    """node -> (RSS KiB max, threads min, threads max) over a few samples 0.2 s apart."""
    out: dict[int, tuple[int, int, int]] = {}
    for _ in range(samples):
        for n, proc in cluster.dsps.items():
            if proc.poll() is not None:
                continue
            rss, threads = proc_figures(proc.pid)
            r, lo, hi = out.get(n, (0, threads, threads))
            out[n] = (max(r, rss), min(lo, threads), max(hi, threads))
        time.sleep(0.2)
    return out


def log_text(cluster: Cluster, name: str) -> str:
    try:
        return Path(cluster.log_path(name)).read_text(errors="replace")
    except OSError:
        return ""


# ------------------------------------------------------------------------------ link probes
class Probes:
    """A probe server on every node (the latency server at 20 + n) and one client endpoint per
    node bound by this process (90 + n); `probe(a, b)` is one sendrec from node a to node b.

    The bindings the probes need (server on b known on a, client of a known on b) are made
    here and re-made when they are missing: the harness measures links, not bindings that a
    fuzzed frame was allowed to change (the tests check the protected bindings separately).
    """

    def __init__(self, cluster: Cluster, nodes: list[int], out_dir: Path,
                 server_base: int = PROBE_SERVER_BASE,
                 client_base: int = PROBE_CLIENT_BASE) -> None:
        self.server_base, self.client_base = server_base, client_base
        self.cluster = cluster
        self.nodes = list(nodes)
        self.out_dir = out_dir
        self.servers: dict[int, subprocess.Popen] = {}
        self.restarts = 0
        self.repairs = 0
        self.cpu_seen: dict[int, tuple[float, float]] = {}  # server pid -> (when, CPU seconds)
        self.bound: set[int] = set()
        self.seq = 0

    def start(self) -> None:
        for n in self.nodes:
            self._start_server(n)
        for n in self.nodes:
            self._wait_server(n)
        for a in self.nodes:
            self.cluster.dvk(a).bind(0, self.client_base + a)
            self.bound.add(a)
        self.fix_bindings()

    def _start_server(self, n: int) -> None:
        out = open(self.out_dir / f"probe_server{n}_{self.server_base + n}.out", "ab")
        try:
            self.servers[n] = self.cluster.popen(
                n, module_argv("dvs_apps.latency", "server", 0, self.server_base + n),
                stdout=out, stderr=subprocess.STDOUT)
        finally:
            out.close()

    def _wait_server(self, n: int, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        dvk = self.cluster.dvk(n)
        while time.monotonic() < deadline:
            try:
                if not dvk.getprocinfo(0, self.server_base + n).p_rts_flags & C.SLOT_FREE:
                    return
            except DvkError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"probe server of node {n} not bound")

    def restart_stuck_servers(self) -> int:
        """Start again the probe servers that exited (a failed reply ends the program) or that
        spin (a request may ask the latency server to busy-loop for as long as it likes):
        the harness measures links, not a server a fuzzed request was allowed to keep busy."""
        stuck = [n for n, p in self.servers.items() if p.poll() is not None or self._spinning(n)]
        for n in stuck:
            p = self.servers[n]
            if p.poll() is None:
                p.kill()
                p.wait()
            self._start_server(n)
            self.restarts += 1
        for n in stuck:
            self._wait_server(n)
        return len(stuck)

    def _spinning(self, n: int) -> bool:
        """Whether server n used more than SPINNING_CPU_SHARE of a CPU since the last look at
        least 0.5 s ago (the first look only takes the sample)."""
        pid = self.servers[n].pid
        try:
            t = psutil.Process(pid).cpu_times()
        except psutil.Error:
            return False
        now, cpu = time.monotonic(), t.user + t.system
        seen = self.cpu_seen.get(pid)
        if seen is not None and now - seen[0] < 0.5:
            return False
        self.cpu_seen[pid] = (now, cpu)
        return seen is not None and (cpu - seen[1]) / (now - seen[0]) > SPINNING_CPU_SHARE

    def _ensure_remote(self, node: int, ep: int, where: int) -> None:
        dvk = self.cluster.dvk(node)
        try:
            info = dvk.getprocinfo(0, ep)
            if not info.p_rts_flags & C.SLOT_FREE:
                if not info.p_rts_flags & C.REMOTE or info.p_nodeid == where:
                    return  # right already, or a local process's: never taken away
                dvk.unbind(0, ep)
            dvk.rmtbind(0, f"probe{ep}", ep, where)
            self.repairs += 1
        except DvkError:
            pass

    def fix_bindings(self) -> None:
        for a in self.nodes:
            for b in self.nodes:
                if a != b:
                    self._ensure_remote(a, self.server_base + b, b)
                    self._ensure_remote(b, self.client_base + a, a)

    def probe(self, a: int, b: int, timeout_ms: int = 3000) -> str:
        """One request from node a's probe client to node b's probe server: 'ok' or the
        error's name (a wrong reply is 'misrouted')."""
        self.seq += 1
        m = Message()
        m.m_source, m.m_type, m.m1_i1, m.m1_i3 = self.client_base + a, REQUEST_TYPE, \
            self.seq, 7000 + b
        try:
            self.cluster.dvk(a).sendrec(self.server_base + b, m, timeout_ms)
        except DvkError as err:
            return err.name
        if m.m_type != REPLY_TYPE or m.m1_i1 != self.seq or m.m1_i3 != 7000 + b:
            return "misrouted"
        return "ok"

    def all_links(self, timeout: float) -> tuple[float | None, dict[tuple[int, int], str]]:
        """Probe every ordered pair until each carried a request or `timeout` passed; returns
        (seconds until the last pair succeeded or None, last outcome per pair)."""
        t0 = time.monotonic()
        deadline = t0 + timeout
        last: dict[tuple[int, int], str] = {}
        pending = [(a, b) for a in self.nodes for b in self.nodes if a != b]
        while pending and time.monotonic() < deadline:
            self.restart_stuck_servers()
            self.fix_bindings()
            for pair in list(pending):
                last[pair] = self.probe(*pair, timeout_ms=2000)
                if last[pair] == "ok":
                    pending.remove(pair)
            if pending:
                time.sleep(0.2)
        return (None if pending else time.monotonic() - t0), last

    def close(self) -> None:
        for a in list(self.bound):
            try:
                self.cluster.dvk(a).unbind(0, self.client_base + a)
            except (DvkError, OSError):
                pass
        self.bound.clear()
        for p in self.servers.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.servers.values():
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
