"""The command lines an operator types first: `dsp_proxy --version`, option values that are
refused with the reason, `python -m dsp_proxy.cluster --stats`, and the demo's summary.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from cluster_helpers import fresh_net
from dsp_proxy import __version__
from dsp_proxy.cluster import REPO_ROOT, python_env, render_config

EXAMPLE = (Path(REPO_ROOT) / "examples" / "cluster.cfg").read_text()


def dsp(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dsp_proxy", *args], env=python_env(),
                          capture_output=True, text=True, timeout=60)


def test_version_and_checked_option_values(tmp_path):
    res = dsp("--version")
    assert res.returncode == 0 and res.stdout.strip() == f"dsp_proxy {__version__}"
    cfg = tmp_path / "c.cfg"
    cfg.write_text(render_config(EXAMPLE.replace("127.0.10", "{net}"), fresh_net()))
    res = dsp("--log-level", "bogus", "--check", str(cfg))
    assert res.returncode == 2
    assert "--log-level: 'bogus' is not one of DEBUG, INFO, WARNING, ERROR" in res.stderr
    assert dsp("--log-level", "debug", "--check", str(cfg)).returncode == 0
    res = dsp("--stats", "127.0.0.1:notaport", "--check", str(cfg))
    assert res.returncode == 2 and "--stats: '127.0.0.1:notaport' is not [ADDR:]PORT" in \
        res.stderr
    res = dsp("--stats", "1.2.3.4:70000", "--check", str(cfg))
    assert res.returncode == 2 and "port 70000 outside 0..65535" in res.stderr
    res = dsp("--log-file", str(tmp_path / "no" / "such" / "dir" / "x.log"), str(cfg))
    assert res.returncode == 1 and "--log-file" in res.stderr and "No such file" in res.stderr


def test_cluster_command_with_stats_says_where_everything_is(tmp_path):
    net = fresh_net()
    cfg = tmp_path / "two.cfg"
    cfg.write_text(render_config("server node1 { nodeid 1; rname {net}.1; };\n"
                                 "server node2 { nodeid 2; rname {net}.2; };\n", net))
    logs = tmp_path / "logs"
    proc = subprocess.Popen([sys.executable, "-m", "dsp_proxy.cluster", str(cfg), "--stats",
                             "--log-dir", str(logs)], env=python_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line.rstrip())
            if "Ctrl-C" in line:
                break
        text = "\n".join(lines)
        assert lines and lines[0].startswith(f"logs: {logs}/dspN.log and kernelN.log; "
                                             "status files: "), text
        urls = dict(re.findall(r"^node (\d+): statistics on (http://\S+/)", text, re.M))
        assert urls == {"1": f"http://{net}.1:4001/", "2": f"http://{net}.2:4002/"}, text
        with urllib.request.urlopen(urls["1"] + "cluster", timeout=10) as resp:
            page = resp.read().decode()
        assert "DVS cluster seen from node 1" in page and "node2" in page
        assert (logs / "dsp1.log").exists() and (logs / "kernel2.log").exists()
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0 and "cluster stopped" in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_demo_summary_per_server_and_verdict_after_the_stop(tmp_path):
    net = fresh_net()
    cfg = tmp_path / "demo.cfg"
    cfg.write_text(render_config(EXAMPLE.replace("127.0.10", "{net}"), net))
    res = subprocess.run([sys.executable, "-m", "dsp_proxy.demo", "--config", str(cfg),
                          "--loops", "20", "--mib", "1"], env=python_env(),
                         capture_output=True, text=True, timeout=300)
    out = res.stdout
    assert res.returncode == 0, out + res.stderr
    assert f"Statistics of the LB host node 3: http://{net}.3:4003/" in out
    served = {int(n): (int(s), int(r)) for n, s, r in re.findall(
        r"server node (\d+):\s+(\d+) sessions\s+(\d+) round trips", out)}
    assert set(served) == {1, 2}, out
    # 4 latency clients x 20 round trips, plus the two m3ftp transfers' requests
    assert sum(s for s, _ in served.values()) == 6
    assert sum(r for _, r in served.values()) > 4 * 20
    assert "cmds" not in out  # one vocabulary: commands, messages, round trips
    stop = out.index("Stopping the cluster ...")
    verdict = out.index("OK: the cluster was stopped cleanly (every DSP exited with status 0)")
    assert stop < verdict
