"""m3ftp / m3ftpd: file transfer through M3-IPC and vcopy (the C test pair's protocol).

    m3ftpd <dcid> <srv_ep>
    m3ftp {-p|-g} <dcid> <clt_ep> <srv_ep> <rmt_fname> <lcl_fname>
    python -m dvs_apps.m3ftp server|client ARGS...   (or: python -m dvs_apps.m3ftp -p|-g ...)

Messages carry only requests and results; the path and the file data move by `vcopy` between
1 MiB buffers that both programs get from `dvk.alloc` (shared memory under the emulator, so the
data never crosses the node kernel's socket).  Request fields (m3ftp.h):

    FTPOPER = m_type   FTPPATH = m1_p1 (client address of the path)   FTPPLEN = m1_i1
    FTPDATA = m1_p2 (client address of its 1 MiB buffer)   FTPDLEN = m1_i2   FTPPOS = m1_i3

Operations: FTP_GET 1, FTP_PUT 2, FTP_GNEXT 3, FTP_PNEXT 4, FTP_CANCEL 5, and FTP_SUM 6 (new).

Protocol:
- First request GET/PUT/SUM to `srv_ep`: the server pulls the path from the blocked client
  (vcopy client -> server).  GET/PUT answer `m_type` = the endpoint to use for the transfer
  (the server's own), or a negative EDVS code when the request or the file is refused.
- GET: the client sends GNEXT (FTPDATA, FTPDLEN = 1 MiB, FTPPOS); the server reads up to
  FTPDLEN bytes at FTPPOS, vcopies them into FTPDATA and answers `m_type` 0 and FTPDLEN = bytes.
  A chunk shorter than asked (also 0 bytes) is the last one, for both sides: the server ends the
  transfer after answering it and the client stops after writing it.  (The C server waited for
  another GNEXT after a short chunk; fixed.)
- PUT: the client sends PNEXT with FTPDLEN = bytes in its buffer (at most 1 MiB); the server
  vcopies them out of FTPDATA and writes them at FTPPOS; answers `m_type` 0.  A PNEXT with
  FTPDLEN 0 ends the transfer: the server closes the file and answers once with 0 or the error
  (the C server sent a second reply to the finished client; fixed).
- CANCEL inside a transfer: the server answers CANCEL and drops the transfer.
- SUM (new): path as in GET; the server vcopies the 32-byte SHA-256 of its file into FTPDATA and
  answers `m_type` 0, FTPDLEN 32 (or a negative EDVS code).  After a transfer the client compares
  it with the SHA-256 of its local file and prints `verified` only when both match.

The server resolves relative file names against `$M3FTPD_DIR` when set, else its working
directory (absolute names are used as given, as in C), and appends the statistics of every
transfer to `m3ftpd_<srv_ep>.log` in that directory:
    FTP_GET: t_start=... t_stop=... t_total=...
    FTP_GET: total_bytes=... Throughput=... [bytes/s]

Exit status: the client 0 when the transfer finished and was verified (or the server does not
know FTP_SUM), 1 otherwise; the server 1 on a fatal DVK error, 0 on SIGTERM/SIGINT.
"""

from __future__ import annotations

import errno
import hashlib
import os
import sys
import time

from dvk_cffi import Message
from dvk_cffi import consts as C
from dvk_cffi import errors as E
from dvk_cffi.errors import DvkError

from .common import (
    UsageError,
    debug,
    error_text,
    parse_int,
    print_error,
    run_program,
)

FTP_NONE, FTP_GET, FTP_PUT, FTP_GNEXT, FTP_PNEXT, FTP_CANCEL, FTP_SUM = range(7)
OP_NAMES = {FTP_GET: "FTP_GET", FTP_PUT: "FTP_PUT", FTP_SUM: "FTP_SUM"}
MAXBUFLEN = C.MAXCOPYLEN          # 1 MiB
MAXPATHLEN = 1024
SEND_RECV_MS = 30000
MAX_RETRIES = 3
DIGEST_SIZE = 32
DIR_ENV = "M3FTPD_DIR"

