"""The DVS programs on one emulated node: local IPC between separate processes.

latency_server/latency_client, m3ftpd/m3ftp (PUT and GET, sizes that are and are not multiples
of 1 MiB, content verified three ways), dvsctl (node kernels, bindings, views, errors), and
File data moves through shared memory, not through the node kernel's socket.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import threading
import time

import pytest

from dvk_cffi.emu import node as emu_node
from dvk_cffi.emu import protocol
from dvs_apps import latency

MIB = 1 << 20
LOOP_RE = re.compile(r"^Time total elapsed in loop (\d+): (\d+\.\d{10}) $")
AVG_RE = re.compile(r"^Total average latency in (\d+) loops: (\d+\.\d{10}) \[s\] $")
RATE_RE = re.compile(r"^Message throughput in (\d+) loops: (\d+\.\d{2}) \[msg/s\]$")


def sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def random_file(path, size: int) -> str:
    path.write_bytes(os.urandom(size))
    return sha256(path)


# ================================================================================== latency
def test_latency_pair(start_node, apps):
    start_node(1)
    server = apps.spawn("latency", "server", 0, 10)
    apps.wait_bound(0, 10, proc=server)
    result = apps.run("latency", "client", 0, 50, 10, 20, 0, 0, timeout=30)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    loops = [LOOP_RE.match(line) for line in lines[:20]]
    assert all(loops), lines[:20]
    assert [int(m.group(1)) for m in loops] == list(range(20))
    times = [float(m.group(2)) for m in loops]
    assert all(0 < t < 5 for t in times)
    assert lines[20] == "*" * 69 and lines[23] == "*" * 69 and len(lines) == 24
    avg, rate = AVG_RE.match(lines[21]), RATE_RE.match(lines[22])
    assert avg and rate, lines[20:]
    assert avg.group(1) == rate.group(1) == "20"
    assert float(avg.group(2)) == pytest.approx(sum(times) / 20, rel=1e-3)
    assert float(rate.group(2)) == pytest.approx(40 / sum(times), rel=1e-2)
    # what the benchmarks and the demo read from this output is exactly what it says
    assert latency.loop_times(result.stdout) == times
    assert latency.throughput(result.stdout) == float(rate.group(2))
    print(f"\nlocal latency: average round trip {float(avg.group(2)) * 1e6:.0f} us, "
          f"{rate.group(2)} msg/s")

    # unbinding a local process sends it SIGTERM: the server ends cleanly
    ub = apps.run("dvsctl", "unbind", 0, 10, timeout=15)
    assert ub.returncode == 0, ub.stderr
    assert server.wait(10) == 0, apps.output(server)


def test_latency_figures_are_the_median_and_the_99th_percent_sample():
    assert latency.p50_p99([3.0, 1.0, 2.0]) == (2.0, 3.0)
    assert latency.p50_p99([4.0, 1.0, 3.0, 2.0]) == (2.5, 4.0)
    samples = [float(i) for i in range(1, 201)]        # 200 samples: the 199th is the p99
    assert latency.p50_p99(samples[::-1]) == (100.5, 199.0)
    assert latency.throughput("no summary line") is None
    with pytest.raises(ValueError):                    # StatisticsError: no samples
        latency.p50_p99([])


def test_latency_errors(start_node, apps):
    start_node(1)
    # no server bound at 10: every loop fails, the summary is still printed, status 1
    result = apps.run("latency", "client", 0, 50, 10, 3, 0, 0, timeout=20)
    assert result.returncode == 1
    assert result.stderr.count("ERROR:") == 3
    assert "Total average latency in 3 loops" in result.stdout
    # usage
    bad = apps.run("latency", "client", 0, 50, 10, timeout=20)
    assert bad.returncode == 1 and "usage: latency_client" in bad.stderr
    bad = apps.run("latency", "server", 0, "x", timeout=20)
    assert bad.returncode == 1 and "ep must be an integer" in bad.stderr
    # a server that cannot bind (user endpoint out of range of the DC)
    bad = apps.run("latency", "server", 0, 5000, timeout=20)
    assert bad.returncode == 1 and bad.stderr.startswith("ERROR: ")


# ================================================================================== m3ftp
def test_m3ftp_put_get(start_node, apps, tmp_path):
    start_node(1)
    srv_dir, clt_dir = tmp_path / "srv", tmp_path / "clt"
    srv_dir.mkdir()
    clt_dir.mkdir()
    server = apps.spawn("m3ftp", "server", 0, 20, env={"M3FTPD_DIR": str(srv_dir)})
    apps.wait_bound(0, 20, proc=server)
    sizes = {"1M": MIB, "10M": 10 * MIB, "1.5M": 3 * MIB // 2, "small": 1000, "empty": 0}
    for tag, size in sizes.items():
        digest = random_file(clt_dir / f"file-{tag}.dat", size)
        put = apps.run("m3ftp", "-p", 0, 21, 20, f"remote-{tag}.dat", f"file-{tag}.dat",
                       cwd=clt_dir, timeout=60)
        assert put.returncode == 0, (tag, put.stdout, put.stderr)
        assert sha256(srv_dir / f"remote-{tag}.dat") == digest
        assert put.stdout.splitlines()[-1] == "verified", put.stdout
        assert f": {size} bytes in " in put.stdout
        assert f"sha256 local  {digest}" in put.stdout
        get = apps.run("m3ftp", "-g", 0, 21, 20, f"remote-{tag}.dat", f"back-{tag}.dat",
                       cwd=clt_dir, timeout=60)
        assert get.returncode == 0, (tag, get.stdout, get.stderr)
        assert sha256(clt_dir / f"back-{tag}.dat") == digest
        assert get.stdout.splitlines()[-1] == "verified", get.stdout
        if size == 10 * MIB:
            print(f"\nm3ftp 10 MiB local: {put.stdout.splitlines()[0]}\n"
                  f"                    {get.stdout.splitlines()[0]}")
    # the server finished every transfer (no short-chunk hang) and logged its statistics
    log = (srv_dir / "m3ftpd_20.log").read_text()
    assert log.count("FTP_PUT: t_start=") == len(sizes)
    assert log.count("FTP_GET: t_start=") == len(sizes)
    assert f"FTP_GET: total_bytes={3 * MIB // 2} Throughput=" in log
    assert re.search(r"FTP_PUT: total_bytes=10485760 Throughput=\d+\.\d{6} \[bytes/s\]", log)
    assert server.poll() is None
    assert apps.stop(server) == 0


def test_m3ftp_errors(start_node, apps, tmp_path):
    start_node(1)
    server = apps.spawn("m3ftp", "server", 0, 20, cwd=tmp_path)
    apps.wait_bound(0, 20, proc=server)
    get = apps.run("m3ftp", "-g", 0, 21, 20, "no-such-file", "out.dat", cwd=tmp_path)
    assert get.returncode == 1 and "EDVSNOENT" in get.stderr
    assert not (tmp_path / "out.dat").exists()
    put = apps.run("m3ftp", "-p", 0, 21, 20, "x", "no-such-local", cwd=tmp_path)
    assert put.returncode == 1 and "cannot open no-such-local" in put.stderr
    (tmp_path / "ok.dat").write_bytes(b"hello" * 1000)
    put = apps.run("m3ftp", "-p", 0, 21, 20, "no-dir/x", "ok.dat", cwd=tmp_path)
    assert put.returncode == 1 and "FTP_PUT no-dir/x: EDVSNOENT" in put.stderr
    bad = apps.run("m3ftp", "-g", 0, 21, 30, "x", "y", cwd=tmp_path)   # nobody at 30
    assert bad.returncode == 1 and bad.stderr.startswith("ERROR: ")
    usage = apps.run("m3ftp", "-x", 0, 21, 20, "a", "b")
    assert usage.returncode == 1 and "usage: m3ftp" in usage.stderr
    # the server survived all of that and still serves
    ok = apps.run("m3ftp", "-g", 0, 21, 20, "ok.dat", "ok-back.dat", cwd=tmp_path)
    assert ok.returncode == 0 and "verified" in ok.stdout, ok.stderr
    assert server.poll() is None


def test_m3ftpd_answers_a_file_name_with_a_nul_byte(start_node, apps, tmp_path):
    """The file name of a request is whatever bytes the client put in its memory; one with a
    NUL byte names no file (Python's open raises ValueError for it, not OSError).  m3ftpd
    answers EDVSINVAL to each request and goes on serving, instead of dying of it."""
    from dvk_cffi import errors as E
    from dvk_cffi.emu.client import EmuDvk
    from dvs_apps import m3ftp

    start_node(1)
    server = apps.spawn("m3ftp", "server", 0, 20, cwd=tmp_path)
    apps.wait_bound(0, 20, proc=server)
    (tmp_path / "ok.dat").write_bytes(b"hello" * 100)
    dvk = EmuDvk(nodeid=1)
    try:
        client = m3ftp.Client(dvk, 0, 21, 20)
        for op in (m3ftp.FTP_SUM, m3ftp.FTP_GET, m3ftp.FTP_PUT):
            assert client.first(op, "ok.dat\0x").m_type == E.EDVSINVAL, apps.output(server)
        assert client.remote_digest("ok.dat") == hashlib.sha256(b"hello" * 100).digest()
    finally:
        dvk.close()
    assert server.poll() is None


def test_m3ftp_data_stays_off_the_socket(start_node, tmp_path, monkeypatch):
    """A 10 MiB PUT and GET move (far) less than 1 MiB through the node kernel's socket.
    Client and server run in this process (two threads) so every frame is counted."""
    from dvk_cffi.emu.client import EmuDvk
    from dvs_apps import m3ftp

    node = start_node(1)
    monkeypatch.setenv("DVK_NODE", "1")
    counted = {"bytes": 0, "frames": 0}
    lock = threading.Lock()
    real_rpc, real_recv = EmuDvk._rpc, protocol.recv_frame

    def count(n: int) -> None:
        with lock:
            counted["bytes"] += n
            counted["frames"] += 1

    # every request frame, whichever encoder built it (the message calls have fast ones)
    def rpc(self, data, op, fds=None):
        count(len(data))
        return real_rpc(self, data, op, fds)

    def recv_frame(sock, fds=None):
        body = real_recv(sock, fds)
        count(4 + len(body or b""))
        return body

    monkeypatch.setattr(EmuDvk, "_rpc", rpc)
    monkeypatch.setattr(protocol, "recv_frame", recv_frame)

    srv_dir = tmp_path / "srv"
    srv_dir.mkdir()
    ready = threading.Event()
    failure: list[BaseException] = []

    def serve():
        try:
            server = m3ftp.Server(EmuDvk(nodeid=1), 0, 20, directory=str(srv_dir))
            ready.set()
            server.serve_forever()
        except BaseException as exc:   # the node kernel stopping ends it (EDVSSHUTDOWN)
            failure.append(exc)
            ready.set()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        assert ready.wait(10) and not failure, failure
        src = tmp_path / "ten.dat"
        digest = random_file(src, 10 * MIB)
        assert m3ftp.client_main(["-p", "0", "21", "20", "ten-remote.dat", str(src)]) == 0
        back = tmp_path / "ten-back.dat"
        assert m3ftp.client_main(["-g", "0", "21", "20", "ten-remote.dat", str(back)]) == 0
        assert sha256(srv_dir / "ten-remote.dat") == digest == sha256(back)
        total = counted["bytes"]
        print(f"\nsocket traffic for 10 MiB PUT + GET: {total} bytes in "
              f"{counted['frames']} frames")
        assert total < MIB
    finally:
        emu_node.stop_node(node)
        thread.join(10)
    assert not thread.is_alive()


# ================================================================================== dvsctl
def test_dvsctl_views_and_bindings(start_node, apps):
    start_node(1)
    server = apps.spawn("latency", "server", 0, 10)
    apps.wait_bound(0, 10, proc=server)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    apps.procs.append(holder)   # always killed at teardown
    held = apps.spawn("dvsctl", "bind", 0, 12)
    try:
        r = apps.run("dvsctl", "lclbind", 0, holder.pid, 50)
        assert r.returncode == 0 and r.stdout.strip() == "50", r.stderr
        apps.wait_bound(0, 12, proc=held)

        procs = apps.run("dvsctl", "procs")
        assert procs.returncode == 0, procs.stderr
        lines = procs.stdout.splitlines()
        assert lines[0] == "DC pnr -endp -lpid/vpid- nd flag misc -getf -sndt -wmig -prxy name"
        rows = {int(line.split()[1]): line for line in lines[1:]}
        assert set(rows) == {10, 12, 50}
        assert rows[10].split()[2] == "10" and "latency_server" in rows[10]
        assert f"{holder.pid}/{holder.pid}" in rows[50]
        assert f"{held.pid}/{held.pid}" in rows[12]
        assert all(row.split()[4] == "1" for row in rows.values())    # node column

        stats = apps.run("dvsctl", "stats", "0").stdout.splitlines()
        assert stats[0].startswith("DC pnr -endp -lpid/vpid- nd --lsnt--")
        assert {int(line.split()[1]) for line in stats[1:]} == {10, 12, 50}
        assert apps.run("dvsctl", "procs", "DC0").stdout == procs.stdout  # by name

        info = apps.run("dvsctl", "info").stdout
        assert "nodeid=1\n" in info and "max_copy_len=1048576\n" in info
        dcinfo = apps.run("dvsctl", "dcinfo").stdout
        assert "dcid=0\n" in dcinfo and "nr_procs=221\n" in dcinfo and "dc_name=DC0\n" in dcinfo
        nodes = apps.run("dvsctl", "nodes").stdout.splitlines()
        assert nodes[0].startswith("ID Flags Proxies -pxsent- -pxrcvd-")
        assert nodes[1].split()[:3] == ["1", "6", "-1"] and nodes[1].split()[-1] == "node1"
        proxies = apps.run("dvsctl", "proxies").stdout
        assert proxies.startswith("Proxies Flags Sender Receiver") and "ID Type -lpid-" in proxies
        pi = apps.run("dvsctl", "procinfo", 0, 10).stdout
        assert "p_endpoint=10\n" in pi and "p_name=latency_server\n" in pi

        # unbind: a local process is sent SIGTERM and dvsctl waits until its slot is free
        ub = apps.spawn("dvsctl", "unbind", 0, 50)
        assert holder.wait(10) == -15
        assert ub.wait(10) == 0, apps.output(ub)
        assert apps.run("dvsctl", "unbind", 0, 12).returncode == 0
        assert held.wait(10) == 0
        assert apps.run("dvsctl", "unbind", 0, 10).returncode == 0
        assert server.wait(10) == 0
        after = apps.run("dvsctl", "procs").stdout.splitlines()
        assert len(after) == 1, after
    finally:
        for proc in (holder, held, server):
            apps.stop(proc)


def test_dvsctl_node_with_several_named_dcs(start_node, apps):
    """`--dcs N --dc-name NAME`: every DC runs under a name of its own (a kernel refuses a
    second DC of the same name); a name too long for its numbered siblings is refused."""
    start_node(1, ["--dcs", "3", "--dc-name", "WEB"])
    for dcid, name in ((0, "WEB"), (1, "WEB1"), (2, "WEB2")):
        info = apps.run("dvsctl", "dcinfo", dcid)
        assert info.returncode == 0 and f"dc_name={name}\n" in info.stdout, info.stderr
    r = apps.run("dvsctl", "node", "run", 2, "--dcs", "2", "--dc-name", "X" * 15, timeout=15)
    assert r.returncode != 0 and "longer than 15 characters" in r.stderr, r.stdout + r.stderr


def test_dvsctl_errors(start_node, apps):
    start_node(1)

    def fails(*args, name: str, code: int, node: int | None = 1):
        r = apps.run("dvsctl", *args, node=node)
        assert r.returncode == 1, (args, r.stdout, r.stderr)
        assert r.stderr.startswith(f"dvsctl: {name} ({code}): "), (args, r.stderr)

    # node 2 has no proxy and is not in DC0: the emulator checks the DC membership first
    fails("rmtbind", 0, 60, 2, "far", name="EDVSNODCNODE", code=-319)
    fails("rmtbind", 0, 60, 1, name="EDVSBADNODEID", code=-301)        # the local node
    fails("add-node", 0, 2, name="EDVSNODEFREE", code=-325)             # no proxies for it
    fails("unbind", 0, 77, name="EDVSNOTBIND", code=-310)
    fails("procs", 5, name="EDVSDCNOTRUN", code=-303)
    fails("dc-init", "-d", 0, name="EDVSRSCBUSY", code=-342)            # DC0 runs
    fails("init", 1, name="EDVSDVSBUSY", code=-317)                     # the node kernel did
    # an endpoint in use
    server = apps.spawn("latency", "server", 0, 10)
    apps.wait_bound(0, 10, proc=server)
    fails("bind", 0, 10, "--no-hold", name="EDVSSLOTUSED", code=-337)
    apps.stop(server)
    # no node kernel there
    r = apps.run("dvsctl", "--node", 9, "info", node=None)
    assert r.returncode == 1 and r.stderr.startswith("dvsctl: no DVK node kernel at")
    r = apps.run("dvsctl", "node", "stop", 9, node=None)
    assert r.returncode == 1 and "no node kernel answers" in r.stderr


def test_dvsctl_node_start_stop(apps):
    pids = []
    try:
        r = apps.run("dvsctl", "node", "start", 2, node=None, timeout=30)
        assert r.returncode == 0, r.stderr
        pids.append(int(r.stdout.strip()))
        r = apps.run("dvsctl", "node", "start", 3, "--name", "TESTDVS", "--dc-nr-procs", 100,
                     "--dc-name", "DCX", node=None, timeout=30)
        assert r.returncode == 0, r.stderr
        pids.append(int(r.stdout.strip()))
        # a second kernel for node 2 is refused
        again = apps.run("dvsctl", "node", "start", 2, node=None, timeout=30)
        assert again.returncode == 1 and again.stderr.startswith("dvsctl: node 2:")

        listing = apps.run("dvsctl", "node", "list", node=None).stdout
        assert f"   2 {pids[0]:>7}" in listing and f"   3 {pids[1]:>7}" in listing
        assert "nodeid=2\n" in apps.run("dvsctl", "--node", 2, "info", node=None).stdout
        info3 = apps.run("dvsctl", "info", node=3).stdout
        assert "nodeid=3\n" in info3 and "name=TESTDVS\n" in info3
        dc3 = apps.run("dvsctl", "dcinfo", node=3).stdout
        assert "nr_procs=100\n" in dc3 and "dc_name=DCX\n" in dc3
        # two kernels run: a program must say which one
        amb = apps.run("dvsctl", "info", node=None)
        assert amb.returncode == 1 and "choose one with DVK_NODE" in amb.stderr

        for nodeid, pid in zip((2, 3), pids):
            r = apps.run("dvsctl", "node", "stop", nodeid, node=None, timeout=30)
            assert r.returncode == 0 and f"node {nodeid} stopped (pid {pid})" in r.stdout
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(pid) for pid in pids)
        assert not [f for f in os.listdir(apps.rundir) if f.endswith(".sock")]
    finally:
        for pid in pids:
            if _alive(pid):
                os.kill(pid, 9)


def test_dvsctl_node_start_with_several_dcs(apps):
    pids = []
    try:
        r = apps.run("dvsctl", "node", "start", 4, "--dcs", 3, "--dc-nr-procs", 100,
                     node=None, timeout=30)
        assert r.returncode == 0, r.stderr
        pids.append(int(r.stdout.strip()))
        for dcid in range(3):
            dc = apps.run("dvsctl", "dcinfo", dcid, node=4)
            assert dc.returncode == 0, dc.stderr
            assert dc.stdout.startswith(f"dcid={dcid}\n") and f"dc_name=DC{dcid}\n" in dc.stdout
            assert "nr_procs=100\n" in dc.stdout
        missing = apps.run("dvsctl", "dcinfo", 3, node=4)
        assert missing.returncode != 0 or not missing.stdout.startswith("dcid=3\n")
        bad = apps.run("dvsctl", "node", "run", 5, "--dcs", 99, node=None, timeout=30)
        assert bad.returncode == 1 and "--dcs 99" in bad.stderr
        r = apps.run("dvsctl", "node", "stop", 4, node=None, timeout=30)
        assert r.returncode == 0
    finally:
        for pid in pids:
            if _alive(pid):
                os.kill(pid, 9)


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
