"""Operations (issue: init.d/dvs, signals and live reload, statistics server, logging).

Real clusters of emulated nodes (tests/cluster_helpers.py) on this run's own loopback
addresses; the init script runs in a temporary DVS_ROOT, never against /etc.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from cluster_helpers import Background, cluster_from, fresh_net, wait_bound, wait_for
from dsp_proxy import stats as statsmod
from dsp_proxy.cluster import REPO_ROOT, module_argv, python_env, render_config
from dvk_cffi import consts as C
from dvk_cffi.emu import node as emunode

SECRET = "Pa55-w0rd-never-shown"

OPS = """
lb node0 { nodeid 0; period 2; lowwater 30; highwater 70; session_timeout 60;
           ssh_host {net}.250; ssh_user operator; ssh_pass "SECRET"; };
server node1 { nodeid 1; rname {net}.1; };
server node2 { nodeid 2; rname {net}.2; };
client node3 { nodeid 3; rname {net}.3; };
service latency { dcid 0; ext_ep 10; min_ep 10; max_ep 19; bind external; };
""".replace("SECRET", SECRET)


# ------------------------------------------------------------------------------ helpers
def status_when(cl, node, predicate, what, timeout=15.0) -> dict:
    def check():
        st = cl.status(node)
        return st if st and predicate(st) else None
    return wait_for(check, timeout, f"node {node}: {what}")


def write_config(cl, text: str) -> None:
    Path(cl.config_path).write_text(render_config(text, cl.net))


def hup(cl, node: int) -> None:
    cl.dsps[node].send_signal(signal.SIGHUP)


def port_open(host: str, port: int) -> bool:
    s = socket.socket()
    s.settimeout(1)
    try:
        s.connect((host, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def link_up_in_kernel(cl, node: int, peer: int) -> bool:
    flags = cl.dvk(node).getnodeinfo(peer).n_flags
    both = C.NODE_SCONNECTED | C.NODE_RCONNECTED
    return flags & both == both


def get(url: str) -> tuple[int, str, str]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.status, resp.headers.get("Content-Type", ""), resp.read().decode()


SAMPLE_RE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)')


def parse_metrics(text: str) -> dict[tuple, float]:
    """A strict little parser of the Prometheus text format: every family has HELP and TYPE
    before its samples, once; every sample line parses; returns {(name, labels): value}."""
    assert text.endswith("\n")
    helps, types, out = set(), {}, {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name = line.split()[2]
            assert name not in helps, f"second HELP for {name}"
            helps.add(name)
            continue
        if line.startswith("# TYPE "):
            _, _, name, mtype = line.split()
            assert mtype in ("counter", "gauge", "untyped", "histogram", "summary")
            assert name not in types, f"second TYPE for {name}"
            types[name] = mtype
            continue
        assert line and not line.startswith("#"), line
        m = SAMPLE_RE.match(line)
        assert m, f"bad sample line {line!r}"
        name, labels_text, value = m.groups()
        assert name in types and name in helps, f"{name} has no TYPE/HELP before it"
        labels = {}
        if labels_text:
            pos = 0
            for lm in LABEL_RE.finditer(labels_text):
                assert lm.start() == pos, f"bad labels {labels_text!r}"
                labels[lm.group(1)] = re.sub(r"\\(.)", lambda e: "\n" if e.group(1) == "n"
                                             else e.group(1), lm.group(2))
                pos = lm.end()
            assert pos == len(labels_text), f"bad labels {labels_text!r}"
        if types[name] == "counter":
            assert name.endswith("_total"), name
        key = (name, tuple(sorted(labels.items())))
        assert key not in out, f"duplicate sample {key}"
        out[key] = float(value)
    return out


def metric(samples: dict, name: str, /, **labels) -> float:
    want = {k: str(v) for k, v in labels.items()}
    found = [v for (n, lab), v in samples.items()
             if n == name and all(dict(lab).get(k) == v for k, v in want.items())]
    assert found, f"no sample {name} {labels}"
    return sum(found)


# ------------------------------------------------------------------------------ unit tests
def test_parse_address():
    assert statsmod.parse_address("4000") == ("127.0.0.1", 4000)
    assert statsmod.parse_address("0.0.0.0:4001") == ("0.0.0.0", 4001)
    assert statsmod.parse_address(":0") == ("127.0.0.1", 0)
    for bad in ("x", "1.2.3.4:99999", "a:b"):
        with pytest.raises(ValueError):
            statsmod.parse_address(bad)


def test_metrics_format_escapes_labels():
    snap = {"node": 1, "lb_node": 0, "uptime": 3.5,
            "links": {2: {"name": 'we"ird\\name\n', "up": True, "downs": 1,
                          "sent": {"frames": 5, "by_dc": {0: {"messages": 2, "data_bytes": 9,
                                                              "commands": 4}}},
                          "received": {}}},
            "put2lcl_errors": {"EDVSNOTBIND": 3}, "group": None}
    samples = parse_metrics(statsmod.render_metrics(snap))
    assert metric(samples, "dsp_link_up", peer=2, name='we"ird\\name\n') == 1
    assert metric(samples, "dsp_link_frames_total", peer=2, direction="out") == 5
    assert metric(samples, "dsp_dc_messages_total", peer=2, direction="out", dcid=0) == 2
    assert metric(samples, "dsp_put2lcl_errors_total", code="EDVSNOTBIND") == 3
    assert metric(samples, "dsp_uptime_seconds") == 3.5
    html = statsmod.render_html(snap)
    assert "we&quot;ird" in html and 'we"ird' not in html


# ------------------------------------------------------------------------------ statistics
def test_stats_server_metrics_json_html_and_cli(tmp_path, bg):
    with cluster_from(OPS, tmp_path, dsp_args=["--stats", "127.0.0.1:0"]) as cl:
        b = Background(cl, tmp_path)
        bg.append(b)
        st = status_when(cl, 3, lambda s: s.get("stats"), "stats address")
        base = f"http://{st['stats']}"
        code, ctype, text = get(base + "/metrics")
        assert code == 200 and ctype.startswith("text/plain; version=0.0.4")
        before = parse_metrics(text)
        assert metric(before, "dsp_link_up", peer=1) == 1
        assert metric(before, "dsp_link_up", peer=2) == 1
        assert metric(before, "dsp_sessions") == 0
        for n in (1, 2):
            b.start(n, "dvs_apps.latency", "server", 0, 10)
        for n in (1, 2):
            wait_bound(cl, n, 0, 10)
        res = cl.run(3, module_argv("dvs_apps.latency", "client", 0, 50, 10, 20, 0, 0),
                     timeout=60)
        assert res.returncode == 0, res.stdout + res.stderr
        after = parse_metrics(get(base + "/metrics")[2])
        out_frames = sum(metric(after, "dsp_link_frames_total", peer=p, direction="out")
                         for p in (1, 2))
        assert out_frames > sum(metric(before, "dsp_link_frames_total", peer=p,
                                       direction="out") for p in (1, 2))
        assert sum(metric(after, "dsp_dc_messages_total", peer=p, direction="out", dcid=0)
                   for p in (1, 2) if any(k[0] == "dsp_dc_messages_total" and
                                          ("peer", str(p)) in k[1] for k in after)) >= 20
        assert metric(after, "dsp_sessions_started_total") >= 1
        assert metric(after, "dsp_sessions") == 1
        levels = {metric(after, "dsp_server_load_level", server=s) for s in (1, 2)}
        assert levels <= {-1, 0, 1, 2}
        assert metric(after, "dsp_uptime_seconds") > 0
        # the JSON and the page carry the same figures
        code, ctype, body = get(base + "/stats.json")
        snap = json.loads(body)
        assert ctype == "application/json" and snap["node"] == 3
        assert snap["group"]["sessions_started"] >= 1
        code, ctype, page = get(base + "/")
        assert ctype.startswith("text/html") and "DSP of node 3" in page and "node1" in page
        with pytest.raises(urllib.error.HTTPError):
            get(base + "/nothing")
        # the terminal view of a running node
        cli = subprocess.run(module_argv("dsp_proxy", "stats", st["stats"]), env=python_env(),
                             capture_output=True, text=True, timeout=30)
        assert cli.returncode == 0, cli.stderr
        assert "DSP node 3" in cli.stdout and "links:" in cli.stdout
        assert re.search(r"^1\s+node1\s+UP", cli.stdout, re.M), cli.stdout
        # the client has exited: its session may have ended already, but it was counted
        assert "sessions:" in cli.stdout
        assert re.search(r"sessions [01] active, [1-9]\d* started", cli.stdout), cli.stdout
        dead = subprocess.run(module_argv("dsp_proxy", "stats", "127.0.0.1:1"),
                              env=python_env(), capture_output=True, text=True, timeout=30)
        assert dead.returncode == 1 and "cannot read" in dead.stderr
        # no secret anywhere: the three outputs, the CLI, the status file, the logs
        outputs = [text, body, page, get(base + "/metrics")[2], cli.stdout,
                   Path(cl.status_path(3)).read_text()]
        cl.stop()
        outputs += [f.read_text(errors="replace") for f in (tmp_path / "logs").glob("*.log")]
        for out in outputs:
            assert SECRET not in out
        # logging: one line per event, node id, INFO for link up, sessions, load levels
        log3 = (tmp_path / "logs" / "dsp3.log").read_text()
        assert re.search(r"INFO node3 \S+: link to node 1 \(node1\) up", log3), log3
        assert re.search(r"INFO node3 \S+: session: client 50@3 -> service latency", log3)
        assert re.search(r"INFO node3 \S+: server node [12] load level NOTINIT -> IDLE", log3)
        assert re.search(r"INFO node3 \S+: DSP of node 3 stopped", log3)


# ------------------------------------------------------------------------------ reload
WITH_M3FTP = OPS.replace("lowwater 30; highwater 70; session_timeout 60;",
                         "lowwater 20; highwater 90; session_timeout 45;") + \
    "service m3ftp { dcid 0; ext_ep 20; min_ep 20; max_ep 28; bind external; };\n"
WITHOUT_NODE2 = WITH_M3FTP.replace("server node2 { nodeid 2; rname {net}.2; };\n", "")


def test_sighup_reload(tmp_path):
    with cluster_from(OPS, tmp_path) as cl:
        net = cl.net
        st = status_when(cl, 3, lambda s: s["links"].get("1", {}).get("up")
                         and s["links"].get("2", {}).get("up"), "links up")
        gen1, downs1 = st["links"]["1"]["generation"], st["links"]["1"]["downs"]
        gen2 = st["links"]["2"]["generation"]

        # 1. a broken config: the old one keeps running, the error is logged with file:line:col
        write_config(cl, OPS.replace("session_timeout 60;", "session_timeout 60; max_sessions 0;"))
        hup(cl, 3)
        st = status_when(cl, 3, lambda s: s["reloads"]["failed"] == 1, "failed reload")
        assert st["reloads"]["ok"] == 0 and "max_sessions" in st["reloads"]["last_error"]
        log3 = Path(cl.log_path("dsp3")).read_text()
        assert re.search(r"ERROR node3 .*reload: .*cluster\.cfg:2:\d+: error: .*max_sessions", log3)
        assert "the running configuration is kept" in log3
        assert [s["name"] for s in st["config"]["services"]] == ["latency"]
        assert all(link["up"] for link in st["links"].values())
        assert cl.dsps[3].poll() is None

        # 2. a valid change of services and thresholds is applied live
        write_config(cl, WITH_M3FTP)
        hup(cl, 3)
        st = status_when(cl, 3, lambda s: s["reloads"]["ok"] == 1, "reload")
        assert [s["name"] for s in st["config"]["services"]] == ["latency", "m3ftp"]
        lb = st["config"]["lb"]
        assert (lb["lowwater"], lb["highwater"], lb["session_timeout"]) == (20, 90, 45)
        assert st["reloads"]["last_error"] is None
        # on the client node the new service's ext_ep is bound to the LB node
        wait_for(lambda: cl.dvk(3).getprocinfo(0, 20).p_nodeid == 0, what="ext_ep 20 bound")
        assert st["links"]["1"]["generation"] == gen1 and st["links"]["1"]["downs"] == downs1
        assert st["links"]["2"]["generation"] == gen2

        # 3. a removed peer: its link goes down, its port closes, the others stay
        assert port_open(f"{net}.3", 3002)
        write_config(cl, WITHOUT_NODE2)
        hup(cl, 3)
        st = status_when(cl, 3, lambda s: s["reloads"]["ok"] == 2, "second reload")
        assert "2" not in st["links"] and "2" not in st["group"]["servers"]
        wait_for(lambda: not port_open(f"{net}.3", 3002), what="port 3002 closed")
        assert not link_up_in_kernel(cl, 3, 2)
        assert port_open(f"{net}.3", 3001)
        assert st["links"]["1"]["generation"] == gen1 and st["links"]["1"]["downs"] == downs1
        threads = subprocess.run(["ps", "-L", "-o", "comm=", "-p", str(cl.dsps[3].pid)],
                                 capture_output=True, text=True).stdout
        assert "RPROXY(1)" in threads and "SPROXY(1)" in threads, threads  # named threads
        assert "PROXY(2)" not in threads, threads

        # 4. the peer added back: its link comes up again, node 1's link is untouched
        write_config(cl, WITH_M3FTP)
        hup(cl, 3)
        st = status_when(cl, 3, lambda s: s["reloads"]["ok"] == 3 and
                         s["links"].get("2", {}).get("up"), "peer 2 back up", timeout=20)
        assert link_up_in_kernel(cl, 3, 2)
        assert st["links"]["1"]["generation"] == gen1 and st["links"]["1"]["downs"] == downs1
        assert "2" in st["group"]["servers"]
        log3 = Path(cl.log_path("dsp3")).read_text()
        assert "reload: link to node 2 removed" in log3
        assert "reload: link to node 2 (node2) added" in log3
        assert SECRET not in log3

        # 5. SIGTERM: graceful stop, exit 0
        cl.dsps[3].send_signal(signal.SIGTERM)
        assert cl.dsps[3].wait(10) == 0


def test_reload_refuses_changes_that_need_a_restart(tmp_path):
    with cluster_from(OPS, tmp_path) as cl:
        write_config(cl, OPS.replace("nodeid 0;", "nodeid 5;"))
        hup(cl, 3)
        st = status_when(cl, 3, lambda s: s["reloads"]["failed"] == 1, "refused reload")
        assert "needs a restart" in st["reloads"]["last_error"]
        assert st["lb_node"] == 0 and st["config"]["lb"]["nodeid"] == 0



def test_reload_of_a_config_that_is_not_a_regular_file_fails_at_once(tmp_path):
    """A config path that became a FIFO nobody writes (or a device) is refused at once: the
    main loop that reloads never waits on it, so the DSP still answers its signals."""
    with cluster_from(OPS, tmp_path) as cl:
        cfg = Path(cl.config_path)
        good = cfg.read_text()
        cfg.unlink()
        os.mkfifo(cfg)
        hup(cl, 3)
        st = status_when(cl, 3, lambda s: s["reloads"]["failed"] == 1, "refused reload")
        assert "not a regular file" in st["reloads"]["last_error"], st["reloads"]
        cfg.unlink()
        cfg.symlink_to("/dev/zero")
        hup(cl, 3)
        st = status_when(cl, 3, lambda s: s["reloads"]["failed"] == 2, "second refused reload")
        assert "not a regular file" in st["reloads"]["last_error"], st["reloads"]
        cfg.unlink()
        cfg.write_text(good)
        hup(cl, 3)
        st = status_when(cl, 3, lambda s: s["reloads"]["ok"] == 1, "reload")
        assert all(link["up"] for link in st["links"].values())
        cl.dsps[3].send_signal(signal.SIGTERM)
        assert cl.dsps[3].wait(10) == 0


# ------------------------------------------------------------------------------ init.d/dvs
INIT = os.path.join(REPO_ROOT, "init.d", "dvs")
INIT_CFG = """
server node1 { nodeid 1; rname {net}.1; };
server node2 { nodeid 2; rname {net}.2; };
"""


def run_init(root: Path, env: dict, action: str) -> subprocess.CompletedProcess:
    return subprocess.run(["/bin/sh", INIT, action], env=env, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("ssd", ["no", "yes"])
def test_init_script_start_status_reload_stop(tmp_path, ssd):
    if ssd == "yes" and not shutil.which("start-stop-daemon"):
        pytest.skip("start-stop-daemon not installed")
    net = fresh_net()
    root = tmp_path / "root"
    (root / "etc" / "dvs").mkdir(parents=True)
    (root / "etc" / "default").mkdir(parents=True)
    rundir = tmp_path / "dvk"
    rundir.mkdir()
    cfg = root / "etc" / "dvs" / "dsp_proxy.cfg"
    status_file = tmp_path / "status.json"
    (root / "etc" / "default" / "dvs").write_text(
        f'DSP_BIN="{sys.executable} -m dsp_proxy"\n'
        f'DSP_OPTS="--dvk emu --node 1 --stats 127.0.0.1:0 --status-file {status_file}"\n'
        f'DSP_USE_SSD={ssd}\n')
    env = python_env({"DVS_ROOT": str(root), "DVK_RUNDIR": str(rundir)})
    pidfile = root / "run" / "dsp_proxy.pid"
    logfile = root / "var" / "log" / "dsp_proxy.log"
    kernel = emunode.start_node(1, str(rundir), log_path=str(tmp_path / "kernel1.log"),
                                env=python_env())
    pid = None
    try:
        assert run_init(root, env, "status").returncode == 3
        # no config: not configured
        res = run_init(root, env, "start")
        assert res.returncode == 6 and "no configuration" in res.stdout
        # a config that --check refuses: not started
        cfg.write_text(render_config(INIT_CFG, net).replace("nodeid 2;", "nodeid 2; batch maybe;"))
        res = run_init(root, env, "start")
        assert res.returncode == 6, res.stdout + res.stderr
        assert "dsp_proxy.cfg:3:" in res.stderr and not pidfile.exists()
        # a good config: started, running, the pidfile names the daemon
        cfg.write_text(render_config(INIT_CFG, net))
        res = run_init(root, env, "start")
        assert res.returncode == 0, res.stdout + res.stderr + \
            (logfile.read_text() if logfile.exists() else "")
        pid = int(pidfile.read_text())
        assert "dsp_proxy" in Path(f"/proc/{pid}/cmdline").read_text()
        res = run_init(root, env, "status")
        assert res.returncode == 0 and f"pid {pid}" in res.stdout
        assert run_init(root, env, "start").returncode == 0  # already running: success
        assert int(pidfile.read_text()) == pid
        wait_for(lambda: status_file.exists() and json.loads(status_file.read_text())
                 .get("stats"), what="status file")
        # reload: SIGHUP, the daemon re-reads the config
        cfg.write_text(render_config(INIT_CFG, net) +
                       "server node3 { nodeid 3; rname {net}.3; };\n".replace("{net}", net))
        res = run_init(root, env, "reload")
        assert res.returncode == 0, res.stdout + res.stderr
        snap = wait_for(lambda: (lambda s: s if s["reloads"]["ok"] == 1 else None)(
            json.loads(status_file.read_text())), what="reload applied")
        assert sorted(snap["links"]) == ["2", "3"]
        assert run_init(root, env, "force-reload").returncode == 0
        # --log-file: one line per event with the node id
        log_text = logfile.read_text()
        assert re.search(r"INFO node1 MainThread: DSP of node 1 running", log_text), log_text
        assert "reload of" in log_text
        # stop: graceful, exit of the daemon, pidfile removed
        res = run_init(root, env, "stop")
        assert res.returncode == 0, res.stdout + res.stderr
        assert not Path(f"/proc/{pid}").exists() or \
            "zombie" in subprocess.run(["ps", "-o", "stat=", "-p", str(pid)],
                                       capture_output=True, text=True).stdout.lower()
        assert not pidfile.exists()
        assert "DSP of node 1 stopped" in logfile.read_text()
        assert run_init(root, env, "status").returncode == 3
        assert run_init(root, env, "stop").returncode == 0
        assert run_init(root, env, "reload").returncode == 7
        # a stale pidfile: dead but the pidfile exists
        pidfile.write_text("999999\n")
        assert run_init(root, env, "status").returncode == 1
        assert run_init(root, env, "bogus").returncode == 2
        pidfile.unlink()
        pid = None
    finally:
        if pid is None and pidfile.exists():
            try:
                pid = int(pidfile.read_text())
            except ValueError:
                pid = None
        if pid is not None and pid != 999999:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        emunode.stop_node(kernel)
        shutil.rmtree(rundir, ignore_errors=True)


def test_init_script_has_the_lsb_header():
    text = Path(INIT).read_text()
    header = text.split("### BEGIN INIT INFO", 1)[1].split("### END INIT INFO", 1)[0]
    fields = dict(re.findall(r"^# ([A-Za-z-]+):\s+(.*)$", header, re.M))
    assert fields["Provides"] == "dvs"
    assert fields["Required-Start"].split() == ["$local_fs", "$network", "$syslog"]
    assert fields["Required-Stop"].split() == ["$local_fs", "$network", "$syslog"]
    assert fields["Default-Start"].split() == ["2", "3", "4", "5"]
    assert fields["Default-Stop"].split() == ["0", "1", "6"]
    assert os.access(INIT, os.X_OK)
    subprocess.run(["/bin/sh", "-n", INIT], check=True)
    unit = Path(REPO_ROOT, "init.d", "dsp_proxy.service").read_text()
    assert "--check" in unit and "kill -HUP $MAINPID" in unit and "Restart=on-failure" in unit


def test_log_lines_of_one_kind_over_their_limit_are_counted_not_written(caplog):
    """A line per event at a rate an outsider sets (every refused frame or connection of a
    peer) must not fill the log: LOG_BURST lines of a kind per window are written, the rest
    are counted and reported once the window is over; other kinds are not held back."""
    from dsp_proxy import misc

    limit = misc.RepeatLimit(burst=3, window=0.3, kinds=4)
    flood = logging.getLogger("dsp.test-flood")
    written: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            written.append(record.getMessage())

    keep = Keep()
    keep.addFilter(limit)
    flood.addHandler(keep)
    flood.propagate = False
    try:
        for i in range(100):
            flood.warning("bad frame from node %d: %s", 3, i)
        flood.warning("another kind of line")
        assert written == ["bad frame from node 3: 0", "bad frame from node 3: 1",
                           "bad frame from node 3: 2", "another kind of line"]
        assert limit.report() == []                      # the window is not over yet
        time.sleep(0.35)
        assert limit.report() == [(("dsp.test-flood", logging.WARNING,
                                    "bad frame from node %d: %s"), 97)]
        flood.warning("bad frame from node %d: %s", 3, "again")
        assert written[-1] == "bad frame from node 3: again"   # a new window
        for i in range(10):                                # more kinds than it tracks
            flood.error(f"line {i}")
        assert len([w for w in written if w.startswith("line")]) == 3 + 3  # 3 kinds + shared
        # the module's own limit reports through the daemon's log
        monkey = misc.RepeatLimit(burst=1, window=0.0)
        monkey.seen[("dsp.x", logging.INFO, "m")] = [0.0, 1, 5]
        saved, misc._repeat_limit = misc._repeat_limit, monkey
        try:
            with caplog.at_level(logging.INFO, logger="dsp"):
                misc.report_suppressed_logs()
        finally:
            misc._repeat_limit = saved
        assert "5 more lines like this were not logged" in caplog.text
    finally:
        flood.removeHandler(keep)
        flood.propagate = True


def test_a_thread_outside_the_supervisor_that_dies_is_logged_with_its_traceback(caplog):
    """Threads the main loop does not supervise (program starts and stops, VM commands, the
    statistics server) still leave their death in the daemon's log, traceback included."""
    import threading

    from dsp_proxy import misc
    saved = threading.excepthook
    try:
        misc.log_thread_deaths()

        def boom():
            raise RuntimeError("injected fault")
        caplog.set_level(logging.ERROR, logger="dsp")
        t = threading.Thread(target=boom, name="svc-start")
        t.start()
        t.join(10)
    finally:
        threading.excepthook = saved
    died = [r for r in caplog.records if "thread svc-start died: injected fault" in r.getMessage()]
    assert died and died[0].exc_info and died[0].exc_info[0] is RuntimeError
