"""put2lcl's check table and ACK policy, run on the kernel logic in-process.

No socket, no process, no thread: a `NodeKernel` object with hand-made tasks (a receiver and a
sender proxy of pair 2, local and remote endpoints bound as in test_emu_kernel's proxy
environment).  Each row of the table is one header; the test asserts the error code and whether
the kernel queued an error ACK on the remote requester (taken with a get2rmt that does not
wait).
"""

from __future__ import annotations

import fcntl
import mmap
import os
import random
import time
from types import GeneratorType, SimpleNamespace

import pytest

from dvk_cffi import consts as C
from dvk_cffi import errors as E
from dvk_cffi.emu.kernel import NodeKernel
from dvk_cffi.emu.model import unused_tids
from dvk_cffi.info import DcInfo, DvsInfo
from dvk_cffi.wire import MESSAGE_SIZE, Header, make_header
from emu_helpers import (
    DC0,
    FREE_EP,
    L_PID,
    LSYS,
    LSYS2,
    LUSR,
    NR_PROCS,
    NR_TASKS,
    PUT2LCL_ROWS,
    RSYS,
    RSYS3,
    RUSR,
    U_PID,
)

NO_SLOT_EP = 5000                       # process number with no slot in DC0
ARENA = 1 << 20


def run(result):
    """The outcome of a kernel call that must not block: a value, or a parked call that
    finishes at once (the kernel may hand back a generator for calls that can block)."""
    if isinstance(result, GeneratorType):
        try:
            next(result)
        except StopIteration as stop:
            return stop.value
        raise AssertionError("the call blocked")
    return result


@pytest.fixture
def k():
    """Node 1 with pair 2 for nodes 2 and 3; RSYS, RUSR on node 2, RSYS3 on node 3; local
    LSYS, LSYS2, LUSR bound by their own tasks."""
    kern = NodeKernel()
    pid = os.getpid()
    tids = unused_tids(6)
    boot = kern.attach(pid, tids[0], "boot")
    kern.dvs_init(boot, 1, DvsInfo())
    kern.dc_init(boot, DcInfo(dc_flags=C.DC_RUNNING))
    sproxy = kern.attach(pid, tids[1], "sproxy")
    rproxy = kern.attach(pid, tids[2], "rproxy")
    fd = os.memfd_create("test-arena", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, ARENA)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        base = kern.add_arena(boot, fd, ARENA)
        mem = mmap.mmap(fd, ARENA)
    finally:
        os.close(fd)
    kern.proxies_bind(boot, "node2", 2, sproxy.tid, rproxy.tid, C.MAXCOPYBUF)
    for n in (2, 3):
        kern.node_up(boot, f"node{n}", n, 2)
    kern.proxy_conn(boot, 2, C.CONNECT_SPROXY)
    kern.proxy_conn(boot, 2, C.CONNECT_RPROXY)
    for n in (2, 3):
        kern.add_node(boot, DC0, n)
    kern.bind(boot, C.RMT_BIND, DC0, -1, RSYS, 2, "rsys")
    kern.bind(boot, C.RMT_BIND, DC0, -1, RUSR, 2, "rusr")
    kern.bind(boot, C.RMT_BIND, DC0, -1, RSYS3, 3, "rsys3")
    local = {}
    for ep, tid in ((LSYS, tids[3]), (LSYS2, tids[4]), (LUSR, tids[5])):
        local[ep] = kern.attach(pid, tid, f"ep{ep}")
        assert kern.bind(local[ep], C.SELF_BIND, DC0, -1, ep, C.LOCALNODE, "") == ep
    yield SimpleNamespace(kern=kern, sproxy=sproxy, rproxy=rproxy, local=local,
                          spay=base, rpay=base + C.MAXCOPYBUF, mem=mem)
    mem.close()


def header(**fields) -> Header:
    base = dict(c_cmd=C.CMD_SEND_MSG, c_dcid=DC0, c_src=RSYS, c_dst=LSYS, c_snode=2, c_dnode=1)
    base.update(fields)
    h = make_header(**base)
    h.c_msg.m_source = base["c_src"]
    return h


def put(k, **fields) -> int:
    return run(k.kern.put2lcl(k.rproxy, bytes(header(**fields).buf), k.rpay))


def put_code(k, **fields) -> int:
    with pytest.raises(E.DvkError) as info:
        put(k, **fields)
    return info.value.code


