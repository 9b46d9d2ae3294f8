"""vcopy: copies between address spaces, local or one proxy command per chunk."""

from __future__ import annotations

import logging

from .. import consts as C
from .. import errors as E
from .memory import AddressSpace
from .model import (
    DC,
    Desc,
    Parked,
    Task,
    ep_p,
)

log = logging.getLogger("dvk.emu")


class Copies:
    """Mixin of `NodeKernel`; the kernel state lives on the kernel object (see kernel.py)."""

    def vcopy(self, task: Task, src_ep: int, saddr: int, dst_ep: int, daddr: int,
              nbytes: int) -> Parked:
        dc, caller = self._caller(task, C.DVK_VCOPY)
        if nbytes < 0 or nbytes > self.dvs.d_max_copylen:
            raise E.DvkError.for_code(E.EDVS2BIG if nbytes > 0 else E.EDVSINVAL)
        if src_ep == C.SELF:
            src_ep = caller.endpoint
        elif dst_ep == C.SELF:
            dst_ep = caller.endpoint
        if src_ep == dst_ep or C.ANY in (src_ep, dst_ep) or C.NONE in (src_ep, dst_ep):
            raise E.DvkError.for_code(E.EDVSENDPOINT)
        parties = []
        for ep in (src_ep, dst_ep):
            d = dc.slot(ep_p(ep))
            if d is None:
                raise E.DvkError.for_code(E.EDVSRANGE)
            if d.is_free:
                raise E.DvkError.for_code(E.EDVSNOTBIND)
            if d.endpoint != ep:
                raise E.DvkError.for_code(E.EDVSENDPOINT)
            if d is not caller:
                if d.is_remote:
                    if d.rts & C.RMTOPER:
                        raise E.DvkError.for_code(E.EDVSBUSY)
                elif not d.rts & C.RECEIVING:
                    raise E.DvkError.for_code(E.EDVSPROCSTS)
            if d.rts & C.ONCOPY:
                raise E.DvkError.for_code(E.EDVSBUSY)
            parties.append(d)
        src, dst = parties
        if (not src.is_remote and not dst.is_remote and src.task is not None
                and src.task is dst.task):
            raise E.DvkError.for_code(E.EDVSPERM)
        involved = {id(d): d for d in (caller, src, dst)}.values()
        for d in involved:
            d.rts |= C.ONCOPY
        try:
            if not src.is_remote and not dst.is_remote:
                return self._copy_local(src, saddr, dst, daddr, nbytes, caller)
            return (yield from self._copy_remote(task, dc, caller, src, saddr, dst, daddr,
                                                 nbytes))
        finally:
            for d in involved:
                d.rts &= ~C.ONCOPY

    def _space(self, desc: Desc | None) -> AddressSpace:
        if desc is None or desc.is_free or desc.is_remote or desc.task is None:
            raise E.DvkError.for_code(E.EDVSBADPROC)
        return desc.task.space

    def _copy_local(self, src: Desc, saddr: int, dst: Desc, daddr: int, nbytes: int,
                    caller: Desc) -> int:
        step = self.dvs.d_max_copybuf
        last = 0
        try:
            sspace, dspace = self._space(src), self._space(dst)
            for off in range(0, nbytes, step):
                chunk = min(step, nbytes - off)
                dspace.write(daddr + off, sspace.read(saddr + off, chunk))
                last = chunk
        except ValueError as exc:
            log.debug("vcopy fault: %s", exc)
            raise E.DvkError.for_code(E.EDVSFAULT) from None
        caller.lclcopy += 1
        return last

    def _copy_remote(self, task: Task, dc: DC, caller: Desc, src: Desc, saddr: int,
                     dst: Desc, daddr: int, nbytes: int) -> Parked:
        """One synchronous command per chunk of the pair's px_maxbytes."""
        if src.is_remote and dst.is_remote:
            if src.nodeid != dst.nodeid:
                raise E.DvkError.for_code(E.EDVSNOSYS)  # 3-node copies: see docs/emulator.md
            cmd, target = C.CMD_COPYLCL_RQST, dst
        elif dst.is_remote:
            cmd, target = C.CMD_COPYIN_DATA, dst
        else:
            cmd, target = C.CMD_COPYOUT_RQST, src
        pair = self._sproxy_pair(target.nodeid)
        step = max(1, pair.info.px_maxbytes)
        for off in range(0, nbytes, step):
            chunk = min(step, nbytes - off)
            h = self._rmtcmd(caller, cmd, dc.info.dc_dcid, caller.endpoint, target.endpoint,
                             target.nodeid, 0, chunk if cmd == C.CMD_COPYIN_DATA else 0)
            h.v_src, h.v_dst, h.v_rqtr = src.endpoint, dst.endpoint, caller.endpoint
            h.v_saddr, h.v_daddr, h.v_bytes = saddr + off, daddr + off, chunk
            self._enqueue(caller, pair)
            rc = yield from self._sleep(task, C.TIMEOUT_MOLCALL)
            if not task.woken:
                self._dequeue(caller)
            if rc < 0:
                raise E.DvkError.for_code(rc)
            caller.rmtcopy += 1
            pair = self._sproxy_pair(target.nodeid)
        return 0
