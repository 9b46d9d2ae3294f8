"""VM commands over ssh: a real sshd on 127.0.0.1 with key authentication, and paramiko's
server mode for password authentication (no system account or /etc file is touched)."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import paramiko
import pytest

from cluster_helpers import cluster_from, wait_for
from dsp_proxy.config import parse_text
from dsp_proxy.elastic import STOP_GRACE, CommandRunner

HERE = Path(__file__).resolve().parent / "elastic"
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
PASSWORD = "Xq7-not-a-real-password-41"


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def lb_config(ssh: str) -> object:
    return parse_text(f'lb l {{ nodeid 0; {ssh} vm_start "x"; vm_stop "x"; vm_status "x"; }};'
                      ' server s { nodeid 1; node_image "img"; };').lb


VM_CLUSTER = """
lb node0 { nodeid 0; period 1; };
server node1 { nodeid 1; rname {net}.1; };
server node2 { nodeid 2; rname {net}.2; };
service latency { dcid 0; ext_ep 10; min_ep 10; max_ep 19; bind external; };
"""


def write_image(tmp_path: Path, cl) -> tuple[Path, Path]:
    """The 'VM image' of node 2 for the test hypervisor scripts in tests/elastic."""
    image, vmlog = tmp_path / "node2.image", tmp_path / "vm.log"
    image.write_text(f'PYTHON="{sys.executable}"\nPYTHONPATH="{cl.env(1)["PYTHONPATH"]}"\n'
                     f'RUNDIR="{cl.rundir}"\nCONFIG="{cl.config_path}"\n'
                     f'LOGDIR="{tmp_path / "logs"}"\nVMLOG="{vmlog}"\n')
    return image, vmlog


def wait_link(cl, node: int, peer: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not cl.status(node).get("links", {}).get(str(peer), {}).get("up"):
        assert time.monotonic() < deadline, f"node {peer} did not come up"
        time.sleep(0.1)


@pytest.fixture
def sshd(tmp_path):
    """A real sshd on 127.0.0.1 with its own config, host key and authorized key."""
    if not os.path.exists(SSHD):
        pytest.fail("sshd is not installed (make test installs openssh-server)")
    d = tmp_path / "sshd"
    d.mkdir()
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)],
                       check=True)
    (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
    port = free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\n"
        f"PidFile {d / 'sshd.pid'}\nAuthorizedKeysFile {d / 'authorized_keys'}\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "PubkeyAuthentication yes\nPermitRootLogin yes\nStrictModes no\nUsePAM no\n")
    host_pub = (d / "host_key.pub").read_text().split()
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n")
    os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege-separation directory
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")],
                            stdout=subprocess.DEVNULL, stderr=open(d / "sshd.log", "wb"))
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("sshd did not start: "
                                       + (d / "sshd.log").read_text()) from None
                time.sleep(0.05)
        yield {"port": port, "key": str(d / "client_key"), "known": str(d / "known_hosts")}
    finally:
        proc.terminate()
        proc.wait(5)


def test_vm_start_and_stop_through_a_real_sshd(tmp_path, sshd, monkeypatch):
    monkeypatch.setenv("DSP_SSH_PORT", str(sshd["port"]))
    monkeypatch.setenv("DSP_SSH_KEY", sshd["key"])
    monkeypatch.setenv("DSP_SSH_KNOWN_HOSTS", sshd["known"])
    runner = CommandRunner(lb_config("ssh_host 127.0.0.1; ssh_user root;"))
    with cluster_from(VM_CLUSTER, tmp_path, only=[1]) as cl:
        image, vmlog = write_image(tmp_path, cl)
        try:
            res = runner.run(str(HERE / "start_vm.sh"), [str(image), "node2", 2])
            assert res.status == 0, res.output
            wait_link(cl, 1, 2)
            assert runner.run(str(HERE / "status_vm.sh"), [str(image), "node2", 2]).status == 0
        finally:
            res = runner.run(str(HERE / "stop_vm.sh"), [str(image), "node2", 2])
        assert res.status == 0
        assert runner.run(str(HERE / "status_vm.sh"), [str(image), "node2", 2]).status == 1
        assert vmlog.read_text().splitlines() == ["start node2 2", "stop node2 2"]


def use_sshd(monkeypatch, sshd) -> None:
    """The runner (and the DSPs the test starts) reach the fixture's sshd with its key."""
    monkeypatch.setenv("DSP_SSH_PORT", str(sshd["port"]))
    monkeypatch.setenv("DSP_SSH_KEY", sshd["key"])
    monkeypatch.setenv("DSP_SSH_KNOWN_HOSTS", sshd["known"])


