"""Chaos run: clients in loops through the virtual LB while server nodes fail one way after another.

    python -m fuzz.chaos [--mode relayed|local] [--hold-stop 5] [--hold-kill 3] [--sessions 20]
                         [--soak N] [--workdir DIR]

Cluster (real processes on this run's own loopback addresses): servers 1 and 2 run the latency
server on the service's ext_ep; client nodes 3 and 4 reach it through the virtual LB node 0.
`--mode relayed` (the default): the LB host node 5 balances node 0 for the relayed client nodes
3 and 4 (`cltname lbhost`).  `--mode local`: no LB host; nodes 3 and 4 balance their own
clients (their established sessions carried by the compiled code: the LB pair's get2rmt thread
writes the commands to the servers' links, the server links' receivers put the replies,
docs/design.md "Local clients' sessions").  Four load clients (two threads on node 3, two on
node 4, see `fuzz.loadclient`; in local mode on endpoints unique across the nodes, as the
servers see them) loop `sendrec` through the LB for the whole run.  One fault after another,
each healed before the next (whatever was killed is started again):

1. kill -9 of a server's DSP;                 4. kill of the server program;
2. SIGSTOP of a server's DSP for 5 s;         5. SIGSTOP of a whole server node (kernel, DSP
3. kill of a server's node kernel;               and program) for 5 s;
                                              6. restart of the LB host's DSP (relayed), or
                                                 of client node 3's DSP (local).

Per fault it prints: the longest client wait, errors by code, requests re-dispatched (the
balancing nodes' counters, when their DSPs have them), misrouted replies (must be 0), lost
requests (must be 0: every request got a reply or an error), the time to recover after the heal,
and the success rate of new sessions (while the victim is down, when one healthy server remains,
and after healing; both must be 100 %).  A restarted client node's sessions are lost with its
DSP: its own clients must get error codes (no lost request, no wait above the detection bound)
and new sessions from it must all succeed once it is back; the other client node's clients must
get no error at all (unless a server program exited meanwhile and had to be restarted: it exits
when a reply cannot be sent, as the C one does).  Then the number of sessions the balancing
nodes had handed over to the compiled code at each fault's start.  `--soak N` then runs 8
clients x N sendrec through the LB and prints p50/p99 and the lost count.  Exit status 0 when
every rule held.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dsp_proxy.cluster import Cluster, module_argv
from dsp_proxy.config import ConfigError
from dvk_cffi import consts as C
from dvk_cffi.errors import DvkError

from .harness import local_cluster
from .loadclient import read_records

CONFIG = """
lb node0 { nodeid 0; cltname lbhost; lb_eps 100 219; period 1; fd_interval 500; fd_fall 3;
           fd_rise 2; session_timeout 15; max_sessions 150; };
server node1 { nodeid 1; rname {net}.1; };
server node2 { nodeid 2; rname {net}.2; };
client node3 { nodeid 3; rname {net}.3; };
client node4 { nodeid 4; rname {net}.4; };
client lbhost { nodeid 5; rname {net}.5; };
service latency { dcid 0; ext_ep 10; min_ep 10; max_ep 19; bind external; };
"""
#: Local mode: no LB host; client nodes 3 and 4 balance their own clients (the LB pair's
#: get2rmt thread and the server links' receivers carry established sessions in C).
LOCAL_CONFIG = """
lb node0 { nodeid 0; period 1; fd_interval 500; fd_fall 3; fd_rise 2; session_timeout 15;
           max_sessions 150; };
