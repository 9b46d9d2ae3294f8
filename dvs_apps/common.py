"""Helpers shared by the DVS programs: opening the DVK, signals, argument parsing, output."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence

from dvk_cffi import Dvk, DvkError, open_dvk

#: Environment variable that chooses the DVK backend of the programs (auto, kernel, emu, emu-ioctl).
MODE_ENV = "DVK_MODE"
#: Set to a non-empty value other than 0 for the C programs' debug lines on stdout.
DEBUG_ENV = "DVS_DEBUG"


class UsageError(Exception):
    """Bad command line: the message is the usage text or what is wrong."""


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def debug(text: str) -> None:
    """A debug line like the C `USRDEBUG` (leading space), only with DVS_DEBUG set."""
    if debug_enabled():
        print(" " + text, flush=True)


def open_program_dvk(prog: str | None = None) -> Dvk:
    """Open this node's DVK for a program: backend from DVK_MODE (default auto), node from
    DVK_NODE / DVK_SOCKET.  `prog` (when given) becomes the process name the node kernel
    shows in /proc/dvs/<DC>/procs, as the C binary's name would."""
    if prog:
        sys.argv[0] = prog
    return open_dvk(os.environ.get(MODE_ENV, "auto") or "auto")


def parse_int(text: str, what: str) -> int:
    """An integer argument (decimal, or 0x.. hex), UsageError naming `what` otherwise."""
    try:
        return int(text, 0)
    except ValueError:
        raise UsageError(f"{what} must be an integer, not {text!r}") from None


class Terminated(BaseException):
    """Raised in the main thread by SIGTERM / SIGINT (see `install_signals`)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def install_signals() -> bool:
    """Turn SIGTERM and SIGINT into `Terminated` in the main thread (a call blocked in the DVK
    is interrupted).  Only from the main thread; returns whether it was installed."""
    if threading.current_thread() is not threading.main_thread():
        return False

    def handler(signum, _frame):
        raise Terminated(signum)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return True


def error_text(err: BaseException) -> str:
    """`[context: ]NAME (code): message` of a DVK error, the text of any other error."""
    return str(err) or type(err).__name__


def print_error(text: str) -> None:
    """The C programs' `ERROR: ...` line, on stderr."""
    print(f"ERROR: {text}", file=sys.stderr, flush=True)


def run_program(name: str, argv: list[str] | None, parse: Callable[[list[str]], Sequence],
                body: Callable[..., int], errors: tuple = (),
                interrupted: int = 0) -> int:
    """The frame every DVS program shares: parse the C command line (`parse` raises
    UsageError), open the DVK, run `body(dvk, *parsed)`, print `ERROR: ...` and return 1 on a
    DVK, OS or listed error, return `interrupted` on SIGTERM/SIGINT, and always close the DVK.
    `argv` is None for the real program (sys.argv; signals installed, process renamed)."""
    program = argv is None
    if program:
        argv = sys.argv[1:]
    try:
        args = parse(argv)
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return 1
    if program:
        install_signals()
    dvk = None
    try:
        dvk = open_program_dvk(name if program else None)
        return body(dvk, *args)
    except Terminated:
        if interrupted:
            print_error("interrupted")
        return interrupted
    except (DvkError, OSError, *errors) as err:
        print_error(error_text(err))
        return 1
    finally:
        if dvk is not None:
            dvk.close()
