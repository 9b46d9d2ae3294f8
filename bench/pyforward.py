"""A minimal threaded Python TCP forwarder (the benchmark's "Python limit" anchor).

    python -m bench.pyforward LISTEN_HOST LISTEN_PORT TARGET_HOST TARGET_PORT

Every accepted connection gets a connection to the target and two threads copying bytes with
`recv_into` a buffer of their own and `sendall` (TCP_NODELAY on both sockets): no allocation per
read, so the figure is Python's own cost of a relay, not the allocator's.  It prints "ready"
once listening and runs until killed.
"""

from __future__ import annotations

import socket
import sys
import threading


def _pump(src: socket.socket, dst: socket.socket) -> None:
    buf = memoryview(bytearray(1 << 17))
    try:
        while True:
            n = src.recv_into(buf)
            if not n:
                break
            dst.sendall(buf[:n])
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def main(argv: list[str]) -> int:
    host, port, thost, tport = argv[0], int(argv[1]), argv[2], int(argv[3])
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((host, port))
    ls.listen(64)
    print("ready", flush=True)
    while True:
        c, _ = ls.accept()
        u = socket.create_connection((thost, tport))
        for s in (c, u):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=_pump, args=(c, u), daemon=True).start()
        threading.Thread(target=_pump, args=(u, c), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
