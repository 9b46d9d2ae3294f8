"""EDVS error codes (the module's list) and the exception raised for them.

Every failing DVK call raises `DvkError`; `DvkError.for_code(code)` builds the per-code
subclass (`DvkError.classes[code]`, named like the C constant, e.g. `EDVSNOTCONN_Error`), so a caller
can catch exactly the condition it handles: `except errors.EDVSNOTCONN_Error`.
"""

from __future__ import annotations

EDVSGENERIC = -99
EDVSPERM = -1
EDVSNOENT = -2
EDVSSRCH = -3
EDVSINTR = -4
EDVSIO = -5
EDVSNXIO = -6
EDVS2BIG = -7
EDVSNOEXEC = -8
EDVSBADF = -9
EDVSCHILD = -10
EDVSAGAIN = -11
EDVSNOMEM = -12
EDVSACCES = -13
EDVSFAULT = -14
EDVSNOTBLK = -15
EDVSBUSY = -16
EDVSEXIST = -17
EDVSXDEV = -18
EDVSNODEV = -19
EDVSNOTDIR = -20
EDVSISDIR = -21
EDVSINVAL = -22
EDVSNFILE = -23
EDVSMFILE = -24
EDVSNOTTY = -25
EDVSTXTBSY = -26
EDVSFBIG = -27
EDVSNOSPC = -28
EDVSSPIPE = -29
EDVSROFS = -30
EDVSMLINK = -31
EDVSPIPE = -32
EDVSDOM = -33
EDVSRANGE = -34
EDVSDEADLK = -35
EDVSNAMETOOLONG = -36
EDVSNOLCK = -37
EDVSNOSYS = -38
EDVSNOTEMPTY = -39
EDVSLOOP = -40
EDVSPACKSIZE = -50
EDVSOUTOFBUFS = -51
EDVSBADIOCTL = -52
EDVSBADMODE = -53
EDVSWOULDBLOCK = -54
EDVSBADDEST = -55
EDVSDSTNOTRCH = -56
EDVSISCONN = -57
EDVSADDRINUSE = -58
EDVSCONNREFUSED = -59
EDVSCONNRESET = -60
EDVSTIMEDOUT = -61
EDVSURG = -62
EDVSNOURG = -63
EDVSNOTCONN = -64
EDVSSHUTDOWN = -65
EDVSNOCONN = -66
EDVSAFNOSUPPORT = -67
EDVSPROTONOSUPPORT = -68
EDVSPROTOTYPE = -69
EDVSINPROGRESS = -70
EDVSADDRNOTAVAIL = -71
EDVSALREADY = -72
EDVSMSGSIZE = -73
EDVSNOTSOCK = -74
EDVSNOPROTOOPT = -75
EDVSLOCKED = -101
EDVSBADCALL = -102
EDVSBADSRCDST = -103
EDVSCALLDENIED = -104
EDVSDEADSRCDST = -105
EDVSNOTREADY = -106
EDVSBADREQUEST = -107
EDVSSRCDIED = -108
EDVSDSTDIED = -109
EDVSTRAPDENIED = -110
EDVSDONTREPLY = -201
EDVSERRCODE = -300
EDVSBADNODEID = -301
EDVSBADDCID = -302
EDVSDCNOTRUN = -303
EDVSBADPROC = -304
EDVSBADPID = -305
EDVSENDPOINT = -306
EDVSNOPROXY = -307
EDVSRMTPROC = -308
EDVSLCLPROC = -309
EDVSNOTBIND = -310
EDVSPROXYRUN = -311
EDVSACKDST = -312
EDVSACKSRC = -313
EDVSACKWAIT = -314
EDVSNODEBUSY = -315
EDVSNONODE = -316
EDVSDVSBUSY = -317
EDVSDVSINIT = -318
EDVSNODCNODE = -319
EDVSPROCRUN = -320
EDVSNOMSG = -321
EDVSDCRUN = -323
EDVSPROCSTS = -324
EDVSNODEFREE = -325
EDVSDCNODE = -326
EDVSBADPROXY = -327
EDVSONCOPY = -328
EDVSENQUEUED = -329
EDVSOVERRUN = -330
EDVSBADOWNER = -331
EDVSMIGRATE = -332
EDVSPROXYFREE = -333
EDVSGRPLEADER = -334
EDVSPRIVILEGES = -335
EDVSBINDTYPE = -336
EDVSSLOTUSED = -337
EDVSBADRANGE = -338
EDVSBADVALUE = -339
EDVSBADDIR = -340
EDVSBADFILE = -341
EDVSRSCBUSY = -342
EDVSNAMESIZE = -343
EDVSALLOCMEM = -344
EDVSPROXYID = -345
EDVSREPLPROC = -346
EDVSALIGN = -347
EDVSWOKENUP = -348
EDVSBADTRAMP = -349
EDVSUSR2USR = -350
EDVSKRN2USR = -351
EDVSUSR2KRN = -352
EDVSPRIMARY = -401
EDVSNOREPLICA = -402
EDVSRESTARTSYS = -512

