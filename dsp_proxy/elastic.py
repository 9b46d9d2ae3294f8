"""Elastic servers: VM commands, the autoscaler, and service programs started on demand.

- `CommandRunner` runs the lb block's `vm_start` / `vm_stop` / `vm_status` commands, locally
  or on `ssh_host` as `ssh_user` over ssh (paramiko): key authentication first (the key in
  $DSP_SSH_KEY, the agent, ~/.ssh), `ssh_pass` only as a fallback handed to paramiko — never
  put on a command line, never logged.  Every command has a timeout, and one still
  running when the DSP stops is ended, locally or on the remote host (`RunningCommands`).
- `Autoscaler` runs on one DSP only (the node `svrname` names, else the lowest-id live
  server) and keeps between `min_servers` and `max_servers` servers running.
- `ServiceRunner` runs on every server: when a client's DSP asks it (a control frame), it
  starts the configured `prog` of a configured service for one session, on a free endpoint of
  `min_ep..max_ep`, waits until the program bound it, and stops it when the session ends.

Command contract (documented in docs/operations.md): `<vm_start> <node_image> <node name>
<node id>`, the same for `vm_stop`; `<vm_status> <node_image> <node name> <node id>` exits 0
when the node is running and 1 when it is stopped.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Protocol

from dvk_cffi import consts as C
from dvk_cffi import errors as E
from dvk_cffi.api import Dvk
from dvk_cffi.wire import Message

from . import topology
from .config import Config
from .group import MT_SVC_START, MT_SVC_STOP, Group, control_message

if TYPE_CHECKING:
    import paramiko

log = logging.getLogger("dsp.elastic")

COMMAND_TIMEOUT = 30.0
BIND_WAIT = 5.0          # the dvs_lb contract: wait up to 5 s for the program's bind
STOP_GRACE = 2.0         # a program or VM command has this long after SIGTERM, then SIGKILL
RETRY_AFTER = 10.0       # a failed VM command is tried again after this long
OUTPUT_LIMIT = 64 * 1024  # of a VM command's stdout and stderr, the last bytes kept
#: Program starts in progress at once (one thread each); a start request beyond them is
#: answered EDVSAGAIN at once, so a flood of start requests costs no thread per request.
MAX_STARTING = 8
#: A remote VM command's first line of output, printed by the runner's wrapper: the id of
#: the command's process group on the remote host (not part of the command's output).
PGID_MARK = "dsp-vm-command-pgid"
PGID_LINE = re.compile(re.escape(PGID_MARK.encode()) + rb" (\d+)\r?\n")

# ------------------------------------------------------------------------------ commands
@dataclass
class CommandResult:
    status: int            # exit status; -1 for a timeout or a failure to run
    output: str
    #: why it failed, for the log and the figures: the end of what it printed (stderr, else
    #: stdout) on one line, control characters escaped
    reason: str = ""


def one_line(text: str, limit: int = 200) -> str:
    """The last `limit` characters of a command's output as one line of plain text: its
    newlines and control characters escaped, so what a command prints cannot break the log's
    one line per event, make up log lines of its own (the init script reads the reload's
    verdict from the log) or send escape sequences to a terminal."""
    tail = text.strip()[-limit:]
    if tail.isprintable():
        return tail
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in tail)


class RemoteCommand:
    """A VM command run on `ssh_host`: its ssh connection and, once it runs, its process
    group there.  sshd starts a command without a pty in a session of its own, so the remote
    shell's pid, which the runner's wrapper prints first, is that group's id; closing the
    connection alone would leave the command running."""

    def __init__(self) -> None:
        self.conn: paramiko.Transport | None = None
        self.channel: paramiko.Channel | None = None
        self.pgid: int | None = None
        self.ended = False

    def transport(self, sock, **kw) -> paramiko.Transport:
        """paramiko's transport_factory: `close` reaches the connection as soon as it
        exists, and one that `close` came before fails at once."""
        import paramiko
        self.conn = paramiko.Transport(sock, **kw)
        if self.ended:
            sock.close()
        return self.conn

    def running(self) -> bool:
        channel = self.channel
        return channel is not None and not channel.closed and not channel.exit_status_ready()

    def kill(self, name: str) -> None:
        """Send signal `name` to the command's process group (by `kill` over a channel of its
        own; the group, else the shell alone on a server that did not make it a group); a
        connection still being set up is closed instead, so it fails at once."""
        import paramiko
        if self.channel is None:
            self.close()
        conn = self.conn
        if self.pgid is None or conn is None or not conn.is_active():
            return
        try:
            channel = conn.open_session(timeout=STOP_GRACE)
            channel.exec_command(f"kill -s {name} -- -{self.pgid} 2>/dev/null"
                                 f" || kill -s {name} {self.pgid}")
            channel.close()
        except (OSError, EOFError, paramiko.SSHException) as exc:
            log.warning("could not signal the remote VM command (%s): %s", name, exc)

    def close(self) -> None:
        self.ended = True
        conn = self.conn
        if conn is not None:
            conn.close()
            conn.sock.close()   # close() skips a connection not started yet


class RunningCommands:
    """The VM commands running now: local ones (a process in a session of its own) and
    remote ones (`RemoteCommand`).  A command runs on a daemon thread that enforces its
    timeout; when the daemon stops, that thread dies with it, so the daemon's stop ends the
    commands still running (`stop_all`)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.procs: dict[subprocess.Popen | RemoteCommand, str] = {}
        self.closed = False

    def add(self, proc: subprocess.Popen | RemoteCommand, shown: str) -> bool:
        """Track a command just run (a remote one from its connection on); False once the
        daemon stops (the caller ends it, or does not run it)."""
        with self.lock:
            if not self.closed:
                self.procs[proc] = shown
            return not self.closed

    def discard(self, proc: subprocess.Popen | RemoteCommand) -> None:
        with self.lock:
            self.procs.pop(proc, None)

    def stop_all(self, grace: float = STOP_GRACE) -> None:
        """End every command still running, local or remote alike: SIGTERM to its process
        group, SIGKILL after the one shared `grace`; none is run from now on.  Returns within
        `grace` and a second, whatever the remote hosts do."""
        with self.lock:
            self.closed = True
            procs = dict(self.procs)
        local, remote = [], []
        for proc, shown in procs.items():
            if isinstance(proc, RemoteCommand):
                log.warning("the DSP stops: ending the remote VM command still running: %s",
                            shown)
                remote.append(proc)
            else:
                log.warning("the DSP stops: ending the VM command still running (pid %d): %s",
                            proc.pid, shown)
                local.append(proc)
        deadline = time.monotonic() + grace + 1.0
        ender = threading.Thread(target=_end_remote, args=(remote, grace),
                                 name="vm-remote-stop", daemon=True)
        if remote:
            ender.start()
        _terminate_each(local, grace)
        if remote:
            ender.join(max(0.0, deadline - time.monotonic()))


