"""Many concurrent DVS clients in one process: one thread per client endpoint (benchmark 5).

    python -m bench.many_clients DCID FIRST_EP COUNT SVR_EP ROUNDS

Every thread binds its own endpoint FIRST_EP+i of DC DCID (the node kernel sees each thread as
its own process), all wait until every one is bound, then each does ROUNDS `sendrec` calls to
SVR_EP (the latency server's protocol: m_type 0x0A out, 0x0B back with m1_i1 echoed), so all
COUNT sessions are open and in use at the same time.  Then the process prints one JSON line
(replies, failures, round-trip times) and keeps every endpoint bound -- the sessions stay held
-- until its stdin is closed; then it unbinds and exits.  Bounded: every call has a timeout.
"""

from __future__ import annotations

import json
import statistics
import sys
import threading
import time

from dvk_cffi.errors import DvkError
from dvs_apps.common import open_program_dvk

REQUEST_TYPE, REPLY_TYPE = 0x0A, 0x0B
TIMEOUT_MS = 30000


def main(argv: list[str] | None = None) -> int:
    args = [int(a) for a in (sys.argv[1:] if argv is None else argv)]
    dcid, first, count, svr_ep, rounds = args
    dvk = open_program_dvk("many_clients")
    bound = threading.Barrier(count + 1, timeout=120)
    release = threading.Event()
    lock = threading.Lock()
    rtts: list[float] = []
    result = {"dcid": dcid, "clients": count, "bound": 0, "replies": 0, "failed": 0,
              "errors": [], "served_clients": 0}

    def client(ep: int) -> None:
        ok = 0
        try:
            dvk.bind(dcid, ep)
            with lock:
                result["bound"] += 1
        except DvkError as err:
            with lock:
                result["errors"].append(f"bind {ep}: {err}")
        try:
            bound.wait()
        except threading.BrokenBarrierError:
            return
        m = dvk.message()
        mine = []
        for i in range(rounds):
            m.clear()
            m.m_source, m.m_type, m.m1_i1 = ep, REQUEST_TYPE, i
            t0 = time.perf_counter()
            try:
                dvk.sendrec(svr_ep, m, TIMEOUT_MS)
            except DvkError as err:
                with lock:
                    result["failed"] += 1
                    if len(result["errors"]) < 10:
                        result["errors"].append(f"sendrec {ep} loop {i}: {err}")
                continue
            mine.append(time.perf_counter() - t0)
            if m.m_type == REPLY_TYPE and m.m1_i1 == i:
                ok += 1
            else:
                with lock:
                    result["failed"] += 1
        with lock:
            result["replies"] += ok
            result["served_clients"] += ok == rounds
            rtts.extend(mine)
        release.wait(600)       # keep the endpoint (and so the session) until told
        try:
            dvk.unbind(dcid, ep)
        except DvkError:
            pass

    threads = [threading.Thread(target=client, args=(first + i,), daemon=True)
               for i in range(count)]
    for t in threads:
        t.start()
    t_start = None
    try:
        bound.wait()
        t_start = time.perf_counter()
    except threading.BrokenBarrierError:
        result["errors"].append("not every client could bind within 120 s")
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        with lock:
            done = result["replies"] + result["failed"] >= result["bound"] * rounds
        if done or t_start is None:
            break
        time.sleep(0.02)
    elapsed = time.perf_counter() - t_start if t_start is not None else 0.0
    result["seconds"] = elapsed
    result["p50_ms"] = statistics.median(rtts) * 1e3 if rtts else None
    result["p99_ms"] = sorted(rtts)[int(len(rtts) * 0.99)] * 1e3 if rtts else None
    print(json.dumps(result), flush=True)
    try:
        sys.stdin.read()    # held until the benchmark closes our stdin
    finally:
        release.set()
        for t in threads:
            t.join(5)
        dvk.close()
    return 0 if result["served_clients"] == count else 1


if __name__ == "__main__":
    sys.exit(main())
