"""The latency test pair of the C tests: round-trip times of `sendrec`.

    latency_server <dcid> <ep>
    latency_client <dcid> <clt_ep> <svr_ep> <loops> [<secs> <cpu_secs>]
    python -m dvs_apps.latency server|client ARGS...

The server binds `ep` (a system endpoint: it must receive and send), then forever receives a
request from ANY (30 s timeouts are retried), busy-loops `m1_i2` seconds when that is positive,
and sends the message back with `m_type` 0x0B.  The client binds `clt_ep` (a user endpoint is
enough: it only uses sendrec) and times `loops` sendrec calls (`m_type` 0x0A, `m1_i1` = loop,
`m1_i2` = cpu_secs, `m1_i3` = 3, `m1_p1` = 4), sleeping `secs` (default 1, like C; tests pass 0)
after each one; it prints each loop's time (flushed per loop only when paced, so unpaced
loops are not interleaved with pipe writes) and then the average latency and the message rate.
`cpu_secs` < 0 picks a random value in [0, |cpu_secs|) once.

Exit status: 0, or 1 on a fatal error (bad arguments, bind failure, server receive/send error)
and for the client also when any loop failed; SIGTERM/SIGINT end either program with 0.
`DVK_MODE` chooses the backend (auto, kernel, emu, emu-ioctl), `DVK_NODE`/`DVK_SOCKET` the emulated
node.
"""

from __future__ import annotations

import random
import re
import statistics
import sys
import time

from dvk_cffi import consts as C
from dvk_cffi.errors import EDVSERRCODE, EDVSTIMEDOUT, DvkError

from .common import (
    UsageError,
    debug,
    debug_enabled,
    error_text,
    parse_int,
    print_error,
    run_program,
)

#: The client's output lines that the benchmarks and the demo read (`loop_times`, `throughput`).
LOOP_LINE = re.compile(r"Time total elapsed in loop \d+: ([0-9.]+)")
RATE_LINE = re.compile(r"Message throughput in \d+ loops: ([0-9.]+)")

REQUEST_TYPE = 0x0A
REPLY_TYPE = 0x0B
TIMEOUT_MS = 30000
STARS = "*" * 69

SERVER_USAGE = "usage: latency_server <dcid> <ep>"
CLIENT_USAGE = "usage: latency_client <dcid> <clt_ep> <svr_ep> <loops> [<secs> <cpu_secs>]"