def taken(k) -> Header | None:
    """The next command of the sender FIFO, None when there is none (get2rmt, no wait)."""
    try:
        raw = run(k.kern.get2rmt_more(k.sproxy, k.spay, C.TIMEOUT_NOWAIT))[0]
    except E.DvkError as err:
        assert err.code == E.EDVSTIMEDOUT
        return None
    return Header(raw)


# id, header fields, error, expected ACK (c_cmd, c_src, c_dst, c_pid) or None


def check_row(k, fields: dict, code: int, ack) -> None:
    assert put_code(k, **fields) == code
    h = taken(k)
    if ack is None:
        assert h is None, f"unexpected ACK {h!r}"
        return
    cmd, src, dst, pid = ack
    pid = {U_PID: k.local[LUSR].tid, L_PID: k.local[LSYS].tid}.get(pid, pid)
    assert h is not None, "no ACK queued"
    got = (h.c_cmd, h.c_rcode, h.c_src, h.c_dst, h.c_dcid, h.c_snode, h.c_dnode, h.c_len,
           h.c_pid, h.c_flags)
    assert got == (cmd, code, src, dst, fields.get("c_dcid", DC0), 1, 2, 0, pid, 0)
    assert taken(k) is None


@pytest.mark.parametrize("row", PUT2LCL_ROWS, ids=[r[0] for r in PUT2LCL_ROWS])
def test_check_table_row(k, row):
    _id, fields, code, ack = row
    check_row(k, fields, code, ack)


def test_row11_src_already_sending(k):
    assert put(k, c_cmd=C.CMD_SEND_MSG) == 0        # LSYS not receiving: RSYS is SENDING
    check_row(k, {}, E.EDVSENQUEUED, None)


def test_row11_src_has_queued_command(k):
    assert put_code(k, c_dst=FREE_EP) == E.EDVSDSTDIED   # leaves an error ACK on RSYS
    assert put_code(k, c_cmd=C.CMD_SNDREC_MSG) == E.EDVSENQUEUED
    h = taken(k)
    assert (h.c_cmd, h.c_rcode) == (C.CMD_SEND_ACK, E.EDVSDSTDIED)
    assert taken(k) is None


def test_row15_dst_migrating(k):
    k.kern.dcs[DC0].slot(LSYS).rts |= C.MIGRATING
    check_row(k, {}, E.EDVSMIGRATE, (C.CMD_SEND_ACK, LSYS, RSYS, L_PID))


@pytest.mark.parametrize("cmd, ack", [
    (C.CMD_SEND_MSG, C.CMD_SEND_ACK),
    (C.CMD_SNDREC_MSG, C.CMD_SEND_ACK),
    (C.CMD_REPLY_MSG, C.CMD_SEND_ACK),
    (C.CMD_NTFY_MSG, C.CMD_SEND_ACK),
    (C.CMD_COPYIN_DATA, C.CMD_COPYIN_ACK),
    (C.CMD_COPYOUT_RQST, C.CMD_COPYOUT_DATA),
    (C.CMD_COPYLCL_RQST, C.CMD_COPYLCL_ACK),
    (C.CMD_COPYRMT_RQST, C.CMD_COPYRMT_ACK),
    (C.CMD_COPYIN_RQST, C.CMD_COPYRMT_ACK),
], ids=lambda v: C.CMD_NAMES.get(v, str(v)))
def test_error_ack_per_request(k, cmd, ack):
    check_row(k, dict(c_cmd=cmd, c_dst=FREE_EP, v_rqtr=RSYS, v_bytes=0),
              E.EDVSDSTDIED, (ack, FREE_EP, RSYS, -1))


def test_no_error_ack_without_connected_sender(k):
    run(k.kern.proxy_conn(k.sproxy, 2, C.DISCONNECT_SPROXY))
    assert put_code(k, c_dst=FREE_EP) == E.EDVSDSTDIED
    assert not k.kern.dcs[DC0].slot(RSYS).rts & C.RMTOPER


@pytest.mark.parametrize("cmd", [C.CMD_SEND_ACK, C.CMD_SNDREC_ACK, C.CMD_COPYIN_ACK,
                                 C.CMD_COPYLCL_ACK, C.CMD_COPYOUT_DATA, C.CMD_COPYRMT_ACK],
                         ids=lambda v: C.CMD_NAMES.get(v, str(v)))