class CommandRunner:
    """Runs VM commands locally or over ssh, with a timeout, never exposing the password."""

    def __init__(self, lb, timeout: float = COMMAND_TIMEOUT,
                 commands: RunningCommands | None = None) -> None:
        self.commands = commands if commands is not None else RunningCommands()
        self.host = lb.ssh_host
        self.user = lb.ssh_user or os.environ.get("USER", "root")
        self._password = lb.ssh_pass
        self.timeout = timeout
        self.port = int(os.environ.get("DSP_SSH_PORT", "22"))

    def run(self, command: str, args: list[str]) -> CommandResult:
        try:
            argv = shlex.split(command) + [str(a) for a in args]
        except ValueError as exc:      # unbalanced quotes: the config check warned of it
            log.warning("command cannot be split into words: %s: %s", exc, command)
            return CommandResult(-1, str(exc), one_line(str(exc)))
        shown = " ".join(shlex.quote(a) for a in argv)
        where = f"{self.user}@{self.host}" if self.host else "locally"
        log.info("running %s %s", where, shown)
        if self.host:
            return self._ssh(shown)
        # The output goes to files, not pipes: a command that leaves a process in the
        # background (`qemu ... &`, the VM itself) ends when it exits, not when every process
        # holding its output has closed it (that was only at the timeout, a success counted
        # as a failure), and that process may go on writing after the DSP is gone.
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            try:
                proc = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                        start_new_session=True)
            except OSError as exc:
                log.warning("command failed to run: %s: %s", shown, exc)
                return CommandResult(-1, str(exc), one_line(str(exc)))
            if not self.commands.add(proc, shown):
                log.warning("the DSP stops: command ended at once: %s", shown)
                _terminate(proc)
                return CommandResult(-1, "stopped")
            try:
                proc.wait(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                log.warning("command timed out after %.0f s: %s", self.timeout, shown)
                _terminate(proc)
                return CommandResult(-1, "timeout", f"timed out after {self.timeout:.0f} s")
            finally:
                self.commands.discard(proc)
            output, errors = _tail(out), _tail(err)
        if proc.returncode != 0:
            reason = one_line(errors or output)
            log.warning("command exited with status %d: %s: %s", proc.returncode, shown,
                        reason)
            return CommandResult(proc.returncode, output, reason)
        return CommandResult(proc.returncode, output)

    def _ssh(self, command: str) -> CommandResult:
        import paramiko
        client = paramiko.SSHClient()
        known = os.environ.get("DSP_SSH_KNOWN_HOSTS")
        if known:
            client.load_host_keys(known)
            client.set_missing_host_key_policy(paramiko.RejectPolicy())
        else:
            client.load_system_host_keys()
            client.set_missing_host_key_policy(paramiko.WarningPolicy())
        key = os.environ.get("DSP_SSH_KEY")
        remote = RemoteCommand()
        if not self.commands.add(remote, command):
            log.warning("the DSP stops: command not run: %s", command)
            return CommandResult(-1, "stopped")
        try:
            client.connect(self.host, port=self.port, username=self.user,
                           key_filename=key or None, password=self._password,
                           look_for_keys=key is None, allow_agent=True,
                           timeout=self.timeout, banner_timeout=self.timeout,
                           auth_timeout=self.timeout, transport_factory=remote.transport)
            if self.commands.closed:    # the DSP stopped while this connected
                return CommandResult(-1, "stopped")
            channel = client.get_transport().open_session(timeout=self.timeout)
            channel.settimeout(self.timeout)
            remote.channel = channel
            channel.exec_command(f"echo {PGID_MARK} $$; exec {command}")
            out, err = _remote_output(channel, remote, time.monotonic() + self.timeout)
            status = channel.recv_exit_status()
        except TimeoutError:
            log.warning("remote command timed out after %.0f s: %s", self.timeout, command)
            _end_remote([remote], STOP_GRACE)
            return CommandResult(-1, "timeout", f"timed out after {self.timeout:.0f} s")
        except (OSError, EOFError, paramiko.SSHException) as exc:
            if self.commands.closed:    # stop_all closed the connection
                return CommandResult(-1, "stopped")
            why = (type(exc).__name__ if self._password and self._password in str(exc)
                   else one_line(str(exc)) or type(exc).__name__)
            log.warning("ssh to %s@%s failed: %s", self.user, self.host, why)
            return CommandResult(-1, "", f"ssh to {self.host} failed: {why}")
        finally:
            self.commands.discard(remote)
            client.close()
        if status != 0 and self.commands.closed:     # stop_all ended it
            return CommandResult(-1, "stopped")
        if status != 0:
            reason = one_line(err or out)
            log.warning("remote command exited with status %d: %s", status, reason)
            return CommandResult(status, out, reason)
        return CommandResult(status, out)


def _remote_output(channel: paramiko.Channel, remote: RemoteCommand,
                   deadline: float) -> tuple[str, str]:
    """A remote command's stdout (without the line that tells its process group, which
    sets `remote.pgid`) and stderr, read until it exits (TimeoutError past `deadline`).  The
    command is over when it exits, not when its output ends: a VM it leaves in the background
    keeps that open (sshd keeps the channel open for it).  Both streams are read as they
    come (neither can fill its window while the other is awaited); the last OUTPUT_LIMIT
    bytes of each are kept."""
    out, err = bytearray(), bytearray()
    head: bytearray | None = bytearray()    # stdout until the wrapper's line is complete
    exited_at = 0.0
    while True:
        while channel.recv_ready():
            data = channel.recv(65536)
            if head is not None:
                head += data
                if b"\n" not in head and len(head) <= 128:
                    continue
                mark = PGID_LINE.match(head)
                if mark:
                    remote.pgid = int(mark.group(1))
                data, head = bytes(head[mark.end() if mark else 0:]), None
            out += data
            del out[:-OUTPUT_LIMIT]
        while channel.recv_stderr_ready():
            err += channel.recv_stderr(65536)
            del err[:-OUTPUT_LIMIT]
        if channel.closed or (channel.eof_received and channel.exit_status_ready()):
            break
        now = time.monotonic()
        if channel.exit_status_ready():
            # what it wrote just before it exited may still be on its way; a process it
            # left behind with the output open gets a moment, then is not waited for
            exited_at = exited_at or now
            if now - exited_at > 0.5:
                break
            time.sleep(0.02)
        elif now > deadline:
            raise TimeoutError
        else:
            channel.status_event.wait(0.05)
    if head:                    # a short last line that was not the wrapper's
        out += head
    return out[-OUTPUT_LIMIT:].decode(errors="replace"), err.decode(errors="replace")


def _end_remote(commands: list[RemoteCommand], grace: float) -> None:
    """`_terminate_each` for remote commands: SIGTERM to every process group, one shared
    `grace`, SIGKILL to those still running, then their connections closed."""
    for cmd in commands:
        cmd.kill("TERM")
    deadline = time.monotonic() + grace
    while any(cmd.running() for cmd in commands) and time.monotonic() < deadline:
        time.sleep(0.05)
    for cmd in commands:
        if cmd.running():
            cmd.kill("KILL")
    for cmd in commands:
        cmd.close()


# ---------------------------------------------------------------------------- autoscaler
@dataclass
class VmState:
    nodeid: int
    name: str
    image: str | None
    starting_since: float = 0.0
    stopping_since: float = 0.0
    idle_since: float = 0.0
    failed_at: float = 0.0
    starts: int = 0
    stops: int = 0
    failures: int = 0       # VM commands that failed and starts that did not bring the node
    last_error: str = ""


class Host(Protocol):
    """What the autoscaler and the service runner use of the daemon, and nothing more: the
    node id, the config and LB group in force (a reload replaces both, so they are read at
    each use), the DVK, and control frames to peers."""

    local: int
    cfg: Config
    group: Group | None
    dvk: Dvk

    def send_control(self, nodeid: int, body: bytes) -> bool: ...


class Autoscaler:
    """Keeps min_servers..max_servers servers running (only servers with node_image are
    started or stopped); runs on the deciding DSP only."""

    def __init__(self, host: Host, runner: CommandRunner | None = None) -> None:
        self.host = host
        self.lb = host.cfg.lb
        #: the VM commands running, local or remote, across reloads (each makes a new runner)
        self.commands = getattr(runner, "commands", None) or RunningCommands()
        self.runner = runner or CommandRunner(self.lb, commands=self.commands)
        self.vms = {n.nodeid: VmState(n.nodeid, n.name, n.node_image)
                    for n in host.cfg.servers}
        self.no_server = False
        self.lock = threading.Lock()
        self.busy = False       # one VM command at a time, on its own thread

    def reload(self, cfg) -> None:
        """SIGHUP: new thresholds, timers, commands and servers apply from the next tick."""
        self.lb = cfg.lb
        self.runner = CommandRunner(cfg.lb, commands=self.commands)
        old = self.vms
        self.vms = {n.nodeid: old.get(n.nodeid) or VmState(n.nodeid, n.name, n.node_image)
                    for n in cfg.servers}
        for n in cfg.servers:
            self.vms[n.nodeid].image = n.node_image

    def stop(self) -> None:
        """The daemon stops: end the VM commands still running, which its threads would
        no longer time out."""
        self.commands.stop_all()

    def decider(self) -> int | None:
        """The deciding DSP: the node `svrname` names, else the lowest-id live server that
        runs a DSP of this project (a C DSP does not decide)."""
        lb = self.lb
        named = self.host.cfg.node_by_name(lb.svrname) if lb.svrname else None
        if named is not None:
            return named.nodeid
        live = self.running()
        group = self.host.group
        if group is not None:
            live -= {s.nodeid for s in group.servers.copy().values() if group.is_c_server(s)}
        return min(live) if live else None

    def running(self) -> set[int]:
        """Servers that count as running: links up both ways and reporting (a C DSP: its
        link up); this node counts itself when it is a server."""
        group = self.host.group
        out = set()
        me = self.host.cfg.nodes_by_id.get(self.host.local)
        if me is not None and me.role == "server":
            out.add(self.host.local)
        if group is not None:
            out |= {s.nodeid for s in group.servers.copy().values() if group.is_live(s)}
        return out

    def tick(self) -> None:
        if self.decider() != self.host.local or self.busy:
            return
        now = time.monotonic()
        running = self.running()
        lb = self.lb
        for vm in self.vms.values():
            if vm.nodeid in running:
                vm.starting_since = 0.0
            if vm.stopping_since and vm.nodeid not in running:
                vm.stopping_since = 0.0
            if vm.starting_since and now - vm.starting_since > lb.start:
                log.warning("server node %d did not come up within %d s", vm.nodeid, lb.start)
                vm.starting_since, vm.failed_at = 0.0, now
                vm.failures += 1
                vm.last_error = f"did not come up within {lb.start} s"
                self._check_status(vm)
        starting = [v for v in self.vms.values() if v.starting_since]
        group = self.host.group
        levels = group.levels() if group is not None else {}
        if self.host.local in running and group is not None:
            levels[self.host.local] = group.meter.level
        count = len(running) + len(starting)
        all_saturated = bool(running) and all(levels.get(n) == C.LVL_SATURATED
                                              for n in running)
        want_more = count < lb.min_servers or (
            (all_saturated or self.no_server) and count < lb.max_servers)
        self.no_server = False
        if want_more and not starting:
            vm = self._candidate(running, now)
            if vm is not None:
                self._act(vm, "start")
                return
        self._maybe_stop(running, levels, now)

    def _candidate(self, running: set[int], now: float) -> VmState | None:
        for vm in sorted(self.vms.values(), key=lambda v: v.nodeid):
            if (vm.image and vm.nodeid not in running and not vm.stopping_since
                    and now - vm.failed_at > RETRY_AFTER):
                return vm
        return None

    def _maybe_stop(self, running: set[int], levels: dict[int, int], now: float) -> None:
        group = self.host.group
        for vm in self.vms.values():
            if (vm.nodeid not in running or not vm.image or vm.stopping_since
                    or vm.nodeid == self.host.local):  # the deciding node never stops itself
                vm.idle_since = 0.0
                continue
            idle = levels.get(vm.nodeid) == C.LVL_IDLE and group is not None \
                and group.quiet(vm.nodeid)
            if not idle:
                vm.idle_since = 0.0
                continue
            if not vm.idle_since:
                vm.idle_since = now
            if now - vm.idle_since >= self.lb.stop and len(running) > self.lb.min_servers:
                self._act(vm, "stop")
                return

    def _act(self, vm: VmState, what: str) -> None:
        command = self.lb.vm_start if what == "start" else self.lb.vm_stop
        if not command:
            return
        now = time.monotonic()
        if what == "start":
            vm.starting_since, vm.starts = now, vm.starts + 1
        else:
            vm.stopping_since, vm.idle_since, vm.stops = now, 0.0, vm.stops + 1
        log.info("autoscaler: %s server node %d (%s)", what, vm.nodeid, vm.name)
        self.busy = True

        def work() -> None:
            try:
                res = self.runner.run(command, [vm.image, vm.name, vm.nodeid])
                if res.status != 0:
                    vm.failed_at = time.monotonic()
                    vm.failures += 1
                    vm.last_error = f"vm_{what} failed (status {res.status})" + (
                        f": {res.reason}" if res.reason else "")
                    if what == "start":
                        vm.starting_since = 0.0
                    else:
                        vm.stopping_since = 0.0
            finally:
                self.busy = False
        try:
            threading.Thread(target=work, name=f"vm-{what}-{vm.nodeid}", daemon=True).start()
        except RuntimeError as exc:   # no thread to be had: not busy, tried again later
            self.busy = False
            vm.failed_at = now
            vm.failures += 1
            vm.last_error = f"vm_{what} not run: {exc}"
            if what == "start":
                vm.starting_since = 0.0
            else:
                vm.stopping_since = 0.0
            log.warning("autoscaler: cannot run vm_%s for server node %d: %s", what,
                        vm.nodeid, exc)

    def _check_status(self, vm: VmState) -> None:
        """After a start that did not bring the node: ask vm_status why (on a thread)."""
        def work() -> None:
            running = self.status(vm)
            if running is True:
                log.warning("server node %d: its VM runs but its DSP never connected",
                            vm.nodeid)
            elif running is False:
                log.warning("server node %d: its VM is not running", vm.nodeid)
        try:
            threading.Thread(target=work, name=f"vm-status-{vm.nodeid}", daemon=True).start()
        except RuntimeError as exc:   # only a diagnosis: the tick goes on without it
            log.warning("autoscaler: cannot run vm_status for server node %d: %s", vm.nodeid,
                        exc)

    def status(self, vm: VmState) -> bool | None:
        """vm_status: True running, False stopped, None unknown."""
        if not self.lb.vm_status or not vm.image:
            return None
        res = self.runner.run(self.lb.vm_status, [vm.image, vm.name, vm.nodeid])
        return {0: True, 1: False}.get(res.status)

    def snapshot(self) -> dict:
        now = time.monotonic()
        return {n: {"name": v.name, "starting": bool(v.starting_since),
                    "stopping": bool(v.stopping_since), "starts": v.starts, "stops": v.stops,
                    "failures": v.failures, "last_error": v.last_error,
                    "idle_for": round(now - v.idle_since, 1) if v.idle_since else 0,
                    "command_running": self.busy}
                for n, v in self.vms.copy().items()}


# ----------------------------------------------------------------------- service programs
class ServiceRunner:
    """Server side of `prog` services: start one program per session, stop it at the end."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.lock = threading.Lock()
        self.procs: dict[tuple[int, int], subprocess.Popen] = {}
        #: (dcid, ep) -> the peer whose start request started the program: only it stops it
        self.owners: dict[tuple[int, int], int] = {}
        self.warned: set[int] = set()    # peers whose foreign stop requests were logged
        self.refused: set[int] = set()   # peers whose refused start requests were logged
        self.reserved: set[tuple[int, int]] = set()
        self.starting = 0                # start threads running (at most MAX_STARTING)
        self.gone: dict[int, int] = {}   # peer -> how often its link went down
        #: set by stop_all (the daemon's shutdown): no program is started any more
        self.closed = False
        self.start_threads: set[threading.Thread] = set()
        self.stopping: set[subprocess.Popen] = set()   # a gone peer's, being stopped
        #: when a program was last asked to stop: its endpoint is free once it has exited
        self.last_stop = 0.0
        #: program starts that bound their endpoint, and those that failed (the last one's
        #: reason), for the status and `dsp_proxy stats`
        self.started = 0
        self.failed = 0
        self.last_error = ""

    def handle(self, peer: int, m: Message) -> None:
        """A control frame from a client's DSP (a start runs on a thread of its own, at most
        MAX_STARTING at once)."""
        if m.m_type == MT_SVC_START:
            why = self._refusal(peer)
            if why is not None:
                level = logging.DEBUG if peer in self.refused else logging.WARNING
                self.refused.add(peer)
                log.log(level, "node %d asked for a program: refused, %s (logged once per "
                        "node)", peer, why)
                self._answer(peer, E.EDVSPERM, m.m1_p2)
                return
            started = False
            with self.lock:     # started under the lock, so stop_all sees it to wait for
                closed = self.closed
                busy = self.starting >= MAX_STARTING
                if not busy and not closed:
                    args = (peer, self.gone.get(peer, 0), m.m1_i1, m.m1_i2, m.m1_i3, m.m1_p1,
                            m.m1_p2)
                    thread = threading.Thread(target=self._start, args=args,
                                              name="svc-start", daemon=True)
                    self.starting += 1
                    self.start_threads.add(thread)
                    try:
                        thread.start()
                        started = True
                    except RuntimeError as exc:         # no thread to be had
                        log.warning("cannot start a thread for a program start: %s", exc)
                        self.starting -= 1
                        self.start_threads.discard(thread)
            if started:
                return
            if closed:
                log.info("node %d asked for a program while this DSP stops: EDVSSHUTDOWN",
                         peer)
                self._answer(peer, E.EDVSSHUTDOWN, m.m1_p2)
                return
            log.debug("node %d asked for a program while %d starts run: EDVSAGAIN", peer,
                      MAX_STARTING)
            self._answer(peer, E.EDVSAGAIN, m.m1_p2)
        elif m.m_type == MT_SVC_STOP:
            self.stop(m.m1_i1, m.m1_i2, peer, wait=False)

    def _refusal(self, peer: int) -> str | None:
        """Why `peer` may not have a program started here (None: it may).  Only a server
        node of the config runs programs, and only for a DSP that balances sessions: a
        relayed client node has no LB of its own (the LB host asks for its sessions), so a
        start it asks for serves no session and nothing would ever stop it."""
        cfg = self.host.cfg
        me = cfg.nodes_by_id.get(self.host.local)
        if me is None or not me.is_server:
            return "this node is not a server of the config"
        if topology.is_relayed_client(cfg, peer):
            return "it is a relayed client node, which asks no server for anything"
        return None

    def peer_gone(self, peer: int) -> None:
        """The link to `peer` went down: its sessions ended with it, so the programs it asked
        for serve nobody; they are stopped (their endpoints are free again), on a thread of
        their own (a stop may wait for a program to end).  A start it asked for that is still
        running stops its program when it is done."""
        with self.lock:
            self.gone[peer] = self.gone.get(peer, 0) + 1
            keys = [key for key, owner in self.owners.items() if owner == peer]
            procs = [self.procs.pop(key) for key in keys if key in self.procs]
            self.stopping.update(procs)
            if procs:
                self.last_stop = time.monotonic()
            for key in keys:
                del self.owners[key]
        if procs:
            log.info("node %d is gone: stopping the %d program(s) it asked for", peer,
                     len(procs))
            self._stop_elsewhere(procs)

    def _stop_elsewhere(self, procs: list[subprocess.Popen]) -> None:
        """Stop programs (already in `stopping`) on a thread of their own, so that the
        caller, a receiver thread, is not held for the grace period; here when no thread is
        to be had."""
        try:
            threading.Thread(target=self._stop_now, args=(procs,), name="svc-stop",
                             daemon=True).start()
        except RuntimeError as exc:
            log.warning("cannot start a thread to stop a program: %s", exc)
            self._stop_now(procs)

    def _stop_now(self, procs: list[subprocess.Popen]) -> None:
        """Stop programs in `stopping`, which stop_all sees meanwhile (a daemon thread doing
        this dies with the daemon, before its SIGKILL if a program ignores SIGTERM)."""
        try:
            _terminate_each(procs)
        finally:
            with self.lock:
                self.stopping.difference_update(procs)

    def _service(self, dcid: int, ext_ep: int):
        for svc in self.host.cfg.services:
            if svc.ext_ep == ext_ep and svc.in_dc(dcid) and svc.prog \
                    and svc.bind != "external":
                return svc
        return None

    def _start(self, peer: int, gone: int, dcid: int, clt_ep: int, clt_node: int,
               ext_ep: int, req: int) -> None:
        try:
            result = self.start(dcid, ext_ep, clt_ep, clt_node, owner=peer)
        except Exception:  # the asking DSP gets an answer whatever happened
            log.exception("program start for node %d failed", peer)
            result = E.EDVSGENERIC
        finally:
            with self.lock:
                self.starting -= 1
                self.start_threads.discard(threading.current_thread())
                peer_left = self.gone.get(peer, 0) != gone
        if result >= 0 and peer_left:       # its session ended with the peer's link
            log.info("node %d went away while its program started: stopped", peer)
            self.stop(dcid, result)
        self._answer(peer, result, req)

    def _answer(self, peer: int, result: int, req: int) -> None:
        body = control_message(MT_SVC_START | C.MT_ACKNOWLEDGE, m1_i1=result, m1_p2=req,
                               m_source=self.host.local)
        self.host.send_control(peer, body)

    def start(self, dcid: int, ext_ep: int, clt_ep: int, clt_node: int,
              owner: int | None = None) -> int:
        """Start the service's program for one client (asked by the peer `owner`, the only
        one that may stop it); returns its endpoint or an error (counted for the figures)."""
        result = self._start_program(dcid, ext_ep, clt_ep, clt_node, owner)
        with self.lock:
            if result >= 0:
                self.started += 1
            elif result != E.EDVSSHUTDOWN:
                self.failed += 1
                self.last_error = (f"{E.error_name(result)} for endpoint {ext_ep} of DC "
                                   f"{dcid}")
        return result

    def snapshot(self) -> dict:
        """The service programs for the status: running, started, failed (and why last)."""
        with self.lock:
            return {"running": len(self.procs), "started": self.started,
                    "failed": self.failed, "last_error": self.last_error}

    def _start_program(self, dcid: int, ext_ep: int, clt_ep: int, clt_node: int,
                       owner: int | None) -> int:
        if self.closed:
            return E.EDVSSHUTDOWN
        svc = self._service(dcid, ext_ep)
        if svc is None:
            log.warning("refused to start a program for unknown service ep %d of DC %d",
                        ext_ep, dcid)
            return E.EDVSBADREQUEST
        try:
            words = shlex.split(svc.prog)
        except ValueError as exc:      # unbalanced quotes: the config check warned of it
            log.warning("service %s: prog cannot be split into words: %s", svc.name, exc)
            return E.EDVSNOEXEC
        ep = self._reserve(dcid, svc)
        # every endpoint taken, one of them by a program just asked to stop (the LB took a
        # session back for this one, and asks for its start right after the stop): its
        # endpoint is free once it has exited, within the stop's grace period
        until = self.last_stop + STOP_GRACE + 1.0
        while ep is None and time.monotonic() < until and not self.closed:
            time.sleep(0.05)
            ep = self._reserve(dcid, svc)
        if ep is None:
            return E.EDVSAGAIN
        argv = words + [str(dcid), str(ep), str(clt_node), str(clt_ep)]
        out = os.path.join(tempfile.gettempdir(), f"{svc.name}_{self.host.local}_{ep}.out")
        env = dict(os.environ, DVK_NODE=str(self.host.local))
        try:
            with open(out, "ab") as f:
                proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env=env,
                                        start_new_session=True)
        except OSError as exc:
            log.warning("service %s: cannot run %s: %s", svc.name, argv[0], exc)
            self._release(dcid, ep)
            return E.EDVSNOEXEC
        with self.lock:
            closed = self.closed
            if not closed:
                self.procs[(dcid, ep)] = proc
                if owner is not None:
                    self.owners[(dcid, ep)] = owner
        if closed:                      # the daemon stopped while the program was run
            log.info("service %s: the DSP stops: the program just run is stopped", svc.name)
            _terminate(proc)
            self._release(dcid, ep)
            return E.EDVSSHUTDOWN
        deadline = time.monotonic() + BIND_WAIT
        while time.monotonic() < deadline:
            if self.closed:             # stop_all stopped the program
                self._release(dcid, ep)
                return E.EDVSSHUTDOWN
            if self._bound(dcid, ep):
                log.info("service %s: program on endpoint %d for client %d@%d", svc.name, ep,
                         clt_ep, clt_node)
                self._release(dcid, ep)
                return ep
            status = proc.poll()
            if status is not None and (status != 0 or not _alive(proc)):
                break   # failed, or ended with nothing left to bind (else: what it started)
            time.sleep(0.05)
        if self.closed:                 # stop_all stopped the program: no bind to wait for
            self._release(dcid, ep)
            return E.EDVSSHUTDOWN
        status = proc.poll()
        if status is not None and (status != 0 or not _alive(proc)):
            log.warning("service %s: the program for endpoint %d exited with status %d "
                        "before it bound the endpoint (its output: %s)", svc.name, ep, status,
                        out)
        else:
            log.warning("service %s: the program did not bind endpoint %d within %.0f s",
                        svc.name, ep, BIND_WAIT)
        self.stop(dcid, ep)
        self._release(dcid, ep)
        return E.EDVSTIMEDOUT

    def _bound(self, dcid: int, ep: int) -> bool:
        try:
            return not self.host.dvk.getprocinfo(dcid, ep).p_rts_flags & C.SLOT_FREE
        except E.DvkError:
            return False
        except OSError as exc:  # no descriptor for this thread's kernel connection (EMFILE):
            # unknown counts as not bound (a lost DVK is the main loop's to notice)
            log.warning("endpoint %d of DC %d: cannot ask the kernel: %s", ep, dcid, exc)
            return False

    def _reserve(self, dcid: int, svc) -> int | None:
        """A free endpoint of the service's range for a new program; a program that has
        exited frees its endpoint here (nobody may have asked to stop it)."""
        with self.lock:
            for ep in range(svc.min_ep, svc.max_ep + 1):
                proc = self.procs.get((dcid, ep))
                if proc is not None and not _alive(proc):
                    del self.procs[(dcid, ep)]
                    self.owners.pop((dcid, ep), None)
                    proc = None
                if (dcid, ep) in self.reserved or proc is not None:
                    continue
                if not self._bound(dcid, ep):
                    self.reserved.add((dcid, ep))
                    return ep
        return None

    def _release(self, dcid: int, ep: int) -> None:
        with self.lock:
            self.reserved.discard((dcid, ep))

    def stop(self, dcid: int, ep: int, peer: int | None = None, wait: bool = True) -> None:
        """Stop the program serving endpoint `ep` (its exit unbinds the endpoint); asked by
        `peer`, only when that peer started it.  Without `wait` the program is stopped on a
        thread of its own: a peer's stop request is handled on the receiver thread of its
        link, which a program ignoring SIGTERM would hold for the whole grace period."""
        with self.lock:
            owner = self.owners.get((dcid, ep))
            if peer is not None and owner is not None and owner != peer:
                level = logging.DEBUG if peer in self.warned else logging.WARNING
                self.warned.add(peer)
                log.log(level, "node %d asked to stop the program on endpoint %d of DC %d, "
                        "which node %d started: ignored (logged once per node)", peer, ep,
                        dcid, owner)
                return
            self.owners.pop((dcid, ep), None)
            proc = self.procs.pop((dcid, ep), None)
            if proc is not None:
                self.stopping.add(proc)
                self.last_stop = time.monotonic()
        if proc is None:
            return
        log.info("stopping the program on endpoint %d of DC %d", ep, dcid)
        if wait:
            self._stop_now([proc])
        else:
            self._stop_elsewhere([proc])

    def stop_all(self) -> None:
        """The daemon stops: no program is started from now on (a start request is answered
        EDVSSHUTDOWN), every program is stopped, and the starts under way are waited for
        (bounded) so none leaves a program behind; the programs run in sessions of their
        own and would outlive the daemon."""
        with self.lock:
            self.closed = True
            procs, self.procs = list(self.procs.values()) + list(self.stopping), {}
            self.owners = {}
            starts = list(self.start_threads)
        _terminate_each(procs)
        deadline = time.monotonic() + STOP_GRACE + 1.0
        for thread in starts:
            thread.join(max(0.0, deadline - time.monotonic()))
        late = [t for t in starts if t.is_alive()]
        if late:
            log.warning("%d program start(s) still under way at the stop", len(late))


def _terminate_each(procs: list[subprocess.Popen], grace: float = STOP_GRACE) -> None:
    """Stop programs all at once: every process group is sent SIGTERM first, then all share
    one `grace` period, then the groups still running get SIGKILL; so stopping many programs
    that ignore SIGTERM takes one grace period, not one each (the init script's stop timeout
    is 10 s).  A program is its process group (`_alive`), also once the program itself has
    exited."""
    running = [proc for proc in procs if _alive(proc)]
    for proc in running:
        _signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(_alive(proc) for proc in running) and time.monotonic() < deadline:
        time.sleep(0.02)
    stubborn = [proc for proc in running if _alive(proc)]
    for proc in stubborn:
        _signal_group(proc, signal.SIGKILL)
    for proc in stubborn:
        proc.wait()


def _terminate(proc: subprocess.Popen) -> None:
    _terminate_each([proc])


def _alive(proc: subprocess.Popen) -> bool:
    """The program runs, or a process it left in its process group does (it runs in a
    session of its own): the C project's service scripts start the server in the background
    (`server &`), wait for its bind and exit, so the server is what runs for the session.
    Once the program is reaped its pid may be given to another process, but only after its
    group is gone: a process that has that pid now is not ours, nor is its group."""
    if proc.poll() is None:
        return True
    if os.path.exists(f"/proc/{proc.pid}"):
        return False
    try:
        os.killpg(proc.pid, 0)
    except OSError:
        return False
    return True


def _tail(file: IO[bytes]) -> str:
    """The last OUTPUT_LIMIT bytes a command wrote to `file`, decoded (bytes that are not
    UTF-8 replaced): a command that prints without end costs no memory."""
    size = file.seek(0, os.SEEK_END)
    file.seek(max(0, size - OUTPUT_LIMIT))
    return file.read(OUTPUT_LIMIT).decode(errors="replace")


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    """Signal the program's process group (it runs in a session of its own), else the
    program alone."""
    try:
        os.killpg(proc.pid, sig)
    except OSError:
        try:
            proc.send_signal(sig)
        except OSError:
            pass
