"""put2lcl: the check table of a command from a receiver proxy and its delivery."""

from __future__ import annotations

import logging

from .. import consts as C
from .. import errors as E
from ..wire import MESSAGE_SIZE, MSG_OFFSET, Header, timestamp
from .model import (
    DC,
    Desc,
    Task,
    ep_p,
)

log = logging.getLogger("dvk.emu")


class Put2lcl:
    """Mixin of `NodeKernel`; the kernel state lives on the kernel object (see kernel.py)."""

    def put2lcl(self, task: Task, hdr: bytes, payload_addr: int) -> int:
        self._proxy_caller(task, C.DVK_PUT2LCL)
        h = Header(bytearray(hdr))
        return self._put2lcl(task, h, payload_addr)

    def _put2lcl(self, task: Task, h: Header, payload_addr: int) -> int:
        # the routing fields read once: the check table is the hot path of every frame
        cmd, dcid, src, dst, snode, dnode = h.route()[:6]
        if not 0 <= dcid < self.dvs.d_nr_dcs:                                   # 1
            raise E.DvkError.for_code(E.EDVSBADDCID)
        dc = self.dcs[dcid]
        if not dc.running:                                                      # 2
            raise E.DvkError.for_code(E.EDVSDCNOTRUN)
        src_p, dst_p = ep_p(src), ep_p(dst)
        if not (dc.in_range(src_p) and dc.in_range(dst_p)):                     # 3
            raise E.DvkError.for_code(E.EDVSRANGE)
        if not (0 <= snode < self.dvs.d_nr_nodes and dc.info.dc_nodes & (1 << snode)):  # 4
            raise E.DvkError.for_code(E.EDVSNODCNODE)
        if dnode != self.local_nodeid:                                          # 5
            raise E.DvkError.for_code(E.EDVSBADNODEID)
        node = self.nodes[snode]
        node.n_rtime_sec, node.n_rtime_nsec = timestamp()
        rmt = dc.slot(src_p)
        lcl = dc.slot(dst_p)
        rmt_rts, lcl_rts = rmt.rts, lcl.rts
        if rmt_rts & C.SLOT_FREE:                                               # 6
            raise E.DvkError.for_code(E.EDVSNOTBIND)
        rmt_remote = rmt_rts & C.REMOTE
        if rmt_remote:
            if rmt.endpoint != src:                                             # 7
                raise E.DvkError.for_code(E.EDVSENDPOINT)
            if rmt.nodeid != snode:                                             # 8
                raise E.DvkError.for_code(E.EDVSNONODE)
        lcl_free, lcl_remote = lcl_rts & C.SLOT_FREE, lcl_rts & C.REMOTE
        if not lcl_free and not lcl_remote and not dc.is_sys(lcl.nr) \
                and not dc.is_sys(rmt.nr):                                      # 9
            return self._put_error(dc, h, rmt, lcl, E.EDVSTRAPDENIED)
        if not rmt_remote and not rmt.misc & C.MIS_REPLICATED:                  # 10
            raise E.DvkError.for_code(E.EDVSLCLPROC)
        if cmd in C.RQST_CMDS and rmt_rts & (C.RMTOPER | C.SENDING):            # 11
            raise E.DvkError.for_code(E.EDVSENQUEUED)
        if lcl_remote:                                                          # 12
            return self._put_error(dc, h, rmt, lcl, E.EDVSRMTPROC)
        if lcl_free:                                                            # 13
            return self._put_error(dc, h, rmt, lcl, E.EDVSDSTDIED)
        if lcl.endpoint != dst:                                                 # 14
            raise E.DvkError.for_code(E.EDVSENDPOINT)
        if lcl_rts & C.MIGRATING or lcl.nodeid != self.local_nodeid:            # 15
            return self._put_error(dc, h, rmt, lcl, E.EDVSMIGRATE)
        if cmd in C.COPY_RQST_CMDS:
            rqtr = dc.slot(ep_p(h.v_rqtr))
            if rqtr is not None and not rqtr.is_free and C.DVK_VCOPY not in rqtr.allowed:
                raise E.DvkError.for_code(E.EDVSBADCALL)                        # 16
        elif cmd in C.CMD_CALL and C.CMD_CALL[cmd] not in rmt.allowed:
            raise E.DvkError.for_code(E.EDVSBADCALL)                            # 16
        if cmd not in C.PUT2LCL_CMDS:                                           # 17
            raise E.DvkError.for_code(E.EDVSBADREQUEST)
        rc = self._dispatch(task, dc, h, cmd, rmt, lcl, payload_addr)
        if rc > 0:
            self.proxies[task.proxy.nr].rproxy.lclsent += 1
            node.n_pxrcvd += 1
        return rc

    def _put_error(self, dc: DC, h: Header, rmt: Desc, lcl: Desc, rc: int) -> int:
        """A put2lcl check that the kernel answers with an error ACK (`C.KERNEL_ERROR_ACK`;
        consts.py says why it differs from the ACK a proxy sends)."""
        ack = C.KERNEL_ERROR_ACK.get(h.c_cmd)
        if ack is not None and rmt.is_remote:
            self._queue_ack(rmt, ack, h.c_dst, rc, dc, lcl.lpid)
            a = rmt.rmtcmd
            a.v_src, a.v_dst, a.v_rqtr = h.v_src, h.v_dst, h.v_rqtr
            a.v_saddr, a.v_daddr, a.v_bytes = h.v_saddr, h.v_daddr, 0
        raise E.DvkError.for_code(rc)

    def _dispatch(self, task: Task, dc: DC, h: Header, cmd: int, rmt: Desc, lcl: Desc,
                  payload_addr: int) -> int:
        if cmd in C.MSG_DELIVER_CMDS:
            msg = bytes(h.buf[MSG_OFFSET:MSG_OFFSET + MESSAGE_SIZE])
            if self._waiting_for(lcl, rmt.endpoint):
                self._deliver(lcl, msg)
                if cmd == C.CMD_SNDREC_MSG:
                    rmt.rts |= C.RECEIVING
                    rmt.getfrom = lcl.endpoint
                    rmt.misc |= C.MIS_ATOMIC
                else:
                    self._queue_ack(rmt, C.CMD_SEND_ACK, lcl.endpoint, 0, dc, lcl.lpid)
                return MESSAGE_SIZE
            rmt.msg = msg
            rmt.rts |= C.SENDING
            rmt.sendto = lcl.endpoint
            if cmd == C.CMD_SNDREC_MSG:
                rmt.rts |= C.RECEIVING
                rmt.getfrom = lcl.endpoint
                rmt.misc |= C.MIS_ATOMIC
            lcl.senders.append(rmt)
            return 0
        if cmd == C.CMD_NTFY_MSG:
            src_type = h.c_msg.m_type & ~C.NOTIFY_MESSAGE
            sid = ep_p(src_type) + dc.info.dc_nr_tasks
            if sid >= dc.info.dc_nr_sysprocs:
                raise E.DvkError.for_code(E.EDVSPRIVILEGES)
            if 0 <= h.c_rcode < 32:
                lcl.update_pending |= 1 << h.c_rcode
            if self._waiting_for(lcl, rmt.endpoint):
                self._deliver(lcl, bytes(h.c_msg))
                return MESSAGE_SIZE
            lcl.notify_pending.add(sid)
            lcl.misc |= C.MIS_NOTIFY
            return 0
        if cmd == C.CMD_SEND_ACK:
            if not lcl.rts & C.SENDING:
                raise E.DvkError.for_code(E.EDVSACKDST)
            if lcl.sendto != h.c_src:
                raise E.DvkError.for_code(E.EDVSACKSRC)
            lcl.rts &= ~C.SENDING
            lcl.sendto = C.NONE
            self._wake(lcl, h.c_rcode)
            return 0
        if cmd == C.CMD_SNDREC_ACK:
            if not (lcl.rts & C.RECEIVING and lcl.getfrom == h.c_src):
                raise E.DvkError.for_code(E.EDVSACKDST)
            lcl.rts &= ~(C.RECEIVING | C.SENDING)
            lcl.getfrom = lcl.sendto = C.NONE
            lcl.misc &= ~C.MIS_ATOMIC
            self._wake(lcl, h.c_rcode)
            return 0
        if cmd == C.CMD_COPYIN_DATA:
            rc = 0
            dst = dc.slot(ep_p(h.v_dst))
            if dst is not lcl or dst.rts & (C.ONCOPY | C.SENDING):
                rc = E.EDVSPROCSTS
            elif h.v_bytes > self.proxies[task.proxy.nr].info.px_maxbytes:
                rc = E.EDVS2BIG
            else:
                try:
                    data = task.space.read(payload_addr, h.v_bytes)
                    self._space(dst).write(h.v_daddr, data)
                except (ValueError, E.DvkError):
                    rc = E.EDVSFAULT
            self._copy_ack(dc, h, rmt, C.CMD_COPYIN_ACK, rc)
            if rc < 0:
                raise E.DvkError.for_code(rc)
            return h.v_bytes
        if cmd == C.CMD_COPYOUT_RQST:
            src = lcl
            rc = 0
            if src.rts == 0:
                rc = E.EDVSPROCSTS
            elif src.rts & C.ONCOPY:
                rc = E.EDVSBUSY
            elif src.endpoint != h.v_src:
                rc = E.EDVSENDPOINT
            if rc == 0:
                src.rts |= C.ONCOPY
            self._copy_ack(dc, h, rmt, C.CMD_COPYOUT_DATA, rc, src_ep=src.endpoint)
            if rc < 0:
                raise E.DvkError.for_code(rc)
            return 0
        if cmd == C.CMD_COPYOUT_DATA:
            rqtr = lcl
            if not rqtr.rts & C.ONCOPY:
                raise E.DvkError.for_code(E.EDVSPROCSTS)
            rc = h.c_rcode
            if rc == 0 and h.v_bytes > self.proxies[task.proxy.nr].info.px_maxbytes:
                rc = E.EDVS2BIG                 # longer than any chunk a proxy carries
            if rc == 0:
                try:
                    data = task.space.read(payload_addr, h.v_bytes)
                    dst = dc.slot(ep_p(h.v_dst))
                    self._space(dst).write(h.v_daddr, data)
                except (ValueError, E.DvkError):
                    rc = E.EDVSFAULT
            self._wake(rqtr, rc)
            return h.v_bytes if rc == 0 else 0
        if cmd in C.COPY_ACK_CMDS:
            rqtr = lcl
            if not rqtr.rts & C.ONCOPY:
                raise E.DvkError.for_code(E.EDVSPROCSTS)
            self._wake(rqtr, h.c_rcode)
            return 0
        if cmd == C.CMD_COPYLCL_RQST:
            src, dst = dc.slot(ep_p(h.v_src)), dc.slot(ep_p(h.v_dst))
            if src is None or dst is None:  # no slot: nothing to ACK, the proxy answers
                raise E.DvkError.for_code(E.EDVSRANGE)
            rc = 0
            if h.v_bytes > self.proxies[task.proxy.nr].info.px_maxbytes:
                rc = E.EDVS2BIG                 # longer than any chunk a proxy carries
            else:
                try:
                    self._space(dst).write(h.v_daddr,
                                           self._space(src).read(h.v_saddr, h.v_bytes))
                except (ValueError, E.DvkError):
                    rc = E.EDVSFAULT
            self._copy_ack(dc, h, rmt, C.CMD_COPYLCL_ACK, rc)
            return h.v_bytes if rc == 0 else 0
        raise E.DvkError.for_code(E.EDVSBADREQUEST)  # COPYRMT/COPYIN_RQST: docs/emulator.md

    def _copy_ack(self, dc: DC, h: Header, rmt: Desc, cmd: int, rc: int,
                  src_ep: int | None = None) -> None:
        """Queue the answer to a copy command on the remote requester's descriptor."""
        self._queue_ack(rmt, cmd, h.c_dst if src_ep is None else src_ep, rc, dc)
        if not rmt.rts & C.RMTOPER:
            return
        a = rmt.rmtcmd
        a.v_src, a.v_dst, a.v_rqtr = h.v_src, h.v_dst, h.v_rqtr
        a.v_saddr, a.v_daddr, a.v_bytes = h.v_saddr, h.v_daddr, h.v_bytes
        if cmd == C.CMD_COPYOUT_DATA:
            a.c_len = h.v_bytes if rc == 0 else 0
