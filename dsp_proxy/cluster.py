"""A whole DVS cluster on one machine: an emulated node kernel and a `dsp_proxy` per node.

Every node of the config runs as its own pair of processes (node kernel and DSP) on its own
loopback address (the config's `rname`), so the standard ports work unchanged.  `Cluster`
starts them, waits until every link is up, runs programs on any node, and stops everything,
also when the caller fails (use it as a context manager).  `python -m dsp_proxy.cluster
CONFIG` does the same for a human until Ctrl-C (`--stats` gives every DSP its statistics
server).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from dvk_cffi import consts as C
from dvk_cffi.emu import node as emunode
from dvk_cffi.emu.client import EmuDvk
from dvk_cffi.emu.server import socket_path

from . import config as cfgmod
from . import topology
from .misc import resolve

log = logging.getLogger("dsp.cluster")

REPO_ROOT = Path(__file__).resolve().parents[1]
LINKS_TIMEOUT = 30.0
#: The C statistics servers listened on 4000 + node id; so do the cluster's (`--stats`).
STATS_BASE = 4000


def python_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for the cluster's processes: this interpreter finds this source tree."""
    env = dict(os.environ)
    path = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + path if path else "")
    env.update(extra or {})
    return env


def render_config(template: str, net: str) -> str:
    """A config text with `{net}` replaced by a test run's own 127.X.Y prefix."""
    return template.replace("{net}", net)


