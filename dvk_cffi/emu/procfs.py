"""The /proc/dvs views of the DVK module, rendered from an emulated node kernel.

Same columns and formats as the module, so an operator's scripts and eyes keep working:
`info`, `nodes`, `proxies/info`, `proxies/procs`, `<DC>/info`, `<DC>/procs`, `<DC>/stats`.
"""

from __future__ import annotations

#: Control characters of a program name shown as '?': a name is what its program says (and
#: Linux lets a thread take any bytes), and one with a newline would add lines to a table
#: that a reader takes line by line (the DSP counts a node's processes from `tasks`).
_ONE_LINE = {c: "?" for c in (*range(32), 127)}


def bitmap32(mask: int) -> str:
    """32 columns, bit 31 first, X for a set bit (the module's node/DC bitmaps)."""
    return "".join("X" if mask & (1 << b) else "-" for b in range(31, -1, -1))


def render(kernel, path: str) -> str:
    """The text of /proc/dvs/<path>; ValueError for an unknown view."""
    path = path.strip("/")
    if path.startswith("proc/dvs/"):
        path = path[len("proc/dvs/"):]
    views = {"info": _info, "nodes": _nodes, "proxies/info": _proxies_info,
             "proxies/procs": _proxies_procs, "tasks": _tasks}
    if path in views:
        return views[path](kernel)
    if "/" in path:
        dcname, view = path.split("/", 1)
        for dc in kernel.dcs:
            if dc.running and dc.info.dc_name == dcname:
                fn = {"info": _dc_info, "procs": _dc_procs, "stats": _dc_stats}.get(view)
                if fn is not None:
                    return fn(dc)
    raise ValueError(f"no /proc/dvs/{path}")


def _info(k) -> str:
    d = k.dvs
    return "".join(f"{name}={value}\n" for name, value in [
        ("name", d.d_name), ("nodeid", k.local_nodeid), ("nr_dcs", d.d_nr_dcs),
        ("nr_nodes", d.d_nr_nodes), ("max_nr_procs", d.d_nr_procs),
        ("max_nr_tasks", d.d_nr_tasks), ("max_sys_procs", d.d_nr_sysprocs),
        ("max_copy_buf", d.d_max_copybuf), ("max_copy_len", d.d_max_copylen),
        ("dbglvl", f"{d.d_dbglvl:X}"), ("version", d.d_version), ("flags", f"{d.d_flags:X}"),
        ("sizeof(proc)", d.d_size_proc), ("sizeof(proc) aligned", d.d_size_proc),
        ("sizeof(dc)", 60), ("sizeof(node)", 56),
    ])


def _tasks(k) -> str:
    """Emulator only: the processes attached to this node kernel (their CPU is the node's
    load)."""
    out = ["-pid- -tid- bound comm\n"]
    for t in sorted(k.tasks.values(), key=lambda t: t.tid):
        if t.dead:
            continue
        bound = "proxy" if t.proxy else (f"{t.desc.dcid}:{t.desc.endpoint}" if t.desc else "-")
        out.append(f"{t.pid} {t.tid} {bound} {t.comm.translate(_ONE_LINE)}\n")
    return "".join(out)


def _nodes(k) -> str:
    out = ["ID Flags Proxies -pxsent- -pxrcvd- 10987654321098765432109876543210 Name\n"]
    for n in k.nodes:
        if n.n_flags:
            out.append("%2d %5X %7d %8d %8d %32s %-16.16s\n" % (
                n.n_nodeid, n.n_flags, n.n_proxies, n.n_pxsent, n.n_pxrcvd,
                bitmap32(n.n_dcs), n.n_name))
    return "".join(out)


def _proxies_info(k) -> str:
    out = ["Proxies Flags Sender Receiver --Proxies_Name- 10987654321098765432109876543210 \n"]
    for pair in k.proxies:
        if pair.in_use:
            out.append("%7d %5X %6d %8d %15s %s\n" % (
                pair.info.px_id, pair.info.px_flags, pair.sproxy.lpid, pair.rproxy.lpid,
                pair.info.px_name, bitmap32(pair.sproxy.nodemap)))
    return "".join(out)


def _proxies_procs(k) -> str:
    out = ["ID Type -lpid- -flag- -misc- -pxsent- -pxrcvd- -getf- -sendt -wmig- name\n"]
    for pair in k.proxies:
        if not pair.in_use:
            continue
        for kind, d in (("send", pair.sproxy), ("recv", pair.rproxy)):
            out.append("%2d %4s %6d %6X %6X %8d %8d %6d %6d %6d %-15.15s\n" % (
                pair.info.px_id, kind, d.lpid, d.rts, d.misc, d.rmtsent, d.lclsent,
                d.getfrom, d.sendto, d.waitmigr, d.name))
    return "".join(out)


def _dc_info(dc) -> str:
    i = dc.info
    return (f"dcid={i.dc_dcid}\nflags={i.dc_flags:X}\nnr_procs={i.dc_nr_procs}\n"
            f"nr_tasks={i.dc_nr_tasks}\nnr_sysprocs={i.dc_nr_sysprocs}\n"
            f"nr_nodes={i.dc_nr_nodes}\ndc_nodes={i.dc_nodes:X}\ndc_pid={i.dc_pid}\n"
            f"warn2proc={i.dc_warn2proc}\nwarnmsg={i.dc_warnmsg}\ndc_name={i.dc_name}\n"
            f"nodes    10987654321098765432109876543210\n"
            f"         {bitmap32(i.dc_nodes)}\ncpumask=0\n")


def _dc_procs(dc) -> str:
    out = ["DC pnr -endp -lpid/vpid- nd flag misc -getf -sndt -wmig -prxy name\n"]
    for d in dc.slots:
        if d.is_free:
            continue
        out.append("%2d %3d %5d %5d/%-5d %2d %4X %4X %5d %5d %5d %5d %-15.15s\n" % (
            d.dcid, d.nr, d.endpoint, d.lpid, d.vpid, d.nodeid, d.rts, d.misc,
            d.getfrom, d.sendto, d.waitmigr, d.proxy, d.name))
    return "".join(out)


def _dc_stats(dc) -> str:
    out = ["DC pnr -endp -lpid/vpid- nd --lsnt-- --rsnt-- -lcopy-- -rcopy-- name\n"]
    for d in dc.slots:
        if d.is_free:
            continue
        out.append("%2d %3d %5d %5d/%-5d %2d %8d %8d %8d %8d %-15.15s\n" % (
            d.dcid, d.nr, d.endpoint, d.lpid, d.vpid, d.nodeid, d.lclsent, d.rmtsent,
            d.lclcopy, d.rmtcopy, d.name))
    return "".join(out)

