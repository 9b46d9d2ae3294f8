"""Small shared helpers of the DSP: logging, sockets, the thread start handshake, counters."""

from __future__ import annotations

import ctypes
import errno
import logging
import logging.handlers
import math
import os
import socket
import stat
import sys
import threading
from dataclasses import dataclass, field

from dvk_cffi import consts as C
from dvk_cffi.logs import LOG_WAIT, RepeatLimit, StderrHandler, lost_note, report_suppressed

log = logging.getLogger("dsp")

LOG_FORMAT = "%(asctime)s %(levelname)s node%(nodeid)s %(threadName)s: %(message)s"
#: syslog adds the time and the host itself
SYSLOG_FORMAT = "%(levelname)s node%(nodeid)s %(threadName)s: %(message)s"


class _NodeIdFilter(logging.Filter):
    """Stamps every record with the local node id, so interleaved logs of a cluster read well."""

    nodeid: int | str = "?"

    def filter(self, record: logging.LogRecord) -> bool:
        record.nodeid = self.nodeid
        return True


_node_filter = _NodeIdFilter()

#: Errors of socket(), accept() and connect() that say this process or host is out of
#: descriptors or memory: the daemon's own trouble, logged as such and retried after a pause
#: (never a dead thread, never a spin on a listener that stays readable).
EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

_repeat_limit = RepeatLimit()


def report_suppressed_logs() -> None:
    """The counts of the lines the daemon's limit held back (the main loop calls this every
    tick)."""
    report_suppressed(_repeat_limit, log)


#: prctl option that names the calling thread (linux/prctl.h); the kernel keeps 15 bytes.
_PR_SET_NAME = 15
_libc = None


def name_os_thread(name: str) -> None:
    """Give the calling thread `name` in the kernel too (what `top -H`, `ps -L` and
    /proc/PID/task/TID/comm show), so an operator sees which proxy thread uses the CPU.
    Best effort: a system without prctl keeps the process name."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        _libc.prctl(_PR_SET_NAME, name.encode(errors="replace")[:15], 0, 0, 0)
    except (OSError, AttributeError):
        pass


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
#: Where `--syslog` sends by default: the local syslog daemon's socket.
SYSLOG_SOCKET = "/dev/log"


def runs_dsp_proxy(pid: int) -> bool:
    """True when process `pid` runs the dsp_proxy program (`.../dsp_proxy ...`, `python -m
    dsp_proxy ...`); a stale pidfile's pid may have been reused by a program that merely
    names a file of it (`tail -f /var/log/dsp_proxy.log`, `vi /etc/dvs/dsp_proxy.cfg`)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().split(b"\0")
    except OSError:
        return False
    return any(os.path.basename(arg) == b"dsp_proxy" for arg in args)


def log_level(text: str) -> str:
    """`--log-level` value check (argparse type): one of LOG_LEVELS, any case."""
    level = text.strip().upper()
    if level not in LOG_LEVELS:
        raise ValueError(f"{text!r} is not one of {', '.join(LOG_LEVELS)}")
    return level


class SyslogHandler(logging.handlers.SysLogHandler):
    """`--syslog`: the local syslog's socket, facility daemon.  The socket must answer at
    start-up (Python's handler takes a missing one silently, then printed a traceback on
    stderr for every line, which the init script appends to the log file, for as long as the
    daemon ran).  A syslog that goes away later costs lines, not a traceback each: one line
    on stderr says they are lost, and once the syslog is back it is told how many were.
    A syslog that is there but stops reading costs lines too, never a wait: Python's socket
    blocks on a full queue, and every thread that logged then waited for ever (the daemon
    hung, deaf to SIGTERM)."""

    def __init__(self, address: str) -> None:
        _connectable(address)
        self.lost = 0
        super().__init__(address=address, facility=logging.handlers.SysLogHandler.LOG_DAEMON)

    def _connect_unixsocket(self, address) -> None:  # logging's name
        super()._connect_unixsocket(address)
        self._set_wait()

    def _set_wait(self) -> None:
        """A bounded wait for room on the socket; none while lines are being lost."""
        try:
            if self.socket is not None:
                self.socket.settimeout(0.0 if self.lost else LOG_WAIT)
        except OSError:     # closed after a failed reconnect: emit tries to connect again
            pass

    def emit(self, record: logging.LogRecord) -> None:
        lost = self.lost
        self._set_wait()
        super().emit(record)
        if lost and self.lost == lost:      # this line got through: the syslog is back
            self.lost = 0
            super().emit(lost_note(record, f"{lost} log lines were lost while the syslog at "
                                            f"{self.address} was unreachable"))

    def handleError(self, record: logging.LogRecord) -> None:  # logging's name
        if not self.lost and sys.stderr is not None:
            try:
                sys.stderr.write(f"dsp_proxy: the syslog at {self.address} is unreachable: "
                                 "log lines are lost until it is back\n")
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
        self.lost += 1


