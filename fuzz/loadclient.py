"""A load client that records the outcome of every request (for the chaos run and fault tests).

    python -m fuzz.loadclient --out FILE [--threads N] [--ep-base EP] [--svr EP]
        [--until PATH] [--seconds S] [--requests N] [--sessions K --per-session R]
        [--timeout-ms MS] [--pause S]

Loop mode (default): N threads, thread i binds endpoint EP+i on this node (DVK_NODE) and sends
`sendrec` requests to SVR (the service's ext_ep at the LB node) one after another, until PATH
exists, S seconds passed, SIGTERM, or N requests each.  A failed request is recorded and the
loop goes on (the next request opens a new session).

Session mode (`--sessions K`): one thread binds EP, EP+1, ... in turn, each for R requests and
then unbinds it, so every K is a new session at the LB.

Every request carries its own token (sequence number, this client's id and a random nonce in
the message; the latency server echoes the message), so a reply meant for another request is
told apart: 'misrouted'.  One line per request goes to FILE:

    <thread> <seq> <t0> <t1> <result>

t0/t1 are time.monotonic() (one clock for every process of the machine); result is `ok`,
`misrouted`, an EDVS error name, or `pending` for a request still waiting when the client
stopped.  In session mode the thread field is the session's endpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import sys
import threading
import time

from dvk_cffi import Message, open_dvk
from dvk_cffi.errors import DvkError

REQUEST_TYPE, REPLY_TYPE = 0x0A, 0x0B


class Recorder:
    """Lines of outcomes, written under a lock and flushed by the main thread."""

    def __init__(self, path: str) -> None:
        self.f = open(path, "a", buffering=1 << 16)
        self.lock = threading.Lock()
        self.inflight: dict[int, tuple[int, float]] = {}

    def start(self, who: int, seq: int) -> float:
        t0 = time.monotonic()
        with self.lock:
            self.inflight[who] = (seq, t0)
        return t0

    def done(self, who: int, seq: int, t0: float, result: str) -> None:
        t1 = time.monotonic()
        with self.lock:
            self.inflight.pop(who, None)
            self.f.write(f"{who} {seq} {t0:.6f} {t1:.6f} {result}\n")

    def flush(self) -> None:
        with self.lock:
            self.f.flush()

    def close(self) -> None:
        """Record what is still waiting as `pending`, then close."""
        now = time.monotonic()
        with self.lock:
            for who, (seq, t0) in self.inflight.items():
                self.f.write(f"{who} {seq} {t0:.6f} {now:.6f} pending\n")
            self.inflight.clear()
            self.f.close()


def one_request(dvk, rec: Recorder, who: int, seq: int, svr: int, uid: int,
                timeout_ms: int) -> str:
    m = Message()
    nonce = random.getrandbits(31)
    m.m_type, m.m1_i1, m.m1_i3, m.m1_p1 = REQUEST_TYPE, seq, uid, nonce
    t0 = rec.start(who, seq)
    try:
        dvk.sendrec(svr, m, timeout_ms)
        ok = (m.m_type == REPLY_TYPE and m.m1_i1 == seq and m.m1_i3 == uid
              and m.m1_p1 == nonce and m.m_source == svr)
        result = "ok" if ok else "misrouted"
        if not ok:
            print(f"endpoint {who} request {seq} (uid {uid}, nonce {nonce}) got {m!r}",
                  file=sys.stderr, flush=True)
    except DvkError as err:
        result = err.name
    rec.done(who, seq, t0, result)
    return result


def should_stop(stop: threading.Event, until: str | None, deadline: float) -> bool:
    return stop.is_set() or time.monotonic() > deadline or (until is not None
                                                            and os.path.exists(until))


@contextlib.contextmanager
def bound(dvk, rec: Recorder, ep: int):
    """Endpoint `ep` bound for the block, which gets the client's uid; None when the bind
    failed (recorded as this endpoint's outcome)."""
    try:
        dvk.bind(0, ep)
    except DvkError as err:
        rec.done(ep, 0, time.monotonic(), f"bind-{err.name}")
        yield None
        return
    try:
        yield (os.getpid() % 30000) * 64 + ep % 64
    finally:
        try:
            dvk.unbind(0, ep)
        except DvkError:
            pass


def loop_thread(dvk, rec: Recorder, ep: int, args, stop: threading.Event,
                deadline: float) -> None:
    with bound(dvk, rec, ep) as uid:
        if uid is None:
            return
        seq = 0
        while not should_stop(stop, args.until, deadline):
            if args.requests and seq >= args.requests:
                break
            seq += 1
            if one_request(dvk, rec, ep, seq, args.svr, uid, args.timeout_ms) != "ok":
                time.sleep(args.pause_on_error)
            elif args.pause:
                time.sleep(args.pause)


def session_thread(dvk, rec: Recorder, args, stop: threading.Event, deadline: float) -> None:
    for k in range(args.sessions):
        if should_stop(stop, args.until, deadline):
            return
        ep = args.ep_base + k
        with bound(dvk, rec, ep) as uid:
            if uid is None:
                continue
            for seq in range(1, args.per_session + 1):
                one_request(dvk, rec, ep, seq, args.svr, uid, args.timeout_ms)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fuzz.loadclient",
                                description="sendrec load that records every outcome")
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ep-base", type=int, default=50)
    p.add_argument("--svr", type=int, default=10)
    p.add_argument("--until", default=None, help="stop once this file exists")
    p.add_argument("--seconds", type=float, default=600.0)
    p.add_argument("--requests", type=int, default=0, help="per thread (0: no limit)")
    p.add_argument("--sessions", type=int, default=0)
    p.add_argument("--per-session", type=int, default=3)
    p.add_argument("--timeout-ms", type=int, default=20000)
    p.add_argument("--pause", type=float, default=0.0, help="seconds between requests")
    p.add_argument("--pause-on-error", type=float, default=0.05)
    args = p.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    dvk = open_dvk()
    rec = Recorder(args.out)
    deadline = time.monotonic() + args.seconds
    if args.sessions:
        threads = [threading.Thread(target=session_thread, args=(dvk, rec, args, stop,
                                                                 deadline), daemon=True)]
    else:
        threads = [threading.Thread(target=loop_thread, args=(dvk, rec, args.ep_base + i, args,
                                                              stop, deadline), daemon=True)
                   for i in range(args.threads)]
    for t in threads:
        t.start()
    try:
        while any(t.is_alive() for t in threads):
            for t in threads:
                t.join(0.5)
            rec.flush()
            if stop.is_set() and all(t.is_alive() for t in threads):
                # requests still waiting after a stop: give them their own timeout
                for t in threads:
                    t.join(args.timeout_ms / 1000 + 2)
                break
    finally:
        rec.close()
        dvk.close()
    return 0


def read_records(path: str) -> list[tuple[int, int, float, float, str]]:
    """The lines of an output file as (who, seq, t0, t1, result)."""
    out = []
    try:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 5:
                    out.append((int(parts[0]), int(parts[1]), float(parts[2]),
                                float(parts[3]), parts[4]))
    except OSError:
        pass
    return out


if __name__ == "__main__":
    sys.exit(main())
