"""Starting and stopping emulated node kernel processes.

`start_node()` runs `dvsctl node run N` as a child process (or detached, for daemons that must
outlive their starter) and waits until its socket answers.  Tests, the cluster launcher and
`dsp_proxy` (when it finds no kernel for its node) all start nodes this way, so a node kernel is
always its own process.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable

from .server import default_rundir, socket_path

START_TIMEOUT = 15.0


def node_command(nodeid: int, extra: list[str] | None = None) -> list[str]:
    """The command line of a node kernel process."""
    return [sys.executable, "-m", "dvs_apps.dvsctl", "node", "run", str(nodeid), *(extra or [])]


def wait_for_socket(path: str, timeout: float = START_TIMEOUT,
                    proc: subprocess.Popen | None = None,
                    cancelled: Callable[[], bool] | None = None) -> None:
    """Wait until a node kernel accepts connections at `path`; InterruptedError as soon as
    `cancelled()` is true (the starter was asked to stop meanwhile)."""
    deadline = time.monotonic() + timeout
    while True:
        if cancelled is not None and cancelled():
            raise InterruptedError(f"the wait for the node kernel at {path} was cancelled")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            return
        except OSError:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"node kernel exited with status {proc.returncode} "
                                   f"before serving {path}") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"no node kernel at {path} after {timeout:.0f} s") from None
            time.sleep(0.05)
        finally:
            s.close()


def _answers(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def start_node(nodeid: int, rundir: str | None = None, detach: bool = False,
               log_path: str | None = None, extra: list[str] | None = None,
               env: dict[str, str] | None = None,
               cancelled: Callable[[], bool] | None = None) -> subprocess.Popen:
    """Start node `nodeid`'s kernel and return once it serves; the caller stops it with
    `stop_node` (a detached kernel is in its own session and survives its starter).  A
    start that does not complete, for whatever reason (KeyboardInterrupt included, or
    `cancelled()` turning true), stops the kernel it ran."""
    rundir = rundir or default_rundir()
    os.makedirs(rundir, exist_ok=True)
    path = socket_path(nodeid, rundir)
    if _answers(path):
        raise RuntimeError(f"a node kernel already serves {path}")
    child_env = dict(os.environ if env is None else env)
    child_env["DVK_RUNDIR"] = rundir
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(node_command(nodeid, extra), env=child_env, stdout=out,
                                stderr=subprocess.STDOUT if log_path else subprocess.DEVNULL,
                                stdin=subprocess.DEVNULL, start_new_session=detach)
    finally:
        if log_path:
            out.close()
    try:
        wait_for_socket(path, proc=proc, cancelled=cancelled)
    except BaseException:
        stop_node(proc)
        raise
    return proc


def stop_node(proc: subprocess.Popen, timeout: float = 5.0) -> int:
    """SIGTERM, then SIGKILL after `timeout`; returns the exit status.  A kernel that is
    stopped (SIGSTOP) is continued, so that it acts on the SIGTERM at once."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGCONT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode
