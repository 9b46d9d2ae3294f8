"""A C DSP's host that crashes and boots again (docs/design.md, "Liveness"): TCP keep-alive
ends the dead host's idle connection within seconds, so the connection of its new DSP, held
aside meanwhile, takes over and the link comes up again without waiting out the C peers'
long silence limit.

Two network namespaces of this test are the two hosts, joined by a veth pair: node 1's real
`dsp_proxy` runs in one, the C peer (tests/c_peer.py, the C daemon's wire behaviour) in the
other.  Deleting the C peer's namespace is the crash: every socket in it vanishes without a
FIN or a reset, as on a host that lost power.  A new namespace with the same address, a new
node kernel and a new C peer process is the host booted again.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster_helpers import Background, cluster_from, wait_bound, wait_for
from dsp_proxy import topology
from dsp_proxy.cluster import module_argv
from dsp_proxy.link import C_PEER_SILENCE
from dsp_proxy.misc import keepalive_timing, tune_socket
from dvk_cffi import consts as C
from dvk_cffi.emu.node import stop_node
from dvk_cffi.emu.server import socket_path

needs_netns = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None,
    reason="needs root and iproute2 for a network namespace")

TESTS = Path(__file__).resolve().parent
FD_INTERVAL_MS, FD_FALL = 500, 3
#: The C peers' silence limit (95 s) is what a dead host's idle connection met before; the
#: keep-alive bound is about 2 + 3 x 1 s here.  Generous, and far below the old wait.
NOTICED_WITHIN = 30.0

CONFIG = f"""
lb node0 {{{{ nodeid 0; fd_interval {FD_INTERVAL_MS}; fd_fall {FD_FALL}; }}}};
server node1 {{{{ nodeid 1; rname {{host}}; }}}};
server node3 {{{{ nodeid 3; rname {{peer}}; }}}};
"""


def ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True, timeout=10)


class Hosts:
    """Two hosts joined by a cable: network namespaces `a` (node 1, address `host`) and `b`
    (node 3, address `peer`), a veth pair between them.  Nothing touches the machine's own
    network."""

    def __init__(self, tag: str, host: str, peer: str) -> None:
        self.a, self.b = f"dka{tag}a", f"dka{tag}b"
        self.host, self.peer = host, peer

    def inside(self, ns: str, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", ns, *argv]

    def create(self) -> None:
        """Host a; then host b and the cable (`boot_b`)."""
        self.delete()
        ip("netns", "add", self.a)
        ip("-n", self.a, "link", "set", "lo", "up")
        self.boot_b()

    def boot_b(self) -> None:
        """Host b, new, and the cable to it: the same addresses as before."""
        ip("netns", "add", self.b)
        ip("-n", self.b, "link", "set", "lo", "up")
        ip("-n", self.a, "link", "add", "eth1", "type", "veth", "peer", "name", "eth1",
           "netns", self.b)
        for ns, addr in ((self.a, self.host), (self.b, self.peer)):
            ip("-n", ns, "addr", "add", f"{addr}/30", "dev", "eth1")
            ip("-n", ns, "link", "set", "eth1", "up")

    def crash_b(self) -> None:
        """The cable cut first (nothing more reaches host a from b, not even the resets of
        b's sockets closing), then host b gone."""
        ip("-n", self.a, "link", "del", "eth1")
        subprocess.run(["ip", "netns", "del", self.b], capture_output=True, timeout=10)

    def delete(self) -> None:
        for ns in (self.b, self.a):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


class CPeerProcess:
    """tests/c_peer.py run on host b, as node 3's C DSP."""

    def __init__(self, hosts: Hosts, kernel_socket: str, sport: int, rport: int,
                 log: Path) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")]))
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                hosts.inside(hosts.b, sys.executable, str(TESTS / "c_peer.py"), kernel_socket,
                             "1", hosts.host, "--sport", str(sport), "--rport", str(rport),
                             "--listen", hosts.peer),
                env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def crashable_peer(tmp_path, bg):
    """Node 1 (its DSP on host a, a latency server at endpoint 13) and node 3 (its kernel,
    a latency server at 12, its C DSP on host b).  Yields (cluster, crash, boot): `crash`
    deletes host b and ends node 3's processes (its connections vanish unclosed), `boot`
    starts them all anew."""
    tag = str(os.getpid() % 100000)
    third = os.getpid() % 250 + 1
    hosts = Hosts(tag, f"10.213.{third}.1", f"10.213.{third}.2")
    peers: list[CPeerProcess] = []
    config = CONFIG.format(host=hosts.host, peer=hosts.peer)
    hosts.create()
    try:
        with cluster_from(config, tmp_path, only=[1],
                          dsp_prefix=hosts.inside(hosts.a)) as cl:
            spec = next(s for s in topology.peer_specs(cl.cfg, 1) if s.nodeid == 3)
            programs = Background(cl, tmp_path)
            bg.append(programs)

            def boot() -> None:
                cl.start_kernel(3)
                n3 = cl.dvk(3)
                peers.append(CPeerProcess(hosts, socket_path(3, cl.rundir), spec.rport,
                                          spec.sport, tmp_path / "cpeer.log"))
                wait_for(lambda: n3.getnodeinfo(1).n_flags != C.NODE_FREE, 15,
                         "the C pair registered")
                n3.add_node(0, 1)                 # the C operator's test_add_node
                for ep, name in ((13, "latsrv1"), (52, "latclt1")):
                    n3.rmtbind(0, name, ep, 1)
                programs.start(3, "dvs_apps.latency", "server", 0, 12)
                wait_bound(cl, 3, 0, 12)

            def crash() -> None:
                hosts.crash_b()
                for peer in peers:
                    peer.kill()
                stop_node(cl.kernels.pop(3))
                cl.forget_dvk(3)

            def boot_again() -> None:
                hosts.boot_b()
                boot()

            try:
                boot()
                # the C sender sleeps 5 s before its connect; node 1's DSP then adds node 3
                # to the DC
                wait_for(lambda: link_up(cl), 30, "link 1-3 up with the C peer")
                n1 = cl.dvk(1)
                for ep, name in ((12, "latsrv3"), (53, "latclt3")):
                    n1.rmtbind(0, name, ep, 3)
                programs.start(1, "dvs_apps.latency", "server", 0, 13)
                wait_bound(cl, 1, 0, 13)
                yield cl, crash, boot_again
            finally:
                for peer in peers:
                    peer.kill()
    finally:
        hosts.delete()


def link_up(cl) -> bool:
    both = C.NODE_SCONNECTED | C.NODE_RCONNECTED
    return cl.dvk(1).getnodeinfo(3).n_flags & both == both


def latency_works(cl, node: int, clt: int, srv: int) -> bool:
    """Five sendrec from `node`'s client endpoint to the server across the link; False when
    they do not all come back within a few seconds."""
    try:
        res = cl.run(node, module_argv("dvs_apps.latency", "client", 0, clt, srv, 5, 0, 0),
                     timeout=4)
    except subprocess.TimeoutExpired:
        return False
    return res.returncode == 0 and "Total average latency in 5 loops" in res.stdout


def wait_traffic(cl, timeout: float, what: str) -> None:
    """Messages cross the link both ways: first from node 3 (its C sender's connection is
    then the one node 1 reads), then from node 1 (the server on node 3 answers with `send`,
    which would fail while the C sender is not yet connected, and end that server)."""
    wait_for(lambda: latency_works(cl, 3, 53, 13), timeout, f"{what}, from node 3")
    wait_for(lambda: latency_works(cl, 1, 52, 12), 15, f"{what}, from node 1")


@needs_netns
def test_a_rebooted_c_host_is_noticed_and_its_new_dsp_takes_the_link_over(crashable_peer):
    """Before keep-alive timing, the dead host's incoming connection stayed the link's until
    95 s of silence: the new C DSP's connection waited aside, node 3's messages with it."""
    cl, crash, boot = crashable_peer
    wait_traffic(cl, 20, "traffic with the C peer")

    crash()                         # no FIN, no reset, nothing more from the host
    crashed = time.monotonic()
    wait_for(lambda: not link_up(cl), NOTICED_WITHIN, "the crashed host noticed")
    boot()                          # the same address, a new C DSP
    wait_traffic(cl, NOTICED_WITHIN + 15, "traffic with the C peer's new DSP")
    assert time.monotonic() - crashed < C_PEER_SILENCE


@pytest.mark.parametrize(("interval_ms", "fall", "want"), [
    (FD_INTERVAL_MS, FD_FALL, (2, 1, 3)),      # the defaults: about 5 s for a dead host
    (50, 1, (1, 1, 1)),                        # whole seconds, at least 1
    (2500, 4, (10, 3, 4)),
])
def test_link_sockets_probe_by_the_liveness_settings(interval_ms, fall, want):
    """Keep-alive starts after the silence limit, probes once per interval, gives up after
    `fd_fall` probes: what a link socket gets, in both directions."""
    assert keepalive_timing(interval_ms, fall) == want
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        tune_socket(sock, None, want)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
        got = tuple(sock.getsockopt(socket.IPPROTO_TCP, opt) for opt in
                    (socket.TCP_KEEPIDLE, socket.TCP_KEEPINTVL, socket.TCP_KEEPCNT))
        assert got == want
    finally:
        sock.close()
