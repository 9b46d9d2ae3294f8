"""Logging rules shared by the DSP and the emulated node kernel: both log a line per event at
a rate an outsider can set (a peer's refused frames, a program's malformed requests), and both
must keep their log readable and the disk from filling, and never wait for a log nobody
reads."""

from __future__ import annotations

import errno
import logging
import os
import select
import stat
import sys
import threading
import time
import traceback
from collections.abc import Callable

#: At most LOG_BURST lines of one kind (logger, level and message template) are written per
#: LOG_WINDOW seconds; the rest are counted, and `report_suppressed` says how many.
LOG_BURST = 50
LOG_WINDOW = 60.0
#: Kinds tracked at once; beyond them every new kind of a level shares one count.
LOG_KINDS = 1024


#: `extra=` of lines no limit may hold back: the operator's own actions (the DSP's reload
#: verdict, which the init script waits for, and its reasons) and the counts of lines held back.
UNLIMITED = {"unlimited": True}


class RepeatLimit(logging.Filter):
    """Keeps the log readable, and the disk from filling, when something logs a line per event
    at a rate an outsider sets (a peer whose every frame or connection is refused with a
    logged reason): LOG_BURST lines of a kind per LOG_WINDOW pass, the rest are counted."""

    def __init__(self, burst: int = LOG_BURST, window: float = LOG_WINDOW,
                 kinds: int = LOG_KINDS) -> None:
        super().__init__()
        self.burst, self.window, self.kinds = burst, window, kinds
        self.lock = threading.Lock()
        self.seen: dict[tuple, list] = {}    # kind -> [window start, lines, suppressed]

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "unlimited", False):
            return True
        kind = (record.name, record.levelno, str(record.msg))
        now = time.monotonic()
        with self.lock:
            entry = self.seen.get(kind)
            if entry is None:
                if len(self.seen) >= self.kinds:
                    kind = ("*", record.levelno, "(lines of other kinds)")
                    entry = self.seen.get(kind)
                if entry is None:
                    entry = self.seen[kind] = [now, 0, 0]
            if now - entry[0] >= self.window and not entry[2]:
                entry[0], entry[1] = now, 0
            if entry[1] < self.burst:
                entry[1] += 1
                return True
            entry[2] += 1
            return False

    def report(self) -> list[tuple[tuple, int]]:
        """The kinds whose window is over with lines suppressed, and how many; their counts
        start again.  Kinds quiet for a whole window are forgotten."""
        now = time.monotonic()
        out = []
        with self.lock:
            for kind, entry in list(self.seen.items()):
                if now - entry[0] < self.window:
                    continue
                if entry[2]:
                    out.append((kind, entry[2]))
                    entry[0], entry[1], entry[2] = now, 0, 0
                else:
                    del self.seen[kind]
        return out


def report_suppressed(limit: RepeatLimit, logger: logging.Logger) -> None:
    """One line per kind of log line that went over `limit` in a window now over (called
    periodically by the process's main loop)."""
    for (name, level, msg), count in limit.report():
        logger.log(level, "%d more lines like this were not logged in the last %.0f s (%s): %s",
                   count, limit.window, name, msg, extra=UNLIMITED)


#: How long a line waits for room at a log that does not read (a syslog whose socket's queue
#: is full: 10 datagrams by default, net.unix.max_dgram_qlen; a pipe or a journal socket on
#: stderr that nobody drains) before it counts as lost; while lines are being lost, the next
#: ones do not wait at all.
LOG_WAIT = 0.1

#: pwritev2's flag for a write that never blocks (Linux 4.14; None where Python lacks it: such
#: descriptors are then polled for room before each PIPE_BUF bytes).
_RWF_NOWAIT: int | None = getattr(os, "RWF_NOWAIT", None)


def lost_note(record: logging.LogRecord, text: str) -> logging.LogRecord:
    """The WARNING, stamped like `record`, that says how many lines were lost before it."""
    note = logging.makeLogRecord(record.__dict__)
    note.levelname, note.levelno = "WARNING", logging.WARNING
    note.msg, note.args, note.exc_info, note.exc_text = text, None, None, None
    return note