def _busy(seconds: int) -> None:
    """Burn CPU for `seconds` (the C server spins until SIGALRM)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


# ================================================================================== server
def serve(dvk, dcid: int, svr_nr: int) -> int:
    ep = dvk.bind(dcid, svr_nr)
    if ep < EDVSERRCODE:   # a backend returning codes instead of raising
        raise DvkError.for_code(ep, "bind")
    debug(f"latency.py:server:SERVER before LOOP server_ep={ep}")
    verbose = debug_enabled()  # the request line's repr is built only when it is printed
    m = dvk.message()
    while True:
        try:
            dvk.receive(C.ANY, m, TIMEOUT_MS)
        except DvkError as err:
            if err.code == EDVSTIMEDOUT:
                debug(f"latency.py:server:receive: {error_text(err)}")
                continue
            print_error(f"dvk_receive_T: {error_text(err)}")
            return 1
        if verbose:
            debug(f"latency.py:server:SERVER REQUEST msg: {m!r}")
        if m.m1_i2 > 0:
            _busy(m.m1_i2)
        m.m_type = REPLY_TYPE
        try:
            dvk.send(m.m_source, m, TIMEOUT_MS)
        except DvkError as err:
            if err.code == EDVSTIMEDOUT:
                debug(f"latency.py:server:send: {error_text(err)}")
                continue
            print_error(f"dvk_send_T: {error_text(err)}")
            return 1


def _server_args(argv: list[str]) -> tuple[int, int]:
    if len(argv) != 2:
        raise UsageError(SERVER_USAGE)
    return parse_int(argv[0], "dcid"), parse_int(argv[1], "ep")


def server_main(argv: list[str] | None = None) -> int:
    """`latency_server <dcid> <ep>`; `argv` without the program name (None: sys.argv)."""
    return run_program("latency_server", argv, _server_args, serve)


# ================================================================================== client
def run_client(dvk, dcid: int, clt_nr: int, svr_ep: int, loops: int, secs: int,
               cpu_secs: int, out=None) -> int:
    out = out or sys.stdout
    clt_ep = dvk.bind(dcid, clt_nr)
    if clt_ep < EDVSERRCODE:
        raise DvkError.for_code(clt_ep, "bind")
    debug(f"latency.py:client:CLIENT client_ep={clt_ep} server_ep={svr_ep} loops={loops}")
    m = dvk.message()
    total = 0.0
    failed = 0
    for i in range(loops):
        m.clear()
        m.m_source = clt_ep
        m.m_type = REQUEST_TYPE
        m.m1_i1 = i
        m.m1_i2 = cpu_secs
        m.m1_i3 = 3
        m.m1_p1 = 4
        t0 = time.perf_counter()
        try:
            dvk.sendrec(svr_ep, m, TIMEOUT_MS)
        except DvkError as err:
            print_error(f"dvk_sendrec_T loop {i}: {error_text(err)}")
            failed += 1
            if secs:
                time.sleep(secs)
            continue
        t1 = time.perf_counter()
        if m.m_type != REPLY_TYPE or m.m1_i1 != i:
            print_error(f"loop {i}: unexpected reply {m!r}")
            failed += 1
        elapsed = t1 - t0
        out.write(f"Time total elapsed in loop {i}: {elapsed:.10f} \n")
        if secs:  # paced loops show each line at once; unpaced ones buffer like C's stdio
            out.flush()
        total += elapsed
        if secs:
            time.sleep(secs)
    out.write(STARS + "\n")
    average = total / loops if loops else 0.0
    rate = 2 * loops / total if total > 0 else 0.0
    out.write(f"Total average latency in {loops} loops: {average:.10f} [s] \n")
    out.write(f"Message throughput in {loops} loops: {rate:.2f} [msg/s]\n")
    out.write(STARS + "\n")
    out.flush()
    return 1 if failed else 0


def loop_times(output: str) -> list[float]:
    """Each loop's round-trip time in seconds, from a client's output (the lines it writes
    above), in loop order."""
    return [float(x) for x in LOOP_LINE.findall(output)]


def throughput(output: str) -> float | None:
    """The message rate a client printed at its end (msgs/s), None when it did not get there."""
    m = RATE_LINE.search(output)
    return float(m.group(1)) if m else None


def p50_p99(samples: list[float]) -> tuple[float, float]:
    """The p50 (the median) and the p99 (the sample at the 99th percent of the sorted samples)
    of round-trip times, in the samples' unit: how every report of this project summarises
    them.  StatisticsError when there are none."""
    xs = sorted(samples)
    return statistics.median(xs), xs[min(len(xs) - 1, int(len(xs) * 0.99))]


def _client_args(argv: list[str]) -> tuple[int, int, int, int, int, int]:
    if len(argv) not in (4, 6):
        raise UsageError(CLIENT_USAGE)
    dcid = parse_int(argv[0], "dcid")
    clt_nr = parse_int(argv[1], "clt_ep")
    svr_ep = parse_int(argv[2], "svr_ep")
    loops = parse_int(argv[3], "loops")
    if loops < 1:
        raise UsageError("loops must be at least 1")
    secs, cpu_secs = 1, 0
    if len(argv) == 6:
        secs = parse_int(argv[4], "secs")
        cpu_secs = parse_int(argv[5], "cpu_secs")
        if secs < 0:
            secs = 1
        if cpu_secs < 0:
            cpu_secs = random.randrange(-cpu_secs)
    return dcid, clt_nr, svr_ep, loops, secs, cpu_secs


def client_main(argv: list[str] | None = None) -> int:
    """`latency_client <dcid> <clt_ep> <svr_ep> <loops> [<secs> <cpu_secs>]`."""
    return run_program("latency_client", argv, _client_args, run_client)


def main(argv: list[str] | None = None) -> int:
    """`python -m dvs_apps.latency server|client ARGS...`."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] not in ("server", "client"):
        print(f"usage: python -m dvs_apps.latency server|client ARGS...\n  {SERVER_USAGE}\n"
              f"  {CLIENT_USAGE}", file=sys.stderr)
        return 1
    role, rest = args[0], args[1:]
    if argv is None:   # program mode: keep the signal handling and process name
        sys.argv = [sys.argv[0], *rest]
        return server_main() if role == "server" else client_main()
    return server_main(rest) if role == "server" else client_main(rest)


if __name__ == "__main__":
    sys.exit(main())
