"""Message passing: send, sendrec, receive, reply, notify, local and through the proxies."""

from __future__ import annotations

import logging

from .. import consts as C
from .. import errors as E
from ..wire import MESSAGE_SIZE, Message, message_with_source, timestamp
from .model import (
    DC,
    Desc,
    Parked,
    Task,
    ep_p,
)

log = logging.getLogger("dvk.emu")


class Ipc:
    """Mixin of `NodeKernel`; the kernel state lives on the kernel object (see kernel.py)."""

    def send(self, task: Task, ep: int, msg: bytes, tout: int) -> Parked:
        dc, caller = self._caller(task, C.DVK_SEND)
        dst = self._dest(dc, caller, ep, E.EDVSDSTDIED, self_rc=E.EDVSBADDEST)
        msg = message_with_source(msg, caller.endpoint)
        if dst.is_remote:
            return (yield from self._remote_request(task, dc, caller, dst, C.CMD_SEND_MSG,
                                                    msg, tout))
        if not self._waiting_for(dst, caller.endpoint):
            if tout == C.TIMEOUT_NOWAIT:
                raise E.DvkError.for_code(E.EDVSAGAIN)
            caller.rts |= C.SENDING
            caller.sendto = ep
            caller.msg = msg
            dst.senders.append(caller)
            yield from self._sleep_call(task, caller, tout)
        else:
            self._deliver(dst, msg)
        caller.lclsent += 1
        return 0

    def sendrec(self, task: Task, ep: int, msg: bytes, tout: int) -> Parked:
        """Send `msg` and wait for the reply, which is returned."""
        dc, caller = self._caller(task, C.DVK_SENDREC)
        dst = self._dest(dc, caller, ep, E.EDVSDEADSRCDST)
        msg = message_with_source(msg, caller.endpoint)
        task.inbox = None
        caller.misc |= C.MIS_ATOMIC
        try:
            if dst.is_remote:
                yield from self._remote_request(task, dc, caller, dst, C.CMD_SNDREC_MSG, msg,
                                                tout)
                return task.inbox or msg
            if self._waiting_for(dst, caller.endpoint):
                self._deliver(dst, msg)
                caller.rts |= C.RECEIVING
                caller.getfrom = ep
            elif (dst.rts & C.SENDING and dst.sendto == caller.endpoint
                  and dst in caller.senders):
                caller.senders.remove(dst)  # restart case: its message is the reply
                dst.rts &= ~C.SENDING
                dst.sendto = C.NONE
                self._wake(dst, 0)
                return dst.msg
            else:
                if tout == C.TIMEOUT_NOWAIT:
                    raise E.DvkError.for_code(E.EDVSAGAIN)
                caller.rts |= C.SENDING | C.RECEIVING
                caller.sendto = caller.getfrom = ep
                caller.msg = msg
                dst.senders.append(caller)
            caller.lclsent += 1
            yield from self._sleep_call(task, caller, tout)
            return task.inbox or msg
        finally:
            caller.misc &= ~C.MIS_ATOMIC

    def receive(self, task: Task, src: int, tout: int, rqst_only: bool = False) -> Parked:
        """Receive from `src` (or ANY); `rqst_only` is rcvrqst (no notifications)."""
        dc, caller = self._caller(task, C.DVK_RCVRQST if rqst_only else C.DVK_RECEIVE)
        if not rqst_only:
            if caller.misc & C.MIS_WOKENUP and src == C.ANY:
                caller.misc &= ~C.MIS_WOKENUP
                raise E.DvkError.for_code(E.EDVSWOKENUP)
            if src != C.ANY:
                p_nr = ep_p(src)
                if not (-dc.info.dc_nr_tasks <= p_nr
                        < dc.info.dc_nr_procs - dc.info.dc_nr_tasks):
                    raise E.DvkError.for_code(E.EDVSRANGE)
            if caller.notify_pending:  # lowest system slot first; src ignored
                sid = min(caller.notify_pending)
                caller.notify_pending.discard(sid)
                if not caller.notify_pending:
                    caller.misc &= ~C.MIS_NOTIFY
                return self._notify_msg(dc, sid - dc.info.dc_nr_tasks, caller)
        for snd in list(caller.senders):
            if src not in (C.ANY, snd.endpoint):
                continue
            caller.senders.remove(snd)
            snd.rts &= ~C.SENDING
            snd.sendto = C.NONE
            if snd.is_remote:
                if not snd.rts & C.RECEIVING:
                    self._queue_ack(snd, C.CMD_SEND_ACK, caller.endpoint, 0, dc, caller.lpid)
            elif not snd.rts & C.RECEIVING:
                self._wake(snd, 0)
            return snd.msg
        if tout == C.TIMEOUT_NOWAIT:
            raise E.DvkError.for_code(E.EDVSAGAIN)
        if src != C.ANY:
            other = dc.slot(ep_p(src))
            if other is not None and other.is_remote:
                if not self.nodes[other.nodeid].n_flags & C.NODE_RCONNECTED:
                    raise E.DvkError.for_code(E.EDVSNOTCONN)
        caller.rts |= C.RECEIVING
        caller.getfrom = src
        task.inbox = None
        yield from self._sleep_call(task, caller, tout)
        return task.inbox if task.inbox is not None else bytes(MESSAGE_SIZE)

    def reply(self, task: Task, ep: int, msg: bytes, tout: int) -> Parked:
        dc, caller = self._caller(task, C.DVK_REPLY)
        dst = self._dest(dc, caller, ep, E.EDVSDSTDIED)
        msg = message_with_source(msg, caller.endpoint)
        if dst.is_remote:
            return (yield from self._remote_request(task, dc, caller, dst, C.CMD_REPLY_MSG,
                                                    msg, tout))
        if not (dst.rts & C.RECEIVING and not dst.rts & C.SENDING
                and dst.getfrom == caller.endpoint):
            raise E.DvkError.for_code(E.EDVSPROCSTS)
        self._deliver(dst, msg)
        caller.lclsent += 1
        return 0

    def notify(self, task: Task, src_nr: int, ep: int, value: int) -> Parked:
        dc, caller = self._caller(task, C.DVK_NOTIFY)
        if src_nr == C.SELF:
            src_nr = caller.nr
        src = dc.slot(src_nr) if src_nr != C.HARDWARE else None
        if src_nr != C.HARDWARE and src is None:
            raise E.DvkError.for_code(E.EDVSRANGE)
        dst = self._dest(dc, caller, ep, E.EDVSDSTDIED, self_rc=E.EDVSBADDEST)
        if not dc.is_sys(dst.nr):
            raise E.DvkError.for_code(E.EDVSTRAPDENIED)
        if dst.priv_id >= dc.info.dc_nr_sysprocs:
            raise E.DvkError.for_code(E.EDVSPRIVILEGES)
        sid = src_nr + dc.info.dc_nr_tasks
        bits = 32
        if dst.is_remote:
            msg = self._notify_msg(dc, src_nr, dst)
            rc_val = value if 0 <= value < bits else -1
            return (yield from self._remote_request(task, dc, caller, dst, C.CMD_NTFY_MSG,
                                                    msg, C.TIMEOUT_FOREVER, rcode=rc_val))
        if 0 <= value < bits:
            dst.update_pending |= 1 << value
        if self._waiting_for(dst, src.endpoint if src else C.HARDWARE):
            self._deliver(dst, self._notify_msg(dc, src_nr, dst))
            return 0
        if sid in dst.notify_pending:
            log.debug("notify overrun %d -> %d", src_nr, ep)
        dst.notify_pending.add(sid)
        dst.misc |= C.MIS_NOTIFY
        return 0

    def _notify_msg(self, dc: DC, src_nr: int, dst: Desc) -> bytes:
        m = Message()
        src = dc.slot(src_nr)
        m.m_source = src.endpoint if src is not None else src_nr
        m.m_type = C.NOTIFY_FROM(src_nr)
        m.m9_t1_sec, m.m9_t1_nsec = timestamp()
        m.m9_l1 = dst.update_pending & 0x7FFFFFFF
        dst.update_pending = 0
        return bytes(m)

    def _deliver(self, dst: Desc, msg: bytes) -> None:
        """Copy a message into a waiting local receiver and wake it."""
        dst.rts &= ~C.RECEIVING
        dst.getfrom = C.NONE
        if dst.task is not None:
            dst.task.inbox = msg
        self._wake(dst, 0)

    def _sleep_call(self, task: Task, caller: Desc, tout: int) -> Parked:
        """Sleep in an IPC call; on timeout take the caller out of every queue it is in.
        Raises the DvkError of a failed call."""
        rc = yield from self._sleep(task, tout)
        if not task.woken:
            self._cancel(caller)
        if rc < 0:
            raise E.DvkError.for_code(rc)
        return rc

    def _cancel(self, caller: Desc) -> None:
        if caller.rts & C.RMTOPER:
            self._dequeue(caller)
        if caller.rts & C.SENDING and caller.sendto not in (C.NONE, C.ANY):
            dc = self.dcs[caller.dcid]
            dst = dc.slot(ep_p(caller.sendto))
            if dst is not None and caller in dst.senders:
                dst.senders.remove(caller)
        caller.rts &= ~(C.SENDING | C.RECEIVING)
        caller.getfrom = caller.sendto = C.NONE
        caller.misc &= ~C.MIS_ATOMIC

    def _remote_request(self, task: Task, dc: DC, caller: Desc, dst: Desc, cmd: int,
                        msg: bytes, tout: int, rcode: int = 0) -> Parked:
        """Hand a request for a REMOTE destination to its node's sender proxy."""
        pair = self._sproxy_pair(dst.nodeid)
        if caller.rts & C.RMTOPER:
            raise E.DvkError.for_code(E.EDVSENQUEUED)
        h = self._rmtcmd(caller, cmd, dc.info.dc_dcid, caller.endpoint, dst.endpoint,
                         dst.nodeid, rcode)
        h.c_msg.load(msg)
        if cmd == C.CMD_NTFY_MSG:
            caller.rts |= C.SENDING
        else:
            caller.rts |= C.SENDING
            caller.sendto = dst.endpoint
            if cmd == C.CMD_SNDREC_MSG:
                caller.rts |= C.RECEIVING
                caller.getfrom = dst.endpoint
        self._enqueue(caller, pair)
        if dst.rts & C.RECEIVING and dst.getfrom == caller.endpoint:
            dst.rts &= ~C.RECEIVING  # this is the reply its remote sendrec waited for
            dst.getfrom = C.NONE
            dst.misc &= ~C.MIS_ATOMIC
        yield from self._sleep_call(task, caller, tout)
        caller.rmtsent += 1
        return 0
