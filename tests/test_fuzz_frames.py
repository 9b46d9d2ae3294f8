"""The frame fuzzer against a real 3-node cluster, bounded to about a minute (`make fuzz-frames`
runs 100,000 frames): hostile frames from the peers' own addresses may cost a frame or a link,
never a thread, a binding someone else owns, or the daemon."""

from __future__ import annotations

import random

from cluster_helpers import cluster_from
from fuzz import frame_fuzz

FUZZ_SECONDS = 25.0
RECOVER_SECONDS = 20.0


def test_fuzzed_frames_cost_at_most_a_link(tmp_path):
    seed = random.randrange(1 << 30)
    with cluster_from(frame_fuzz.CONFIG, tmp_path) as cl:
        report = frame_fuzz.run(cl, tmp_path, frames=20_000, seconds=FUZZ_SECONDS, seed=seed,
                                recover_bound=RECOVER_SECONDS)
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