def test_acks_to_a_process_not_waiting_are_refused_without_ack(k, cmd):
    code = put_code(k, c_cmd=cmd)
    assert code in (E.EDVSACKDST, E.EDVSPROCSTS)
    assert taken(k) is None


def test_send_to_receiving_process_is_delivered_and_acked(k):
    dst = k.kern.dcs[DC0].slot(LSYS)
    dst.rts |= C.RECEIVING
    dst.getfrom = C.ANY
    assert put(k, c_cmd=C.CMD_SEND_MSG) == MESSAGE_SIZE
    assert k.local[LSYS].inbox is not None and not dst.rts & C.RECEIVING
    h = taken(k)
    assert (h.c_cmd, h.c_rcode, h.c_src, h.c_dst) == (C.CMD_SEND_ACK, 0, LSYS, RSYS)


def test_sndrec_to_receiving_process_waits_for_the_reply_without_ack(k):
    dst = k.kern.dcs[DC0].slot(LSYS)
    dst.rts |= C.RECEIVING
    dst.getfrom = C.ANY
    assert put(k, c_cmd=C.CMD_SNDREC_MSG) == MESSAGE_SIZE
    assert taken(k) is None                          # the reply is the answer
    rmt = k.kern.dcs[DC0].slot(RSYS)
    assert rmt.rts & C.RECEIVING and rmt.getfrom == LSYS


def test_notify_from_user_process_slot_is_refused(k):
    dst = k.kern.dcs[DC0].slot(LSYS)
    h = dict(c_cmd=C.CMD_NTFY_MSG)
    assert put(k, **h) == 0                          # pending: LSYS is not receiving
    assert dst.notify_pending
    hdr = header(c_cmd=C.CMD_NTFY_MSG)
    hdr.c_msg.m_type = C.NOTIFY_FROM(LUSR)
    with pytest.raises(E.DvkError) as info:
        run(k.kern.put2lcl(k.rproxy, bytes(hdr.buf), k.rpay))
    assert info.value.code == E.EDVSPRIVILEGES


def test_copylcl_without_a_slot_is_range_without_ack(k):
    for fields in (dict(v_src=LSYS, v_dst=NO_SLOT_EP), dict(v_src=NO_SLOT_EP, v_dst=LSYS)):
        assert put_code(k, c_cmd=C.CMD_COPYLCL_RQST, v_rqtr=RSYS, v_bytes=16,
                        **fields) == E.EDVSRANGE
        assert taken(k) is None


def test_copylcl_fault_is_acked(k):
    assert put(k, c_cmd=C.CMD_COPYLCL_RQST, v_src=LSYS, v_dst=LSYS2, v_rqtr=RSYS,
               v_saddr=0x100, v_daddr=0x100, v_bytes=16) == 0
    h = taken(k)
    assert (h.c_cmd, h.c_rcode) == (C.CMD_COPYLCL_ACK, E.EDVSFAULT)


def test_copyin_data_errors_are_acked(k):
    k.kern.dcs[DC0].slot(LSYS).rts |= C.ONCOPY
    assert put_code(k, c_cmd=C.CMD_COPYIN_DATA, v_dst=LSYS, v_rqtr=RSYS,
                    v_bytes=8) == E.EDVSPROCSTS
    h = taken(k)
    assert (h.c_cmd, h.c_rcode) == (C.CMD_COPYIN_ACK, E.EDVSPROCSTS)


def test_copyout_rqst_to_running_process_is_acked(k):
    assert put_code(k, c_cmd=C.CMD_COPYOUT_RQST, v_src=LSYS, v_rqtr=RSYS,
                    v_bytes=8) == E.EDVSPROCSTS
    h = taken(k)
    assert (h.c_cmd, h.c_rcode) == (C.CMD_COPYOUT_DATA, E.EDVSPROCSTS)


def test_put2lcl_needs_the_receiver_proxy(k):
    for task, code in ((k.sproxy, E.EDVSBADCALL), (k.local[LSYS], E.EDVSBADCALL)):
        with pytest.raises(E.DvkError) as info:
            run(k.kern.put2lcl(task, bytes(header().buf), k.rpay))
        assert info.value.code == code
    run(k.kern.proxy_conn(k.rproxy, 2, C.DISCONNECT_RPROXY))
    assert put_code(k) == E.EDVSNOTCONN