#: code -> (name, message)
ERRORS: dict[int, tuple[str, str]] = {
    EDVSGENERIC: ("EDVSGENERIC", "generic failure"),
    EDVSPERM: ("EDVSPERM", "operation not permitted"),
    EDVSNOENT: ("EDVSNOENT", "no such file or directory"),
    EDVSSRCH: ("EDVSSRCH", "no such process"),
    EDVSINTR: ("EDVSINTR", "interrupted function call"),
    EDVSIO: ("EDVSIO", "input/output error"),
    EDVSNXIO: ("EDVSNXIO", "no such device or address"),
    EDVS2BIG: ("EDVS2BIG", "argument list too long"),
    EDVSNOEXEC: ("EDVSNOEXEC", "exec format error"),
    EDVSBADF: ("EDVSBADF", "bad file descriptor"),
    EDVSCHILD: ("EDVSCHILD", "no child process"),
    EDVSAGAIN: ("EDVSAGAIN", "resource temporarily unavailable"),
    EDVSNOMEM: ("EDVSNOMEM", "not enough space"),
    EDVSACCES: ("EDVSACCES", "permission denied"),
    EDVSFAULT: ("EDVSFAULT", "bad address"),
    EDVSNOTBLK: ("EDVSNOTBLK", "extension: not a block special file"),
    EDVSBUSY: ("EDVSBUSY", "resource busy"),
    EDVSEXIST: ("EDVSEXIST", "file exists"),
    EDVSXDEV: ("EDVSXDEV", "improper link"),
    EDVSNODEV: ("EDVSNODEV", "no such device"),
    EDVSNOTDIR: ("EDVSNOTDIR", "not a directory"),
    EDVSISDIR: ("EDVSISDIR", "is a directory"),
    EDVSINVAL: ("EDVSINVAL", "invalid argument"),
    EDVSNFILE: ("EDVSNFILE", "too many open files in system"),
    EDVSMFILE: ("EDVSMFILE", "too many open files"),
    EDVSNOTTY: ("EDVSNOTTY", "inappropriate I/O control operation"),
    EDVSTXTBSY: ("EDVSTXTBSY", "text file busy"),
    EDVSFBIG: ("EDVSFBIG", "file too large"),
    EDVSNOSPC: ("EDVSNOSPC", "no space left on device"),
    EDVSSPIPE: ("EDVSSPIPE", "invalid seek"),
    EDVSROFS: ("EDVSROFS", "read-only file system"),
    EDVSMLINK: ("EDVSMLINK", "too many links"),
    EDVSPIPE: ("EDVSPIPE", "broken pipe"),
    EDVSDOM: ("EDVSDOM", "domain error"),
    EDVSRANGE: ("EDVSRANGE", "result too large"),
    EDVSDEADLK: ("EDVSDEADLK", "resource deadlock avoided"),
    EDVSNAMETOOLONG: ("EDVSNAMETOOLONG", "file name too long"),
    EDVSNOLCK: ("EDVSNOLCK", "no locks available"),
    EDVSNOSYS: ("EDVSNOSYS", "function not implemented"),
    EDVSNOTEMPTY: ("EDVSNOTEMPTY", "directory not empty"),
    EDVSLOOP: ("EDVSLOOP", "too many levels of symbolic links"),
    EDVSPACKSIZE: ("EDVSPACKSIZE", "invalid packet size"),
    EDVSOUTOFBUFS: ("EDVSOUTOFBUFS", "not enough buffers left"),
    EDVSBADIOCTL: ("EDVSBADIOCTL", "illegal ioctl for device"),
    EDVSBADMODE: ("EDVSBADMODE", "badmode in ioctl"),
    EDVSWOULDBLOCK: ("EDVSWOULDBLOCK", "would block"),
    EDVSBADDEST: ("EDVSBADDEST", "not a valid destination address"),
    EDVSDSTNOTRCH: ("EDVSDSTNOTRCH", "destination not reachable"),
    EDVSISCONN: ("EDVSISCONN", "all ready connected"),
    EDVSADDRINUSE: ("EDVSADDRINUSE", "address in use"),
    EDVSCONNREFUSED: ("EDVSCONNREFUSED", "connection refused"),
    EDVSCONNRESET: ("EDVSCONNRESET", "connection reset"),
    EDVSTIMEDOUT: ("EDVSTIMEDOUT", "connection timed out"),
    EDVSURG: ("EDVSURG", "urgent data present"),
    EDVSNOURG: ("EDVSNOURG", "no urgent data present"),
    EDVSNOTCONN: ("EDVSNOTCONN", "no connection"),
    EDVSSHUTDOWN: ("EDVSSHUTDOWN", "already shutdown"),
    EDVSNOCONN: ("EDVSNOCONN", "no such connection"),
    EDVSAFNOSUPPORT: ("EDVSAFNOSUPPORT", "address family not supported"),
    EDVSPROTONOSUPPORT: ("EDVSPROTONOSUPPORT", "protocol not supported by AF"),
    EDVSPROTOTYPE: ("EDVSPROTOTYPE", "protocol wrong type for socket"),
    EDVSINPROGRESS: ("EDVSINPROGRESS", "operation now in progress"),
    EDVSADDRNOTAVAIL: ("EDVSADDRNOTAVAIL", "cannot assign requested address"),
    EDVSALREADY: ("EDVSALREADY", "connection already in progress"),
    EDVSMSGSIZE: ("EDVSMSGSIZE", "message too long"),
    EDVSNOTSOCK: ("EDVSNOTSOCK", "socket operation on non-socket"),
    EDVSNOPROTOOPT: ("EDVSNOPROTOOPT", "protocol not available"),
    EDVSLOCKED: ("EDVSLOCKED", "can't send message due to deadlock"),
    EDVSBADCALL: ("EDVSBADCALL", "illegal system call number"),
    EDVSBADSRCDST: ("EDVSBADSRCDST", "bad source or destination process"),
    EDVSCALLDENIED: ("EDVSCALLDENIED", "no permission for system call"),
    EDVSDEADSRCDST: ("EDVSDEADSRCDST", "source or destination is not alive"),
    EDVSNOTREADY: ("EDVSNOTREADY", "source or destination is not ready"),
    EDVSBADREQUEST: ("EDVSBADREQUEST", "destination cannot handle request"),
    EDVSSRCDIED: ("EDVSSRCDIED", "source just died"),
    EDVSDSTDIED: ("EDVSDSTDIED", "destination just died"),
    EDVSTRAPDENIED: ("EDVSTRAPDENIED", "IPC trap not allowed"),
    EDVSDONTREPLY: ("EDVSDONTREPLY", "pseudo-code: don't send a reply"),
    EDVSERRCODE: ("EDVSERRCODE", "error code threshold"),
    EDVSBADNODEID: ("EDVSBADNODEID", "invalid node id"),
    EDVSBADDCID: ("EDVSBADDCID", "invalid DC id"),
    EDVSDCNOTRUN: ("EDVSDCNOTRUN", "DC is not running"),
    EDVSBADPROC: ("EDVSBADPROC", "invalid process"),
    EDVSBADPID: ("EDVSBADPID", "invalid PID"),
    EDVSENDPOINT: ("EDVSENDPOINT", "endpoint mismatch"),
    EDVSNOPROXY: ("EDVSNOPROXY", "no proxy for that node"),
    EDVSRMTPROC: ("EDVSRMTPROC", "process is remote"),
    EDVSLCLPROC: ("EDVSLCLPROC", "process is local"),
    EDVSNOTBIND: ("EDVSNOTBIND", "endpoint not bound"),
    EDVSPROXYRUN: ("EDVSPROXYRUN", "proxy is running"),
    EDVSACKDST: ("EDVSACKDST", "ACK destination is not waiting for it"),
    EDVSACKSRC: ("EDVSACKSRC", "ACK source mismatch"),
    EDVSACKWAIT: ("EDVSACKWAIT", "waiting for an ACK"),
    EDVSNODEBUSY: ("EDVSNODEBUSY", "node is busy"),
    EDVSNONODE: ("EDVSNONODE", "process is not on that node"),
    EDVSDVSBUSY: ("EDVSDVSBUSY", "DVS already initialized"),
    EDVSDVSINIT: ("EDVSDVSINIT", "DVS not initialized"),
    EDVSNODCNODE: ("EDVSNODCNODE", "node is not a member of the DC"),
    EDVSPROCRUN: ("EDVSPROCRUN", "process is running"),
    EDVSNOMSG: ("EDVSNOMSG", "no message"),
    EDVSDCRUN: ("EDVSDCRUN", "DC is running"),
    EDVSPROCSTS: ("EDVSPROCSTS", "bad process status"),
    EDVSNODEFREE: ("EDVSNODEFREE", "node is free"),
    EDVSDCNODE: ("EDVSDCNODE", "node DC membership mismatch"),
    EDVSBADPROXY: ("EDVSBADPROXY", "bad proxy"),
    EDVSONCOPY: ("EDVSONCOPY", "process is copying"),
    EDVSENQUEUED: ("EDVSENQUEUED", "process already has a command enqueued"),
    EDVSOVERRUN: ("EDVSOVERRUN", "overrun"),
    EDVSBADOWNER: ("EDVSBADOWNER", "bad owner"),
    EDVSMIGRATE: ("EDVSMIGRATE", "process is migrating"),
    EDVSPROXYFREE: ("EDVSPROXYFREE", "proxy pair is free"),
    EDVSGRPLEADER: ("EDVSGRPLEADER", "not the thread group leader"),
    EDVSPRIVILEGES: ("EDVSPRIVILEGES", "insufficient privileges"),
    EDVSBINDTYPE: ("EDVSBINDTYPE", "invalid bind type"),
    EDVSSLOTUSED: ("EDVSSLOTUSED", "slot already in use"),
    EDVSBADRANGE: ("EDVSBADRANGE", "value out of range"),
    EDVSBADVALUE: ("EDVSBADVALUE", "bad value"),
    EDVSBADDIR: ("EDVSBADDIR", "bad directory"),
    EDVSBADFILE: ("EDVSBADFILE", "bad file"),
    EDVSRSCBUSY: ("EDVSRSCBUSY", "resource busy"),
    EDVSNAMESIZE: ("EDVSNAMESIZE", "name too long"),
    EDVSALLOCMEM: ("EDVSALLOCMEM", "cannot allocate memory"),
    EDVSPROXYID: ("EDVSPROXYID", "invalid proxy id"),
    EDVSREPLPROC: ("EDVSREPLPROC", "process is a replica"),
    EDVSALIGN: ("EDVSALIGN", "bad alignment"),
    EDVSWOKENUP: ("EDVSWOKENUP", "woken up"),
    EDVSBADTRAMP: ("EDVSBADTRAMP", "bad trampoline"),
    EDVSUSR2USR: ("EDVSUSR2USR", "user to user IPC not allowed"),
    EDVSKRN2USR: ("EDVSKRN2USR", "kernel to user IPC not allowed"),
    EDVSUSR2KRN: ("EDVSUSR2KRN", "user to kernel IPC not allowed"),
    EDVSPRIMARY: ("EDVSPRIMARY", "process is the primary"),
    EDVSNOREPLICA: ("EDVSNOREPLICA", "no replica"),
    EDVSRESTARTSYS: ("EDVSRESTARTSYS", "restart the system call"),
}


