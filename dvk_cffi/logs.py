"""Logging rules shared by the DSP and the emulated node kernel: both log a line per event at
a rate an outsider can set (a peer's refused frames, a program's malformed requests), and both
must keep their log readable and the disk from filling, and never wait for a log nobody
reads."""

from __future__ import annotations

import logging
import select
import sys
import threading
import time

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


def lost_note(record: logging.LogRecord, text: str) -> logging.LogRecord:
    """The WARNING, stamped like `record`, that says how many lines were lost before it."""
    note = logging.makeLogRecord(record.__dict__)
    note.levelname, note.levelno = "WARNING", logging.WARNING
    note.msg, note.args, note.exc_info, note.exc_text = text, None, None, None
    return note


class StderrHandler(logging.StreamHandler):
    """The default log, stderr, which a pipe, the journal's socket or a terminal may take.
    One that stops reading (a reader that hangs, a stalled journald, a terminal held by
    Ctrl-S) costs lines, never a wait: each line first waits at most LOG_WAIT for room, none
    while lines are being lost, and the first line that gets through again is followed by a
    WARNING with how many were lost.  Before, the first thread to log into a full pipe held
    the handler's lock for ever and every thread that logged after it stopped: links, the
    main loop, SIGTERM.  (A regular file always has room: a disk that is slow is waited for.)"""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.lost = 0

    def _room(self) -> bool:
        """Whether a line can be written without blocking (at least one line's room in a pipe
        or socket: poll's POLLOUT); a reader that is gone (POLLERR, POLLHUP) has none."""
        try:
            fd = self.stream.fileno()
        except (AttributeError, OSError, ValueError):
            return True     # not a file (tests swap sys.stderr): nothing can block
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        try:
            events = poller.poll(0 if self.lost else LOG_WAIT * 1000)
        except OSError:
            return True
        return any(ev & select.POLLOUT and not ev & (select.POLLERR | select.POLLHUP)
                   for _fd, ev in events)

    def emit(self, record: logging.LogRecord) -> None:
        if not self._room():
            self.lost += 1
            return
        super().emit(record)
        if self.lost:
            lost, self.lost = self.lost, 0
            super().emit(lost_note(record, f"{lost} log lines were lost while stderr could "
                                            "not take them (its reader did not read)"))