SERVER_USAGE = "usage: m3ftpd <dcid> <srv_ep>"
CLIENT_USAGE = "usage: m3ftp {-p|-g} <dcid> <clt_ep> <srv_ep> <rmt_fname> <lcl_fname>"


def _errno_code(exc: OSError) -> int:
    """The EDVS code for a failed file operation (the POSIX-like codes are -errno)."""
    code = -(exc.errno or errno.EIO)
    return code if code in E.ERRORS else E.EDVSIO


def file_digest(path: str) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(MAXBUFLEN)
            if not block:
                break
            h.update(block)
    return h.digest()


# ================================================================================== server
class Server:
    """m3ftpd: serves one transfer at a time, like the C server."""

    def __init__(self, dvk, dcid: int, srv_nr: int, directory: str | None = None) -> None:
        self.dvk = dvk
        self.dcid = dcid
        self.directory = os.path.abspath(directory or os.environ.get(DIR_ENV) or os.getcwd())
        self.ep = dvk.bind(dcid, srv_nr)
        if self.ep < E.EDVSERRCODE:
            raise DvkError.for_code(self.ep, "bind")
        nodeid, _dvs = dvk.getdvsinfo()
        self.nodeid = nodeid
        debug(f"m3ftp.py:server:node={nodeid} dc={dcid} srv_ep={self.ep} dir={self.directory}")
        self.path_buf = dvk.alloc(MAXPATHLEN)
        self.data = dvk.alloc(MAXBUFLEN)
        self.log_path = os.path.join(self.directory, f"m3ftpd_{self.ep}.log")

    # ------------------------------------------------------------------ IPC helpers
    def reply(self, ep: int, m: Message, rcode: int | None = None) -> bool:
        """Answer `ep` (send_T, up to MAX_RETRIES tries on timeout); False when it failed."""
        if rcode is not None:
            m.m_type = rcode
        for _ in range(MAX_RETRIES):
            try:
                self.dvk.send(ep, m, SEND_RECV_MS)
                return True
            except DvkError as err:
                if err.code != E.EDVSTIMEDOUT:
                    print_error(f"reply to {ep}: {error_text(err)}")
                    return False
        print_error(f"reply to {ep}: timed out")
        return False

    def _client_gone(self, ep: int, lpid: int) -> bool:
        try:
            info = self.dvk.getprocinfo(self.dcid, C._ENDPOINT_P(ep))
        except DvkError:
            return True
        return bool(info.p_rts_flags & C.SLOT_FREE) or info.p_endpoint != ep \
            or info.p_lpid != lpid

    def receive_from(self, ep: int, lpid: int, m: Message) -> bool:
        """The next request of the client in a transfer (receive_T, MAX_RETRIES tries)."""
        for _ in range(MAX_RETRIES):
            try:
                self.dvk.receive(ep, m, SEND_RECV_MS)
                return True
            except DvkError as err:
                if err.code != E.EDVSTIMEDOUT:
                    print_error(f"receive from {ep}: {error_text(err)}")
                    return False
                if self._client_gone(ep, lpid):
                    print_error(f"client {ep} is gone")
                    return False
        print_error(f"receive from {ep}: timed out")
        return False

    # ------------------------------------------------------------------ serving
    def serve_forever(self) -> None:
        m = self.dvk.message()
        while True:
            try:
                self.dvk.receive(C.ANY, m, SEND_RECV_MS)
            except DvkError as err:
                if err.code == E.EDVSTIMEDOUT:
                    continue
                raise
            self.handle(m)

    def handle(self, m: Message) -> None:
        """One first request (GET, PUT, SUM) and, for GET/PUT, the whole transfer."""
        op, ftp_ep = m.m_type, m.m_source
        if op not in OP_NAMES:
            self.reply(ftp_ep, m, E.EDVSINVAL)
            return
        if not 0 <= m.m1_i1 < MAXPATHLEN:
            self.reply(ftp_ep, m, E.EDVSNAMESIZE)
            return
        if not 0 <= m.m1_i2 <= MAXBUFLEN:
            self.reply(ftp_ep, m, E.EDVSMSGSIZE)
            return
        plen = m.m1_i1
        try:
            if plen:
                self.dvk.vcopy(ftp_ep, m.m1_p1, self.ep, self.path_buf.addr, plen)
            name = self.path_buf.read(plen).decode()
        except DvkError as err:
            print_error(f"{OP_NAMES[op]}: path from {ftp_ep}: {error_text(err)}")
            self.reply(ftp_ep, m, err.code)
            return
        except UnicodeDecodeError:
            self.reply(ftp_ep, m, E.EDVSINVAL)
            return
        if "\0" in name:               # names no file: open() would raise ValueError
            self.reply(ftp_ep, m, E.EDVSINVAL)
            return
        path = os.path.join(self.directory, name) if name else ""
        lpid = -1
        try:
            lpid = self.dvk.getprocinfo(self.dcid, C._ENDPOINT_P(ftp_ep)).p_lpid
        except DvkError:
            pass
        debug(f"m3ftp.py:server:{OP_NAMES[op]} {name!r} from {ftp_ep}")
        if op == FTP_SUM:
            self.do_sum(m, ftp_ep, path)
        elif op == FTP_GET:
            self.do_get(m, ftp_ep, lpid, name, path)
        else:
            self.do_put(m, ftp_ep, lpid, name, path)

    def do_sum(self, m: Message, ftp_ep: int, path: str) -> None:
        if m.m1_i2 < DIGEST_SIZE:
            self.reply(ftp_ep, m, E.EDVSMSGSIZE)
            return
        try:
            digest = file_digest(path)
        except OSError as exc:
            self.reply(ftp_ep, m, _errno_code(exc))
            return
        self.data.write(digest)
        try:
            self.dvk.vcopy(self.ep, self.data.addr, ftp_ep, m.m1_p2, DIGEST_SIZE)
        except DvkError as err:
            self.reply(ftp_ep, m, err.code)
            return
        m.m1_i2 = DIGEST_SIZE
        self.reply(ftp_ep, m, 0)

    def _stats(self, op: str, t_start: float, t_stop: float, total: int) -> None:
        t_total = t_stop - t_start
        rate = total / t_total if t_total > 0 else 0.0
        try:
            with open(self.log_path, "a") as f:
                f.write(f"{op}: t_start={t_start:.2f} t_stop={t_stop:.2f} t_total={t_total:.2f}\n")
                f.write(f"{op}: total_bytes={total} Throughput={rate:f} [bytes/s]\n")
        except OSError as exc:
            print_error(f"cannot write {self.log_path}: {exc.strerror}")
        print(f"m3ftpd: {op} {total} bytes in {t_total:.6f} s ({rate:.0f} bytes/s)", flush=True)

    def _next_chunk(self, ftp_ep: int, lpid: int, req: Message, op: int,
                    name: str) -> int | None:
        """Receive the client's next GNEXT/PNEXT and return its chunk length; None ends the
        transfer (the client cancelled, asked something else, or sent a bad length — each
        answered as the C server does)."""
        if not self.receive_from(ftp_ep, lpid, req):
            return None
        if req.m_type == FTP_CANCEL:
            self.reply(ftp_ep, req, FTP_CANCEL)
            what = "FTP_GET" if op == FTP_GNEXT else "FTP_PUT"
            print(f"m3ftpd: {what} {name!r} cancelled by {ftp_ep}", flush=True)
            return None
        if req.m_type != op:
            self.reply(ftp_ep, req, E.EDVSINVAL)
            return None
        if not 0 <= req.m1_i2 <= MAXBUFLEN:
            self.reply(ftp_ep, req, E.EDVSMSGSIZE)
            return None
        return req.m1_i2

    def do_get(self, m: Message, ftp_ep: int, lpid: int, name: str, path: str) -> None:
        try:
            f = open(path, "rb")
        except OSError as exc:
            print_error(f"FTP_GET {name!r}: {exc.strerror}")
            self.reply(ftp_ep, m, _errno_code(exc))
            return
        with f:
            t_start = time.time()
            if not self.reply(ftp_ep, m, self.ep):
                return
            total = 0
            req = self.dvk.message()
            while True:
                want = self._next_chunk(ftp_ep, lpid, req, FTP_GNEXT, name)
                if want is None:
                    return
                try:
                    if req.m1_i3 != f.tell():
                        f.seek(req.m1_i3)
                    n = f.readinto(self.data.view[:want]) or 0
                except (OSError, ValueError) as exc:
                    code = _errno_code(exc) if isinstance(exc, OSError) else E.EDVSINVAL
                    self.reply(ftp_ep, req, code)
                    return
                if n > 0:
                    try:
                        self.dvk.vcopy(self.ep, self.data.addr, ftp_ep, req.m1_p2, n)
                    except DvkError as err:
                        print_error(f"FTP_GET vcopy to {ftp_ep}: {error_text(err)}")
                        self.reply(ftp_ep, req, err.code)
                        return
                req.m1_i2 = n
                if not self.reply(ftp_ep, req, 0):
                    return
                total += n
                if n < want or n == 0:      # the last chunk, for both sides
                    break
            self._stats("FTP_GET", t_start, time.time(), total)

    def do_put(self, m: Message, ftp_ep: int, lpid: int, name: str, path: str) -> None:
        try:
            f = open(path, "wb")
        except OSError as exc:
            print_error(f"FTP_PUT {name!r}: {exc.strerror}")
            self.reply(ftp_ep, m, _errno_code(exc))
            return
        t_start = time.time()
        total = 0
        done = False
        try:
            if not self.reply(ftp_ep, m, self.ep):
                return
            req = self.dvk.message()
            while True:
                n = self._next_chunk(ftp_ep, lpid, req, FTP_PNEXT, name)
                if n is None:
                    return
                if n == 0:                  # end of the file: close, answer once
                    rc = 0
                    try:
                        f.close()
                    except OSError as exc:
                        rc = _errno_code(exc)
                    done = True
                    self.reply(ftp_ep, req, rc)
                    break
                try:
                    self.dvk.vcopy(ftp_ep, req.m1_p2, self.ep, self.data.addr, n)
                except DvkError as err:
                    print_error(f"FTP_PUT vcopy from {ftp_ep}: {error_text(err)}")
                    self.reply(ftp_ep, req, err.code)
                    return
                try:
                    if req.m1_i3 != f.tell():
                        f.seek(req.m1_i3)
                    f.write(self.data.view[:n])
                except (OSError, ValueError) as exc:
                    code = _errno_code(exc) if isinstance(exc, OSError) else E.EDVSINVAL
                    self.reply(ftp_ep, req, code)
                    return
                total += n
                if not self.reply(ftp_ep, req, 0):
                    return
        finally:
            if not f.closed:
                f.close()
        if done:
            self._stats("FTP_PUT", t_start, time.time(), total)