def _connectable(address: str) -> None:
    """Raise the OSError of connecting to the Unix socket `address` (datagram, else stream,
    as the syslog handler tries them), if neither works."""
    first: OSError | None = None
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        sock = socket.socket(socket.AF_UNIX, kind)
        try:
            sock.connect(address)
            return
        except OSError as exc:
            first = first or exc
        finally:
            sock.close()
    assert first is not None
    raise first


def setup_logging(level: str = "INFO", path: str | None = None,
                  syslog: str | None = None) -> None:
    """One line per event with the node id (set later by `set_log_node`), to stderr, to the
    file `path` (reopened by `reopen_logs`, for logrotate) or to the syslog socket `syslog`.
    Raises OSError when the file or the socket cannot be opened."""
    handler: logging.Handler
    if syslog:
        handler = SyslogHandler(syslog)
        handler.setFormatter(logging.Formatter(f"dsp_proxy[{os.getpid()}]: {SYSLOG_FORMAT}"))
    elif path:
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
    else:
        handler = StderrHandler()
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.addFilter(_node_filter)
    handler.addFilter(_repeat_limit)
    root = logging.getLogger()
    for old in root.handlers:
        old.close()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))


def log_thread_deaths() -> None:
    """An exception that ends a thread the supervisor does not watch (a program start or stop,
    a VM command, the statistics server) goes to the daemon's log with its traceback, not only
    to stderr, which a daemon's operator may never see."""
    def hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return
        name = args.thread.name if args.thread is not None else "?"
        log.error("thread %s died: %s", name, args.exc_value or args.exc_type.__name__,
                  exc_info=(args.exc_type, args.exc_value, args.exc_traceback))
    threading.excepthook = hook


def reopen_logs(*_signal) -> None:
    """Close and reopen the log file (SIGUSR1, as nginx; also SIGHUP), so that after
    logrotate's `mv` the next line goes to a new file of the old name.  Safe in a signal
    handler: the handler's lock is reentrant, and the file is reopened at the next line."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.acquire()
            try:
                if handler.stream is not None:
                    handler.stream.close()
                    handler.stream = None  # FileHandler.emit opens it again
            finally:
                handler.release()
            log.info("log file %s reopened", handler.baseFilename)


def set_log_node(nodeid: int) -> None:
    _node_filter.nodeid = nodeid


# ------------------------------------------------------------------------------------ sockets
def keepalive_timing(fd_interval_ms: int, fd_fall: int) -> tuple[int, int, int]:
    """TCP keep-alive (idle seconds, seconds between probes, probes) from the liveness
    settings: the first probe after the silence limit, one per `fd_interval`, `fd_fall`
    unanswered ones end the connection.  A peer's host answers probes while it runs, also
    when its DSP (a C one, which says HELLO only after 30 s) sends nothing, so only a host
    that crashed, rebooted or was cut off is noticed this way, in about twice the silence
    limit instead of never (an idle connection) or after the C peers' long silence limit."""
    idle = max(1, math.ceil(fd_interval_ms * fd_fall / 1000))
    return idle, max(1, math.ceil(fd_interval_ms / 1000)), max(1, fd_fall)


