"""The frame fuzzer against a real 3-node cluster, bounded to about a minute (`make fuzz-frames`
runs 100,000 frames): hostile frames from the peers' own addresses may cost a frame or a link,
never a thread, a binding someone else owns, or the daemon."""

from __future__ import annotations

import random

import pytest

from cluster_helpers import cluster_from
from dvk_cffi import Message
from dvk_cffi.errors import DvkError
from fuzz import frame_fuzz
from fuzz.harness import PROBE_CLIENT_BASE, PROBE_SERVER_BASE, REQUEST_TYPE, Probes

FUZZ_SECONDS = 25.0


def test_fuzzed_frames_cost_at_most_a_link(tmp_path):
    seed = random.randrange(1 << 30)
    with cluster_from(frame_fuzz.CONFIG, tmp_path) as cl:
        report = frame_fuzz.run(cl, tmp_path, frames=20_000, seconds=FUZZ_SECONDS, seed=seed)
        text = "\n".join([f"seed {seed}", *report.lines()])
        print(text)
        assert report.stats.frames > 500, text
        assert report.stats.connections > 50, text
        # the frames reached the DSPs' frame checks (a connection the acceptor refused, or one
        # nobody reads, would leave "nothing went wrong" below without meaning)
        for n in cl.nodes:
            with open(cl.log_path(f"dsp{n}"), errors="replace") as f:
                rejected = sum("bad frame, closing the link" in line for line in f)
            assert rejected > 0, f"node {n}'s DSP refused no fuzzed frame\n{text}"
        assert not report.failures, text


def test_a_probe_server_a_request_keeps_spinning_is_restarted(tmp_path):
    """A request may ask the latency server to busy-loop for `m1_i2` seconds, and a fuzzed one
    may ask for years: the link check restarts such a server instead of reporting its links
    as lost."""
    with cluster_from(frame_fuzz.CONFIG, tmp_path) as cl:
        probes = Probes(cl, [1, 2], tmp_path)
        try:
            probes.start()
            m = Message()
            m.m_source, m.m_type, m.m1_i2 = PROBE_CLIENT_BASE + 1, REQUEST_TYPE, 3600
            with pytest.raises(DvkError) as err:
                cl.dvk(1).sendrec(PROBE_SERVER_BASE + 2, m, 1000)
            assert err.value.name == "EDVSTIMEDOUT"
            took, last = probes.all_links(30)
            assert took is not None, f"links carry no request: {last}"
            assert probes.restarts == 1
        finally:
            probes.close()
