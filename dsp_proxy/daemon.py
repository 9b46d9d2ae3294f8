"""Start-up checks of the `dsp_proxy` daemon that are about the machine, not the cluster:
option values, a second daemon on the same node, the node kernel a daemon started for itself.

They exist so that a failed start says what failed and where, at once, in the log and on the
init script's output (instead of a bare kernel error code after a long wait).
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import subprocess
from collections.abc import Iterable

from dvk_cffi import errors as E

from . import stats as statsmod
from .misc import log_level, runs_dsp_proxy

log = logging.getLogger("dsp")


def stats_option(text: str) -> tuple[str, int]:
    """argparse type of `--stats`: `[ADDR:]PORT`, refused with the reason (so `--check` with
    the daemon's options catches a bad value too)."""
    try:
        return statsmod.parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def log_level_option(text: str) -> str:
    """argparse type of `--log-level`: one of DEBUG, INFO, WARNING, ERROR (any case)."""
    try:
        return log_level(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def pid_of_thread(tid: int) -> int | None:
    """The process a thread id belongs to (Linux /proc), None when it is gone."""
    try:
        with open(f"/proc/{tid}/status") as f:
            for line in f:
                if line.startswith("Tgid:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def pidfile_owner(path: str | None) -> int | None:
    """The pid in `path` when that process is alive, is a dsp_proxy and is not this one."""
    if not path:
        return None
    try:
        with open(path) as f:
            pid = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    if pid == os.getpid() or pid <= 0:
        return None
    return pid if runs_dsp_proxy(pid) else None


def proxy_holder(dvk, pxids: Iterable[int]) -> int | None:
    """The pid of the process whose threads hold one of these proxy pairs in the kernel (a
    DSP already serving this node), None when every pair is free."""
    for pxid in pxids:
        try:
            sproxy, _rproxy = dvk.getproxyinfo(pxid)
        except (E.DvkError, OSError):
            continue
        pid = pid_of_thread(sproxy.p_lpid)
        if pid is not None and pid != os.getpid():
            return pid
    return None


def already_running(dvk, pxids: Iterable[int], pidfile: str | None) -> int | None:
    """Another dsp_proxy of this node: the pidfile's live owner, or the holder of a proxy
    pair this daemon needs."""
    return pidfile_owner(pidfile) or proxy_holder(dvk, pxids)


def stop_with_this_process(proc: subprocess.Popen, what: str) -> None:
    """A child (the node kernel the daemon started for itself) stops when the daemon does,
    however main returns, so `init.d/dvs stop` leaves no process of the project behind."""
    def stop() -> None:
        from dvk_cffi.emu import node as emunode
        if proc.poll() is None:
            log.info("stopping %s (pid %d) started by this daemon", what, proc.pid)
            emunode.stop_node(proc)
    atexit.register(stop)