def tune_socket(sock: socket.socket, user_timeout_ms: int | None = None,
                keepalive: tuple[int, int, int] | None = None) -> None:
    """TCP_NODELAY always (one small frame must not wait); TCP_USER_TIMEOUT so a dead peer's
    unacked data fails the link instead of queueing forever; SO_KEEPALIVE, with the timing of
    `keepalive_timing` when given, so a dead peer's host is noticed on an idle connection."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if user_timeout_ms and hasattr(socket, "TCP_USER_TIMEOUT"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, user_timeout_ms)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if keepalive is not None and hasattr(socket, "TCP_KEEPIDLE"):
        for opt, value in zip((socket.TCP_KEEPIDLE, socket.TCP_KEEPINTVL, socket.TCP_KEEPCNT),
                              keepalive):
            sock.setsockopt(socket.IPPROTO_TCP, opt, value)


def delay_acks(sock: socket.socket) -> None:
    """Let a receive-only link socket hold its ACKs: a link's connection carries frames one
    way, so Linux answers each small frame with an ACK of its own, sent inside the recv that
    reads it; TCP_QUICKACK 0 (Linux's interactive mode) makes the ACK wait for a second frame
    or the delayed-ACK timer.  Linux leaves that mode when the timer fires (after at least 40
    ms), so the compiled relay's reads set it again after a silence (RT_ACK_GAP).  Only the
    relay's links use it (docs/performance.md, "Pure ACKs and reads of 1 MiB").  Where the
    option is missing or refused, the ACKs stay immediate."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 0)
    except (AttributeError, OSError):
        pass


def resolve(host: str) -> str:
    """The IPv4 address of a peer name (IP literals are returned unchanged)."""
    return socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]