server node1 { nodeid 1; rname {net}.1; };
server node2 { nodeid 2; rname {net}.2; };
client node3 { nodeid 3; rname {net}.3; };
client node4 { nodeid 4; rname {net}.4; };
service latency { dcid 0; ext_ep 10; min_ep 10; max_ep 19; bind external; };
"""
SERVERS = (1, 2)
CLIENT_NODES = (3, 4)
LB_HOST = 5
#: mode -> (config, the nodes whose DSPs balance the LB node, the victim of fault 6)
MODES = {"relayed": (CONFIG, (LB_HOST,), LB_HOST),
         "local": (LOCAL_CONFIG, CLIENT_NODES, CLIENT_NODES[0])}
EXT_EP = 10
LOOP_EP = 50    # the loop clients' first endpoint (probes use 60..99, the soak 60..73)
FD_INTERVAL, FD_FALL = 0.5, 3
#: No client may wait longer than this for a reply or an error (fd_interval x fd_fall + 1 s).
DETECTION_BOUND = FD_INTERVAL * FD_FALL + 1.0
RECOVER_BOUND = 30.0
LOST = ("pending", "EDVSTIMEDOUT", "killed")


@dataclass
class FaultResult:
    name: str
    victim: int
    start: float
    heal: float = 0.0
    end: float = 0.0
    recover: float | None = None
    during: tuple[int, int] | None = None     # (sessions ok, sessions tried) while down
    after: tuple[int, int] = (0, 0)           # (sessions ok, sessions tried) after healing
    redispatched: int | None = None
    fast: int = 0                             # sessions in the compiled code at the start
    programs_restarted: int = 0
    notes: list[str] = field(default_factory=list)
    # filled from the client records
    requests: int = 0
    longest: float = 0.0
    errors: Counter = field(default_factory=Counter)
    misrouted: int = 0
    lost: int = 0
    bystander_errors: Counter | None = None   # a client node's restart: the other nodes' errors

    def failures(self, wait_bound: float = DETECTION_BOUND) -> list[str]:
        out = []
        if not self.requests:    # nothing to judge: the loop clients were not running
            out.append(f"{self.name}: no loop-client request during this fault")
        if self.misrouted:
            out.append(f"{self.name}: {self.misrouted} misrouted")
        if self.lost:
            out.append(f"{self.name}: {self.lost} lost")
        if self.longest > wait_bound:
            out.append(f"{self.name}: a client waited {self.longest:.2f} s "
                       f"(bound {wait_bound:.1f} s)")
        if self.recover is None:
            out.append(f"{self.name}: not recovered within {RECOVER_BOUND:.0f} s")
        if self.during is not None and self.during[0] != self.during[1]:
            out.append(f"{self.name}: new sessions while node {self.victim} was down "
                       f"{self.during[0]}/{self.during[1]}")
        if self.after[0] != self.after[1] or not self.after[1]:
            out.append(f"{self.name}: new sessions after healing {self.after[0]}/{self.after[1]}")
        if self.bystander_errors and not self.programs_restarted:
            out.append(f"{self.name}: clients of the other client nodes got errors "
                       f"{dict(self.bystander_errors)}")
        return out


def pct(ok_tried: tuple[int, int] | None) -> str:
    if ok_tried is None:
        return "-"
    ok, tried = ok_tried
    return f"{100 * ok / tried:.0f}% ({ok}/{tried})" if tried else "none"


class Chaos:
    """Runs the faults against a started cluster of MODES[mode]'s config."""

    def __init__(self, cluster: Cluster, workdir: Path, hold_stop: float = 5.0,
                 hold_kill: float = 3.0, sessions: int = 10, pause: float = 0.01,
                 say: Callable[[str], None] = print, mode: str = "relayed") -> None:
        self.cl = cluster
        self.mode = mode
        _cfg, self.balancers, self.balancer_victim = MODES[mode]
        self.dir = workdir
        self.hold_stop = hold_stop
        self.hold_kill = hold_kill
        self.sessions = sessions
        self.pause = pause  # between a loop client's requests: the machine is not saturated
        self.say = say
        self.servers: dict[int, subprocess.Popen] = {}
        self.clients: list[tuple[subprocess.Popen, Path, int]] = []
        self.loop_eps: set[int] = set()
        self.other: list[subprocess.Popen] = []
        self.until = workdir / "stop-clients"
        self.results: list[FaultResult] = []
        self.hung = 0               # loop clients killed at the end: their waits never ended
        self._probe_n = 0
        self.current = FaultResult("start", 0, time.monotonic())

    # ------------------------------------------------------------------ processes
    def _popen(self, node: int, argv: list[str], name: str) -> subprocess.Popen:
        out = open(self.dir / f"{name}.out", "ab")
        try:
            return self.cl.popen(node, argv, stdout=out, stderr=subprocess.STDOUT)
        finally:
            out.close()

    def start_server(self, n: int) -> None:
        old = self.servers.get(n)
        if old is not None and old.poll() is None:
            old.kill()
            old.wait()
        self.servers[n] = self._popen(n, module_argv("dvs_apps.latency", "server", 0, EXT_EP),
                                      f"server{n}")

    def server_bound(self, n: int) -> bool:
        try:
            return not self.cl.dvk(n).getprocinfo(0, EXT_EP).p_rts_flags & C.SLOT_FREE
        except (DvkError, OSError):
            self.cl._dvks.pop(n, None)  # a restarted node kernel needs a new handle
            return False

    def wait(self, pred: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return True
            time.sleep(0.05)
        return False

    def start_clients(self, threads_per_node: int = 2) -> None:
        """Loop clients on endpoints 50...  In local mode the servers see the clients' real
        endpoints, which must then be unique across client nodes (README, "Two session
        modes"); relayed mode translates them, so every node uses the same ones."""
        self.until.unlink(missing_ok=True)
        for i, n in enumerate(CLIENT_NODES):
            base = LOOP_EP + (i * threads_per_node if self.mode == "local" else 0)
            self.loop_eps.update(range(base, base + threads_per_node))
            out = self.dir / f"loop{n}.rec"
            proc = self._popen(n, module_argv("fuzz.loadclient", "--out", out, "--threads",
                                              threads_per_node, "--ep-base", base, "--until",
                                              self.until, "--seconds", 1800, "--pause",
                                              self.pause), f"loop{n}")
            self.clients.append((proc, out, n))

    def stop_clients(self) -> int:
        """Stop the loops; returns how many clients had to be killed (their waits are lost)."""
        self.until.touch()
        killed = 0
        for proc, out, _n in self.clients:
            try:
                proc.wait(25)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                killed += 1
                with open(out, "a") as f:
                    f.write(f"-1 0 {time.monotonic():.6f} {time.monotonic():.6f} killed\n")
        return killed

    def new_sessions(self, k: int, node: int = CLIENT_NODES[0]) -> tuple[int, int]:
        """k new sessions of 3 requests each from a fresh client; (sessions ok, k)."""
        self._probe_n += 1
        out = self.dir / f"probe{self._probe_n}.rec"
        base = 60 + (self._probe_n % 2) * 20
        res = self.cl.run(node, module_argv("fuzz.loadclient", "--out", out, "--sessions", k,
                                            "--per-session", 3, "--ep-base", base,
                                            "--timeout-ms", 10000, "--seconds", 120),
                          timeout=180)
        recs = read_records(str(out))
        by_session: dict[int, list[str]] = {}
        for who, _seq, _t0, _t1, result in recs:
            by_session.setdefault(who, []).append(result)
        ok = sum(1 for results in by_session.values()
                 if len(results) == 3 and all(r == "ok" for r in results))
        if res.returncode != 0 or ok != k:
            bad = Counter(r for results in by_session.values() for r in results if r != "ok")
            self.say(f"    new sessions: {ok}/{k} ok; errors {dict(bad)} {res.stderr[-300:]}")
        return ok, k

    def groups(self) -> list[dict]:
        """The group figures of every node that balances the LB node (the LB host, or in
        local mode each client node)."""
        return [(self.cl.status(b) or {}).get("group") or {} for b in self.balancers]

    def redispatch_count(self) -> int | None:
        counts = [int(g[k]) for g in self.groups() for k in g if "redispatch" in k]
        return sum(counts) if counts else None

    def server_live(self, n: int) -> bool:
        """Server n is live at every node that balances the LB node, as its current DSP (not
        an earlier one) says."""
        for b in self.balancers:
            st = self.cl.status(b) or {}
            if st.get("pid") != self.cl.dsps[b].pid:
                return False
            group = st.get("group") or {}
            if not group.get("servers", {}).get(str(n), {}).get("live"):
                return False
        return True

    # ------------------------------------------------------------------ faults
    def faults(self) -> list[tuple[str, int, Callable, Callable, bool]]:
        """(name, victim, inject, heal, victim is down meanwhile)."""
        cl = self.cl

        def kill_dsp(v):
            cl.kill_dsp(v, signal.SIGKILL)

        def restart_dsp(v):
            cl.start_dsp(v)

        def stop_dsp(v):
            cl.dsps[v].send_signal(signal.SIGSTOP)

        def cont_dsp(v):
            cl.dsps[v].send_signal(signal.SIGCONT)

        def kill_kernel(v):
            cl.kernels[v].kill()
            cl.kernels[v].wait(10)
            cl._dvks.pop(v, None)

        def restart_kernel(v):
            cl.start_kernel(v)
            # the DSP either comes back by itself (re-registers) or has exited: restart it
            if not self.wait(lambda: cl.dsps[v].poll() is not None or _links_up(cl, v), 8):
                self.current.notes.append("DSP alive but not linked 8 s after the kernel came "
                                          "back: restarted")
                cl.kill_dsp(v, signal.SIGKILL)
            if cl.dsps[v].poll() is not None:
                if v not in cl.killed:
                    self.current.notes.append(f"DSP exited with {cl.dsps[v].returncode}")
                cl.start_dsp(v)

        def kill_program(v):
            self.servers[v].kill()
            self.servers[v].wait()

        def restart_program(v):
            self.start_server(v)

        def noop(v):
            pass

        def stop_node(v):
            for p in (self.servers[v], cl.dsps[v], cl.kernels[v]):
                p.send_signal(signal.SIGSTOP)

        def cont_node(v):
            for p in (cl.kernels[v], cl.dsps[v], self.servers[v]):
                p.send_signal(signal.SIGCONT)

        def restart_balancer(v):
            cl.kill_dsp(v, signal.SIGTERM)
            Path(cl.status_path(v)).unlink(missing_ok=True)  # no stale figures
            cl.start_dsp(v)

        # victim 0: the server that serves most loop clients when the fault starts
        return [("kill -9 server DSP", 0, kill_dsp, restart_dsp, True),
                ("SIGSTOP server DSP", 0, stop_dsp, cont_dsp, False),
                ("kill server node kernel", 0, kill_kernel, restart_kernel, True),
                ("kill server program", 0, kill_program, restart_program, True),
                ("SIGSTOP whole server node", 0, stop_node, cont_node, False),
                (f"restart {'LB host' if self.mode == 'relayed' else 'client node'} DSP",
                 self.balancer_victim, restart_balancer, noop, False)]

    def busiest_server(self) -> int:
        """The server with most sessions of the loop clients at the nodes that balance them
        (ties: the one that was not the last victim)."""
        count = Counter(int(s["server"].split("@")[1]) for g in self.groups()
                        for s in g.get("sessions", [])
                        if int(s["client"].split("@")[0]) in self.loop_eps)
        last = self.results[-1].victim if self.results else 0
        return max(SERVERS, key=lambda n: (count.get(n, 0), n != last))

    def recovered(self, v: int) -> bool:
        """The victim is back: links up; every server program running (one that exited, as
        latency_server does when a reply fails, is started again and noted), bound and live
        at every balancing node, as its current DSP reports."""
        if not _links_up(self.cl, v):
            return False
        for n in SERVERS:
            prog = self.servers[n]
            if prog.poll() is not None:
                self.current.notes.append(f"server program on node {n} exited "
                                          f"({prog.returncode}): restarted")
                self.current.programs_restarted += 1
                self.start_server(n)
                return False
        return all(self.server_bound(n) and self.server_live(n) for n in SERVERS)

    def run_fault(self, name: str, v: int, inject, heal, down: bool) -> FaultResult:
        v = v or self.busiest_server()
        r = self.current = FaultResult(name, v, time.monotonic())
        r0 = self.redispatch_count()
        r.fast = sum(int(g.get("fast_sessions", 0)) for g in self.groups())
        self.say(f"-- {name} (node {v})")
        inject(v)
        hold = (self.hold_stop if "SIGSTOP" in name else 0.0 if "restart" in name
                else self.hold_kill)
        if down and v in SERVERS:
            time.sleep(DETECTION_BOUND + 0.5)
            r.during = self.new_sessions(max(3, self.sessions // 2))
            time.sleep(max(0.0, hold - (time.monotonic() - r.start)))
        else:
            time.sleep(hold)
        r.heal = time.monotonic()
        heal(v)
        ok = self.wait(lambda: self.recovered(v), RECOVER_BOUND)
        r.recover = time.monotonic() - r.heal if ok else None
        r.after = self.new_sessions(self.sessions)
        r1 = self.redispatch_count()
        if r0 is not None and r1 is not None:
            r.redispatched = max(0, r1 - r0)  # a restarted LB host starts from 0
        time.sleep(1.0)
        r.end = time.monotonic()
        self.results.append(r)
        return r

    def account(self) -> None:
        """Attribute the loop clients' requests to the fault windows."""
        recs = []
        for _proc, out, n in self.clients:
            recs.extend((n, *rec) for rec in read_records(str(out)))
        for r in self.results:
            if r.victim in CLIENT_NODES:
                r.bystander_errors = Counter()
            for node, _who, _seq, t0, t1, result in recs:
                if t1 < r.start or t0 >= r.end:
                    continue
                if r.bystander_errors is not None and node != r.victim and result != "ok":
                    r.bystander_errors[result] += 1
                r.requests += 1
                r.longest = max(r.longest, t1 - t0)
                if result == "misrouted":
                    r.misrouted += 1
                elif result in LOST:
                    r.lost += 1
                if result != "ok":
                    r.errors[result] += 1

    def run(self) -> list[FaultResult]:
        for n in SERVERS:
            self.start_server(n)
        for n in SERVERS:
            if not self.wait(lambda n=n: self.server_bound(n), 15):
                raise RuntimeError(f"latency server on node {n} did not bind")
        if not self.wait(lambda: all(self.server_live(s) for s in SERVERS), 20):
            raise RuntimeError(f"servers not live at the nodes {self.balancers}: "
                               f"{self.groups()}")
        self.start_clients()
        time.sleep(2.0)
        try:
            for fault in self.faults():
                self.run_fault(*fault)
        finally:
            killed = self.stop_clients()
        self.hung = killed
        if killed and self.results:
            self.results[-1].notes.append(f"{killed} load clients hung at the end and were "
                                          "killed")
        self.account()
        return self.results

    def close(self) -> None:
        self.until.touch()
        for p in [*self.servers.values(), *(c for c, _o, _n in self.clients), *self.other]:
            if p.poll() is None:
                p.kill()
                p.wait()

    def table(self) -> list[str]:
        head = (f"{'fault':28} {'reqs':>6} {'longest':>8} {'misr':>4} {'lost':>4} "
                f"{'redisp':>6} {'recover':>8} {'new(down)':>12} {'new(after)':>12}  errors")
        lines = [head, "-" * len(head)]
        for r in self.results:
            lines.append(
                f"{r.name:28} {r.requests:6d} {r.longest:7.2f}s {r.misrouted:4d} {r.lost:4d} "
                f"{'n/a' if r.redispatched is None else r.redispatched:>6} "
                f"{'FAIL' if r.recover is None else f'{r.recover:.2f}s':>8} "
                f"{pct(r.during):>12} {pct(r.after):>12}  "
                f"{dict(r.errors) if r.errors else '-'}")
            if r.bystander_errors is not None:
                lines.append(f"{'':28} the other client nodes' clients: errors "
                             f"{dict(r.bystander_errors) or 'none'}")
            for note in r.notes:
                lines.append(f"{'':28} note: {note}")
        lines.append("sessions handed over to the compiled code at each fault's start: "
                     + " ".join(str(r.fast) for r in self.results))
        return lines

    def failures(self, wait_bound: float = DETECTION_BOUND) -> list[str]:
        """Every broken rule; `wait_bound` is the longest client wait allowed.  A client that
        had to be killed at the end counts although its record falls in no fault's window."""
        out = [f for r in self.results for f in r.failures(wait_bound)]
        if self.hung:
            out.append(f"{self.hung} loop clients still waiting 25 s after the stop: killed")
        return out


def _links_up(cl: Cluster, node: int) -> bool:
    try:
        return all(up for (a, b), up in cl.link_state().items() if node in (a, b))
    except (DvkError, OSError):
        return False


# ------------------------------------------------------------------------------ the soak
def soak(cl: Cluster, workdir: Path, requests: int, say: Callable[[str], None] = print,
         clients_per_node: int = 4) -> dict:
    """8 clients (4 threads on each client node) x `requests` sendrec through the LB; returns
    {'requests', 'expected', 'ok', 'lost', 'not_run', 'misrouted', 'errors', 'killed',
    'p50_ms', 'p99_ms', 'seconds'}; lost = no reply and no error (timeouts, still waiting)."""
    procs = []
    t0 = time.monotonic()
    for n in CLIENT_NODES:
        out = workdir / f"soak{n}.rec"
        out.unlink(missing_ok=True)
        procs.append((cl.popen(n, module_argv("fuzz.loadclient", "--out", out, "--threads",
                                              clients_per_node, "--ep-base", 30 + 10 * n,
                                              "--requests", requests, "--seconds",
                                              max(300, requests / 20)),
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT), out))
    killed = 0
    for proc, _out in procs:
        try:
            proc.wait(max(360, requests / 15))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            killed += 1
    recs = [r for _p, out in procs for r in read_records(str(out))]
    lat = sorted((t1 - t0_) * 1000 for _w, _s, t0_, t1, res in recs if res == "ok")
    errors = Counter(res for *_x, res in recs if res != "ok")
    expected = requests * clients_per_node * len(CLIENT_NODES)
    lost = sum(errors[k] for k in LOST)
    figures = {"requests": len(recs), "expected": expected, "ok": len(lat), "lost": lost,
               "not_run": expected - len(recs),
               "misrouted": errors.get("misrouted", 0), "errors": dict(errors),
               "killed": killed, "seconds": round(time.monotonic() - t0, 1),
               "p50_ms": round(lat[len(lat) // 2], 2) if lat else None,
               "p99_ms": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))], 2) if lat else None}
    say(f"soak: {clients_per_node * len(CLIENT_NODES)} clients x {requests} sendrec: "
        f"{figures['ok']} ok of {expected} ({figures['not_run']} not run in time), "
        f"lost {lost}, misrouted {figures['misrouted']}, "
        f"errors {figures['errors'] or '-'}, p50 {figures['p50_ms']} ms, "
        f"p99 {figures['p99_ms']} ms, {figures['seconds']} s")
    return figures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fuzz.chaos", description=__doc__.split(
        "\n\n")[0])
    p.add_argument("--hold-stop", type=float, default=5.0, help="SIGSTOP faults last this long")
    p.add_argument("--hold-kill", type=float, default=3.0, help="before a kill is healed")
    p.add_argument("--sessions", type=int, default=20, help="new sessions tried after healing")
    p.add_argument("--soak", type=int, default=0, help="then 8 clients x N sendrec")
    p.add_argument("--mode", choices=sorted(MODES), default="relayed",
                   help="relayed: the LB host node 5 balances for client nodes 3 and 4; "
                        "local: nodes 3 and 4 balance their own clients")
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)
    failures: list[str] = []
    try:
        with local_cluster(MODES[args.mode][0], args.workdir) as cl:
            workdir = Path(cl.log_dir)
            print(f"cluster up ({args.mode} mode): nodes {cl.nodes} on {cl.net}.x, logs in "
                  f"{workdir}")
            chaos = Chaos(cl, workdir, args.hold_stop, args.hold_kill, args.sessions,
                          mode=args.mode)
            try:
                chaos.run()
                for line in chaos.table():
                    print(line)
                failures = chaos.failures()
                if args.soak:  # the servers of the chaos run serve it (all healed by now)
                    fig = soak(cl, workdir, args.soak)
                    if fig["lost"] or fig["misrouted"] or fig["ok"] != fig["expected"]:
                        failures.append(f"soak: {fig}")
            finally:
                chaos.close()
    except (RuntimeError, TimeoutError, DvkError, OSError, ConfigError) as exc:
        print(f"chaos: cannot run: {exc}", file=sys.stderr)
        return 2
    for f in failures:
        print(f"FAIL: {f}")
    print(f"chaos ({args.mode}): all rules held" if not failures else
          f"chaos ({args.mode}): {len(failures)} rules broken; logs kept in {workdir}")
    if not failures and args.workdir is None:
        shutil.rmtree(workdir.parent, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
