"""`dvsctl`: administration of a DVS node through the DVK interface (kernel module or emulator).

    dvsctl [--dvk auto|kernel|emu|emu-ioctl] [--node N] [--rundir DIR] COMMAND ...

Emulated node kernels (docs/emulator.md):
    node run N [params]       run node N's kernel in the foreground (log on stderr);
                              --dcs N creates DC0..DC(N-1) (default DC0 only)
    node start N [params]     the same, detached; prints its pid
    node stop N               ask node N's kernel to stop
    node list                 the node kernels of the run directory
DVS administration (the C test_* utilities):
    init NODEID [params]      dvs_init (a kernel backend; an emulated node is initialised)
    dc-init [-d DCID ...]     dc_init            dc-end DCID       dc_end
    add-node DCID NODE        del-node DCID NODE
    bind DCID EP              bind dvsctl itself, held until SIGTERM/SIGINT
    lclbind DCID PID EP       bind another local process
    rmtbind DCID EP NODE [NAME]   bind EP as a process of remote node NODE
    unbind DCID EP            unbind (a local process gets SIGTERM; waits until it is gone)
Views (the /proc/dvs files, same columns):
    info   nodes   proxies   procs [DC]   dcinfo [DC]   stats [DC]   procinfo DC EP

Errors print `dvsctl: <NAME> (<code>): <message>` and exit with status 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import socket
import struct
import sys
import time

from dvk_cffi import consts as C
from dvk_cffi import open_dvk
from dvk_cffi.errors import EDVSAGAIN, EDVSDCNOTRUN, EDVSTIMEDOUT, DvkError
from dvk_cffi.info import DcInfo, DvsInfo

from .common import Terminated, install_signals

PROG = "dvsctl"
PROC_DVS = "/proc/dvs"

#: (option, DvsInfo field, help) of the DVS parameters (test_dvs_init's -V -N -P -T -S -B -L -D).
DVS_PARAMS = [
    ("--name", "d_name", "DVS name (default DEFAULT)"),
    ("--nr-dcs", "d_nr_dcs", f"number of DCs (default {C.NR_DCS})"),
    ("--nr-nodes", "d_nr_nodes", f"number of nodes (default {C.NR_NODES})"),
    ("--nr-procs", "d_nr_procs", f"processes per DC, maximum (default {C.NR_PROCS})"),
    ("--nr-tasks", "d_nr_tasks", f"kernel tasks per DC, maximum (default {C.NR_TASKS})"),
    ("--nr-sysprocs", "d_nr_sysprocs",
     f"system processes per DC, maximum (default {C.NR_SYS_PROCS})"),
    ("--max-copybuf", "d_max_copybuf", f"proxy copy buffer (default {C.MAXCOPYBUF})"),
    ("--max-copylen", "d_max_copylen", f"largest vcopy (default {C.MAXCOPYLEN})"),
    ("--dbglvl", "d_dbglvl", "debug level (default 0)"),
]
#: (option, DcInfo field, help) of DC0 as a node kernel creates it (test_dc_init's options).
DC0_PARAMS = [
    ("--dc-name", "dc_name", "name of DC0 (default DC0)"),
    ("--dc-nr-procs", "dc_nr_procs", f"DC0 nr_procs (default {C.DEFAULT_DC0['dc_nr_procs']})"),
    ("--dc-nr-tasks", "dc_nr_tasks", f"DC0 nr_tasks (default {C.DEFAULT_DC0['dc_nr_tasks']})"),
    ("--dc-nr-sysprocs", "dc_nr_sysprocs",
     f"DC0 nr_sysprocs (default {C.DEFAULT_DC0['dc_nr_sysprocs']})"),
    ("--dc-nr-nodes", "dc_nr_nodes", f"DC0 nr_nodes (default {C.DEFAULT_DC0['dc_nr_nodes']})"),
]
STR_FIELDS = {"d_name", "dc_name"}


class CtlError(Exception):
    """A dvsctl failure that is not a DVK error code: printed as `dvsctl: <text>`."""


# ================================================================================== helpers
def _int(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def _add_params(parser: argparse.ArgumentParser, params, title: str) -> None:
    group = parser.add_argument_group(title)
    for opt, fld, help_ in params:
        group.add_argument(opt, dest=fld, metavar="NAME" if fld in STR_FIELDS else "N",
                           type=str if fld in STR_FIELDS else _int, default=None, help=help_)


def _dvs_info(args) -> DvsInfo:
    info = DvsInfo()
    for _opt, fld, _h in DVS_PARAMS:
        value = getattr(args, fld, None)
        if value is not None:
            setattr(info, fld, value)
    if info.d_nr_tasks < info.d_nr_nodes + 3:   # test_dvs_init's own check
        raise CtlError(f"nr_tasks ({info.d_nr_tasks}) must be at least nr_nodes + 3 "
                       f"({info.d_nr_nodes + 3})")
    return info


def _dc0_info(args, dvs: DvsInfo) -> DcInfo:
    """DC0's parameters: the options given, else the reference DC0 within the DVS limits."""
    info = DcInfo(dc_flags=C.DC_RUNNING)
    info.dc_nr_procs = min(info.dc_nr_procs, dvs.d_nr_procs)
    info.dc_nr_tasks = min(info.dc_nr_tasks, dvs.d_nr_tasks)
    info.dc_nr_sysprocs = min(info.dc_nr_sysprocs, dvs.d_nr_sysprocs)
    info.dc_nr_nodes = min(info.dc_nr_nodes, dvs.d_nr_nodes)
    for _opt, fld, _h in DC0_PARAMS:
        value = getattr(args, fld, None)
        if value is not None:
            setattr(info, fld, value)
    return info