def is_local_address(addr: str) -> bool:
    """True when this machine can bind `addr` (all of 127/8 on Linux, plus its interfaces)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind((addr, 0))
        return True
    except OSError:
        return False
    finally:
        s.close()


class Backoff:
    """Capped exponential backoff for reconnects (the C sender slept 5 s and never recovered)."""

    def __init__(self, first: float = 0.05, cap: float = 2.0) -> None:
        self.first, self.cap = first, cap
        self.delay = first

    def reset(self) -> None:
        self.delay = self.first

    def next(self) -> float:
        d = self.delay
        self.delay = min(self.cap, self.delay * 2)
        return d


# ------------------------------------------------------------------------ thread handshake
class StartGate:
    """The C start handshake on a Condition: a new thread reports its TID (after its first DVK
    call, so the kernel knows it) and then waits until main has registered it with the kernel.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.tid: int | None = None
        self.error: BaseException | None = None
        self._go = False
        self._abort = False

    def report(self, tid: int) -> bool:
        """Thread side: publish the TID, wait for main's go; False when start-up aborted."""
        with self._cond:
            self.tid = tid
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._go or self._abort)
            return self._go

    def enter(self, dvk) -> bool:
        """Thread side, first thing: make this thread known to the kernel (its first DVK
        call opens its connection), report the TID and wait for main; False: do not run."""
        try:
            dvk.getdvsinfo()
        except Exception as exc:  # main re-raises it and aborts the start-up
            self.fail(exc)
            return False
        return self.report(threading.get_native_id())

    def fail(self, exc: BaseException) -> None:
        with self._cond:
            self.error = exc
            self._cond.notify_all()

    def wait_tid(self, timeout: float = 10.0) -> int:
        """Main side: the thread's TID (raises what the thread failed with)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.tid is not None or self.error, timeout):
                raise TimeoutError("proxy thread did not start")
            if self.error is not None:
                raise self.error
            return self.tid

    def go(self) -> None:
        with self._cond:
            self._go = True
            self._cond.notify_all()

    def abort(self) -> None:
        with self._cond:
            self._abort = True
            self._cond.notify_all()



# ------------------------------------------------------------------------------- counters


@dataclass
class DcCounters:
    """Traffic of one DC in one direction (the C dsp_pws columns nr_msgs, nr_data, nr_cmd)."""

    messages: int = 0
    data_bytes: int = 0
    commands: int = 0


@dataclass
class Counters:
    """Per-direction traffic figures of a link (and of the LB pair), also per DC."""

    frames: int = 0
    commands: int = 0
    bytes: int = 0
    errors: int = 0
    hellos: int = 0
    batches: int = 0        # batch frames (each carries 1 + c_batch_nr commands)
    lz4_frames: int = 0     # COPY data frames with an LZ4 payload
    lz4_raw: int = 0        # their payload bytes before compression
    lz4_wire: int = 0       # and on the wire
    by_cmd: dict = field(default_factory=dict)
    by_dc: dict = field(default_factory=dict)

    def count(self, cmd: int, nbytes: int, ncmds: int = 1, dcid: int = -1,
              data: int = 0, nframes: int = 1) -> None:
        """`nframes` frames (one, or a run of equal headers counted at once) of `nbytes` in
        all, carrying `ncmds` commands (the first of each frame is `cmd`) of DC `dcid` and
        `data` payload bytes of copy data."""
        self.frames += nframes
        self.commands += ncmds
        self.bytes += nbytes
        self.by_cmd[cmd] = self.by_cmd.get(cmd, 0) + nframes
        if dcid >= 0:
            dc = self._dc(dcid)
            dc.commands += ncmds
            if cmd in C.MESSAGE_CMDS:
                dc.messages += nframes
            if cmd in C.DATA_CMDS:
                dc.data_bytes += data

    def hello(self, nbytes: int) -> None:
        """A HELLO or load-report frame of `nbytes`: a frame and its bytes, but no DVK command
        and no DC (the same count on the sending and the receiving side)."""
        self.frames += 1
        self.bytes += nbytes
        self.hellos += 1

    def add(self, frames: int, nbytes: int, by_cmd: dict[int, int],
            by_dc: dict[int, tuple[int, int, int]]) -> None:
        """Figures counted elsewhere (the compiled relay): `frames` single-command frames of
        `nbytes` in all, frames per command, and per DC (commands, messages, data bytes)."""
        self.frames += frames
        self.commands += frames
        self.bytes += nbytes
        for cmd, n in by_cmd.items():
            self.by_cmd[cmd] = self.by_cmd.get(cmd, 0) + n
        for dcid, (commands, messages, data) in by_dc.items():
            dc = self._dc(dcid)
            dc.commands += commands
            dc.messages += messages
            dc.data_bytes += data

    def _dc(self, dcid: int) -> DcCounters:
        dc = self.by_dc.get(dcid)
        if dc is None:
            dc = self.by_dc[dcid] = DcCounters()
        return dc

    def as_dict(self) -> dict:
        """(any thread) The figures as plain data.  The counting thread may add a command or
        a DC meanwhile, so each dict is taken with `dict.copy()` before it is walked: the copy
        runs no Python code, while `list(d.items())` builds a tuple per entry, and a garbage
        collection one of them starts can run Python code (a finalizer, a gc callback) that
        lets the counting thread in: "dictionary changed size during iteration"."""
        by_dc = self.by_dc.copy()
        return {"frames": self.frames, "commands": self.commands, "bytes": self.bytes,
                "errors": self.errors, "hellos": self.hellos, "batches": self.batches,
                "lz4_frames": self.lz4_frames, "lz4_raw": self.lz4_raw,
                "lz4_wire": self.lz4_wire, "by_cmd": self.by_cmd.copy(),
                "by_dc": {dc: vars(c).copy() for dc, c in by_dc.items()}}


def read_regular_file(path: str, limit: int) -> bytes:
    """At most `limit` bytes of the regular file `path`.  It is opened without blocking, so a
    FIFO or a device put where a file was expected cannot hold the caller (a reload in the
    main loop, `dsp_proxy stats --file`): anything but a regular file is OSError "not a
    regular file"."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        return f.read(limit)