def test_kernel_and_proxy_error_ack_tables_differ_only_where_documented():
    """The kernel's error ACK table and the proxy's differ in the SNDREC and NTFY rows only."""
    differ = {cmd for cmd in C.KERNEL_ERROR_ACK.keys() | C.PROXY_ERROR_ACK.keys()
              if C.KERNEL_ERROR_ACK.get(cmd) != C.PROXY_ERROR_ACK.get(cmd)}
    assert differ == {C.CMD_SNDREC_MSG, C.CMD_NTFY_MSG}
    assert set(C.KERNEL_ERROR_ACK) == C.RQST_CMDS
    assert C.PROXY_ERROR_ACK[C.CMD_SNDREC_MSG] == C.CMD_SNDREC_ACK


def test_refused_sndrec_error_ack_is_a_send_ack(k):
    """The kernel's own ACK for a refused sendrec is a SEND_ACK (as the module's)."""
    check_row(k, dict(c_cmd=C.CMD_SNDREC_MSG, c_dst=FREE_EP), E.EDVSDSTDIED,
              (C.CMD_SEND_ACK, FREE_EP, RSYS, -1))


def test_random_put2lcl_headers_never_fault(k):
    """Random headers from the receiver proxy (bounded in count and time): each put2lcl either
    returns a value or fails with a DvkError; get2rmt then takes whatever was queued without
    fault; the kernel stays consistent enough to deliver a normal message afterwards."""
    rng = random.Random(4711)
    eps = [LSYS, LSYS2, LUSR, RSYS, RUSR, RSYS3, FREE_EP, NO_SLOT_EP, -1, C.ANY, C.NONE,
           -NR_TASKS, NR_PROCS - 1, 1 << 20]
    cmds = sorted(C.PUT2LCL_CMDS) + [C.CMD_NONE, C.CMD_NTFY_ACK, 0x7FFF]
    addrs = [0, k.rpay, k.rpay + 16, k.spay, ARENA - 1, 0xFFFFFFFF]
    deadline = time.monotonic() + 20
    done = 0
    for _ in range(4000):
        if time.monotonic() > deadline:
            break
        fields = dict(c_cmd=rng.choice(cmds), c_src=rng.choice(eps), c_dst=rng.choice(eps),
                      c_dcid=rng.choice([DC0, DC0, 1, -1]), c_snode=rng.choice([2, 2, 3, 1, 40]),
                      c_dnode=rng.choice([1, 1, 2]), c_rcode=rng.choice([0, -1, E.EDVSFAULT]),
                      v_src=rng.choice(eps), v_dst=rng.choice(eps), v_rqtr=rng.choice(eps),
                      v_saddr=rng.choice(addrs), v_daddr=rng.choice(addrs),
                      v_bytes=rng.choice([0, 8, 36, C.MAXCOPYBUF, C.MAXCOPYBUF + 1, -5]))
        hdr = header(**fields)
        hdr.c_msg.m_type = rng.choice([0, C.NOTIFY_FROM(LSYS), C.NOTIFY_FROM(LUSR), -7])
        try:
            result = run(k.kern.put2lcl(k.rproxy, bytes(hdr.buf), k.rpay))
            assert isinstance(result, int)
        except E.DvkError:
            pass
        while taken(k) is not None:
            pass
        done += 1
    assert done >= 200
    for desc in k.kern.dcs[DC0].slots:            # forget what the noise left half-done
        if not desc.is_free and not desc.is_remote:
            desc.rts = 0
            desc.senders.clear()
    dst = k.kern.dcs[DC0].slot(LSYS)
    rmt = k.kern.dcs[DC0].slot(RSYS)
    rmt.rts &= ~(C.SENDING | C.RECEIVING | C.RMTOPER)
    dst.rts |= C.RECEIVING
    dst.getfrom = C.ANY
    assert put(k, c_cmd=C.CMD_SEND_MSG) == MESSAGE_SIZE


