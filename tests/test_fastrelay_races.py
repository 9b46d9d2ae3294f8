"""The compiled relay's rules that hold only at one moment between two threads, tested at that
moment (dsp_proxy/fastrelay.c, `RT_AT_*`; docs/design.md, "The compiled relay").

fastrelay.c is built a second time with RT_TEST_HOOKS (`fastrelay_build.builder(test_hooks=
True)`, in a directory of the test's): that module calls the test back at the moments the
source names, where the test takes another thread's step (a writer queueing a frame, the link
withdrawing its socket), then lets the relay go on.  Each test fails when the rule it is named
after is taken out of fastrelay.c; the DSP's own module has no such calls.
"""

from __future__ import annotations

import importlib.util
import os
import random
import socket
import threading
from collections.abc import Callable

import pytest
from test_fastrelay_wire import BIG, Rig, _frames, _own, _RacingWire, _request

from dsp_proxy import fastpath, fastrelay_build
from dsp_proxy.link import uncork
from dvk_cffi import consts as C
from dvk_cffi import errors as E

pytestmark = pytest.mark.skipif(fastpath.lib is None, reason="the compiled relay is not built")

# fastrelay.c's moments
AT_SETTLED, AT_WRITE_DONE, AT_LOCKING = 1, 2, 3


@pytest.fixture(scope="module")
def hooked_module(tmp_path_factory):
    """The relay built with RT_TEST_HOOKS."""
    tmp = tmp_path_factory.mktemp("hooked")
    path = fastrelay_build.builder(test_hooks=True).compile(tmpdir=str(tmp), verbose=False)
    spec = importlib.util.spec_from_file_location(fastrelay_build.HOOKED_MODULE, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


#: How long a step may take; one that takes longer fails the test (it would have happened
#: at another moment than the one it was meant for).
STEP_LIMIT = 10.0


class Hooks:
    """The test's side of the hooked module: `on(at, node, step)` runs `step` (once) when the
    relay reaches moment `at` for link `node`, in another thread, which the relay waits for:
    the step happens exactly there, as a thread of the DSP could do it."""

    def __init__(self, module) -> None:
        self.module = module
        self.steps: dict[tuple[int, int], Callable[[], None]] = {}
        self.errors: list[BaseException] = []
        self._callback = module.ffi.callback("void(int, int)", self._at)
        module.lib.rt_test_hook = self._callback

    def on(self, at: int, node: int, step: Callable[[], None]) -> None:
        self.steps[(at, node)] = step

    def _at(self, at: int, node: int) -> None:
        step = self.steps.pop((at, node), None)
        if step is None:
            return

        def run() -> None:
            try:
                step()
            except BaseException as exc:   # reported by the test, not lost in the thread
                self.errors.append(exc)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        t.join(STEP_LIMIT)
        if t.is_alive():
            self.errors.append(TimeoutError(f"the step at moment {at} did not end"))

    def close(self) -> None:
        self.module.lib.rt_test_hook = self.module.ffi.NULL
        if self.errors:
            raise self.errors[0]
        assert not self.steps, f"the relay never reached moments {sorted(self.steps)}"


@pytest.fixture
def hooks(hooked_module, monkeypatch):
    """The relay's functions from the hooked module for the length of a test (and the
    receiver's cork, which a relay's read may leave set, taken off after it)."""
    monkeypatch.setattr(fastpath, "lib", hooked_module.lib)
    monkeypatch.setattr(fastpath, "ffi", hooked_module.ffi)
    h = Hooks(hooked_module)
    try:
        yield h
    finally:
        uncork()
        h.close()


def test_a_frame_queued_while_the_link_is_told_quiet_is_not_overtaken(hooks):
    """The settled rule's second look: a writer saw its queue empty under the send lock and
    tells the relay the link is quiet; right then another writer queues a frame (the send
    lock is busy, so it leaves the frame to the lock's holder).  The link must not stay
    quiet: the relay's next frame, which comes as soon as the lock is free, goes behind that
    frame instead of being written before it."""
    rig = Rig(_RacingWire)
    try:
        rng = random.Random(11)
        hooks.on(AT_SETTLED, rig.svr, lambda: rig.link.submit(*_own(801)))
        rig.link.wire.on_released = lambda: rig.pump(_request(rng))
        rig.link.flush()
        got = rig.drain(2)
        assert [(cmd, src) for cmd, src, _ in got][:1] == [(C.CMD_SEND_MSG, 801)], \
            "the relay wrote its frame before the frame queued while the link settled"
        assert got[1][0] == C.CMD_SNDREC_MSG
    finally:
        rig.close()


def test_a_frame_queued_while_the_relay_writes_goes_out_without_another_write(hooks):
    """The flush hand-over: while the relay holds a link's send lock for its own write, a
    writer queues a frame and leaves it to the lock's holder.  The relay then tells its
    receiver to flush that link, so the frame goes out at once, not at the link's next write
    (here there is none: nothing else would ever send it)."""
    rig = Rig()
    try:
        rng = random.Random(12)
        hooks.on(AT_WRITE_DONE, rig.svr, lambda: rig.link.submit(*_own(802)))
        rig.client.sendall(_request(rng))
        assert not rig.relay.read(0), "the session's frame went to the Python path"
        rig.server.settimeout(5)
        stream = b""
        while len(_frames(stream)) < 2:
            try:
                data = rig.server.recv(1 << 16)
            except TimeoutError:
                pytest.fail("the frame left to the relay was not written "
                            f"(the server got {_frames(stream)})")
            stream += data
        got = _frames(stream)
        assert [cmd for cmd, _src, _ in got] == [C.CMD_SNDREC_MSG, C.CMD_SEND_MSG]
        assert got[1][1] == 802
    finally:
        rig.close()


def test_a_frame_a_writer_cut_as_the_relay_locked_is_not_broken_into(hooks):
    """The relay finds the link quiet and is about to take the send lock; right then a writer
    takes it, the socket takes only part of the writer's frame, and the writer releases the
    lock with the rest left unsent.  The relay looks at quiet again once it holds the lock
    and hands its frame to the link, behind that rest, instead of writing it into the middle
    of the cut frame."""
    rig = Rig()
    try:
        rig.small_socket()
        hbuf, data = _own(804, BIG)

        def writer_cuts_a_frame() -> None:
            assert rig.link.submit(hbuf, data) == 0
            assert rig.link.unsent, "the socket took the whole frame: nothing was cut"
            rig.take()

        hooks.on(AT_LOCKING, rig.svr, writer_cuts_a_frame)
        rig.client.sendall(_request(random.Random(14)))
        rig.relay.read(0)
        got = rig.drain(2)
        assert got[0] == (C.CMD_COPYOUT_DATA, 804, data)
        assert got[1][0] == C.CMD_SNDREC_MSG
    finally:
        rig.close()


def test_the_relay_writes_only_the_socket_it_finds_under_the_lock(hooks):
    """The relay looks at the link's socket, finds it writable, and is about to take the send
    lock; right then the link goes down: under the send lock it withdraws the socket and
    closes it, and the descriptor's number is taken by another socket.  The relay takes the
    socket to write from what the link publishes under the lock (none now), not from its look
    before: the other socket gets no byte, and the frame goes to the link, which refuses it,
    so the client gets its error reply."""
    rig = Rig()
    refused: list[int] = []
    rig.relay.refused = lambda hbuf, code: refused.append(code)
    spy_in, spy_out = socket.socketpair()
    try:
        rng = random.Random(13)
        old = rig.link.out_sock

        def link_goes_down() -> None:
            with rig.link.send_lock:
                rig.link.wire.publish(None)
                rig.link.up = False
                os.dup2(spy_in.fileno(), old.fileno())   # closed; the number taken again

        hooks.on(AT_LOCKING, rig.svr, link_goes_down)
        rig.client.sendall(_request(rng))
        rig.relay.read(0)
        spy_out.setblocking(False)
        with pytest.raises(BlockingIOError):
            spy_out.recv(1 << 16)
        assert refused == [E.EDVSNOTCONN]
    finally:
        spy_in.close()
        spy_out.close()
        rig.close()
