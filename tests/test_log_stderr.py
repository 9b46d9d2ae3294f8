"""The default log, stderr, when nobody reads it: a pipe whose reader hangs, a stalled journald,
a terminal held by Ctrl-S.  The daemon must go on and lose lines (counted), never wait for
the reader: before, the first thread to log into the full pipe blocked holding the handler's
lock, and every thread that logged after it stopped (links, main loop, SIGTERM)."""

from __future__ import annotations

import contextlib
import logging
import os
import pty
import signal
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator

from cluster_helpers import cluster_from, wait_for
from dsp_proxy.cluster import python_env
from dvk_cffi import open_dvk
from dvk_cffi.emu import node as emunode
from dvk_cffi.emu.server import socket_path
from dvk_cffi.logs import StderrHandler
from fuzz.harness import Probes

CONFIG = """
server node1 { nodeid 1; rname {net}.1; };
server node2 { nodeid 2; rname {net}.2; };
"""


@contextlib.contextmanager
def nonblocking(fd: int) -> Iterator[None]:
    """`fd` with O_NONBLOCK for the block, as it was after it."""
    was = os.get_blocking(fd)
    os.set_blocking(fd, False)
    try:
        yield
    finally:
        os.set_blocking(fd, was)


def fill(fd: int) -> int:
    """Write into the pipe `fd` until it has no room left; the bytes written."""
    n = 0
    with nonblocking(fd), contextlib.suppress(BlockingIOError):
        while True:
            n += os.write(fd, b"x" * 4096)
    return n


def test_a_dsp_whose_stderr_is_not_read_keeps_its_links_and_stops_on_sigterm(tmp_path):
    with cluster_from(CONFIG, tmp_path) as cl:
        cl.kill_dsp(2, signal.SIGTERM)
        r, w = os.pipe()
        drained = bytearray()
        drainer = threading.Thread(target=lambda: [drained.extend(chunk) for chunk in
                                                   iter(lambda: os.read(r, 65536), b"")],
                                   daemon=True)
        probes = Probes(cl, [1, 2], tmp_path)
        try:
            prefilled = fill(w)
            assert prefilled > 0
            dsp = cl.start_dsp(2, output=w)     # its first line finds the pipe full
            os.close(w)
            w = -1
            cl.wait_links_up(20)
            probes.start()
            took, last = probes.all_links(20)
            assert took is not None, f"no request over the links: {last}"
            drainer.start()                     # the reader reads again
            wait_for(lambda: len(drained) >= prefilled, timeout=10, what="the pipe drained")
            cl.kill_dsp(2, signal.SIGTERM)      # waits at most 10 s
            assert dsp.returncode == 0
            drainer.join(10)
            text = drained.decode(errors="replace")
            assert "node2 MainThread: signal SIGTERM: stopping" in text, text[-2000:]
            assert "log lines were lost while stderr could not take them" in text, text[-2000:]
        finally:
            probes.close()
            if w >= 0:
                os.close(w)
            if drainer.ident is None:
                drainer.start()                 # a DSP still writing is not left blocked
            cl.kill_dsp(2)
            drainer.join(10)
            os.close(r)


def test_a_node_kernel_whose_stderr_is_not_read_serves_and_stops_on_sigterm(tmp_path):
    """`dvsctl node run` logs to stderr too: a node kernel whose first line found the pipe
    full served nobody (every process of its node waited)."""
    rundir = str(tmp_path / "dvk")
    r, w = os.pipe()
    proc = None
    try:
        assert fill(w) > 0
        proc = subprocess.Popen(emunode.node_command(7), stdout=w, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=python_env({"DVK_RUNDIR": rundir}))
        os.close(w)
        w = -1
        emunode.wait_for_socket(socket_path(7, rundir), proc=proc)
        dvk = open_dvk("emu", path=socket_path(7, rundir))
        try:
            assert dvk.getdvsinfo()[0] == 7
        finally:
            dvk.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if w >= 0:
            os.close(w)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(r)