@pytest.mark.parametrize("where", ["unmapped", "past_the_arena_end"])
def test_get2rmt_into_a_bad_payload_buffer_fails_the_copy_at_once(k, where):
    """A sender proxy whose payload buffer cannot take a COPYIN_DATA's bytes gets EDVSFAULT,
    and the vcopy whose command it took ends with that code at once (as for the other errors
    of a taken command).  It was an exception out of get2rmt, logged as a kernel fault and
    answered EDVSGENERIC, and the copying process slept until its 30 s limit."""
    payload = {"unmapped": 0x70000000, "past_the_arena_end": k.spay + ARENA - 4}[where]
    lsys = k.local[LSYS]
    copy = k.kern.vcopy(lsys, C.SELF, k.spay + 2 * C.MAXCOPYBUF, RSYS, 0x5000, 8)
    assert next(copy) is not None                   # parked, with its time limit
    with pytest.raises(E.DvkError) as info:
        run(k.kern.get2rmt_more(k.sproxy, payload, C.TIMEOUT_NOWAIT))
    assert info.value.code == E.EDVSFAULT
    assert lsys.woken and lsys.wake_rc == E.EDVSFAULT
    with pytest.raises(E.DvkError) as info:
        next(copy)
    assert info.value.code == E.EDVSFAULT
    assert not k.kern.dcs[DC0].slot(LSYS).rts & (C.ONCOPY | C.RMTOPER)
    assert taken(k) is None


def test_copyout_data_into_a_bad_payload_buffer_is_an_error_ack(k):
    """The bytes of a COPYOUT_DATA that the sender proxy's payload buffer cannot take: the
    command leaves as an EDVSFAULT ACK without data, so the remote requester's copy fails at
    once, and the local source is no longer ONCOPY."""
    receiving = k.kern.receive(k.local[LSYS], C.ANY, -1)
    assert next(receiving) is None                  # LSYS blocked: it may be copied from
    assert put(k, c_cmd=C.CMD_COPYOUT_RQST, v_src=LSYS, v_dst=RSYS, v_rqtr=RSYS,
               v_saddr=k.spay + 2 * C.MAXCOPYBUF, v_daddr=0x5000, v_bytes=8) == 0
    raw, _more = run(k.kern.get2rmt_more(k.sproxy, 0x70000000, C.TIMEOUT_NOWAIT))
    h = Header(raw)
    assert (h.c_cmd, h.c_rcode, h.c_len, h.c_dst) == (C.CMD_COPYOUT_DATA, E.EDVSFAULT, 0, RSYS)
    assert not k.kern.dcs[DC0].slot(LSYS).rts & C.ONCOPY
    receiving.close()


@pytest.fixture
def big(k):
    """A second, 8 MiB arena of this process (sparse, sealed), for copies past the limit."""
    size = 8 << 20
    fd = os.memfd_create("big-arena", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        return k.kern.add_arena(k.local[LSYS], fd, size)
    finally:
        os.close(fd)


def test_copy_commands_longer_than_the_copy_limit_are_refused(k, big):
    """A COPYLCL_RQST or COPYOUT_DATA names its length in v_bytes, which a peer sets at will;
    no chunk a proxy carries is longer than the pair's px_maxbytes (64 KiB here; COPYOUT_DATA
    is read from the receiver's payload buffer of that size), and one that says so made the
    node kernel read and copy that many bytes at once (up to 2 GiB from large enough arenas;
    past the payload buffer, other memory of the receiver's process).  EDVS2BIG, ACKed to the
    remote requester like the other copy errors."""
    n = k.kern.proxies[2].info.px_maxbytes + 1
    assert put(k, c_cmd=C.CMD_COPYLCL_RQST, v_src=LSYS, v_dst=LSYS2, v_rqtr=RSYS,
               v_saddr=big, v_daddr=big + n, v_bytes=n) == 0
    h = taken(k)
    assert (h.c_cmd, h.c_rcode) == (C.CMD_COPYLCL_ACK, E.EDVS2BIG)
    lsys = k.local[LSYS]
    copy = k.kern.vcopy(lsys, RSYS, 0x5000, C.SELF, big, 8)        # LSYS copies from RSYS
    assert next(copy) is not None
    assert taken(k).c_cmd == C.CMD_COPYOUT_RQST
    assert put(k, c_cmd=C.CMD_COPYOUT_DATA, c_src=RSYS, c_dst=LSYS, v_src=RSYS, v_dst=LSYS,
               v_rqtr=LSYS, v_daddr=big, v_bytes=n, c_len=0) == 0
    with pytest.raises(E.DvkError) as info:
        next(copy)
    assert info.value.code == E.EDVS2BIG