def _dc_infos(args, dvs: DvsInfo) -> list[DcInfo]:
    """DC0 (`_dc0_info`) and, with `--dcs N`, DC1..DC(N-1) with the same parameters."""
    n = getattr(args, "dcs", 1) or 1
    if not 1 <= n <= dvs.d_nr_dcs:
        raise CtlError(f"--dcs {n}: must be 1..{dvs.d_nr_dcs} (d_nr_dcs)")
    dc0 = _dc0_info(args, dvs)
    out = [dc0]
    base = "DC" if dc0.dc_name == "DC0" else dc0.dc_name
    for dcid in range(1, n):
        name = f"{base}{dcid}"     # a kernel refuses a second DC of the same name
        if len(name) >= C.MAXDCNAME:
            raise CtlError(f"--dc-name {dc0.dc_name!r}: DC{dcid}'s name {name!r} would be longer "
                           f"than {C.MAXDCNAME - 1} characters")
        out.append(dataclasses.replace(dc0, dc_dcid=dcid, dc_name=name))
    return out


def _forward(args, params) -> list[str]:
    """The options of `params` that were given, as command-line words again."""
    out: list[str] = []
    for opt, fld, _h in params:
        value = getattr(args, fld, None)
        if value is not None:
            out += [opt, str(value)]
    return out


def _open(args):
    return open_dvk(args.dvk, node=args.node)


def _emu_only(args, what: str) -> None:
    mode = args.dvk
    if mode == "auto":
        mode = "kernel" if os.path.exists(C.DVK_FILE_NAME) else "emu"
    if mode != "emu":
        raise CtlError(f"{what}: node kernel processes exist only with the emulator "
                       f"(--dvk emu)")


def _dc_name(dvk, dc: str | None) -> str:
    """/proc/dvs directory of a DC given by id (default 0) or by name."""
    if dc is None:
        dc = "0"
    try:
        dcid = int(dc, 0)
    except ValueError:
        return dc
    info = dvk.getdcinfo(dcid)
    if info.dc_flags != C.DC_RUNNING:
        raise DvkError.for_code(EDVSDCNOTRUN, f"DC {dcid}")
    return info.dc_name


