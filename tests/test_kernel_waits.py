"""A caller waiting for its node kernel's answer is woken by the answer, once per call.

Linux wakes a task blocked in recv on a Unix stream socket each time the peer reads what the
task sent (the write-space wake-up).  A caller that sent its request and blocked in recv for the
reply was so woken once for nothing on every call the kernel read after the caller fell asleep:
a context switch more on each call of the emulator's busiest paths (docs/performance.md,
"Waiting for the kernel's answer").  Both kinds of caller wait in poll instead, which answers
only the readiness asked for: the Python client (`protocol.recv_frame`) and the compiled sender
and deliverer (fastrelay.c `recv_some`).

The kernel here is a child process that reads each request only after the caller had time to
fall asleep, and answers a while after it read it; the figure is the calling thread's voluntary
context switches per call, which a blocking recv made two.
"""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
from test_fastpath_node_hostile import Node, _frame

from dsp_proxy import fastpath
from dvk_cffi.emu import protocol as P

CALLS = 300
#: The one wake-up by the answer, and room for the odd switch of anything else (a page fault,
#: the interpreter's lock on the way back from C).
MAX_PER_CALL = 1.3

_SLOW_KERNEL = """
import select, socket, sys, time
sock = socket.socket(fileno=int(sys.argv[1]))
reply = bytes.fromhex(sys.argv[2])
poller = select.poll()
poller.register(sock, select.POLLIN)
while True:
    poller.poll()
    time.sleep(0.0005)              # the caller is waiting by now
    if not sock.recv(65536):        # one request: the caller sends the next after the answer
        break
    time.sleep(0.0005)              # the work: a caller woken by the read has run meanwhile
    sock.sendall(reply)
"""


def _switches() -> int:
    """The calling thread's voluntary context switches so far."""
    with open("/proc/thread-self/status") as f:
        for line in f:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    raise AssertionError("no voluntary_ctxt_switches in /proc/thread-self/status")


@pytest.fixture
def slow_kernel():
    """(caller's socket, blocking as a DSP's and a program's kernel connection) of a child
    that answers every request with `reply`."""
    made: list[tuple[socket.socket, subprocess.Popen]] = []

    def start(reply: bytes) -> socket.socket:
        mine, theirs = socket.socketpair()
        proc = subprocess.Popen([sys.executable, "-c", _SLOW_KERNEL, str(theirs.fileno()),
                                 reply.hex()], pass_fds=[theirs.fileno()])
        theirs.close()
        made.append((mine, proc))
        return mine

    try:
        yield start
    finally:
        for sock, proc in made:
            sock.close()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_the_python_client_is_woken_once_per_call(slow_kernel):
    """`EmuDvk`'s calls: the request, then `recv_frame` for the reply."""
    reply = P.encode_reply(0, [0])
    sock = slow_kernel(reply)
    request = P.encode_request("GETDVSINFO", [])
    before = _switches()
    for _ in range(CALLS):
        sock.sendall(request)
        assert P.recv_frame(sock) == reply[4:]
    assert (_switches() - before) / CALLS <= MAX_PER_CALL


@pytest.mark.skipif(fastpath.lib is None, reason="the compiled code is not built")
def test_the_compiled_deliverer_is_woken_once_per_put(slow_kernel, request):
    """The compiled deliverer's PUT2LCL calls on a connection with no answer limit (as a
    DSP's): each frame is put with one wake-up."""
    n = Node(limit=None)
    request.addfinalizer(n.close)
    n.dvk._local.conn = slow_kernel(P.encode_reply(0, [0]))
    n.tx.sendall(b"".join(_frame(dst=7 + i % 100) for i in range(CALLS)))
    before = _switches()
    for _ in range(CALLS):
        assert not n.receiver.read(0)
        n.receiver.fold_received()
        if n.link.received.frames == CALLS:
            break
    switches = _switches() - before
    assert n.link.received.frames == CALLS and n.reader.start == n.reader.end
    assert switches / CALLS <= MAX_PER_CALL