def _server_args(argv: list[str]) -> tuple[int, int]:
    if len(argv) != 2:
        raise UsageError(SERVER_USAGE)
    return parse_int(argv[0], "dcid"), parse_int(argv[1], "srv_ep")


def _serve(dvk, dcid: int, srv_nr: int) -> int:
    server = Server(dvk, dcid, srv_nr)
    print(f"m3ftpd: DC {dcid} endpoint {server.ep} on node {server.nodeid}, "
          f"serving {server.directory}", flush=True)
    server.serve_forever()
    return 0


def server_main(argv: list[str] | None = None) -> int:
    """`m3ftpd <dcid> <srv_ep>`; `argv` without the program name (None: sys.argv)."""
    return run_program("m3ftpd", argv, _server_args, _serve)


# ================================================================================== client
class TransferError(Exception):
    """The transfer failed; the text says why."""


class Client:
    """m3ftp: one PUT or GET, then the FTP_SUM check."""

    def __init__(self, dvk, dcid: int, clt_nr: int, srv_ep: int) -> None:
        self.dvk = dvk
        self.dcid = dcid
        self.srv_ep = srv_ep
        self.ep = dvk.bind(dcid, clt_nr)
        if self.ep < E.EDVSERRCODE:
            raise DvkError.for_code(self.ep, "bind")
        nodeid, _dvs = dvk.getdvsinfo()
        debug(f"m3ftp.py:client:node={nodeid} dc={dcid} clt_ep={self.ep} srv_ep={srv_ep}")
        self.path_buf = dvk.alloc(MAXPATHLEN)
        self.data = dvk.alloc(MAXBUFLEN)

    def request(self, ep: int, m: Message) -> Message:
        """sendrec_T with MAX_RETRIES tries on EDVSAGAIN / EDVSTIMEDOUT."""
        for attempt in range(MAX_RETRIES):
            try:
                self.dvk.sendrec(ep, m, SEND_RECV_MS)
                return m
            except DvkError as err:
                if err.code not in (E.EDVSAGAIN, E.EDVSTIMEDOUT) or attempt == MAX_RETRIES - 1:
                    raise
        raise AssertionError("unreachable")

    def first(self, op: int, rmt_name: str) -> Message:
        raw = rmt_name.encode()
        if len(raw) >= MAXPATHLEN:
            raise TransferError(f"remote file name longer than {MAXPATHLEN - 1} bytes")
        self.path_buf.write(raw)
        m = self.dvk.message()
        m.m_type = op
        m.m1_p1 = self.path_buf.addr
        m.m1_i1 = len(raw)
        m.m1_p2 = self.data.addr
        m.m1_i2 = MAXBUFLEN
        m.m1_i3 = 0
        return self.request(self.srv_ep, m)

    def cancel(self, ep: int) -> None:
        m = self.dvk.message()
        m.m_type = FTP_CANCEL
        try:
            self.request(ep, m)
        except DvkError:
            pass

    def get(self, rmt_name: str, lcl_name: str) -> int:
        m = self.first(FTP_GET, rmt_name)
        if m.m_type < 0:
            raise DvkError.for_code(m.m_type, f"FTP_GET {rmt_name}")
        ep = m.m_type
        try:
            out = open(lcl_name, "wb")
        except OSError as exc:
            self.cancel(ep)
            raise TransferError(f"cannot open {lcl_name}: {exc.strerror}") from None
        pos = 0
        with out:
            while True:
                self._chunk(ep, m, FTP_GNEXT, MAXBUFLEN, pos)
                n = m.m1_i2
                if not 0 <= n <= MAXBUFLEN:
                    raise DvkError.for_code(E.EDVSMSGSIZE, f"FTP_GNEXT length {n}")
                out.write(self.data.view[:n])
                pos += n
                if n < MAXBUFLEN:
                    break
        return pos

    def _chunk(self, ep: int, m: Message, op: int, length: int, pos: int) -> None:
        """One GNEXT/PNEXT round trip on the data buffer; raises unless the server said 0."""
        m.clear()
        m.m_type, m.m1_p2, m.m1_i2, m.m1_i3 = op, self.data.addr, length, pos
        self.request(ep, m)
        if m.m_type != 0:
            what = "FTP_GNEXT" if op == FTP_GNEXT else "FTP_PNEXT"
            raise DvkError.for_code(m.m_type, what) if m.m_type < 0 else \
                TransferError(f"{what}: unexpected answer {m.m_type}")

    def put(self, rmt_name: str, lcl_name: str) -> int:
        try:
            src = open(lcl_name, "rb")
        except OSError as exc:
            raise TransferError(f"cannot open {lcl_name}: {exc.strerror}") from None
        with src:
            m = self.first(FTP_PUT, rmt_name)
            if m.m_type < 0:
                raise DvkError.for_code(m.m_type, f"FTP_PUT {rmt_name}")
            ep = m.m_type
            pos = 0
            while True:
                try:
                    n = src.readinto(self.data.view) or 0
                except OSError as exc:
                    self.cancel(ep)
                    raise TransferError(f"reading {lcl_name}: {exc.strerror}") from None
                self._chunk(ep, m, FTP_PNEXT, n, pos)
                pos += n
                if n == 0:
                    break
        return pos

    def remote_digest(self, rmt_name: str) -> bytes | None:
        """SHA-256 of the server's file; None when the server does not know FTP_SUM."""
        m = self.first(FTP_SUM, rmt_name)
        if m.m_type == E.EDVSINVAL:
            return None
        if m.m_type != 0:
            raise DvkError.for_code(m.m_type, "FTP_SUM") if m.m_type < 0 else \
                TransferError(f"FTP_SUM: unexpected answer {m.m_type}")
        if m.m1_i2 != DIGEST_SIZE:
            raise TransferError(f"FTP_SUM: digest of {m.m1_i2} bytes")
        return self.data.read(DIGEST_SIZE)


