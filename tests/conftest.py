"""Shared fixtures: a private DVK run directory, emulated node kernels, the DVS programs.

- `dvk_rundir`: a short temporary directory (/tmp/dvkXXXX, Unix socket paths are limited to
  107 bytes) set as DVK_RUNDIR for this test and its children; DVK_MODE=emu; DVK_NODE and
  DVK_SOCKET cleared; PYTHONPATH starts with the repository root so `python -m dvs_apps...`
  works without an installed project.  Removed at teardown.
- `start_node` (alias `node_kernel`): factory `start_node(nodeid, extra=None) -> Popen` that
  starts node kernels with `dvk_cffi.emu.node.start_node` (log in tmp_path/node<N>.log) and
  always stops them at teardown, also when the test failed.
- `bg`: a list the test appends `Background` program sets to; each is closed at teardown.
- `apps`: runs the programs (`latency`, `m3ftp`, `dvsctl`) as `python -m dvs_apps.<module>`
  subprocesses with DVK_NODE set: `apps.run(...)` waits with a timeout (the child is killed on
  timeout), `apps.spawn(...)` starts a background one that teardown always kills.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO_ROOT = str(Path(__file__).resolve().parents[1])


@pytest.fixture
def dvk_rundir(monkeypatch):
    path = tempfile.mkdtemp(prefix="dvk", dir="/tmp")
    monkeypatch.setenv("DVK_RUNDIR", path)
    monkeypatch.setenv("DVK_MODE", "emu")
    monkeypatch.delenv("DVK_NODE", raising=False)
    monkeypatch.delenv("DVK_SOCKET", raising=False)
    old = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", REPO_ROOT + (os.pathsep + old if old else ""))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def start_node(dvk_rundir, tmp_path):
    from dvk_cffi.emu import node as emu_node

    procs: list[subprocess.Popen] = []

    def start(nodeid: int, extra: list[str] | None = None) -> subprocess.Popen:
        proc = emu_node.start_node(nodeid, rundir=dvk_rundir, extra=extra,
                                   log_path=str(tmp_path / f"node{nodeid}.log"))
        procs.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in reversed(procs):
            emu_node.stop_node(proc)


@pytest.fixture
def node_kernel(start_node):
    """The same factory as `start_node`."""
    return start_node


def kill_process(proc: subprocess.Popen, timeout: float = 5.0) -> int:
    """SIGTERM, then SIGKILL after `timeout`; returns the exit status."""
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


class Apps:
    """Runs the DVS programs as subprocesses attached to an emulated node."""

    def __init__(self, rundir: str, tmp_path: Path) -> None:
        self.rundir = rundir
        self.tmp_path = tmp_path
        self.procs: list[subprocess.Popen] = []
        self._count = 0

    @staticmethod
    def command(module: str, *args) -> list[str]:
        return [sys.executable, "-m", f"dvs_apps.{module}", *map(str, args)]

    def env(self, node: int | None, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env["DVK_RUNDIR"] = self.rundir
        if node is not None:
            env["DVK_NODE"] = str(node)
        env.update(extra or {})
        return env

    def run(self, module: str, *args, node: int | None = 1, timeout: float = 60.0,
            cwd=None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run to completion; a child still running after `timeout` s is killed and the
        test fails with what it printed."""
        try:
            return subprocess.run(self.command(module, *args), env=self.env(node, env),
                                  cwd=cwd, capture_output=True, text=True, timeout=timeout,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:   # subprocess.run killed the child
            pytest.fail(f"{module} {' '.join(map(str, args))} still running after {timeout} s;"
                        f"\nstdout: {exc.stdout!r}\nstderr: {exc.stderr!r}")

    def spawn(self, module: str, *args, node: int | None = 1, cwd=None,
              env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start in the background; stdout and stderr go to a file (`output(proc)`)."""
        self._count += 1
        out_path = self.tmp_path / f"{module}-{self._count}.out"
        with open(out_path, "wb") as out:
            proc = subprocess.Popen(self.command(module, *args), env=self.env(node, env),
                                    cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)
        proc.out_path = out_path
        self.procs.append(proc)
        return proc

    @staticmethod
    def output(proc: subprocess.Popen) -> str:
        return Path(proc.out_path).read_text(errors="replace")

    def stop(self, proc: subprocess.Popen, timeout: float = 5.0) -> int:
        return kill_process(proc, timeout)

    def wait_bound(self, dcid: int, ep: int, node: int = 1, timeout: float = 10.0,
                   proc: subprocess.Popen | None = None) -> None:
        """Wait until endpoint `ep` of DC `dcid` is bound on `node` (a program started)."""
        from dvk_cffi import consts as C
        from dvk_cffi.emu.client import EmuDvk

        dvk = EmuDvk(nodeid=node)
        try:
            deadline = time.monotonic() + timeout
            while dvk.getprocinfo(dcid, C._ENDPOINT_P(ep)).p_rts_flags & C.SLOT_FREE:
                if proc is not None and proc.poll() is not None:
                    pytest.fail(f"process exited with {proc.returncode} before binding {ep}:"
                                f"\n{self.output(proc)}")
                if time.monotonic() > deadline:
                    pytest.fail(f"endpoint {ep} of DC {dcid} not bound after {timeout} s")
                time.sleep(0.02)
        finally:
            dvk.close()

    def cleanup(self) -> None:
        for proc in self.procs:
            kill_process(proc, 2.0)


@pytest.fixture
def apps(dvk_rundir, tmp_path):
    runner = Apps(dvk_rundir, tmp_path)
    try:
        yield runner
    finally:
        runner.cleanup()


@pytest.fixture
def bg():
    """Background program sets (cluster_helpers.Background) a test starts; all closed at the
    end, also when the test failed."""
    holder: list = []
    yield holder
    for b in holder:
        b.close()
