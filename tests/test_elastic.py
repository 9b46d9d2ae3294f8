"""Elastic servers: failure detection, VM start/stop by command, service programs on demand."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from cluster_helpers import Background, cluster_from, wait_bound, wait_for
from dsp_proxy import elastic
from dsp_proxy.cluster import module_argv
from dsp_proxy.elastic import MAX_STARTING, ServiceRunner
from dsp_proxy.group import MT_SVC_START, MT_SVC_STOP, control_message
from dvk_cffi import consts as C
from dvk_cffi import errors as E
from dvk_cffi.wire import Message

HERE = Path(__file__).resolve().parent / "elastic"

BASE = """
lb node0 {{ nodeid 0; period 1; lowwater 40; highwater 85; {lb} }};
server node1 {{ nodeid 1; rname {{net}}.1; }};
server node2 {{ nodeid 2; rname {{net}}.2; {node2} }};
client node3 {{ nodeid 3; rname {{net}}.3; }};
{service}
"""
LATENCY = "service latency { dcid 0; ext_ep 10; min_ep 10; max_ep 19; bind external; };"


def config(lb="", node2="", service=LATENCY):
    return BASE.format(lb=lb, node2=node2, service=service) \
        .replace("{{", "{").replace("}}", "}")


def servers_of(cl, node):
    return ((cl.status(node) or {}).get("group") or {}).get("servers", {})


def session_server(cl, node, client):
    for s in ((cl.status(node) or {}).get("group") or {}).get("sessions", []):
        if s["client"] == client:
            return int(s["server"].split("@")[1])
    return None


@pytest.mark.parametrize("how", ["kill", "freeze"])
def test_failed_server_detected_sessions_fail_over(tmp_path, bg, how):
    with cluster_from(config(), tmp_path) as cl:
        b = Background(cl, tmp_path)
        bg.append(b)
        servers = {n: b.start(n, "dvs_apps.latency", "server", 0, 10) for n in (1, 2)}
        for n in (1, 2):
            wait_bound(cl, n, 0, 10)
        wait_for(lambda: [v.get("live") for v in servers_of(cl, 3).values()] == [True, True],
                 15, "both servers live")
        # a client blocked in a 4-second request when its server fails
        slow = cl.popen(3, module_argv("dvs_apps.latency", "client", 0, 50, 10, 1, 0, 4),
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            victim = wait_for(lambda: session_server(cl, 3, "50@3"), 10, "the session")
        except AssertionError:
            slow.kill()
            raise AssertionError(f"no session; client said: {slow.communicate()[0]}; "
                                 f"status {cl.status(3)}") from None
        other = 3 - victim
        time.sleep(0.5)
        dsp = cl.dsps[victim]
        t0 = time.monotonic()
        if how == "kill":
            cl.kill_dsp(victim, signal.SIGKILL)
        else:
            dsp.send_signal(signal.SIGSTOP)  # frozen: TCP stays open, nothing is received
        try:
            out, _ = slow.communicate(timeout=20)
            detected = time.monotonic() - t0
            assert "EDVSNOTCONN" in out, out
            assert detected < 3.0, f"failure noticed after {detected:.2f} s"
            assert not servers_of(cl, 3)[str(victim)]["live"] or wait_for(
                lambda: not servers_of(cl, 3)[str(victim)]["live"], 3, "server DOWN")
            # new sessions go to the other server
            res = cl.run(3, module_argv("dvs_apps.latency", "client", 0, 51, 10, 5, 0, 0))
            assert res.returncode == 0, res.stdout + res.stderr
            wait_for(lambda: servers_of(cl, 3)[str(other)]["commands"] > 0, 5,
                     "the other server used")
        finally:
            if how == "freeze":
                dsp.send_signal(signal.SIGCONT)
        if how == "kill":
            cl.start_dsp(victim)
        wait_for(lambda: servers_of(cl, 3).get(str(victim), {}).get("live"), 20,
                 "the server UP again")
        # latency_server, like the C one, exits when its reply cannot be sent: restart it.
        # A frozen node's server is still in its 4-second request when the node comes back,
        # and exits once its reply fails: wait for that (bounded) rather than look once.
        try:
            servers[victim].wait(10)
        except subprocess.TimeoutExpired:
            pass                    # it could answer after all: it still serves
        if servers[victim].poll() is not None:
            b.start(victim, "dvs_apps.latency", "server", 0, 10)
            wait_bound(cl, victim, 0, 10)
        # new sessions reach the recovered server again: the choice is by load level first
        # and a server that was frozen or restarted is busy for a moment, so pairs of clients
        # are started until one of them lands there (each pair must succeed)
        before = servers_of(cl, 3)[str(victim)]["commands"]
        deadline = time.monotonic() + 20
        while servers_of(cl, 3)[str(victim)]["commands"] <= before:
            assert time.monotonic() < deadline, "the recovered server not used again in 20 s"
            procs = [cl.popen(3, module_argv("dvs_apps.latency", "client", 0, ep, 10, 10, 0,
                                             0), stdout=subprocess.PIPE, text=True)
                     for ep in (52, 53)]
            for p in procs:
                out, _ = p.communicate(timeout=60)
                assert p.returncode == 0, out
            time.sleep(1.0)       # the status file is rewritten every half second


BURNER = ("import time\n"
          "from dvk_cffi import open_dvk\n"
          "d = open_dvk('emu'); d.getdvsinfo()\n"
          "end = time.time() + 60\n"
          "while time.time() < end:\n"
          "    pass\n")


def _image(tmp_path, cl) -> Path:
    image = tmp_path / "node2.image"
    image.write_text(f'PYTHON="{sys.executable}"\nPYTHONPATH="{cl.env(1)["PYTHONPATH"]}"\n'
                     f'RUNDIR="{cl.rundir}"\nCONFIG="{cl.config_path}"\n'
                     f'LOGDIR="{tmp_path / "logs"}"\nVMLOG="{tmp_path / "vm.log"}"\n')
    return image


def test_second_server_started_when_saturated_and_stopped_when_idle(tmp_path, bg):
    image = tmp_path / "node2.image"
    lb = (f'start 20; stop 3; min_servers 1; max_servers 2; vm_start "{HERE}/start_vm.sh"; '
          f'vm_stop "{HERE}/stop_vm.sh"; vm_status "{HERE}/status_vm.sh";')
    cfg = config(lb=lb, node2=f'node_image "{image}";')
    vmlog = tmp_path / "vm.log"
    with cluster_from(cfg, tmp_path, only=[1, 3]) as cl:
        _image(tmp_path, cl)
        b = Background(cl, tmp_path)
        bg.append(b)
        try:
            b.start(1, "dvs_apps.latency", "server", 0, 10)
            wait_bound(cl, 1, 0, 10)
            time.sleep(3)
            assert not vmlog.exists(), "a server was started without need"
            burner = subprocess.Popen([sys.executable, "-c", BURNER], env=cl.env(1),
                                      stdin=subprocess.DEVNULL)
            try:
                wait_for(lambda: vmlog.exists() and "start node2 2" in vmlog.read_text(), 20,
                         "vm_start of node 2")
                wait_for(lambda: servers_of(cl, 3).get("2", {}).get("live"), 20,
                         "node 2 up, linked and reporting")
                res = cl.run(3, module_argv("dvs_apps.latency", "client", 0, 50, 10, 5, 0, 0))
                assert res.returncode == 0, res.stdout + res.stderr
                time.sleep(2)
                assert vmlog.read_text().count("start") == 1  # never more than max_servers
            finally:
                burner.kill()
                burner.wait()
            try:
                wait_for(lambda: "stop node2 2" in vmlog.read_text(), 30, "vm_stop of node 2")
            except AssertionError:
                st = cl.status(1)
                raise AssertionError(f"no vm_stop: {st.get('autoscaler')} "
                                     f"{st.get('group', {}).get('servers')}") from None
            assert vmlog.read_text().count("start") == 1
            time.sleep(2)
            assert "stop node1" not in vmlog.read_text()  # never fewer than min_servers
        finally:
            subprocess.run([str(HERE / "stop_vm.sh"), str(image), "node2", "2"],
                           env=cl.env(1), timeout=30)


@pytest.mark.parametrize("prog", ["run_latency.sh", "run_latency_bg.sh"])
def test_prog_service_started_per_session_and_stopped_after(tmp_path, bg, monkeypatch, prog):
    """run_latency_bg.sh is the C project's style (the server started in the background,
    the script exits once it is bound): stopping the script, gone by then, left the server
    running and its endpoint bound after every session, until the range ran out (and the
    servers outlived the DSP).  A program is its process group."""
    monkeypatch.setenv("DSP_TEST_PYTHON", sys.executable)
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # where the DSP puts the programs' output
    svc = (f'service latency {{ dcid 0; ext_ep 10; min_ep 10; max_ep 19; bind replica; '
           f'prog "{HERE}/{prog}"; }};')
    cfg = BASE.format(lb="", node2="", service=svc).replace("{{", "{").replace("}}", "}")
    with cluster_from(cfg.replace("period 1;", "period 1; session_timeout 30;"),
                      tmp_path) as cl:
        res = cl.run(3, module_argv("dvs_apps.latency", "client", 0, 50, 10, 20, 0, 0))
        assert res.returncode == 0, res.stdout + res.stderr
        assert res.stdout.count("Time total elapsed") == 20
        # the program ran on an endpoint of min_ep..max_ep of one server
        def messages(n):
            return servers_of(cl, 3).get(str(n), {}).get("commands", 0)
        wait_for(lambda: messages(1) or messages(2), 5, "a server used")
        used = [n for n in (1, 2) if messages(n) > 0]
        assert len(used) == 1
        node = used[0]
        # and is stopped once the session ended (the client process is gone)
        wait_for(lambda: all(cl.dvk(node).getprocinfo(0, ep).p_rts_flags & 0x1
                             for ep in range(10, 20)), 15, "the program's endpoint unbound")
        def mine():
            ps = subprocess.run(["pgrep", "-f", "run_latency|latency server 0 1[0-9]"],
                                capture_output=True, text=True)
            return [pid for pid in ps.stdout.split() if _env_has(pid, cl.rundir)]
        # the program's wrapper script may take a moment to exit after the program itself
        try:
            wait_for(lambda: not mine(), 5, "the service programs gone")
        except AssertionError:
            raise AssertionError(f"service programs still running: {mine()}") from None


RELAYED_PROG = """
lb node0 {{ nodeid 0; period 1; cltname lbhost; lb_eps 100 109; }};
server node1 {{ nodeid 1; rname {{net}}.1; }};
server node2 {{ nodeid 2; rname {{net}}.2; }};
client node3 {{ nodeid 3; rname {{net}}.3; }};
client node4 {{ nodeid 4; rname {{net}}.4; }};
client lbhost {{ nodeid 5; rname {{net}}.5; }};
service latency {{ dcid 0; ext_ep 10; min_ep 10; max_ep 10; bind replica; prog "{prog}"; }};
"""


def test_a_relayed_client_node_over_its_share_of_programs_gives_one_back(tmp_path, bg,
                                                                         monkeypatch):
    """A `prog` service of one endpoint per server, two servers: node 3's two clients (their
    relayed sessions idle, ending only by timeout) hold both programs, and node 4's client
    got EDVSAGAIN from the server (no free endpoint) until they timed out.  Node 4 is under
    its share (one of two): the LB host stops the program of node 3's least recently used
    session, then asks for node 4's on that server, which waits for the endpoint to be
    free; node 4's client is served."""
    monkeypatch.setenv("DSP_TEST_PYTHON", sys.executable)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    cfg = RELAYED_PROG.format(prog=HERE / "run_latency.sh").replace("{{", "{") \
        .replace("}}", "}")
    with cluster_from(cfg, tmp_path) as cl:
        def latency_client(node, ep):
            res = cl.run(node, module_argv("dvs_apps.latency", "client", 0, ep, 10, 3, 0, 0),
                         timeout=60)
            assert res.returncode == 0 and res.stdout.count("Time total elapsed") == 3, \
                f"client {ep}@{node}: {res.stdout}{res.stderr}"

        def sessions():
            st = cl.status(5) or {}
            return sorted(s["client"] for s in (st.get("group") or {}).get("sessions", []))
        wait_for(lambda: all(s.get("live") for s in servers_of(cl, 5).values())
                 and len(servers_of(cl, 5)) == 2, 20, "both servers live")
        for ep in (50, 51):
            latency_client(3, ep)
        wait_for(lambda: sessions() == ["50@3", "51@3"], 10, "node 3's two sessions")
        latency_client(4, 60)
        wait_for(lambda: sessions() == ["51@3", "60@4"], 10, "one session taken back")
        assert (cl.status(5) or {})["group"]["sessions_taken_back"] == 1