def run_client(dvk, op: str, dcid: int, clt_nr: int, srv_ep: int, rmt_name: str,
               lcl_name: str, out=None) -> int:
    out = out or sys.stdout
    client = Client(dvk, dcid, clt_nr, srv_ep)
    opname = "FTP_PUT" if op == "-p" else "FTP_GET"
    t0 = time.perf_counter()
    total = client.put(rmt_name, lcl_name) if op == "-p" else client.get(rmt_name, lcl_name)
    seconds = time.perf_counter() - t0
    rate = total / seconds if seconds > 0 else 0.0
    local = file_digest(lcl_name).hex()
    remote = client.remote_digest(rmt_name)
    direction = f"{lcl_name} -> {rmt_name}" if op == "-p" else f"{rmt_name} -> {lcl_name}"
    out.write(f"{opname} {direction}: {total} bytes in {seconds:.6f} s, {rate:.0f} bytes/s\n")
    out.write(f"sha256 local  {local}\n")
    if remote is None:
        out.write("not verified: the server does not know FTP_SUM\n")
        out.flush()
        return 0
    out.write(f"sha256 remote {remote.hex()}\n")
    if remote.hex() == local:
        out.write("verified\n")
        out.flush()
        return 0
    out.write("MISMATCH: the files differ\n")
    out.flush()
    return 1


