"""Endpoint bindings: bind, unbind and what an unbind settles, wait4bind, getep."""

from __future__ import annotations

import logging
import os
import signal
import time

from .. import consts as C
from .. import errors as E
from ..wire import Header
from .model import (
    DC,
    Desc,
    Parked,
    Task,
    TaskGone,
    ep_p,
    signal_thread,
)

log = logging.getLogger("dvk.emu")


class Bindings:
    """Mixin of `NodeKernel`; the kernel state lives on the kernel object (see kernel.py)."""

    def bind(self, task: Task, cmd: int, dcid: int, pid: int, ep: int, nodeid: int,
             name: str) -> int:
        self._require_init()
        if not 0 <= cmd <= C.MAX_BIND_TYPE:
            raise E.DvkError.for_code(E.EDVSBINDTYPE)
        target = None
        if cmd in (C.SELF_BIND, C.LCL_BIND, C.REPLICA_BIND, C.USERMODE_BIND):
            if nodeid != C.LOCALNODE:
                raise E.DvkError.for_code(E.EDVSBADNODEID)
            nodeid = self.local_nodeid
            target = task if pid == -1 else self._lookup_task(pid)
            if target is None:
                raise E.DvkError.for_code(E.EDVSBADPID)
        else:
            if not 0 <= nodeid < self.dvs.d_nr_nodes or nodeid == self.local_nodeid:
                raise E.DvkError.for_code(E.EDVSBADNODEID)
            if cmd == C.BKUP_BIND:
                target = self._lookup_task(pid) if pid > 0 else None
        dc = self._running_dc(dcid)
        p_nr = ep_p(ep)
        if not dc.in_range(p_nr):
            raise E.DvkError.for_code(E.EDVSBADDCID)  # the kernel's code for this
        if not dc.info.dc_nodes & (1 << nodeid):
            raise E.DvkError.for_code(E.EDVSNODCNODE)
        desc = dc.slot(p_nr)
        if not desc.is_free:  # every bind type (the module's second check covers the two
            raise E.DvkError.for_code(E.EDVSSLOTUSED)  # its first one lets through)
        if target is not None and (target.desc is not None or target.proxy is not None):
            raise E.DvkError.for_code(E.EDVSBADDCID if target.desc is not None
                                      and target.desc.dcid != dcid else E.EDVSSLOTUSED)
        if cmd == C.RMT_BIND:
            pair_id = self.nodes[nodeid].n_proxies
            pair = self.proxies[pair_id] if pair_id >= 0 else None
            if pair is None or not pair.in_use or pair.sproxy is None:
                raise E.DvkError.for_code(E.EDVSNOPROXY)
        is_sys = dc.is_sys(p_nr)
        desc.rts = C.REMOTE if cmd in (C.RMT_BIND, C.BKUP_BIND) else 0
        desc.misc = {C.REPLICA_BIND: C.MIS_REPLICATED, C.BKUP_BIND: C.MIS_RMTBACKUP,
                     C.USERMODE_BIND: C.MIS_USERMODE}.get(cmd, 0)
        desc.endpoint = ep
        desc.nodeid = nodeid
        desc.nodemap = 1 << nodeid
        desc.getfrom = desc.sendto = desc.waitmigr = desc.waitunbind = C.NONE
        desc.proxy = C.NONE
        desc.lclsent = desc.rmtsent = desc.lclcopy = desc.rmtcopy = 0
        desc.allowed = C.DVK_ALL_CALLS if is_sys else C.DVK_USER_CALLS
        desc.priv_id = p_nr + dc.info.dc_nr_tasks if is_sys else dc.info.dc_nr_sysprocs
        desc.senders.clear()
        desc.notify_pending.clear()
        desc.update_pending = 0
        desc.rmtcmd = Header()
        if desc.is_remote:
            desc.lpid = desc.vpid = -1
            desc.task = target
            desc.name = (name or "remote")[:15]
        else:
            desc.lpid = desc.vpid = target.tid
            desc.task = target
            desc.name = (target.comm or name or "task")[:15]
            target.desc = desc
            self._wake(desc, ep)  # wait4bind(SELF) of the bound task returns
        self._bind_changed()
        log.debug("bind dc=%d ep=%d node=%d type=%d", dcid, ep, nodeid, cmd)
        return ep

    def unbind(self, task: Task, dcid: int, ep: int, tout: int) -> Parked:
        self._require_init()
        dc = self._running_dc(dcid)
        desc = dc.slot(ep_p(ep))
        if desc is None:
            raise E.DvkError.for_code(E.EDVSBADDCID)
        if desc.is_free:
            raise E.DvkError.for_code(E.EDVSNOTBIND)
        if not 0 <= desc.nodeid < self.dvs.d_nr_nodes:
            raise E.DvkError.for_code(E.EDVSBADNODEID)
        if desc.is_remote or desc.task is task:
            self._do_unbind(dc, desc)
            return 0
        # Another local process: the kernel sends it SIGTERM; its exit unbinds it.
        target = desc.task
        if target is not None:
            if desc.rts & (C.SENDING | C.RECEIVING):
                self._cancel(desc)  # out of the queues it waits in, like a timeout
                self._wake(desc, E.EDVSSHUTDOWN)
            signal_thread(target.tid, signal.SIGTERM)
        caller = task.desc
        if caller is None or tout == C.TIMEOUT_NOWAIT:
            raise E.DvkError.for_code(E.EDVSAGAIN)
        caller.rts |= C.WAITUNBIND
        caller.waitunbind = ep
        desc.unbind_waiters.append(caller)
        try:
            rc = yield from self._sleep(task, tout)
        finally:
            caller.rts &= ~C.WAITUNBIND
            caller.waitunbind = C.NONE
            if caller in desc.unbind_waiters:
                desc.unbind_waiters.remove(caller)
        if rc < 0:
            raise E.DvkError.for_code(rc)
        return 0

    def _bind_changed(self) -> None:
        self.runnable.update(self.bind_waiters)

    def _do_unbind(self, dc: DC, desc: Desc) -> None:
        """Free a slot and settle everybody who depended on it."""
        if desc.is_free:
            return
        self._bind_changed()
        ep = desc.endpoint
        # senders queued on it
        while desc.senders:
            snd = desc.senders.popleft()
            snd.rts &= ~C.SENDING
            if snd.is_remote:
                rc = E.EDVSDEADSRCDST if snd.rts & C.RECEIVING else E.EDVSDSTDIED
                snd.rts &= ~C.RECEIVING
                self._queue_ack(snd, C.CMD_SEND_ACK, ep, rc, dc)
            else:
                snd.rts &= ~C.RECEIVING
                snd.misc &= ~C.MIS_ATOMIC
                self._wake(snd, E.EDVSDSTDIED)
        idx = desc.nr + dc.info.dc_nr_tasks
        for other in dc.slots:
            if other.is_free or other is desc:
                continue
            other.notify_pending.discard(idx)
            if desc in other.senders:
                other.senders.remove(desc)
            if other.rts & C.RECEIVING and other.getfrom == ep and not other.rts & C.SENDING:
                other.rts &= ~C.RECEIVING
                other.misc &= ~C.MIS_ATOMIC
                if other.is_remote:
                    self._queue_ack(other, C.CMD_SEND_ACK, ep, E.EDVSSRCDIED, dc)
                else:
                    self._wake(other, E.EDVSSRCDIED)
        if desc.rts & C.RMTOPER:
            self._dequeue(desc)
        for waiter in desc.unbind_waiters:
            self._wake(waiter, 0)
        desc.unbind_waiters.clear()
        if desc.task is not None and desc.task.desc is desc:
            desc.task.desc = None
            if desc.rts & (C.SENDING | C.RECEIVING | C.ONCOPY):
                self._wake(desc, E.EDVSSHUTDOWN)
        fresh = Desc(nr=desc.nr, dcid=desc.dcid, endpoint=desc.nr)
        desc.__dict__.update(fresh.__dict__)

    def wait4bind(self, task: Task, cmd: int, ep: int, tout: int) -> Parked:
        """Wait until the caller (ep = SELF) or endpoint `ep` of its DC is bound (WAIT_BIND)
        or free (WAIT_UNBIND)."""
        self._require_init()
        if ep == C.SELF:
            def done():
                if task.proxy is not None:
                    return C.NONE
                if task.desc is not None:
                    return task.desc.endpoint if cmd == C.WAIT_BIND else None
                return 0 if cmd == C.WAIT_UNBIND else None
        else:
            caller = task.desc
            if caller is None:
                raise E.DvkError.for_code(E.EDVSNOTBIND)
            desc = self.dcs[caller.dcid].slot(ep_p(ep))
            if desc is None:
                raise E.DvkError.for_code(E.EDVSRANGE)

            def done():
                if cmd == C.WAIT_BIND:
                    return ep if not desc.is_free else None
                return 0 if desc.is_free else None
        deadline = None if tout < 0 else time.monotonic() + tout / 1000.0
        self.bind_waiters.add(task)
        try:
            while True:
                result = done()
                if result is not None:
                    return result
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise E.DvkError.for_code(E.EDVSTIMEDOUT)
                yield deadline
                if task.dead:
                    raise TaskGone()
        finally:
            self.bind_waiters.discard(task)

    def getep(self, task: Task, pid: int) -> int:
        self._require_init()
        if task.desc is None and task.proxy is None:
            raise E.DvkError.for_code(E.EDVSNOTBIND)
        if not 1 <= pid <= 4194304:
            raise E.DvkError.for_code(E.EDVSBADRANGE)
        target = self.tasks.get(pid)
        if target is None:
            target = next((t for t in self.tasks.values() if t.pid == pid and t.desc), None)
        if target is None:
            if not os.path.exists(f"/proc/{pid}"):
                raise E.DvkError.for_code(E.EDVSBADPID)
            raise E.DvkError.for_code(E.EDVSNOTBIND)
        if target.proxy is not None:
            raise E.DvkError.for_code(E.EDVSBADPROC)
        if target.desc is None:
            raise E.DvkError.for_code(E.EDVSNOTBIND)
        return target.desc.endpoint