@contextlib.contextmanager
def handler_on(fd: int) -> Iterator[StderrHandler]:
    """A StderrHandler writing to `fd` as it would to a daemon's stderr."""
    stream = open(fd, "w", buffering=1, closefd=False)
    handler = StderrHandler()
    handler.setStream(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    try:
        yield handler
    finally:
        handler.close()
        stream.close()


def emit_returns(handler: StderrHandler, text: str, drain: Callable[[], None]) -> bool:
    """Whether logging `text` returns (within a bound far above LOG_WAIT); one that blocks
    is released by draining its reader, so that no thread is left behind."""
    t = threading.Thread(target=handler.handle, args=(logging.makeLogRecord({"msg": text}),),
                         daemon=True)
    t.start()
    t.join(5)
    returned = not t.is_alive()
    while t.is_alive():
        drain()
        t.join(0.05)
    return returned


def drain_all(fd: int) -> bytes:
    """What the reader `fd` holds now, without waiting."""
    out = bytearray()
    with nonblocking(fd), contextlib.suppress(BlockingIOError):
        while chunk := os.read(fd, 65536):
            out += chunk
    return bytes(out)


def test_a_traceback_into_a_pipe_with_a_page_of_room_is_cut_never_waited_for():
    """A pipe says it has room while one page (4 KiB) is free: a traceback longer than that,
    logged when its reader had stopped, blocked for ever (every thread after it too)."""
    r, w = os.pipe()
    try:
        with handler_on(w) as handler:
            fill(w)
            os.read(r, 4096)                # the reader takes one page, then hangs
            assert emit_returns(handler, "T" * 20000, lambda: drain_all(r))
            assert handler.lost == 1
            drain_all(r)                    # it reads again
            handler.handle(logging.makeLogRecord({"msg": "back"}))
            tail = drain_all(r).decode()
            assert tail.startswith("\nback\n"), tail[:200]     # a line of its own
            assert "1 log lines were lost while stderr could not take them" in tail
    finally:
        os.close(r)
        os.close(w)


def test_the_loss_note_after_a_line_that_takes_the_last_room_never_waits():
    """The first line through after a loss is followed by the note of the lines lost: a line
    that took the pipe's last room left the note blocked for ever."""
    r, w = os.pipe()
    try:
        with handler_on(w) as handler:
            fill(w)
            handler.handle(logging.makeLogRecord({"msg": "lost"}))
            assert handler.lost == 1
            os.read(r, 4096)
            assert emit_returns(handler, "L" * 4050, lambda: drain_all(r))
            assert handler.lost == 1        # the note did not fit: it comes with a later line
            drain_all(r)
            handler.handle(logging.makeLogRecord({"msg": "next"}))
            assert handler.lost == 0
            assert "1 log lines were lost" in drain_all(r).decode()
    finally:
        os.close(r)
        os.close(w)


def test_a_line_longer_than_an_unread_sockets_buffer_is_cut_never_waited_for():
    """The journal's stream socket, unread: a socket says it has room while three quarters of
    its buffer is free, and a line may be longer."""
    a, b = socket.socketpair()
    try:
        size = a.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) * 2

        def drain() -> None:
            b.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                while b.recv(1 << 20):
                    pass

        with handler_on(a.fileno()) as handler:
            assert emit_returns(handler, "S" * size, drain)
            assert handler.lost == 1
    finally:
        a.close()
        b.close()


def test_a_terminal_whose_reader_stalls_costs_lines_never_a_wait():
    """A terminal's poll says room while one byte is free, and a write waits for room for
    all of it: a terminal whose reader stalls without Ctrl-S (sshd behind a stalled network,
    a hung terminal emulator) blocked the line that found it nearly full, for ever."""
    master, slave = pty.openpty()
    try:
        with handler_on(slave) as handler:
            for _ in range(1000):           # until the terminal's buffer is full (4 MB at most)
                assert emit_returns(handler, "P" * 4000, lambda: drain_all(master))
                if handler.lost:
                    break
            assert handler.lost > 0
            drain_all(master)
            handler.handle(logging.makeLogRecord({"msg": "back"}))
            assert "log lines were lost while stderr" in drain_all(master).decode()
    finally:
        os.close(master)
        os.close(slave)