def error_name(code: int) -> str:
    """C name of an EDVS code (`EDVS?` for an unknown one)."""
    return ERRORS.get(code, (f"EDVS?{code}", ""))[0]


def error_message(code: int) -> str:
    """Human description of an EDVS code."""
    return ERRORS.get(code, ("", f"unknown DVK error {code}"))[1]


class DvkError(Exception):
    """A DVK call failed with a negative EDVS code."""

    classes: dict[int, type[DvkError]] = {}

    def __init__(self, code: int, context: str = "") -> None:
        self.code = code
        self.context = context
        self.name = error_name(code)
        self.message = error_message(code)
        text = f"{self.name} ({code}): {self.message}"
        super().__init__(f"{context}: {text}" if context else text)

    def __reduce__(self):
        return (DvkError.for_code, (self.code, self.context))

    @staticmethod
    def for_code(code: int, context: str = "") -> DvkError:
        """The exception instance of the subclass for `code`."""
        cls = DvkError.classes.get(code, DvkError)
        return cls(code, context)


def _make_classes() -> None:
    for code, (name, _msg) in ERRORS.items():
        cls = type(f"{name}_Error", (DvkError,), {"__doc__": f"{name} ({code})"})
        DvkError.classes[code] = cls
        globals()[cls.__name__] = cls


_make_classes()


def check(rc: int, context: str = "") -> int:
    """Return `rc` when it is a success value; raise the matching DvkError when it is an error.

    Codes below EDVSERRCODE, the POSIX-like codes and the Linux errnos the kernel returns are
    errors; task endpoints (-1..-35) returned by bind/getep are not, the callers of those calls
    use `check_ep` instead.
    """
    if rc < 0:
        raise DvkError.for_code(rc, context)
    return rc


def check_ep(rc: int, context: str = "") -> int:
    """Like `check` for calls whose success value is an endpoint, which may be negative."""
    if rc < EDVSERRCODE:
        raise DvkError.for_code(rc, context)
    return rc
