"""Proxy pairs: registration, node links, the sender FIFO and get2rmt."""

from __future__ import annotations

import logging
import time
from collections import deque

from .. import consts as C
from .. import errors as E
from ..info import NodeInfo, ProxiesInfo
from ..wire import Header, new_command, set_m_source, stamp_outgoing, timestamp
from .model import (
    DC,
    Desc,
    Parked,
    ProxyPair,
    Task,
    TaskGone,
    bits,
    ep_p,
)

log = logging.getLogger("dvk.emu")


class Proxies:
    """Mixin of `NodeKernel`; the kernel state lives on the kernel object (see kernel.py)."""

    def proxies_bind(self, task: Task, name: str, pxid: int, spid: int, rpid: int,
                     maxbytes: int) -> int:
        self._require_init()
        if not 0 <= pxid < self.dvs.d_nr_nodes:
            raise E.DvkError.for_code(E.EDVSBADNODEID)
        stask, rtask = self._lookup_task(spid), self._lookup_task(rpid)
        if stask is None or rtask is None:
            raise E.DvkError.for_code(E.EDVSBADPID)
        pair = self.proxies[pxid]
        if pair.in_use:
            raise E.DvkError.for_code(E.EDVSRSCBUSY)
        if maxbytes > C.MAXCOPYBUF:
            raise E.DvkError.for_code(E.EDVS2BIG)
        for t in (stask, rtask):
            if t.proxy is not None or t.desc is not None:
                raise E.DvkError.for_code(E.EDVSBADPID)
        pair.info = ProxiesInfo(px_id=pxid, px_flags=C.PROXIES_INUSE, px_maxbytes=maxbytes,
                                px_name=name[:C.MAXPROXYNAME - 1])
        pair.queue.clear()
        for role, t, calls in (("s", stask, C.DVK_SPROXY_CALLS),
                               ("r", rtask, C.DVK_RPROXY_CALLS)):
            desc = Desc(nr=pxid, dcid=C.PROXY_NO_DC, endpoint=C.NONE, rts=0,
                        misc=C.MIS_PROXY, lpid=t.tid, vpid=t.tid,
                        nodeid=self.local_nodeid, name=(t.comm or name)[:15],
                        task=t, allowed=calls, priv_id=C.PROXY_PRIV)
            t.proxy = desc
            if role == "s":
                pair.sproxy = desc
            else:
                pair.rproxy = desc
            self._wake(desc, C.NONE)  # a proxy polling wait4bind(SELF) may go on
        return 0

    def proxies_unbind(self, task: Task, pxid: int) -> int:
        self._require_init()
        pair = self._pair(pxid)
        if not pair.in_use:
            raise E.DvkError.for_code(E.EDVSPROXYFREE)
        self._proxies_unbind(pair)
        return 0

    def _proxy_exit(self, desc: Desc) -> None:
        pair = self.proxies[desc.nr]
        if pair.in_use and desc in (pair.sproxy, pair.rproxy):
            self._proxies_unbind(pair)

    def _proxies_unbind(self, pair: ProxyPair) -> None:
        """Free a pair: its nodes lose the link; a node left with no direction ends."""
        nodemap = pair.sproxy.nodemap if pair.sproxy else 0
        for nodeid in bits(nodemap):
            self._flush_sender(pair, nodeid)
            self._flush_waiting(nodeid)
            node = self.nodes[nodeid]
            node.n_flags &= ~(C.NODE_SCONNECTED | C.NODE_RCONNECTED)
            self._node_end(nodeid)
        for desc in (pair.sproxy, pair.rproxy):
            if desc is not None:
                desc.misc &= ~C.MIS_CONNECTED
                self._wake(desc, E.EDVSNOTCONN)  # a get2rmt sleeper returns
                if desc.task is not None:
                    desc.task.proxy = None
        pair.sproxy = pair.rproxy = None
        pair.queue.clear()
        pair.info = ProxiesInfo(px_id=pair.info.px_id)

    def _node_end(self, nodeid: int) -> None:
        """do_node_end: unbind every REMOTE descriptor of the node, drop it from every DC."""
        for dc in self.dcs:
            if not dc.running:
                continue
            for desc in dc.slots:
                if desc.is_remote and desc.nodeid == nodeid:
                    self._do_unbind(dc, desc)
            dc.info.dc_nodes &= ~(1 << nodeid)
        self.nodes[nodeid] = NodeInfo(n_nodeid=nodeid)

    def node_up(self, task: Task, name: str, nodeid: int, pxid: int) -> int:
        self._require_init()
        if not 0 <= nodeid < self.dvs.d_nr_nodes:
            raise E.DvkError.for_code(E.EDVSBADNODEID)
        pair = self._pair(pxid)
        if not pair.in_use:
            raise E.DvkError.for_code(E.EDVSPROXYFREE)
        for desc in (pair.sproxy, pair.rproxy):
            desc.nodemap |= 1 << nodeid
        node = self.nodes[nodeid]
        node.n_flags = C.NODE_ATTACHED
        if pair.info.px_flags & C.PROXIES_SCONNECTED:
            node.n_flags |= C.NODE_SCONNECTED
        if pair.info.px_flags & C.PROXIES_RCONNECTED:
            node.n_flags |= C.NODE_RCONNECTED
        node.n_proxies = pxid
        node.n_name = name[:C.MAXNODENAME - 1]
        return 0

    def node_down(self, task: Task, nodeid: int) -> int:
        """The kernel's test is inverted: only a node the pair does not serve is
        cleared.  Reproduced: it loses no message and hangs nobody."""
        self._require_init()
        if not 0 <= nodeid < self.dvs.d_nr_nodes:
            raise E.DvkError.for_code(E.EDVSBADNODEID)
        node = self.nodes[nodeid]
        if node.n_proxies >= 0:
            pair = self.proxies[node.n_proxies]
            if pair.sproxy is None or not pair.sproxy.nodemap & (1 << nodeid):
                self.nodes[nodeid] = NodeInfo(n_nodeid=nodeid)
        return 0

    def proxy_conn(self, task: Task, pxid: int, status: int) -> int:
        self._require_init()
        pair = self._pair(pxid)
        if not pair.in_use:
            raise E.DvkError.for_code(E.EDVSPROXYFREE)
        if pair.sproxy is None or pair.rproxy is None:
            raise E.DvkError.for_code(E.EDVSNOPROXY)
        nodes = list(bits(pair.sproxy.nodemap))
        if status == C.CONNECT_SPROXY:
            pair.info.px_flags |= C.PROXIES_SCONNECTED
            pair.sproxy.misc |= C.MIS_CONNECTED
            for n in nodes:
                self.nodes[n].n_flags |= C.NODE_SCONNECTED
        elif status == C.CONNECT_RPROXY:
            pair.info.px_flags |= C.PROXIES_RCONNECTED
            pair.rproxy.misc |= C.MIS_CONNECTED
            for n in nodes:
                self.nodes[n].n_flags |= C.NODE_RCONNECTED
        elif status == C.DISCONNECT_SPROXY:
            pair.info.px_flags &= ~C.PROXIES_SCONNECTED
            pair.sproxy.misc &= ~C.MIS_CONNECTED
            for n in nodes:
                self.nodes[n].n_flags &= ~C.NODE_SCONNECTED
                self._flush_sender(pair, n)
            self._wake(pair.sproxy, E.EDVSNOTCONN)
        elif status == C.DISCONNECT_RPROXY:
            pair.info.px_flags &= ~C.PROXIES_RCONNECTED
            pair.rproxy.misc &= ~C.MIS_CONNECTED
            for n in nodes:
                self.nodes[n].n_flags &= ~C.NODE_RCONNECTED
                self._flush_waiting(n)
        else:
            raise E.DvkError.for_code(E.EDVSBADVALUE)
        return 0

    def _flush_sender(self, pair: ProxyPair, nodeid: int) -> None:
        """Empty the sender FIFO of the commands for `nodeid`: local requesters get EDVSNOTCONN,
        queued ACK carriers go back to plain REMOTE."""
        keep = deque()
        for desc in pair.queue:
            if desc.rmtcmd.c_dnode != nodeid:
                keep.append(desc)
                continue
            desc.rts &= ~C.RMTOPER
            desc.proxy = C.NONE
            if not desc.is_remote:
                desc.rts &= ~(C.SENDING | C.RECEIVING | C.ONCOPY)
                desc.misc &= ~C.MIS_ATOMIC
                self._wake(desc, E.EDVSNOTCONN)
        pair.queue = keep

    def _flush_waiting(self, nodeid: int) -> None:
        """Wake every local process waiting for something from `nodeid` with EDVSNOTCONN, and
        forget what the node's remote processes had in flight here."""
        for dc in self.dcs:
            if not dc.running:
                continue
            self._flush_remote(dc, nodeid)
            for desc in dc.slots:
                if desc.is_free or desc.is_remote or desc.task is None:
                    continue
                if self._waits_on_node(dc, desc, nodeid):
                    if desc.rts & C.RMTOPER:
                        self._dequeue(desc)  # its request must not leave after it gave up
                    desc.rts &= ~(C.SENDING | C.RECEIVING | C.ONCOPY | C.WAITUNBIND
                                  | C.WAITMIGR)
                    desc.misc &= ~C.MIS_ATOMIC
                    desc.getfrom = desc.sendto = C.NONE
                    self._wake(desc, E.EDVSNOTCONN)

    def _flush_remote(self, dc: DC, nodeid: int) -> None:
        """The link to `nodeid` is gone: its REMOTE descriptors drop the state put2lcl gave them.
        A parked message (SENDING, in a local receiver's senders FIFO) or a pending sendrec
        (RECEIVING) belongs to a caller its own node already woke with EDVSNOTCONN; kept, it
        would refuse the process's every later request (put2lcl row 11) or be received as
        a stale reply.  An ACK still in the sender FIFO stays: the sender proxy's own
        disconnect empties that."""
        gone = [desc for desc in dc.slots if desc.is_remote and desc.nodeid == nodeid]
        if not gone:
            return
        parked = {id(desc) for desc in gone if desc.rts & C.SENDING}
        if parked:
            for desc in dc.slots:
                if desc.senders and any(id(s) in parked for s in desc.senders):
                    desc.senders = deque(s for s in desc.senders if id(s) not in parked)
        for desc in gone:
            desc.rts &= ~(C.SENDING | C.RECEIVING)
            desc.misc &= ~C.MIS_ATOMIC
            desc.getfrom = desc.sendto = C.NONE
            desc.msg = bytes(len(desc.msg))

    def _waits_on_node(self, dc: DC, desc: Desc, nodeid: int) -> bool:
        def on_node(ep: int) -> bool:
            if ep in (C.ANY, C.NONE):
                return False
            other = dc.slot(ep_p(ep))
            return other is not None and other.is_remote and other.nodeid == nodeid

        if desc.rts & C.RECEIVING and on_node(desc.getfrom):
            return True
        if desc.rts & C.SENDING and on_node(desc.sendto) and not desc.rts & C.RMTOPER:
            return True
        if desc.rts & C.ONCOPY and desc.rmtcmd.c_dnode == nodeid:
            return True
        return bool(desc.rts & C.WAITUNBIND and on_node(desc.waitunbind))

    def _sproxy_pair(self, nodeid: int) -> ProxyPair:
        """The pair serving `nodeid`, which must be bound and connected."""
        node = self.nodes[nodeid] if 0 <= nodeid < len(self.nodes) else None
        if node is None or node.n_proxies < 0:
            raise E.DvkError.for_code(E.EDVSNOPROXY)
        pair = self.proxies[node.n_proxies]
        if not pair.in_use or pair.sproxy is None or not pair.sproxy.misc & C.MIS_PROXY:
            raise E.DvkError.for_code(E.EDVSNOPROXY)
        if not pair.sproxy.misc & C.MIS_CONNECTED:
            raise E.DvkError.for_code(E.EDVSNOTCONN)
        return pair

    def _enqueue(self, desc: Desc, pair: ProxyPair) -> None:
        desc.rts |= C.RMTOPER
        desc.proxy = pair.info.px_id
        pair.queue.append(desc)
        self._wake(pair.sproxy, 0)

    def _dequeue(self, desc: Desc) -> None:
        if desc.proxy != C.NONE and 0 <= desc.proxy < len(self.proxies):
            pair = self.proxies[desc.proxy]
            if desc in pair.queue:
                pair.queue.remove(desc)
        desc.rts &= ~C.RMTOPER
        desc.proxy = C.NONE

    def _rmtcmd(self, desc: Desc, cmd: int, dcid: int, src: int, dst: int, dnode: int,
                rcode: int = 0, length: int = 0) -> Header:
        h = desc.rmtcmd
        new_command(h.buf, cmd, dcid, src, dst, self.local_nodeid, dnode, rcode, length,
                    desc.lpid)
        return h

    def _queue_ack(self, rdesc: Desc, cmd: int, src_ep: int, rcode: int, dc: DC,
                   lpid: int = -1) -> None:
        """Queue an ACK on a REMOTE descriptor when the link to its node is up."""
        try:
            pair = self._sproxy_pair(rdesc.nodeid)
        except E.DvkError:
            log.debug("ACK %#x to %d@%d dropped: no connected sender", cmd, rdesc.endpoint,
                      rdesc.nodeid)
            return
        if rdesc.rts & C.RMTOPER:
            self._dequeue(rdesc)
        h = self._rmtcmd(rdesc, cmd, dc.info.dc_dcid, src_ep, rdesc.endpoint, rdesc.nodeid,
                         rcode)
        h.c_pid = lpid
        self._enqueue(rdesc, pair)

    def get2rmt_more(self, task: Task, payload_addr: int, tout: int) -> Parked:
        """get2rmt: the next command of this sender proxy's FIFO (data copied to
        `payload_addr`), and how many commands were still queued for the proxy afterwards (an
        upper bound: a proxy batches only when it knows more is waiting, so a lone command is
        never delayed by an extra call)."""
        px = self._proxy_caller(task, C.DVK_GET2RMT)
        pair = self.proxies[px.nr]
        deadline = None if tout < 0 else time.monotonic() + tout / 1000.0
        while True:
            while pair.queue:
                desc = pair.queue.popleft()
                try:
                    out = self._take_command(pair, desc, task, payload_addr)
                except E.DvkError as err:
                    if not desc.is_remote:
                        desc.rts &= ~(C.SENDING | C.RECEIVING | C.RMTOPER)
                        self._wake(desc, err.code)
                        raise
                    continue
                if out is not None:
                    return out, len(pair.queue)
            if not px.misc & C.MIS_CONNECTED:
                raise E.DvkError.for_code(E.EDVSNOTCONN)
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise E.DvkError.for_code(E.EDVSTIMEDOUT)
            task.woken = False
            yield deadline
            if task.dead:
                raise TaskGone()

    def _take_command(self, pair: ProxyPair, desc: Desc, task: Task,
                      payload_addr: int) -> bytes | None:
        h = desc.rmtcmd
        buf = h.buf
        desc.rts &= ~C.RMTOPER
        desc.proxy = C.NONE
        if desc.is_free:
            raise E.DvkError.for_code(E.EDVSNOTBIND)
        cmd, dcid, _src, _dst, _snode, dnode = h.route()[:6]
        if not 0 <= dcid < self.dvs.d_nr_dcs:
            raise E.DvkError.for_code(E.EDVSBADDCID)
        if not self.nodes[dnode].n_dcs & (1 << dcid):
            raise E.DvkError.for_code(E.EDVSNODCNODE)
        if not pair.sproxy.nodemap & (1 << dnode):
            raise E.DvkError.for_code(E.EDVSNONODE)
        dc = self.dcs[dcid]
        if not dc.running:
            raise E.DvkError.for_code(E.EDVSDCNOTRUN)
        data = None
        if not desc.is_remote:
            h.c_pid = desc.lpid
            if cmd in C.MSG_CMDS:
                set_m_source(buf, desc.endpoint)
            if cmd == C.CMD_SNDREC_MSG:
                desc.rts &= ~C.SENDING
                desc.sendto = C.NONE
            elif cmd == C.CMD_NTFY_MSG:
                desc.rts &= ~C.SENDING
                self._wake(desc, 0)
            elif cmd == C.CMD_COPYIN_DATA:
                if h.v_bytes > pair.info.px_maxbytes:
                    raise E.DvkError.for_code(E.EDVS2BIG)
                data = self._read_party(dc, h.v_src, h.v_saddr, h.v_bytes)
        else:
            if cmd == C.CMD_COPYOUT_DATA:
                src = dc.slot(ep_p(h.c_src))
                if h.c_rcode == 0:
                    try:
                        data = self._read_party(dc, h.v_src, h.v_saddr, h.v_bytes)
                    except E.DvkError as err:
                        h.c_rcode, h.c_len = err.code, 0
                if src is not None:
                    src.rts &= ~C.ONCOPY
            elif cmd in C.COPY_ACK_CMDS:
                dst = dc.slot(ep_p(h.v_dst))
                if dst is not None and not dst.is_remote:
                    dst.rts &= ~C.ONCOPY
            elif cmd not in C.MSG_ACK_CMDS:
                raise E.DvkError.for_code(E.EDVSINVAL)
        if data is not None:
            try:
                task.space.write(payload_addr, data)
            except ValueError:  # the proxy's payload buffer cannot take the bytes
                if not desc.is_remote:
                    raise E.DvkError.for_code(E.EDVSFAULT) from None
                h.c_rcode, data = E.EDVSFAULT, b""  # the remote requester's copy fails
            h.c_len = len(data)
        tv_sec, tv_nsec = timestamp()
        stamp_outgoing(buf, tv_sec, tv_nsec)
        out = bytes(buf)
        h.c_cmd = C.CMD_NONE
        node = self.nodes[dnode]
        node.n_stime_sec, node.n_stime_nsec = tv_sec, tv_nsec
        node.n_pxsent += 1
        pair.sproxy.rmtsent += 1
        return out

    def _read_party(self, dc: DC, ep: int, addr: int, nbytes: int) -> bytes:
        party = dc.slot(ep_p(ep))
        if party is None or party.is_free or party.is_remote:
            raise E.DvkError.for_code(E.EDVSBADPROC)
        try:
            return self._space(party).read(addr, nbytes)
        except ValueError:
            raise E.DvkError.for_code(E.EDVSFAULT) from None