def _env_has(pid: str, text: str) -> bool:
    try:
        return text.encode() in Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _running_cmd(pid: int, word: str) -> bool:
    try:
        return word.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def test_a_vm_command_running_when_the_dsp_stops_is_ended(tmp_path):
    """A VM command (a slow hypervisor's vm_start) still running when the deciding DSP got
    SIGTERM was left behind: the thread that enforced its 30 s timeout died with the daemon.
    The DSP's stop ends it (its process group), logs it, and still exits 0."""
    started = tmp_path / "vm_start.pid"
    slow = tmp_path / "slow_vm_start.sh"
    slow.write_text(f"#!/bin/sh\necho $$ > {started}\nexec sleep 60\n")
    slow.chmod(0o755)
    lb = (f'start 30; min_servers 2; max_servers 2; vm_start "{slow}"; vm_stop "/bin/true"; '
          'vm_status "/bin/false";')
    cfg = config(lb=lb, node2=f'node_image "{tmp_path / "node2.image"}";')
    pid = None
    try:
        with cluster_from(cfg, tmp_path, only=[1, 3]) as cl:
            wait_for(lambda: started.exists() and started.read_text().strip(), 30,
                     "vm_start of node 2 running")
            pid = int(started.read_text())
            assert _running_cmd(pid, "sleep")
            cl.dsps[1].send_signal(signal.SIGTERM)
            assert cl.dsps[1].wait(30) == 0
            wait_for(lambda: not _running_cmd(pid, "sleep"), 10, "the VM command ended")
            log = Path(cl.log_path("dsp1")).read_text(errors="replace")
            assert "ending the VM command still running" in log, log[-2000:]
    finally:
        if pid is not None and _running_cmd(pid, "sleep"):
            os.kill(pid, signal.SIGKILL)


