"""A short chaos run (the full one is `make chaos`), in both session modes: four clients loop
through the LB while a server's DSP is killed and frozen, its node kernel and its program are
killed, its whole node is frozen, and then the LB host's DSP restarts (relayed mode) or one
client node's DSP restarts (local mode: nodes 3 and 4 balance their own clients, their
established sessions carried by the compiled code); every fault is healed before the next one.
No request may be lost or misrouted, no client may wait longer than the failure detection
bound, new sessions must all succeed while one healthy server remains and after healing, and a
restarted client node's clients get error codes while the other node's clients see none."""

from __future__ import annotations

import pytest

from cluster_helpers import cluster_from
from fuzz.chaos import DETECTION_BOUND, MODES, Chaos

#: `make chaos` holds clients to the detection bound itself; a shared CI machine gets 1.5 s more.
WAIT_SLACK = 1.5


@pytest.mark.parametrize("mode", ["relayed", "local"])
def test_short_chaos_run(tmp_path, mode):
    with cluster_from(MODES[mode][0], tmp_path) as cl:
        chaos = Chaos(cl, tmp_path, hold_stop=5.0, hold_kill=2.0, sessions=5, mode=mode)
        try:
            chaos.run()
        finally:
            chaos.close()
        table = "\n".join(chaos.table())
        print(table)
        assert sum(r.requests for r in chaos.results) > 100, table
        failures = chaos.failures(DETECTION_BOUND + WAIT_SLACK)
        assert not failures, table + "\n" + "\n".join(failures)
        if mode == "local":  # the run went through the client nodes' compiled code
            assert any(r.fast for r in chaos.results), table
