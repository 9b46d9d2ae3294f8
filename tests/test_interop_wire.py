"""Frames a C DSP sends that the other interop tests do not: a C peer's link configured
`compress YES; batch YES;`, posed by a fake peer from the peer's own address.

What the C sender does (docs/design.md, "The wire"): a batch frame is the first
command's header with `c_flags` = the batch flag, `c_batch_nr` = the number of further headers
(at most MAXBATCMD = 546) and `c_len` = that number x 120, the further headers as the payload;
with `compress YES` the payload of a batch frame is LZ4-frame compressed like COPY data
(NO_BATCH_COMPRESSION is not defined), the LZ4 flag set and `c_len` the compressed length,
whenever that is shorter.  The C receiver inflates first and then checks `c_batch_nr` x 120
against the inflated length.
"""

from __future__ import annotations

import time

import lz4.frame
import pytest
from test_hostile import CONFIG, SILENCE, RecordingPeer, log_of, recording_peer

from cluster_helpers import cluster_from, wait_for
from dvk_cffi import consts as C
from dvk_cffi.wire import HEADER_SIZE, hello_header, make_header, pack_batch

#: The C sender's most further headers in one batch frame (MAXCOPYBUF / sizeof(cmd_t)).
C_MAXBATCMD = C.MAXCOPYBUF // HEADER_SIZE


def c_lz4(raw: bytes) -> bytes:
    """The LZ4 frame LZ4F_compressFrame makes with no preferences (64 KiB linked blocks, no
    checksum, no content size)."""
    return lz4.frame.compress(raw, block_size=lz4.frame.BLOCKSIZE_MAX64KB, block_linked=True,
                              content_checksum=False, store_size=False)


def c_batch(n: int, src: int, dst: int, compress: bool, claim: int | None = None) -> bytes:
    """A C batch frame of 1 + n SNDREC commands from node 2's `src` to node 1's `dst`;
    `claim`: the c_batch_nr it says (default n)."""
    subs = []
    for i in range(n):
        h = make_header(c_cmd=C.CMD_SNDREC_MSG, c_dcid=0, c_src=src, c_dst=dst, c_snode=2,
                        c_dnode=1, c_pid=4242)
        h.c_msg.m_source, h.c_msg.m_type, h.c_msg.m1_i1 = src, 0x0A, i
        subs.append(h)
    payload = pack_batch(subs)
    flags = C.FLAG_BATCH
    if compress:
        packed = c_lz4(payload)
        assert len(packed) < len(payload)         # the C sender compresses only then
        payload, flags = packed, flags | C.FLAG_LZ4
    head = make_header(c_cmd=C.CMD_SNDREC_MSG, c_dcid=0, c_src=src, c_dst=dst, c_snode=2,
                       c_dnode=1, c_pid=4242, c_len=len(payload),
                       c_batch_nr=n if claim is None else claim, c_flags=flags)
    return bytes(head.buf) + payload


def acks_to(fake: RecordingPeer, src: int) -> int:
    return sum(1 for h in fake.frames()
               if h.c_cmd == C.CMD_SNDREC_ACK and h.c_dst == src and h.c_rcode < 0)


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "lz4"])
def test_c_batch_frames_of_the_maximum_size_are_delivered_and_the_link_kept(tmp_path,
                                                                            compress):
    """Batches of 1 + 2 and of 1 + MAXBATCMD commands, as a C sender with `batch YES` (and
    `compress YES`) sends them: every command is delivered (here: each answered with its own
    error ACK, nobody is bound to the destination), and the link stays up."""
    with cluster_from(CONFIG, tmp_path) as cl, recording_peer(cl) as fake:
        fake.send(c_batch(2, 60, 61, compress) + c_batch(C_MAXBATCMD, 62, 61, compress))
        wait_for(lambda: (acks_to(fake, 60), acks_to(fake, 62)) == (3, 1 + C_MAXBATCMD),
                 20, "an error ACK for every command of both batches")
        time.sleep(2 * SILENCE)
        assert fake.link_up(), "the link went down:\n" + log_of(cl, 1)[-2000:]
        assert "bad frame" not in log_of(cl, 1)


@pytest.mark.parametrize("claim", [1, 3, C_MAXBATCMD + 1], ids=["short", "long", "over-max"])
def test_a_compressed_batch_whose_inflated_size_disagrees_closes_only_the_link(tmp_path, claim):
    """An LZ4 batch whose inflated payload is not c_batch_nr headers (as the C receiver, which
    returns EDVSBADVALUE and drops the connection): the link closes with the reason logged and
    nothing of the frame is delivered."""
    with cluster_from(CONFIG, tmp_path) as cl, recording_peer(cl) as fake:
        before = log_of(cl, 1)
        fake.send(c_batch(2, 60, 61, True, claim=claim))
        wait_for(lambda: not fake.link_up(), SILENCE + 5, "the link closed")
        new = log_of(cl, 1)[len(before):]
        assert "bad frame" in new and "batch" in new, new
        assert acks_to(fake, 60) == 0


def test_wrapped_sequence_numbers_and_clock_of_a_c_peer_change_nothing(tmp_path):
    """The C proxies count `c_snd_seq` / `c_ack_seq` in 32 bits and stamp `c_timestamp` with a
    32-bit `time_t`: after a wrap (or with a clock set far off) its frames and HELLOs carry
    any values there.  This DSP reads none of them: such frames are delivered and the link
    stays up."""
    with cluster_from(CONFIG, tmp_path) as cl, recording_peer(cl) as fake:
        for seq, sec, nsec in ((0xFFFFFFFF, -2**31, 999_999_999), (0, 2**31 - 1, 0),
                               (0x80000000, -1, -1)):
            hello = hello_header(2, 1)
            hello.c_flags = 0                  # a C HELLO: no announcement
            h = make_header(c_cmd=C.CMD_SNDREC_MSG, c_dcid=0, c_src=60, c_dst=61,
                            c_snode=2, c_dnode=1, c_pid=4242)
            for x in (hello, h):
                x.c_snd_seq, x.c_ack_seq, x.c_tv_sec, x.c_tv_nsec = seq, seq, sec, nsec
            fake.send(bytes(hello.buf) + bytes(h.buf))
        wait_for(lambda: acks_to(fake, 60) == 3, 10, "the three frames delivered")
        time.sleep(2 * SILENCE)
        assert fake.link_up() and "bad frame" not in log_of(cl, 1)