def test_vm_command_timeout_and_failure_are_logged(tmp_path):
    from dsp_proxy.config import parse_text
    from dsp_proxy.elastic import CommandRunner
    cfg = parse_text('lb l { nodeid 0; vm_start "x"; vm_stop "x"; vm_status "x"; }; '
                     'server s { nodeid 1; node_image "img"; };')
    runner = CommandRunner(cfg.lb, timeout=1)
    res = runner.run("sleep", ["5"])
    assert res.status == -1 and res.output == "timeout"
    res = runner.run(str(HERE / "status_vm.sh"), [str(tmp_path / "none"), "s", "1"])
    assert res.status != 0
    assert os.path.exists(HERE / "status_vm.sh")


def test_a_vm_command_that_leaves_its_vm_in_the_background_succeeds_when_it_exits(tmp_path):
    """A vm_start that starts the VM in the background (`hypervisor ... &`, output not
    redirected) and exits 0: the command was only over when every process holding its output
    pipe had closed it, so it ran into its timeout, counted as a failed start while the VM
    ran.  It succeeds as soon as it exits, with its output, and the VM keeps running."""
    from dsp_proxy.config import parse_text
    from dsp_proxy.elastic import CommandRunner
    cfg = parse_text('lb l { nodeid 0; vm_start "x"; vm_stop "x"; vm_status "x"; }; '
                     'server s { nodeid 1; node_image "img"; };')
    script, pidfile = tmp_path / "start_in_background.sh", tmp_path / "vm.pid"
    script.write_text(f'#!/bin/sh\nsleep 60 &\necho $! > {pidfile}\necho "vm $2 started"\n')
    script.chmod(0o755)
    try:
        began = time.monotonic()
        res = CommandRunner(cfg.lb, timeout=20).run(str(script), ["img", "s", 1])
        took = time.monotonic() - began
        assert (res.status, res.output) == (0, "vm s started\n"), res
        assert took < 15, f"the command was over only after {took:.1f} s"
        time.sleep(0.5)     # the background shell has exec'd sleep by now (or was ended)
        assert _running_cmd(int(pidfile.read_text()), "sleep"), "the VM was ended"
    finally:
        if pidfile.exists() and pidfile.read_text().strip():
            try:
                os.kill(int(pidfile.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_vm_command_output_that_is_not_utf8_is_a_result_not_an_exception(caplog):
    """A VM command (the operator's script) that prints bytes that are not UTF-8, and fails:
    its status and output come back (undecodable bytes replaced) and the failure is logged;
    the strict decode raised UnicodeDecodeError on the autoscaler's worker thread, which died
    with its result unrecorded."""
    from dsp_proxy.config import parse_text
    from dsp_proxy.elastic import CommandRunner
    cfg = parse_text('lb l { nodeid 0; vm_start "x"; vm_stop "x"; vm_status "x"; }; '
                     'server s { nodeid 1; node_image "img"; };')
    runner = CommandRunner(cfg.lb, timeout=10)
    with caplog.at_level("WARNING", logger="dsp.elastic"):
        res = runner.run("sh -c", ["printf 'caf\\351 \\377\\n'; printf '\\377' >&2; exit 3"])
    assert res.status == 3 and res.output.startswith("caf\ufffd \ufffd"), res
    assert any("status 3" in r.getMessage() for r in caplog.records), caplog.text
    res = runner.run("sh -c", ["printf 'up \\377'"])
    assert res.status == 0 and res.output == "up \ufffd"


def test_what_a_failed_vm_command_printed_is_one_escaped_line_in_the_log_and_figures(caplog):
    """A failed VM command's output went into its log line as printed: its newlines made
    lines of their own (one could read as the daemon's, e.g. a reload verdict the init script
    waits for) and its escape sequences reached the operator's terminal.  It is one line,
    control characters escaped, and the figures carry it as the failure's reason."""
    from dsp_proxy.config import parse_text
    from dsp_proxy.elastic import CommandRunner
    cfg = parse_text('lb l { nodeid 0; vm_start "x"; vm_stop "x"; vm_status "x"; }; '
                     'server s { nodeid 1; node_image "img"; };')
    fake = "2026-12-01 00:00:00,000 INFO node1 MainThread: reload of /etc/dvs/x.cfg done"
    printed = f"virsh: error\\n{fake}\\n\\033[2Jdomain not found"
    with caplog.at_level("WARNING", logger="dsp.elastic"):
        res = CommandRunner(cfg.lb, timeout=10).run("sh -c", [f"printf '{printed}' >&2; exit 4"])
    assert res.status == 4
    assert res.reason == f"virsh: error\\n{fake}\\n\\x1b[2Jdomain not found", res.reason
    messages = [r.getMessage() for r in caplog.records if "status 4" in r.getMessage()]
    assert len(messages) == 1 and res.reason in messages[0], messages
    assert not any(c in messages[0] for c in "\n\r\x1b"), messages


def test_commands_that_cannot_be_split_fail_as_results_and_the_config_warns():
    """A prog or VM command with unbalanced quotes: the config check warns of it; running it
    fails as a result (EDVSNOEXEC for the session's start, status -1 for a VM command),
    logged, and leaves no service endpoint reserved.  shlex's ValueError killed the
    svc-start thread (the session waited START_PATIENCE for an answer that never came, the
    endpoint stayed reserved) and the autoscaler's worker thread."""
    from types import SimpleNamespace

    from dsp_proxy.config import parse_text
    from dsp_proxy.elastic import CommandRunner, ServiceRunner
    from dvk_cffi import errors as E
    cfg = parse_text("lb l { nodeid 0; vm_start \"start 'x\"; vm_stop \"x\"; "
                     "vm_status \"y\"; }; server s { nodeid 1; node_image \"img\"; }; "
                     "service svc { ext_ep 30; min_ep 30; max_ep 31; bind local; "
                     "prog \"/bin/run 'x\"; };")
    warned = [w.message for w in cfg.warnings]
    assert any(m.startswith("vm_start cannot be split") for m in warned), warned
    assert any(m.startswith("prog cannot be split") for m in warned), warned

    class NoKernel:
        def getprocinfo(self, dcid, ep):
            raise E.DvkError.for_code(E.EDVSNOTBIND)

    host = SimpleNamespace(cfg=cfg, local=1, dvk=NoKernel())
    runner = ServiceRunner(host)
    assert runner.start(0, 30, 50, 3) == E.EDVSNOEXEC
    assert not runner.reserved and not runner.procs
    res = CommandRunner(cfg.lb, timeout=5).run(cfg.lb.vm_start, ["img", "s", 1])
    assert res.status == -1


def test_only_the_dsp_that_started_a_program_can_stop_it():
    """MT_SVC_STOP from another peer than the one whose MT_SVC_START started the program is
    ignored (logged): any announced peer could stop the programs serving other DSPs'
    sessions on a server, one control frame each."""
    with _Programs("/bin/sh -c 'sleep 30'") as p:
        ep = p.start(3)
        assert ep == 30
        proc = p.runner.procs[(0, ep)]
        p.runner.handle(2, p.message(MT_SVC_STOP, m1_i1=0, m1_i2=ep, m1_p1=30, m_source=2))
        assert (0, ep) in p.runner.procs and proc.poll() is None
        p.runner.handle(3, p.message(MT_SVC_STOP, m1_i1=0, m1_i2=ep, m1_p1=30, m_source=3))
        assert (0, ep) not in p.runner.procs
        wait_for(lambda: proc.poll() is not None, 10, "the program stopped")


def test_only_a_server_runs_programs_and_never_for_a_relayed_client_node():
    """MT_SVC_START was obeyed from any announced peer on any node: a relayed client node
    (or a process speaking from its address) had the LB host, a client node, run the
    service's program on endpoints of its range, up to the whole range, and nothing stopped
    them while its link stayed up (any client node could do the same to another).  A node
    that is not a server refuses every start with EDVSPERM, a server refuses a relayed client
    node's (it has no LB of its own), and no program runs; the LB host's starts still run."""
    lb = "cltname h; lb_eps 100 101;"
    nodes = "client h { nodeid 5; rname 127.0.0.5; }; client c { nodeid 3; rname 127.0.0.3; };"
    for local, peer in ((5, 3), (1, 3)):     # on the LB host, on a server: node 3 asks
        with _Programs("/bin/sh -c 'sleep 30'", lb=lb, nodes=nodes, local=local) as p:
            assert p.start(peer) == E.EDVSPERM, (local, peer)
            assert not p.runner.procs and not p.runner.reserved and not p.since
    with _Programs("/bin/sh -c 'sleep 30'", lb=lb, nodes=nodes) as p:
        assert p.start(5) == 30                          # the LB host's start, on a server


def test_a_start_right_after_a_stop_waits_for_the_stopped_programs_endpoint():
    """The LB takes a session back to give its program's endpoint to another client's: it
    asks to stop the program, then for a start.  The start came while the stopped program
    still held the endpoint (it exits within the stop's grace period) and was answered
    EDVSAGAIN; it now waits for the endpoint and gets it."""
    slow_exit = (f"{sys.executable} -c 'import signal, sys, time; signal.signal(15, lambda *a:"
                 f" (time.sleep(0.5), sys.exit(0))); time.sleep(30)'")
    with _Programs(slow_exit, max_ep=30) as p:
        assert p.start(3) == 30
        proc = p.runner.procs[(0, 30)]
        p.runner.handle(3, p.message(MT_SVC_STOP, m1_i1=0, m1_i2=30, m1_p1=30, m_source=3))
        assert p.start(3) == 30
        assert proc.poll() is not None and p.runner.procs[(0, 30)] is not proc


def test_a_gone_peers_programs_are_stopped_and_an_ended_program_frees_its_endpoint():
    """Nobody asks to stop a program whose client DSP went away, or one that ended by
    itself: both kept their endpoint for good, and a service of a few endpoints ran out of
    them.  The programs of a peer whose link went down are stopped; an ended program's
    endpoint is taken again."""
    with _Programs("/bin/sh -c 'sleep 30'") as p:
        assert p.start(3) == 30 and p.start(4) == 31
        assert p.start(4) == E.EDVSAGAIN                  # the range (30-31) is taken
        mine, theirs = p.runner.procs[(0, 30)], p.runner.procs[(0, 31)]
        p.runner.peer_gone(4)
        wait_for(lambda: (0, 31) not in p.runner.procs and theirs.poll() is not None, 10,
                 "node 4's program stopped")
        assert mine.poll() is None                         # node 3's program runs on
        os.killpg(mine.pid, signal.SIGKILL)                # ends, with all it started
        mine.wait()
        wait_for(lambda: not _group_alive(mine.pid), 10, "node 3's program ended")
        assert sorted([p.start(5), p.start(5)]) == [30, 31]


def test_a_program_whose_peer_went_away_while_it_started_is_stopped():
    """The link to the asking DSP went down while its program was starting (up to 5 s for
    the bind): the program serves nobody and is stopped once it is up."""
    with _Programs("/bin/sh -c 'sleep 30'") as p:
        p.bind_after = 1.0
        p.runner.handle(3, p.message(MT_SVC_START, m1_i1=0, m1_i2=50, m1_i3=3, m1_p1=30,
                                     m1_p2=1, m_source=3))
        wait_for(lambda: (0, 30) in p.runner.procs, 10, "the program running")
        proc = p.runner.procs[(0, 30)]
        p.runner.peer_gone(3)
        wait_for(lambda: p.replies, 10, "the start's answer")   # (an error, or 30 stopped)
        wait_for(lambda: proc.poll() is not None, 10, "the program stopped")
        assert not p.runner.procs and not p.runner.owners and not p.runner.reserved


def test_a_program_asked_for_just_before_its_peer_went_away_is_stopped_once_up():
    """The peer's link went down before its start had run the program: once the program is
    bound, it is stopped (nobody would ever ask)."""
    with _Programs("/bin/sh -c 'sleep 30'") as p:
        p.bind_after = 0.5
        p.runner.handle(3, p.message(MT_SVC_START, m1_i1=0, m1_i2=50, m1_i3=3, m1_p1=30,
                                     m1_p2=1, m_source=3))
        p.runner.peer_gone(3)
        wait_for(lambda: p.replies, 10, "the start's answer")
        assert not p.runner.procs and not p.runner.owners
        for pid in p.since:                              # every program that ran has ended
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)


def test_start_requests_beyond_the_running_starts_are_answered_at_once():
    """Each start runs on a thread of its own while the program binds (up to 5 s): a flood
    of start requests was a thread each.  Beyond MAX_STARTING starts at once the request is
    answered EDVSAGAIN without a thread."""
    with _Programs("/bin/sh -c 'sleep 30'", max_ep=30 + 2 * MAX_STARTING) as p:
        p.bind_after = 1.0                                 # the programs bind late
        threads = threading.active_count()
        for i in range(MAX_STARTING + 3):
            p.runner.handle(3, p.message(MT_SVC_START, m1_i1=0, m1_i2=50 + i, m1_i3=3,
                                         m1_p1=30, m1_p2=i, m_source=3))
        assert threading.active_count() <= threads + MAX_STARTING
        wait_for(lambda: len(p.replies) == MAX_STARTING + 3, 20, "every start answered")
        results = [p.answer(body) for _node, body in p.replies]
        assert results.count(E.EDVSAGAIN) == 3
        assert sorted(r for r in results if r >= 0) == list(range(30, 30 + MAX_STARTING))
        assert p.runner.starting == 0


def test_no_program_is_started_once_the_runner_stopped():
    """The daemon's shutdown stops the programs before the links: a start request that came
    in after that ran a program that nothing stopped (it runs in a session of its own and
    outlived the DSP).  It is refused with EDVSSHUTDOWN and no program runs."""
    with _Programs("/bin/sh -c 'sleep 30'") as p:
        p.runner.stop_all()
        assert p.start(3) == E.EDVSSHUTDOWN
        assert not p.runner.procs and not p.runner.reserved
        assert not os.listdir(p.outdir)                  # no program was ever run


def test_stopping_waits_for_a_start_under_way_without_a_bind_warning(caplog):
    """A program still waiting for its bind when the daemon stops is stopped with the rest;
    its start thread is waited for, answers EDVSSHUTDOWN, and does not log that the program
    failed to bind."""
    with _Programs("/bin/sh -c 'sleep 30'") as p:
        p.bind_after = 30.0                              # it never binds in this test
        p.runner.handle(3, p.message(MT_SVC_START, m1_i1=0, m1_i2=50, m1_i3=3, m1_p1=30,
                                     m1_p2=1, m_source=3))
        wait_for(lambda: (0, 30) in p.runner.procs, 10, "the program running")
        proc = p.runner.procs[(0, 30)]
        with caplog.at_level("INFO", logger="dsp.elastic"):
            p.runner.stop_all()
            assert p.runner.starting == 0 and not p.runner.start_threads
        assert proc.poll() is not None
        assert [p.answer(body) for _node, body in p.replies] == [E.EDVSSHUTDOWN]
        assert "did not bind" not in caplog.text


def test_programs_being_stopped_for_a_gone_peer_are_stopped_by_the_runners_stop():
    """A gone peer's programs are stopped on a daemon thread (SIGTERM, SIGKILL 2 s later):
    when the daemon stopped meanwhile, that thread died with it and a program that ignores
    SIGTERM ran on.  The runner's stop sees the programs being stopped and ends them too."""
    with _Programs(str(HERE / "stubborn.sh")) as p:
        assert p.start(3) == 30
        proc = p.runner.procs[(0, 30)]
        wait_for(lambda: _ignores_sigterm(proc.pid), 10, "the program ignores SIGTERM")
        p.runner.peer_gone(3)
        assert (0, 30) not in p.runner.procs
        p.runner.stop_all()
        assert proc.poll() == -signal.SIGKILL


def test_a_program_run_while_the_runner_stops_is_stopped_at_once(monkeypatch):
    """The stop came while a start thread was running the program (Popen not yet returned):
    the program it gets is stopped at once instead of being kept and left running."""
    import dsp_proxy.elastic as elastic
    real_popen = subprocess.Popen
    ran: list[subprocess.Popen] = []
    with _Programs("/bin/sh -c 'sleep 30'") as p:
        stopper = threading.Thread(target=p.runner.stop_all, name="test-stop-all")

        def popen(*args, **kwargs):
            proc = real_popen(*args, **kwargs)
            ran.append(proc)
            stopper.start()                              # the stop comes in meanwhile
            wait_for(lambda: p.runner.closed, 10, "the runner closed")
            return proc

        monkeypatch.setattr(elastic.subprocess, "Popen", popen)
        try:
            p.runner.handle(3, p.message(MT_SVC_START, m1_i1=0, m1_i2=50, m1_i3=3,
                                         m1_p1=30, m1_p2=1, m_source=3))
            wait_for(lambda: p.replies, 10, "the start's answer")
        finally:
            if stopper.ident is not None:
                stopper.join(20)
            monkeypatch.undo()
            for proc in ran:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    pytest.fail("the program run during the stop was left running")
        assert [p.answer(body) for _node, body in p.replies] == [E.EDVSSHUTDOWN]
        assert len(ran) == 1 and not p.runner.procs and not p.runner.reserved


def _ignores_sigterm(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = next(line.split()[1] for line in status.splitlines() if line.startswith("SigIgn:"))
    return bool(int(mask, 16) & (1 << (signal.SIGTERM - 1)))


def test_programs_that_ignore_sigterm_are_stopped_within_one_grace_period():
    """The programs were stopped one by one, each given 2 s after SIGTERM: 8 programs that
    ignore it took 16 s, past the init script's 10 s stop timeout (whose SIGKILL of the
    daemon then left every program running).  All are signalled first and share one grace
    period, then the ones left are killed."""
    with _Programs(str(HERE / "stubborn.sh"), max_ep=37) as p:
        assert [p.start(3) for _ in range(8)] == list(range(30, 38))
        procs = list(p.runner.procs.values())
        wait_for(lambda: all(_ignores_sigterm(proc.pid) for proc in procs), 10,
                 "the programs ignore SIGTERM")
        t0 = time.monotonic()
        p.runner.stop_all()
        took = time.monotonic() - t0
        assert all(proc.poll() == -signal.SIGKILL for proc in procs)
        assert took < 10.0, f"stopping 8 programs took {took:.1f} s"


class _Programs:
    """A ServiceRunner of server node 1 for a `prog` service on endpoints 30..max_ep, with a
    stand-in kernel in which a program's endpoint is bound once its process has run for
    `bind_after` seconds, and the start answers collected."""

    def __init__(self, prog: str, max_ep: int = 31, lb: str = "", nodes: str = "",
                 local: int = 1) -> None:
        from types import SimpleNamespace

        from dsp_proxy.config import parse_text
        self.max_ep = max_ep
        cfg = parse_text(f"lb l {{ nodeid 0; {lb} }}; server s {{ nodeid 1; rname 127.0.0.1; "
                         f"}}; {nodes} service svc {{ ext_ep 30; min_ep 30; max_ep {max_ep}; "
                         f"bind local; prog \"{prog}\"; }};")
        self.replies: list = []
        self.bind_after = 0.0
        self.since: dict[int, float] = {}
        programs = self

        self.ran: dict[tuple[int, int], subprocess.Popen] = {}

        class Kernel:
            def getprocinfo(self, dcid, ep):
                proc = programs.runner.procs.get((dcid, ep))
                if proc is not None:
                    programs.ran[(dcid, ep)] = proc
                else:       # one being stopped holds its endpoint until its group ended
                    proc = programs.ran.get((dcid, ep))
                    if proc is not None and proc.poll() is not None and \
                            _group_alive(proc.pid):
                        return SimpleNamespace(p_rts_flags=0)
                if proc is None or proc.poll() is not None:
                    raise E.DvkError.for_code(E.EDVSNOTBIND)
                first = programs.since.setdefault(proc.pid, time.monotonic())
                if time.monotonic() - first < programs.bind_after:
                    raise E.DvkError.for_code(E.EDVSNOTBIND)
                return SimpleNamespace(p_rts_flags=0)

        host = SimpleNamespace(cfg=cfg, local=local, dvk=Kernel(),
                               send_control=lambda node, body: self.replies.append((node, body)))
        self.runner = ServiceRunner(host)
        # the programs' output files ($TMPDIR/svc_1_<ep>.out) in a directory of this test's
        self.outdir = tempfile.mkdtemp(prefix="svc-out")
        self.tempdir, tempfile.tempdir = tempfile.tempdir, self.outdir

    def __enter__(self) -> _Programs:
        return self

    def __exit__(self, *exc) -> None:
        try:
            wait_for(lambda: self.runner.starting == 0, 20, "the starts ended")
        finally:
            self.runner.stop_all()
            tempfile.tempdir = self.tempdir
            shutil.rmtree(self.outdir, ignore_errors=True)

    @staticmethod
    def message(m_type: int, **fields: int) -> Message:
        m = Message()
        m.load(control_message(m_type, **fields))
        return m

    @staticmethod
    def answer(body: bytes) -> int:
        m = Message()
        m.load(body)
        assert m.m_type == MT_SVC_START | C.MT_ACKNOWLEDGE
        return m.m1_i1

    def start(self, peer: int) -> int:
        """A start request of `peer`, answered: the program's endpoint or the error."""
        before = len(self.replies)
        self.runner.handle(peer, self.message(MT_SVC_START, m1_i1=0, m1_i2=50, m1_i3=peer,
                                              m1_p1=30, m1_p2=before, m_source=peer))
        wait_for(lambda: len(self.replies) > before, 10, "the start's answer")
        node, body = self.replies[before]
        assert node == peer
        return self.answer(body)


def test_a_stop_request_does_not_hold_the_receiver_for_the_grace_period():
    """MT_SVC_STOP is handled on the receiver thread of the asking peer's link (the LB host's:
    every session's traffic to this server): stopping a program that ignores SIGTERM there
    held that thread for the whole grace period, and nothing the peer sent was read
    meanwhile.  The request returns at once; the program is stopped on a thread of its own
    (SIGKILL after the grace period) and the runner's stop sees it until it ended."""
    with _Programs(str(HERE / "stubborn.sh")) as p:
        assert p.start(3) == 30 and p.start(3) == 31
        first, second = p.runner.procs[(0, 30)], p.runner.procs[(0, 31)]
        wait_for(lambda: _ignores_sigterm(first.pid) and _ignores_sigterm(second.pid), 10,
                 "the programs ignore SIGTERM")
        p.runner.handle(3, p.message(MT_SVC_STOP, m1_i1=0, m1_i2=30, m1_p1=30, m_source=3))
        assert first.poll() is None, "the stop request waited for the program to end"
        assert (0, 30) not in p.runner.procs and first in p.runner.stopping
        wait_for(lambda: first.poll() is not None, 10, "the program stopped")
        assert first.returncode == -signal.SIGKILL
        wait_for(lambda: first not in p.runner.stopping, 10, "the stop finished")
        p.runner.handle(3, p.message(MT_SVC_STOP, m1_i1=0, m1_i2=31, m1_p1=30, m_source=3))
        p.runner.stop_all()                     # the daemon stops during the grace period
        assert second.poll() == -signal.SIGKILL


def test_a_program_that_exits_before_its_bind_is_logged_with_its_status(caplog):
    """A program that ends at once (a wrong path in `prog`, a crash) was logged as "did not
    bind endpoint 30 within 5 s", the moment it ended, with its exit status lost: the
    operator looked for a slow program.  The log says it exited and how, and the start's
    answer is an error."""
    with _Programs("/bin/sh -c 'exit 3'") as p:
        p.bind_after = 30.0                              # it could not bind before it ends
        with caplog.at_level("WARNING", logger="dsp.elastic"):
            assert p.start(3) < 0
        assert "exited with status 3" in caplog.text, caplog.text
        assert "within" not in caplog.text
        assert not p.runner.procs and not p.runner.reserved


def test_program_starts_and_failures_show_in_the_figures():
    """Service program starts were only log lines: the status and `dsp_proxy stats` said
    nothing of a program that never bound.  Starts and failures (with the last reason) are
    counted there."""
    from dsp_proxy.stats import format_text
    with _Programs("/bin/sh -c 'exit 3'") as p:
        p.bind_after = 30.0
        assert p.start(3) < 0
        snap = p.runner.snapshot()
        assert snap["failed"] == 1 and snap["started"] == 0, snap
        assert "endpoint 30" in snap["last_error"], snap
        text = format_text({"programs": snap})
        assert "service programs: 0 running, 0 started, 1 failed (last: " in text, text
    with _Programs("/bin/sh -c 'sleep 30'") as p:
        assert p.start(3) == 30
        assert p.runner.snapshot()["started"] == 1
        assert p.runner.snapshot()["running"] == 1


def test_a_reaped_programs_pid_given_to_another_group_is_not_the_program():
    """A program that exited is its process group while a process it left there runs; once
    that group is gone its pid may go to another process, whose group must not count as the
    program's (it would hold the endpoint, and a stop would signal it)."""
    other = subprocess.Popen(["sleep", "30"], start_new_session=True)   # a group of its own
    try:
        reaped = subprocess.Popen(["true"])
        reaped.wait()
        reaped.pid = other.pid              # as if the reaped program's pid were reused
        assert not elastic._alive(reaped)
        # a group the program left behind still counts
        script = subprocess.Popen(["sh", "-c", "sleep 30 & exit 0"], start_new_session=True)
        script.wait()
        assert elastic._alive(script)
        os.killpg(script.pid, signal.SIGKILL)
        wait_for(lambda: not elastic._alive(script), 10, "the group gone")
    finally:
        other.kill()
        other.wait()


def test_a_program_start_that_fails_unexpectedly_is_answered_at_once(monkeypatch):
    """Anything a start raises (a bug, no descriptor for the thread's kernel connection) ended
    the svc-start thread without an answer: the asking DSP's session waited START_PATIENCE
    for it.  It is answered EDVSGENERIC at once, and no endpoint stays reserved."""
    with _Programs("/bin/sh -c 'sleep 30'") as p:
        def broken(*args, **kw):
            raise RuntimeError("injected fault")

        monkeypatch.setattr(p.runner, "_reserve", broken)
        assert p.start(3) == E.EDVSGENERIC
        monkeypatch.undo()
        assert not p.runner.reserved
        assert p.start(3) == 30


def test_a_kernel_that_cannot_be_asked_costs_the_start_not_its_endpoint(monkeypatch):
    """The start's thread cannot reach the kernel (OSError EMFILE on its first call): the
    endpoint counts as not bound, the program gets its bind time and the start fails with an
    answer; the reservation is released and the next start, with the kernel back, works."""
    import errno

    with _Programs("/bin/sh -c 'sleep 30'") as p:
        kernel = p.runner.host.dvk
        real = kernel.getprocinfo

        def exhausted(dcid, ep):
            raise OSError(errno.EMFILE, "Too many open files")

        monkeypatch.setattr(kernel, "getprocinfo", exhausted)
        assert p.start(3) < 0
        assert not p.runner.reserved
        monkeypatch.setattr(kernel, "getprocinfo", real)
        assert p.start(3) == 30