class StderrHandler(logging.StreamHandler):
    """The default log, stderr, which a pipe, the journal's socket or a terminal may take.
    One that stops reading (a reader that hangs, a stalled journald, a terminal held by
    Ctrl-S) costs lines, never a wait: each line waits at most LOG_WAIT for room, none while
    lines are being lost, and the first line that gets through again is followed by a
    WARNING with how many were lost.  Before, the first thread to log into a full pipe held
    the handler's lock for ever and every thread that logged after it stopped: links, the
    main loop, SIGTERM.  (A regular file always has room: a disk that is slow is waited for.)

    Room for a line is not room for the next one: a pipe says it has room (POLLOUT) while
    one page (PIPE_BUF bytes) is free, a terminal while one byte is, and a line may be longer
    (a traceback), and the loss note follows a line.  So a pipe or a socket is written to
    without waiting at all (RWF_NOWAIT: only this write, never the descriptor the daemon
    shares with its parent), a terminal through a description of its own opened O_NONBLOCK,
    and either is waited for between partial writes; anything else is polled for room
    before each PIPE_BUF bytes.  A line cut short by the wait counts as lost, and
    the next text starts on a line of its own."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.lost = 0
        self.cut = False        # the last line was cut short: the next text starts a line
        self.tty: tuple[tuple[int, int], int] | None = None  # (fd, device), its own description

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fd = self.stream.fileno()
        except (AttributeError, OSError, ValueError):
            super().emit(record)    # not a file (tests swap sys.stderr): nothing can block
            return
        try:
            text = self.format(record) + self.terminator
        except Exception:   # a bad log call: said here, as Handler.handleError would, unblocked
            text = f"--- Logging error ---\n{traceback.format_exc()}Message: {record.msg!r}\n"
        deadline = time.monotonic() + (0.0 if self.lost else LOG_WAIT)
        if not self._write(fd, text, deadline):
            self.lost += 1
            return
        if self.lost:
            note = lost_note(record, f"{self.lost} log lines were lost while stderr could "
                                     "not take them (its reader did not read)")
            if self._write(fd, self.format(note) + self.terminator, deadline):
                self.lost = 0

    def _write(self, fd: int, text: str, deadline: float) -> bool:
        """Write `text` whole, waiting for room until `deadline`; False when it was not
        (its start may have been: the next text then starts with a newline)."""
        data = text.encode(getattr(self.stream, "encoding", None) or "utf-8", "backslashreplace")
        if self.cut:
            data = b"\n" + data
        view = memoryview(data)
        try:
            write = self._nowait_writer(fd)
            while view:
                if write is not None:
                    try:
                        n = write(view)
                    except BlockingIOError:
                        n = 0
                    except OSError as exc:
                        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                            raise
                        write = None        # a kernel without it for this descriptor
                        continue
                    if n == 0 and not _wait_room(fd, deadline):
                        break
                else:
                    if not _wait_room(fd, deadline):
                        break
                    n = os.write(fd, view[:select.PIPE_BUF])
                view = view[n:]
        except OSError:         # a reader that is gone (EPIPE), a descriptor closed under us
            pass
        if len(view) < len(data):       # its start went out, the newline before it too
            self.cut = bool(view)
        return not view

    def _nowait_writer(self, fd: int) -> Callable[[memoryview], int] | None:
        """A write to `fd` that never blocks (BlockingIOError instead), or None: a pipe's or
        a socket's with RWF_NOWAIT; a terminal's through a description of its own opened
        O_NONBLOCK (its poll says room while one byte is free: a terminal whose reader stalls,
        sshd behind a stalled network, is no more read than a pipe)."""
        st = os.fstat(fd)
        if stat.S_ISFIFO(st.st_mode) or stat.S_ISSOCK(st.st_mode):
            if _RWF_NOWAIT is None:
                return None
            return lambda view: os.pwritev(fd, [view], -1, _RWF_NOWAIT)
        if not stat.S_ISCHR(st.st_mode) or not os.isatty(fd):
            return None
        if self.tty is None or self.tty[0] != (fd, st.st_rdev):
            self._close_tty()
            try:
                own = os.open(f"/proc/self/fd/{fd}",
                              os.O_WRONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
            except OSError:
                return None
            self.tty = ((fd, st.st_rdev), own)
        own = self.tty[1]
        return lambda view: os.write(own, view)

    def _close_tty(self) -> None:
        if self.tty is not None:
            os.close(self.tty[1])
            self.tty = None

    def close(self) -> None:
        self.acquire()
        try:
            self._close_tty()
        finally:
            self.release()
        super().close()


def _wait_room(fd: int, deadline: float) -> bool:
    """Whether `fd` has room (poll's POLLOUT) before `deadline`; a reader that is gone
    (POLLERR, POLLHUP) leaves none."""
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    try:
        events = poller.poll(max(0.0, deadline - time.monotonic()) * 1000)
    except OSError:
        return False
    return any(ev & select.POLLOUT and not ev & (select.POLLERR | select.POLLHUP)
               for _fd, ev in events)