def _proc_view(dvk, path: str) -> str:
    """The text of /proc/dvs/<path>: the node kernel renders it under the emulator, the real
    file is read with the kernel module."""
    if dvk.backend == "emu" or getattr(dvk, "emulated", False):
        return dvk.proc_text(path)
    try:
        with open(os.path.join(PROC_DVS, path)) as f:
            return f.read()
    except OSError as exc:
        raise CtlError(f"cannot read {PROC_DVS}/{path}: {exc.strerror}") from None


def _peer_pid(path: str) -> int | None:
    """PID of the node kernel serving `path` (SO_PEERCRED of a connection), None if none."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(2.0)
        s.connect(path)
        cred = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return struct.unpack("3i", cred)[0]
    except OSError:
        return None
    finally:
        s.close()


# ================================================================================== node
def cmd_node_run(args) -> int:
    _emu_only(args, "node run")
    from dvk_cffi.emu.server import run_node, socket_path
    from dvk_cffi.logs import StderrHandler
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper(), logging.INFO), handlers=[StderrHandler()],
        format=f"%(asctime)s node{args.nodeid} %(name)s %(levelname)s: %(message)s")
    dvs = _dvs_info(args)
    dcs = [] if args.no_dc else _dc_infos(args, dvs)
    path = args.socket or socket_path(args.nodeid)
    try:
        return run_node(args.nodeid, path=path, dvs=dvs, dcs=dcs)
    except RuntimeError as exc:          # a kernel already serves the socket
        raise CtlError(str(exc)) from None


def cmd_node_start(args) -> int:
    _emu_only(args, "node start")
    from dvk_cffi.emu.node import start_node, stop_node
    from dvk_cffi.emu.server import default_rundir, socket_path
    rundir = default_rundir()
    log_path = args.log or os.path.join(rundir, f"node{args.nodeid}.log")
    extra = _forward(args, DVS_PARAMS) + _forward(args, DC0_PARAMS)
    if args.no_dc:
        extra.append("--no-dc")
    if args.dcs != 1:
        extra += ["--dcs", str(args.dcs)]
    extra += ["--log-level", args.log_level]
    path = socket_path(args.nodeid, rundir)
    running = _peer_pid(path)
    if running is not None:
        raise CtlError(f"node {args.nodeid}: a node kernel (pid {running}) already serves "
                       f"{path}")
    try:
        proc = start_node(args.nodeid, rundir=rundir, detach=True, log_path=log_path,
                          extra=extra)
    except (RuntimeError, TimeoutError) as exc:
        raise CtlError(f"node {args.nodeid}: {exc} (see {log_path})") from None
    serving = _peer_pid(path)
    if serving != proc.pid:   # another kernel got there first
        stop_node(proc)
        raise CtlError(f"node {args.nodeid}: pid {serving} serves {path}, not the kernel "
                       f"started (see {log_path})")
    print(proc.pid)
    return 0


def cmd_node_stop(args) -> int:
    _emu_only(args, "node stop")
    from dvk_cffi.emu.client import EmuDvk
    from dvk_cffi.emu.server import socket_path
    path = socket_path(args.nodeid)
    pid = _peer_pid(path)
    if pid is None:
        raise CtlError(f"no node kernel answers at {path}")
    try:
        EmuDvk(path=path).shutdown_kernel()
    except (DvkError, OSError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + args.timeout
    while os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.05)
    if os.path.exists(path) and _peer_pid(path) is not None:
        os.kill(pid, signal.SIGTERM)
        raise CtlError(f"node {args.nodeid} (pid {pid}) did not stop within "
                       f"{args.timeout:g} s; sent SIGTERM")
    print(f"node {args.nodeid} stopped (pid {pid})")
    return 0


def cmd_node_list(args) -> int:
    _emu_only(args, "node list")
    from dvk_cffi.emu.server import default_rundir
    rundir = default_rundir()
    try:
        names = sorted(os.listdir(rundir))
    except FileNotFoundError:
        names = []
    print(f"{'node':>4} {'pid':>7}  socket")
    for name in names:
        if not (name.startswith("node") and name.endswith(".sock")):
            continue
        path = os.path.join(rundir, name)
        pid = _peer_pid(path)
        print(f"{name[4:-5]:>4} {pid if pid is not None else '-':>7}  {path}"
              + ("" if pid is not None else "  (stale)"))
    return 0


# ================================================================================== admin
def cmd_init(args) -> int:
    dvk = _open(args)
    nodeid = dvk.dvs_init(args.nodeid, _dvs_info(args))
    print(f"DVS initialised: node {nodeid}")
    return 0


def cmd_dc_init(args) -> int:
    dvk = _open(args)
    info = DcInfo(dc_dcid=args.dcid, dc_flags=C.DC_RUNNING, dc_nr_procs=args.nr_procs,
                  dc_nr_tasks=args.nr_tasks, dc_nr_sysprocs=args.nr_sysprocs,
                  dc_nr_nodes=args.nr_nodes, dc_warn2proc=args.warn2proc,
                  dc_warnmsg=args.warnmsg, dc_name=args.name or f"DC{args.dcid}")
    dvk.dc_init(info)
    print(f"DC {info.dc_dcid} ({info.dc_name}) initialised")
    return 0


def cmd_dc_end(args) -> int:
    _open(args).dc_end(args.dcid)
    print(f"DC {args.dcid} ended")
    return 0


def cmd_add_node(args) -> int:
    _open(args).add_node(args.dcid, args.nodeid)
    print(f"node {args.nodeid} added to DC {args.dcid}")
    return 0


def cmd_del_node(args) -> int:
    _open(args).del_node(args.dcid, args.nodeid)
    print(f"node {args.nodeid} deleted from DC {args.dcid}")
    return 0


def cmd_bind(args) -> int:
    dvk = _open(args)
    ep = dvk.bind(args.dcid, args.ep)
    print(ep, flush=True)
    if args.no_hold:
        return 0
    print(f"{PROG}: endpoint {ep} of DC {args.dcid} is bound to pid {os.getpid()} until "
          f"SIGTERM/SIGINT", file=sys.stderr, flush=True)
    install_signals()
    try:
        while True:
            signal.pause()
    except Terminated:
        pass
    try:
        dvk.unbind(args.dcid, ep, C.TIMEOUT_NOWAIT)
    except DvkError:
        pass
    return 0


def cmd_lclbind(args) -> int:
    print(_open(args).lclbind(args.dcid, args.pid, args.ep))
    return 0


def cmd_rmtbind(args) -> int:
    name = args.name or f"rmt{args.ep}"
    print(_open(args).rmtbind(args.dcid, name, args.ep, args.nodeid))
    return 0


def cmd_unbind(args) -> int:
    dvk = _open(args)
    try:
        dvk.unbind(args.dcid, args.ep, args.timeout)
    except DvkError as err:
        # A local process bound elsewhere was sent SIGTERM; an unbound caller cannot wait in
        # the kernel (EDVSAGAIN), so wait here until its exit frees the slot.
        if err.code != EDVSAGAIN:
            raise
        p_nr = C._ENDPOINT_P(args.ep)
        wait_s = (args.timeout if args.timeout >= 0 else 3600_000) / 1000.0
        deadline = time.monotonic() + wait_s
        while not dvk.getprocinfo(args.dcid, p_nr).p_rts_flags & C.SLOT_FREE:
            if time.monotonic() > deadline:
                raise DvkError.for_code(EDVSTIMEDOUT, "unbind") from None
            time.sleep(0.05)
    print(f"endpoint {args.ep} of DC {args.dcid} unbound")
    return 0


# ================================================================================== views
def cmd_view(args) -> int:
    dvk = _open(args)
    view = args.command
    if view == "info":
        text = _proc_view(dvk, "info")
    elif view == "nodes":
        text = _proc_view(dvk, "nodes")
    elif view == "proxies":
        text = _proc_view(dvk, "proxies/info") + "\n" + _proc_view(dvk, "proxies/procs")
    else:
        sub = {"procs": "procs", "dcinfo": "info", "stats": "stats"}[view]
        text = _proc_view(dvk, f"{_dc_name(dvk, args.dc)}/{sub}")
    sys.stdout.write(text)
    return 0


def cmd_procinfo(args) -> int:
    info = _open(args).getprocinfo(args.dcid, C._ENDPOINT_P(args.ep))
    for name, value in info.__dict__.items():
        if name in ("p_rts_flags", "p_misc_flags", "p_nodemap"):
            value = f"{value:#x}"
        print(f"{name}={value}")
    return 0


# ================================================================================== parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description="Administer a DVS node: emulated node kernels, DVS/DC set-up, "
        "bindings and the /proc/dvs views.")
    p.add_argument("--dvk", choices=("auto", "kernel", "emu", "emu-ioctl"),
                   default=os.environ.get("DVK_MODE") or "auto",
                   help="DVK backend: the kernel module (/dev/dvk) or the emulator "
                        "(default: DVK_MODE, else auto = kernel when /dev/dvk exists)")
    p.add_argument("--node", type=_int, default=None,
                   help="emulated node kernel to talk to (default: DVK_NODE / DVK_SOCKET, "
                        "else the only one running)")
    p.add_argument("--rundir", default=None,
                   help="directory of the node kernel sockets (sets DVK_RUNDIR; default "
                        "$DVK_RUNDIR, else /run/dvk for root, /tmp/dvk-UID otherwise)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    # --- node kernels
    node = sub.add_parser("node", help="emulated node kernels: run, start, stop, list")
    nsub = node.add_subparsers(dest="node_command", metavar="ACTION")
    nsub.required = True
    for action, help_ in (("run", "run node N's kernel in the foreground"),
                          ("start", "start node N's kernel detached; prints its pid")):
        np_ = nsub.add_parser(action, help=help_)
        np_.add_argument("nodeid", metavar="N", type=_int, help="node id")
        _add_params(np_, DVS_PARAMS, "DVS parameters (dvs_init)")
        _add_params(np_, DC0_PARAMS, "DC0 parameters (dc_init)")
        np_.add_argument("--no-dc", action="store_true", help="do not create DC0")
        np_.add_argument("--dcs", type=_int, default=1, metavar="N",
                         help="create DC0..DC(N-1), each with DC0's parameters (default 1); "
                              "with --dc-name NAME they are named NAME, NAME1, ...")
        np_.add_argument("--log-level", default="INFO",
                         help="DEBUG, INFO, WARNING, ... (default INFO)")
        if action == "run":
            np_.add_argument("--socket", help="socket path (default <rundir>/node<N>.sock)")
            np_.set_defaults(func=cmd_node_run)
        else:
            np_.add_argument("--log", help="log file (default <rundir>/node<N>.log)")
            np_.set_defaults(func=cmd_node_start)
    stop = nsub.add_parser("stop", help="stop node N's kernel")
    stop.add_argument("nodeid", metavar="N", type=_int)
    stop.add_argument("--timeout", type=float, default=10.0,
                      help="seconds to wait for it to stop (default 10)")
    stop.set_defaults(func=cmd_node_stop)
    nsub.add_parser("list", help="node kernels of the run directory").set_defaults(
        func=cmd_node_list)

    # --- administration
    init = sub.add_parser("init", help="dvs_init (kernel backend)")
    init.add_argument("nodeid", metavar="NODEID", type=_int)
    _add_params(init, DVS_PARAMS, "DVS parameters")
    init.set_defaults(func=cmd_init)

    d0 = C.DEFAULT_DC0
    dci = sub.add_parser("dc-init", help="dc_init (test_dc_init)")
    dci.add_argument("-d", "--dcid", type=_int, default=0, help="DC id (default 0)")
    dci.add_argument("-p", "--nr-procs", type=_int, default=d0["dc_nr_procs"])
    dci.add_argument("-t", "--nr-tasks", type=_int, default=d0["dc_nr_tasks"])
    dci.add_argument("-s", "--nr-sysprocs", type=_int, default=d0["dc_nr_sysprocs"])
    dci.add_argument("-n", "--nr-nodes", type=_int, default=d0["dc_nr_nodes"])
    dci.add_argument("-P", "--warn2proc", type=_int, default=C.NONE)
    dci.add_argument("-m", "--warnmsg", type=_int, default=0)
    dci.add_argument("-N", "--name", default=None, help="DC name (default DC<dcid>)")
    dci.set_defaults(func=cmd_dc_init)

    dce = sub.add_parser("dc-end", help="dc_end")
    dce.add_argument("dcid", metavar="DCID", type=_int)
    dce.set_defaults(func=cmd_dc_end)

    for name, func, help_ in (("add-node", cmd_add_node, "add node NODE to DC DCID"),
                              ("del-node", cmd_del_node, "delete node NODE from DC DCID")):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("dcid", metavar="DCID", type=_int)
        sp.add_argument("nodeid", metavar="NODE", type=_int)
        sp.set_defaults(func=func)

    b = sub.add_parser("bind", help="bind dvsctl itself to EP and hold it until a signal")
    b.add_argument("dcid", metavar="DCID", type=_int)
    b.add_argument("ep", metavar="EP", type=_int)
    b.add_argument("--no-hold", action="store_true",
                   help="exit at once (the binding ends with the process)")
    b.set_defaults(func=cmd_bind)

    lb = sub.add_parser("lclbind", help="bind local process PID to EP")
    lb.add_argument("dcid", metavar="DCID", type=_int)
    lb.add_argument("pid", metavar="PID", type=_int)
    lb.add_argument("ep", metavar="EP", type=_int)
    lb.set_defaults(func=cmd_lclbind)

    rb = sub.add_parser("rmtbind", help="bind EP as a process of remote node NODE")
    rb.add_argument("dcid", metavar="DCID", type=_int)
    rb.add_argument("ep", metavar="EP", type=_int)
    rb.add_argument("nodeid", metavar="NODE", type=_int)
    rb.add_argument("name", metavar="NAME", nargs="?", default=None,
                    help="process name shown in the views (default rmt<EP>)")
    rb.set_defaults(func=cmd_rmtbind)

    ub = sub.add_parser("unbind", help="unbind EP (a local process is sent SIGTERM)")
    ub.add_argument("dcid", metavar="DCID", type=_int)
    ub.add_argument("ep", metavar="EP", type=_int)
    ub.add_argument("--timeout", type=_int, default=5000,
                    help="ms to wait for a local process to go (default 5000, -1 forever)")
    ub.set_defaults(func=cmd_unbind)

    # --- views
    for name, help_ in (("info", "/proc/dvs/info"), ("nodes", "/proc/dvs/nodes"),
                        ("proxies", "/proc/dvs/proxies/info and proxies/procs")):
        sub.add_parser(name, help=help_).set_defaults(func=cmd_view)
    for name, help_ in (("procs", "/proc/dvs/<DC>/procs"), ("dcinfo", "/proc/dvs/<DC>/info"),
                        ("stats", "/proc/dvs/<DC>/stats")):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("dc", metavar="DC", nargs="?", default=None,
                        help="DC id or name (default 0)")
        sp.set_defaults(func=cmd_view)
    pi = sub.add_parser("procinfo", help="getprocinfo of one endpoint")
    pi.add_argument("dcid", metavar="DC", type=_int)
    pi.add_argument("ep", metavar="EP", type=_int)
    pi.set_defaults(func=cmd_procinfo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.rundir:
        os.environ["DVK_RUNDIR"] = args.rundir
    try:
        return args.func(args)
    except DvkError as err:
        print(f"{PROG}: {err.name} ({err.code}): {err.message}", file=sys.stderr)
    except CtlError as err:
        print(f"{PROG}: {err}", file=sys.stderr)
    except OSError as err:          # no node kernel (DvkUnavailable), no /dev/dvk, ...
        print(f"{PROG}: {err}", file=sys.stderr)
    except KeyboardInterrupt:
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