def session_of(pid_file: Path) -> int:
    """The session of the remote command whose shell wrote its pid to `pid_file`."""
    wait_for(lambda: pid_file.exists() and pid_file.read_text().strip(), 20,
             "the remote command running")
    return os.getsid(int(pid_file.read_text().split()[0]))


def in_session(sid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-s", str(sid)], capture_output=True, text=True).stdout
    return [int(pid) for pid in out.split()]


def kill_session(sid: int | None) -> None:
    """Cleanup: whatever of a remote command still runs."""
    for pid in in_session(sid) if sid else []:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_remote_vm_command_running_when_the_dsp_stops_is_ended(tmp_path, sshd, monkeypatch):
    """A VM command on `ssh_host` (a slow hypervisor's vm_start) still running when the
    deciding DSP got SIGTERM ran on there: nothing tracked it, and a command without a
    terminal outlives its ssh connection.  The DSP's stop ends it, the script and the child
    it waits for, and still exits 0."""
    use_sshd(monkeypatch, sshd)
    started = tmp_path / "vm_start.pid"
    slow = tmp_path / "slow_vm_start.sh"
    slow.write_text(f"#!/bin/sh\necho $$ > {started}\nsleep 60\necho finished >> {started}\n")
    slow.chmod(0o755)
    cfg = ("lb node0 { nodeid 0; period 1; start 30; min_servers 2; max_servers 2; "
           f'ssh_host 127.0.0.1; ssh_user root; vm_start "{slow}"; vm_stop "/bin/true"; '
           'vm_status "/bin/false"; };\n'
           "server node1 { nodeid 1; rname {net}.1; };\n"
           f'server node2 {{ nodeid 2; rname {{net}}.2; node_image "{tmp_path / "img"}"; }};\n')
    sid = None
    try:
        with cluster_from(cfg, tmp_path, only=[1]) as cl:
            sid = session_of(started)
            assert in_session(sid)
            cl.dsps[1].send_signal(signal.SIGTERM)
            assert cl.dsps[1].wait(30) == 0
            wait_for(lambda: not in_session(sid), 10, "the remote VM command ended")
            log = Path(cl.log_path("dsp1")).read_text(errors="replace")
            assert "ending the remote VM command still running" in log, log[-2000:]
        assert started.read_text().split()[1:] == []    # ended, not finished
    finally:
        kill_session(sid)


def test_remote_vm_commands_end_at_their_timeout_and_none_runs_after_the_stop(
        tmp_path, sshd, monkeypatch):
    """Over a real sshd: a remote command past its timeout is ended there (it ran on), its
    output comes back as a local command's would (its stdout alone, not the line that tells
    its process group), and once the DSP stops no remote command is run."""
    use_sshd(monkeypatch, sshd)
    runner = CommandRunner(lb_config("ssh_host 127.0.0.1; ssh_user root;"), timeout=3)
    res = runner.run("sh -c", ["echo out; echo err >&2; exit 3"])
    assert (res.status, res.output) == (3, "out\n")
    pid_file = tmp_path / "cmd.pid"
    sid = None
    results = []
    worker = threading.Thread(target=lambda: results.append(
        runner.run("sh -c", [f"echo $$ > {pid_file}; sleep 60"])), daemon=True)
    try:
        worker.start()
        sid = session_of(pid_file)
        worker.join(20)
        wait_for(lambda: not in_session(sid), 10, "the timed-out remote command ended")
        assert [(r.status, r.output) for r in results] == [(-1, "timeout")]
    finally:
        kill_session(sid)
        worker.join(20)
    runner.commands.stop_all()
    marker = tmp_path / "ran"
    res = runner.run("touch", [str(marker)])
    assert (res.status, res.output) == (-1, "stopped")
    assert not marker.exists()


def test_a_remote_vm_command_that_ignores_sigterm_is_killed_after_the_grace(
        tmp_path, sshd, monkeypatch):
    """The remote commands' stop follows the local rule: SIGTERM to the process group, then
    SIGKILL once the grace is over; stop_all returns in about that time, and the runner's
    call comes back as stopped."""
    use_sshd(monkeypatch, sshd)
    runner = CommandRunner(lb_config("ssh_host 127.0.0.1; ssh_user root;"))
    pid_file = tmp_path / "cmd.pid"
    results = []
    worker = threading.Thread(target=lambda: results.append(runner.run(
        "sh -c", [f"trap '' TERM; echo $$ > {pid_file}; sleep 60; echo finished"])),
        daemon=True)
    sid = None
    try:
        worker.start()
        sid = session_of(pid_file)
        began = time.monotonic()
        runner.commands.stop_all()
        assert time.monotonic() - began < STOP_GRACE + 3
        wait_for(lambda: not in_session(sid), 10, "the remote VM command killed")
        worker.join(10)
        assert [(r.status, r.output) for r in results] == [(-1, "stopped")]
    finally:
        kill_session(sid)
        worker.join(20)


def test_the_stop_ends_an_ssh_connection_still_being_set_up(monkeypatch):
    """A host that accepts the connection and never answers: the stop does not wait for
    the connection's own timeout (30 s), and the command is not run."""
    monkeypatch.setenv("DSP_SSH_KNOWN_HOSTS", os.devnull)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(10)
    monkeypatch.setenv("DSP_SSH_PORT", str(listener.getsockname()[1]))
    runner = CommandRunner(lb_config("ssh_host 127.0.0.1; ssh_user root;"))
    results = []
    worker = threading.Thread(target=lambda: results.append(runner.run("true", [])),
                              daemon=True)
    conn = None
    try:
        worker.start()
        conn, _ = listener.accept()
        time.sleep(0.3)     # the client waits for the server's banner
        began = time.monotonic()
        runner.commands.stop_all()
        assert time.monotonic() - began < STOP_GRACE + 3
        worker.join(5)
        assert not worker.is_alive(), "the runner still waits for the connection"
        assert [(r.status, r.output) for r in results] == [(-1, "stopped")]
    finally:
        if conn is not None:
            conn.close()
        listener.close()
        worker.join(35)


class _PasswordServer(paramiko.ServerInterface):
    """paramiko's server mode: password authentication, runs the command it is given."""

    def __init__(self, seen: list[str]) -> None:
        self.seen = seen
        self.command = threading.Event()

    def check_auth_password(self, username, password):
        return paramiko.AUTH_SUCCESSFUL if password == PASSWORD else paramiko.AUTH_FAILED

    def get_allowed_auths(self, username):
        return "password"

    def check_channel_request(self, kind, chanid):
        return paramiko.OPEN_SUCCEEDED if kind == "session" else \
            paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def check_channel_exec_request(self, channel, command):
        cmd = command.decode()
        self.seen.append(cmd)

        def run():
            res = subprocess.run(cmd, shell=True, capture_output=True, timeout=20)
            channel.sendall(res.stdout)
            channel.sendall_stderr(res.stderr)
            channel.send_exit_status(res.returncode)
            channel.close()
        threading.Thread(target=run, daemon=True).start()
        return True


@pytest.fixture
def password_server():
    host_key = paramiko.Ed25519Key.generate() if hasattr(paramiko.Ed25519Key, "generate") \
        else paramiko.RSAKey.generate(2048)
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.settimeout(0.5)
    seen: list[str] = []
    stop = threading.Event()
    transports = []

    def serve():
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            t = paramiko.Transport(conn)
            t.add_server_key(host_key)
            t.start_server(server=_PasswordServer(seen))
            transports.append(t)

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    yield {"port": listener.getsockname()[1], "seen": seen}
    stop.set()
    th.join(5)
    for t in transports:
        t.close()
    listener.close()


@pytest.mark.filterwarnings("ignore:Unknown ssh")  # WarningPolicy without known_hosts
def test_password_fallback_never_shows_the_password(tmp_path, password_server, monkeypatch,
                                                     caplog, capfd):
    monkeypatch.setenv("DSP_SSH_PORT", str(password_server["port"]))
    monkeypatch.delenv("DSP_SSH_KEY", raising=False)
    monkeypatch.delenv("DSP_SSH_KNOWN_HOSTS", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ssh keys: the password is the way in
    caplog.set_level(logging.DEBUG)
    lb = lb_config(f"ssh_host 127.0.0.1; ssh_user operator; ssh_pass {PASSWORD};")
    runner = CommandRunner(lb)
    marker = tmp_path / "ran"
    res = runner.run("touch", [str(marker)])
    assert res.status == 0 and marker.exists()
    res = runner.run("sh -c", ["exit 3"])
    assert res.status == 3
    bad = CommandRunner(lb_config("ssh_host 127.0.0.1; ssh_user operator; ssh_pass wrong;"))
    assert bad.run("true", []).status == -1
    # the same VM start/stop of an emulated node as with key authentication
    with cluster_from(VM_CLUSTER, tmp_path, only=[1]) as cl:
        image, vmlog = write_image(tmp_path, cl)
        try:
            assert runner.run(str(HERE / "start_vm.sh"), [str(image), "node2", 2]).status == 0
            wait_link(cl, 1, 2)
        finally:
            assert runner.run(str(HERE / "stop_vm.sh"), [str(image), "node2", 2]).status == 0
        assert vmlog.read_text().splitlines() == ["start node2 2", "stop node2 2"]
    out, err = capfd.readouterr()
    seen = password_server["seen"]
    assert seen and all(PASSWORD not in cmd for cmd in seen)  # never on a command line
    assert "running operator@127.0.0.1" in caplog.text  # the runner's log was captured
    assert PASSWORD not in caplog.text
    assert PASSWORD not in out + err
    assert PASSWORD not in repr(lb)


def test_a_remote_vm_command_that_leaves_its_vm_in_the_background_succeeds_when_it_exits(
        tmp_path, sshd, monkeypatch):
    """Over a real sshd: a vm_start that starts the VM in the background (output not
    redirected) and exits 0.  sshd keeps the channel open while the VM holds the command's
    output, so reading it to its end ran into the timeout, a failed start, and ending the
    'timed out' command killed the VM (its process group).  The command is over when it
    exits: status 0, its output so far, and the VM keeps running."""
    use_sshd(monkeypatch, sshd)
    runner = CommandRunner(lb_config("ssh_host 127.0.0.1; ssh_user root;"), timeout=20)
    script, pidfile = tmp_path / "start_in_background.sh", tmp_path / "vm.pid"
    script.write_text(f'#!/bin/sh\nsleep 60 &\necho $! > {pidfile}\necho "vm $2 started"\n')
    script.chmod(0o755)
    try:
        began = time.monotonic()
        res = runner.run(str(script), ["img", "s", "1"])
        took = time.monotonic() - began
        assert (res.status, res.output) == (0, "vm s started\n"), res
        assert took < 15, f"the command was over only after {took:.1f} s"
        time.sleep(0.5)     # the background shell has exec'd sleep by now (or was ended)
        vm = int(pidfile.read_text())
        assert b"sleep" in Path(f"/proc/{vm}/cmdline").read_bytes(), "the VM was ended"
    finally:
        if pidfile.exists() and pidfile.read_text().strip():
            kill_session(os.getsid(int(pidfile.read_text())) if
                         Path(f"/proc/{int(pidfile.read_text())}").exists() else None)
