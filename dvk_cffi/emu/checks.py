"""The checks shared by the calls: initialised DVS, DC, caller, proxy caller, destination."""

from __future__ import annotations

import logging

from .. import consts as C
from .. import errors as E
from .model import (
    DC,
    Desc,
    Task,
    ep_p,
)

log = logging.getLogger("dvk.emu")


class Checks:
    """Mixin of `NodeKernel`; the kernel state lives on the kernel object (see kernel.py)."""

    def _require_init(self) -> None:
        if self.local_nodeid < 0:
            raise E.DvkError.for_code(E.EDVSDVSINIT)

    def _dc(self, dcid: int) -> DC:
        if not 0 <= dcid < self.dvs.d_nr_dcs:
            raise E.DvkError.for_code(E.EDVSBADDCID)
        return self.dcs[dcid]

    def _running_dc(self, dcid: int) -> DC:
        dc = self._dc(dcid)
        if not dc.running:
            raise E.DvkError.for_code(E.EDVSDCNOTRUN)
        return dc

    def _caller(self, task: Task, call: int) -> tuple[DC, Desc]:
        """check_caller: bound, DC running, call allowed."""
        self._require_init()
        desc = task.desc
        if desc is None:
            raise E.DvkError.for_code(E.EDVSNOTBIND)
        dc = self.dcs[desc.dcid]
        if not dc.running:
            raise E.DvkError.for_code(E.EDVSDCNOTRUN)
        if call not in desc.allowed:
            raise E.DvkError.for_code(E.EDVSBADCALL)
        return dc, desc

    def _proxy_caller(self, task: Task, call: int) -> Desc:
        self._require_init()
        px = task.proxy
        if px is None:
            raise E.DvkError.for_code(E.EDVSNOTBIND if task.desc is None else E.EDVSBADCALL)
        if call not in px.allowed:
            raise E.DvkError.for_code(E.EDVSBADCALL)
        pair = self.proxies[px.nr]
        if not pair.in_use or pair.sproxy is None or pair.rproxy is None:
            raise E.DvkError.for_code(E.EDVSNOPROXY)
        if not px.misc & C.MIS_CONNECTED:
            raise E.DvkError.for_code(E.EDVSNOTCONN)
        return px

    def _dest(self, dc: DC, caller: Desc, ep: int, free_rc: int,
              self_rc: int = E.EDVSENDPOINT) -> Desc:
        """Destination checks shared by send/sendrec/reply/notify."""
        p_nr = ep_p(ep)
        if not dc.in_range(p_nr):
            raise E.DvkError.for_code(E.EDVSRANGE)
        if ep == C.HARDWARE:
            raise E.DvkError.for_code(E.EDVSBADDEST)
        dst = dc.slot(p_nr)
        if dst is caller:
            raise E.DvkError.for_code(self_rc)
        if dst.is_free:
            raise E.DvkError.for_code(free_rc)
        if dst.endpoint != ep:
            raise E.DvkError.for_code(E.EDVSENDPOINT)
        if not 0 <= dst.nodeid < self.dvs.d_nr_nodes:
            raise E.DvkError.for_code(E.EDVSBADNODEID)
        if not dc.info.dc_nodes & (1 << dst.nodeid):
            raise E.DvkError.for_code(E.EDVSNODCNODE)
        return dst

    @staticmethod
    def _waiting_for(dst: Desc, src_ep: int) -> bool:
        """RECEIVING, not SENDING, and receiving from ANY or from `src_ep`."""
        return (dst.rts & C.RECEIVING and not dst.rts & C.SENDING
                and dst.getfrom in (C.ANY, src_ep))
