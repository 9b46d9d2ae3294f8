"""The init script as an operator meets it on day one: failed starts that say what and where,
log rotation, no process left after `stop`, reload verdicts, installation.

Each test runs `init.d/dvs` in its own temporary DVS_ROOT with a real daemon and a real node
kernel (emulated), never against /etc; every process is stopped in a `finally`.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster_helpers import fresh_net, wait_for
from dsp_proxy import daemon
from dsp_proxy.cluster import REPO_ROOT, python_env, render_config
from dvk_cffi.emu import node as emunode

INIT = os.path.join(REPO_ROOT, "init.d", "dvs")
CFG = """
server node1 { nodeid 1; rname {net}.1; };
server node2 { nodeid 2; rname {net}.2; };
"""
LB_CFG = """
lb node0 { nodeid 0; period 2; };
client node1 { nodeid 1; rname {net}.1; };
server node2 { nodeid 2; rname {net}.2; };
service latency { dcid 0; ext_ep 10; };
"""
#: How long a failed start may take to be reported (design bound: 3 s; generous here).
FAIL_BOUND = 10.0


class Root:
    """A DVS_ROOT with a config, a defaults file and (optionally) a node kernel."""

    def __init__(self, tmp_path: Path, opts: str = "", cfg: str = CFG, kernel: bool = True,
                 extra: str = "") -> None:
        self.net = fresh_net()
        self.root = tmp_path / "root"
        (self.root / "etc" / "dvs").mkdir(parents=True)
        (self.root / "etc" / "default").mkdir(parents=True)
        self.rundir = tmp_path / "dvk"
        self.rundir.mkdir()
        self.cfg = self.root / "etc" / "dvs" / "dsp_proxy.cfg"
        self.cfg.write_text(render_config(cfg, self.net))
        self.pidfile = self.root / "run" / "dsp_proxy.pid"
        self.logfile = self.root / "var" / "log" / "dsp_proxy.log"
        self.defaults = self.root / "etc" / "default" / "dvs"
        self.set_opts(opts, extra)
        self.env = python_env({"DVS_ROOT": str(self.root), "DVK_RUNDIR": str(self.rundir)})
        self.kernel = (emunode.start_node(1, str(self.rundir),
                                          log_path=str(tmp_path / "kernel1.log"),
                                          env=python_env()) if kernel else None)

    def set_opts(self, opts: str, extra: str = "") -> None:
        self.defaults.write_text(f'DSP_BIN="{sys.executable} -m dsp_proxy"\n'
                                 f'DSP_OPTS="--dvk emu --node 1 {opts}"\n'
                                 f"DSP_USE_SSD=no\nDSP_START_TIMEOUT=30\n{extra}")

    def run(self, action: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(["/bin/sh", INIT, action], env=self.env, capture_output=True,
                              text=True, timeout=timeout)

    def log(self) -> str:
        return self.logfile.read_text(errors="replace") if self.logfile.exists() else ""

    def project_pids(self) -> set[int]:
        """Live processes of this test's cluster: those with its DVK_RUNDIR."""
        mark = f"DVK_RUNDIR={self.rundir}".encode()
        found = set()
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    env = f.read().split(b"\0")
                with open(f"/proc/{entry}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if mark in env and state != "Z":
                found.add(int(entry))
        return found

    def cleanup(self) -> None:
        for pid in self.project_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.kernel is not None:
            emunode.stop_node(self.kernel)
        shutil.rmtree(self.rundir, ignore_errors=True)


@pytest.fixture
def make_root(tmp_path):
    made = []

    def make(**kw) -> Root:
        r = Root(tmp_path, **kw)
        made.append(r)
        return r
    yield make
    for r in made:
        r.cleanup()


# ------------------------------------------------------------------------------ start-up
def test_bad_option_is_refused_by_check_and_start_with_the_reason(make_root):
    r = make_root(opts="--stats 127.0.0.1:notaport", kernel=False)
    res = r.run("check")
    assert res.returncode == 6, res.stdout + res.stderr
    assert "--stats" in res.stderr and "notaport" in res.stderr
    t0 = time.monotonic()
    res = r.run("start")
    took = time.monotonic() - t0
    print(f"bad option: start refused in {took:.2f} s")
    assert res.returncode == 6 and took < FAIL_BOUND
    assert "notaport" in res.stderr and "DSP_OPTS" in res.stdout
    log = r.log()
    assert "not started" in log and "notaport" in log, log
    r.set_opts("--log-level bogus")
    res = r.run("check")
    assert res.returncode == 6 and "bogus" in res.stderr and "DEBUG" in res.stderr


def test_busy_stats_port_fails_fast_with_its_address(make_root):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    try:
        r = make_root(opts=f"--stats 127.0.0.1:{port}")
        assert r.run("check").returncode == 0
        t0 = time.monotonic()
        res = r.run("start")
        took = time.monotonic() - t0
        print(f"busy port: start failed after {took:.2f} s (DSP_START_TIMEOUT 30)")
        assert res.returncode == 1 and took < FAIL_BOUND, res.stdout + res.stderr
        want = f"127.0.0.1:{port}"
        assert "failed to start (exit status 1)" in res.stdout
        assert want in res.stdout and "Address already in use" in res.stdout, res.stdout
        assert re.search(rf"ERROR node1 MainThread: start-up failed: .*{re.escape(want)}",
                         r.log()), r.log()
        assert not r.pidfile.exists()
    finally:
        busy.close()


def test_a_pidfile_that_cannot_be_written_fails_the_start_with_the_reason(tmp_path):
    """A pidfile in a directory that does not exist (or is not writable): the daemon
    registered its proxies, brought its links up, then died with a Python traceback and no
    ERROR line.  It is refused at once, logged at ERROR with the path and the reason, before
    a node kernel is started or a link is set up."""
    pidfile = tmp_path / "missing" / "dsp_proxy.pid"
    cfg = tmp_path / "one.cfg"
    cfg.write_text(render_config(CFG, fresh_net()))
    proc = subprocess.run([sys.executable, "-m", "dsp_proxy", "--dvk", "emu", "--node", "1",
                           "--pidfile", str(pidfile), str(cfg)],
                          env=python_env({"DVK_RUNDIR": str(tmp_path / "dvk")}),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert f"ERROR node? MainThread: cannot write the pidfile {pidfile}: No such file or " \
        "directory" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and "node kernel" not in proc.stderr, proc.stderr
    assert not pidfile.parent.exists()


def test_second_daemon_says_already_running(make_root, tmp_path):
    r = make_root(opts="")
    res = r.run("start")
    assert res.returncode == 0, res.stdout + res.stderr + r.log()
    pid = int(r.pidfile.read_text())
    # the init script sees the pidfile ...
    res = r.run("start")
    assert res.returncode == 0 and f"already running (pid {pid})" in res.stdout
    # ... the daemon itself finds the running one by its proxy pairs, without a pidfile
    second = subprocess.run([sys.executable, "-m", "dsp_proxy", "--dvk", "emu", "--node", "1",
                             str(r.cfg)], env=r.env, capture_output=True, text=True,
                            timeout=60)
    assert second.returncode == 1
    assert f"a dsp_proxy of node 1 is already running (pid {pid})" in second.stderr, \
        second.stderr
    assert "EDVSRSCBUSY" not in second.stderr
    # the pidfile check: the live daemon counts; a stale pid, or one reused by another
    # program, does not
    assert daemon.pidfile_owner(str(r.pidfile)) == pid
    stale = tmp_path / "stale.pid"
    for other in (1, 999999):
        stale.write_text(f"{other}\n")
        assert daemon.pidfile_owner(str(stale)) is None
    assert r.run("stop").returncode == 0


def test_a_stale_pidfile_whose_pid_runs_a_program_named_after_a_file_of_it(make_root):
    """A stale pidfile (the daemon was SIGKILLed or OOM-killed) whose pid now runs `tail -f
    /var/log/dsp_proxy.log`: the init script and the daemon took any process with
    'dsp_proxy' in its command line for the daemon, so `status` said running, `start` said
    "already running" and started nothing, and `stop` sent the operator's tail SIGTERM."""
    r = make_root(opts="")
    r.logfile.parent.mkdir(parents=True)
    r.logfile.touch()
    r.pidfile.parent.mkdir(parents=True)
    tail = subprocess.Popen(["tail", "-f", str(r.logfile)], stdout=subprocess.DEVNULL)
    try:
        r.pidfile.write_text(f"{tail.pid}\n")
        assert daemon.pidfile_owner(str(r.pidfile)) is None
        res = r.run("status")
        assert res.returncode == 1 and "dead" in res.stdout, res.stdout
        res = r.run("stop")
        assert res.returncode == 0 and tail.poll() is None, res.stdout
        r.pidfile.write_text(f"{tail.pid}\n")
        res = r.run("start")
        assert res.returncode == 0 and "started" in res.stdout, res.stdout + r.log()
        pid = int(r.pidfile.read_text())
        assert daemon.pidfile_owner(str(r.pidfile)) == pid != tail.pid
        assert r.run("status").returncode == 0
        assert r.run("stop").returncode == 0
        assert tail.poll() is None
    finally:
        tail.kill()
        tail.wait()


# ------------------------------------------------------------------------------ logs
def test_log_rotation_with_sigusr1_and_the_shipped_logrotate_snippet(make_root):
    r = make_root(opts="")
    assert r.run("start").returncode == 0, r.log()
    pid = int(r.pidfile.read_text())
    rotated = r.logfile.with_name("dsp_proxy.log.1")
    r.logfile.rename(rotated)
    res = r.run("rotate")
    assert res.returncode == 0 and f"pid {pid}" in res.stdout
    wait_for(lambda: "log file" in r.log() and "reopened" in r.log(), what="new log file")
    size_then = rotated.stat().st_size
    os.kill(pid, signal.SIGHUP)  # a reload: more lines, which must go to the new file
    wait_for(lambda: "reload of" in r.log(), what="reload logged in the new file")
    assert rotated.stat().st_size == size_then
    assert "DSP of node 1 running" in rotated.read_text()
    # the shipped snippet, installed by `install`, with the real logrotate
    inst = r.run("install")
    assert inst.returncode == 0, inst.stdout + inst.stderr
    snippet = r.root / "etc" / "logrotate.d" / "dvs"
    text = snippet.read_text()
    assert f"{r.root}/var/log/dsp_proxy.log {{" in text and "rotate" in text
    if shutil.which("logrotate") is None:
        pytest.skip("logrotate not installed: snippet installed, not run")
    before = r.log()
    subprocess.run(["logrotate", "-f", "-s", str(r.root / "logrotate.state"), str(snippet)],
                   env=r.env, check=True, capture_output=True, timeout=60)
    assert rotated.read_text() == before  # logrotate moved the live file to .1
    wait_for(lambda: "reopened" in r.log(), what="reopen after logrotate")
    # SIGHUP reopens too: `reload` after a move finds the verdict in the new file
    second = r.logfile.with_name("dsp_proxy.log.moved")
    r.logfile.rename(second)
    res = r.run("reload")
    assert res.returncode == 0 and "reloaded" in res.stdout, res.stdout + res.stderr
    assert "reload of" in r.log() and "reload of" not in second.read_text()
    assert r.run("stop").returncode == 0
    assert "DSP of node 1 stopped" in r.log()
    assert "DSP of node 1 stopped" not in rotated.read_text()


def test_syslog_option_sends_to_the_syslog_socket(tmp_path):
    sock_path = str(tmp_path / "log.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(sock_path)
    listener.settimeout(30)
    net = fresh_net()
    cfg = tmp_path / "one.cfg"
    cfg.write_text(render_config(CFG, net))
    rundir = tmp_path / "dvk"
    kernel = emunode.start_node(1, str(rundir), env=python_env())
    proc = subprocess.Popen([sys.executable, "-m", "dsp_proxy", "--dvk", "emu", "--node", "1",
                             "--syslog", sock_path, str(cfg)],
                            env=python_env({"DVK_RUNDIR": str(rundir)}),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        lines = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any("running" in x for x in lines):
            lines.append(listener.recv(4096).decode(errors="replace"))
        text = "\n".join(lines)
        # <daemon.info> = <30>; the daemon's pid and node id in every line
        assert re.search(rf"^<30>dsp_proxy\[{proc.pid}\]: INFO node1 MainThread: DSP of node 1 "
                         "running", text, re.M), text
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0 and err == b""  # nothing on stderr: it all went to syslog
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        listener.close()
        emunode.stop_node(kernel)
        shutil.rmtree(rundir, ignore_errors=True)


def test_a_syslog_that_does_not_answer_is_refused_at_start_and_costs_no_traceback_later(
        tmp_path, capsys):
    """`--syslog` with no syslog at its socket started anyway (Python's handler takes a
    missing socket silently) and printed a 20-line 'Logging error' traceback on stderr for
    every log line, which the init script appends to the log file, for as long as it ran.
    Now the start is refused at once with the reason, as a log file that cannot be opened
    is; a syslog that goes away later costs one line on stderr, and once it is back it is
    told how many lines were lost."""
    import logging

    missing = tmp_path / "no-syslog.sock"
    proc = subprocess.run([sys.executable, "-m", "dsp_proxy", "--dvk", "emu", "--node", "1",
                           "--syslog", str(missing), str(tmp_path / "any.cfg")],
                          env=python_env({"DVK_RUNDIR": str(tmp_path / "dvk")}),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc
    assert proc.stderr == f"dsp_proxy: --syslog {missing}: No such file or directory\n"

    from dsp_proxy.misc import SYSLOG_FORMAT, SyslogHandler

    sock_path = str(tmp_path / "log.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(sock_path)
    listener.settimeout(10)
    handler = SyslogHandler(sock_path)
    handler.setFormatter(logging.Formatter(SYSLOG_FORMAT))
    logger = logging.getLogger("test.syslog.outage")
    logger.propagate, logger.level = False, logging.INFO
    logger.addHandler(handler)
    try:
        capsys.readouterr()
        logger.info("before", extra={"nodeid": 1})
        assert listener.recv(4096).endswith(b"before\x00")
        listener.close()
        os.unlink(sock_path)        # the syslog daemon stops
        for i in range(3):
            logger.info("during %d", i, extra={"nodeid": 1})
        err = capsys.readouterr().err
        assert err == (f"dsp_proxy: the syslog at {sock_path} is unreachable: log lines are "
                       "lost until it is back\n"), err
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        listener.bind(sock_path)    # ... and is back
        listener.settimeout(10)
        logger.info("after", extra={"nodeid": 1})
        got = [listener.recv(4096), listener.recv(4096)]
        assert got[0].endswith(b"after\x00"), got
        assert b"WARNING" in got[1] and b"3 log lines were lost while the syslog" in got[1], got
        assert capsys.readouterr().err == ""
    finally:
        logger.removeHandler(handler)
        handler.close()
        listener.close()


def test_a_syslog_that_stops_reading_costs_lines_never_a_hung_daemon(tmp_path, capsys):
    """A syslog whose socket is there but no longer read (a stopped or wedged syslog daemon):
    its queue fills after a few datagrams and Python's blocking socket then held every thread
    that logged, for ever (the whole daemon hung, SIGTERM included).  Now the lines are lost
    and counted, and once the syslog reads again it is told how many."""
    import logging
    import threading

    from dsp_proxy.misc import SYSLOG_FORMAT, SyslogHandler

    sock_path = str(tmp_path / "log.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(sock_path)
    handler = SyslogHandler(sock_path)
    handler.setFormatter(logging.Formatter(SYSLOG_FORMAT))
    logger = logging.getLogger("test.syslog.stuck")
    logger.propagate, logger.level = False, logging.INFO
    logger.addHandler(handler)
    lines = 200
    try:
        capsys.readouterr()
        writer = threading.Thread(target=lambda: [logger.info("line %d", i, extra={"nodeid": 1})
                                                  for i in range(lines)], daemon=True)
        writer.start()
        writer.join(30)      # a wait per line would be 0.1 s: 20 s; none for ever
        assert not writer.is_alive(), "logging is blocked by a syslog that does not read"
        lost = handler.lost
        assert 0 < lost < lines
        assert "log lines are lost until it is back" in capsys.readouterr().err
        listener.settimeout(0)
        got = []
        while True:                 # the syslog reads again
            try:
                got.append(listener.recv(4096))
            except BlockingIOError:
                break
        assert len(got) == lines - lost
        listener.settimeout(10)
        logger.info("after", extra={"nodeid": 1})
        after = [listener.recv(4096), listener.recv(4096)]
        assert after[0].endswith(b"after\x00"), after
        assert f"{lost} log lines were lost".encode() in after[1], after
    finally:
        listener.close()            # first: a writer blocked on the socket is let go
        logger.removeHandler(handler)
        handler.close()


# ------------------------------------------------------------------------------ stop
def test_stop_leaves_no_process_also_the_node_kernel_the_daemon_started(make_root):
    r = make_root(opts="", kernel=False)  # no node kernel: the daemon starts one itself
    res = r.run("start")
    assert res.returncode == 0, res.stdout + res.stderr + r.log()
    pid = int(r.pidfile.read_text())
    procs = r.project_pids()
    assert pid in procs and len(procs) == 2, procs  # the daemon and its node kernel
    assert "starting one (it stops with this daemon)" in r.log()
    res = r.run("stop")
    assert res.returncode == 0 and "stopped" in res.stdout
    wait_for(lambda: not r.project_pids(), timeout=10, what="no process left")
    assert "stopping the node kernel of node 1" in r.log()
    assert "DSP of node 1 stopped" in r.log()


def _daemon_starting_its_kernel(r: Root, log: Path) -> subprocess.Popen:
    """A dsp_proxy with no node kernel running, once it has said it starts one."""
    r.pidfile.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "dsp_proxy", "--dvk", "emu", "--node", "1",
                             "--pidfile", str(r.pidfile), str(r.cfg)], env=r.env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=log.open("wb"))
    try:
        wait_for(lambda: "starting one (it stops with this daemon)" in log.read_text(), 30,
                 "the daemon starting its node kernel")
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_during_start_up_exits_0_and_stops_the_kernel_it_started(make_root,
                                                                              tmp_path, sig):
    """SIGTERM or SIGINT while the daemon waits for the node kernel it started: the signal's
    default action killed it (status -15, or a KeyboardInterrupt traceback) and its kernel
    ran on.  The start-up stops, the kernel is stopped, the exit status is 0."""
    r = make_root(kernel=False)
    log = tmp_path / "dsp.log"
    proc = _daemon_starting_its_kernel(r, log)
    try:
        proc.send_signal(sig)
        assert proc.wait(30) == 0, log.read_text()
        wait_for(lambda: not r.project_pids(), 10, "no process left")
        text = log.read_text()
        assert f"signal {sig.name} during start-up: stopping" in text, text
        assert "Traceback" not in text and not r.pidfile.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_sighup_during_start_up_is_applied_once_the_daemon_runs(make_root, tmp_path):
    """SIGHUP while the daemon waits for the node kernel it started: it killed the daemon
    (status -1) and left the kernel.  It is applied as a reload once the daemon runs."""
    r = make_root(kernel=False)
    log = tmp_path / "dsp.log"
    proc = _daemon_starting_its_kernel(r, log)
    try:
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload of" in log.read_text() or proc.poll() is not None, 30,
                 "the reload")
        assert proc.poll() is None, log.read_text()
        text = log.read_text()
        assert "signal SIGHUP during start-up: handled once the DSP runs" in text, text
        assert re.search(r"reload of \S+ done", text), text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()
        wait_for(lambda: not r.project_pids(), 10, "no process left")
        assert "stopping the node kernel of node 1" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------------------ reload
def test_reload_reports_the_daemons_verdict(make_root):
    r = make_root(opts="", cfg=LB_CFG)
    assert r.run("start").returncode == 0, r.log()
    # accepted: rc 0 and the daemon's summary
    r.cfg.write_text(render_config(LB_CFG, r.net).replace("period 2;", "period 3;"))
    res = r.run("reload")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "reloaded" in res.stdout and "links removed" in res.stdout
    assert "reload of" not in res.stdout, res.stdout   # the summary, not the whole log line
    # refused by the daemon (valid for --check, but needs a restart): rc 1 and the reason
    r.cfg.write_text(render_config(LB_CFG, r.net).replace("nodeid 0;", "nodeid 5;"))
    assert r.run("check").returncode == 0
    res = r.run("reload")
    assert res.returncode == 1, res.stdout + res.stderr
    assert "refused" in res.stdout and "a change of the LB node's id or name needs a restart" \
        in res.stdout, res.stdout
    # refused by --check: nothing sent, rc 6
    r.cfg.write_text(render_config(LB_CFG, r.net).replace("period 2;", "period 2; max_sessions 0;"))
    res = r.run("reload")
    assert res.returncode == 6 and "max_sessions" in res.stderr
    assert r.run("stop").returncode == 0


def test_restart_with_a_config_that_does_not_check_keeps_the_daemon_running(make_root):
    """An operator edits the config and runs `restart`, as with the C daemon: when the new
    config does not pass `--check`, restart refuses (rc 6, the reason) before stopping, so
    the running daemon keeps the node's links instead of the node losing its DSP."""
    r = make_root(opts="", cfg=LB_CFG)
    assert r.run("start").returncode == 0, r.log()
    pid = int(r.pidfile.read_text())
    r.cfg.write_text(render_config(LB_CFG, r.net).replace("period 2;", "period 2; max_sessions 0;"))
    res = r.run("restart")
    assert res.returncode == 6 and "max_sessions" in res.stderr, res.stdout + res.stderr
    assert r.run("status").returncode == 0 and int(r.pidfile.read_text()) == pid
    os.kill(pid, 0)
    # a valid config: restarted (a new daemon)
    r.cfg.write_text(render_config(LB_CFG, r.net))
    res = r.run("restart")
    assert res.returncode == 0, res.stdout + res.stderr + r.log()
    assert int(r.pidfile.read_text()) != pid
    assert r.run("stop").returncode == 0


def test_reload_verdict_under_a_quieter_log_level(make_root):
    """With `--log-level WARNING` in DSP_OPTS the daemon's "reload of FILE done" (INFO) was
    not logged, so `init.d/dvs reload` waited out DSP_RELOAD_TIMEOUT and reported a reload
    that had been applied as "no verdict", exit status 1.  The start and verdict of a reload
    are logged whatever the level."""
    r = make_root(opts="--log-level WARNING", cfg=LB_CFG, extra="DSP_RELOAD_TIMEOUT=5\n")
    assert r.run("start").returncode == 0, r.log()
    r.cfg.write_text(render_config(LB_CFG, r.net).replace("period 2;", "period 3;"))
    res = r.run("reload")
    assert res.returncode == 0 and "reloaded" in res.stdout, res.stdout + res.stderr
    others = [line for line in r.log().splitlines()
              if " INFO " in line and not re.search(r": (reloading|reload of) ", line)]
    assert others == [], r.log()    # the level still holds for every other line
    assert r.run("stop").returncode == 0


# ------------------------------------------------------------------------------ install
def test_install_under_dvs_root(tmp_path):
    root = tmp_path / "root"
    res = subprocess.run(["make", "-s", "-C", str(REPO_ROOT), "install", f"DVS_ROOT={root}"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    script = root / "etc" / "init.d" / "dvs"
    assert os.access(script, os.X_OK)
    assert script.read_text() == Path(INIT).read_text()
    defaults = (root / "etc" / "default" / "dvs").read_text()
    assert "DSP_OPTS=" in defaults
    assert f"{root}/var/log/dsp_proxy.log" in (root / "etc" / "logrotate.d" / "dvs").read_text()
    unit = (root / "lib" / "systemd" / "system" / "dsp_proxy.service").read_text()
    doc = re.search(r"^Documentation=file:(\S+)$", unit, re.M).group(1)
    assert (root / doc.lstrip("/")).is_file()  # the unit points at something installed
    installed = root / doc.lstrip("/")
    for image in re.findall(r"\]\((stats-page[^)]*\.png)\)", installed.read_text()):
        assert (installed.parent / image).is_file(), f"{image}, shown by {installed.name}"
    if shutil.which("update-rc.d"):
        assert "update-rc.d dvs defaults: done" in res.stdout
        for level in "2345":
            assert (root / "etc" / f"rc{level}.d" / "S01dvs").is_symlink()
        assert (root / "etc" / "rc0.d" / "K01dvs").is_symlink()
    # a second install keeps the operator's defaults file
    (root / "etc" / "default" / "dvs").write_text("DSP_OPTS=--mine\n")
    res = subprocess.run(["/bin/sh", INIT, "install"], env=dict(os.environ, DVS_ROOT=str(root)),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "kept" in res.stdout
    assert (root / "etc" / "default" / "dvs").read_text() == "DSP_OPTS=--mine\n"


def test_an_installed_package_builds_and_checks_its_compiled_relay(tmp_path):
    """`pip install .` then `python -m dsp_proxy.fastrelay_build` against the installed
    package (docs/operations.md): fastrelay.c is installed with the package, so the module
    is built there and the DSP finds it matches its source and uses it."""
    src = tmp_path / "src"
    for name in ("dsp_proxy", "dvk_cffi", "dvs_apps"):
        shutil.copytree(REPO_ROOT / name, src / name,
                        ignore=shutil.ignore_patterns("__pycache__", "_fastrelay*.so"))
    for name in ("setup.py", "README.md"):
        shutil.copy(REPO_ROOT / name, src / name)
    site = tmp_path / "site"
    res = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                          "--no-build-isolation", "--no-index", "--disable-pip-version-check",
                          "--target", str(site), str(src)],
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout + res.stderr
    assert (site / "dsp_proxy" / "fastrelay.c").is_file()
    env = dict(os.environ, PYTHONPATH=str(site))
    run = dict(env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    built = subprocess.run([sys.executable, "-m", "dsp_proxy.fastrelay_build"], **run)
    assert built.returncode == 0 and "built" in built.stderr, built.stdout + built.stderr
    check = subprocess.run([sys.executable, "-c", "import dsp_proxy.fastpath as f; "
                            "print(f.__file__, f.enabled(), f.UNUSABLE)"], **run)
    assert check.returncode == 0, check.stderr
    assert check.stdout.split() == [str(site / "dsp_proxy" / "fastpath.py"), "True", "None"]
