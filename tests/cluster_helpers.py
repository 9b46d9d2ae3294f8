"""Shared pieces of the multi-node tests: per-run loopback subnets, configs, program runners."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from dsp_proxy.cluster import Cluster, module_argv, render_config
from dvk_cffi import consts as C
from dvk_cffi.wire import HEADER_SIZE, Header, frame_length

_counter = itertools.count()


def fresh_net() -> str:
    """A 127.X.Y prefix of this test alone (runs isolate themselves by address)."""
    n = next(_counter)
    return f"127.{100 + os.getpid() % 100}.{(os.getpid() // 100 + 7 * n) % 250 + 1}"


def wire_frames(stream: bytes) -> tuple[list[tuple[Header, bytes]], int]:
    """The whole frames at the head of `stream` that a peer's socket received, as (header,
    payload), and the offset after the last of them.  A frame that could not be one (a bad
    command or length: the bytes of two frames mixed) fails the test."""
    out, off = [], 0
    while len(stream) - off >= HEADER_SIZE:
        h = Header(bytearray(stream[off:off + HEADER_SIZE]))
        n = frame_length(stream, off)
        assert h.c_cmd in C.VALID_CMDS and 0 <= n <= C.MAXCOPYBUF, \
            f"bytes of two frames mixed at offset {off}: {h!r}"
        if len(stream) - off < HEADER_SIZE + n:
            break
        out.append((h, bytes(stream[off + HEADER_SIZE:off + HEADER_SIZE + n])))
        off += HEADER_SIZE + n
    return out, off


@contextmanager
def cluster_from(template: str, tmp_path: Path, **kw):
    """Write `template` with this test's subnet, run the cluster, always stop it."""
    net = fresh_net()
    cfg = tmp_path / "cluster.cfg"
    cfg.write_text(render_config(template, net))
    rundir = tempfile.mkdtemp(prefix="dvk")
    logs = tmp_path / "logs"
    logs.mkdir(exist_ok=True)
    cluster = Cluster(cfg, rundir=rundir, log_dir=str(logs), **kw)
    cluster.cfg_path = cfg
    cluster.net = net
    try:
        cluster.start()
        yield cluster
    except BaseException:
        dump_logs(logs)
        raise
    finally:
        cluster.stop()
        for f in Path(rundir).iterdir():
            f.unlink()
        os.rmdir(rundir)


def wait_for(predicate, timeout: float = 15.0, what: str = "condition"):
    """Poll `predicate` until it returns something true (returned) or `timeout` s passed (the
    test fails, with the last value)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(0.05)
    raise AssertionError(f"{what} not reached within {timeout} s (last: {last!r})")


def dump_logs(logs: Path) -> None:
    """On failure, print the tail of every daemon log (pytest shows it with the failure)."""
    for f in sorted(logs.glob("*.log")):
        lines = f.read_text(errors="replace").splitlines()[-40:]
        print(f"----- {f.name}\n" + "\n".join(lines))


def dvsctl(cluster: Cluster, node: int, *args, check: bool = True):
    res = cluster.run(node, module_argv("dvs_apps.dvsctl", *args), timeout=30)
    if check and res.returncode != 0:
        raise AssertionError(f"dvsctl {args} on node {node}: {res.stdout}{res.stderr}")
    return res


def wait_bound(cluster: Cluster, node: int, dcid: int, ep: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    dvk = cluster.dvk(node)
    while time.monotonic() < deadline:
        try:
            if not dvk.getprocinfo(dcid, ep).p_rts_flags & 0x1:
                return
        except Exception:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"endpoint {ep} of DC {dcid} not bound on node {node}")


class Background:
    """Programs started on cluster nodes, all killed at the end."""

    def __init__(self, cluster: Cluster, tmp_path: Path) -> None:
        self.cluster = cluster
        self.tmp = tmp_path
        self.procs: list[tuple[subprocess.Popen, Path]] = []

    def start(self, node: int, module: str, *args, cwd: Path | None = None,
              env: dict | None = None) -> subprocess.Popen:
        out = self.tmp / f"bg{len(self.procs)}_{module.split('.')[-1]}_n{node}.out"
        f = open(out, "wb")
        full_env = self.cluster.env(node)
        full_env.update(env or {})
        proc = subprocess.Popen(module_argv(module, *args), env=full_env, stdout=f,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=cwd)
        f.close()
        self.procs.append((proc, out))
        return proc

    def output(self, proc: subprocess.Popen) -> str:
        for p, out in self.procs:
            if p is proc:
                return out.read_text(errors="replace")
        return ""

    def close(self) -> None:
        for proc, _ in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc, _ in self.procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def python() -> str:
    return sys.executable


def start_latency_and_m3ftp(cl: Cluster, b: Background, tmp_path: Path) -> Path:
    """latency_server (ep 10) and m3ftpd (ep 20) on node 2, bound remote on node 1; returns
    the m3ftpd directory."""
    b.start(2, "dvs_apps.latency", "server", 0, 10)
    srvdir = tmp_path / "srv"
    srvdir.mkdir()
    b.start(2, "dvs_apps.m3ftp", "server", 0, 20, env={"M3FTPD_DIR": str(srvdir)})
    wait_bound(cl, 2, 0, 10)
    wait_bound(cl, 2, 0, 20)
    dvsctl(cl, 1, "rmtbind", 0, 10, 2, "latency")
    dvsctl(cl, 1, "rmtbind", 0, 20, 2, "m3ftpd")
    return srvdir
