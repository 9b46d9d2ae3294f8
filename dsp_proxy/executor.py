"""Carrying out the router's actions (docs/design.md, "Router").

The thread that got a frame (an RPROXY, the get2rmt thread, the main loop) runs the actions the
router returned for it, outside any router lock.  Sending only queues on the target link, which
never blocks; a refusal (link down, queue full) turns into the error reply the router gives for
the client, so no client waits for ever.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from dvk_cffi import errors as E
from dvk_cffi.wire import HEADER_SIZE, Header, hello_header

from .group import CONTROL, DELIVER, LOCAL, MT_SVC_START, NO_SERVER, SEND, Router

log = logging.getLogger("dsp")


class Executor:
    """Runs action tuples against the links, the put2lcl queue and the local deliverer."""

    def __init__(self, local: int, links: dict, router: Router,
                 put2lcl: Callable[[Header, bytes], bool] | None,
                 on_no_server: Callable[[], None]) -> None:
        self.local = local
        self.links = links
        self.router = router
        self.put2lcl = put2lcl
        self.on_no_server = on_no_server
        self.dropped = 0

    def __call__(self, act, deliverer=None) -> None:
        if act is None:
            return
        if type(act) is list:
            for a in act:
                self.run(a, deliverer)
        else:
            self.run(act, deliverer)

    def run(self, act: tuple, deliverer=None) -> None:
        kind = act[0]
        if kind == SEND:
            _kind, node, hbuf, data, request, relayed = act
            link = self.links.get(node)
            if link is None:
                code = E.EDVSNOTCONN
            elif len(hbuf) > HEADER_SIZE:    # a run of payload-less frames
                code = link.submit_run(hbuf)
            else:
                code = link.submit(hbuf, data, copy=False)
            if code and request is not None:
                for off in range(0, len(request), HEADER_SIZE):
                    self(self.router.send_failed(request[off:off + HEADER_SIZE], relayed,
                                                 code), deliverer)
            elif code:
                self.dropped += len(hbuf) // HEADER_SIZE
        elif kind == LOCAL:
            if self.put2lcl is None or not self.put2lcl(Header(act[1]), act[2]):
                self.dropped += 1
        elif kind == DELIVER:
            _kind, hbuf, data, autobind = act
            if deliverer is not None:
                deliverer.deliver(Header(bytearray(hbuf)), data, autobind)
            else:
                self.dropped += 1
        elif kind == CONTROL:
            self.control(act[1], act[2])
        elif kind == NO_SERVER:
            self.on_no_server()

    def submit(self, node: int, hbuf, data=None) -> int:
        """Queue a frame on the link to `node`: 0, EDVSNOTCONN or EDVSAGAIN."""
        link = self.links.get(node)
        if link is None:
            return E.EDVSNOTCONN
        return link.submit(hbuf, data, copy=False)

    def control(self, node: int, body: bytes) -> bool:
        """A control frame (a HELLO carrying a message) to `node`."""
        h = hello_header(self.local, node)
        h.c_msg.load(body)
        if not self.submit(node, h.buf):
            return True
        m = h.c_msg
        group = self.router.group
        if m.m_type == MT_SVC_START and group is not None:
            self(group.start_failed(node, m.m1_p2))
        log.debug("control frame %#x to node %d not sent: link down", m.m_type, node)
        return False