class Cluster:
    """Node kernels and DSPs for the real nodes of one config."""

    def __init__(self, config_path: str | os.PathLike, rundir: str | None = None,
                 log_dir: str | None = None, dsp_args: Sequence[str] = (),
                 log_level: str = "INFO", only: Sequence[int] | None = None,
                 kernel_args: Sequence[str] = (), stats_base: int | None = None,
                 dvk_mode: str = "emu", dsp_prefix: Sequence[str] = ()) -> None:
        self.config_path = str(config_path)
        self.cfg = cfgmod.load(self.config_path)
        self.own_rundir = rundir is None
        self.rundir = rundir or tempfile.mkdtemp(prefix="dvk")
        self.log_dir = log_dir or self.rundir
        self.dsp_args = list(dsp_args)
        self.kernel_args = list(kernel_args)   # e.g. ["--dcs", "8"] (dvsctl node run)
        self.dvk_mode = dvk_mode               # the DSPs' --dvk: emu, or emu-ioctl
        self.dsp_prefix = list(dsp_prefix)     # e.g. ["ip", "netns", "exec", NS]: run there
        self.log_level = log_level
        self.stats_base = stats_base           # node N serves statistics on its rname:base+N
        self.nodes = [n.nodeid for n in self.cfg.nodes
                      if n.nodeid != self._lb_id() and (only is None or n.nodeid in only)]
        self.kernels: dict[int, subprocess.Popen] = {}
        self.dsps: dict[int, subprocess.Popen] = {}
        self.killed: set[int] = set()
        self._dvks: dict[int, EmuDvk] = {}

    def _lb_id(self) -> int:
        return self.cfg.lb.nodeid if self.cfg.lb is not None else -1

    # ------------------------------------------------------------------ life cycle
    def __enter__(self) -> Cluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = LINKS_TIMEOUT) -> None:
        for n in self.nodes:
            self.start_kernel(n)
        for n in self.nodes:
            self.start_dsp(n)
        self.wait_links_up(timeout)

    def start_kernel(self, n: int) -> None:
        self.kernels[n] = emunode.start_node(n, self.rundir,
                                             log_path=self.log_path(f"kernel{n}"),
                                             env=python_env(), extra=self.kernel_args)

    def start_dsp(self, n: int, output: int | None = None) -> subprocess.Popen:
        """Start node n's DSP; its stdout and stderr go to its log file, or to the descriptor
        `output` (a pipe, say)."""
        argv = [*self.dsp_prefix, sys.executable, "-m", "dsp_proxy", "--dvk", self.dvk_mode,
                "--node", str(n), "--log-level", self.log_level,
                "--status-file", self.status_path(n), *self.stats_args(n), *self.dsp_args,
                self.config_path]
        with contextlib.ExitStack() as stack:
            out = output if output is not None else \
                stack.enter_context(open(self.log_path(f"dsp{n}"), "ab"))
            proc = subprocess.Popen(argv, env=python_env({"DVK_RUNDIR": self.rundir}),
                                    stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)
        self.dsps[n] = proc
        self.killed.discard(n)
        return proc

    def stats_address(self, n: int) -> str | None:
        """`ADDR:PORT` of node n's statistics server (its rname, port base + n), or None."""
        if self.stats_base is None:
            return None
        return f"{resolve(self.cfg.nodes_by_id[n].rname)}:{self.stats_base + n}"

    def stats_args(self, n: int) -> list[str]:
        addr = self.stats_address(n)
        return ["--stats", addr] if addr else []

    def status_path(self, n: int) -> str:
        return os.path.join(self.rundir, f"dsp{n}.json")

    def status(self, n: int) -> dict:
        """The figures node n's DSP wrote last (see `dsp_proxy --status-file`)."""
        try:
            with open(self.status_path(n)) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def log_path(self, name: str) -> str:
        return os.path.join(self.log_dir, f"{name}.log")

    def dvk(self, n: int) -> EmuDvk:
        """A DVK handle on node n (for inspection from this process)."""
        if n not in self._dvks:
            self._dvks[n] = EmuDvk(path=socket_path(n, self.rundir))
        return self._dvks[n]

    def link_state(self) -> dict[tuple[int, int], bool]:
        """(node, peer) -> both directions up, as each node's kernel reports it, for every link
        the topology gives the node (a relayed client's peer is the LB node)."""
        state = {}
        for n in self.nodes:
            for p in (spec.nodeid for spec in topology.peer_specs(self.cfg, n)
                      if spec.nodeid in self.nodes or spec.nodeid == self._lb_id()):
                try:
                    flags = self.dvk(n).getnodeinfo(p).n_flags
                except Exception:  # a node kernel that is not there counts as down
                    flags = 0
                state[(n, p)] = flags & (C.NODE_SCONNECTED | C.NODE_RCONNECTED) == \
                    (C.NODE_SCONNECTED | C.NODE_RCONNECTED)
        return state

    def wait_links_up(self, timeout: float = LINKS_TIMEOUT,
                      pairs: Sequence[tuple[int, int]] | None = None) -> None:
        deadline = time.monotonic() + timeout
        while True:
            for n, proc in self.dsps.items():
                if n not in self.killed and proc.poll() is not None:
                    raise RuntimeError(f"dsp_proxy of node {n} exited with status "
                                       f"{proc.returncode}; see {self.log_path(f'dsp{n}')}")
            state = self.link_state()
            down = [k for k, up in state.items() if not up and (pairs is None or k in pairs)]
            if not down:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"links still down after {timeout:.0f} s: {down}")
            time.sleep(0.1)

    def kill_dsp(self, n: int, sig: int = signal.SIGKILL) -> None:
        proc = self.dsps.get(n)
        self.killed.add(n)
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)
            proc.wait(10)

    def forget_dvk(self, n: int) -> None:
        """Close the handle `dvk(n)` gave (node n's kernel stopped; a new one gets a new one)."""
        dvk = self._dvks.pop(n, None)
        if dvk is not None:
            dvk.close()

    def stop(self) -> None:
        """Stop every DSP (SIGTERM, then SIGKILL) and every node kernel; remove the run dir."""
        for dvk in self._dvks.values():
            dvk.close()
        self._dvks.clear()
        for proc in self.dsps.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.dsps.values():
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for proc in self.kernels.values():
            emunode.stop_node(proc)
        self.dsps.clear()
        self.kernels.clear()
        if self.own_rundir and self.log_dir != self.rundir:
            shutil.rmtree(self.rundir, ignore_errors=True)

    # ------------------------------------------------------------------ programs
    def env(self, n: int) -> dict[str, str]:
        """Environment of a program running on node n."""
        return python_env({"DVK_RUNDIR": self.rundir, "DVK_NODE": str(n), "DVK_MODE": "emu"})

    def popen(self, n: int, argv: Sequence[str], env: dict[str, str] | None = None,
              **kw) -> subprocess.Popen:
        """Start a program on node n (`env` adds to the node's environment)."""
        return subprocess.Popen(list(argv), env=self.env(n) | (env or {}),
                                stdin=subprocess.DEVNULL, **kw)

    def run(self, n: int, argv: Sequence[str], timeout: float = 120.0,
            **kw) -> subprocess.CompletedProcess:
        """Run a program on node n to completion (killed when it outlives `timeout`)."""
        return subprocess.run(list(argv), env=self.env(n), stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout, **kw)

    def run_together(self, jobs: Sequence[tuple[int, Sequence[str]]],
                     timeout: float = 300.0) -> list[subprocess.CompletedProcess]:
        """Run programs (node, argv) at the same time and wait for all of them.  Each one's
        output (stdout and stderr) goes to a file of its own: read through pipes one program
        after the other, the others would wait in their writes once a pipe is full, and run
        one at a time.  A program still running at `timeout` is killed (its return code is
        then negative)."""
        outs: list = []
        procs: list[subprocess.Popen] = []
        try:
            for n, argv in jobs:
                outs.append(tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace"))
                procs.append(self.popen(n, argv, stdout=outs[-1], stderr=subprocess.STDOUT))
            deadline = time.monotonic() + timeout
            for p in procs:
                try:
                    p.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            done = []
            for p, out in zip(procs, outs):
                out.seek(0)
                done.append(subprocess.CompletedProcess(p.args, p.returncode, out.read(), ""))
            return done
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            for out in outs:
                out.close()


def module_argv(module: str, *args: object) -> list[str]:
    """Command line that runs one of the project's programs with this interpreter."""
    return [sys.executable, "-m", module, *map(str, args)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsp_proxy.cluster",
                                description="run every node of CONFIG on this machine")
    p.add_argument("config")
    p.add_argument("--rundir", help="node kernel sockets and status files (default: a temp "
                   "dir)")
    p.add_argument("--log-dir", help="the logs of the node kernels and DSPs (default: the "
                   "run dir)")
    p.add_argument("--stats", nargs="?", type=int, const=STATS_BASE, default=None,
                   metavar="BASE", help="every DSP serves statistics on its rname at port "
                   f"BASE + node id (default BASE {STATS_BASE})")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cluster = Cluster(args.config, rundir=args.rundir, log_dir=args.log_dir,
                          stats_base=args.stats)
    except cfgmod.ConfigError as err:
        print(err, file=sys.stderr)
        return 1
    if args.log_dir:
        os.makedirs(args.log_dir, exist_ok=True)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    print(f"logs: {cluster.log_dir}/dspN.log and kernelN.log; status files: "
          f"{cluster.rundir}/dspN.json (N = node id)", flush=True)
    try:
        cluster.start()
        print(f"cluster up: nodes {cluster.nodes}; DVK_RUNDIR={cluster.rundir}")
        for n in cluster.nodes:
            if cluster.stats_address(n):
                print(f"node {n}: statistics on http://{cluster.stats_address(n)}/ "
                      f"(/cluster: every node as it knows them)")
        print(f"run a program on node N with: DVK_RUNDIR={cluster.rundir} DVK_NODE=N ...")
        print("Ctrl-C stops the cluster", flush=True)
        while not stop:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    except (RuntimeError, TimeoutError, OSError) as exc:
        print(f"the cluster did not come up: {exc}", file=sys.stderr)
        return 1
    finally:
        cluster.stop()
        print("cluster stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
