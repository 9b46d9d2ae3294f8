"""The floor of part 4's relayed round trip: its message pattern with no logic at all.

    python -m bench.chain_floor [LOOPS]

The relayed `latency_client` round trip (docs/performance.md, "What sets the relayed round
trip's p50") passes the same seven processes every time: client -> node kernel 3 -> DSP 3 ->
LB host -> DSP 1 -> node kernel 1 -> server and back, and around it the calls that are off
its chain (each DSP sender's next get2rmt, each put2lcl's reply, the server's SEND waiting for
the client node's SEND_ACK, which crosses every hop as well).  This module runs that pattern
with the same processes, threads, kinds of sockets (Unix stream between a node's programs and
its kernel, TCP on loopback between DSPs) and 120-byte messages, where every process only
reads and writes: a kernel here answers from a queue, a DSP forwards what it reads.  What the
real path costs above this floor is the work of the node kernels, the DSPs and the programs.

`run(loops)` starts the six other processes on sockets it creates (loopback only), times
`loops` round trips from the client (after a warm-up), reads each process's CPU time, closes
its end (every process exits at end of file) and returns the figures.
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from .figures import p50_p99_us
from .procstat import run_time

SIZE = 120
WARMUP = 200
#: A round trip that takes longer than this (seconds) means a stuck chain: the run fails.
STALL = 10.0
#: Message kinds (the first byte): the client's request, the server's reply (the command the
#: server node's sender carries), the client node's SEND_ACK, the server's RECEIVE.
REQUEST, REPLY, ACK, RECEIVE = b"Q", b"P", b"A", b"R"


def _msg(kind: bytes) -> bytes:
    return kind * SIZE


def _rx(sock: socket.socket) -> bytes:
    """One whole message; EOFError at end of file (the chain is being taken down)."""
    data = sock.recv(SIZE, socket.MSG_WAITALL)
    if len(data) < SIZE:
        raise EOFError
    return data


def kernel(prog: socket.socket, sender: socket.socket, receiver: socket.socket,
           server_side: bool) -> None:
    """A node kernel: one epoll loop over its program, its DSP's sender (get2rmt: answered
    from the queue of commands for the link, or parked) and its DSP's receiver (put2lcl:
    delivered, then answered)."""
    poll = select.epoll()
    for s in (prog, sender, receiver):
        poll.register(s.fileno(), select.EPOLLIN)
    queue: list[bytes] = []
    parked = {"get2rmt": False, "receive": False}
    delivered: list[bytes] = []

    def to_link(m: bytes) -> None:
        if parked["get2rmt"]:
            parked["get2rmt"] = False
            sender.sendall(m)
        else:
            queue.append(m)

    def to_prog(m: bytes) -> None:
        if not server_side or parked["receive"]:
            parked["receive"] = False
            prog.sendall(m)
        else:
            delivered.append(m)

    who = {prog.fileno(): "prog", sender.fileno(): "sender", receiver.fileno(): "receiver"}
    while True:
        for fd, _mask in poll.poll():
            if who[fd] == "prog":
                kind = _rx(prog)[:1]
                if kind == RECEIVE:
                    if delivered:
                        prog.sendall(delivered.pop(0))
                    else:
                        parked["receive"] = True
                else:                   # the client's SENDREC, or the server's SEND
                    to_link(_msg(REQUEST if not server_side else REPLY))
            elif who[fd] == "sender":
                _rx(sender)
                if queue:
                    sender.sendall(queue.pop(0))
                else:
                    parked["get2rmt"] = True
            else:
                kind = _rx(receiver)[:1]
                if kind == ACK:         # the server's SEND returns
                    prog.sendall(_msg(ACK))
                else:                   # a request for the server, or the client's reply
                    to_prog(_msg(kind))
                receiver.sendall(_msg(b"0"))     # put2lcl's status
                if kind == REPLY:
                    to_link(_msg(ACK))  # the client node acknowledges the server's SEND


def dsp(kernel_s: socket.socket, kernel_r: socket.socket, link_out: socket.socket,
        link_in: socket.socket) -> None:
    """A node DSP: a sender thread (get2rmt, write to the link) and a receiver (read the link,
    put2lcl, wait for its status)."""
    def sender() -> None:
        ask = _msg(b"g")
        while True:
            kernel_s.sendall(ask)
            link_out.sendall(_rx(kernel_s))

    threading.Thread(target=_quiet(sender), daemon=True).start()
    while True:
        kernel_r.sendall(_rx(link_in))
        _rx(kernel_r)


def relay(a_in: socket.socket, a_out: socket.socket, b_in: socket.socket,
          b_out: socket.socket) -> None:
    """The LB host: one thread per direction, each forwarding what it reads."""
    def forward(src: socket.socket, dst: socket.socket) -> None:
        while True:
            dst.sendall(_rx(src))

    threading.Thread(target=_quiet(forward), args=(a_in, a_out), daemon=True).start()
    forward(b_in, b_out)


def server(sock: socket.socket) -> None:
    """The latency server: RECEIVE a request, SEND the reply (returns at the SEND_ACK)."""
    while True:
        sock.sendall(_msg(RECEIVE))
        _rx(sock)
        sock.sendall(_msg(REPLY))
        _rx(sock)


def _quiet(fn: Callable[..., None]) -> Callable[..., None]:
    """`fn` as a process's whole life: the end of the chain (end of file, a closed socket,
    an interrupt) ends the process without a traceback."""
    def whole_life(*args) -> None:
        try:
            fn(*args)
        except (EOFError, OSError, KeyboardInterrupt):
            pass
        os._exit(0)
    return whole_life


ROLES = {"kernel-client": lambda s: kernel(*s, server_side=False),
         "kernel-server": lambda s: kernel(*s, server_side=True),
         "dsp": lambda s: dsp(*s), "relay": lambda s: relay(*s), "server": lambda s: server(*s)}


def _tcp_pair(listener: socket.socket) -> tuple[socket.socket, socket.socket]:
    out = socket.create_connection(listener.getsockname())
    inc, _addr = listener.accept()
    for s in (out, inc):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return out, inc


def run(loops: int = 3000) -> dict:
    """`loops` timed round trips through the chain: p50 and p99 in µs and each process's CPU
    per round trip in µs.  RuntimeError when a process of the chain ended early or did not
    end at the end of file, OSError (TimeoutError: stalled for STALL seconds) when the
    chain broke."""
    if loops < 1:
        raise ValueError("at least one round trip")
    unix = {name: socket.socketpair() for name in
            ("client-k3", "k3-sender", "k3-receiver", "k1-sender", "k1-receiver", "server-k1")}
    tcp: dict[str, tuple[socket.socket, socket.socket]] = {}
    procs: dict[str, subprocess.Popen] = {}
    ours = [s for pair in unix.values() for s in pair]
    client = unix["client-k3"][0]
    stuck: list[str] = []
    try:
        with socket.create_server(("127.0.0.1", 0)) as listener:
            for name in ("3to5", "5to1", "1to5", "5to3"):
                tcp[name] = _tcp_pair(listener)
                ours += tcp[name]
        layout = [   # (name, role, sockets: (socket pair, end))
            ("node kernel 3", "kernel-client",
             [(unix["client-k3"], 1), (unix["k3-sender"], 0), (unix["k3-receiver"], 0)]),
            ("DSP 3", "dsp", [(unix["k3-sender"], 1), (unix["k3-receiver"], 1),
                              (tcp["3to5"], 0), (tcp["5to3"], 1)]),
            ("LB host", "relay", [(tcp["3to5"], 1), (tcp["5to1"], 0),
                                  (tcp["1to5"], 1), (tcp["5to3"], 0)]),
            ("DSP 1", "dsp", [(unix["k1-sender"], 1), (unix["k1-receiver"], 1),
                              (tcp["1to5"], 0), (tcp["5to1"], 1)]),
            ("node kernel 1", "kernel-server",
             [(unix["server-k1"], 1), (unix["k1-sender"], 0), (unix["k1-receiver"], 0)]),
            ("server", "server", [(unix["server-k1"], 0)]),
        ]
        for name, role, ends in layout:
            fds = [pair[end].fileno() for pair, end in ends]
            procs[name] = subprocess.Popen(
                [sys.executable, "-m", "bench.chain_floor", "--role", role, *map(str, fds)],
                pass_fds=fds, stdin=subprocess.DEVNULL)
        for s in ours:      # each process holds its own ends now; the parent only the client
            if s is not client:
                s.close()
        client.settimeout(STALL)
        rtts = []
        request = _msg(REQUEST)
        clock = time.perf_counter
        for i in range(WARMUP + loops):
            if i == WARMUP:
                before = {name: run_time(p.pid) for name, p in procs.items()}
            t0 = clock()
            client.sendall(request)
            try:
                _rx(client)
            except EOFError:
                raise RuntimeError("a process of the chain ended") from None
            if i >= WARMUP:
                rtts.append(clock() - t0)
        cpu = {name: (run_time(p.pid) - before[name]) / loops * 1e6
               for name, p in procs.items()}
    finally:
        for s in ours:      # the end of file that ends every process of the chain
            s.close()
        for name, p in procs.items():
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                stuck.append(name)
                p.kill()
                p.wait()
    if stuck:
        raise RuntimeError(f"did not end at the end of file: {', '.join(stuck)}")
    return {"loops": loops, **p50_p99_us(rtts), "cpu_us": cpu}


def _child(role: str, fds: list[int]) -> None:
    """A process of the chain: its role on the sockets it was given."""
    _quiet(ROLES[role])([socket.socket(fileno=fd) for fd in fds])


if __name__ == "__main__":
    if sys.argv[1:2] == ["--role"]:
        _child(sys.argv[2], [int(a) for a in sys.argv[3:]])
    print(json.dumps(run(int(sys.argv[1]) if len(sys.argv) > 1 else 3000)))