def _client_args(argv: list[str]) -> tuple:
    if len(argv) != 6 or argv[0] not in ("-p", "-g"):
        raise UsageError(CLIENT_USAGE)
    return (argv[0], parse_int(argv[1], "dcid"), parse_int(argv[2], "clt_ep"),
            parse_int(argv[3], "srv_ep"), argv[4], argv[5])


def client_main(argv: list[str] | None = None) -> int:
    """`m3ftp {-p|-g} <dcid> <clt_ep> <srv_ep> <rmt_fname> <lcl_fname>`."""
    return run_program("m3ftp", argv, _client_args, run_client, errors=(TransferError,),
                       interrupted=1)


def main(argv: list[str] | None = None) -> int:
    """`python -m dvs_apps.m3ftp server|client ARGS...`."""
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-p", "-g"):       # `python -m dvs_apps.m3ftp -p ...` = m3ftp
        args = ["client", *args]
    if not args or args[0] not in ("server", "client"):
        print(f"usage: python -m dvs_apps.m3ftp server|client ARGS... | -p|-g ARGS...\n"
              f"  {SERVER_USAGE}\n"
              f"  {CLIENT_USAGE}", file=sys.stderr)
        return 1
    role, rest = args[0], args[1:]
    if argv is None:
        sys.argv = [sys.argv[0], *rest]
        return server_main() if role == "server" else client_main()
    return server_main(rest) if role == "server" else client_main(rest)


if __name__ == "__main__":
    sys.exit(main())
